"""Verification during training: every rank embeds a slice of each .bin set, rank 0 scores them and
logs arcface_torch's three lines per set (``[lfw][step]XNorm``, ``Accuracy-Flip``, ``Accuracy-Highest``,
the best accuracy of the set so far), so that log parsers written for arcface_torch read lvface's logs.

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
from lvface.eval.verification import arcface_log_lines, embed_with_norms, evaluate_pairs, verification_set_names, xnorm

log = logging.getLogger(__name__)


class VerificationCallback:
    def __init__(self, bins: list[str], batch_size: int, *, rank: int, world_size: int, group, device):
        self.rank, self.world_size, self.group, self.device = rank, world_size, group, device
        self.batch_size = batch_size
        self.sets = []
        for name, path in zip(verification_set_names(bins), bins):
            images, issame = load_bin(path)
            self.sets.append((name, images, issame))
        self.highest: dict[str, float] = {name: 0.0 for name, _, _ in self.sets}  # Accuracy-Highest per set

    def __bool__(self) -> bool:
        return bool(self.sets)

    def _embed_all(self, module: torch.nn.Module, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(flip-sum embeddings (n, D), per-image raw norm sums (n,)) of all ranks' slices."""
        per_rank = math.ceil(len(images) / self.world_size)
        mine = images[self.rank * per_rank:(self.rank + 1) * per_rank]
        if len(mine) < per_rank:  # pad with the last image so every rank runs the same batches
            filler = images[-1:].expand(per_rank - len(mine), *images.shape[1:])
            mine = torch.cat([mine, filler]) if len(mine) else filler
        dtype = next(module.parameters()).dtype

        def model_fn(batch: torch.Tensor) -> torch.Tensor:
            return module(batch.to(self.device, dtype)).float()

        embeddings, norm_sums = embed_with_norms(model_fn, mine, self.batch_size)
        if self.world_size == 1:
            return embeddings[: len(images)], norm_sums[: len(images)]
        # the norms travel as one more column, so one collective gathers both
        local = torch.from_numpy(np.concatenate([embeddings, norm_sums[:, None]], axis=1)).to(self.device)
        gathered = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(gathered, local, group=self.group)
        everything = torch.cat(gathered).cpu().numpy()[: len(images)]
        return np.ascontiguousarray(everything[:, :-1]), everything[:, -1]

    @torch.no_grad()
    def __call__(self, module: torch.nn.Module, step: int) -> dict[str, dict]:
        was_training = module.training
        module.eval()
        results = {}
        try:
            for name, images, issame in self.sets:
                embeddings, norm_sums = self._embed_all(module, images)
                if self.rank == 0:
                    result = {**evaluate_pairs(embeddings, issame), "xnorm": xnorm(norm_sums)}
                    self.highest[name] = max(self.highest[name], result["accuracy"])
                    result["accuracy_highest"] = self.highest[name]
                    results[name] = result
                    for line in arcface_log_lines(name, step, result, self.highest[name]):
                        log.info("%s", line)
        finally:
            module.train(was_training)
        return results
