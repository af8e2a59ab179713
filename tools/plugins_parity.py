"""Fold border effect and Hub round trip of densefuse.export_plain on smp / HuggingFace models.

Per model (random init, equalized, calibrated on 2 random 2x3xSxS batches, eval mode, one fresh 1x3xSxS
image): max |logits| of the explicit-mode model, max |explicit - exported plain| over the whole output
and over its central half (the interior, away from the zero-padded borders of 3x3 fusion convs), and
max |plain - plain after save_pretrained / from_pretrained|. Prints a Markdown table and writes CSV.

    python tools/plugins_parity.py [--size 128] [--out plugins_parity.csv]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import machine_line  # noqa: E402

import densefuse  # noqa: E402


def _models() -> dict:
    import segmentation_models_pytorch as smp
    import transformers

    def smp_model(arch: str, **kw: object) -> torch.nn.Module:
        return getattr(smp, arch)(encoder_name="resnet18", encoder_weights=None, classes=3, **kw)

    bb = transformers.ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1],
                                     out_features=["stage1", "stage2", "stage3", "stage4"])
    return {
        "smp UPerNet": (lambda: smp_model("UPerNet", decoder_channels=32), lambda d: smp.from_pretrained(d)),
        "smp DeepLabV3Plus": (lambda: smp_model("DeepLabV3Plus", decoder_channels=32),
                              lambda d: smp.from_pretrained(d)),
        "smp FPN (cat)": (lambda: smp_model("FPN", decoder_merge_policy="cat"), lambda d: smp.from_pretrained(d)),
        "HF UperNet (ConvNeXt)": (
            lambda: transformers.UperNetForSemanticSegmentation(transformers.UperNetConfig(
                backbone_config=bb, hidden_size=16, num_labels=3, use_auxiliary_head=False)),
            lambda d: transformers.UperNetForSemanticSegmentation.from_pretrained(d)),
        "HF Segformer": (
            lambda: transformers.SegformerForSemanticSegmentation(transformers.SegformerConfig(
                depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 32, 64], decoder_hidden_size=16, num_labels=3,
                num_attention_heads=[1, 1, 2, 2])),
            lambda d: transformers.SegformerForSemanticSegmentation.from_pretrained(d)),
    }


def _out(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model.eval()(x)
    return getattr(out, "logits", out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--out", default="plugins_parity.csv")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(2, 3, args.size, args.size, generator=g) for _ in range(2)]
    x = torch.randn(1, 3, args.size, args.size, generator=g)
    rows = []
    for name, (build, load) in _models().items():
        torch.manual_seed(0)
        model = build()
        sites = densefuse.equalize(model)
        densefuse.calibrate(model, calib)
        ref = _out(model, x)
        plain = densefuse.export_plain(model)
        got = _out(plain, x)
        h, w = ref.shape[-2:]
        inner = (slice(None), slice(None), slice(h // 4, h - h // 4), slice(w // 4, w - w // 4))
        with tempfile.TemporaryDirectory() as d:
            plain.save_pretrained(d)
            again = _out(load(d), x)
        rows.append({
            "model": name,
            "sites": len(sites),
            "fold convs": ", ".join(sorted({f"{plain.get_submodule(s.conv).kernel_size[0]}x"
                                            f"{plain.get_submodule(s.conv).kernel_size[1]}" for s in sites})),
            "max |logits|": float(ref.abs().max()),
            "max |explicit - plain|": float((got - ref).abs().max()),
            "interior max |explicit - plain|": float((got - ref)[inner].abs().max()),
            "max |plain - reloaded|": float((again - got).abs().max()),
        })
    table = pd.DataFrame(rows)
    print(machine_line())
    print(f"input 1x3x{args.size}x{args.size}; interior = central half of the logits")
    print(table.to_markdown(index=False, floatfmt=".3g"))
    table.to_csv(args.out, index=False)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
