"""Check densefuse's mmseg checkpoint converters against the real MMSegmentation 1.2.2.

For each row, the mmseg side (run with ``--mmseg-python``, a venv with mmsegmentation 1.2.2, mmcv-lite and
mmengine; mmseg is never a densefuse dependency) builds the segmentor from mmseg's own config with random
initialisation (SyncBN -> BN, no pretrained weights, ``--num-classes`` classes), gives every 1-D tensor
(norm affines, BN running statistics, biases) random values so that a wrong mapping cannot hide behind
ones and zeros, and saves to a temporary directory:

* the segmentor ``state_dict`` as an mmseg checkpoint (``{"meta": ..., "state_dict": ...}``),
* the backbone alone under mmseg's backbone names (the ImageNet-checkpoint format the configs start from),
* for one fixed input per size, the logits of ``EncoderDecoder.encode_decode`` (eval mode, resized to the
  input) and the backbone's feature maps.

densefuse then builds the matching paper config (``model.encoder.pretrained=null``, equalizer off), loads the
segmentor checkpoint with :func:`densefuse.convert.load_mmseg_segmentor` and, separately, the backbone file into
a fresh encoder with :func:`densefuse.convert.load_encoder_weights`, and compares: max |logit difference|,
argmax agreement of the logits, max |feature difference| per level. Sizes that are no multiple of 4, 8 or 32
(``--sizes 512x683 375x500 131x173``) check the backbones' padding and rounding of odd maps.

    python tools/check_mmseg_parity.py --mmseg-python /path/to/mmseg-venv/bin/python --sizes 512x512 131x173

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
    "UPerNet Swin-S": ("swin/swin-small-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py",
                       "upernet_swin-s_4xb4-160k_ade20k-512x512"),
    "UPerNet Swin-B": ("swin/swin-base-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py",
                       "upernet_swin-b_4xb4-160k_ade20k-512x512"),
    "UPerNet Twins-SVT-S": ("twins/twins_svt-s_uperhead_8xb2-160k_ade20k-512x512.py",
                            "upernet_twins-svt-s_4xb4-160k_ade20k-512x512"),
    "UPerNet Twins-SVT-B": ("twins/twins_svt-b_uperhead_8xb2-160k_ade20k-512x512.py",
                            "upernet_twins-svt-b_4xb4-160k_ade20k-512x512"),
    "UPerNet Twins-SVT-L": ("twins/twins_svt-l_uperhead_8xb2-160k_ade20k-512x512.py",
                            "upernet_twins-svt-l_4xb4-160k_ade20k-512x512"),
    "UPerNet ConvNeXt-T": ("convnext/convnext-tiny_upernet_8xb2-amp-160k_ade20k-512x512.py",
                           "upernet_convnext-t_4xb4-160k_ade20k-512x512"),
    "UPerNet ConvNeXt-S": ("convnext/convnext-small_upernet_8xb2-amp-160k_ade20k-512x512.py",
                           "upernet_convnext-s_4xb4-160k_ade20k-512x512"),
    "UPerNet ConvNeXt-B": ("convnext/convnext-base_upernet_8xb2-amp-160k_ade20k-512x512.py",
                           "upernet_convnext-b_4xb4-160k_ade20k-512x512"),
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
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    out = os.path.join(args["out"], row["key"])
    torch.save({"meta": {"mmseg": mmseg.__version__, "config": row["config"]}, "state_dict": sd}, out + "_segmentor.pth")
    torch.save({k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}, out + "_backbone.pth")
    for h, w in args["sizes"]:
        x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(args["seed"] + 2))
        with torch.no_grad():
            logits = model.encode_decode(x, [dict(img_shape=(h, w), ori_shape=(h, w))])
            feats = [f.clone() for f in model.backbone(x)]
        torch.save({"input": x, "logits": logits, "feats": feats}, out + f"_{h}x{w}_io.pth")
    print(json.dumps({"row": row["key"], "params": sum(p.numel() for p in model.parameters())}), flush=True)
'''


def run_mmseg(python: str, row: str, out: Path, num_classes: int, sizes: list[tuple[int, int]], seed: int) -> int:
    """Build ``row`` in mmseg, write its files for every size to ``out``; returns mmseg's parameter count."""
    spec = {"rows": [{"key": "0", "config": ROWS[row][0]}], "out": str(out), "num_classes": num_classes,
            "sizes": [list(s) for s in sizes], "seed": seed}
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([python, "-c", MMSEG_SIDE, json.dumps(spec)], capture_output=True, text=True, env=env,
                         cwd=tempfile.gettempdir())
    if res.returncode != 0:
        raise SystemExit(f"error: the mmseg side failed on {row}:\n{res.stderr[-3000:]}")
    lines = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    return int(lines[0]["params"])


def check_row(row: str, key: str, out: Path, num_classes: int, sizes: list[tuple[int, int]]) -> list[dict]:
    """Load the mmseg files of ``row`` into densefuse and compare with mmseg's outputs at every size."""
    import torch

    from densefuse.config import load_config
    from densefuse.convert import load_encoder_weights, load_mmseg_segmentor
    from densefuse.model import build_model

    config = Path(__file__).resolve().parents[1] / "configs" / "seg" / "paper" / f"{ROWS[row][1]}.yaml"
    cfg = load_config(str(config), ["model.encoder.pretrained=null", f"model.num_classes={num_classes}",
                                    "model.equalizer.mode=off"])
    model = load_mmseg_segmentor(build_model(cfg), out / f"{key}_segmentor.pth").eval()
    encoder = build_model(cfg).encoder.eval()  # a fresh, randomly initialised encoder
    load_encoder_weights(encoder, out / f"{key}_backbone.pth")
    results = []
    for h, w in sizes:
        io = torch.load(out / f"{key}_{h}x{w}_io.pth", weights_only=True)
        with torch.no_grad():
            logits = model(io["input"])["out"]
            feats = encoder(io["input"])
        want = io["logits"]
        shapes_match = [tuple(a.shape) == tuple(b.shape) for a, b in zip(feats, io["feats"])]
        level_diff = [float((a - b).abs().max()) if same else float("inf")
                      for a, b, same in zip(feats, io["feats"], shapes_match)]
        same_shape = logits.shape == want.shape
        results.append({
            "row": row,
            "size": f"{h}x{w}",
            "mmseg_config": ROWS[row][0],
            "params_densefuse": sum(p.numel() for p in model.parameters()),
            "logit_max_abs_diff": float((logits - want).abs().max()) if same_shape else float("inf"),
            "logit_max_abs": float(want.abs().max()),
            "argmax_agreement": float((logits.argmax(1) == want.argmax(1)).float().mean()) if same_shape else 0.0,
            "argmax_disagree_beyond_ties": _disagreements_beyond_ties(logits, want) if same_shape else -1,
            "backbone_levels": f"{len(feats)}/{len(io['feats'])}",
            "backbone_grids": " ".join(f"{f.shape[2]}x{f.shape[3]}" for f in io["feats"]),
            "backbone_max_abs_diff": max(level_diff),
            "backbone_level_diffs": " ".join(f"{d:.2g}" for d in level_diff),
        })
    return results


def _disagreements_beyond_ties(logits, want) -> int:
    """Pixels whose argmax differs although mmseg's two best classes there are further apart than twice the
    largest logit difference: a float32 near-tie may flip either way, anything else is a real mismatch."""
    top2 = want.topk(2, dim=1).values
    margin = top2[:, 0] - top2[:, 1]
    tol = 2 * float((logits - want).abs().max())
    return int(((logits.argmax(1) != want.argmax(1)) & (margin > tol)).sum())


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a size is HxW (e.g. 512x683), got {text!r}") from None
    return h, w


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mmseg-python", required=True, help="python of a venv with mmsegmentation 1.2.2")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of: {', '.join(ROWS)}")
    p.add_argument("--num-classes", type=int, default=7)
    p.add_argument("--sizes", type=_size, nargs="+", metavar="HxW",
                   help="input sizes, e.g. 512x512 512x683 375x500 131x173 (default: --size)")
    p.add_argument("--size", type=int, nargs=2, default=(160, 192), metavar=("H", "W"), help="one input size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("results/check_mmseg_parity.csv"))
    args = p.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"error: unknown rows {unknown}; choose from {', '.join(ROWS)}")
    sizes = list(args.sizes) if args.sizes else [tuple(args.size)]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import pandas as pd
    import torch

    torch.set_num_threads(1)
    columns = ["row", "size", "params_mmseg", "params_densefuse", "logit_max_abs_diff", "logit_max_abs",
               "argmax_agreement", "argmax_disagree_beyond_ties", "backbone_levels", "backbone_grids",
               "backbone_max_abs_diff",
               "backbone_level_diffs", "mmseg_config"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = []
    for row in rows:  # one row at a time: the larger segmentors' files take hundreds of MB each
        with tempfile.TemporaryDirectory() as tmp:
            params = run_mmseg(args.mmseg_python, row, Path(tmp), args.num_classes, sizes, args.seed)
            for res in check_row(row, "0", Path(tmp), args.num_classes, sizes):
                res["params_mmseg"] = params
                results.append(res)
                print(f"{row} {res['size']}: max |logit diff| {res['logit_max_abs_diff']:.3g}, argmax agreement "
                      f"{100 * res['argmax_agreement']:.2f} %", file=sys.stderr, flush=True)
        df = pd.DataFrame(results)[columns]
        df.to_csv(args.out, index=False)  # after every row: a long run's finished rows are kept
    print(f"# mmseg 1.2.2 checkpoints -> densefuse, random init, {args.num_classes} classes, inputs "
          f"{' '.join(f'{h}x{w}' for h, w in sizes)}, {platform.machine()}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(df.drop(columns=["mmseg_config"]).to_markdown(index=False, floatfmt=".3g"))
    print(f"\nCSV: {args.out}")
    ok = (df["argmax_disagree_beyond_ties"] == 0) & (df["logit_max_abs_diff"] <= 1e-3 * df["logit_max_abs"].clip(lower=1))
    return 0 if bool(ok.all()) else 1


if __name__ == "__main__":
    sys.exit(main())
