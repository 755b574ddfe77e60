"""Partial-FC selection on the tensor's device: which of this shard's classes the margin softmax uses.

    rows, targets = select_rows(local_labels, num_local, sample_rate, sample_seed(seed, step, class_start))

A fixed number of rows, int(sample_rate * C_local) (as PartialFC_V2): every positive (a class of this
shard present in the global batch) first, then uniformly random negatives. Positives are marked with a
scatter-max (deterministic with repeated labels), priorities are uniform draws u from a
torch.Generator on the labels' device seeded by (seed, step, class_start), a positive's priority is
1 + u (above every negative's), and topk picks the rows - all on the device. Labels are remapped to
positions in the sorted rows with searchsorted. The draw is counter-based: a resumed run that
restores `step` redraws the same sample on the same device type (CPU and CUDA generators are
different streams).

No host sync: the sample's size depends on the configuration alone. When a step's positives exceed
the budget (more distinct classes of this shard in the global batch than int(sample_rate * C_local),
possible only when the budget is below the global batch N), a uniformly random subset of the positives
fills the sample; the rows whose class was left out get target -1 here - their loss is the log-sum-exp
over the sampled classes with no positive logit - and the head counts them into the step's flags
(lvface.engine.train_step logs the count). Raise sample_rate so that
int(sample_rate * C_local) >= N to rule it out. While the positives fit, the sample is exactly the one
a sample sized max(budget, positives) would draw.

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
    labels remapped to positions in `rows` (-1 stays -1, and so does a positive left out of a full sample).

    local_labels [N] int64: each gathered row's class as a local row of this shard, -1 for other shards.
    """
    budget = sample_budget(num_local, sample_rate)
    if budget >= num_local:
        return None, local_labels
    if budget == 0:  # a sample of no class: every row's class is left out
        return local_labels.new_zeros(0), torch.full_like(local_labels, -1)
    device = local_labels.device
    here = local_labels >= 0
    is_positive = torch.zeros(num_local, dtype=torch.int32, device=device).scatter_reduce_(
        0, local_labels.clamp(min=0), here.to(torch.int32), reduce="amax"
    )  # (C_local,) 1 where a row's class is in the batch
    generator = torch.Generator(device=device).manual_seed(seed)
    priority = torch.rand(num_local, generator=generator, device=device)  # top-k of iid uniforms: uniform
    priority = torch.where(is_positive.bool(), priority + 1.0, priority)  # positives first, random among them
    rows = torch.topk(priority, budget, sorted=False).indices.sort().values  # (k,)
    position = torch.searchsorted(rows, local_labels.clamp(min=0)).clamp(max=budget - 1)
    sampled = rows.index_select(0, position) == local_labels  # the row's class made it into the sample
    return rows, torch.where(here & sampled, position, torch.full_like(local_labels, -1))


def host_select_rows(
    local_labels: torch.Tensor, num_local: int, sample_rate: float, seed: int
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """A host-side sampler (unique positives, CPU rand + topk, the sample grown to hold every positive),
    the benchmark's baseline; on the CPU it draws the same rows as select_rows while the positives fit
    the budget. One host sync (the positives)."""
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
