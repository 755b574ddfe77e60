"""Tests of lvface/kernels: the margin CE backends, the Partial-FC sampler, the EPL update, the dispatch.

The Triton kernels run on this CPU under the interpreter (TRITON_INTERPRET=1), natively where CUDA is
present. triton.jit reads TRITON_INTERPRET when a kernel module is imported, so the interpreted tests run
in the rank-pool processes of tests/dist_utils.py, which set the variable before their first import of
lvface.kernels.triton_*; this process never imports those modules (other tests are unaffected).

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

from lvface.config import LossConfig, StageConfig
from lvface.heads import ShardedMarginHead, init_centers
from lvface.heads.margin import Margin
from lvface.kernels.epl_update import epl_update_
from lvface.kernels.pfc_sample import host_select_rows, sample_seed, select_rows

INTERPRET_TIMEOUT = 900.0  # seconds for one interpreted batch on a busy 2-core machine

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


def _use_interpreter() -> None:
    """Interpret the Triton kernels unless a GPU is present (call before importing them)."""
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
    _use_interpreter()
    from lvface.kernels.margin_ce import target_cosines
    from lvface.kernels.triton_margin_ce import TritonMarginCE

    device = _device()
    out = []
    for shape, dtype, sampled, margin_name, backward in cases:
        margin = MARGINS[margin_name]
        x_hat, centers, targets, rows = (t if t is None else t.to(device) for t in shard_inputs(shape, dtype, sampled))
        n = x_hat.shape[0]
        _, _, _, block_n, block_c = SHAPES[shape]
        backend = TritonMarginCE(block_n=block_n, block_c=block_c, max_splits=2 if shape == "tails" else None,
                                 backward=backward, fp32_precision="ieee")  # the 1e-5 contract, also on a GPU
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


def _assert_close_relative(got, want, tol, what):
    """|got - want| <= tol * (|want| + max |want|): relative to the entry and to the tensor's scale."""
    got = got.double()
    assert not torch.isnan(got).any(), f"{what}: unwritten (NaN) elements at {torch.isnan(got).nonzero()[:5].tolist()}"
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * float(want.abs().max()), msg=what)


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
    _assert_close_relative(got["lse"], lse, tol, "log-sum-exp")
    _assert_close_relative(got["grad_x"], grad_x, tol, "d loss / d x_hat")
    _assert_close_relative(got["grad_centers"], grad_centers, tol, "d loss / d centers")
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


# --------------------------------------------------------------------------------------------------
# The whole head with loss.impl=triton (interpreted) on 1 and 2 gloo ranks
# --------------------------------------------------------------------------------------------------


def head_cases(rank, world, group, cases, dtype):
    _use_interpreter()
    from test_sharded_softmax import run_cases

    return run_cases(rank, world, group, cases, dtype, _device())


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
        _assert_close_relative(triton_ranks[0]["loss"], loss, tol, f"loss, {where}")
        _assert_close_relative(grad_embeddings, world * grad_x, tol, f"d loss / d embeddings x W, {where}")
        _assert_close_relative(grad_weight, grad_w, tol, f"d loss / d W, {where}")
        # and triton == dense, both fp32
        dense_x = torch.cat([r["grad_embeddings"] for r in dense_ranks])
        dense_w = torch.cat([r["grad_weight"] for r in dense_ranks])
        _assert_close_relative(triton_ranks[0]["loss"], dense_ranks[0]["loss"].double(), tol, f"loss vs dense, {where}")
        _assert_close_relative(grad_embeddings, dense_x.double(), tol, f"d embeddings vs dense, {where}")
        _assert_close_relative(grad_weight, dense_w.double(), tol, f"d W vs dense, {where}")
        for r in triton_ranks[1:]:
            assert torch.equal(r["loss"], triton_ranks[0]["loss"]), f"loss differs across ranks, {where}"
        assert grad_embeddings.shape[0] == batch * world


# --------------------------------------------------------------------------------------------------
# EPL update
# --------------------------------------------------------------------------------------------------

EPL_CASES = [("adaptive", torch.float32), ("momentum", torch.float32), ("adaptive", torch.bfloat16)]


def epl_inputs(feature_dtype):
    generator = torch.Generator().manual_seed(5)
    prototypes = F.normalize(torch.randn(19, 24, generator=generator), dim=1)
    prototypes[[2, 7]] = 0.0  # never seen: the first update makes them the class mean
    classes = torch.tensor([7, 3, 3, 11, 7, 7, 0, 18, 3, 2, 11, 5])  # repeats, unsorted
    features = F.normalize(torch.randn(classes.numel(), 24, generator=generator), dim=1).to(feature_dtype)
    return prototypes, features, classes


def epl_cases(rank, world, group, cases):
    _use_interpreter()
    device = _device()
    out = []
    for mode, feature_dtype in cases:
        prototypes, features, classes = (t.to(device) for t in epl_inputs(feature_dtype))
        count = epl_update_(prototypes, features, classes, mode=mode, momentum=0.8, impl="triton")
        out.append((count, prototypes.cpu()))
    return out


@pytest.mark.cuda
def test_triton_epl_update_matches_torch_reference():
    results = run_on_ranks(epl_cases, 1, EPL_CASES, timeout=INTERPRET_TIMEOUT)[0]
    for (mode, feature_dtype), (count, got) in zip(EPL_CASES, results):
        prototypes, features, classes = epl_inputs(feature_dtype)
        want = prototypes.double()
        assert epl_update_(want, features.double(), classes, mode=mode, momentum=0.8, impl="torch") == count == 7
        untouched = torch.ones(19, dtype=torch.bool)
        untouched[classes] = False
        assert torch.equal(got[untouched], prototypes[untouched]), f"{mode}: rows without samples changed"
        _assert_close_relative(got, want, 1e-6, f"EPL update, {mode}, {feature_dtype}")
        torch.testing.assert_close(got[[2, 7]].norm(dim=1), torch.ones(2), rtol=1e-6, atol=1e-6)


def test_epl_update_is_deterministic_with_repeated_labels():
    """The class mean, not the last sample written: permuting the rows of a class changes nothing
    beyond rounding, and a class of k copies of one feature moves as a class with that one sample."""
    prototypes, features, classes = epl_inputs(torch.float64)
    once = prototypes.double().clone()
    epl_update_(once, features, classes, mode="adaptive", momentum=0.0)
    order = torch.randperm(classes.numel(), generator=torch.Generator().manual_seed(1))
    permuted = prototypes.double().clone()
    epl_update_(permuted, features[order], classes[order], mode="adaptive", momentum=0.0)
    torch.testing.assert_close(permuted, once, rtol=1e-12, atol=1e-14)
    tripled = prototypes.double().clone()
    epl_update_(tripled, features[:1].repeat(3, 1), classes[:1].repeat(3), mode="adaptive", momentum=0.0)
    single = prototypes.double().clone()
    epl_update_(single, features[:1], classes[:1], mode="adaptive", momentum=0.0)
    torch.testing.assert_close(tripled, single, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------------------------------
# Partial-FC sampler
# --------------------------------------------------------------------------------------------------


def test_device_sampler_draws_the_host_samplers_rows():
    generator = torch.Generator().manual_seed(3)
    for num_local, rate, n in ((50, 0.3, 40), (50, 0.3, 8), (1000, 0.1, 64), (7, 0.5, 30)):
        labels = torch.randint(-1, num_local, (n,), generator=generator)
        for step in range(3):
            seed = sample_seed(9, step, 100)
            rows, targets = select_rows(labels, num_local, rate, seed)
            host_rows, host_targets = host_select_rows(labels, num_local, rate, seed)
            assert rows is not None or host_rows is None  # the host sampler grows to all rows past the budget
            if rows is None:
                assert torch.equal(targets, labels)
                continue
            positives = labels[labels >= 0].unique()
            here = labels >= 0
            assert rows.numel() == int(rate * num_local), "a fixed sample size: no host sync"
            assert torch.equal(rows, rows.sort().values) and rows.unique().numel() == rows.numel()
            if positives.numel() <= rows.numel():  # the positives fit: the host sampler's rows exactly
                assert torch.equal(rows, host_rows) and torch.equal(targets, host_targets)
                assert torch.equal(rows[targets[here]], labels[here]), "remapped labels point at their class"
            kept = here & (targets >= 0)
            assert torch.equal(rows[targets[kept]], labels[kept]), "remapped labels point at their class"
            assert set(labels[here & ~kept].tolist()).isdisjoint(rows.tolist()), "-1: the class is not sampled"
            assert torch.equal(targets[~here], labels[~here])


def test_sampler_is_deterministic_per_seed_step_and_shard():
    labels = torch.tensor([3, -1, 3, 17, 40, -1])
    draw = lambda step, start: select_rows(labels, 64, 0.25, sample_seed(1, step, start))[0]  # noqa: E731
    assert torch.equal(draw(5, 0), draw(5, 0)), "a resume at step 5 redraws the same sample"
    assert not torch.equal(draw(5, 0), draw(6, 0))
    assert not torch.equal(draw(5, 0), draw(5, 64))


def test_sampler_beyond_the_budget_keeps_its_size_and_a_random_subset_of_positives():
    labels = torch.arange(20)  # 20 positives, budget int(0.1 * 40) = 4
    rows, targets = select_rows(labels, 40, 0.1, 0)
    assert rows.numel() == 4 and bool((rows < 20).all()), "positives first"
    assert torch.equal(targets[rows], torch.arange(4)) and int((targets >= 0).sum()) == 4
    assert not torch.equal(rows, select_rows(labels, 40, 0.1, 1)[0]), "the subset is drawn, not the lowest ids"


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
# Compiled for a GPU ahead of time (catches what the interpreter does not: compile errors, shared memory)
# --------------------------------------------------------------------------------------------------

_AOT_SCRIPT = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lvface.kernels import triton_margin_ce as m
from lvface.kernels import triton_epl as e

target = GPUTarget("cuda", 90, 32)  # H100 / H200
out = {}
for dtype, element_size in (("bf16", 2), ("fp32", 4)):
    block_n, block_c, block_d = m.TritonMarginCE()._blocks(24576, 512, element_size)
    consts = dict(HAS_ROWS=True, EPS=1e-12, INPUT_PRECISION="tf32", UPCAST=False,
                  BLOCK_N=block_n, BLOCK_C=block_c, BLOCK_D=block_d)
    atomic_n, atomic_c, _ = m.TritonMarginCE(backward="atomic")._blocks(24576, 512, element_size, atomic=True)
    head = {"x_ptr": "*" + dtype, "w_ptr": "*" + dtype, "rows_ptr": "*i64", "tgt_ptr": "*i64", "tlogit_ptr": "*fp32"}
    dims = {"N": "i32", "C": "i32", "D": "i32", "stride_x": "i32", "stride_w": "i32"}
    meta = {k: "constexpr" for k in consts}
    signatures = {
        "forward": (m._forward_kernel, {**head, "max_ptr": "*fp32", "sum_ptr": "*fp32", **dims,
                                        "classes_per_split": "i32", "scale": "fp32", **meta}),
    }
    grads = {"tslope_ptr": "*fp32", "lse_ptr": "*fp32", "coef_ptr": "*fp32"}
    signatures["grad_x"] = (m._grad_x_kernel, {**head, **grads, "dx_ptr": "*" + dtype, **dims, "stride_dx": "i32",
                                               "scale": "fp32", **meta})
    signatures["grad_w"] = (m._grad_w_kernel, {**head, **grads, "dw_ptr": "*" + dtype, "dx_ptr": "*fp32", **dims,
                                               "stride_dw": "i32", "stride_dx": "i32", "scale": "fp32", **meta,
                                               "ATOMIC_X": "constexpr"})
    for name, (kernel, signature) in signatures.items():
        for atomic in ((False, True) if name == "grad_w" else (None,)):
            if dtype == "bf16" and name != "grad_w":  # bf16 tiles are half the bytes: the largest one suffices
                continue
            constexprs = consts if atomic is None else {**consts, "ATOMIC_X": atomic}
            if atomic:
                constexprs.update(BLOCK_N=atomic_n, BLOCK_C=atomic_c)
            compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                      target=target, options={"num_warps": m._warps(block_d)})
            out[f"{name}{'_atomic' if atomic else ''}/{dtype}"] = compiled.metadata.shared
signature = {"feat_ptr": "*fp32", "order_ptr": "*i64", "offsets_ptr": "*i64", "seg_rows_ptr": "*i64",
             "proto_ptr": "*fp32", "D": "i32", "stride_f": "i32", "stride_p": "i32", "momentum": "fp32",
             "ADAPTIVE": "constexpr", "EPS": "constexpr", "BLOCK_D": "constexpr"}
compiled = triton.compile(ASTSource(fn=e._epl_kernel, signature=signature,
                                    constexprs={"ADAPTIVE": True, "EPS": 1e-12, "BLOCK_D": 512}), target=target)
out["epl/fp32"] = compiled.metadata.shared
print(json.dumps(out))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the kernels natively above")
def test_kernels_compile_for_hopper_within_shared_memory():
    """Every kernel compiles to sm_90 machine code (triton's bundled ptxas) at the production shape
    D = 512 with the default blocks, within the 227 KB of shared memory an H100 / H200 block may use."""
    import json
    from pathlib import Path

    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this triton has no bundled ptxas")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    shared = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(shared) == {"forward/fp32", "grad_x/fp32", "grad_w/fp32", "grad_w/bf16", "grad_w_atomic/fp32",
                           "grad_w_atomic/bf16", "epl/fp32"}
    for name, size in shared.items():
        assert size <= 227 * 1024, f"{name} needs {size} bytes of shared memory, more than an sm_90 block has"
