"""A seeded, rank-sharded sampler that can start mid-epoch (resume)."""

from __future__ import annotations

import torch
from torch.utils.data import DistributedSampler


class ResumableDistributedSampler(DistributedSampler):
    """torch's DistributedSampler (global shuffle per epoch from `seed + epoch`, equal shards with the
    ragged tail dropped) that skips the first `start` samples of this rank's shard once, after resume."""

    def __init__(self, dataset, *, num_replicas: int, rank: int, seed: int, shuffle: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.start = 0

    def set_start(self, start: int) -> None:
        """Skip the first `start` samples of this rank's shard in the current epoch."""
        self.start = start

    def __iter__(self):
        indices = list(super().__iter__())[self.start:]
        self.start = 0
        return iter(indices)

    def __len__(self) -> int:
        return self.num_samples - self.start


def epoch_order(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The global permutation DistributedSampler uses for an epoch (for tests and tools)."""
    generator = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(num_samples, generator=generator)
