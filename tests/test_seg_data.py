"""Segmentation data: synthetic set, official layouts, clear errors, augmentation and sampling."""
import numpy as np
import pytest
import torch
from densefuse_tasks.seg import ADE20K, Cityscapes, PascalVOC, SegTask, SyntheticSeg, reduce_zero_label
from densefuse_tasks.seg.palettes import ADE20K_CLASSES, CITYSCAPES_CLASSES, VOC_CLASSES, VOC_PALETTE
from PIL import Image

from densefuse.config import from_dict, merge
from densefuse.data import (
    InfiniteSampler,
    RandomCropPad,
    RandomScaleCrop,
    build_augmentation,
    build_loader,
    check_label,
    hflip,
    normalize,
    read_image,
    read_label,
    scale_crop,
)
from densefuse.errors import ConfigError, DataError
from densefuse.tasks import DenseKey

#: a seg batch with a depth-like nearest map besides the label
KEYS = {"label": DenseKey("nearest", 255), "depth": DenseKey("nearest", 0)}

# --------------------------------------------------------------------------------------------------
# helpers writing tiny datasets in the official layouts


def save_image(path, h=6, w=8, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return arr


def save_label(path, arr, palette=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(np.asarray(arr, dtype=np.uint8), mode="L")
    if palette:
        img = img.convert("P")
        img.putpalette([c for rgb in VOC_PALETTE for c in rgb] + [0] * (768 - 3 * len(VOC_PALETTE)))
    img.save(path)


def make_ade(root, n_train=2, n_val=1):
    labels = {}
    for split, n in (("training", n_train), ("validation", n_val)):
        for i in range(n):
            name = f"ADE_{split[:5]}_{i:08d}"
            save_image(root / "images" / split / f"{name}.jpg", seed=i)
            lab = np.full((6, 8), i + 1, dtype=np.uint8)
            lab[0, :3] = 0  # "other"
            lab[1, :2] = 150
            save_label(root / "annotations" / split / f"{name}.png", lab)
            labels[name] = lab
    return labels


def make_voc(root):
    ids = {"train": ["2007_000032", "2007_000039"], "val": ["2007_000033"], "aug": ["2008_000002", "2008_000003"]}
    for i, name in enumerate(ids["train"] + ids["val"] + ids["aug"]):
        save_image(root / "JPEGImages" / f"{name}.jpg", seed=i)
    for i, name in enumerate(ids["train"] + ids["val"]):
        lab = np.full((6, 8), i + 1, dtype=np.uint8)
        lab[:, 0] = 255  # boundary
        save_label(root / "SegmentationClass" / f"{name}.png", lab, palette=True)
    for i, name in enumerate(ids["aug"] + ids["train"][:1]):
        save_label(root / "SegmentationClassAug" / f"{name}.png", np.full((6, 8), 10 + i, dtype=np.uint8))
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    for split, names in ids.items():
        (sets / f"{split}.txt").write_text("\n".join(names) + "\n")
    (sets / "trainaug.txt").write_text("\n".join(ids["train"] + ids["aug"]) + "\n")
    return ids


def make_cityscapes(root):
    names = []
    for split, cities in (("train", ["aachen", "bochum"]), ("val", ["frankfurt"])):
        for j, city in enumerate(cities):
            name = f"{city}_000000_0000{j}9"
            save_image(root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png", seed=j)
            lab = np.full((6, 8), 18 - j, dtype=np.uint8)
            lab[-1] = 255
            save_label(root / "gtFine" / split / city / f"{name}_gtFine_labelTrainIds.png", lab)
            # the other gtFine files of the official layout must not confuse the pairing
            save_label(root / "gtFine" / split / city / f"{name}_gtFine_labelIds.png", lab)
            names.append((split, name))
    return names


def cfg_for(kind, root=None, num_classes=None, **data):
    n = {"ade20k": 150, "voc": 21, "cityscapes": 19, "synthetic": 6}[kind]
    d = {"type": kind, "root": None if root is None else str(root), "crop_size": [4, 4]}
    d.update(data)
    return from_dict({"model": {"num_classes": num_classes or n}, "data": d})  # validated, as commands load it


# --------------------------------------------------------------------------------------------------
# synthetic


def test_synthetic_is_deterministic_and_valid():
    a = SyntheticSeg(4, (48, 64), seed=3, split="train")
    b = SyntheticSeg(4, (48, 64), seed=3, split="train")
    for i in range(4):
        sa, sb = a[i], b[i]
        assert torch.equal(sa["image"], sb["image"]) and torch.equal(sa["label"], sb["label"])
        assert sa["image"].dtype == torch.uint8 and sa["image"].shape == (3, 48, 64)
        assert sa["label"].dtype == torch.int64 and sa["label"].shape == (48, 64)
    assert torch.equal(a[2]["label"], a[2]["label"])  # random access, same again
    assert not torch.equal(a[0]["image"], a[1]["image"])
    other_split = SyntheticSeg(4, (48, 64), seed=3, split="val")
    other_seed = SyntheticSeg(4, (48, 64), seed=4, split="train")
    assert not torch.equal(a[0]["image"], other_split[0]["image"])
    assert not torch.equal(a[0]["image"], other_seed[0]["image"])


def test_synthetic_label_values_cover_classes_and_ignore():
    ds = SyntheticSeg(16, (64, 64), num_classes=6)
    labels = torch.stack([ds[i]["label"] for i in range(16)])
    values = set(labels.unique().tolist())
    assert values == {0, 1, 2, 3, 4, 5, 255}
    frac_ignored = (labels == 255).float().mean().item()
    assert 0.005 < frac_ignored < 0.2
    small = SyntheticSeg(8, (32, 32), num_classes=3)
    assert set(torch.stack([small[i]["label"] for i in range(8)]).unique().tolist()) <= {0, 1, 2, 255}
    with pytest.raises(ConfigError):
        SyntheticSeg(2, num_classes=9)


def test_build_dataset_synthetic_from_config():
    task = SegTask()
    cfg = cfg_for("synthetic", crop_size=[24, 32], kwargs={"num_train": 5, "num_val": 3, "size": [40, 40]})
    train, val = task.build_dataset(cfg, "train"), task.build_dataset(cfg, "val")
    assert len(train) == 5 and len(val) == 3
    assert train[0]["image"].shape == (3, 24, 32) and train[0]["label"].shape == (24, 32)
    assert val[0]["image"].shape == (3, 40, 40)
    with pytest.raises(ConfigError, match="data.kwargs.num_trian"):
        task.build_dataset(cfg_for("synthetic", kwargs={"num_trian": 5}), "train")
    with pytest.raises(ConfigError, match="model.num_classes"):
        task.build_dataset(cfg_for("synthetic", num_classes=7), "train")
    with pytest.raises(ConfigError, match="data.type"):
        task.build_dataset(cfg_for("synthetic", type="ade"), "train")


# --------------------------------------------------------------------------------------------------
# official layouts


def test_ade20k_layout_and_reduce_zero_label(tmp_path):
    raw = make_ade(tmp_path)
    ds = ADE20K(tmp_path, "train")
    assert len(ds) == 2 and ds.num_classes == 150 and len(ADE20K_CLASSES) == 150
    s = ds[1]
    assert s["name"] == "ADE_train_00000001"
    assert s["image"].dtype == torch.uint8 and s["image"].shape == (3, 6, 8)
    lab = s["label"]
    assert lab.dtype == torch.int64
    assert (lab[0, :3] == 255).all()  # raw 0 -> ignored
    assert (lab[1, :2] == 149).all()  # raw 150 -> 149
    assert lab[5, 5] == raw["ADE_train_00000001"][5, 5] - 1
    val = ADE20K(tmp_path, "validation")
    assert len(val) == 1 and val[0]["name"] == "ADE_valid_00000000"
    # without reduce_zero_label the raw value 150 is out of range for 150 classes: a clear error
    with pytest.raises(DataError, match=r"ADE_valid_00000000.png.*150"):
        ADE20K(tmp_path, "val", reduce_zero_label=False)[0]
    assert torch.equal(reduce_zero_label(torch.tensor([0, 1, 150, 255])), torch.tensor([255, 0, 149, 255]))


def test_ade20k_via_task_crops_train_split(tmp_path):
    make_ade(tmp_path)
    ds = SegTask().build_dataset(cfg_for("ade20k", tmp_path, crop_size=[5, 10]), "train")
    s = ds[0]
    assert s["image"].shape == (3, 5, 10) and s["label"].shape == (5, 10)
    assert (s["label"][:, 8:] == 255).all()  # padded columns
    with pytest.raises(ConfigError, match="model.num_classes"):
        SegTask().build_dataset(cfg_for("ade20k", tmp_path, num_classes=151), "val")
    with pytest.raises(ConfigError, match="data.root"):
        SegTask().build_dataset(cfg_for("ade20k", None), "val")


def test_voc_splits_including_train_aug(tmp_path):
    ids = make_voc(tmp_path)
    train = PascalVOC(tmp_path, "train")
    assert [s[0].stem for s in train.samples] == ids["train"]
    assert all(s[1].parent.name == "SegmentationClass" for s in train.samples)
    s = train[0]
    assert s["label"][0, 0] == 255 and s["label"][0, 1] == 1  # palette PNG read as indices
    # mmseg's train_aug: train.txt with SegmentationClass, then aug.txt with SegmentationClassAug
    aug = PascalVOC(tmp_path, "train_aug")
    assert [(p.stem, lab.parent.name) for p, lab in aug.samples] == (
        [(i, "SegmentationClass") for i in ids["train"]] + [(i, "SegmentationClassAug") for i in ids["aug"]])
    assert len(aug) == 4 and aug[3]["label"][0, 0] == 11
    # trainaug.txt prefers SegmentationClassAug and falls back to SegmentationClass
    trainaug = PascalVOC(tmp_path, "trainaug")
    assert [lab.parent.name for _, lab in trainaug.samples] == [
        "SegmentationClassAug", "SegmentationClass", "SegmentationClassAug", "SegmentationClassAug"]
    assert len(PascalVOC(tmp_path, "val")) == 1 and len(VOC_CLASSES) == 21


def test_cityscapes_layout(tmp_path):
    make_cityscapes(tmp_path)
    train = Cityscapes(tmp_path, "train")
    assert [s["name"] for s in (train[0], train[1])] == ["aachen_000000_000009", "bochum_000000_000019"]
    assert train.num_classes == 19 and len(CITYSCAPES_CLASSES) == 19
    lab = train[1]["label"]
    assert lab[0, 0] == 17 and (lab[-1] == 255).all()
    assert len(Cityscapes(tmp_path, "val")) == 1


def test_missing_paths_raise_data_error_naming_them(tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        ADE20K(tmp_path / "nowhere", "train")
    make_ade(tmp_path / "ade")
    (tmp_path / "ade" / "annotations" / "training" / "ADE_train_00000001.png").unlink()
    with pytest.raises(DataError, match="ADE_train_00000001.png"):
        ADE20K(tmp_path / "ade", "train")
    make_voc(tmp_path / "voc")
    (tmp_path / "voc" / "ImageSets" / "Segmentation" / "aug.txt").unlink()
    with pytest.raises(DataError, match="aug.txt"):
        PascalVOC(tmp_path / "voc", "train_aug")
    (tmp_path / "voc" / "JPEGImages" / "2007_000033.jpg").unlink()
    with pytest.raises(DataError, match="2007_000033.jpg"):
        PascalVOC(tmp_path / "voc", "val")
    with pytest.raises(DataError, match="leftImg8bit"):
        Cityscapes(tmp_path, "train")
    with pytest.raises(DataError, match="missing.png"):
        read_image(tmp_path / "missing.png")


def test_corrupt_image_and_bad_labels_raise_data_error(tmp_path):
    make_cityscapes(tmp_path)
    img = tmp_path / "leftImg8bit" / "train" / "aachen" / "aachen_000000_000009_leftImg8bit.png"
    img.write_bytes(b"not a png at all")
    ds = Cityscapes(tmp_path, "train")
    with pytest.raises(DataError, match="aachen_000000_000009_leftImg8bit.png"):
        ds[0]
    lab = tmp_path / "gtFine" / "train" / "bochum" / "bochum_000000_000019_gtFine_labelTrainIds.png"
    bad = np.full((6, 8), 3, dtype=np.uint8)
    bad[0, 0], bad[0, 1] = 19, 33
    save_label(lab, bad)
    with pytest.raises(DataError, match=r"bochum_000000_000019_gtFine_labelTrainIds.png.*19, 33"):
        ds[1]
    save_label(lab, np.zeros((5, 8), dtype=np.uint8))
    with pytest.raises(DataError, match="bochum"):  # image/label size mismatch
        ds[1]
    rgb = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(rgb)
    with pytest.raises(DataError, match="rgb.png"):
        read_label(rgb)
    assert torch.equal(check_label(torch.tensor([0, 2, 255]), 3), torch.tensor([0, 2, 255]))
    with pytest.raises(DataError, match="-1"):
        check_label(torch.tensor([-1, 0]), 3, "x.png")


def test_read_image_converts_to_rgb(tmp_path):
    arr = save_image(tmp_path / "a.png", 5, 7)
    x = read_image(tmp_path / "a.png")
    assert x.shape == (3, 5, 7) and x.dtype == torch.uint8
    assert torch.equal(x.permute(1, 2, 0), torch.from_numpy(arr))
    Image.fromarray(arr[..., 0]).save(tmp_path / "g.png")
    assert read_image(tmp_path / "g.png").shape == (3, 5, 7)


# --------------------------------------------------------------------------------------------------
# augmentation


def _batch(b=3, h=20, w=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, 150, (b, h, w), generator=g)
    label[:, :2] = 255
    return {"image": torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=g),
            "label": label,
            "depth": torch.rand(b, 1, h, w, generator=g) * 80}


def test_scale_crop_identity_and_exact_nearest():
    b = _batch()
    out = scale_crop(b, torch.ones(3), torch.zeros(3, 2), keys=KEYS)
    assert torch.equal(out["label"], b["label"]) and torch.equal(out["depth"], b["depth"])
    assert torch.allclose(out["image"], b["image"].float(), atol=0.01)
    out = scale_crop(b, torch.full((3,), 2.0), torch.tensor([[0.0, 0.0], [4.0, 6.0], [20.0, 24.0]]), keys=KEYS)
    up = b["label"].repeat_interleave(2, 1).repeat_interleave(2, 2)
    assert torch.equal(out["label"][0], up[0, :20, :24])
    assert torch.equal(out["label"][1], up[1, 4:24, 6:30])
    assert torch.equal(out["label"][2], up[2, 20:40, 24:48])


def test_scale_crop_pads_label_255_depth_0_image_fill():
    b = _batch()
    out = scale_crop(b, torch.full((3,), 0.5), torch.zeros(3, 2), keys=KEYS, image_fill=(10.0, 20.0, 30.0))
    assert (out["label"][:, 10:] == 255).all() and (out["label"][:, :, 12:] == 255).all()
    assert (out["depth"][..., 10:, :] == 0).all() and (out["depth"][..., :, 12:] == 0).all()
    assert torch.allclose(out["image"][:, :, 12:, 14:], torch.tensor([10.0, 20.0, 30.0]).view(1, 3, 1, 1))
    inside = out["label"][:, 2:10, :12]
    assert (inside != 255).all()  # the content area keeps real labels


def test_augmentation_keeps_label_and_depth_values_exact():
    torch.manual_seed(0)
    b = _batch(b=6)
    aug = build_augmentation([123.675, 116.28, 103.53], [58.395, 57.12, 57.375], size=(16, 16),
                             scale_range=(0.5, 2.0), flip=True, photometric=True, keys=KEYS)
    for _ in range(3):
        out = aug(b)
        assert out["image"].shape == (6, 3, 16, 16) and out["image"].dtype == torch.float32
        assert out["label"].shape == (6, 16, 16) and out["label"].dtype == torch.int64
        assert out["raw_image"].dtype == torch.uint8
        for i in range(6):
            assert set(out["label"][i].unique().tolist()) <= set(b["label"][i].unique().tolist()) | {255}
            assert set(out["depth"][i].unique().tolist()) <= set(b["depth"][i].unique().tolist()) | {0.0}
    # label-only batches and float images work too
    out = RandomScaleCrop((8, 8))({"image": torch.rand(2, 3, 10, 10) * 255, "label": torch.zeros(2, 10, 10, dtype=torch.long)})
    assert set(out["label"].unique().tolist()) <= {0, 255}


def test_flip_and_normalize():
    b = _batch(b=2)
    out = hflip(b, torch.tensor([True, False]), KEYS)
    assert torch.equal(out["label"][0], b["label"][0].flip(-1)) and torch.equal(out["label"][1], b["label"][1])
    assert torch.equal(out["depth"][0], b["depth"][0].flip(-1))
    n = normalize(b, [100.0, 0.0, 50.0], [2.0, 1.0, 5.0])
    assert torch.allclose(n["image"][:, 0], (b["image"][:, 0].float() - 100) / 2)
    assert torch.equal(n["raw_image"], b["image"])
    assert torch.equal(n["label"], b["label"])
    task = SegTask()
    ev = task.build_transform(from_dict({"model": {"num_classes": 6}}), train=False)(b)  # normalize alone moves no dense key
    assert ev["image"].abs().max() < 3 and torch.equal(ev["raw_image"], b["image"])


def test_task_train_transform_and_visualize():
    cfg = from_dict({"model": {"num_classes": 150}, "data": {"crop_size": [12, 16]}})
    task = SegTask(cfg)
    batch = _batch()
    del batch["depth"]  # not a seg key: the seg transform would refuse to leave it behind
    out = task.build_transform(cfg, train=True)(batch)
    assert out["image"].shape == (3, 3, 12, 16) and out["raw_image"].shape == (3, 3, 12, 16)
    pred = torch.randint(0, 150, (3, 12, 16))
    vis = task.visualize(out, pred)  # prediction row, ground-truth row, legend strip
    assert vis.dtype == torch.uint8 and vis.shape[:2] == (3, 3) and vis.shape[-1] == 16 and vis.shape[2] > 24
    with pytest.raises(KeyError, match="'depth'"):
        task.build_transform(cfg, train=True)(_batch())
    with pytest.raises(ConfigError, match="scale_range"):  # checked once, when a config is validated
        from_dict(merge(cfg.to_dict(), {"data": {"augment": {"scale_range": [2.0, 0.5]}}}))


# --------------------------------------------------------------------------------------------------
# CPU crop and sampling


def test_random_crop_pad_fixed_size_and_padding():
    g = torch.Generator().manual_seed(0)
    sample = {"image": torch.randint(0, 256, (3, 5, 30), dtype=torch.uint8), "label": torch.randint(0, 4, (5, 30)),
              "depth": torch.rand(1, 5, 30) + 1, "name": "x"}
    crop = RandomCropPad((8, 10), KEYS, fill=[1, 2, 3], generator=g)
    seen = set()
    for _ in range(10):
        out = crop(sample)
        assert out["image"].shape == (3, 8, 10) and out["label"].shape == (8, 10) and out["depth"].shape == (1, 8, 10)
        assert (out["label"][5:] == 255).all() and (out["depth"][:, 5:] == 0).all()
        assert out["image"][:, 5:].tolist() == [[[1] * 10] * 3, [[2] * 10] * 3, [[3] * 10] * 3]
        assert (out["label"][:5] != 255).all() and out["name"] == "x"
        # the window is a real slice of the input
        x0 = next(x for x in range(21) if torch.equal(sample["label"][:, x:x + 10], out["label"][:5]))
        seen.add(x0)
    assert len(seen) > 1


def test_infinite_sampler_reshuffles_and_shards():
    ds = list(range(5))
    it = iter(InfiniteSampler(ds, seed=1))
    stream = [next(it) for _ in range(15)]
    epochs = [stream[i:i + 5] for i in (0, 5, 10)]
    assert all(sorted(e) == ds for e in epochs)
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2]
    again = iter(InfiniteSampler(ds, seed=1))
    assert [next(again) for _ in range(15)] == stream
    r0, r1 = iter(InfiniteSampler(ds, seed=1, rank=0, world_size=2)), iter(InfiniteSampler(ds, seed=1, rank=1, world_size=2))
    a, b = [next(r0) for _ in range(5)], [next(r1) for _ in range(5)]
    assert [x for pair in zip(a, b) for x in pair] == stream[:10]
    resumed = iter(InfiniteSampler(ds, seed=1, start=7))
    assert [next(resumed) for _ in range(8)] == stream[7:]


def test_build_loader_train_and_eval():
    ds = SyntheticSeg(5, (8, 8))
    train = build_loader(ds, 2, train=True, seed=0)
    it = iter(train)
    batches = [next(it) for _ in range(4)]  # more than one epoch: infinite
    assert all(b["image"].shape == (2, 3, 8, 8) for b in batches)
    ev = list(build_loader(ds, 2, train=False))
    assert [len(b["name"]) for b in ev] == [2, 2, 1]
    assert [n for b in ev for n in b["name"]] == [f"synthetic_train_{i:05d}" for i in range(5)]
