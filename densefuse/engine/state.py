"""Checkpoints: atomic, ``torch.load(weights_only=True)``-loadable, complete enough to resume exactly.

``latest.pth`` holds the model, optimizer, scheduler, grad scaler, iteration, the loop's running sums and
metric history, and the RNG states of every rank (the sampler position follows from the iteration:
the infinite sampler is seeded, so ``iteration * batch_size * accum_steps`` samples are skipped).
``iter_<N>.pth`` are independent copies of earlier ``latest.pth`` files (``train.keep_last`` of them are
kept; damage to one file never reaches another); ``best.pth`` and ``final.pth`` hold the weights, config
and metrics only.

Every checkpoint carries ``digest``: a SHA-256 over its contents (each key, each tensor's dtype, shape
and bytes, each other value's ``repr``, in a fixed order), computed on the state as saved and checked
on the state as loaded. It is embedded rather than a sidecar file (nothing to lose or mix up when files
are copied) and over the contents rather than the file bytes (it checks exactly what a load returns,
independent of torch's zip layout). A checkpoint without ``digest`` (older densefuse) loads unchecked.
Nothing non-finite is ever written, and a failed write leaves the previous file whole.
"""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import torch
from torch import nn

from ..config.loader import drop_legacy_keys
from ..convert import convert_mmseg_segmentor, is_mmseg_layout, mmseg_tensors, read_mmseg_checkpoint
from ..errors import ConfigError, DensefuseError
from ..tasks import Task, get_task
from .runtime import file_mode, resolve_device

DIGEST_KEY = "digest"


class CheckpointError(DensefuseError):
    """A checkpoint file is missing, damaged or not a densefuse checkpoint."""


class DiskFullError(DensefuseError):
    """The disk filled up while writing a file; the previous version of the file is intact."""


def state_digest(state: Mapping[str, Any]) -> str:
    """``sha256:<hex>`` over ``state`` without its ``digest`` key (see the module docstring)."""
    h = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, Mapping):
            h.update(f"M{len(value)}".encode())
            for k in sorted(value, key=repr):
                h.update(repr(k).encode())
                feed(value[k])
        elif isinstance(value, (list, tuple)):
            h.update(f"L{len(value)}".encode())
            for v in value:
                feed(v)
        else:
            h.update(f"V{value!r}".encode())

    feed({k: v for k, v in state.items() if k != DIGEST_KEY})
    return "sha256:" + h.hexdigest()


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, Mapping):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def _disk_full(e: BaseException) -> bool:
    """Whether ``e`` is a failed write for lack of space (the OS's ENOSPC, or torch's zip writer's
    ``enforce fail at inline_container.cc``, which is what an ENOSPC inside ``torch.save`` becomes)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("inline_container" in text or "No space left" in text)


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MB"

PathLike = Union[str, Path]

#: config keys that may differ between a run and its ``--resume`` (they change no result)
SAFE_RESUME_KEYS = ("train.log_interval", "train.tensorboard", "train.dist_timeout", "data.num_workers",
                    "eval.batch_size", "work_dir", "name", "train.nonfinite", "train.nonfinite_limit", "data.verify",
                    "data.skip_bad")


def atomic_write(path: PathLike, write: Callable[[Any], None], binary: bool = True, size: Optional[int] = None) -> Path:
    """Write ``path`` through ``write(file)`` into a temp file in the same directory, then rename it
    over ``path``: readers (and a resume after a kill) see the old or the new file, never half of one.
    The file gets the mode the user's umask gives new files. A full disk is a :class:`DiskFullError`
    naming the file and the space it needs (``size``, else an estimate from the old file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8", "newline": ""})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException as e:
        written = os.path.getsize(tmp) if os.path.exists(tmp) else 0
        if os.path.exists(tmp):
            os.unlink(tmp)
        if _disk_full(e):
            need = size or (path.stat().st_size if path.exists() else written)
            free = shutil.disk_usage(path.parent).free
            previous = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
            raise DiskFullError(f"disk full while writing {path}: it needs about {_mb(need)} free in {path.parent} "
                                f"({_mb(free)} free now); {previous}; free space or choose another --work-dir") from None
        raise
    return path


def save_checkpoint(path: PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` with its digest to ``path`` atomically (see :func:`atomic_write`)."""
    from .step import nonfinite_tensors

    model = state.get("model")
    bad = nonfinite_tensors(model) if isinstance(model, Mapping) else []
    if bad:  # the trainer checks before; this keeps a finite file from ever being replaced by a non-finite one
        raise DensefuseError(f"refusing to write {path}: {len(bad)} weight tensors are not finite (e.g. {bad[0]}); "
                             f"the previous {Path(path).name} is kept")
    state = {**state, DIGEST_KEY: state_digest(state)}
    return atomic_write(path, lambda f: torch.save(state, f), size=_tensor_bytes(state) + 2**20)


def _first_line(e: BaseException) -> str:
    """The first line of an error's text, without torch's advice to load with ``weights_only=False``
    (which would run whatever code the file holds)."""
    text = str(e).strip()
    if "legacy .tar format" in text:  # torch's reading of a file that is no zip archive (zeroed, foreign)
        return "the file is not a torch zip archive"
    if "central directory" in text:  # the zip's index sits at the end of the file: the end is missing
        return "the file ends early (the archive's central directory is missing: a save or copy that did not finish)"
    first = text.splitlines()[0] if text else ""
    for cut in (" Re-running `torch.load` with `weights_only`", " In PyTorch 2.6", " (1) ", " This is an internal miniz"):
        first = first.split(cut)[0]
    sentences = [x for x in first.split(". ") if "weights_only" not in x]
    return ". ".join(sentences).rstrip(" .,;:")


def read_checkpoint(path: PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` and verify its digest; a :class:`CheckpointError`
    (one line, saying what is wrong) for a missing, unreadable or damaged file."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory; give the .pth file inside it (e.g. {path / 'latest.pth'})")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"cannot read checkpoint {path} (corrupt or truncated?): the file is empty")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        raise CheckpointError(f"cannot read checkpoint {path} (corrupt or truncated?): {type(e).__name__}: "
                              f"{_first_line(e)}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a densefuse checkpoint")
    digest = state.get(DIGEST_KEY)
    if digest is not None and digest != state_digest(state):
        raise CheckpointError(f"checkpoint {path} is damaged: its contents do not match the digest it was saved with")
    return state


def newest_intact(directory: PathLike, exclude: Iterable[PathLike] = ()) -> Optional[Path]:
    """The newest checkpoint in ``directory`` that reads and verifies: ``latest.pth``, then the
    ``iter_<N>.pth`` from the highest ``N`` down."""
    d = Path(directory)
    skip = {Path(p).resolve() for p in exclude}
    candidates = [d / "latest.pth", *sorted(d.glob("iter_*.pth"), reverse=True)]
    for p in candidates:
        if p.resolve() in skip or not p.is_file():
            continue
        try:
            read_checkpoint(p)
        except CheckpointError:
            continue
        return p
    return None


def load_checkpoint(path: PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """:func:`read_checkpoint`, whose error names the newest intact checkpoint next to a damaged one."""
    try:
        return read_checkpoint(path, map_location)
    except CheckpointError as e:
        if not Path(path).is_file():
            raise
        other = newest_intact(Path(path).parent, exclude=[path])
        hint = f"; the newest intact checkpoint there is {other}" if other else ""
        raise CheckpointError(f"{e}{hint}") from None


def load_model_state(model: nn.Module, state: dict[str, Any], source: PathLike) -> None:
    """Load ``state['model']`` (or a bare state_dict) strictly, with a readable mismatch message."""
    sd = state.get("model", state)
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:
        raise DensefuseError(f"checkpoint {source} does not match the model: {str(e).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[0]})")
        raise DensefuseError(f"checkpoint {source} does not match the model: {'; '.join(parts)}")


def read_model_checkpoint(path: PathLike) -> tuple[dict[str, Any], bool]:
    """``(state, from_mmseg)``: a densefuse checkpoint as written (verified by :func:`load_checkpoint`), or an
    mmseg one (its ``state_dict`` tensors only, read by :func:`densefuse.convert.read_mmseg_checkpoint`, which
    runs nothing from the file: mmseg 1.x training runs pickle mmengine and numpy objects that a weights-only
    load refuses)."""
    try:
        state = load_checkpoint(path)
    except DensefuseError as refused:
        if not Path(path).is_file():
            raise
        try:
            sd = read_mmseg_checkpoint(path)
        except Exception:  # noqa: BLE001 - not an mmseg training checkpoint either: the weights-only reason stands
            raise refused from None
        if sd is None:
            raise refused from None
        return {"state_dict": sd}, True
    if is_mmseg_layout(state):
        return {"state_dict": mmseg_tensors(state)}, True
    return state, False


def load_model_weights(model: nn.Module, path: PathLike, state: dict[str, Any], from_mmseg: bool,
                       log: Callable[[str], None] = print) -> None:
    """Load a checkpoint read by :func:`read_model_checkpoint` into ``model``; an mmseg one is converted,
    saying so through ``log``."""
    if not from_mmseg:
        load_model_state(model, state, path)
        return
    converted = convert_mmseg_segmentor(state["state_dict"], model, str(path))
    model.load_state_dict(converted, strict=False)
    log(f"{path}: mmseg checkpoint, converted to densefuse ({len(state['state_dict'])} tensors; "
        f"model.equalizer.mode off)")


def build_checkpoint_model(cfg: Mapping[str, Any], path: PathLike, state: dict[str, Any], from_mmseg: bool,
                           log: Callable[[str], None] = print) -> tuple[Task, nn.Module, torch.device]:
    """``(task, model, device)``: the model of ``cfg`` (the checkpoint's own config, or the one the user
    named) on the config's device, with the checkpoint's weights."""
    task = get_task(cfg["task"], cfg)
    device = resolve_device(cfg["device"])
    model = task.build_model(cfg).to(device)
    load_model_weights(model, path, state, from_mmseg, log)
    return task, model, device


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, Mapping):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, Mapping) and v else {f"{prefix}{k}": v})
    return out


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any],
                       safe: Iterable[str] = SAFE_RESUME_KEYS) -> list[str]:
    """Dotted keys whose values differ between two configs, leaving out the ``safe`` ones."""
    a, b = _flatten(saved), _flatten(current)
    safe = tuple(safe)
    return sorted(k for k in set(a) | set(b)
                  if a.get(k) != b.get(k) and not any(k == s or k.startswith(s + ".") for s in safe))


def check_resume_config(saved: Mapping[str, Any], current: Mapping[str, Any], source: PathLike) -> None:
    """Refuse to resume with a config that changes results; name the differing keys."""
    saved = drop_legacy_keys(saved) if saved else saved
    diff = config_differences(saved, current)
    if diff:
        a, b = _flatten(saved), _flatten(current)
        shown = "; ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:4]) + ("; ..." if len(diff) > 4 else "")
        raise ConfigError(f"--resume with a config that differs from the run in {source} ({shown}); only "
                          f"{', '.join(SAFE_RESUME_KEYS)} may change")


class Checkpointer:
    """Writes ``latest.pth`` / ``iter_<N>.pth`` / ``best.pth`` / ``final.pth`` into a work dir (rank 0)."""

    def __init__(self, work_dir: PathLike, keep_last: int = 1) -> None:
        self.dir = Path(work_dir)
        self.keep_last = int(keep_last)

    @property
    def latest(self) -> Path:
        return self.dir / "latest.pth"

    def save(self, state: dict[str, Any], iteration: int) -> Path:
        """``latest.pth``, plus an independent copy ``iter_<N>.pth`` when old checkpoints are kept;
        older copies are pruned only once the new ones are complete."""
        save_checkpoint(self.latest, state)
        if self.keep_last > 0:
            copy = self.dir / f"iter_{iteration:07d}.pth"
            with open(self.latest, "rb") as src:
                atomic_write(copy, lambda f: shutil.copyfileobj(src, f, 2**24), size=self.latest.stat().st_size)
            for old in sorted(self.dir.glob("iter_*.pth"))[: -self.keep_last]:
                old.unlink(missing_ok=True)
        return self.latest

    def newest_intact(self) -> Optional[Path]:
        """The newest checkpoint of this work dir that reads and verifies (None when there is none)."""
        return newest_intact(self.dir)

    def save_weights(self, name: str, state: Mapping[str, Any]) -> Path:
        """``best.pth`` / ``final.pth``: model, iteration, config and metrics."""
        return save_checkpoint(self.dir / name, {k: state[k] for k in ("model", "iter", "config", "metrics") if k in state})

    def resume_source(self, log: Callable[[str], None] = print) -> Path:
        """``latest.pth``, or, when it is missing or damaged, the newest intact ``iter_<N>.pth`` (saying so)."""
        try:
            read_checkpoint(self.latest)
            return self.latest
        except CheckpointError as e:
            other = newest_intact(self.dir, exclude=[self.latest])
            if other is None:
                if not self.latest.exists():
                    raise DensefuseError(f"nothing to resume in {self.dir} (no latest.pth)") from None
                raise CheckpointError(f"{e}; no intact iter_<N>.pth to resume from either") from None
            why = "missing" if not self.latest.exists() else "damaged"
            log(f"{self.latest.name} is {why}; resuming from {other.name}, the newest intact checkpoint")
            return other

    def load_latest(self, map_location: Any = "cpu", config: Optional[Mapping[str, Any]] = None,
                    source: Optional[Path] = None) -> dict[str, Any]:
        """The resume state (from ``source``, default ``latest.pth``); with ``config``, refuse it when
        the run's config differs."""
        source = source or self.latest
        state = load_checkpoint(source, map_location)
        missing = [k for k in ("model", "optimizer", "scheduler", "iter", "loop", "rng") if k not in state]
        if missing:
            raise DensefuseError(f"{source} cannot be resumed: it lacks {', '.join(missing)}")
        if config is not None:
            check_resume_config(state.get("config", {}), config, source)
        return state
