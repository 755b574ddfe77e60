"""Tests of lvface.heads.sharded_softmax and lvface.heads.optim.

The distributed head runs on real gloo groups of 1..4 ranks (uneven shards: 23 classes) and is compared
with a float64 single-process dense reference written here, on the same global batch of 12: the loss,
d loss / d embeddings (the head returns it x W for the engine's average) and d loss / d W, for ArcFace,
CosFace and ArcFace with the exact gradient, with and without Partial-FC sampling (the reference uses
the union of the classes the ranks sampled), in the early, stable and a penalty stage, on the dense and
chunked paths. Each world size is spawned once (tests/dist_utils.py) and runs every case.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_on_ranks
from torch import nn

from lvface.config import LossConfig, OptimizerConfig, StageConfig
from lvface.heads import HeadAdamW, ShardedMarginHead, build_head_optimizer, init_centers, shard_range
from lvface.heads.margin import margin_from_config

NUM_CLASSES, DIM, GLOBAL_BATCH = 23, 8, 12
CHUNK_MB = 600 / (1 << 20)  # 600 bytes, two classes per chunk in float64 with N = 12, D = 8: many chunks per shard

MARGINS = {
    "arcface": dict(m1=1.0, m2=0.5, m3=0.0, gradient="insightface"),
    "cosface": dict(m1=1.0, m2=0.0, m3=0.4, gradient="insightface"),
    "arcface_exact": dict(m1=1.0, m2=0.5, m3=0.0, gradient="exact"),
}
STAGES = {
    "early": StageConfig(name="early", sample_rate=1.0, centers="learned"),
    "early_sampled": StageConfig(name="early", sample_rate=0.5, centers="learned"),
    "stable": StageConfig(name="stable", sample_rate=1.0, centers="both", prototype_weight=0.5),
    # 0.5: int(0.5 * C_local) holds every shard's positives in every layout (1-4 ranks); a fuller
    # sample leaves classes out (kernels/pfc_sample.py; tests/test_host_syncs.py)
    "stable_sampled_penalty": StageConfig(
        name="mid", sample_rate=0.5, centers="both", prototype_weight=0.3, center_penalty=0.7
    ),
}
CASES = [(m, s, impl) for m in MARGINS for s in STAGES for impl in ("dense", "chunked")]


def global_inputs(dtype=torch.float64):
    generator = torch.Generator().manual_seed(7)
    embeddings = torch.randn(GLOBAL_BATCH, DIM, generator=generator, dtype=torch.float64).to(dtype)
    # repeats, every shard of every layout, and a class per row at the shard edges
    labels = torch.tensor([0, 5, 5, 6, 11, 12, 17, 17, 17, 18, 22, 3])
    prototypes = F.normalize(torch.randn(NUM_CLASSES, DIM, generator=generator, dtype=torch.float64), dim=1).to(dtype)
    prototypes[4] = 0.0  # a class never seen
    return embeddings, labels, prototypes


def loss_cfg(margin_name: str, stage_name: str) -> LossConfig:
    return LossConfig(scale=64.0, **MARGINS[margin_name], stages=[STAGES[stage_name]])


def _head_case(group, margin_name, stage_name, impl, dtype, embeddings, labels, prototypes, rank, world, device):
    cfg = dataclasses.replace(loss_cfg(margin_name, stage_name), impl=impl, chunk_mb=CHUNK_MB)
    head = ShardedMarginHead(NUM_CLASSES, DIM, cfg, group=group, seed=3)
    head.to(device=device, dtype=dtype)
    with torch.no_grad():
        head.prototypes.copy_(prototypes[head.class_start : head.class_end])
    batch = GLOBAL_BATCH // world
    local = embeddings[rank * batch : (rank + 1) * batch].clone().to(device).requires_grad_()
    loss = head(local, labels[rank * batch : (rank + 1) * batch].to(device))
    loss.backward()
    rows = head.last_sampled_rows
    return {  # on the CPU: the results cross process boundaries
        "loss": loss.detach().cpu(),
        "grad_embeddings": local.grad.cpu(),
        "grad_weight": head.weight.grad.cpu(),
        "weight": head.weight.detach().cpu(),
        "sampled": None if rows is None else rows.cpu() + head.class_start,
        "class_start": head.class_start,
        "num_local": head.num_local_classes,
    }


def run_cases(rank, world, group, cases, dtype, device="cpu"):
    embeddings, labels, prototypes = global_inputs(dtype)
    return [_head_case(group, *case, dtype, embeddings, labels, prototypes.to(device), rank, world, device)
            for case in cases]


def reference(margin_name, stage_name, weight, sampled):
    """Float64, one process, dense: the same global batch against the same (sampled) classes."""
    embeddings, labels, prototypes = global_inputs(torch.float64)
    stage = STAGES[stage_name]
    margin = margin_from_config(loss_cfg(margin_name, stage_name))
    x = embeddings.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    classes = torch.arange(NUM_CLASSES) if sampled is None else sampled
    targets = torch.searchsorted(classes, labels)
    assert torch.equal(classes[targets], labels), "every positive class must be sampled"
    mask = F.one_hot(targets, classes.numel()).bool()
    x_hat = F.normalize(x, dim=1)

    def ce(centers):
        cos = x_hat @ F.normalize(centers[classes], dim=1).t()
        return F.cross_entropy(margin.logits(cos, mask), targets)

    if stage.centers == "learned":
        loss = ce(w)
    else:
        loss = (1 - stage.prototype_weight) * ce(w) + stage.prototype_weight * ce(prototypes)
    if stage.center_penalty:
        loss = loss + stage.center_penalty * (F.normalize(w[labels], dim=1) - prototypes[labels]).pow(2).sum(1).mean()
    loss.backward()
    return loss.detach(), x.grad, w.grad


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_matches_single_process_dense_reference(world):
    results = run_on_ranks(run_cases, world, CASES, torch.float64)
    full_weight = init_centers(NUM_CLASSES, DIM, 0, NUM_CLASSES, seed=3).double()
    batch = GLOBAL_BATCH // world
    for index, (margin_name, stage_name, impl) in enumerate(CASES):
        per_rank = [r[index] for r in results]
        where = f"{margin_name}/{stage_name}/{impl} on {world} ranks"
        # shards: uneven contiguous ranges, the first C mod W ranks hold one more
        expected_shards = [shard_range(NUM_CLASSES, world, k) for k in range(world)]
        assert [(r["class_start"], r["num_local"]) for r in per_rank] == expected_shards
        torch.testing.assert_close(torch.cat([r["weight"] for r in per_rank]), full_weight, rtol=0, atol=0)
        sampled = None
        if STAGES[stage_name].sample_rate < 1.0:
            sampled = torch.cat([r["sampled"] for r in per_rank])
            rate = STAGES[stage_name].sample_rate
            for r in per_rank:  # budget int(r * C_local), all positives kept
                mine, start, count = r["sampled"], r["class_start"], r["num_local"]
                positives = global_inputs()[1]
                positives = positives[(positives >= start) & (positives < start + count)].unique()
                assert set(positives.tolist()) <= set(mine.tolist()), where
                assert mine.numel() in (max(int(rate * count), positives.numel()), count), where
        loss, grad_x, grad_w = reference(margin_name, stage_name, full_weight, sampled)
        for k, r in enumerate(per_rank):
            torch.testing.assert_close(r["loss"], loss, rtol=1e-12, atol=1e-12, msg=f"loss, {where}, rank {k}")
            torch.testing.assert_close(
                r["grad_embeddings"], world * grad_x[k * batch : (k + 1) * batch], rtol=1e-10, atol=1e-12,
                msg=f"d loss/d embeddings x W, {where}, rank {k}",
            )
        grad_weight = torch.cat([r["grad_weight"] for r in per_rank])
        torch.testing.assert_close(grad_weight, grad_w, rtol=1e-10, atol=1e-12, msg=f"d loss/d W, {where}")
    # dense and chunked drew the same sample (same seed, same counter)
    for index in range(0, len(CASES), 2):
        for r in results:
            a, b = r[index]["sampled"], r[index + 1]["sampled"]
            assert (a is None and b is None) or torch.equal(a, b)


def test_float32_chunked_close_to_float64_reference():
    cases = [("arcface", "stable", "chunked"), ("cosface", "early_sampled", "chunked")]
    results = run_on_ranks(run_cases, 2, cases, torch.float32)
    full_weight = init_centers(NUM_CLASSES, DIM, 0, NUM_CLASSES, seed=3).double()
    # Tolerance from float32 rounding: a logit s * cos, cos the dot product of two unit float32 vectors of
    # DIM entries, is off by at most (DIM + 2) eps (the sum of |products| is <= 1) plus ~2 eps for the scale
    # and margin; the cross-entropy moves by at most twice the largest logit error (|p - y|_1 <= 2), and so
    # does each gradient relative to the largest (a sum of the same p-weighted terms). With s = 64: 1.8e-4;
    # seen: under 1% of that on the loss and the gradients.
    tolerance = 2 * (DIM + 4) * torch.finfo(torch.float32).eps * 64.0
    for index, (margin_name, stage_name, _) in enumerate(cases):
        sampled = None if results[0][index]["sampled"] is None else torch.cat([r[index]["sampled"] for r in results])
        loss, grad_x, grad_w = reference(margin_name, stage_name, full_weight, sampled)
        torch.testing.assert_close(results[0][index]["loss"].double(), loss, rtol=0, atol=tolerance)
        grad_embeddings = torch.cat([r[index]["grad_embeddings"] for r in results]).double()
        torch.testing.assert_close(grad_embeddings, 2 * grad_x, rtol=0, atol=tolerance * 2 * grad_x.abs().max().item())
        grad_weight = torch.cat([r[index]["grad_weight"] for r in results]).double()
        torch.testing.assert_close(grad_weight, grad_w, rtol=0, atol=tolerance * grad_w.abs().max().item())


# --------------------------------------------------------------------------------------------------
# Bad input: errors on every rank, before any collective can hang
# --------------------------------------------------------------------------------------------------


def bad_inputs(rank, world, group):
    head = ShardedMarginHead(NUM_CLASSES, DIM, loss_cfg("arcface", "early"), group=group)
    messages = {}
    trials = {
        "label_too_big": (torch.randn(3, DIM), torch.tensor([1, 2, NUM_CLASSES + 5 if rank == 1 else 3])),
        "label_negative": (torch.randn(3, DIM), torch.tensor([-2 if rank == 0 else 0, 1, 2])),
        "batch_mismatch": (torch.randn(3 + rank, DIM), torch.arange(3 + rank)),
        "labels_shorter": (torch.randn(3, DIM), torch.arange(3 - rank)),
    }
    for name, (embeddings, labels) in trials.items():
        try:
            head(embeddings, labels)
            messages[name] = None
        except ValueError as exc:
            messages[name] = str(exc)
    # the group still works afterwards
    loss = head(torch.randn(3, DIM), torch.tensor([0, 9, 22]))
    messages["after"] = float(loss)
    return messages


def test_bad_input_raises_on_every_rank_without_hanging():
    results = run_on_ranks(bad_inputs, 2, timeout=60)
    for messages in results:
        assert "label 28 (rank 1) is outside [0, 23)" in messages["label_too_big"]
        assert "label -2 (rank 0) is outside [0, 23)" in messages["label_negative"]
        assert "batch sizes differ across ranks" in messages["batch_mismatch"]
        assert "[3, 4]" in messages["batch_mismatch"]
        assert "differ in length" in messages["labels_shorter"]
        assert messages["after"] > 0


def test_single_process_without_distributed_and_local_shape_errors():
    import torch.distributed as dist

    assert not dist.is_initialized()
    head = ShardedMarginHead(NUM_CLASSES, DIM, loss_cfg("arcface", "early_sampled"), group=None, seed=3)
    assert (head.rank, head.world_size, head.class_start, head.num_local_classes) == (0, 1, 0, NUM_CLASSES)
    with pytest.raises(ValueError, match=r"label 23 \(rank 0\) is outside \[0, 23\)"):
        head(torch.randn(2, DIM), torch.tensor([0, 23]))
    with pytest.raises(ValueError, match="embeddings \\[B, 8\\]"):
        head(torch.randn(2, DIM + 1), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="integer labels"):
        head(torch.randn(2, DIM), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="impl"):
        ShardedMarginHead(NUM_CLASSES, DIM, LossConfig(impl="fused-someday"), group=None)
    head.eval()  # no sampling outside training
    head(torch.randn(2, DIM), torch.tensor([0, 1]))
    assert head.last_sampled_rows is None


# --------------------------------------------------------------------------------------------------
# One full training step on 2 ranks == the same global batch on one process
# --------------------------------------------------------------------------------------------------

TRAIN_STAGES = [
    StageConfig(name="early", end_epoch=1.0, sample_rate=1.0, centers="learned"),
    StageConfig(name="stable", end_epoch=2.0, sample_rate=1.0, centers="both", prototype_weight=0.5),
]


def train_steps(rank, world, group):
    """Backbone stand-in (Linear) + head; the engine's gradient average mimicked by all_reduce / W."""
    import torch.distributed as dist

    torch.manual_seed(0)
    backbone = nn.Linear(6, DIM).double()
    cfg = LossConfig(stages=TRAIN_STAGES, chunk_mb=CHUNK_MB)
    head = ShardedMarginHead(NUM_CLASSES, DIM, cfg, group=group, seed=5).double()
    opt = build_head_optimizer(head, OptimizerConfig(lr=0.05, weight_decay=0.1))
    generator = torch.Generator().manual_seed(11)
    images = torch.randn(2, GLOBAL_BATCH, 6, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, NUM_CLASSES, (2, GLOBAL_BATCH), generator=generator)
    batch = GLOBAL_BATCH // world
    out = []
    for step, stage in enumerate(TRAIN_STAGES):
        head.set_stage(stage)
        backbone.zero_grad()
        opt.zero_grad()
        local = slice(rank * batch, (rank + 1) * batch)
        loss = head(backbone(images[step, local]), labels[step, local])
        loss.backward()
        grads = [p.grad for p in backbone.parameters()]
        if group is not None:
            for g in grads:
                dist.all_reduce(g, group=group)
                g.div_(world)
        opt.step()
        head.update_prototypes()
        with torch.no_grad():
            for p in backbone.parameters():
                p.sub_(0.1 * p.grad)
        out.append({
            "loss": loss.detach(), "backbone_grads": [g.clone() for g in grads], "weight": head.weight.detach().clone(),
            "prototypes": head.prototypes.clone(), "exp_avg": opt.exp_avg.clone(), "exp_avg_sq": opt.exp_avg_sq.clone(),
        })
    return out


def test_training_step_on_two_ranks_equals_one_process():
    single = train_steps(0, 1, None)
    results = run_on_ranks(train_steps, 2)
    for step in range(len(TRAIN_STAGES)):
        for r in results:
            torch.testing.assert_close(r[step]["loss"], single[step]["loss"], rtol=1e-12, atol=1e-12)
            for got, want in zip(r[step]["backbone_grads"], single[step]["backbone_grads"]):
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        for key in ("weight", "prototypes", "exp_avg", "exp_avg_sq"):
            merged = torch.cat([r[step][key] for r in results])
            torch.testing.assert_close(merged, single[step][key], rtol=1e-10, atol=1e-13, msg=key)
    assert single[1]["prototypes"].abs().sum() > 0


# --------------------------------------------------------------------------------------------------
# The head's AdamW
# --------------------------------------------------------------------------------------------------


def _toy_head(stage: StageConfig) -> ShardedMarginHead:
    return ShardedMarginHead(40, DIM, LossConfig(stages=[stage]), group=None, seed=1).double()


def test_adamw_without_sampling_is_torch_adamw():
    head = _toy_head(StageConfig(sample_rate=1.0))
    reference = nn.Parameter(head.weight.detach().clone())
    ours = build_head_optimizer(head, OptimizerConfig(lr=0.01, weight_decay=0.1, betas=[0.8, 0.95], eps=1e-6))
    theirs = torch.optim.AdamW([reference], lr=0.01, weight_decay=0.1, betas=(0.8, 0.95), eps=1e-6)
    ours.block_rows = 7  # several blocks
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):
        x = torch.randn(6, DIM, generator=generator, dtype=torch.float64)
        y = torch.randint(0, 40, (6,), generator=generator)
        head.zero_grad()
        head(x, y).backward()
        reference.grad = head.weight.grad.clone()
        assert ours.step()
        theirs.step()
        torch.testing.assert_close(head.weight.detach(), reference.detach(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(ours.exp_avg_sq, theirs.state[reference]["exp_avg_sq"], rtol=1e-12, atol=0)


def test_adamw_sampled_rows_only_and_dense_option():
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, DIM, generator=generator, dtype=torch.float64), torch.tensor([1, 2, 3, 30, 31, 2])
    for sparse in (True, False):
        head = _toy_head(StageConfig(sample_rate=0.25))
        opt = HeadAdamW(head, lr=0.01, weight_decay=0.1, sparse_rows=sparse, block_rows=3)
        before = head.weight.detach().clone()
        head(x, y).backward()
        touched = head.touched_rows()
        assert torch.equal(touched, head.last_sampled_rows) and touched.numel() == 10
        assert opt.step()
        changed = (head.weight.detach() != before).any(dim=1)
        if sparse:
            assert torch.equal(changed.nonzero().flatten(), touched)
            assert torch.equal(opt.row_steps.nonzero().flatten(), touched)
            assert opt.exp_avg[~changed].abs().sum() == 0
        else:
            assert changed.all() and (opt.row_steps == 1).all()
        assert head.touched_rows().numel() == 0  # cleared by the step


def test_adamw_unscales_fp16_gradients_and_skips_overflow():
    head = _toy_head(StageConfig(sample_rate=1.0))
    twin = _toy_head(StageConfig(sample_rate=1.0))
    x, y = torch.randn(4, DIM, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    head(x, y).mul(1024.0).backward()
    twin(x, y).backward()
    a, b = build_head_optimizer(head, OptimizerConfig()), build_head_optimizer(twin, OptimizerConfig())
    assert a.step(grad_scale=1024.0) and b.step()
    torch.testing.assert_close(head.weight, twin.weight, rtol=1e-12, atol=1e-15)
    weight = head.weight.detach().clone()
    head(x, y).backward()
    head.weight.grad[3, 0] = float("inf")
    assert not a.step(grad_scale=1024.0)
    assert torch.equal(head.weight.detach(), weight)
