"""Equalize any PyTorch model and ship it without densefuse.

:func:`equalize` attaches scale equalizers to any ``nn.Module``: smp models take their sites from
:data:`densefuse.smp.TABLE`, everything else (HuggingFace transformers, timm-based and plain models) from
the autograd probe (:func:`densefuse.smp.probe`), and ``sums=True`` adds sum fusions whose addends end in
a conv. :func:`export_plain` folds every site and strips what densefuse added, so the result is the
original class with the original state_dict keys. :func:`load_equalized` reloads a ``save_pretrained``
directory of an equalized model (smp or HuggingFace): the saved config records the sites, which are
re-attached before the weights load strictly. :func:`export_file` writes ONNX / TorchScript / plain
files and checks each against the eager model (the ``densefuse export`` command).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .calibration import equalizers
from .errors import CalibrationError, ConfigError, DataError
from .smp.attach import HF_RECORD, RECORD, SmpEqualizer, detach, sites_from_record
from .smp.attach import equalize as _attach
from .smp.sites import CONTAINER, Site

__all__ = ["equalize", "export_file", "export_plain", "load_equalized", "plain_state_dict"]


def equalize(model: nn.Module, mode: str = "explicit", eps: float = 1e-5, source: str = "auto",
             example_input: Optional[Tensor] = None, sites: Optional[Sequence[Site]] = None,
             sums: bool = False) -> list[Site]:
    """Attach a scale equalizer at every fusion site of any ``nn.Module`` (in place); return the sites.

    smp models use the site table, other models the probe (one traced forward on ``example_input``,
    default a random 1x3x64x64 image). ``sums=True`` also equalizes sum fusions ``L1(x1) + L2(x2)`` whose
    addends end in a conv (DPT / Depth Anything style). Then :func:`densefuse.calibrate`. Same arguments
    as :func:`densefuse.smp.equalize`, which returns the model instead.
    """
    _attach(model, mode=mode, eps=eps, source=source, example_input=example_input, sites=sites, sums=sums)
    return [eq.site for eq in model.get_submodule(CONTAINER).values()]


def _plugged(model: nn.Module) -> list[tuple[str, SmpEqualizer]]:
    eqs = [(n, eq) for n, eq in equalizers(model) if isinstance(eq, SmpEqualizer)]
    if not eqs:
        raise CalibrationError(
            f"{type(model).__name__} has no equalizers attached by densefuse.equalize; nothing to export"
        )
    return eqs


def export_plain(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Fold every site, remove the hooks, buffers, equalizers and config record: a model of the original
    class whose state_dict loads strictly into a fresh plain model (a copy unless ``inplace``).

    Sites in mode ``off`` change nothing and are dropped; calibrated ``explicit`` / ``fold`` sites are folded
    into their conv (exact for 1x1 convs; 3x3 convs differ in a border band, see docs/plugins.md). Every
    site is checked first: those that are not calibrated or cannot be folded are all named in one
    :class:`CalibrationError` and the model is left as it is.
    """
    _plugged(model)
    out = model if inplace else copy.deepcopy(model)
    todo, problems = [], []
    for name, eq in _plugged(out):
        if eq.mode == "off" or eq.is_folded:
            continue
        label = eq.label or name
        if not eq.is_calibrated:
            problems.append(f"'{label}' is not calibrated")
            continue
        try:
            target = eq.fold_target(out, name)
            eq.check_fold_target(target, label)
        except CalibrationError as e:
            problems.append(str(e).replace(f"fusion site '{label}': ", f"'{label}': "))
            continue
        todo.append((eq, target))
    if problems:
        raise CalibrationError(
            f"cannot export a plain {type(model).__name__}: {'; '.join(problems)} "
            "(calibrate first; keep unfoldable sites with densefuse.load_equalized or export them to ONNX / "
            "TorchScript in mode explicit)"
        )
    for eq, target in todo:
        eq.fold(target)
    detach(out)
    return out


def plain_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The state_dict of :func:`export_plain` (the model itself is not changed)."""
    return export_plain(model).state_dict()


# ---------------------------------------------------------------------------------------------- loading
def _read_config(path: Path) -> dict:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise DataError(f"{path} is not a save_pretrained directory (no config.json)")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{cfg_file} is not valid JSON ({e.msg}, line {e.lineno})") from None


def _build(path: Path, config: dict) -> tuple[nn.Module, bool]:
    """A plain model of the class the directory was saved from, and whether its weights are loaded already.

    smp: a fresh model from the saved init arguments (the weights load below, strictly). HuggingFace: the
    class's own ``from_pretrained`` (it maps saved key names to the current ones), told to leave the
    equalizer entries alone.
    """
    if "_model_class" in config:
        import segmentation_models_pytorch as smp

        cls = getattr(smp, str(config["_model_class"]), None)
        if cls is None:
            raise DataError(f"{path}/config.json names smp class '{config['_model_class']}', which smp does not have")
        kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
        kwargs["encoder_weights"] = None  # the saved weights replace them; never download
        return cls(**kwargs), False
    try:
        import transformers
    except ImportError:  # pragma: no cover - depends on the environment
        raise DataError(f"{path} looks like a HuggingFace save; install transformers to load it") from None
    names = list(config.get("architectures") or [])
    cls = getattr(transformers, names[0], None) if names else None
    if cls is None:
        raise DataError(f"{path}/config.json names no transformers model class (architectures: {names})")
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # it would warn about the scale_equalizers entries
    try:
        return cls.from_pretrained(str(path)), True
    finally:
        transformers.logging.set_verbosity(level)


def _state_dict_file(path: Path) -> dict[str, Tensor]:
    st, pt = path / "model.safetensors", path / "pytorch_model.bin"
    if st.is_file():
        from safetensors.torch import load_file

        return load_file(str(st))
    if pt.is_file():
        return torch.load(pt, map_location="cpu", weights_only=True)
    raise DataError(f"{path} has no model.safetensors or pytorch_model.bin")


def load_equalized(path: Union[str, Path], model: Optional[nn.Module] = None, mode: Optional[str] = None) -> nn.Module:
    """Load a ``save_pretrained`` directory of an equalized smp or HuggingFace model (eval mode).

    The config records the sites (``_densefuse`` in smp's config, ``densefuse_equalization`` in a
    HuggingFace config): they are re-attached to a fresh model of the saved class (or to ``model``)
    before the weights load strictly, so the calibration (and the folded flag) come back with them.
    ``mode`` overrides the recorded mode. A directory without a record (a plain or exported model)
    raises :class:`DataError`: load it with its own library's ``from_pretrained``.
    """
    path = Path(path)
    config = _read_config(path)
    record = config.get(RECORD) or config.get(HF_RECORD)
    if not record:
        raise DataError(
            f"{path}/config.json has no densefuse equalization record; it is a plain model: load it with "
            "its library's from_pretrained"
        )
    model, loaded = _build(path, config) if model is None else (model, False)
    sites = sites_from_record(record)
    _attach(model, mode=mode or record.get("mode", "explicit"), eps=float(record.get("eps", 1e-5)), sites=sites)
    state = _state_dict_file(path)
    if loaded:  # the model's own weights are in: load the equalizers, every one of their entries
        state = {k: v for k, v in state.items() if k.startswith(CONTAINER + ".")}
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not loaded or k.startswith(CONTAINER + ".")]
    if missing or result.unexpected_keys:
        raise DataError(
            f"{path}: the weights do not match {type(model).__name__} with its recorded sites "
            f"(missing {missing[:5]}, unexpected {result.unexpected_keys[:5]})"
        )
    return model.eval()


# ---------------------------------------------------------------------------------------------- files
def _first_tensor(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, dict):
        return next(v for v in out.values() if isinstance(v, Tensor))
    if isinstance(out, (list, tuple)):
        return _first_tensor(out[0])
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise ConfigError(f"cannot export a model whose forward returns {type(out).__name__}; it must return a tensor")


def export_file(model: nn.Module, fmt: str, out: Union[str, Path], example: Tensor,
                plain: Optional[nn.Module] = None) -> dict[str, Any]:
    """Write ``model`` as ``fmt`` (``onnx`` | ``torchscript`` | ``plain``) to ``out`` and check it.

    ``onnx``: torch's default exporter, compared with eager under onnxruntime. ``torchscript``:
    ``torch.jit.script``, saved, reloaded and compared with eager. ``plain``: :func:`export_plain`; its
    state_dict is saved and loaded strictly into ``plain`` (a fresh model of the same class without
    equalizers) and the two are compared. Returns ``{"format", "file", "check", "max_abs_diff"}``.
    """
    out = Path(out)
    model = model.eval()
    with torch.no_grad():
        ref = _first_tensor(model(example))
    if fmt == "onnx":
        import onnxruntime as ort

        torch.onnx.export(model, (example,), str(out), dynamo=True, verbose=False)
        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: example.cpu().numpy()})[0])
        check = "onnxruntime vs eager"
    elif fmt == "torchscript":
        scripted = torch.jit.script(model)
        scripted.save(str(out))
        with torch.no_grad():
            got = _first_tensor(torch.jit.load(str(out))(example))
        check = "torch.jit.script, saved and reloaded, vs eager"
    elif fmt == "plain":
        if plain is None:
            raise ConfigError("--format plain needs a fresh model of the same class to check the export")
        exported = export_plain(model)
        torch.save(exported.state_dict(), out)
        plain.load_state_dict(torch.load(out, map_location="cpu", weights_only=True), strict=True)
        with torch.no_grad():
            ref = _first_tensor(exported(example))
            got = _first_tensor(plain.eval()(example))
        check = "state_dict loaded strictly into a fresh plain model vs the exported (folded) model"
    else:
        raise ConfigError(f"unknown export format '{fmt}'; choose onnx, torchscript or plain")
    diff = float((got.float() - ref.float().cpu()).abs().max())
    return {"format": fmt, "file": str(out), "check": check, "max_abs_diff": diff}
