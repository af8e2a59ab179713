"""``densefuse export``: writes the file, prints the check it ran; user errors are one line (exit 2)."""
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import densefuse
from densefuse.cli import main
from densefuse.config import load_config
from densefuse.smp.attach import detach
from densefuse.tasks import get_task

ROOT = Path(__file__).resolve().parent.parent
SMP_CONFIG = ROOT / "configs" / "seg" / "synthetic_smp_upernet_r18.yaml"


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A calibrated smp UPerNet checkpoint (embedded config), as a training run writes it."""
    cfg = load_config(SMP_CONFIG, ["model.smp.kwargs.decoder_channels=32"])
    torch.manual_seed(0)
    model = get_task(cfg["task"], cfg).build_model(cfg)
    densefuse.calibrate(model, [torch.randn(2, 3, 64, 64)])
    path = tmp_path_factory.mktemp("ckpt") / "final.pth"
    torch.save({"model": model.state_dict(), "iter": 0, "config": cfg.to_dict()}, path)
    return path


def test_export_plain_and_torchscript(checkpoint, tmp_path):
    out = tmp_path / "plain.pth"
    r = cli("export", "--checkpoint", checkpoint, "--format", "plain", "--out", out, "--size", 64)
    assert r.exit_code == 0, r.output
    assert "check: state_dict loaded strictly into a fresh plain model" in r.output
    assert "max |diff| 0" in r.output
    state = torch.load(out, weights_only=True)
    assert not any(k.startswith("scale_equalizers.") for k in state)
    cfg = load_config(SMP_CONFIG, ["model.smp.kwargs.decoder_channels=32"])
    plain = get_task(cfg["task"], cfg).build_model(cfg)
    detach(plain)
    plain.load_state_dict(state, strict=True)  # a plain smp UPerNet
    r = cli("export", "--checkpoint", checkpoint, "--format", "torchscript", "--size", 64)
    assert r.exit_code == 0, r.output
    written = checkpoint.with_suffix(".torchscript.pt")
    assert f"wrote {written}" in r.output and "check: torch.jit.script" in r.output
    assert torch.jit.load(str(written)) is not None
    # never overwritten
    r = cli("export", "--checkpoint", checkpoint, "--format", "torchscript")
    assert r.exit_code == 2 and "already exists" in r.output


@pytest.mark.slow
def test_export_onnx(checkpoint, tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "m.onnx"
    r = cli("export", "--checkpoint", checkpoint, "--format", "onnx", "--out", out, "--size", 64)
    assert r.exit_code == 0, r.output
    assert out.stat().st_size > 0 and "check: onnxruntime vs eager" in r.output
    diff = float(r.output.rsplit("max |diff|", 1)[1])
    assert diff < 1e-4


def test_export_user_errors(checkpoint, tmp_path):
    r = cli("export", "--checkpoint", tmp_path / "missing.pth", "--format", "onnx", "--out", tmp_path / "x.onnx")
    assert r.exit_code == 2 and "checkpoint not found" in r.output
    r = cli("export", "--checkpoint", checkpoint, "--format", "tflite")
    assert r.exit_code == 2 and "tflite" in r.output
    cfg = load_config(ROOT / "configs" / "seg" / "synthetic_upernet_r18.yaml", ["model.encoder.pretrained=null"])
    native = tmp_path / "native.pth"
    torch.save({"model": get_task("seg", cfg).build_model(cfg).state_dict(), "config": cfg.to_dict()}, native)
    r = cli("export", "--checkpoint", native, "--format", "plain", "--out", tmp_path / "p.pth")
    assert r.exit_code == 2 and "is a densefuse model" in r.output and not (tmp_path / "p.pth").exists()
