"""Check densefuse's mmseg checkpoint converters against the real MMSegmentation 1.2.2.

For each row, the mmseg side (run with ``--mmseg-python``, a venv with mmsegmentation 1.2.2, mmcv-lite and
mmengine; mmseg is never a densefuse dependency) builds the segmentor from mmseg's own config with random
initialisation (SyncBN -> BN, no pretrained weights, ``--num-classes`` classes), gives every 1-D tensor
(norm affines, BN running statistics, biases) random values so that a wrong mapping cannot hide behind
ones and zeros, and saves to a temporary directory:

* the segmentor ``state_dict`` as an mmseg checkpoint (``{"meta": ..., "state_dict": ...}``),
* the backbone alone under mmseg's backbone names (the ImageNet-checkpoint format the configs start from),
* for one fixed input, the logits of ``EncoderDecoder.encode_decode`` (eval mode, resized to the input)
  and the backbone's feature maps.

densefuse then builds the matching paper config (``model.encoder.pretrained=null``, equalizer off), loads the
segmentor checkpoint with :func:`densefuse.convert.load_mmseg_segmentor` and, separately, the backbone file into
a fresh encoder with :func:`densefuse.convert.load_encoder_weights`, and compares: max |logit difference|,
argmax agreement of the logits, max |feature difference| per level.

    python tools/check_mmseg_parity.py --mmseg-python /work/venvs/mmseg/bin/python

Prints a Markdown table and writes ``results/check_mmseg_parity.csv``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: row -> (mmseg config under mmseg's packaged configs, densefuse paper config)
ROWS: dict[str, tuple[str, str]] = {
    "UPerNet Swin-T": ("swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py",
                       "upernet_swin-t_4xb4-160k_ade20k-512x512"),
    "UPerNet Twins-SVT-S": ("twins/twins_svt-s_uperhead_8xb2-160k_ade20k-512x512.py",
                            "upernet_twins-svt-s_4xb4-160k_ade20k-512x512"),
    "UPerNet ConvNeXt-T": ("convnext/convnext-tiny_upernet_8xb2-amp-160k_ade20k-512x512.py",
                           "upernet_convnext-t_4xb4-160k_ade20k-512x512"),
    "PSPNet R50-D8": ("pspnet/pspnet_r50-d8_4xb4-160k_ade20k-512x512.py", "pspnet_r50-d8_4xb4-160k_ade20k-512x512"),
    "DeepLabV3 R50-D8": ("deeplabv3/deeplabv3_r50-d8_4xb4-160k_ade20k-512x512.py",
                         "deeplabv3_r50-d8_4xb4-160k_ade20k-512x512"),
    "DeepLabV3+ R50-D8": ("deeplabv3plus/deeplabv3plus_r50-d8_4xb4-160k_ade20k-512x512.py",
                          "deeplabv3plus_r50-d8_4xb4-160k_ade20k-512x512"),
    "FCN R50-D8": ("fcn/fcn_r50-d8_4xb4-160k_ade20k-512x512.py", "fcn_r50-d8_4xb4-160k_ade20k-512x512"),
}

MMSEG_SIDE = r'''
import json, os, sys, types
class _Stub(types.ModuleType):  # mmseg.utils imports mmcv.ops (compiled, absent in mmcv-lite); unused here
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return None
sys.modules["mmcv.ops"] = _Stub("mmcv.ops")
import torch
torch.set_num_threads(1)
import mmseg
from mmengine.config import Config
from mmseg.registry import MODELS
from mmseg.utils import register_all_modules
register_all_modules()
args = json.loads(sys.argv[1])
cfg_root = os.path.join(os.path.dirname(mmseg.__file__), ".mim", "configs")

def plain(obj):
    """SyncBN -> BN, no pretrained weights anywhere."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if k == "type" and v == "SyncBN":
                v = "BN"
            if k in ("pretrained", "init_cfg") and k != "type":
                v = None
            out[k] = plain(v)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v) for v in obj)
    return obj

for row in args["rows"]:
    cfg = Config.fromfile(os.path.join(cfg_root, row["config"]))
    m = plain(cfg.model.to_dict())
    m.pop("data_preprocessor", None)
    for head in ("decode_head", "auxiliary_head"):
        if m.get(head):
            m[head]["num_classes"] = args["num_classes"]
    torch.manual_seed(args["seed"])
    model = MODELS.build(m)
    model.init_weights()
    g = torch.Generator().manual_seed(args["seed"] + 1)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point() and t.ndim == 1:
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
    model.eval()
    x = torch.randn(1, 3, *args["size"], generator=torch.Generator().manual_seed(args["seed"] + 2))
    with torch.no_grad():
        logits = model.encode_decode(x, [dict(img_shape=tuple(args["size"]), ori_shape=tuple(args["size"]))])
        feats = [f.clone() for f in model.backbone(x)]
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    out = os.path.join(args["out"], row["key"])
    torch.save({"meta": {"mmseg": mmseg.__version__, "config": row["config"]}, "state_dict": sd}, out + "_segmentor.pth")
    torch.save({k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}, out + "_backbone.pth")
    torch.save({"input": x, "logits": logits, "feats": feats}, out + "_io.pth")
    print(json.dumps({"row": row["key"], "params": sum(p.numel() for p in model.parameters())}), flush=True)
'''


def run_mmseg(python: str, rows: list[str], out: Path, num_classes: int, size: tuple[int, int], seed: int) -> dict:
    spec = {"rows": [{"key": str(i), "config": ROWS[r][0]} for i, r in enumerate(rows)], "out": str(out),
            "num_classes": num_classes, "size": list(size), "seed": seed}
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([python, "-c", MMSEG_SIDE, json.dumps(spec)], capture_output=True, text=True, env=env,
                         cwd=tempfile.gettempdir())
    if res.returncode != 0:
        raise SystemExit(f"error: the mmseg side failed:\n{res.stderr[-3000:]}")
    lines = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    return {rows[int(d["row"])]: d["params"] for d in lines}


def check_row(row: str, key: str, out: Path, num_classes: int) -> dict:
    """Load the mmseg files of ``row`` into densefuse and compare with mmseg's outputs."""
    import torch

    from densefuse.config import load_config
    from densefuse.convert import load_encoder_weights, load_mmseg_segmentor
    from densefuse.model import build_model

    config = Path(__file__).resolve().parents[1] / "configs" / "seg" / "paper" / f"{ROWS[row][1]}.yaml"
    cfg = load_config(str(config), ["model.encoder.pretrained=null", f"model.num_classes={num_classes}",
                                    "model.equalizer.mode=off"])
    io = torch.load(out / f"{key}_io.pth", weights_only=True)
    model = load_mmseg_segmentor(build_model(cfg), out / f"{key}_segmentor.pth").eval()
    with torch.no_grad():
        logits = model(io["input"])["out"]
    want = io["logits"]
    encoder = build_model(cfg).encoder.eval()  # a fresh, randomly initialised encoder
    load_encoder_weights(encoder, out / f"{key}_backbone.pth")
    with torch.no_grad():
        feats = encoder(io["input"])
    level_diff = [float((a - b).abs().max()) for a, b in zip(feats, io["feats"])]
    return {
        "row": row,
        "mmseg_config": ROWS[row][0],
        "params_densefuse": sum(p.numel() for p in model.parameters()),
        "logit_max_abs_diff": float((logits - want).abs().max()),
        "logit_max_abs": float(want.abs().max()),
        "argmax_agreement": float((logits.argmax(1) == want.argmax(1)).float().mean()),
        "backbone_levels": f"{len(feats)}/{len(io['feats'])}",
        "backbone_max_abs_diff": max(level_diff),
        "backbone_level_diffs": " ".join(f"{d:.2g}" for d in level_diff),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mmseg-python", required=True, help="python of a venv with mmsegmentation 1.2.2")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of: {', '.join(ROWS)}")
    p.add_argument("--num-classes", type=int, default=7)
    p.add_argument("--size", type=int, nargs=2, default=(160, 192), metavar=("H", "W"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("results/check_mmseg_parity.csv"))
    args = p.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"error: unknown rows {unknown}; choose from {', '.join(ROWS)}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import pandas as pd
    import torch

    torch.set_num_threads(1)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        params = run_mmseg(args.mmseg_python, rows, Path(tmp), args.num_classes, tuple(args.size), args.seed)
        for i, row in enumerate(rows):
            res = check_row(row, str(i), Path(tmp), args.num_classes)
            res["params_mmseg"] = params[row]
            results.append(res)
    df = pd.DataFrame(results)
    df = df[["row", "params_mmseg", "params_densefuse", "logit_max_abs_diff", "logit_max_abs", "argmax_agreement",
             "backbone_levels", "backbone_max_abs_diff", "backbone_level_diffs", "mmseg_config"]]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out, index=False)
    print(f"# mmseg 1.2.2 checkpoints -> densefuse, random init, {args.num_classes} classes, input "
          f"{args.size[0]}x{args.size[1]}, {platform.machine()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(df.drop(columns=["mmseg_config"]).to_markdown(index=False, floatfmt=".3g"))
    print(f"\nCSV: {args.out}")
    ok = (df["argmax_agreement"] == 1.0) & (df["logit_max_abs_diff"] <= 1e-3 * df["logit_max_abs"].clip(lower=1))
    return 0 if bool(ok.all()) else 1


if __name__ == "__main__":
    sys.exit(main())
