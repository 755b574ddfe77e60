"""The classification side of training: margins, the class-sharded margin softmax, EPL prototypes and
the head's own optimizer. Nothing here creates a process group or reads a rank at import.
IMPLS (the values of loss.impl) is the table of lvface/kernels/registry.py, re-exported here."""

from lvface.heads.curriculum import stage_for_epoch
from lvface.heads.margin import Margin, margin_from_config
from lvface.heads.optim import HeadAdamW, build_head_optimizer
from lvface.heads.prototypes import update_prototypes_
from lvface.heads.sharded_softmax import (
    ShardedMarginHead,
    blockwise_margin_cross_entropy,
    dense_margin_cross_entropy,
    gather_embeddings,
    init_centers,
    shard_range,
)
from lvface.kernels.registry import IMPLS

__all__ = [
    "IMPLS",
    "HeadAdamW",
    "Margin",
    "ShardedMarginHead",
    "build_head_optimizer",
    "blockwise_margin_cross_entropy",
    "dense_margin_cross_entropy",
    "gather_embeddings",
    "init_centers",
    "margin_from_config",
    "shard_range",
    "stage_for_epoch",
    "update_prototypes_",
]
