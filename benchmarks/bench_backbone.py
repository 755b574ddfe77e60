"""Backbone training throughput: forward + backward of the LVFace ViT variants.

Each step runs the model in train mode on random images (the preset's drop path, token masking and
activation checkpointing included), takes the sum of the embeddings as the loss and calls backward;
bf16 / fp16 run under torch.autocast on the chosen device with fp32 weights. No optimizer step.

    images/s  = batch * steps / seconds of the timed steps (after --warmup untimed steps)
    TFLOP/s   = 3 * forward FLOPs per image * images/s / 1e12
                (forward FLOPs from lvface.models.forward_flops_per_image, all 144 tokens counted;
                backward is taken as twice the forward; recomputation by activation checkpointing and
                the tokens skipped by masking are not corrected for)

    python benchmarks/bench_backbone.py --models vit_t vit_s --batch 32 --dtype fp32 bf16 \
        --device cpu --warmup 2 --steps 5 --json out.json

Prints a table and writes a JSON list of records (model, batch, dtype, device, images_per_s, tflops,
plus step_ms, params, gflops_per_image, device_name, torch).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from contextlib import nullcontext

import torch

from lvface.distributed import describe_device
from lvface.models import VIT_VARIANTS, build_vit, count_parameters, forward_flops_per_image

log = logging.getLogger("bench_backbone")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["vit_t"], choices=list(VIT_VARIANTS))
    parser.add_argument("--batch", type=int, default=32, help="images per step")
    parser.add_argument("--dtype", nargs="+", default=["fp32"], choices=list(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--json", default=None, help="write the records to this JSON file")
    return parser.parse_args(argv)



def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_one(name: str, batch: int, dtype: str, device: torch.device, warmup: int, steps: int) -> dict:
    """Time `steps` forward + backward passes of variant `name`; return one record."""
    model = build_vit(name).to(device).train()
    images = torch.randn(batch, 3, 112, 112, device=device)
    autocast = (
        torch.autocast(device_type=device.type, dtype=DTYPES[dtype]) if dtype != "fp32" else nullcontext()
    )

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with autocast:
            loss = model(images).float().sum()
        loss.backward()

    for _ in range(warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    seconds = time.perf_counter() - start

    flops = forward_flops_per_image(VIT_VARIANTS[name])
    images_per_s = batch * steps / seconds
    return {
        "model": name,
        "batch": batch,
        "dtype": dtype,
        "device": device.type,
        "images_per_s": images_per_s,
        "tflops": 3 * flops * images_per_s / 1e12,
        "step_ms": 1e3 * seconds / steps,
        "params": count_parameters(model),
        "gflops_per_image": flops / 1e9,
        "device_name": describe_device(device),
        "torch": torch.__version__,
    }


def format_table(records: list[dict]) -> str:
    header = f"{'model':<9} {'batch':>5} {'dtype':<5} {'device':<6} {'step ms':>9} {'images/s':>9} {'TFLOP/s':>8}"
    rows = [
        f"{r['model']:<9} {r['batch']:>5} {r['dtype']:<5} {r['device']:<6} {r['step_ms']:>9.1f} "
        f"{r['images_per_s']:>9.1f} {r['tflops']:>8.3f}"
        for r in records
    ]
    return "\n".join([header, "-" * len(header), *rows])


def main(argv: list[str] | None = None) -> list[dict]:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    device = torch.device(args.device)
    log.info("device %s, torch %s", describe_device(device), torch.__version__)
    records = []
    for name in args.models:
        for dtype in args.dtype:
            records.append(bench_one(name, args.batch, dtype, device, args.warmup, args.steps))
            log.info("%s %s: %.1f images/s", name, dtype, records[-1]["images_per_s"])
    log.info("\n%s", format_table(records))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(records, handle, indent=2)
        log.info("wrote %s", args.json)
    return records


if __name__ == "__main__":
    main()
