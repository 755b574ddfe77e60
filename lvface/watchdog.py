"""Hangs and stragglers that name their rank.

Heartbeats: every rank writes `<step> <unix time>` under `lvface/heartbeat/<rank>` in the store the
process group was created with (torch's default store: the TCPStore of the env:// launch, or the
rendezvous store of torchrun) after each step. One small set per rank per step, no collective.

Stall watchdog: a daemon thread per rank notices when no step has finished for `dump_after_s` (a
fraction of train.collective_timeout_s, train.hang_dump_fraction), from the first step on (a save or an
evaluation that takes that long is dumped too: its stacks say where the time goes). It then writes this rank's Python
stacks, all threads (faulthandler), to `<run_dir>/stacks/rank<k>.txt`, marks the rank as waiting in the
store (`lvface/stalled/<rank>` = the step it is stuck after), and re-reads every rank's heartbeat and mark
until steps resume. When the collective finally times out, `describe()` turns the last reading into the
error's text: the ranks that did not arrive (behind the others, or live ranks' watchdogs marked waiting
and theirs did not: stopped, dead, or stuck holding the GIL) and the last step each finished.

Where the store is served by a rank's own process (rank 0 on a deepspeed or plain env:// launch), a
stopped rank 0 also stops the store: the readings then fail, and the text says so. torchrun serves it
from its agent, which a stopped rank does not stop.

Stragglers (`StragglerWatch`): in synchronous data-parallel training every rank's step takes the same
wall time, the fast ranks spending the difference waiting in collectives. What tells the slow rank is
its own time: step time minus the time inside the head's collectives, where the others wait for it (the
embedding all-gather follows the backbone's forward and the data wait). At each log interval the ranks
all-gather their mean own time over the interval (one small collective per log line, none per step: the
heartbeats would give only the last step of each rank, and reading 2 x world_size keys per log line
from one store server grows with the job). A rank whose own time stays `ratio` times the median of the
others' for `patience` log intervals in a row is logged, and exported as lvface_straggler_rank.
"""

from __future__ import annotations

import faulthandler
import logging
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

HEARTBEAT_KEY = "lvface/heartbeat/"
STALLED_KEY = "lvface/stalled/"
STACKS_DIR = "stacks"


@dataclass(frozen=True)
class RankState:
    rank: int
    step: int | None
    """Last step the rank finished (None: none yet)."""
    time: float | None
    """Unix time of that heartbeat."""
    waiting: bool
    """Its own watchdog marked it as waiting after that step."""


def stack_file(run_dir: str | Path, rank: int) -> Path:
    return Path(run_dir) / STACKS_DIR / f"rank{rank}.txt"


class Heartbeat:
    """This rank's heartbeats, and the watchdog thread that dumps stacks and reads the others' beats."""

    def __init__(self, store, rank: int, world_size: int, run_dir: str | Path | None, dump_after_s: float):
        self.store, self.rank, self.world_size = store, rank, world_size
        self.run_dir = Path(run_dir) if run_dir else None
        self.dump_after_s = dump_after_s
        self.last_step: int | None = None
        self.last_beat = time.monotonic()
        self.stalled_at: float | None = None
        """Monotonic time of this stall's stack dump; None while steps finish."""
        self.readings: list[RankState] | None = None
        self.read_error: str | None = None
        self._stop = threading.Event()
        self._thread = None
        if store is not None and world_size > 1:  # every key exists from here on: one multi_get reads them all
            store.set(HEARTBEAT_KEY + str(rank), "-")
            store.set(STALLED_KEY + str(rank), "-")
        if store is not None and world_size > 1 and dump_after_s > 0 and self.run_dir is not None:
            self._thread = threading.Thread(target=self._watch, name="lvface-stall-watchdog", daemon=True)
            self._thread.start()

    # ---- the training thread
    def beat(self, step: int) -> None:
        """After each finished step (every rank)."""
        self.last_step, self.last_beat, self.stalled_at = step, time.monotonic(), None
        if self.store is not None:
            self.store.set(HEARTBEAT_KEY + str(self.rank), f"{step} {time.time():.3f}")

    def close(self) -> None:
        self._stop.set()

    # ---- the watchdog thread
    def _watch(self) -> None:
        poll = max(min(self.dump_after_s / 4, 2.0), 0.05)
        while not self._stop.wait(poll):
            # armed from the first step on: start-up (a checkpoint conversion, index building) may
            # legitimately run longer than any step, and a dump of every large resume would be noise
            if self.last_step is None:
                continue
            if self.stalled_at is not None or time.monotonic() - self.last_beat < self.dump_after_s:
                if self.stalled_at is not None:
                    self._read()
                continue
            self.stalled_at = time.monotonic()
            self.dump_stacks(f"no step finished for {self.dump_after_s:g} s")
            try:
                self.store.set(STALLED_KEY + str(self.rank), f"{self.last_step} {time.time():.3f}")
            except Exception as exc:  # the store's server is gone or stopped: say so, keep watching
                self.read_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            self._read()

    def dump_stacks(self, reason: str) -> Path | None:
        """Write every thread's Python stack to <run_dir>/stacks/rank<k>.txt (overwritten per stall)."""
        if self.run_dir is None:
            return None
        path = stack_file(self.run_dir, self.rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as handle:
            handle.write(f"rank {self.rank} of {self.world_size}, {time.strftime('%Y-%m-%d %H:%M:%S')}: {reason}; "
                         f"last step finished: {self.last_step}\n\n")
            handle.flush()
            faulthandler.dump_traceback(file=handle, all_threads=True)
        log.warning("rank %d: %s (last step %s): the Python stacks of all its threads are in %s", self.rank,
                    reason, self.last_step, path)
        return path

    def _values(self) -> list[str]:
        """Every rank's heartbeat, then every rank's stall mark: one round trip to the store (two while a
        rank has not set its keys yet), so that all ranks reading at once stay cheap on one server."""
        keys = [prefix + str(rank) for prefix in (HEARTBEAT_KEY, STALLED_KEY) for rank in range(self.world_size)]
        if self.store.check(keys):
            return [value.decode() for value in self.store.multi_get(keys)]
        return [self.store.get(key).decode() if self.store.check([key]) else "-" for key in keys]

    def _read(self) -> None:
        states = []
        try:
            values = self._values()
            for rank in range(self.world_size):
                beat, mark = values[rank], values[self.world_size + rank]
                step, when = (int(beat.split()[0]), float(beat.split()[1])) if beat != "-" else (None, None)
                waiting = mark != "-" and mark.split()[0] == str(step)
                states.append(RankState(rank, step, when, waiting))
        except Exception as exc:
            self.read_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            return
        self.readings, self.read_error = states, None

    # ---- the error text
    def describe(self) -> str:
        """Which ranks did not arrive and the last step each finished, for a collective's timeout error."""
        if self.store is None or self.world_size == 1:
            return ""
        if self.readings is None and self.stalled_at is None:
            self._read()  # failed fast (a peer's connection closed) before the watchdog fired
        states = self.readings
        if states is None:
            return (f" The other ranks' heartbeats could not be read from the process group's store ({self.read_error}): "
                    f"its server runs in rank 0's process on a deepspeed or env:// launch, so rank 0 is likely the "
                    f"one that is stopped or dead.")
        newest = max((s.step for s in states if s.step is not None), default=None)
        behind = [s for s in states if s.step != newest or (self.stalled_at is not None and not s.waiting
                                                            and s.rank != self.rank)]
        now = time.time()

        def where(s: RankState) -> str:
            if s.step is None:
                return f"rank {s.rank} (no step finished)"
            return f"rank {s.rank} (last step finished: {s.step}, {now - s.time:.0f} s ago)"

        if self.stalled_at is None:  # failed at once (a closed connection): the heartbeats say who is behind
            text = " Last step each rank finished: " + ", ".join(map(where, states)) + "."
            late = [f"rank {s.rank}" for s in behind]
            return text + (f" Behind the others: {', '.join(late)}." if late else "")
        waiting = [s for s in states if s not in behind]
        text = " Ranks that did not arrive: " + (", ".join(map(where, behind)) or "none by their heartbeats")
        text += "; waiting: " + (", ".join(map(where, waiting)) or "none") + "."
        if self.run_dir is not None and self.stalled_at is not None:
            text += f" Python stacks of the live ranks: {self.run_dir / STACKS_DIR}/rank<k>.txt."
        return text


class StragglerWatch:
    """Names a rank whose own step time (without waiting for the others) stays above the others'."""

    def __init__(self, metrics, rank: int, world_size: int, group, ratio: float = 1.5, patience: int = 3):
        self.metrics, self.rank, self.world_size, self.group = metrics, rank, world_size, group
        self.ratio, self.patience = ratio, patience
        self.seen_steps = metrics.steps
        self.suspect: int | None = None
        self.streak = 0

    def own_seconds(self) -> float:
        """Mean over the steps since the last check of step time minus time in the head's collectives."""
        new = min(self.metrics.steps - self.seen_steps, len(self.metrics.recent))
        self.seen_steps = self.metrics.steps
        window = list(self.metrics.recent)[-new:] if new > 0 else []
        return statistics.fmean(row["step"] - row["head_collective"] for row in window) if window else 0.0

    def check(self, step: int) -> int | None:
        """At a log interval, on every rank (collective): the straggling rank, or None."""
        if self.world_size == 1:
            return None
        mine = torch.tensor([self.own_seconds()], dtype=torch.float64, device=self.metrics.device)  # NCCL: on the GPU
        gathered = [torch.zeros_like(mine) for _ in range(self.world_size)]
        dist.all_gather(gathered, mine, group=self.group)
        times = [float(t) for t in gathered]
        slowest = max(range(self.world_size), key=times.__getitem__)
        median = statistics.median(t for r, t in enumerate(times) if r != slowest)
        ratio = times[slowest] / median if median > 0 else 1.0
        self.streak = self.streak + 1 if ratio >= self.ratio and slowest == self.suspect else int(ratio >= self.ratio)
        self.suspect = slowest if ratio >= self.ratio else None
        straggler = self.suspect if self.streak >= self.patience else None
        if straggler is not None and self.streak == self.patience and self.rank == 0:
            log.warning("straggler: rank %d's own step time (without waiting for the others) is %.3f s, %.2fx the "
                        "median of the other ranks (%.3f s), for %d log intervals in a row up to step %d", straggler,
                        times[straggler], ratio, median, self.streak, step)
        self.metrics.set(straggler_rank=-1 if straggler is None else straggler, straggler_ratio=ratio)
        return straggler
