"""A torch Dataset over the image records of an insightface ``train.rec`` (the DALI-less path).

Decoding is PIL on the CPU; the production loader (sharding, resume position) builds on this.
"""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, get_worker_info

from lvface.data.recordio import InsightFaceRecord
from lvface.eval.verification import normalize_images


class RecordDataset(Dataset):
    """(image float (3, S, S) in [-1, 1], label int64) for each image record of ``rec_path``.

    In train mode each image is flipped horizontally with probability ``flip_p``, drawn from a
    per-process generator seeded with (seed, epoch, worker id): call ``set_epoch`` before each epoch
    for new flips (DataLoader workers get a fresh copy of the dataset every epoch unless
    ``persistent_workers``). Picklable: the .rec is memory-mapped lazily in each process.
    """

    def __init__(self, rec_path: str, *, train: bool, flip_p: float = 0.5, seed: int = 0,
                 image_size: int = 112, idx_path: str | None = None):
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
