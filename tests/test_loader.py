"""Training loaders: every sample's random draws depend only on the seed and its stream position."""
import random

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from densefuse.data.loader import InfiniteSampler, Loader, PositionSampler, SeededSamples, build_loader, sample_seeds


class RandomDraws(Dataset):
    """Each sample draws from torch's, numpy's and python's global RNGs, as per-sample transforms do."""

    def __len__(self):
        return 5

    def __getitem__(self, i):
        return {"index": torch.tensor(i), "torch": torch.rand(3), "numpy": torch.tensor(np.random.rand(2)),
                "python": torch.tensor([random.random()])}


def batches(n, batch_size=2, num_workers=0, seed=3, start_iter=0):
    it = iter(build_loader(RandomDraws(), batch_size, train=True, num_workers=num_workers, seed=seed,
                           start_iter=start_iter))
    return [next(it) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


def test_workers_and_resume_draw_the_same_samples():
    ref = batches(6)  # 12 samples: more than two epochs of 5
    assert_same_batches(batches(6, num_workers=2), ref)
    assert_same_batches(batches(3, num_workers=2, start_iter=3), ref[3:])  # a resumed stream
    assert_same_batches(batches(3, start_iter=3), ref[3:])
    # the same image at another stream position (next epoch) gets other draws; another seed, other draws
    flat = [(int(i), t) for b in ref for i, t in zip(b["index"], b["torch"])]
    first, again = [t for i, t in flat if i == flat[0][0]][:2]
    assert not torch.equal(first, again)
    assert not torch.equal(batches(1, seed=4)[0]["torch"], ref[0]["torch"])


def test_ranks_see_the_single_process_draws():
    """Two ranks with 2 samples each draw what one process with batches of 4 draws."""
    one = batches(3, batch_size=4)
    ranks = []
    for rank in (0, 1):
        sampler = PositionSampler(InfiniteSampler(RandomDraws(), seed=3, rank=rank, world_size=2))
        it = iter(Loader(RandomDraws(), sample_seed=3, batch_size=2, sampler=sampler, drop_last=True))
        ranks.append([next(it) for _ in range(3)])
    for b, r0, r1 in zip(one, *ranks):
        for k in b:  # the global stream interleaves the ranks: rank 0 has positions 0, 2, ...
            merged = torch.stack([r0[k], r1[k]], dim=1).flatten(0, 1)
            assert torch.equal(b[k], merged), k


def test_loading_in_the_main_process_leaves_its_random_streams_alone():
    torch.manual_seed(0)
    random.seed(1)
    np.random.seed(2)
    state = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    batches(3)
    assert torch.equal(torch.get_rng_state(), state[0])
    assert random.getstate() == state[1]
    assert (np.random.get_state()[1] == state[2]).all()


def test_a_failing_sample_restores_the_random_streams():
    class Fails(Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            torch.rand(1)
            raise ValueError("bad sample")

    torch.manual_seed(0)
    before = torch.get_rng_state()
    with pytest.raises(ValueError, match="bad sample"):
        SeededSamples(Fails(), 0)[(0, 0)]
    assert torch.equal(torch.get_rng_state(), before)


def test_sample_seeds_are_unrelated_for_neighbouring_seeds_and_positions():
    seeds = {sample_seeds(s, k) for s in range(4) for k in range(50)}
    assert len(seeds) == 200
    assert sample_seeds(0, 1) != sample_seeds(1, 0)
    assert sample_seeds(-1, 0) != sample_seeds(0, 0)  # negative seeds are seeds too


def test_evaluation_loader_is_ordered_and_unseeded():
    ev = build_loader(RandomDraws(), 2, train=False)
    assert [int(i) for b in ev for i in b["index"]] == [0, 1, 2, 3, 4]
    assert not isinstance(ev.dataset.dataset, SeededSamples)


def test_segmentation_crops_match_with_and_without_workers():
    """The task's own per-sample transform (RandomCropPad, mmseg's resize-crop-flip) draws per position."""
    import densefuse
    from tests.test_engine import tiny_cfg

    for pipeline in ("batch", "mmseg"):
        cfg = tiny_cfg(f"data.pipeline={pipeline}", "data.kwargs.size=[40,48]")
        data = densefuse.get_task("seg", cfg).build_dataset(cfg, "train")
        runs = []
        for workers in (0, 2):
            it = iter(build_loader(data, 2, train=True, num_workers=workers, seed=0))
            runs.append([next(it) for _ in range(3)])
        for a, b in zip(*runs):
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
        assert runs[0][0]["image"].shape[-2:] == (32, 32)
