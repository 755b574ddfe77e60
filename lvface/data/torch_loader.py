"""The torch DataLoader training loader: the fallback where DALI is absent, with DALI's semantics.

Worker processes decode with PIL (lvface/data/images.py) and augment with the parameters the base


class draws, so a run on this loader and one on DALI see the same samples in the same order. Also
`RecordDataset`, a plain map-style Dataset over one .rec for simple tools.
"""
from __future__ import annotations

import io
import logging

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, get_worker_info

from lvface.data.augment import AugmentParams, AugmentSpec, apply_torch, flip_chw
from lvface.data.base import TrainLoader
from lvface.data.images import IMAGE_SIZE, decode_image, normalize_images
from lvface.data.index import RecordIndex
from lvface.data.recordio import InsightFaceRecord
from lvface.data.sampler import GlobalOrder
from lvface.preemption import ignore_stop_signals

logger = logging.getLogger(__name__)


def _decode_augment(index: RecordIndex, items: np.ndarray, params: AugmentParams, spec: AugmentSpec):
    """uint8 (B, 3, S, S) images of ``items`` augmented with ``params``; slots that failed to decode
    are left zero and listed."""
    size = spec.image_size
    pixels = np.zeros((len(items), size, size, 3), np.uint8)
    bad = []
    for slot, payload in enumerate(index.payloads(items)):
        image = decode_image(payload, size)
        if image is None:
            bad.append(slot)
        else:
            pixels[slot] = image
    images = apply_torch(torch.from_numpy(pixels), params, spec).permute(0, 3, 1, 2).contiguous()
    return flip_chw(images, params.flip), bad


class _BatchDecoder(Dataset):
    """Map-style dataset whose items are whole batches: (epoch, start, batch) -> uint8 images, items, bad
    slots. Workers compute the order and the augmentation parameters themselves (a few integers cross the
    process boundary, not index arrays)."""

    def __init__(self, loader: "TorchTrainLoader"):
        self.index, self.order, self.spec, self.seed = loader.index, loader.order, loader.spec, loader.seed

    def __getitem__(self, job: tuple[int, int, int]):
        epoch, start, batch = job
        positions = self.order.positions(start, batch)
        items = self.order.items(epoch, positions)
        images, bad = _decode_augment(self.index, items, self.spec.draw(self.seed, epoch, positions), self.spec)
        return images, torch.from_numpy(items), bad


class _Jobs:
    """The DataLoader's sampler: the (epoch, start, batch) items of the current pass (set by the loader;
    it holds no reference to the loader, so the two form no cycle)."""

    def __init__(self, order: GlobalOrder):
        self.order, self.epoch, self.start = order, 0, 0

    def __iter__(self):
        return iter([(self.epoch, self.start, batch) for batch in range(len(self))])

    def __len__(self) -> int:
        return self.order.batches_from(self.start)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # one core per worker: decoding is the work
    ignore_stop_signals()  # Ctrl-C and SIGTERM reach the workers too: the rank stops them after its save


class TorchTrainLoader(TrainLoader):
    """The DataLoader path: ``num_workers`` processes decode whole batches with PIL and apply the
    augmentations in torch (uint8); the training process normalises on the device."""

    def __init__(self, index: RecordIndex, data_cfg, **kwargs):
        super().__init__(index, data_cfg, **kwargs)
        self._jobs = _Jobs(self.order)
        workers = data_cfg.num_workers
        self._loader = torch.utils.data.DataLoader(
            _BatchDecoder(self), batch_size=None, sampler=self._jobs, num_workers=workers,
            prefetch_factor=max(1, data_cfg.prefetch) if workers else None, persistent_workers=workers > 0,
            pin_memory=self.device.type == "cuda", worker_init_fn=_worker_init if workers else None)

    def _decodes(self, item: int) -> bool:
        return decode_image(self.index.payload(item), self.spec.image_size) is not None

    def _batches(self, epoch: int, start: int):
        self._jobs.epoch, self._jobs.start = epoch, start
        for batch, (images, items, bad) in enumerate(self._loader):
            if bad:
                positions = self.order.positions(start, batch)
                params = self.spec.draw(self.seed, epoch, positions)
                items = items.numpy().copy()
                for slot in bad:
                    items[slot] = self._replacement(epoch, start, batch, slot, int(items[slot]), self._decodes)
                    fixed, _ = _decode_augment(self.index, items[slot:slot + 1], params.take([slot]), self.spec)
                    images[slot] = fixed[0]
                items = torch.from_numpy(items)
            images = images.to(self.device, non_blocking=True)
            yield normalize_images(images), self._labels(items.numpy())

    def close(self) -> None:
        """Stop the worker processes now (they also stop when the loader is garbage-collected)."""
        iterator = getattr(self._loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self._loader._iterator = None


class RecordDataset(Dataset):
    """(image float (3, S, S) in [-1, 1], label int64) for each image record of ``rec_path``.

    In train mode each image is flipped horizontally with probability ``flip_p``, drawn from a
    per-process generator seeded with (seed, epoch, worker id): call ``set_epoch`` before each epoch
    for new flips (DataLoader workers get a fresh copy of the dataset every epoch unless
    ``persistent_workers``). Picklable: the .rec is memory-mapped lazily in each process. Training
    uses ``build_train_loader`` (global order, resume, augmentations); this is for simple reads.
    """

    def __init__(self, rec_path: str, *, train: bool, flip_p: float = 0.5, seed: int = 0,
                 image_size: int = IMAGE_SIZE, idx_path: str | None = None):
        self.record = InsightFaceRecord(rec_path, idx_path)
        self.train = train
        self.flip_p = flip_p if train else 0.0
        self.seed = seed
        self.image_size = image_size
        self.epoch = 0
        self._rng: np.random.Generator | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self._rng = None

    @property
    def labels(self) -> np.ndarray:
        """Class id of every item, int64 (no decoding)."""
        return self.record.labels

    @property
    def num_classes(self) -> int:
        return self.record.num_classes

    def __len__(self) -> int:
        return len(self.record)

    def _flip_rng(self) -> np.random.Generator:
        if self._rng is None:
            worker = get_worker_info()
            self._rng = np.random.default_rng([self.seed, self.epoch, worker.id if worker else 0])
        return self._rng

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        jpeg, label = self.record[index]
        image = Image.open(io.BytesIO(jpeg)).convert("RGB")
        if image.size != (self.image_size, self.image_size):
            image = image.resize((self.image_size, self.image_size), Image.BILINEAR)
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)  # (3, H, W)
        if self.flip_p > 0 and self._flip_rng().uniform() < self.flip_p:
            pixels = pixels.flip(2)
        return normalize_images(pixels), torch.tensor(label, dtype=torch.int64)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_rng"] = None  # each process draws its own flips
        return state
