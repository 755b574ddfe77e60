"""Per-shard math of the margin cross entropy, behind one interface with one class per backend.

The class-sharded head (lvface/heads/sharded_softmax.py) orders: backend.forward -> all-reduce ->
backend.backward. A backend never communicates and never holds the [N, C] logits; it sees

  x_hat [N, D]      the gathered unit embeddings (fp32, bf16 or fp16; torch backend also fp64)
  centers [C, D]    W_local or P_local, NOT normalised: the row norms are folded into the pass
  rows [C_used]     sorted int64 rows of `centers` in use (Partial-FC), or None for all C rows
  targets [N]       each row's class as an index into the used rows, -1 where it lives on another rank
  target_logit [N]  s * psi(target cosine), computed once by the head (`target_cosines` below, then
                    Margin.target_value): the margin enters the block by replacing the target column

  forward  -> (row_max [N], row_sum [N]) in fp32 (fp64 for fp64 inputs): the online softmax of the
              row's used logits, sum_j exp(z_nj - row_max_n). O(N) numbers written.
  backward(lse [N] global log-sum-exp, target_slope [N] = psi'(t) or 1, coef = dL/dloss * s / N)
           -> dL/dx_hat [N, D] and dL/dcenters [C, D] (zero outside `rows`), through the row
              normalisation of the centers, recomputing each block from lse:
                 dL/dcos_nj = coef * p_nj,  dL/dcos_ny = coef * (p_ny - 1) * psi'(t_n),  p = exp(z - lse)
                 dx_hat = G @ w_hat;  dw = (g - w_hat (w_hat . g)) / |w|,  g = G^T x_hat
                 (g / eps where |w| <= eps, F.normalize's convention).

Backends: "chunked" = TorchMarginCE here (GEMM per class chunk into a reused [c, N] workspace);
"triton" and "triton_atomic" = TritonMarginCE in kernels/triton_margin_ce.py (imported only when
built, so lvface imports without triton). The names, and what each needs and runs on, are the table
of kernels/registry.py. A new backend is one class with these two methods in its own file here, plus
its row in that table.

Products on CUDA: the torch backend runs fp32 inputs as TF32 products with fp32 accumulation
(10-bit mantissa inputs; insightface's PartialFC_V2 computes its logits in fp16 under autocast, which
is coarser), bf16 / fp16 inputs as bf16 / fp16 tensor-core products with fp32 accumulation. The
Triton backend does the same (tl.dot input_precision "tf32" for fp32 on CUDA, "ieee" elsewhere and
under the interpreter). On the CPU every product is exact fp32 / fp64.

Can the bound |logit| <= s replace the row max and its all-reduce? (kept: no)
Every logit is s * cos or s * psi(cos) <= s (cos <= 1, psi <= 1), so exp(z - s) <= 1 never overflows
and the shift needs no max pass and no all-reduce MAX of N floats. It fails at the bottom of fp32's
range: the smallest normal fp32 is 1.18e-38 = exp(-87.3), the smallest denormal 1.4e-45 = exp(-103.3).
A term exp(z - s) is normal only when z > s - 87.3, i.e. cos > 1 - 87.3 / s:
  s = 64:  cos > -0.364   (logits reach -s (1 + m3) = -64 .. -89.6, so exp(-128) = 2.6e-56 flushes to 0)
  s = 128: cos > +0.318
A row's sum is at least its largest term, so the loss stays accurate while the row's largest cosine is
above that line. At s = 64 that holds for any row of a realistic head; at s = 128 it fails at
initialisation: the largest of 32k random cosines in D = 512 is about 4.2 / sqrt(512) = 0.19 < 0.318,
so the sum is denormal (precision lost) or 0 (loss = inf). Measured (`benchmarks/bench_head.py --micro
bound`, 256 rows against 32,187 random unit centers, D = 512, fp32 sums vs float64 with the max):
s = 32 and 64 agree to 1.4e-7 relative; s = 128 gives an infinite loss on 199 of the 256 rows and
2.9e-2 relative error on the others. loss.scale is a free config value, so the shift by s is not safe
in general. The cost it
would save is small: the running max is free inside the pass (the block is already in registers) and
the all-reduce MAX moves N fp32 numbers (96 KiB at N = 24,576; latency-bound, tens of microseconds on
NVLink), against a pass of milliseconds. We keep the exact online max.
"""

from __future__ import annotations

import contextlib
import math

import torch

NORM_EPS = 1e-12  # F.normalize's default: x / max(||x||, eps)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the per-row statistics and of the accumulation: fp32, or fp64 for fp64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def num_used(centers: torch.Tensor, rows: torch.Tensor | None) -> int:
    return centers.shape[0] if rows is None else rows.numel()


def target_cosines(x_hat: torch.Tensor, centers: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor | None):
    """cos(x_hat_n, centers[row of t_n]) for rows with a target here, 0 elsewhere: [N] in stats_dtype.

    One gather of N center rows and N dot products (O(N * D)), in the accumulation dtype, so the margin
    (any m1, m2, m3, either gradient convention) is evaluated by heads/margin.py on N numbers only.
    """
    acc = stats_dtype(x_hat.dtype)
    if num_used(centers, rows) == 0:
        return torch.zeros(x_hat.shape[0], dtype=acc, device=x_hat.device)
    has_target = targets >= 0
    index = targets.clamp(min=0)
    if rows is not None:
        index = rows.index_select(0, index)
    picked = centers.index_select(0, index).to(acc)  # (N, D)
    norm = picked.norm(dim=1).clamp(min=NORM_EPS)
    cos = (x_hat.to(acc) * picked).sum(dim=1) / norm
    return torch.where(has_target, cos, torch.zeros_like(cos))


def centers_grad_buffer(centers: torch.Tensor, rows: torch.Tensor | None, out: torch.Tensor | None) -> torch.Tensor:
    """Where a backend writes dL/dcenters: the caller's `out`, or a new tensor like `centers`; zeroed when
    only the sampled `rows` will be written (the other rows' gradient is exactly 0)."""
    if out is None:
        return torch.empty_like(centers) if rows is None else torch.zeros_like(centers)
    return out.zero_() if rows is not None else out


@contextlib.contextmanager
def _fast_products(tensor: torch.Tensor):
    """TF32 products for fp32 CUDA matmuls inside the block (restored on exit); a no-op on the CPU."""
    if not tensor.is_cuda or tensor.dtype != torch.float32:
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


# --------------------------------------------------------------------------------------------------
# The torch backend: chunked GEMMs (online softmax over class chunks, recompute in backward)
# --------------------------------------------------------------------------------------------------


def chunk_columns(num_rows: int, embedding_size: int, element_size: int, chunk_bytes: int) -> int:
    """Classes per chunk so that the chunk's temporaries fit `chunk_bytes`: per class, one column of
    the [N, c] logit block plus about three D-rows (normalised centers, their gradient, a gather copy)."""
    return max(1, chunk_bytes // (element_size * (num_rows + 3 * embedding_size)))


def workspace_numel(num_rows: int, embedding_size: int, chunk_cols: int) -> int:
    """Elements of the chunk workspace: the [N, c] block and two [c, D] row buffers."""
    return chunk_cols * (num_rows + 2 * embedding_size)


def _carve(workspace: torch.Tensor, num_rows: int, embedding_size: int, chunk_cols: int):
    """(block [N * c], w_buffer [c * D], g_buffer [c * D]) as flat views of the workspace."""
    block_end = num_rows * chunk_cols
    rows_end = block_end + chunk_cols * embedding_size
    g_end = rows_end + chunk_cols * embedding_size
    return workspace[:block_end], workspace[block_end:rows_end], workspace[rows_end:g_end]


def _normalized_chunk(centers: torch.Tensor, rows: torch.Tensor | None, start: int, stop: int, buffer: torch.Tensor):
    """(w_hat [c, D], inv_norm [c], full_norm [c] bool) for used classes [start, stop)."""
    chunk = centers[start:stop] if rows is None else centers.index_select(0, rows[start:stop])  # (c, D)
    norm = chunk.norm(dim=1)  # (c,)
    inv_norm = 1.0 / norm.clamp(min=NORM_EPS)
    w_hat = torch.mul(chunk, inv_norm.unsqueeze(1), out=buffer[: (stop - start) * chunk.shape[1]].view_as(chunk))
    return w_hat, inv_norm, norm > NORM_EPS


def _target_slots(targets: torch.Tensor, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inside [N] bool, index [1, N]): whether row n's target is in chunk [start, stop), and its
    column within the chunk (clamped, meaningful only where inside). No host sync (no nonzero)."""
    local = targets - start
    inside = (local >= 0) & (local < stop - start)
    return inside, local.clamp(0, stop - start - 1).unsqueeze(0)


def _logits_chunk(x_hat, centers, rows, targets, target_logit, scale: float, start: int, stop: int,
                  w_buffer: torch.Tensor, block: torch.Tensor):
    """The logits z [c, N] of used classes [start, stop) in `block` (s * w_hat @ x_hat^T, each row's target
    entry replaced by its target logit), with the chunk's (w_hat, inv_norm, full_norm) and its target
    slots (inside, index): what forward and the backward recompute share."""
    n = x_hat.shape[0]
    w_hat, inv_norm, full_norm = _normalized_chunk(centers, rows, start, stop, w_buffer)
    z = torch.mm(w_hat, x_hat.t(), out=block[: n * (stop - start)].view(stop - start, n)).mul_(scale)  # (c, N)
    inside, index = _target_slots(targets, start, stop)
    current = z.gather(0, index)[0]
    z.scatter_(0, index, torch.where(inside, target_logit.to(z.dtype), current).unsqueeze(0))
    return z, w_hat, inv_norm, full_norm, inside, index


def _chunks(total: int, size: int):
    for start in range(0, total, size):
        yield start, min(start + size, total)


class TorchMarginCE:
    """The "chunked" backend. Blocks are class-major, z[j, n] for class j of the chunk and row n
    ([c, N], in a reused workspace): the GEMMs w_hat @ x_hat^T, z^T @ w_hat and z @ x_hat run 1.3-1.5x
    faster in that layout on MKL than their [N, c] counterparts, and the per-row reductions are
    reductions over dim 0. Per chunk: z = s * w_hat @ x_hat^T, the target column replaced by the
    row's target logit, then S <- S * exp(m_old - m_new) + sum_j exp(z_j - m_new).

    The workspace (about chunk_bytes) is allocated once and reused by every forward and backward.
    The host only walks the chunk boundaries: no .item(), no nonzero, so no device sync per chunk.
    """

    name = "chunked"

    def __init__(self, chunk_bytes: int = 64 << 20):
        self.chunk_bytes = chunk_bytes
        self._workspace: torch.Tensor | None = None

    @property
    def workspace_bytes(self) -> int:
        workspace = self._workspace
        return 0 if workspace is None else workspace.numel() * workspace.element_size()

    def _prepare(self, x_hat: torch.Tensor, used: int) -> tuple[int, torch.Tensor]:
        n, dim = x_hat.shape
        cols = min(chunk_columns(n, dim, x_hat.element_size(), self.chunk_bytes), max(used, 1))
        needed = workspace_numel(n, dim, cols)
        workspace = self._workspace
        if (
            workspace is None
            or workspace.numel() < needed
            or (workspace.dtype, workspace.device) != (x_hat.dtype, x_hat.device)
        ):
            self._workspace = workspace = x_hat.new_empty(needed)
        return cols, workspace

    def forward(self, x_hat, centers, targets, rows, target_logit, scale: float, *, out_max=None, out_sum=None):
        n, dim = x_hat.shape
        used = num_used(centers, rows)
        acc = stats_dtype(x_hat.dtype)
        run_max = torch.full((n,), -math.inf, dtype=acc, device=x_hat.device)
        run_sum = torch.zeros(n, dtype=acc, device=x_hat.device)
        cols, workspace = self._prepare(x_hat, used)
        block, w_buffer, _ = _carve(workspace, n, dim, cols)
        with _fast_products(x_hat):
            for start, stop in _chunks(used, cols):
                z, *_ = _logits_chunk(x_hat, centers, rows, targets, target_logit, scale, start, stop, w_buffer, block)
                new_max = torch.maximum(run_max, z.amax(dim=0).to(acc))
                run_sum.mul_(torch.exp(run_max - new_max)).add_(z.sub_(new_max.to(z.dtype)).exp_().sum(dim=0, dtype=acc))
                run_max = new_max
        if out_max is not None:
            run_max = out_max.copy_(run_max)
            run_sum = out_sum.copy_(run_sum)
        return run_max, run_sum

    def backward(
        self, x_hat, centers, targets, rows, target_logit, target_slope, lse, coef, scale: float,
        *, need_x: bool = True, need_centers: bool = True, grad_x=None, grad_centers=None,
    ):
        n, dim = x_hat.shape
        used = num_used(centers, rows)
        acc = stats_dtype(x_hat.dtype)
        if need_x:
            grad_x = torch.zeros_like(x_hat, dtype=acc) if grad_x is None else grad_x.zero_()
        if need_centers:
            grad_centers = centers_grad_buffer(centers, rows, grad_centers)
        cols, workspace = self._prepare(x_hat, used)
        block, w_buffer, g_buffer = _carve(workspace, n, dim, cols)
        lse_b, coef_b = lse.to(x_hat.dtype), coef.to(x_hat.dtype)
        with _fast_products(x_hat):
            for start, stop in _chunks(used, cols):
                c = stop - start
                z, w_hat, inv_norm, full_norm, inside, index = _logits_chunk(
                    x_hat, centers, rows, targets, target_logit, scale, start, stop, w_buffer, block)
                grad_z = z.sub_(lse_b).exp_()  # (c, N) probabilities p
                p_target = grad_z.gather(0, index)[0]
                adjusted = (p_target - 1.0) * target_slope.to(z.dtype)
                grad_z.scatter_(0, index, torch.where(inside, adjusted, p_target).unsqueeze(0))
                grad_z.mul_(coef_b)  # now dL/dcos
                if need_x:
                    if grad_x.dtype == x_hat.dtype:
                        grad_x.addmm_(grad_z.t(), w_hat)
                    else:  # bf16/fp16 products, fp32 accumulation across chunks
                        grad_x.add_(torch.mm(grad_z.t(), w_hat))
                if need_centers:
                    out = grad_centers[start:stop] if rows is None else g_buffer[: c * dim].view(c, dim)
                    g_hat = torch.mm(grad_z, x_hat, out=out)  # (c, D) dL/dw_hat
                    radial = torch.bmm(w_hat.unsqueeze(1), g_hat.unsqueeze(2)).view(c) * full_norm  # (c,)
                    g_hat.addcmul_(w_hat, radial.unsqueeze(1), value=-1.0).mul_(inv_norm.unsqueeze(1))
                    if rows is not None:
                        grad_centers.index_copy_(0, rows[start:stop], g_hat)
        if need_x:
            grad_x = grad_x.to(x_hat.dtype)
        return grad_x if need_x else None, grad_centers if need_centers else None
