"""Training metrics: the progress line, a Prometheus exporter, and a Parquet log of every logged step.

The progress line and the Parquet log are rank 0's; every rank may serve Prometheus metrics on
`metrics.prometheus_port + local_rank` (labelled with its rank) so that a scraper sees stragglers.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from lvface.files import atomic_open

log = logging.getLogger(__name__)


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


class PrometheusMetrics:
    """Gauges and counters of one rank, served over HTTP by prometheus_client when port > 0."""

    def __init__(self, port: int, rank: int, local_rank: int):
        self.enabled = port > 0
        if not self.enabled:
            return
        from prometheus_client import CollectorRegistry, Gauge, start_http_server

        self.registry = CollectorRegistry()
        labels = {"rank": str(rank)}
        names = {
            "loss": "Training loss of the last logged step",
            "lr": "Learning rate of the backbone",
            "images_per_second": "Global training throughput",
            "step": "Optimizer steps taken",
            "epoch": "Fractional epoch",
            "verification_accuracy": "Last 10-fold verification accuracy",
            "bad_records": "Records of this rank skipped because they failed to decode (since start)",
        }
        self.gauges = {}
        for name, doc in names.items():
            extra = ("set",) if name == "verification_accuracy" else ()
            gauge = Gauge(f"lvface_{name}", doc, ("rank",) + extra, registry=self.registry)
            self.gauges[name] = gauge
        self.labels = labels
        start_http_server(port + local_rank, registry=self.registry)
        log.info("Prometheus metrics on port %d", port + local_rank)

    def update(self, **values: float) -> None:
        if not self.enabled:
            return
        for name, value in values.items():
            self.gauges[name].labels(**self.labels).set(value)

    def verification(self, name: str, accuracy: float) -> None:
        if self.enabled:
            self.gauges["verification_accuracy"].labels(set=name, **self.labels).set(accuracy)


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
