"""Samplers, DataLoader construction and the per-sample CPU crop that makes fixed-size tensors
(:func:`densefuse.data.ops.crop` at a :class:`~densefuse.data.ops.Draw` offset).

Training samples are read under random states that depend only on the run's seed and the sample's
position in the infinite stream (:class:`SeededSamples`): a sample's random crop, flip or colour jitter
is the same with 0 or 8 DataLoader workers, in one process or sharded over many, and after a resume.
"""
from __future__ import annotations

import math
import random
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Sized

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from ..errors import DensefuseError
from ..tasks import DenseKey
from .augment import SAMPLE_SEED, SEG_KEYS, dense_items
from .ops import Draw, Fill, crop


def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class InfiniteSampler(Sampler[int]):
    """Endless index stream for iteration-based training (mmengine's ``InfiniteSampler``).

    Epoch ``e`` is a permutation drawn from ``seed + e`` (or ``range(n)`` without shuffle); under
    torch.distributed each rank takes every ``world_size``-th index of it, so ranks see disjoint
    samples. ``start`` skips that many indices of this rank's stream (for resuming at an iteration:
    ``start = iteration * batch_size``).
    """

    def __init__(
        self,
        dataset: Sized,
        shuffle: bool = True,
        seed: int = 0,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        start: int = 0,
    ) -> None:
        r, w = _dist_info()
        self.size = len(dataset)
        if self.size == 0:
            raise ValueError("InfiniteSampler needs a non-empty dataset")
        self.shuffle, self.seed, self.start = shuffle, int(seed), int(start)
        self.rank = r if rank is None else rank
        self.world_size = w if world_size is None else world_size

    def _epoch(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.size, generator=g).tolist()

    def _global(self) -> Iterator[int]:
        epoch = 0
        while True:
            yield from self._epoch(epoch)
            epoch += 1

    def positions(self) -> Iterator[tuple[int, int]]:
        """``(k, index)`` for this rank's stream, ``k`` being the index's position in the global
        (unsharded) stream: the same sample has the same ``k`` whatever the number of ranks."""
        skip = self.start
        for k, idx in enumerate(self._global()):
            if k % self.world_size != self.rank:
                continue
            if skip > 0:
                skip -= 1
                continue
            yield k, idx

    def __iter__(self) -> Iterator[int]:
        return (idx for _, idx in self.positions())

    def __len__(self) -> int:  # a nominal length: one epoch's share per rank
        return math.ceil(self.size / self.world_size)


class PositionSampler(Sampler[tuple[int, int]]):
    """The ``(k, index)`` pairs of an :class:`InfiniteSampler`, the keys a :class:`SeededSamples` reads."""

    def __init__(self, sampler: InfiniteSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return self.sampler.positions()

    def __len__(self) -> int:
        return len(self.sampler)


def sample_seeds(seed: int, position: int) -> tuple[int, int, int]:
    """Seeds (torch, numpy, python) for the sample at ``position`` of a stream seeded with ``seed``:
    numpy's ``SeedSequence`` mixes the two numbers, so neighbouring positions and seeds give unrelated
    states (``seed + position`` would make run 1's sample k draw like run 0's sample k + 1)."""
    words = np.random.SeedSequence([int(seed) % 2**64, int(position)]).generate_state(4, np.uint32)
    w = [int(x) for x in words]
    return (w[0] << 32) | w[1], w[2], w[3]


class _Wrapped(Dataset):
    """A dataset around another one that keeps its length and attributes (``num_classes``, ``samples``)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:  # num_classes, samples, ... of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


class SeededSamples(_Wrapped):
    """``dataset[index]`` read with python's, numpy's and torch's (CPU) global RNGs seeded from ``seed``
    and the sample's stream position: keys are ``(k, index)`` pairs (:class:`PositionSampler`).

    Per-sample transforms draw their random crops and flips from those global RNGs, so a sample's draws
    depend on ``(seed, k)`` only, not on which DataLoader worker reads it, how many there are, how many
    processes share the stream, or whether the run was resumed. In the main process (``num_workers``
    0) the RNG states are put back afterwards: reading data leaves the training process's own random
    stream (batch augmentation on the device, dropout) as it was.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        super().__init__(dataset)
        self.seed = int(seed)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        position, index = key
        if torch.utils.data.get_worker_info() is not None:  # a worker's RNG serves only its samples
            return self._read(position, index)
        py, npy = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            try:
                return self._read(position, index)
            finally:
                random.setstate(py)
                np.random.set_state(npy)

    def _read(self, position: int, index: int) -> Any:
        torch_seed, numpy_seed, python_seed = sample_seeds(self.seed, position)
        torch.default_generator.manual_seed(torch_seed)  # CPU only: CUDA's stream is the model's
        np.random.seed(numpy_seed)
        random.seed(python_seed)
        sample = self.dataset[index]
        if isinstance(sample, dict):  # the device-side batch augmentation and dropout draw from it
            sample = {**sample, SAMPLE_SEED: torch.tensor(sample_seeds(self.seed + 1, position)[0] % 2**63)}
        return sample


class ShardSampler(Sampler[int]):
    """Sequential evaluation indices ``rank::world_size``, without the padding duplicates of
    ``DistributedSampler`` (they would count some images twice in a dataset-level metric)."""

    def __init__(self, dataset: Sized, rank: Optional[int] = None, world_size: Optional[int] = None) -> None:
        r, w = _dist_info()
        self.size = len(dataset)
        self.rank = r if rank is None else rank
        self.world_size = w if world_size is None else world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world_size))


def _worker_init(worker_id: int) -> None:
    # torch seeds each worker (base_seed + id); seed numpy/random from it for user transforms too
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


class _UserError:
    """A user error raised in a DataLoader worker, carried back to the main process as data.

    torch re-raises worker exceptions with the worker's traceback pasted into the message; a
    :class:`DensefuseError` is an answer for the user (a corrupt file named in one line), so it travels
    as this marker instead and :class:`Loader` raises it again as itself."""

    def __init__(self, error: DensefuseError) -> None:
        self.type, self.message = type(error), str(error)

    def raise_(self) -> None:
        raise self.type(self.message)


class _CatchUserErrors(_Wrapped):
    """``dataset[i]``, or a :class:`_UserError` when reading the sample raised a DensefuseError."""

    def __getitem__(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except DensefuseError as e:
            return _UserError(e)


class _Collate:
    """The collate function, passing a worker's :class:`_UserError` through instead of collating."""

    def __init__(self, collate_fn: Callable[[list], Any]) -> None:
        self.collate_fn = collate_fn

    def __call__(self, samples: list) -> Any:
        for s in samples:
            if isinstance(s, _UserError):
                return s
        return self.collate_fn(samples)


class Loader(DataLoader):
    """A DataLoader whose user errors (:class:`DensefuseError` from reading a sample, also in worker
    processes) reach the caller as themselves, with their own one-line message. ``source`` is the
    dataset that was passed in. With ``sample_seed`` the sampler yields ``(k, index)`` pairs and each
    sample is read under random states seeded from ``(sample_seed, k)`` (:class:`SeededSamples`)."""

    def __init__(self, dataset: Dataset, *args: Any, collate_fn: Optional[Callable[[list], Any]] = None,
                 sample_seed: Optional[int] = None, **kwargs: Any) -> None:
        wrapped = dataset if sample_seed is None else SeededSamples(dataset, sample_seed)
        super().__init__(_CatchUserErrors(wrapped), *args, collate_fn=_Collate(collate_fn or default_collate), **kwargs)
        self.source = dataset

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        for batch in super().__iter__():
            if isinstance(batch, _UserError):
                batch.raise_()
            yield batch


def build_loader(
    dataset: Dataset,
    batch_size: int,
    train: bool,
    num_workers: int = 0,
    seed: int = 0,
    collate_fn: Optional[Callable[[list], Any]] = None,
    start_iter: int = 0,
) -> DataLoader:
    """DataLoader for training (infinite shuffled stream, ``drop_last``) or evaluation (one ordered pass,
    sharded over ranks). A training sample's random draws depend only on ``seed`` and its position in
    the stream (:class:`SeededSamples`): the same batches with any ``num_workers``, any number of
    processes sharing the global batch, and after a resume. ``start_iter`` resumes the training stream
    after that many batches."""
    sampler: Sampler
    if train:
        sampler = PositionSampler(InfiniteSampler(dataset, shuffle=True, seed=seed, start=start_iter * batch_size))
    else:
        sampler = ShardSampler(dataset)
    g = torch.Generator().manual_seed(int(seed) + _dist_info()[0])
    return Loader(
        dataset,
        sample_seed=int(seed) if train else None,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        drop_last=train,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        generator=g,
    )


class RandomCropPad:
    """Per-sample CPU transform: a random ``crop_size`` window, padded bottom/right when the image is
    smaller, so a batch collates to fixed-size tensors. The image is padded with ``fill`` (one value or
    one per channel) and every dense key of ``keys`` (the task's table, default labels -> 255) with its
    own fill. Leave ``generator`` unset in a training loader: each sample then draws from torch's global
    RNG, which :func:`build_loader` seeds per sample (a generator would be copied into every worker).

    Works on a sample dict with ``image`` (3,H,W) and dense keys (H,W) or (C,H,W); other keys pass
    through, and a per-pixel tensor the table does not declare is an error. mmseg's ``cat_max_ratio``
    re-drawing is not implemented here.
    """

    def __init__(
        self,
        crop_size: Sequence[int],
        keys: Optional[Mapping[str, DenseKey]] = None,
        fill: Fill = 0,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.keys = dict(SEG_KEYS if keys is None else keys)
        self.fill, self.generator = fill, generator

    def __call__(self, sample: dict) -> dict:
        list(dense_items(sample, self.keys))  # raises on a per-pixel map the table does not declare
        top, left = Draw(self.generator).crop_offset(sample["image"].shape[-2:], self.crop_size)
        return crop(sample, top, left, self.crop_size, self.keys, self.fill)

    def __repr__(self) -> str:
        return f"RandomCropPad(crop_size={self.crop_size}, keys={list(self.keys)}, fill={self.fill})"
