"""One bf16 training step (lvface.engine.train_step) and one eval forward through the real stack on
the CPU (DeepSpeed's CPU accelerator, ZeRO-1/2, one gloo rank), then a checkpoint: the feature head's BatchNorms keep fp32
statistics under DeepSpeed's cast, and backbone.pt holds the optimizer's fp32 master weights bit for
bit, not the bf16 working copy cast up.
"""

from __future__ import annotations

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
from lvface.models.vit import FP32BatchNorm1d, no_weight_decay_names

REPO = Path(__file__).resolve().parent.parent
NUM_CLASSES = 11
BATCH = 6


def _bf16_step(rank, world_size, group, ds_file, out_dir):
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world_size))
    from deepspeed.utils import safe_get_full_fp32_param

    from lvface.checkpoint import manager as ckpt

    torch.manual_seed(0)
    cfg = from_dict({"data": {"batch_size": BATCH}, "train": {"precision": "bf16", "grad_clip": 0.0},
                     "optimizer": {"lr": 1e-3},
                     "loss": {"stages": [{"name": "early", "end_epoch": 1, "sample_rate": 1.0}]}})
    model = build_vit("vit_demo", embed_dim=32, depth=2, mask_ratio=0.0, drop_path_rate=0.0).train()
    ds_config = build_ds_config(REPO / "configs" / ds_file, cfg, world_size, torch.device("cpu"))
    engine = build_engine(model, ds_config, param_groups(model, 0.1, no_weight_decay_names(model)), lambda s: 1.0)
    head = ShardedMarginHead(NUM_CLASSES, 512, cfg.loss, group=group, seed=0)
    head_optimizer = build_head_optimizer(head, cfg.optimizer)
    images = torch.randn(BATCH, 3, 112, 112).bfloat16()
    labels = torch.tensor([0, 3, 3, 7, 10, 5])

    # the training step: the engine's cast, the fp32 BatchNorm, the head, both optimizers
    probe = StepProbe()
    result = train_step(engine, head, head_optimizer, lambda: (images, labels), accumulation=1, group=group,
                        metrics=probe)
    assert not result.skipped
    norms = [m for m in engine.module.modules() if isinstance(m, FP32BatchNorm1d)]
    stats = {name: getattr(m, name) for m in norms for name in ("running_mean", "running_var")}

    # eval forward on the running statistics
    engine.eval()
    with torch.no_grad():
        eval_embeddings = engine(images)

    folder = ckpt.save_checkpoint(
        Path(out_dir), "step00000001", engine=engine, head=head, head_optimizer=head_optimizer,
        config_yaml=cfg.to_yaml(), train_state={"step": 1, "samples_seen": BATCH, "epoch": 0, "position": BATCH,
                                                "world_size": world_size, "stage": "early", "run_id": "bf16-test"},
        zero_stage=ds_config["zero_optimization"]["stage"], rank=rank, world_size=world_size, group=group)
    masters = {name: safe_get_full_fp32_param(p).clone() for name, p in engine.module.named_parameters()}
    working = {name: p.detach().clone() for name, p in engine.module.named_parameters()}
    return {"loss": result.loss_sum.item(), "embedding_dtype": probe.embedding_dtypes[0],
            "eval": eval_embeddings.float(),
            "stat_dtypes": {str(t.dtype) for t in stats.values()},
            "stats_moved": all(not torch.equal(m.running_mean, torch.zeros_like(m.running_mean)) for m in norms),
            "param_dtypes": {str(p.dtype) for p in engine.module.parameters()},
            "masters": masters, "working": working, "folder": str(folder), "images": images}


@pytest.mark.parametrize("ds_file", ["zero2.json", "zero1.json"])
def test_bf16_train_and_eval_step_keeps_fp32_norms_and_saves_master_weights(ds_file, tmp_path):
    result = run_on_ranks(_bf16_step, 1, ds_file, str(tmp_path), timeout=300)[0]
    assert torch.isfinite(torch.tensor(result["loss"]))
    assert result["embedding_dtype"] == torch.bfloat16
    assert result["param_dtypes"] == {"torch.bfloat16"}  # DeepSpeed's cast reached the module
    assert result["stat_dtypes"] == {"torch.float32"}
    assert result["stats_moved"]  # the training forward updated the running statistics
    assert torch.isfinite(result["eval"]).all() and result["eval"].abs().sum() > 0

    backbone = torch.load(Path(result["folder"]) / "backbone.pt", map_location="cpu", weights_only=True)
    masters, working = result["masters"], result["working"]
    assert set(masters) <= set(backbone)
    for name, master in masters.items():
        assert backbone[name].dtype == torch.float32
        assert torch.equal(backbone[name], master), f"{name}: backbone.pt is not the fp32 master weight"
    # After an AdamW step the master weights are no longer bf16 numbers: the working copy cast up
    # differs, so the test above could tell the two apart.
    differing = [name for name in masters if not torch.equal(working[name].float(), masters[name])]
    assert len(differing) > len(masters) // 2

    # the saved backbone, loaded strictly in fp32, gives the bf16 engine's eval embedding up to bf16
    # rounding (8 mantissa bits through two blocks: a few 1e-3 relative; 3e-2 leaves room)
    model = build_vit("vit_demo", embed_dim=32, depth=2, mask_ratio=0.0, drop_path_rate=0.0).eval()
    model.load_state_dict(backbone, strict=True)
    with torch.no_grad():
        reference = model(result["images"].float())
    error = (result["eval"] - reference).norm() / reference.norm()
    assert error < 3e-2, error
