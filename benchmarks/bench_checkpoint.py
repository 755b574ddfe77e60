"""What a checkpoint costs a run: the background (`async`) save against the synchronous one, side by side.

For each size (the demo model; ViT-T with 500k classes) and each mode (checkpoint.async_save true / false)
it spawns --ranks processes running lvface's own Trainer (the same code as a real run) for --steps
steps with a checkpoint every --every steps (and the forced one at the end), and records per mode:

    stall_s              what a save cost the run at its step boundary (the snapshot in async mode, the
                         whole save in sync mode): from the moment the last rank arrived to the moment the
                         last rank left (wall clock; the ranks share one machine's clock); mean and max over
                         the interval saves. The ranks' skew before it is not counted: the first rank to
                         arrive would wait for the last in the next step's gradient all-reduce anyway
    stall_rank_s         the same per rank, from its own arrival (skew included), the slowest rank
    phases_s             async: the snapshot's parts (non-finite check, DeepSpeed's capture, backbone, head
                         shard copy, hand-over, agreement), mean over the interval saves, slowest rank
    write_s              async: snapshot to commit of each interval save (rank 0)
    median_step_s        the median step time over the run (rank 0; checkpoint time is not in a step)
    during_write_step_s  async: mean step time of the steps that ran while a background write was in
                         flight; `during_write_ratio` = that / median_step_s
    quiet_step_s         async: the median of the other steps (none in flight; the first step left out)
    waits                saves that were due while the previous one was still being written
    wall_s               the whole run: Trainer construction to its end (slowest rank)

and per size `stall_ratio` = async stall / sync stall (mean of the interval saves).

    python benchmarks/bench_checkpoint.py --json ckpt.json                    # demo and ViT-T + 500k classes
    python benchmarks/bench_checkpoint.py --sizes demo --steps 12 --every 3   # writes overlapping saves

Data: the demo size writes 100 synthetic identities; the 500k size writes one small noise JPEG per class
(16 distinct images repeated; the pixels do not matter, the head's shard size does).
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

log = logging.getLogger("bench_checkpoint")

SIZES = {
    "demo": {"overrides": ["model.name=vit_demo", "data.batch_size=16"], "classes": 0},
    "vit_t_500k": {"overrides": ["model.name=vit_t", "data.batch_size=8"], "classes": 500_000},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=0, help="steps per run (default: 32 demo, 24 at 500k classes)")
    parser.add_argument("--every", type=int, default=0,
                        help="checkpoint.every_steps (default: 8; a write then has the time it takes here, as saves "
                             "minutes apart have in a real run)")
    parser.add_argument("--json", default=None, help="write the records to this JSON file")
    return parser.parse_args(argv)


def _rank_main(rank: int, world: int, port: int, argv: list[str], out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), CUDA_VISIBLE_DEVICES="")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    from lvface import train

    cfg = train.load_config(str(REPO / "configs" / "demo.yaml"), argv)
    stop = train.StopRequest().install()
    info = train.init_distributed(cfg.train.collective_timeout_s)
    train.setup_logging(info.rank)
    start = time.perf_counter()
    trainer = train.Trainer(cfg, str(REPO / "configs" / "zero2.json"), info, stop, train.RunFolder(cfg.train.output_dir))
    summary = trainer.train()
    record = {"wall_s": time.perf_counter() - start, "steps": [p["step"] for p in summary["step_phases"]],
              "saves": trainer.checkpointer.history, "waits": trainer.checkpointer.waits}
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))


def _data(tmp: Path, classes: int) -> Path:
    data = tmp / f"data{classes}"
    if data.exists():
        return data / "train.rec"
    if classes:
        sys.path.insert(0, str(REPO / "benchmarks"))
        from bench_step import _noise_jpegs

        from lvface.data.recordio import write_insightface_rec

        jpegs = _noise_jpegs(16)
        data.mkdir(parents=True)
        write_insightface_rec(str(data), ((label, jpegs[label % len(jpegs)]) for label in range(classes)))
    else:
        from lvface.data.synthetic import write_synthetic_dataset

        write_synthetic_dataset(str(data), num_identities=100, images_per_identity=20, val_identities=4, val_pairs=10)
    return data / "train.rec"


def run_mode(size: str, mode: str, args: argparse.Namespace, tmp: Path, steps: int, every: int) -> dict:
    from lvface.distributed import free_port

    out = tmp / f"{size}_{mode}"
    argv = [*SIZES[size]["overrides"], f"data.rec={_data(tmp, SIZES[size]['classes'])}", "data.num_classes=0",
            f"train.max_steps={steps}", "train.log_every=1000000", "eval.bins=[]", "eval.at_start=false",
            f"checkpoint.every_steps={every}", "checkpoint.keep_last=1", f"checkpoint.async_save={mode == 'async'}",
            f"train.output_dir={out / 'run'}"]
    out.mkdir(parents=True)
    context, port = mp.get_context("spawn"), free_port()
    processes = [context.Process(target=_rank_main, args=(rank, args.ranks, port, argv, str(out)))
                 for rank in range(args.ranks)]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    if any(process.exitcode != 0 for process in processes):
        raise RuntimeError(f"{size} {mode}: a rank failed (see its log above)")
    ranks = [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(args.ranks)]
    return summarize(size, mode, ranks, steps, every)


def summarize(size: str, mode: str, ranks: list[dict], steps: int, every: int) -> dict:
    first = ranks[0]
    interval = [i for i, save in enumerate(first["saves"]) if save["step"] < steps]  # not the forced last one
    stalls = [max(r["saves"][i]["left"] for r in ranks) - max(r["saves"][i]["arrived"] for r in ranks)
              for i in interval]
    rank_stalls = [max(r["saves"][i]["stall_s"] for r in ranks) for i in interval]
    step_s = first["steps"]  # step_s[k] is step k + 1
    writing = {k for i in interval for k in range(first["saves"][i]["step"] + 1, first["saves"][i]["committed_step"] + 1)}
    during = [step_s[k - 1] for k in sorted(writing)]
    quiet = [step_s[k - 1] for k in range(2, len(step_s) + 1) if k not in writing]  # not the first (warm-up)
    median = statistics.median(step_s)
    record = {"size": size, "mode": mode, "steps": steps, "every_steps": every, "saves": len(first["saves"]),
              "stall_s": statistics.mean(stalls) if stalls else None, "stall_max_s": max(stalls, default=None),
              "stall_rank_s": statistics.mean(rank_stalls) if rank_stalls else None,
              "last_save_s": max(r["saves"][-1]["stall_s"] for r in ranks), "median_step_s": median,
              "waits": first["waits"], "wall_s": max(r["wall_s"] for r in ranks)}
    if mode == "async":
        record["write_s"] = [first["saves"][i].get("write_s") for i in interval]
        record["phases_s"] = {name: statistics.mean(max(r["saves"][i]["phases"][name] for r in ranks) for i in interval)
                              for name in first["saves"][interval[0]]["phases"]} if interval else {}
        record["steps_during_write"] = len(during)
        record["during_write_step_s"] = statistics.mean(during) if during else None
        record["during_write_ratio"] = statistics.mean(during) / median if during else None
        record["quiet_step_s"] = statistics.median(quiet) if quiet else None
    return record


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    records = []
    with tempfile.TemporaryDirectory(prefix="bench_checkpoint_") as tmp:
        for size in args.sizes:
            steps = args.steps or (24 if SIZES[size]["classes"] else 32)
            every = args.every or 8
            pair = {mode: run_mode(size, mode, args, Path(tmp), steps, every) for mode in ("async", "sync")}
            if pair["async"]["stall_s"] and pair["sync"]["stall_s"]:
                pair["async"]["stall_ratio"] = pair["async"]["stall_s"] / pair["sync"]["stall_s"]
                pair["async"]["stall_rank_ratio"] = pair["async"]["stall_rank_s"] / pair["sync"]["stall_rank_s"]
            for record in pair.values():
                record.update(ranks=args.ranks, machine=f"{platform.processor() or platform.machine()}, "
                              f"{os.cpu_count()} cores", torch=torch.__version__)
                log.info("%s", json.dumps(record))
                records.append(record)
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1) + "\n")
    return records


if __name__ == "__main__":
    main()
