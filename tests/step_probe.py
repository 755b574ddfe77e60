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
