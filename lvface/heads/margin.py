"""Margin functions of the margin softmax, as pure tensor math usable inside a blockwise pass.

insightface's combined margin: the target logit is s * psi(cos) with psi(c) = cos(m1 * theta + m2) - m3,
theta = acos(c), and every other logit is s * cos(theta). ArcFace is (1, 0.5, 0), CosFace (1, 0, 0.4).

A blockwise pass (sharded_softmax.py) never applies the margin to a whole [N, C] block: it picks each
row's target cosine out of the block, calls `target_value` / `target_slope` on those N numbers, and
writes the target logit back. `logits` does the same for a dense block (used by the dense reference
path and the replicated head).

Two gradient conventions (LossConfig.gradient):
- "insightface": what arcface_torch's CombinedMarginLoss does. The margin is applied to the target
  cosine under no_grad, so it only shifts the forward value and d logit / d cos = s for the target as
  for every other class. Its forward value is cos(m1 * theta + m2) - m3 with no threshold (for
  theta + m2 > pi it wraps, as arcface_torch's does; the gradient still pushes the target cosine up).
- "exact": psi and its true derivative, with the usual threshold. Where m1 * theta + m2 would pass pi,
  psi stops decreasing in theta, so past theta0 = (pi - m2) / m1 the target falls back to a linear
  function of c:
    m1 == 1: c - m3 - sin(pi - m2) * m2   (insightface's easy_margin=False branch, kept for ArcFace;
             it lies below psi at the threshold, so the logit keeps decreasing in theta)
    m1 != 1: c - cos(theta0) - 1 - m3     (continuous at theta0; insightface's constant would jump up
             there for SphereFace-style m1 > 1, making the logit non-monotonic)
  d psi / dc on the angular branch is m1 * sin(m1 * theta + m2) / sin(theta), on the fallback 1.

The rule every margin keeps (the blockwise pass, the Triton kernel and the dense reference rely on
it): a margin changes only the target cosine of each row, as a function of that cosine alone
(`target_value` and its slope `target_slope`, evaluated on N numbers, never on a block); every other
logit is s * cos. Adding a margin is one class with `scale`, `gradient`, `target_value`,
`target_slope` (and `target_cosine` / `target_logit` / `logits`, inherited from `Margin`) plus one line
in `MARGINS`; `loss.margin` then accepts its name.

No NaN at cos = +-1: cosines are clamped to [-1 + eps, 1 - eps] before acos and sin(theta) is taken of
the clamped value, so values and slopes stay finite (fp32 dot products of unit vectors land slightly
outside [-1, 1]). Near c = 1 the exact slope of ArcFace is large (it is infinite in the limit): about
1e3 * m1 * sin(m2) at the clamp. `target_cosine` builds the autograd node from the value and the slope
(value + slope * (c - c.detach())), so neither convention differentiates through acos.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_EPS = 1e-7

GRADIENTS = ("insightface", "exact")


@dataclass(frozen=True)
class Margin:
    """s * psi(cos) on the target, s * cos elsewhere; psi(c) = cos(m1 * acos(c) + m2) - m3."""

    scale: float = 64.0
    m1: float = 1.0
    m2: float = 0.5
    m3: float = 0.0
    gradient: str = "insightface"

    def __post_init__(self) -> None:
        if self.gradient not in GRADIENTS:
            raise ValueError(f"loss.gradient must be 'insightface' or 'exact', got {self.gradient!r}")
        if not self.m1 > 0.0:
            raise ValueError(f"loss.m1 must be positive (the multiplicative angular margin), got {self.m1}")
        if not self.scale > 0.0:
            raise ValueError(f"loss.scale must be positive, got {self.scale}")

    @property
    def is_angular(self) -> bool:
        """Whether psi needs theta (m1 != 1 or m2 != 0); otherwise psi(c) = c - m3."""
        return self.m1 != 1.0 or self.m2 != 0.0

    # ---- the threshold of the exact convention --------------------------------------------------

    @property
    def _theta0(self) -> float:
        """theta where m1 * theta + m2 reaches pi (may be >= pi: then there is no fallback region)."""
        return (math.pi - self.m2) / self.m1

    @property
    def _threshold(self) -> float:
        """The exact convention uses the angular branch where c > this cosine."""
        return math.cos(self._theta0) if self._theta0 < math.pi else -math.inf

    def _fallback(self, cos: torch.Tensor) -> torch.Tensor:
        if self.m1 == 1.0:
            return cos - self.m3 - math.sin(math.pi - self.m2) * self.m2
        return cos - (math.cos(self._theta0) + 1.0 + self.m3)

    # ---- pure functions of the target cosines ---------------------------------------------------

    def target_value(self, cos: torch.Tensor) -> torch.Tensor:
        """psi(cos): the margin-shifted target cosine (before the scale), values only, no autograd.

        `cos` holds target cosines only (any shape, e.g. [N] picked from a block). fp32 or fp64.
        """
        cos = cos.detach()
        if not self.is_angular:
            return cos - self.m3
        theta = torch.acos(cos.clamp(-1.0 + _EPS, 1.0 - _EPS))
        angular = torch.cos(self.m1 * theta + self.m2) - self.m3
        if self.gradient == "insightface":
            return angular
        return torch.where(cos > self._threshold, angular, self._fallback(cos))

    def target_slope(self, cos: torch.Tensor) -> torch.Tensor:
        """d psi / d cos of the chosen convention at the target cosines (ones for insightface)."""
        cos = cos.detach()
        if self.gradient == "insightface" or not self.is_angular:
            return torch.ones_like(cos)
        clamped = cos.clamp(-1.0 + _EPS, 1.0 - _EPS)
        theta = torch.acos(clamped)
        sin_theta = torch.sqrt(1.0 - clamped * clamped)
        # d/dc cos(m1 * theta + m2) = -sin(m1 * theta + m2) * m1 * d theta/dc, d theta/dc = -1 / sin(theta)
        angular = self.m1 * torch.sin(self.m1 * theta + self.m2) / sin_theta
        return torch.where(cos > self._threshold, angular, torch.ones_like(cos))

    def target_cosine(self, cos: torch.Tensor) -> torch.Tensor:
        """psi(cos) as an autograd node whose derivative is `target_slope` (for dense/autograd paths)."""
        value = self.target_value(cos)
        slope = self.target_slope(cos)
        return value + slope * (cos - cos.detach())

    def target_logit(self, cos: torch.Tensor) -> torch.Tensor:
        """s * psi(cos) for target cosines, autograd-aware."""
        return self.scale * self.target_cosine(cos)

    def logits(self, cos: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
        """Scaled logits of a dense cosine block [N, C]; `target_mask` [N, C] bool marks each row's target
        column (a row may have none, e.g. its class lives on another shard).

        The margin is evaluated only on the masked entries (at most one per row), not on the block.
        """
        rows, cols = target_mask.nonzero(as_tuple=True)
        target = self.target_logit(cos[rows, cols])  # (T,)
        logits = self.scale * cos  # (N, C)
        return logits.index_put((rows, cols), target)


MARGINS: dict[str, type[Margin]] = {"combined": Margin}
"""Margin families by name (loss.margin). "combined" covers ArcFace (1, 0.5, 0), CosFace (1, 0, 0.4)
and SphereFace-style m1 > 1 through (m1, m2, m3)."""


def margin_from_config(loss_cfg) -> Margin:
    """The Margin described by a LossConfig (margin, scale, m1, m2, m3, gradient)."""
    family = MARGINS[loss_cfg.margin]
    return family(scale=loss_cfg.scale, m1=loss_cfg.m1, m2=loss_cfg.m2, m3=loss_cfg.m3, gradient=loss_cfg.gradient)
