"""Metrics: the Prometheus exporter served over real HTTP (alone, and scraped during a real 2-rank
training run), the step-phase timers, and the Parquet metrics log."""

import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from lvface.distributed import free_port
from lvface.metrics import METRICS, ParquetLog, Throughput, TrainMetrics, exported_sample_names, format_duration

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_utils import scraped_run  # noqa: E402


def _scrape(port: int) -> dict:
    """{sample name: {labels tuple: value}} of one exporter."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return _parse(response.read().decode())


def _parse(text: str) -> dict:
    samples: dict = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def _value(samples: dict, name: str, **labels) -> float:
    wanted = set(labels.items())
    values = [v for key, v in samples.get(name, {}).items() if wanted <= set(key)]
    assert len(values) == 1, (name, labels, samples.get(name))
    return values[0]


def test_exporter_serves_counters_histograms_and_gauges_per_rank():
    port = free_port()
    metrics = TrainMetrics(port, rank=3, local_rank=0)
    with metrics.timer("data_wait"):
        time.sleep(0.02)
    with metrics.timer("data_wait"):  # a second micro-batch: summed into the same step
        time.sleep(0.02)
    metrics.count("images", 64)
    metrics.step_done()
    with metrics.timer("checkpoint_save"):  # not a step phase: observed at once
        pass
    metrics.count_to("bad_records", 2)
    metrics.count_to("bad_records", 2)  # the same total again adds nothing
    metrics.set(loss=12.5, lr=1e-3, step=7, grad_norm=None)  # None leaves the gauge alone
    assert metrics.set_memory() > 0
    metrics.verification("lfw", 0.9912)

    samples = _scrape(port)
    labels = {"rank": "3", "local_rank": "0"}
    assert _value(samples, "lvface_images_total", **labels) == 64
    assert _value(samples, "lvface_steps_total", **labels) == 1
    assert _value(samples, "lvface_bad_records_total", **labels) == 2
    assert _value(samples, "lvface_loss", **labels) == 12.5
    assert _value(samples, "lvface_step", **labels) == 7
    assert _value(samples, "lvface_memory_peak_bytes", **labels) > 1 << 20
    assert _value(samples, "lvface_verification_accuracy", set="lfw", **labels) == 0.9912
    assert _value(samples, "lvface_data_wait_seconds_count", **labels) == 1  # one step, two waits
    assert _value(samples, "lvface_data_wait_seconds_sum", **labels) >= 0.04
    assert _value(samples, "lvface_checkpoint_save_seconds_count", **labels) == 1
    assert metrics.summary()["data_wait_s"] >= 0.04


def test_backward_timer_splits_head_and_backbone_at_the_embeddings():
    metrics = TrainMetrics()
    backbone = torch.nn.Linear(8, 8)

    class SlowBackward(torch.autograd.Function):  # a "head" whose backward takes 50 ms
        @staticmethod
        def forward(ctx, x):
            return x.sum()

        @staticmethod
        def backward(ctx, grad):
            time.sleep(0.05)
            return grad.expand(4, 8)

    embeddings = backbone(torch.randn(4, 8))
    loss = SlowBackward.apply(embeddings)
    with metrics.backward_timer(embeddings):
        loss.backward()
    assert metrics.pending["head"] >= 0.05
    assert metrics.pending["backbone"] < 0.05
    assert backbone.weight.grad is not None  # the hook changed nothing


def test_unknown_metric_names_are_errors_and_a_disabled_exporter_counts_nothing():
    metrics = TrainMetrics(0)
    assert not metrics.enabled
    metrics.count("images", 5)
    with pytest.raises(KeyError, match="add it to lvface.metrics.METRICS"):
        metrics.count("imagez")
    with pytest.raises(KeyError, match="no histogram 'loss'"):
        with metrics.timer("loss"):
            pass


def test_registry_follows_the_prometheus_conventions():
    names = exported_sample_names()
    for metric in METRICS:
        if metric.kind == "counter":
            assert "lvface_" + metric.name + "_total" in names
            assert not metric.name.endswith("_total")  # prometheus_client adds the suffix
        elif metric.kind == "histogram":
            assert metric.name.endswith("_seconds"), metric.name
            assert "lvface_" + metric.name + "_bucket" in names
        assert "step" not in metric.extra_labels


def test_a_real_two_rank_run_is_scraped_while_it_trains():
    run = scraped_run()
    for local_rank in (0, 1):
        texts = run.scrapes[local_rank]
        parsed = [_parse(text) for text in texts]
        with_steps = [s for s in parsed if _value(s, "lvface_steps_total") > 0]
        assert len(with_steps) >= 2, f"rank {local_rank}: fewer than 2 scrapes during training"
        first, last = with_steps[0], with_steps[-1]
        labels = {"rank": str(local_rank), "local_rank": str(local_rank)}
        # counters advance between scrapes
        assert _value(last, "lvface_steps_total", **labels) > _value(first, "lvface_steps_total", **labels)
        assert _value(last, "lvface_images_total", **labels) > _value(first, "lvface_images_total", **labels)
        # histograms fill: one observation per step for the step and its phases (a scrape may fall
        # between a step's images being counted / its histograms observed and its step counter: +1)
        steps = _value(last, "lvface_steps_total")
        assert _value(last, "lvface_images_total") in (16 * steps, 16 * (steps + 1))
        for phase in ("step", "data_wait", "backbone", "head", "head_collective", "optimizer"):
            assert _value(last, f"lvface_{phase}_seconds_count", **labels) in (steps, steps + 1), phase
            assert _value(last, f"lvface_{phase}_seconds_sum", **labels) > 0, phase
        assert _value(last, "lvface_memory_peak_bytes", **labels) > 1 << 20
        # names and labels follow the conventions
        for family in text_string_to_metric_families(texts[-1]):
            assert family.name.startswith("lvface_"), family.name
            if family.type == "counter":
                assert all(s.name.endswith(("_total", "_created")) for s in family.samples), family.name
            if family.type == "histogram":
                assert family.name.endswith("_seconds"), family.name
            for sample in family.samples:
                assert set(sample.labels) <= {"rank", "local_rank", "le", "set", "kind"}, sample
    final = _parse(run.scrapes[0][-1])
    assert _value(final, "lvface_checkpoint_save_seconds_count") >= 1
    assert _value(final, "lvface_verification_accuracy", set="val") > 0


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
