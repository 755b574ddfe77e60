"""Triton EPL prototype update (interface and math: kernels/epl_update.py). Imported lazily.

The rows are ordered by class with a stable sort and cut into segments (torch: sort,
unique_consecutive); one program per segment sums its rows in that order in fp32, forms the unit
mean, the factor, the blend and its renormalisation, and writes the prototype row: deterministic,
one read of the features and one read + write of each touched prototype row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lvface.kernels.margin_ce import NORM_EPS



@triton.jit
def _epl_kernel(
    feat_ptr, order_ptr, offsets_ptr, seg_rows_ptr, proto_ptr, D, stride_f, stride_p, momentum,
    ADAPTIVE: tl.constexpr, EPS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    seg = tl.program_id(0)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    start = tl.load(offsets_ptr + seg)
    end = tl.load(offsets_ptr + seg + 1)
    row = tl.load(seg_rows_ptr + seg)
    total = tl.zeros([BLOCK_D], tl.float32)
    for i in range(start, end):
        source = tl.load(order_ptr + i)
        total += tl.load(feat_ptr + source * stride_f + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    mean = total / (end - start).to(tl.float32)
    mean = mean / tl.maximum(tl.sqrt(tl.sum(mean * mean, axis=0)), EPS)
    old = tl.load(proto_ptr + row * stride_p + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if ADAPTIVE:
        keep = tl.sigmoid(tl.sum(old * mean, axis=0))
    else:
        keep = momentum
    new = keep * old + (1.0 - keep) * mean
    new = new / tl.maximum(tl.sqrt(tl.sum(new * new, axis=0)), EPS)
    tl.store(proto_ptr + row * stride_p + offs_d, new.to(proto_ptr.dtype.element_ty), mask=mask_d)


def triton_epl_update_(prototypes, features, classes, *, mode: str, momentum: float) -> int:
    if features.stride(1) != 1 or prototypes.stride(1) != 1:
        raise ValueError("the triton EPL update needs row-major features and prototypes (last stride 1)")
    sorted_classes, order = torch.sort(classes, stable=True)
    seg_rows, counts = torch.unique_consecutive(sorted_classes, return_counts=True)
    offsets = torch.zeros(seg_rows.numel() + 1, dtype=torch.int64, device=classes.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    segments = int(seg_rows.numel())
    dim = features.shape[1]
    _epl_kernel[(segments,)](
        features, order, offsets, seg_rows, prototypes, dim, features.stride(0), prototypes.stride(0),
        float(momentum), ADAPTIVE=mode == "adaptive", EPS=NORM_EPS, BLOCK_D=triton.next_power_of_2(dim),
    )
    return segments
