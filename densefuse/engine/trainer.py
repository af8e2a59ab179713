"""Iteration-based trainer (mmseg's IterBasedTrainLoop, without the indirection); it only sequences
the parts: :mod:`.runtime` (seeds, RNG, work dir), :mod:`.distributed` (torchrun, SyncBN, DDP),
:mod:`.step` (AMP, accumulation, clipping), :mod:`.state` (checkpoints), :mod:`.evaluate` and
:mod:`.logger`.

Before step 0: build the datasets and the model before the run directory is created (a user error in
them, such as a bad pretrained file or a missing dataset folder, leaves nothing behind), run the
evaluation path once on the hardest validation samples (:mod:`.preflight`), convert BN to SyncBN (``model.sync_bn``; default on with more than one
process), calibrate the scale equalizers on training images (once, statistics all-reduced, identical on
every rank; not again on resume: they are in the state_dict), fold when the mode is ``fold``, then wrap
in DDP (and ``torch.compile`` when ``train.compile``).
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..calibration import calibrate, equalizers, fold
from ..config.loader import dump
from ..config.sections import CoreConfig
from ..data.check import SkipBad, check_dataset, reads_files, verify_default
from ..data.loader import build_loader
from ..errors import ConfigError, DataError
from ..tasks import Task, get_task
from . import distributed as dist
from .evaluate import evaluate, evaluate_full, summary_only
from .logger import RunLogger, check_tensorboard
from .optim import build_optimizer, build_scheduler
from .preflight import preflight_evaluation
from .runtime import (
    WorkDir,
    capture_rng,
    default_work_dir,
    out_of_memory_hint,
    resolve_device,
    restore_rng,
    seed_everything,
    to_device,
)
from .state import Checkpointer, load_model_state
from .step import NonFiniteError, TrainStep, check_amp, check_compile, nonfinite_tensors

__all__ = ["Trainer", "calibration_batches", "evaluate", "evaluate_full", "resolve_device", "seed_everything",
           "to_device"]


def calibration_batches(task: Task, cfg: Mapping[str, Any], dataset: Dataset, device: torch.device,
                        seed: Optional[int] = None, min_batch: int = 2) -> Iterator[dict[str, Any]]:
    """Training images, normalized but not augmented (Algorithm 1 iterates over the training set), in
    a seeded shuffled order. Under torch.distributed each rank takes its shard with ``batch_size / world``
    images per batch, so the ranks together see the single-process batches. At least ``min_batch`` per
    batch (BN runs in train mode; 1 is enough with SyncBN across ranks)."""
    c = cfg["calibration"]
    per_rank = max(min_batch, math.ceil(c["batch_size"] / dist.world_size()))
    loader = build_loader(dataset, per_rank, train=True, num_workers=cfg["data"]["num_workers"],
                          seed=cfg["seed"] if seed is None else seed)
    tf = task.build_transform(cfg, train=False)
    return (tf(to_device(b, device)) for b in loader)


def with_progress(batches: Iterable[Mapping[str, Any]], total: int, desc: str) -> Iterator[Mapping[str, Any]]:
    """``batches`` with a progress bar counting their images up to ``total`` (calibration, like training's bar)."""
    from tqdm import tqdm

    # redrawn at every batch (a calibration pass has tens of batches, each far slower than a redraw), so the
    # bar shows the count the pass reached however fast it went
    with tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, leave=False, mininterval=0) as bar:
        for batch in batches:  # counted as it is handed out: the consumer may stop after the last one
            bar.update(min(int(batch["image"].shape[0]), total - bar.n))
            yield batch


def check_train_config(cfg: Mapping[str, Any], device: torch.device) -> None:
    """Value checks of the ``train`` keys this engine reads, before any work starts."""
    tc = cfg["train"]
    check_amp(tc["amp"], device)
    check_compile(tc["compile"])
    check_tensorboard(bool(tc["tensorboard"]))
    for key, low in (("iters", 1), ("batch_size", 1), ("accum_steps", 1), ("log_interval", 1),
                     ("val_interval", 1), ("ckpt_interval", 1), ("keep_last", 0)):
        if int(tc[key]) < low:
            raise ConfigError(f"train.{key} must be >= {low}, got {tc[key]}")
    if int(tc["nonfinite_limit"]) < 0:
        raise ConfigError(f"train.nonfinite_limit must be >= 0, got {tc['nonfinite_limit']}")
    if float(tc["dist_timeout"]) <= 0:
        raise ConfigError(f"train.dist_timeout must be > 0 seconds, got {tc['dist_timeout']}")


def eval_memory_settings(cfg: Mapping[str, Any]) -> str:
    """The settings that size evaluation's memory, with their values (for an out-of-memory line)."""
    ev = cfg["eval"]
    if ev["mode"] == "slide":
        return (f"eval.slide_batch (now {ev['slide_batch']}) or eval.crop_size (now {ev['crop_size']}) "
                f"(eval.mode slide, eval.batch_size {ev['batch_size']})")
    return (f"eval.batch_size (now {ev['batch_size']}), or use eval.mode=slide with an eval.crop_size "
            "(eval.mode is whole)")


class Trainer:
    """Trains ``cfg`` in ``work_dir``. ``progress=None`` shows a progress bar only on a TTY.

    Under torchrun (``WORLD_SIZE`` > 1 in the environment) the constructor joins the process group
    (NCCL on GPUs, gloo on CPU); rank 0's work dir is used by every rank.
    """

    def __init__(
        self,
        cfg: CoreConfig,
        work_dir: Optional[Path] = None,
        resume: bool = False,
        progress: Optional[bool] = None,
        log: Callable[[str], None] = print,
    ) -> None:
        self.cfg = cfg
        self.resume = resume
        self.task = get_task(cfg["task"], cfg)
        self.device = resolve_device(cfg["device"])
        check_train_config(cfg, self.device)
        self._owns_group = dist.init_from_env(self.device.type, float(cfg["train"]["dist_timeout"]))
        if dist.is_distributed() and self.device.type == "cuda":
            self.device = torch.device("cuda", dist.local_rank())
        wd = Path(work_dir) if work_dir is not None else default_work_dir(cfg)
        self.work_dir = Path(dist.broadcast_object(str(wd)))
        self.progress = (sys.stderr.isatty() if progress is None else progress) and dist.is_main()
        self._print = log

    # ------------------------------------------------------------------ the run
    def run(self) -> dict[str, float]:
        """Train to ``train.iters`` and return the last evaluation's metrics."""
        try:
            model, train_set, val_set = self._build()  # before the run dir: a user error in them leaves none
            wd = WorkDir(self.work_dir)
            try:
                dist.on_main(lambda: wd.open(self.cfg, self.resume))
                if dist.is_main():
                    self._print(f"work dir: {self.work_dir}")
                with RunLogger(self.work_dir, dist.is_main(), self.progress, self._print,
                               bool(self.cfg["train"]["tensorboard"])) as logger:
                    return self._run(logger, model, train_set, val_set)
            finally:
                wd.close()
        finally:
            if self._owns_group:
                dist.shutdown()

    def _run(self, logger: RunLogger, model: nn.Module, train_set: Dataset, val_set: Dataset) -> dict[str, float]:
        cfg, task, dev, tc = self.cfg, self.task, self.device, self.cfg["train"]
        ckpt = Checkpointer(self.work_dir, tc["keep_last"])
        source = Path(dist.on_main(lambda: str(ckpt.resume_source(logger.info)))) if self.resume else ckpt.latest
        state = dist.on_main(lambda: ckpt.load_latest("cpu", self.cfg.to_dict(), source)) if self.resume else None
        if state is not None and int(state.get("world_size", 1)) != dist.world_size():
            raise ConfigError(f"{source} was trained with {state.get('world_size', 1)} processes; "
                              f"resume it with as many (now {dist.world_size()})")
        if state is not None and dist.is_main() and not (self.work_dir / "config.yaml").exists():
            dump(state["config"], self.work_dir / "config.yaml")
            logger.info(f"config.yaml was missing from {self.work_dir}; restored it from {source}")
        logger.info(f"seed {cfg['seed']}, {dist.world_size()} process(es), device {dev.type}, amp {tc['amp']}, "
                    f"SyncBN {'on' if self._synced_bn() else 'off'}", echo=False)
        if state is not None:
            load_model_state(model, state, source)
        else:
            self._calibrate(model, train_set, logger)
        optimizer = build_optimizer(model, cfg["optim"])
        scheduler = build_scheduler(optimizer, cfg["schedule"], tc["iters"])
        train_model = dist.wrap_ddp(model, dev)
        backend = check_compile(tc["compile"])
        if backend is not None:  # checkpoints keep saving ``model``: no ``_orig_mod.`` prefixes
            train_model = torch.compile(train_model, backend=backend)
        step = TrainStep(train_model, task, optimizer, scheduler, dev, tc["amp"], tc["grad_clip"], tc["channels_last"],
                         tc["nonfinite"])
        loop = _Loop.fresh()
        if state is None:
            seed_everything(cfg["seed"] + dist.rank())  # different augmentation per rank
        else:
            step.load_state_dict(state)
            loop = _Loop(**state["loop"])
            restore_rng(state["rng"][dist.rank()])
            logger.info(f"resumed from iteration {loop.iter}")
        return self._loop(model, step, loop, ckpt, logger, train_set, val_set)

    def _loop(self, model: nn.Module, step: TrainStep, loop: "_Loop", ckpt: Checkpointer, logger: RunLogger,
              train_set: Dataset, val_set: Dataset) -> dict[str, float]:
        """Steps, periodic evaluation and checkpoints; ``model`` is the plain module, ``step`` holds the
        DDP/compiled one."""
        cfg, task, dev, tc = self.cfg, self.task, self.device, self.cfg["train"]
        train_tf, eval_tf = task.build_transform(cfg, train=True), task.build_transform(cfg, train=False)
        val_loader = self._loader(val_set, cfg["eval"]["batch_size"], train=False)
        accum, total = int(tc["accum_steps"]), int(tc["iters"])
        batches = iter(self._loader(train_set, tc["batch_size"], train=True, start_iter=loop.iter * accum))
        images_per_iter = tc["batch_size"] * accum * dist.world_size()
        t_start, elapsed_before = time.time(), loop.elapsed
        model.train()
        logger.start(loop.iter, total)
        for it in range(loop.iter, total):
            with out_of_memory_hint(f"at training iteration {it + 1} on {dev}", self._train_memory_settings()):
                loss, parts = step([train_tf(to_device(next(batches), dev)) for _ in range(accum)], it)
            done = loop.iter = it + 1
            if step.skipped is None:
                loop.add({"loss": loss, **parts})
            else:
                self._skipped(loop, step.skipped, logger)
            report = done % tc["log_interval"] == 0 or done == total
            shown = dist.all_reduce_mean([loss])[0] if report else loss
            logger.iteration(done, shown, step.lr(), images_per_iter, report)
            loop.elapsed = elapsed_before + time.time() - t_start
            if done % tc["val_interval"] == 0 or done % tc["ckpt_interval"] == 0 or done == total:
                self._check_finite(model, done, ckpt)
            if done % tc["val_interval"] == 0 or done == total:
                self._evaluate(model, loop, step, val_loader, eval_tf, ckpt, logger)
            if done % tc["ckpt_interval"] == 0 or done == total:
                self._save(model, step, loop, ckpt)
        logger.close()
        if dist.is_main():
            ckpt.save_weights("final.pth", self._weights(model, loop))
            self._save_predictions(model, val_loader, eval_tf)
        self._summary(loop, logger)
        return dict(loop.metrics)

    # ------------------------------------------------------------------ parts of the run
    def _skipped(self, loop: "_Loop", why: str, logger: RunLogger) -> None:
        """Count a step dropped by ``train.nonfinite: skip``; stop past ``train.nonfinite_limit``."""
        loop.skipped += 1
        limit = int(self.cfg["train"]["nonfinite_limit"])
        logger.info(f"iteration {loop.iter}: {why}; step skipped ({loop.skipped} so far, train.nonfinite_limit {limit})")
        if loop.skipped > limit:
            raise NonFiniteError(f"{loop.skipped} steps had a non-finite loss or gradient (the last at iteration "
                                 f"{loop.iter}), more than train.nonfinite_limit={limit}; stopped, the last checkpoint "
                                 "is the last finite state; lower optim.lr or set train.grad_clip")

    def _check_finite(self, model: nn.Module, iteration: int, ckpt: Checkpointer) -> None:
        """Refuse to evaluate or save weights (parameters and buffers) holding an inf or nan."""
        bad = nonfinite_tensors(model.state_dict())
        if bad:
            kept = ckpt.newest_intact()
            where = f"the last finite checkpoint is {kept}" if kept else "no checkpoint was written"
            raise NonFiniteError(f"the weights became non-finite by iteration {iteration} ({len(bad)} tensors, e.g. "
                                 f"{bad[0]}); nothing was evaluated or saved, {where}")

    def _build(self) -> tuple[nn.Module, Dataset, Dataset]:
        """The model (loading its pretrained file) and the training and validation datasets (indexing and
        checking their files), from the run's seed: identical on every rank."""
        seed_everything(self.cfg["seed"])
        data = self.cfg["data"]
        train_set = self.task.build_dataset(self.cfg, data["train_split"])
        val_set = self.task.build_dataset(self.cfg, data["val_split"])
        train_set = self._verify(train_set, val_set)
        model = self._build_model()
        preflight_evaluation(model, self.task, val_set, self.cfg, self.device, check_amp(self.cfg["train"]["amp"], self.device))
        # the optimizer's and schedule's own checks (param-wise rules, ...) also come before the run dir;
        # the ones used are built after calibration, which may fold new weights into the model
        build_scheduler(build_optimizer(model, self.cfg["optim"]), self.cfg["schedule"], self.cfg["train"]["iters"])
        return model, train_set, val_set

    def _verify(self, train_set: Dataset, val_set: Dataset) -> Dataset:
        """``data.verify``: read every sample first (rank 0) and stop on a bad one, naming it, or with
        ``data.skip_bad`` replace the bad training samples deterministically (:class:`SkipBad`)."""
        data = self.cfg["data"]
        verify = data["verify"]
        if verify is None:  # generated data (no files) is not read twice
            verify = reads_files(train_set) and verify_default([len(train_set), len(val_set)])  # type: ignore[arg-type]
        known: list[int] = []
        if verify:
            names = (f"{data['type']} {data['train_split']}", f"{data['type']} {data['val_split']}")
            reports = dist.on_main(lambda: [check_dataset(train_set, names[0]), check_dataset(val_set, names[1])])
            train_report, val_report = reports  # type: ignore[misc]
            if dist.is_main():
                for r in reports:  # type: ignore[union-attr]
                    self._print(f"data.verify: {r.lines()[0]}")
            bad = [f"{names[1]}: {m}" for m in val_report.bad.values()]
            if not data["skip_bad"]:
                bad += [f"{names[0]}: {m}" for m in train_report.bad.values()]
            if bad:
                shown = "; ".join(bad[:3]) + ("; ..." if len(bad) > 3 else "")
                raise DataError(f"data.verify found {len(bad)} bad samples ({shown}); `densefuse check-data` lists "
                                "them all; fix the files, or set data.skip_bad=true to train without the training ones")
            known = sorted(train_report.bad)
            if known and dist.is_main():
                self._print(f"data.skip_bad: {len(known)} bad training samples are replaced by the next readable one: "
                            + "; ".join(train_report.bad[i] for i in known[:5]) + ("; ..." if len(known) > 5 else ""))
        return SkipBad(train_set, known) if data["skip_bad"] else train_set

    def _build_model(self) -> nn.Module:
        cfg, dev = self.cfg, self.device
        model = self.task.build_model(cfg).to(dev)
        if self._synced_bn():
            model = dist.convert_sync_batchnorm(model, dev.type)
        if cfg["train"]["channels_last"]:
            model = model.to(memory_format=torch.channels_last)
        return model

    def _synced_bn(self) -> bool:
        return dist.use_sync_bn(self.cfg["model"]["sync_bn"])

    def _calibrate(self, model: nn.Module, dataset: Dataset, logger: RunLogger) -> Optional[pd.DataFrame]:
        """Calibrate every equalizer on training images (normalized, not augmented) and fold if asked."""
        eqs = list(equalizers(model))
        if not eqs or all(eq.mode == "off" for _, eq in eqs):
            return None
        n = self.cfg["calibration"]["num_images"] or len(dataset)
        logger.info(f"calibrating {len(eqs)} fusion sites on {n} training images", echo=not self.progress)
        t0 = time.time()
        min_batch = 1 if self._synced_bn() else 2
        # a function, not a generator: chained fusion sites take one pass each over the same images, and a
        # generator would have to be held in memory between passes
        per_rank = math.ceil(n / dist.world_size())
        passes = [0]

        def batches() -> Iterator[dict[str, Any]]:
            passes[0] += 1
            stream = calibration_batches(self.task, self.cfg, dataset, self.device, min_batch=min_batch)
            return with_progress(stream, per_rank, f"calibrate (pass {passes[0]})") if self.progress else stream

        table = calibrate(model, batches, num_images=per_rank, forward=self.task.forward)
        if dist.is_main():
            table.to_csv(self.work_dir / "calibration.csv", index=False)
        logger.info(f"calibrated {len(eqs)} fusion sites on {n} images in {time.time() - t0:.1f}s -> calibration.csv")
        if any(eq.mode == "fold" for _, eq in eqs):
            fold(model)
            logger.info("folded the equalizers into the fusion convs (Algorithm 1)")
        return table

    def _loader(self, dataset: Dataset, batch_size: int, train: bool, start_iter: int = 0) -> DataLoader:
        return build_loader(dataset, batch_size, train=train, num_workers=self.cfg["data"]["num_workers"],
                            seed=self.cfg["seed"], start_iter=start_iter)

    def _train_memory_settings(self) -> str:
        cfg = self.cfg
        return (f"train.batch_size (now {cfg['train']['batch_size']}) or data.crop_size (now "
                f"{list(cfg['data']['crop_size'])}), or use train.accum_steps to keep the effective batch")

    def _evaluate(self, model: nn.Module, loop: "_Loop", step: TrainStep, loader: Iterable[Mapping[str, Any]],
                  transform: Callable[[dict], dict], ckpt: Checkpointer, logger: RunLogger) -> None:
        with out_of_memory_hint(f"evaluating at iteration {loop.iter} on {self.device}", eval_memory_settings(self.cfg)):
            metrics, tables = evaluate_full(model, self.task, loader, transform, self.device, step.dtype)
        loop.metrics = metrics
        summary = summary_only(metrics)
        means = loop.take_means()
        row = {"iter": loop.iter, "lr": step.lr(), "time_s": round(loop.elapsed, 2), **means, **summary}
        loop.history.append(row)
        logger.evaluation(loop.iter, loop.history, tables)
        value = summary.get(self.task.primary_metric)
        if value is not None and math.isfinite(value) and self.task.is_better(value, loop.best):
            loop.best, loop.best_iter = value, loop.iter
            if dist.is_main():
                ckpt.save_weights("best.pth", self._weights(model, loop))

    def _weights(self, model: nn.Module, loop: "_Loop") -> dict[str, Any]:
        return {"model": model.state_dict(), "iter": loop.iter, "config": self.cfg.to_dict(),
                "metrics": summary_only(loop.metrics)}

    def _save(self, model: nn.Module, step: TrainStep, loop: "_Loop", ckpt: Checkpointer) -> None:
        rng = dist.all_gather_object(capture_rng())  # every rank's RNG; rank 0 writes them all
        if dist.is_main():
            state = {**self._weights(model, loop), **step.state_dict(), "loop": loop.state_dict(), "rng": rng,
                     "world_size": dist.world_size()}
            ckpt.save(state, loop.iter)

    def _summary(self, loop: "_Loop", logger: RunLogger) -> None:
        name = self.task.primary_metric
        best = f"best {name} {loop.best:.2f} at iter {loop.best_iter}" if loop.best is not None else f"no {name}"
        logger.info(f"done: {best}; checkpoints in {self.work_dir} (latest.pth, best.pth, final.pth)")

    @torch.no_grad()
    def _save_predictions(self, model: nn.Module, loader: Iterable[Mapping[str, Any]], transform: Callable[[dict], dict],
                          max_images: int = 8) -> None:
        """``predictions.png``: the first validation images (top row) and the task's picture of the
        model's predictions on them (bottom row)."""
        from PIL import Image

        was_training = model.training
        model.eval()
        inputs, pictures = [], []
        for batch in loader:
            batch = transform(to_device(batch, self.device))
            shown = self.task.visualize(batch, self.task.predict(self.task.forward(model, batch))).cpu()
            raw = batch.get("raw_image")
            pictures += list(shown)
            inputs += list(raw.cpu() if raw is not None else torch.zeros_like(shown))
            if len(pictures) >= max_images:
                break
        model.train(was_training)
        keep = [i for i in range(min(len(pictures), max_images)) if pictures[i].shape == pictures[0].shape]
        if keep:
            top = torch.cat([inputs[i] for i in keep], dim=-1)
            bottom = torch.cat([pictures[i] for i in keep], dim=-1)
            grid = torch.cat([top.to(bottom.dtype), bottom], dim=-2).permute(1, 2, 0).numpy()
            Image.fromarray(grid).save(self.work_dir / "predictions.png")


class _Loop:
    """The loop's own state (checkpointed): iteration, running loss sums since the last evaluation,
    metric history, best primary metric, training time so far."""

    def __init__(self, iter: int, running: dict[str, float], n_running: int, history: list[dict[str, Any]],
                 best: Optional[float], best_iter: Optional[int], elapsed: float, metrics: dict[str, float],
                 skipped: int = 0) -> None:
        self.iter, self.running, self.n_running = int(iter), dict(running), int(n_running)
        self.skipped = int(skipped)  # steps dropped by train.nonfinite: skip
        self.history, self.best, self.best_iter = list(history), best, best_iter
        self.elapsed, self.metrics = float(elapsed), dict(metrics)

    @classmethod
    def fresh(cls) -> "_Loop":
        return cls(0, {}, 0, [], None, None, 0.0, {})

    def add(self, values: Mapping[str, float]) -> None:
        for k, v in values.items():
            self.running[k] = self.running.get(k, 0.0) + float(v)
        self.n_running += 1

    def take_means(self) -> dict[str, float]:
        """Mean of each running value since the last call, over iterations and ranks; resets the sums."""
        keys = sorted(self.running)
        means = dist.all_reduce_mean([self.running[k] / max(self.n_running, 1) for k in keys])
        self.running, self.n_running = {}, 0
        return dict(zip(keys, means))

    def state_dict(self) -> dict[str, Any]:
        return {"iter": self.iter, "running": self.running, "n_running": self.n_running, "history": self.history,
                "best": self.best, "best_iter": self.best_iter, "elapsed": self.elapsed, "metrics": self.metrics,
                "skipped": self.skipped}
