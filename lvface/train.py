"""Train LVFace. Anything after the flags is a dotted config override (`train.epochs=3`, `--data.batch_size 64`).

    deepspeed --hostfile hosts lvface/train.py --ds_config configs/zero2.json --config configs/lvface_vit_l_wf42m.yaml
    python -m lvface.train --config configs/demo.yaml train.epochs=1      # one process (launch/README.md: the rest)
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file by the deepspeed launcher: make `import lvface` work
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.distributed as dist

from lvface.checkpoint.manager import Checkpointer
from lvface.checkpoint.state import TrainState
from lvface.config import load_config
from lvface.data.epochs import EpochBatches
from lvface.data.loader import build_train_loader
from lvface.distributed import DistInfo, init_distributed, seed_everything, setup_logging, sync_batchnorm_buffers
from lvface.engine import NonFiniteSteps, build_ds_config, build_engine, param_groups, set_matmul_precision, train_step
from lvface.eval.callback import VerificationCallback
from lvface.exit_codes import collective_failures, exit_code
from lvface.heads import ShardedMarginHead, build_head_optimizer, stage_for_epoch
from lvface.metrics import TrainMetrics
from lvface.models import build_backbone
from lvface.preemption import Preempted, StopRequest, watch_launcher
from lvface.preflight import check_inputs
from lvface.run_folder import RunFolder
from lvface.run_lock import hold_output_folder
from lvface.schedule import Schedule, set_schedule_position
from lvface.train_log import TrainLog

log = logging.getLogger("lvface.train")


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Every config key and its help: lvface config show [--config F] [key=value ...]")
    parser.add_argument("--config", help="lvface YAML config (defaults apply where it is silent)")
    parser.add_argument("--ds_config", "--deepspeed_config", dest="ds_config", help="DeepSpeed JSON config; its "
                        "\"auto\" fields come from lvface's", default=str(Path(__file__).parents[1] / "configs/zero2.json"))
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher; unused")
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args, overrides = parse_args(argv)
    cfg = load_config(args.config, overrides)
    check_inputs(cfg, args.ds_config)  # seconds, before any rank waits for another
    # stop signals (preemption) are recorded from here on; a dead launcher counts as one
    stop = StopRequest().install()
    watch_launcher()
    info = init_distributed(cfg.train.collective_timeout_s, cfg.train.output_dir, cfg.train.hang_dump_fraction)
    setup_logging(info.rank)
    log.debug("resolved config:\n%s", cfg.to_yaml())  # config.yaml in the output folder holds it too
    run = RunFolder(cfg.train.output_dir)
    with hold_output_folder(run.path, info.rank, info.world_size, info.group), \
            collective_failures(cfg.train.collective_timeout_s, info.heartbeat):  # one run at a time in the folder
        if info.is_main:
            run.clear_preempted()
        return Trainer(cfg, args.ds_config, info, stop, run).train()


class Trainer:
    """One run of the recipe, after the process group and the output folder's lock are set up."""

    def __init__(self, cfg, ds_config_path: str, info: DistInfo, stop: StopRequest, run: RunFolder):
        self.cfg, self.info, self.stop, self.run = cfg, info, stop, run
        # metrics first: the checkpointer times its saves
        self.metrics = TrainMetrics(cfg.metrics.prometheus_port, info.rank, info.local_rank, info.device,
                                    device_timing=True)  # CUDA events, never a sync (on the CPU: wall clock)
        # checkpointer: which checkpoint to resume, chosen before the engine (another world size changes ds_config)
        ds_config = build_ds_config(ds_config_path, cfg, info.world_size, info.device)
        set_matmul_precision(cfg.train.tf32, info.device)
        self.checkpointer = Checkpointer(run, cfg.checkpoint, ds_config=ds_config, config_yaml=cfg.to_yaml(),
                                         metrics=self.metrics, rank=info.rank, world_size=info.world_size,
                                         group=info.group)
        saved = self.checkpointer.resume()
        seed_everything(cfg.train.seed, info.rank)
        # data, and the run's length and learning rates counted in its samples
        self.loader = build_train_loader(cfg.data, rank=info.rank, world_size=info.world_size, seed=cfg.train.seed,
                                         device=info.device)
        self.schedule = Schedule.build(cfg, self.loader, info.world_size, saved.reference_global_batch if saved else 0)
        # model, inside the DeepSpeed engine
        backbone = build_backbone(cfg.model)
        self.checkpointer.init_backbone(backbone)  # checkpoint.init_backbone: fine-tuning from published weights
        self.engine = build_engine(backbone, ds_config, param_groups(backbone, cfg.optimizer.weight_decay),
                                   self.schedule.lr_lambda(cfg))
        # head + its optimizer, outside the engine
        self.head = ShardedMarginHead(self.loader.num_classes, cfg.model.num_features, cfg.loss, group=info.group,
                                      seed=cfg.train.seed).to(info.device)
        self.head_optimizer = build_head_optimizer(self.head, cfg.optimizer)
        self.head_scheduler = torch.optim.lr_scheduler.LambdaLR(self.head_optimizer, self.schedule.lr_lambda(cfg))
        # the checkpoint's tensors and state, continued on this world size
        self.checkpointer.load(self.engine, self.head, self.head_optimizer)
        self.state = (saved or TrainState()).continued(
            run_id=self.checkpointer.run_id, world_size=info.world_size, reference_global_batch=self.schedule.reference_batch,
            step=self.schedule.step_at(saved.samples_seen if saved else 0))
        self.set_lr()
        # reports: logs, Parquet rows, TensorBoard, the event log, verification
        self.log = TrainLog(cfg, self.metrics, run, self.schedule, self.state, info, resumed=saved is not None)
        self.verifier = VerificationCallback(cfg.eval.bins, cfg.eval.batch_size, rank=info.rank,
                                             world_size=info.world_size, group=info.group, device=info.device)
        run.write_config(cfg.to_yaml(), info.is_main)

    def set_lr(self) -> None:  # the schedule follows the samples seen: DeepSpeed skips its own on a skipped step
        for scheduler in (self.engine.lr_scheduler, self.head_scheduler):
            set_schedule_position(scheduler, self.state.step)

    def evaluate(self) -> dict:
        sync_batchnorm_buffers(self.engine.module, self.info.group, self.cfg.train.batchnorm_sync)
        with self.metrics.timer("evaluation"):
            results = self.verifier(self.engine.module, self.state.step)
        return self.log.evaluation(self.state.step, results)

    def save(self, force: bool = True) -> Path | None:
        """Checkpoint the state after the last step (forced, else at checkpoint.every_steps). Collective."""
        sync_batchnorm_buffers(self.engine.module, self.info.group, self.cfg.train.batchnorm_sync)  # one set saved
        self.state.epoch, self.state.position = self.batches.epoch, self.loader.position()
        self.state.stage = self.head.stage.name
        folder = self.checkpointer.save(self.state, force=force)
        if folder:
            self.log.parquet.flush()
        return folder

    def train(self) -> dict:
        cfg, state, total = self.cfg, self.state, self.schedule.total_steps
        first_results = self.evaluate() if (self.verifier and cfg.eval.at_start and state.step == 0) else {}
        self.head.set_stage(stage_for_epoch(cfg.loss.stages, self.schedule.epoch_at(state.samples_seen)))
        self.nonfinite = NonFiniteSteps(cfg.train.max_nonfinite_steps)
        self.batches = EpochBatches(self.loader, state.epoch, state.position)
        self.engine.train()
        self.metrics.loop_started(state.step)
        while state.step < total:
            result = train_step(self.engine, self.head, self.head_optimizer, self.batches, group=self.info.group,
                                accumulation=cfg.train.gradient_accumulation_steps,
                                stop_requested=self.stop.requested, metrics=self.metrics)
            self.advance(result)
            if state.step % cfg.train.log_every == 0 or state.step == total or result.stop:
                self.report()
            if result.stop:
                self.preempted()
            if self.verifier and cfg.eval.every_steps and state.step % cfg.eval.every_steps == 0 and state.step < total:
                self.evaluate()
            if state.step < total:
                self.save(force=False)
            self.metrics.restart_step_clock()  # an evaluation or a save is not part of the next step
        last_results = self.evaluate() if self.verifier else {}
        folder = self.save()
        self.close("done")
        summary = self.log.summary(self.run, steps=state.step, first_results=first_results, last_results=last_results,
                                   checkpoint=folder, nonfinite_steps=self.nonfinite.total)
        dist.barrier(group=self.info.group)
        return summary | {"step_phases": list(self.metrics.recent), "peak_memory_bytes": self.metrics.set_memory()}

    def advance(self, result) -> None:
        """The bookkeeping of one finished step: counters, learning rates, the head's stage."""
        self.state.step += 1
        self.info.heartbeat.beat(self.state.step)  # what a hang's error reports of this rank
        self.metrics.step_done(skipped=result.skipped)
        self.state.samples_seen += self.schedule.images_per_step
        self.set_lr()
        self.log.step(result)
        self.nonfinite.record(self.state.step, result.skipped)  # raises after train.max_nonfinite_steps in a row
        self.head.set_stage(stage_for_epoch(self.cfg.loss.stages, self.schedule.epoch_at(self.state.samples_seen)))

    def report(self) -> None:
        self.log.report(step=self.state.step, total_steps=self.schedule.total_steps, lr=self.engine.get_lr()[0],
                        epoch=self.schedule.epoch_at(self.state.samples_seen), stage=self.head.stage.name,
                        stage_index=self.cfg.loss.stages.index(self.head.stage), nonfinite_steps=self.nonfinite.total,
                        grad_norm=self.engine.get_global_grad_norm(), bad_records=self.loader.bad_records)

    def preempted(self) -> None:
        folder = self.save()
        self.metrics.count("preemption_saves")
        log.warning("preemption save: %s written after step %d; %s", folder, self.state.step, self.stop.exit_note())
        # for launchers that lose the exit code (torchrun): launch/k8s/pytorchjob.yaml; not after a Ctrl-C
        if self.info.is_main and self.stop.requeue:
            self.run.mark_preempted(folder)
        self.close("preempted")
        raise Preempted(self.stop.signal_name, folder, self.stop.exit_code)

    def close(self, reason: str) -> None:
        self.checkpointer.close()  # the background writer: its save committed, the process ended
        self.loader.close()
        self.log.close(reason, self.state.step)


def cli(argv: list[str] | None = None) -> int:
    return exit_code(lambda: main(argv))


if __name__ == "__main__":
    sys.exit(cli())
