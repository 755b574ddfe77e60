"""How a training process ends: its exit code, and a one-line error instead of a traceback.

0: done. 75 (EXIT_PREEMPTED): stopped by a signal after a checkpoint; requeue and resume. 130: stopped by
Ctrl-C after a checkpoint (no requeue). 2: the input
is wrong (config, files, a busy output folder): the line says what to fix. 1: the run failed (a save,
non-finite training, a dead or hung peer, a write of the run folder). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Callable

import torch.distributed as dist

from lvface.checkpoint.manager import CheckpointSaveError
from lvface.config import ConfigError
from lvface.engine import NonFiniteTraining
from lvface.files import FileWriteError
from lvface.distributed import report_error
from lvface.preemption import Preempted
from lvface.run_lock import OutputFolderLocked

INPUT_ERRORS = (ConfigError, FileNotFoundError, ValueError, OutputFolderLocked)


class CollectiveFailed(RuntimeError):
    """A collective failed or timed out: another rank is dead, stopped or hung."""


RUN_ERRORS = (CheckpointSaveError, NonFiniteTraining, CollectiveFailed, FileWriteError)
"""A failed write of the run's own files (a full disk meeting the metrics log, say) is one of these too."""


@contextmanager
def collective_failures(timeout_s: float, heartbeat=None):
    """Raise a lost peer (a failed or timed-out collective) in the block as CollectiveFailed, naming the
    ranks that did not arrive and the last step each reached (`heartbeat`: lvface.watchdog's, or None)."""
    try:
        yield
    except (dist.DistBackendError, RuntimeError) as exc:
        lost_peer = isinstance(exc, dist.DistBackendError) or any(
            text in str(exc) for text in ("Timed out", "timed out", "Connection closed by peer",
                                          "Connection reset by peer"))
        if isinstance(exc, RUN_ERRORS) or not lost_peer:
            raise
        ranks = heartbeat.describe() if heartbeat is not None else ""
        raise CollectiveFailed(f"a collective failed or waited longer than train.collective_timeout_s="
                               f"{timeout_s:g} s: another rank is dead, stopped or hung "
                               f"({str(exc).splitlines()[0][:300]}).{ranks}") from exc


def exit_code(run: Callable[[], object]) -> int:
    """Run `run` (a training entry point) and return its process exit code; the process group is
    destroyed on every way out."""
    errors = logging.getLogger("lvface")
    try:
        run()
    except Preempted as exc:
        errors.warning("%s", exc)
        return exc.exit_code
    except INPUT_ERRORS + RUN_ERRORS as exc:
        report_error(str(exc))  # one line per node that says what to fix, not a traceback
        return 2 if isinstance(exc, INPUT_ERRORS) else 1
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0
