"""Joint datasets on fake trees in the official layouts: NYUv2 (mtan / LibMTL .npy), Cityscapes seg + depth from
disparity and camera files, and the synthetic scene whose three labels agree; samples without a label are
marked and add nothing to the losses."""
import json

import numpy as np
import pytest
import torch
from densefuse_tasks.depth import silog_loss
from densefuse_tasks.mtl.datasets import CityscapesMTL, NYUv2, SyntheticScene, disparity_to_depth
from densefuse_tasks.normals import normal_loss
from PIL import Image

from densefuse.data.loader import build_loader
from densefuse.errors import DataError


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors run faster on one thread than on two threads of a busy machine (conftest restores it)."""
    torch.set_num_threads(1)

H, W = 12, 16


def nyu_tree(root, n=3, split="train", size=(H, W), skip=()):
    rng = np.random.default_rng(0)
    for kind in ("image", "label", "depth", "normal"):
        (root / split / kind).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        arrays = {
            "image": rng.random((*size, 3)).astype(np.float32),
            "label": rng.integers(-1, 13, size).astype(np.float32),
            "depth": (rng.random((*size, 1)) * 5).astype(np.float32),
            "normal": rng.normal(size=(*size, 3)).astype(np.float32),
        }
        arrays["depth"][0, 0, 0] = 0.0
        for kind, arr in arrays.items():
            if (kind, i) not in skip:
                np.save(root / split / kind / f"{i}.npy", arr)
    return root


def test_nyuv2_reads_the_mtan_layout(tmp_path):
    root = nyu_tree(tmp_path)
    ds = NYUv2(root, "train", size=(H, W))
    assert len(ds) == 3
    s = ds[1]
    raw = {k: np.load(root / "train" / k / "1.npy") for k in ("image", "label", "depth", "normal")}
    assert s["image"].dtype == torch.uint8 and s["image"].shape == (3, H, W)
    assert torch.equal(s["image"], torch.from_numpy(np.rint(raw["image"] * 255).astype(np.uint8)).permute(2, 0, 1))
    want = np.where(raw["label"] == -1, 255, raw["label"]).astype(np.int64)
    assert s["label"].dtype == torch.int64 and torch.equal(s["label"], torch.from_numpy(want))
    assert (s["label"] == 255).any()
    assert s["depth"].shape == (1, H, W) and torch.equal(s["depth"][0], torch.from_numpy(raw["depth"][..., 0]))
    assert torch.equal(s["normal"], torch.from_numpy(raw["normal"]).permute(2, 0, 1))
    assert all(bool(s[f"has_{t}"]) for t in ("seg", "depth", "normals"))
    # the tasks asked for decide which keys (and folders) are needed
    only = NYUv2(root, "train", tasks=["depth"], size=(H, W))[0]
    assert set(only) == {"image", "depth", "has_depth"}


def test_nyuv2_errors_name_the_file(tmp_path):
    root = nyu_tree(tmp_path)
    with pytest.raises(DataError, match=r"image/0\.npy has shape \(12, 16, 3\).*expected \(288, 384, 3\)"):
        NYUv2(root, "train")  # the default size is the preprocessed 288x384
    np.save(root / "train" / "depth" / "2.npy", np.zeros((H, W, 2), np.float32))
    with pytest.raises(DataError, match=r"depth/2\.npy has shape \(12, 16, 2\)"):
        NYUv2(root, "train", size=None)
    np.save(root / "train" / "depth" / "2.npy", np.zeros((H, W), np.float32))  # H x W is fine too
    assert NYUv2(root, "train", size=None)[2]["depth"].shape == (1, H, W)
    (root / "train" / "normal" / "1.npy").unlink()
    with pytest.raises(DataError, match=r"normals label file not found: .*normal/1\.npy"):
        NYUv2(root, "train", size=None)
    ds = NYUv2(root, "train", size=None, partial_labels=True)
    assert not bool(ds[1]["has_normals"]) and float(ds[1]["normal"].abs().sum()) == 0 and bool(ds[0]["has_normals"])
    with pytest.raises(DataError, match="did you mean 'normals'"):
        NYUv2(root, "train", tasks=["seg", "normal"], size=None)
    with pytest.raises(DataError, match=r"NYUv2 split folder not found: .*val"):
        NYUv2(root, "val", size=None)
    (root / "train" / "label" / "0.npy").write_bytes(b"not an array")
    with pytest.raises(DataError, match=r"cannot read .*label/0\.npy"):
        NYUv2(root, "train", size=None)


def test_nyuv2_missing_folder_and_bad_label_values(tmp_path):
    root = nyu_tree(tmp_path)
    for f in (root / "train" / "normal").iterdir():
        f.unlink()
    (root / "train" / "normal").rmdir()
    with pytest.raises(DataError, match=r"NYUv2 folder .*normal not found: task 'normals' needs its labels there"):
        NYUv2(root, "train", size=None)
    assert len(NYUv2(root, "train", tasks=["seg", "depth"], size=None)) == 3
    lab = np.zeros((H, W), np.float32)
    lab[3, 4] = 13
    np.save(root / "train" / "label" / "0.npy", lab)
    ds = NYUv2(root, "train", tasks=["seg"], size=None)
    with pytest.raises(DataError, match=r"label/0\.npy has values outside \[0, 13\).*: 13"):
        ds[0]


def city_tree(root, split="val", stems=("aachen_000000_000019", "aachen_000001_000019"), skip=()):
    for sub in ("leftImg8bit", "gtFine", "disparity", "camera"):
        (root / sub / split / "aachen").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for stem in stems:
        d = root / "{}" / split / "aachen"
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(str(d).format("leftImg8bit") + f"/{stem}_leftImg8bit.png")
        lab = rng.integers(0, 19, (H, W)).astype(np.uint8)
        lab[0, :3] = 255
        Image.fromarray(lab).save(str(d).format("gtFine") + f"/{stem}_gtFine_labelTrainIds.png")
        disp = np.full((H, W), 257, np.uint16)  # d = 1 pixel
        disp[0, 0], disp[0, 1], disp[1, 0] = 0, 1, 513  # none, d = 0 (none), d = 2
        if (stem, "disparity") not in skip:
            Image.fromarray(disp).save(str(d).format("disparity") + f"/{stem}_disparity.png")
        cam = {"extrinsic": {"baseline": 0.2, "pitch": 0.04}, "intrinsic": {"fx": 2000.0, "fy": 2000.0, "u0": 8, "v0": 6}}
        (root / "camera" / split / "aachen" / f"{stem}_camera.json").write_text(json.dumps(cam))
    return root


def test_disparity_to_depth_formula():
    raw = torch.tensor([[0, 1, 257, 513, 2561]])
    depth = disparity_to_depth(raw, 0.2, 2000.0)
    assert depth[0].tolist() == pytest.approx([0.0, 0.0, 400.0, 200.0, 40.0])


def test_cityscapes_seg_and_depth(tmp_path):
    root = city_tree(tmp_path)
    ds = CityscapesMTL(root, "val")
    assert len(ds) == 2
    s = ds[0]
    assert s["image"].shape == (3, H, W) and s["label"].shape == (H, W) and s["depth"].shape == (1, H, W)
    assert (s["label"][0, :3] == 255).all() and int(s["label"][1:].max()) < 19
    d = s["depth"][0]
    assert float(d[0, 0]) == 0 and float(d[0, 1]) == 0 and float(d[1, 0]) == pytest.approx(200.0)
    assert float(d[5, 5]) == pytest.approx(400.0)
    assert bool(s["has_seg"]) and bool(s["has_depth"])


def test_cityscapes_missing_labels(tmp_path):
    root = city_tree(tmp_path, skip={("aachen_000001_000019", "disparity")})
    with pytest.raises(DataError, match=r"depth label file not found: .*aachen_000001_000019_disparity\.png"):
        CityscapesMTL(root, "val")
    ds = CityscapesMTL(root, "val", partial_labels=True)
    s = ds[1]
    assert not bool(s["has_depth"]) and float(s["depth"].abs().sum()) == 0 and bool(s["has_seg"])
    assert len(CityscapesMTL(root, "val", tasks=["seg"])) == 2
    cam = root / "camera" / "val" / "aachen" / "aachen_000000_000019_camera.json"
    cam.write_text(json.dumps({"extrinsic": {"baseline": 0.2}, "intrinsic": {}}))
    with pytest.raises(DataError, match=r"aachen_000000_000019_camera\.json lacks extrinsic.baseline or intrinsic.fx"):
        ds[0]
    for f in (root / "camera" / "val" / "aachen").iterdir():
        f.unlink()
    (root / "camera" / "val" / "aachen").rmdir()
    (root / "camera" / "val").rmdir()
    with pytest.raises(DataError, match=r"Cityscapes folder .*camera.val not found: task 'depth' needs it"):
        CityscapesMTL(root, "val")


def test_synthetic_scene_labels_agree():
    ds = SyntheticScene(4, size=(48, 64))
    for i in range(4):
        s = ds[i]
        assert set(s) == {"image", "label", "depth", "normal", "has_seg", "has_depth", "has_normals"}
        floor, sphere = s["label"] == 0, s["label"] == 2
        assert torch.allclose(s["normal"][:, floor], torch.tensor([[0.0], [-1.0], [0.0]]), atol=1e-6)
        assert (s["depth"] > 0).all() and torch.allclose(s["normal"].norm(dim=0), torch.ones(48, 64), atol=1e-5)
        if sphere.any():  # a sphere stands in front of the wall behind it
            assert float(s["depth"][0][sphere].min()) < float(s["depth"][0][s["label"] == 1].max())
    assert torch.equal(SyntheticScene(4, size=(48, 64))[2]["normal"], ds[2]["normal"])


def test_samples_without_a_label_add_no_loss():
    full = SyntheticScene(8, size=(32, 48))
    part = SyntheticScene(8, size=(32, 48), drop={"depth": 0.5, "normals": 0.5})
    has = torch.tensor([bool(part[i]["has_depth"]) for i in range(8)])
    assert 0 < int(has.sum()) < 8  # some of each
    batch = next(iter(build_loader(part, 8, train=False, num_workers=0, seed=0)))
    assert batch["has_depth"].dtype == torch.bool and torch.equal(batch["has_depth"], has)
    assert float(batch["depth"][~has].abs().sum()) == 0
    pred = torch.rand(8, 1, 32, 48) * 5 + 1
    with_gt = torch.stack([full[i]["depth"] for i in range(8)])
    # the depth loss of the batch equals the loss over the samples that have depth alone
    assert float(silog_loss(pred, batch["depth"])) == pytest.approx(float(silog_loss(pred[has], with_gt[has])), rel=1e-5)
    keep = batch["has_normals"]
    n = torch.nn.functional.normalize(torch.randn(8, 3, 32, 48), dim=1)
    gt = torch.stack([full[i]["normal"] for i in range(8)])
    assert float(normal_loss(n, batch["normal"])) == pytest.approx(float(normal_loss(n[keep], gt[keep])), rel=1e-5)
    none = SyntheticScene(2, size=(32, 48), drop={"depth": 1.0})
    assert not any(bool(none[i]["has_depth"]) for i in range(2))
