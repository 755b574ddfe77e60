"""Triton EPL prototype update (interface and math: kernels/epl_update.py). Imported lazily.

The rows are ordered by class with a stable sort and cut into segments; one program per sorted row is
launched (a fixed grid: no host sync), and the program at the first row of a segment sums the segment's
rows in that order in fp32, forms the unit mean, the factor, the blend and its renormalisation, and
writes the prototype row; the others, and segments of class -1 (other shards' rows), do nothing.
Deterministic, one read of the features and one read + write of each touched prototype row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lvface.kernels.margin_ce import NORM_EPS



@triton.jit
def _epl_kernel(
    feat_ptr, order_ptr, ends_ptr, sorted_ptr, proto_ptr, D, stride_f, stride_p, momentum,
    ADAPTIVE: tl.constexpr, EPS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    start = tl.program_id(0)  # a position in the sorted rows; works only at the first row of a segment
    offs_d = tl.arange(0, BLOCK_D)
    end = tl.load(ends_ptr + start)  # == start where this program has nothing to do
    row = tl.load(sorted_ptr + start)
    mask_d = offs_d < tl.where(end > start, D, 0)  # nothing loaded or stored by an idle program
    total = tl.zeros([BLOCK_D], tl.float32)
    for i in range(start, end):
        source = tl.load(order_ptr + i)
        total += tl.load(feat_ptr + source * stride_f + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    mean = total / tl.maximum(end - start, 1).to(tl.float32)
    mean = mean / tl.maximum(tl.sqrt(tl.sum(mean * mean, axis=0)), EPS)
    old = tl.load(proto_ptr + row * stride_p + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if ADAPTIVE:
        keep = tl.sigmoid(tl.sum(old * mean, axis=0))
    else:
        keep = momentum
    new = keep * old + (1.0 - keep) * mean
    new = new / tl.maximum(tl.sqrt(tl.sum(new * new, axis=0)), EPS)
    tl.store(proto_ptr + row * stride_p + offs_d, new.to(proto_ptr.dtype.element_ty), mask=mask_d)


def segment_ends(sorted_classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ends [M], starts [M] bool) of class-sorted rows: at the first row of a segment of class >= 0 the
    position after its last row, elsewhere the row's own position (an empty range). Fixed shapes."""
    m = sorted_classes.numel()
    positions = torch.arange(m, device=sorted_classes.device)
    starts = torch.ones(m, dtype=torch.bool, device=sorted_classes.device)
    starts[1:] = sorted_classes[1:] != sorted_classes[:-1]
    segment = torch.cumsum(starts.to(torch.int64), 0) - 1  # (M,) the segment of each row
    last = torch.zeros(m, dtype=torch.int64, device=sorted_classes.device)
    last.scatter_reduce_(0, segment, positions + 1, reduce="amax")  # (M,) one past each segment's last row
    starts &= sorted_classes >= 0
    return torch.where(starts, last.index_select(0, segment), positions), starts


def triton_epl_update_(prototypes, features, classes, *, mode: str, momentum: float) -> torch.Tensor:
    if features.stride(1) != 1 or prototypes.stride(1) != 1:
        raise ValueError("the triton EPL update needs row-major features and prototypes (last stride 1)")
    sorted_classes, order = torch.sort(classes, stable=True)
    ends, starts = segment_ends(sorted_classes)
    dim = features.shape[1]
    _epl_kernel[(classes.numel(),)](
        features, order, ends, sorted_classes, prototypes, dim, features.stride(0), prototypes.stride(0),
        float(momentum), ADAPTIVE=mode == "adaptive", EPS=NORM_EPS, BLOCK_D=triton.next_power_of_2(dim),
    )
    return starts.sum()
