"""One full training step on one device, as lvface/train.py runs it: the ViT inside a DeepSpeed ZeRO-2
engine (bf16 on a GPU that has it) plus the class-sharded head with its own optimizer and the EPL
prototype update. Random images and labels already on the device: the loader is left out.

    images_per_s  batch * steps / seconds of the timed steps (after --warmup untimed steps)
    model_tflops  3 * (ViT forward FLOPs per image * batch + 2 * batch * classes * dim * passes)
                  per step / step time; passes = 2 with centers=both (CE against W and P). Backward
                  counted as twice the forward; activation recomputation and masked tokens are
                  not corrected for (the MFU convention)
    mfu           model_tflops / the card's dense bf16 peak (--peak-tflops, or a table of known cards)

The head runs at the per-rank shape of a large run: --classes is one rank's shard (WebFace42M on 64
GPUs: 32,187), the batch is this rank's only (one GPU gathers nothing).

    python benchmarks/bench_train_step_gpu.py --models vit_t vit_l --batch 384 --classes 32187 \
        --adam torch --json step.json      # the GPU of LOCAL_RANK if CUDA is there, else the CPU

--adam deepspeed uses DeepSpeed's FusedAdam (prebuilt in the Docker image, JIT-compiled elsewhere,
which takes a minute or more); --adam torch uses torch.optim.AdamW (fused on CUDA) through
DeepSpeed's torch_adam switch. Written as a stand-in until benchmarks/bench_step.py lands; gpu_check
prefers that one when it exists.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from lvface.config import load_config
from lvface.distributed import describe_device, init_distributed
from lvface.engine import build_ds_config, build_engine, param_groups
from lvface.heads import IMPLS, ShardedMarginHead, build_head_optimizer
from lvface.models import VIT_VARIANTS, build_vit, forward_flops_per_image
from lvface.models.vit import no_weight_decay_names

log = logging.getLogger("bench_train_step_gpu")
REPO = Path(__file__).resolve().parent.parent
# Dense bf16 matrix peaks (datasheet, TFLOP/s) by a substring of the device name; --peak-tflops wins.
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "GH200": 989.4, "A100": 312.0, "L40S": 362.0, "B200": 2250.0}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["vit_t", "vit_l"], choices=list(VIT_VARIANTS))
    parser.add_argument("--batch", type=int, default=384, help="images per step")
    parser.add_argument("--classes", type=int, default=32187, help="classes of this rank's head shard")
    parser.add_argument("--centers", default="both", choices=["learned", "both"],
                        help="stable stage (W and P, r=1) or early stage (W only)")
    parser.add_argument("--sample-rate", type=float, default=1.0)
    parser.add_argument("--impl", default="auto" if "auto" in IMPLS else "chunked", choices=list(IMPLS),
                        help="head implementation (auto: triton on CUDA where it exists)")
    parser.add_argument("--ds-config", default=str(REPO / "configs" / "zero2.json"))
    parser.add_argument("--adam", default="torch", choices=["torch", "deepspeed"])
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="dense bf16 peak for the MFU; 0 = table")
    parser.add_argument("--json", default=None)
    return parser.parse_args(argv)


def peak_tflops(device_name: str, override: float) -> float | None:
    if override > 0:
        return override
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return value
    return None


def bench_model(name: str, args, info) -> dict:
    device = info.device
    cfg = load_config(None, [f"data.batch_size={args.batch}", f"train.precision={args.precision}",
                             "train.grad_clip=5.0", f"loss.impl={args.impl}"])
    ds_config = build_ds_config(args.ds_config, cfg, info.world_size, device)
    if args.adam == "torch":
        ds_config["optimizer"]["params"].update(torch_adam=True, **({"fused": True} if device.type == "cuda" else {}))
    torch.manual_seed(0)
    backbone = build_vit(name)
    engine = build_engine(backbone, ds_config, param_groups(backbone, 0.1, no_weight_decay_names(backbone)),
                          lambda step: 1.0)
    stage = {"name": "bench", "end_epoch": 1.0, "sample_rate": args.sample_rate, "centers": args.centers}
    cfg.loss.stages = [type(cfg.loss.stages[0])(**stage)]
    head = ShardedMarginHead(args.classes, cfg.model.num_features, cfg.loss, group=info.group, impl=args.impl,
                             seed=0).to(device)
    head.set_stage(cfg.loss.stages[0])
    head_optimizer = build_head_optimizer(head, cfg.optimizer)
    dtype = next(engine.module.parameters()).dtype
    generator = torch.Generator(device="cpu").manual_seed(1)
    images = torch.randn(args.batch, 3, 112, 112, generator=generator).to(device=device, dtype=dtype)
    labels = torch.randint(0, args.classes, (args.batch,), generator=generator).to(device)

    def step() -> torch.Tensor:
        loss = head(engine(images).float(), labels)
        engine.backward(loss)
        head_optimizer.step(grad_scale=1.0)
        head_optimizer.zero_grad(set_to_none=True)
        head.update_prototypes()
        engine.step()
        return loss

    engine.train()
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    loss_value = float(loss.detach())  # synchronises
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / args.steps
    passes = 2 if args.centers == "both" else 1
    vit_flops = forward_flops_per_image(VIT_VARIANTS[name]) * args.batch
    head_flops = 2.0 * args.batch * args.classes * args.sample_rate * cfg.model.num_features * passes
    model_tflops = 3.0 * (vit_flops + head_flops) / seconds / 1e12
    device_name = describe_device(device)
    peak = peak_tflops(device_name, args.peak_tflops) if device.type == "cuda" else None
    record = {
        "model": name, "batch": args.batch, "classes": args.classes, "centers": args.centers,
        "sample_rate": args.sample_rate, "impl": head.impl if hasattr(head, "impl") else args.impl,
        "precision": "bf16" if dtype == torch.bfloat16 else str(dtype).removeprefix("torch."),
        "adam": args.adam, "zero_stage": ds_config["zero_optimization"]["stage"], "device": device.type,
        "device_name": device_name, "step_ms": seconds * 1e3, "images_per_s": args.batch / seconds,
        "model_tflops": model_tflops, "peak_tflops": peak, "mfu": model_tflops / peak if peak else None,
        "loss": loss_value, "steps": args.steps, "torch": torch.__version__,
    }
    if device.type == "cuda":
        record["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / (1 << 20)
    del engine, head, head_optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return record


def main(argv=None) -> list[dict]:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    info = init_distributed()
    records = []
    for name in args.models:
        records.append(bench_model(name, args, info))
        if args.json:  # after each model: a later one that runs out of time or memory loses nothing
            Path(args.json).write_text(json.dumps(records, indent=2))
    log.info(f"{'model':8} {'batch':>6} {'impl':>8} {'ms/step':>9} {'img/s':>9} {'TFLOP/s':>8} {'MFU':>6}")
    for r in records:
        mfu = f"{r['mfu']:.3f}" if r["mfu"] is not None else "-"
        log.info(f"{r['model']:8} {r['batch']:>6} {r['impl']:>8} {r['step_ms']:>9.1f} {r['images_per_s']:>9.1f} "
                 f"{r['model_tflops']:>8.2f} {mfu:>6}")
    return records


if __name__ == "__main__":
    main()
