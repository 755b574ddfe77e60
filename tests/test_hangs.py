"""Hangs that name their rank: a SIGSTOPped rank of a real 2-rank torchrun run is named, with
its last step, in the other rank's error, and the live rank's stacks are in the run folder; a slow rank
of 2 real gloo ranks is named a straggler."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import psutil

from dist_utils import run_on_ranks
from run_utils import REPO, free_port, run_env, tiny_data, tiny_overrides, wait_for_log


_wait_for = wait_for_log


def _workers(agent: subprocess.Popen) -> dict[int, psutil.Process]:
    """torchrun's workers by rank (read from their environment)."""
    found = {}
    for child in psutil.Process(agent.pid).children():
        rank = child.environ().get("RANK")
        if rank is not None:
            found[int(rank)] = child
    assert sorted(found) == [0, 1], found
    return found


def test_stopped_rank_is_named_with_its_last_step_and_stacks_are_written(tmp_path):
    run = tmp_path / "run"
    log = tmp_path / "log.txt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "lvface.train", "--config", str(REPO / "configs" / "demo.yaml"),
           *tiny_overrides(tiny_data(), **{"train.max_steps": "400", "train.output_dir": str(run),
                                           "train.collective_timeout_s": "20", "train.hang_dump_fraction": "0.25"})]
    agent = subprocess.Popen(cmd, cwd=REPO, env=run_env(), stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        _wait_for(log, r"step 3/", agent)
        workers = _workers(agent)
        workers[1].send_signal(signal.SIGSTOP)
        workers[0].wait(timeout=120)
    finally:
        for worker in psutil.Process(agent.pid).children():
            worker.send_signal(signal.SIGKILL)
            worker.send_signal(signal.SIGCONT)
        agent.wait(timeout=120)
    text = log.read_text()
    logged = max(int(n) for n in re.findall(r"step (\d+)/400", text))
    named = re.search(r"Ranks that did not arrive: rank 1 \(last step finished: (\d+), \d+ s ago\); "
                      r"waiting: rank 0 \(last step finished: (\d+)", text)
    assert named, text[-4000:]
    # rank 1 finished the last step rank 0 logged, perhaps one more (stopped before that step's log line)
    assert logged <= int(named.group(1)) <= logged + 1 and named.group(1) == named.group(2), text[-4000:]
    assert "train.collective_timeout_s=20" in text and str(run / "stacks") in text
    stacks = (run / "stacks" / "rank0.txt").read_text()
    assert stacks.startswith("rank 0 of 2") and f"last step finished: {named.group(2)}" in stacks
    assert "Current thread" in stacks and "lvface/train.py" in stacks


def _slow_rank(rank, world_size, group, slow_rank, intervals):
    import torch
    import torch.distributed as dist

    from lvface.metrics import TrainMetrics
    from lvface.watchdog import StragglerWatch

    metrics = TrainMetrics()
    watch = StragglerWatch(metrics, rank, world_size, group, ratio=1.5, patience=3)
    named = []
    for _ in range(intervals):
        for _ in range(2):
            with metrics.timer("data_wait"):
                time.sleep(0.3 if rank == slow_rank else 0.0)
            with metrics.timer("head_collective"):  # the others wait here for the slow rank
                dist.all_reduce(torch.ones(1), group=group)
            metrics.step_done()
        named.append(watch.check(metrics.steps))
    return named


def test_a_slow_rank_is_named_a_straggler_after_three_intervals():
    for named in run_on_ranks(_slow_rank, 2, 1, 5, timeout=120):
        # never before the third interval (patience 3), never the fast rank; a busy machine may delay the
        # naming by an interval (a stalled fast rank's own time can reach the slow one's), not prevent it
        assert named[:2] == [None, None] and 0 not in named and named[-1] == 1, named


def test_watchdog_names_the_rank_behind_and_the_one_whose_watchdog_did_not_answer(tmp_path):
    """Rank 0 of 4 on a real TCPStore: rank 1 is marked waiting by its own watchdog (written here as it
    would), rank 2 is a step behind, rank 3 never started; rank 0's watchdog dumps its stacks and reads them."""
    from datetime import timedelta

    import torch.distributed as dist

    from lvface.watchdog import HEARTBEAT_KEY, STALLED_KEY, Heartbeat

    store = dist.TCPStore("127.0.0.1", free_port(), is_master=True, timeout=timedelta(seconds=10))
    beat = Heartbeat(store, 0, 4, tmp_path, dump_after_s=0.3)  # rank 3 never set its keys
    try:
        now = time.time()
        store.set(HEARTBEAT_KEY + "1", f"5 {now}")
        store.set(STALLED_KEY + "1", f"5 {now}")
        store.set(HEARTBEAT_KEY + "2", f"4 {now - 3}")
        store.set(STALLED_KEY + "2", f"3 {now - 30}")  # from an earlier stall: not this one
        beat.beat(5)
        deadline = time.monotonic() + 30
        while beat.readings is None and time.monotonic() < deadline:
            time.sleep(0.1)
        text = beat.describe()
    finally:
        beat.close()
    assert re.search(r"Ranks that did not arrive: rank 2 \(last step finished: 4, \d+ s ago\), rank 3 \(no step "
                     r"finished\); waiting: "
                     r"rank 0 \(last step finished: 5, \d+ s ago\), rank 1 \(last step finished: 5", text), text
    assert store.get(STALLED_KEY + "0").decode().split()[0] == "5"
    # a collective that fails at once (a peer's connection closed) before any stall: the heartbeats alone
    quick = Heartbeat(store, 1, 4, None, dump_after_s=0)
    quick.beat(5)
    assert re.fullmatch(r" Last step each rank finished: rank 0 \(last step finished: 5, \d+ s ago\), rank 1 "
                        r"\(last step finished: 5, \d+ s ago\), rank 2 \(last step finished: 4, \d+ s ago\), "
                        r"rank 3 \(no step finished\)\. Behind the others: rank 2, rank 3\.", quick.describe())
    stacks = (tmp_path / "stacks" / "rank0.txt").read_text()
    assert "no step finished for 0.3 s; last step finished: 5" in stacks and "test_hangs.py" in stacks


def test_flight_recorder_is_on_by_default_and_a_users_setting_wins(tmp_path):
    """init_distributed in a fresh process of its own: the flight recorder's variables are set before the
    process group exists, into the run folder; one the user set (under torch's deprecated name too) is kept."""
    script = ("import json, os, sys\n"
              "from lvface.distributed import init_distributed\n"
              "info = init_distributed(30, sys.argv[1])\n"
              "print(json.dumps({k: v for k, v in os.environ.items() if k.startswith('TORCH_')}))\n")
    env = run_env(TORCH_NCCL_TRACE_BUFFER_SIZE="5")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "run")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1" and seen["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "2"
    assert seen["TORCH_FR_DUMP_TEMP_FILE"] == str(tmp_path / "run" / "nccl_trace" / "rank")
    assert seen["TORCH_NCCL_TRACE_BUFFER_SIZE"] == "5" and "TORCH_FR_BUFFER_SIZE" not in seen
