"""Backbones. `build_vit(name)` builds an LVFace ViT from the `VIT_VARIANTS` table."""

from lvface.models.vit import (
    VIT_VARIANTS,
    ViTArgs,
    VisionTransformer,
    build_backbone,
    build_vit,
    count_parameters,
    forward_flops_per_image,
    infer_variant,
    no_weight_decay_names,
)

__all__ = [
    "VIT_VARIANTS",
    "ViTArgs",
    "VisionTransformer",
    "build_backbone",
    "build_vit",
    "count_parameters",
    "forward_flops_per_image",
    "infer_variant",
    "no_weight_decay_names",
]
