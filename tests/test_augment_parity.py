"""The per-sample and batched augmentation paths keep their recorded outputs and random streams.

``tests/data/augment_parity.pt.gz`` holds the outputs of fixed-seed runs of every augmentation path (the
loader's crop, the mmseg-style seg pipeline with and without photometric distortion and cat_max_ratio, the
seg test resize, the depth train pipeline and its single ops, the batched device augmentation with and
without per-sample seeds). Labels, nearest-resampled maps and masks must match exactly; uint8 images within
one grey level on under 1 % of the pixels and float outputs within float32 rounding, so another CPU's
interpolation kernel does not fail the test. Run as a script, the file checks every output bit for bit
(on the machine that recorded them: all equal). Re-record (only after a change
that is meant to alter the streams) with ``python tests/test_augment_parity.py --record``.
"""
from __future__ import annotations

import gzip
import io
import sys
from pathlib import Path

import pytest
import torch
from densefuse_tasks.depth import DepthTask, TrainPipeline
from densefuse_tasks.depth import transforms as T
from densefuse_tasks.seg.pipeline import SegTestPipeline, SegTrainPipeline

from densefuse.data import RandomCropPad, build_augmentation
from densefuse.tasks import DenseKey

REFERENCE = Path(__file__).resolve().parent / "data" / "augment_parity.pt.gz"
SEG = {"label": DenseKey("nearest", 255.0), "depth": DenseKey("nearest", 0.0)}


def _seg_sample(h: int, w: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, 4, (h // 6 + 1, w // 6 + 1), generator=g)
    label = label.repeat_interleave(6, 0).repeat_interleave(6, 1)[:h, :w].to(torch.uint8).clone()
    label[:3] = 255
    image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
    return {"image": image, "label": label, "name": "x"}


def _depth_sample(h: int = 24, w: int = 56) -> dict:
    g = torch.Generator().manual_seed(3)
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    depth = (1000.0 * yy + xx + 1.0)[None]
    depth[:, ::3] = 0
    return {"image": torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8), "depth": depth,
            "ground": (0.75 * xx - 0.5 * yy + 40.0)[None], "ground_inv": (0.01 * yy + 0.02)[None],
            "slope": torch.randint(0, 11, (1, h, w), generator=g)}


def _batch(seeded: bool) -> dict:
    g = torch.Generator().manual_seed(5)
    b = {"image": torch.randint(0, 256, (3, 3, 20, 26), generator=g, dtype=torch.uint8),
         "label": torch.randint(0, 6, (3, 20, 26), generator=g)}
    if seeded:
        b["sample_seed"] = torch.tensor([11, 2**40 + 7, 123456789])
    return b


def cases() -> dict[str, torch.Tensor]:
    """Every recorded output, by name."""
    out: dict[str, torch.Tensor] = {}

    def put(prefix: str, sample: dict) -> None:
        for k, v in sample.items():
            if isinstance(v, torch.Tensor):
                out[f"{prefix}/{k}"] = v.clone()  # a view would save its whole storage

    # the loader's crop: a generator, and torch's global RNG (what the training loader seeds per sample)
    s = _seg_sample(23, 31, 0)
    s["depth"] = torch.rand(1, 23, 31, generator=torch.Generator().manual_seed(1)) + 1
    crop = RandomCropPad((16, 40), SEG, fill=[1, 2, 3], generator=torch.Generator().manual_seed(0))
    for i in range(3):
        put(f"crop_pad/{i}", crop(s))
    torch.manual_seed(7)
    put("crop_pad/global", RandomCropPad((12, 12), SEG, fill=0)(s))
    # the mmseg-style seg pipeline
    s = _seg_sample(45, 61, 1)
    for name, kw in {"plain": {}, "photometric": {"photometric": True}, "nocat": {"cat_max_ratio": 1.0},
                     "noratio": {"ratio_range": None, "flip_prob": 1.0}}.items():
        pipe = SegTrainPipeline((32, 40), scale=(64, 48), generator=torch.Generator().manual_seed(2), **kw)
        for i in range(3):
            put(f"seg_train/{name}/{i}", pipe(s))
    torch.manual_seed(8)
    put("seg_train/global", SegTrainPipeline((24, 24), scale=(80, 40), photometric=True)(s))
    put("seg_test", SegTestPipeline((64, 48))(s))
    # the depth train pipeline and its ops
    d, keys = _depth_sample(), DepthTask.dense_keys
    torch.manual_seed(0)
    pipe = TrainPipeline((16, 40), keys, scale_range=(0.5, 2.0), rotate_deg=2.5, flip=True, photometric=True)
    for i in range(4):
        put(f"depth_train/{i}", pipe(dict(d)))
    put("depth/resize_up", T.resize(d, (33, 77), keys))
    put("depth/resize_down", T.resize(d, (13, 29), keys))
    put("depth/rotate", T.rotate(d, 2.5, keys))
    put("depth/crop_pad", T.crop(d, -5, 7, (28, 56), keys))
    put("depth/kb_crop", T.kb_crop(d, keys, (16, 40)))
    put("depth/hflip", T.hflip(d, keys))
    # the batched device augmentation, per-sample seeds and a generator
    for seeded in (True, False):
        aug = build_augmentation([123.7, 116.3, 103.5], [58.4, 57.1, 57.4], (16, 20), photometric=True,
                                 generator=torch.Generator().manual_seed(4))
        put(f"batch/{'seeded' if seeded else 'generator'}", aug(_batch(seeded)))
    return out


def load_reference() -> dict[str, torch.Tensor]:
    """The recorded outputs (a gzipped ``torch.save`` file: the maps compress well)."""
    return torch.load(io.BytesIO(gzip.decompress(REFERENCE.read_bytes())))


def test_augmentation_outputs_match_the_recording():
    if not REFERENCE.is_file():
        pytest.fail(f"{REFERENCE} is missing: record it with python {Path(__file__).name} --record")
    want = load_reference()
    got = cases()
    assert sorted(got) == sorted(want)
    for name, ref in want.items():
        x = got[name]
        assert x.dtype == ref.dtype and x.shape == ref.shape, name
        if ref.dtype.is_floating_point:
            torch.testing.assert_close(x, ref, rtol=1e-6, atol=1e-4, msg=name)
        elif name.endswith("/image"):  # uint8 pixels: another CPU's bilinear kernel may round one level apart
            diff = (x.int() - ref.int()).abs()
            assert diff.max() <= 1 and (diff == 0).float().mean() > 0.99, name
        else:  # labels, nearest maps, masks: exact everywhere
            assert torch.equal(x, ref), name


if __name__ == "__main__":
    if sys.argv[1:] == ["--record"]:
        buf = io.BytesIO()
        torch.save(cases(), buf)
        REFERENCE.write_bytes(gzip.compress(buf.getvalue(), mtime=0))
        print(f"wrote {REFERENCE}")
    else:  # the strict check: every output equal bit for bit
        ref = load_reference()
        got = cases()
        diff = [k for k in ref if not torch.equal(ref[k], got[k])]
        print("bit-equal:", len(ref) - len(diff), "of", len(ref), "differ:", diff)
        sys.exit(1 if diff else 0)
