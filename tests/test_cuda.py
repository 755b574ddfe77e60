"""Checks that only a CUDA device can run; they skip elsewhere. benchmarks/gpu_check.sh runs them
with every other test marked `cuda` (`pytest -m cuda`), Triton kernels natively."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lvface.config import LossConfig, OptimizerConfig, StageConfig
from lvface.heads import ShardedMarginHead, build_head_optimizer
from lvface.models import build_vit
from lvface.models.vit import FP32BatchNorm1d

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda", 0)


def _apex_importable() -> bool:
    try:
        import apex.normalization  # noqa: F401
        import apex.optimizers  # noqa: F401
    except ImportError:
        return False
    return True


def test_vit_bf16_parameters_with_fp32_batchnorm_on_cuda():
    # DeepSpeed 0.19's cast: parameters bf16, buffers as they are
    torch.manual_seed(0)
    reference = build_vit("vit_demo", embed_dim=32, depth=2, mask_ratio=0.0, drop_path_rate=0.0).to(CUDA)
    model = build_vit("vit_demo", embed_dim=32, depth=2, mask_ratio=0.0, drop_path_rate=0.0).to(CUDA)
    model.load_state_dict(reference.state_dict())
    for param in model.parameters():
        param.data = param.data.bfloat16()
    images = torch.randn(16, 3, 112, 112, device=CUDA)
    out = model(images.bfloat16())
    assert out.dtype == torch.bfloat16
    for module in model.modules():
        if isinstance(module, FP32BatchNorm1d):
            assert module.running_var.dtype == torch.float32
    out.float().square().mean().backward()
    model.eval(), reference.eval()
    with torch.no_grad():
        got, want = model(images.bfloat16()).float(), reference(images)
    # bf16 weights and activations through two blocks: ~1e-2 relative
    assert (got - want).norm() / want.norm() < 5e-2


@pytest.mark.parametrize("centers", ["learned", "both"])
def test_head_on_cuda_matches_dense_float64_on_cpu(centers):
    torch.manual_seed(0)
    classes, dim, batch = 1000, 64, 96
    loss_cfg = LossConfig(stages=[StageConfig(name="s", sample_rate=1.0, centers=centers)])
    weight = torch.randn(classes, dim)
    embeddings = torch.randn(batch, dim)
    labels = torch.randint(0, classes, (batch,))
    results = {}
    for device, impl, dtype in ((CUDA, "auto" if "auto" in _impls() else "chunked", torch.float32),
                                (torch.device("cpu"), "dense", torch.float64)):
        head = ShardedMarginHead(classes, dim, dataclasses.replace(loss_cfg, impl=impl), group=None, seed=0).to(device)
        head.set_stage(loss_cfg.stages[0])
        with torch.no_grad():
            head.weight.copy_(weight)
        head = head.to(dtype)
        x = embeddings.to(device=device, dtype=dtype).requires_grad_()
        loss = head(x, labels.to(device))
        loss.backward()
        results[impl if device.type == "cpu" else "cuda"] = (loss.double().cpu(), x.grad.double().cpu(),
                                                             head.weight.grad.double().cpu())
    for got, want in zip(results["cuda"], results["dense"]):
        # fp32 inputs with TF32 or bf16 products and fp32 accumulation: ~1e-3 relative at most
        assert (got - want).norm() / want.norm() < 1e-2


def _impls():
    from lvface.heads import IMPLS

    return IMPLS


def test_driver_is_readable_and_the_loader_choice_follows_it():
    from lvface.data.loader import choose_loader, cuda_driver_version, dali_available, dali_required_driver

    version = cuda_driver_version()
    assert version is not None and version >= 11000
    if dali_available():
        choice, message = choose_loader("auto", device=CUDA, dali_importable=True, driver_version=version,
                                        dali_driver=dali_required_driver())
        assert choice == ("dali" if version >= dali_required_driver() else "torch"), message


@pytest.mark.skipif(not _apex_importable(), reason="NVIDIA apex is not installed")
def test_apex_layer_norm_matches_torch():
    from lvface.models.vit import build_layer_norm

    torch.manual_seed(0)
    ours, theirs = build_layer_norm(96, 1e-5, "torch").to(CUDA), build_layer_norm(96, 1e-5, "apex").to(CUDA)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(8, 144, 96, device=CUDA)
    torch.testing.assert_close(theirs(x), ours(x), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not _apex_importable(), reason="NVIDIA apex is not installed")
def test_apex_head_adamw_matches_torch():
    torch.manual_seed(0)
    states = []
    for impl in ("torch", "apex"):
        head = ShardedMarginHead(300, 32, LossConfig(), group=None, seed=0).to(CUDA)
        optimizer = build_head_optimizer(head, OptimizerConfig(lr=1e-2, weight_decay=0.1), sparse_rows=False,
                                         impl=impl)
        generator = torch.Generator(device="cpu").manual_seed(1)
        for _ in range(3):
            head.weight.grad = torch.randn(head.weight.shape, generator=generator).to(CUDA)
            optimizer.step()
        states.append((head.weight.detach().clone(), optimizer.exp_avg.clone(), optimizer.row_steps.clone()))
    for got, want in zip(states[1], states[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
