"""Train LVFace.

    deepspeed --hostfile hosts lvface/train.py --ds_config configs/zero2.json --config configs/lvface_vit_l_wf42m.yaml
    deepspeed --num_gpus 2 lvface/train.py --ds_config configs/zero2.json --config configs/demo.yaml
    torchrun --nproc_per_node 2 -m lvface.train --ds_config configs/zero2.json --config configs/demo.yaml
    python -m lvface.train --config configs/demo.yaml train.epochs=1      # one process

Anything after the flags is a dotted config override (`train.epochs=3` or `--data.batch_size 64`).
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

from lvface.checkpoint.files import load_backbone_into
from lvface.checkpoint.manager import Checkpointer
from lvface.checkpoint.state import TrainState
from lvface.config import load_config
from lvface.data.epochs import EpochBatches
from lvface.data.loader import build_train_loader
from lvface.distributed import DistInfo, init_distributed, seed_everything, setup_logging
from lvface.engine import NonFiniteSteps, build_ds_config, build_engine, param_groups, train_step
from lvface.eval.callback import VerificationCallback
from lvface.exit_codes import collective_failures, exit_code
from lvface.heads import ShardedMarginHead, build_head_optimizer, stage_for_epoch
from lvface.metrics import TrainMetrics
from lvface.models import build_backbone
from lvface.models.vit import no_weight_decay_names
from lvface.preemption import EXIT_PREEMPTED, Preempted, StopRequest, watch_launcher
from lvface.run_folder import RunFolder
from lvface.run_lock import hold_output_folder
from lvface.schedule import Schedule, set_schedule_position
from lvface.train_log import TrainLog

log = logging.getLogger("lvface.train")

DEFAULT_DS_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "zero2.json"


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Every config key with its default and help text, and the config a run "
                                            "would resolve to: lvface config show [--config FILE] [section.key=value ...]")
    parser.add_argument("--config", help="lvface YAML config (defaults apply where it is silent)")
    parser.add_argument("--ds_config", "--deepspeed_config", dest="ds_config", default=str(DEFAULT_DS_CONFIG),
                        help="DeepSpeed JSON config; its \"auto\" fields are filled from the lvface config")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher; unused")
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args, overrides = parse_args(argv)
    cfg = load_config(args.config, overrides)
    # stop signals (preemption) are recorded from here on; a dead launcher counts as one
    stop = StopRequest().install()
    watch_launcher()
    info = init_distributed(cfg.train.collective_timeout_s)
    setup_logging(info.rank)
    log.info("resolved config:\n%s", cfg.to_yaml())
    run = RunFolder(cfg.train.output_dir)
    with hold_output_folder(run.path, info.rank, info.world_size, info.group), \
            collective_failures(cfg.train.collective_timeout_s):  # one run at a time in the folder
        if info.is_main:
            run.clear_preempted()
        return Trainer(cfg, args.ds_config, info, stop, run).train()


class Trainer:
    """One run of the recipe, after the process group and the output folder's lock are set up."""

    def __init__(self, cfg, ds_config_path: str, info: DistInfo, stop: StopRequest, run: RunFolder):
        self.cfg, self.info, self.stop, self.run = cfg, info, stop, run
        # metrics first: the checkpointer times its saves
        self.metrics = TrainMetrics(cfg.metrics.prometheus_port, info.rank, info.local_rank, info.device,
                                    sync_cuda=cfg.metrics.prometheus_port > 0)
        # checkpointer: which checkpoint to resume, chosen before the engine (another world size changes ds_config)
        ds_config = build_ds_config(ds_config_path, cfg, info.world_size, info.device)
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
        if cfg.checkpoint.init_backbone:
            log.info("backbone initialised from %s", load_backbone_into(backbone, cfg.checkpoint.init_backbone))
        self.engine = build_engine(backbone, ds_config, param_groups(backbone, cfg.optimizer.weight_decay,
                                   no_weight_decay_names(backbone)), self.schedule.lr_lambda(cfg))
        # head + its optimizer, outside the engine
        self.head = ShardedMarginHead(self.loader.num_classes, cfg.model.num_features, cfg.loss, group=info.group,
                                      seed=cfg.train.seed).to(info.device)
        self.head_optimizer = build_head_optimizer(self.head, cfg.optimizer, sparse_rows=cfg.optimizer.head_sparse_rows,
                                                   impl=cfg.optimizer.head_impl)
        self.head_scheduler = torch.optim.lr_scheduler.LambdaLR(self.head_optimizer, self.schedule.lr_lambda(cfg))
        # the checkpoint's tensors and state, continued on this world size
        self.checkpointer.load(self.engine, self.head, self.head_optimizer)
        self.state = saved or TrainState()
        self.state.run_id, self.state.world_size = self.checkpointer.run_id, info.world_size
        self.state.reference_global_batch = self.schedule.reference_batch
        self.state.step = self.schedule.step_at(self.state.samples_seen)
        self.set_lr()
        # reports: logs, Parquet rows, verification
        self.log = TrainLog(self.metrics, run.metrics, self.schedule, self.state.step, info, resumed=saved is not None)
        self.verifier = VerificationCallback(cfg.eval.bins, cfg.eval.batch_size, rank=info.rank,
                                             world_size=info.world_size, group=info.group, device=info.device)
        if info.is_main:
            run.write_config(cfg.to_yaml())

    def set_lr(self) -> None:
        # DeepSpeed does not step its scheduler on a skipped step: the schedule follows the samples seen
        set_schedule_position(self.engine.lr_scheduler, self.state.step)
        set_schedule_position(self.head_scheduler, self.state.step)

    def evaluate(self) -> dict:
        return self.log.evaluation(self.state.step, self.verifier(self.engine.module, self.state.step))

    def save(self, force: bool = True) -> Path | None:
        """Checkpoint the state after the last step (forced, else at checkpoint.every_steps). Collective."""
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
        self.checkpointer.close()
        self.loader.close()
        summary = self.log.summary(steps=state.step, first_results=first_results, last_results=last_results,
                                   checkpoint=folder, nonfinite_steps=self.nonfinite.total)
        if self.info.is_main:
            self.run.write_summary(summary)
            log.info("done: %s", summary)
        dist.barrier(group=self.info.group)
        return summary | {"step_phases": list(self.metrics.recent), "peak_memory_bytes": self.metrics.set_memory()}

    def advance(self, result) -> None:
        """The bookkeeping of one finished step: counters, learning rates, the head's stage."""
        self.state.step += 1
        self.metrics.step_done()
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
        self.checkpointer.close()
        self.metrics.count("preemption_saves")
        log.warning("preemption save: %s written after step %d; exiting with %d so that the job is requeued",
                    folder, self.state.step, EXIT_PREEMPTED)
        if self.info.is_main:  # for launchers that lose the exit code (torchrun): launch/k8s/pytorchjob.yaml
            self.run.mark_preempted(folder)
        self.loader.close()
        raise Preempted(self.stop.signal_name, folder)


def cli(argv: list[str] | None = None) -> int:
    return exit_code(lambda: main(argv))


if __name__ == "__main__":
    sys.exit(cli())
