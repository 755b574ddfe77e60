"""Verification during training: every rank embeds a slice of each .bin set, rank 0 scores them.

Splitting the images over ranks keeps evaluation cheap on large worlds and is required under ZeRO-3,
where a forward pass needs every rank. Each rank runs the same number of batches (slices are padded
to equal length) so the collectives line up.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.distributed as dist

from lvface.data.verification_bin import load_bin
from lvface.eval.verification import embed_flip_sum, evaluate_pairs, verification_set_names

log = logging.getLogger(__name__)


class VerificationCallback:
    def __init__(self, bins: list[str], batch_size: int, *, rank: int, world_size: int, group, device):
        self.rank, self.world_size, self.group, self.device = rank, world_size, group, device
        self.batch_size = batch_size
        self.sets = []
        for name, path in zip(verification_set_names(bins), bins):
            images, issame = load_bin(path)
            self.sets.append((name, images, issame))

    def __bool__(self) -> bool:
        return bool(self.sets)

    def _embed_all(self, module: torch.nn.Module, images: torch.Tensor) -> np.ndarray:
        per_rank = math.ceil(len(images) / self.world_size)
        mine = images[self.rank * per_rank:(self.rank + 1) * per_rank]
        if len(mine) < per_rank:  # pad with the last image so every rank runs the same batches
            filler = images[-1:].expand(per_rank - len(mine), *images.shape[1:])
            mine = torch.cat([mine, filler]) if len(mine) else filler
        dtype = next(module.parameters()).dtype

        def model_fn(batch: torch.Tensor) -> torch.Tensor:
            return module(batch.to(self.device, dtype)).float()

        local = torch.from_numpy(np.ascontiguousarray(embed_flip_sum(model_fn, mine, self.batch_size)))
        local = local.to(self.device)
        if self.world_size == 1:
            return local.cpu().numpy()[: len(images)]
        gathered = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(gathered, local, group=self.group)
        return torch.cat(gathered).cpu().numpy()[: len(images)]

    @torch.no_grad()
    def __call__(self, module: torch.nn.Module, step: int) -> dict[str, dict]:
        was_training = module.training
        module.eval()
        results = {}
        try:
            for name, images, issame in self.sets:
                embeddings = self._embed_all(module, images)
                if self.rank == 0:
                    result = evaluate_pairs(embeddings, issame)
                    results[name] = result
                    log.info("verification %s at step %d: accuracy %.4f +- %.4f", name, step,
                             result["accuracy"], result["accuracy_std"])
        finally:
            module.train(was_training)
        return results
