"""Batches across epoch boundaries: what the training step draws from."""

from __future__ import annotations

import torch


class EpochBatches:
    """`next_batch()` for train_step: this rank's batches from `position` of `epoch` on, rolling over into
    the next epoch; `epoch` is the epoch of the last batch drawn (saved in checkpoints)."""

    def __init__(self, loader, epoch: int, position: int):
        self.loader, self.epoch = loader, epoch
        loader.set_epoch(epoch, start_sample=position)
        self.batches = iter(loader)

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return next(self.batches)
        except StopIteration:
            self.epoch += 1
            self.loader.set_epoch(self.epoch)
            self.batches = iter(self.loader)
            return next(self.batches)
