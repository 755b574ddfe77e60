"""EPL empirical prototypes and the loss curriculum's stages.

Prototypes (EPL, Fan et al. 2024, arXiv 2405.12447): P_j is the expectation of the normalised features
of class j, kept as a running average in a buffer P_local [C_local, D] beside the learned centers
W_local. It has no gradient; it moves only through `update_prototypes_`:

    m_j = normalize(mean of the normalised features of class j in the global batch)
    a_j = sigmoid(cos(P_j, m_j))            prototype_update = "adaptive" (EPL's similarity-adaptive
                                                                 factor alpha_x = sigma(s(x, P)))
    a_j = prototype_momentum                prototype_update = "momentum"
    P_j <- normalize(a_j * P_j + (1 - a_j) * m_j)

applied once per class present in the global batch (every rank sees the gathered batch, so each
updates its own shard with no communication), from the class mean: a class with k samples in the batch
moves once, deterministically, rather than k times in a last-writer-wins scatter. EPL updates per
sample; with one sample per class the two agree exactly.

P starts at zero. A zero row has cosine 0 with anything, so its first update gives
normalize(a * 0 + (1 - a) * m_j) = m_j under either rule: a class's prototype is its first batch mean,
with no "seen" flag. A class never seen keeps P_j = 0 (its prototype logit is s * 0).

Stages (LossConfig.stages, StageConfig): ordered, each active for epochs [previous end, end_epoch),
with its Partial-FC sample rate, the centers the margin softmax uses (learned W, prototypes P, or
both: loss = (1 - w) * CE(W) + w * CE(P), P detached, gradients reach the embeddings) and an optional
penalty weight * mean_n ||normalize(W_{y_n}) - P_{y_n}||^2 pulling learned centers toward prototypes.
The paper's two stages are the default; a three-stage schedule (sampling; sampling + penalty; full
softmax with prototypes) is three entries of the same list.
"""

from __future__ import annotations

import torch

from lvface.kernels.epl_update import (  # noqa: F401 (re-exported: the update's home is kernels/)
    MODES as PROTOTYPE_UPDATES,
    ClassSums,
    class_feature_sums,
    prototype_factor,
    update_prototypes_,
)

CENTERS = ("learned", "prototypes", "both")


# --------------------------------------------------------------------------------------------------
# Prototype update: the math lives in lvface/kernels/epl_update.py (torch reference + Triton kernel)
# --------------------------------------------------------------------------------------------------


def merge_class_sums(parts: list[ClassSums]) -> ClassSums:
    """Merge several (ids, sums, counts) into one, summing the entries of a repeated id."""
    ids = torch.cat([p[0] for p in parts])
    unique, inverse = torch.unique(ids, sorted=True, return_inverse=True)
    features = torch.cat([p[1] for p in parts])
    sums = features.new_zeros(unique.numel(), features.shape[1]).index_add_(0, inverse, features)
    counts = torch.zeros(unique.numel(), dtype=torch.int64, device=ids.device).index_add_(
        0, inverse, torch.cat([p[2] for p in parts])
    )
    return unique, sums, counts


# --------------------------------------------------------------------------------------------------
# Curriculum stages
# --------------------------------------------------------------------------------------------------


def check_stage(stage, where: str | None = None) -> None:
    """Raise ValueError if one stage cannot be used by the head; `where` names it in the message
    (config.validate passes "loss.stages[i]"; stages built in code are named by stage.name)."""
    where = where or f"stage '{stage.name}'"
    if stage.centers not in CENTERS:
        raise ValueError(f"'{where}.centers' is {stage.centers!r}; choose one of {', '.join(CENTERS)}")
    if not 0.0 < stage.sample_rate <= 1.0:
        raise ValueError(f"'{where}.sample_rate' is {stage.sample_rate}; it must be in (0, 1]")
    if not 0.0 <= stage.prototype_weight <= 1.0:
        raise ValueError(f"'{where}.prototype_weight' is {stage.prototype_weight}; it must be in [0, 1]")
    if stage.center_penalty < 0.0:
        raise ValueError(f"'{where}.center_penalty' is {stage.center_penalty}; it must be >= 0")


def check_stages(stages: list) -> None:
    """Raise ValueError unless `stages` is a usable curriculum: non-empty, each stage valid, end epochs
    strictly increasing. The one home of the stage rules (config.validate calls it)."""
    if not stages:
        raise ValueError("'loss.stages' is empty; give at least one stage")
    previous = 0.0
    for i, stage in enumerate(stages):
        check_stage(stage, f"loss.stages[{i}]")
        if stage.end_epoch <= previous:
            raise ValueError(f"'loss.stages[{i}].end_epoch' is {stage.end_epoch}, not after the previous stage's "
                             f"end {previous}; stages must be in increasing order")
        previous = stage.end_epoch


def stage_for_epoch(stages: list, epoch: float):
    """The stage active at `epoch` (fractional epochs allowed): the first whose end_epoch > epoch; the
    last stage past the end of the schedule."""
    if not stages:
        raise ValueError("loss.stages is empty; give at least one stage")
    for stage in stages:
        if epoch < stage.end_epoch:
            return stage
    return stages[-1]


def describe_stage(stage) -> str:
    text = f"'{stage.name}' (until epoch {stage.end_epoch:g}): sample_rate={stage.sample_rate:g}"
    text += f", centers={stage.centers}"
    if stage.centers == "both":
        text += f", prototype_weight={stage.prototype_weight:g}"
    if stage.center_penalty > 0:
        text += f", center_penalty={stage.center_penalty:g}"
    return text


def uses_learned_centers(stage) -> bool:
    """Whether W takes part in the stage's loss (through a CE term or the penalty)."""
    return stage.centers in ("learned", "both") or stage.center_penalty > 0.0
