"""Train LVFace.

    deepspeed --hostfile hosts lvface/train.py --ds_config configs/zero2.json --config configs/lvface_vit_l_wf42m.yaml
    deepspeed --num_gpus 2 lvface/train.py --ds_config configs/zero2.json --config configs/demo.yaml
    torchrun --nproc_per_node 2 -m lvface.train --ds_config configs/zero2.json --config configs/demo.yaml
    python -m lvface.train --config configs/demo.yaml train.epochs=1      # one process

Anything after the flags is a dotted config override (`train.epochs=3` or `--data.batch_size 64`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file by the deepspeed launcher: make `import lvface` work
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
import torch.distributed as dist

from lvface import checkpoint as ckpt
from lvface.checkpoint import CheckpointManager, CheckpointSaveError
from lvface.checkpoint_files import TRAIN_STATE_FILE, load_backbone_into
from lvface.config import ConfigError, load_config
from lvface.data.loader import build_train_loader
from lvface.distributed import DistInfo, init_distributed, setup_logging
from lvface.engine import (NonFiniteSteps, NonFiniteTraining, build_ds_config, build_engine, build_lr_lambda,
                           param_groups, set_matmul_precision, set_schedule_position, train_step, zero_stage)
from lvface.eval.callback import VerificationCallback
from lvface.files import atomic_write_json
from lvface.heads import ShardedMarginHead, build_head_optimizer, stage_for_epoch
from lvface.metrics import ParquetLog, Throughput, TrainMetrics, format_duration
from lvface.models import build_vit
from lvface.models.vit import no_weight_decay_names
from lvface.preemption import EXIT_PREEMPTED, Preempted, StopRequest, watch_launcher
from lvface.run_lock import OutputFolderLocked, OutputLock

log = logging.getLogger("lvface.train")

PREEMPTED_MARKER = "PREEMPTED"
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


def seed_everything(seed: int, rank: int) -> None:
    # Parameters are seeded identically on every rank (DeepSpeed broadcasts rank 0's anyway); the
    # per-rank offset only reaches augmentation and masking randomness.
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed)


class EpochBatches:
    """`next_batch()` for train_step: this rank's batches, rolling over into the next epoch."""

    def __init__(self, loader, epoch: int, position: int):
        self.loader, self.epoch = loader, epoch
        loader.set_epoch(epoch, start_sample=position)
        self.batches = iter(loader)

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return next(self.batches)
        except StopIteration:
            self.epoch += 1
            self.loader.set_epoch(self.epoch)
            self.batches = iter(self.loader)
            return next(self.batches)


def _broadcast(value, info: DistInfo):
    """Rank 0's `value` on every rank."""
    if info.world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=info.group)
    return box[0]


def hold_output_folder(output_dir: str, info: DistInfo) -> OutputLock:
    """Rank 0 takes the output folder's lock; every rank raises if it could not. Collective."""
    lock, error = OutputLock(output_dir), None
    if info.is_main:
        try:
            lock.acquire()
        except (OutputFolderLocked, OSError) as exc:
            error = str(exc)
    error = _broadcast(error, info)
    if error:
        raise OutputFolderLocked(error)
    return lock


def main(argv: list[str] | None = None) -> dict:
    args, overrides = parse_args(argv)
    # config
    cfg = load_config(args.config, overrides)
    # stop signals (preemption) are recorded from here on; a dead launcher counts as one
    stop = StopRequest().install()
    watch_launcher()
    # distributed
    info = init_distributed(cfg.train.collective_timeout_s)
    setup_logging(info.rank)
    log.info("resolved config:\n%s", cfg.to_yaml())
    # the output folder: one run at a time
    lock = hold_output_folder(cfg.train.output_dir, info)
    marker = Path(cfg.train.output_dir) / PREEMPTED_MARKER
    if info.is_main:
        marker.unlink(missing_ok=True)
    try:
        return train(cfg, args, info, stop)
    except (dist.DistBackendError, RuntimeError) as exc:
        lost_peer = isinstance(exc, dist.DistBackendError) or any(
            text in str(exc) for text in ("Timed out", "timed out", "Connection closed by peer"))
        if isinstance(exc, (CheckpointSaveError, NonFiniteTraining)) or not lost_peer:
            raise
        raise CollectiveFailed(f"a collective failed or waited longer than train.collective_timeout_s="
                               f"{cfg.train.collective_timeout_s:g} s: another rank is dead, stopped or hung "
                               f"({str(exc).splitlines()[0][:300]})") from exc
    finally:
        lock.release()


def train(cfg, args, info: DistInfo, stop: StopRequest) -> dict:
    """The recipe of one run, after the process group and the output folder's lock are set up."""
    # which checkpoint to resume (verified against its manifest; a damaged one falls back)
    candidates, fallback = ckpt.resume_candidates(cfg.checkpoint.resume, cfg.train.output_dir)
    resume = ckpt.select_checkpoint(candidates, fallback, rank=info.rank, world_size=info.world_size,
                                    group=info.group)
    if resume is None:
        ckpt.refuse_foreign_checkpoints(cfg.train.output_dir)
    saved = json.loads((resume[0] / resume[1] / TRAIN_STATE_FILE).read_text()) if resume else {}
    run_id = saved.get("run_id") or _broadcast(ckpt.new_run_id(), info)
    # seed
    seed_everything(cfg.train.seed, info.rank)
    # data
    loader = build_train_loader(cfg.data, rank=info.rank, world_size=info.world_size, seed=cfg.train.seed,
                                device=info.device)
    num_classes = loader.num_classes
    accum = cfg.train.gradient_accumulation_steps
    if loader.batches_per_epoch < accum:
        raise ConfigError(f"{cfg.data.rec}: {loader.num_images} images give {loader.batches_per_epoch} batches of "
                          f"{cfg.data.batch_size} per rank on {info.world_size} ranks, fewer than "
                          f"train.gradient_accumulation_steps={accum}: lower data.batch_size")
    # Length and schedule are counted in samples, in steps of the global batch the run started with,
    # so that a resume on another world size stops at the same point with the same learning rates.
    images_per_step = cfg.data.batch_size * accum * info.world_size
    reference_batch = saved.get("reference_global_batch", images_per_step)
    samples_per_epoch = loader.batches_per_epoch * cfg.data.batch_size * info.world_size
    reference_steps_per_epoch = samples_per_epoch / reference_batch
    reference_total = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * reference_steps_per_epoch))
    total_samples = reference_total * reference_batch
    total_steps = math.ceil(total_samples / images_per_step)
    log.info("%d images, %d identities; %.1f optimizer steps per epoch of %d images; %d steps in all",
             loader.num_images, num_classes, samples_per_epoch / images_per_step, images_per_step, total_steps)
    # model
    overrides_model = {k: v for k, v in (("drop_path_rate", cfg.model.drop_path_rate),
                                         ("mask_ratio", cfg.model.mask_ratio),
                                         ("using_checkpoint", cfg.model.using_checkpoint)) if v is not None}
    backbone = build_vit(cfg.model.name, num_features=cfg.model.num_features, attn_impl=cfg.model.attn_impl,
                         norm_impl=cfg.model.norm_impl, **overrides_model)
    if cfg.checkpoint.init_backbone:
        log.info("backbone initialised from %s", load_backbone_into(backbone, cfg.checkpoint.init_backbone))
    # DeepSpeed engine (backbone only); a resume on another world size loads a universal checkpoint
    ds_config = build_ds_config(args.ds_config, cfg, info.world_size, info.device)
    set_matmul_precision(cfg.train.tf32, info.device)
    engine_root = resume and ckpt.prepare_resume(*resume, world_size=info.world_size, rank=info.rank,
                                                 group=info.group, ds_config=ds_config)
    reference_lr = build_lr_lambda(cfg, reference_total, round(reference_steps_per_epoch))
    step_scale = images_per_step / reference_batch
    lr_lambda = reference_lr if step_scale == 1 else (lambda step: reference_lr(step * step_scale))
    groups = param_groups(backbone, cfg.optimizer.weight_decay, no_weight_decay_names(backbone))
    engine = build_engine(backbone, ds_config, groups, lr_lambda)
    # head + its optimizer (outside the engine)
    head = ShardedMarginHead(num_classes, cfg.model.num_features, cfg.loss, group=info.group, seed=cfg.train.seed).to(info.device)
    head_optimizer = build_head_optimizer(head, cfg.optimizer, sparse_rows=cfg.optimizer.head_sparse_rows,
                                          impl=cfg.optimizer.head_impl)
    head_scheduler = torch.optim.lr_scheduler.LambdaLR(head_optimizer, lr_lambda)
    # checkpointer
    checkpoints = CheckpointManager(cfg.train.output_dir, run_id=run_id, every_steps=cfg.checkpoint.every_steps,
                                    keep_last=cfg.checkpoint.keep_last, zero_stage=zero_stage(ds_config),
                                    config_yaml=cfg.to_yaml(), rank=info.rank, world_size=info.world_size,
                                    group=info.group)
    samples_seen, epoch, position = 0, 0, 0
    if resume:
        state = ckpt.load_checkpoint(*resume, engine=engine, head=head, head_optimizer=head_optimizer,
                                     engine_root=engine_root)
        samples_seen, epoch, position = state["samples_seen"], state["epoch"], state["position"]
        if state["world_size"] != info.world_size:
            log.info("resuming a %d-rank checkpoint on %d ranks: the head was re-split, the step counter "
                     "continues from the samples seen", state["world_size"], info.world_size)
    step = samples_seen // images_per_step
    set_schedule_position(engine.lr_scheduler, step)
    set_schedule_position(head_scheduler, step)
    # metrics
    metrics = TrainMetrics(cfg.metrics.prometheus_port, info.rank, info.local_rank, info.device,
                           device_timing=True)  # CUDA events, never a sync (on the CPU: wall clock)
    parquet = ParquetLog(Path(cfg.train.output_dir) / "metrics.parquet", enabled=info.is_main,
                         keep_existing=bool(resume))
    verifier = VerificationCallback(cfg.eval.bins, cfg.eval.batch_size, rank=info.rank, world_size=info.world_size,
                                    group=info.group, device=info.device)
    if info.is_main:
        Path(cfg.train.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.train.output_dir) / "config.yaml").write_text(cfg.to_yaml())

    def evaluate() -> dict:
        results = verifier(engine.module, step)
        for name, result in results.items():
            metrics.verification(name, result["accuracy"])
            parquet.append(step=step, **{f"{name}_accuracy": float(result["accuracy"])})
        return results

    def save() -> Path:
        with metrics.timer("checkpoint_save"):
            folder = checkpoints.save(engine=engine, head=head, head_optimizer=head_optimizer, train_state={
                "step": step, "samples_seen": samples_seen, "epoch": batches.epoch, "position": loader.position(),
                "world_size": info.world_size, "stage": head.stage.name, "reference_global_batch": reference_batch})
        metrics.count("checkpoints")
        parquet.flush()
        return folder

    first_results = evaluate() if (verifier and cfg.eval.at_start and step == 0) else {}
    head.set_stage(stage_for_epoch(cfg.loss.stages, samples_seen / samples_per_epoch))

    # the loop
    throughput = Throughput(images_per_step, total_steps, start_step=step)
    nonfinite = NonFiniteSteps(cfg.train.max_nonfinite_steps)
    loss_sum = torch.zeros((), device=info.device)
    loss_count = 0
    batches = EpochBatches(loader, epoch, position)
    engine.train()
    first_loss = last_loss = None
    while step < total_steps:
        result = train_step(engine, head, head_optimizer, batches, accumulation=accum, group=info.group,
                            stop_requested=stop.requested, metrics=metrics)
        step += 1
        metrics.step_done()
        samples_seen += images_per_step
        # DeepSpeed does not step its scheduler on a skipped step: the schedule follows the samples seen
        set_schedule_position(engine.lr_scheduler, step)
        set_schedule_position(head_scheduler, step)
        if result.skipped:
            metrics.count("skipped_steps")
        else:
            loss_sum += result.loss_sum
            loss_count += result.micro_batches
        nonfinite.record(step, result.skipped)  # raises after train.max_nonfinite_steps in a row
        progress = samples_seen / samples_per_epoch  # fractional epoch
        head.set_stage(stage_for_epoch(cfg.loss.stages, progress))  # logs a switch
        if step % cfg.train.log_every == 0 or step == total_steps or result.stop:
            dist.all_reduce(loss_sum, group=info.group)
            mean_loss = loss_sum.item() / (loss_count * info.world_size) if loss_count else float("nan")
            loss_sum.zero_()
            loss_count = 0
            first_loss = mean_loss if first_loss is None else first_loss
            last_loss = mean_loss
            images_per_s, eta = throughput.tick(step)
            lr = engine.get_lr()[0]
            log.info("step %d/%d epoch %.2f stage %s loss %.4f lr %.3e %.1f img/s eta %s", step, total_steps,
                     progress, head.stage.name, mean_loss, lr, images_per_s, format_duration(eta))
            metrics.set(loss=mean_loss, lr=lr, step=step, epoch=progress, stage=cfg.loss.stages.index(head.stage),
                        grad_norm=engine.get_global_grad_norm())
            metrics.set_memory()
            metrics.count_to("bad_records", loader.bad_records)
            parquet.append(step=step, epoch=progress, loss=mean_loss, lr=lr, images_per_s=images_per_s,
                           bad_records=loader.bad_records, nonfinite_steps=nonfinite.total)
        if result.stop:
            folder = save()
            metrics.count("preemption_saves")
            log.warning("preemption save: %s written after step %d; exiting with %d so that the job is requeued",
                        folder, step, EXIT_PREEMPTED)
            if info.is_main:  # for launchers that lose the exit code (torchrun): launch/k8s/pytorchjob.yaml
                (Path(cfg.train.output_dir) / PREEMPTED_MARKER).write_text(f"{folder}\n")
            loader.close()
            raise Preempted(stop.signal_name, folder)
        if verifier and cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step < total_steps:
            evaluate()
        if checkpoints.due(step, last=False, stop=False) and step < total_steps:
            save()
        metrics.restart_step_clock()  # an evaluation or a save is not part of the next step

    last_results = evaluate() if verifier else {}
    folder = save()
    loader.close()
    summary = {"steps": step, "first_loss": first_loss, "last_loss": last_loss, "timing": metrics.summary(),
               "first_accuracy": {k: float(v["accuracy"]) for k, v in first_results.items()},
               "last_accuracy": {k: float(v["accuracy"]) for k, v in last_results.items()},
               "checkpoint": str(folder), "nonfinite_steps": nonfinite.total}
    if info.is_main:
        atomic_write_json(Path(cfg.train.output_dir) / "summary.json", summary)
        log.info("done: %s", summary)
    dist.barrier(group=info.group)
    return summary | {"step_phases": list(metrics.recent), "peak_memory_bytes": metrics.set_memory()}


class CollectiveFailed(RuntimeError):
    pass


def cli(argv: list[str] | None = None) -> int:
    errors = logging.getLogger("lvface")
    try:
        main(argv)
    except Preempted as exc:
        errors.warning("%s", exc)
        return EXIT_PREEMPTED
    except (ConfigError, FileNotFoundError, ValueError, OutputFolderLocked) as exc:
        # One line that says what to fix, not a traceback.
        errors.error("%s", exc)
        print(f"lvface: error: {exc}", file=sys.stderr)
        return 2
    except (CheckpointSaveError, NonFiniteTraining, CollectiveFailed) as exc:
        errors.error("%s", exc)
        print(f"lvface: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(cli())
