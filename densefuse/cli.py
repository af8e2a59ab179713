"""``densefuse`` command line: train, eval, calibrate, inspect, predict, compare.

User errors (bad config, missing files, bad data) print one ``error: ...`` line and exit 2.
"""
from __future__ import annotations

import datetime as _dt
import functools
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import click

from .errors import DensefuseError


def _friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn densefuse user errors into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DensefuseError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


def _load(config: Optional[str], overrides: tuple[str, ...], task: Optional[str] = None) -> Any:
    from .config import load_config
    from .tasks import get_task

    default = get_task(task or "seg").default_config if config is None else None
    cfg = load_config(config, overrides, task_default=default)
    if task is not None and config is not None and cfg["task"] != task:
        raise DensefuseError(f"--task {task} but the config is for task '{cfg['task']}'")
    return cfg


task_opt = click.option("--task", "-t", default=None, help="Task whose default config to use when --config is not given (seg).")
def _checkpoint_model(checkpoint: str, config: Optional[str], overrides: tuple[str, ...]) -> tuple[Any, Any, Any, Any]:
    """(cfg, task, model, device) for a checkpoint; its embedded config unless ``--config`` is given."""
    from .config import from_dict
    from .engine.checkpoint import load_checkpoint, load_model_state
    from .engine.trainer import resolve_device
    from .tasks import get_task

    state = load_checkpoint(checkpoint)
    if config is None:
        if "config" not in state:
            raise DensefuseError(f"{checkpoint} has no embedded config; pass --config")
        cfg = from_dict(state["config"], overrides, source=f"{checkpoint} (embedded config)")
    else:
        cfg = _load(config, overrides)
    task = get_task(cfg["task"], cfg)
    device = resolve_device(cfg["device"])
    model = task.build_model(cfg).to(device)
    load_model_state(model, state, checkpoint)
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
    from .engine.trainer import Trainer

    cfg = _load(config, overrides, task)
    if resume and work_dir is None:
        raise DensefuseError("--resume needs --work-dir")
    trainer = Trainer(cfg, Path(work_dir) if work_dir else None, resume=resume, progress=progress)
    click.echo(f"work dir: {trainer.work_dir}")
    metrics = trainer.run()
    shown = {k: round(float(v), 2) for k, v in metrics.items() if "." not in k}
    click.echo(f"final: {shown}")


@main.command("eval")
@config_opt
@click.option("--checkpoint", "-k", required=True, type=str, help="Checkpoint (.pth) to evaluate.")
@set_opt
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Also write the metrics as CSV here.")
@_friendly
def eval_cmd(config: Optional[str], checkpoint: str, overrides: tuple[str, ...], out: Optional[str]) -> None:
    """Evaluate a checkpoint on the validation split. Without --config, the checkpoint's own config is used."""
    import pandas as pd

    from .data.loader import build_loader
    from .engine.trainer import evaluate

    cfg, task, model, device = _checkpoint_model(checkpoint, config, overrides)
    data = task.build_dataset(cfg, cfg["data"]["val_split"])
    loader = build_loader(data, cfg["eval"]["batch_size"], train=False, num_workers=cfg["data"]["num_workers"], seed=cfg["seed"])
    metrics = evaluate(model, task, loader, task.build_transform(cfg, train=False), device)
    scalars = {k: float(v) for k, v in metrics.items()}
    click.echo(pd.DataFrame([{k: v for k, v in scalars.items() if "." not in k}]).to_markdown(index=False, floatfmt=".2f"))
    if out:
        _refuse_overwrite(out)
        pd.DataFrame([scalars]).to_csv(out, index=False)


def _refuse_overwrite(path: str) -> None:
    if Path(path).exists():
        raise DensefuseError(f"{path} already exists; not overwriting it")


def _model_and_data(cfg: Any, num_images: Optional[int]) -> tuple[Any, Callable[[int], Any], int]:
    """The model of ``cfg``, a function ``seed -> calibration batches`` and the number of images to use."""
    from .engine.trainer import calibration_batches, resolve_device, seed_everything
    from .tasks import get_task

    seed_everything(cfg["seed"])
    task = get_task(cfg["task"], cfg)
    device = resolve_device(cfg["device"])
    model = task.build_model(cfg).to(device)
    data = task.build_dataset(cfg, cfg["data"]["train_split"])
    n = num_images or cfg["calibration"]["num_images"] or len(data)
    return model, lambda seed: calibration_batches(task, cfg, data, device, seed), n


def _stamp() -> str:
    return _dt.datetime.now().strftime("%Y%m%d_%H%M%S")


@main.command("calibrate")
@task_opt
@config_opt
@set_opt
@click.option("--num-images", type=int, default=None, help="Images to calibrate on (default calibration.num_images).")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="CSV path (default work_dirs/<config>/calibration-<time>.csv).")
@_friendly
def calibrate_cmd(task: Optional[str], config: Optional[str], overrides: tuple[str, ...], num_images: Optional[int],
                  out: Optional[str]) -> None:
    """Measure the per-branch mean/std at every fusion site and print the calibration table."""
    from .equalizer import calibrate
    from .tasks import get_task

    cfg = _load(config, overrides, task)
    model, batches, n = _model_and_data(cfg, num_images)
    table = calibrate(model, batches(cfg["seed"]), num_images=n, forward=get_task(cfg["task"], cfg).forward)
    click.echo(table.to_markdown(index=False, floatfmt=".4f"))
    path = Path(out) if out else Path(cfg.get("work_dir") or "work_dirs") / cfg["name"] / f"calibration-{_stamp()}.csv"
    _refuse_overwrite(str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=False)
    click.echo(f"wrote {path}")


@main.command("inspect")
@task_opt
@config_opt
@set_opt
@click.option("--checkpoint", "-k", default=None, help="Inspect a trained checkpoint instead of the initial model.")
@click.option("--num-images", type=int, default=None, help="Images to measure on (default calibration.num_images).")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Output dir (default work_dirs/<config>/inspect-<time>).")
@_friendly
def inspect_cmd(task: Optional[str], config: Optional[str], overrides: tuple[str, ...], checkpoint: Optional[str],
                num_images: Optional[int], out: Optional[str]) -> None:
    """Per fusion site, the std of every concat subject before and after equalization (table + PNG)."""
    from .engine.checkpoint import load_checkpoint, load_model_state
    from .equalizer import calibrate, equalizers, measure
    from .report import plot_inspection
    from .tasks import get_task

    cfg = _load(config, overrides, task)
    task_obj = get_task(cfg["task"], cfg)
    model, batches, n = _model_and_data(cfg, num_images)
    if checkpoint:
        load_model_state(model, load_checkpoint(checkpoint), checkpoint)
    eqs = [eq for _, eq in equalizers(model)]
    if not all(eq._is_calibrated for eq in eqs):
        calibrate(model, batches(cfg["seed"]), num_images=n, forward=task_obj.forward)
    for eq in eqs:  # show what equalization does even for a baseline (mode off) config
        if eq.mode == "off":
            eq.set_mode("explicit")
    # other images than the calibration's
    table = measure(model, batches(cfg["seed"] + 1), num_images=n, forward=task_obj.forward)
    cols = ["site", "branch", "channels", "ratio_h", "std", "std_after", "mean", "mean_after"]
    click.echo(table[cols].to_markdown(index=False, floatfmt=".3f"))
    for site, g in table.groupby("site", sort=False):
        click.echo(f"{site}: std max/min before {g['std'].max() / g['std'].min():.2f}, "
                   f"after {g['std_after'].max() / g['std_after'].min():.2f}")
    out_dir = Path(out) if out else Path(cfg.get("work_dir") or "work_dirs") / cfg["name"] / f"inspect-{_stamp()}"
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("inspect.csv", "inspect.png"):
        _refuse_overwrite(str(out_dir / name))
    table.to_csv(out_dir / "inspect.csv", index=False)
    plot_inspection(table, out_dir / "inspect.png")
    click.echo(f"wrote {out_dir / 'inspect.csv'} and {out_dir / 'inspect.png'}")


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _image_paths(inputs: tuple[str, ...]) -> list[Path]:
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            paths += sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            paths.append(p)
        else:
            raise DensefuseError(f"input not found: {item}")
    if not paths:
        raise DensefuseError("no input images found")
    return paths


@main.command("predict")
@click.argument("inputs", nargs=-1, required=True)
@click.option("--checkpoint", "-k", required=True, type=str, help="Trained checkpoint (.pth).")
@config_opt
@set_opt
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Directory for the outputs.")
@_friendly
def predict_cmd(inputs: tuple[str, ...], checkpoint: str, config: Optional[str], overrides: tuple[str, ...],
                out_dir: str) -> None:
    """Predict on image files or folders: <name>.png (class ids / prediction) and <name>_vis.png per image."""
    import numpy as np
    import torch
    from PIL import Image

    from .data.io import read_image
    from .engine.trainer import to_device

    paths = _image_paths(inputs)
    cfg, task, model, device = _checkpoint_model(checkpoint, config, overrides)
    model.eval()
    out = Path(out_dir)
    targets = [(out / f"{p.stem}.png", out / f"{p.stem}_vis.png") for p in paths]
    for pair in targets:
        for t in pair:
            _refuse_overwrite(str(t))
    out.mkdir(parents=True, exist_ok=True)
    transform = task.build_transform(cfg, train=False)
    with torch.no_grad():
        for path, (pred_path, vis_path) in zip(paths, targets):
            batch = transform(to_device({"image": read_image(path)[None]}, device))
            pred = task.predict(task.forward(model, batch))
            vis = task.visualize(batch, pred)[0].permute(1, 2, 0).cpu().numpy()
            Image.fromarray(vis).save(vis_path)
            p = pred[0].squeeze(0).cpu()
            if p.dtype.is_floating_point or int(p.max()) > 255:  # e.g. depth: 16-bit PNG in 1/256 units
                Image.fromarray((p.float() * 256).clamp(0, 65535).numpy().astype(np.uint16)).save(pred_path)
            else:
                Image.fromarray(p.numpy().astype(np.uint8)).save(pred_path)
    click.echo(f"wrote {2 * len(paths)} files to {out}")


def _csv_list(value: str, kind: type) -> list:
    try:
        return [kind(v.strip()) for v in value.split(",") if v.strip()]
    except ValueError:
        raise DensefuseError(f"expected a comma-separated list of {kind.__name__}, got '{value}'") from None


@main.command("compare")
@task_opt
@config_opt
@set_opt
@click.option("--modes", default="off,explicit", show_default=True, help="Equalizer modes to compare (first = baseline).")
@click.option("--seeds", default="0,1,2", show_default=True, help="Seeds per mode.")
@click.option("--work-dir", type=click.Path(file_okay=False), default=None, help="Root of the runs (default work_dirs/<config>_compare).")
@click.option("--progress/--no-progress", default=None, help="Progress bars (default: only on a terminal).")
@_friendly
def compare_cmd(task: Optional[str], config: Optional[str], overrides: tuple[str, ...], modes: str, seeds: str,
                work_dir: Optional[str], progress: Optional[bool]) -> None:
    """The paper's comparison: the same model with and without scale EQ over several seeds, one table."""
    from .engine.compare import compare, format_summary

    cfg = _load(config, overrides, task)
    runs, summary = compare(cfg, _csv_list(modes, str), _csv_list(seeds, int), Path(work_dir) if work_dir else None,
                            progress=progress, log=click.echo)
    click.echo(runs.to_markdown(index=False, floatfmt=".2f"))
    click.echo()
    click.echo(format_summary(summary))


if __name__ == "__main__":  # pragma: no cover
    main()
