"""Experiment tracking: lvface's own scalars to TensorBoard, Weights & Biases and a CSV file.

Rank 0 writes, at every progress line (`train.log_every`) and every verification:

    train/loss  train/lr  train/stage  train/epoch  train/images_per_s  train/grad_norm
    train/skipped_steps (cumulative)  train/bad_records (cumulative)
    verification/<set>/accuracy  verification/<set>/accuracy_std

against the optimizer step (the step counter continues across resumes). Switches (config section
`metrics`): `tensorboard` (on by default; event files in `<output_dir>/tensorboard`, a resumed run
purges the events past its checkpoint's step so curves do not fork), `csv` (`<output_dir>/scalars.csv`,
one `step,tag,value` row per scalar), `wandb` (off by default; `wandb_project`, `wandb_mode=offline`
writes the run under `<output_dir>/wandb` for a later `wandb sync`; a resumed run continues the same
W&B run, keyed by lvface's run id). wandb is imported only when switched on and is never required.

DeepSpeed's own `monitor` block (tensorboard / wandb / csv_monitor in the DeepSpeed JSON) still works
beside this, for DeepSpeed's events (its x-axis is samples, not steps).
"""

from __future__ import annotations

import csv
import importlib.util
import logging
import math
from pathlib import Path

from lvface.config import ConfigError

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
CSV_FILE = "scalars.csv"


def check_tracking(metrics_cfg) -> None:
    """The packages the switched-on trackers need, checked before any rank starts."""
    needed = [("tensorboard", "tensorboard", "metrics.tensorboard=false")] if metrics_cfg.tensorboard else []
    if metrics_cfg.wandb:
        needed.append(("wandb", "wandb", "metrics.wandb=false"))
    for module, package, off in needed:
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"config key 'metrics.{module}' is true but {package} is not installed: "
                              f"pip install {package}, or set {off}")


class Tracker:
    """The trackers of one run (rank 0's; a disabled Tracker does nothing)."""

    def __init__(self, metrics_cfg, output_dir: str | Path, *, enabled: bool, run_id: str, config: dict,
                 start_step: int = 0):
        self.writer = self.wandb = self._csv_file = self._csv = None
        if not enabled:
            return
        output_dir = Path(output_dir)
        if metrics_cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: events a crashed or stopped attempt wrote after the checkpoint's step are dropped
            purge = start_step + 1 if start_step else None
            self.writer = SummaryWriter(str(output_dir / TENSORBOARD_DIR), purge_step=purge)
        if metrics_cfg.csv:
            path = output_dir / CSV_FILE
            new = not path.exists() or start_step == 0
            self._csv_file = open(path, "w" if new else "a", newline="")
            self._csv = csv.writer(self._csv_file)
            if new:
                self._csv.writerow(["step", "tag", "value"])
        if metrics_cfg.wandb:
            import wandb

            self.wandb = wandb.init(project=metrics_cfg.wandb_project, id=run_id, resume="allow", config=config,
                                    dir=str(output_dir), mode=metrics_cfg.wandb_mode, name=output_dir.name)

    def log(self, step: int, **scalars: float | None) -> None:
        """Scalars by tag ("train/loss", ...); None and non-finite values are left out."""
        values = {tag: float(value) for tag, value in scalars.items()
                  if value is not None and math.isfinite(float(value))}
        if not values:
            return
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)
            self.writer.flush()  # readable while the run goes on, and little is lost to a crash
        if self._csv is not None:
            self._csv.writerows([step, tag, repr(value)] for tag, value in values.items())
            self._csv_file.flush()
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def log_verification(self, step: int, results: dict[str, dict]) -> None:
        for name, result in results.items():
            self.log(step, **{f"verification/{name}/accuracy": result["accuracy"],
                              f"verification/{name}/accuracy_std": result.get("accuracy_std")})

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self._csv_file is not None:
            self._csv_file.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.writer = self.wandb = self._csv_file = self._csv = None


def format_summary(summary: dict, output_dir: str | Path) -> str:
    """The end-of-run summary as aligned lines (summary.json in the output folder holds it all)."""
    timing = summary.get("timing", {})
    phases = ", ".join(f"{name} {timing[name + '_s']:.3f}" for name in ("data_wait", "backbone", "head", "optimizer")
                       if name + "_s" in timing)
    rows = [("steps", f"{summary['steps']}"),
            ("loss", f"{summary['first_loss']:.4f} -> {summary['last_loss']:.4f}"
             if summary.get("first_loss") is not None else "not logged")]
    for name, last in summary.get("last_accuracy", {}).items():
        first = summary.get("first_accuracy", {}).get(name)
        rows.append((f"{name} accuracy", (f"{first:.4f} -> " if first is not None else "") + f"{last:.4f}"))
    if timing.get("steps"):
        rows.append(("step time", f"{timing['step_s']:.3f} s ({phases})"))
    rows += [("skipped steps", f"{summary.get('nonfinite_steps', 0)}"), ("checkpoint", f"{summary['checkpoint']}"),
             ("summary", f"{Path(output_dir) / 'summary.json'}")]
    width = max(len(label) for label, _ in rows)
    return "\n".join(["done:"] + [f"  {label:<{width}}  {value}" for label, value in rows])
