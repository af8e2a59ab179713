"""``densefuse`` command line: train, eval, calibrate, inspect, predict, convert, compare, export.

User errors (bad config, missing files, bad data) print one ``error: ...`` line and exit 2.
"""
from __future__ import annotations

import functools
import re
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import click

from .engine.calibrate import CalibrationRun
from .engine.compare import format_metrics, markdown_table
from .engine.configs import build_everything, checkpoint_config, load_run_config, without_pretrained
from .engine.predict import MAX_PIXELS, check_pixels, image_paths, output_stems, skipped_line, write_predictions
from .engine.runtime import check_out_file, check_writable, default_work_dir, refuse_overwrite
from .engine.state import build_checkpoint_model, load_model_weights, read_model_checkpoint
from .engine.usage import OneLineUsageErrors
from .errors import ConfigError, DataError, DensefuseError

#: terminal colour/control sequences (PyTorch colours parts of its load errors)
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


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
            click.echo(f"error: {_ANSI.sub('', str(e))}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


task_opt = click.option("--task", "-t", default=None, help="Task whose default config to use when --config is not given (seg).")


config_opt = click.option("--config", "-c", "config", type=str, default=None, help="YAML config file (or name under configs/).")
set_opt = click.option("--set", "-s", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key (repeatable).")


@click.group(cls=OneLineUsageErrors, context_settings={"help_option_names": ["-h", "--help"]})
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

    cfg = load_run_config(config, overrides, task)
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

    cfg = load_run_config(config, overrides, task, weights=False)
    data = cfg["data"]
    show = sys.stderr.isatty()
    reports = check_splits(get_task(cfg["task"], cfg), cfg, splits or (data["train_split"], data["val_split"]), threads,
                           progress=(lambda name, done, total: click.echo(f"{name}: {done}/{total}", err=True)) if show else None)
    for report in reports:
        click.echo("\n".join(report.lines()))
    bad = sum(len(r.bad) + len(r.missing) for r in reports)
    if bad:
        raise DataError(f"{bad} bad samples (listed above); fix or remove the files, or train with data.skip_bad=true")


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
    state, from_mmseg = read_model_checkpoint(checkpoint)
    cfg = checkpoint_config(checkpoint, config, overrides, state, from_mmseg)
    task, model, device = build_checkpoint_model(cfg, checkpoint, state, from_mmseg, log=click.echo)
    data = task.build_dataset(cfg, cfg["data"]["val_split"])
    loader = build_loader(data, cfg["eval"]["batch_size"], train=False, num_workers=cfg["data"]["num_workers"], seed=cfg["seed"])
    from .engine.runtime import out_of_memory_hint
    from .engine.trainer import eval_memory_settings

    with out_of_memory_hint(f"evaluating {checkpoint} on {device}", eval_memory_settings(cfg)):
        summary, tables = evaluate_full(model, task, loader, task.build_transform(cfg, train=False), device)
    click.echo(markdown_table(pd.DataFrame([summary])))
    if out:
        base = Path(out)
        paths = {name: base.with_name(f"{base.stem}_{name}.csv") for name in tables}
        for p in paths.values():
            refuse_overwrite(str(p))
        base.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame([summary]).to_csv(base, index=False)
        for name, table in tables.items():
            table.to_csv(paths[name], index=False)
        click.echo(f"wrote {', '.join(str(p) for p in [base, *paths.values()])}")


def _check_num_images(num_images: Optional[int]) -> None:
    if num_images is not None and num_images < 1:
        raise ConfigError(f"--num-images must be at least 1, got {num_images}")


num_images_opt = click.option("--num-images", type=int, default=None, help="Images to use (default calibration.num_images).")
progress_opt = click.option("--progress/--no-progress", default=None,
                            help="Progress bar of the calibration passes (default: only on a terminal).")


@main.command("calibrate")
@task_opt
@config_opt
@set_opt
@num_images_opt
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="CSV path (default work_dirs/<config>/calibration-<time>.csv).")
@progress_opt
@_friendly
def calibrate_cmd(task: Optional[str], config: Optional[str], overrides: tuple[str, ...], num_images: Optional[int],
                  out: Optional[str], progress: Optional[bool]) -> None:
    """Measure the per-branch mean/std at every fusion site and print the calibration table."""
    cfg = load_run_config(config, overrides, task)
    path = Path(out) if out else default_work_dir(cfg, "{name}/calibration-{time}.csv")
    check_out_file(path)
    _check_num_images(num_images)
    table = CalibrationRun(cfg, num_images, progress).calibrate()
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
@progress_opt
@_friendly
def inspect_cmd(task: Optional[str], config: Optional[str], overrides: tuple[str, ...], checkpoint: Optional[str],
                num_images: Optional[int], out: Optional[str], progress: Optional[bool]) -> None:
    """Per fusion site, the std of every concat subject before and after equalization (table + PNG)."""
    from .calibration import equalizers
    from .report import plot_inspection

    if checkpoint:  # built from the checkpoint's own config (a depth run's, ...) unless --config is given
        state, from_mmseg = read_model_checkpoint(checkpoint)
        cfg = checkpoint_config(checkpoint, config, overrides, state, from_mmseg)
    else:
        cfg = load_run_config(config, overrides, task)
    out_dir = Path(out) if out else default_work_dir(cfg, "{name}/inspect-{time}")
    for name in ("inspect.csv", "inspect.png"):
        refuse_overwrite(out_dir / name)
    check_writable(out_dir, f"--out {out_dir}")
    _check_num_images(num_images)
    run = CalibrationRun(cfg, num_images, progress)
    if checkpoint:
        load_model_weights(run.model, checkpoint, state, from_mmseg, log=click.echo)
    eqs = [eq for _, eq in equalizers(run.model)]
    if not all(eq._is_calibrated for eq in eqs):
        run.calibrate()
    for eq in eqs:  # show what equalization does even for a baseline (mode off) config
        if eq.mode == "off":
            eq.set_mode("explicit")
    table = run.measure()
    cols = [c for c in ["site", "branch", "channels", "ratio_h", "std", "std_after", "mean", "mean_after"] if c in table]
    click.echo(table[cols].to_markdown(index=False, floatfmt=".3f"))
    for site, g in table.groupby("site", sort=False):
        click.echo(f"{site}: std max/min before {g['std'].max() / g['std'].min():.2f}, "
                   f"after {g['std_after'].max() / g['std_after'].min():.2f}")
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_dir / "inspect.csv", index=False)
    plot_inspection(table, out_dir / "inspect.png")
    click.echo(f"wrote {out_dir / 'inspect.csv'} and {out_dir / 'inspect.png'}")


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
    paths, skipped = image_paths(inputs, exclude=Path(out_dir))
    stems = output_stems(paths)
    check_pixels(paths, max_pixels)
    if skipped:
        click.echo(skipped_line(skipped))
    check_writable(Path(out_dir), f"--out {out_dir}")
    state, from_mmseg = read_model_checkpoint(checkpoint)
    cfg = checkpoint_config(checkpoint, config, overrides, state, from_mmseg)
    task, model, device = build_checkpoint_model(cfg, checkpoint, state, from_mmseg, log=click.echo)
    if calib is not None and not task.predict_calib:  # the task's per-image inputs (depth)
        raise click.UsageError(f"--calib is for the depth task, not '{task.name}'")
    written = write_predictions(task, cfg, model, device, paths, stems, Path(out_dir), calib)
    click.echo(f"wrote {len(written)} files for {len(paths)} images to {Path(out_dir)}")


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

    from .engine.state import save_checkpoint

    if config is None:
        raise ConfigError("convert needs --config: the densefuse config of the checkpoint's model "
                          "(docs/paper.md, 'Coming from mmseg')")
    check_out_file(out)
    state, from_mmseg = read_model_checkpoint(checkpoint)
    if not from_mmseg:
        raise DensefuseError(f"{checkpoint} is not an mmseg checkpoint (no state_dict of backbone.* / decode_head.* "
                             f"tensors); a densefuse checkpoint needs no conversion")
    cfg = checkpoint_config(checkpoint, config, overrides, state, from_mmseg)
    from .tasks import get_task

    with torch.device("cpu"):
        model = get_task(cfg["task"], cfg).build_model(cfg)
    load_model_weights(model, checkpoint, state, from_mmseg, log=click.echo)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out, {"model": model.state_dict(), "config": cfg.to_dict()})
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
    cfgs = [load_run_config(c, overrides, task) for c in _config_list(configs)]
    for cfg in cfgs:
        build_everything(cfg)
    if work_dir is not None:
        check_writable(Path(work_dir))
    runs, summary = compare(cfgs, mode_list, seed_list, Path(work_dir) if work_dir else None,
                            keep_checkpoints=keep_checkpoints, progress=progress, log=click.echo, metrics=metric_list)
    click.echo(markdown_table(runs))
    click.echo()
    click.echo(format_summary(summary))
    for name, table in task_tables(runs, members(cfgs)).items():  # a task's own tables (mtl: Δm)
        click.echo()
        click.echo(f"{name}:")
        click.echo(markdown_table(table))


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
    state, from_mmseg = read_model_checkpoint(checkpoint)
    cfg = checkpoint_config(checkpoint, config, overrides, state, from_mmseg)
    task, model, device = build_checkpoint_model(cfg, checkpoint, state, from_mmseg, log=click.echo)
    plain = None
    if fmt == "plain":
        if cfg["model"]["type"] != "smp":
            raise DensefuseError(
                f"--format plain: {checkpoint} is a densefuse model (its equalizers are built into its Fusion "
                "modules); export it with --format onnx or torchscript"
            )
        plain = task.build_model(without_pretrained(cfg))
        detach(plain)
    example = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    result = export_file(model.cpu(), fmt, target, example.cpu(), plain=plain)
    click.echo(f"wrote {result['file']}")
    click.echo(f"check: {result['check']} on a 1x3x{size}x{size} image: max |diff| {result['max_abs_diff']:.3g}")


if __name__ == "__main__":  # pragma: no cover
    main()
