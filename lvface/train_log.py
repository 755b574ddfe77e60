"""What the trainer reports about its steps: the loss averaged over each log window on all ranks, the
throughput, the Prometheus gauges (lvface/metrics.py), the Parquet rows (rank 0) and the run's summary."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist

from lvface.distributed import DistInfo
from lvface.metrics import ParquetLog, Throughput, TrainMetrics, format_duration
from lvface.schedule import Schedule
from lvface.tracking import Tracker

log = logging.getLogger("lvface.train")  # its lines are part of the training log


class TrainLog:
    def __init__(self, metrics: TrainMetrics, parquet_path: Path, schedule: Schedule, start_step: int,
                 info: DistInfo, resumed: bool, tracker: Tracker | None = None):
        """`resumed`: the Parquet log continues the rows of `parquet_path` (rank 0 writes it). `tracker`:
        TensorBoard / CSV / W&B (lvface/tracking.py), written beside the Parquet rows."""
        self.metrics, self.tracker = metrics, tracker
        self.parquet = ParquetLog(parquet_path, enabled=info.is_main, keep_existing=resumed)
        self.throughput = Throughput(schedule.images_per_step, schedule.total_steps, start_step=start_step)
        self.group, self.world_size = info.group, info.world_size
        self.loss_sum = torch.zeros((), device=info.device)
        self.loss_count = 0
        self.first_loss = self.last_loss = None

    def step(self, result) -> None:
        """Account one finished step (lvface.engine.StepResult): a skipped step's loss is not averaged."""
        if result.skipped:
            self.metrics.count("skipped_steps")
        else:
            self.loss_sum += result.loss_sum
            self.loss_count += result.micro_batches

    def report(self, *, step: int, total_steps: int, epoch: float, stage: str, stage_index: int, lr: float,
               grad_norm: float | None, bad_records: int, nonfinite_steps: int) -> None:
        """Log the window since the last report. Collective (the loss is averaged over the ranks)."""
        dist.all_reduce(self.loss_sum, group=self.group)
        mean_loss = self.loss_sum.item() / (self.loss_count * self.world_size) if self.loss_count else float("nan")
        self.loss_sum.zero_()
        self.loss_count = 0
        self.first_loss = mean_loss if self.first_loss is None else self.first_loss
        self.last_loss = mean_loss
        images_per_s, eta = self.throughput.tick(step)
        log.info("step %d/%d epoch %.2f stage %s loss %.4f lr %.3e %.1f img/s eta %s", step, total_steps, epoch,
                 stage, mean_loss, lr, images_per_s, format_duration(eta))
        self.metrics.set(loss=mean_loss, lr=lr, step=step, epoch=epoch, stage=stage_index, grad_norm=grad_norm)
        self.metrics.set_memory()
        self.metrics.count_to("bad_records", bad_records)
        self.parquet.append(step=step, epoch=epoch, loss=mean_loss, lr=lr, images_per_s=images_per_s,
                            bad_records=bad_records, nonfinite_steps=nonfinite_steps)
        self.parquet.flush()  # readable while the run goes on (lvface plot, report), not only at checkpoints
        if self.tracker is not None:
            self.tracker.log(step, **{"train/loss": mean_loss, "train/lr": lr, "train/stage": stage_index,
                                      "train/epoch": epoch, "train/images_per_s": images_per_s,
                                      "train/grad_norm": grad_norm, "train/skipped_steps": nonfinite_steps,
                                      "train/bad_records": bad_records})

    def evaluation(self, step: int, results: dict[str, dict]) -> dict[str, dict]:
        for name, result in results.items():
            self.metrics.verification(name, result["accuracy"])
            self.parquet.append(step=step, **{f"{name}_accuracy": float(result["accuracy"])})
        if self.tracker is not None:
            self.tracker.log_verification(step, results)
        return results

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()

    def summary(self, *, steps: int, first_results: dict, last_results: dict, checkpoint: Path,
                nonfinite_steps: int) -> dict:
        return {"steps": steps, "first_loss": self.first_loss, "last_loss": self.last_loss,
                "timing": self.metrics.summary(),
                "first_accuracy": {k: float(v["accuracy"]) for k, v in first_results.items()},
                "last_accuracy": {k: float(v["accuracy"]) for k, v in last_results.items()},
                "checkpoint": str(checkpoint), "nonfinite_steps": nonfinite_steps}
