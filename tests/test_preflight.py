"""``train`` runs the evaluation path once on the hardest validation samples before its first step: a
setting or model that cannot evaluate is one line, exit 2, before the run directory exists."""
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import densefuse
from densefuse.engine.preflight import hardest_samples

from .test_cli import CONFIGS, assert_user_error, cli

SIZES = [(32, 32), (40, 52), (37, 50)]  # the last: largest odd size; the second: largest


def _ade(root, sizes=SIZES):
    for split in ("training", "validation"):
        for i, size in enumerate(sizes):
            name = f"ADE_{split}_{i:08d}"
            (root / "images" / split).mkdir(parents=True, exist_ok=True)
            (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
            g = np.random.default_rng(i)
            Image.fromarray(g.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / "images" / split / f"{name}.jpg")
            Image.fromarray(g.integers(1, 151, size, dtype=np.uint8), mode="L").save(
                root / "annotations" / split / f"{name}.png")
    return root


def _switch(root):
    """The synthetic default config switched to ADE20K by --set, tiny."""
    sets = ["data.type=ade20k", f"data.root={root}", "model.num_classes=150", "data.crop_size=[32,32]",
            "model.decode_head.channels=16", "model.auxiliary_head.channels=8", "calibration.num_images=2",
            "calibration.batch_size=2", "train.batch_size=2", "train.iters=2", "train.val_interval=2",
            "train.ckpt_interval=2", "train.log_interval=1", "model.decode_head.pool_scales=[1,2]"]
    return [a for s in sets for a in ("--set", s)]


def test_the_hardest_samples_come_from_the_headers(tmp_path):
    root = _ade(tmp_path / "ade")
    cfg = densefuse.load_config(CONFIGS / "synthetic_upernet_r18.yaml", [a for a in _switch(root) if a != "--set"])
    val = densefuse.get_task("seg", cfg).build_dataset(cfg, "val")
    indices, sizes = hardest_samples(val)
    assert indices == [1, 2] and sizes == {1: (40, 52), 2: (37, 50)}  # largest, then the oddest


def test_switching_to_ade20k_with_set_evaluates_with_batch_1_and_trains(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = _ade(tmp_path / "ade")
    cfg = densefuse.load_config(CONFIGS / "synthetic_upernet_r18.yaml", ["data.type=ade20k", f"data.root={root}",
                                                                          "model.num_classes=150"])
    assert cfg["eval"]["batch_size"] == 1  # the synthetic base's 8 was for its same-size images
    kept = densefuse.load_config(CONFIGS / "synthetic_upernet_r18.yaml", ["data.type=ade20k", f"data.root={root}",
                                                                           "model.num_classes=150", "eval.batch_size=4"])
    assert kept["eval"]["batch_size"] == 4  # what the user writes stays
    r = cli("train", *_switch(root), "--work-dir", tmp_path / "run")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "run" / "final.pth").is_file()


def test_an_unstackable_eval_batch_stops_before_the_first_step(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = _ade(tmp_path / "ade")
    line = assert_user_error(cli("train", *_switch(root), "--set", "eval.batch_size=2", "--work-dir", tmp_path / "run"),
                             "eval.batch_size=2", "ade20k", "use eval.batch_size=1", "40x52", "37x50")
    assert "Traceback" not in line
    assert not (tmp_path / "run").exists()  # before the run directory, so before any step


class _NeedsMultiplesOf32(nn.Module):
    """A model that, like a patch embedding without padding, cannot run at sides that are not multiples of 32."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, *args):
        assert x.shape[-1] % 32 == 0, f"Input width ({x.shape[-1]}) should be divisible by patch size (32)"
        return self.inner(x, *args)


def test_a_model_that_cannot_run_at_an_odd_size_stops_before_the_first_step(tmp_path, monkeypatch):
    from densefuse_tasks.seg import SegTask

    monkeypatch.chdir(tmp_path)
    root = _ade(tmp_path / "ade")
    build = SegTask.build_model
    monkeypatch.setattr(SegTask, "build_model", lambda self, cfg: _NeedsMultiplesOf32(build(self, cfg)))
    steps = []
    monkeypatch.setattr("densefuse.engine.step.TrainStep.__call__", lambda *a, **k: steps.append(1))
    assert_user_error(cli("train", *_switch(root), "--work-dir", tmp_path / "run"),
                      "evaluation would fail at the first validation", "ADE_validation_00000001.jpg (40x52)",
                      "AssertionError: Input width (52) should be divisible by patch size (32)", "eval.mode whole")
    assert not steps and not (tmp_path / "run").exists()


@pytest.mark.slow  # two short training runs
def test_the_preflight_leaves_the_run_as_it_was(tmp_path, monkeypatch):
    """Equalizer modes and every RNG state are restored: the run ends with the weights it has without the check."""
    import densefuse.engine.trainer as trainer

    monkeypatch.chdir(tmp_path)
    base = ["--set", "data.kwargs.size=[32,32]", "--set", "data.crop_size=[32,32]", "--set", "data.kwargs.num_train=4",
            "--set", "data.kwargs.num_val=2", "--set", "calibration.batch_size=2", "--set", "calibration.num_images=2",
            "--set", "model.decode_head.channels=16", "--set", "model.auxiliary_head.channels=8", "--set",
            "train.iters=1", "--set", "train.batch_size=2", "--set", "model.equalizer.mode=explicit",
            "--set", "model.decode_head.pool_scales=[1,2]"]
    finals = []
    for name, check in (("with", trainer.preflight_evaluation), ("without", lambda *a, **k: None)):
        monkeypatch.setattr(trainer, "preflight_evaluation", check)
        r = cli("train", *base, "--work-dir", tmp_path / name)
        assert r.exit_code == 0, r.output
        finals.append(torch.load(tmp_path / name / "final.pth", weights_only=True)["model"])
    a, b = finals
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
