"""Background checkpoints (issue 17): the snapshot's files against DeepSpeed's own, and a writer process
killed or a run preempted while a write is in flight, with real training processes and signals.

The training runs are the demo config on 2 DeepSpeed ranks (gloo), checkpoints every 2 steps. A write
is held in flight by stopping (SIGSTOP) one rank's writer process, found from the pid each rank logs.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import psutil
import pytest
import torch

from dist_utils import run_on_ranks
from run_utils import run_env
from lvface.checkpoint.files import read_latest
from lvface.checkpoint.manifest import check_files
from lvface.distributed import free_port
from lvface.run_folder import RunFolder

REPO = Path(__file__).resolve().parent.parent
SAMPLES_PER_STEP = 32  # 2 ranks x data.batch_size=16


def tag(step: int) -> str:
    return f"samples{step * SAMPLES_PER_STEP:012d}"


# --------------------------------------------------------------------------------------------------
# the snapshot's files against DeepSpeed's (1 gloo rank)
# --------------------------------------------------------------------------------------------------


def _capture_and_deepspeed(rank, world_size, group, out):
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world_size))
    from lvface.checkpoint.manager import capture_checkpoint
    from lvface.checkpoint.writer import BufferPool, Capture, write_files
    from lvface.config import from_dict
    from lvface.engine import train_step
    from step_probe import tiny_engine_and_head

    cfg = from_dict({"data": {"batch_size": 4}, "train": {"precision": "fp32"}})
    engine, head, head_optimizer = tiny_engine_and_head(cfg, world_size, group)
    batch = torch.randn(4, 3, 112, 112), torch.randint(0, 12, (4,))
    train_step(engine, head, head_optimizer, lambda: batch, accumulation=1, group=group)
    out = Path(out)
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

    train_state = {"run_id": "r", "samples_seen": 4}
    engine.save_checkpoint(str(out / "deepspeed"), tag="t", save_latest=False,  # DeepSpeed's own writer
                           client_state={"lvface": train_state, UNIVERSAL_CHECKPOINT_INFO: {}})
    before = {"head": head.weight.detach().clone(), "backbone": {k: v.clone() for k, v in engine.module.state_dict().items()}}
    staging = out / "lvface" / "t"
    capture = Capture(BufferPool(shared=False))
    capture_checkpoint(capture, out / "lvface", staging, engine=engine, head=head, head_optimizer=head_optimizer,
                       config_yaml="", train_state=train_state, zero_stage=2, rank=0)
    train_step(engine, head, head_optimizer, lambda: batch, accumulation=1, group=group)  # the run goes on
    with torch.no_grad():
        head.weight.add_(1.0)
    digests = write_files(str(staging), capture.jobs, capture.pool.buffers)  # after the tensors changed
    return {"digests": digests, "before": before}


def _records(path: Path) -> dict[str, bytes]:
    """A torch zip file's records without the archive's folder name (the file's stem, or 'archive') and
    without `.data/serialization_id` (unique to every torch.save)."""
    with zipfile.ZipFile(path) as archive:
        records = {name.split("/", 1)[1]: archive.read(name) for name in archive.namelist()}
    records.pop(".data/serialization_id")
    return records


def test_snapshot_files_hold_deepspeeds_records_and_the_state_at_the_snapshot(tmp_path):
    result = run_on_ranks(_capture_and_deepspeed, 1, str(tmp_path), timeout=300)[0]
    ours, theirs = tmp_path / "lvface" / "t", tmp_path / "deepspeed" / "t"
    deepspeed_files = sorted(p.name for p in theirs.iterdir())
    assert deepspeed_files == ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    for name in deepspeed_files:  # every record (pickle, storages) byte for byte
        assert _records(ours / name) == _records(theirs / name), name
    # DeepSpeed drops its recovery scripts beside the tags; the snapshot keeps them in the tag folder
    assert (tmp_path / "deepspeed" / "zero_to_fp32.py").is_file()
    assert (ours / "zero_to_fp32.py").read_bytes() == (tmp_path / "deepspeed" / "zero_to_fp32.py").read_bytes()
    assert not (tmp_path / "lvface" / "zero_to_fp32.py").exists()
    # the digests are those of the bytes on disk
    assert set(result["digests"]) == {p.name for p in ours.iterdir()}
    for name, described in result["digests"].items():
        data = (ours / name).read_bytes()
        assert described == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    # written after the step went on and the weights changed: the files hold the snapshot's values
    shard = torch.load(ours / "head_shard_00000_of_00001.pt", weights_only=True)
    assert torch.equal(shard["weight"], result["before"]["head"])
    saved = torch.load(ours / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    for key, value in result["before"]["backbone"].items():
        assert torch.equal(saved[key], value), key


def _nan_snapshot(rank, world_size, group, out):
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world_size))
    from lvface.checkpoint.manager import capture_checkpoint
    from lvface.checkpoint.writer import BufferPool, Capture, NonFiniteSnapshot, write_files
    from lvface.config import from_dict
    from step_probe import tiny_engine_and_head

    cfg = from_dict({"data": {"batch_size": 4}, "train": {"precision": "fp32"}})
    engine, head, head_optimizer = tiny_engine_and_head(cfg, world_size, group)
    with torch.no_grad():
        head.weight[3, 1] = float("nan")
        head_optimizer.exp_avg_sq[5, 0] = float("inf")
    staging = Path(out) / "t"
    capture = Capture(BufferPool(shared=False))
    capture_checkpoint(capture, Path(out), staging, engine=engine, head=head, head_optimizer=head_optimizer,
                       config_yaml="", train_state={"run_id": "r", "samples_seen": 4}, zero_stage=2, rank=0)
    try:
        write_files(str(staging), capture.jobs, capture.pool.buffers, check_finite=True)
    except NonFiniteSnapshot as exc:
        return {"error": str(exc), "written": sorted(p.name for p in staging.iterdir()) if staging.is_dir() else []}
    return {"error": None}


def test_the_writer_refuses_a_snapshot_holding_nan_and_names_the_tensors(tmp_path):
    """A background save's NaN/Inf check runs in the writer, on the copy it writes: a poisoned head row
    and optimizer moment are named, and the head shard is not written."""
    result = run_on_ranks(_nan_snapshot, 1, str(tmp_path), timeout=300)[0]
    assert result["error"] == "head_shard_00000_of_00001.pt holds non-finite values (NaN/Inf) in weight, exp_avg_sq"
    assert "head_shard_00000_of_00001.pt" not in result["written"]


# --------------------------------------------------------------------------------------------------
# real training runs
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from lvface.data.synthetic import write_synthetic_dataset

    out = tmp_path_factory.mktemp("async") / "data"
    write_synthetic_dataset(out, num_identities=40, images_per_identity=8, val_identities=10, val_pairs=40, seed=0)
    return out


def _launch(data: Path, out: Path, log: Path, max_steps: int, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           str(REPO / "lvface" / "train.py"), "--ds_config", str(REPO / "configs" / "zero2.json"),
           "--config", str(REPO / "configs" / "demo.yaml"), f"data.rec={data / 'train.rec'}", "data.batch_size=16",
           "eval.bins=[]", "train.log_every=1", f"train.max_steps={max_steps}", f"train.output_dir={out}",
           "checkpoint.every_steps=2", *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=run_env(LVFACE_ALL_RANKS_LOG="1"), stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)


def _wait_for(log: Path, pattern: str, proc: subprocess.Popen, timeout: float = 300, after: str = "") -> re.Match:
    """The first match of `pattern` in the log (past the first occurrence of `after`), waiting for it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text()
        found = re.search(pattern, text[text.index(after):] if after in text else "")
        if found:
            return found
        if proc.poll() is not None:
            raise AssertionError(f"exited ({proc.returncode}) before {pattern!r}:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)
    raise AssertionError(f"{pattern!r} not seen in {timeout} s:\n{log.read_text()[-4000:]}")


def _writer_pid(log: Path, rank: int, proc: subprocess.Popen) -> int:
    return int(_wait_for(log, rf"\[rank{rank}\] INFO .*checkpoint writer process (\d+) started", proc).group(1))


def _losses(log: Path) -> dict[int, str]:
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"\[rank0\] INFO lvface\.train: step (\d+)/\d+ .* loss (\S+)",
                                                          log.read_text())}


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_killed_writer_leaves_latest_and_the_run_resumes_exactly(data, tmp_path):
    """Rank 1's writer is held, then killed (SIGKILL) with a save in flight: the run fails on every rank
    naming the writer, `latest` still names the last committed checkpoint, intact, and a resume from it
    logs the same losses as the failed run for the steps both ran.

    Which save the stop catches is up to the scheduler: a writer stopped just after it answered still
    lets that save commit. So the committed one is read from rank 0's log, and the test asserts that
    nothing past it reached the disk."""
    out, log = tmp_path / "run", tmp_path / "log.txt"
    proc = _launch(data, out, log, 10)
    writer = _writer_pid(log, 1, proc)
    committed = f"{tag(2)} written in the background"
    _wait_for(log, committed, proc)
    os.kill(writer, signal.SIGSTOP)
    _wait_for(log, r"is due while (samples\d+) is still being written: waiting", proc, after=committed)
    os.kill(writer, signal.SIGKILL)
    assert proc.wait(timeout=300) != 0
    text = log.read_text()
    assert f"the checkpoint writer process (pid {writer}) died with exit code -9" in text, text[-4000:]
    root = RunFolder(out).checkpoints
    commits = re.findall(r"\[rank0\] INFO .*checkpoint \S+/(samples\d+) written in the background", text)
    snapshots = re.findall(r"\[rank0\] INFO .*checkpoint (samples\d+) is due while", text)
    latest = read_latest(root)
    assert commits and latest == commits[-1] and latest >= tag(2)
    assert check_files(root / latest) == []
    assert snapshots and max(snapshots) > latest  # a later save was due when the writer died ...
    tags = sorted(p.name for p in root.iterdir() if p.name.startswith("samples"))
    assert tags[-1] == latest  # ... and none of it is on disk: no folder past `latest`, no staging folder
    assert not [p for p in root.iterdir() if p.name.startswith(".")]
    assert not list(root.glob("zero_to_*.py"))

    resumed_log = tmp_path / "resumed.txt"
    resumed = _launch(data, out, resumed_log, 10, "checkpoint.resume=auto")
    assert resumed.wait(timeout=400) == 0, resumed_log.read_text()[-4000:]
    assert f"resumed from {root / latest}" in resumed_log.read_text()
    first, second = _losses(log), _losses(resumed_log)
    both = sorted(set(first) & set(second))
    assert both and both[0] == int(latest[len("samples"):]) // SAMPLES_PER_STEP + 1
    assert {s: first[s] for s in both} == {s: second[s] for s in both}


def test_sigterm_during_a_background_write_commits_both_and_exits_75(data, tmp_path):
    """SIGTERM to rank 0 while rank 1's writer still holds a save: the preemption save waits for it
    (released a moment later), writes and commits its own checkpoint, and the run exits 75 with
    `latest` naming it and every file matching the manifest; no writer process is left.

    Rank 1's writer is stopped as soon as it starts, before the first save at step 2: that save cannot
    finish, so it is still in flight at the preemption, whatever the scheduler does."""
    out, log = tmp_path / "run", tmp_path / "log.txt"
    proc = _launch(data, out, log, 12, "checkpoint.keep_last=0")  # every checkpoint kept, to check each
    writers = [_writer_pid(log, rank, proc) for rank in (0, 1)]
    os.kill(writers[1], signal.SIGSTOP)
    _wait_for(log, r"\[rank0\] INFO lvface\.train: step 3/12", proc)
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.pid not in writers
             and any(arg.startswith("--local_rank=0") for arg in p.cmdline())]
    ranks[0].send_signal(signal.SIGTERM)
    held = _wait_for(log, r"\[rank0\] INFO .*is due while (samples\d+) is still being written: waiting", proc).group(1)
    assert held == tag(2)
    time.sleep(1.0)
    os.kill(writers[1], signal.SIGCONT)
    assert proc.wait(timeout=300) == 75, log.read_text()[-4000:]
    text = log.read_text()
    stopped = int(re.search(r"preemption save: \S+ written after step (\d+)", text).group(1))
    root = RunFolder(out).checkpoints
    assert read_latest(root) == tag(stopped)
    assert check_files(root / tag(stopped)) == [] and check_files(root / held) == []
    assert RunFolder(out).preempted.read_text().strip() == str(root / tag(stopped))
    assert all(_gone(pid) for pid in writers)
