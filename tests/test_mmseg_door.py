"""``predict`` runs what ``eval`` runs, and mmseg checkpoints (model zoo or 1.x training runs) evaluate,
predict and convert without running anything from the file."""
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

import densefuse
from densefuse.convert import RefusedGlobal, read_mmseg_checkpoint, to_mmseg_state_dict
from densefuse.data.loader import build_loader
from densefuse.engine.evaluate import infer_outputs
from densefuse.tasks import get_task

from .test_cli import assert_user_error, cli

PAPER = "seg/paper/pspnet_r50-d8_4xb4-160k_ade20k-512x512"
#: the paper row with a narrow head, no ImageNet file, a small test Resize, slide windows and flip TTA:
#: a 75x100 image is resized to 60x80, windows of 48x48 at stride 32, two views
TINY = ["model.encoder.pretrained=null", "model.equalizer.mode=off", "model.decode_head.channels=16",
        "model.decode_head.pool_scales=[1,2]", "model.auxiliary_head.channels=8", "data.test_scale=[100,60]",
        "eval.mode=slide", "eval.crop_size=[48,48]", "eval.stride=[32,32]", "eval.tta.flip=true", "data.num_workers=0"]


def _ade_val(root, size=(75, 100)):
    """An ADE20K tree (official layout) with one non-square validation image."""
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        g = np.random.default_rng(0)
        Image.fromarray(g.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / "images" / split / "ADE_x_1.jpg")
        Image.fromarray(g.integers(0, 151, size, dtype=np.uint8), mode="L").save(root / "annotations" / split / "ADE_x_1.png")
    return root


def _sets(root):
    return [a for s in [*TINY, f"data.root={root}"] for a in ("--set", s)]


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory):
    """A random-init paper model, its densefuse checkpoint and the eval path's labels on the 75x100 image."""
    tmp = tmp_path_factory.mktemp("door")
    root = _ade_val(tmp / "ade")
    cfg = densefuse.load_config(PAPER, [*TINY, f"data.root={root}"])
    task = get_task("seg", cfg)
    torch.manual_seed(0)
    model = task.build_model(cfg).eval()
    with torch.no_grad():  # non-trivial BN statistics, so a wrong mapping shows in the labels
        g = torch.Generator().manual_seed(7)
        for name, t in model.state_dict().items():
            if t.is_floating_point() and t.ndim == 1 and "equalizer" not in name:
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
    ckpt = tmp / "model.pth"
    torch.save({"model": model.state_dict(), "config": cfg.to_dict()}, ckpt)
    loader = build_loader(task.build_dataset(cfg, "val"), 1, train=False, num_workers=0, seed=0)
    transform = task.build_transform(cfg, train=False)
    (batch,) = list(loader)
    with torch.no_grad():
        labels = task.predict(infer_outputs(model, task, transform(batch)))[0]
    assert tuple(batch["image"].shape[-2:]) == (60, 80) and labels.shape == (75, 100)  # resized, then back
    return tmp, root, ckpt, model, labels


def _predicted(out_dir, name="ADE_x_1"):
    return torch.from_numpy(np.array(Image.open(out_dir / f"{name}.png"))).long()


def test_predict_equals_eval_on_a_paper_config_at_a_non_square_size(paper_run):
    tmp, root, ckpt, _, labels = paper_run
    image = root / "images" / "validation" / "ADE_x_1.jpg"
    r = cli("predict", image, "--checkpoint", ckpt, "--out", tmp / "pred")
    assert r.exit_code == 0, r.output
    got = _predicted(tmp / "pred")
    assert got.shape == (75, 100)  # the image's own size
    assert torch.equal(got, labels)
    assert len(labels.unique()) > 1  # a real map, not a constant


def _mmseg_training_checkpoint(path, state_dict):
    """What an mmseg 1.x training run writes: meta, state_dict, a message hub object of mmengine's class,
    optimizer and scheduler state, numpy arrays and scalars. mmengine is faked in sys.modules for the save."""
    names = ["mmengine", "mmengine.logging", "mmengine.logging.message_hub"]
    saved = {n: sys.modules.get(n) for n in names}
    hub_mod = types.ModuleType(names[-1])

    class MessageHub:
        def __init__(self):
            self.log_scalars = {"train/loss": np.arange(4.0)}
            self.runtime_info = {"iter": np.int64(160000), "epoch": 0}

    MessageHub.__module__ = names[-1]
    MessageHub.__qualname__ = "MessageHub"
    hub_mod.MessageHub = MessageHub
    for n in names[:-1]:
        sys.modules[n] = types.ModuleType(n)
    sys.modules[names[-1]] = hub_mod
    try:
        first = next(iter(state_dict.values()))
        torch.save({
            "meta": {"epoch": 0, "iter": 160000, "mmseg_version": "1.2.2", "seed": np.int64(0),
                     "dataset_meta": {"classes": ("wall",), "palette": [[120, 120, 120]]}},
            "state_dict": state_dict,
            "message_hub": MessageHub(),
            "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros_like(first)}},
                          "param_groups": [{"lr": 6e-5, "betas": (0.9, 0.999), "params": [0]}]},
            "param_schedulers": [{"last_step": np.int64(160000), "base_values": np.array([6e-5])}],
        }, path)
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


def test_an_mmseg_training_checkpoint_evaluates_predicts_and_converts(paper_run, tmp_path):
    tmp, root, ckpt, model, labels = paper_run
    mm = tmp_path / "iter_160000.pth"
    _mmseg_training_checkpoint(mm, to_mmseg_state_dict(model))
    with pytest.raises(Exception, match="Weights only load failed"):  # what a weights-only load says
        torch.load(mm, weights_only=True)
    assert "mmengine" not in sys.modules or not hasattr(sys.modules.get("mmengine.logging.message_hub"), "MessageHub")

    ours = cli("eval", "--checkpoint", ckpt)
    theirs = cli("eval", "--checkpoint", mm, "--config", PAPER, *_sets(root))
    assert ours.exit_code == 0 and theirs.exit_code == 0, theirs.output
    assert "mmseg checkpoint, converted to densefuse" in theirs.output
    assert theirs.output.splitlines()[-1] == ours.output.splitlines()[-1]  # the same mIoU / aAcc / mAcc row

    r = cli("predict", root / "images" / "validation", "--checkpoint", mm, "--config", PAPER, *_sets(root),
            "--out", tmp_path / "pred")
    assert r.exit_code == 0, r.output
    assert torch.equal(_predicted(tmp_path / "pred"), labels)

    r = cli("convert", mm, "--config", PAPER, *_sets(root), "--out", tmp_path / "converted.pth")
    assert r.exit_code == 0, r.output
    again = cli("eval", "--checkpoint", tmp_path / "converted.pth")  # its own config: no --config needed
    assert again.exit_code == 0 and again.output.splitlines()[-1] == ours.output.splitlines()[-1]
    assert "mmseg" not in again.output


def test_an_mmseg_checkpoint_without_config_says_what_to_pass(paper_run, tmp_path):
    _, _, _, model, _ = paper_run
    mm = tmp_path / "mm.pth"
    torch.save({"meta": {"iter": 1}, "state_dict": to_mmseg_state_dict(model)}, mm)  # a model-zoo file
    assert_user_error(cli("eval", "--checkpoint", mm), "is an mmseg checkpoint", "pass --config")
    assert_user_error(cli("convert", mm, "--out", tmp_path / "x.pth"), "convert needs --config")


class _Evil:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return (self.fn, (self.arg,))


@pytest.mark.parametrize("fn, arg", [(os.system, "echo pwned > pwned.txt"),
                                     (eval, "open('pwned.txt', 'w').write('pwned')")], ids=["os.system", "eval"])
def test_a_malicious_pickle_is_still_refused_and_nothing_runs(tmp_path, monkeypatch, fn, arg):
    monkeypatch.chdir(tmp_path)
    plain = tmp_path / "evil.pth"
    plain.write_bytes(pickle.dumps(_Evil(fn, arg)))
    inside = tmp_path / "evil_inside.pth"  # a torch zip file whose state_dict hides the call
    torch.save({"meta": {}, "state_dict": {"backbone.x": _Evil(fn, arg), "decode_head.y": torch.ones(1)}}, inside)
    for path in (plain, inside):
        with pytest.raises(RefusedGlobal, match=r"(posix|nt|builtins)\.(system|eval)"):
            read_mmseg_checkpoint(path)
        for args in (["eval", "--checkpoint", path, "--config", PAPER],
                     ["convert", path, "--config", PAPER, "--out", "c.pth"]):
            line = assert_user_error(cli(*args), path.name)
            assert "\x1b" not in line  # no terminal colour codes from torch's message
    assert not (tmp_path / "pwned.txt").exists() and not (tmp_path / "c.pth").exists()


def test_convert_of_a_densefuse_checkpoint_is_refused(paper_run, tmp_path):
    _, _, ckpt, _, _ = paper_run
    assert_user_error(cli("convert", ckpt, "--config", PAPER, "--out", tmp_path / "x.pth"),
                      "is not an mmseg checkpoint", "needs no conversion")
    assert not (tmp_path / "x.pth").exists()
