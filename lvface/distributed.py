"""Rank discovery and process groups for every way lvface is launched.

- deepspeed launcher and torchrun: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are set.
- mpirun / mpiexec (Open MPI or MPICH, with mpi4py): DeepSpeed's own MPI discovery fills them in.
- srun under SLURM without a launcher: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, and the first host
  of SLURM_JOB_NODELIST as the master.
- a plain `python -m lvface.train` process: a world of one on 127.0.0.1 and a free port.

Nothing here runs at import time and no rank is kept in a module global: `init_distributed` returns a
`DistInfo` that the trainer passes down, and the process group every collective names.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from lvface.watchdog import Heartbeat

log = logging.getLogger(__name__)

_REQUIRED = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    launcher: str
    group: dist.ProcessGroup | None
    """The group of all ranks: data-parallel for the backbone, class-parallel for the head."""
    device: torch.device
    heartbeat: Heartbeat | None = None
    """Per-step heartbeats in the process group's store and the stall watchdog (lvface/watchdog.py)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _first_slurm_host(nodelist: str) -> str:
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    # Without scontrol: "node[01-04,07],gpu5" -> "node01"
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rest = head.split("[", 1)
        return prefix + rest.split("-")[0].split(",")[0].rstrip("]")
    return head


def detect_launcher(env: dict | None = None) -> str:
    """Which launcher started this process: env, mpi, slurm, or single."""
    env = os.environ if env is None else env
    if all(k in env for k in _REQUIRED):
        return "env"
    # Open MPI's mpirun/mpiexec is the only launcher that sets OMPI_COMM_WORLD_*; inside an sbatch
    # script its ranks also inherit the batch step's SLURM_PROCID=0 and SLURM_NTASKS, so it goes first.
    if "OMPI_COMM_WORLD_SIZE" in env:
        return "mpi"
    # SLURM before PMI: `srun --mpi=pmix` (or pmi2) sets PMIX_RANK / PMI_SIZE beside SLURM_PROCID in
    # every task without any MPI launcher, and SLURM's variables alone give the whole layout
    # (SLURM_LOCALID, SLURM_JOB_NODELIST) without MPI's discovery.
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return "slurm"
    if "PMI_SIZE" in env or "PMIX_RANK" in env:  # MPICH / Intel MPI hydra, or PMIx outside SLURM
        return "mpi"
    return "single"


def _fill_env(launcher: str) -> None:
    env = os.environ
    if launcher == "slurm":
        env.setdefault("RANK", env["SLURM_PROCID"])
        env.setdefault("WORLD_SIZE", env["SLURM_NTASKS"])
        env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
        env.setdefault("MASTER_ADDR", _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")))
        env.setdefault("MASTER_PORT", "29500")
    elif launcher == "single":
        env.setdefault("RANK", "0")
        env.setdefault("WORLD_SIZE", "1")
        env.setdefault("LOCAL_RANK", "0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))


def flight_recorder_env(run_dir: str | Path) -> dict[str, str]:
    """NCCL's flight recorder, on unless the user set it: the last collectives of every rank kept in a
    ring buffer, dumped on a collective timeout to <run_dir>/nccl_trace/rank<k> (torch appends the rank;
    read with `python -m torch.distributed.flight_recorder.fr_trace`). Gloo ignores these variables."""
    return {"TORCH_FR_BUFFER_SIZE": "2000", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
            "TORCH_FR_DUMP_TEMP_FILE": str(Path(run_dir) / "nccl_trace" / "rank")}


def _enable_flight_recorder(run_dir: str | Path) -> None:
    # torch 2.13's names; a user's setting under the deprecated names wins too
    deprecated = {"TORCH_FR_BUFFER_SIZE": "TORCH_NCCL_TRACE_BUFFER_SIZE",
                  "TORCH_FR_DUMP_TEMP_FILE": "TORCH_NCCL_DEBUG_INFO_TEMP_FILE"}
    for key, value in flight_recorder_env(run_dir).items():
        if deprecated.get(key, key) not in os.environ:
            os.environ.setdefault(key, value)
    if torch.cuda.is_available():
        (Path(run_dir) / "nccl_trace").mkdir(parents=True, exist_ok=True)


def init_distributed(timeout_s: float = 600.0, run_dir: str | Path | None = None,
                     hang_dump_fraction: float = 0.5) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (which picks nccl on CUDA, gloo on the CPU).

    `timeout_s` (train.collective_timeout_s) bounds every collective of the default group and of the
    world group made here, on gloo and NCCL: a rank that stops (hung, SIGSTOPped, dead without its
    connections closing) makes the others fail with a timeout error instead of waiting forever. NCCL
    honours it only with asynchronous error handling, switched on here unless the user set it: mode 2
    (CleanUpOnly) aborts the communicators and lets the error reach Python, where lvface prints its
    one-line lost-peer message; mode 1 (TearDown) would kill the process from NCCL's watchdog first.

    With a `run_dir`, every rank writes its stacks to <run_dir>/stacks/ when no step finishes for
    `hang_dump_fraction` of the timeout, and heartbeats name the missing ranks (lvface/watchdog.py);
    NCCL's flight recorder dumps into <run_dir>/nccl_trace/.
    """
    import deepspeed  # imported here: importing deepspeed probes the accelerator

    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
    if run_dir is not None:
        _enable_flight_recorder(run_dir)
    launcher = detect_launcher()
    _fill_env(launcher)
    if os.environ.get("LOCAL_RANK", "0") == "0":
        remove_dead_shm_buffers()
    timeout = timedelta(seconds=timeout_s)
    # DeepSpeed makes its own process groups (ZeRO's data-parallel group) without a timeout, which
    # torch then takes from these defaults (30 minutes): make every group of this process use ours.
    import torch.distributed.distributed_c10d as c10d

    c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout
    deepspeed.init_distributed(auto_mpi_discovery=(launcher == "mpi"), timeout=timeout, verbose=False)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    # The head's class-parallel group and the backbone's data-parallel group are the same: the world.
    group = dist.new_group(ranks=list(range(world_size)), timeout=timeout)
    # Every rank has mapped DeepSpeed's shared-memory all-reduce buffers once this barrier is passed:
    # their names can go now, so that nothing is left in /dev/shm however this process ends.
    dist.barrier(group=group)
    remove_own_shm_buffer(rank)
    log.info("rank %d/%d (local %d) launched by %s on %s, backend %s, collective timeout %.0f s", rank, world_size,
             local_rank, launcher, device, dist.get_backend(group), timeout_s)
    heartbeat = Heartbeat(c10d._get_default_store(), rank, world_size, run_dir, hang_dump_fraction * timeout_s)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, launcher=launcher, group=group,
                    device=device, heartbeat=heartbeat)


# --------------------------------------------------------------------------------------------------
# DeepSpeed's shared-memory all-reduce buffers (CPU accelerator)
# --------------------------------------------------------------------------------------------------
# deepspeed/ops/csrc/cpu/comm/shm.cpp creates /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>
# (about 66 MB each) at init, maps the buffers of every local rank, and never unlinks them, so a killed
# run would leave them behind in RAM. The buffers are opened only at init, so each rank
# unlinks its own name once all ranks have mapped them (the memory lives on until the last process
# unmaps it), and a starting run removes the buffers of dead runs.

SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "deepspeed_allreduce_buffer_"
_SHM_MIN_AGE_S = 120.0  # a buffer younger than this may belong to a run that is still starting up


def _mapped_shm_names() -> set[str]:
    names = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            at = line.find(str(SHM_DIR / SHM_PREFIX))
            if at >= 0:
                names.add(Path(line[at:].split(" (deleted)")[0].strip()).name)
    return names


def remove_dead_shm_buffers(directory: Path = SHM_DIR, min_age_s: float = _SHM_MIN_AGE_S) -> list[str]:
    """Remove this user's DeepSpeed shm all-reduce buffers that no live process maps (left by killed
    runs) and that are older than `min_age_s`. Returns the removed names."""
    if not directory.is_dir():
        return []
    candidates = [p for p in directory.glob(SHM_PREFIX + "*") if p.is_file()]
    if not candidates:
        return []
    mapped = _mapped_shm_names()
    now, removed = time.time(), []
    for path in candidates:
        try:
            stat = path.stat()
            if stat.st_uid != os.getuid() or path.name in mapped or now - stat.st_mtime < min_age_s:
                continue
            path.unlink()
            removed.append(path.name)
        except OSError:
            continue
    if removed:
        log.info("removed %d shared-memory buffers of dead DeepSpeed runs from %s: %s", len(removed), directory,
                 ", ".join(sorted(removed)))
    return removed


def own_shm_buffer(rank: int) -> Path:
    return SHM_DIR / f"{SHM_PREFIX}{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_{os.environ.get('MASTER_PORT', '')}_{rank}"


def remove_own_shm_buffer(rank: int) -> None:
    try:
        own_shm_buffer(rank).unlink()
    except OSError:
        pass


def seed_everything(seed: int, rank: int) -> None:
    # Parameters are seeded identically on every rank (DeepSpeed broadcasts rank 0's anyway); the
    # per-rank offset only reaches augmentation and masking randomness.
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed)


def setup_logging(rank: int, level: int = logging.INFO) -> None:
    """Rank 0 speaks at `level`; other ranks only warn (set LVFACE_ALL_RANKS_LOG=1 to hear everyone)."""
    all_ranks = os.environ.get("LVFACE_ALL_RANKS_LOG") == "1"
    logging.basicConfig(
        level=level if (rank == 0 or all_ranks) else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )


def report_error(message: str, prefix: str = "lvface: error") -> None:
    """Print a fatal error as one line, once per node rather than once per rank: every rank of a
    launcher meets the same bad config or file, and each printing it buried it in copies. Local rank 0
    prints (a world of one, or a process before any launcher set LOCAL_RANK, counts as local rank 0);
    a path missing on one node only is still reported by that node."""
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"{prefix}: {message}", file=sys.stderr, flush=True)


def describe_device(device: torch.device) -> str:
    """A device's name for logs and benchmark records: the GPU's model, or the CPU and its thread count."""
    import platform

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def sync_batchnorm_buffers(module: torch.nn.Module, group, how: str = "average") -> None:
    """Make every rank's module buffers (the feature head's BatchNorm running statistics) one set.

    Each rank's running statistics follow its own batches and nothing else syncs them (DeepSpeed
    averages gradients only), so without this an evaluation split over ranks mixes their statistics
    while `backbone.pt`, the ONNX export and a resume carry one rank's. Called before every evaluation
    and every save, so all of these see the same buffers. `how` (train.batchnorm_sync): "average" (the
    mean over ranks: the running mean becomes exactly the moving average of the global batch means)
    or "broadcast" (rank 0's, as torch DDP does at every forward). Integer buffers (the batch counter,
    equal on every rank) are broadcast either way. Collective over `group`; the training forward uses
    batch statistics, so the losses do not change.
    """
    if not dist.is_available() or not dist.is_initialized():
        return
    world = dist.get_world_size(group)
    if world == 1:
        return
    source = dist.get_global_rank(group, 0) if group is not None else 0
    with torch.no_grad():
        for buffer in module.buffers():
            if how == "average" and buffer.is_floating_point():
                dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
                buffer.div_(world)
            else:
                dist.broadcast(buffer, src=source, group=group)
