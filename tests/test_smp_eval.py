"""Evaluation strategies on equalized smp models (plain-tensor outputs): slide windows and flip TTA."""
import segmentation_models_pytorch as smp
import torch
from densefuse_tasks.seg import SegTask

import densefuse
import densefuse.smp as dsmp
from densefuse.inference import infer


def _model():
    torch.manual_seed(0)
    model = dsmp.equalize(smp.FPN(encoder_name="resnet18", encoder_weights=None, classes=4,
                                  decoder_merge_policy="cat"))
    densefuse.calibrate(model, [torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))])
    return model.eval()


def test_slide_and_flip_on_an_equalized_smp_model():
    model, forward = _model(), SegTask().forward
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    batch = {"image": x}
    with torch.no_grad():
        whole = infer(forward, model, batch, {"mode": "whole"})["out"]
        torch.testing.assert_close(whole, model(x))
        covering = infer(forward, model, batch, {"mode": "slide", "crop_size": [64, 96], "stride": [32, 32]})["out"]
        torch.testing.assert_close(covering, whole)
        # two 64x64 windows at x = 0 and 32: the middle 32 columns are the mean of both windows' outputs
        slide = infer(forward, model, batch, {"mode": "slide", "crop_size": [64, 64], "stride": [32, 32],
                                              "slide_batch": 1})["out"]
        left, right = model(x[..., :64]), model(x[..., 32:])
        torch.testing.assert_close(slide[..., :32], left[..., :32])
        torch.testing.assert_close(slide[..., 32:64], (left[..., 32:] + right[..., :32]) / 2)
        torch.testing.assert_close(slide[..., 64:], right[..., 32:])
        flip = infer(forward, model, batch, {"tta": {"flip": True}})["out"]
        torch.testing.assert_close(flip, (model(x) + model(x.flip(-1)).flip(-1)) / 2)
