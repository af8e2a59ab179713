"""smp's own model checks, re-stated for equalized models (calibrated, explicit and folded).

segmentation_models_pytorch's wheel does not ship its test helpers, so the checks its model tests make
(the subset that needs no download) are re-stated here, each against the eager forward of the same
model: any input resolution, ``torch.compile``, ``torch.export``, TorchScript, and save / load through
the Hub API. Tiny models: resnet18 encoder without weights, small decoders, 64x64 inputs.

:func:`run_check` is also what ``tests/test_plugins_compat.py`` runs to measure the compatibility
table of docs/plugins.md.
"""
import functools
import tempfile
import warnings
from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import torch

import densefuse

ARCHS = {
    "UPerNet": {"decoder_channels": 32},
    "DeepLabV3Plus": {"decoder_channels": 32},
    "Unet": {"decoder_interpolation": "bilinear", "encoder_depth": 3, "decoder_channels": (32, 16, 8)},
}
CHECKS = ("any_resolution", "compile", "export", "torchscript", "save_load")
MODES = ("explicit", "fold")


def build(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return getattr(smp, arch)(encoder_name="resnet18", encoder_weights=None, classes=3, **ARCHS[arch])


@functools.lru_cache(maxsize=None)
def equalized(arch: str, mode: str) -> torch.nn.Module:
    """Equalized + calibrated (+ folded in mode fold), eval mode."""
    model = build(arch)
    densefuse.equalize(model, mode=mode)
    g = torch.Generator().manual_seed(1)
    densefuse.calibrate(model, [torch.randn(2, 3, 64, 64, generator=g)])
    if mode == "fold":
        densefuse.fold(model)
    return model.eval()


def _x(h: int = 64, w: int = 64) -> torch.Tensor:
    return torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(5))


def _eager(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def run_check(model: torch.nn.Module, check: str) -> float:
    """Run one of smp's model checks on ``model``; return max |output - eager output| (raises on failure)."""
    x = _x()
    ref = _eager(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if check == "any_resolution":
            # smp: a model that does not require divisible shapes takes any size; the others any multiple
            # of their output stride. The output has the input's size.
            h, w = (65, 97) if not model.requires_divisible_input_shape else (96, 160)
            out = _eager(model, _x(h, w))
            assert out.shape[-2:] == (h, w), out.shape
            return 0.0
        if check == "compile":
            torch._dynamo.reset()
            with torch.no_grad():
                got = torch.compile(model, backend="eager", fullgraph=False)(x)
        elif check == "export":
            with torch.no_grad():
                got = torch.export.export(model, (x,)).module()(x)
        elif check == "torchscript":
            with torch.no_grad():
                got = torch.jit.script(model)(x)
        elif check == "save_load":
            with tempfile.TemporaryDirectory() as d:
                model.save_pretrained(d)
                got = _eager(densefuse.load_equalized(d), x)
        elif check == "onnx":
            import onnxruntime as ort

            from densefuse.plugins import export_file

            del ort  # imported first so a missing onnxruntime fails here, not inside the export
            with tempfile.TemporaryDirectory() as d:
                return export_file(model, "onnx", Path(d) / "m.onnx", x)["max_abs_diff"]
        else:
            raise ValueError(check)
    return float((got - ref).abs().max())


#: compile / export take seconds each: UPerNet here (tests/test_smp.py compiles and exports every architecture),
#: marked slow (CI runs them)
CASES = [pytest.param(a, m, c, marks=[pytest.mark.slow] if c in ("compile", "export") else [])
         for a in ARCHS for m in MODES for c in CHECKS if c not in ("compile", "export") or a == "UPerNet"]


@pytest.mark.parametrize("arch, mode, check", CASES)
def test_smp_model_checks_on_equalized_models(arch, mode, check):
    assert run_check(equalized(arch, mode), check) < 1e-4
