"""Tests of the margin cross-entropy kernels (lvface/kernels/margin_ce.py, triton_margin_ce.py): the
backends against float64 references, the head on them, the dispatch, and the sm_90 compile of every
launch (zero spills). Interpreter set-up: tests/kernel_utils.py.

References are float64 and dense (autograd over the [N, C] block) on the same input values (bf16 / fp16
inputs are rounded first, then widened), so the comparison measures the kernels' arithmetic only:
fp32 within 1e-5 relative (of the largest reference entry), bf16 / fp16 within 1e-2 (products of
bf16 / fp16 operands on a GPU; under the interpreter they are exact). Outputs are NaN-poisoned before
each call, so an element a kernel fails to write shows.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_on_ranks
from kernel_utils import INTERPRET_TIMEOUT, assert_close_relative, use_interpreter
from kernel_utils import device as run_device

from lvface.config import LossConfig, StageConfig
from lvface.heads import ShardedMarginHead, init_centers
from lvface.heads.margin import Margin

MARGINS = {
    "arcface": Margin(64.0, 1.0, 0.5, 0.0, "insightface"),
    "cosface": Margin(64.0, 1.0, 0.0, 0.4, "insightface"),
    "arcface_exact": Margin(64.0, 1.0, 0.5, 0.0, "exact"),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOLERANCE = {"fp32": 1e-5, "bf16": 1e-2, "fp16": 1e-2}
# (N, C_local, D, block_n, block_c): "small" fills no block (N < BLOCK_N, C < BLOCK_C, D < BLOCK_D);
# "tails" has 3 row blocks (the last of 6 rows), 3 class blocks (the last of 22) in 2 class splits
# (128 + 22 classes) merged after the kernel
SHAPES = {"small": (37, 23, 24, 64, 64), "tails": (70, 150, 40, 32, 64)}
BLOCK_K = 16  # the backward's slices of D: 2 at D = 24, 4 at D = 40 (the third partly, the fourth wholly masked)
KERNEL_CASES = [
    (shape, dtype, sampled, margin, "two_pass")
    for shape, dtypes in (("small", ("fp32", "bf16", "fp16")), ("tails", ("fp32",)))
    for dtype in dtypes
    for sampled in (False, True)
    for margin in MARGINS
] + [  # the atomic backward (dx added by the class-block programs): every dtype, both tails, sampled or not
    (shape, dtype, sampled, margin, "atomic")
    for shape, dtypes, margins in (("small", ("fp32", "bf16", "fp16"), ("arcface",)),
                                   ("tails", ("fp32",), ("arcface", "cosface")))
    for dtype in dtypes
    for sampled in (False, True)
    for margin in margins
]


def shard_inputs(shape: str, dtype: str, sampled: bool):
    """x_hat [N, D] (unit rows, rounded to dtype), centers [C, D] (not unit), targets [N] (-1 for
    about a quarter: another rank's class; repeats), rows [C_used] sorted or None."""
    n, c, d, _, _ = SHAPES[shape]
    generator = torch.Generator().manual_seed(list(SHAPES).index(shape) * 2 + int(sampled))
    x_hat = F.normalize(torch.randn(n, d, generator=generator), dim=1).to(DTYPES[dtype])
    centers = (0.5 * torch.randn(c, d, generator=generator)).to(DTYPES[dtype])
    labels = torch.randint(0, c, (n,), generator=generator)
    labels[torch.rand(n, generator=generator) < 0.25] = -1
    if not sampled:
        return x_hat, centers, labels, None
    extra = torch.randperm(c, generator=generator)[: c // 2]
    rows = torch.unique(torch.cat([labels[labels >= 0], extra]))  # sorted, every positive
    targets = torch.where(labels >= 0, torch.searchsorted(rows, labels.clamp(min=0)), labels)
    return x_hat, centers, targets, rows


def shard_reference(x_hat, centers, targets, rows, margin: Margin):
    """float64 dense: lse [N] of the used logits and the gradients of mean_n (lse_n - z_{n,t_n})
    (target logit 0 for rows without a target here) with respect to x_hat and the raw centers."""
    x = x_hat.double().requires_grad_()
    w = centers.double().requires_grad_()
    used = w if rows is None else w[rows]
    cos = x @ F.normalize(used, dim=1).t()  # (N, C_used)
    has = targets >= 0
    mask = torch.zeros_like(cos, dtype=torch.bool)
    mask[has.nonzero(as_tuple=True)[0], targets[has]] = True
    logits = margin.logits(cos, mask)
    lse = torch.logsumexp(logits, dim=1)
    target = (logits * mask).sum(dim=1)
    (lse - target).mean().backward()
    return lse.detach(), x.grad, w.grad


def kernel_cases(rank, world, group, cases):
    """Run the Triton backend on every case with poisoned outputs; returns what the kernels wrote."""
    use_interpreter()
    from lvface.kernels.margin_ce import target_cosines
    from lvface.kernels.triton_margin_ce import TritonMarginCE

    device = run_device()
    out = []
    for shape, dtype, sampled, margin_name, backward in cases:
        margin = MARGINS[margin_name]
        x_hat, centers, targets, rows = (t if t is None else t.to(device) for t in shard_inputs(shape, dtype, sampled))
        n = x_hat.shape[0]
        _, _, _, block_n, block_c = SHAPES[shape]
        backend = TritonMarginCE(block_n=block_n, block_c=block_c, max_splits=2 if shape == "tails" else None,
                                 backward=backward, fp32_precision="ieee",  # the 1e-5 contract, also on a GPU
                                 block_k=BLOCK_K)
        s = margin.scale
        target_cos = target_cosines(x_hat, centers, targets, rows)
        target_logit = torch.where(targets >= 0, s * margin.target_value(target_cos), torch.zeros_like(target_cos))
        poison = dict(out_max=torch.full((n,), float("nan"), device=device),
                      out_sum=torch.full((n,), float("nan"), device=device))
        row_max, row_sum = backend.forward(x_hat, centers, targets, rows, target_logit, s, **poison)
        lse = row_max + row_sum.log()
        grad_x = torch.full_like(x_hat, float("nan"))
        grad_centers = torch.full_like(centers, float("nan"))
        coef = torch.tensor(s / n, device=device)
        backend.backward(
            x_hat, centers, targets, rows, target_logit, margin.target_slope(target_cos), lse, coef, s,
            grad_x=grad_x, grad_centers=grad_centers,
        )
        out.append({"lse": lse.cpu(), "grad_x": grad_x.cpu(), "grad_centers": grad_centers.cpu(),
                    "max_written": poison["out_max"].cpu(), "sum_written": poison["out_sum"].cpu()})
    return out


@pytest.fixture(scope="module")
def kernel_results():
    return run_on_ranks(kernel_cases, 1, KERNEL_CASES, timeout=INTERPRET_TIMEOUT)[0]


@pytest.mark.cuda
@pytest.mark.parametrize("index", range(len(KERNEL_CASES)), ids=["-".join(map(str, c)) for c in KERNEL_CASES])
def test_triton_margin_ce_matches_float64_reference(kernel_results, index):
    shape, dtype, sampled, margin_name, _ = KERNEL_CASES[index]
    got = kernel_results[index]
    x_hat, centers, targets, rows = shard_inputs(shape, dtype, sampled)
    lse, grad_x, grad_centers = shard_reference(x_hat, centers, targets, rows, MARGINS[margin_name])
    tol = TOLERANCE[dtype]
    assert torch.equal(got["max_written"].isnan(), torch.zeros_like(lse, dtype=torch.bool)), "row max not written"
    assert torch.equal(got["sum_written"].isnan(), torch.zeros_like(lse, dtype=torch.bool)), "row sum not written"
    assert_close_relative(got["lse"], lse, tol, "log-sum-exp")
    assert_close_relative(got["grad_x"], grad_x, tol, "d loss / d x_hat")
    assert_close_relative(got["grad_centers"], grad_centers, tol, "d loss / d centers")
    if rows is not None:  # rows outside the sample: exactly zero
        unused = torch.ones(centers.shape[0], dtype=torch.bool)
        unused[rows] = False
        assert torch.equal(got["grad_centers"][unused], torch.zeros_like(got["grad_centers"][unused]))


def test_torch_backend_matches_float64_reference():
    """The chunked torch backend under the same contract (float64 inputs, several chunks)."""
    from lvface.kernels.margin_ce import TorchMarginCE, target_cosines

    for sampled in (False, True):
        x_hat, centers, targets, rows = shard_inputs("tails", "fp32", sampled)
        x_hat, centers = x_hat.double(), centers.double()
        margin = MARGINS["arcface_exact"]
        backend = TorchMarginCE(chunk_bytes=8 * (70 + 3 * 40) * 7)  # 7 classes per chunk
        s = margin.scale
        target_cos = target_cosines(x_hat, centers, targets, rows)
        target_logit = torch.where(targets >= 0, s * margin.target_value(target_cos), torch.zeros_like(target_cos))
        row_max, row_sum = backend.forward(x_hat, centers, targets, rows, target_logit, s)
        lse = row_max + row_sum.log()
        grad_x, grad_centers = backend.backward(
            x_hat, centers, targets, rows, target_logit, margin.target_slope(target_cos), lse,
            torch.tensor(s / x_hat.shape[0], dtype=torch.float64), s,
        )
        want = shard_reference(x_hat, centers, targets, rows, margin)
        for got, ref in zip((lse, grad_x, grad_centers), want):
            torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


# bf16 operands (loss.head_dtype=bf16): fp32 embeddings and centers, rounded to bf16 for the kernels only
# --------------------------------------------------------------------------------------------------
#
# Tolerances, derived (u = 2**-8: bf16 keeps 8 significant bits, so rounding to nearest errs by at most u
# relative; 2**-7 is the spacing at 1):
# * against float64 on the SAME rounded operands (what the kernels add): products of two bf16 values are
#   exact in fp32 and summed in fp32 over D, so a logit errs by at most s * D * 2**-24 (the lse by as
#   much, plus fp32's exp / log); the gradient tile G = dL/dcos is rounded to bf16 once before its
#   product, by r relative, so dx_n errs by at most r * sum_j |G_nj| |w_hat_j| (entrywise) and dw_j (a
#   projection of g_j = sum_n G_nj x_n, divided by |w_j|) by at most r * || sum_n |G_nj| |x_n| || / |w_j|;
#   plus the fp32 contract's 1e-5 of the scale for everything else. r = u on a GPU (cvt.rn); the triton
#   3.9 interpreter's fp32 -> bf16 conversion is not round-to-nearest (measured: up to 0.0075 relative,
#   it ignores fp_downcast_rounding), so under the interpreter r = 2u.
# * against float64 on the fp32 operands (what the rounding costs): |dx| <= u |x| and |d w_hat| <= 2u
#   per row, so by Cauchy-Schwarz a logit moves by at most 3 u s (the target logit is computed from
#   the fp32 values, not rounded), and the lse, a softmax-weighted mean of the logits, by as much.
BF16_EPS = 2.0**-8
BF16_CASES = [(shape, sampled, margin, backward) for shape in ("small", "tails") for sampled in (False, True)
              for margin, backward in (("arcface", "two_pass"), ("arcface_exact", "atomic"))]


def bf16_operand_cases(rank, world, group, cases):
    """The kernels as the head runs them with loss.head_dtype=bf16: bf16 copies in, fp32 gradients out."""
    use_interpreter()
    from lvface.kernels.margin_ce import target_cosines
    from lvface.kernels.triton_margin_ce import TritonMarginCE

    device = run_device()
    out = []
    for shape, sampled, margin_name, backward in cases:
        margin = MARGINS[margin_name]
        x_hat, centers, targets, rows = (t if t is None else t.to(device) for t in shard_inputs(shape, "fp32", sampled))
        _, _, _, block_n, block_c = SHAPES[shape]
        backend = TritonMarginCE(block_n=block_n, block_c=block_c, max_splits=2 if shape == "tails" else None,
                                 backward=backward, block_k=BLOCK_K)
        s, n = margin.scale, x_hat.shape[0]
        target_cos = target_cosines(x_hat, centers, targets, rows)  # from the fp32 values, as the head does
        target_logit = torch.where(targets >= 0, s * margin.target_value(target_cos), torch.zeros_like(target_cos))
        x16, w16 = x_hat.bfloat16(), centers.bfloat16()
        row_max, row_sum = backend.forward(x16, w16, targets, rows, target_logit, s)
        lse = row_max + row_sum.log()
        grad_x = torch.full_like(x_hat, float("nan"))
        grad_centers = torch.full_like(centers, float("nan"))
        backend.backward(x16, w16, targets, rows, target_logit, margin.target_slope(target_cos), lse,
                         torch.tensor(s / n, device=device), s, grad_x=grad_x, grad_centers=grad_centers)
        out.append({"lse": lse.cpu(), "grad_x": grad_x.cpu(), "grad_centers": grad_centers.cpu()})
    return out


def bf16_reference(x_hat, centers, targets, rows, margin: Margin):
    """float64 on the bf16-rounded operands, the target logit s * psi(t) (and its slope) taken at the fp32
    operands' target cosine t as the head does: lse, dx, dw, and G = dL/dcos for the bounds."""
    x = x_hat.bfloat16().double().requires_grad_()
    w = centers.bfloat16().double().requires_grad_()
    used = w if rows is None else w[rows]
    w_exact = centers.double() if rows is None else centers.double()[rows]
    cos = x @ F.normalize(used, dim=1).t()
    cos.retain_grad()
    has = targets >= 0
    mask = torch.zeros_like(cos, dtype=torch.bool)
    mask[has.nonzero(as_tuple=True)[0], targets[has]] = True
    t = (x_hat.double() * F.normalize(w_exact, dim=1)[targets.clamp(min=0)]).sum(dim=1)
    s = margin.scale
    target = s * margin.target_value(t) + s * margin.target_slope(t) * (cos - cos.detach()).masked_fill(~mask, 0).sum(1)
    logits = torch.where(mask, target.unsqueeze(1), s * cos)
    lse = torch.logsumexp(logits, dim=1)
    (lse - torch.where(has, target, torch.zeros_like(target))).mean().backward()
    return lse.detach(), x.grad, w.grad, cos.grad, x.detach(), w.detach()


@pytest.fixture(scope="module")
def bf16_results():
    return run_on_ranks(bf16_operand_cases, 1, BF16_CASES, timeout=INTERPRET_TIMEOUT)[0]


@pytest.mark.parametrize("index", range(len(BF16_CASES)), ids=["-".join(map(str, c)) for c in BF16_CASES])
def test_bf16_operands_match_float64_within_derived_bounds(bf16_results, index):
    if torch.cuda.is_available():
        pytest.skip("the bounds assume exact fp32 products; test_cuda covers the native run")
    shape, sampled, margin_name, _ = BF16_CASES[index]
    got = bf16_results[index]
    x_hat, centers, targets, rows = shard_inputs(shape, "fp32", sampled)
    margin = MARGINS[margin_name]
    lse, grad_x, grad_w, grad_cos, x_r, w_r = bf16_reference(x_hat, centers, targets, rows, margin)
    s, dim, r = margin.scale, x_hat.shape[1], 2 * BF16_EPS
    fp32 = 1e-5  # the fp32 contract of test_triton_margin_ce_matches_float64_reference
    lse_bound = s * dim * 2.0**-24 + fp32 * float(lse.abs().max())
    assert float((got["lse"].double() - lse).abs().max()) <= lse_bound, "lse beyond fp32 arithmetic"
    used = w_r if rows is None else w_r[rows]
    w_hat = F.normalize(used, dim=1)
    dx_bound = r * float((grad_cos.abs() @ w_hat.abs()).max()) + fp32 * float(grad_x.abs().max())
    assert not got["grad_x"].isnan().any()
    assert float((got["grad_x"].double() - grad_x).abs().max()) <= dx_bound, "d x_hat beyond one bf16 rounding of G"
    spread = (grad_cos.abs().t() @ x_r.abs()).norm(dim=1) / used.norm(dim=1)  # (C_used,)
    dw_bound = r * float(spread.max()) + fp32 * float(grad_w.abs().max())
    got_w = got["grad_centers"].double()
    assert not got_w.isnan().any()
    assert float((got_w - grad_w).abs().max()) <= dw_bound, "d centers beyond one bf16 rounding of G"
    # what the rounding of the operands costs, against the fp32 operands
    exact_lse, _, _ = shard_reference(x_hat, centers, targets, rows, margin)
    assert float((got["lse"].double() - exact_lse).abs().max()) <= 3 * BF16_EPS * s + lse_bound


# --------------------------------------------------------------------------------------------------
# The whole head with loss.impl=triton (interpreted) on 1 and 2 gloo ranks
# --------------------------------------------------------------------------------------------------


def head_cases(rank, world, group, cases, dtype):
    use_interpreter()
    from test_sharded_softmax import run_cases

    return run_cases(rank, world, group, cases, dtype, run_device())


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["triton", "triton_atomic"])
@pytest.mark.parametrize("world", [1, 2])
def test_head_with_triton_matches_dense(world, impl):
    """Interpreted on 1 and 2 gloo ranks; natively on 1 rank where CUDA is present (the head's products
    are TF32 there: 1e-2 of the scale, as in test_cuda.py)."""
    from test_sharded_softmax import GLOBAL_BATCH, MARGINS as HEAD_MARGINS, NUM_CLASSES, STAGES, DIM, reference

    if torch.cuda.is_available() and world > 1:
        pytest.skip("one GPU here: the 2-rank head runs on nccl in benchmarks/scaling.py, on gloo without a GPU")
    tol = 1e-2 if torch.cuda.is_available() else 1e-5
    cases = [(m, s, i) for m in HEAD_MARGINS for s in STAGES for i in (impl, "dense")]
    results = run_on_ranks(head_cases, world, cases, torch.float32, timeout=INTERPRET_TIMEOUT)
    full_weight = init_centers(NUM_CLASSES, DIM, 0, NUM_CLASSES, seed=3).double()
    batch = GLOBAL_BATCH // world
    for index in range(0, len(cases), 2):
        margin_name, stage_name, _ = cases[index]
        triton_ranks = [r[index] for r in results]
        dense_ranks = [r[index + 1] for r in results]
        where = f"{margin_name}/{stage_name} on {world} ranks"
        sampled = None
        if triton_ranks[0]["sampled"] is not None:
            sampled = torch.cat([r["sampled"] for r in triton_ranks])
            assert torch.equal(sampled, torch.cat([r["sampled"] for r in dense_ranks])), where
        loss, grad_x, grad_w = reference(margin_name, stage_name, full_weight, sampled)
        grad_embeddings = torch.cat([r["grad_embeddings"] for r in triton_ranks])
        grad_weight = torch.cat([r["grad_weight"] for r in triton_ranks])
        # fp32 head vs the float64 reference: the head's own fp32 steps (normalisation of the gathered
        # rows, the loss mean) round too, so 1e-5 of the scale
        assert_close_relative(triton_ranks[0]["loss"], loss, tol, f"loss, {where}")
        assert_close_relative(grad_embeddings, world * grad_x, tol, f"d loss / d embeddings x W, {where}")
        assert_close_relative(grad_weight, grad_w, tol, f"d loss / d W, {where}")
        # and triton == dense, both fp32
        dense_x = torch.cat([r["grad_embeddings"] for r in dense_ranks])
        dense_w = torch.cat([r["grad_weight"] for r in dense_ranks])
        assert_close_relative(triton_ranks[0]["loss"], dense_ranks[0]["loss"].double(), tol, f"loss vs dense, {where}")
        assert_close_relative(grad_embeddings, dense_x.double(), tol, f"d embeddings vs dense, {where}")
        assert_close_relative(grad_weight, dense_w.double(), tol, f"d W vs dense, {where}")
        for r in triton_ranks[1:]:
            assert torch.equal(r["loss"], triton_ranks[0]["loss"]), f"loss differs across ranks, {where}"
        assert grad_embeddings.shape[0] == batch * world


def head_bf16_case(rank, world, group):
    """One head with loss.head_dtype=bf16 (interpreted): its loss and gradients' dtypes, and when its bf16
    copy of W is made again."""
    use_interpreter()
    from test_sharded_softmax import DIM, GLOBAL_BATCH, NUM_CLASSES, global_inputs

    embeddings, labels, _ = global_inputs(torch.float32)
    cfg = LossConfig(stages=[StageConfig(name="early", sample_rate=1.0, centers="learned")], head_dtype="bf16", impl="triton")
    head = ShardedMarginHead(NUM_CLASSES, DIM, cfg, group=None, seed=3)
    x = embeddings.clone().requires_grad_()
    loss = head(x, labels)
    loss.backward()
    copy = head._operands["weight"][2]
    out = {"loss": loss.detach(), "operand": head.operand_dtype, "grad_dtypes": (x.grad.dtype, head.weight.grad.dtype),
           "copy_dtype": copy.dtype, "copy_equal": torch.equal(copy, head.weight.detach().bfloat16()),
           "grad_x": x.grad, "grad_w": head.weight.grad.clone()}
    head(embeddings, labels)
    out["kept"] = head._operands["weight"][2] is copy  # W unchanged: the same copy
    with torch.no_grad():
        head.weight[1:] += 0.5 * head.weight[:-1]  # an in-place change (version counter)
    changed = head(embeddings, labels).detach()
    fresh = ShardedMarginHead(NUM_CLASSES, DIM, cfg, group=None, seed=3)
    with torch.no_grad():
        fresh.weight.copy_(head.weight)
    out["changed_equal_fresh"] = torch.equal(changed, fresh(embeddings, labels).detach())
    head.clear_touched_rows()  # what the head optimizer calls after every step
    out["cleared"] = not head._operands
    assert GLOBAL_BATCH == labels.numel()
    return out


def test_head_bf16_operands_follow_w_and_keep_fp32_gradients():
    from test_sharded_softmax import NUM_CLASSES, reference

    (got,) = run_on_ranks(head_bf16_case, 1, timeout=INTERPRET_TIMEOUT)
    assert got["operand"] == torch.bfloat16 and got["copy_dtype"] == torch.bfloat16 and got["copy_equal"]
    assert got["grad_dtypes"] == (torch.float32, torch.float32), "W and the embeddings get fp32 gradients"
    assert got["kept"] and got["changed_equal_fresh"] and got["cleared"]
    loss, grad_x, grad_w = reference("arcface", "early", init_centers(NUM_CLASSES, 8, 0, NUM_CLASSES, seed=3).double(), None)
    # the loss is a mean of lse - target logit; the target logit is taken at fp32, each lse moves by at most
    # 3 u s under the operands' rounding (see the bf16 bounds above), plus the fp32 contract
    bound = 3 * BF16_EPS * 64.0 + 1e-5 * float(loss.abs())
    assert abs(float(got["loss"]) - float(loss)) <= bound
    assert torch.isfinite(got["grad_x"]).all() and torch.isfinite(got["grad_w"]).all()


def test_head_dtype_resolves_per_device_and_impl():
    head = _tiny_head("chunked")
    head(torch.randn(4, 8).bfloat16(), torch.tensor([0, 3, 3, 10]))
    assert head.operand_dtype == torch.float32  # auto on the CPU: fp32, whatever the embeddings' dtype
    cfg = LossConfig(stages=[StageConfig()], head_dtype="bf16", impl="chunked")
    with pytest.raises(ValueError, match=r"loss\.head_dtype=bf16 needs a loss\.impl that reads bf16 operands \(triton, "
                       r"triton_atomic; resolved chunked\)"):
        ShardedMarginHead(11, 8, cfg, group=None)(torch.randn(4, 8), torch.tensor([0, 3, 3, 10]))
    with pytest.raises(ValueError, match=r"loss\.head_dtype"):
        ShardedMarginHead(11, 8, LossConfig(stages=[StageConfig()], head_dtype="fp16"), group=None)
    from lvface.config import ConfigError, from_dict

    assert from_dict({"loss": {"head_dtype": "bf16"}}).loss.head_dtype == "bf16"
    with pytest.raises(ConfigError, match="loss.head_dtype"):
        from_dict({"loss": {"head_dtype": "float16"}})


# --------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------


def _tiny_head(impl, **kwargs):
    return ShardedMarginHead(11, 8, LossConfig(stages=[StageConfig()], impl=impl), group=None, seed=0, **kwargs)


def test_auto_picks_chunked_on_cpu_and_logs_once(caplog):
    head = _tiny_head("auto")
    with caplog.at_level(logging.INFO, logger="lvface.heads.sharded_softmax"):
        for _ in range(2):
            head(torch.randn(4, 8), torch.tensor([0, 3, 3, 10])).backward()
    assert head.resolved_impl == "chunked"
    assert sum("loss.impl=auto -> chunked" in r.getMessage() for r in caplog.records) == 1


def test_triton_requests_fail_clearly(monkeypatch):
    from lvface.kernels import registry

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    head = _tiny_head("triton")
    with pytest.raises(ValueError, match=r"loss.impl=triton runs on CUDA tensors .* set loss.impl to auto or chunked"):
        head(torch.randn(4, 8), torch.tensor([0, 3, 3, 10]))
    with pytest.raises(ValueError, match=r"loss.impl=triton_atomic runs on CUDA tensors"):
        _tiny_head("triton_atomic")(torch.randn(4, 8), torch.tensor([0, 3, 3, 10]))
    monkeypatch.setattr(registry, "package_available", lambda name: False)
    for impl in ("triton", "triton_atomic"):
        with pytest.raises(ValueError, match=f"loss.impl={impl} needs the triton package"):
            _tiny_head(impl)


def test_config_accepts_every_impl():
    from lvface.config import ConfigError, from_dict

    from lvface.heads import IMPLS

    assert set(IMPLS) == {"auto", "triton", "triton_atomic", "chunked", "dense"}
    for impl in IMPLS:
        assert from_dict({"loss": {"impl": impl}}).loss.impl == impl
    with pytest.raises(ConfigError, match="loss.impl"):
        from_dict({"loss": {"impl": "fused"}})


def test_lvface_imports_and_trains_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # import triton now raises ImportError
        "import torch\n"
        "from lvface.config import LossConfig, StageConfig\n"
        "from lvface.heads import ShardedMarginHead\n"
        "from lvface.kernels.registry import package_available\n"
        "assert not package_available('triton')\n"
        "head = ShardedMarginHead(11, 8, LossConfig(stages=[StageConfig(sample_rate=0.5)]), group=None)\n"
        "head(torch.randn(4, 8), torch.tensor([0, 3, 3, 10])).backward(); head.update_prototypes()\n"
        "assert head.resolved_impl == 'chunked'\n"
        "try:\n"
        "    ShardedMarginHead(11, 8, LossConfig(impl='triton'), group=None)\n"
        "except ValueError as exc:\n"
        "    assert 'needs the triton package' in str(exc)\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, timeout=300)



# --------------------------------------------------------------------------------------------------
# Compiled for a GPU ahead of time (catches what the interpreter does not: compile errors, shared memory,
# register spills), through benchmarks/kernel_report.py
# --------------------------------------------------------------------------------------------------


def _compile_report(tmp_path, *args) -> list[dict]:
    import json
    from pathlib import Path

    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this triton has no bundled ptxas")
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = tmp_path / "report.json"
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "kernel_report.py"), "--arch", "sm_90",
                           "--json", str(out), *args], cwd=root, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())["rows"]


def _assert_launchable_without_spills(rows):
    for r in rows:
        what = f"{r['kernel']}/{r['variant']}/{r['dtype']}/{'sampled' if r['sampled'] else 'all rows'}"
        assert r["smem"] <= 227 * 1024, f"{what} needs {r['smem']} bytes of shared memory, more than an sm_90 block has"
        assert r["spill_bytes"] == 0, f"{what} spills {r['spill_stores']} B / loads {r['spill_loads']} B at {r['tiles']}"
        assert r["blocks_per_sm"] >= 1, what


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the kernels natively above")
def test_kernels_compile_for_hopper_without_spills(tmp_path):
    """Every launch of the margin CE at the default tiles (forward, grad_x, grad_w, the atomic grad_w; fp32
    and bf16 operands) with Partial-FC rows (the gather: the larger register footprint), and the EPL
    update, compile for sm_90 at D = 512 with zero spill bytes, within an sm_90 block's shared memory, and
    the bf16 products take the Hopper tensor-core instruction (wgmma). The all-rows launches are the
    same code without the row gather: benchmarks/kernel_report.py compiles them (~1 more minute)."""
    rows = _compile_report(tmp_path, "--dtypes", "fp32,bf16", "--sampled", "yes")
    names = {(r["kernel"], r["variant"], r["dtype"]) for r in rows}
    assert names == {(k, v, d) for k, v in (("forward", "-"), ("grad_x", "two_pass"), ("grad_w", "two_pass"),
                                             ("grad_w", "atomic")) for d in ("fp32", "bf16")} | {("epl", "adaptive", "fp32")}
    _assert_launchable_without_spills(rows)
    assert all(r["wgmma"] for r in rows if r["dtype"] == "bf16" and r["kernel"] == "forward")
