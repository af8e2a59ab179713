"""One GPU suite, one call: densefuse's training step, data pipelines, evaluation and collectives on a GPU.

Made to run in a single call of at most 8 minutes on one GPU (``--budget-s``, default 420: the parts left
when the budget is spent are listed as ``skipped (budget)``, never silently dropped). What it measures, at
512x512, AMP bf16, for UPerNet-R50 (timm ResNet-50, mmseg's UPerHead and FCN auxiliary head) and
UPerNet-ConvNeXt-T (the paper row's model), random init, equalizer off unless stated:

* ``step``: images/s of ``densefuse train``'s step (:class:`~densefuse.engine.step.TrainStep`: autocast,
  the task loss, the loss read back to check it is finite, AdamW, scheduler) against a plain PyTorch loop
  on the same model (autocast, the same loss, backward, step; no read-back), batch 4 and 8, with and
  without channels-last; with ``train.compile`` (inductor; one compiled module shared by both loops) at
  batch 8; peak GPU memory of each;
* ``equalizer``: the densefuse step with the equalizer ``off`` / ``explicit`` (calibrated) / ``fold``;
* ``data``: images/s of the device-side batch augmentation (``data.pipeline: batch``: pad-crop per sample
  on the workers, scale-crop/flip/photometric/normalize batched on the GPU) against the CPU per-sample
  pipeline (``data.pipeline: mmseg`` with the photometric distortion on the workers), both from the same
  ADE20K-layout files, batch 8, ``--workers`` loader workers;
* ``eval``: images/s of :func:`densefuse.inference.infer` (whole 512x512, slide on 512x1024 with 512
  windows at stride 341, whole with flip TTA), batch 1;
* ``collective``: a one-process NCCL group: init time and one all-reduce of 1M floats.

Without a CUDA device it stops at once with one line (exit 2). ``--dry-run`` runs every code path on the
CPU at tiny sizes instead (64x64, batch 2, a few iterations, 32/16 head channels, ``gloo`` instead of
NCCL, compile with the ``aot_eager`` backend on the first model only, since inductor takes minutes on a
CPU): it checks the suite, its numbers mean nothing.

    python tools/gpu_suite.py                    # on a GPU machine
    python tools/gpu_suite.py --dry-run          # anywhere

Prints one Markdown table and writes ``results/gpu_suite.csv``.
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_average  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "configs" / "seg" / "paper"
#: model name -> (paper config it starts from, overrides)
MODELS: dict[str, tuple[str, list[str]]] = {
    "UPerNet-R50": ("upernet_swin-t_4xb4-160k_ade20k-512x512",
                    ["model.encoder.name=resnet50", "model.encoder.out_indices=[1,2,3,4]"]),
    "UPerNet-ConvNeXt-T": ("upernet_convnext-t_4xb4-160k_ade20k-512x512", []),
}


@dataclass
class Plan:
    """Sizes of a run: the real one or the CPU dry run."""

    device: str
    size: int
    batches: tuple[int, ...]
    warmup: int
    iters: int
    eval_images: int
    data_images: int
    data_batches: int
    workers: int
    compile_backend: Optional[str]
    compile_models: int
    backend: str
    overrides: tuple[str, ...] = ()


def gpu_plan(workers: int) -> Plan:
    return Plan("cuda", 512, (4, 8), 3, 10, 10, 64, 6, workers, "inductor", 2, "nccl")


def dry_plan() -> Plan:
    return Plan("cpu", 32, (2,), 0, 1, 1, 4, 1, 0, "aot_eager", 1, "gloo",
                ("model.decode_head.channels=32", "model.auxiliary_head.channels=16"))


class Suite:
    """Runs the parts in order of importance under a time budget and collects one row per measurement."""

    def __init__(self, plan: Plan, budget_s: float) -> None:
        import torch

        self.plan, self.torch = plan, torch
        self.dev = torch.device(plan.device)
        self.t0, self.budget = time.perf_counter(), budget_s
        self.rows: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ helpers
    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.t0)

    def add(self, part: str, model: str, case: str, value: float, unit: str, **extra: Any) -> None:
        self.rows.append({"part": part, "model": model, "case": case, "value": value, "unit": unit, **extra})
        print(f"  {part:<10} {model:<19} {case:<44} {value:10.2f} {unit}", flush=True)

    def guarded(self, part: str, model: str, case: str, fn: Callable[[], None], need_s: float = 5.0) -> None:
        """Run ``fn`` unless the budget is spent; a part that fails is a row with its error, not a crash."""
        if self.left() < need_s:
            self.rows.append({"part": part, "model": model, "case": case, "value": float("nan"), "unit": "",
                              "note": "skipped (budget)"})
            print(f"  {part:<10} {model:<19} {case:<44} skipped (budget)", flush=True)
            return
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - one failing part must not lose the others' numbers
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            self.rows.append({"part": part, "model": model, "case": case, "value": float("nan"), "unit": "",
                              "note": f"failed: {type(e).__name__}: {first}"})
            print(f"  {part:<10} {model:<19} {case:<44} failed: {type(e).__name__}: {first}", flush=True)
        finally:
            self.sync()
            if self.dev.type == "cuda":
                self.torch.cuda.empty_cache()

    def sync(self) -> None:
        if self.dev.type == "cuda":
            self.torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.dev.type == "cuda":
            self.torch.cuda.reset_peak_memory_stats()

    def peak_mib(self) -> float:
        if self.dev.type == "cuda":
            return self.torch.cuda.max_memory_allocated() / 2**20
        return float("nan")

    def config(self, model: str, extra: tuple[str, ...] = ()) -> Any:
        from densefuse.config import load_config

        base, overrides = MODELS[model]
        return load_config(str(PAPER / f"{base}.yaml"), [
            *overrides, "model.encoder.pretrained=null", "model.equalizer.mode=off", "train.amp=bf16",
            f"device={self.plan.device}", f"data.crop_size=[{self.plan.size},{self.plan.size}]", *self.plan.overrides,
            *extra])

    def batch(self, cfg: Any, n: int, seed: int = 0) -> dict[str, Any]:
        torch = self.torch
        g = torch.Generator().manual_seed(seed)
        s = self.plan.size
        return {"image": torch.randn(n, 3, s, s, generator=g).to(self.dev),
                "label": torch.randint(0, cfg["model"]["num_classes"], (n, s, s), generator=g).to(self.dev)}

    # ------------------------------------------------------------------ parts
    def steps(self, name: str, compiled: bool) -> None:
        """densefuse's TrainStep vs a plain loop, per batch size and memory format (eager), or at the
        largest batch with ``torch.compile`` (one compiled module, shared by both loops)."""
        from densefuse.engine.optim import build_optimizer, build_scheduler
        from densefuse.engine.step import TrainStep
        from densefuse.tasks import get_task

        torch, plan = self.torch, self.plan
        cfg = self.config(name)
        task = get_task("seg", cfg)
        torch.manual_seed(0)
        base = task.build_model(cfg).to(self.dev).train()
        batches = plan.batches[-1:] if compiled else plan.batches
        formats = (False,) if compiled else (False, True)
        for bs in batches:
            for channels_last in formats:
                model = copy.deepcopy(base)
                if channels_last:
                    model = model.to(memory_format=torch.channels_last)
                run_model = torch.compile(model, backend=plan.compile_backend) if compiled else model
                x = self.batch(cfg, bs)
                if channels_last:
                    x["image"] = x["image"].contiguous(memory_format=torch.channels_last)
                tag = f"b{bs} {'channels-last' if channels_last else 'NCHW'}"
                if compiled:
                    tag += f" compile={plan.compile_backend}"

                def densefuse_step(model: Any = model, run_model: Any = run_model, x: dict = x, tag: str = tag,
                                   bs: int = bs, channels_last: bool = channels_last) -> None:
                    opt = build_optimizer(model, cfg["optim"])
                    step = TrainStep(run_model, task, opt, build_scheduler(opt, cfg["schedule"], 10**6), self.dev,
                                     "bf16", cfg["train"]["grad_clip"], channels_last)
                    self.timed_steps("step", name, f"densefuse TrainStep {tag}", bs,
                                     lambda i: step([x], i))

                def plain_loop(model: Any = model, run_model: Any = run_model, x: dict = x, tag: str = tag,
                               bs: int = bs) -> None:
                    opt = build_optimizer(model, cfg["optim"])

                    def one(_i: int) -> None:
                        with torch.autocast(self.dev.type, dtype=torch.bfloat16):
                            out = run_model(x["image"])
                            loss, _ = task.loss(out, x)
                        loss.backward()
                        opt.step()
                        opt.zero_grad(set_to_none=True)

                    self.timed_steps("step", name, f"plain loop {tag}", bs, one)

                need = 60.0 if compiled and plan.device == "cuda" else 5.0
                self.guarded("step", name, f"densefuse TrainStep {tag}", densefuse_step, need)
                self.guarded("step", name, f"plain loop {tag}", plain_loop, need)

    def timed_steps(self, part: str, name: str, case: str, bs: int, fn: Callable[[int], None]) -> None:
        plan = self.plan
        for i in range(plan.warmup):
            fn(i)
        self.sync()
        self.reset_peak()
        t, c = time.perf_counter(), time.process_time()
        for i in range(plan.iters):
            fn(plan.warmup + i)
        self.sync()
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        self.add(part, name, case, bs * plan.iters / wall, "img/s", s_per_iter=wall / plan.iters,
                 cpu_s_per_iter=cpu / plan.iters, peak_mem_mib=self.peak_mib())

    def equalizer(self, name: str) -> None:
        """The densefuse step with the equalizer off, explicit (calibrated) and folded, same weights."""
        from densefuse import calibrate, fold, set_mode
        from densefuse.engine.optim import build_optimizer, build_scheduler
        from densefuse.engine.step import TrainStep
        from densefuse.tasks import get_task

        torch, plan = self.torch, self.plan
        bs = plan.batches[-1]
        cfg = self.config(name)
        task = get_task("seg", cfg)
        torch.manual_seed(0)
        base = task.build_model(cfg).to(self.dev)
        x = self.batch(cfg, bs)
        for mode in ("off", "explicit", "fold"):
            def run(mode: str = mode) -> None:
                model = copy.deepcopy(base)
                set_mode(model, mode)
                if mode != "off":
                    calib = [self.batch(cfg, max(2, bs // 2), seed=k + 1)["image"] for k in range(2)]
                    with torch.autocast(self.dev.type, dtype=torch.bfloat16):
                        calibrate(model, calib)
                if mode == "fold":
                    fold(model)
                model.train()
                opt = build_optimizer(model, cfg["optim"])
                step = TrainStep(model, task, opt, build_scheduler(opt, cfg["schedule"], 10**6), self.dev, "bf16",
                                 cfg["train"]["grad_clip"])
                self.timed_steps("equalizer", name, f"densefuse TrainStep b{bs} equalizer={mode}", bs,
                                 lambda i: step([x], i))

            self.guarded("equalizer", name, f"densefuse TrainStep b{bs} equalizer={mode}", run)

    def data(self, root: Path) -> None:
        """Device-side batch augmentation vs the CPU per-sample pipeline, same files, images/s."""
        from densefuse_tasks.seg.datasets import ADE20K
        from densefuse_tasks.seg.pipeline import build_train_pipeline

        from densefuse.data.loader import build_loader
        from densefuse.engine.runtime import to_device
        from densefuse.tasks import get_task

        s, bs = self.plan.size, self.plan.batches[-1]
        common = (f"data.root={root}", f"data.num_workers={self.plan.workers}", f"train.batch_size={bs}",
                  f"data.scale=[{4 * s},{s}]", "data.augment.photometric=true")
        cases = {"device batch augmentation (pipeline: batch)": ("data.pipeline=batch",),
                 "CPU per-sample mmseg pipeline, photometric on the workers": ("data.pipeline=mmseg",)}
        for case, extra in cases.items():
            def run(case: str = case, extra: tuple = extra) -> None:
                cfg = self.config("UPerNet-R50", (*common, *extra))
                task = get_task("seg", cfg)
                if "mmseg" in case:  # the photometric distortion per sample, on the workers
                    ds = ADE20K(root, "train", True, build_train_pipeline(cfg, photometric=True))
                    tf = task.build_transform(cfg, train=False)  # normalize only: nothing left for the device
                else:
                    ds = task.build_dataset(cfg, cfg["data"]["train_split"])
                    tf = task.build_transform(cfg, train=True)
                it = iter(build_loader(ds, bs, train=True, num_workers=self.plan.workers, seed=0))
                tf(to_device(next(it), self.dev))  # workers started, first batch
                self.sync()
                t, c = time.perf_counter(), time.process_time()
                n = self.plan.data_batches
                for _ in range(n):
                    out = tf(to_device(next(it), self.dev))
                self.sync()
                wall = time.perf_counter() - t
                self.add("data", "-", case, n * bs / wall, "img/s", s_per_iter=wall / n,
                         cpu_s_per_iter=(time.process_time() - c) / n, note=f"{self.plan.workers} workers, "
                         f"out {tuple(out['image'].shape)}")

            self.guarded("data", "-", case, run)

    def evaluation(self, name: str) -> None:
        """Images/s of :func:`densefuse.inference.infer`: whole, slide (2x wider images) and flip."""
        from densefuse.engine.evaluate import infer_outputs
        from densefuse.tasks import get_task

        torch, s = self.torch, self.plan.size
        stride = 2 * s // 3
        cases = {"whole": ((s, s), ("eval.mode=whole",)),
                 "slide": ((s, 2 * s), ("eval.mode=slide", f"eval.crop_size=[{s},{s}]", f"eval.stride=[{stride},{stride}]")),
                 "whole + flip": ((s, s), ("eval.mode=whole", "eval.tta.flip=true"))}
        cfg0 = self.config(name)
        torch.manual_seed(0)
        model = get_task("seg", cfg0).build_model(cfg0).to(self.dev).eval()
        for case, (hw, extra) in cases.items():
            def run(case: str = case, hw: tuple = hw, extra: tuple = extra) -> None:
                cfg = self.config(name, extra)
                task = get_task("seg", cfg)
                x = {"image": torch.randn(1, 3, *hw, device=self.dev)}
                n = self.plan.eval_images
                with torch.no_grad(), torch.autocast(self.dev.type, dtype=torch.bfloat16):
                    infer_outputs(model, task, x)
                    self.sync()
                    self.reset_peak()
                    t = time.perf_counter()
                    for _ in range(n):
                        out = infer_outputs(model, task, x)["out"]
                    self.sync()
                wall = time.perf_counter() - t
                self.add("eval", name, f"{case} {hw[0]}x{hw[1]}", n / wall, "img/s", s_per_iter=wall / n,
                         peak_mem_mib=self.peak_mib(), note=f"logits {tuple(out.shape)}")

            self.guarded("eval", name, case, run)

    def collective(self) -> None:
        """A one-process group (NCCL on the GPU, gloo in the dry run): init time, one all-reduce."""
        import torch.distributed as dist

        torch = self.torch

        def run() -> None:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            t = time.perf_counter()
            dist.init_process_group(self.plan.backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                                    timeout=dt.timedelta(seconds=60))
            try:
                init = time.perf_counter() - t
                x = torch.ones(2**20, device=self.dev)
                t = time.perf_counter()
                dist.all_reduce(x)
                self.sync()
                first = time.perf_counter() - t
                t = time.perf_counter()
                dist.all_reduce(x)
                self.sync()
                second = time.perf_counter() - t
                ok = bool(x[0].item() == 1.0)
            finally:
                dist.destroy_process_group()
            self.add("collective", "-", f"{self.plan.backend} init_process_group (1 process)", init * 1e3, "ms")
            self.add("collective", "-", f"{self.plan.backend} first all_reduce 4 MiB", first * 1e3, "ms",
                     note=f"result correct: {ok}")
            self.add("collective", "-", f"{self.plan.backend} second all_reduce 4 MiB", second * 1e3, "ms")

        self.guarded("collective", "-", f"{self.plan.backend} init + all_reduce", run)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="every code path on the CPU at tiny sizes (no GPU needed)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop starting new parts after this many seconds (default 420 on a GPU, none in the dry run)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="loader workers of the data part")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of: {', '.join(MODELS)}")
    p.add_argument("--out", type=Path, default=Path("results/gpu_suite.csv"))
    args = p.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if any(m not in MODELS for m in models):
        print(f"error: --models: choose from {', '.join(MODELS)}", file=sys.stderr)
        return 2
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device is visible (torch.cuda.is_available() is False); run this suite on a GPU "
              "machine, or use --dry-run to check it on the CPU", file=sys.stderr)
        return 2
    plan = dry_plan() if args.dry_run else gpu_plan(args.workers)
    if not args.dry_run:
        torch.backends.cudnn.benchmark = True
    import pandas as pd
    from bench_vs_mmseg import make_tree

    load_before = load_average()
    device_name = torch.cuda.get_device_name(0) if plan.device == "cuda" else "CPU (dry run)"
    budget = args.budget_s if args.budget_s is not None else (float("inf") if args.dry_run else 420.0)
    print(f"# gpu_suite on {device_name}, size {plan.size}, batches {plan.batches}, AMP bf16, budget "
          f"{budget:.0f}s", flush=True)
    if args.dry_run:
        torch.set_num_threads(1)  # tiny sizes: more threads only add contention
    suite = Suite(plan, budget)
    with tempfile.TemporaryDirectory() as tmp:
        # parts in order of importance: a spent budget skips the tail
        for name in models:
            suite.steps(name, compiled=False)
        suite.collective()
        root = Path(tmp) / "ADEChallengeData2016"
        make_tree(root, plan.data_images, plan.size // 2)  # short side about the crop, as ADE20K at 512
        suite.data(root)
        for name in models:
            suite.evaluation(name)
        for name in models:
            suite.equalizer(name)
        for i, name in enumerate(models):
            if i < plan.compile_models:
                suite.steps(name, compiled=True)
            else:
                suite.rows.append({"part": "step", "model": name, "case": f"compile={plan.compile_backend}",
                                   "value": float("nan"), "unit": "", "note": "dry run: compiled on the first model only"})
    df = pd.DataFrame(suite.rows)
    for col in ("s_per_iter", "cpu_s_per_iter", "peak_mem_mib", "note"):
        if col not in df:
            df[col] = None
    df = df[["part", "model", "case", "value", "unit", "s_per_iter", "cpu_s_per_iter", "peak_mem_mib", "note"]]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out, index=False)
    print(f"\n# gpu_suite: {device_name}, torch {torch.__version__}, {plan.size}x{plan.size}, AMP bf16, "
          f"{plan.iters} timed iterations after {plan.warmup}; load before {load_before}, after {load_average()}; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {time.perf_counter() - suite.t0:.0f}s"
          + (" (dry run: numbers mean nothing)" if args.dry_run else ""))
    print(df.to_markdown(index=False, floatfmt=".3g"))
    print(f"\nCSV: {args.out}")
    failed = df["note"].fillna("").str.startswith("failed")
    return 1 if bool(failed.any()) else 0


if __name__ == "__main__":
    sys.exit(main())
