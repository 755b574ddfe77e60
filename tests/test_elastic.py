"""Elastic restart: two torchrun "nodes" on this machine (launch/elastic.sh, one rank each,
--nnodes 1:2); one node is lost (kill -9 of its agent and its worker, as when a machine dies), and the
other node's agent restarts its worker, which resumes from `latest` on one rank and finishes the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil

from run_utils import REPO, free_port, run_env, tiny_data, tiny_overrides

MAX_STEPS = 12


def _node(run, endpoint: str, host: bool, log) -> subprocess.Popen:
    env = run_env(NNODES="1:2", NPROC_PER_NODE="1", RDZV_ENDPOINT=endpoint, RDZV_ID="lvface-elastic-test",
                  MAX_RESTARTS="2", RDZV_CONF=f"is_host={int(host)},last_call_timeout=10", PYTHON=sys.executable)
    args = tiny_overrides(tiny_data(), **{"train.max_steps": str(MAX_STEPS), "train.output_dir": str(run),
                                          "checkpoint.every_steps": "2", "train.collective_timeout_s": "60"})
    return subprocess.Popen(["bash", str(REPO / "launch" / "elastic.sh"), "--config", "configs/demo.yaml", *args],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _events(run) -> list[dict]:
    from lvface.events import read_events

    return read_events(run) if (run / "events.jsonl").is_file() else []


def test_a_lost_node_restarts_on_the_survivor_and_resumes_from_latest(tmp_path):
    run = tmp_path / "run"
    endpoint = f"127.0.0.1:{free_port()}"
    logs = [open(tmp_path / f"node{n}.txt", "w") for n in (0, 1)]
    survivor, lost = _node(run, endpoint, True, logs[0]), _node(run, endpoint, False, logs[1])
    try:
        deadline = time.monotonic() + 400
        while max([e["step"] for e in _events(run) if e["kind"] == "steps"], default=0) < 5:  # saved at 2, 4
            assert time.monotonic() < deadline and survivor.poll() is None and lost.poll() is None, \
                (tmp_path / "node0.txt").read_text()[-3000:] + (tmp_path / "node1.txt").read_text()[-3000:]
            time.sleep(0.5)
        node = psutil.Process(lost.pid)  # the node: its torchrun agent and its worker (in its own session)
        for process in [node, *node.children(recursive=True)]:
            process.kill()
        killed = time.time()
        assert survivor.wait(timeout=600) == 0, (tmp_path / "node0.txt").read_text()[-5000:]
    finally:
        for proc in (survivor, lost):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    text = (tmp_path / "node0.txt").read_text()
    assert "resuming a 2-rank checkpoint on 1 ranks" in text, text[-5000:]
    events = _events(run)
    starts = [e for e in events if e["kind"] == "start"]
    assert [s["world_size"] for s in starts] == [2, 1], starts
    before = [e["step"] for e in events if e["kind"] == "steps" and e["t"] < killed]
    assert 2 * 32 <= starts[1]["samples"] <= max(before) * 32  # from a checkpoint of the lost world
    first_new = min(e["t"] for e in events if e["kind"] == "steps" and e["t"] > starts[1]["t"])
    print(f"\nlost node -> first new step: {first_new - killed:.1f} s (new process started "
          f"{starts[1]['t'] - killed:.1f} s after the loss)")
    stop = [e for e in events if e["kind"] == "stop"]
    assert [s["reason"] for s in stop] == ["done"]
    latest = (run / "checkpoints" / "latest").read_text()
    state = json.loads((run / "checkpoints" / latest / "train_state.json").read_text())
    assert state["samples_seen"] == MAX_STEPS * 32 and state["world_size"] == 1


def test_elastic_dry_run_prints_the_torchrun_command():
    env = run_env(LVFACE_DRY_RUN="1", NNODES="4:8", NPROC_PER_NODE="8", RDZV_ENDPOINT="node01:29400")
    proc = subprocess.run(["bash", str(REPO / "launch" / "elastic.sh"), "--config", "configs/lvface_vit_l_wf42m.yaml"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "# python3 -m torch.distributed.run --nnodes 4:8 --nproc_per_node 8 --max-restarts 3 --rdzv_backend c10d "
        "--rdzv_endpoint node01:29400 --rdzv_id lvface -m lvface.train --ds_config configs/zero2.json "
        "checkpoint.resume=auto --config configs/lvface_vit_l_wf42m.yaml"]
