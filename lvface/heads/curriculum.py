"""The loss curriculum: which stage is active when, and what a stage asks of the head.

Stages (LossConfig.stages, StageConfig): ordered, each active for epochs [previous end, end_epoch),
with its Partial-FC sample rate, the centers the margin softmax uses (learned W, prototypes P, or
both: loss = (1 - w) * CE(W) + w * CE(P), P detached, gradients reach the embeddings) and an optional
penalty weight * mean_n ||normalize(W_{y_n}) - P_{y_n}||^2 pulling learned centers toward prototypes.
The paper's two stages are the default; a three-stage schedule (sampling; sampling + penalty; full
softmax with prototypes) is three entries of the same list.

The rules a stage list must follow (non-empty, each stage's fields in range, end epochs increasing)
are checked by StageConfig.validate and LossConfig.validate in lvface/config.py; the functions here
take a validated curriculum.
"""

from __future__ import annotations

CENTERS = ("learned", "prototypes", "both")
"""The values of a stage's `centers` (read by the config's validation)."""


def stage_for_epoch(stages: list, epoch: float):
    """The stage active at `epoch` (fractional epochs allowed): the first whose end_epoch > epoch; the
    last stage past the end of the schedule."""
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
