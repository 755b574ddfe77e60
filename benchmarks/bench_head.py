"""Head benchmark: forward + backward time and peak memory of the class-sharded margin softmax.

Spawns --ranks real processes (gloo on CPU, nccl on CUDA, one GPU per rank), fresh for every --impl so
each implementation's peak is its own. Every rank builds a ShardedMarginHead over its shard of
--classes, takes random embeddings [batch / ranks, dim] and labels, and times `loss = head(e, y);
loss.backward()` (the W gradient is released between steps, as zero_grad(set_to_none=True) does). No
optimizer step, no prototype update (--centers both adds the prototype CE pass).

    s_per_step   mean wall time of the timed steps (after one warm-up step), slowest rank
    peak_rss_mb  per-rank peak resident memory (VmHWM of the rank process), largest over ranks
    base_rss_mb  RSS of a rank after `import torch` and the process group, before the head
    floor_mb     base + W + P (the prototype buffer) + dW + the chunk workspace: what the chunked
                 path cannot go below (W, P and dW are W-sized; the workspace is at most --chunk-mb,
                 less when the shard or the batch is small; the dense path has none)
    peak_cuda_mb torch.cuda.max_memory_allocated, on CUDA

    python benchmarks/bench_head.py --batch 1024 --classes 200000 --dim 512 --sample-rate 1.0 \
        --ranks 2 --impl dense chunked --steps 3 --json head.json

Prints a table and writes a JSON list of records (impl, batch, classes, dim, sample_rate, ranks,
s_per_step, peak_rss_mb, and the columns above).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lvface.config import LossConfig, StageConfig
from lvface.heads import IMPLS, ShardedMarginHead

log = logging.getLogger("bench_head")
MB = 1 << 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1024, help="global batch (split over the ranks)")
    parser.add_argument("--classes", type=int, default=200_000, help="total number of classes")
    parser.add_argument("--dim", type=int, default=512, help="embedding size")
    parser.add_argument("--sample-rate", type=float, default=1.0, help="Partial-FC sample rate r")
    parser.add_argument("--ranks", type=int, default=2, help="processes (class shards)")
    parser.add_argument("--impl", nargs="+", default=["dense", "chunked"], choices=list(IMPLS))
    parser.add_argument("--centers", default="learned", choices=["learned", "both"], help="CE against W, or W and P")
    parser.add_argument("--chunk-mb", type=int, default=64, help="chunk memory budget of the chunked path")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads per rank; 0 = cores / ranks")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--json", default=None, help="write the records to this JSON file")
    args = parser.parse_args(argv)
    if args.batch % args.ranks:
        parser.error(f"--batch {args.batch} must be divisible by --ranks {args.ranks}")
    return args


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _status_mb(field: str) -> float:
    """A memory line of /proc/self/status (VmRSS, VmHWM) in MiB: this process only (not its parent's
    pages, which ru_maxrss would carry across the spawn's exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"{field} not in /proc/self/status")


def _rank_main(rank: int, args: argparse.Namespace, impl: str, port: int, out_dir: str) -> None:
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // args.ranks))
    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
        world_size=args.ranks, timeout=timedelta(minutes=30),
    )
    group = dist.new_group(list(range(args.ranks)))
    base_rss = _status_mb("VmRSS")
    stage = StageConfig(name="bench", sample_rate=args.sample_rate, centers=args.centers)
    loss_cfg = LossConfig(stages=[stage])
    head = ShardedMarginHead(
        args.classes, args.dim, loss_cfg, group=group, impl=impl, chunk_bytes=args.chunk_mb * MB, seed=0
    ).to(device)
    generator = torch.Generator().manual_seed(1000 + rank)
    local = args.batch // args.ranks
    embeddings = torch.randn(local, args.dim, generator=generator).to(device).requires_grad_()
    labels = torch.randint(0, args.classes, (local,), generator=generator).to(device)
    times = []
    for step in range(args.steps + 1):
        head.weight.grad, embeddings.grad = None, None
        dist.barrier(group=group)
        start = time.perf_counter()
        head(embeddings, labels).backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier(group=group)
        if step:  # step 0 warms up
            times.append(time.perf_counter() - start)
    record = {
        "s_per_step": sum(times) / len(times),
        "peak_rss_mb": _status_mb("VmHWM"),
        "base_rss_mb": base_rss,
        "w_mb": head.weight.numel() * head.weight.element_size() / MB,
        "workspace_mb": head.workspace_bytes / MB,
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        record["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / MB
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


def run_impl(args: argparse.Namespace, impl: str) -> dict:
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_rank_main, args=(args, impl, _free_port(), out_dir), nprocs=args.ranks, join=True)
        ranks = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(args.ranks)]
    biggest = max(r["w_mb"] for r in ranks)  # rank 0 holds the largest shard
    base = max(r["base_rss_mb"] for r in ranks)
    workspace = max(r["workspace_mb"] for r in ranks)
    record = {
        "impl": impl, "batch": args.batch, "classes": args.classes, "dim": args.dim, "sample_rate": args.sample_rate,
        "ranks": args.ranks, "s_per_step": max(r["s_per_step"] for r in ranks),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks), "base_rss_mb": base,
        "floor_mb": base + 3 * biggest + workspace,  # W + P + dW + the chunk workspace
        "w_mb": biggest, "workspace_mb": workspace, "centers": args.centers, "chunk_mb": args.chunk_mb,
        "steps": args.steps, "threads": ranks[0]["threads"],
        "device": args.device, "torch": torch.__version__,
    }
    if "peak_cuda_mb" in ranks[0]:
        record["peak_cuda_mb"] = max(r["peak_cuda_mb"] for r in ranks)
    return record


def main(argv: list[str] | None = None) -> list[dict]:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    records = [run_impl(args, impl) for impl in args.impl]
    header = (
        f"{'impl':8} {'batch':>6} {'classes':>9} {'dim':>5} {'r':>5} {'ranks':>5} {'s/step':>8} "
        f"{'peak MB':>8} {'floor MB':>8} {'base MB':>8}"
    )
    log.info(header)
    for r in records:
        log.info(
            f"{r['impl']:8} {r['batch']:>6} {r['classes']:>9} {r['dim']:>5} {r['sample_rate']:>5g} {r['ranks']:>5} "
            f"{r['s_per_step']:>8.3f} {r['peak_rss_mb']:>8.0f} {r['floor_mb']:>8.0f} {r['base_rss_mb']:>8.0f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=2))
    return records


if __name__ == "__main__":
    main()
