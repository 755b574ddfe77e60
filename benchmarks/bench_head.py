"""Head benchmark: forward + backward time and peak memory of the class-sharded margin softmax.

Spawns --ranks real processes (gloo on CPU, nccl on CUDA, one GPU per rank), fresh for every --impl so
each implementation's peak is its own. Every rank builds a ShardedMarginHead over its shard of
--classes, takes random embeddings [batch / ranks, dim] and labels, and times `loss = head(e, y);
loss.backward()` (the W gradient is released between steps, as zero_grad(set_to_none=True) does). No
optimizer step; the prototype update runs untimed after each step (--centers both adds the prototype
CE pass).

    s_per_step   mean wall time of the timed steps (after one warm-up step), slowest rank
    peak_rss_mb  per-rank peak resident memory (VmHWM of the rank process), largest over ranks
    base_rss_mb  RSS of a rank after `import torch` and the process group, before the head
    floor_mb     base + W + P (the prototype buffer) + dW + the chunk workspace: what the chunked
                 path cannot go below (W, P and dW are W-sized; the workspace is at most --chunk-mb,
                 less when the shard or the batch is small; the dense path has none)
    peak_cuda_mb torch.cuda.max_memory_allocated, on CUDA

    ms           the same in milliseconds; peak_mb: peak_cuda_mb on CUDA, peak_rss_mb on the CPU
    tflops       the three products of the margin softmax (forward logits, d embeddings, d centers),
                 2 N D C_used FLOPs each per CE term, over the step time, per rank: the useful rate
                 (the blockwise paths also recompute the logits in backward; not counted)

    python benchmarks/bench_head.py --batch 1024 --classes 200000 --dim 512 --sample-rate 1.0 \
        --ranks 2 --impl dense chunked --steps 3 --json head.json
    python benchmarks/bench_head.py --device cuda --ranks 1 --batch 24576 --classes 32187 --embeddings bf16 \
        --impl triton triton_atomic dense chunked --json head_gpu.json   # the WebFace42M per-rank shape, in the
                                                                         # training dtypes (fp32 W, bf16 embeddings)
    python benchmarks/bench_head.py --micro sampler epl bound --batch 24576 --classes 32187 --json micro.json

--micro runs single-process micro-benchmarks instead (--batch is N, --classes is C_local): the
device-side Partial-FC sampler against a host-side one (CPU rand + topk), the EPL update's Triton kernel
against its torch composition, and `bound`: the loss with the shift by s instead of the row max, in
fp32, against float64 (see lvface/kernels/margin_ce.py). Triton on the CPU runs only under
TRITON_INTERPRET=1, where timings mean nothing (correctness only); such records are skipped.

Prints a table and writes a JSON list of records (impl, device, dtype, batch, classes, dim,
sample_rate, ms, peak_mb, tflops, ranks, s_per_step, peak_rss_mb, and the columns above), rewritten
after every record.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lvface.distributed import free_port
from lvface.config import LossConfig, StageConfig
from lvface.heads import IMPLS, ShardedMarginHead
from lvface.kernels import registry
from lvface.metrics import proc_status_bytes

log = logging.getLogger("bench_head")
MB = 1 << 20
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1024, help="global batch (split over the ranks)")
    parser.add_argument("--classes", type=int, default=200_000, help="total number of classes")
    parser.add_argument("--dim", type=int, default=512, help="embedding size")
    parser.add_argument("--sample-rate", type=float, default=1.0, help="Partial-FC sample rate r")
    parser.add_argument("--ranks", type=int, default=2, help="processes (class shards)")
    parser.add_argument("--impl", nargs="+", default=["dense", "chunked"], choices=list(IMPLS))
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES),
                        help="dtype of the head's parameters W, P (training keeps them fp32)")
    parser.add_argument("--embeddings", default=None, choices=list(DTYPES),
                        help="dtype of the embeddings handed to the head (training: the backbone's, bf16 under "
                             "train.precision=bf16); default --dtype")
    parser.add_argument("--head-dtype", default="auto", choices=["auto", "fp32", "bf16"],
                        help="loss.head_dtype: the Triton kernels' operands (auto: bf16 on CUDA for bf16 embeddings)")
    parser.add_argument("--micro", nargs="+", default=None, choices=["sampler", "epl", "bound"],
                        help="run these micro-benchmarks instead of the head")
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


def _status_mb(field: str) -> float:
    """A memory line of /proc/self/status (VmRSS, VmHWM) in MiB (lvface.metrics.proc_status_bytes)."""
    value = proc_status_bytes(field)
    if value is None:
        raise RuntimeError(f"{field} not in /proc/self/status")
    return value / MB


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
    loss_cfg = LossConfig(stages=[stage], impl=impl, chunk_mb=args.chunk_mb,
                          head_dtype=args.head_dtype)
    head = ShardedMarginHead(args.classes, args.dim, loss_cfg, group=group, seed=0).to(device=device, dtype=DTYPES[args.dtype])
    generator = torch.Generator().manual_seed(1000 + rank)
    local = args.batch // args.ranks
    embeddings = torch.randn(local, args.dim, generator=generator).to(device, DTYPES[args.embeddings or args.dtype])
    embeddings.requires_grad_()
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
        head.update_prototypes()  # untimed: releases the embeddings the head keeps for the EPL update
    record = {
        "s_per_step": sum(times) / len(times),
        "peak_rss_mb": _status_mb("VmHWM"),
        "base_rss_mb": base_rss,
        "w_mb": head.weight.numel() * head.weight.element_size() / MB,
        "workspace_mb": head.workspace_bytes / MB,
        "threads": torch.get_num_threads(),
        "resolved_impl": head.resolved_impl,
        "operand_dtype": str(head.operand_dtype).removeprefix("torch."),
        "c_used": max(1, int(args.sample_rate * head.num_local_classes)) if args.sample_rate < 1 else head.num_local_classes,
    }
    if device.type == "cuda":
        record["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / MB
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


def run_impl(args: argparse.Namespace, impl: str) -> dict:
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_rank_main, args=(args, impl, free_port(), out_dir), nprocs=args.ranks, join=True)
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
        "device": args.device, "torch": torch.__version__, "dtype": args.dtype,
        "resolved_impl": ranks[0]["resolved_impl"], "embeddings": args.embeddings or args.dtype,
        "head_dtype": args.head_dtype, "operand_dtype": ranks[0]["operand_dtype"],
    }
    if "peak_cuda_mb" in ranks[0]:
        record["peak_cuda_mb"] = max(r["peak_cuda_mb"] for r in ranks)
    record["ms"] = 1000.0 * record["s_per_step"]
    record["peak_mb"] = record.get("peak_cuda_mb", record["peak_rss_mb"])
    terms = 2 if args.centers == "both" else 1
    flops = terms * 3 * 2 * args.batch * args.dim * max(r["c_used"] for r in ranks)
    record["tflops"] = flops / record["s_per_step"] / 1e12
    return record


def _timed(fn, device: torch.device, repeats: int) -> float:
    """Mean milliseconds of fn() over `repeats` calls after one warm-up."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 1000.0 * (time.perf_counter() - start) / repeats


def micro_sampler(args) -> list[dict]:
    from lvface.kernels.pfc_sample import host_select_rows, sample_seed, select_rows

    device = torch.device(args.device)
    labels = torch.randint(-1, args.classes, (args.batch,), device=device)
    out = []
    for name, fn in (("device", select_rows), ("host", host_select_rows)):
        ms = _timed(lambda: fn(labels, args.classes, args.sample_rate, sample_seed(0, 1, 0)), device, args.steps)
        out.append({"bench": "sampler", "impl": name, "device": args.device, "batch": args.batch,
                    "classes": args.classes, "sample_rate": args.sample_rate, "ms": ms})
    return out


def micro_epl(args) -> list[dict]:
    import torch.nn.functional as F

    from lvface.kernels.epl_update import epl_update_

    device = torch.device(args.device)
    prototypes = F.normalize(torch.randn(args.classes, args.dim, device=device), dim=1)
    features = F.normalize(torch.randn(args.batch, args.dim, device=device), dim=1)
    classes = torch.randint(0, args.classes, (args.batch,), device=device)
    out = []
    for impl in ("torch", "triton"):
        if impl == "triton" and device.type != "cuda":
            log.info("epl triton on the CPU: interpreted or absent, timing skipped (meaningless)")
            continue
        ms = _timed(lambda: epl_update_(prototypes, features, classes, mode="adaptive", momentum=0.9, impl=impl),
                    device, args.steps)
        out.append({"bench": "epl", "impl": impl, "device": args.device, "batch": args.batch,
                    "classes": args.classes, "dim": args.dim, "ms": ms})
    return out


def micro_bound(args) -> list[dict]:
    """The loss with exp(z - s) (no max pass) in fp32 vs float64 with the exact max, at init."""
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(0)
    rows = min(args.batch, 256)
    x = F.normalize(torch.randn(rows, args.dim, generator=generator, dtype=torch.float64), dim=1)
    w = F.normalize(torch.randn(args.classes, args.dim, generator=generator, dtype=torch.float64), dim=1)
    cos = x @ w.t()  # (rows, C) random centers: the initial state
    out = []
    for scale in (32.0, 64.0, 128.0):
        exact = torch.logsumexp(scale * cos, dim=1)
        shifted = scale + torch.log(torch.exp((scale * cos).float() - scale).sum(dim=1)).double()
        bad = ~torch.isfinite(shifted)
        error = ((shifted - exact).abs() / exact.abs())[~bad]
        out.append({"bench": "bound", "scale": scale, "classes": args.classes, "dim": args.dim,
                    "max_cos": float(cos.max(dim=1).values.mean()), "rows_inf": int(bad.sum()), "rows": rows,
                    "max_rel_error": float(error.max()) if error.numel() else None})
    return out


def run_micro(args) -> list[dict]:
    records = []
    for name in args.micro:
        records += {"sampler": micro_sampler, "epl": micro_epl, "bound": micro_bound}[name](args)
        _write(args, records)
    for r in records:
        log.info(json.dumps(r))
    return records


def _write(args, records: list[dict]) -> None:
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=2))


def main(argv: list[str] | None = None) -> list[dict]:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    if args.micro:
        return run_micro(args)
    records = []
    for impl in args.impl:
        backend = None if impl == "auto" else registry.lookup(impl)
        if backend is not None and args.device == "cpu" and not backend.runs_on("cpu"):
            log.info("%s on the CPU needs %s=1 and its timings mean nothing: skipped", impl, backend.interpreter_env)
            continue
        records.append(run_impl(args, impl))
        _write(args, records)  # after every implementation: a later crash keeps the earlier figures
    header = (
        f"{'impl':13} {'W':4} {'x':4} {'reads':8} {'batch':>6} {'classes':>9} {'dim':>5} {'r':>5} {'ranks':>5} {'ms':>9} "
        f"{'TFLOP/s':>8} {'peak MB':>8} {'floor MB':>8} {'base MB':>8}"
    )
    log.info(header)
    for r in records:
        log.info(
            f"{r['impl']:13} {r['dtype']:4} {r['embeddings']:4} {r['operand_dtype']:8} {r['batch']:>6} {r['classes']:>9} "
            f"{r['dim']:>5} {r['sample_rate']:>5g} "
            f"{r['ranks']:>5} {r['ms']:>9.1f} {r['tflops']:>8.3f} {r['peak_mb']:>8.0f} {r['floor_mb']:>8.0f} "
            f"{r['base_rss_mb']:>8.0f}"
        )
    return records


if __name__ == "__main__":
    main()
