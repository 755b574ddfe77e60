"""A scaling model of one LVFace training step at 8 / 64 / 512 GPUs, for ZeRO-1 / 2 / 3.

    python benchmarks/scaling.py --models vit_t vit_l --gpus 8 64 512 --markdown
    python benchmarks/scaling.py --bench step.json ...          # compute time from a measured step
    python benchmarks/scaling.py --calibrate --ranks 2 4 --json calib.json   # gloo on this machine

Weak scaling: every GPU keeps --batch images per step (LVFace: 384), so the global batch grows with
the GPU count. The step is compute plus the communication that compute cannot hide:

Compute (per GPU, constant in the GPU count):
  backbone   (3 + recompute) x forward FLOPs x batch / (peak x MFU); forward FLOPs from
             lvface.models.forward_flops_per_image on the unmasked tokens scaled by (1 - mask_ratio),
             recompute = 1 with activation checkpointing (ViT-L), else 0. Without a GPU measurement
             (--bench from benchmarks/bench_step.py on the target GPU) this is an ESTIMATE at --mfu.
  head GEMMs 6 x B x C x r x D FLOPs per GPU (logits, dX, dW over its C/P classes for the global batch
             of P x B rows: P x B x C r / P = B x C r, independent of P), at --head-mfu.
  head elementwise  the [P B, C r / P] logit block (B C r elements per GPU) read/written --head-passes
             times in fp32 at --hbm-gbps.
Communication (alpha-beta; P GPUs, n = P / gpus_per_node nodes):
  bandwidth  NVLink bus bandwidth inside one node (P <= gpus_per_node); across nodes a ring runs at
             the per-GPU NIC bandwidth (rail-optimised: one NIC per GPU), --ib-gbps x --ib-efficiency.
  latency    ring reduce-scatter / all-gather: (P - 1) hops of the slowest link's alpha; all-reduce of
             small vectors: NCCL's tree, 2 log2(P) alpha.
  ring RS or AG of S bytes (S = the full, unsharded size): (P - 1) / P x S / busbw + (P - 1) alpha.
  Backbone (Psi parameters; gradients reduced in fp32 as configs/zero*.json say, parameters gathered
  in bf16):
    ZeRO-1  gradients reduce-scattered at the accumulation boundary (DeepSpeed stage 1 has no backward
            hooks: exposed), parameters all-gathered after the step (exposed).
    ZeRO-2  gradients reduce-scattered in buckets during backward (overlap_comm): exposed only beyond the
            backbone's backward compute, plus the last bucket; parameters all-gathered after the step
            (exposed: DeepSpeed does it inside step()).
    ZeRO-3  parameters all-gathered in forward and again in backward (prefetched, hidden behind the
            forward / backward compute when it is long enough), gradients reduce-scattered in backward,
            one collective per transformer block (so the ring latency is paid depth times); what
            exceeds the compute of its phase is exposed, plus one block's gather at each start.
  Head (not overlappable: each feeds the next operation):
    forward  all-gather of the embeddings [P B, D] fp32 and the labels [P B] int64; all-reduce of the
             row maxima [P B] fp32 and of the (sum, target) statistics [2, P B] fp32.
    backward reduce-scatter of the embedding gradient [P B, D] fp32.
Efficiency = single-GPU step (same per-GPU batch, no communication) / predicted step.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GB = 1e9


@dataclass
class Network:
    gpus_per_node: int = 8
    nvlink_busbw_gbps: float = 360.0
    """NCCL bus bandwidth inside an 8x H100 SXM node (GB/s; NVLink 4 is 450 GB/s per direction, nccl-tests
    reach ~360-380 for large all-reduce)."""
    ib_gbps: float = 50.0
    """Per-GPU NIC: 400 Gb/s InfiniBand NDR = 50 GB/s."""
    ib_efficiency: float = 0.85
    """Fraction of the NIC rate a large ring collective reaches (~42 GB/s busbw in nccl-tests)."""
    alpha_nvlink_us: float = 3.0
    """Per-hop latency of a ring step inside a node."""
    alpha_ib_us: float = 5.0
    """Per-hop latency of a ring step across nodes (IB + NCCL proxy)."""

    def busbw(self, gpus: int) -> float:
        if gpus <= self.gpus_per_node:
            return self.nvlink_busbw_gbps * GB
        return self.ib_gbps * self.ib_efficiency * GB

    def alpha(self, gpus: int) -> float:
        return 1e-6 * (self.alpha_nvlink_us if gpus <= self.gpus_per_node else self.alpha_ib_us)

    def ring(self, nbytes: float, gpus: int, messages: int = 1) -> float:
        """Reduce-scatter or all-gather of `nbytes` in all (the full, unsharded size) over `gpus` ranks,
        sent as `messages` separate collectives (each pays the ring latency)."""
        if gpus == 1:
            return 0.0
        return (gpus - 1) / gpus * nbytes / self.busbw(gpus) + messages * (gpus - 1) * self.alpha(gpus)

    def small_all_reduce(self, nbytes: float, gpus: int) -> float:
        """All-reduce by NCCL's tree (what it picks for small messages at scale)."""
        if gpus == 1:
            return 0.0
        return 2 * (gpus - 1) / gpus * nbytes / self.busbw(gpus) + 2 * math.log2(gpus) * self.alpha(gpus)


@dataclass
class Compute:
    peak_tflops: float = 989.0
    """H100 SXM dense bf16."""
    mfu: float = 0.35
    """ASSUMED model FLOPs utilisation of the backbone (ViT on 144 tokens; no GPU measurement here)."""
    head_mfu: float = 0.5
    """ASSUMED utilisation of the head's large [rows, classes] GEMMs."""
    hbm_gbps: float = 3350.0
    head_passes: int = 6
    """fp32 passes over the logit block (write, max, exp-sum, margin; backward recompute + softmax grad)."""


@dataclass
class Workload:
    model: str
    batch: int = 384
    classes: int = 2_059_906
    dim: int = 512
    sample_rate: float = 1.0
    """Partial-FC rate r (LVFace: 0.3 in the early stage, 1.0 in the stable stage)."""
    grad_bytes: int = 4
    """configs/zero*.json reduce gradients in fp32 (communication_data_type)."""
    param_bytes: int = 2
    """bf16 training: ZeRO all-gathers the updated bf16 parameters."""
    bucket_elems: int = 50_000_000
    """DeepSpeed reduce_bucket_size (configs/zero2.json): the last bucket's reduce is never hidden."""
    params: int = 0
    forward_flops: float = 0.0
    recompute: bool = False
    mask_ratio: float = 0.0
    layers: int = 1

    @classmethod
    def build(cls, model: str, **overrides) -> "Workload":
        import torch

        from lvface.models import VIT_VARIANTS, build_vit, forward_flops_per_image

        with torch.device("meta"):
            module = build_vit(model)
        args = VIT_VARIANTS[model]
        return cls(model=model, params=sum(p.numel() for p in module.parameters()),
                   forward_flops=forward_flops_per_image(args), recompute=args.using_checkpoint,
                   mask_ratio=args.mask_ratio, layers=args.depth, **overrides)


@dataclass
class Prediction:
    model: str
    gpus: int
    zero: int
    sample_rate: float
    compute_s: float
    backbone_fwd_s: float
    backbone_bwd_s: float
    head_compute_s: float
    terms: dict = field(default_factory=dict)
    """Every communication term: (seconds on the wire, seconds exposed)."""

    @property
    def exposed_s(self) -> float:
        return sum(exposed for _, exposed in self.terms.values())

    @property
    def step_s(self) -> float:
        return self.compute_s + self.exposed_s

    @property
    def efficiency(self) -> float:
        return self.compute_s / self.step_s

    def bottleneck(self) -> str:
        return max(self.terms, key=lambda k: self.terms[k][1]) if self.terms else "-"


def compute_times(work: Workload, comp: Compute, measured_backbone_s: float | None = None) -> tuple[float, float, float]:
    """(backbone forward, backbone backward incl. recompute, head) seconds per step on one GPU."""
    flops = work.forward_flops * (1 - work.mask_ratio) * work.batch
    if measured_backbone_s is not None:
        per_pass = measured_backbone_s / (3 + work.recompute)
    else:
        per_pass = flops / (comp.peak_tflops * 1e12 * comp.mfu)
    head_gemm = 6 * work.batch * work.classes * work.sample_rate * work.dim / (comp.peak_tflops * 1e12 * comp.head_mfu)
    head_mem = work.batch * work.classes * work.sample_rate * 4 * comp.head_passes / (comp.hbm_gbps * GB)
    return per_pass, per_pass * (2 + work.recompute), head_gemm + head_mem


def predict(work: Workload, gpus: int, zero: int, net: Network, comp: Compute,
            measured_backbone_s: float | None = None) -> Prediction:
    fwd, bwd, head = compute_times(work, comp, measured_backbone_s)
    terms: dict[str, tuple[float, float]] = {}
    grads = work.params * work.grad_bytes
    params = work.params * work.param_bytes
    bucket = min(work.bucket_elems, work.params) * work.grad_bytes
    reduce = net.ring(grads, gpus)
    gather = net.ring(params, gpus)
    if zero == 1:
        terms["backbone grad reduce-scatter"] = (reduce, reduce)
        terms["backbone param all-gather"] = (gather, gather)
    elif zero == 2:
        last = net.ring(bucket, gpus)
        terms["backbone grad reduce-scatter"] = (reduce, max(reduce - bwd, 0.0) + last)
        terms["backbone param all-gather"] = (gather, gather)
    elif zero == 3:
        # one gather (and in backward one reduce-scatter) per transformer block, each paying the latency
        gather = net.ring(params, gpus, messages=work.layers)
        reduce = net.ring(grads, gpus, messages=work.layers)
        layer = gather / work.layers
        terms["backbone param all-gather (fwd)"] = (gather, max(gather - fwd, 0.0) + layer)
        both = gather + reduce  # backward gathers again and reduce-scatters, behind the backward compute
        terms["backbone param all-gather + grad reduce-scatter (bwd)"] = (both, max(both - bwd, 0.0) + layer)
    else:
        raise ValueError(f"ZeRO stage {zero} is not 1, 2 or 3")
    rows = gpus * work.batch
    embed = net.ring(rows * work.dim * 4, gpus) + net.ring(rows * 8, gpus)
    terms["head embedding+label all-gather [N, D]"] = (embed, embed)
    small = net.small_all_reduce(rows * 4, gpus) + net.small_all_reduce(2 * rows * 4, gpus)
    terms["head O(N) all-reduces (max, sum/target)"] = (small, small)
    scatter = net.ring(rows * work.dim * 4, gpus)
    terms["head embedding-grad reduce-scatter [N, D]"] = (scatter, scatter)
    return Prediction(model=work.model, gpus=gpus, zero=zero, sample_rate=work.sample_rate,
                      compute_s=fwd + bwd + head, backbone_fwd_s=fwd, backbone_bwd_s=bwd, head_compute_s=head,
                      terms=terms)


# --------------------------------------------------------------------------------------------------
# Calibration on local gloo ranks
# --------------------------------------------------------------------------------------------------

SIZES = [1 << k for k in range(12, 25, 2)]  # 4 KiB .. 16 MiB of fp32


def _calibrate_rank(rank: int, world: int, port: int, repeats: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(minutes=10))
    group = dist.new_group(list(range(world)))
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    rows = []
    for nbytes in SIZES:
        full = torch.ones(nbytes // 4)
        part = torch.empty(nbytes // 4 // world)
        ops = {"all_reduce": lambda: dist.all_reduce(full, group=group),
               "reduce_scatter": lambda: scatter(part, full, group=group),
               "all_gather": lambda: gather(full, part, group=group)}
        for name, op in ops.items():
            times = []
            for _ in range(repeats + 1):
                dist.barrier(group=group)
                start = time.perf_counter()
                op()
                times.append(time.perf_counter() - start)
            rows.append({"op": name, "bytes": nbytes, "ranks": world, "s": statistics.median(times[1:])})
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def measure_collectives(ranks: list[int], repeats: int) -> list[dict]:
    import tempfile

    import torch.multiprocessing as mp

    from lvface.distributed import free_port

    rows = []
    for world in ranks:
        with tempfile.TemporaryDirectory() as tmp:
            out = str(Path(tmp) / "rows.json")
            context = mp.get_context("spawn")
            port = free_port()
            procs = [context.Process(target=_calibrate_rank, args=(r, world, port, repeats, out)) for r in range(world)]
            for p in procs:
                p.start()
            for p in procs:
                p.join()
            if any(p.exitcode for p in procs):
                raise RuntimeError(f"calibration on {world} ranks failed")
            rows += json.loads(Path(out).read_text())
    return rows


def _volume(op: str, nbytes: float, world: int) -> float:
    """Bytes each rank sends in the model's ring form: (P-1)/P S for RS/AG, twice that for all-reduce."""
    factor = 2 if op == "all_reduce" else 1
    return factor * (world - 1) / world * nbytes


def fit_alpha_beta(rows: list[dict]) -> dict:
    """Relative least squares of t = a + V / bw per (op, ranks), V the model's per-rank volume; and a check of the
    model's P-dependence: the fit at the smallest rank count predicting the largest."""
    import numpy as np

    fits = {}
    for op in sorted({r["op"] for r in rows}):
        for world in sorted({r["ranks"] for r in rows}):
            pts = [r for r in rows if r["op"] == op and r["ranks"] == world]
            volume = np.array([_volume(op, r["bytes"], world) for r in pts])
            seconds = np.array([r["s"] for r in pts])
            design = np.stack([np.ones_like(volume), volume], axis=1)
            # relative least squares (rows divided by t): 4 KiB points weigh as much as 16 MiB ones
            (latency, inv_bw), *_ = np.linalg.lstsq(design / seconds[:, None], np.ones_like(seconds), rcond=None)
            predicted = design @ np.array([latency, inv_bw])
            fits[f"{op}@{world}"] = {"latency_us": 1e6 * latency, "busbw_gbps": 1 / inv_bw / GB if inv_bw > 0 else float("inf"),
                                     "max_rel_error": float(np.max(np.abs(predicted - seconds) / seconds))}
    worlds = sorted({r["ranks"] for r in rows})
    if len(worlds) > 1:
        lo, hi = worlds[0], worlds[-1]
        for op in sorted({r["op"] for r in rows}):
            fit = fits[f"{op}@{lo}"]
            errors = []
            for r in rows:
                if r["op"] == op and r["ranks"] == hi and r["bytes"] >= 1 << 20:
                    steps = (hi - 1) / (lo - 1)  # ring latency grows with the hop count
                    guess = steps * fit["latency_us"] * 1e-6 + _volume(op, r["bytes"], hi) / (fit["busbw_gbps"] * GB)
                    errors.append(guess / r["s"] - 1)
            fits[f"{op}: {lo}-rank fit predicting {hi} ranks (>= 1 MiB)"] = {
                "rel_errors": [round(e, 3) for e in errors]}
    return fits


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def table(preds: list[Prediction]) -> str:
    lines = ["| model | r | GPUs | ZeRO | compute ms | exposed comm ms | step ms | efficiency | largest exposed term |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for p in preds:
        name = p.bottleneck()
        lines.append(f"| {p.model} | {p.sample_rate:g} | {p.gpus} | {p.zero} | {1e3 * p.compute_s:.1f} | "
                     f"{1e3 * p.exposed_s:.1f} | {1e3 * p.step_s:.1f} | {100 * p.efficiency:.1f}% | "
                     f"{name} ({1e3 * p.terms[name][1]:.1f} ms) |")
    return "\n".join(lines)


def terms_table(p: Prediction) -> str:
    lines = [f"{p.model}, {p.gpus} GPUs, ZeRO-{p.zero}, r={p.sample_rate:g}: compute {1e3 * p.compute_s:.1f} ms "
             f"(backbone fwd {1e3 * p.backbone_fwd_s:.1f}, bwd {1e3 * p.backbone_bwd_s:.1f}, head {1e3 * p.head_compute_s:.1f})",
             "", "| term | on the wire ms | exposed ms |", "|---|---:|---:|"]
    for name, (wire, exposed) in p.terms.items():
        lines.append(f"| {name} | {1e3 * wire:.2f} | {1e3 * exposed:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["vit_t", "vit_l"])
    parser.add_argument("--gpus", nargs="+", type=int, default=[8, 64, 512])
    parser.add_argument("--zero", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--sample-rates", nargs="+", type=float, default=[1.0, 0.3])
    parser.add_argument("--batch", type=int, default=384)
    parser.add_argument("--classes", type=int, default=2_059_906)
    parser.add_argument("--bench", default=None,
                        help="bench_step.py JSON measured on ONE target GPU: its backbone_s replaces the FLOP estimate")
    parser.add_argument("--detail", nargs="*", default=["vit_t:512:2", "vit_l:512:2"],
                        help="MODEL:GPUS:ZERO predictions to list term by term")
    parser.add_argument("--calibrate", action="store_true", help="measure gloo collectives on --ranks and fit alpha/beta")
    parser.add_argument("--ranks", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    for cls in (Network, Compute):
        for name, value in asdict(cls()).items():
            parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    args = parser.parse_args(argv)
    if args.calibrate:
        rows = measure_collectives(args.ranks, args.repeats)
        fits = fit_alpha_beta(rows)
        print(json.dumps(fits, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps({"rows": rows, "fits": fits}, indent=1))
        return 0
    net = Network(**{k: getattr(args, k) for k in asdict(Network())})
    comp = Compute(**{k: getattr(args, k) for k in asdict(Compute())})
    measured = None
    if args.bench:
        records = json.loads(Path(args.bench).read_text())
        records = records if isinstance(records, list) else [records]
        measured = {r["model"]: r["slowest"]["backbone_s"] * args.batch / r["batch_per_rank"] for r in records}
    preds = []
    for model in args.models:
        for rate in args.sample_rates:
            work = Workload.build(model, batch=args.batch, classes=args.classes, sample_rate=rate)
            for gpus in args.gpus:
                for zero in args.zero:
                    preds.append(predict(work, gpus, zero, net, comp, (measured or {}).get(model)))
    print(table(preds))
    for spec in args.detail:
        model, gpus, zero = spec.split(":")
        for p in preds:
            if p.model == model and p.gpus == int(gpus) and p.zero == int(zero):
                print()
                print(terms_table(p))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(p) | {"step_s": p.step_s, "efficiency": p.efficiency}
                                               for p in preds], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
