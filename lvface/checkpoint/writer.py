"""Checkpoint files from a snapshot: captured at the step boundary, written by a background process.

A save is split in two. At the step boundary the trainer *captures* each file's object (DeepSpeed's
state dicts through `CaptureEngine`, the head shard, the plain backbone, the small text files): the
object is pickled with every tensor storage replaced by a reference, and each storage's bytes are
copied into a reused host buffer (`BufferPool`, shared memory; pinned on CUDA). That copy is all the
step waits for. The `Writer` process then rebuilds each object over the buffers and `torch.save`s it
with DeepSpeed's own serialization setting, so the files keep DeepSpeed's format and load wherever
DeepSpeed's do (the zip's internal folder is named `archive/` instead of after the file, as for any
torch.save into a stream; torch.load ignores it). Every file is hashed (SHA-256) as its bytes are
written and fsynced; the manifest is built from those digests, no file is read back.

Why a process: a writer thread competes with the training step for the GIL (pickling, hashing and
the write loop hold it) and doubled the step time in a prototype; a separate process (started by
'spawn', since the trainer may hold CUDA and gloo state that must not be forked) only shares the
CPU, and runs at a lower scheduling priority. It is long-lived (one per rank), fed through a pipe:
buffers are sent to it once (torch's shared-memory handles) and every later save only sends the
small pickled structure. A killed writer is seen as a dead process with its job unanswered.

With `checkpoint.async_save=false` the same captured jobs are written in the trainer's process
(`write_files`), from the live tensors without the copy.
"""

from __future__ import annotations

import atexit
import errno
import io
import logging
import os
import pickle
import queue
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import torch

from lvface.files import durable_write, fsync_dir

log = logging.getLogger(__name__)


class BufferPool:
    """Host buffers for the snapshot, one per (file, storage ordinal), reused from save to save
    (reallocated only when a storage's size changes). `shared=True` puts them in shared memory for
    the writer process; buffers not yet sent to it are in `unsent`."""

    def __init__(self, shared: bool):
        self.shared = shared
        self.buffers: dict[tuple[str, int], torch.Tensor] = {}
        self.unsent: dict[tuple[str, int], torch.Tensor] = {}

    def copy_in(self, key: tuple[str, int], storage: torch.UntypedStorage) -> None:
        nbytes = storage.nbytes()
        buffer = self.buffers.get(key)
        if buffer is None or buffer.numel() != nbytes:
            # allocated in shared memory directly: share_memory_() would allocate twice and copy
            memory = torch.UntypedStorage._new_shared(nbytes) if self.shared and nbytes else torch.UntypedStorage(nbytes)
            buffer = torch.empty(0, dtype=torch.uint8).set_(memory, 0, (nbytes,), (1,))
            if storage.device.type == "cuda" and nbytes:
                _pin(buffer)
            self.buffers[key] = self.unsent[key] = buffer
        if nbytes:
            source = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage, 0, (nbytes,), (1,))
            buffer.copy_(source, non_blocking=storage.device.type == "cuda")


def _pin(buffer: torch.Tensor) -> None:
    """Page-lock a shared host buffer so that device-to-host copies run at full speed (best effort)."""
    try:
        torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.numel(), 0)
    except (RuntimeError, AttributeError) as exc:
        log.debug("cannot pin a checkpoint buffer (%s): copies run at pageable speed", exc)


class _CapturePickler(pickle.Pickler):
    """Pickles an object with every tensor storage replaced by ('storage', key, dtype)."""

    def __init__(self, stream, name: str, capture: "Capture"):
        super().__init__(stream, protocol=pickle.HIGHEST_PROTOCOL)
        self.name, self.capture, self.seen = name, capture, {}

    def persistent_id(self, obj):
        if isinstance(obj, torch.storage.TypedStorage):
            untyped, dtype = obj._untyped_storage, obj.dtype
        elif isinstance(obj, torch.UntypedStorage):
            untyped, dtype = obj, None
        else:
            return None
        key = self.seen.get(untyped._cdata)
        if key is None:  # one buffer per storage: views of one storage stay views of one buffer
            key = self.seen[untyped._cdata] = (self.name, len(self.seen))
            self.capture.take(key, untyped)
        return ("storage", key, dtype)


class Capture:
    """The files of one checkpoint on this rank, as jobs for `write_files`. With a `pool` the
    storages are copied into its buffers (the snapshot); without one the live storages are kept
    (the synchronous path writes them before the step continues)."""

    def __init__(self, pool: BufferPool | None):
        self.pool, self.jobs, self.storages = pool, [], {}
        self.phases: dict[str, float] = {}
        """Seconds per part of the capture (the benchmark's breakdown of a stall)."""

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - start

    def take(self, key, storage: torch.UntypedStorage) -> None:
        if self.pool is not None:
            self.pool.copy_in(key, storage)
        else:
            self.storages[key] = storage

    def add_torch(self, name: str, obj, zipfile: bool = True) -> None:
        """`torch.save(obj)` as file `name` (relative to the checkpoint folder)."""
        stream = io.BytesIO()
        _CapturePickler(stream, name, self).dump(obj)
        self.jobs.append(("torch", name, stream.getvalue(), zipfile))

    def add_bytes(self, name: str, data: bytes) -> None:
        self.jobs.append(("bytes", name, data, None))

    def add_copy(self, name: str, source: str) -> None:
        self.jobs.append(("copy", name, source, None))

    def finish(self) -> None:
        """Wait for device-to-host copies (CUDA): the tensors may change once the step goes on."""
        if self.pool is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()


class _RebuildUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, storages: dict):
        super().__init__(io.BytesIO(data))
        self.storages = storages

    def persistent_load(self, pid):
        _, key, dtype = pid
        found = self.storages[key]
        untyped = found if isinstance(found, torch.UntypedStorage) else found.untyped_storage()
        return untyped if dtype is None else torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype,
                                                                          _internal=True)


def _nonfinite_leaves(value, where: str) -> list[str]:
    """Names (`where.key.key[i]`) of the floating tensors in a nested dict/list that hold NaN or Inf."""
    if isinstance(value, torch.Tensor):
        # min and max propagate NaN and show an Inf: one pass, no temporary of the tensor's size (measured
        # on the 2-core machine: 6.4 GB/s, against 0.23 GB/s for isfinite().all())
        bad = value.is_floating_point() and value.numel() > 0 and \
            not bool(torch.isfinite(torch.stack(torch.aminmax(value))).all())
        return [where] if bad else []
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = ((f"[{i}]", item) for i, item in enumerate(value))
    else:
        return []
    found = []
    for key, item in items:
        key = str(key)
        found += _nonfinite_leaves(item, f"{where}{key}" if key.startswith("[") else f"{where}.{key}")
    return found


def nonfinite_problem(obj) -> str | None:
    """'holds non-finite values (NaN/Inf) in <tensors>' for a loaded checkpoint file's object (its
    floating tensors named by their keys, the first five), or None when every value is finite."""
    bad = [leaf.lstrip(".") for leaf in _nonfinite_leaves(obj, "")]
    if not bad:
        return None
    return (f"holds non-finite values (NaN/Inf) in {', '.join(bad[:5])}"
            + (f" and {len(bad) - 5} more tensors" if len(bad) > 5 else ""))


class NonFiniteSnapshot(ValueError):
    """A snapshot holds NaN or Inf: the checkpoint is refused, not written."""


def write_files(folder: str, jobs: list, storages: dict, check_finite: bool = False) -> dict[str, dict]:
    """Write the captured `jobs` into `folder` (created), each file fsynced and hashed as written, then
    fsync the folders; returns {name: {size, sha256}}. With `check_finite` every floating tensor of a file
    is checked for NaN/Inf before the file is written (NonFiniteSnapshot names them): the background
    writer checks the snapshot it writes, off the step's path."""
    folder_path = Path(folder)
    written, folders = {}, {folder_path}
    for kind, name, data, zipfile in jobs:
        path = folder_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        folders.add(path.parent)
        if kind == "torch":
            obj = _RebuildUnpickler(data, storages).load()
            problem = nonfinite_problem(obj) if check_finite else None
            if problem:
                raise NonFiniteSnapshot(f"{path.name} {problem}")
            written[name] = durable_write(path, lambda f, obj=obj, z=zipfile: torch.save(
                obj, f, _use_new_zipfile_serialization=z))
            del obj
        elif kind == "bytes":
            written[name] = durable_write(path, lambda f, data=data: f.write(data))
        else:
            written[name] = durable_write(path, lambda f, data=data: _copy_from(data, f))
    for each in folders:
        fsync_dir(each)
    return written


def _copy_from(source: str, handle) -> None:
    with open(source, "rb") as src:
        shutil.copyfileobj(src, handle, 1 << 20)


# --------------------------------------------------------------------------------------------------
# the writer process
# --------------------------------------------------------------------------------------------------


def _writer_main(conn) -> None:
    """The writer process: runs ('run', function, kwargs) jobs in order, answering ('ok', result) or
    ('error', message); ('buffers', {key: tensor}) adds snapshot buffers; exits on ('close',) or
    when the trainer's end of the pipe closes."""
    # A stop signal sent to the whole process group (a preempted job) is the trainer's to handle: it still
    # needs this process to finish and commit its preemption checkpoint. The trainer ends this process
    # by closing the pipe (or kills it).
    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(number, signal.SIG_IGN)
    try:
        os.nice(10)  # the training step comes first on a shared CPU
    except OSError:
        pass
    torch.set_num_threads(1)
    buffers: dict = {}
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message[0] == "close":
            return
        if message[0] == "buffers":
            buffers.update(message[1])
            continue
        _, function, kwargs = message
        try:
            if function is write_files:
                kwargs = dict(kwargs, storages=buffers)
            result = ("ok", function(**kwargs))
        except NonFiniteSnapshot as exc:
            result = ("error", f"not saved: {exc}")
        except Exception as exc:  # reported to the trainer, which fails the save on every rank
            result = ("error", describe_error(exc, Path(kwargs.get("folder") or kwargs.get("staging") or ".")))
        try:
            conn.send(result)
        except (BrokenPipeError, OSError):
            return


def describe_error(exc: BaseException, where: Path) -> str:
    """A failed write as 'path: reason', a full disk with the space left."""
    if isinstance(exc, OSError):
        path = exc.filename or where
        reason = exc.strerror or str(exc)
        if exc.errno == errno.ENOSPC:
            reason = f"no space left on device ({shutil.disk_usage(where.parent).free >> 20} MiB free)"
        return f"{path}: {reason}"
    try:
        free = shutil.disk_usage(where.parent).free
    except OSError:
        free = None
    hint = f" (no space left on device: {free >> 20} MiB free)" if free is not None and free < (64 << 20) else ""
    return f"{where}: {type(exc).__name__}: {exc}{hint}"


class WriterDied(RuntimeError):
    """The writer process ended with a job unanswered (killed, out of memory)."""


@contextmanager
def _stop_signals_ignored_by_children():
    """Children started in the block ignore the stop signals from their first instruction: an ignored
    disposition survives fork and exec, and Python then installs no KeyboardInterrupt handler. A Ctrl-C
    or SIGTERM to the whole process group while a spawned writer still imports must not kill it before
    _writer_main ignores them itself. This process blocks them meanwhile and receives any that arrived
    once its own handlers are back."""
    stops = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers can only be changed from the main thread
        return
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    handlers = {number: signal.signal(number, signal.SIG_IGN) for number in stops}
    try:
        yield
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


class Writer:
    """This rank's writer process: one job at a time, in order; `poll()` and `wait()` collect answers."""

    def __init__(self):
        import torch.multiprocessing as mp  # registers torch's shared-memory reductions for the pipe

        context = mp.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_writer_main, args=(child,), daemon=True, name="lvface-ckpt-writer")
        with _stop_signals_ignored_by_children():
            self.process.start()
        child.close()
        self.pending = 0
        # Messages go out through a thread: the writer drains the pipe at its own lower priority, and a job
        # larger than the pipe's buffer would otherwise hold the step until the writer got a core
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_loop, name="lvface-ckpt-sender", daemon=True)
        self._sender.start()
        # Before multiprocessing's own exit handler, which would wait for a writer that ignores SIGTERM:
        # on any way out that did not close() it, the writer's unfinished job is abandoned.
        atexit.register(self._abandon)

    def _abandon(self) -> None:
        if self.process.is_alive():
            self.process.kill()
            self.process.join()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _send_loop(self) -> None:
        while True:
            data = self._outbox.get()
            if data is None:
                return
            try:
                self.conn.send_bytes(data)
            except (BrokenPipeError, OSError):  # the process is gone: poll() reports it
                return

    def _send(self, message) -> None:
        """Queue `message` for the process, pickled now (the objects may change once the step goes on)
        with multiprocessing's pickler, which carries torch's shared-memory handles."""
        if not self.process.is_alive():
            raise BrokenPipeError(f"the checkpoint writer process (pid {self.pid}) is not running")
        self._outbox.put(bytes(ForkingPickler.dumps(message)))

    def send_buffers(self, pool: BufferPool) -> None:
        if pool.unsent:
            self._send(("buffers", dict(pool.unsent)))
            pool.unsent.clear()

    def submit(self, function, **kwargs) -> None:
        self._send(("run", function, kwargs))
        self.pending += 1

    def poll(self, timeout: float = 0.0):
        """The next answer (('ok', result) or ('error', message)) if one arrives within `timeout` s, else
        None; raises WriterDied when the process is gone with a job unanswered."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.conn.poll(min(max(deadline - time.monotonic(), 0.0), 1.0)):
                    answer = self.conn.recv()
                    self.pending -= 1
                    return answer
            except (EOFError, OSError):  # the process is gone: its end of the pipe closed
                self.process.join(timeout=10)
                raise self._died() from None
            if not self.process.is_alive():
                raise self._died()
            if time.monotonic() >= deadline:
                return None

    def _died(self) -> WriterDied:
        return WriterDied(f"the checkpoint writer process (pid {self.process.pid}) died with exit code "
                          f"{self.process.exitcode} before finishing its job")

    def close(self, abandon: bool = False) -> None:
        """Stop the process after its jobs (or at once, abandoning them)."""
        if self.process.is_alive() and not abandon:
            self._outbox.put(bytes(ForkingPickler.dumps(("close",))))
            self.process.join(timeout=60)
        self._abandon()
        self._outbox.put(None)
        self._sender.join(timeout=10)
        atexit.unregister(self._abandon)
        self.conn.close()
