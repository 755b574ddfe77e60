"""One full training step through the real stack (lvface.engine.train_step): a ViT inside a DeepSpeed
ZeRO engine plus the class-sharded head outside it. On 2 gloo ranks the backbone gradient DeepSpeed ends
up with (after averaging over ranks) and the head's gradient, as the step's optimizers receive them,
equal those of the same global batch on one process without DeepSpeed or any collective.

BatchNorm statistics are per rank (as in arcface_torch, no SyncBN), so the feature head's BatchNorms
run on their running statistics here; everything else is in training mode.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from dist_utils import run_on_ranks
from step_probe import StepProbe
from lvface.config import from_dict
from lvface.engine import build_ds_config, build_engine, param_groups, train_step
from lvface.heads import ShardedMarginHead, build_head_optimizer
from lvface.models import build_vit
from lvface.models.vit import no_weight_decay_names

REPO = Path(__file__).resolve().parent.parent
NUM_CLASSES = 13  # uneven over 2 ranks: 7 + 6
GLOBAL_BATCH = 8


def _config(world_size: int, stage: dict):
    return from_dict({
        "data": {"batch_size": GLOBAL_BATCH // world_size},
        "train": {"grad_clip": 0.0, "precision": "fp32"},
        "loss": {"stages": [stage]},
    })


def _model(state_dict):
    model = build_vit("vit_demo", embed_dim=32, depth=2)
    model.load_state_dict(state_dict)
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm1d):
            module.eval()
    return model


def _deepspeed_step(rank, world_size, group, images, labels, state_dict, stage, ds_file):
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world_size))
    import deepspeed

    cfg = _config(world_size, stage)
    model = _model(state_dict)
    ds_config = build_ds_config(REPO / "configs" / ds_file, cfg, world_size, torch.device("cpu"))
    engine = build_engine(model, ds_config, param_groups(model, 0.1, no_weight_decay_names(model)), lambda s: 1.0)
    head = ShardedMarginHead(NUM_CLASSES, 512, cfg.loss, group=group, seed=0)
    per_rank = GLOBAL_BATCH // world_size
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    grads = {}

    def at_boundary():  # the gradients the optimizers are about to apply
        grads["backbone"] = {name: deepspeed.utils.safe_get_full_grad(param).clone()
                             for name, param in engine.module.named_parameters()}
        grads["head"] = head.weight.grad.clone()

    result = train_step(engine, head, build_head_optimizer(head, cfg.optimizer), lambda: (images[mine], labels[mine]),
                        accumulation=1, group=group, metrics=StepProbe(at_boundary))
    assert not result.skipped
    return {"loss": result.loss_sum.item(), "backbone": grads["backbone"] if rank == 0 else None,
            "head": (head.class_start, grads["head"])}


def _reference_step(images, labels, state_dict, stage):
    cfg = _config(1, stage)
    model = _model(state_dict)
    head = ShardedMarginHead(NUM_CLASSES, 512, cfg.loss, group=None, seed=0)
    loss = head(model(images), labels)
    loss.backward()
    return loss.item(), {name: p.grad for name, p in model.named_parameters()}, head.weight.grad


@pytest.mark.parametrize("ds_file", ["zero2.json", "zero1.json"])
@pytest.mark.parametrize("stage", [
    {"name": "early", "end_epoch": 1, "sample_rate": 1.0, "centers": "learned"},
    {"name": "arcface_exact", "end_epoch": 1, "sample_rate": 1.0, "centers": "learned", "center_penalty": 0.5},
], ids=["learned", "with_penalty"])
def test_two_rank_step_equals_one_process(stage, ds_file):
    torch.manual_seed(0)
    state_dict = build_vit("vit_demo", embed_dim=32, depth=2).state_dict()
    images = torch.randn(GLOBAL_BATCH, 3, 112, 112)
    labels = torch.tensor([0, 12, 5, 7, 7, 3, 11, 6])  # both shards, a repeated class
    ref_loss, ref_backbone, ref_head = _reference_step(images, labels, state_dict, stage)
    results = run_on_ranks(_deepspeed_step, 2, images, labels, state_dict, stage, ds_file, timeout=300)

    for result in results:
        assert result["loss"] == pytest.approx(ref_loss, rel=1e-5)  # float32: 84 eps of the loss; seen equal
    # float32, batches of 4 (two ranks) against one of 8: only the rounding differs, relative to each tensor's
    # largest entry. The longest sums behind these gradients run over every patch token of the batch
    # (K = 8 x 144): their rounding grows like eps * sqrt(K), allow 4x; and where another CPU rounds the
    # forward differently (a few eps of an embedding), the logits s * cos (s = 64) move by s times that and the
    # gradients by up to twice as much: allow 2 * s * 4 eps. Together 7.7e-5; seen 1.5e-6 (the backbone, on
    # AVX-512, AVX2 and default kernels, 1 or 2 threads), the head's gradient and the loss bit-identical.
    eps = torch.finfo(torch.float32).eps
    relative = 4 * eps * math.sqrt(GLOBAL_BATCH * 144) + 2 * 64.0 * 4 * eps
    backbone = results[0]["backbone"]
    assert backbone.keys() == ref_backbone.keys()
    for name, grad in backbone.items():
        reference = ref_backbone[name]
        if reference is None:  # unused without masking (mask_token): DeepSpeed keeps a zero gradient
            assert grad is None or not grad.any(), name
            continue
        torch.testing.assert_close(grad, reference, rtol=0, atol=relative * reference.abs().max().item(),
                                   msg=lambda m: f"backbone grad {name}: {m}")
    head = torch.cat([grad for _, grad in sorted((r["head"] for r in results), key=lambda item: item[0])])
    torch.testing.assert_close(head, ref_head, rtol=0, atol=relative * ref_head.abs().max().item())
    # a gradient that is zero everywhere would pass trivially: make sure it is not
    assert all(g.abs().sum() > 0 for g in ref_backbone.values() if g is not None)
