"""Whole training steps: loader -> ViT under the DeepSpeed engine -> class-sharded head -> both optimizers.

Spawns --ranks processes on this machine (gloo on the CPU, NCCL with one GPU per rank on CUDA), each of
which runs lvface's own trainer (`lvface.train.main`, the same code as a real run) on --config with the
overrides given, for --warmup + --steps optimizer steps, verification and checkpoints off. The trainer's
TrainMetrics times every step and its phases (lvface/metrics.py); this script averages the timed steps
(the warm-up ones dropped) and reports, per rank and for the slowest rank:

    images/s         global images per step / the slowest rank's mean step time
    step_s           mean wall time of a step (all micro-batches)
    data_wait_s      waiting for the loader
    backbone_s       ViT forward + backward (backward includes DeepSpeed's gradient reduce(-scatter))
    head_s           margin-softmax head forward + backward, its collectives included
    head_comm_s      of which: the head's collectives (embedding all-gather, reduce-scatter, all-reduces)
    optimizer_s      both optimizers (ZeRO's parameter all-gather included) + the prototype update
    other_s          step_s minus the phases (host glue, loss bookkeeping)
    grad_reduce_probe_s  a standalone reduce-scatter + all-gather of the backbone's fp32 gradient on
                     the same group (what ZeRO-2 moves per step; on 1 rank 0), timed outside the steps
    peak_memory_mb   torch.cuda.max_memory_allocated on CUDA, peak RSS (VmHWM) on the CPU

    python benchmarks/bench_step.py --config configs/demo.yaml --ranks 2 --steps 10 --json step.json \
        data.batch_size=64
    python benchmarks/bench_step.py --config configs/lvface_vit_l_wf42m.yaml --ranks 8 --device cuda \
        data.rec=/data/wf42m/train.rec data.batch_size=384
    python benchmarks/bench_step.py --models vit_t vit_l --batch 384 --classes 32187 --json step.json
        # one GPU at the per-rank shape of WebFace42M on 64 GPUs (what benchmarks/gpu_check.py runs)

Without data.rec pointing at a file, a data set is written to a temporary folder: 100 synthetic
identities x 20 images, or with --classes, one noise JPEG per class for classes x ranks classes (the
pixels do not matter to the step time; the head's shard size does). --json writes a list of records,
one per model.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from lvface.metrics import PHASES  # noqa: E402  (the step phases the trainer times)

log = logging.getLogger("bench_step")
MB = 1 << 20


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"), help="lvface YAML config")
    parser.add_argument("--ds-config", default=str(REPO / "configs" / "zero2.json"), help="DeepSpeed JSON config")
    parser.add_argument("--ranks", type=int, default=1, help="processes (one GPU each on CUDA)")
    parser.add_argument("--warmup", type=int, default=2, help="steps run but not timed")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads per rank; 0 = cores / ranks")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: CUDA when present (bf16 there unless train.precision says otherwise)")
    parser.add_argument("--models", nargs="+", default=None, help="run each of these model.name values")
    parser.add_argument("--batch", type=int, default=None, help="images per rank per step (data.batch_size)")
    parser.add_argument("--classes", type=int, default=None,
                        help="classes per rank (the head's shard); writes a data set of classes x ranks classes")
    parser.add_argument("--json", default=None, help="write the record to this JSON file")
    return parser.parse_known_args(argv)


def _grad_reduce_probe(numel: int, device: torch.device, group, world_size: int, repeats: int = 3) -> float:
    """Mean seconds of a reduce-scatter + all-gather of `numel` fp32 values (ZeRO-2's traffic per step)."""
    import torch.distributed as dist

    if world_size == 1:
        return 0.0
    padded = -(-numel // world_size) * world_size
    full = torch.ones(padded, device=device)
    part = torch.empty(padded // world_size, device=device)
    times = []
    for _ in range(repeats + 1):
        dist.barrier(group=group)
        start = time.perf_counter()
        dist.reduce_scatter_tensor(part, full, group=group)
        dist.all_gather_into_tensor(full, part, group=group)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.mean(times[1:])


def _rank_main(rank: int, args: argparse.Namespace, overrides: list[str], port: int, metrics_port: int,
               out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(args.ranks), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.ranks)
    torch.set_num_threads(threads)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from lvface import train

    argv = ["--config", args.config, "--ds_config", args.ds_config, *overrides,
            f"train.max_steps={args.warmup + args.steps}", "train.log_every=1000000", "eval.bins=[]",
            "eval.at_start=false", "checkpoint.every_steps=0", "checkpoint.resume=",
            f"metrics.prometheus_port={metrics_port}",  # exporter on, as in production (CUDA-event timers: no sync)
            f"train.output_dir={Path(out_dir) / 'run'}"]
    result = train.main(argv)
    phases = result["step_phases"][args.warmup:]
    record = {name + "_s": statistics.mean(p[name] for p in phases) for name in ("step",) + PHASES}
    record["other_s"] = record["step_s"] - sum(record[p + "_s"] for p in PHASES if p != "head_collective")
    record["peak_memory_mb"] = result["peak_memory_bytes"] / MB
    record["timed_steps"] = len(phases)
    record["threads"] = threads
    # the probe, after training, on the trainer's group of all ranks
    import torch.distributed as dist

    from lvface.models import build_vit

    cfg_model = train.load_config(args.config, overrides).model
    numel = sum(p.numel() for p in build_vit(cfg_model.name, num_features=cfg_model.num_features).parameters())
    group = dist.new_group(list(range(args.ranks)))
    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    record["grad_reduce_probe_s"] = _grad_reduce_probe(numel, device, group, args.ranks)
    record["backbone_params"] = numel
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


def _noise_jpegs(count: int, size: int = 112) -> list[bytes]:
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def _ensure_data(overrides: list[str], tmp: Path, classes: int | None) -> list[str]:
    if any(o.startswith("data.rec=") and Path(o.split("=", 1)[1]).is_file() for o in overrides):
        return overrides
    data = tmp / "data"
    if classes:
        from lvface.data.recordio import write_insightface_rec

        jpegs = _noise_jpegs(16)
        data.mkdir(parents=True)
        write_insightface_rec(str(data), ((label, jpegs[label % len(jpegs)]) for label in range(classes)))
    else:
        from lvface.data.synthetic import write_synthetic_dataset

        write_synthetic_dataset(str(data), num_identities=100, images_per_identity=20, val_identities=4,
                                val_pairs=10)
    return [o for o in overrides if not o.startswith(("data.rec=", "data.num_classes="))] + [
        f"data.rec={data / 'train.rec'}", "data.num_classes=0"]


def bench(args: argparse.Namespace, overrides: list[str]) -> dict:
    from lvface.config import load_config
    from lvface.distributed import describe_device, free_port

    with tempfile.TemporaryDirectory(prefix="bench_step_") as tmp:
        overrides = _ensure_data(overrides, Path(tmp), args.classes and args.classes * args.ranks)
        cfg = load_config(args.config, overrides)
        context = mp.get_context("spawn")
        port, metrics_port = free_port(), free_port()
        processes = [context.Process(target=_rank_main, args=(rank, args, overrides, port, metrics_port, tmp))
                     for rank in range(args.ranks)]
        for process in processes:
            process.start()
        for process in processes:
            process.join()
        failed = [rank for rank, process in enumerate(processes) if process.exitcode != 0]
        if failed:
            raise RuntimeError(f"ranks {failed} failed (see their log above)")
        ranks = [json.loads(Path(tmp, f"rank{rank}.json").read_text()) for rank in range(args.ranks)]
    slowest = max(ranks, key=lambda r: r["step_s"])
    images_per_step = cfg.data.batch_size * cfg.train.gradient_accumulation_steps * args.ranks
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    return {
        "model": cfg.model.name, "ranks": args.ranks, "device": args.device,
        "machine": f"{describe_device(device)}, {os.cpu_count()} cores, {platform.system()}",
        "torch": torch.__version__, "batch_per_rank": cfg.data.batch_size,
        "accumulation": cfg.train.gradient_accumulation_steps,
        "precision": cfg.train.precision, "head_impl": cfg.loss.impl, "ds_config": Path(args.ds_config).name,
        "images_per_step": images_per_step, "images_per_s": images_per_step / slowest["step_s"],
        "slowest": slowest, "per_rank": ranks,
        "step_spread_s": slowest["step_s"] - min(r["step_s"] for r in ranks),
    }


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args, overrides = parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not any(o.startswith("train.precision=") for o in overrides):
        overrides.append("train.precision=auto")  # bf16 where the card has it (demo.yaml says fp32)
    if args.batch:
        overrides.append(f"data.batch_size={args.batch}")
    records = []
    for model in args.models or [None]:
        record = bench(args, overrides + ([f"model.name={model}"] if model else []))
        records.append(record)
        slow = record["slowest"]
        cells = [("step", slow["step_s"])] + [(p, slow[p + "_s"]) for p in PHASES] + [("other", slow["other_s"])]
        print(f"{record['model']} on {record['ranks']} rank(s), {record['machine']}: "
              f"{record['images_per_s']:.1f} images/s, peak {slow['peak_memory_mb']:.0f} MiB")
        print("  ".join(f"{name} {1000 * value:.1f} ms" for name, value in cells))
        print(f"grad reduce-scatter+all-gather probe {1000 * slow['grad_reduce_probe_s']:.1f} ms, "
              f"rank spread {1000 * record['step_spread_s']:.1f} ms")
        if args.json:  # after each model, so a run cut short keeps what it measured
            Path(args.json).write_text(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
