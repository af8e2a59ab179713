"""Calibration of smp models on padded crops: the ``valid`` mask reaches the sites densefuse.smp attaches."""
from __future__ import annotations

import segmentation_models_pytorch as smp
import torch
from torch import nn

import densefuse
import densefuse.smp as dsmp
from densefuse.fusion import valid_positions

ENC = {"encoder_name": "resnet18", "encoder_weights": None, "classes": 3}


def build(arch: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return dsmp.equalize(getattr(smp, arch)(**ENC, **kwargs))


def norm_free(model: nn.Module) -> nn.Module:
    """Norms -> identity and conv biases 0: a zero-padded region then stays exactly zero through the encoder,
    as the convolutions' own zero padding is, so the features of the real pixels do not depend on the
    padding except where a decoder resamples across the crop's edge."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, (nn.BatchNorm2d, nn.GroupNorm)):
                setattr(module, name, nn.Identity())
            elif isinstance(child, nn.Conv2d) and child.bias is not None:
                nn.init.zeros_(child.bias)
    return model


def stats(model: nn.Module) -> dict:
    return {name: (eq.mean.clone(), eq.std.clone()) for name, eq in densefuse.equalizers(model)}


def padded_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 128x128 crop, the same crop zero-padded (mmseg's image padding) to 128x256, and its validity."""
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(seed))
    padded = torch.cat([x, torch.zeros(2, 3, 128, 128)], dim=-1)
    valid = torch.zeros(2, 1, 128, 256, dtype=torch.bool)
    valid[..., :128] = True
    return x, padded, valid


def test_unet_calibrated_on_padded_crops_matches_the_unpadded_crop():
    x, padded, valid = padded_batch()
    ref, masked, unmasked = (norm_free(build("Unet", decoder_interpolation="bilinear")) for _ in range(3))
    densefuse.calibrate(ref, [{"image": x}])
    densefuse.calibrate(masked, [{"image": padded, "valid": valid}])
    densefuse.calibrate(unmasked, [{"image": padded}])
    want, got, bad = stats(ref), stats(masked), stats(unmasked)
    assert len(want) == 4
    worst_masked = worst_unmasked = 0.0
    for name, (mean, std) in want.items():
        # only the resampling across the crop's edge differs: a few % at most
        torch.testing.assert_close(got[name][1], std, rtol=0.06, atol=0.0)
        torch.testing.assert_close(got[name][0], mean, rtol=0.0, atol=0.06 * float(std.min()))
        worst_masked = max(worst_masked, float(((got[name][1] - std).abs() / std).max()))
        worst_unmasked = max(worst_unmasked, float(((bad[name][1] - std).abs() / std).max()))
    assert worst_unmasked > 0.1 > worst_masked  # counting the padding would move the scales by > 10 %


def _concat_inputs(model: nn.Module) -> dict:
    """The tensor each equalized consumer receives, captured by a pre-hook that runs before the equalizer's."""
    seen: dict = {}
    for eq_name, eq in densefuse.equalizers(model):
        consumer = model.get_submodule(eq.site.consumer)
        consumer.register_forward_pre_hook(lambda m, a, n=eq_name: seen.__setitem__(n, a[0].detach()), prepend=True)
    return seen


def _moments(x: torch.Tensor, groups: tuple, keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    parts = torch.split(x, list(groups), dim=1)
    means, stds = [], []
    for p in parts:
        v = p.transpose(0, 1)[:, keep] if keep is not None else p
        v = v.double()
        means.append(v.mean())
        stds.append(v.var(unbiased=False).sqrt())
    return torch.stack(means).float(), torch.stack(stds).float()


def test_smp_sites_count_exactly_the_valid_positions():
    """UPerNet (PPM + FPN fusion) and FPN: with the mask, each site's statistics are those of its concat at the
    positions wholly on real pixels; without it, those of every position."""
    _, padded, valid = padded_batch(seed=3)
    for arch, kwargs in (("UPerNet", {}), ("FPN", {"decoder_merge_policy": "cat"})):
        for mask in (True, False):
            model = build(arch, **kwargs)
            captured = _concat_inputs(model)
            densefuse.calibrate(model, [{"image": padded, "valid": valid} if mask else {"image": padded}])
            eqs = dict(densefuse.equalizers(model))
            for name, eq in eqs.items():
                x = captured[name]
                keep = valid_positions(valid, x.shape[-2:]) if mask else None
                if mask:
                    assert 0 < int(keep.sum()) < keep.numel()
                mean, std = _moments(x, eq.groups, keep)
                torch.testing.assert_close(eq.mean, mean, rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(eq.std, std, rtol=1e-4, atol=1e-5)
                if mask:
                    all_mean, all_std = _moments(x, eq.groups, None)
                    assert not torch.allclose(eq.std, all_std, rtol=1e-3)


def test_measure_on_smp_sites_leaves_padding_out():
    _, padded, valid = padded_batch(seed=4)
    model = build("FPN", decoder_merge_policy="cat")
    densefuse.calibrate(model, [{"image": padded, "valid": valid}])
    masked = densefuse.measure(model, [{"image": padded, "valid": valid}])
    full = densefuse.measure(model, [{"image": padded}])
    # the statistics the site was calibrated on, measured again on the same pixels: 0 / 1 after the equalizer
    assert masked["mean_after"].abs().max() < 1e-4
    assert (masked["std_after"] - 1).abs().max() < 1e-4
    assert (full["std_after"] - 1).abs().max() > 1e-2
