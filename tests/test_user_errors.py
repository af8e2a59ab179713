"""The catalogue of user errors (docs/errors.md), one test per case, through the CLI in-process.

Each bad invocation exits 2 with exactly one ``error:`` line on stderr naming the key, file or value,
and leaves every file of the user unchanged. Valid input that used to be refused runs. Cases tested
elsewhere are listed in docs/errors.md with their test.
"""
import os
import pickle
from pathlib import Path

import pytest
import torch
import yaml

import densefuse

from .test_cli import CONFIGS, _ade_config, _ade_tree, _write_image, assert_user_error, cli, snapshot

SMALL = ["--set", "data.kwargs.size=[32,32]", "--set", "data.crop_size=[32,32]", "--set", "data.kwargs.num_train=4",
         "--set", "calibration.batch_size=2", "--set", "model.decode_head.channels=16",
         "--set", "model.auxiliary_head.channels=8"]


class _Evil:
    """A pickle that runs a shell command when loaded without ``weights_only``."""

    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    """A working directory with some files of the user's; the test checks none of them changes."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("the user's own file\n")
    (tmp_path / "evil.pth").write_bytes(pickle.dumps(_Evil()))
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint" * 8)
    return tmp_path




def fails(user_dir, args, *fragments, ignore=()):
    before = snapshot(user_dir)
    line = assert_user_error(cli(*args), *fragments)
    after = {k: v for k, v in snapshot(user_dir).items() if Path(k).name not in ignore}
    assert after == before  # nothing written, nothing changed, nothing executed
    return line


# --------------------------------------------------------------------------------------------------
# values checked before any work starts


@pytest.mark.parametrize("args, fragments", [
    pytest.param(["train", "--set", "train.batch_size=0"], ["'train.batch_size'", "int >= 1", "0"], id="batch-size-0"),
    pytest.param(["train", "--set", "train.batch_size=1"], ["train.batch_size=1", "pool-scale-1", "train.batch_size >= 2"],
                 id="batch-size-1-bn-pool-branch"),
    pytest.param(["train", "--set", "train.ckpt_interval=0"], ["'train.ckpt_interval'", "0"], id="ckpt-interval-0"),
    pytest.param(["train", "--set", "train.iters=-5"], ["'train.iters'", "-5"], id="negative-iters"),
    pytest.param(["train", "--set", "model.neck={type: hahi}"], ["model.neck is for the depth model", "hahi"],
                 id="seg-with-the-depth-neck"),
    pytest.param(["train", "--set", "model.init=gedepth"], ["model.init is for the depth model", "gedepth"],
                 id="seg-with-the-depth-init"),
    pytest.param(["train", "--set", "train.grad_clip=abc"], ["'train.grad_clip'", "'abc'"], id="grad-clip-str"),
    pytest.param(["train", "--set", "calibration.num_images=0"], ["'calibration.num_images'", "0"], id="calib-images-0"),
    pytest.param(["train", "--set", "device=gpu0"], ["'device'", "'gpu0'"], id="device-name"),
    pytest.param(["train", "--set", "data.crop_size=[64]"], ["data.crop_size", "[64]"], id="crop-size-one-value"),
    pytest.param(["train", "--set", "train.amp=maybe"], ["train.amp", "maybe"], id="amp-value"),
    pytest.param(["train", "--set", "optim.lr"], ["--set expects key=value", "'optim.lr'"], id="set-without-value"),
    pytest.param(["train", "--set", "data.type=kitti"], ["data.type", "'kitti'", "synthetic"], id="unknown-dataset"),
    pytest.param(["calibrate", "--set", "model.decode_head.type=psph"], ["model.decode_head.type", "'psph'",
                                                                         "did you mean 'psp'"], id="unknown-head"),
    pytest.param(["train", "--set", "model.decode_head.predictor=clsseg"],
                 ["--set model.decode_head.predictor=clsseg", "did you mean 'cls_seg'"], id="unknown-predictor"),
    pytest.param(["train", "--set", "train.itres=3"], ["did you mean 'train.iters'"], id="unknown-key"),
    pytest.param(["train", "--set", "nonexistent.key=1"], ["no config key 'nonexistent'"], id="set-missing-key"),
    pytest.param(["train", "--set", "train.iters=abc"], ["'train.iters' must be int", "'abc'"], id="wrong-type"),
    pytest.param(["train", "--task", "segg"], ["unknown task 'segg' (did you mean 'seg'?)"], id="unknown-task"),
    pytest.param(["train", "--set", "task=true"], ["unknown task 'True'", "available: depth, mtl, normals, seg"], id="task-not-a-name"),
    pytest.param(["train", "--config", "missing.yaml"], ["config file not found: missing.yaml"], id="missing-config"),
    pytest.param(["eval", "--checkpoint", "missing.pth"], ["checkpoint not found: missing.pth"], id="missing-checkpoint"),
    pytest.param(["compare", "--modes", "off,bogus"], ["unknown equalizer mode(s) bogus"], id="unknown-compare-mode"),
    pytest.param(["train", "--resume"], ["--resume needs --work-dir"], id="resume-without-work-dir"),
    pytest.param(["train", "--task", "depth", "--set", "data.type=ade20k"], ["data.type 'ade20k'", "kitti"],
                 id="unknown-depth-dataset"),
    pytest.param(["train", "--set", "data.type=ade20k", "--set", "model.num_classes=150"],
                 ["data.root must be set", "'ade20k'"], id="dataset-without-root"),
    pytest.param(["train", "--set", "data.type=ade20k", "--set", "data.root=nope"],
                 ["model.num_classes is 6", "150"], id="num-classes-of-the-dataset"),
    pytest.param(["train", "--set", "data.type=ade20k", "--set", "data.root=nope", "--set", "model.num_classes=150"],
                 ["ADE20K root", "nope"], id="missing-dataset-root"),
    pytest.param(["train", "--set", "data.pipeline=mmseg", "--set", "eval.batch_size=2", "--set", "data.type=ade20k",
                  "--set", "data.root=ade"],
                 ["eval.batch_size=2", "data.pipeline: mmseg", "'ade20k'", "eval.batch_size=1"], id="mmseg-eval-batch"),
    pytest.param(["train", "--set", "model.encoder.pretrained=."], ["pretrained weights .", "is not a file"],
                 id="pretrained-is-a-folder"),
    pytest.param(["train", "--set", "optim.type=adamx"], ["'optim.type' must be one of adamw, sgd", "'adamx'"],
                 id="optim-type"),
    pytest.param(["train", "--set", "optim.impl=fast"], ["'optim.impl' must be one of auto, fused", "'fast'"],
                 id="optim-impl"),
    pytest.param(["train", "--config", "."], ["config . is a directory; give a .yaml file"], id="config-is-a-folder"),
    pytest.param(["eval", "--checkpoint", "."], ["checkpoint . is a directory", "latest.pth"], id="checkpoint-is-a-folder"),
    pytest.param(["train", "--bogus"], ["No such option '--bogus'", "see 'main train --help'"], id="unknown-option"),
    pytest.param(["predict", "--checkpoint", "missing.pth", "--out", "notes.txt", "img.png"],
                 ["Invalid value for '--out'", "'notes.txt' is a file"], id="out-dir-is-a-file"),
])
def test_bad_value_is_one_line_before_any_work(user_dir, args, fragments):
    fails(user_dir, args, *fragments)


@pytest.mark.parametrize("task, setting, choices", [
    ("seg", "train.amp=true", "off, fp16, bf16"),
    ("seg", "model.equalizer.mode=false", "off, explicit, fold"),
    ("seg", "data.pipeline=true", "batch, mmseg"),
    ("seg", "eval.mode=1", "whole, slide"),
    ("seg", "optim.type=true", "adamw, sgd"),
    ("seg", "schedule.type=1", "poly, constant"),
    ("seg", "model.encoder.output_stride=abc", "8, 16, 32"),
    ("seg", "model.decode_head.branch=true", "conv_bn_relu_up, conv_relu_up_bn"),
    ("depth", "depth.eval_crop=true", "garg, eigen, none"),
    ("depth", "depth.ground_embedding=false", "vanilla, adaptive, none"),
])
def test_a_choice_of_the_wrong_type_lists_the_choices(user_dir, task, setting, choices):
    """YAML reads ``true`` as a bool and ``1`` as an int: the message still lists what to write."""
    key = setting.split("=")[0]
    fails(user_dir, ["train", "--task", task, "--set", setting], f"'{key}' must be one of {choices}")


@pytest.mark.parametrize("setting, fragments", [
    ("model.type=true", ["unknown model.type 'True'", "available: encoder_decoder"]),
    ("data.type=1", ["unknown data.type '1'", "available: synthetic, ade20k, voc, cityscapes"]),
])
def test_a_name_of_the_wrong_type_lists_the_names(user_dir, setting, fragments):
    fails(user_dir, ["train", "--set", setting], *fragments)


def test_switching_the_dataset_with_set_drops_the_old_datasets_keys(user_dir):
    """The synthetic base's ``data.kwargs`` (num_train, ...) do not follow a ``--set data.type=ade20k``:
    the ADE20K tree trains; a key the user writes for the new type is still checked."""
    root = _ade_tree(user_dir / "ade")
    switch = ["--set", "data.type=ade20k", "--set", f"data.root={root}", "--set", "model.num_classes=150",
              "--set", "data.val_split=training"]
    cfg = densefuse.load_config("seg/synthetic_upernet_r18", [a for a in switch if a != "--set"])
    assert dict(cfg.data.kwargs) == {}
    fails(user_dir, ["train", *switch, "--set", "data.kwargs.num_train=4"],
          "--set data.kwargs.num_train=4", "unknown config key 'data.kwargs.num_train' for data.type 'ade20k'",
          "it takes: reduce_zero_label")
    r = cli("calibrate", *switch, "--set", "data.crop_size=[32,32]", "--set", "calibration.batch_size=2",
            "--set", "model.decode_head.channels=16", "--set", "model.auxiliary_head.channels=8",
            "--num-images", "2", "--out", "c.csv")
    assert r.exit_code == 0, r.output


def test_switching_the_depth_dataset_drops_the_synthetic_keys(user_dir):
    cfg = densefuse.load_config("depth/gedepth-vanilla_r18_1xb4-300_synthetic-64x192",
                                ["data.type=kitti", "data.root=kitti"])
    assert dict(cfg.data.kwargs) == {}
    fails(user_dir, ["train", "--task", "depth", "--set", "data.type=kitti", "--set", "data.root=kitti"],
          "split file not found", "kitti")


def test_an_empty_config_file_is_named(user_dir):
    (user_dir / "empty.yaml").write_text("# only a comment\n")
    fails(user_dir, ["train", "--config", "empty.yaml"], "empty.yaml: the config file is empty")


def test_a_truncated_checkpoint_says_its_end_is_missing(user_dir):
    buf = __import__("io").BytesIO()
    torch.save({"model": {"w": torch.zeros(1000)}}, buf)
    (user_dir / "half.pth").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    line = fails(user_dir, ["inspect", "--checkpoint", "half.pth"], "cannot read checkpoint half.pth",
                 "the file ends early", "did not finish")
    assert "miniz" not in line and "weights_only" not in line


def test_yaml_syntax_error_names_line_and_column(user_dir):
    (user_dir / "bad.yaml").write_text("train:\n  iters: 3\n   lr: [1, 2\n")
    fails(user_dir, ["train", "--config", "bad.yaml"], "bad.yaml:3:", "invalid YAML")


def test_a_key_written_twice_names_file_line_and_key(user_dir):
    (user_dir / "twice.yaml").write_text("train:\n  batch_size: 4\ntrain:\n  amp: bf16\n")
    fails(user_dir, ["train", "--config", "twice.yaml"], "twice.yaml:3:", "duplicate key 'train'", "line 1")


def test_unknown_key_in_a_file_names_the_key(user_dir):
    (user_dir / "bad.yaml").write_text("train:\n  iterz: 3\n")
    fails(user_dir, ["train", "--config", "bad.yaml"], "'train.iterz'", "did you mean 'train.iters'")


# --------------------------------------------------------------------------------------------------
# files that are not what they claim: refused, never executed


@pytest.mark.parametrize("command", ["eval", "inspect", "predict", "pretrained"])
def test_malicious_pickle_is_refused_everywhere(user_dir, command):
    _write_image(user_dir / "img.png", (32, 32))
    args = {
        "eval": ["eval", "--checkpoint", "evil.pth"],
        "inspect": ["inspect", "--checkpoint", "evil.pth", "--out", "insp", *SMALL],
        "predict": ["predict", "img.png", "--checkpoint", "evil.pth", "--out", "pred"],
        "pretrained": ["train", "--set", "model.encoder.pretrained=evil.pth"],
    }[command]
    fails(user_dir, args, "evil.pth")
    assert not (user_dir / "pwned.txt").exists()


def test_malicious_latest_checkpoint_is_refused_on_resume(user_dir):
    wd = user_dir / "run"
    wd.mkdir()
    cfg = densefuse.load_config("seg/synthetic_upernet_r18")
    (wd / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    (wd / "latest.pth").write_bytes(pickle.dumps(_Evil()))
    fails(user_dir, ["train", "--work-dir", "run", "--resume"], "latest.pth", ignore=(".densefuse.lock",))
    assert not (user_dir / "pwned.txt").exists()


def test_pretrained_file_that_is_not_weights(user_dir):
    fails(user_dir, ["train", "--set", "model.encoder.pretrained=garbage.pth"], "garbage.pth")


def test_missing_pretrained_file(user_dir):
    fails(user_dir, ["train", "--set", "model.encoder.pretrained=missing.pth"], "missing.pth", "model.encoder.pretrained")


def test_pretrained_file_of_another_model_is_refused_before_the_run_dir(user_dir):
    """A weights-only file whose tensors do not fit the encoder: found by the build before the run dir."""
    import torch

    torch.save({"foo.weight": torch.zeros(3)}, user_dir / "other.pth")
    fails(user_dir, ["train", "--set", "model.encoder.pretrained=other.pth"], "model.encoder.pretrained", "other.pth",
          "1 key without a parameter", "foo.weight")


def test_pretrained_file_trains(user_dir):
    """A real weights file (timm's resnet18 layout, saved as zip, legacy and safetensors) passes the check and trains."""
    import timm
    import torch
    from safetensors.torch import save_file

    sd = timm.create_model("resnet18", pretrained=False).state_dict()
    torch.save(sd, user_dir / "r18.pth", _use_new_zipfile_serialization=False)
    save_file(sd, str(user_dir / "r18.safetensors"))
    for name in ("r18.pth", "r18.safetensors"):
        r = cli("train", "--work-dir", f"run_{Path(name).suffix[1:]}", "--no-progress", "--set", "train.iters=1",
                "--set", "train.batch_size=2", "--set", "data.kwargs.num_val=2", "--set", "calibration.num_images=2",
                "--set", f"model.encoder.pretrained={name}", *SMALL)
        assert r.exit_code == 0, r.output


# --------------------------------------------------------------------------------------------------
# work directories: never write into the user's files


def test_work_dir_with_the_users_files_is_refused(user_dir):
    mine = user_dir / "mine"
    mine.mkdir()
    (mine / "final.pth").write_text("the user's weights")
    (mine / "metrics.csv").write_text("the user's numbers")
    fails(user_dir, ["train", "--work-dir", "mine"], "mine", "did not create")


def test_work_dir_that_cannot_be_created(user_dir):
    (user_dir / "afile").write_text("x")
    fails(user_dir, ["train", "--work-dir", "afile/run"], "cannot create work dir afile/run")


def test_work_dir_below_a_file(user_dir):
    (user_dir / "afile").write_text("x")
    fails(user_dir, ["train", "--work-dir", "afile/deeper/run"], "cannot create work dir afile/deeper/run",
          "afile is not a directory")


def test_compare_work_dir_below_a_file(user_dir):
    (user_dir / "afile").write_text("x")
    fails(user_dir, ["compare", "--seeds", "0", "--work-dir", "afile/cmp", *SMALL], "cannot create work dir afile/cmp")


@pytest.mark.parametrize("args", [
    ["calibrate", "--num-images", "2", "--out", "afile/c.csv", *SMALL],
    ["inspect", "--num-images", "2", "--out", "afile/insp", *SMALL],
    ["eval", "--checkpoint", "missing.pth", "--out", "afile/e.csv"],
    ["predict", "img.png", "--checkpoint", "missing.pth", "--out", "afile/pred"],
], ids=["calibrate", "inspect", "eval", "predict"])
def test_out_below_a_file_is_refused_before_any_work(user_dir, args):
    (user_dir / "afile").write_text("x")
    _write_image(user_dir / "img.png", (32, 32))
    out = args[args.index("--out") + 1]
    fails(user_dir, args, f"cannot create --out {out}: afile is not a directory")


def test_read_only_work_dir(user_dir, monkeypatch):
    """The write probe's failure is one line naming the work dir (tests run as root, who may write into a
    read-only folder, so the probe's PermissionError is what a user without write access gets)."""
    import tempfile

    (user_dir / "ro").mkdir()
    real = tempfile.mkstemp

    def refused(*args, **kwargs):
        if Path(kwargs.get("dir", "")).resolve() == (user_dir / "ro").resolve():
            raise PermissionError(13, "Permission denied")
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    fails(user_dir, ["train", "--work-dir", "ro/run"], "work dir ro/run is not writable (ro): Permission denied")
    fails(user_dir, ["train", "--work-dir", "ro"], "work dir ro is not writable: Permission denied")


def test_failed_start_does_not_block_its_rerun(user_dir):
    """A run that fails before its first checkpoint (here: a corrupt image during calibration) leaves
    nothing that blocks the same command: the re-run fails with the same data error, not 'already holds
    a run', and after the image is fixed it trains."""
    root = _ade_tree(user_dir / "ade")
    bad = root / "images" / "training" / "ADE_train_00000001.jpg"
    good = bad.read_bytes()
    bad.write_bytes(good[:200])
    cfg = _ade_config(user_dir, root)
    args = ["train", "--config", cfg, "--work-dir", "run", "--no-progress", "--set", "train.iters=1",
            "--set", "data.val_split=training",
            "--set", "train.batch_size=2", "--set", "model.decode_head.channels=16",
            "--set", "model.auxiliary_head.channels=8"]
    for _ in range(2):
        assert_user_error(cli(*args), "cannot decode image file", str(bad))
    bad.write_bytes(good)
    r = cli(*args)
    assert r.exit_code == 0, r.output
    assert (user_dir / "run" / "final.pth").is_file()


# --------------------------------------------------------------------------------------------------
# valid input that must run


def test_exponent_floats_are_floats_in_files_and_set(user_dir):
    (user_dir / "lr.yaml").write_text(f"_base_: {CONFIGS / 'synthetic_upernet_r18.yaml'}\noptim:\n  lr: 1e-3\n")
    assert densefuse.load_config("lr.yaml")["optim"]["lr"] == pytest.approx(1e-3)
    assert densefuse.load_config("lr.yaml", ["optim.lr=5e-4"])["optim"]["lr"] == pytest.approx(5e-4)
    r = cli("calibrate", "--config", "lr.yaml", "--set", "optim.lr=5e-4", "--num-images", "2", "--out", "c.csv", *SMALL)
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("head, site", [("psp", "decode_head."), ("aspp", "decode_head."), ("fcn", None)])
def test_switching_the_head_with_set_just_works(user_dir, head, site):
    r = cli("calibrate", "--config", "seg/synthetic_upernet_r18", "--set", f"model.decode_head.type={head}",
            "--num-images", "2", "--out", "c.csv", *SMALL)
    assert r.exit_code == 0, r.output
    if site is not None:
        assert site in (user_dir / "c.csv").read_text()


def test_a_real_ctrl_c_exits_130_with_one_line_and_the_run_resumes(tmp_path, monkeypatch):
    """SIGINT from a terminal, in a real process (the in-process tests raise KeyboardInterrupt themselves):
    exit 130, stderr's last line ``interrupted`` and no traceback; the lock is released, so ``--resume``
    of the same work dir runs."""
    import signal
    import subprocess
    import sys

    wd = tmp_path / "run"
    args = ["train", "--work-dir", str(wd), "--no-progress", *SMALL, "--set", "train.log_interval=1",
            "--set", "train.ckpt_interval=2", "--set", "train.val_interval=1000"]
    proc = subprocess.Popen([sys.executable, "-m", "densefuse", *args, "--set", "train.iters=1000"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        for line in proc.stdout:  # training has started (and saved once) when iteration 3 is logged
            if line.startswith("iter 3/"):
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err, err
    saved = torch.load(wd / "latest.pth", weights_only=True)["iter"]
    assert saved >= 2 and not (wd / "final.pth").exists()

    from densefuse.engine import step

    original = step.TrainStep.__call__

    def stop_after_one(self, batches, iteration):  # the resumed run: one step, then Ctrl-C again
        if iteration > saved:
            raise KeyboardInterrupt
        return original(self, batches, iteration)

    monkeypatch.setattr(step.TrainStep, "__call__", stop_after_one)
    r = cli(*args, "--resume", "--set", "train.iters=1000")
    assert r.exit_code == 130 and r.stderr.strip() == "interrupted", r.output
    assert f"resumed from iteration {saved}" in (wd / "log.txt").read_text()  # the lock was released
