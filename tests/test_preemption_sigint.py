"""Ctrl-C, as a terminal sends it: SIGINT to the whole process group (launcher, ranks, loader workers).

Real runs on a tiny synthetic set, each started in its own session so that `os.killpg` reaches exactly
the processes a terminal's Ctrl-C would: the first SIGINT saves at the next step boundary and exits 130
(no requeue marker), the second exits at once without a traceback, and under the deepspeed launcher
(which answers SIGINT by sending SIGTERM to every rank's process tree) both ranks still save.
"""

from __future__ import annotations

import json
import os
import signal
import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from run_utils import run_env, wait_for_log
from lvface.distributed import free_port
from lvface.preemption import EXIT_INTERRUPTED

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from lvface.data.synthetic import write_synthetic_dataset

    out = tmp_path_factory.mktemp("sigint") / "data"
    write_synthetic_dataset(out, num_identities=40, images_per_identity=8, val_identities=10, val_pairs=40, seed=0)
    return out


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", str(REPO / "configs" / "demo.yaml"), f"data.rec={data / 'train.rec'}", "data.batch_size=16",
            "eval.bins=[]", "train.log_every=1", "train.max_steps=400", f"train.output_dir={out}", *extra]


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    # a session of its own: its process group is what a terminal's Ctrl-C reaches, and nothing else
    return subprocess.Popen(cmd, cwd=REPO, env=run_env(), stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    wait_for_log(log, re.escape(text), proc, timeout)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> int:
    """Wait for `proc` and every process of its group (the runner returns before its launcher's ranks)."""
    tree = psutil.Process(proc.pid).children(recursive=True)
    code = proc.wait(timeout=timeout)
    _, alive = psutil.wait_procs(tree, timeout=timeout)
    for process in alive:
        process.kill()
    assert not alive, f"processes left running after the stop: {[p.pid for p in alive]}"
    return code


def _saved_step(out: Path) -> int:
    root = out / "checkpoints"
    return json.loads((root / (root / "latest").read_text() / "train_state.json").read_text())["step"]


def test_ctrl_c_saves_once_and_exits_130(data, tmp_path):
    """`python -m lvface.train` with the torch loader's worker process in the same group."""
    out, log = tmp_path / "run", tmp_path / "log.txt"
    proc = _start([sys.executable, "-m", "lvface.train", *_args(data, out, "data.loader=torch", "data.num_workers=1")],
                  log)
    _wait_for(log, "step 2/400", proc)
    os.killpg(proc.pid, signal.SIGINT)
    code = _finish(proc)
    text = log.read_text()
    assert code == EXIT_INTERRUPTED, text[-4000:]
    assert text.count("lvface: Ctrl-C: saving a checkpoint after this step") == 1, text[-4000:]
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-4000:]
    assert "stopped by SIGINT (Ctrl-C); resume from" in text and "checkpoint.resume=auto" in text
    assert "exiting with 130 (Ctrl-C: no requeue)" in text
    assert _saved_step(out) >= 2
    assert not (out / "PREEMPTED").exists()  # the requeue marker is for schedulers, not for a person
    assert not (out / ".lvface.lock").exists()


def test_second_ctrl_c_stops_at_once_without_a_traceback(data, tmp_path):
    """The second SIGINT arrives during start-up, long before the first step could end and save."""
    out, log = tmp_path / "run", tmp_path / "log.txt"
    proc = _start([sys.executable, "-m", "lvface.train", *_args(data, out)], log)
    _wait_for(log, "optimizer steps per epoch", proc)  # logged before the model and DeepSpeed are built
    os.killpg(proc.pid, signal.SIGINT)
    _wait_for(log, "lvface: Ctrl-C: saving", proc)
    os.killpg(proc.pid, signal.SIGINT)
    code = _finish(proc, timeout=60)
    text = log.read_text()
    assert code == EXIT_INTERRUPTED, text[-4000:]
    assert "lvface: second Ctrl-C: stopped now without saving" in text, text[-4000:]
    assert "Traceback" not in text, text[-4000:]
    assert "step 1/" not in text and not (out / "checkpoints" / "latest").exists()


def test_ctrl_c_under_the_deepspeed_launcher_saves_on_both_ranks(data, tmp_path):
    """SIGINT to runner, launcher and 2 ranks (DALI loader); the launcher's follow-up SIGTERM to the
    ranks is the same stop request, and the save ends well inside its 30 s before SIGKILL."""
    out, log = tmp_path / "run", tmp_path / "log.txt"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           str(REPO / "lvface" / "train.py"), "--ds_config", str(REPO / "configs" / "zero2.json"), *_args(data, out)]
    proc = _start(cmd, log)
    _wait_for(log, "step 2/400", proc)
    os.killpg(proc.pid, signal.SIGINT)
    _finish(proc)  # the runner itself dies of the KeyboardInterrupt at once (DeepSpeed's, no handler)
    text = log.read_text()
    for rank in (0, 1):
        assert f"[rank{rank}] WARNING lvface: stopped by SIGINT (Ctrl-C); resume from" in text, text[-5000:]
    assert text.count("lvface: Ctrl-C: saving a checkpoint after this step") == 1, text[-5000:]
    rank_lines = [line for line in text.splitlines() if "[rank" in line]
    assert not any("Traceback" in line or "Error" in line for line in rank_lines), text[-5000:]
    # the only traceback is the runner's own KeyboardInterrupt (deepspeed/launcher/runner.py has no handler)
    assert text.count("Traceback") <= 1, text[-5000:]
    assert _saved_step(out) >= 2
    assert not (out / "PREEMPTED").exists() and not (out / ".lvface.lock").exists()
