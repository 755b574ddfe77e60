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
from lvface.checkpoint_files import load_backbone_into
from lvface.config import ConfigError, load_config
from lvface.data.loader import build_train_loader
from lvface.distributed import init_distributed, setup_logging
from lvface.engine import (build_ds_config, build_engine, build_lr_lambda, engine_loss_scale, param_groups,
                           set_schedule_position, zero_stage)
from lvface.eval.callback import VerificationCallback
from lvface.heads import ShardedMarginHead, build_head_optimizer, stage_for_epoch
from lvface.metrics import ParquetLog, Throughput, TrainMetrics, format_duration
from lvface.models import build_vit
from lvface.models.vit import no_weight_decay_names

log = logging.getLogger("lvface.train")

DEFAULT_DS_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "zero2.json"


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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


def main(argv: list[str] | None = None) -> dict:
    args, overrides = parse_args(argv)
    # config
    cfg = load_config(args.config, overrides)
    # distributed
    info = init_distributed()
    setup_logging(info.rank)
    log.info("resolved config:\n%s", cfg.to_yaml())
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
    # Progress is counted in samples, so that a resume on another world size (another global batch)
    # lands at the same epoch, stage and learning rate.
    images_per_step = cfg.data.batch_size * accum * info.world_size
    samples_per_epoch = loader.batches_per_epoch * cfg.data.batch_size * info.world_size
    steps_per_epoch = samples_per_epoch / images_per_step
    total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
    log.info("%d images, %d identities; %.1f optimizer steps per epoch of %d images; %d steps in all",
             loader.num_images, num_classes, steps_per_epoch, images_per_step, total_steps)
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
    resume = ckpt.resolve_resume(cfg.checkpoint.resume, cfg.train.output_dir)
    engine_root = resume and ckpt.prepare_resume(*resume, world_size=info.world_size, rank=info.rank,
                                                 group=info.group, ds_config=ds_config)
    lr_lambda = build_lr_lambda(cfg, total_steps, round(steps_per_epoch))
    groups = param_groups(backbone, cfg.optimizer.weight_decay, no_weight_decay_names(backbone))
    engine = build_engine(backbone, ds_config, groups, lr_lambda)
    stage_zero = zero_stage(ds_config)
    # head + its optimizer (outside the engine)
    head = ShardedMarginHead(num_classes, cfg.model.num_features, cfg.loss, group=info.group, impl=cfg.loss.impl,
                             chunk_bytes=cfg.loss.chunk_mb << 20, seed=cfg.train.seed).to(info.device)
    head_optimizer = build_head_optimizer(head, cfg.optimizer, sparse_rows=cfg.optimizer.head_sparse_rows,
                                          impl=cfg.optimizer.head_impl)
    head_scheduler = torch.optim.lr_scheduler.LambdaLR(head_optimizer, lr_lambda)
    # checkpointer
    root = ckpt.checkpoint_root(cfg.train.output_dir)
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
                           sync_cuda=cfg.metrics.prometheus_port > 0)
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

    def save() -> None:
        state = {"step": step, "samples_seen": samples_seen, "epoch": epoch, "position": loader.position(),
                 "world_size": info.world_size, "stage": head.stage.name}
        with metrics.timer("checkpoint_save"):
            ckpt.save_checkpoint(root, f"step{step:08d}", engine=engine, head=head, head_optimizer=head_optimizer,
                                 config_yaml=cfg.to_yaml(), train_state=state, zero_stage=stage_zero,
                                 rank=info.rank, group=info.group, keep_last=cfg.checkpoint.keep_last)
        metrics.count("checkpoints")
        parquet.flush()

    first_results = evaluate() if (verifier and cfg.eval.at_start and step == 0) else {}
    head.set_stage(stage_for_epoch(cfg.loss.stages, samples_seen / samples_per_epoch))

    # the loop
    throughput = Throughput(images_per_step, total_steps, start_step=step)
    loss_sum = torch.zeros((), device=info.device)
    loss_count = 0
    loader.set_epoch(epoch, start_sample=position)
    batches = iter(loader)
    engine.train()
    first_loss = last_loss = None
    while step < total_steps:
        for _ in range(accum):
            with metrics.timer("data_wait"):
                try:
                    images, labels = next(batches)
                except StopIteration:
                    epoch += 1
                    loader.set_epoch(epoch)
                    batches = iter(loader)
                    images, labels = next(batches)
            images = images.to(dtype=next(engine.module.parameters()).dtype)
            with metrics.timer("backbone"):
                embeddings = engine(images)
            with metrics.timer("head"):
                loss = head(embeddings.float(), labels)
            with metrics.backward_timer(embeddings):
                engine.backward(loss)
            # The head steps at the accumulation boundary, beside engine.step(); the prototypes are
            # updated after backward (the chunked path recomputes from them in backward).
            with metrics.timer("optimizer"):
                if engine.is_gradient_accumulation_boundary():
                    head_optimizer.step(grad_scale=engine_loss_scale(engine))
                    head_optimizer.zero_grad(set_to_none=True)
                    head.update_prototypes()
                    head_scheduler.step()
                engine.step()
            loss_sum += loss.detach()
            loss_count += 1
            metrics.count("images", images.shape[0])
        step += 1
        metrics.step_done()
        samples_seen += images_per_step
        progress = samples_seen / samples_per_epoch  # fractional epoch
        head.set_stage(stage_for_epoch(cfg.loss.stages, progress))  # logs a switch
        if step % cfg.train.log_every == 0 or step == total_steps:
            dist.all_reduce(loss_sum, group=info.group)
            mean_loss = loss_sum.item() / (loss_count * info.world_size)
            loss_sum.zero_()
            loss_count = 0
            first_loss = mean_loss if first_loss is None else first_loss
            last_loss = mean_loss
            images_per_s, eta = throughput.tick(step)
            lr = engine.get_lr()[0]
            log.info("step %d/%d epoch %.2f stage %s loss %.4f lr %.3e %.1f img/s eta %s", step, total_steps,
                     progress, head.stage.name, mean_loss, lr, images_per_s,
                     format_duration(eta))
            metrics.set(loss=mean_loss, lr=lr, step=step, epoch=progress, stage=cfg.loss.stages.index(head.stage),
                        grad_norm=engine.get_global_grad_norm())
            metrics.set_memory()
            metrics.count_to("bad_records", loader.bad_records)
            parquet.append(step=step, epoch=progress, loss=mean_loss, lr=lr, images_per_s=images_per_s,
                           bad_records=loader.bad_records)
        if verifier and cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step < total_steps:
            evaluate()
        if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 and step < total_steps:
            save()
        metrics.restart_step_clock()  # an evaluation or a save is not part of the next step

    last_results = evaluate() if verifier else {}
    save()
    loader.close()
    summary = {"steps": step, "first_loss": first_loss, "last_loss": last_loss, "timing": metrics.summary(),
               "first_accuracy": {k: float(v["accuracy"]) for k, v in first_results.items()},
               "last_accuracy": {k: float(v["accuracy"]) for k, v in last_results.items()},
               "checkpoint": str(root / f"step{step:08d}")}
    if info.is_main:
        import json

        (Path(cfg.train.output_dir) / "summary.json").write_text(json.dumps(summary, indent=1))
        log.info("done: %s", summary)
    dist.barrier(group=info.group)
    return summary | {"step_phases": list(metrics.recent), "peak_memory_bytes": metrics.set_memory()}


def cli(argv: list[str] | None = None) -> int:
    try:
        main(argv)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        # One line that says what to fix, not a traceback.
        logging.getLogger("lvface").error("%s", exc)
        print(f"lvface: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(cli())
