"""Run a function on N real gloo ranks from a test.

    from dist_utils import run_on_ranks
    results = run_on_ranks(fn, 3, arg1, arg2)   # fn(rank, world_size, group, arg1, arg2) on 3 ranks
                                                 # -> [return of rank 0, of rank 1, of rank 2]

Ranks are processes started with torch.multiprocessing's spawn context, joined in a gloo process group
over TCP on a free localhost port, each with one intra-op thread (the CI machine has 2 cores). Starting
a process costs seconds here (importing torch), so the processes of each world size are kept in a pool
for the whole test session and reused by every test module; `rank_pool(n)` returns it. `group` is an
explicit group of all ranks (tests, like the code, never use the implicit default group).

`fn` must be a module-level function (it is pickled by reference); its arguments and return values
travel through torch.save/torch.load, so tensors, dicts, lists and numbers are fine. An exception on any
rank is raised here as RankError with every failing rank's traceback, and the pool is shut down (the
next call starts a fresh one). A call that takes longer than `timeout` seconds kills the pool.
"""

from __future__ import annotations

import atexit
import io
import os
import pickle
import queue
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lvface.distributed import free_port  # test_export imports it from here too

DEFAULT_TIMEOUT = 120.0


class RankError(RuntimeError):
    """A function raised on one or more ranks; the message holds their tracebacks."""


def _dumps(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _loads(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=False)


def _worker(rank: int, world_size: int, port: int, tasks, results, collective_timeout: float) -> None:
    torch.set_num_threads(1)
    if not torch.cuda.is_available():
        # Triton kernels can only run interpreted on a CPU, and triton reads TRITON_INTERPRET when a
        # @triton.jit function is defined: set it before any task imports triton (DeepSpeed does, when
        # installed), so every test sharing these processes sees one mode.
        os.environ["TRITON_INTERPRET"] = "1"
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=collective_timeout),
    )
    group = dist.new_group(list(range(world_size)))
    try:
        while True:
            task = tasks.get()
            if task is None:
                return
            try:
                fn, args, kwargs = pickle.loads(task)
                out = fn(rank, world_size, group, *_loads(args), **_loads(kwargs))
                results.put((rank, True, _dumps(out)))
            except BaseException:  # report everything, including assertion failures, to the test
                results.put((rank, False, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


class RankPool:
    """`world_size` spawned gloo ranks waiting for functions to run."""

    def __init__(self, world_size: int, collective_timeout: float = 60.0):
        self.world_size = world_size
        context = mp.get_context("spawn")
        self._results = context.Queue()
        self._tasks = [context.Queue() for _ in range(world_size)]
        port = free_port()
        self._processes = [
            context.Process(
                target=_worker,
                args=(rank, world_size, port, self._tasks[rank], self._results, collective_timeout),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for process in self._processes:
            process.start()

    @property
    def alive(self) -> bool:
        return all(p.is_alive() for p in self._processes)

    def run(self, fn, *args, timeout: float = DEFAULT_TIMEOUT, **kwargs) -> list:
        """fn(rank, world_size, group, *args, **kwargs) on every rank; the returns, by rank."""
        task = pickle.dumps((fn, _dumps(args), _dumps(kwargs)))
        for tasks in self._tasks:
            tasks.put(task)
        outcomes: dict[int, tuple[bool, bytes | str]] = {}
        try:
            while len(outcomes) < self.world_size:
                rank, ok, payload = self._results.get(timeout=timeout)
                outcomes[rank] = (ok, payload)
        except queue.Empty:
            self.shutdown()
            raise TimeoutError(
                f"{getattr(fn, '__name__', fn)} on {self.world_size} ranks did not finish in {timeout:.0f} s "
                f"(ranks that answered: {sorted(outcomes)}); the pool was killed"
            ) from None
        failures = {rank: payload for rank, (ok, payload) in outcomes.items() if not ok}
        if failures:
            self.shutdown()
            text = "\n".join(f"--- rank {rank} ---\n{tb}" for rank, tb in sorted(failures.items()))
            name = getattr(fn, "__name__", fn)
            raise RankError(f"{name} failed on ranks {sorted(failures)} of {self.world_size}:\n{text}")
        return [_loads(outcomes[rank][1]) for rank in range(self.world_size)]

    def shutdown(self) -> None:
        for tasks, process in zip(self._tasks, self._processes):
            if process.is_alive():
                try:
                    tasks.put(None)
                except (OSError, ValueError):
                    pass
        for process in self._processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join(timeout=5)
        if _POOLS.get(self.world_size) is self:
            del _POOLS[self.world_size]


_POOLS: dict[int, RankPool] = {}


def rank_pool(world_size: int) -> RankPool:
    """The session's pool of `world_size` ranks (started on first use)."""
    pool = _POOLS.get(world_size)
    if pool is None or not pool.alive:
        pool = _POOLS[world_size] = RankPool(world_size)
    return pool


def run_on_ranks(fn, world_size: int, *args, timeout: float = DEFAULT_TIMEOUT, **kwargs) -> list:
    """Run fn(rank, world_size, group, *args, **kwargs) on `world_size` gloo ranks; returns by rank."""
    return rank_pool(world_size).run(fn, *args, timeout=timeout, **kwargs)


@atexit.register
def _shutdown_all() -> None:
    for pool in list(_POOLS.values()):
        pool.shutdown()

