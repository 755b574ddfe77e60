"""The layout of a run's output folder (`train.output_dir`): the one place that names its files.

    <output_dir>/
      .lvface.lock      the run that owns the folder (lvface/run_lock.py)
      config.yaml       the resolved config of the run
      checkpoints/      one folder per checkpoint and the `latest` pointer (lvface/checkpoint/)
      metrics.parquet   the training metrics log (rank 0; lvface/metrics.py, `lvface plot`)
      summary.json      losses, accuracies and timings of a finished run
      PREEMPTED         names the checkpoint a preempted run wrote, for launchers that lose the exit
                        code (launch/k8s/pytorchjob.yaml reads it)

Readers (`lvface plot`, `lvface eval`, the tests, the launch scripts' docs) take the names from here.
Every file the trainer writes here is written atomically (lvface.files).
"""

from __future__ import annotations

from pathlib import Path

from lvface.files import atomic_write_json, atomic_write_text

LOCK_NAME = ".lvface.lock"
CONFIG_NAME = "config.yaml"
CHECKPOINTS_NAME = "checkpoints"
METRICS_NAME = "metrics.parquet"
SUMMARY_NAME = "summary.json"
PREEMPTED_NAME = "PREEMPTED"


class RunFolder:
    """Paths of one output folder's files, and the trainer's writes of the small ones."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    @property
    def lock(self) -> Path:
        return self.path / LOCK_NAME

    @property
    def config(self) -> Path:
        return self.path / CONFIG_NAME

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS_NAME

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_NAME

    @property
    def summary(self) -> Path:
        return self.path / SUMMARY_NAME

    @property
    def preempted(self) -> Path:
        return self.path / PREEMPTED_NAME

    def write_config(self, yaml_text: str, is_main: bool = True) -> None:
        """The resolved config, written once (by rank 0: `is_main`)."""
        if not is_main:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config, yaml_text)

    def write_summary(self, summary: dict) -> None:
        atomic_write_json(self.summary, summary)

    def mark_preempted(self, checkpoint: Path) -> None:
        atomic_write_text(self.preempted, f"{checkpoint}\n")

    def clear_preempted(self) -> None:
        self.preempted.unlink(missing_ok=True)
