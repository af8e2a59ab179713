"""tools/: dataset converters on tiny fake trees, benchmark scripts as smoke runs."""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def _tool(name):
    if str(TOOLS) not in sys.path:  # as `python tools/<name>.py` has it: the scripts share tools/_common.py
        sys.path.insert(0, str(TOOLS))
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # worker processes unpickle the per-file function by module name
    spec.loader.exec_module(mod)
    return mod


def _cityscapes(root):
    ids = np.array([[7, 8, 0, 26], [33, 24, 9, 255], [31, 23, 1, 11]], dtype=np.uint8)
    for split, city in (("train", "aachen"), ("train", "bremen"), ("val", "lindau")):
        d = root / "gtFine" / split / city
        d.mkdir(parents=True)
        Image.fromarray(ids).save(d / f"{city}_000000_000019_gtFine_labelIds.png")
    return ids


def test_convert_cityscapes_label_table(tmp_path):
    tool = _tool("convert_cityscapes")
    _cityscapes(tmp_path)
    assert tool.main([str(tmp_path), "--nproc", "2"]) == 0
    out = np.asarray(Image.open(tmp_path / "gtFine/val/lindau/lindau_000000_000019_gtFine_labelTrainIds.png"))
    expected = np.array([[0, 1, 255, 13], [18, 11, 255, 255], [16, 10, 255, 2]], dtype=np.uint8)
    assert np.array_equal(out, expected)
    assert len(list(tmp_path.glob("gtFine/*/*/*_labelTrainIds.png"))) == 3


def test_convert_cityscapes_wrong_tree(tmp_path, capsys):
    tool = _tool("convert_cityscapes")
    assert tool.main([str(tmp_path)]) == 2
    assert "has no gtFine/ folder" in capsys.readouterr().err
    (tmp_path / "gtFine" / "train" / "aachen").mkdir(parents=True)
    (tmp_path / "gtFine" / "val").mkdir(parents=True)
    assert tool.main([str(tmp_path)]) == 2
    assert "no *_gtFine_labelIds.png files under" in capsys.readouterr().err


def _voc_trees(root):
    scipy_io = pytest.importorskip("scipy.io")
    seg = root / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation"
    seg.mkdir(parents=True)
    (seg / "train.txt").write_text("a\nb\n")
    (seg / "val.txt").write_text("c\n")
    sbd = root / "benchmark_RELEASE" / "dataset"
    (sbd / "cls").mkdir(parents=True)
    (sbd / "train.txt").write_text("b\nc\nd\ne\n")
    (sbd / "val.txt").write_text("f\n")
    masks = {}
    for i, name in enumerate("bcdef"):
        m = (np.arange(12).reshape(3, 4) % (i + 2)).astype(np.uint8)
        m[0, 0] = 255 if i == 0 else m[0, 0]
        scipy_io.savemat(sbd / "cls" / f"{name}.mat", {"GTcls": {"Segmentation": m, "Boundaries": np.zeros(1)}})
        masks[name] = m
    return root / "VOCdevkit", root / "benchmark_RELEASE", masks


def test_convert_voc_aug_masks_and_lists(tmp_path):
    tool = _tool("convert_voc_aug")
    devkit, aug, masks = _voc_trees(tmp_path)
    assert tool.main([str(devkit), str(aug), "--nproc", "2"]) == 0
    out = devkit / "VOC2012" / "SegmentationClassAug"
    for name, m in masks.items():
        assert np.array_equal(np.asarray(Image.open(out / f"{name}.png")), m)
    seg = devkit / "VOC2012" / "ImageSets" / "Segmentation"
    assert (seg / "aug.txt").read_text().split() == ["d", "e", "f"]  # SBD - (VOC train + VOC val)
    assert (seg / "trainaug.txt").read_text().split() == ["a", "b", "d", "e", "f"]  # (VOC train + SBD) - VOC val


def test_convert_voc_aug_wrong_trees(tmp_path, capsys):
    tool = _tool("convert_voc_aug")
    devkit, aug, _ = _voc_trees(tmp_path)
    assert tool.main([str(tmp_path / "nope"), str(aug)]) == 2
    assert "is not a VOC devkit" in capsys.readouterr().err
    assert tool.main([str(devkit), str(devkit)]) == 2
    assert "is not SBD's benchmark_RELEASE" in capsys.readouterr().err
    (aug / "dataset" / "cls" / "bad.mat").write_bytes(b"not a mat file")
    assert tool.main([str(devkit), str(aug), "--nproc", "1"]) == 2
    assert "bad.mat: not an SBD class mask" in capsys.readouterr().err


def test_bench_pipeline_smoke(tmp_path, capsys):
    tool = _tool("bench_pipeline")
    assert tool.main(["--images", "2", "--rounds", "1", "--out", str(tmp_path / "p.csv")]) == 0
    text = capsys.readouterr().out
    assert "densefuse (geometry; photometric batched on device)" in text
    assert (tmp_path / "p.csv").read_text().startswith("pipeline,round,images,seconds,crop")


def test_bench_kernels_smoke(tmp_path, capsys):
    tool = _tool("bench_kernels")
    table = tool.main(["--repeats", "1", "--crop", "32", "--model", "resnet10t", "--out", str(tmp_path / "k.csv")])
    assert set(table["bench"]) == {"optimizer", "photometric", "logits"}
    assert set(table[table["bench"] == "optimizer"]["variant"]) == {"for-loop", "foreach", "fused"}
    assert (table["ms"] > 0).all() and "load average before" in capsys.readouterr().out
    assert (tmp_path / "k.csv").read_text().startswith("bench,case,variant,ms")


def test_bench_eval_smoke(tmp_path, capsys):
    tool = _tool("bench_eval")
    assert tool.main(["--images", "1", "--rounds", "1", "--size", "96", "160", "--threads", "1",
                      "--out", str(tmp_path / "e.csv")]) == 0
    assert "slide 512/341, 8 windows per call" in capsys.readouterr().out
    assert (tmp_path / "e.csv").is_file()


def test_bench_overhead_smoke_pools_earlier_rounds(tmp_path, capsys):
    tool = _tool("bench_overhead")
    small = ["--iters", "5", "--skip", "1", "--batch-size", "2", "--size", "32", "--threads", "1",
             "--set", "model.decode_head.channels=16", "--set", "model.auxiliary_head.channels=8",
             "--set", "data.kwargs.num_train=8", "--set", "calibration.batch_size=2", "--set", "calibration.num_images=2"]
    first = tool.main([*small, "--rounds", "2", "--out", str(tmp_path / "a.csv")])
    assert set(first["rounds"]) == {2} and "resolves_2pct" in first
    pooled = tool.main([*small, "--rounds", "1", "--add-runs", str(tmp_path / "a.runs.csv"), "--out", str(tmp_path / "b.csv")])
    assert set(pooled["rounds"]) == {3}
    assert "with 2 rounds from" in capsys.readouterr().out
