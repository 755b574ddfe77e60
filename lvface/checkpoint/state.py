"""The trainer's position in the run, saved as `train_state.json` in every checkpoint."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class TrainState:
    """Where the run stands: enough, with the checkpoint's tensors, to continue it exactly."""

    step: int = 0
    """Optimizer steps of this world size (after a resume: recomputed from `samples_seen`)."""
    samples_seen: int = 0
    epoch: int = 0
    position: int = 0
    """Samples of `epoch` already delivered (the loader's position in the epoch's order)."""
    world_size: int = 1
    stage: str = ""
    """Name of the head's curriculum stage."""
    reference_global_batch: int = 0
    """Samples per step of the run's first start (lvface/schedule.py); 0 in checkpoints that predate it."""
    run_id: str = ""

    def continued(self, *, run_id: str, world_size: int, reference_global_batch: int, step: int) -> "TrainState":
        """This state (a resumed one, or a fresh one) as the run goes on here: on this world size, whose
        step counter follows from the samples seen."""
        self.run_id, self.world_size, self.reference_global_batch, self.step = run_id, world_size, reference_global_batch, step
        return self

    def state_dict(self) -> dict:
        """The train_state.json keys."""
        return dataclasses.asdict(self)

    def load_state_dict(self, saved: dict) -> "TrainState":
        names = {field.name for field in dataclasses.fields(self)}
        unknown = sorted(set(saved) - names)
        if unknown:
            raise ValueError(f"train_state has unknown keys {unknown}; known: {sorted(names)}")
        for name, value in saved.items():
            setattr(self, name, value)
        return self
