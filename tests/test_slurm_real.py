"""launch/slurm_64gpu.sh, unedited, under a real SLURM: munged, slurmctld and slurmd on this machine
(scripts/slurm_local.sh), a 2-rank job of the tiny demo run preempted twice with SIGUSR1, requeued by
the script each time, resumed from its preemption checkpoint, and completed.

The first preemption is what `--signal=USR1@600` sends (every task), the second `scancel --signal=USR1
--full` (the batch shell too). Skipped, with the reason, where SLURM or munge is not installed (Debian:
apt-get install slurm-wlm munge; scripts/test.sh does) or its daemons cannot be started here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_utils import REPO, free_port, run_env, tiny_data, tiny_overrides  # noqa: E402

SCRIPT = "launch/slurm_64gpu.sh"
MAX_STEPS = 30
# The script's #SBATCH lines ask for 8 nodes x 8 GPU tasks; sbatch's own options take precedence.
ONE_NODE = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0"]
DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """SLURM_CONF of a running single-node cluster, torn down after the module."""
    missing = [tool for tool in DAEMONS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"SLURM/munge not installed ({', '.join(missing)} missing): apt-get install slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.skip("scripts/slurm_local.sh runs the SLURM daemons as root; this is not root")
    env = dict(os.environ, LVFACE_SLURM_DIR=str(tmp_path_factory.mktemp("slurm")))
    up = subprocess.run(["bash", "scripts/slurm_local.sh", "up"], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=120)
    try:
        if up.returncode != 0:
            pytest.skip(f"a local SLURM could not be started here: {up.stderr.strip()[-800:]}")
        yield up.stdout.strip().split("=", 1)[1]
    finally:
        subprocess.run(["bash", "scripts/slurm_local.sh", "down"], cwd=REPO, env=env, capture_output=True, timeout=120)


def _scontrol(conf: str, *args: str) -> str:
    done = subprocess.run(["scontrol", *args], env=dict(os.environ, SLURM_CONF=conf), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _job(conf: str, job_id: str) -> dict[str, str]:
    fields = _scontrol(conf, "show", "job", "-o", job_id).split()
    return dict(field.split("=", 1) for field in fields if "=" in field)


def _wait(what: str, test, log: Path, ended=None, timeout: float = 900):
    """test()'s first true value, polled every second; fails at once when ended() (the job is over)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = test()
        if value:
            return value
        if ended is not None and ended():
            raise AssertionError(f"the job ended before {what}: {ended()}; job log:\n{_read(log)[-5000:]}")
        time.sleep(1)
    raise AssertionError(f"{what} not seen in {timeout:.0f} s; job log:\n{_read(log)[-5000:]}")


def _read(log: Path) -> str:
    return log.read_text(errors="replace") if log.exists() else "(no log yet)"


def _steps_since(log: Path, requeues: int) -> bool:
    """Whether the start after `requeues` requeues has logged a training step."""
    text = _read(log)
    parts = text.split("requeueing job")
    return len(parts) == requeues + 1 and re.search(r"\] INFO lvface\.train: step \d+/", parts[-1]) is not None


def _start_now_when_requeued(conf: str, job_id: str, restarts: int, log: Path) -> None:
    """Wait for the requeue, then let the job start at once: slurmctld holds a requeued job for about
    two minutes before it is eligible again."""
    def requeued() -> bool:
        job = _job(conf, job_id)
        return job["Restarts"] == str(restarts) and job["JobState"] == "PENDING"

    _wait(f"requeue #{restarts}", requeued, log, lambda: _ended(conf, job_id))
    _scontrol(conf, "update", f"JobId={job_id}", "StartTime=now")


def _ended(conf: str, job_id: str) -> dict[str, str] | None:
    job = _job(conf, job_id)
    return None if job["JobState"] in ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING", "REQUEUED") else job


def _tasks_exited_75(text: str) -> int:
    """Tasks that srun reports as exited with 75 ("task 1: ..." or, together, "tasks 0-1: ...")."""
    count = 0
    for tasks in re.findall(r"^srun: error: \S+: tasks? ([\d,-]+): Exited with exit code 75$", text, re.M):
        for part in tasks.split(","):
            first, _, last = part.partition("-")
            count += int(last or first) - int(first) + 1
    return count


def test_output_file_needs_no_folder_of_a_fresh_checkout():
    """slurmd opens --output before the script runs: a folder in it must come with the checkout."""
    pattern = re.search(r"^#SBATCH --output=(\S+)$", (REPO / SCRIPT).read_text(), re.M).group(1)
    folder = os.path.dirname(pattern)
    tracked = subprocess.run(["git", "ls-files", "--", folder], cwd=REPO, capture_output=True, text=True).stdout
    assert folder == "" or "%" not in folder and tracked, pattern


def test_two_usr1_preemptions_requeue_resume_and_complete(slurm, tmp_path):
    out = tmp_path / "run"
    overrides = tiny_overrides(tiny_data(), **{"train.max_steps": str(MAX_STEPS), "checkpoint.resume": "auto",
                                               "train.output_dir": str(out)})
    env = run_env(SLURM_CONF=slurm, CONFIG="configs/demo.yaml")
    env["MASTER_PORT"] = str(free_port())  # run_env drops MASTER_PORT; the script's default is 29500
    submit = subprocess.run(["sbatch", "--parsable", "--job-name=lvface-requeue", *ONE_NODE,
                             f"--output={tmp_path}/%x-%j.out", SCRIPT, *overrides],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert submit.returncode == 0, submit.stderr
    job_id = submit.stdout.strip().split(";")[0]
    log = tmp_path / f"lvface-requeue-{job_id}.out"
    started = time.monotonic()
    try:
        # 1: what --signal=USR1@600 sends: every task of the step
        ended = lambda: _ended(slurm, job_id)  # noqa: E731
        _wait("a training step", lambda: _steps_since(log, 0), log, ended)
        subprocess.run(["scancel", "--signal=USR1", job_id], env=env, check=True, timeout=120)
        _start_now_when_requeued(slurm, job_id, 1, log)
        # 2: scancel --full: the batch shell too, which must live on to requeue
        _wait("a training step after the first requeue", lambda: _steps_since(log, 1), log, ended)
        subprocess.run(["scancel", "--signal=USR1", "--full", job_id], env=env, check=True, timeout=120)
        _start_now_when_requeued(slurm, job_id, 2, log)
        job = _wait("the end of the job", ended, log)
    finally:
        subprocess.run(["scancel", job_id], env=env, capture_output=True, timeout=120)
    text = _read(log)
    print(f"job {job_id}: {job['JobState']} after {time.monotonic() - started:.0f} s, Restarts={job['Restarts']}")
    assert (job["JobState"], job["Restarts"], job["ExitCode"]) == ("COMPLETED", "2", "0:0"), text[-5000:]
    # SLURM's own record of each end of the job: two requeues, then the completion
    ends = [line for line in (Path(slurm).parent / "jobcomp.txt").read_text().splitlines()
            if line.startswith(f"JobId={job_id} ")]
    assert [re.search(r"JobState=(\S+)", line).group(1) for line in ends] == ["PENDING", "PENDING", "COMPLETED"]
    # both ranks saved and exited 75 both times (none killed), and the script requeued on the marker
    assert _tasks_exited_75(text) == 4 and "Terminated" not in text, text[-5000:]
    saved = re.findall(r"\[rank0\] WARNING lvface\.train: preemption save: (\S+) written after step (\d+)", text)
    assert len(saved) == 2 and text.count(f"requeueing job {job_id}") == 2
    # each start resumed from the checkpoint the previous one saved, and the run finished all steps
    resumed = re.findall(r"\[rank0\] INFO lvface\.checkpoint\.manager: resumed from (\S+)", text)
    assert resumed == [folder for folder, _ in saved], (resumed, saved)
    assert int(saved[0][1]) < int(saved[1][1]) < MAX_STEPS
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == MAX_STEPS and not (out / "PREEMPTED").exists()
    import pyarrow.parquet as pq

    table = pq.read_table(out / "metrics.parquet").to_pydict()
    steps = [step for step, loss in zip(table["step"], table["loss"]) if loss is not None]
    assert sorted(steps) == list(range(1, MAX_STEPS + 1))  # every step once: none lost, none repeated
