"""Progress bars for long offline commands: a rate and an ETA on a terminal, silence in logs.

    from lvface.progress import progress
    for images in progress(loader, desc="embed", unit="batch"):
        ...

One helper, used by synth, embed, eval verify / ijbc, reshard, the universal-checkpoint conversion and
the export checks. The bar is drawn on stderr only when stderr is a terminal (so a log file or a CI
capture stays clean); LVFACE_PROGRESS=1 forces it on, LVFACE_PROGRESS=0 off.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from typing import Iterable, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress_enabled() -> bool:
    forced = os.environ.get("LVFACE_PROGRESS")
    if forced in ("0", "1"):
        return forced == "1"
    return sys.stderr.isatty()


def progress(iterable: Iterable[T] | None = None, *, desc: str, total: int | None = None, unit: str = "it",
             leave: bool = False) -> tqdm:
    """A tqdm bar over `iterable` (or a manual one: `with progress(total=n, ...) as bar: bar.update(k)`),
    disabled unless stderr is a terminal."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, disable=not progress_enabled(),
                file=sys.stderr, dynamic_ncols=True, mininterval=0.5, smoothing=0.1)


def run_with_progress(cmd: list[str], *, desc: str) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, capture_output=True, text=True) with an elapsed-time bar while it runs (for a
    conversion that reports no progress of its own through a captured pipe)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        with progress(desc=desc, unit="s", total=None) as bar:
            start = time.monotonic()
            while process.poll() is None:
                time.sleep(0.5)
                bar.update(time.monotonic() - start - bar.n)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, process.returncode, out.read(), err.read())
