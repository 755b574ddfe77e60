"""The run's length and learning-rate schedule, counted in samples.

Length and schedule are counted in samples, in steps of the global batch the run started with (the
reference batch), so that a resume on another world size stops at the same point with the same
learning rates. One function of the optimizer step (`lr_factor`) drives the backbone and the head.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch

from lvface.config import Config, ConfigError

log = logging.getLogger("lvface.train")  # its lines are part of the training log


def lr_factor(step: int, total_steps: int, warmup_steps: int, decay: str, power: float, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based).

    Linear warmup over `warmup_steps` (the first step already moves: (step + 1) / warmup), then
    polynomial (1 - progress) ** power, cosine, or constant decay from 1 to `min_ratio`.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant":
        return 1.0
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    if decay == "polynomial":
        shape = (1.0 - progress) ** power
    elif decay == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ConfigError(f"schedule.decay {decay!r} is not one of polynomial, cosine, constant")
    return min_ratio + (1.0 - min_ratio) * shape


def set_schedule_position(scheduler: torch.optim.lr_scheduler.LambdaLR, step: int) -> None:
    """Put a LambdaLR at optimizer step `step` (after a resume, possibly with another global batch)."""
    scheduler.last_epoch = step
    for group, base_lr, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * factor(step)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def build_lr_lambda(cfg: Config, total_steps: int, steps_per_epoch: int) -> Callable[[int], float]:
    sched = cfg.schedule
    warmup = sched.warmup_steps if sched.warmup_steps > 0 else int(round(sched.warmup_epochs * steps_per_epoch))
    return lambda step: lr_factor(step, total_steps, warmup, sched.decay, sched.power, sched.min_lr_ratio)


@dataclass(frozen=True)
class Schedule:
    """The sample-counted arithmetic of one run on this world size."""

    images_per_step: int
    """Samples per optimizer step now (batch x accumulation x ranks)."""
    reference_batch: int
    """Samples per optimizer step of the run's first start: the unit of length and schedule."""
    samples_per_epoch: int
    reference_total: int
    """The run's length in reference steps (train.max_steps, else the epochs)."""

    @classmethod
    def build(cls, cfg: Config, loader, world_size: int, reference_batch: int = 0) -> "Schedule":
        """The schedule of `loader`'s epochs (lvface.data.loader.TrainLoader on this rank); `reference_batch`
        is the saved one on a resume (0: this start is the reference)."""
        accum = cfg.train.gradient_accumulation_steps
        if loader.batches_per_epoch < accum:
            raise ConfigError(f"{cfg.data.rec}: {loader.num_images} images give {loader.batches_per_epoch} batches "
                              f"of {cfg.data.batch_size} per rank on {world_size} ranks, fewer than "
                              f"train.gradient_accumulation_steps={accum}: lower data.batch_size")
        images_per_step = cfg.data.batch_size * accum * world_size
        reference_batch = reference_batch or images_per_step
        samples_per_epoch = loader.batches_per_epoch * cfg.data.batch_size * world_size
        reference_steps_per_epoch = samples_per_epoch / reference_batch
        reference_total = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * reference_steps_per_epoch))
        schedule = cls(images_per_step, reference_batch, samples_per_epoch, reference_total)
        log.info("%d images, %d identities; %.1f optimizer steps per epoch of %d images; %d steps in all",
                 loader.num_images, loader.num_classes, samples_per_epoch / images_per_step, images_per_step,
                 schedule.total_steps)
        return schedule

    @property
    def total_steps(self) -> int:
        """The run's length in optimizer steps of this world size."""
        return math.ceil(self.reference_total * self.reference_batch / self.images_per_step)

    def step_at(self, samples_seen: int) -> int:
        return samples_seen // self.images_per_step

    def epoch_at(self, samples_seen: int) -> float:
        """Fractional epoch: what the head's stages and the progress log count in."""
        return samples_seen / self.samples_per_epoch

    def lr_lambda(self, cfg: Config) -> Callable[[int], float]:
        """LR factor of an optimizer step of this world size: the reference schedule at the same samples."""
        reference_lr = build_lr_lambda(cfg, self.reference_total, round(self.samples_per_epoch / self.reference_batch))
        step_scale = self.images_per_step / self.reference_batch
        return reference_lr if step_scale == 1 else (lambda step: reference_lr(step * step_scale))
