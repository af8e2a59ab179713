"""Calibration sums are all-reduced across ranks (gloo, 2 processes on CPU)."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from densefuse import ScaleEqualizer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(3, 4, 6, 6, generator=g) * (1 + rank) + rank
        eq = ScaleEqualizer([1, 3])
        eq.observe_concat(x)
        eq.finish_calibration()
        torch.save({"mean": eq.mean, "std": eq.std, "x": x}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_calibration_all_reduces_over_ranks(tmp_path):
    out = str(tmp_path / "r")
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    r0, r1 = (torch.load(f"{out}.{r}") for r in (0, 1))
    assert torch.equal(r0["mean"], r1["mean"]) and torch.equal(r0["std"], r1["std"])
    pooled = torch.cat([r0["x"], r1["x"]]).double()
    want_mean = torch.stack([pooled[:, :1].mean(), pooled[:, 1:].mean()])
    want_std = torch.stack([pooled[:, :1].std(unbiased=False), pooled[:, 1:].std(unbiased=False)])
    assert torch.allclose(r0["mean"].double(), want_mean, atol=1e-5)
    assert torch.allclose(r0["std"].double(), want_std, atol=1e-5)
