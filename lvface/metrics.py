"""Training metrics: the progress line, Prometheus metrics of every rank, and a Parquet log of every logged step.

The progress line and the Parquet log are rank 0's. Every rank serves its Prometheus metrics on
`metrics.prometheus_port + local_rank` (one exporter per process, so no multi-process collector is
needed), labelled `rank` and `local_rank` only -- never a step number, which would create a new time
series per step. The names follow the Prometheus conventions: counters end in `_total`, durations are
histograms in `_seconds`, sizes are `_bytes`. `METRICS` below is the one list of what lvface exports;
launch/grafana/lvface.json queries only these (tests/test_dashboard.py checks it).

Scraping (one target per rank): a Prometheus `scrape_configs` entry for an 8-GPU node with
metrics.prometheus_port 9400 lists host:9400 ... host:9407; on Kubernetes, launch/k8s/podmonitor.yaml
does the same through the Prometheus Operator. See launch/README.md.

The training loop uses a small API (`TrainMetrics`):

    with metrics.timer("data_wait"):        # a phase of the current step (summed over micro-batches)
        images, labels = next(batches)
    metrics.count("images", n)              # a counter
    metrics.step_done()                     # observe the step's phases and the step time
    metrics.set(loss=..., lr=...)           # gauges
"""

from __future__ import annotations

import collections
import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lvface.config import ConfigError
from lvface.files import atomic_open

log = logging.getLogger(__name__)

PREFIX = "lvface_"
LABELS = ("rank", "local_rank")

# Histogram buckets: steps and their phases from 1 ms to ~2 min; checkpoint saves from 0.1 s to ~1.5 h.
_STEP_BUCKETS = tuple(0.001 * 2.0**k for k in range(18)) + (float("inf"),)
_SAVE_BUCKETS = tuple(0.1 * 2.0**k for k in range(16)) + (float("inf"),)


@dataclass(frozen=True)
class Metric:
    name: str
    """Name without the lvface_ prefix and without the _total suffix prometheus_client adds to counters."""
    kind: str
    """counter, histogram or gauge."""
    doc: str
    per_step: bool = False
    """A histogram of a phase of the training step: `timer` sums it over the step's micro-batches and
    `step_done` observes the sum once."""
    buckets: tuple[float, ...] = _STEP_BUCKETS
    extra_labels: tuple[str, ...] = ()


METRICS: tuple[Metric, ...] = (
    # counters (exported as lvface_<name>_total)
    Metric("images", "counter", "Training images this rank has consumed"),
    Metric("steps", "counter", "Optimizer steps this rank has taken"),
    Metric("skipped_steps", "counter", "Optimizer steps skipped because the loss or a gradient was not finite"),
    Metric("bad_records", "counter", "Training records of this rank skipped because they failed to decode"),
    Metric("checkpoints", "counter", "Checkpoints written (this rank's part)"),
    Metric("preemption_saves", "counter", "Checkpoints written because the job was told to stop (SIGTERM/SIGUSR1)"),
    Metric("goodput_seconds", "counter",
           "Wall time of this process by what it went to (kind: training, data_wait, skipped_steps, checkpoint, "
           "evaluation, restart = start-up to the first step); lvface report adds the time between processes",
           extra_labels=("kind",)),
    # histograms
    Metric("step_seconds", "histogram", "Wall time of one optimizer step, all micro-batches included"),
    Metric("data_wait_seconds", "histogram", "Time a step waited for its batches from the loader", per_step=True),
    Metric("backbone_seconds", "histogram",
           "Backbone forward + backward of a step (backward includes DeepSpeed's gradient reduction)", per_step=True),
    Metric("head_seconds", "histogram",
           "Margin-softmax head forward + backward of a step, its collectives included", per_step=True),
    Metric("head_collective_seconds", "histogram",
           "Time inside the head's collectives (embedding all-gather, reduce-scatter, O(N) all-reduces)",
           per_step=True),
    Metric("optimizer_seconds", "histogram",
           "Both optimizers' steps (ZeRO's parameter all-gather included) and the prototype update", per_step=True),
    Metric("checkpoint_save_seconds", "histogram", "Wall time of writing one checkpoint", buckets=_SAVE_BUCKETS),
    Metric("evaluation_seconds", "histogram", "Wall time of one verification round during training",
           buckets=_SAVE_BUCKETS),
    # gauges
    Metric("loss", "gauge", "Mean training loss over the steps since the last log line (all ranks)"),
    Metric("lr", "gauge", "Learning rate of the backbone (the head follows the same schedule)"),
    Metric("stage", "gauge", "Index of the current training stage in loss.stages"),
    Metric("grad_norm", "gauge", "Global gradient norm of the backbone before clipping (DeepSpeed's)"),
    Metric("epoch", "gauge", "Fractional epoch"),
    Metric("step", "gauge", "Optimizer steps taken since the run began (resumes continue it)"),
    Metric("memory_peak_bytes", "gauge",
           "Peak memory of this rank: torch.cuda.max_memory_allocated on a GPU, the peak RSS (VmHWM) on the CPU"),
    Metric("verification_accuracy", "gauge", "Last 10-fold verification accuracy of a set", extra_labels=("set",)),
    Metric("straggler_rank", "gauge",
           "Rank whose own step time (without waiting for the others) stayed above the others' for several log "
           "intervals; -1 when none (lvface/watchdog.py)"),
    Metric("straggler_ratio", "gauge", "Own step time of the slowest rank over the median of the others, last log interval"),
)
GOODPUT_KINDS = ("training", "data_wait", "skipped_steps", "checkpoint", "evaluation", "restart")
"""What a process's wall time goes to (lvface_goodput_seconds_total's kind label; lvface report)."""
_GOODPUT_OF_TIMER = {"checkpoint_save": ("checkpoint", "save"), "evaluation": ("evaluation", "eval")}
_BY_NAME = {metric.name: metric for metric in METRICS}
PHASES = tuple(metric.name[: -len("_seconds")] for metric in METRICS if metric.per_step)


def _metric(name: str, kind: str) -> Metric:
    key = name if kind == "counter" else name + "_seconds" if kind == "histogram" else name
    metric = _BY_NAME.get(key)
    if metric is None or metric.kind != kind:
        known = sorted(m.name for m in METRICS if m.kind == kind)
        raise KeyError(f"lvface exports no {kind} {name!r}; add it to lvface.metrics.METRICS (known: {known})")
    return metric


def build_registry():
    """A prometheus_client CollectorRegistry holding every lvface metric; (registry, {name: collector})."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    registry = CollectorRegistry()
    collectors = {}
    for metric in METRICS:
        labels = LABELS + metric.extra_labels
        full = PREFIX + metric.name
        if metric.kind == "counter":
            collectors[metric.name] = Counter(full, metric.doc, labels, registry=registry)
        elif metric.kind == "histogram":
            collectors[metric.name] = Histogram(full, metric.doc, labels, registry=registry, buckets=metric.buckets)
        else:
            collectors[metric.name] = Gauge(full, metric.doc, labels, registry=registry)
    return registry, collectors


def exported_sample_names() -> set[str]:
    """Every sample name a scrape of lvface can show (lvface_images_total, lvface_step_seconds_bucket, ...),
    read from a registry built from METRICS; what a dashboard may query."""
    registry, collectors = build_registry()
    for metric in METRICS:  # a labelled collector shows no samples until it has a child
        labels = dict.fromkeys(LABELS + metric.extra_labels, "0")
        collectors[metric.name].labels(**labels)
    return {sample.name for family in registry.collect() for sample in family.samples}


def proc_status_bytes(field: str) -> int | None:
    """A memory line of /proc/self/status (VmRSS, VmHWM) in bytes: this process only (not the pages of a
    parent, which ru_maxrss carries across a spawn's exec); None where there is no such file or line."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_memory_bytes(device: torch.device) -> int:
    """torch.cuda.max_memory_allocated on a CUDA device; this process's peak RSS (VmHWM) otherwise."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = proc_status_bytes("VmHWM")
    if peak is not None:
        return peak
    import resource  # not Linux: ru_maxrss (KiB on Linux-likes, bytes on macOS; good enough there)

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class TrainMetrics:
    """The metrics of one rank: Prometheus collectors served on `port + local_rank` when port > 0, and
    in-process totals of the step phases (what benchmarks/bench_step.py reads) either way.

    On CUDA, `device_timing=True` times the device phases (backbone, head, optimizer) with CUDA events
    recorded on the current stream at each phase's edges - a phase's time is its GPU work, not its
    launch - and never synchronises: a finished step's events are read when the device has passed
    them (Event.query, which does not wait), usually at the next step_done, so the exporter's figures
    lag a step behind and the step itself keeps its CPU/GPU overlap. data_wait (the host waiting for
    the loader) and the step's wall time stay wall-clock; on the CPU every phase is wall-clock.
    """

    def __init__(self, port: int = 0, rank: int = 0, local_rank: int = 0, device: torch.device | None = None,
                 device_timing: bool = False):
        self.enabled = port > 0
        self.device = device or torch.device("cpu")
        self.device_timing = device_timing and self.device.type == "cuda"
        self.labels = {"rank": str(rank), "local_rank": str(local_rank)}
        self.pending = dict.fromkeys(PHASES, 0.0)
        """Seconds of each phase in the step under way (the wall-clock phases; device phases as events)."""
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []  # (phase, start, end) this step
        self._in_flight: collections.deque[tuple[dict, float, list]] = collections.deque()  # steps to read
        self.totals = dict.fromkeys(PHASES + ("step",), 0.0)
        """Seconds of each phase (and of whole steps) summed over all finished steps."""
        self.steps = 0
        self.recent: collections.deque[dict] = collections.deque(maxlen=1000)
        """Seconds of each phase and of the step, per step, for the last 1000 steps (benchmarks/bench_step.py)."""
        self.last_step_end = time.perf_counter()
        self._counter_totals: dict[str, float] = {}
        self.events = None
        """An lvface.events.EventLog (rank 0's; set by the trainer) for saves, evaluations and step windows."""
        self.goodput = dict.fromkeys(GOODPUT_KINDS, 0.0)
        """Seconds of this process by kind (lvface_goodput_seconds_total)."""
        self.window = dict.fromkeys(("training", "data_wait", "skipped_steps"), 0.0) | {"steps": 0}
        """The same for the steps since the last `record_window`."""
        self.port = port + local_rank if self.enabled else 0
        if not self.enabled:
            return
        from prometheus_client import start_http_server

        self.registry, collectors = build_registry()
        self.children = {name: c.labels(**self.labels) for name, c in collectors.items() if not _BY_NAME[name].extra_labels}
        self.collectors = collectors
        try:
            start_http_server(self.port, registry=self.registry)
        except OSError as exc:
            raise ConfigError(f"the Prometheus exporter of rank {rank} cannot listen on port {self.port} "
                              f"(metrics.prometheus_port={port} + local rank {local_rank}): {exc.strerror or exc}; "
                              f"choose another metrics.prometheus_port, or 0 to disable the exporter") from None
        log.info("Prometheus metrics on port %d", self.port)

    # ---- time
    def _event(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    @contextlib.contextmanager
    def timer(self, name: str):
        """Time the block: a step phase (data_wait, backbone, head, optimizer) is added to the step under
        way; any other histogram (checkpoint_save) is observed at once."""
        metric = _metric(name, "histogram")
        if self.device_timing and metric.per_step and name != "data_wait":
            start_event = self._event()
            try:
                yield
            finally:
                self._events.append((name, start_event, self._event()))
            return
        start, wall_start = time.perf_counter(), time.time()
        try:
            yield
        finally:
            seconds = time.perf_counter() - start
            self._add(metric, seconds)
            if name in _GOODPUT_OF_TIMER:
                kind, event = _GOODPUT_OF_TIMER[name]
                self.add_goodput(kind, seconds)
                if self.events is not None:
                    self.events.record(event, t=wall_start, seconds=round(seconds, 3))

    def _add(self, metric: Metric, seconds: float) -> None:
        name = metric.name[: -len("_seconds")]
        if metric.per_step:
            self.pending[name] += seconds
        elif self.enabled:
            self.children[metric.name].observe(seconds)

    @contextlib.contextmanager
    def backward_timer(self, embeddings: torch.Tensor):
        """Time a backward pass through head and backbone, split where the gradient reaches `embeddings`
        (the backbone's output): before that is the head's backward, after it the backbone's."""
        clock = self._event if self.device_timing else time.perf_counter
        boundary = []
        handle = embeddings.register_hook(lambda grad: boundary.append(clock()))
        start = clock()
        try:
            yield
        finally:
            end = clock()
            handle.remove()
            split = boundary[0] if boundary else end
            if self.device_timing:
                self._events += [("head", start, split), ("backbone", split, end)]
            else:
                self.pending["head"] += split - start
                self.pending["backbone"] += end - split

    def step_done(self, skipped: bool = False) -> None:
        """Close the step: observe its phases, its wall time since the last step_done, and the head's
        collective time (read from the head's own clock); count the step. A `skipped` step's whole time
        is goodput kind skipped_steps. With device timing the phases are observed once the device has
        passed their events (this call or a later one; `summary` waits)."""
        from lvface.heads.sharded_softmax import take_collective_seconds

        now = time.perf_counter()
        self.pending["head_collective"] += take_collective_seconds()
        step_seconds = now - self.last_step_end
        self.last_step_end = now
        wait = self.pending["data_wait"]  # wall clock, known now (the device phases may not be yet)
        for kind, seconds in ((("skipped_steps", step_seconds),) if skipped else
                              (("data_wait", wait), ("training", step_seconds - wait))):
            self.add_goodput(kind, seconds)
            self.window[kind] += seconds
        self.window["steps"] += 1
        self._in_flight.append((self.pending, step_seconds, self._events))
        self.pending, self._events = dict.fromkeys(PHASES, 0.0), []
        self._observe_finished(wait=False)

    def _observe_finished(self, wait: bool) -> None:
        """Observe the steps whose events the device has passed, in order (all of them when `wait`)."""
        while self._in_flight:
            pending, step_seconds, events = self._in_flight[0]
            if events and not wait and not events[-1][2].query():
                return  # the device is still on it: read at a later step_done
            for name, start, end in events:
                if wait:
                    end.synchronize()
                pending[name] += start.elapsed_time(end) / 1000.0
            self._in_flight.popleft()
            self._observe(pending, step_seconds)

    def _observe(self, pending: dict, step_seconds: float) -> None:
        self.steps += 1
        self.totals["step"] += step_seconds
        for name, seconds in pending.items():
            self.totals[name] += seconds
        self.recent.append({"step": step_seconds, **pending})
        if self.enabled:
            self.children["step_seconds"].observe(step_seconds)
            for name, seconds in pending.items():
                self.children[name + "_seconds"].observe(seconds)
            self.children["steps"].inc()

    # ---- goodput (lvface/report.py adds up the event log)
    def add_goodput(self, kind: str, seconds: float) -> None:
        self.goodput[kind] += seconds
        if self.enabled and seconds > 0:
            self.collectors["goodput_seconds"].labels(kind=kind, **self.labels).inc(seconds)

    def loop_started(self, step: int) -> None:
        """Start-up is over: count it as goodput kind restart (less the saves and evaluations in it), log the
        `ready` event, and start the first step's clock here."""
        from lvface.events import process_start_time

        start = process_start_time()
        done = self.goodput["checkpoint"] + self.goodput["evaluation"]
        self.add_goodput("restart", max(time.time() - start - done, 0.0))
        if self.events is not None:
            self.events.record("ready", step=step)
        self.restart_step_clock()

    def record_window(self, step: int) -> None:
        """At a log line: the event log's `steps` record of the steps since the last one."""
        if self.events is not None and self.window["steps"]:
            self.events.record("steps", step=step, steps=self.window["steps"],
                               **{f"{kind}_s": round(self.window[kind], 4) for kind in ("training", "data_wait",
                                                                                         "skipped_steps")})
        self.window = dict.fromkeys(self.window, 0.0) | {"steps": 0}

    def run_ended(self, reason: str, step: int) -> None:
        """The last window and the `stop` event (reason: done, preempted)."""
        self.record_window(step)
        if self.events is not None:
            self.events.record("stop", reason=reason, step=step)

    def restart_step_clock(self) -> None:
        """Start the next step's wall clock now (after an evaluation or a checkpoint between steps)."""
        from lvface.heads.sharded_softmax import take_collective_seconds

        take_collective_seconds()
        self.last_step_end = time.perf_counter()

    # ---- counters and gauges
    def count(self, name: str, amount: float = 1) -> None:
        """Add `amount` to counter `name` (images, skipped_steps, checkpoints, preemption_saves, ...)."""
        metric = _metric(name, "counter")
        if self.enabled and amount:
            self.children[metric.name].inc(amount)

    def count_to(self, name: str, total: float) -> None:
        """Advance counter `name` to `total` (for totals kept elsewhere, like the loader's bad records)."""
        previous = self._counter_totals.get(name, 0.0)
        if total > previous:
            self.count(name, total - previous)
            self._counter_totals[name] = total

    def set(self, **values: float | None) -> None:
        """Set gauges by name; None leaves a gauge as it is. memory_peak_bytes is set by `set_memory`."""
        for name, value in values.items():
            metric = _metric(name, "gauge")
            if self.enabled and value is not None:
                self.children[metric.name].set(float(value))

    def set_memory(self) -> int:
        peak = peak_memory_bytes(self.device)
        self.set(memory_peak_bytes=peak)
        return peak

    def verification(self, name: str, accuracy: float) -> None:
        if self.enabled:
            self.collectors["verification_accuracy"].labels(set=name, **self.labels).set(accuracy)

    def summary(self) -> dict:
        """Mean seconds per step of the step time and of every phase over the finished steps (waits for
        the device to finish the steps still in flight: call it after training, not per step)."""
        self._observe_finished(wait=True)
        steps = max(self.steps, 1)
        return {f"{name}_s": seconds / steps for name, seconds in self.totals.items()} | {"steps": self.steps}


def format_duration(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class Throughput:
    """Images per second over the window since the last call, and an ETA from the average since start."""

    def __init__(self, images_per_step: int, total_steps: int, start_step: int = 0):
        self.images_per_step = images_per_step
        self.total_steps = total_steps
        self.start_step = start_step
        self.start_time = self.last_time = time.perf_counter()
        self.last_step = start_step

    def tick(self, step: int) -> tuple[float, float]:
        now = time.perf_counter()
        window = max(now - self.last_time, 1e-9)
        images_per_s = (step - self.last_step) * self.images_per_step / window
        done = step - self.start_step
        eta = (now - self.start_time) / done * (self.total_steps - step) if done > 0 else float("nan")
        self.last_time, self.last_step = now, step
        return images_per_s, eta


class ParquetLog:
    """Rows of logged metrics, rewritten atomically as one Parquet file at each flush."""

    def __init__(self, path: str | Path, enabled: bool, keep_existing: bool = False):
        """`keep_existing`: start from the rows already in `path` (a resumed run appends to its log)."""
        self.path = Path(path)
        self.enabled = enabled
        self.rows: list[dict] = []
        if enabled and keep_existing and self.path.is_file():
            import pyarrow.parquet as pq

            self.rows = pq.read_table(self.path).to_pylist()

    def append(self, **row) -> None:
        if self.enabled:
            self.rows.append(row)

    def flush(self) -> None:
        if not self.enabled or not self.rows:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        keys = sorted({k for row in self.rows for k in row})
        table = pa.table({k: [row.get(k) for row in self.rows] for k in keys})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(str(self.path)) as handle:
            pq.write_table(table, handle)
