"""Samplers that yield dataset keys (index, sample_seed): the seed fixes every CPU-side random
choice for that sample, so data are reproducible whatever the number of loader workers, and a
resumed run can skip exactly the samples it already consumed."""
from __future__ import annotations

import math

import torch
from torch.utils.data import Sampler

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, epoch, position) over 63 bits


def sample_seed(*parts: int) -> int:
    h = 0
    for p in parts:
        h = (h * _MIX + int(p) + 1) % (1 << 63)
    return h


class TrainSampler(Sampler):
    """Shuffled, sharded over ranks, with optional repeated augmentation (DeiT's RASampler,
    Hoffer et al. 2020): each index appears `repeats` times in a row of the global order and
    the order is dealt out round-robin, so the copies land on different ranks with different
    augmentations. An epoch stays `len(dataset)` samples long in all (as in DeiT).

    `set_epoch(epoch, start=k)` skips the first k samples of this rank's share (resume)."""

    def __init__(self, length: int, num_replicas: int = 1, rank: int = 0, seed: int = 0, repeats: int = 1):
        if repeats < 1:
            raise ValueError(f"repeats={repeats} must be >= 1")
        self.length, self.num_replicas, self.rank, self.seed, self.repeats = length, num_replicas, rank, seed, repeats
        self.num_samples = length // num_replicas
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.num_samples - self.start

    def __iter__(self):
        g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch))
        order = torch.randperm(self.length, generator=g)
        if self.repeats > 1:
            order = order.repeat_interleave(self.repeats)
        positions = range(self.rank, len(order), self.num_replicas)
        for k, pos in enumerate(positions):
            if k >= self.num_samples:
                break
            if k >= self.start:
                yield int(order[pos]), sample_seed(self.seed, self.epoch, pos)


class EvalSampler(Sampler):
    """Sharded without padding (rank r takes r, r+W, ...), so all-reduced counts cover every
    sample exactly once; a fixed seed per index makes the evaluation set identical every epoch.
    `seed` is the evaluation set's own seed, not the run's: train.py leaves it at 0, so runs with
    different `seed=` are scored on the same generated test set (cluttered MNIST, moving digits)."""

    def __init__(self, length: int, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        self.indices = range(rank, length, num_replicas)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        for i in self.indices:
            yield i, sample_seed(self.seed, -1, i)


def steps_per_epoch(sampler: TrainSampler, batch_size: int) -> int:
    """Optimizer steps in one full epoch (incomplete last batch dropped)."""
    return math.floor(sampler.num_samples / batch_size)
