"""The loader contract both training loaders keep (lvface/data/torch_loader.py, lvface/data/dali.py).

Both read the same samples in the same order (`GlobalOrder`: an exact permutation per epoch, sliced
by rank, resumable from a global position on any world size), apply the same augmentation parameters
(`AugmentSpec.draw`), replace an undecodable image the same way, and return normalised float images and
int64 labels on the training device. A JPEG that fails to decode during training is not an error: it
is skipped and replaced (`TrainLoader._replacement`), counted in `bad_records` and logged with its file
and offset.
"""
from __future__ import annotations

import logging
from typing import Callable, Iterator

import numpy as np
import torch

from lvface.config import ConfigError
from lvface.data.augment import AugmentParams, AugmentSpec
from lvface.data.index import RecordIndex
from lvface.data.recordio import RecordIOError
from lvface.data.sampler import GlobalOrder

logger = logging.getLogger(__name__)

MAX_REPLACEMENT_TRIES = 1024


class TrainLoader:
    """Batches of one rank: ``for epoch: loader.set_epoch(epoch); for images, labels in loader``.

    images: float32 (B, 3, 112, 112) normalised (x / 255 - 0.5) / 0.5 on ``device``; labels: int64 (B,).
    A resumed run passes ``set_epoch`` the saved ``position()`` (global samples of that epoch already
    consumed, on any world size).
    """

    def __init__(self, index: RecordIndex, data_cfg, *, rank: int, world_size: int, seed: int,
                 device: torch.device):
        self.index = index
        self.spec = AugmentSpec.from_config(data_cfg)
        self.order = GlobalOrder(index.num_images, seed=seed, batch_size=data_cfg.batch_size,
                                 world_size=world_size, rank=rank)
        if self.order.batches_per_epoch == 0:
            raise ConfigError(f"{index.files[0]}: {index.num_images} images give no batch of data.batch_size="
                              f"{data_cfg.batch_size} per rank on {world_size} ranks: lower data.batch_size")
        self.seed = int(seed)
        self.device = torch.device(device)
        self.epoch = 0
        self._start = self._position = 0
        self.bad_records = 0

    num_images = property(lambda self: self.index.num_images)
    num_classes = property(lambda self: self.index.num_classes)
    batch_size = property(lambda self: self.order.batch_size)

    @property
    def batches_per_epoch(self) -> int:
        """Batches per rank in a whole epoch, equal on every rank (the ragged tail is dropped)."""
        return self.order.batches_per_epoch

    def set_epoch(self, epoch: int, start_sample: int = 0) -> None:
        """Start ``epoch`` at global position ``start_sample`` (a resumed run's saved ``position()``)."""
        self.order.check_start(start_sample)
        self.epoch = int(epoch)
        self._start = self._position = int(start_sample)

    def position(self) -> int:
        """Global samples of the current epoch consumed so far (all ranks), counting the batches yielded."""
        return self._position

    def __len__(self) -> int:
        """Batches of the current pass (fewer than batches_per_epoch after a mid-epoch resume)."""
        return self.order.batches_from(self._start)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, start = self.epoch, self._start
        self._position = start
        for images, labels in self._batches(epoch, start):
            self._position += self.order.global_batch
            yield images, labels

    def _batches(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def close(self) -> None:
        """Release worker processes or pipelines (the loader can be iterated again afterwards)."""

    # -- pieces shared by the implementations -----------------------------------------------------
    def _job(self, epoch: int, start: int, batch: int) -> tuple[np.ndarray, np.ndarray, AugmentParams]:
        """(global positions, image indices, augmentation parameters) of this rank's batch."""
        positions = self.order.positions(start, batch)
        return positions, self.order.items(epoch, positions), self.spec.draw(self.seed, epoch, positions)

    def _labels(self, items: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self.index.labels(items)).to(self.device, non_blocking=True)

    def _replacement(self, epoch: int, start: int, batch: int, slot: int, item: int,
                     decodes: Callable[[int], bool]) -> int:
        """An image to stand in for the undecodable ``item`` in ``slot`` of ``batch``: the first that
        decodes among the next samples of this rank's shard of the pass (wrapping), so shapes and the
        rank's share hold. Counts and logs the bad record."""
        local = batch * self.order.batch_size + slot
        count = self.order.batches_from(start) * self.order.batch_size
        self.bad_records += 1
        for step in range(1, min(count, MAX_REPLACEMENT_TRIES + 1)):
            position = self.order.local_position(start, (local + step) % count)
            candidate = int(self.order.items(epoch, np.array([position]))[0])
            if decodes(candidate):
                logger.warning("undecodable image skipped: %s (epoch %d, global position %d); replaced by %s "
                               "(%d bad records so far on rank %d)", self.index.where(item), epoch,
                               int(self.order.local_position(start, local)), self.index.where(candidate),
                               self.bad_records, self.order.rank)
                return candidate
        raise RecordIOError(f"{self.index.where(item)}: the image does not decode, nor do the next "
                            f"{min(count - 1, MAX_REPLACEMENT_TRIES)} images of rank {self.order.rank}'s shard; "
                            f"the data is not images this decoder reads (run `lvface inspect --verify`)")
