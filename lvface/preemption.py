"""Preemption and Ctrl-C: a signal asks the run to stop; the ranks agree at a step boundary, save, and exit.

SLURM sends SIGTERM (or the signal asked for with ``--signal``, SIGUSR1 in launch/slurm_64gpu.sh) ahead
of a preemption or the time limit; Kubernetes sends SIGTERM before it kills a pod. A signal handler
here only records the signal: the training loop reads ``StopRequest.requested`` once per step and
puts it into the one all-reduce of the step (lvface/engine.py ``train_step``), so every rank sees the
same answer at the same step, the checkpoint manager saves, and the process exits with
``EXIT_PREEMPTED`` (75, EX_TEMPFAIL: "try again"), which the launch scripts treat as "requeue and
resume".

Ctrl-C (SIGINT, sent by the terminal to the whole process group: launcher, ranks and their loader
workers) is the same request from a person, who wants the run saved and stopped, not requeued: the
ranks save at the next step boundary and exit ``EXIT_INTERRUPTED`` (130, the shell's code for a
process ended by SIGINT, which also stops a ``set -e`` script), and the launch scripts requeue only on
75. A second Ctrl-C exits at once (130) with one line and no traceback; the last complete checkpoint
stays the resume point. Loader worker processes ignore both signals (``ignore_stop_signals``): they
leave with their rank, and one killed mid-save would make torch's SIGCHLD handler raise in the rank.

DeepSpeed's single-node launcher (deepspeed.launcher.launch) answers a Ctrl-C by sending SIGTERM to
each rank's process tree and SIGKILL 30 s later (its ``terminate_process_tree``); its runner
(``deepspeed``) dies of the KeyboardInterrupt at once and prints its own short traceback. The ranks
count the SIGTERM as the same stop request, so a Ctrl-C under ``deepspeed`` saves as long as the
current step and the checkpoint take under 30 s; a longer save is cut by that SIGKILL (the previous
checkpoint stays intact and is the resume point). On such runs stop with ``kill -USR1`` to the ranks,
or SIGTERM to the runner, neither of which starts that clock. torchrun's agent does the same with its
own 30 s grace period.

No rank is orphaned when its launcher dies. ``deepspeed`` (deepspeed.launcher.runner) installs no
signal handler on a single node: SIGTERM kills the runner, and its child deepspeed.launcher.launch
(which would forward the signal to the ranks) runs on with the ranks under it. ``watch_launcher``
therefore watches the process's launcher ancestors (the parent, and the runner above
deepspeed.launcher.launch or torchrun's agent) and raises SIGTERM in this process when one of them is
gone; the parent's death also arrives at once through ``PR_SET_PDEATHSIG`` on Linux.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import threading
from pathlib import Path

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75
"""Exit code of a run that saved because it was asked to stop (EX_TEMPFAIL): requeue and resume."""
EXIT_INTERRUPTED = 128 + signal.SIGINT
"""Exit code of a run stopped by Ctrl-C (saved after the first, at once after the second): no requeue."""
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
_RANK_VARIABLES = ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
_LAUNCHER_MARKERS = ("deepspeed.launcher", "deepspeed/launcher", "bin/deepspeed", "torch.distributed.run",
                     "torchrun", "torch/distributed/run")


class Preempted(Exception):
    """Raised after the stop checkpoint is written; the entry point exits with `exit_code`
    (EXIT_PREEMPTED, or EXIT_INTERRUPTED after a Ctrl-C)."""

    def __init__(self, signal_name: str, checkpoint, exit_code: int = EXIT_PREEMPTED):
        super().__init__(f"stopped by {signal_name}; resume from {checkpoint} with checkpoint.resume=auto")
        self.signal_name, self.checkpoint, self.exit_code = signal_name, checkpoint, exit_code


def _first_process() -> bool:
    """Rank 0 as the launcher numbers it, known before the process group exists (for one line per job)."""
    return all(os.environ.get(name, "0") == "0" for name in _RANK_VARIABLES)


def _say(text: str) -> None:
    # os.write, not print: a handler may interrupt a print to stderr, and a re-entered buffered write raises
    try:
        os.write(2, (text + "\n").encode())
    except OSError:
        pass


class StopRequest:
    """The signals that ask this process to stop, recorded by handlers that do nothing else (but the
    second Ctrl-C, which ends the process)."""

    def __init__(self):
        self.signum: int | None = None
        self.interrupts = 0
        """Ctrl-Cs (SIGINTs) received."""
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def signal_name(self) -> str:
        if self.interrupts:
            return "SIGINT (Ctrl-C)"
        return signal.Signals(self.signum).name if self.signum else "a stop request of another rank"

    @property
    def exit_code(self) -> int:
        """130 when a person pressed Ctrl-C (no requeue), 75 for a scheduler's or another rank's request."""
        return EXIT_INTERRUPTED if self.interrupts else EXIT_PREEMPTED

    @property
    def requeue(self) -> bool:
        return self.exit_code == EXIT_PREEMPTED

    def exit_note(self) -> str:
        if self.requeue:
            return f"exiting with {EXIT_PREEMPTED} so that the job is requeued"
        return f"exiting with {EXIT_INTERRUPTED} (Ctrl-C: no requeue)"

    def _handle(self, signum, frame) -> None:  # async-signal context: record (and one line for a person)
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts >= 2:
                if _first_process():
                    _say("lvface: second Ctrl-C: stopped now without saving; resume from the last complete "
                         "checkpoint with checkpoint.resume=auto")
                os._exit(EXIT_INTERRUPTED)
            if _first_process():
                _say("lvface: Ctrl-C: saving a checkpoint after this step, then exiting "
                     "(resume with checkpoint.resume=auto; Ctrl-C again stops at once without saving)")
        if self.signum is None:
            self.signum = signum

    def install(self) -> "StopRequest":
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()


def ignore_stop_signals() -> None:
    """For helper processes of a rank (loader workers): the stop signals are the rank's to handle. They
    exit with the rank (torch's workers watch their parent)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state, ppid, ...); None when unreadable.
    The name is cut at the last ')' because it may itself hold spaces and parentheses."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _parent_of(pid: int) -> int:
    fields = _stat_fields(pid)
    try:
        return int(fields[1]) if fields else 0
    except (IndexError, ValueError):
        return 0


def launcher_ancestors(pid: int | None = None) -> list[int]:
    """The parent, and every ancestor above it whose command line is a launcher (deepspeed's runner
    and launch, torchrun), nearest first."""
    pid = os.getpid() if pid is None else pid
    parent = _parent_of(pid)
    chain = [parent] if parent > 1 else []
    ancestor = _parent_of(parent) if chain else 0
    while ancestor > 1 and any(marker in _cmdline(ancestor) for marker in _LAUNCHER_MARKERS):
        chain.append(ancestor)  # the shell or srun above the outermost launcher is not watched
        ancestor = _parent_of(ancestor)
    return chain


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    fields = _stat_fields(pid)
    return not fields or fields[0] != "Z"  # a zombie is dead; unreadable: alive, as os.kill said


def watch_launcher(interval_s: float = 1.0) -> threading.Thread | None:
    """Raise SIGTERM in this process when its parent or a launcher above it exits (see the module
    docstring). Returns the daemon thread, or None for a process without a launcher parent."""
    try:  # the parent's death, at once (Linux)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    watched = launcher_ancestors()
    parent = os.getppid()
    if not watched or parent <= 1:
        return None
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(interval_s):
            gone = [pid for pid in watched if not process_alive(pid)]
            if gone or os.getppid() != parent:
                log.warning("the launcher process %s exited: stopping this rank as if preempted (SIGTERM)",
                            gone[0] if gone else parent)
                os.kill(os.getpid(), signal.SIGTERM)
                return

    thread = threading.Thread(target=watch, name="lvface-launcher-watch", daemon=True)
    thread.stop = stop  # type: ignore[attr-defined]
    thread.start()
    return thread
