"""How far 2 gloo processes with batch b/2 each train from 1 process with batch b, and why.

Each run trains the default synthetic segmentation config (``configs/seg/synthetic_upernet_r18.yaml``)
with small settings (ResNet-10t, 16-channel heads, 32x32 images, global batch 4) and its default
augmentation: ``data.pipeline: batch`` with photometric distortion on the device, dropout 0.1 in both
heads. Three runs per optimizer, all in-process (``torch.multiprocessing``; the 2-process run joins a
gloo group through torchrun's variables, as ``densefuse train`` does under torchrun):

- ``one``: 1 process, batch 4 (the reference);
- ``one, samples reversed``: the same process with the samples of every batch in reverse order: the
  same mathematics (the loss is a mean, BatchNorm statistics are sums), other float rounding. It is the
  control: how far float rounding alone moves a run;
- ``one, SyncBN arithmetic``: the same process with its BatchNorm statistics computed the way the
  gloo SyncBN computes them (sums over the batch, in one process): the same mathematics as
  ``BatchNorm``'s own kernel, other rounding. A second control;
- ``two``: 2 gloo processes, batch 2 each (SyncBN over both).

Table 1 (``--out``): for each optimizer, the largest loss difference to ``one`` over iterations 1-5,
6-10 and 11-20, and the largest final weight difference (parameters; BN running statistics are
buffers). Table 2 (``<out stem>_step1.csv``): with AdamW, after step 1 of ``two``, the parameters whose
weights moved most differently from ``one``, with the gradient element that moved most and its
gradient in both runs: Adam's first update is ``lr * g / (|g| + eps)``, so where ``|g|`` is near
``eps`` (1e-8) a rounding-level change of ``g`` changes the update by a sizeable part of ``lr``.

    python tools/world_size_parity.py --out parity.csv
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.multiprocessing as mp
from _common import machine_line

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "seg" / "synthetic_upernet_r18.yaml"
SMALL = ["model.encoder.name=resnet10t", "model.decode_head.channels=16", "model.auxiliary_head.channels=16",
         "data.crop_size=[32,32]", "data.kwargs.size=[32,32]", "data.kwargs.num_train=32", "data.kwargs.num_val=4",
         "calibration.num_images=8", "calibration.batch_size=4", "eval.batch_size=2", "schedule.warmup_iters=0",
         "data.pipeline=batch", "data.augment.photometric=true", "model.decode_head.dropout=0.1",
         "model.auxiliary_head.dropout=0.1", "train.log_interval=1"]
OPTIMIZERS = {"adamw": ["optim.type=adamw", "optim.lr=0.001"], "sgd": ["optim.type=sgd", "optim.lr=0.01"]}
RUNS = {"one": (1, ""), "one, samples reversed": (1, "reverse"), "one, SyncBN arithmetic": (1, "syncbn"),
        "two": (2, "")}
WINDOWS = ((1, 5), (6, 10), (11, 20))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, control: str, overrides: list[str], out: str) -> None:
    """One process of one run: trains, and (rank 0) saves every step's loss, gradients and weights."""
    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    import densefuse
    from densefuse.engine import Trainer
    from densefuse.engine.distributed import _SyncBatchNormCPU, all_reduce_mean, unwrap
    from densefuse.engine.step import TrainStep

    if control == "syncbn":  # BN converted as for 2 processes, its sums "reduced" over this one process
        Trainer._synced_bn = lambda self: True  # type: ignore[method-assign]
        plain = torch.nn.BatchNorm2d.forward

        def forward(self: _SyncBatchNormCPU, x: torch.Tensor) -> torch.Tensor:
            return self.synced(x, lambda t: t) if self.training else plain(self, x)

        _SyncBatchNormCPU.forward = forward  # type: ignore[method-assign]

    steps: list[dict[str, Any]] = []
    original = TrainStep.__call__

    def call(self: TrainStep, batches: list[dict[str, Any]], iteration: int) -> tuple[float, dict[str, float]]:
        if control == "reverse":  # every per-sample tensor (image, label, sample seed) in reverse order
            batches = [{k: v.flip(0) if isinstance(v, torch.Tensor) and v.dim() and len(v) == len(b["image"]) else v
                        for k, v in b.items()} for b in batches]
        model = unwrap(self.model)
        before = {k: p.detach().clone() for k, p in model.named_parameters()} if iteration == 0 else None
        loss, parts = original(self, batches, iteration)
        record: dict[str, Any] = {"loss": all_reduce_mean([loss])[0]}
        if iteration == 0:
            record.update(before=before, grad={k: p.grad.clone() for k, p in model.named_parameters()
                                               if p.grad is not None})
        record["after"] = {k: p.detach().clone() for k, p in model.named_parameters()}
        steps.append(record)
        return loss, parts

    TrainStep.__call__ = call  # type: ignore[method-assign]
    batch = 4 // world
    cfg = densefuse.load_config(CONFIG, overrides=[*SMALL, *overrides, f"train.batch_size={batch}"])
    Trainer(cfg, Path(out).with_suffix(".run"), progress=False, log=lambda _m: None).run()
    if rank == 0:
        torch.save(steps, out)


def train(world: int, control: str, overrides: list[str], out: Path) -> list[dict[str, Any]]:
    mp.spawn(_worker, args=(world, _free_port(), control, overrides, str(out)), nprocs=world, join=True)
    return torch.load(out)


def weight_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def step1_table(one: dict[str, Any], two: dict[str, Any], top: int) -> pd.DataFrame:
    rows = []
    for k, g1 in one["grad"].items():
        dw = (one["after"][k] - two["after"][k]).abs().flatten()
        i = int(dw.argmax())
        g2 = two["grad"][k].flatten()[i]
        rows.append({"parameter": k, "max |dW|": float(dw[i]), "update in one": float((one["after"][k] - one["before"][k]).flatten()[i]),
                     "g in one": float(g1.flatten()[i]), "g in two": float(g2),
                     "max |g| of the tensor": float(g1.abs().max()),
                     "max |dg| / max |g|": float((g1 - two["grad"][k]).abs().max() / g1.abs().max().clamp_min(1e-30))})
    return pd.DataFrame(rows).sort_values("max |dW|", ascending=False).head(top).reset_index(drop=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    ap.add_argument("--top", type=int, default=8, help="rows of the step-1 table")
    ap.add_argument("--out", type=Path, default=Path("world_size_parity.csv"))
    args = ap.parse_args()
    print(machine_line(), file=sys.stderr)
    n = args.iters
    common = [f"train.iters={n}", f"train.val_interval={n}", f"train.ckpt_interval={n}"]
    rows, step1 = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for opt in args.optimizers:
            runs = {name: train(world, control, [*common, *OPTIMIZERS[opt]], Path(tmp) / f"{opt}-{i}.pt")
                    for i, (name, (world, control)) in enumerate(RUNS.items())}
            ref = runs["one"]
            for name, steps in runs.items():
                if name == "one":
                    continue
                row: dict[str, Any] = {"optimizer": opt, "run vs one": name}
                for lo, hi in WINDOWS:
                    if lo <= n:
                        d = [abs(ref[i]["loss"] - steps[i]["loss"]) for i in range(lo - 1, min(hi, n))]
                        row[f"max |dloss| it {lo}-{min(hi, n)}"] = max(d)
                row["max |dW| final"] = weight_diff(ref[-1]["after"], steps[-1]["after"])
                rows.append(row)
            if opt == "adamw":
                step1 = step1_table(ref[0], runs["two"][0], args.top)
    table = pd.DataFrame(rows)
    print(f"1 process x 4 vs other runs, {n} iterations ({machine_line()})")
    print(table.to_markdown(index=False, floatfmt=".1e"))
    table.to_csv(args.out, index=False)
    if step1 is not None:
        print("\nAdamW, step 1: parameters whose weights moved most differently in 'two' (the element shown)")
        print(step1.to_markdown(index=False, floatfmt=".2e"))
        step1.to_csv(args.out.with_name(args.out.stem + "_step1.csv"), index=False)


if __name__ == "__main__":
    main()
