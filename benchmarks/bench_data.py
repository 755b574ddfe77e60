"""Data loading throughput: decode + augment + normalise, images/s of one training process.

Writes a shard of 112x112 JPEGs (synthetic faces, PIL quality 92, ~6 KB each, like WebFace42M's)
and times the training loaders over it, each with the same number of CPU threads:

    dali         DaliTrainLoader, CPU pipeline (device_id=None), data.dali_threads = T
    torch        TorchTrainLoader (the fallback), data.num_workers = T worker processes
    dali-reader  the alternative design: DALI's readers.mxnet (random_shuffle, file-order shards) with
                 the same operators, for the feeding-vs-reader comparison of lvface/data/dali.py
    dali-gpu     DaliTrainLoader on CUDA ("mixed" nvJPEG decode), when a GPU is present

images/s = images of the timed batches / seconds, after --warmup batches (pipeline build, worker
start); each configuration runs --repeats times, interleaved, and the median is reported. The images
come out as they do for training: float (B, 3, 112, 112) normalised, on the loader's device.

It also prints the images/s one GPU consumes when training a ViT at an assumed achieved --tflops
(3 x forward FLOPs per image: forward + backward, all 144 tokens), i.e. what the loader must deliver.

    python benchmarks/bench_data.py --loaders dali torch dali-reader --threads 1 2 --repeats 5 --json data.json

JSON: a list of records (loader, device, threads, images_per_s, plus augment, batch, runs, per_thread).
The required-rate table is printed only (it is arithmetic, not a measurement).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time

import numpy as np
import torch

from lvface.config import DataConfig
from lvface.data.loader import build_train_loader
from lvface.data.recordio import IRHeader, RecordIOWriter, write_image_only_index
from lvface.data.synthetic import _encode_jpeg, render_face
from lvface.models import VIT_VARIANTS, forward_flops_per_image

log = logging.getLogger("bench_data")
AUGMENT = {"none": dict(flip=False), "flip": dict(flip=True),
           "all": dict(flip=True, crop_p=0.5, color_p=0.5, grayscale_p=0.1, blur_p=0.3, mask_p=0.2)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loaders", nargs="+", default=["dali", "torch", "dali-reader", "dali-gpu"],
                        choices=["dali", "torch", "dali-reader", "dali-gpu"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--augment", nargs="+", default=["flip"], choices=list(AUGMENT))
    parser.add_argument("--images", type=int, default=4096, help="records in the generated shard")
    parser.add_argument("--unique", type=int, default=512, help="distinct rendered faces (repeated to --images)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--batches", type=int, default=24, help="timed batches per run")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tflops", type=float, default=400.0,
                        help="assumed achieved bf16 TFLOP/s of one GPU for the required-rate table")
    parser.add_argument("--data", default="", help="folder for the shard (default: a temporary folder)")
    parser.add_argument("--json", default="", help="write the records here")
    return parser.parse_args(argv)


def write_shard(folder: str, images: int, unique: int) -> str:
    jpegs = [_encode_jpeg(render_face(0, i % 97, i), 92) for i in range(unique)]
    rec = os.path.join(folder, "bench.rec")
    with RecordIOWriter(rec) as writer:
        for key in range(images):
            writer.write_record(key, IRHeader(0, float(key % 1000), key, 0), jpegs[key % unique])
    log.info("wrote %s: %d images (%d distinct), %.1f KB mean", rec, images, unique,
             np.mean([len(j) for j in jpegs]) / 1024)
    return rec


def time_loader(rec: str, loader: str, threads: int, augment: str, args) -> float:
    device = torch.device("cuda" if loader == "dali-gpu" else "cpu")
    cfg = DataConfig(rec=rec, batch_size=args.batch, loader="torch" if loader == "torch" else "dali",
                     num_workers=threads, dali_threads=threads, prefetch=2, **AUGMENT[augment])
    train = build_train_loader(cfg, rank=0, world_size=1, seed=0, device=device)
    batches, epoch, timed, start = 0, 0, 0, 0.0
    while timed < args.batches:
        train.set_epoch(epoch)
        for images, labels in train:
            batches += 1
            if batches == args.warmup:
                torch.cuda.synchronize() if device.type == "cuda" else None
                start = time.perf_counter()
            elif batches > args.warmup:
                timed += 1
                if timed == args.batches:
                    break
        epoch += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    train.close()
    return timed * args.batch / seconds


def time_reader(rec: str, threads: int, augment: str, args) -> float:
    """readers.mxnet + the loader's operators (flip only: the design comparison)."""
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import feed_ndarray

    if augment != "flip":
        raise SystemExit("dali-reader is measured with --augment flip only")
    index = os.path.join(os.path.dirname(rec), "bench.images.idx")
    if not os.path.isfile(index):
        write_image_only_index(rec, index)
    @pipeline_def(enable_conditionals=True)
    def graph():  # DaliTrainLoader's operators for flip-only training, behind the reader
        jpegs, _ = fn.readers.mxnet(path=[rec], index_path=[index], random_shuffle=True, name="reader")
        images = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
        shape = fn.peek_image_shape(jpegs)
        if (shape[0] != 112) | (shape[1] != 112):
            images = fn.resize(images, size=[112, 112])
        return fn.crop_mirror_normalize(images, mirror=fn.random.coin_flip(), mean=[127.5] * 3, std=[127.5] * 3,
                                        dtype=types.FLOAT, output_layout="CHW")

    pipe = graph(batch_size=args.batch, num_threads=threads, device_id=None, prefetch_queue_depth=2, seed=0)
    pipe.build()
    for batch in range(args.warmup + args.batches):
        if batch == args.warmup:
            start = time.perf_counter()
        (images,) = pipe.run()
        dense = images.as_tensor()
        feed_ndarray(dense, torch.empty(dense.shape(), dtype=torch.float32))
    return args.batches * args.batch / (time.perf_counter() - start)


def required_rates(tflops: float) -> list[dict]:
    rows = []
    for name in ("vit_t", "vit_s", "vit_b", "vit_l"):
        train_flops = 3 * forward_flops_per_image(VIT_VARIANTS[name])
        rows.append({"model": name, "train_gflops_per_image": train_flops / 1e9, "assumed_tflops": tflops,
                     "images_per_s_per_gpu": tflops * 1e12 / train_flops})
    return rows


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("lvface").setLevel(logging.WARNING)
    loaders = [name for name in args.loaders if name != "dali-gpu" or torch.cuda.is_available()]
    if len(loaders) < len(args.loaders):
        log.info("no CUDA device: dali-gpu skipped")
    with tempfile.TemporaryDirectory(dir=args.data or None) as folder:
        rec = write_shard(folder, args.images, args.unique)
        configs = [(loader, threads, augment) for augment in args.augment for threads in args.threads
                   for loader in loaders if not (loader == "dali-reader" and augment != "flip")]
        runs: dict[tuple, list[float]] = {c: [] for c in configs}
        for repeat in range(args.repeats):  # interleaved, so load changes hit every configuration alike
            for loader, threads, augment in configs:
                if loader == "dali-reader":
                    rate = time_reader(rec, threads, augment, args)
                else:
                    rate = time_loader(rec, loader, threads, augment, args)
                runs[(loader, threads, augment)].append(rate)
                log.info("repeat %d %-11s threads %d augment %-4s %8.0f images/s", repeat, loader, threads, augment,
                         rate)
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    records = []
    print(f"\n{'loader':<12} {'device':<28} {'augment':<7} {'threads':>7} {'images/s':>9} {'per thread':>10}  runs")
    for (loader, threads, augment), rates in runs.items():
        median = statistics.median(rates)
        device = device_name if loader == "dali-gpu" else f"cpu ({os.cpu_count()} cores)"
        records.append({"loader": loader, "device": device, "threads": threads, "images_per_s": median,
                        "per_thread": median / threads, "augment": augment, "batch": args.batch, "runs": rates})
        print(f"{loader:<12} {device:<28} {augment:<7} {threads:>7} {median:>9.0f} {median / threads:>10.0f}  "
              + " ".join(f"{r:.0f}" for r in rates))
    print(f"\nimages/s one GPU trains at an achieved {args.tflops:.0f} TFLOP/s (3 x forward FLOPs per image):")
    for row in required_rates(args.tflops):
        print(f"  {row['model']:<6} {row['train_gflops_per_image']:7.1f} GFLOP/image  "
              f"{row['images_per_s_per_gpu']:9.0f} images/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    return records


if __name__ == "__main__":
    main()
