"""``densefuse`` command line: train, eval, calibrate, inspect, predict, convert, compare, export.

User errors (bad config, missing files, bad data) print one ``error: ...`` line and exit 2.
"""
from __future__ import annotations

import datetime as _dt
import functools
import re
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import click

from .errors import ConfigError, DataError, DensefuseError

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def strip_ansi(text: str) -> str:
    """``text`` without terminal colour/control sequences (PyTorch colours parts of its load errors)."""
    return _ANSI.sub("", text)


def _friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn densefuse user errors into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import warnings

        # torch warns about the pickle protocol of a file it is about to refuse; densefuse's own line
        # (the file is not a weights-only checkpoint) says what matters
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        try:
            return fn(*args, **kwargs)
        except DensefuseError as e:
            click.echo(f"error: {strip_ansi(str(e))}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


def _load(config: Optional[str], overrides: tuple[str, ...], task: Optional[str] = None, weights: bool = True) -> Any:
    """The resolved config, with every key, type and value checked before any work starts (``weights``:
    also the pretrained file; commands that load a checkpoint do not need it)."""
    from .config import load_config
    from .tasks import get_task

    default = get_task(task or "seg").default_config if config is None else None
    cfg = load_config(config, overrides, task_default=default)
    if task is not None and config is not None and cfg["task"] != task:
        raise DensefuseError(f"--task {task} but the config is for task '{cfg['task']}'")
    _validate(cfg, weights)
    return cfg


def _validate(cfg: Any, weights: bool = True) -> None:
    """Value checks shared by every command: the device name, the task's own checks and (``weights``)
    the pretrained file ``model.encoder.pretrained`` names."""
    from .encoders import check_pretrained
    from .tasks import get_task

    _resolve_device(cfg["device"], check_only=True)
    get_task(cfg["task"], cfg).validate_config(cfg)
    model = cfg["model"]
    if weights and model["type"] != "smp":
        check_pretrained(model["encoder"]["pretrained"], model["encoder"]["name"])


def _without_pretrained(cfg: Any) -> Any:
    """``cfg`` with ``model.encoder.pretrained: null``: a model whose weights all come from a checkpoint
    does not need (or read) the ImageNet file it was initialized from."""
    import copy

    out = copy.deepcopy(cfg)
    out["model"]["encoder"]["pretrained"] = None
    return out


def _preflight(cfg: Any) -> None:
    """Everything a training run builds from the config, built once without writing anything (datasets
    index their files; the model, optimizer and schedule are built on the ``meta`` device, loading the
    pretrained file): ``compare`` runs it for every config, so a user error in the last one surfaces
    before the first run starts."""
    from .tasks import get_task

    task = get_task(cfg["task"], cfg)
    for split in dict.fromkeys((cfg["data"]["train_split"], cfg["data"]["val_split"])):
        task.build_dataset(cfg, split)
    build_on_meta(cfg)


def build_on_meta(cfg: Any) -> None:
    """Build the model (loading its pretrained file), optimizer and schedule of ``cfg`` on PyTorch's ``meta``
    device: every check their builders make, at no cost in memory or initialization time."""
    import warnings

    import torch

    from .engine.optim import build_optimizer, build_scheduler
    from .tasks import get_task

    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")  # loading weights into meta tensors is a no-op, and says so
        model = get_task(cfg["task"], cfg).build_model(cfg)
        build_scheduler(build_optimizer(model, cfg["optim"]), cfg["schedule"], cfg["train"]["iters"])


def check_writable(directory: Path, label: Optional[str] = None) -> None:
    """``directory`` can be created and written: probe it (or its nearest existing parent) with a temporary
    file, so a read-only or impossible output place is one error line, naming ``label`` (default ``work dir
    <directory>``), before any work."""
    import os
    import tempfile

    target = Path(directory)
    existing = target
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if label is None and existing == target and not target.is_dir():
        raise DensefuseError(f"work dir {target} is a file")
    label = label or f"work dir {target}"
    if not existing.is_dir():
        raise DensefuseError(f"cannot create {label}: {existing} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".densefuse-probe-", dir=existing)
    except OSError as e:
        where = "" if existing == target else f" ({existing})"
        raise DensefuseError(f"{label} is not writable{where}: {e.strerror or e}") from None
    os.close(fd)
    os.unlink(probe)


def check_out_file(path: str) -> None:
    """An ``--out`` file: not there yet (never overwritten), and its folder can be created and written."""
    _refuse_overwrite(path)
    check_writable(Path(path).parent, f"--out {path}")


def _resolve_device(name: str, check_only: bool = False) -> Any:
    """``auto`` (CUDA when available, else CPU) or a torch device name; anything else is a ConfigError."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"device '{name}' is not a device name; use auto, cpu, cuda or cuda:<index>") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' requested but CUDA is not available")
    return device


def _to_device(batch: Any, device: Any) -> dict[str, Any]:
    import torch

    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


task_opt = click.option("--task", "-t", default=None, help="Task whose default config to use when --config is not given (seg).")


def _read_checkpoint(checkpoint: str) -> tuple[dict[str, Any], bool]:
    """``(state, from_mmseg)``: a densefuse checkpoint as written, or an mmseg one (its ``state_dict``
    tensors only, read by :func:`densefuse.convert.read_mmseg_checkpoint`, which runs nothing from the file:
    mmseg 1.x training runs pickle mmengine and numpy objects that a weights-only load refuses)."""
    from .convert import is_mmseg_layout, mmseg_tensors, read_mmseg_checkpoint
    from .engine.checkpoint import load_checkpoint

    try:
        state = load_checkpoint(checkpoint)
    except DensefuseError as refused:
        if not Path(checkpoint).is_file():
            raise
        try:
            sd = read_mmseg_checkpoint(checkpoint)
        except Exception:  # noqa: BLE001 - not an mmseg training checkpoint either: the weights-only reason stands
            raise refused from None
        if sd is None:
            raise refused from None
        return {"state_dict": sd}, True
    if is_mmseg_layout(state):
        return {"state_dict": mmseg_tensors(state)}, True
    return state, False


def _checkpoint_config(checkpoint: str, config: Optional[str], overrides: tuple[str, ...],
                       state: dict[str, Any], from_mmseg: bool) -> Any:
    """The config to build a checkpoint's model from: the checkpoint's own (embedded) config unless
    ``--config`` is given; an mmseg checkpoint needs ``--config`` and runs with ``model.equalizer.mode: off``
    (its weights are a plain network)."""
    from .config import from_dict

    if config is None:
        if from_mmseg:
            raise DensefuseError(f"{checkpoint} is an mmseg checkpoint: pass --config with the densefuse config of "
                                 f"its model (docs/paper.md, 'Coming from mmseg')")
        if "config" not in state:
            raise DensefuseError(f"{checkpoint} has no embedded config; pass --config")
        cfg = from_dict(state["config"], overrides, source=f"{checkpoint} (embedded config)")
        _validate(cfg, weights=False)
    else:
        cfg = _load(config, overrides, weights=False)
    cfg = _without_pretrained(cfg)
    if from_mmseg:
        cfg["model"]["equalizer"]["mode"] = "off"
    return cfg


def _load_weights(model: Any, checkpoint: str, state: dict[str, Any], from_mmseg: bool) -> None:
    """Load a checkpoint read by :func:`_read_checkpoint` into ``model``; an mmseg one is converted, saying so."""
    from .convert import convert_mmseg_segmentor
    from .engine.checkpoint import load_model_state

    if not from_mmseg:
        load_model_state(model, state, checkpoint)
        return
    converted = convert_mmseg_segmentor(state["state_dict"], model, checkpoint)
    model.load_state_dict(converted, strict=False)
    click.echo(f"{checkpoint}: mmseg checkpoint, converted to densefuse ({len(state['state_dict'])} tensors; "
               f"model.equalizer.mode off)")


def _checkpoint_model(checkpoint: str, config: Optional[str], overrides: tuple[str, ...]) -> tuple[Any, Any, Any, Any]:
    """(cfg, task, model, device) for a checkpoint; its embedded config unless ``--config`` is given."""
    from .tasks import get_task

    state, from_mmseg = _read_checkpoint(checkpoint)
    cfg = _checkpoint_config(checkpoint, config, overrides, state, from_mmseg)
    task = get_task(cfg["task"], cfg)
    device = _resolve_device(cfg["device"])
    model = task.build_model(cfg).to(device)
    _load_weights(model, checkpoint, state, from_mmseg)
    return cfg, task, model, device


config_opt = click.option("--config", "-c", "config", type=str, default=None, help="YAML config file (or name under configs/).")
set_opt = click.option("--set", "-s", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key (repeatable).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="densefuse")
def main() -> None:
    """densefuse: dense prediction with scale-equalized multi-level feature fusion."""


@main.command()
@task_opt
@config_opt
@set_opt
@click.option("--work-dir", type=click.Path(file_okay=False), default=None, help="Run directory (default work_dirs/<config>/<time>).")
@click.option("--resume", is_flag=True, help="Resume from <work-dir>/latest.pth.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: only on a terminal).")
@_friendly
def train(task: Optional[str], config: Optional[str], overrides: tuple[str, ...], work_dir: Optional[str], resume: bool,
          progress: Optional[bool]) -> None:
    """Train a model. Without --config, the task's default config (synthetic data) is used."""
    from .engine import Trainer

    cfg = _load(config, overrides, task)
    if resume and work_dir is None:
        raise DensefuseError("--resume needs --work-dir")
    from .engine.distributed import is_main, on_main

    trainer = Trainer(cfg, Path(work_dir) if work_dir else None, resume=resume, progress=progress)
    on_main(lambda: check_writable(trainer.work_dir))
    metrics = trainer.run()  # prints "work dir: ..." once the run dir exists
    if is_main():
        click.echo(f"final: {format_metrics(metrics)}")


@main.command("check-data")
@task_opt
@config_opt
@set_opt
@click.option("--split", "splits", multiple=True, help="Split to check (repeatable; default data.train_split and data.val_split).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Decoding threads (default: the CPUs, at most 16).")
@_friendly
def check_data_cmd(task: Optional[str], config: Optional[str], overrides: tuple[str, ...], splits: tuple[str, ...],
                   threads: Optional[int]) -> None:
    """Read every sample of the config's dataset and list every bad file with its reason."""
    from .data.check import check_splits
    from .tasks import get_task

    cfg = _load(config, overrides, task, weights=False)
    data = cfg["data"]
    show = sys.stderr.isatty()
    reports = check_splits(get_task(cfg["task"], cfg), cfg, splits or (data["train_split"], data["val_split"]), threads,
                           progress=(lambda name, done, total: click.echo(f"{name}: {done}/{total}", err=True)) if show else None)
    for report in reports:
        click.echo("\n".join(report.lines()))
    bad = sum(len(r.bad) + len(r.missing) for r in reports)
    if bad:
        raise DataError(f"{bad} bad samples (listed above); fix or remove the files, or train with data.skip_bad=true")


def format_metrics(metrics: Any) -> str:
    """``{'mIoU': 62.93, 'abs_rel': 0.05123}``: each value through :func:`format_metric`, so small
    metrics (depth's abs_rel) keep their digits."""
    from .engine.compare import format_metric

    return "{" + ", ".join(f"'{k}': {format_metric(v)}" for k, v in metrics.items()) + "}"


@main.command("eval")
@config_opt
@click.option("--checkpoint", "-k", required=True, type=str, help="Checkpoint (.pth) to evaluate.")
@set_opt
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Write the summary as CSV here, and each detail table (e.g. per-class IoU) next to it as <name>_<table>.csv.")
@_friendly
def eval_cmd(config: Optional[str], checkpoint: str, overrides: tuple[str, ...], out: Optional[str]) -> None:
    """Evaluate a checkpoint on the validation split. Without --config, the checkpoint's own config is used."""
    import pandas as pd

    from .data.loader import build_loader
    from .engine import evaluate_full

    if out:
        check_out_file(out)
    cfg, task, model, device = _checkpoint_model(checkpoint, config, overrides)
    data = task.build_dataset(cfg, cfg["data"]["val_split"])
    loader = build_loader(data, cfg["eval"]["batch_size"], train=False, num_workers=cfg["data"]["num_workers"], seed=cfg["seed"])
    from .engine.runtime import out_of_memory_hint
    from .engine.trainer import eval_memory_settings

    with out_of_memory_hint(f"evaluating {checkpoint} on {device}", eval_memory_settings(cfg)):
        summary, tables = evaluate_full(model, task, loader, task.build_transform(cfg, train=False), device)
    click.echo(_markdown(pd.DataFrame([summary])))
    if out:
        base = Path(out)
        paths = {name: base.with_name(f"{base.stem}_{name}.csv") for name in tables}
        for p in paths.values():
            _refuse_overwrite(str(p))
        base.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame([summary]).to_csv(base, index=False)
        for name, table in tables.items():
            table.to_csv(paths[name], index=False)
        click.echo(f"wrote {', '.join(str(p) for p in [base, *paths.values()])}")


def _markdown(frame: Any) -> str:
    """A table as Markdown with every float through :func:`format_metric`."""
    from .engine.compare import format_metric

    shown = frame.copy()
    for col in shown.columns:
        if shown[col].dtype.kind == "f":
            shown[col] = [format_metric(v) for v in shown[col]]
    return shown.to_markdown(index=False, disable_numparse=True)


def _refuse_overwrite(path: str) -> None:
    if Path(path).exists():
        raise DensefuseError(f"{path} already exists; not overwriting it")


def _calibration_batches(task: Any, cfg: Any, dataset: Any, device: Any, seed: int) -> Any:
    """Training images, normalized but not augmented, in a seeded shuffled order (at least 2 per batch:
    BN runs in train mode during calibration)."""
    from .data.loader import build_loader

    c = cfg["calibration"]
    loader = build_loader(dataset, max(2, c["batch_size"]), train=True, num_workers=cfg["data"]["num_workers"], seed=seed)
    tf = task.build_transform(cfg, train=False)
    return (tf(_to_device(b, device)) for b in loader)


def _model_and_data(cfg: Any, num_images: Optional[int]) -> tuple[Any, Any, Callable[[int], Any], int]:
    """The task, the model of ``cfg``, a function ``seed -> calibration batches`` and the number of images."""
    import torch

    from .tasks import get_task

    torch.manual_seed(cfg["seed"])
    task = get_task(cfg["task"], cfg)
    device = _resolve_device(cfg["device"])
    model = task.build_model(cfg).to(device)
    data = task.build_dataset(cfg, cfg["data"]["train_split"])
    n = num_images or cfg["calibration"]["num_images"] or len(data)
    return task, model, lambda seed: _calibration_batches(task, cfg, data, device, seed), n


def _check_num_images(num_images: Optional[int]) -> None:
    if num_images is not None and num_images < 1:
        raise ConfigError(f"--num-images must be at least 1, got {num_images}")


def _stamp() -> str:
    return _dt.datetime.now().strftime("%Y%m%d_%H%M%S")


num_images_opt = click.option("--num-images", type=int, default=None, help="Images to use (default calibration.num_images).")


@main.command("calibrate")
@task_opt
@config_opt
@set_opt
@num_images_opt
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="CSV path (default work_dirs/<config>/calibration-<time>.csv).")
@_friendly
def calibrate_cmd(task: Optional[str], config: Optional[str], overrides: tuple[str, ...], num_images: Optional[int],
                  out: Optional[str]) -> None:
    """Measure the per-branch mean/std at every fusion site and print the calibration table."""
    from .equalizer import calibrate

    cfg = _load(config, overrides, task)
    path = Path(out) if out else Path(cfg.get("work_dir") or "work_dirs") / cfg["name"] / f"calibration-{_stamp()}.csv"
    check_out_file(str(path))
    _check_num_images(num_images)
    task_obj, model, batches, n = _model_and_data(cfg, num_images)
    table = calibrate(model, lambda: batches(cfg["seed"]), num_images=n, forward=task_obj.forward)
    click.echo(table.to_markdown(index=False, floatfmt=".4f"))
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=False)
    click.echo(f"wrote {path}")


@main.command("inspect")
@task_opt
@config_opt
@set_opt
@click.option("--checkpoint", "-k", default=None, help="Inspect a trained checkpoint instead of the initial model.")
@num_images_opt
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Output dir (default work_dirs/<config>/inspect-<time>).")
@_friendly
def inspect_cmd(task: Optional[str], config: Optional[str], overrides: tuple[str, ...], checkpoint: Optional[str],
                num_images: Optional[int], out: Optional[str]) -> None:
    """Per fusion site, the std of every concat subject before and after equalization (table + PNG)."""
    from .equalizer import calibrate, equalizers, measure
    from .report import plot_inspection

    if checkpoint:  # built from the checkpoint's own config (a depth run's, ...) unless --config is given
        state, from_mmseg = _read_checkpoint(checkpoint)
        cfg = _checkpoint_config(checkpoint, config, overrides, state, from_mmseg)
    else:
        cfg = _load(config, overrides, task)
    out_dir = Path(out) if out else Path(cfg.get("work_dir") or "work_dirs") / cfg["name"] / f"inspect-{_stamp()}"
    for name in ("inspect.csv", "inspect.png"):
        _refuse_overwrite(str(out_dir / name))
    check_writable(out_dir, f"--out {out_dir}")
    _check_num_images(num_images)
    task_obj, model, batches, n = _model_and_data(cfg, num_images)
    if checkpoint:
        _load_weights(model, checkpoint, state, from_mmseg)
    eqs = [eq for _, eq in equalizers(model)]
    if not all(eq._is_calibrated for eq in eqs):
        calibrate(model, lambda: batches(cfg["seed"]), num_images=n, forward=task_obj.forward)
    for eq in eqs:  # show what equalization does even for a baseline (mode off) config
        if eq.mode == "off":
            eq.set_mode("explicit")
    # other images than the calibration's
    table = measure(model, lambda: batches(cfg["seed"] + 1), num_images=n, forward=task_obj.forward)
    cols = [c for c in ["site", "branch", "channels", "ratio_h", "std", "std_after", "mean", "mean_after"] if c in table]
    click.echo(table[cols].to_markdown(index=False, floatfmt=".3f"))
    for site, g in table.groupby("site", sort=False):
        click.echo(f"{site}: std max/min before {g['std'].max() / g['std'].min():.2f}, "
                   f"after {g['std_after'].max() / g['std_after'].min():.2f}")
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_dir / "inspect.csv", index=False)
    plot_inspection(table, out_dir / "inspect.png")
    click.echo(f"wrote {out_dir / 'inspect.csv'} and {out_dir / 'inspect.png'}")


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


#: ``predict --max-pixels`` default: 100 megapixels (a decoded RGB image of 300 MB, its float copy 1.2 GB)
MAX_PIXELS = 100_000_000


def _image_paths(inputs: tuple[str, ...], exclude: Optional[Path] = None) -> tuple[list[Path], list[Path]]:
    """(image files named or found in the named folders and their subfolders, each once; the files of
    those folders that were skipped as not images). Suffixes match in any case (``.JPG``); files under
    ``exclude`` (the output folder) are not inputs."""
    paths: list[Path] = []
    skipped: list[Path] = []
    skip_root = exclude.resolve() if exclude is not None else None
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            for q in sorted(p.rglob("*")):
                if not q.is_file() or any(part.startswith(".") for part in q.relative_to(p).parts):
                    continue
                if skip_root is not None and skip_root in q.resolve().parents:
                    continue
                (paths if q.suffix.lower() in IMAGE_SUFFIXES else skipped).append(q)
        elif p.is_file():
            paths.append(p)
        else:
            raise DataError(f"input not found: {item}")
    if not paths:
        raise DataError(f"no input images ({', '.join(IMAGE_SUFFIXES)}) found in {', '.join(inputs)}")
    unique = list({q.resolve(): q for q in paths}.values())
    return unique, skipped


def _skipped_line(skipped: list[Path]) -> str:
    """One line naming what a folder walk left out: counts by suffix and the first few files."""
    by_suffix: dict[str, int] = {}
    for q in skipped:
        key = q.suffix.lower() or "(no suffix)"
        by_suffix[key] = by_suffix.get(key, 0) + 1
    kinds = ", ".join(f"{k}: {n}" for k, n in sorted(by_suffix.items()))
    shown = ", ".join(str(q) for q in skipped[:5]) + (", ..." if len(skipped) > 5 else "")
    return (f"skipped {len(skipped)} file{'s' if len(skipped) != 1 else ''} that are not images predict reads "
            f"({kinds}): {shown}")


def check_pixels(paths: list[Path], max_pixels: int) -> None:
    """Every image's declared size (header only) within ``max_pixels``, before any image is decoded."""
    from .data.io import image_size

    for p in paths:
        h, w = image_size(p)
        if h * w > max_pixels:
            raise DataError(f"{p} declares {w}x{h} pixels ({h * w / 1e6:.1f} megapixels), more than --max-pixels "
                            f"{max_pixels}; decoding it needs about {h * w * 15 / 2**30:.1f} GiB (uint8 and float "
                            f"copies): pass a larger --max-pixels if this machine has the memory")


def output_stems(paths: list[Path]) -> list[Path]:
    """A distinct relative output stem per input: the path below the inputs' common folder without its
    suffix (``a/x.png`` and ``b/x.png`` -> ``a/x``, ``b/x``); inputs that would still share a stem keep
    their suffix in it (``a/x.png``, ``a/x.jpg`` -> ``a/x_png``, ``a/x_jpg``). A clash left after that
    is refused before anything is written."""
    import os

    resolved = [p.resolve() for p in paths]
    root = Path(os.path.commonpath([str(r.parent) for r in resolved]))
    rel = [r.relative_to(root) for r in resolved]
    plain = [r.with_suffix("") for r in rel]
    counts: dict[Path, int] = {}
    for s in plain:
        counts[s] = counts.get(s, 0) + 1
    stems = [s if counts[s] == 1 else s.with_name(f"{s.name}_{r.suffix.lstrip('.').lower()}") for s, r in zip(plain, rel)]
    seen: dict[Path, Path] = {}
    for stem, src in zip(stems, paths):
        if stem in seen:
            raise DataError(f"inputs {seen[stem]} and {src} would both write predictions named {stem}; rename one")
        seen[stem] = src
    return stems


@main.command("predict")
@click.argument("inputs", nargs=-1, required=True)
@click.option("--checkpoint", "-k", required=True, type=str, help="Trained checkpoint (.pth).")
@config_opt
@set_opt
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Directory for the outputs.")
@click.option("--calib", type=click.Path(exists=True, file_okay=False), default=None,
              help="Depth: a KITTI raw date folder (calib_cam_to_cam.txt, calib_velo_to_cam.txt) for the ground "
                   "embedding; KITTI-trained models also find it in a raw tree and KB-crop the images.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=MAX_PIXELS, show_default=True,
              help="Refuse an image whose header declares more pixels than this (checked before decoding).")
@_friendly
def predict_cmd(inputs: tuple[str, ...], checkpoint: str, config: Optional[str], overrides: tuple[str, ...],
                out_dir: str, calib: Optional[str], max_pixels: int) -> None:
    """Predict on image files or folders (and their subfolders); the task writes each image's files (seg:
    <name>.png, a palette PNG of class ids, and <name>_vis.png) after the evaluation's test pipeline (test
    Resize, whole/slide, TTA), at the image's own size. Names mirror the inputs' folders; nothing is
    overwritten."""
    import shutil
    import tempfile

    import torch

    from .data.io import read_image
    from .engine.evaluate import infer_outputs

    paths, skipped = _image_paths(inputs, exclude=Path(out_dir))
    stems = output_stems(paths)
    check_pixels(paths, max_pixels)
    if skipped:
        click.echo(_skipped_line(skipped))
    check_writable(Path(out_dir), f"--out {out_dir}")
    cfg, task, model, device = _checkpoint_model(checkpoint, config, overrides)
    prepare = getattr(task, "predict_sample", None)  # the task's per-image inputs (depth: KITTI calib, KB crop)
    if calib is not None and prepare is None:
        raise click.UsageError(f"--calib is for the depth task, not '{task.name}'")
    model.eval()
    out = Path(out_dir)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    # everything is written to a staging folder first and moved into place only when every image
    # succeeded and no target exists, so a failure or a clash leaves the user's files as they were
    staging = Path(tempfile.mkdtemp(prefix=".densefuse-predict-", dir=out))
    try:
        transform = task.build_transform(cfg, train=False)
        written: list[Path] = []
        with torch.no_grad():
            for path, stem in zip(paths, stems):
                sample = prepare(read_image(path), path, calib) if prepare else {"image": read_image(path)}
                image = sample["image"]
                batch = transform(_to_device(_test_sample(task, cfg, sample), device))
                # the evaluation's test pipeline, eval.mode and eval.tta; returned at the image's own size
                prediction = task.predict(infer_outputs(model, task, batch))
                (staging / stem).parent.mkdir(parents=True, exist_ok=True)
                written += task.save_prediction(prediction[0].cpu(), staging / stem, image=image)
        targets = [out / p.relative_to(staging) for p in written]
        for t in targets:
            _refuse_overwrite(str(t))
        for src, dst in zip(written, targets):
            dst.parent.mkdir(parents=True, exist_ok=True)
            src.replace(dst)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    shutil.rmtree(staging, ignore_errors=True)
    click.echo(f"wrote {len(targets)} files for {len(paths)} images to {out}")


def _test_sample(task: Any, cfg: Any, sample: dict[str, Any]) -> dict[str, Any]:
    """A batch of one sample (the image, plus what the task adds, e.g. depth's ground embedding) through the
    task's per-sample test pipeline (what the evaluation dataset applies to its samples, e.g. the keep-ratio
    test Resize recording ``ori_size``), collated."""
    from torch.utils.data import default_collate

    pipeline = task.test_pipeline(cfg)
    if pipeline is not None:
        sample = pipeline(sample)
    return default_collate([sample])


@main.command("convert")
@click.argument("checkpoint")
@config_opt
@set_opt
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The densefuse checkpoint to write (.pth).")
@_friendly
def convert_cmd(checkpoint: str, config: Optional[str], overrides: tuple[str, ...], out: str) -> None:
    """Convert an mmseg segmentor checkpoint (a model-zoo file or an mmseg 1.x training checkpoint) into a
    densefuse checkpoint of the model --config describes; ``eval``/``predict``/``inspect`` then need no
    --config. Nothing in the file is run: only the tensors of its state_dict are read."""
    import torch

    from .engine.checkpoint import save_checkpoint

    if config is None:
        raise ConfigError("convert needs --config: the densefuse config of the checkpoint's model "
                          "(docs/paper.md, 'Coming from mmseg')")
    check_out_file(out)
    state, from_mmseg = _read_checkpoint(checkpoint)
    if not from_mmseg:
        raise DensefuseError(f"{checkpoint} is not an mmseg checkpoint (no state_dict of backbone.* / decode_head.* "
                             f"tensors); a densefuse checkpoint needs no conversion")
    cfg = _checkpoint_config(checkpoint, config, overrides, state, from_mmseg)
    from .tasks import get_task

    with torch.device("cpu"):
        model = get_task(cfg["task"], cfg).build_model(cfg)
    _load_weights(model, checkpoint, state, from_mmseg)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out, {"model": model.state_dict(), "config": cfg.to_dict() if hasattr(cfg, "to_dict") else cfg})
    click.echo(f"wrote {out}")


def _csv_list(value: str, kind: type, what: str) -> list:
    try:
        return [kind(v.strip()) for v in value.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{what}: expected a comma-separated list of {kind.__name__}, got '{value}'") from None


def _config_list(configs: tuple[str, ...]) -> list[Optional[str]]:
    """``--config`` values: repeated, comma-separated, or a ``.txt`` file listing one config per line."""
    names: list[Optional[str]] = []
    for item in configs:
        for part in (p.strip() for p in item.split(",")):
            if not part:
                continue
            if part.endswith(".txt"):
                listing = Path(part)
                if not listing.is_file():
                    raise ConfigError(f"config list not found: {part}")
                names += [ln.strip() for ln in listing.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
            else:
                names.append(part)
    return names or [None]


@main.command("compare")
@task_opt
@click.option("--config", "-c", "configs", multiple=True, help="Config(s) to compare: repeat, separate by commas, or a .txt list.")
@set_opt
@click.option("--modes", default="off,explicit", show_default=True, help="Equalizer modes (first = baseline).")
@click.option("--seeds", default="0,1,2,3,4", show_default=True, help="Seeds per mode (the paper uses 5).")
@click.option("--work-dir", type=click.Path(file_okay=False), default=None,
              help="Root of the runs; finished runs there are reused (default work_dirs/<config>_compare, "
                   "or work_dirs/compare for several configs).")
@click.option("--metrics", default=None,
              help="Metrics of the table: comma-separated names, or 'all' (every metric of the task, e.g. depth's "
                   "nine of the paper's Table 5); default the task's table metrics (its primary metric).")
@click.option("--keep-checkpoints", is_flag=True, help="Keep every run's checkpoints (default: only what the table needs).")
@click.option("--progress/--no-progress", default=None, help="Progress bars (default: only on a terminal).")
@_friendly
def compare_cmd(task: Optional[str], configs: tuple[str, ...], overrides: tuple[str, ...], modes: str, seeds: str,
                work_dir: Optional[str], metrics: Optional[str], keep_checkpoints: bool, progress: Optional[bool]) -> None:
    """The paper's comparison: each config with and without scale EQ over several seeds, one table.
    Re-running with the same --work-dir reuses finished runs (add seeds or configs to extend it)."""
    from .engine.compare import compare, format_summary, members, task_tables

    mode_list, seed_list = _csv_list(modes, str, "--modes"), _csv_list(seeds, int, "--seeds")
    metric_list = metrics if metrics in (None, "all") else _csv_list(metrics, str, "--metrics")
    cfgs = [_load(c, overrides, task) for c in _config_list(configs)]
    for cfg in cfgs:
        _preflight(cfg)
    if work_dir is not None:
        check_writable(Path(work_dir))
    runs, summary = compare(cfgs, mode_list, seed_list, Path(work_dir) if work_dir else None,
                            keep_checkpoints=keep_checkpoints, progress=progress, log=click.echo, metrics=metric_list)
    click.echo(_markdown(runs))
    click.echo()
    click.echo(format_summary(summary))
    for name, table in task_tables(runs, members(cfgs)).items():  # a task's own tables (mtl: Δm)
        click.echo()
        click.echo(f"{name}:")
        click.echo(_markdown(table))


@main.command("export")
@click.option("--checkpoint", "-k", required=True, type=str, help="Trained checkpoint (.pth) to export.")
@click.option("--format", "fmt", required=True, type=click.Choice(["onnx", "torchscript", "plain"]),
              help="onnx (torch's exporter, checked with onnxruntime), torchscript (torch.jit.script) or plain "
                   "(folded state_dict of the original smp class; model.type smp only).")
@config_opt
@set_opt
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Output file (default next to the checkpoint: <name>.onnx / .torchscript.pt / .plain.pth).")
@click.option("--size", type=click.IntRange(min=32), default=128, show_default=True,
              help="Side of the square example image the export traces and checks.")
@_friendly
def export_cmd(checkpoint: str, fmt: str, config: Optional[str], overrides: tuple[str, ...], out: Optional[str],
               size: int) -> None:
    """Export a trained model to ONNX, TorchScript or a plain (equalizer-free) state_dict, and check the file
    against the eager model on one example image."""
    import torch

    from .plugins import export_file
    from .smp.attach import detach

    suffix = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "plain": ".plain.pth"}[fmt]
    target = out or str(Path(checkpoint).with_suffix(suffix))
    check_out_file(target)
    cfg, task, model, device = _checkpoint_model(checkpoint, config, overrides)
    plain = None
    if fmt == "plain":
        if cfg["model"]["type"] != "smp":
            raise DensefuseError(
                f"--format plain: {checkpoint} is a densefuse model (its equalizers are built into its Fusion "
                "modules); export it with --format onnx or torchscript"
            )
        plain = task.build_model(_without_pretrained(cfg))
        detach(plain)
    example = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    result = export_file(model.cpu(), fmt, target, example.cpu(), plain=plain)
    click.echo(f"wrote {result['file']}")
    click.echo(f"check: {result['check']} on a 1x3x{size}x{size} image: max |diff| {result['max_abs_diff']:.3g}")


if __name__ == "__main__":  # pragma: no cover
    main()
