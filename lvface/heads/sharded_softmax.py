"""Class-sharded (tensor-parallel) margin softmax: gather, sample, distributed cross entropy.

Every rank is data-parallel for the backbone and class-parallel for the head. Classes are split over
the group's W ranks in contiguous ranges, the first C mod W ranks holding one more class. One step:

  local embeddings [B, D], labels [B]
    -> all_gather (autograd-aware; backward reduce-scatters, x W)   -> [N = B * W, D], [N]
    -> Partial-FC sampling of this shard's classes (early stages)   -> rows [C_used] of W_local
    -> margin softmax over the sharded classes: local (max, sum-exp, target logit) -> all_reduce
    -> loss = mean_n (logsumexp_n - target logit_n), identical on every rank

What crosses the wire per step: 4 numbers per rank first (batch size, label count and range, all_gathered
so that bad input raises on every rank before a collective can hang), the embeddings and labels
(all_gather of N x D and N), one all-reduce MAX of N numbers and one all-reduce SUM of 2N numbers per
cross-entropy term (W, and P in the stable stage), and in backward one reduce-scatter of N x D.
Nothing proportional to the number of classes.

Two implementations of the cross entropy, picked by `impl`:
- "chunked" (production): walks the used classes in chunks of `chunk_cols` columns, sized from a
  memory budget, keeping per-row running (max, sum-exp, target logit) - the online softmax - and
  recomputes each chunk in backward. The [N, C_local] logits never exist; the margin is applied inside
  the pass, to each row's target cosine only, before the chunk enters the max and the sum-exp.
- "dense": the same math with autograd over the full [N, C_used] block (tests, benchmark baseline).
IMPLS maps the names to functions of one signature, so a fused kernel can be added beside them.
"""

from __future__ import annotations

import functools
import logging
import math
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lvface.heads.margin import Margin, margin_from_config
from lvface.heads.prototypes import (
    check_stage,
    class_feature_sums,
    describe_stage,
    merge_class_sums,
    update_prototypes_,
    uses_learned_centers,
)

log = logging.getLogger(__name__)

_NORM_EPS = 1e-12  # F.normalize's default: x / max(||x||, eps)
_INIT_STD = 0.01
_INIT_BLOCK = 4096  # classes per independently seeded block of the initial centers


# --------------------------------------------------------------------------------------------------
# Shards and initialisation
# --------------------------------------------------------------------------------------------------


def shard_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """(class_start, num_local_classes) of `rank`: contiguous ranges, the first C mod W ranks one more."""
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, base + (1 if rank < extra else 0)


def _mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 folded over them): counter-based, so a stream can be
    recreated from (seed, step, shard) after a resume without saving generator state."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (int(value) & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
        state = (state + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        state = z ^ (z >> 31)
    return state >> 1


def init_centers(num_classes: int, embedding_size: int, class_start: int, count: int, seed: int) -> torch.Tensor:
    """Rows [class_start, class_start + count) of the global N(0, 0.01) center matrix, fp32 on the CPU.

    The global matrix is generated in blocks of _INIT_BLOCK classes, each from its own seeded
    generator, so a row's value depends on (seed, class) only: any world size builds the same global W,
    and no rank ever materialises more than one block beyond its shard.
    """
    out = torch.empty(count, embedding_size)
    first, last = class_start // _INIT_BLOCK, (class_start + count - 1) // _INIT_BLOCK
    for block in range(first, last + 1 if count else first):
        block_start = block * _INIT_BLOCK
        block_rows = min(_INIT_BLOCK, num_classes - block_start)
        generator = torch.Generator().manual_seed(_mix_seed(seed, block))
        lo, hi = max(class_start, block_start), min(class_start + count, block_start + block_rows)
        if (lo, hi) == (block_start, block_start + block_rows):  # whole block: generate in place
            out[lo - class_start : hi - class_start].normal_(0.0, _INIT_STD, generator=generator)
        else:  # a block cut by the shard edge (at most two per shard)
            values = torch.empty(block_rows, embedding_size).normal_(0.0, _INIT_STD, generator=generator)
            out[lo - class_start : hi - class_start] = values[lo - block_start : hi - block_start]
    return out


# --------------------------------------------------------------------------------------------------
# Collectives (thin; every one names its group)
# --------------------------------------------------------------------------------------------------

# Wall seconds this process spent inside the head's collectives, read and reset once per step by
# lvface.metrics (a per-process clock, not a rank). On gloo a collective returns when it is done; on
# NCCL it returns once enqueued, so the figure is exact on the CPU and a lower bound on CUDA unless
# the metrics synchronise the device.
_collective_seconds = 0.0


def take_collective_seconds() -> float:
    """Seconds spent in the head's collectives since the last call (and reset the clock)."""
    global _collective_seconds
    seconds, _collective_seconds = _collective_seconds, 0.0
    return seconds


def _timed_collective(fn):
    @functools.wraps(fn)
    def timed(*args, **kwargs):
        global _collective_seconds
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _collective_seconds += time.perf_counter() - start

    return timed


@_timed_collective

def _all_gather_rows(local: torch.Tensor, group, world_size: int) -> torch.Tensor:
    """[B, ...] on each rank -> [W * B, ...], rank r's rows at [r * B, (r + 1) * B)."""
    if world_size == 1:
        return local
    out = local.new_empty((world_size * local.shape[0],) + tuple(local.shape[1:]))
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, local.contiguous(), group=group)
    return out


@_timed_collective
def _reduce_scatter_rows(full: torch.Tensor, group, world_size: int) -> torch.Tensor:
    """[W * B, ...] on each rank -> [B, ...]: rank r gets the sum over ranks of rows [r * B, (r + 1) * B)."""
    if world_size == 1:
        return full
    out = full.new_empty((full.shape[0] // world_size,) + tuple(full.shape[1:]))
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    scatter(out, full.contiguous(), op=dist.ReduceOp.SUM, group=group)
    return out


@_timed_collective
def _all_reduce(tensor: torch.Tensor, op, group, world_size: int) -> torch.Tensor:
    if world_size > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


class _GatherEmbeddings(torch.autograd.Function):
    """all_gather forward; reduce-scatter x W backward.

    Why x W: the loss L is replicated (every rank computes the same value), and rank r's graph only
    holds the part of dL/d(gathered rows) that flows through its own class shard. The full gradient of
    row n is the sum of those parts over ranks - the reduce-scatter sum delivers it to the rank that
    owns row n. The DeepSpeed engine then averages the backbone gradient over ranks, dividing by W;
    multiplying by W here makes that average equal the gradient of the same global batch on one process:
      (1/W) sum_r sum_{n in r} (W * dL/de_n) de_n/dtheta = sum_n dL/de_n de_n/dtheta.
    """

    @staticmethod
    def forward(ctx, local: torch.Tensor, group, world_size: int) -> torch.Tensor:
        ctx.group, ctx.world_size = group, world_size
        return _all_gather_rows(local, group, world_size)

    @staticmethod
    def backward(ctx, grad_gathered: torch.Tensor):
        grad_local = _reduce_scatter_rows(grad_gathered, ctx.group, ctx.world_size)
        return grad_local * ctx.world_size, None, None


class _AllReduceSumReplicated(torch.autograd.Function):
    """Sum over ranks forward; identity backward.

    Each rank backpropagates the same replicated loss, so dL/d(sum) is the same on every rank, and
    d(sum)/d(local part) = 1: the local part's gradient is the incoming gradient, with no communication.
    """

    @staticmethod
    def forward(ctx, local: torch.Tensor, group, world_size: int) -> torch.Tensor:
        return _all_reduce(local.clone(), dist.ReduceOp.SUM, group, world_size)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None, None


def gather_embeddings(local_embeddings: torch.Tensor, group, world_size: int) -> torch.Tensor:
    """[B, D] -> [W * B, D], autograd-aware (backward: reduce-scatter x W, see _GatherEmbeddings)."""
    if world_size == 1:
        return local_embeddings
    return _GatherEmbeddings.apply(local_embeddings, group, world_size)


# --------------------------------------------------------------------------------------------------
# Distributed margin cross entropy: dense reference path
# --------------------------------------------------------------------------------------------------


def dense_margin_cross_entropy(
    normalized_embeddings: torch.Tensor,
    centers: torch.Tensor,
    local_targets: torch.Tensor,
    margin: Margin,
    *,
    group,
    world_size: int,
    rows: torch.Tensor | None = None,
    chunk_bytes: int = 0,
    workspace: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean margin CE of the global batch against the sharded classes, with autograd over the full
    [N, C_used] block. Arguments as `chunked_margin_cross_entropy` (chunk_bytes, workspace ignored)."""
    used = centers if rows is None else centers.index_select(0, rows)
    cos = normalized_embeddings @ F.normalize(used, dim=1, eps=_NORM_EPS).t()  # (N, C_used)
    has_target = local_targets >= 0
    target_rows = has_target.nonzero(as_tuple=True)[0]
    target_cols = local_targets[target_rows]
    target_mask = torch.zeros_like(cos, dtype=torch.bool)
    target_mask[target_rows, target_cols] = True
    logits = margin.logits(cos, target_mask)  # (N, C_used)
    n = cos.shape[0]
    local_max = logits.detach().amax(dim=1) if cos.shape[1] else cos.new_full((n,), -math.inf)
    global_max = _all_reduce(local_max.clone(), dist.ReduceOp.MAX, group, world_size)  # (N,)
    local_sum = (logits - global_max.unsqueeze(1)).exp().sum(dim=1)  # (N,)
    local_target = torch.zeros_like(local_sum).index_put((target_rows,), logits[target_rows, target_cols])
    stats = _AllReduceSumReplicated.apply(torch.stack([local_sum, local_target]), group, world_size)  # (2, N)
    return (global_max + stats[0].log() - stats[1]).mean()


# --------------------------------------------------------------------------------------------------
# Distributed margin cross entropy: chunked (online softmax, recompute in backward)
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
    inv_norm = 1.0 / norm.clamp(min=_NORM_EPS)
    w_hat = torch.mul(chunk, inv_norm.unsqueeze(1), out=buffer[: (stop - start) * chunk.shape[1]].view_as(chunk))
    return w_hat, inv_norm, norm > _NORM_EPS


def _targets_in_chunk(local_targets: torch.Tensor, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = ((local_targets >= start) & (local_targets < stop)).nonzero(as_tuple=True)[0]
    return rows, local_targets[rows] - start


def _chunks(total: int, size: int):
    for start in range(0, total, size):
        yield start, min(start + size, total)


class _ChunkedMarginCE(torch.autograd.Function):
    """Online-softmax margin CE over class chunks; the collectives are in forward only.

    Blocks are class-major, z[j, n] for class j of the chunk and row n ([c, N], in a reused workspace):
    the GEMMs w_hat @ x_hat^T, z^T @ w_hat and z @ x_hat run 1.3-1.5x faster in that layout on MKL than
    their [N, c] counterparts, and the per-row reductions are reductions over dim 0.

    Forward, per chunk of used classes: cos = w_hat @ x_hat^T [c, N]; the target
    cosines t_n of the rows whose class is in the chunk are read out, the block is scaled by s and the
    target entries overwritten with s * psi(t_n); then the running row max m and sum-exp S (relative to
    m) are updated: S <- S * exp(m_old - m_new) + sum_j exp(z_j - m_new). After the pass: all_reduce MAX
    of m, rescale S to the global max, all_reduce SUM of (S, target logit): lse_n = m_n + log S_n.

    Backward, per chunk (recomputed, same arithmetic): p = exp(z - lse) is the softmax column block
    with the global normaliser, and with L = mean_n (lse_n - z_{n,y_n}):
      dL/dcos_nj = (s / N) * p_nj                          j not the target
      dL/dcos_ny = (s / N) * (p_ny - 1) * psi'(t_n)         psi' = 1 under the insightface convention
    grad x_hat += G^T @ w_hat; grad w_hat = G @ x_hat, through the row normalisation
    w_hat = w / max(|w|, eps): grad w = (g - w_hat (w_hat . g)) / |w| (g / eps where |w| <= eps).
    The max needs no gradient: lse is invariant to the shift.
    """

    @staticmethod
    def forward(
        ctx, x_hat, centers, local_targets, rows, margin: Margin, group, world_size: int, chunk_cols: int, workspace
    ):
        n, dim = x_hat.shape
        num_used = centers.shape[0] if rows is None else rows.numel()
        s = margin.scale
        run_max = x_hat.new_full((n,), -math.inf)
        run_sum = x_hat.new_zeros(n)
        target_cos = x_hat.new_zeros(n)
        local_target_logit = x_hat.new_zeros(n)
        block, w_buffer, _ = _carve(workspace, n, dim, chunk_cols)
        for start, stop in _chunks(num_used, chunk_cols):
            w_hat, _, _ = _normalized_chunk(centers, rows, start, stop, w_buffer)
            z = torch.mm(w_hat, x_hat.t(), out=block[: n * (stop - start)].view(stop - start, n))  # (c, N) cos
            t_rows, t_cols = _targets_in_chunk(local_targets, start, stop)
            t_cos = z[t_cols, t_rows]
            z.mul_(s)
            t_logit = s * margin.target_value(t_cos)
            z[t_cols, t_rows] = t_logit
            target_cos[t_rows] = t_cos
            local_target_logit[t_rows] = t_logit
            new_max = torch.maximum(run_max, z.amax(dim=0))
            run_sum.mul_(torch.exp(run_max - new_max)).add_(z.sub_(new_max).exp_().sum(dim=0))
            run_max = new_max
        global_max = _all_reduce(run_max.clone(), dist.ReduceOp.MAX, group, world_size)  # (N,)
        stats = torch.stack([run_sum * torch.exp(run_max - global_max), local_target_logit])  # (2, N)
        _all_reduce(stats, dist.ReduceOp.SUM, group, world_size)
        lse = global_max + stats[0].log()
        ctx.save_for_backward(x_hat, centers, local_targets, rows, lse, target_cos, local_target_logit)
        ctx.margin, ctx.chunk_cols, ctx.workspace = margin, chunk_cols, workspace
        return (lse - stats[1]).mean()

    @staticmethod
    def backward(ctx, grad_loss):
        x_hat, centers, local_targets, rows, lse, target_cos, local_target_logit = ctx.saved_tensors
        margin, chunk_cols, workspace = ctx.margin, ctx.chunk_cols, ctx.workspace
        n, dim = x_hat.shape
        num_used = centers.shape[0] if rows is None else rows.numel()
        s = margin.scale
        coef = grad_loss * (s / n)
        target_slope = margin.target_slope(target_cos)
        need_x, need_centers = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = torch.zeros_like(x_hat) if need_x else None
        grad_centers = None
        if need_centers:
            grad_centers = torch.empty_like(centers) if rows is None else torch.zeros_like(centers)
        block, w_buffer, g_buffer = _carve(workspace, n, dim, chunk_cols)
        for start, stop in _chunks(num_used, chunk_cols):
            c = stop - start
            w_hat, inv_norm, full_norm = _normalized_chunk(centers, rows, start, stop, w_buffer)
            z = torch.mm(w_hat, x_hat.t(), out=block[: n * c].view(c, n)).mul_(s)  # (c, N) logits
            t_rows, t_cols = _targets_in_chunk(local_targets, start, stop)
            z[t_cols, t_rows] = local_target_logit[t_rows]
            grad_z = z.sub_(lse).exp_()  # (c, N) probabilities p
            grad_z[t_cols, t_rows] = (grad_z[t_cols, t_rows] - 1.0) * target_slope[t_rows]
            grad_z.mul_(coef)  # now dL/dcos
            if need_x:
                grad_x.addmm_(grad_z.t(), w_hat)
            if need_centers:
                out = grad_centers[start:stop] if rows is None else g_buffer[: c * dim].view(c, dim)
                g_hat = torch.mm(grad_z, x_hat, out=out)  # (c, D) dL/dw_hat
                radial = torch.bmm(w_hat.unsqueeze(1), g_hat.unsqueeze(2)).view(c) * full_norm  # (c,) w_hat . g
                g_hat.addcmul_(w_hat, radial.unsqueeze(1), value=-1.0).mul_(inv_norm.unsqueeze(1))
                if rows is not None:
                    grad_centers.index_copy_(0, rows[start:stop], g_hat)
        return grad_x, grad_centers, None, None, None, None, None, None, None


def chunked_margin_cross_entropy(
    normalized_embeddings: torch.Tensor,
    centers: torch.Tensor,
    local_targets: torch.Tensor,
    margin: Margin,
    *,
    group,
    world_size: int,
    rows: torch.Tensor | None = None,
    chunk_bytes: int = 64 << 20,
    workspace: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean margin CE of the global batch against the sharded classes, never holding [N, C_used].

    normalized_embeddings [N, D]: the gathered global batch, unit rows (gradient flows back).
    centers [C_local, D]: W_local or P_local (rows are normalised inside; gradient only if required).
    local_targets [N] int64: each row's class as an index into the used centers (into `rows` when given),
      -1 where the class lives on another rank.
    rows [C_used] int64 sorted, or None for all C_local rows: the sampled classes.
    workspace: a flat tensor of at least workspace_numel(N, D, cols) elements (same dtype and device)
      reused for the chunk temporaries by forward and backward; None allocates one for this call. The
      head keeps one across steps, so the chunk memory is allocated once.
    Wire: all_reduce MAX of N numbers, all_reduce SUM of 2N numbers. Returns the scalar loss, identical
    on every rank. Extra memory: the W-sized gradient of `centers` plus about chunk_bytes.
    """
    n, dim = normalized_embeddings.shape
    num_used = centers.shape[0] if rows is None else rows.numel()
    cols = min(chunk_columns(n, dim, normalized_embeddings.element_size(), chunk_bytes), max(num_used, 1))
    needed = workspace_numel(n, dim, cols)
    if workspace is None or workspace.numel() < needed:
        workspace = normalized_embeddings.new_empty(needed)
    if workspace.dtype != normalized_embeddings.dtype or workspace.device != normalized_embeddings.device:
        raise ValueError(f"chunk workspace is {workspace.dtype} on {workspace.device}; the embeddings are "
                         f"{normalized_embeddings.dtype} on {normalized_embeddings.device}")
    return _ChunkedMarginCE.apply(
        normalized_embeddings, centers, local_targets, rows, margin, group, world_size, cols, workspace
    )


IMPLS = {"dense": dense_margin_cross_entropy, "chunked": chunked_margin_cross_entropy}


# --------------------------------------------------------------------------------------------------
# Partial-FC sampling
# --------------------------------------------------------------------------------------------------


def sample_rows(
    positives: torch.Tensor, num_local: int, sample_rate: float, generator: torch.Generator
) -> torch.Tensor | None:
    """Sorted local rows to keep: every positive, then uniformly random negatives up to
    int(sample_rate * num_local) rows in all (all positives are kept when they exceed it).
    None when every row would be kept."""
    budget = max(int(sample_rate * num_local), positives.numel())
    if budget >= num_local:
        return None
    score = torch.rand(num_local, generator=generator)  # uniform; top-k of iid uniforms = uniform subset
    score[positives.cpu()] = 2.0  # positives first
    return torch.topk(score, budget, sorted=False).indices.sort().values


# --------------------------------------------------------------------------------------------------
# The head
# --------------------------------------------------------------------------------------------------


class ShardedMarginHead(nn.Module):
    """LVFace's classification head, class-sharded over `group` (see the module docstring).

    weight [C_local, D]: the learned centers W_local, N(0, 0.01), identical global W for any world size.
    prototypes [C_local, D] buffer: EPL empirical prototypes P_local (zero until a class is seen).
    forward(local_embeddings [B, D], local_labels [B]) -> scalar loss, identical on every rank; backward
    gives dL/d local_embeddings x W (for the engine's average) and dL/dW_local.

    Order of one training step (gradient accumulation: forward/backward per micro-batch, then the rest):
      loss = head(emb, labels); loss.backward()   (per micro-batch)
      engine.step(); head_opt.step(); head.update_prototypes()
    update_prototypes() runs after backward because the chunked path recomputes from P in backward;
    forward only stores this shard's per-class feature sums (no grad).
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        loss_cfg,
        *,
        group: dist.ProcessGroup | None,
        impl: str = "chunked",
        chunk_bytes: int = 64 << 20,
        seed: int = 0,
    ):
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"head impl {impl!r} is unknown; choose one of {', '.join(IMPLS)}")
        if group is None:
            self.rank, self.world_size = 0, 1
        else:
            self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        if num_classes < self.world_size:
            raise ValueError(f"num_classes {num_classes} is smaller than the head's world size {self.world_size}")
        if embedding_size < 1:
            raise ValueError(f"embedding_size must be positive, got {embedding_size}")
        if not loss_cfg.stages:
            raise ValueError("loss.stages is empty; give at least one stage")
        self.group = group
        self.num_classes, self.embedding_size = num_classes, embedding_size
        self.loss_cfg = loss_cfg
        self.margin = margin_from_config(loss_cfg)
        self.impl, self.chunk_bytes, self.seed = impl, chunk_bytes, seed
        self.class_start, self.num_local_classes = shard_range(num_classes, self.world_size, self.rank)
        self.class_end = self.class_start + self.num_local_classes
        centers = init_centers(num_classes, embedding_size, self.class_start, self.num_local_classes, seed)
        self.weight = nn.Parameter(centers)  # (C_local, D)
        self.register_buffer("prototypes", torch.zeros(self.num_local_classes, embedding_size))
        self.sample_step = 0
        """Forwards that drew a Partial-FC sample: the counter of the sampling stream (checkpointed)."""
        self.last_sampled_rows: torch.Tensor | None = None
        """Local rows used by the last forward (None: all); global ids are class_start + rows."""
        self._touched: torch.Tensor | None = None
        self._all_touched = False
        self._pending_sums: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._workspace: torch.Tensor | None = None
        self.stage = None
        self.set_stage(loss_cfg.stages[0])

    # ---- stages ---------------------------------------------------------------------------------

    def set_stage(self, stage) -> None:
        """Switch the loss to `stage` (a StageConfig); logged on rank 0 when it changes."""
        check_stage(stage)
        if stage != self.stage and self.rank == 0:
            before = f"'{self.stage.name}'" if self.stage is not None else "start"
            log.info("head stage %s -> %s", before, describe_stage(stage))
        self.stage = stage

    # ---- forward --------------------------------------------------------------------------------

    def _check_global_batch(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> None:
        """Gather (B, labels, min label, max label) from every rank and raise the same error on all of
        them for mismatched batch sizes or a label outside [0, C), before any collective can hang."""
        if local_embeddings.dim() != 2 or local_embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"head expects embeddings [B, {self.embedding_size}], got {tuple(local_embeddings.shape)}; "
                "check model.num_features"
            )
        if local_labels.dim() != 1 or local_labels.dtype.is_floating_point or local_labels.dtype == torch.bool:
            raise ValueError(f"head expects integer labels [B], got {local_labels.dtype} {tuple(local_labels.shape)}")
        labels = local_labels.detach()
        low = int(labels.min()) if labels.numel() else 0
        high = int(labels.max()) if labels.numel() else 0
        meta = torch.tensor(
            [[local_embeddings.shape[0], labels.numel(), low, high]], dtype=torch.int64, device=local_embeddings.device
        )
        everyone = _all_gather_rows(meta, self.group, self.world_size).tolist()  # (W, 4)
        sizes = [row[0] for row in everyone]
        counts = [row[1] for row in everyone]
        if sizes != counts:
            raise ValueError(f"embeddings and labels differ in length: per rank embeddings {sizes}, labels {counts}")
        if len(set(sizes)) != 1 or sizes[0] == 0:
            raise ValueError(
                f"batch sizes differ across ranks or are empty: {sizes} (rank order); every rank must pass "
                "the same non-zero number of embeddings per step (drop the last partial batch in the loader)"
            )
        for rank, (_, _, low, high) in enumerate(everyone):
            for value in (low, high):
                if not 0 <= value < self.num_classes:
                    raise ValueError(
                        f"label {value} (rank {rank}) is outside [0, {self.num_classes}): check data.num_classes "
                        "and the labels of the training data"
                    )

    def _chunk_workspace(self, x_hat: torch.Tensor) -> torch.Tensor | None:
        """The chunked path's temporaries, allocated once and reused by every forward and backward
        (the W and P terms run one after the other), so the chunk memory is a fixed ~chunk_bytes."""
        if self.impl != "chunked":
            return None
        n, dim = x_hat.shape
        cols = min(chunk_columns(n, dim, x_hat.element_size(), self.chunk_bytes), max(self.num_local_classes, 1))
        needed = workspace_numel(n, dim, cols)
        workspace = self._workspace
        if (
            workspace is None
            or workspace.numel() < needed
            or (workspace.dtype, workspace.device) != (x_hat.dtype, x_hat.device)
        ):
            self._workspace = workspace = x_hat.new_empty(needed)
        return workspace

    @property
    def workspace_bytes(self) -> int:
        """Bytes of the chunked path's reused workspace (0 before the first forward, or on the dense path)."""
        workspace = self._workspace
        return 0 if workspace is None else workspace.numel() * workspace.element_size()

    def _cross_entropy(self, x_hat, centers, targets, rows) -> torch.Tensor:
        return IMPLS[self.impl](
            x_hat, centers, targets, self.margin, group=self.group, world_size=self.world_size, rows=rows,
            chunk_bytes=self.chunk_bytes, workspace=self._chunk_workspace(x_hat),
        )

    def _center_penalty(self, local_labels: torch.Tensor) -> torch.Tensor:
        """mean_n ||normalize(W_{y_n}) - P_{y_n}||^2 over the global batch (rows whose class is here
        contribute locally; one all-reduce sums them)."""
        mine = (local_labels >= 0).nonzero(as_tuple=True)[0]
        classes = local_labels[mine]
        w_hat = F.normalize(self.weight.index_select(0, classes), dim=1, eps=_NORM_EPS)  # (T, D)
        local = (w_hat - self.prototypes.index_select(0, classes)).pow(2).sum()
        total = _AllReduceSumReplicated.apply(local.reshape(1), self.group, self.world_size)
        return total[0] / local_labels.numel()

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        self._check_global_batch(local_embeddings, local_labels)
        stage = self.stage
        dtype = self.weight.dtype
        # The global batch, in the head's precision (fp32 gather; the gradient returns in fp32 too).
        gathered = gather_embeddings(local_embeddings.to(dtype), self.group, self.world_size)  # (N, D)
        labels = _all_gather_rows(local_labels.detach().to(torch.int64), self.group, self.world_size)  # (N,)
        labels = labels.to(self.weight.device)
        x_hat = F.normalize(gathered, dim=1, eps=_NORM_EPS)  # (N, D)
        in_shard = (labels >= self.class_start) & (labels < self.class_end)
        local_labels_all = torch.where(in_shard, labels - self.class_start, torch.full_like(labels, -1))  # (N,)

        rows = None
        if self.training and stage.sample_rate < 1.0:
            generator = torch.Generator().manual_seed(_mix_seed(self.seed, self.sample_step, self.class_start))
            self.sample_step += 1
            positives = local_labels_all[in_shard].unique()
            rows = sample_rows(positives, self.num_local_classes, stage.sample_rate, generator)
            rows = rows.to(labels.device) if rows is not None else None
        targets = local_labels_all
        if rows is not None:
            # positives are all in `rows`, so searchsorted finds each one's position exactly
            targets = torch.where(in_shard, torch.searchsorted(rows, local_labels_all.clamp(min=0)), local_labels_all)
        self.last_sampled_rows = rows

        if stage.centers == "learned":
            loss = self._cross_entropy(x_hat, self.weight, targets, rows)
        elif stage.centers == "prototypes":
            loss = self._cross_entropy(x_hat, self.prototypes, targets, rows)
        else:
            weight_p = stage.prototype_weight
            loss = (1.0 - weight_p) * self._cross_entropy(x_hat, self.weight, targets, rows)
            loss = loss + weight_p * self._cross_entropy(x_hat, self.prototypes, targets, rows)
        if stage.center_penalty > 0.0:
            loss = loss + stage.center_penalty * self._center_penalty(local_labels_all)

        if self.training:
            self._record_step(x_hat.detach(), local_labels_all, in_shard, rows, stage)
        return loss

    # ---- bookkeeping between forward and the optimizer / prototype update -------------------------

    @torch.no_grad()
    def _record_step(self, x_hat, local_labels_all, in_shard, rows, stage) -> None:
        mine = in_shard.nonzero(as_tuple=True)[0]
        if mine.numel():
            self._pending_sums.append(class_feature_sums(x_hat.index_select(0, mine), local_labels_all[mine]))
        if not uses_learned_centers(stage):
            return
        if stage.centers == "prototypes":
            rows = local_labels_all[mine]  # only the penalty touches W: the positive rows
        if rows is None:
            self._all_touched = True
            return
        if self._touched is None:
            self._touched = torch.zeros(self.num_local_classes, dtype=torch.bool, device=self.weight.device)
        self._touched[rows] = True

    def touched_rows(self) -> torch.Tensor | None:
        """Local rows of W that took part since the last clear (sorted int64), or None for all rows."""
        if self._all_touched:
            return None
        if self._touched is None:
            return torch.zeros(0, dtype=torch.int64, device=self.weight.device)
        return self._touched.nonzero(as_tuple=True)[0]

    def clear_touched_rows(self) -> None:
        self._touched, self._all_touched = None, False

    @torch.no_grad()
    def update_prototypes(self) -> int:
        """Apply the EPL update for the classes of this shard seen since the last call (all micro-batches
        of the step merged: once per class, from the class mean). Call after backward. Returns the number
        of classes updated."""
        if not self._pending_sums:
            return 0
        rows, sums, counts = merge_class_sums(self._pending_sums)
        self._pending_sums = []
        cfg = self.loss_cfg
        mode, momentum = cfg.prototype_update, cfg.prototype_momentum
        update_prototypes_(self.prototypes, rows, sums, counts, mode=mode, momentum=momentum)
        return int(rows.numel())

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
            f"rank={self.rank}/{self.world_size}, "
            f"classes=[{self.class_start}, {self.class_end}), impl={self.impl}, margin={self.margin}"
        )
