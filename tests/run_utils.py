"""One tiny real training run shared by the test modules that need a run (metrics, plot, launch).

`tiny_data()` writes a small synthetic data set once per test session; `scraped_run()` trains the demo
model on it with 2 torchrun ranks and `metrics.prometheus_port` set, scraping both ranks' exporters over
HTTP while it trains, and returns the run directory, the log and the scrapes. Both are cached for the
session (the run costs about half a minute on 2 cores).
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from lvface.distributed import free_port  # noqa: F401 (tests import it from here too)

REPO = Path(__file__).resolve().parent.parent


def free_port_pair() -> int:
    """A port p with p and p + 1 free (one exporter per local rank)."""
    for _ in range(50):
        port = free_port()
        try:
            import socket

            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


def run_env(**extra) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


_ROOT = Path(tempfile.mkdtemp(prefix="lvface_tiny_"))


@functools.lru_cache(maxsize=None)
def wait_for_log(log: Path, pattern: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Return once `log` matches the regular expression `pattern`; fail with the log's tail if `proc`
    exits first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if re.search(pattern, log.read_text()):
            return
        if proc.poll() is not None:
            raise AssertionError(f"exited ({proc.returncode}) before {pattern!r}:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)
    raise AssertionError(f"{pattern!r} not seen in {timeout} s:\n{log.read_text()[-4000:]}")


def tiny_data() -> Path:
    from lvface.data.synthetic import write_synthetic_dataset

    out = _ROOT / "data"
    write_synthetic_dataset(str(out), num_identities=40, images_per_identity=12, val_identities=20, val_pairs=100,
                            seed=0)
    return out


def tiny_overrides(data: Path, **extra: str) -> list[str]:
    """The demo config shrunk: 16 images per rank per step, a log line and a Parquet row every step."""
    values = {"data.rec": str(data / "train.rec"), "data.batch_size": "16", "data.num_workers": "0",
              "eval.bins": "[]", "train.log_every": "1", "train.max_steps": "6"}
    values.update(extra)
    return [f"{key}={value}" for key, value in values.items()]


@dataclass
class ScrapedRun:
    run_dir: Path
    log: str
    port: int
    scrapes: dict[int, list[str]] = field(default_factory=dict)
    """Local rank -> the exposition texts scraped from its exporter during training, in order."""


def _poll(port: int, texts: list[str], stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
                text = response.read().decode()
            # An exporter shutting down can answer 200 with an empty body (seen once in a full-suite
            # run): keep only expositions of lvface's series, which are all there from the first scrape.
            if "lvface_steps_total" in text and (not texts or texts[-1] != text):
                texts.append(text)
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        stop.wait(0.1)


@functools.lru_cache(maxsize=None)
def scraped_run() -> ScrapedRun:
    """The demo model trained 16 steps by 2 torchrun ranks with Prometheus on, a verification and a
    checkpoint at steps 8 and 16, both exporters polled every 0.1 s while it runs."""
    data = tiny_data()
    run_dir = _ROOT / "scraped_run"
    port = free_port_pair()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "lvface.train", "--config", str(REPO / "configs" / "demo.yaml"),
           *tiny_overrides(data, **{"train.max_steps": "16", "eval.bins": f"[{data / 'val.bin'}]",
                                    "eval.every_steps": "8", "eval.batch_size": "50",
                                    "metrics.prometheus_port": str(port), "checkpoint.every_steps": "8",
                                    "train.output_dir": str(run_dir)})]
    run = ScrapedRun(run_dir=run_dir, log="", port=port, scrapes={0: [], 1: []})
    stop = threading.Event()
    pollers = [threading.Thread(target=_poll, args=(port + local, run.scrapes[local], stop), daemon=True)
               for local in (0, 1)]
    for poller in pollers:
        poller.start()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600)
    finally:
        stop.set()
        for poller in pollers:
            poller.join()
    run.log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"the tiny run failed ({proc.returncode}):\n{run.log[-6000:]}")
    return run
