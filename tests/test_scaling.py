"""benchmarks/scaling.py: the communication terms follow the shapes, and the alpha-beta fit recovers
known latency and bandwidth."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import scaling  # noqa: E402


def test_head_terms_grow_with_the_global_batch_and_compute_does_not():
    net, comp = scaling.Network(), scaling.Compute()
    work = scaling.Workload.build("vit_t", batch=384, classes=2_059_906)
    small, large = (scaling.predict(work, gpus, 2, net, comp) for gpus in (64, 512))
    assert small.compute_s == large.compute_s  # weak scaling: per-GPU work is constant
    rows = 512 * 384
    expected = (511 / 512 * rows * 512 * 4 + 511 / 512 * rows * 8) / net.busbw(512) + 2 * 511 * net.alpha(512)
    assert large.terms["head embedding+label all-gather [N, D]"][0] == pytest.approx(expected)
    assert large.efficiency < small.efficiency < 1


def test_zero_stages_expose_what_they_cannot_overlap():
    net, comp = scaling.Network(), scaling.Compute()
    work = scaling.Workload.build("vit_l", batch=384)
    zero1, zero2 = (scaling.predict(work, 64, zero, net, comp) for zero in (1, 2))
    wire, exposed = zero1.terms["backbone grad reduce-scatter"]
    assert exposed == wire  # stage 1 reduces after backward
    wire2, exposed2 = zero2.terms["backbone grad reduce-scatter"]
    assert wire2 == wire and exposed2 < wire  # stage 2 overlaps it with the backward pass
    assert work.params == 255_684_352


def test_alpha_beta_fit_recovers_a_known_link():
    latency, busbw = 50e-6, 2e9
    rows = [{"op": op, "ranks": world, "bytes": size,
             "s": latency + scaling._volume(op, size, world) / busbw}
            for op in ("all_reduce", "all_gather") for world in (2, 4) for size in scaling.SIZES]
    fits = scaling.fit_alpha_beta(rows)
    for key in ("all_reduce@2", "all_gather@4"):
        assert fits[key]["latency_us"] == pytest.approx(50, rel=1e-6)
        assert fits[key]["busbw_gbps"] == pytest.approx(2, rel=1e-6)
