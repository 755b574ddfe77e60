"""Partial-FC selection on the tensor's device: which of this shard's classes the margin softmax uses.

    rows, targets = select_rows(local_labels, num_local, sample_rate, sample_seed(seed, step, class_start))

Every positive (a class of this shard present in the global batch) is kept, then uniformly random
negatives up to int(sample_rate * C_local) rows in all (all positives when they exceed it). Positives
are marked with a scatter-max (deterministic with repeated labels), priorities are uniform draws from a
torch.Generator on the labels' device seeded by (seed, step, class_start), positives get priority 2,
and topk picks the rows - all on the device. Labels are remapped to positions in the sorted rows with
searchsorted. The draw is counter-based: a resumed run that restores `step` redraws the same sample
on the same device type (CPU and CUDA generators are different streams).

Host syncs: at most one per call, reading the number of positives to size the sample - and none when
the budget is at least the batch size N (then every positive fits whatever the labels). The previous
sampler drew on the host (torch.rand + topk on the CPU, positives copied to the host).

Why not a Triton kernel: the work is one rand, one topk, one sort and one searchsorted over C_local
(32k at the WebFace42M shape) - a few kernel launches of microseconds each, against a margin softmax of
milliseconds; a fused kernel would save launches, not time that shows (see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import torch

from lvface.hashing import GOLDEN_GAMMA, fold


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 folded over them): counter-based, so a stream can be
    recreated from (seed, step, shard) after a resume without saving generator state."""
    return fold(*values, start=GOLDEN_GAMMA) >> 1


def sample_seed(seed: int, step: int, class_start: int) -> int:
    """The seed of the sample drawn at `step` by the shard starting at `class_start`."""
    return mix_seed(seed, step, class_start)


def sample_budget(num_local: int, sample_rate: float) -> int:
    return int(sample_rate * num_local)


def select_rows(
    local_labels: torch.Tensor, num_local: int, sample_rate: float, seed: int
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(rows, targets): the sorted local rows to use [k] int64 (None when every row is kept) and the
    labels remapped to positions in `rows` (-1 stays -1).

    local_labels [N] int64: each gathered row's class as a local row of this shard, -1 for other shards.
    """
    budget = sample_budget(num_local, sample_rate)
    if budget >= num_local:
        return None, local_labels
    device = local_labels.device
    here = local_labels >= 0
    is_positive = torch.zeros(num_local, dtype=torch.int32, device=device).scatter_reduce_(
        0, local_labels.clamp(min=0), here.to(torch.int32), reduce="amax"
    )  # (C_local,) 1 where a row's class is in the batch
    size = budget
    if budget < local_labels.numel():  # positives might exceed the budget: one host read
        size = max(budget, int(is_positive.sum()))
    if size >= num_local:
        return None, local_labels
    generator = torch.Generator(device=device).manual_seed(seed)
    priority = torch.rand(num_local, generator=generator, device=device)  # top-k of iid uniforms: uniform
    priority = torch.where(is_positive.bool(), torch.full_like(priority, 2.0), priority)  # positives first
    rows = torch.topk(priority, size, sorted=False).indices.sort().values  # (k,)
    # positives are all in `rows`, so searchsorted finds each one's position exactly
    targets = torch.where(here, torch.searchsorted(rows, local_labels.clamp(min=0)), local_labels)
    return rows, targets


def host_select_rows(
    local_labels: torch.Tensor, num_local: int, sample_rate: float, seed: int
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The previous host-side sampler (unique positives, CPU rand + topk), kept as the benchmark's
    baseline; on the CPU it draws the same rows as select_rows."""
    here = local_labels >= 0
    positives = local_labels[here].unique().cpu()
    budget = max(sample_budget(num_local, sample_rate), positives.numel())
    if budget >= num_local:
        return None, local_labels
    score = torch.rand(num_local, generator=torch.Generator().manual_seed(seed))
    score[positives] = 2.0
    rows = torch.topk(score, budget, sorted=False).indices.sort().values.to(local_labels.device)
    targets = torch.where(here, torch.searchsorted(rows, local_labels.clamp(min=0)), local_labels)
    return rows, targets
