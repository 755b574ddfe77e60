"""LVFace Vision Transformer backbones (T/S/B/L/H and a tiny CPU demo).

The architecture and the state_dict key names are those of insightface
``recognition/arcface_torch/backbones/vit.py``, so a backbone saved by arcface_torch or released by
LVFace loads here with ``strict=True`` and gives the same embedding in fp32 eval mode:

    image (B, 3, 112, 112)
      -> patch_embed.proj: Conv2d(3, D, 9, stride 9) -> 12 x 12 = 144 tokens, + pos_embed, pos dropout
      -> [training, mask_ratio > 0] keep a random int(144 * (1 - mask_ratio)) tokens per sample
      -> blocks.{i}: x + drop_path(attn(norm1(x))); x + drop_path(mlp(norm2(x)))   (pre-LN, ReLU6 MLP)
      -> norm (all tokens; no class token)
      -> [training, mask_ratio > 0] removed positions <- mask_token, tokens back in their original order
      -> flatten (B, 144 * D)                                                     = forward_features
      -> feature: Linear(144 D, D) BN1d Linear(D, 512) BN1d -> (B, 512)           = forward

Differences from the reference that do not touch the weights: no autocast inside the model (the
caller sets the precision policy), the final norm runs on the blocks' dtype (the reference casts to
fp32 first; under autocast LayerNorm runs in fp32 anyway), ``drop_rate`` is applied only after the
position embedding (the reference also drops after the attention projection and in the MLP; every
preset uses 0), the masked token count follows the configured ``mask_ratio``, and the feature
head's BatchNorms normalise in fp32 with fp32 running statistics whatever the parameters' dtype
(`FP32BatchNorm1d`; same keys and the same result in fp32).

The model knows nothing of distribution, devices or precision, and prints nothing.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "ViTArgs",
    "VIT_VARIANTS",
    "VisionTransformer",
    "Block",
    "Attention",
    "Mlp",
    "DropPath",
    "FP32BatchNorm1d",
    "NORM_IMPLS",
    "build_vit",
    "count_parameters",
    "forward_flops_per_image",
    "infer_variant",
    "no_weight_decay_names",
]

@dataclass(frozen=True)
class ViTArgs:
    """Arguments of one ViT variant. Anything not here (image size, patch size, embedding size) is an
    argument of `build_vit`, because it is the same for every variant."""

    embed_dim: int
    """Token width D."""
    depth: int
    """Number of transformer blocks."""
    num_heads: int = 8
    """Attention heads; insightface uses 8 for every variant."""
    mlp_ratio: float = 4.0
    """MLP hidden width = int(D * mlp_ratio)."""
    drop_rate: float = 0.0
    """Dropout after the position embedding."""
    drop_path_rate: float = 0.0
    """Stochastic depth of the last block; block i gets linspace(0, rate, depth)[i]."""
    mask_ratio: float = 0.0
    """Fraction of tokens removed per sample during training (0 disables masking)."""
    using_checkpoint: bool = False
    """Activation checkpointing of every block during training (torch.utils.checkpoint, non-reentrant)."""
    attn_impl: str = "sdpa"
    """'sdpa' (F.scaled_dot_product_attention) or 'math' (explicit softmax, the tests' reference)."""
    norm_impl: str = "torch"
    """LayerNorm kernels: 'torch' (nn.LayerNorm) or 'apex' (apex.normalization.FusedLayerNorm, where
    NVIDIA apex is installed; same parameters and state_dict keys)."""


# insightface arcface_torch presets (WebFace42M configs); vit_h is ours; vit_demo runs on a 2-core CPU.
VIT_VARIANTS: dict[str, ViTArgs] = {
    "vit_demo": ViTArgs(embed_dim=96, depth=4),
    "vit_t": ViTArgs(embed_dim=256, depth=12, drop_path_rate=0.05),
    "vit_s": ViTArgs(embed_dim=512, depth=12, drop_path_rate=0.05),
    "vit_b": ViTArgs(embed_dim=512, depth=24, drop_path_rate=0.05, mask_ratio=0.05, using_checkpoint=True),
    "vit_l": ViTArgs(embed_dim=768, depth=24, drop_path_rate=0.05, mask_ratio=0.05, using_checkpoint=True),
    "vit_h": ViTArgs(embed_dim=1024, depth=48, drop_path_rate=0.1, mask_ratio=0.05, using_checkpoint=True),
}


class DropPath(nn.Module):
    """Stochastic depth: zero a residual branch for a whole sample with probability `drop_prob` in
    training, scaling the kept samples by 1 / (1 - drop_prob). Identity in eval mode."""

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)  # (B, 1, 1)
        return x * keep.div_(keep_prob)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class FP32BatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d that normalises in (at least) fp32 and keeps its running statistics in fp32, whatever
    lower precision its parameters, buffers or input were cast to; the output has the input's dtype. Parameters and keys
    are nn.BatchNorm1d's, so insightface checkpoints load unchanged, and in fp32 it is nn.BatchNorm1d.

    A numerical choice of this layer, not a precision policy: the two BatchNorms set the scale of
    the 512-d embedding, and their running statistics are what evaluation and export use. Under bf16
    (8-bit mantissa) a running variance updated with momentum 0.1 stops moving once the update is
    below half an ulp (~0.4% of its value), and a batch variance summed over 384 rows in bf16 is off
    by about as much; mixed-precision engines also disagree on the buffers (DeepSpeed 0.19 casts the
    parameters and leaves the statistics fp32, which fails with a dtype mismatch; older DeepSpeed
    casts both, which degrades eval embeddings). Computing here in fp32 gives the same result under
    either, and costs nothing next to the blocks (two (B, D) tensors)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        for name in ("running_mean", "running_var"):
            statistic = getattr(self, name)
            if statistic is not None and statistic.dtype not in (torch.float32, torch.float64):
                setattr(self, name, statistic.float())  # upcast once, in place of the buffer
        # At least fp32: a float64 layer (a test's reference model, .double()) stays float64.
        compute = torch.float64 if x.dtype == torch.float64 and (
            self.running_mean is None or self.running_mean.dtype == torch.float64) else torch.float32
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                momentum = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or self.running_mean is None
        update_stats = self.training and self.track_running_stats
        weight = self.weight.to(compute) if self.weight is not None else None
        bias = self.bias.to(compute) if self.bias is not None else None
        out = F.batch_norm(
            x.to(compute),  # (B, C)
            self.running_mean if not self.training or update_stats else None,
            self.running_var if not self.training or update_stats else None,
            weight, bias, use_batch_stats, momentum, self.eps,
        )
        return out.to(x.dtype)  # (B, C)


def _apex_layer_norm(dim: int, eps: float) -> nn.Module:
    try:
        from apex.normalization import FusedLayerNorm
    except ImportError as exc:
        raise ValueError(
            f"model.norm_impl=apex needs NVIDIA apex's FusedLayerNorm, which is not importable here ({exc}); "
            "install apex with its CUDA extensions (NGC PyTorch images carry it) or set model.norm_impl=torch"
        ) from None
    return FusedLayerNorm(dim, eps=eps)


NORM_IMPLS: dict[str, Callable[[int, float], nn.Module]] = {
    "torch": lambda dim, eps: nn.LayerNorm(dim, eps=eps),
    "apex": _apex_layer_norm,
}


def build_layer_norm(dim: int, eps: float, norm_impl: str) -> nn.Module:
    """A LayerNorm over the last dimension from the `norm_impl` registry (NORM_IMPLS)."""
    if norm_impl not in NORM_IMPLS:
        raise ValueError(f"ViTArgs.norm_impl={norm_impl!r} is not one of {sorted(NORM_IMPLS)} (model.norm_impl)")
    return NORM_IMPLS[norm_impl](dim, eps)


def _sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, scale=scale)  # (B, heads, N, head_dim)


def _math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    weights = (q @ k.transpose(-2, -1)) * scale  # (B, heads, N, N)
    return weights.softmax(dim=-1) @ v  # (B, heads, N, head_dim)


ATTN_IMPLS: dict[str, Callable[..., torch.Tensor]] = {"sdpa": _sdpa_attention, "math": _math_attention}
"""The attention implementations by name (model.attn_impl): one function of (q, k, v) each."""


class Attention(nn.Module):
    """Multi-head self-attention; qkv without bias, output projection with bias."""

    def __init__(self, dim: int, num_heads: int, attn_impl: str = "sdpa") -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"ViTArgs.embed_dim={dim} must be divisible by num_heads={num_heads}")
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"ViTArgs.attn_impl={attn_impl!r} is not one of {sorted(ATTN_IMPLS)}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.attn_impl = attn_impl
        self.attend = ATTN_IMPLS[attn_impl]
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape  # (B, N, D)
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim)  # (B, N, 3, heads, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, heads, N, head_dim)
        out = self.attend(q, k, v, self.scale)  # (B, heads, N, head_dim)
        out = out.transpose(1, 2).reshape(batch, tokens, dim)  # (B, N, D)
        return self.proj(out)  # (B, N, D)


class Mlp(nn.Module):
    """fc1 -> ReLU6 -> fc2 (insightface uses ReLU6, not GELU)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))  # (B, N, D)


class Block(nn.Module):
    """Pre-LN transformer block: x + drop_path(attn(norm1(x))), then x + drop_path(mlp(norm2(x)))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float, attn_impl: str,
                 norm_impl: str = "torch") -> None:
        super().__init__()
        self.norm1 = build_layer_norm(dim, 1e-5, norm_impl)
        self.attn = Attention(dim, num_heads, attn_impl)
        self.norm2 = build_layer_norm(dim, 1e-5, norm_impl)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))  # (B, N, D)
        return x + self.drop_path(self.mlp(self.norm2(x)))  # (B, N, D)


def image_size_for(grid: int, patch_size: int) -> int:
    """Input size of a ViT with a grid x grid patch grid: 112 when it fits (112 // 9 = 12: the patch
    convolution ignores the last 4 pixels), else grid * patch_size."""
    return 112 if 112 // patch_size == grid else grid * patch_size


class PatchEmbed(nn.Module):
    """Non-overlapping patches by a strided convolution: (B, 3, H, W) -> (B, (H//p) * (W//p), D)."""

    def __init__(self, img_size: int, patch_size: int, embed_dim: int, in_channels: int = 3) -> None:
        super().__init__()
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)


class VisionTransformer(nn.Module):
    """The insightface arcface_torch ViT. Build one with `build_vit`."""

    def __init__(self, args: ViTArgs, *, num_features: int = 512, img_size: int = 112, patch_size: int = 9) -> None:
        super().__init__()
        if not 0.0 <= args.mask_ratio < 1.0:
            raise ValueError(f"ViTArgs.mask_ratio={args.mask_ratio} must be in [0, 1)")
        self.args = args
        self.embed_dim = dim = args.embed_dim
        self.num_features = num_features
        self.patch_embed = PatchEmbed(img_size, patch_size, dim)
        self.num_patches = tokens = self.patch_embed.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))
        self.pos_drop = nn.Dropout(args.drop_rate) if args.drop_rate > 0 else nn.Identity()
        # device="cpu": a plain list of rates, also when the model is built under torch.device("meta")
        drop_path_rates = torch.linspace(0, args.drop_path_rate, args.depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            Block(dim, args.num_heads, args.mlp_ratio, rate, args.attn_impl, args.norm_impl)
            for rate in drop_path_rates
        )
        self.norm = build_layer_norm(dim, 1e-5, args.norm_impl)
        self.feature = nn.Sequential(
            nn.Linear(tokens * dim, dim, bias=False),
            FP32BatchNorm1d(dim, eps=2e-5),
            nn.Linear(dim, num_features, bias=False),
            FP32BatchNorm1d(num_features, eps=2e-5),
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.mask_ratio = args.mask_ratio
        self.using_checkpoint = args.using_checkpoint
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """insightface init: trunc_normal(.02) for Linear weights and pos_embed, zero biases, LayerNorm
        (1, 0), mask_token normal(.02); the patch convolution and BatchNorms keep PyTorch's defaults."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm) or module.__class__.__name__ == "FusedLayerNorm":
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _mask_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep int(N * (1 - mask_ratio)) random tokens per sample; return them and the permutation
        that puts (kept tokens, then removed ones) back into the original order."""
        batch, tokens, dim = x.shape  # (B, N, D)
        num_keep = int(tokens * (1 - self.mask_ratio))
        noise = torch.rand(batch, tokens, device=x.device)  # (B, N)
        ids_shuffle = noise.argsort(dim=1)  # (B, N): kept tokens first
        ids_restore = ids_shuffle.argsort(dim=1)  # (B, N): inverse permutation
        ids_keep = ids_shuffle[:, :num_keep, None].expand(-1, -1, dim)  # (B, K, D)
        return x.gather(1, ids_keep), ids_restore  # (B, K, D), (B, N)

    def _unmask_tokens(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        batch, num_keep, dim = x.shape  # (B, K, D)
        fill = self.mask_token.to(x.dtype).expand(batch, ids_restore.shape[1] - num_keep, dim)  # (B, N-K, D)
        x = torch.cat([x, fill], dim=1)  # (B, N, D) in shuffled order
        return x.gather(1, ids_restore[:, :, None].expand(-1, -1, dim))  # (B, N, D) in original order

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> normalised tokens, flattened (B, N * D)."""
        batch = x.shape[0]
        x = self.pos_drop(self.patch_embed(x) + self.pos_embed)  # (B, N, D)
        masking = self.training and self.mask_ratio > 0
        if masking:
            x, ids_restore = self._mask_tokens(x)  # (B, K, D)
        for block in self.blocks:
            if self.using_checkpoint and self.training:
                x = checkpoint(block, x, use_reentrant=False)  # (B, K, D)
            else:
                x = block(x)  # (B, K, D)
        x = self.norm(x)  # (B, K, D)
        if masking:
            x = self._unmask_tokens(x, ids_restore)  # (B, N, D)
        return x.reshape(batch, self.num_patches * self.embed_dim)  # (B, N * D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> embeddings (B, num_features), not L2-normalised."""
        return self.feature(self.forward_features(x))  # (B, num_features)

    @property
    def image_size(self) -> int:
        """The input size (pixels per side) this backbone expects."""
        return image_size_for(math.isqrt(self.num_patches), self.patch_embed.proj.kernel_size[0])


def _nearest(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def build_vit(
    name: str, *, num_features: int = 512, img_size: int = 112, patch_size: int = 9, **overrides: object
) -> VisionTransformer:
    """A new `VisionTransformer` of variant `name` (a key of `VIT_VARIANTS`), with any `ViTArgs`
    field replaced by a keyword override, e.g. ``build_vit("vit_b", using_checkpoint=False)``."""
    if name not in VIT_VARIANTS:
        raise ValueError(
            f"unknown ViT variant {name!r}{_nearest(name, list(VIT_VARIANTS))}; valid: {', '.join(VIT_VARIANTS)}"
        )
    fields = [field.name for field in dataclasses.fields(ViTArgs)]
    for key in overrides:
        if key not in fields:
            raise ValueError(
                f"unknown ViT override {key!r} for {name!r}{_nearest(key, fields)}; valid: {', '.join(fields)}"
            )
    args = dataclasses.replace(VIT_VARIANTS[name], **overrides)
    return VisionTransformer(args, num_features=num_features, img_size=img_size, patch_size=patch_size)


def build_backbone(model_cfg) -> VisionTransformer:
    """The backbone that the config's `model` section (lvface.config.ModelConfig) describes; its unset
    optional fields keep the variant's values."""
    optional = {key: getattr(model_cfg, key) for key in ("drop_path_rate", "mask_ratio", "using_checkpoint")
                if getattr(model_cfg, key) is not None}
    return build_vit(model_cfg.name, num_features=model_cfg.num_features, attn_impl=model_cfg.attn_impl,
                     norm_impl=model_cfg.norm_impl, **optional)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (buffers such as BatchNorm running statistics excluded)."""
    return sum(param.numel() for param in model.parameters())


def forward_flops_per_image(
    args: ViTArgs, img_size: int = 112, patch_size: int = 9, num_features: int = 512
) -> float:
    """Forward FLOPs of one image, 2 FLOPs per multiply-add; matmuls and the patch convolution only
    (norms, softmax, activations, bias adds and residuals are left out, < 1%).

    With N = (img_size // patch_size)^2 tokens, width D, MLP width H = int(D * mlp_ratio), depth L:

        patch embed   N * D * 3 * patch_size^2
        per block     N * (3 D^2 + D^2 + 2 D H)   qkv, proj, fc1, fc2
                      + 2 * N^2 * D               Q K^T and attention x V
        feature head  N * D * D + D * num_features
        FLOPs = 2 * (patch embed + L * per block + feature head)

    Masked training runs the blocks on fewer tokens; this counts all N. ViT-L: 50.7 GFLOP.
    """
    tokens = (img_size // patch_size) ** 2
    dim = args.embed_dim
    hidden = int(dim * args.mlp_ratio)
    patch_macs = tokens * dim * 3 * patch_size**2
    block_macs = tokens * (4 * dim * dim + 2 * dim * hidden) + 2 * tokens**2 * dim
    head_macs = tokens * dim * dim + dim * num_features
    return 2.0 * (patch_macs + args.depth * block_macs + head_macs)


def infer_variant(state_dict: Mapping[str, torch.Tensor]) -> str:
    """The name in `VIT_VARIANTS` whose width (from pos_embed) and depth (number of blocks.{i}) match
    a backbone state_dict, e.g. a plain insightface .pt file."""
    if "pos_embed" not in state_dict:
        raise ValueError(
            "state_dict has no 'pos_embed': not an lvface/insightface ViT backbone "
            f"(first keys: {list(state_dict)[:5]}; strip a 'module.' or 'backbone.' prefix if present)"
        )
    embed_dim = int(state_dict["pos_embed"].shape[-1])
    block_ids = {int(key.split(".")[1]) for key in state_dict if key.startswith("blocks.")}
    depth = max(block_ids) + 1 if block_ids else 0
    for name, args in VIT_VARIANTS.items():
        if args.embed_dim == embed_dim and args.depth == depth:
            return name
    known = ", ".join(f"{name} (D={args.embed_dim}, depth={args.depth})" for name, args in VIT_VARIANTS.items())
    raise ValueError(f"no ViT variant has embed_dim={embed_dim} and depth={depth}; known: {known}")


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Parameter names to exclude from weight decay: pos_embed, mask_token, every norm parameter and
    every bias (all parameters with fewer than two dimensions)."""
    return {
        name
        for name, param in model.named_parameters()
        if param.ndim < 2 or name.rsplit(".", 1)[-1] in ("pos_embed", "mask_token")
    }
