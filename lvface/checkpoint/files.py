"""What a checkpoint folder holds, and the one reader of backbone weights from any checkpoint users bring.

A training checkpoint is `<output_dir>/checkpoints/<tag>/` (lvface/checkpoint/manager.py writes it); the
`latest` file beside the tags names the newest complete one. This module only reads, and everything
that reads backbone weights goes through it: `lvface eval`, `lvface embed`, `lvface export` and
`checkpoint.init_backbone` in training. It accepts:
- an lvface checkpoint tag folder: its `backbone.pt` (a plain fp32 state_dict) when present, else the
  DeepSpeed files gathered to fp32 by DeepSpeed's `zero_to_fp32` (any ZeRO stage);
- a checkpoints folder holding a `latest` file (lvface's or DeepSpeed's), or the output_dir above it;
- a plain backbone file (.pt/.pth, or .safetensors) from insightface arcface_torch, LVFace or lvface, with or without
  `module.` / `backbone.` key prefixes or a wrapper dict ({"state_dict": ...}, {"model": ...},
  arcface_torch's resume file {"state_dict_backbone": ...}).

For an eval-form model (`load_backbone`) the variant is, in order: the `model` argument, `model.name`
in the tag folder's config.yaml, or `infer_variant` on the tensor shapes; embedding, image and patch
size come from the tensors.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from lvface.checkpoint.manifest import MANIFEST, CheckpointCorrupt, check_files, verify_file
from lvface.models import VisionTransformer, build_vit, infer_variant
from lvface.models.vit import image_size_for
from lvface.run_folder import CONFIG_NAME, RunFolder

log = logging.getLogger(__name__)

LATEST = "latest"
"""The file in a checkpoints folder naming its newest complete tag (one line)."""
BACKBONE_FILE = "backbone.pt"
CONFIG_FILE = CONFIG_NAME  # the run folder's config file, copied into each checkpoint
TRAIN_STATE_FILE = "train_state.json"
KEY_PREFIXES = ("module.", "backbone.")


@dataclass
class LoadedBackbone:
    module: VisionTransformer
    """The backbone in eval form (eval mode, fp32, CPU)."""
    variant: str
    """Name in VIT_VARIANTS the module was built as."""
    source: str
    """Which file or folder the weights came from, and how (for reports)."""


# ----------------------------------------------------------------------------------------------
# state dicts
# ----------------------------------------------------------------------------------------------


def strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys without leading `module.` / `backbone.` (DDP and arcface_torch wrappers), in any nesting."""
    stripped = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in KEY_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        stripped[key] = value
    return stripped


def read_safetensors_file(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file (`lvface export --format safetensors`, or a published one)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return strip_prefixes(load_file(path, device="cpu"))
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path}: not a readable .safetensors file ({error})") from error


def read_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A plain backbone state_dict from a .pt file (tensors only; no code is unpickled) or a .safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone file {path} does not exist")
    verify_file(path)  # against the checkpoint's manifest when the file is part of an lvface checkpoint
    if path.suffix.lower() == ".safetensors":
        return read_safetensors_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for non-checkpoint files
        raise ValueError(f"{path}: not a PyTorch state_dict file ({error})") from error
    for wrapper in ("state_dict_backbone", "state_dict", "model", "module"):  # arcface_torch resume files, ...
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state_dict (a dict of tensor names to tensors)")
    return strip_prefixes(state)


def _config_model_name(tag_folder: Path) -> str | None:
    config_file = tag_folder / CONFIG_FILE
    if not config_file.is_file():
        return None
    import yaml

    try:
        config = yaml.safe_load(config_file.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{config_file}: not valid YAML ({error})") from error
    name = (config or {}).get("model", {}).get("name") if isinstance(config, dict) else None
    return str(name) if name else None


def _deepspeed_state_dict(tag_folder: Path) -> dict[str, torch.Tensor]:
    """fp32 weights gathered from a DeepSpeed checkpoint's ZeRO shards (stages 0-3)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    problems = check_files(tag_folder) if (tag_folder / MANIFEST).is_file() else []
    if problems:
        raise CheckpointCorrupt("; ".join(problems))
    state = get_fp32_state_dict_from_zero_checkpoint(str(tag_folder.parent), tag=tag_folder.name)
    return strip_prefixes({key: value.float() if value.is_floating_point() else value
                           for key, value in state.items()})


def read_latest(root: Path) -> str | None:
    """The tag that the `latest` pointer of checkpoints folder `root` names (None without a pointer);
    whether that tag's folder exists is the caller's question."""
    pointer = root / LATEST
    return pointer.read_text().strip() if pointer.is_file() else None


def resolve_checkpoint(checkpoint: str | Path) -> Path:
    """The tag folder or backbone file that `checkpoint` designates (following a `latest` file)."""
    path = Path(checkpoint)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"--checkpoint {path}: no such file or folder; give a checkpoint tag folder, "
                                f"a checkpoints folder holding '{LATEST}', or a backbone .pt file")
    if read_latest(RunFolder(path).checkpoints) is not None:  # an lvface output_dir
        path = RunFolder(path).checkpoints
    tag = read_latest(path)
    if tag is not None and not (path / BACKBONE_FILE).is_file():
        if not (path / tag).is_dir():
            raise FileNotFoundError(f"{path / LATEST} names checkpoint {tag!r} but {path / tag} does not exist")
        path = path / tag
    if (path / BACKBONE_FILE).is_file() or any(path.glob("*model_states.pt")):
        return path
    raise FileNotFoundError(f"--checkpoint {path}: the folder holds neither {BACKBONE_FILE} nor DeepSpeed "
                            "model states (*model_states.pt), nor a 'latest' file naming such a folder")


def load_state_dict_from_checkpoint(checkpoint: str | Path) -> tuple[dict[str, torch.Tensor], str | None, str]:
    """(state_dict with insightface key names, model.name from the checkpoint's config or None, source)."""
    path = resolve_checkpoint(checkpoint)
    if path.is_file():
        return read_state_dict_file(path), None, f"backbone file {path}"
    config_name = _config_model_name(path)
    if (path / BACKBONE_FILE).is_file():
        return read_state_dict_file(path / BACKBONE_FILE), config_name, f"{path / BACKBONE_FILE}"
    return _deepspeed_state_dict(path), config_name, f"DeepSpeed checkpoint {path} (gathered to fp32)"


# ----------------------------------------------------------------------------------------------
# the backbone in eval form
# ----------------------------------------------------------------------------------------------


def build_backbone_for_state_dict(state_dict: Mapping[str, torch.Tensor], variant: str,
                                  attn_impl: str = "sdpa") -> VisionTransformer:
    """A new eval-form `variant` backbone sized by the tensors (embedding, image and patch size),
    strictly loaded with `state_dict`."""
    for key in ("pos_embed", "patch_embed.proj.weight", "feature.3.weight"):
        if key not in state_dict:
            raise ValueError(f"state_dict has no {key!r}: not an lvface/insightface ViT backbone "
                             f"(first keys: {list(state_dict)[:5]})")
    patch_size = int(state_dict["patch_embed.proj.weight"].shape[-1])
    img_size = image_size_for(math.isqrt(int(state_dict["pos_embed"].shape[1])), patch_size)
    with torch.device("meta"):  # no time spent initialising weights that are replaced at once
        module = build_vit(variant, num_features=int(state_dict["feature.3.weight"].shape[0]), img_size=img_size,
                           patch_size=patch_size, mask_ratio=0.0, using_checkpoint=False, drop_path_rate=0.0,
                           drop_rate=0.0, attn_impl=attn_impl)
    try:
        module.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as error:
        raise ValueError(f"the weights do not fit variant {variant!r} (name another with --model): {error}") from None
    return module.float().eval()


def load_backbone(checkpoint: str | Path, model: str | None = None, attn_impl: str = "sdpa") -> LoadedBackbone:
    """The backbone of any checkpoint `load_state_dict_from_checkpoint` reads, in eval form on the CPU."""
    state_dict, config_name, source = load_state_dict_from_checkpoint(checkpoint)
    if model:
        variant = model
    elif config_name:
        variant = config_name
    else:
        try:
            variant = infer_variant(state_dict)
        except ValueError as error:
            raise ValueError(f"{source}: {error}; name the variant with --model") from None
    module = build_backbone_for_state_dict(state_dict, variant, attn_impl)
    log.info("backbone %s from %s", variant, source)
    return LoadedBackbone(module=module, variant=variant, source=source)


def load_backbone_into(module: torch.nn.Module, checkpoint: str | Path) -> str:
    """Strictly load the backbone weights of any checkpoint `resolve_checkpoint` accepts into `module`
    (built by the caller, e.g. from the training config); returns a description of the source."""
    state_dict, _, source = load_state_dict_from_checkpoint(checkpoint)
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise ValueError(f"{source} does not match the configured backbone (model.name): {error}") from None
    return source


def add_checkpoint_args(parser, device: bool = True) -> None:
    """--checkpoint / --model (and --device) for every command that reads a backbone."""
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint tag folder, checkpoints folder with 'latest', or backbone .pt / .safetensors file")
    parser.add_argument("--model", default=None,
                        help="ViT variant (vit_t, vit_s, vit_b, vit_l, vit_h, vit_demo); default: from the "
                             "checkpoint's config.yaml, else inferred from the weights")
    if device:
        parser.add_argument("--device", default="auto",
                            help="auto (this rank's GPU if any, else cpu), cpu, cuda:0, ...")
