"""Writing files so that a reader never sees half of one: the single home of every write lvface makes.

Every file lvface produces (checkpoints, head shards, the metrics log, record indexes, manifests,
reports) goes through `atomic_open`: the bytes go to a fresh temporary name in the same folder and
are renamed over the target only when the writer finishes cleanly, so a crash, a full disk or a
signal leaves either the previous file or the new one, never a mixture. A failed write raises
`FileWriteError`, an OSError that names the path and the reason ("No space left on device") instead
of the library's own message (torch.save reports a full disk as "unexpected pos").

Nothing here knows about training; it sits at the bottom of the package next to config.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any


class FileWriteError(OSError):
    """A file could not be written; the message names the path and the operating system's reason."""


def temp_name(path: str) -> str:
    """A fresh name next to `path` (same file system, so os.replace is atomic)."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot write {path!r}: directory {directory!r} does not exist")
    return f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _describe(exc: BaseException) -> str:
    """The operating system's reason behind an exception, also when a library wrapped it."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return f"{os.strerror(seen.errno)} (errno {seen.errno})"
        seen = seen.__cause__ or seen.__context__
    return f"{type(exc).__name__}: {exc}"


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename inside `directory` durable; some file systems refuse fsync on a folder (ignored:
    the rename itself is still atomic)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", *, durable: bool = False, **kwargs):
    """Open a temporary file next to `path`; on a clean exit it replaces `path`, else it vanishes.

    `durable=True` also fsyncs the file before the rename and the folder after it (checkpoints: the
    rename must not reach the disk before the bytes). The file gets the usual permissions (umask),
    unlike tempfile.mkstemp's 0600. Any OSError while writing becomes a FileWriteError naming `path`.
    """
    path = os.fspath(path)
    tmp_path = temp_name(path)
    try:
        with open(tmp_path, mode.replace("w", "x"), **kwargs) as handle:
            yield handle
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except BaseException as exc:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)
        if isinstance(exc, FileWriteError) or not _is_write_failure(exc):
            raise
        raise FileWriteError(getattr(_root_oserror(exc), "errno", None),
                             f"cannot write {path}: {_describe(exc)}") from exc
    if durable:
        fsync_dir(os.path.dirname(os.path.abspath(path)))


def _root_oserror(exc: BaseException) -> OSError | None:
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _is_write_failure(exc: BaseException) -> bool:
    """An OSError, or a library error caused by one (torch.save wraps ENOSPC in a RuntimeError)."""
    # torch's zip writer reports a short write as "unexpected pos" with no OSError attached.
    return _root_oserror(exc) is not None or (isinstance(exc, RuntimeError) and "unexpected pos" in str(exc))


def atomic_write_text(path: str | os.PathLike, text: str, *, durable: bool = False) -> None:
    with atomic_open(path, "w", encoding="utf-8", durable=durable) as handle:
        handle.write(text)


def jsonable(value: Any) -> Any:
    """Float dict keys become strings ("0.001"), numpy scalars and arrays become Python values."""
    if isinstance(value, dict):
        return {(f"{k:g}" if isinstance(k, float) else k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist") and type(value).__module__ == "numpy":
        return value.tolist()
    return value


def json_text(payload: Any) -> str:
    """The text of lvface's JSON files: indent 1, numpy values converted."""
    return json.dumps(jsonable(payload), indent=1, default=str) + "\n"


def atomic_write_json(path: str | os.PathLike, payload: Any, *, durable: bool = False) -> None:
    """The JSON writer: indent 1, numpy values converted, parents created, written atomically."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json_text(payload), durable=durable)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save, durably and atomically (checkpoints and head shards)."""
    import torch  # here, so that this module stays importable without torch (data tools, packing)

    with atomic_open(path, durable=True) as handle:
        torch.save(obj, handle)


class _HashingFile:
    """A binary file that hashes the bytes on their way to the disk (no second read pass)."""

    def __init__(self, handle, algorithm: str):
        self.handle, self.hash, self.size = handle, hashlib.new(algorithm), 0

    def write(self, data) -> int:
        self.hash.update(data)
        self.size += len(data) if not isinstance(data, memoryview) else data.nbytes
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()


def durable_write(path: str | os.PathLike, write, algorithm: str = "sha256") -> dict:
    """Create `path` (it must not exist: a checkpoint's staging folder is fresh), let `write(handle)` fill
    it, fsync it; returns {"size": bytes, algorithm: hex digest} of exactly the bytes written. The
    caller fsyncs the folder once all its files are written. Errors become FileWriteError naming `path`."""
    path = os.fspath(path)
    try:
        with open(path, "xb") as handle:
            hashing = _HashingFile(handle, algorithm)
            write(hashing)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException as exc:
        if isinstance(exc, FileWriteError) or not _is_write_failure(exc):
            raise
        raise FileWriteError(getattr(_root_oserror(exc), "errno", None),
                             f"cannot write {path}: {_describe(exc)}") from exc
    return {"size": hashing.size, algorithm: hashing.hash.hexdigest()}
