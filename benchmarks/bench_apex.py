"""NVIDIA apex against torch's own, where apex is importable (NGC images): the ViT's LayerNorm
(apex.normalization.FusedLayerNorm vs nn.LayerNorm, forward + backward on the ViT-L token tensor in
bf16; model.norm_impl) and the head's AdamW step (apex's fused multi-tensor Adam vs lvface's
blockwise AdamW over one rank's centers; optimizer.head_impl). Where apex is absent it writes one
record saying so and exits 0: apex is an option, never a dependency.

    python benchmarks/bench_apex.py --json apex.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from lvface.config import LossConfig, OptimizerConfig
from lvface.heads import ShardedMarginHead, build_head_optimizer
from lvface.models.vit import build_layer_norm

log = logging.getLogger("bench_apex")


def _time(fn, device: torch.device, warmup: int = 3, steps: int = 20) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps * 1e3


def bench_layer_norm(impl: str, device, tokens: tuple[int, int, int]) -> dict:
    batch, length, dim = tokens
    norm = build_layer_norm(dim, 1e-5, impl).to(device=device, dtype=torch.bfloat16)
    x = torch.randn(batch, length, dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(x)

    def step():
        x.grad = None
        norm(x).backward(grad)

    ms = _time(step, device)
    moved = 4 * x.numel() * x.element_size()  # read x, write y; read dy, write dx (lower bound)
    return {"part": "layer_norm", "impl": impl, "shape": list(tokens), "ms": ms, "gb_per_s": moved / ms / 1e6}


def bench_head_adam(impl: str, device, classes: int, dim: int) -> dict:
    head = ShardedMarginHead(classes, dim, LossConfig(), group=None, seed=0).to(device)
    optimizer = build_head_optimizer(head, OptimizerConfig(lr=1e-3), sparse_rows=False, impl=impl)
    head.weight.grad = torch.randn_like(head.weight)

    def step():
        optimizer.step()

    ms = _time(step, device)
    moved = 7 * head.weight.numel() * 4  # read w, g, m, v; write w, m, v
    return {"part": "head_adamw", "impl": impl, "shape": [classes, dim], "ms": ms, "gb_per_s": moved / ms / 1e6}


def main(argv=None) -> list[dict]:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs=3, default=[384, 144, 768], help="batch, tokens, width")
    parser.add_argument("--classes", type=int, default=32187)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        import apex  # noqa: F401
        from apex.normalization import FusedLayerNorm  # noqa: F401
        from apex.optimizers import FusedAdam  # noqa: F401
    except ImportError as exc:
        records = [{"part": "apex", "available": False, "reason": f"apex not importable: {exc}"}]
        log.info("apex is not importable here (%s): nothing to compare", exc)
    else:
        records = []
        for impl in ("torch", "apex"):
            records.append(bench_layer_norm(impl, device, tuple(args.tokens)))
            records.append(bench_head_adam(impl, device, args.classes, args.dim))
        for r in records:
            log.info(f"{r['part']:11} {r['impl']:6} {r['ms']:8.3f} ms {r['gb_per_s']:8.1f} GB/s")
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=2))
    return records


if __name__ == "__main__":
    main()
