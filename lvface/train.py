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
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file by the deepspeed launcher: make `import lvface` work
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
import torch.distributed as dist

from lvface import checkpoint as ckpt
from lvface.config import Config, ConfigError, load_config
from lvface.data.loader import RecordDataset
from lvface.data.sampler import ResumableDistributedSampler
from lvface.distributed import DistInfo, init_distributed, setup_logging
from lvface.engine import build_ds_config, build_engine, build_lr_lambda, engine_loss_scale, param_groups, zero_stage
from lvface.eval.callback import VerificationCallback
from lvface.heads import ShardedMarginHead, build_head_optimizer, stage_for_epoch
from lvface.metrics import ParquetLog, PrometheusMetrics, Throughput, format_duration
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


def resolve_rec(cfg: Config) -> Path:
    if not cfg.data.rec:
        raise ConfigError("data.rec is empty; set it to a train.rec file (next to its train.idx), "
                          "e.g. data.rec=demo_data/train.rec, or run `lvface synth --out DIR` first")
    path = Path(cfg.data.rec)
    if path.is_dir():
        path = path / "train.rec"
    if not path.is_file():
        raise FileNotFoundError(f"data.rec={cfg.data.rec}: {path} not found; point data.rec at an insightface "
                                f"train.rec (or create one with `lvface synth --out DIR`)")
    return path


def build_data(cfg: Config, info: DistInfo):
    dataset = RecordDataset(resolve_rec(cfg), train=True, flip_p=0.5 if cfg.data.flip else 0.0, seed=cfg.train.seed)
    num_classes = dataset.num_classes
    if cfg.data.num_classes and cfg.data.num_classes != num_classes:
        raise ConfigError(f"data.num_classes is {cfg.data.num_classes} but {cfg.data.rec} holds {num_classes} "
                          f"identities; set data.num_classes=0 to read it from the data")
    sampler = ResumableDistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, seed=cfg.train.seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.data.batch_size, sampler=sampler, drop_last=True,
        num_workers=cfg.data.num_workers, persistent_workers=cfg.data.num_workers > 0,
        pin_memory=info.device.type == "cuda",
    )
    if len(loader) < cfg.train.gradient_accumulation_steps:
        raise ConfigError(f"{cfg.data.rec}: {len(dataset)} images give {len(loader)} batches of {cfg.data.batch_size} "
                          f"per rank on {info.world_size} ranks: lower data.batch_size")
    return dataset, sampler, loader, num_classes


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
    dataset, sampler, loader, num_classes = build_data(cfg, info)
    accum = cfg.train.gradient_accumulation_steps
    steps_per_epoch = len(loader) // accum
    total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
    images_per_step = cfg.data.batch_size * accum * info.world_size
    log.info("%d images, %d identities; %d optimizer steps per epoch of %d images; %d steps in all",
             len(dataset), num_classes, steps_per_epoch, images_per_step, total_steps)
    # model
    overrides_model = {k: v for k, v in (("drop_path_rate", cfg.model.drop_path_rate),
                                         ("mask_ratio", cfg.model.mask_ratio),
                                         ("using_checkpoint", cfg.model.using_checkpoint)) if v is not None}
    backbone = build_vit(cfg.model.name, num_features=cfg.model.num_features, attn_impl=cfg.model.attn_impl,
                         **overrides_model)
    if cfg.checkpoint.init_backbone:
        ckpt.load_backbone_file(cfg.checkpoint.init_backbone, backbone)
    # DeepSpeed engine (backbone only)
    ds_config = build_ds_config(args.ds_config, cfg, info.world_size, info.device)
    lr_lambda = build_lr_lambda(cfg, total_steps, steps_per_epoch)
    groups = param_groups(backbone, cfg.optimizer.weight_decay, no_weight_decay_names(backbone))
    engine = build_engine(backbone, ds_config, groups, lr_lambda)
    stage_zero = zero_stage(ds_config)
    # head + its optimizer (outside the engine)
    head = ShardedMarginHead(num_classes, cfg.model.num_features, cfg.loss, group=info.group, impl=cfg.loss.impl,
                             chunk_bytes=cfg.loss.chunk_mb << 20, seed=cfg.train.seed).to(info.device)
    head_optimizer = build_head_optimizer(head, cfg.optimizer, sparse_rows=cfg.optimizer.head_sparse_rows)
    head_scheduler = torch.optim.lr_scheduler.LambdaLR(head_optimizer, lr_lambda)
    # checkpointer
    root = ckpt.checkpoint_root(cfg.train.output_dir)
    step, samples_into_epoch = 0, 0
    resume = ckpt.resolve_resume(cfg.checkpoint.resume, cfg.train.output_dir)
    if resume:
        state = ckpt.load_checkpoint(*resume, engine=engine, head=head, head_optimizer=head_optimizer)
        step = state["step"]
        head_scheduler.last_epoch = step  # DeepSpeed restores the backbone's scheduler itself
        for group, base_lr in zip(head_optimizer.param_groups, head_scheduler.base_lrs):
            group["lr"] = base_lr * lr_lambda(step)
        samples_into_epoch = (step % steps_per_epoch) * accum * cfg.data.batch_size
    # metrics
    prometheus = PrometheusMetrics(cfg.metrics.prometheus_port, info.rank, info.local_rank)
    parquet = ParquetLog(Path(cfg.train.output_dir) / "metrics.parquet", enabled=info.is_main)
    verifier = VerificationCallback(cfg.eval.bins, cfg.eval.batch_size, rank=info.rank, world_size=info.world_size,
                                    group=info.group, device=info.device)
    if info.is_main:
        Path(cfg.train.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.train.output_dir) / "config.yaml").write_text(cfg.to_yaml())

    def evaluate() -> dict:
        results = verifier(engine.module, step)
        for name, result in results.items():
            prometheus.verification(name, result["accuracy"])
            parquet.append(step=step, **{f"{name}_accuracy": float(result["accuracy"])})
        return results

    def save() -> None:
        epoch = step // steps_per_epoch
        state = {"step": step, "epoch": epoch, "samples_into_epoch": (step % steps_per_epoch) * accum
                 * cfg.data.batch_size, "world_size": info.world_size, "stage": head.stage.name}
        ckpt.save_checkpoint(root, f"step{step:08d}", engine=engine, head=head, head_optimizer=head_optimizer,
                             config_yaml=cfg.to_yaml(), train_state=state, zero_stage=stage_zero, rank=info.rank,
                             group=info.group, keep_last=cfg.checkpoint.keep_last)
        parquet.flush()

    first_results = evaluate() if (verifier and cfg.eval.at_start and step == 0) else {}
    head.set_stage(stage_for_epoch(cfg.loss.stages, step / steps_per_epoch))

    # the loop
    throughput = Throughput(images_per_step, total_steps, start_step=step)
    loss_sum = torch.zeros((), device=info.device)
    loss_count = 0
    epoch = step // steps_per_epoch
    sampler.set_epoch(epoch)
    sampler.set_start(samples_into_epoch)
    batches = iter(loader)
    engine.train()
    first_loss = last_loss = None
    while step < total_steps:
        for _ in range(accum):
            try:
                images, labels = next(batches)
            except StopIteration:
                epoch += 1
                sampler.set_epoch(epoch)
                batches = iter(loader)
                images, labels = next(batches)
            images = images.to(info.device, next(engine.module.parameters()).dtype, non_blocking=True)
            labels = labels.to(info.device, non_blocking=True)
            embeddings = engine(images)
            loss = head(embeddings.float(), labels)
            engine.backward(loss)
            # The head steps at the accumulation boundary, beside engine.step(); the prototypes are
            # updated after backward (the chunked path recomputes from them in backward).
            if engine.is_gradient_accumulation_boundary():
                head_optimizer.step(grad_scale=engine_loss_scale(engine))
                head_optimizer.zero_grad(set_to_none=True)
                head.update_prototypes()
                head_scheduler.step()
            engine.step()
            loss_sum += loss.detach()
            loss_count += 1
        step += 1

        head.set_stage(stage_for_epoch(cfg.loss.stages, step / steps_per_epoch))  # logs a switch
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
                     step / steps_per_epoch, head.stage.name, mean_loss, lr, images_per_s,
                     format_duration(eta))
            prometheus.update(loss=mean_loss, lr=lr, images_per_second=images_per_s, step=step,
                              epoch=step / steps_per_epoch)
            parquet.append(step=step, epoch=step / steps_per_epoch, loss=mean_loss, lr=lr,
                           images_per_s=images_per_s)
        if verifier and cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step < total_steps:
            evaluate()
        if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 and step < total_steps:
            save()

    last_results = evaluate() if verifier else {}
    save()
    summary = {"steps": step, "first_loss": first_loss, "last_loss": last_loss,
               "first_accuracy": {k: float(v["accuracy"]) for k, v in first_results.items()},
               "last_accuracy": {k: float(v["accuracy"]) for k, v in last_results.items()},
               "checkpoint": str(root / f"step{step:08d}")}
    if info.is_main:
        import json

        (Path(cfg.train.output_dir) / "summary.json").write_text(json.dumps(summary, indent=1))
        log.info("done: %s", summary)
    dist.barrier(group=info.group)
    return summary


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
