"""The GEDepth-style model: scale-equalized chained up-fusions, fold, the ground-depth input channel."""
import copy

import pytest
import torch
from densefuse_tasks.depth import DenseDepthHead, DepthTask, SyntheticRoad, expand_input_conv

import densefuse
from densefuse.fusion import Fusion
from densefuse.inference import infer

CONFIG = "depth/gedepth-vanilla_r18_1xb4-300_synthetic-64x192"
#: a smaller model for the tests whose claim does not depend on the default's size
SMALL = ["model.encoder.name=resnet10t", "model.decode_head.widths=[8,16,16,32,32]",
         "model.decode_head.attention_channels=8"]


def make(overrides=(), seed=0):
    cfg = densefuse.load_config(CONFIG, list(overrides))
    task = densefuse.get_task("depth", cfg)
    torch.manual_seed(seed)
    return cfg, task, task.build_model(cfg)


def scene_batches(task, cfg, seed, n_batches=4, batch_size=4, size=(64, 192)):
    ds = SyntheticRoad(n_batches * batch_size, size=size, seed=seed, split="val")
    tf = task.build_transform(cfg, train=False)
    out = []
    for i in range(n_batches):
        items = [ds[i * batch_size + j] for j in range(batch_size)]
        out.append(tf({k: torch.stack([s[k] for s in items]) for k in items[0]}))
    return out


def concat_stats(model, task, batches):
    """Per (site, branch): mean and variance of what enters each fusion conv, averaged over batches,
    measured with forward pre-hooks in the live forward (train-mode BN)."""
    stats = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, Fusion):
            def hook(mod, args, name=name, fusion=m):
                for i, sl in enumerate(fusion.slices):
                    x = args[0][:, sl]
                    stats.setdefault((name, i), []).append(torch.stack([x.mean(), x.var()]))
            hooks.append(m.fuse[0].register_forward_pre_hook(hook))
    model.train()
    with torch.no_grad():
        for b in batches:
            task.forward(model, b)
    for h in hooks:
        h.remove()
    return {k: torch.stack(v).mean(0) for k, v in stats.items()}


def test_decoder_shape_and_sites():
    cfg, task, model = make(["model.equalizer.mode=off"])
    head = model.decode_head
    assert isinstance(head, DenseDepthHead) and len(head.fusions) == 4
    assert [f.align_corners for f in head.fusions] == [True] * 4
    x = torch.randn(2, 3, 64, 96)
    out = model(x, torch.rand(2, 1, 64, 96) * 50)
    assert out["out"].shape == (2, 1, 64, 96) and out["attention"].shape == (2, 1, 64, 96)
    assert (out["out"] >= 1e-3).all()


def test_after_calibration_every_concat_subject_is_standardized():
    cfg, task, model = make()
    table = densefuse.calibrate(model, scene_batches(task, cfg, seed=0, size=(64, 160)), forward=task.forward)
    assert table["pass"].max() == 4  # the four sites are chained: one pass per site, in dependency order
    fresh = scene_batches(task, cfg, seed=1, size=(64, 160))
    stats = concat_stats(model, task, fresh)
    assert len(stats) == 8
    for key, (mean, var) in stats.items():
        assert abs(float(mean)) < 0.05, (key, float(mean))
        assert abs(float(var) - 1) < 0.05, (key, float(var))
    # with the sites off, the upsampled branches are far from that (the reason for equalizing)
    densefuse.set_mode(model, "off")
    raw = concat_stats(model, task, fresh)
    assert max(abs(float(v) - 1) for _, v in raw.values()) > 0.2


def test_fold_matches_explicit_in_the_interior():
    cfg, task, model = make(["model.equalizer.mode=fold", *SMALL])
    densefuse.calibrate(model, scene_batches(task, cfg, seed=0, n_batches=2, batch_size=2, size=(64, 160)),
                        forward=task.forward)
    explicit = copy.deepcopy(model)
    densefuse.set_mode(explicit, "explicit")
    densefuse.fold(model)
    biases_moved = False
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, kwargs, n=n: inputs.__setitem__(n, (args, kwargs)),
                                         with_kwargs=True)
             for n, m in explicit.named_modules() if isinstance(m, Fusion)]
    explicit.eval()
    model.eval()
    # 128 rows: the deepest site runs at 1/16 (8 rows), whose interior is what fold makes exact
    batch = scene_batches(task, cfg, seed=3, n_batches=1, batch_size=1, size=(128, 192))[0]
    with torch.no_grad():
        task.forward(explicit, batch)
    for h in hooks:
        h.remove()
    sites = dict(model.named_modules())
    assert len(inputs) == 4
    for name, (args, kwargs) in inputs.items():
        e_mod, f_mod = dict(explicit.named_modules())[name], sites[name]
        biases_moved |= not torch.equal(e_mod.fuse[0].bias, f_mod.fuse[0].bias)
        with torch.no_grad():
            a = e_mod(*args, **kwargs)[..., 2:-2, 2:-2]  # two 3x3 convs: a 2-pixel border sees the zero padding
            b = f_mod(*args, **kwargs)[..., 2:-2, 2:-2]
        assert float((a - b).abs().max() / a.abs().max()) < 1e-4, name
    assert biases_moved  # no norm after the fusion conv: the mean term went into its bias


def test_ground_channel_is_zero_initialized():
    cfg, task, model = make()
    conv = model.encoder.model.conv1
    assert conv.in_channels == 4 and conv.weight[:, 3].abs().sum() == 0
    torch.manual_seed(0)
    plain = torch.nn.Conv2d(3, 8, 3)
    wide = copy.deepcopy(torch.nn.Sequential(plain))
    new = expand_input_conv(wide, 1)
    x = torch.randn(1, 3, 8, 8)
    assert torch.allclose(new(torch.cat([x, torch.rand(1, 1, 8, 8)], 1)), plain(x), atol=1e-6)


def test_stride4_encoder_gets_a_conv_stem_and_modes_build():
    pytest.importorskip("timm")
    cfg, task, model = make(["model.encoder.name=convnext_atto", "model.encoder.out_indices=[0,1,2,3]",
                             "model.decode_head.widths=null", "depth.ground_embedding=adaptive",
                             "model.equalizer.mode=off"])
    assert model.stem is not None and model.channels[0] == 64 and model.decode_head.widths == model.channels
    out = model(torch.randn(2, 3, 64, 64), torch.rand(2, 1, 64, 64) * 40)
    assert out["slope_logits"].shape == (2, 11, 64, 64) and out["out"].shape == (2, 1, 64, 64)
    _, _, plain = make(["depth.ground_embedding=none", "model.equalizer.mode=off"])
    assert plain.encoder.model.conv1.in_channels == 3 and plain.attention is None
    assert plain(torch.randn(1, 3, 64, 64))["out"].shape == (1, 1, 64, 64)


def test_adaptive_loss_has_the_slope_term():
    cfg, task, model = make(["depth.ground_embedding=adaptive", "model.equalizer.mode=off", *SMALL])
    batch = scene_batches(task, cfg, seed=0, n_batches=1, batch_size=2)[0]
    loss, parts = task.loss(task.forward(model, batch), batch)
    assert set(parts) == {"loss_depth", "loss_slope"}
    assert float(loss.detach()) == pytest.approx(parts["loss_depth"] + parts["loss_slope"], rel=1e-5)
    loss.backward()
    assert model.slope.out.weight.grad.abs().sum() > 0


def test_flip_tta_flips_the_ground_embedding_with_the_image():
    """GEDepth's flip TTA is the core's ``eval.tta.flip``: the mean of the prediction and the un-flipped
    prediction of the flipped image *and* flipped ``ground`` (a model fed the unflipped G would differ)."""
    cfg, task, model = make(["model.equalizer.mode=off", *SMALL])
    model.eval()
    batch = scene_batches(task, cfg, seed=2, n_batches=1, batch_size=2)[0]
    # a level camera's G is left-right symmetric: tilt it so that flipping it matters
    batch["ground"] = batch["ground"] * torch.linspace(0.5, 1.5, batch["ground"].shape[-1])
    with torch.no_grad():
        core = infer(task.forward, model, batch, {"tta": {"flip": True}}, merge=task.merge_tta)["out"]
        a = model(batch["image"], batch["ground"])["out"]
        b = model(batch["image"].flip(-1), batch["ground"].flip(-1))["out"].flip(-1)
        stale = (a + model(batch["image"].flip(-1), batch["ground"])["out"].flip(-1)) / 2
    assert not torch.allclose(a, b, atol=1e-4)  # the flipped view really differs
    assert torch.allclose(core, (a + b) / 2, atol=1e-6)
    assert not torch.allclose(core, stale, atol=1e-4)
    torch.testing.assert_close(DepthTask.merge_tta(task, [{"out": a}, {"out": b}], [False, True])["out"], (a + b) / 2)


def test_kitti_configs_evaluate_with_flip_tta_through_the_core():
    cfg = densefuse.load_config("depth/gedepth-vanilla_r50_1xb8-38.4k_kitti-352x704.yaml")
    assert cfg["eval"]["tta"]["flip"] is True
    assert "flip_tta" not in cfg["depth"]
