"""Class-sharded (tensor-parallel) margin softmax: gather, sample, distributed cross entropy.

Every rank is data-parallel for the backbone and class-parallel for the head. Classes are split over
the group's W ranks in contiguous ranges, the first C mod W ranks holding one more class. One step:

  local embeddings [B, D], labels [B]
    -> all_gather (autograd-aware; backward reduce-scatters, x W)   -> [N = B * W, D], [N]
    -> Partial-FC sampling of this shard's classes (early stages)   -> rows [C_used] of W_local
    -> margin softmax over the sharded classes: local (max, sum-exp, target logit) -> all_reduce
    -> loss = mean_n (logsumexp_n - target logit_n), identical on every rank

What crosses the wire per step: at the first forward (and when a rank's batch shape changes) 4 numbers
per rank first (batch size, label count and range, all_gathered so that bad input raises on every rank
before a collective can hang; later forwards check the labels on the device), the embeddings and labels
(all_gather of N x D and N), one all-reduce MAX of N numbers and one all-reduce SUM of 2N numbers per
cross-entropy term (W, and P in the stable stage), and in backward one reduce-scatter of N x D.
Nothing proportional to the number of classes.

Implementations of the cross entropy, picked by loss.impl from the table of kernels/registry.py
(which also says where each runs, which EPL update goes with it and what `auto` picks; resolved at
the first forward, when the device is known, and logged once):
- "chunked": the torch backend of lvface/kernels/margin_ce.py - GEMMs over class chunks into a reused
  workspace of loss.chunk_mb, per-row running (max, sum-exp) - the online softmax - and recompute of
  each chunk in backward. The [N, C_local] logits never exist.
- "triton": the fused kernels of lvface/kernels/triton_margin_ce.py (CUDA, or the interpreter): the
  same math in registers, O(N) numbers written in forward, O(N * D) extra memory in backward.
  Deterministic: backward recomputes the logits in two passes (dx, then d centers).
- "triton_atomic": the same kernels with a one-pass backward that adds dx with fp32 atomics (one
  product fewer, sums not bitwise reproducible); which is faster is measured by benchmarks/gpu_check.sh.
- "dense": the same math with autograd over the full [N, C_used] block (tests, benchmark baseline).
Every blockwise backend runs under one autograd Function (_MarginCrossEntropy): this module holds the
collectives and their order, kernels/ the per-shard math; a new backend is one file in kernels/ and
one row of the registry.
Operands (loss.head_dtype): W, P and their gradients stay fp32; with bf16 the Triton kernels read bf16
copies of the unit embeddings and of W / P (one copy per head step, kept while the tensor is unchanged),
the margin is taken at the fp32 target cosine, and products, statistics and the loss accumulate in fp32.
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
from lvface.heads.curriculum import describe_stage, uses_learned_centers
from lvface.kernels import registry
from lvface.kernels.epl_update import epl_update_
from lvface.kernels.margin_ce import NORM_EPS, TorchMarginCE, target_cosines
from lvface.kernels.pfc_sample import mix_seed, sample_seed, select_rows

log = logging.getLogger(__name__)

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
        generator = torch.Generator().manual_seed(mix_seed(seed, block))
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
) -> torch.Tensor:
    """Mean margin CE of the global batch against the sharded classes, with autograd over the full
    [N, C_used] block: the reference of the blockwise path. Arguments as `blockwise_margin_cross_entropy`."""
    used = centers if rows is None else centers.index_select(0, rows)
    cos = normalized_embeddings @ F.normalize(used, dim=1, eps=NORM_EPS).t()  # (N, C_used)
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
# Distributed margin cross entropy: one autograd Function over the backends of kernels/margin_ce.py
# --------------------------------------------------------------------------------------------------


class _MarginCrossEntropy(torch.autograd.Function):
    """backend.forward -> all-reduce -> backend.backward, for every blockwise backend.

    Forward: the head evaluates the margin on the N target cosines (s * psi(t_n), rows whose class is
    on another rank get 0); the backend walks the used classes and returns the per-row running max m
    and sum-exp S relative to it (the online softmax, the target column replaced by the target logit
    inside the block). Then all_reduce MAX of m, S rescaled to the global max, all_reduce SUM of
    (S, target logit): lse_n = m_n + log S_n, loss = mean_n (lse_n - z_{n,y_n}).

    Backward (no communication): with p = exp(z - lse) the softmax with the global normaliser,
      dL/dcos_nj = (s / N) p_nj,   dL/dcos_ny = (s / N) (p_ny - 1) psi'(t_n)   (psi' = 1: insightface)
    and the backend recomputes each block from lse. The max needs no gradient: lse is shift-invariant.
    """

    @staticmethod
    def forward(ctx, x_hat, centers, local_targets, rows, margin: Margin, backend, group, world_size: int,
                centers_operand=None):
        s = margin.scale
        target_cos = target_cosines(x_hat, centers, local_targets, rows)  # (N,) fp32 / fp64, from the fp32 values
        has_target = local_targets >= 0
        target_logit = torch.where(has_target, s * margin.target_value(target_cos), torch.zeros_like(target_cos))
        ctx.grad_dtypes = (x_hat.dtype, centers.dtype)
        if centers_operand is not None:  # the backend reads narrower copies; the gradients return in fp32
            x_hat, centers = x_hat.to(centers_operand.dtype), centers_operand
        run_max, run_sum = backend.forward(x_hat, centers, local_targets, rows, target_logit, s)
        global_max = _all_reduce(run_max.clone(), dist.ReduceOp.MAX, group, world_size)  # (N,)
        stats = torch.stack([run_sum * torch.exp(run_max - global_max), target_logit])  # (2, N)
        _all_reduce(stats, dist.ReduceOp.SUM, group, world_size)
        lse = global_max + stats[0].log()
        ctx.save_for_backward(x_hat, centers, local_targets, rows, lse, target_cos, target_logit)
        ctx.margin, ctx.backend = margin, backend
        return (lse - stats[1]).mean()  # fp32 (fp64 for fp64 inputs) also for bf16 / fp16 embeddings

    @staticmethod
    def backward(ctx, grad_loss):
        x_hat, centers, local_targets, rows, lse, target_cos, target_logit = ctx.saved_tensors
        margin = ctx.margin
        coef = grad_loss.to(lse.dtype) * (margin.scale / x_hat.shape[0])  # a device scalar: no host sync
        x_dtype, centers_dtype = ctx.grad_dtypes
        need_x, need_centers = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = x_hat.new_empty(x_hat.shape, dtype=x_dtype) if need_x and x_dtype != x_hat.dtype else None
        grad_centers = (centers.new_empty(centers.shape, dtype=centers_dtype)
                        if need_centers and centers_dtype != centers.dtype else None)
        grad_x, grad_centers = ctx.backend.backward(
            x_hat, centers, local_targets, rows, target_logit, margin.target_slope(target_cos), lse, coef,
            margin.scale, need_x=need_x, need_centers=need_centers, grad_x=grad_x, grad_centers=grad_centers,
        )
        return grad_x, grad_centers, None, None, None, None, None, None, None


def blockwise_margin_cross_entropy(
    normalized_embeddings: torch.Tensor,
    centers: torch.Tensor,
    local_targets: torch.Tensor,
    margin: Margin,
    *,
    group,
    world_size: int,
    rows: torch.Tensor | None = None,
    backend=None,
    centers_operand: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean margin CE of the global batch against the sharded classes, never holding [N, C_used].

    normalized_embeddings [N, D]: the gathered global batch, unit rows (gradient flows back).
    centers [C_local, D]: W_local or P_local (rows are normalised inside; gradient only if required).
    local_targets [N] int64: each row's class as an index into the used centers (into `rows` when given),
      -1 where the class lives on another rank.
    rows [C_used] int64 sorted, or None for all C_local rows: the sampled classes.
    backend: a kernels.margin_ce backend object (TorchMarginCE, TritonMarginCE); None = a fresh
      TorchMarginCE with the default 64 MiB chunk budget. The head keeps one across steps.
    centers_operand: a bf16 copy of `centers` for the backend to read (the embeddings are rounded to its
      dtype too); the margin, the statistics and both gradients stay in the dtype of the inputs.
    Wire: all_reduce MAX of N numbers, all_reduce SUM of 2N numbers. Returns the scalar loss, identical
    on every rank. Extra memory: the W-sized gradient of `centers` plus the backend's O(N * D) or chunk.
    """
    backend = backend if backend is not None else TorchMarginCE()
    return _MarginCrossEntropy.apply(
        normalized_embeddings, centers, local_targets, rows, margin, backend, group, world_size, centers_operand
    )


HEAD_DTYPES = ("auto", "fp32", "bf16")
"""loss.head_dtype values (the operands of the Triton kernels; see LossConfig.head_dtype)."""

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
    update_prototypes() runs after backward because the blockwise paths recompute from P in backward;
    forward only keeps the (detached) unit embeddings and local labels for it.

    loss_cfg (a LossConfig) says everything about the loss: margin, curriculum stages, EPL update, the
    backend (loss.impl, a row of kernels/registry.py) and its chunk budget (loss.chunk_mb); it is validated
    here as a config file is. seed fixes the initial centers and the Partial-FC sampling stream.

    Host-device synchronisations: one at the first forward (the batch check across ranks), then none:
    the label range and the rows a full Partial-FC sample left out go into `take_step_flags()`, which
    lvface.engine.train_step reads once per optimizer step; the sample has a fixed size and the EPL
    update and the optimizer work on fixed shapes. Nothing per chunk or per class.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        loss_cfg,
        *,
        group: dist.ProcessGroup | None,
        seed: int = 0,
    ):
        super().__init__()
        loss_cfg.validate()  # the same checks as a config file's, for a LossConfig built in code
        registry.check_installed(loss_cfg.impl)
        if group is None:
            self.rank, self.world_size = 0, 1
        else:
            self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        if num_classes < self.world_size:
            raise ValueError(f"num_classes {num_classes} is smaller than the head's world size {self.world_size}")
        if embedding_size < 1:
            raise ValueError(f"embedding_size must be positive, got {embedding_size}")
        self.group = group
        self.num_classes, self.embedding_size = num_classes, embedding_size
        self.loss_cfg = loss_cfg
        self.margin = margin_from_config(loss_cfg)
        self.impl, self.seed = loss_cfg.impl, seed
        self.head_dtype = loss_cfg.head_dtype  # checked by loss_cfg.validate() above
        self.operand_dtype: torch.dtype | None = None
        """The dtype the kernels read, resolved from loss.head_dtype at the first forward."""
        self._operands: dict[str, tuple[int, int, torch.Tensor]] = {}  # name -> (data_ptr, version, bf16 copy)
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
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (x_hat [N, D], local labels [N])
        self._checked_shape: tuple[int, int] | None = None  # this rank's (B, labels) the group has checked
        self._label_range: torch.Tensor | None = None  # (lowest, highest) label of the step, on the device
        self._bad_range: torch.Tensor | None = None  # the range of the step whose flags were taken last
        self._dropped_rows: torch.Tensor | None = None  # rows whose class was left out of a full sample
        self.resolved_impl: str | None = None
        """The backend `impl` resolved to at the first forward (auto: the registry's default there)."""
        self._backend = None
        self._epl_impl: str | None = None  # the EPL update of the resolved backend
        self.stage = None
        self.set_stage(loss_cfg.stages[0])

    # ---- stages ---------------------------------------------------------------------------------

    def set_stage(self, stage) -> None:
        """Switch the loss to `stage` (a StageConfig); logged on rank 0 when it changes."""
        stage.validate()
        if stage != self.stage and self.rank == 0:
            before = f"'{self.stage.name}'" if self.stage is not None else "start"
            log.info("head stage %s -> %s", before, describe_stage(stage))
        self.stage = stage

    # ---- forward --------------------------------------------------------------------------------

    def _check_global_batch(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> None:
        """Check the batch: local shapes on the host; then, at the first forward and whenever this rank's
        batch shape changes, gather (B, labels, min label, max label) from every rank and raise the same
        error on all of them for mismatched batch sizes or a label outside [0, C), before any collective
        can hang (one host read). At the other forwards the label range is checked on the device into the
        step's flags (`take_step_flags`), read once per optimizer step by lvface.engine.train_step.

        A rank whose batch shape changes while the others' do not runs the check alone, and the group
        waits in the next collective until its timeout (the loaders drop partial batches, so a training
        run's shapes never change)."""
        if local_embeddings.dim() != 2 or local_embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"head expects embeddings [B, {self.embedding_size}], got {tuple(local_embeddings.shape)}; "
                "check model.num_features"
            )
        if local_labels.dim() != 1 or local_labels.dtype.is_floating_point or local_labels.dtype == torch.bool:
            raise ValueError(f"head expects integer labels [B], got {local_labels.dtype} {tuple(local_labels.shape)}")
        labels = local_labels.detach().to(torch.int64)
        shape = (local_embeddings.shape[0], labels.numel())
        if labels.numel():
            label_range = torch.stack([labels.min(), labels.max()]).to(local_embeddings.device)  # on the device
        else:
            label_range = torch.zeros(2, dtype=torch.int64, device=local_embeddings.device)
        if shape != self._checked_shape:
            self._check_across_ranks(shape, label_range)
            self._checked_shape = shape
            return
        if self._label_range is None:
            self._label_range = label_range
        else:  # the step's (lowest, highest) label so far
            self._label_range = torch.stack([torch.minimum(self._label_range[0], label_range[0]),
                                             torch.maximum(self._label_range[1], label_range[1])])

    def _check_across_ranks(self, shape: tuple[int, int], label_range: torch.Tensor) -> None:
        device = label_range.device
        sizes_here = torch.tensor(list(shape), dtype=torch.int64, device=device)
        meta = torch.cat([sizes_here, label_range]).unsqueeze(0)  # (1, 4)
        everyone = _all_gather_rows(meta, self.group, self.world_size).tolist()  # (W, 4): a host read
        sizes = [row[0] for row in everyone]
        counts = [row[1] for row in everyone]
        if sizes != counts:
            raise ValueError(f"embeddings and labels differ in length: per rank embeddings {sizes}, labels {counts}")
        if len(set(sizes)) != 1 or sizes[0] == 0:
            raise ValueError(
                f"batch sizes differ across ranks or are empty: {sizes} (rank order); every rank must pass "
                "the same non-zero number of embeddings per step (drop the last partial batch in the loader)"
            )
        self._raise_for_labels([row[2:] for row in everyone])

    def _raise_for_labels(self, ranges: list[list[int]]) -> None:
        for rank, (low, high) in enumerate(ranges):
            for value in (low, high):
                if not 0 <= value < self.num_classes:
                    raise ValueError(
                        f"label {value} (rank {rank}) is outside [0, {self.num_classes}): check data.num_classes "
                        "and the labels of the training data"
                    )

    def take_step_flags(self) -> torch.Tensor:
        """[bad labels (0/1), rows whose class was left out of a full Partial-FC sample] since the last call,
        a float tensor on the head's device (no host sync), for the optimizer step's one flag read; resets
        them. After that read, on every rank: `raise_for_bad_labels()` where the first flag is set."""
        flags = torch.zeros(2, device=self.weight.device)
        if self._label_range is not None:
            low, high = self._label_range[0], self._label_range[1]
            flags[0] = ((low < 0) | (high >= self.num_classes)).to(flags.dtype)
            self._bad_range, self._label_range = self._label_range, None
        if self._dropped_rows is not None:
            flags[1] = self._dropped_rows.to(flags.dtype)
            self._dropped_rows = None
        return flags

    def raise_for_bad_labels(self) -> None:
        """Raise the batch check's error for the labels of the step whose flags said so (collective: call
        on every rank, after the flags were all-reduced)."""
        device = self.weight.device
        local = self._bad_range if self._bad_range is not None else torch.tensor([0, 0], device=device)
        everyone = _all_gather_rows(local.to(device).unsqueeze(0), self.group, self.world_size).tolist()
        self._raise_for_labels(everyone)

    def _resolve_impl(self, device: torch.device) -> str:
        """Pick the implementation once, at the first forward (the tensors' device is known then)."""
        if self.resolved_impl is not None:
            return self.resolved_impl
        backend = registry.resolve(self.impl, device.type)
        self._backend = registry.build_backend(backend, self.loss_cfg)
        self._epl_impl = backend.epl_impl
        self.resolved_impl = backend.name
        if self.rank == 0:
            log.info("head margin softmax: loss.impl=%s -> %s on %s%s", self.impl, backend.name, device.type,
                     "" if backend.deterministic else " (sums not bitwise reproducible run to run)")
        return backend.name

    @property
    def workspace_bytes(self) -> int:
        """Bytes of the chunked path's reused workspace (0 before the first forward, or on other paths)."""
        return getattr(self._backend, "workspace_bytes", 0)

    def _resolve_operand_dtype(self, embeddings: torch.Tensor) -> torch.dtype:
        """loss.head_dtype -> the kernels' operand dtype, once: auto is bf16 for the Triton kernels on CUDA
        when the embeddings arrive in bf16 (train.precision bf16), the head's own dtype otherwise."""
        if self.operand_dtype is None:
            bf16_capable = registry.lookup(self.resolved_impl).bf16_operands
            wanted = self.head_dtype
            if wanted == "auto":
                cuda_bf16 = self.weight.is_cuda and embeddings.dtype == torch.bfloat16
                wanted = "bf16" if bf16_capable and cuda_bf16 else "fp32"
            if wanted == "bf16" and not bf16_capable:
                capable = ", ".join(name for name, b in registry.BACKENDS.items() if b.bf16_operands)
                raise ValueError(f"loss.head_dtype=bf16 needs a loss.impl that reads bf16 operands ({capable}; "
                                 f"resolved {self.resolved_impl}); set loss.head_dtype to auto or fp32")
            self.operand_dtype = torch.bfloat16 if wanted == "bf16" else self.weight.dtype
        return self.operand_dtype

    def _operand(self, name: str, centers: torch.Tensor) -> torch.Tensor | None:
        """The bf16 copy of W or P the kernels read, or None when they read the fp32 tensor itself. Made once
        per head step: kept while the tensor is unchanged (same storage and version counter), dropped when
        the optimizer steps (clear_touched_rows) or the prototypes are updated."""
        if self.operand_dtype == centers.dtype:
            return None
        key = (centers.data_ptr(), centers._version)
        cached = self._operands.get(name)
        if cached is None or cached[:2] != key:
            cached = (*key, centers.detach().to(self.operand_dtype))
            self._operands[name] = cached
        return cached[2]

    def _cross_entropy(self, x_hat, centers, targets, rows) -> torch.Tensor:
        if self._backend is None:
            return dense_margin_cross_entropy(
                x_hat, centers, targets, self.margin, group=self.group, world_size=self.world_size, rows=rows
            )
        name = "weight" if centers is self.weight else "prototypes"
        return blockwise_margin_cross_entropy(
            x_hat, centers, targets, self.margin, group=self.group, world_size=self.world_size, rows=rows,
            backend=self._backend, centers_operand=self._operand(name, centers),
        )

    def _center_penalty(self, local_labels: torch.Tensor) -> torch.Tensor:
        """mean_n ||normalize(W_{y_n}) - P_{y_n}||^2 over the global batch (rows whose class is here
        contribute locally; one all-reduce sums them)."""
        here = (local_labels >= 0).unsqueeze(1)  # (N, 1) a mask, not nonzero: no host sync
        classes = local_labels.clamp(min=0)
        w_hat = F.normalize(self.weight.index_select(0, classes), dim=1, eps=NORM_EPS)  # (N, D)
        local = ((w_hat - self.prototypes.index_select(0, classes)).pow(2) * here).sum()
        total = _AllReduceSumReplicated.apply(local.reshape(1), self.group, self.world_size)
        return total[0] / local_labels.numel()

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        self._check_global_batch(local_embeddings, local_labels)
        self._resolve_impl(self.weight.device)
        self._resolve_operand_dtype(local_embeddings)
        stage = self.stage
        dtype = self.weight.dtype
        # The global batch, in the head's precision (fp32 gather; the gradient returns in fp32 too).
        gathered = gather_embeddings(local_embeddings.to(dtype), self.group, self.world_size)  # (N, D)
        labels = _all_gather_rows(local_labels.detach().to(torch.int64), self.group, self.world_size)  # (N,)
        labels = labels.to(self.weight.device)
        x_hat = F.normalize(gathered, dim=1, eps=NORM_EPS)  # (N, D)
        in_shard = (labels >= self.class_start) & (labels < self.class_end)
        local_labels_all = torch.where(in_shard, labels - self.class_start, torch.full_like(labels, -1))  # (N,)

        rows, targets = None, local_labels_all
        if self.training and stage.sample_rate < 1.0:  # Partial-FC, drawn on the device
            seed = sample_seed(self.seed, self.sample_step, self.class_start)
            self.sample_step += 1
            rows, targets = select_rows(local_labels_all, self.num_local_classes, stage.sample_rate, seed)
            dropped = ((local_labels_all >= 0) & (targets < 0)).sum()  # 0 unless the positives overflow
            self._dropped_rows = dropped if self._dropped_rows is None else self._dropped_rows + dropped
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
            self._record_step(x_hat.detach(), local_labels_all, rows, stage)
        return loss

    # ---- bookkeeping between forward and the optimizer / prototype update -------------------------

    @torch.no_grad()
    def _record_step(self, x_hat, local_labels_all, rows, stage) -> None:
        """Keep the unit embeddings and local labels for update_prototypes() (no copy: x_hat is saved
        for backward anyway; held until the update), and mark the rows of W this forward touched.
        No host sync."""
        self._pending.append((x_hat, local_labels_all))
        if not uses_learned_centers(stage):
            return
        if rows is None and stage.centers != "prototypes":
            self._all_touched = True
            return
        if self._touched is None:
            self._touched = torch.zeros(self.num_local_classes, dtype=torch.bool, device=self.weight.device)
        if stage.centers == "prototypes":  # only the penalty touches W: the positive rows
            here = (local_labels_all >= 0).to(torch.uint8)
            marks = torch.zeros(self.num_local_classes, dtype=torch.uint8, device=self.weight.device)
            marks.scatter_reduce_(0, local_labels_all.clamp(min=0), here, reduce="amax")
            self._touched |= marks.bool()
        else:
            self._touched[rows] = True

    def touched_rows(self) -> torch.Tensor | None:
        """Local rows of W that took part since the last clear (sorted int64), or None for all rows."""
        if self._all_touched:
            return None
        if self._touched is None:
            return torch.zeros(0, dtype=torch.int64, device=self.weight.device)
        return self._touched.nonzero(as_tuple=True)[0]

    def touched_mask(self) -> torch.Tensor | None:
        """[C_local] bool: the rows of W that took part since the last clear (no host sync), or None for
        all rows. `has_touched_rows()` says on the host whether any forward marked rows at all."""
        if self._all_touched:
            return None
        if self._touched is None:
            return torch.zeros(self.num_local_classes, dtype=torch.bool, device=self.weight.device)
        return self._touched

    def has_touched_rows(self) -> bool:
        return self._all_touched or self._touched is not None

    def clear_touched_rows(self) -> None:
        """Called after every head optimizer step: the bf16 copies of W and P are made again at the next forward."""
        self._touched, self._all_touched = None, False
        self._operands.clear()

    @torch.no_grad()
    def update_prototypes(self) -> int | torch.Tensor:
        """Apply the EPL update for the classes of this shard seen since the last call (all micro-batches
        of the step merged: once per class, from the class mean). Call after backward. Returns the number
        of classes updated (a 0-dim tensor on the head's device: no host sync; 0 without pending rows)."""
        self._operands.pop("prototypes", None)  # the Triton EPL update writes P without a version bump
        if not self._pending:
            return 0
        x_hat = torch.cat([p[0] for p in self._pending])  # (K * N, D)
        labels = torch.cat([p[1] for p in self._pending])  # (K * N,) -1 for other shards: skipped by the update
        self._pending = []
        cfg = self.loss_cfg
        return epl_update_(
            self.prototypes, x_hat, labels, mode=cfg.prototype_update, momentum=cfg.prototype_momentum,
            impl=self._epl_impl,
        )

    def discard_update(self) -> None:
        """Forget the step's pending prototype update and touched rows (a skipped, non-finite step)."""
        self._pending = []
        self.clear_touched_rows()

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
            f"rank={self.rank}/{self.world_size}, "
            f"classes=[{self.class_start}, {self.class_end}), impl={self.impl}"
            f"{'' if self.resolved_impl in (None, self.impl) else ' -> ' + self.resolved_impl}, margin={self.margin}"
        )
