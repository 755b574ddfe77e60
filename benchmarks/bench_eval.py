"""Embedding-extraction throughput: the eval-form backbone through PyTorch and through onnxruntime.

For each model: a randomly initialised backbone in eval form (no masking, no checkpointing, no drop
path) runs forward passes on a fixed random batch of normalised images; the same backbone is exported
with `lvface.export.export_onnx` (TorchScript exporter, opset 17) and run by onnxruntime's CPU
provider (or CUDA provider with --device cuda when onnxruntime-gpu is installed). Image decoding and
alignment are not included: this is the model's share of `lvface embed` / `eval`.

    images/s = batch * iters / seconds of the timed forward passes (after --warmup untimed ones)

    python benchmarks/bench_eval.py --models vit_demo vit_t --batch 32 --warmup 2 --iters 5 --json out.json

Prints a table and writes a JSON list of records (backend, model, batch, images_per_s, plus
ms_per_batch, threads, device, device_name, torch, onnxruntime, opset).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lvface.distributed import describe_device
from lvface.export import DEFAULT_OPSET, INPUT_NAME, export_onnx
from lvface.models import VIT_VARIANTS, build_vit

log = logging.getLogger("bench_eval")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", "--model", nargs="+", default=["vit_demo", "vit_t"], choices=list(VIT_VARIANTS))
    parser.add_argument("--batch", type=int, default=32, help="images per forward pass")
    parser.add_argument("--backends", nargs="+", default=["pytorch", "onnxruntime"], choices=["pytorch", "onnxruntime"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (PyTorch device; CUDA provider for onnxruntime)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed forward passes before timing")
    parser.add_argument("--iters", type=int, default=5, help="timed forward passes")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    parser.add_argument("--json", default=None, help="write the records to this JSON file")
    return parser.parse_args(argv)



def time_calls(call, warmup: int, iters: int, sync=lambda: None) -> float:
    """Seconds of `iters` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        call()
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        call()
    sync()
    return time.perf_counter() - start


def bench_pytorch(module: torch.nn.Module, images: torch.Tensor, device: torch.device, warmup: int,
                  iters: int) -> float:
    module = module.to(device)
    images = images.to(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    @torch.inference_mode()
    def call():
        module(images)

    return time_calls(call, warmup, iters, sync)


def bench_onnxruntime(module: torch.nn.Module, images: torch.Tensor, device: torch.device, warmup: int, iters: int,
                      opset: int) -> tuple[float, int | str]:
    import onnxruntime as ort

    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.type == "cuda" else ["CPUExecutionProvider"]
    with tempfile.TemporaryDirectory() as folder:
        path = export_onnx(module, Path(folder) / "model.onnx", opset)
        session = ort.InferenceSession(str(path), providers=providers)
    feed = {INPUT_NAME: images.numpy()}
    threads = session.get_session_options().intra_op_num_threads or "auto (one per core)"
    return time_calls(lambda: session.run(None, feed), warmup, iters), threads


def main(argv: list[str] | None = None) -> list[dict]:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    device = torch.device(args.device)
    import onnxruntime as ort

    log.info("device %s, torch %s, onnxruntime %s", describe_device(device), torch.__version__, ort.__version__)
    records = []
    images = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (args.batch, 3, 112, 112)).astype(np.float32))
    for name in args.models:
        torch.manual_seed(0)
        module = build_vit(name, mask_ratio=0.0, using_checkpoint=False, drop_path_rate=0.0).eval()
        for backend in args.backends:
            if backend == "pytorch":
                seconds = bench_pytorch(module, images, device, args.warmup, args.iters)
                threads = torch.get_num_threads()
            else:
                seconds, threads = bench_onnxruntime(module.cpu(), images, device, args.warmup, args.iters, args.opset)
            records.append({
                "backend": backend, "model": name, "batch": args.batch,
                "images_per_s": args.batch * args.iters / seconds, "ms_per_batch": 1e3 * seconds / args.iters,
                "threads": threads, "device": device.type, "device_name": describe_device(device),
                "torch": torch.__version__, "onnxruntime": ort.__version__,
                "opset": args.opset if backend == "onnxruntime" else None,
            })
            log.info("%s %s: %.1f images/s", name, backend, records[-1]["images_per_s"])
    header = f"{'model':<9} {'backend':<12} {'batch':>5} {'ms/batch':>9} {'images/s':>9}"
    rows = [f"{r['model']:<9} {r['backend']:<12} {r['batch']:>5} {r['ms_per_batch']:>9.1f} {r['images_per_s']:>9.1f}"
            for r in records]
    log.info("\n%s", "\n".join([header, "-" * len(header), *rows]))
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=2))
        log.info("wrote %s", args.json)
    return records


if __name__ == "__main__":
    main()
