"""Goodput: `lvface report` on a real run that was preempted (SIGTERM) and resumed splits the wall
time into training, checkpoint stalls, evaluation, restarts, skipped steps, data waits and the rest, and
the parts add up to the wall time; every rank exports the same kinds as Prometheus counters."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import pytest

from run_utils import REPO, run_env, scraped_run, tiny_data, tiny_overrides


def _train(run, *extra: str) -> subprocess.Popen:
    data = tiny_data()
    cmd = [sys.executable, "-m", "lvface.train", "--config", str(REPO / "configs" / "demo.yaml"),
           *tiny_overrides(data, **{"train.max_steps": "10", "train.output_dir": str(run),
                                    "checkpoint.every_steps": "2", "eval.bins": f"[{data / 'val.bin'}]",
                                    "eval.every_steps": "4", "eval.batch_size": "50"}), *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def preempted_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("report") / "run"
    launched = time.time()
    first = _train(run)
    out = ""
    for line in first.stdout:  # stop it once step 5 is logged (after a save and an evaluation)
        out += line
        if re.search(r"step 5/10 ", line):
            first.send_signal(signal.SIGTERM)
            break
    out += first.stdout.read()
    assert first.wait(timeout=300) == 75, out[-4000:]
    between = time.time()
    second = _train(run, "checkpoint.resume=auto")
    out2 = second.communicate(timeout=600)[0]
    assert second.returncode == 0, out2[-4000:]
    return {"run": run, "launched": launched, "between": between, "ended": time.time(), "log": out + out2}


def test_report_of_a_preempted_and_resumed_run_adds_up_to_the_wall_time(preempted_run):
    from lvface.events import read_events
    from lvface.report import KINDS, goodput

    run = preempted_run["run"]
    events = read_events(run)
    figures = goodput(events)
    parts = figures["seconds"]
    assert sorted(parts) == sorted(KINDS)
    assert sum(parts.values()) == pytest.approx(figures["wall_s"], abs=1e-6)
    # the wall time lies inside what the test saw: from before the first launch to after the last exit
    starts = [e["t"] for e in events if e["kind"] == "start"]
    assert len(starts) == 2 and preempted_run["launched"] - 1 <= starts[0] and starts[1] >= preempted_run["between"] - 1
    assert figures["wall_s"] <= preempted_run["ended"] - preempted_run["launched"] + 1
    assert figures["processes"] == 2 and figures["stops"] == ["preempted", "done"]
    # the restart covers both start-ups and the time between the processes
    assert parts["restart"] >= starts[1] - max(e["t"] for e in events if e["t"] < starts[1])
    for kind in ("training", "data_wait", "checkpoint", "evaluation", "restart"):
        assert parts[kind] > 0, (kind, parts)
    assert parts["skipped_steps"] == 0 and abs(parts["other"]) < 0.2 * figures["wall_s"], parts
    # every step of both processes is in a window: 5 (or 6) before the stop, then on to 10 from the resume
    resumed_from = [e["step"] for e in events if e["kind"] == "start"][1]
    stop_step = [e["step"] for e in events if e["kind"] == "stop"][0]
    assert sum(e["steps"] for e in events if e["kind"] == "steps") == stop_step + (10 - resumed_from)
    saves = [e for e in events if e["kind"] == "save"]
    assert len(saves) >= 5 and all(e["seconds"] > 0 for e in saves)  # steps 2, 4, the stop, 6 or 8, 10


def test_report_command_prints_the_split(preempted_run):
    proc = subprocess.run([sys.executable, "-m", "lvface.cli", "report", str(preempted_run["run"])], cwd=REPO,
                          env=run_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for kind in ("wall time", "training", "checkpoint", "evaluation", "restart", "data_wait", "skipped_steps"):
        assert re.search(rf"^  {kind} +\d", proc.stdout, re.M), proc.stdout
    as_json = subprocess.run([sys.executable, "-m", "lvface.cli", "report", str(preempted_run["run"]), "--json"],
                             cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=120)
    assert json.loads(as_json.stdout)["processes"] == 2
    missing = subprocess.run([sys.executable, "-m", "lvface.cli", "report", str(preempted_run["run"] / "nope")],
                             cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "no event log" in missing.stderr


def test_goodput_counters_are_exported_by_every_rank():
    run = scraped_run()
    for local in (0, 1):
        last = run.scrapes[local][-1]
        for kind in ("training", "data_wait", "restart"):
            value = re.search(rf'^lvface_goodput_seconds_total{{kind="{kind}",local_rank="{local}",rank="{local}"}} '
                              rf'(\S+)$', last, re.M)
            assert value and float(value.group(1)) > 0, (kind, last[-3000:])
