"""A `metrics` argument for lvface.engine.train_step that lets a test look inside the real step.

train_step times its phases through `metrics.timer(name)` and `metrics.backward_timer(embeddings)`;
this stand-in times nothing and instead records the embeddings' dtype and calls `at_boundary()` once,
when the step enters its optimizer phase at the accumulation boundary: after every backward, before
either optimizer has applied (and cleared) the gradients.
"""

from __future__ import annotations

import contextlib
from typing import Callable


class StepProbe:
    def __init__(self, at_boundary: Callable[[], None] = lambda: None, accumulation: int = 1):
        self.at_boundary, self.optimizer_phases_left = at_boundary, accumulation
        self.embedding_dtypes: list = []

    @contextlib.contextmanager
    def timer(self, name: str):
        if name == "optimizer":  # once per micro-batch: only the last one is the boundary
            self.optimizer_phases_left -= 1
            if self.optimizer_phases_left == 0:
                self.at_boundary()
        yield

    @contextlib.contextmanager
    def backward_timer(self, embeddings):
        self.embedding_dtypes.append(embeddings.dtype)
        yield

    def count(self, name: str, amount: float = 1) -> None:
        pass


def tiny_engine_and_head(cfg, world_size: int, group):
    """A vit_demo (width 32, depth 2) in a ZeRO-2 engine, a 12-class head and its optimizer, built from
    `cfg` as the trainer builds them: the smallest real objects a step or a save runs on."""
    import torch

    from lvface.engine import build_ds_config, build_engine, param_groups
    from lvface.heads import ShardedMarginHead, build_head_optimizer
    from lvface.models import build_vit

    repo = __import__("pathlib").Path(__file__).resolve().parents[1]
    torch.manual_seed(0)
    model = build_vit("vit_demo", embed_dim=32, depth=2)
    engine = build_engine(model, build_ds_config(repo / "configs" / "zero2.json", cfg, world_size, torch.device("cpu")),
                          param_groups(model, 0.1), lambda s: 1.0)
    head = ShardedMarginHead(12, 512, cfg.loss, group=group, seed=0)
    return engine, head, build_head_optimizer(head, cfg.optimizer)
