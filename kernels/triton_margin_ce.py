"""The "triton" backend of the margin cross entropy (interface: kernels/margin_ce.py).

Imported only when its row of kernels/registry.py builds it, so lvface imports
without triton. Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (the tests).

Three kernels, nothing of size [N, C] in memory:
  _forward_kernel   grid (row blocks, class splits): a [BLOCK_N, D] tile of x_hat stays in registers
                    while the program walks its class range in [BLOCK_C, D] tiles of the raw centers:
                    dot = x @ w^T (fp32 accumulation), the tile's row norms from the same loaded tile
                    (no normalised copy of W), z = s * dot / |w|, the target column replaced by the
                    row's target logit, online (max, sum-exp). Writes [splits, N] pairs; the splits
                    (more programs than row blocks at small N) are merged on the host side in torch.
  _grad_x_kernel    grid (row blocks): recomputes z, G = coef * (p - onehot * ...) and accumulates
                    dx = (G / |w|) @ w over the classes in a [BLOCK_N, D] fp32 register tile.
  _grad_w_kernel    grid (class blocks): recomputes the same tiles and accumulates g = G^T @ x over
                    the rows in a [BLOCK_C, D] fp32 tile, then dw = (g - w_hat (w_hat . g)) / |w|
                    and stores the used rows (sampled rows go back to their place in W).
The backward kernels take the logit product in BLOCK_K slices of D read from memory (_logits_k), so
only their [BLOCK, D] fp32 accumulator stays in registers: with the TILES below nothing spills on sm_90.
bf16 operands (loss.head_dtype=bf16) are bf16 copies of the embeddings and of W made by the head, so each
tile is read at half the bytes and goes to the tensor cores as it is (wgmma in the forward); reading fp32
W and converting each tile in registers was compared on the compile report and loses (see TILES).
So the default backward ("two_pass") does the logit product twice (once per pass): 5 products of
2 N D C FLOPs per step, deterministic, no atomics. The goal counts 3, so at best 60% of the matrix rate.
backward="atomic" (loss.impl=triton_atomic) runs _grad_w_kernel alone and adds each tile's share of dx
into an fp32 [N, D] buffer with atomics: 4 products, and N * D * C / BLOCK_C fp32 atomic adds (~3e9 at
the WebFace42M shape, 6e9 at 64-row class tiles) spread over the rows by starting each class block at
another row block. Whether the L2 atomics or the saved product win is for a GPU to measure
(benchmarks/gpu_check.sh runs both); its sums are not bitwise reproducible from run to run.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from lvface.kernels.margin_ce import NORM_EPS, centers_grad_buffer, num_used

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BACKWARDS = ("two_pass", "atomic")
"""TritonMarginCE(backward=...): "two_pass" (deterministic, 5 products a step) or "atomic" (4 products,
dx added with fp32 atomics: not bitwise reproducible from run to run)."""


@triton.jit
def _dot(a, b, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation, `a` in `b`'s dtype (the fp32 gradient tiles go to the tensor cores as
    the operands' bf16 / fp16). UPCAST: both in fp32 instead - the interpreter's tl.dot mis-reads bf16
    (triton 3.9), so it gets the exact fp32 products of the same values."""
    if UPCAST:  # a rounded to b's dtype as on a GPU, then exact fp32 products of the rounded values
        out = tl.dot(a.to(b.dtype).to(tl.float32), b.to(tl.float32), input_precision=INPUT_PRECISION)
    else:
        out = tl.dot(a.to(b.dtype), b, input_precision=INPUT_PRECISION)
    return out


@triton.jit
def _load_centers(w_ptr, rows_ptr, offs_c, mask_c, offs_d, mask_d, stride_w, HAS_ROWS: tl.constexpr):
    """The raw centers of the used classes offs_c, [BLOCK_C, BLOCK_D] (0 where masked), and their rows of W
    (through the sampled `rows` when HAS_ROWS)."""
    if HAS_ROWS:
        w_rows = tl.load(rows_ptr + offs_c, mask=mask_c, other=0)
    else:
        w_rows = offs_c
    w = tl.load(w_ptr + w_rows[:, None] * stride_w + offs_d[None, :], mask=mask_c[:, None] & mask_d[None, :], other=0.0)
    return w, w_rows


@triton.jit
def _load_rows(x_ptr, tgt_ptr, tlogit_ptr, offs_n, mask_n, offs_d, mask_d, stride_x):
    """A [BLOCK_N, BLOCK_D] tile of x_hat (0 where masked), its rows' targets (-1) and target logits (0)."""
    x = tl.load(x_ptr + offs_n[:, None] * stride_x + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0)
    tgt = tl.load(tgt_ptr + offs_n, mask=mask_n, other=-1)
    tlogit = tl.load(tlogit_ptr + offs_n, mask=mask_n, other=0.0)
    return x, tgt, tlogit


@triton.jit
def _logits_tile(
    x, w, offs_c, mask_c, tgt, tlogit, scale,
    EPS: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """z [BLOCK_N, BLOCK_C] fp32 of one tile, masked columns at -inf; and the tile's 1 / |w| [BLOCK_C]."""
    wf = w.to(tl.float32)
    sq = tl.sum(wf * wf, axis=1)  # before the product: fewer values live across it
    dot = _dot(x, tl.trans(w.to(x.dtype)), INPUT_PRECISION, UPCAST)
    return _scaled_logits(dot, sq, offs_c, mask_c, tgt, tlogit, scale, EPS)


@triton.jit
def _scaled_logits(dot, sq, offs_c, mask_c, tgt, tlogit, scale, EPS: tl.constexpr):
    """x . w [BLOCK_N, BLOCK_C] and |w|^2 [BLOCK_C] -> (z at scale with the margin's target logit, masked
    columns at -inf; is_target; 1 / |w|; |w|): the one tail of both ways of forming a tile."""
    norm = tl.sqrt(sq)
    inv_norm = 1.0 / tl.maximum(norm, EPS)
    z = dot * (inv_norm * scale)[None, :]
    is_target = offs_c[None, :] == tgt[:, None]
    z = tl.where(is_target, tlogit[:, None], z)
    z = tl.where(mask_c[None, :], z, -float("inf"))
    return z, is_target, inv_norm, norm


@triton.jit
def _logits_k(
    x_ptr, w_ptr, offs_n, mask_n, w_rows, offs_c, mask_c, tgt, tlogit, D, stride_x, stride_w, scale,
    EPS: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """_logits_tile with the product over D in BLOCK_K slices read from memory (L1 / L2: the tile was
    just read), so that no [BLOCK, D] operand stays live in registers next to the backward's [BLOCK, D]
    fp32 accumulator: that is what made the backward kernels spill. The row norms come from the fp32
    values of the slices (before any conversion to the embeddings' dtype)."""
    dot = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
    sq = tl.zeros([BLOCK_C], tl.float32)
    for k0 in tl.range(0, BLOCK_D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < D
        xk = tl.load(x_ptr + offs_n[:, None] * stride_x + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :],
                     other=0.0)
        wk = tl.load(w_ptr + w_rows[:, None] * stride_w + offs_k[None, :], mask=mask_c[:, None] & mask_k[None, :],
                     other=0.0)
        wf = wk.to(tl.float32)
        sq += tl.sum(wf * wf, axis=1)
        dot += _dot(xk, tl.trans(wk.to(xk.dtype)), INPUT_PRECISION, UPCAST)
    return _scaled_logits(dot, sq, offs_c, mask_c, tgt, tlogit, scale, EPS)


@triton.jit
def _forward_kernel(
    x_ptr, w_ptr, rows_ptr, tgt_ptr, tlogit_ptr, max_ptr, sum_ptr,
    N, C, D, stride_x, stride_w, classes_per_split, scale,
    HAS_ROWS: tl.constexpr, EPS: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask_d = offs_d < D
    x, tgt, tlogit = _load_rows(x_ptr, tgt_ptr, tlogit_ptr, offs_n, mask_n, offs_d, mask_d, stride_x)
    run_max = tl.full([BLOCK_N], -float("inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_N], tl.float32)
    c_begin = pid_s * classes_per_split
    c_end = tl.minimum(c_begin + classes_per_split, C)
    for c0 in range(c_begin, c_end, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < c_end
        w, _ = _load_centers(w_ptr, rows_ptr, offs_c, mask_c, offs_d, mask_d, stride_w, HAS_ROWS)
        z, _, _, _ = _logits_tile(x, w, offs_c, mask_c, tgt, tlogit, scale, EPS, INPUT_PRECISION, UPCAST)
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        run_max = new_max
    tl.store(max_ptr + pid_s * N + offs_n, run_max, mask=mask_n)
    tl.store(sum_ptr + pid_s * N + offs_n, run_sum, mask=mask_n)


@triton.jit
def _grad_tile(z, is_target, mask_c, lse, tslope, coef):
    """dL/dcos of a tile (fp32): coef * p, the target entry coef * (p - 1) * psi'."""
    p = tl.exp(z - lse[:, None])
    p = tl.where(mask_c[None, :], p, 0.0)
    g = tl.where(is_target, (p - 1.0) * tslope[:, None], p)
    return g * coef


@triton.jit
def _grad_x_kernel(
    x_ptr, w_ptr, rows_ptr, tgt_ptr, tlogit_ptr, tslope_ptr, lse_ptr, coef_ptr, dx_ptr,
    N, C, D, stride_x, stride_w, stride_dx, scale,
    HAS_ROWS: tl.constexpr, EPS: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask_d = offs_d < D
    tgt = tl.load(tgt_ptr + offs_n, mask=mask_n, other=-1)
    tlogit = tl.load(tlogit_ptr + offs_n, mask=mask_n, other=0.0)
    tslope = tl.load(tslope_ptr + offs_n, mask=mask_n, other=0.0)
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    coef = tl.load(coef_ptr)
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        w_rows = tl.load(rows_ptr + offs_c, mask=mask_c, other=0) if HAS_ROWS else offs_c
        z, is_target, inv_norm, _ = _logits_k(
            x_ptr, w_ptr, offs_n, mask_n, w_rows, offs_c, mask_c, tgt, tlogit, D, stride_x, stride_w, scale,
            EPS, INPUT_PRECISION, UPCAST, BLOCK_N, BLOCK_C, BLOCK_D, BLOCK_K)
        g = _grad_tile(z, is_target, mask_c, lse, tslope, coef) * inv_norm[None, :]  # dL/d(x . w) per tile
        w, _ = _load_centers(w_ptr, rows_ptr, offs_c, mask_c, offs_d, mask_d, stride_w, HAS_ROWS)
        acc += _dot(g, w.to(x_ptr.dtype.element_ty), INPUT_PRECISION, UPCAST)
    tl.store(dx_ptr + offs_n[:, None] * stride_dx + offs_d[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=mask_n[:, None] & mask_d[None, :])


@triton.jit
def _grad_w_kernel(
    x_ptr, w_ptr, rows_ptr, tgt_ptr, tlogit_ptr, tslope_ptr, lse_ptr, coef_ptr, dw_ptr, dx_ptr,
    N, C, D, stride_x, stride_w, stride_dw, stride_dx, scale,
    HAS_ROWS: tl.constexpr, EPS: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ATOMIC_X: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_c = tl.program_id(0)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, BLOCK_D)
    mask_c = offs_c < C
    mask_d = offs_d < D
    w_rows = tl.load(rows_ptr + offs_c, mask=mask_c, other=0) if HAS_ROWS else offs_c
    coef = tl.load(coef_ptr)
    acc = tl.zeros([BLOCK_C, BLOCK_D], tl.float32)
    inv_norm = tl.zeros([BLOCK_C], tl.float32)
    norm = tl.zeros([BLOCK_C], tl.float32)
    row_blocks = tl.cdiv(N, BLOCK_N)
    for i in range(0, row_blocks):
        # ATOMIC_X: each class block starts at another row block, so the programs of a wave add into
        # different rows of dx at a time instead of all contending for the same addresses
        if ATOMIC_X:
            n0 = ((i + pid_c) % row_blocks) * BLOCK_N
        else:
            n0 = i * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        tgt = tl.load(tgt_ptr + offs_n, mask=mask_n, other=-1)
        tlogit = tl.load(tlogit_ptr + offs_n, mask=mask_n, other=0.0)
        tslope = tl.load(tslope_ptr + offs_n, mask=mask_n, other=0.0)
        lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
        z, is_target, inv_norm, norm = _logits_k(
            x_ptr, w_ptr, offs_n, mask_n, w_rows, offs_c, mask_c, tgt, tlogit, D, stride_x, stride_w, scale,
            EPS, INPUT_PRECISION, UPCAST, BLOCK_N, BLOCK_C, BLOCK_D, BLOCK_K)
        g = _grad_tile(z, is_target, mask_c, lse, tslope, coef)
        g = tl.where(mask_n[:, None], g, 0.0)
        x = tl.load(x_ptr + offs_n[:, None] * stride_x + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :],
                    other=0.0)
        acc += _dot(tl.trans(g), x, INPUT_PRECISION, UPCAST)  # dL/dw_hat (BLOCK_C, D)
        if ATOMIC_X:  # this tile's share of dx = (G / |w|) @ w, added into the fp32 dx (4 products a step)
            w, _ = _load_centers(w_ptr, rows_ptr, offs_c, mask_c, offs_d, mask_d, stride_w, HAS_ROWS)
            part = _dot(g * inv_norm[None, :], w.to(x.dtype), INPUT_PRECISION, UPCAST)
            tl.atomic_add(dx_ptr + offs_n[:, None] * stride_dx + offs_d[None, :], part,
                          mask=mask_n[:, None] & mask_d[None, :], sem="relaxed")
    w, _ = _load_centers(w_ptr, rows_ptr, offs_c, mask_c, offs_d, mask_d, stride_w, HAS_ROWS)
    w_hat = w.to(tl.float32) * inv_norm[:, None]
    radial = tl.sum(w_hat * acc, axis=1)
    radial = tl.where(norm > EPS, radial, 0.0)
    grad = (acc - w_hat * radial[:, None]) * inv_norm[:, None]
    tl.store(dw_ptr + w_rows[:, None] * stride_dw + offs_d[None, :], grad.to(dw_ptr.dtype.element_ty),
             mask=mask_c[:, None] & mask_d[None, :])


class Tiles(NamedTuple):
    block_n: int
    block_c: int
    num_warps: int = 8
    num_stages: int = 3
    block_k: int = 64
    """Slice of D per step of the backward kernels' logit product (_logits_k)."""


KERNELS = ("forward", "grad_x", "grad_w", "grad_w_atomic")
_VARIANTS = {"forward": "-", "grad_x": "two_pass", "grad_w": "two_pass", "grad_w_atomic": "atomic"}

TILES = {
    ("forward", 4): Tiles(32, 32), ("forward", 2): Tiles(64, 64),
    ("grad_x", 4): Tiles(32, 16), ("grad_x", 2): Tiles(32, 32),
    ("grad_w", 4): Tiles(32, 16), ("grad_w", 2): Tiles(32, 16),
    ("grad_w_atomic", 4): Tiles(16, 16, block_k=32), ("grad_w_atomic", 2): Tiles(16, 16, block_k=32),
}
"""Default tiles at D <= 512 by (kernel, operand bytes), chosen so that every launch compiles for sm_90 without
register spills (benchmarks/kernel_report.py; tests/test_kernel_margin_ce.py asserts it). The backward
kernels hold a [BLOCK, D] fp32 accumulator: at D = 512 with 8 warps, 32 rows take 64 registers a thread,
64 rows 128 and spill (255 registers, kilobytes of spills). The forward keeps its [BLOCK_N, D] operand
tile instead and runs 64 x 64 bf16 tiles on wgmma without spills. The backward tiles stay under the 64
rows a Hopper warpgroup's wgmma needs, so their products run on mma.sync; CANDIDATES holds wgmma tiles
that spill, for the GPU to weigh. bf16 operands are bf16 copies of W: fp32 W converted to bf16 in
registers (kernel_report.py's bf16_wf32) stages fp32 tiles in shared memory, and its forward would need
393 KB at these tiles (262 KB sampled), more than a block may have."""

CANDIDATES = {
    "forward": [Tiles(64, 64), Tiles(64, 128, 8, 2), Tiles(128, 64, 8, 2), Tiles(32, 32), Tiles(64, 32, 4, 3)],
    "grad_x": [Tiles(32, 32), Tiles(32, 16), Tiles(16, 32), Tiles(64, 32, 16, 3), Tiles(32, 64, 8, 2, 128)],
    "grad_w": [Tiles(32, 16), Tiles(16, 32), Tiles(64, 16), Tiles(64, 32, 16, 3), Tiles(32, 32, 8, 2, 32)],
    "grad_w_atomic": [Tiles(16, 16, block_k=32), Tiles(32, 16), Tiles(64, 16), Tiles(64, 32, 16, 3)],
}
"""The GPU sweep's candidates per kernel (BLOCK_N, BLOCK_C, warps, stages, BLOCK_K), the TILES of either
dtype among them: benchmarks/kernel_report.py --candidates shows which spill on sm_90 before any is timed
(at bf16 the 64-row ones take wgmma and spill, e.g. grad_w 64 x 16: 32 / 16 bytes; only a GPU can say
whether the tensor-core instruction outweighs the spill traffic)."""


def default_tiles(kernel: str, dim: int, element_size: int) -> Tiles:
    """TILES for `kernel`; above D = 512 the row and class tiles shrink with D (the accumulators grow)."""
    tiles = TILES[(kernel, 2 if element_size <= 2 else 4)]
    shrink = max(1, _block_d(dim) // 512)
    return tiles._replace(block_n=max(16, tiles.block_n // shrink), block_c=max(16, tiles.block_c // shrink))


def _block_d(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))


class TritonMarginCE:
    """The "triton" backend (see the module docstring). Tiles per kernel from TILES (spill-free on sm_90 at
    D = 512, checked ahead of time on a machine without a GPU by benchmarks/kernel_report.py and the tests);
    the GPU sweep times CANDIDATES. Operands: fp32, or bf16 / fp16 (products on the tensor cores, fp32
    accumulation); gradient buffers may be fp32 for bf16 operands (the head's loss.head_dtype=bf16)."""

    name = "triton"
    workspace_bytes = 0

    def __init__(self, block_n: int | None = None, block_c: int | None = None, max_splits: int | None = None,
                 backward: str = "two_pass", fp32_precision: str | None = None, block_k: int | None = None):
        if backward not in BACKWARDS:
            raise ValueError(f"unknown triton backward {backward!r}; choose one of {', '.join(BACKWARDS)}")
        self.block_n, self.block_c, self.max_splits, self.backward_mode = block_n, block_c, max_splits, backward
        self.fp32_precision, self.block_k = fp32_precision, block_k
        if backward == "atomic":
            self.name = "triton_atomic"

    @staticmethod
    def _check(x_hat, centers):
        if x_hat.dtype not in _DTYPES or centers.dtype != x_hat.dtype:
            raise ValueError(
                f"the triton margin CE takes fp32, bf16 or fp16 embeddings and centers of the same dtype, got "
                f"{x_hat.dtype} and {centers.dtype}; use loss.impl=chunked for other dtypes"
            )
        if x_hat.stride(1) != 1 or centers.stride(1) != 1:
            raise ValueError("the triton margin CE needs row-major embeddings and centers (last stride 1)")

    def _precision(self, x_hat) -> str:
        """tl.dot's input precision: TF32 for fp32 operands on a GPU (bf16 / fp16 go to the tensor cores
        as they are; the setting only concerns fp32), exact fp32 under the interpreter. fp32_precision="ieee"
        asks for exact fp32 products on a GPU too (the tests' 1e-5 contract, run natively)."""
        return self.fp32_precision or ("tf32" if x_hat.is_cuda else "ieee")

    def _tiles(self, kernel: str, n: int, dim: int, element_size: int) -> Tiles:
        """The launch tiles of `kernel` (TILES), with the row / class tile of the constructor where given."""
        tiles = default_tiles(kernel, dim, element_size)
        block_n = min(self.block_n or tiles.block_n, max(16, triton.next_power_of_2(n)))
        return tiles._replace(block_n=block_n, block_c=self.block_c or tiles.block_c, block_k=self.block_k or tiles.block_k)

    def forward(self, x_hat, centers, targets, rows, target_logit, scale: float, *, out_max=None, out_sum=None):
        self._check(x_hat, centers)
        n, dim = x_hat.shape
        used = num_used(centers, rows)
        tiles = self._tiles("forward", n, dim, x_hat.element_size())
        block_n, block_c, block_d = tiles.block_n, tiles.block_c, _block_d(dim)
        row_blocks = triton.cdiv(n, block_n)
        class_blocks = triton.cdiv(used, block_c)
        # enough programs to fill the GPU at small N: split the classes, merge the splits below
        wanted = self.max_splits or max(1, 4 * _sm_count(x_hat.device) // row_blocks)
        splits = max(1, min(wanted, class_blocks))
        per_split = triton.cdiv(class_blocks, splits) * block_c
        splits = max(1, triton.cdiv(used, per_split))
        if splits == 1 and out_max is not None:  # the kernel writes the caller's buffers directly
            part_max, part_sum = out_max.view(1, n), out_sum.view(1, n)
        else:
            part_max = torch.empty(splits, n, dtype=torch.float32, device=x_hat.device)
            part_sum = torch.empty(splits, n, dtype=torch.float32, device=x_hat.device)
        if used == 0:
            part_max.fill_(-math.inf)
            part_sum.zero_()
        else:
            _forward_kernel[(row_blocks, splits)](
                x_hat, centers, rows if rows is not None else targets, targets, target_logit.float().contiguous(),
                part_max, part_sum, n, used, dim, x_hat.stride(0), centers.stride(0), per_split, float(scale),
                HAS_ROWS=rows is not None, EPS=NORM_EPS, INPUT_PRECISION=self._precision(x_hat), UPCAST=_upcast(x_hat),
                BLOCK_N=block_n, BLOCK_C=block_c, BLOCK_D=block_d, num_warps=tiles.num_warps,
                num_stages=tiles.num_stages,
            )
        if splits == 1:
            row_max, row_sum = part_max[0], part_sum[0]
        else:
            row_max = part_max.amax(dim=0)
            row_sum = (part_sum * torch.exp(part_max - row_max)).sum(dim=0)
        if out_max is not None and row_max.data_ptr() != out_max.data_ptr():
            row_max, row_sum = out_max.copy_(row_max), out_sum.copy_(row_sum)
        return row_max, row_sum

    def backward(
        self, x_hat, centers, targets, rows, target_logit, target_slope, lse, coef, scale: float,
        *, need_x: bool = True, need_centers: bool = True, grad_x=None, grad_centers=None,
    ):
        self._check(x_hat, centers)
        n, dim = x_hat.shape
        used = num_used(centers, rows)
        atomic = self.backward_mode == "atomic" and need_x and need_centers and used > 0
        args = (
            x_hat, centers, rows if rows is not None else targets, targets, target_logit.float().contiguous(),
            target_slope.float().contiguous(), lse.float().contiguous(), coef.float().reshape(1),
        )
        common = dict(HAS_ROWS=rows is not None, EPS=NORM_EPS, INPUT_PRECISION=self._precision(x_hat),
                      UPCAST=_upcast(x_hat))
        dx32 = None
        if need_x:
            grad_x = torch.empty_like(x_hat) if grad_x is None else grad_x
            if used == 0:
                grad_x.zero_()
            elif atomic:  # accumulated by _grad_w_kernel below, in fp32 (the caller's buffer when it is fp32)
                plain = grad_x.dtype == torch.float32 and grad_x.is_contiguous()
                dx32 = grad_x.zero_() if plain else torch.zeros(n, dim, dtype=torch.float32, device=x_hat.device)
            else:
                tiles = self._tiles("grad_x", n, dim, x_hat.element_size())
                _grad_x_kernel[(triton.cdiv(n, tiles.block_n),)](
                    *args, grad_x, n, used, dim, x_hat.stride(0), centers.stride(0), grad_x.stride(0), float(scale),
                    **common, **_meta(tiles, dim),
                )
        if need_centers:
            grad_centers = centers_grad_buffer(centers, rows, grad_centers)
            if used:
                tiles = self._tiles("grad_w_atomic" if atomic else "grad_w", n, dim, x_hat.element_size())
                _grad_w_kernel[(triton.cdiv(used, tiles.block_c),)](
                    *args, grad_centers, dx32 if atomic else grad_centers, n, used, dim, x_hat.stride(0),
                    centers.stride(0), grad_centers.stride(0), dx32.stride(0) if atomic else 0, float(scale),
                    ATOMIC_X=atomic, **common, **_meta(tiles, dim),
                )
        if atomic and dx32.data_ptr() != grad_x.data_ptr():
            grad_x.copy_(dx32)
        return grad_x if need_x else None, grad_centers if need_centers else None


def _meta(tiles: Tiles, dim: int) -> dict:
    """The backward kernels' tile constexprs and launch options."""
    block_d = _block_d(dim)
    return dict(BLOCK_N=tiles.block_n, BLOCK_C=tiles.block_c, BLOCK_D=block_d, BLOCK_K=min(block_d, tiles.block_k),
                num_warps=tiles.num_warps, num_stages=tiles.num_stages)


def _upcast(x_hat) -> bool:
    """bf16 operands are upcast before tl.dot under the interpreter only (its bf16 dot is wrong)."""
    return x_hat.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1"


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def compile_launches(x_type: str, w_type: str, dim: int, *, sampled: bool, candidates: bool = False):
    """What TritonMarginCE launches at embedding size `dim` (any N >= its row tile), or with candidates
    the GPU sweep's CANDIDATES, for ahead-of-time compiles (benchmarks/kernel_report.py, the tests): dicts of
    kernel, variant, tiles, fn, signature (triton type strings; x_type / w_type "fp32" or "bf16"),
    constexprs and options. w_type fp32 with x_type bf16: fp32 centers converted to bf16 in registers."""
    element = 2 if x_type == "bf16" else 4
    head = {"x_ptr": "*" + x_type, "w_ptr": "*" + w_type, "rows_ptr": "*i64", "tgt_ptr": "*i64", "tlogit_ptr": "*fp32"}
    dims = {"N": "i32", "C": "i32", "D": "i32", "stride_x": "i32", "stride_w": "i32"}
    grads = {"tslope_ptr": "*fp32", "lse_ptr": "*fp32", "coef_ptr": "*fp32"}
    signatures = {
        "forward": (_forward_kernel, {**head, "max_ptr": "*fp32", "sum_ptr": "*fp32", **dims, "classes_per_split": "i32",
                                      "scale": "fp32"}),
        "grad_x": (_grad_x_kernel, {**head, **grads, "dx_ptr": "*fp32", **dims, "stride_dx": "i32", "scale": "fp32"}),
        "grad_w": (_grad_w_kernel, {**head, **grads, "dw_ptr": "*fp32", "dx_ptr": "*fp32", **dims, "stride_dw": "i32",
                                    "stride_dx": "i32", "scale": "fp32"}),
    }
    for kernel in KERNELS:
        fn, signature = signatures[kernel.removesuffix("_atomic")]
        for tiles in CANDIDATES[kernel] if candidates else (default_tiles(kernel, dim, element),):
            meta = _meta(tiles, dim)
            options = {"num_warps": meta.pop("num_warps"), "num_stages": meta.pop("num_stages")}
            if kernel == "forward":
                del meta["BLOCK_K"]
            consts = dict(HAS_ROWS=sampled, EPS=NORM_EPS, INPUT_PRECISION="tf32", UPCAST=False, **meta)
            if kernel.startswith("grad_w"):
                consts["ATOMIC_X"] = kernel == "grad_w_atomic"
            yield dict(kernel=kernel.removesuffix("_atomic"), variant=_VARIANTS[kernel], fn=fn,
                       signature={**signature, **{k: "constexpr" for k in consts}}, constexprs=consts,
                       options=options, tiles={k: v for k, v in meta.items() if k.startswith("BLOCK")})
