"""Tests of lvface.heads.margin against closed forms written here in float64."""

from __future__ import annotations

import math

import pytest
import torch

from lvface.config import LossConfig
from lvface.heads.margin import Margin, margin_from_config

ARCFACE = dict(m1=1.0, m2=0.5, m3=0.0)
COSFACE = dict(m1=1.0, m2=0.0, m3=0.4)
COMBINED = dict(m1=1.0, m2=0.3, m3=0.2)
SPHERE = dict(m1=2.0, m2=0.0, m3=0.0)


def closed_form(c: torch.Tensor, m1: float, m2: float, m3: float) -> torch.Tensor:
    return torch.cos(m1 * torch.acos(c) + m2) - m3


def test_values_arcface_and_cosface_inside_the_threshold():
    c = torch.linspace(-0.8, 0.99, 101, dtype=torch.float64)
    for margins in (ARCFACE, COSFACE, COMBINED):
        for gradient in ("insightface", "exact"):
            margin = Margin(scale=64.0, gradient=gradient, **margins)
            torch.testing.assert_close(margin.target_value(c), closed_form(c, **margins), rtol=0, atol=1e-12)
    cosface = Margin(gradient="exact", **COSFACE)
    torch.testing.assert_close(cosface.target_value(c), c - 0.4, rtol=0, atol=0)


def test_insightface_gradient_is_scale_on_every_logit():
    for margins in (ARCFACE, COSFACE, COMBINED):
        margin = Margin(scale=64.0, gradient="insightface", **margins)
        cos = torch.tensor([[0.3, -0.2, 0.9], [0.1, 0.5, -0.95]], dtype=torch.float64, requires_grad=True)
        mask = torch.tensor([[True, False, False], [False, False, True]])
        margin.logits(cos, mask).sum().backward()
        torch.testing.assert_close(cos.grad, torch.full_like(cos, 64.0), rtol=0, atol=0)


def test_insightface_value_wraps_past_pi_like_arcface_torch():
    # arcface_torch applies cos(theta + m2) under no_grad with no threshold
    margin = Margin(gradient="insightface", **ARCFACE)
    c = torch.tensor([-0.99, -0.95], dtype=torch.float64)
    torch.testing.assert_close(margin.target_value(c), torch.cos(torch.acos(c) + 0.5))


def test_exact_slope_matches_autograd_and_finite_differences():
    c = torch.linspace(-0.85, 0.98, 57, dtype=torch.float64)
    for margins in (ARCFACE, COMBINED, COSFACE):
        margin = Margin(gradient="exact", **margins)
        ref = c.clone().requires_grad_()
        closed_form(ref, **margins).sum().backward()
        torch.testing.assert_close(margin.target_slope(c), ref.grad, rtol=1e-10, atol=1e-10)
        h = 1e-6
        finite = (margin.target_value(c + h) - margin.target_value(c - h)) / (2 * h)
        torch.testing.assert_close(margin.target_slope(c), finite, rtol=1e-5, atol=1e-6)
        probe = c.clone().requires_grad_()
        margin.target_cosine(probe).sum().backward()
        torch.testing.assert_close(probe.grad, margin.target_slope(c))


@pytest.mark.parametrize(
    "margins", [ARCFACE, COMBINED, SPHERE, dict(m1=1.35, m2=0.25, m3=0.1)], ids=["arc", "comb", "sphere", "mixed"]
)
def test_exact_threshold_keeps_the_target_decreasing_in_theta(margins):
    margin = Margin(gradient="exact", **margins)
    theta = torch.linspace(0.0, math.pi, 4001, dtype=torch.float64)
    values = margin.target_value(torch.cos(theta))
    assert torch.all(values[1:] <= values[:-1] + 1e-12), "psi must not increase with theta"
    assert torch.all(margin.target_slope(torch.cos(theta)) >= 0)
    theta0 = (math.pi - margins["m2"]) / margins["m1"]
    past = torch.cos(theta[theta > theta0 + 1e-3])
    if margins["m1"] == 1.0:  # insightface's easy_margin=False branch
        expected = past - margins["m3"] - math.sin(math.pi - margins["m2"]) * margins["m2"]
        torch.testing.assert_close(margin.target_value(past), expected)
    else:  # continuous fallback
        edge = margin.target_value(torch.tensor([math.cos(theta0) - 1e-9], dtype=torch.float64))
        assert abs(edge.item() - (-1.0 - margins["m3"])) < 1e-6


def test_no_nan_at_plus_minus_one():
    for gradient in ("insightface", "exact"):
        for margins in (ARCFACE, COSFACE, SPHERE):
            margin = Margin(gradient=gradient, **margins)
            for dtype in (torch.float32, torch.float64):
                c = torch.tensor([-1.0, -1.0000001, 1.0, 1.0000001, 0.0], dtype=dtype, requires_grad=True)
                out = margin.target_logit(c)
                out.sum().backward()
                assert torch.isfinite(out).all() and torch.isfinite(c.grad).all(), (gradient, margins, dtype)


def test_logits_apply_the_margin_only_at_targets():
    margin = Margin(scale=32.0, gradient="exact", **ARCFACE)
    cos = torch.rand(5, 7, dtype=torch.float64) * 1.8 - 0.9
    mask = torch.zeros(5, 7, dtype=torch.bool)
    mask[0, 3] = mask[2, 0] = mask[4, 6] = True  # rows 1 and 3 have their class elsewhere
    logits = margin.logits(cos, mask)
    torch.testing.assert_close(logits[~mask], 32.0 * cos[~mask], rtol=0, atol=0)
    torch.testing.assert_close(logits[mask], 32.0 * closed_form(cos[mask], **ARCFACE))
    # the margin function sees only the target entries
    seen = []
    original = Margin.target_value

    def spy(self, c):
        seen.append(c.numel())
        return original(self, c)

    Margin.target_value = spy
    try:
        margin.logits(cos, mask)
    finally:
        Margin.target_value = original
    assert seen == [3]


def test_margin_from_config_and_validation():
    margin = margin_from_config(LossConfig(scale=30.0, m1=1.0, m2=0.0, m3=0.4, gradient="exact"))
    assert margin == Margin(scale=30.0, m1=1.0, m2=0.0, m3=0.4, gradient="exact")
    with pytest.raises(ValueError, match="loss.gradient"):
        Margin(gradient="autograd")
    with pytest.raises(ValueError, match="loss.m1"):
        Margin(m1=0.0)
