"""Save and resume training: the DeepSpeed engine's shards, the head, the config, a plain backbone.

A checkpoint is the folder `<output_dir>/checkpoints/<tag>/`. Nothing is ever left half-written under
a name that resume would read: every file lvface writes goes to a temporary name and is renamed into
place, and the `latest` pointer moves to a tag only after every rank has finished writing it. A crash
mid-save leaves the previous checkpoint as the one that `resume=auto` picks.

Contents of a tag folder:
- DeepSpeed's own files (model states, ZeRO-partitioned optimizer states, the LR scheduler);
- `head_shard_<rank>_of_<world>.pt`, one per rank: this rank's rows of the class centers W, the EPL
  prototypes P and the head optimizer's moments (lvface/checkpoint_head.py), re-split on load when
  the world size changed;
- `config.yaml` (the resolved lvface config) and `train_state.json` (step, epoch, position);
- `backbone.pt`: a plain fp32 state_dict with insightface arcface_torch key names, ready for
  `load_state_dict(strict=True)`, evaluation and ONNX export; under bf16/fp16 the optimizer's fp32
  master weights (`master_state_dict`), not the working copy cast up.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from lvface.checkpoint_files import BACKBONE_FILE, CONFIG_FILE, LATEST, TRAIN_STATE_FILE
from lvface.checkpoint_head import load_head_shards, save_head_shard
from lvface.files import atomic_torch_save, atomic_write_text
from lvface.progress import run_with_progress

log = logging.getLogger(__name__)

@contextmanager
def gathered_parameters(module: torch.nn.Module, stage: int):
    """Full parameters on every rank for the duration (a no-op below ZeRO-3)."""
    if stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            yield
    else:
        yield


def plain_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's state_dict on the CPU with floating tensors in fp32."""
    return {
        key: (value.detach().float() if value.is_floating_point() else value.detach()).cpu().clone()
        for key, value in module.state_dict().items()
    }


def master_state_dict(engine, stage: int) -> dict[str, torch.Tensor]:
    """The backbone's state_dict on the CPU in fp32, with every trained parameter taken from the
    optimizer's fp32 master copy, not the module's bf16/fp16 working copy cast up (which would round
    every weight to 8 mantissa bits). Buffers (BatchNorm statistics) come from the module.

    Collective under ZeRO (every rank must call it, in the same order): deepspeed's
    safe_get_full_fp32_param reassembles each parameter from the ranks' fp32 partitions (ZeRO-1/2:
    all-reduce; ZeRO-3: all-gather). In fp32 below ZeRO-3 the module's parameters are the master
    weights and nothing is communicated.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    low_precision = engine.bfloat16_enabled() or engine.fp16_enabled()
    masters = {}
    if low_precision or stage == 3:
        for name, param in module.named_parameters():
            master = safe_get_full_fp32_param(param)  # None for a parameter the optimizer does not hold
            if master is not None:
                masters[name] = master.detach().float().cpu().clone()
    with gathered_parameters(module, stage):  # the rest (buffers, untrained parameters) from the module
        state = plain_state_dict(module)
    for name, master in masters.items():
        if master.shape != state[name].shape:
            raise RuntimeError(f"master weight of {name} has shape {tuple(master.shape)}, the module's "
                               f"{tuple(state[name].shape)}: DeepSpeed's fp32 partitions do not match the module")
        state[name] = master
    return state


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_tag(root: Path) -> str | None:
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    if not (root / tag).is_dir():
        raise FileNotFoundError(f"{pointer} names checkpoint {tag!r} but {root / tag} does not exist")
    return tag


def save_checkpoint(root: Path, tag: str, *, engine, head, head_optimizer, config_yaml: str, train_state: dict,
                    zero_stage: int, rank: int, group, keep_last: int) -> Path:
    """Write checkpoint `tag` on every rank; returns its folder. Collective: every rank must call it."""
    root.mkdir(parents=True, exist_ok=True)
    folder = root / tag
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

    # The (empty) universal-checkpoint info lets DeepSpeed's ds_to_universal convert this checkpoint
    # when it is resumed on another world size: a pure data-parallel backbone needs no patterns.
    client_state = {"lvface": train_state, UNIVERSAL_CHECKPOINT_INFO: {}}
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    backbone = master_state_dict(engine, zero_stage)  # collective: every rank takes part
    backbone = backbone if rank == 0 else None
    save_head_shard(folder, head, head_optimizer, extra={"step": train_state["step"]})
    if rank == 0:
        atomic_torch_save(backbone, folder / BACKBONE_FILE)
        atomic_write_text(folder / CONFIG_FILE, config_yaml)
        atomic_write_text(folder / TRAIN_STATE_FILE, json.dumps(train_state, indent=1))
    dist.barrier(group=group)
    if rank == 0:
        atomic_write_text(root / LATEST, tag)
        _prune(root, keep_last)
        log.info("checkpoint %s written", folder)
    dist.barrier(group=group)
    return folder


def _prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    tags = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step"))
    for old in tags[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def resolve_resume(resume: str, output_dir: str | Path) -> tuple[Path, str] | None:
    """(root, tag) to resume from: '' none, 'auto' the latest under output_dir if any, or a tag folder."""
    if not resume:
        return None
    if resume == "auto":
        root = checkpoint_root(output_dir)
        tag = latest_tag(root)
        return (root, tag) if tag else None
    folder = Path(resume)
    if (folder / LATEST).is_file():
        return folder, latest_tag(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint.resume={resume}: no such checkpoint folder; give a tag folder, a "
                                f"checkpoints folder with a '{LATEST}' file, or 'auto'")
    return folder.parent, folder.name


def prepare_resume(root: Path, tag: str, *, world_size: int, rank: int, group, ds_config: dict) -> Path:
    """The folder DeepSpeed loads the engine of checkpoint `tag` from. Collective; call before the engine
    is built.

    On the world size that saved it: `root` itself. On another world size DeepSpeed refuses ZeRO-1/2
    optimizer partitions of a different count, so rank 0 converts the checkpoint once into DeepSpeed's
    universal format (`root/universal/<tag>`, by deepspeed.checkpoint.ds_to_universal, written to a
    temporary name and renamed), and the engine is told to load universal checkpoints. The head's
    shards are re-split by lvface itself (lvface/checkpoint_head.py).
    """
    state_file = root / tag / TRAIN_STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(f"{state_file} is missing: {root / tag} is not a complete lvface checkpoint")
    saved_world = json.loads(state_file.read_text())["world_size"]
    if saved_world == world_size:
        return root
    universal = root / "universal"
    if rank == 0 and not (universal / tag / "zero").is_dir():
        universal.mkdir(exist_ok=True)
        tmp = universal / f".{tag}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("converting %s (%d ranks) to a DeepSpeed universal checkpoint for %d ranks", root / tag,
                 saved_world, world_size)
        proc = run_with_progress(
            [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(root / tag),
             "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1"],
            desc="universal checkpoint")
        if proc.returncode != 0:
            raise RuntimeError(f"deepspeed.checkpoint.ds_to_universal failed on {root / tag}:\n{proc.stderr[-3000:]}")
        os.replace(tmp, universal / tag)
    dist.barrier(group=group)
    ds_config.setdefault("checkpoint", {})["load_universal"] = True
    return universal


def load_checkpoint(root: Path, tag: str, *, engine, head, head_optimizer, engine_root: Path | None = None) -> dict:
    """Restore engine, head and head optimizer from (root, tag); returns the saved train_state.
    `engine_root` is where DeepSpeed's files are read (prepare_resume's answer; default `root`)."""
    # The head first: a class-count mismatch is refused with both numbers before DeepSpeed loads anything.
    load_head_shards(root / tag, head, head_optimizer)
    engine_root = engine_root or root
    load_path, client_state = engine.load_checkpoint(str(engine_root), tag=tag)
    if load_path is None:
        raise FileNotFoundError(f"DeepSpeed found no checkpoint {tag!r} under {engine_root}")
    if engine_root != root:
        # A universal checkpoint restores parameters and optimizer state but not module buffers
        # (BatchNorm running statistics): take them from the checkpoint's plain backbone.
        saved = torch.load(root / tag / BACKBONE_FILE, map_location="cpu", weights_only=True)
        with torch.no_grad():
            for name, buffer in engine.module.named_buffers():
                buffer.copy_(saved[name])
    log.info("resumed from %s", root / tag)
    return client_state["lvface"]


def _reshard_command(args) -> int:
    from lvface.checkpoint_head import reshard_head_checkpoint

    written = reshard_head_checkpoint(args.src, args.dst, args.world_size)
    print(f"wrote {len(written)} head shards for {args.world_size} ranks into {args.dst}")
    return 0


def register(subparsers) -> None:
    """`lvface reshard SRC DST --world-size N`: re-split a checkpoint's head shards offline."""
    parser = subparsers.add_parser(
        "reshard", help="re-split the head shards of a checkpoint for another world size (offline)")
    parser.add_argument("src", help="checkpoint tag folder holding head_shard_*_of_*.pt files")
    parser.add_argument("dst", help="empty folder for the new shard files")
    parser.add_argument("--world-size", type=int, required=True, help="number of ranks to split the classes over")
    parser.set_defaults(func=_reshard_command)
