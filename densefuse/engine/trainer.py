"""Single-process, iteration-based trainer (mmseg's IterBasedTrainLoop, without the indirection).

Before step 0: build the model, calibrate the scale equalizers on training images (unless every
site is ``off``) and fold them when the mode is ``fold``. Every ``val_interval`` the task metric is
computed on the validation split and appended to ``metrics.csv``. Checkpoints are atomic and hold
everything needed to resume.
"""
from __future__ import annotations

import datetime as _dt
import math
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..config import Config, dump
from ..data.loader import build_loader
from ..equalizer import calibrate, equalizers, fold
from ..errors import DensefuseError
from ..tasks import Task, get_task
from .checkpoint import load_checkpoint, load_model_state, save_checkpoint
from .optim import build_optimizer, build_scheduler


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DensefuseError(f"device '{name}' requested but CUDA is not available")
    return torch.device(name)


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def default_work_dir(cfg: Mapping[str, Any]) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d_%H%M%S")
    return Path(cfg.get("work_dir") or "work_dirs") / cfg["name"] / stamp


def calibration_batches(task: Task, cfg: Mapping[str, Any], dataset: Dataset, device: torch.device,
                        seed: Optional[int] = None) -> Iterator[dict[str, Any]]:
    """Training images, normalized but not augmented (Algorithm 1 iterates over the training set), in
    a seeded shuffled order; at least 2 per batch because BN runs in train mode."""
    c = cfg["calibration"]
    loader = build_loader(dataset, max(2, c["batch_size"]), train=True, num_workers=cfg["data"]["num_workers"],
                          seed=cfg["seed"] if seed is None else seed)
    tf = task.build_transform(cfg, train=False)
    return (tf(to_device(b, device)) for b in loader)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    task: Task,
    loader: Iterable[Mapping[str, Any]],
    transform: Callable[[dict], dict],
    device: torch.device,
) -> dict[str, float]:
    """Run the task metric over ``loader`` in eval mode; the model's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    metric = task.metric(task.cfg)
    metric.reset()
    for batch in loader:
        batch = transform(to_device(batch, device))
        metric.update(task.forward(model, batch), batch)
    model.train(was_training)
    return metric.compute()


class Trainer:
    """Trains ``cfg`` in ``work_dir``. ``progress=None`` shows a progress bar only on a TTY."""

    def __init__(
        self,
        cfg: Config,
        work_dir: Optional[Path] = None,
        resume: bool = False,
        progress: Optional[bool] = None,
        log: Callable[[str], None] = print,
    ) -> None:
        self.cfg = cfg
        self.work_dir = Path(work_dir) if work_dir is not None else default_work_dir(cfg)
        self.resume = resume
        self.progress = sys.stderr.isatty() if progress is None else progress
        self._print = log
        self.task = get_task(cfg["task"], cfg)
        self.device = resolve_device(cfg["device"])

    # ------------------------------------------------------------------ helpers
    def log(self, msg: str, echo: bool = True) -> None:
        with open(self.work_dir / "log.txt", "a", encoding="utf-8") as f:
            f.write(f"{_dt.datetime.now():%Y-%m-%d %H:%M:%S} {msg}\n")
        if echo:
            self._print(msg)

    def _prepare_work_dir(self) -> None:
        wd = self.work_dir
        if wd.exists() and (wd / "config.yaml").exists() and not self.resume:
            raise DensefuseError(f"work dir {wd} already holds a run; pass --resume or choose another --work-dir")
        if self.resume and not (wd / "latest.pth").exists():
            raise DensefuseError(f"nothing to resume in {wd} (no latest.pth)")
        wd.mkdir(parents=True, exist_ok=True)
        if not self.resume:
            dump(self.cfg, wd / "config.yaml")

    def _loader(self, dataset: Dataset, batch_size: int, train: bool, start_iter: int = 0) -> DataLoader:
        return build_loader(dataset, batch_size, train=train, num_workers=self.cfg["data"]["num_workers"],
                            seed=self.cfg["seed"], start_iter=start_iter)

    def calibrate(self, model: nn.Module, dataset: Dataset) -> Optional[pd.DataFrame]:
        """Calibrate every equalizer on training images (normalized, not augmented) and fold if asked."""
        eqs = list(equalizers(model))
        if not eqs or all(eq.mode == "off" for _, eq in eqs):
            return None
        n = self.cfg["calibration"]["num_images"] or len(dataset)
        t0 = time.time()
        table = calibrate(model, calibration_batches(self.task, self.cfg, dataset, self.device), num_images=n,
                          forward=self.task.forward)
        table.to_csv(self.work_dir / "calibration.csv", index=False)
        self.log(f"calibrated {len(eqs)} fusion sites on {n} images in {time.time() - t0:.1f}s -> calibration.csv")
        if any(eq.mode == "fold" for _, eq in eqs):
            fold(model)
            self.log("folded the equalizers into the fusion convs (Algorithm 1)")
        return table

    # ------------------------------------------------------------------ main loop
    def run(self) -> dict[str, float]:
        cfg, task, dev = self.cfg, self.task, self.device
        tc = cfg["train"]
        self._prepare_work_dir()
        seed_everything(cfg["seed"])
        train_set = task.build_dataset(cfg, cfg["data"]["train_split"])
        val_set = task.build_dataset(cfg, cfg["data"]["val_split"])
        model = task.build_model(cfg).to(dev)
        optimizer = build_optimizer(model, cfg["optim"])
        scheduler = build_scheduler(optimizer, cfg["schedule"], tc["iters"])
        start = 0
        if self.resume:
            state = load_checkpoint(self.work_dir / "latest.pth", map_location=dev)
            load_model_state(model, state, self.work_dir / "latest.pth")
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start = int(state["iter"])
            self.log(f"resumed from iteration {start}")
        else:
            self.calibrate(model, train_set)

        train_tf = task.build_transform(cfg, train=True)
        eval_tf = task.build_transform(cfg, train=False)
        val_loader = self._loader(val_set, cfg["eval"]["batch_size"], train=False)
        batches = iter(self._loader(train_set, tc["batch_size"], train=True, start_iter=start))
        use_amp = bool(tc["amp"]) and dev.type == "cuda"
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
        model.train()
        history: list[dict[str, Any]] = self._read_history() if self.resume else []
        running: dict[str, float] = {}
        n_running, t_start, last_metrics = 0, time.time(), {}
        bar = self._bar(start, tc["iters"])
        for it in range(start, tc["iters"]):
            batch = train_tf(to_device(next(batches), dev))
            with torch.autocast(dev.type, dtype=torch.float16, enabled=use_amp):
                outputs = task.forward(model, batch)
                loss, parts = task.loss(outputs, batch)
            loss_value = loss.detach().item()
            if not math.isfinite(loss_value):
                raise DensefuseError(f"loss became {loss_value} at iteration {it + 1}; lower optim.lr")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if tc["grad_clip"]:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), tc["grad_clip"])
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            for k, v in {"loss": loss_value, **parts}.items():
                running[k] = running.get(k, 0.0) + float(v)
            n_running += 1
            done = it + 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.3f}")
            if done % tc["log_interval"] == 0 or done == tc["iters"]:
                speed = (done - start) * tc["batch_size"] / max(time.time() - t_start, 1e-9)
                self.log(f"iter {done}/{tc['iters']} loss {loss_value:.4f} lr {scheduler.get_last_lr()[0]:.2e} "
                         f"{speed:.1f} img/s", echo=False)
            is_last = done == tc["iters"]
            if done % tc["val_interval"] == 0 or is_last:
                last_metrics = evaluate(model, task, val_loader, eval_tf, dev)
                # summary metrics go to metrics.csv; per-class ones ("IoU.<class>") to per_class.csv
                summary_metrics = {k: float(v) for k, v in last_metrics.items() if "." not in k}
                row = {"iter": done, "lr": scheduler.get_last_lr()[0], "time_s": round(time.time() - t_start, 2)}
                row.update({k: v / max(n_running, 1) for k, v in running.items()})
                row.update(summary_metrics)
                history.append(row)
                pd.DataFrame(history).to_csv(self.work_dir / "metrics.csv", index=False)
                per_class = {k: float(v) for k, v in last_metrics.items() if "." in k}
                if per_class:
                    pd.Series(per_class, name=f"iter_{done}").to_csv(self.work_dir / "per_class.csv")
                running, n_running = {}, 0
                summary = " ".join(f"{k} {v:.2f}" for k, v in summary_metrics.items())
                self.log(f"eval @ iter {done}: {summary}", echo=not self.progress)
                if bar is not None:
                    bar.write(f"eval @ iter {done}: {summary}")
            if done % tc["ckpt_interval"] == 0 or is_last:
                self._save(model, optimizer, scheduler, done, last_metrics, final=is_last)
        if bar is not None:
            bar.close()
        self._save_predictions(model, val_loader, eval_tf)
        return last_metrics

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

    def _bar(self, start: int, total: int) -> Any:
        if not self.progress:
            return None
        from tqdm import tqdm

        return tqdm(total=total, initial=start, desc="train", unit="it", dynamic_ncols=True)

    def _read_history(self) -> list[dict[str, Any]]:
        p = self.work_dir / "metrics.csv"
        return pd.read_csv(p).to_dict("records") if p.exists() else []

    def _save(self, model: nn.Module, optimizer: Any, scheduler: Any, it: int, metrics: dict, final: bool) -> None:
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "iter": it,
            "config": self.cfg.to_dict(),
            "metrics": {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
        }
        save_checkpoint(self.work_dir / "latest.pth", state)
        if final:
            save_checkpoint(self.work_dir / "final.pth", {k: state[k] for k in ("model", "iter", "config", "metrics")})
