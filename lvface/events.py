"""The run's event log: `<output_dir>/events.jsonl`, one JSON object a line, appended by rank 0.

Events (each with `t`, unix seconds, and `kind`; `lvface report` adds them up, lvface/report.py):
- start: a training process began (`t` is the process's own start time, so imports count), with its
  world size and the step and samples it resumes from (steps count global batches of this world size);
- ready: start-up is over, the first step begins;
- steps: at each log line, the steps since the last one: their wall time split into data_wait_s,
  skipped_s (whole skipped steps) and training_s (the rest), and their number;
- save / eval: a checkpoint save or a verification round, `t` at its start, and its `seconds`;
- stop: the process ends its run (`reason` done or preempted). A process that is killed writes none.

Each line goes out in one O_APPEND write, so lines of successive processes never interleave and a
process killed mid-write leaves at most a torn last line, which `read_events` skips.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

EVENTS_FILE = "events.jsonl"


def process_start_time() -> float:
    """Unix time at which this process started (psutil reads /proc/self/stat and the boot time)."""
    import psutil

    return psutil.Process().create_time()


class EventLog:
    """Appends events to <run_dir>/events.jsonl when enabled (rank 0); does nothing otherwise."""

    def __init__(self, run_dir: str | Path, enabled: bool):
        self.path = Path(run_dir) / EVENTS_FILE
        self.enabled = enabled

    @classmethod
    def started(cls, run_dir: str | Path, enabled: bool, **fields) -> "EventLog":
        """The log of a process that starts training: its `start` event is written (fields: world_size, step)."""
        events = cls(run_dir, enabled)
        events.record("start", t=process_start_time(), pid=os.getpid(), **fields)
        return events

    def record(self, kind: str, t: float | None = None, **fields) -> None:
        if not self.enabled:
            return
        line = json.dumps({"t": round(time.time() if t is None else t, 3), "kind": kind, **fields}) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


def read_events(path: str | Path) -> list[dict]:
    """The events of a run folder's events.jsonl (or of the file itself), in file order."""
    path = Path(path)
    if path.is_dir():
        path = path / EVENTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no event log; it is written by lvface train (rank 0) into train.output_dir")
    lines = path.read_text().splitlines()
    events = []
    for number, line in enumerate(lines, 1):
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # a process killed in the middle of its last write
                log.warning("%s:%d: torn last line skipped", path, number)
                continue
            raise ValueError(f"{path}:{number}: not a JSON event: {line[:120]!r}") from None
        if not isinstance(event, dict) or "t" not in event or "kind" not in event:
            raise ValueError(f"{path}:{number}: an event needs 't' and 'kind': {line[:120]!r}")
        events.append(event)
    return events
