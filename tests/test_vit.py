"""Tests of lvface.models.vit: insightface weight format, an independent functional forward,
attention paths, token masking, activation checkpointing, stochastic depth and the helpers.

Big variants are built on the meta device (names, shapes and counts only); numerics use vit_demo.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lvface.models import (
    VIT_VARIANTS,
    ViTArgs,
    VisionTransformer,
    build_vit,
    count_parameters,
    forward_flops_per_image,
    infer_variant,
)
from lvface.models.vit import DropPath, no_weight_decay_names

# (embed_dim, depth) of each variant, written from the insightface arcface_torch configs, not the model.
EXPECTED_DIMS = {
    "vit_demo": (96, 4),
    "vit_t": (256, 12),
    "vit_s": (512, 12),
    "vit_b": (512, 24),
    "vit_l": (768, 24),
    "vit_h": (1024, 48),
}
EXPECTED_PARAMS_M = {"vit_t": 19.14, "vit_s": 76.02, "vit_b": 113.83, "vit_l": 255.68}
TOKENS = 144  # (112 // 9) ** 2
PATCH = 9
HEADS = 8


def expected_state_shapes(dim: int, depth: int, num_features: int = 512) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an insightface arcface_torch ViT backbone state_dict."""
    shapes: dict[str, tuple[int, ...]] = {
        "pos_embed": (1, TOKENS, dim),
        "mask_token": (1, 1, dim),
        "patch_embed.proj.weight": (dim, 3, PATCH, PATCH),
        "patch_embed.proj.bias": (dim,),
        "norm.weight": (dim,),
        "norm.bias": (dim,),
        "feature.0.weight": (dim, TOKENS * dim),
        "feature.2.weight": (num_features, dim),
    }
    for bn, width in (("feature.1", dim), ("feature.3", num_features)):
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{bn}.{leaf}"] = (width,)
        shapes[f"{bn}.num_batches_tracked"] = ()
    for i in range(depth):
        prefix = f"blocks.{i}."
        shapes.update(
            {
                prefix + "norm1.weight": (dim,),
                prefix + "norm1.bias": (dim,),
                prefix + "attn.qkv.weight": (3 * dim, dim),
                prefix + "attn.proj.weight": (dim, dim),
                prefix + "attn.proj.bias": (dim,),
                prefix + "norm2.weight": (dim,),
                prefix + "norm2.bias": (dim,),
                prefix + "mlp.fc1.weight": (4 * dim, dim),
                prefix + "mlp.fc1.bias": (4 * dim,),
                prefix + "mlp.fc2.weight": (dim, 4 * dim),
                prefix + "mlp.fc2.bias": (dim,),
            }
        )
    return shapes


def meta_model(name: str, **overrides: object) -> VisionTransformer:
    with torch.device("meta"):
        return build_vit(name, **overrides)


def randomize_(model: VisionTransformer, seed: int = 0) -> VisionTransformer:
    """Give every tensor (BatchNorm running statistics and LayerNorm affine included) non-default
    values, with weights large enough that the MLP pre-activations exceed 6 (so ReLU6 matters)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=gen)
            if name.endswith("running_var"):
                tensor.copy_(noise.abs() + 0.5)
            elif name.endswith(("norm1.weight", "norm2.weight", "norm.weight", "feature.1.weight", "feature.3.weight")):
                tensor.copy_(1.0 + 0.2 * noise)
            elif tensor.ndim >= 2 and name != "pos_embed" and name != "mask_token":
                fan_in = tensor[0].numel()
                gain = 3.0 if "fc1" in name else 1.0
                tensor.copy_(noise * gain / math.sqrt(fan_in))
            else:
                tensor.copy_(0.1 * noise)
    return model


def images(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 112, 112, generator=torch.Generator().manual_seed(seed))


# "Same math" claims run both sides in float64 (eps 2.2e-16) and allow 1e-9 of the largest value compared.
# The largest differences seen are ~2e-13 of it (4 blocks, and train-mode BatchNorm over 4 samples, which
# amplifies rounding), so another CPU's kernels have 5000x room, while a real error (a wrong scale, mask
# or order) moves values by far more than 1e-9. In float32 the same runs differ by up to 1e-5, by CPU.
F64_RTOL = 1e-9


def assert_same_math(got: torch.Tensor, want: torch.Tensor, scale: float, msg: str | None = None) -> None:
    """float64 `got` == `want` up to F64_RTOL relative, and F64_RTOL * `scale` absolute (for values near 0)."""
    assert got.dtype == want.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=F64_RTOL, atol=F64_RTOL * scale, msg=msg)


# ----------------------------------------------------------------------------------------------------
# An independent functional forward over the state_dict tensors (fp64), following the insightface
# architecture facts: conv patch embed, + pos_embed, pre-LN blocks with ReLU6 MLP, final LN, BN head.


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def _batch_norm_eval(x: torch.Tensor, sd: dict[str, torch.Tensor], prefix: str, eps: float = 2e-5) -> torch.Tensor:
    mean, var = sd[prefix + "running_mean"], sd[prefix + "running_var"]
    return (x - mean) / torch.sqrt(var + eps) * sd[prefix + "weight"] + sd[prefix + "bias"]


def reference_tokens(sd: dict[str, torch.Tensor], x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 3, 112, 112) -> normalised tokens (B, N, D); `keep` (B, K) runs the blocks on those tokens."""
    sd = {key: value.double() for key, value in sd.items()}
    x = F.conv2d(x.double(), sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2) + sd["pos_embed"]
    if keep is not None:
        x = torch.stack([x[b, keep[b]] for b in range(x.shape[0])])
    batch, tokens, dim = x.shape
    head_dim = dim // HEADS
    depth = len({key.split(".")[1] for key in sd if key.startswith("blocks.")})
    for i in range(depth):
        p = f"blocks.{i}."
        h = _layer_norm(x, sd[p + "norm1.weight"], sd[p + "norm1.bias"])
        qkv = (h @ sd[p + "attn.qkv.weight"].T).reshape(batch, tokens, 3, HEADS, head_dim)
        q, k, v = (qkv[:, :, j].transpose(1, 2) for j in range(3))  # (B, heads, N, hd)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), dim=-1)
        attended = (weights @ v).transpose(1, 2).reshape(batch, tokens, dim)
        x = x + attended @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        h = _layer_norm(x, sd[p + "norm2.weight"], sd[p + "norm2.bias"])
        h = torch.clamp(h @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"], 0.0, 6.0)
        x = x + h @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
    return _layer_norm(x, sd["norm.weight"], sd["norm.bias"])


def reference_embedding(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    tokens = reference_tokens(sd, x)
    sd = {key: value.double() for key, value in sd.items()}
    h = tokens.flatten(1) @ sd["feature.0.weight"].T
    h = _batch_norm_eval(h, sd, "feature.1.")
    h = h @ sd["feature.2.weight"].T
    return _batch_norm_eval(h, sd, "feature.3.")


# ----------------------------------------------------------------------------------------------------
# Weight format


@pytest.mark.parametrize("name", list(EXPECTED_DIMS))
def test_state_dict_keys_and_shapes(name: str) -> None:
    dim, depth = EXPECTED_DIMS[name]
    got = {key: tuple(value.shape) for key, value in meta_model(name).state_dict().items()}
    want = expected_state_shapes(dim, depth)
    assert sorted(got) == sorted(want)
    assert got == want


@pytest.mark.parametrize("name", list(EXPECTED_PARAMS_M))
def test_parameter_counts(name: str) -> None:
    count = count_parameters(meta_model(name))
    assert abs(count / 1e6 - EXPECTED_PARAMS_M[name]) < 0.01
    if name == "vit_t":
        assert count == 19_137_792


def test_variant_presets() -> None:
    for name in ("vit_t", "vit_s"):
        assert VIT_VARIANTS[name].drop_path_rate == 0.05 and VIT_VARIANTS[name].mask_ratio == 0.0
        assert not VIT_VARIANTS[name].using_checkpoint
    for name in ("vit_b", "vit_l", "vit_h"):
        assert VIT_VARIANTS[name].mask_ratio == 0.05 and VIT_VARIANTS[name].using_checkpoint
    assert all(args.num_heads == HEADS for args in VIT_VARIANTS.values())


def test_drop_path_rates_linear_over_depth() -> None:
    model = meta_model("vit_t", drop_path_rate=0.11)
    rates = [getattr(block.drop_path, "drop_prob", 0.0) for block in model.blocks]
    assert isinstance(model.blocks[0].drop_path, torch.nn.Identity)
    assert rates == pytest.approx([0.11 * i / 11 for i in range(12)], abs=1e-7)


def test_strict_load_round_trip_gives_identical_embedding() -> None:
    torch.manual_seed(0)
    source = randomize_(build_vit("vit_demo")).eval()
    torch.manual_seed(1)
    target = build_vit("vit_demo").eval()
    target.load_state_dict(source.state_dict(), strict=True)
    x = images()
    with torch.no_grad():
        assert torch.equal(source(x), target(x))


def test_strict_load_rejects_extra_and_missing_keys() -> None:
    model = build_vit("vit_demo")
    extra = dict(model.state_dict(), **{"head.weight": torch.zeros(1)})
    with pytest.raises(RuntimeError, match="Unexpected key"):
        build_vit("vit_demo").load_state_dict(extra, strict=True)
    missing = dict(model.state_dict())
    del missing["blocks.0.attn.proj.bias"]
    with pytest.raises(RuntimeError, match="Missing key"):
        build_vit("vit_demo").load_state_dict(missing, strict=True)


def test_matches_independent_functional_reference() -> None:
    """The proof of insightface-weight compatibility: same state_dict, same embedding."""
    model = randomize_(build_vit("vit_demo", attn_impl="math")).eval()
    sd = model.state_dict()
    x = images(batch=3)
    # The weights are large enough that ReLU6's upper clamp is active.
    h = _layer_norm(
        F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=PATCH).flatten(2).transpose(1, 2)
        + sd["pos_embed"],
        sd["blocks.0.norm2.weight"],
        sd["blocks.0.norm2.bias"],
    )
    assert (h @ sd["blocks.0.mlp.fc1.weight"].T + sd["blocks.0.mlp.fc1.bias"]).max() > 6
    want = reference_embedding(sd, x)
    for attn_impl in ("math", "sdpa"):
        candidate = build_vit("vit_demo", attn_impl=attn_impl).eval()
        candidate.load_state_dict(sd, strict=True)
        with torch.no_grad():
            got = candidate(x)
            candidate.double()  # the same weights in the reference's precision
            tokens64, got64 = candidate.forward_features(x.double()), candidate(x.double())
        assert got.shape == (3, 512) and got.dtype == torch.float32
        want_tokens = reference_tokens(sd, x).flatten(1)
        assert_same_math(tokens64, want_tokens, scale=want_tokens.abs().max().item())
        # FP32BatchNorm1d computes in at least fp32, so the float64 model is float64 end to end
        assert_same_math(got64, want, scale=want.abs().max().item())


def test_sdpa_and_math_attention_agree_with_gradients() -> None:
    torch.manual_seed(0)
    # float64: F.scaled_dot_product_attention runs the same fused CPU kernel as in float32
    math_model = randomize_(build_vit("vit_demo", attn_impl="math")).train().double()
    sdpa_model = build_vit("vit_demo", attn_impl="sdpa").train().double()
    sdpa_model.load_state_dict(math_model.state_dict())
    x = images(batch=4).double()
    outputs = []
    for model in (math_model, sdpa_model):
        out = model(x)  # the whole model, float64 end to end (FP32BatchNorm1d computes in at least fp32)
        out.square().mean().backward()
        outputs.append(out.detach())
    assert_same_math(outputs[0], outputs[1], scale=outputs[0].abs().max().item())
    # absolute scale: the largest gradient of the model (some, like biases before a train-mode BatchNorm, are 0)
    grad_scale = max(p.grad.abs().max().item() for p in math_model.parameters() if p.grad is not None)
    for (name, p_math), p_sdpa in zip(math_model.named_parameters(), sdpa_model.parameters()):
        if p_math.grad is None:
            assert p_sdpa.grad is None, name
            continue
        assert_same_math(p_math.grad, p_sdpa.grad, scale=grad_scale, msg=name)


# ----------------------------------------------------------------------------------------------------
# Token masking


def test_masking_fills_removed_positions_with_mask_token_in_original_order() -> None:
    mask_ratio = 0.25
    model = randomize_(build_vit("vit_demo", mask_ratio=mask_ratio)).train().double()  # the reference's precision
    x = images(batch=3).double()
    torch.manual_seed(0)
    with torch.no_grad():
        tokens = model.forward_features(x).reshape(3, TOKENS, -1)
    is_mask = (tokens == model.mask_token.reshape(1, 1, -1)).all(-1)  # (B, N)
    num_keep = int(TOKENS * (1 - mask_ratio))
    assert (is_mask.sum(1) == TOKENS - num_keep).all()
    # Masks differ per sample, and the kept tokens equal the reference run on just those positions
    # (attention is permutation-equivariant, so this checks the un-shuffle to the original order).
    assert not torch.equal(is_mask[0], is_mask[1])
    keep = torch.stack([(~row).nonzero().squeeze(1) for row in is_mask])  # (B, K)
    want = reference_tokens(model.state_dict(), x, keep=keep)
    got = torch.stack([tokens[b, keep[b]] for b in range(3)])
    assert_same_math(got, want, scale=want.abs().max().item())


def test_masking_changes_training_output_but_never_eval() -> None:
    masked = randomize_(build_vit("vit_demo", mask_ratio=0.25))
    plain = build_vit("vit_demo", mask_ratio=0.0)
    plain.load_state_dict(masked.state_dict())
    x = images(batch=4)
    with torch.no_grad():
        masked.eval(), plain.eval()
        torch.testing.assert_close(masked(x), plain(x), rtol=0, atol=0)
        tokens = masked.forward_features(x).reshape(4, TOKENS, -1)
        assert not (tokens == masked.mask_token.reshape(1, 1, -1)).all(-1).any()
        # (training mode last: it updates the BatchNorm running statistics of each model differently)
        torch.manual_seed(0)
        assert not torch.allclose(masked.train()(x), plain.train()(x))


# ----------------------------------------------------------------------------------------------------
# Checkpointing and stochastic depth


def test_activation_checkpointing_same_loss_and_gradients() -> None:
    overrides = dict(drop_path_rate=0.3, mask_ratio=0.1)
    # float64: the recomputed forward may round differently (another buffer alignment for the GEMMs), and
    # train-mode BatchNorm over 4 samples amplifies that to ~1e-5 of a float32 gradient
    plain = randomize_(build_vit("vit_demo", using_checkpoint=False, **overrides)).train().double()
    ckpt = build_vit("vit_demo", using_checkpoint=True, **overrides).train().double()
    ckpt.load_state_dict(plain.state_dict())
    x = images(batch=4).double()
    losses = []
    for model in (plain, ckpt):
        torch.manual_seed(123)  # same masks and drop-path draws in both runs
        loss = model(x).square().mean()
        loss.backward()
        losses.append(loss.detach())
    assert torch.equal(losses[0], losses[1])  # the forward itself is the same code on the same inputs
    grad_scale = max(p.grad.abs().max().item() for p in plain.parameters() if p.grad is not None)
    for (name, p_plain), p_ckpt in zip(plain.named_parameters(), ckpt.parameters()):
        if p_plain.grad is None:
            assert p_ckpt.grad is None, name
            continue
        assert_same_math(p_plain.grad, p_ckpt.grad, scale=grad_scale, msg=name)


def test_drop_path_is_identity_in_eval_and_active_in_training() -> None:
    dropping = randomize_(build_vit("vit_demo", drop_path_rate=0.9))
    plain = build_vit("vit_demo", drop_path_rate=0.0)
    plain.load_state_dict(dropping.state_dict())
    x = images(batch=4)
    with torch.no_grad():
        torch.testing.assert_close(dropping.eval()(x), plain.eval()(x), rtol=0, atol=0)
        dropping.train()
        torch.manual_seed(0)
        first = dropping.forward_features(x)
        second = dropping.forward_features(x)
    assert not torch.equal(first, second)


def test_drop_path_keeps_expectation() -> None:
    layer = DropPath(0.25).train()
    torch.manual_seed(0)
    out = layer(torch.ones(20000, 3, 2))
    per_sample = out[:, 0, 0]
    assert set(per_sample.unique().tolist()) <= {0.0, torch.tensor(1 / 0.75).item()}
    assert (out == per_sample[:, None, None]).all()
    assert per_sample.mean().item() == pytest.approx(1.0, abs=0.03)


# ----------------------------------------------------------------------------------------------------
# Helpers and errors


@pytest.mark.parametrize("name", list(EXPECTED_DIMS))
def test_infer_variant_round_trip(name: str) -> None:
    assert infer_variant(meta_model(name).state_dict()) == name


def test_infer_variant_rejects_unknown_shapes() -> None:
    state = meta_model("vit_demo", embed_dim=64, depth=3).state_dict()
    with pytest.raises(ValueError, match="embed_dim=64 and depth=3"):
        infer_variant(state)
    with pytest.raises(ValueError, match="pos_embed"):
        infer_variant({"module.pos_embed": torch.zeros(1, 144, 96)})


def test_forward_flops_vit_l() -> None:
    assert forward_flops_per_image(VIT_VARIANTS["vit_l"]) == pytest.approx(50.7e9, rel=0.01)
    # 2 FLOPs per multiply-add of the matmuls; the formula by hand for vit_t.
    n, d = 144, 256
    want = 2 * (n * d * 243 + 12 * (12 * n * d * d + 2 * n * n * d) + n * d * d + d * 512)
    assert forward_flops_per_image(VIT_VARIANTS["vit_t"]) == want


def test_build_vit_unknown_name_and_override() -> None:
    with pytest.raises(ValueError, match=r"vit_x.*vit_t"):
        build_vit("vit_x")
    with pytest.raises(ValueError, match="drop_pth_rate.*drop_path_rate"):
        build_vit("vit_demo", drop_pth_rate=0.1)
    with pytest.raises(ValueError, match="attn_impl"):
        build_vit("vit_demo", attn_impl="flash")


def test_overrides_and_args_are_frozen() -> None:
    model = meta_model("vit_b", using_checkpoint=False, mask_ratio=0.0, num_heads=4)
    assert model.args == ViTArgs(embed_dim=512, depth=24, num_heads=4, drop_path_rate=0.05)
    assert model.blocks[0].attn.num_heads == 4
    with pytest.raises(AttributeError):
        VIT_VARIANTS["vit_t"].depth = 3  # type: ignore[misc]


def test_no_weight_decay_names() -> None:
    model = meta_model("vit_demo")
    names = no_weight_decay_names(model)
    assert {"pos_embed", "mask_token", "norm.weight", "norm.bias", "patch_embed.proj.bias"} <= names
    assert {"blocks.3.norm1.weight", "blocks.0.mlp.fc1.bias", "feature.1.weight", "feature.3.bias"} <= names
    decayed = {name for name, _ in model.named_parameters()} - names
    assert decayed == {
        name for name, p in model.named_parameters() if p.ndim >= 2 and name not in ("pos_embed", "mask_token")
    }
    assert "blocks.0.attn.qkv.weight" in decayed and "feature.0.weight" in decayed


def test_fp32_batchnorm_is_batchnorm1d_in_fp32() -> None:
    # Same keys, same arithmetic: bit-identical to nn.BatchNorm1d in training (statistics updated the
    # same way, cumulative momentum too) and in eval.
    from lvface.models.vit import FP32BatchNorm1d

    torch.manual_seed(0)
    for momentum in (0.1, None):
        ours, ref = FP32BatchNorm1d(7, eps=2e-5, momentum=momentum), torch.nn.BatchNorm1d(7, eps=2e-5, momentum=momentum)
        with torch.no_grad():
            ours.weight.uniform_(0.5, 2.0)
            ours.bias.normal_()
        ref.load_state_dict(ours.state_dict(), strict=True)
        for _ in range(3):
            x = torch.randn(5, 7) * 3 + 1
            assert torch.equal(ours(x), ref(x))
        for key, value in ref.state_dict().items():
            assert torch.equal(ours.state_dict()[key], value), key
        ours.eval(), ref.eval()
        x = torch.randn(4, 7)
        assert torch.equal(ours(x), ref(x))


def test_fp32_batchnorm_under_bf16_keeps_fp32_statistics() -> None:
    # Parameters cast to bf16 with fp32 statistics (DeepSpeed 0.19) and everything cast to bf16
    # (older DeepSpeed, module.bfloat16()): both run, return bf16, keep the statistics in fp32, and
    # give the fp32 layer's result to bf16 rounding of input, parameters and output.
    from lvface.models.vit import FP32BatchNorm1d

    torch.manual_seed(1)
    base = FP32BatchNorm1d(16, eps=2e-5)
    with torch.no_grad():
        base.weight.uniform_(0.5, 2.0)
        base.bias.normal_()
    x = (torch.randn(32, 16) * 4 + 2).bfloat16()
    for cast in ("parameters", "module"):
        layer = FP32BatchNorm1d(16, eps=2e-5)
        layer.load_state_dict(base.state_dict())
        reference = FP32BatchNorm1d(16, eps=2e-5)
        reference.load_state_dict(base.state_dict())
        with torch.no_grad():
            reference.weight.copy_(reference.weight.bfloat16().float())
            reference.bias.copy_(reference.bias.bfloat16().float())
        if cast == "parameters":
            for param in layer.parameters():
                param.data = param.data.bfloat16()
        else:
            layer.bfloat16()
        out = layer(x)
        assert out.dtype == torch.bfloat16
        assert layer.running_mean.dtype == layer.running_var.dtype == torch.float32
        want = reference(x.float())
        # bf16 output rounding: relative 2^-8 of each element
        torch.testing.assert_close(out.float(), want, rtol=2**-8, atol=1e-6)
        torch.testing.assert_close(layer.running_var, reference.running_var, rtol=0, atol=0)
        layer.eval(), reference.eval()
        torch.testing.assert_close(layer(x).float(), reference(x.float()), rtol=2**-8, atol=1e-6)
        out.float().sum().backward()
        assert layer.weight.grad.dtype == torch.bfloat16


def test_norm_impl_apex_without_apex_is_a_clear_error(monkeypatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_apex(name, *args, **kwargs):
        if name == "apex" or name.startswith("apex."):
            raise ImportError("No module named 'apex'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_apex)
    with pytest.raises(ValueError, match=r"model\.norm_impl=apex.*model\.norm_impl=torch"):
        build_vit("vit_demo", norm_impl="apex")
    with pytest.raises(ValueError, match=r"norm_impl.*model\.norm_impl"):
        build_vit("vit_demo", norm_impl="fused")
