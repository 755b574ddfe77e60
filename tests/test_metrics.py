"""The Prometheus exporter served over real HTTP on loopback, and the Parquet metrics log."""

import urllib.request

import pyarrow.parquet as pq

from lvface.distributed import free_port
from lvface.metrics import ParquetLog, PrometheusMetrics, Throughput, format_duration


def test_prometheus_exporter_serves_rank_labelled_metrics():
    port = free_port()
    metrics = PrometheusMetrics(port, rank=3, local_rank=0)
    metrics.update(loss=12.5, lr=1e-3, step=7, bad_records=2)
    metrics.verification("lfw", 0.9912)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        lines = response.read().decode().splitlines()
    assert 'lvface_loss{rank="3"} 12.5' in lines
    assert 'lvface_step{rank="3"} 7.0' in lines
    assert 'lvface_bad_records{rank="3"} 2.0' in lines
    assert 'lvface_verification_accuracy{rank="3",set="lfw"} 0.9912' in lines


def test_disabled_exporter_is_a_no_op():
    metrics = PrometheusMetrics(0, rank=0, local_rank=0)
    metrics.update(loss=1.0)  # nothing served, nothing raised
    assert not metrics.enabled


def test_parquet_log_round_trip(tmp_path):
    log = ParquetLog(tmp_path / "m.parquet", enabled=True)
    log.append(step=1, loss=3.0)
    log.append(step=2, loss=2.5, lfw_accuracy=0.7)
    log.flush()
    table = pq.read_table(tmp_path / "m.parquet").to_pydict()
    assert table == {"lfw_accuracy": [None, 0.7], "loss": [3.0, 2.5], "step": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["m.parquet"]  # no temporary left behind

    resumed = ParquetLog(tmp_path / "m.parquet", enabled=True, keep_existing=True)
    resumed.append(step=3, loss=2.0)
    resumed.flush()
    assert pq.read_table(tmp_path / "m.parquet").to_pydict()["step"] == [1, 2, 3]
    fresh = ParquetLog(tmp_path / "m.parquet", enabled=True)
    assert fresh.rows == []


def test_throughput_and_duration():
    meter = Throughput(images_per_step=100, total_steps=10)
    images_per_s, eta = meter.tick(5)
    assert images_per_s > 0 and eta >= 0
    assert format_duration(3725) == "1:02:05" and format_duration(65) == "01:05"
