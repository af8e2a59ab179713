"""Configs say what they run: every shipped config's file name (mmseg's naming scheme) is checked against
the settings it loads to, and the YAML reader refuses a key written twice in one mapping."""
import re
from pathlib import Path

import pytest

from densefuse import ConfigError
from densefuse.config import load_config

ROOT = Path(__file__).resolve().parent.parent / "configs"
SHIPPED = sorted(p for p in ROOT.rglob("*.yaml") if "_base_" not in p.parts)
BASES = sorted(p for p in ROOT.rglob("*.yaml") if "_base_" in p.parts)

#: mmseg's head names in config file names -> densefuse's model.decode_head.type (a naming vocabulary)
HEADS = {"upernet": "uper", "pspnet": "psp", "deeplabv3": "aspp", "deeplabv3plus": "sep_aspp", "fcn": "fcn",
         "gedepth": "densedepth", "hrnet": "hrnet"}
#: dataset names in file names -> data.type
DATASETS = {"ade20k": "ade20k", "voc12aug": "voc", "cityscapes": "cityscapes", "kitti": "kitti",
            "synthetic": "synthetic", "nyuv2": "nyuv2"}
SIZES = {"t": "tiny", "s": "small", "b": "base", "l": "large"}


def _iterations(token: str) -> int:
    """``160k`` -> 160000, ``76.8k`` -> 76800, ``300`` -> 300."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(k?)", token)
    assert m, token
    return round(float(m.group(1)) * (1000 if m.group(2) else 1))


def _encoder_matches(token: str, name: str) -> bool:
    """``r50-d8`` is ``r50-d8``; ``r18`` is timm's ``resnet18``; ``swin-l`` is timm's ``swin_large_...``."""
    if token == name:
        return True
    if re.fullmatch(r"r\d+", token):
        return name == "resnet" + token[1:]
    m = re.fullmatch(r"swin-([tsbl])", token)
    return bool(m) and name.startswith(f"swin_{SIZES[m.group(1)]}_")


def _promises(stem: str) -> dict:
    """What a config's name promises, read from its ``_``-separated fields."""
    fields = stem.split("_")
    out: dict = {}
    head, _, variant = fields[0].partition("-")
    out["head"] = HEADS[head]
    if variant:
        out["ground_embedding"] = variant  # gedepth-vanilla / gedepth-adaptive
    rest = fields[1:]
    out["encoder"] = rest[0] if rest else None
    for f in rest[1:]:
        m = re.fullmatch(r"(\d+)xb(\d+)-([\d.]+k?)", f)
        if m:
            out["gpus"], out["batch_size"], out["iters"] = int(m.group(1)), int(m.group(2)), _iterations(m.group(3))
            continue
        m = re.fullmatch(r"([a-z0-9]+)-(\d+)x(\d+)", f)
        if m and m.group(1) in DATASETS:
            out["dataset"], out["crop_size"] = DATASETS[m.group(1)], [int(m.group(2)), int(m.group(3))]
            continue
        if f in DATASETS:
            out["dataset"] = DATASETS[f]
            continue
        m = re.fullmatch(r"conv-relu-up-(bn|gn|ln)", f)
        if m:
            out["branch"] = f"conv_relu_up_{m.group(1)}"
            continue
        raise AssertionError(f"{stem}: name field {f!r} is not one densefuse's config names use")
    return out


def _name_form(stem: str) -> tuple[str, list[str]]:
    """``synthetic_upernet_r18`` puts the dataset first (densefuse's own demos): reorder to head_encoder_dataset."""
    fields = stem.split("_")
    if fields[0] in DATASETS:
        kind = fields.pop(0)
        if fields[0] == "smp":
            fields.pop(0)
        fields.append(kind)
    return "_".join(fields), fields


def test_every_shipped_config_is_checked():
    assert len(SHIPPED) >= 40  # 33 paper rows + 2 synthetic seg + 4 depth + 1 normals
    assert any("convnext" in p.name for p in SHIPPED)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_the_name_says_what_the_config_runs(path):
    cfg = load_config(path, ["model.encoder.pretrained=null"])
    stem, _ = _name_form(path.stem)
    want = _promises(stem)
    head = cfg["model"]["decode_head"]["type"] if cfg["model"]["type"] != "smp" else "uper"
    if cfg["model"]["type"] == "mtl":  # one head per task: the name gives their (common) type
        types = {spec["type"] for spec in cfg["mtl"]["heads"].values()}
        assert len(types) == 1, (path.name, types)
        head = types.pop()
    if cfg["model"]["type"] == "smp":
        assert cfg["model"]["smp"]["arch"].lower() == "upernet"
        encoder = cfg["model"]["smp"]["encoder_name"]
    else:
        encoder = cfg["model"]["encoder"]["name"]
    assert head == want["head"], (path.name, head)
    assert _encoder_matches(want["encoder"], encoder), (path.name, encoder)
    assert cfg["data"]["type"] == want["dataset"], (path.name, cfg["data"]["type"])
    if "batch_size" in want:  # <gpus>x b<per-process batch>-<iterations>
        assert cfg["train"]["batch_size"] == want["batch_size"], (path.name, cfg["train"]["batch_size"])
        assert cfg["train"]["iters"] == want["iters"], (path.name, cfg["train"]["iters"])
    if "crop_size" in want:
        assert list(cfg["data"]["crop_size"]) == want["crop_size"], (path.name, cfg["data"]["crop_size"])
    if "ground_embedding" in want:
        assert cfg["depth"]["ground_embedding"] == want["ground_embedding"]
    if "branch" in want:
        assert cfg["model"]["decode_head"]["branch"] == want["branch"]


@pytest.mark.parametrize("path", SHIPPED + BASES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_shipped_file_repeats_a_key(path):
    """The reader refuses a repeated key, so reading every file (bases too) with it is the check."""
    from densefuse.config.loader import _read_yaml

    assert isinstance(_read_yaml(path), dict)


def test_the_convnext_rows_train_4_per_process_in_fp16():
    for path in (ROOT / "seg" / "paper").glob("upernet_convnext-*.yaml"):
        cfg = load_config(path, ["model.encoder.pretrained=null"])
        assert cfg["train"]["batch_size"] == 4 and cfg["train"]["amp"] == "fp16", path.name


def test_a_repeated_key_is_refused_with_file_line_and_key(tmp_path):
    (tmp_path / "twice.yaml").write_text("train:\n  batch_size: 4\noptim:\n  lr: 1.0e-4\ntrain:\n  amp: fp16\n")
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "twice.yaml")
    msg = str(e.value)
    assert "twice.yaml:5:" in msg and "duplicate key 'train'" in msg and "line 1" in msg and "\n" not in msg


def test_a_repeated_key_in_a_base_or_nested_mapping_is_refused(tmp_path):
    (tmp_path / "base.yaml").write_text("data:\n  crop_size: [64, 64]\n  num_workers: 0\n  crop_size: [32, 32]\n")
    (tmp_path / "top.yaml").write_text("_base_: [base.yaml]\ntrain:\n  iters: 3\n")
    with pytest.raises(ConfigError, match=r"base\.yaml:4: duplicate key 'crop_size'"):
        load_config(tmp_path / "top.yaml")


def test_yaml_merge_keys_may_override(tmp_path):
    """``<<: *anchor`` followed by a key of the anchor is an override, not a duplicate."""
    (tmp_path / "m.yaml").write_text("x: &a {iters: 3, batch_size: 2}\ntrain:\n  <<: *a\n  iters: 5\n")
    from densefuse.config.loader import _read_yaml

    assert _read_yaml(tmp_path / "m.yaml")["train"] == {"iters": 5, "batch_size": 2}
