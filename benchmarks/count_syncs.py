"""Host synchronisations of one optimizer step (lvface.engine.train_step), counted on a CPU.

    python3 benchmarks/count_syncs.py [--json FILE]

A host sync is anything that makes the host wait for the device on CUDA: a read of a device value
(aten._local_scalar_dense: .item(), bool(), int(), float() of a tensor; Python .tolist(), .cpu(),
.numpy()) or an op whose output shape depends on the data (nonzero, unique*, bincount, masked_select,
indexing with a bool mask), plus torch.tensor(<Python values>, device=...) (a blocking copy from
pageable host memory). On a CPU nothing waits, but the same ops run, so they are counted at the
dispatcher (a TorchDispatchMode) and at the Python methods, and each is attributed by its Python
stack to lvface's own code (lvface/, kernels/) or to DeepSpeed (deepspeed/); anything else is "other".

The step is the real one: a ViT inside a DeepSpeed ZeRO-2 engine (torch AdamW, the CPU path) and the
class-sharded head with its optimizer, on a 1-rank gloo group, in both curriculum stages (early:
Partial-FC sampling, learned centers; stable: no sampling, learned centers and EPL prototypes) and
with 1 and 2 micro-batches per step. The first step of each setting is a warm-up (DeepSpeed sets
itself up); the second is counted.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import sys
import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parent.parent

SYNC_OPS = ("_local_scalar_dense", "nonzero", "unique", "_unique", "_unique2", "unique_dim", "unique_consecutive",
            "bincount", "masked_select")
"""Dispatcher ops that read a device value on the host or produce a data-dependent shape."""
PY_METHODS = ("item", "tolist", "cpu", "numpy")
"""Python Tensor methods that read device memory on the host (item also shows as _local_scalar_dense)."""

STAGES = {
    "early": {"name": "early", "end_epoch": 1, "sample_rate": 0.3, "centers": "learned"},
    "stable": {"name": "stable", "end_epoch": 1, "sample_rate": 1.0, "centers": "both", "prototype_weight": 0.5},
}


def _owner(stack: list[traceback.FrameSummary]) -> tuple[str, str]:
    """('lvface' | 'deepspeed' | 'other', 'file:line') of the innermost frame of a known owner."""
    for frame in reversed(stack):
        path = frame.filename.replace(os.sep, "/")
        if "/deepspeed/" in path:
            return "deepspeed", f"{path.split('/deepspeed/')[-1]}:{frame.lineno}"
        if path.startswith(str(REPO)) and ("/lvface/" in path or "/kernels/" in path):
            if path.endswith("benchmarks/count_syncs.py") or "/tests/" in path:
                continue
            return "lvface", f"{os.path.relpath(path, REPO)}:{frame.lineno}"
    return "other", ""


class SyncCounter(TorchDispatchMode):
    """Counts host-sync ops (SYNC_OPS, bool-mask indexing, PY_METHODS, torch.tensor onto a device) by
    owner; `events` keeps (owner, op, where) for every one."""

    def __init__(self):
        super().__init__()
        self.events: list[tuple[str, str, str]] = []
        self._in_method = 0

    def _note(self, op: str) -> None:
        owner, where = _owner(traceback.extract_stack()[:-2])
        self.events.append((owner, op, where))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNC_OPS and not (name == "_local_scalar_dense" and self._in_method):
            self._note(name)
        elif name in ("index", "index_put", "index_put_", "_index_put_impl_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())):
            self._note(f"{name}[bool mask]")
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def patched(self):
        """Also count the Python methods (and torch.tensor(..., device=...)) while the mode is on."""
        saved = {name: getattr(torch.Tensor, name) for name in PY_METHODS}
        saved_tensor = torch.tensor

        def wrap(name, method):
            def counted(tensor, *args, **kwargs):
                self._note(f".{name}()")
                self._in_method += 1
                try:
                    return method(tensor, *args, **kwargs)
                finally:
                    self._in_method -= 1
            return counted

        def tensor(data, *args, **kwargs):
            if kwargs.get("device") is not None and not isinstance(data, torch.Tensor):
                self._note("torch.tensor(device=)")
            return saved_tensor(data, *args, **kwargs)

        for name, method in saved.items():
            setattr(torch.Tensor, name, wrap(name, method))
        torch.tensor = tensor
        try:
            with self:
                yield self
        finally:
            for name, method in saved.items():
                setattr(torch.Tensor, name, method)
            torch.tensor = saved_tensor

    def summary(self) -> dict:
        by_owner = collections.Counter(owner for owner, _, _ in self.events)
        sites = collections.Counter(f"{owner} {op} {where}" for owner, op, where in self.events)
        return {"lvface": by_owner["lvface"], "deepspeed": by_owner["deepspeed"], "other": by_owner["other"],
                "sites": dict(sorted(sites.items()))}


def build_step(stage: str, accumulation: int, group, batch: int = 16, grad_clip: float = 0.0):
    """(step, head, engine): one train_step of a tiny but real model, engine, head and head optimizer on `group`.

    batch 16 rows > the sample budget int(0.3 * 40) = 12: the sampler cannot skip its size check."""
    from lvface.config import from_dict
    from lvface.engine import build_ds_config, build_engine, param_groups, train_step
    from lvface.heads import ShardedMarginHead, build_head_optimizer
    from lvface.models import build_vit
    from lvface.models.vit import no_weight_decay_names

    classes = 40
    cfg = from_dict({"data": {"batch_size": batch}, "train": {"grad_clip": grad_clip, "precision": "fp32",
                                                              "gradient_accumulation_steps": accumulation},
                     "loss": {"stages": [STAGES[stage]]}})
    torch.manual_seed(0)
    model = build_vit("vit_demo", embed_dim=32, depth=1)
    ds = build_ds_config(REPO / "configs" / "zero2.json", cfg, 1, torch.device("cpu"))
    engine = build_engine(model, ds, param_groups(model, 0.1, no_weight_decay_names(model)), lambda s: 1.0)
    head = ShardedMarginHead(classes, 512, cfg.loss, group=group, seed=0)
    head_optimizer = build_head_optimizer(head, cfg.optimizer)
    generator = torch.Generator().manual_seed(1)

    def next_batch():
        return (torch.randn(batch, 3, 112, 112, generator=generator),
                torch.randint(0, classes, (batch,), generator=generator))

    def step():
        return train_step(engine, head, head_optimizer, next_batch, accumulation=accumulation, group=group)

    return step, head, engine


def count(stage: str, accumulation: int, group, grad_clip: float = 0.0) -> dict:
    step, _, _ = build_step(stage, accumulation, group, grad_clip=grad_clip)
    step()  # warm-up: DeepSpeed's first step sets itself up
    counter = SyncCounter()
    with counter.patched():
        step()
    return counter.summary()


def init_group():
    import torch.distributed as dist

    from lvface.distributed import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=0, world_size=1)
    return dist.group.WORLD


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the counts here")
    parser.add_argument("--sites", action="store_true", help="print every counted call site")
    parser.add_argument("--grad-clip", type=float, default=0.0,
                        help="train.grad_clip (DeepSpeed's gradient clipping adds its own syncs; lvface's count is the same)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    group = init_group()
    results = []
    for stage in STAGES:
        for accumulation in (1, 2):
            result = {"stage": stage, "accumulation": accumulation, **count(stage, accumulation, group, args.grad_clip)}
            results.append(result)
            print(f"{stage:6} K={accumulation} grad_clip={args.grad_clip:g}: lvface {result['lvface']:3d}  "
                  f"deepspeed {result['deepspeed']:3d}  other {result['other']:3d}", flush=True)
            if args.sites:
                for site, n in result["sites"].items():
                    print(f"    {n:3d} x {site}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
