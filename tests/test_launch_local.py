"""scripts/launch_local.sh (what scripts/demo.sh launches with) on a busy machine: a free master port
when 29500 is taken, a given port that is taken refused in one line, and a hostfile without
passwordless ssh stopped before DeepSpeed starts, with what to do on one node."""
from __future__ import annotations

import errno
import os
import re
import signal
import socket
import subprocess
from contextlib import contextmanager

import pytest

from run_utils import REPO, run_env, tiny_data, tiny_overrides

BUSY_PORT = 29500  # the port the issue found taken: the launchers' default


@contextmanager
def port_taken(port: int):
    """Hold `port` (listening) for the block; if someone else already holds it, it is taken all the same."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("", port))
        sock.listen(1)
    except OSError as error:
        if error.errno != errno.EADDRINUSE:
            raise
    try:
        yield
    finally:
        sock.close()


def _launch(*args: str, timeout: int = 900, **env: str) -> subprocess.CompletedProcess:
    environment = {**run_env(), **env}  # run_env drops MASTER_PORT; a test may set it on purpose
    proc = subprocess.Popen(["bash", str(REPO / "scripts" / "launch_local.sh"), *args], cwd=REPO, env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the ranks it started
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_two_ranks_train_on_a_free_port_while_29500_is_taken(tmp_path):
    data = tiny_data()
    with port_taken(BUSY_PORT):
        proc = _launch("--num_gpus", "2", "--", "lvface/train.py", "--ds_config", "configs/zero2.json",
                       "--config", "configs/demo.yaml",
                       *tiny_overrides(data, **{"train.max_steps": "2", "train.output_dir": str(tmp_path / "run")}))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    port = int(re.search(r"launch_local\.sh: deepspeed .*--master_port (\d+)", log).group(1))
    assert port != BUSY_PORT
    assert (tmp_path / "run" / "summary.json").is_file()  # both ranks met on that port and trained
    assert "EADDRINUSE" not in log and "address already in use" not in log.lower()


def test_a_given_port_that_is_taken_is_refused_in_one_line():
    with port_taken(BUSY_PORT):
        for args, env in (((f"--master_port={BUSY_PORT}",), {}), ((), {"MASTER_PORT": str(BUSY_PORT)})):
            proc = _launch(*args, "--", "lvface/train.py", timeout=60, **env)
            assert proc.returncode == 2
            assert proc.stderr.strip().startswith(f"launch_local.sh: master port {BUSY_PORT} is in use")
            assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_hostfile_without_passwordless_ssh_stops_before_deepspeed(tmp_path):
    reachable = subprocess.run(["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "localhost", "true"],
                               capture_output=True, timeout=30).returncode == 0
    if reachable:
        pytest.skip("this machine has passwordless ssh to localhost: nothing to refuse")
    (tmp_path / "hosts").write_text("localhost slots=2\n")
    proc = _launch("--hostfile", str(tmp_path / "hosts"), "--", "lvface/train.py", timeout=60)
    assert proc.returncode == 1
    assert "# ssh localhost: FAILED" in proc.stderr
    assert "passwordless ssh" in proc.stderr and "--num_gpus 2" in proc.stderr and "--include localhost:0,1" in proc.stderr
    assert "launch_local.sh: deepspeed" not in proc.stdout  # DeepSpeed never started
    # the hostfile launcher's dry run says the same, per host
    dry = subprocess.run(["bash", str(REPO / "launch" / "deepspeed_hostfile.sh"), "--dry-run", str(tmp_path / "hosts"),
                          "--config", "configs/demo.yaml"], cwd=REPO, env=run_env(), capture_output=True, text=True,
                         timeout=60)
    assert dry.returncode == 0 and "# ssh localhost: FAILED" in dry.stdout and "passwordless ssh" in dry.stdout
