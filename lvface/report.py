"""`lvface report RUN_DIR`: where the wall time of a run went, across every restart.

    lvface report runs/lvface            # a table
    lvface report runs/lvface --json     # the same figures as JSON

Read from the run's event log (<output_dir>/events.jsonl, lvface/events.py). The wall time runs from the
first process's start to the last event. Each process (from its `start` event to its last event) is
split as follows, so that the kinds add up to the wall time by construction:
- restart: start-up to the first step (`start` to `ready`), less the saves and evaluations in it, plus
  the time between the previous process's last event and this start (the launcher or scheduler
  restarting the job; for a killed process also the steps it took after its last log line);
- checkpoint, evaluation: the `save` and `eval` events' durations;
- data_wait, skipped_steps, training: the step windows' own figures (skipped_steps: whole steps that
  were skipped; training: the rest of the steps' time);
- other: what is left between `ready` and the last event: the bookkeeping between steps that no step's
  clock covers, and the end of the run after its last save.
Steps re-taken after a resume (those after the checkpoint that was resumed) count as training again.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lvface.events import read_events
from lvface.metrics import GOODPUT_KINDS, format_duration

KINDS = GOODPUT_KINDS + ("other",)


def _attempts(events: list[dict]) -> list[list[dict]]:
    attempts: list[list[dict]] = []
    for event in events:
        if event["kind"] == "start" or not attempts:
            attempts.append([])
        attempts[-1].append(event)
    return attempts


def _split_attempt(attempt: list[dict], totals: dict[str, float]) -> None:
    """Add one process's time, from its start to its last event, to `totals`."""
    start, end = attempt[0]["t"], max(event["t"] for event in attempt)
    ready = next((event["t"] for event in attempt if event["kind"] == "ready"), end)
    before_ready = after_ready = 0.0
    for event in attempt:
        if event["kind"] in ("save", "eval"):
            kind = "checkpoint" if event["kind"] == "save" else "evaluation"
            totals[kind] += event["seconds"]
            if event["t"] < ready:
                before_ready += event["seconds"]
            else:
                after_ready += event["seconds"]
    restart = max(ready - start - before_ready, 0.0)
    totals["restart"] += restart
    stepped = 0.0
    for event in attempt:
        if event["kind"] == "steps":
            for kind in ("training", "data_wait", "skipped_steps"):
                totals[kind] += event[f"{kind}_s"]
                stepped += event[f"{kind}_s"]
    # the rest of the process's span; below zero only by clock noise (durations are perf_counter's)
    totals["other"] += (end - start) - restart - before_ready - after_ready - stepped


def goodput(events: list[dict]) -> dict:
    """{'wall_s', 'seconds': {kind: s}, 'processes', 'stops', 'first_step', 'last_step'} of a run's events."""
    attempts = _attempts(events)
    if not attempts or attempts[0][0]["kind"] != "start":
        raise ValueError("the event log does not begin with a 'start' event: it is not an lvface train event log")
    totals = dict.fromkeys(KINDS, 0.0)
    previous_end = None
    for attempt in attempts:
        if previous_end is not None:
            totals["restart"] += attempt[0]["t"] - previous_end
        _split_attempt(attempt, totals)
        previous_end = max(event["t"] for event in attempt)
    steps = [event["step"] for event in events if event["kind"] in ("steps", "stop")]
    return {"wall_s": previous_end - attempts[0][0]["t"], "seconds": totals, "processes": len(attempts),
            "stops": [next((e.get("reason") for e in a if e["kind"] == "stop"), "killed") for a in attempts],
            "first_step": attempts[0][0].get("step", 0), "last_step": max(steps, default=None)}


def format_report(run_dir: str | Path, figures: dict) -> str:
    wall = figures["wall_s"]
    lines = [f"{run_dir}: {figures['processes']} process(es) ({', '.join(figures['stops'])}), steps "
             f"{figures['first_step']} to {figures['last_step']}",
             f"  {'wall time':<15}{format_duration(wall):>10}  {wall:12.1f} s  100.0 %"]
    for kind, seconds in figures["seconds"].items():
        share = 100 * seconds / wall if wall > 0 else 0.0
        lines.append(f"  {kind:<15}{format_duration(seconds):>10}  {seconds:12.1f} s  {share:5.1f} %")
    lines.append(f"  (the kinds add up to {sum(figures['seconds'].values()):.1f} s)")
    return "\n".join(lines)


def _report(args: argparse.Namespace) -> int:
    figures = goodput(read_events(args.run_dir))
    print(json.dumps(figures, indent=1) if args.json else format_report(args.run_dir, figures))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("report", help="where a run's wall time went: training, checkpoints, evaluation, "
                                                  "restarts, skipped steps, data waits (from its events.jsonl)")
    parser.add_argument("run_dir", help="the run's train.output_dir")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.set_defaults(func=_report)
