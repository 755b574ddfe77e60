"""What the trainer reports about its steps: the loss averaged over each log window on all ranks, the
throughput, the Prometheus gauges (lvface/metrics.py), the Parquet rows (rank 0) and the run's summary."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist

from lvface.distributed import DistInfo
from lvface.metrics import ParquetLog, Throughput, TrainMetrics, format_duration
from lvface.checkpoint.state import TrainState
from lvface.events import EventLog
from lvface.run_folder import RunFolder
from lvface.schedule import Schedule
from lvface.tracking import Tracker, format_summary
from lvface.watchdog import StragglerWatch

log = logging.getLogger("lvface.train")  # its lines are part of the training log


class TrainLog:
    def __init__(self, cfg, metrics: TrainMetrics, run: RunFolder, schedule: Schedule, state: TrainState,
                 info: DistInfo, resumed: bool):
        """`resumed`: the Parquet log continues the rows of the run's metrics.parquet (rank 0 writes it).
        Beside it: TensorBoard / CSV / W&B (lvface/tracking.py), the run's event log for `lvface report`
        (lvface/events.py) and the straggler check at each report (lvface/watchdog.py)."""
        self.metrics, self.is_main = metrics, info.is_main
        self.parquet = ParquetLog(run.metrics, enabled=info.is_main, keep_existing=resumed)
        self.throughput = Throughput(schedule.images_per_step, schedule.total_steps, start_step=state.step)
        self.tracker = Tracker(cfg.metrics, run.path, enabled=info.is_main, run_id=state.run_id, config=cfg.to_dict(),
                               start_step=state.step)
        metrics.events = EventLog.started(run.path, info.is_main, world_size=info.world_size, step=state.step,
                                          samples=state.samples_seen)
        self.stragglers = StragglerWatch(metrics, info.rank, info.world_size, info.group)
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
        self.stragglers.check(step)
        self.metrics.record_window(step)
        self.tracker.log(step, **{"train/loss": mean_loss, "train/lr": lr, "train/stage": stage_index,
                                  "train/epoch": epoch, "train/images_per_s": images_per_s, "train/grad_norm": grad_norm,
                                  "train/skipped_steps": nonfinite_steps, "train/bad_records": bad_records})

    def evaluation(self, step: int, results: dict[str, dict]) -> dict[str, dict]:
        for name, result in results.items():
            self.metrics.verification(name, result["accuracy"])
            self.parquet.append(step=step, **{f"{name}_accuracy": float(result["accuracy"])})
        self.tracker.log_verification(step, results)
        return results

    def close(self, reason: str, step: int) -> None:
        """The run ends here (`reason`: done, preempted): the trackers' files closed, the event log told."""
        self.tracker.close()
        self.metrics.run_ended(reason, step)

    def summary(self, run: RunFolder, *, steps: int, first_results: dict, last_results: dict, checkpoint: Path,
                nonfinite_steps: int) -> dict:
        """The run's summary: summary.json and an aligned block in the log (rank 0), and the return value."""
        summary = {"steps": steps, "first_loss": self.first_loss, "last_loss": self.last_loss,
                   "timing": self.metrics.summary(),
                   "first_accuracy": {k: float(v["accuracy"]) for k, v in first_results.items()},
                   "last_accuracy": {k: float(v["accuracy"]) for k, v in last_results.items()},
                   "checkpoint": str(checkpoint), "nonfinite_steps": nonfinite_steps}
        if self.is_main:
            run.write_summary(summary)
            log.info("%s", format_summary(summary, run.path))
        return summary
