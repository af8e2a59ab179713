"""Every ```python and ```bash block in README.md and docs/*.md runs as written.

Python blocks are exec'd in a fresh namespace in a temp directory (``configs`` linked in, so the
documented relative paths resolve). Shell blocks run for real: every ``densefuse ...`` line of a doc runs
in-process (click's CliRunner) in one temp directory per doc, in the order of the doc, so a line that
uses what an earlier line made (a checkpoint, a run to resume) finds it. Each line gets tiny settings
appended (:func:`tiny_settings`: two iterations, 32x32 crops, a few images, one seed), and the data it
names is built first in the official layout (a tiny ADE20K / VOC / Cityscapes / KITTI tree at its
``data.root``, images for ``predict``). Two substitutions make documented placeholders concrete:
``work_dirs/<run>`` is the work dir the doc's last ``train`` printed, and an absolute ``/data/...`` path
lives in the temp directory. A block that cannot run here (pip, torchrun on several nodes, pretrained
ImageNet weights) is skipped only by a marker line right above it in the doc:
``<!-- docs-test: skip <reason> -->``; the skips are counted.
"""
import re
import shlex
import shutil
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from densefuse.cli import main
from densefuse.config import load_config

from .test_depth_cli import fake_kitti
from .test_seg_data import make_ade, make_cityscapes, make_voc

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(python|bash|shell|sh)\s*$")
SKIP = re.compile(r"^<!--\s*docs-test:\s*skip\s+(\S.*?)\s*-->$")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

# Blocks that fail today for a reason outside the docs (strict: the test fails once they run).
KNOWN_FAILING: dict = {}


def blocks():
    """(doc, index, language, code, skip reason or None) for every runnable block."""
    out = []
    for doc in DOCS:
        lines = doc.read_text(encoding="utf-8").splitlines()
        i, k = 0, 0
        while i < len(lines):
            m = FENCE.match(lines[i])
            if m:
                j = i + 1
                while lines[j].strip() != "```":
                    j += 1
                prev = next((ln.strip() for ln in reversed(lines[:i]) if ln.strip()), "")
                skip = SKIP.match(prev)
                out.append((doc.relative_to(ROOT).as_posix(), k, m.group(1), "\n".join(lines[i + 1:j]),
                            skip.group(1) if skip else None))
                k += 1
                i = j
            i += 1
    return out


BLOCKS = blocks()
SHELL_DOCS = sorted({doc for doc, _, lang, _, skip in BLOCKS if lang != "python" and not skip})


def test_skips_are_marked_and_counted():
    skipped = [(doc, k, reason) for doc, k, _, _, reason in BLOCKS if reason]
    assert all(reason for _, _, reason in skipped)
    assert len(BLOCKS) >= 10 and len(skipped) < len(BLOCKS) / 2, skipped
    print(f"{len(skipped)} of {len(BLOCKS)} doc blocks skipped: {skipped}")


def _commands(code):
    """Shell lines with continuations joined and comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            yield shlex.split(line, comments=True)


# ---------------------------------------------------------------------------------------------- tiny runs
TINY = ["train.iters=2", "train.batch_size=2", "train.val_interval=2", "train.ckpt_interval=2",
        "train.log_interval=1", "train.amp=off", "calibration.num_images=2", "calibration.batch_size=2",
        "data.num_workers=0"]
SEG_SYNTHETIC = ["data.kwargs.num_train=4", "data.kwargs.num_val=2", "data.kwargs.size=[32,32]"]
DEPTH = ["model.encoder.name=resnet10t", "model.decode_head.widths=[8,8,16,16,32]",
         "model.decode_head.attention_channels=8", "data.crop_size=[64,96]",
         "depth.predict_camera={fx: 77.0, fy: 77.0, cx: 63.5, cy: 27.0}"]
DEPTH_SYNTHETIC = ["data.kwargs.num_train=4", "data.kwargs.num_val=2", "data.kwargs.size=[64,128]"]
KITTI = ["data.kwargs.kb_crop=[64,192]", "data.crop_size=[64,128]"]


def tiny_settings(cfg):
    """``--set`` values that make a documented run of ``cfg`` take seconds on a CPU."""
    s = list(TINY)
    if cfg["task"] == "depth":
        s += DEPTH + (DEPTH_SYNTHETIC if cfg["data"]["type"] == "synthetic" else KITTI)
        return s
    s.append("data.crop_size=[32,32]")
    if cfg["data"]["type"] == "synthetic":
        s += SEG_SYNTHETIC
    if cfg["model"]["type"] == "encoder_decoder":
        s.append("model.decode_head.channels=16")
        if cfg["model"]["auxiliary_head"]:
            s.append("model.auxiliary_head.channels=8")
    return s


def build_kitti(root, cfg):
    """A tiny KITTI tree, its split files under the names the config reads."""
    fake_kitti(root)
    for split, made in (("train_split", "train.txt"), ("val_split", "test.txt")):
        target = root / cfg["data"][split]
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(root / "splits" / made, target)


BUILDERS = {
    "ade20k": lambda root, cfg: make_ade(root),
    "voc": lambda root, cfg: make_voc(root),
    "cityscapes": lambda root, cfg: make_cityscapes(root),
    "kitti": build_kitti,
}


def _write_image(path, size):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


def _prepare_inputs(paths, size):
    """Images at the paths a ``predict`` line names: a file, or a folder with two images."""
    for p in map(Path, paths):
        if p.exists():
            continue
        if p.suffix.lower() in IMAGE_SUFFIXES:
            _write_image(p, size)
        else:
            for name in ("a.png", "b.jpg"):
                _write_image(p / name, size)


def _local(arg):
    """An absolute ``/data/...`` path (in an argument or a ``key=/data/...`` value) inside the temp dir."""
    return re.sub(r"(^|=)/data/", r"\1data/", arg)


class DocRun:
    """Runs one doc's ``densefuse`` lines in order in the current directory."""

    def __init__(self, doc):
        self.doc = doc
        self.last_work_dir = None
        self.task = "seg"

    def line(self, argv):
        assert argv[0] == "densefuse", f"{self.doc}: '{' '.join(argv)}' cannot run here; mark the block with a skip reason"
        args = [_local(a) for a in argv[1:]]
        if any("<run>" in a for a in args):
            assert self.last_work_dir, f"{self.doc}: '{' '.join(argv)}' names work_dirs/<run> before any train"
            args = [a.replace("work_dirs/<run>", self.last_work_dir) for a in args]
        cmd = main.get_command(click.Context(main), args[0])
        assert cmd is not None, f"{self.doc}: no command {args[0]}"
        params = cmd.make_context(args[0], list(args[1:])).params
        extra = []
        if args[0] in ("train", "calibrate", "inspect", "compare"):
            configs = params.get("configs") or (params.get("config"),)
            for config in configs:
                cfg = self._config(config, params)
                self._data(cfg)
            extra = [a for s in tiny_settings(cfg) for a in ("--set", s)]
            self.task = cfg["task"]
            if args[0] == "compare":
                extra += ["--seeds", "0", "--no-progress"]
            if args[0] == "train":
                extra.append("--no-progress")
        if args[0] == "predict":
            _prepare_inputs(params["inputs"], (64, 128) if self.task == "depth" else (32, 32))
        result = CliRunner().invoke(main, args + extra, catch_exceptions=False)
        assert result.exit_code == 0, (self.doc, args + extra, result.output)
        found = re.search(r"^work dir: (.+)$", result.output, re.M)
        if args[0] == "train" and found:
            self.last_work_dir = found.group(1).strip()

    def _config(self, config, params):
        from densefuse.tasks import get_task

        name = config or get_task(params.get("task") or "seg").default_config
        return load_config(name, params.get("overrides", ()))

    def _data(self, cfg):
        kind, root = cfg["data"]["type"], cfg["data"]["root"]
        if kind in BUILDERS and root and not Path(root).exists():
            BUILDERS[kind](Path(root), cfg)


@pytest.fixture
def one_thread():
    """Tiny tensors run faster on one thread than on two threads of a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("doc", SHELL_DOCS)
def test_doc_commands_run(doc, tmp_path, monkeypatch, one_thread):
    """Every ``densefuse`` line of the doc's shell blocks, in order, with tiny settings appended."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    run = DocRun(doc)
    ran = 0
    for d, k, lang, code, skip in BLOCKS:
        if d != doc or lang == "python" or skip:
            continue
        if (d, k) in KNOWN_FAILING:
            pytest.xfail(KNOWN_FAILING[d, k])
        for argv in _commands(code):
            run.line(argv)
            ran += 1
    assert ran > 0


@pytest.mark.parametrize("doc, k, reason", [(d, k, r) for d, k, lang, _, r in BLOCKS if lang != "python" and r],
                         ids=lambda v: str(v))
def test_marked_shell_block_is_skipped(doc, k, reason):
    """One skipped test per marked shell block, so the summary counts them."""
    pytest.skip(f"{doc}#{k}: {reason}")


def _python_params():
    params = []
    for doc, k, lang, code, skip in BLOCKS:
        if lang != "python":
            continue
        marks = [pytest.mark.xfail(strict=True, reason=KNOWN_FAILING[doc, k])] if (doc, k) in KNOWN_FAILING else []
        params.append(pytest.param(doc, code, skip, id=f"{doc}#{k}", marks=marks))
    return params


@pytest.mark.parametrize("doc, code, skip", _python_params())
def test_doc_python_block_runs(doc, code, skip, tmp_path, monkeypatch, one_thread):
    if skip:
        pytest.skip(f"{doc}: {skip}")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    exec(compile(code, doc, "exec"), {"__name__": "__docs__"})
