"""Faults a multi-day run meets, tried with real processes on the demo config.

The launches share one tiny synthetic data set (40 identities x 8 images, 3 of them corrupt JPEGs that
the default DALI loader has to skip) and are as short as the claim allows: a straight 2-rank run of 8
steps, and the same run preempted three times (SIGUSR1 to rank 1, SIGTERM to the `deepspeed` runner,
SIGTERM to rank 0) and resumed each time, whose losses must equal the straight run's exactly.
Everything that does not need a training process (locks, manifests, the Prometheus port, the
non-finite step on 2 gloo ranks) is tested in this process or the shared rank pool.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from dist_utils import run_on_ranks
from run_utils import run_env as _env, wait_for_log
from lvface.checkpoint.files import TRAIN_STATE_FILE, read_latest
from lvface.distributed import free_port
from lvface.run_folder import RunFolder

REPO = Path(__file__).resolve().parent.parent
MAX_STEPS = 12
CORRUPT = (3, 50, 170)  # image indices whose entropy-coded data is wiped (markers intact)


def _common(data: Path, *extra: str) -> list[str]:
    return ["--config", str(REPO / "configs" / "demo.yaml"), f"data.rec={data / 'train.rec'}", "data.batch_size=16",
            "eval.bins=[]", "train.log_every=1", f"train.max_steps={MAX_STEPS}", *extra]


def _deepspeed(data: Path, out: Path, log: Path, *extra: str, port: int | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
           str(port or free_port()), str(REPO / "lvface" / "train.py"), "--ds_config", str(REPO / "configs" / "zero2.json"),
           *_common(data, f"train.output_dir={out}", *extra)]
    return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _single(data: Path, out: Path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lvface.train", *_common(data, f"train.output_dir={out}", *extra)]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def _wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    wait_for_log(log, re.escape(text), proc, timeout)


def _ranks(proc: subprocess.Popen) -> dict[int, psutil.Process]:
    """The training processes under a deepspeed runner, by local rank."""
    found = {}
    for launch in psutil.Process(proc.pid).children():  # deepspeed.launcher.launch
        for child in launch.children():  # the ranks (not their own helper processes)
            local = [arg.split("=", 1)[1] for arg in child.cmdline() if arg.startswith("--local_rank=")]
            found[int(local[0])] = child
    assert sorted(found) == [0, 1], found
    return found


def _losses(out: Path) -> dict[int, float]:
    import pyarrow.parquet as pq

    table = pq.read_table(RunFolder(out).metrics).to_pydict()
    steps = [s for s, loss in zip(table["step"], table["loss"]) if loss is not None]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {s: loss for s, loss in zip(table["step"], table["loss"]) if loss is not None}


def _shm_buffers(port: int) -> list[str]:
    return [p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*")]


# --------------------------------------------------------------------------------------------------
# shared runs
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from lvface.data.index import RecordIndex
    from lvface.data.synthetic import write_synthetic_dataset

    out = tmp_path_factory.mktemp("faults") / "data"
    write_synthetic_dataset(out, num_identities=40, images_per_identity=8, val_identities=10, val_pairs=40, seed=0)
    index = RecordIndex.open(out / "train.rec", cache=False)
    raw = bytearray((out / "train.rec").read_bytes())
    for item in CORRUPT:
        start = int(index.rows[item]["offset"]) + int(index.rows[item]["skip"])
        raw[start + 300:start + 900] = bytes(600)
    (out / "train.rec").write_bytes(bytes(raw))
    for cache in out.glob("*.npy"):
        cache.unlink()
    return out


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    """8 steps in one go on 2 DeepSpeed ranks (checkpoints every 2 steps, 2 kept). A buffer of a dead
    DeepSpeed run is planted in /dev/shm first."""
    dead = Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_1_0"
    dead.write_bytes(b"\0" * 4096)
    os.utime(dead, (time.time() - 3600, time.time() - 3600))
    out = tmp_path_factory.mktemp("straight") / "run"
    port = free_port()
    proc = _deepspeed(data, out, out.parent / "log.txt", "checkpoint.every_steps=2", "checkpoint.keep_last=2",
                      port=port)
    assert proc.wait(timeout=400) == 0, (out.parent / "log.txt").read_text()[-5000:]
    return {"out": out, "port": port, "dead_buffer": dead, "log": (out.parent / "log.txt").read_text()}


@pytest.fixture(scope="module")
def preempted(data, tmp_path_factory):
    """The straight run stopped three times and resumed (checkpoint.resume=auto) each time:
    SIGUSR1 to rank 1, SIGTERM to the deepspeed runner (a second run tries the folder meanwhile),
    SIGTERM to rank 0."""
    out = tmp_path_factory.mktemp("preempted") / "run"
    result = {"out": out, "segments": []}
    for number, how in enumerate(("usr1_rank1", "term_runner", "term_rank0")):
        log = out.parent / f"log{number}.txt"
        port = free_port()
        extra = ["checkpoint.every_steps=2"] + (["checkpoint.resume=auto"] if number else [])
        proc = _deepspeed(data, out, log, *extra, port=port)
        done = max(_losses(out)) if number else 0
        _wait_for(log, f"step {done + 1}/{MAX_STEPS}", proc)
        ranks = _ranks(proc)
        # every process under the runner: the ranks, deepspeed.launcher.launch (which logs the ranks' exit
        # code) and their helpers. When the runner itself is the one killed, proc.wait() returns at once,
        # while launch.py still runs and has yet to write its last lines: the log is read after all exit.
        tree = psutil.Process(proc.pid).children(recursive=True)
        segment = {"how": how, "port": port, "log": log}
        if how == "usr1_rank1":
            ranks[1].send_signal(signal.SIGUSR1)
        elif how == "term_rank0":
            ranks[0].send_signal(signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)  # the runner: deepspeed.launcher.runner has no handler
        segment["rc"] = proc.wait(timeout=300)
        _, alive = psutil.wait_procs(tree, timeout=120)
        segment["orphans"] = [p.pid for p in alive]
        for process in alive:
            process.kill()
        segment["text"] = log.read_text()
        result["segments"].append(segment)
    return result


# --------------------------------------------------------------------------------------------------
# preemption, orphans, shared memory, the folder
# --------------------------------------------------------------------------------------------------


def test_preemption_saves_exits_75_and_resume_continues_exactly(straight, preempted):
    segments = preempted["segments"]
    assert [s["rc"] for s in segments[::2]] == [75, 75], [s["text"][-3000:] for s in segments]
    for segment in segments:  # every rank saved and stopped (the launcher logs the first non-zero code)
        for rank in (0, 1):
            assert f"[rank{rank}] WARNING lvface: stopped by" in segment["text"], segment["text"][-3000:]
        assert "preemption save" in segment["text"] and "exits with return code = 75" in segment["text"]
    assert "stopped by SIGUSR1" in segments[0]["text"] and "stopped by SIGTERM" in segments[2]["text"]
    out = preempted["out"]
    assert RunFolder(out).preempted.is_file()
    straight_losses, resumed = _losses(straight["out"]), _losses(out)
    last = max(resumed)
    assert 3 <= last < MAX_STEPS and sorted(resumed) == list(range(1, last + 1))
    # bit-identical: the same data, order, optimizers, schedule and sampling counter after each resume
    assert resumed == {step: straight_losses[step] for step in resumed}
    state = json.loads((RunFolder(out).checkpoints / read_latest(RunFolder(out).checkpoints) / TRAIN_STATE_FILE).read_text())
    assert state["step"] == last and state["samples_seen"] == last * 32


def test_sigterm_to_the_deepspeed_runner_leaves_no_orphan(preempted):
    segment = preempted["segments"][1]
    assert segment["orphans"] == []
    assert "the launcher process" in segment["text"]  # the ranks saw their launcher go, saved, and exited 75
    # the first rank whose watcher sees the runner gone stops by SIGTERM; the other may stop with it at the
    # same step boundary ("a stop request of another rank") before its own watcher fires (1 s polls)
    assert "WARNING lvface: stopped by SIGTERM" in segment["text"], segment["text"][-3000:]
    for rank in (0, 1):
        assert f"[rank{rank}] WARNING lvface: stopped by" in segment["text"]


def test_lock_is_released_on_every_way_out(preempted):
    assert not RunFolder(preempted["out"]).lock.exists()  # after preemptions, also a dead launcher


def test_shared_memory_buffers_are_not_left_behind(straight, preempted):
    assert not straight["dead_buffer"].exists()  # a dead run's buffer, removed at start
    for port in [straight["port"]] + [s["port"] for s in preempted["segments"]]:
        assert _shm_buffers(port) == []  # own buffers, also after preemption


def test_fresh_run_in_a_folder_of_another_run_is_refused(data, straight):
    before = sorted(p.name for p in RunFolder(straight["out"]).checkpoints.iterdir())
    proc = _single(data, straight["out"], "train.seed=7")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "checkpoint.resume=auto" in proc.stderr and "train.output_dir" in proc.stderr
    assert sorted(p.name for p in RunFolder(straight["out"]).checkpoints.iterdir()) == before


def test_keep_last_prunes_only_this_runs_checkpoints(tmp_path):
    from lvface.checkpoint.manager import prune_checkpoints, tag_for
    from lvface.checkpoint.manifest import MANIFEST, manifest_text

    root = tmp_path / "checkpoints"
    for run, samples in (("old", 64), ("old", 128), ("new", 32), ("new", 96), ("new", 160)):
        folder = root / tag_for(samples)
        folder.mkdir(parents=True)
        (folder / MANIFEST).write_text(manifest_text({}, {"run_id": run}))
    assert prune_checkpoints(root, 1, "new", keep=tag_for(160)) == [tag_for(32), tag_for(96)]
    assert sorted(p.name for p in root.iterdir()) == [tag_for(64), tag_for(128), tag_for(160)]
    assert prune_checkpoints(root, 1, "old", keep=tag_for(64)) == []  # never the one just written


def test_stale_lock_is_reported_and_a_live_one_refused(tmp_path, caplog):
    from lvface.run_folder import LOCK_NAME
    from lvface.run_lock import OutputFolderLocked, OutputLock

    sleeper = subprocess.Popen(["sleep", "30"])
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": sleeper.pid,
                                                  "start_time": time.time(), "job": None}))
    with pytest.raises(OutputFolderLocked, match=f"pid {sleeper.pid}"):
        OutputLock(tmp_path).acquire()
    sleeper.kill()
    sleeper.wait()
    with caplog.at_level(logging.WARNING, logger="lvface.run_lock"):
        lock = OutputLock(tmp_path)
        lock.acquire()
    assert "stale lock" in caplog.text and str(sleeper.pid) in caplog.text
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


# --------------------------------------------------------------------------------------------------
# damaged checkpoints, world-size change, disk full
# --------------------------------------------------------------------------------------------------


def test_damaged_latest_checkpoint_falls_back_and_eval_export_refuse(straight, tmp_path, caplog):
    from lvface.checkpoint.manager import resume_candidates, select_checkpoint
    from lvface.checkpoint.manifest import CheckpointCorrupt
    from lvface.checkpoint.files import load_backbone

    run = tmp_path / "run"
    shutil.copytree(RunFolder(straight["out"]).checkpoints, RunFolder(run).checkpoints)
    root = RunFolder(run).checkpoints
    latest = read_latest(root)
    previous = sorted(p.name for p in root.iterdir() if p.name.startswith("samples"))[-2]
    shard = root / latest / "head_shard_00001_of_00002.pt"
    shard.write_bytes(shard.read_bytes()[:1000])  # truncated
    with caplog.at_level(logging.WARNING, logger="lvface.checkpoint.manager"):
        chosen = select_checkpoint(*resume_candidates("auto", run), rank=0, world_size=1, group=None)
    assert chosen == (root, previous)
    assert str(shard) in caplog.text and "truncated" in caplog.text

    backbone = root / previous / "backbone.pt"
    raw = bytearray(backbone.read_bytes())
    raw[len(raw) // 2] ^= 0x10  # one flipped bit in a weight
    backbone.write_bytes(bytes(raw))
    with pytest.raises(CheckpointCorrupt, match="backbone.pt"):
        load_backbone(root / previous, "vit_demo")  # what `lvface eval` and `lvface export` read
    with pytest.raises(CheckpointCorrupt, match="no intact checkpoint"):
        select_checkpoint(*resume_candidates("auto", run), rank=0, world_size=1, group=None)


def _tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip()}): the disk-full case needs one")


def test_world_size_change_and_disk_full(data, straight, tmp_path):
    """The 2-rank checkpoint resumed by one process: a stale universal conversion of another checkpoint
    of the same name is not used, max_steps keeps its meaning (in samples of the 2-rank batch), new
    tags do not collide; then the disk fills up during the second save."""
    from lvface.checkpoint.manifest import check_files

    source_root = RunFolder(straight["out"]).checkpoints
    source = read_latest(source_root)
    samples = json.loads((source_root / source / "train_state.json").read_text())["samples_seen"]
    assert samples == MAX_STEPS * 32
    universal = source_root / "universal"
    for stale in (universal / source / "zero", universal / f"{source}-0123456789abcdef" / source / "zero"):
        stale.mkdir(parents=True)  # an earlier run's conversion: must not be reused
    out = tmp_path / "small"
    _tmpfs(out, "60m")  # room for one 1-rank checkpoint (37 MB), not two
    try:
        proc = _single(data, out, f"checkpoint.resume={source_root / source}", "checkpoint.every_steps=1",
                       f"train.max_steps={MAX_STEPS + 2}")
        tags = sorted(p.name for p in RunFolder(out).checkpoints.iterdir() if p.name.startswith("samples"))
        latest = read_latest(RunFolder(out).checkpoints)
        intact = check_files(RunFolder(out).checkpoints / latest)
        leftovers = [p.name for p in RunFolder(out).checkpoints.iterdir() if p.name.startswith(".")]
    finally:
        subprocess.run(["umount", str(out)], check=False)
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert "resuming a 2-rank checkpoint on 1 ranks" in proc.stderr
    # the first write that meets the full disk names its file in the run folder (a checkpoint, or the
    # metrics log flushed at every progress line) and the reason, in one line
    error = proc.stderr.split("lvface: error:")[-1]
    assert "no space left on device" in error.lower() and str(out) in error, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr.split("lvface: error:")[-1]
    assert tags == [latest] == [f"samples{samples + 16:012d}"]  # one 16-sample step later
    assert intact == [] and leftovers == []
    assert check_files(source_root / source) == []  # the source checkpoint is untouched


# --------------------------------------------------------------------------------------------------
# hung rank
# --------------------------------------------------------------------------------------------------


def test_second_run_on_a_busy_folder_and_a_stopped_rank(data, tmp_path):
    """While a run trains, a second run on its folder is refused; then a rank of the first is stopped
    (SIGSTOP) and the other exits within train.collective_timeout_s with an error naming it."""
    log = tmp_path / "log.txt"
    proc = _deepspeed(data, tmp_path / "run", log, "train.collective_timeout_s=10", "train.max_steps=400")
    _wait_for(log, "step 1/", proc)
    second = _single(data, tmp_path / "run", "checkpoint.resume=auto", timeout=200)
    assert proc.poll() is None, "the first run ended before the second one tried its folder"
    assert second.returncode == 2, second.stderr[-3000:]
    assert "is in use by another run" in second.stderr and "pid" in second.stderr
    assert "Traceback" not in second.stderr
    ranks = _ranks(proc)
    ranks[1].send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        ranks[0].wait(timeout=90)
        waited = time.monotonic() - stopped
    finally:
        ranks[1].send_signal(signal.SIGKILL)
        ranks[1].send_signal(signal.SIGCONT)
        proc.wait(timeout=120)
    text = log.read_text()
    assert waited < 60, text[-3000:]
    assert "train.collective_timeout_s=10" in text, text[-3000:]
    assert proc.returncode != 0


# --------------------------------------------------------------------------------------------------
# non-finite steps (2 gloo ranks, the real engine and head)
# --------------------------------------------------------------------------------------------------


def _nonfinite_steps(rank, world_size, group, checkpoint_dir):
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world_size))
    from lvface.checkpoint.manager import CheckpointSaveError, save_checkpoint
    from lvface.config import from_dict
    from lvface.engine import NonFiniteSteps, NonFiniteTraining, train_step
    from step_probe import tiny_engine_and_head

    cfg = from_dict({"data": {"batch_size": 4}, "train": {"grad_clip": 0.0, "precision": "fp32"},
                     "loss": {"stages": [{"name": "s", "end_epoch": 1, "sample_rate": 1.0, "centers": "both",
                                          "prototype_weight": 0.5}]}})
    engine, head, head_optimizer = tiny_engine_and_head(cfg, world_size, group)
    generator = torch.Generator().manual_seed(rank)

    def next_batch():
        return torch.randn(4, 3, 112, 112, generator=generator), torch.randint(0, 12, (4,), generator=generator)

    def snapshot():
        return {"backbone": {k: v.clone() for k, v in engine.module.state_dict().items()},
                "head": head.weight.detach().clone(), "prototypes": head.prototypes.clone(),
                "exp_avg": head_optimizer.exp_avg.clone(), "row_steps": head_optimizer.row_steps.clone()}

    def changed(a, b) -> list[str]:
        names = [k for k in a["backbone"] if not torch.equal(a["backbone"][k], b["backbone"][k])]
        names += [k for k in ("prototypes", "exp_avg", "row_steps") if not torch.equal(a[k], b[k])]
        return names + ([] if torch.equal(torch.nan_to_num(a["head"]), torch.nan_to_num(b["head"])) else ["head"])

    results = {"first": train_step(engine, head, head_optimizer, next_batch, accumulation=1, group=group).skipped}
    good = snapshot()
    if rank == 1:  # NaN in a row of the head's weights, on one rank only
        with torch.no_grad():
            head.weight[2] = float("nan")
    poisoned = snapshot()
    counter = NonFiniteSteps(limit=2)
    step = train_step(engine, head, head_optimizer, next_batch, accumulation=1, group=group)
    counter.record(2, step.skipped)
    results["skipped"] = step.skipped
    results["changed"] = changed(poisoned, snapshot())
    results["deepspeed_skipped"] = engine.skipped_steps
    try:
        save_checkpoint(Path(checkpoint_dir), "samples000000000001", engine=engine, head=head,
                        head_optimizer=head_optimizer, config_yaml="", train_state={"run_id": "r", "samples_seen": 1},
                        zero_stage=2, rank=rank, world_size=world_size, group=group)
        results["saved"] = True
    except CheckpointSaveError as exc:
        results["saved"] = str(exc)
    step = train_step(engine, head, head_optimizer, next_batch, accumulation=1, group=group)
    try:
        counter.record(3, step.skipped)
        results["stopped"] = None
    except NonFiniteTraining as exc:
        results["stopped"] = str(exc)
    with torch.no_grad():
        head.weight.copy_(good["head"])
    results["recovered"] = not train_step(engine, head, head_optimizer, next_batch, accumulation=1,
                                          group=group).skipped
    results["moved"] = bool(changed(good, snapshot()))
    return results


def test_nonfinite_step_is_skipped_on_every_rank(tmp_path):
    results = run_on_ranks(_nonfinite_steps, 2, str(tmp_path / "checkpoints"), timeout=300)
    for rank, result in enumerate(results):
        assert result["first"] is False
        assert result["skipped"] is True, rank  # rank 0's rows are finite: it skips too
        assert result["changed"] == [], rank  # backbone, head rows, moments, prototypes: nothing applied
        assert result["deepspeed_skipped"] == 1, rank  # DeepSpeed's own skip agreed
        assert "non-finite values in head.weight" in result["saved"], rank
        assert "train.max_nonfinite_steps=2" in result["stopped"], rank
        assert result["recovered"] and result["moved"], rank
    assert not (tmp_path / "checkpoints" / "samples000000000001").exists()


# --------------------------------------------------------------------------------------------------
# corrupt JPEGs, Prometheus port
# --------------------------------------------------------------------------------------------------


def test_corrupt_jpegs_dali_counts_like_torch(data, straight):
    from lvface.config import from_dict
    from lvface.data.loader import build_train_loader

    counts = {}
    for name in ("dali", "torch"):
        cfg = from_dict({"data": {"rec": str(data / "train.rec"), "batch_size": 16, "num_workers": 0,
                                  "loader": name}}).data
        loader = build_train_loader(cfg, rank=0, world_size=1, seed=3, device=torch.device("cpu"))
        labels = [label for _, batch in loader for label in batch.tolist()]
        loader.close()
        counts[name] = (loader.bad_records, labels)
    assert counts["dali"] == counts["torch"]
    assert counts["dali"][0] == len(CORRUPT)
    # the 2-rank training run with the default (DALI) loader skipped and counted them too
    import pyarrow.parquet as pq

    assert "DaliTrainLoader" in straight["log"] or "dali loader" in straight["log"]
    assert max(pq.read_table(RunFolder(straight["out"]).metrics).to_pydict()["bad_records"]) >= 1


def test_prometheus_port_in_use_names_the_port_and_the_key():
    from lvface.config import ConfigError
    from lvface.metrics import TrainMetrics

    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match=f"port {port} \\(metrics.prometheus_port={port}"):
            TrainMetrics(port, rank=0, local_rank=0)
