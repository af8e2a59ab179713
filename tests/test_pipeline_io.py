"""Decoding and label checks of the segmentation readers: the fast paths give what pillow and int64 gave."""
import numpy as np
import pytest
import torch
from densefuse_tasks.seg.datasets import ADE20K, reduce_zero_label
from densefuse_tasks.seg.pipeline import SegTrainPipeline
from PIL import Image

from densefuse import DataError
from densefuse.data import check_label, read_image, read_label


def _pillow_rgb(path):
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)


@pytest.mark.parametrize("name, mode", [("a.jpg", "RGB"), ("g.jpg", "L"), ("c.jpg", "CMYK"), ("a.png", "RGB"),
                                        ("p.png", "P"), ("g.png", "L"), ("rgba.png", "RGBA"), ("a.bmp", "RGB")])
def test_read_image_gives_pillows_pixels(tmp_path, name, mode):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (21, 34, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    if mode == "P":
        img = img.quantize(16)
    elif mode == "RGBA":
        img = img.convert("RGBA")
    elif mode != "RGB":
        img = img.convert(mode)
    img.save(tmp_path / name)
    want = _pillow_rgb(tmp_path / name)
    got = read_image(tmp_path / name)
    assert got.dtype == torch.uint8 and got.is_contiguous()
    assert torch.equal(got, want)
    assert torch.equal(read_image(tmp_path / name, channels_last=True), want)


def test_truncated_jpeg_is_still_a_clear_error(tmp_path):
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(tmp_path / "x.jpg", quality=90)
    data = (tmp_path / "x.jpg").read_bytes()
    (tmp_path / "x.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cannot decode image file .*x.jpg"):
        read_image(tmp_path / "x.jpg")


def test_uint8_label_checks_and_reduce_zero_label_match_int64():
    g = torch.Generator().manual_seed(0)
    small = torch.randint(0, 151, (40, 50), generator=g, dtype=torch.uint8)
    small[:3] = 255
    wide = small.long()
    assert torch.equal(reduce_zero_label(small).long(), reduce_zero_label(wide))
    assert check_label(small, 151) is small
    bad = small.clone()
    bad[5, 5], bad[6, 6] = 200, 151
    for lab in (bad, bad.long()):
        with pytest.raises(DataError, match=r"values outside \[0, 151\) and not the ignore index 255: 151, 200"):
            check_label(lab, 151, "x.png")


def test_read_label_small_keeps_8_bit_values(tmp_path):
    arr = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(arr).save(tmp_path / "l.png")
    assert read_label(tmp_path / "l.png", small=True).dtype == torch.uint8
    assert torch.equal(read_label(tmp_path / "l.png", small=True).long(), read_label(tmp_path / "l.png"))
    Image.fromarray(arr.astype(np.uint16) * 300).save(tmp_path / "w.png")
    assert read_label(tmp_path / "w.png", small=True).dtype == torch.int64


def test_ade20k_sample_is_the_same_through_the_uint8_path(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    (root / "images" / "training").mkdir(parents=True)
    (root / "annotations" / "training").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(
            root / "images" / "training" / f"ADE_{i}.jpg")
        Image.fromarray(rng.integers(0, 151, (48, 64), dtype=np.uint8)).save(
            root / "annotations" / "training" / f"ADE_{i}.png")
    plain = ADE20K(root, "train")
    sample = plain.load(0)
    assert sample["label"].dtype == torch.int64 and sample["image"].is_contiguous()
    assert torch.equal(sample["image"], _pillow_rgb(root / "images" / "training" / "ADE_0.jpg"))
    raw = torch.from_numpy(np.array(Image.open(root / "annotations" / "training" / "ADE_0.png"))).long()
    assert torch.equal(sample["label"], torch.where(raw == 0, 255, raw - 1))

    def pipe():
        return SegTrainPipeline((32, 32), scale=(64, 48), generator=torch.Generator().manual_seed(4))

    fast = ADE20K(root, "train", transform=pipe())[0]  # uint8 labels through the pipeline

    class Int64Only:  # a transform without uint8_labels: gets load()'s int64 sample
        def __init__(self):
            self.inner = pipe()

        def __call__(self, s):
            assert s["label"].dtype == torch.int64
            return self.inner(s)

    slow = ADE20K(root, "train", transform=Int64Only())[0]
    assert fast["label"].dtype == torch.int64
    for key in ("image", "label", "valid"):
        assert torch.equal(fast[key], slow[key])


def test_a_16_bit_grey_image_keeps_its_high_byte(tmp_path):
    # pillow's convert("RGB") would clip every value above 255 to white; OpenCV's colour read keeps v >> 8
    arr = np.array([[0, 255, 256, 40000, 65535]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "deep.png")
    img = read_image(tmp_path / "deep.png")
    assert img.dtype == torch.uint8 and img.shape == (3, 1, 5)
    assert img[0, 0].tolist() == [0, 0, 1, 156, 255] and torch.equal(img[0], img[2])
