"""A backbone from any checkpoint users bring, and embeddings of aligned face images.

`load_backbone` accepts:
- an lvface checkpoint tag folder `<output_dir>/checkpoints/<tag>/`: its `backbone.pt` (a plain fp32
  state_dict) when present, else the DeepSpeed files, gathered to fp32 by DeepSpeed's
  `zero_to_fp32` (any ZeRO stage; under ZeRO-3 the model-states file holds empty placeholders);
- a checkpoints folder holding a `latest` file (lvface's or DeepSpeed's), which names the tag, or the
  training output_dir above it;
- a plain backbone file (.pt/.pth) from insightface arcface_torch, LVFace or lvface, with or without
  `module.` / `backbone.` key prefixes or a {"state_dict": ...} wrapper (or arcface_torch's resume
  file, {"state_dict_backbone": ...}).

The variant is, in order: the `model` argument, `model.name` in the tag folder's config.yaml, or
`infer_variant` on the tensor shapes. The embedding size, image size and patch size are read from
the tensors. The backbone comes back in eval form: no token masking, no activation checkpointing,
no stochastic depth, strict-loaded, in eval mode, fp32.

`lvface embed` writes L2-normalised embeddings of a folder or list of aligned 112x112 images.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from lvface.models import VisionTransformer, build_vit, infer_variant
from lvface.progress import progress

log = logging.getLogger(__name__)

LATEST = "latest"
BACKBONE_FILE = "backbone.pt"
CONFIG_FILE = "config.yaml"
KEY_PREFIXES = ("module.", "backbone.")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


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


def read_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A plain backbone state_dict from a .pt file (tensors only; no code is unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone file {path} does not exist")
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

    state = get_fp32_state_dict_from_zero_checkpoint(str(tag_folder.parent), tag=tag_folder.name)
    return strip_prefixes({key: value.float() if value.is_floating_point() else value
                           for key, value in state.items()})


def resolve_checkpoint(checkpoint: str | Path) -> Path:
    """The tag folder or backbone file that `checkpoint` designates (following a `latest` file)."""
    path = Path(checkpoint)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"--checkpoint {path}: no such file or folder; give a checkpoint tag folder, "
                                f"a checkpoints folder holding '{LATEST}', or a backbone .pt file")
    if (path / "checkpoints" / LATEST).is_file():  # an lvface output_dir
        path = path / "checkpoints"
    if (path / LATEST).is_file() and not (path / BACKBONE_FILE).is_file():
        tag = (path / LATEST).read_text().strip()
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


def image_size_for(grid: int, patch_size: int) -> int:
    """Input size of a ViT with a grid x grid patch grid: 112 when it fits (112 // 9 = 12: the patch
    convolution ignores the last 4 pixels), else grid * patch_size."""
    return 112 if 112 // patch_size == grid else grid * patch_size


def module_image_size(module: VisionTransformer) -> int:
    """The input size (pixels per side) `module` expects."""
    return image_size_for(math.isqrt(module.num_patches), module.patch_embed.proj.kernel_size[0])


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


def pick_device(device: str = "auto") -> torch.device:
    """'auto': this process's GPU (LOCAL_RANK) when CUDA is available, else the CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    return torch.device(device)


def build_model_fn(module: torch.nn.Module, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """model_fn for the eval helpers: a normalised float32 CPU batch -> fp32 embeddings on the CPU."""
    module.to(device).eval()

    @torch.no_grad()
    def model_fn(batch: torch.Tensor) -> torch.Tensor:
        return module(batch.to(device, non_blocking=True)).float().cpu()

    return model_fn


# ----------------------------------------------------------------------------------------------
# lvface embed: aligned images -> embeddings
# ----------------------------------------------------------------------------------------------


def list_images(source: str | Path) -> tuple[list[str], list[Path]]:
    """(names as written to the output, files) of a folder (recursive, sorted) or of a list file
    (one path per line; relative paths are relative to the list file's folder; blank lines and lines
    starting with '#' are skipped)."""
    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        names = [p.relative_to(source).as_posix() for p in files]
    elif source.is_file():
        names = [line.strip() for line in source.read_text().splitlines()]
        names = [name for name in names if name and not name.startswith("#")]
        files = [Path(name) if Path(name).is_absolute() else source.parent / name for name in names]
    else:
        raise FileNotFoundError(f"--input {source}: no such folder or list file")
    if not files:
        raise ValueError(f"--input {source}: no images found (extensions {', '.join(IMAGE_EXTENSIONS)})")
    return names, files


class AlignedImageFiles(torch.utils.data.Dataset):
    """Aligned square face crops -> uint8 (3, S, S) RGB tensors."""

    def __init__(self, files: Sequence[Path], image_size: int = 112) -> None:
        self.files, self.image_size = list(files), image_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        path = self.files[index]
        try:
            with Image.open(path) as image:
                pixels = np.array(image.convert("RGB"))
        except (OSError, ValueError) as error:
            raise ValueError(f"{path}: cannot read the image ({error})") from error
        if pixels.shape[:2] != (self.image_size, self.image_size):
            raise ValueError(f"{path}: {pixels.shape[1]}x{pixels.shape[0]} pixels; lvface embed takes aligned "
                             f"{self.image_size}x{self.image_size} face crops (align them first)")
        return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()  # (3, S, S)


def embed_images(model_fn: Callable[[torch.Tensor], torch.Tensor], files: Sequence[Path], *,
                 batch_size: int = 64, flip: bool = False, num_workers: int = 0,
                 image_size: int = 112) -> np.ndarray:
    """L2-normalised float32 embeddings (n, D) of aligned images; with `flip`, of each image's
    embedding plus its horizontal mirror's (the verification convention)."""
    from lvface.eval.verification import normalize_images

    loader = torch.utils.data.DataLoader(AlignedImageFiles(files, image_size), batch_size=batch_size,
                                         num_workers=num_workers, shuffle=False)
    outputs = []
    with torch.no_grad():
        for images in progress(loader, desc="embed", unit="batch"):
            batch = normalize_images(images)  # (B, 3, S, S) in [-1, 1]
            features = model_fn(batch).float()
            if flip:
                features = features + model_fn(torch.flip(batch, dims=[3])).float()
            outputs.append(torch.nn.functional.normalize(features, dim=1).numpy())
    return np.concatenate(outputs).astype(np.float32, copy=False)


def write_embeddings(output: str | Path, names: Sequence[str], embeddings: np.ndarray) -> list[Path]:
    """Write `embeddings` (n, D) for `names`: .npy (plus `<stem>.paths.txt`, one name per line, same
    order) or .parquet (columns path: string, embedding: list<float32>). Returns the files written."""
    output = Path(output)
    suffix = output.suffix.lower()
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp{os.getpid()}")
    if suffix == ".npy":
        with open(tmp, "wb") as f:
            np.save(f, embeddings.astype(np.float32, copy=False))
        os.replace(tmp, output)
        paths_file = output.with_suffix(".paths.txt")
        paths_file.write_text("".join(f"{name}\n" for name in names))
        return [output, paths_file]
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        values = pa.array(np.ascontiguousarray(embeddings, dtype=np.float32).ravel(), type=pa.float32())
        offsets = pa.array(np.arange(0, embeddings.size + 1, embeddings.shape[1], dtype=np.int32))
        table = pa.table({"path": pa.array(list(names), type=pa.string()),
                          "embedding": pa.ListArray.from_arrays(offsets, values)})
        pq.write_table(table, tmp)
        os.replace(tmp, output)
        return [output]
    raise ValueError(f"--output {output}: the extension must be .npy or .parquet")


def run_embed(checkpoint: str, source: str, output: str, *, model: str | None = None, batch_size: int = 64,
              flip: bool = False, num_workers: int = 0, device: str = "auto") -> list[Path]:
    """`lvface embed`: checkpoint + aligned images -> embeddings file(s)."""
    if Path(output).suffix.lower() not in (".npy", ".parquet"):
        raise ValueError(f"--output {output}: the extension must be .npy or .parquet")
    names, files = list_images(source)
    backbone = load_backbone(checkpoint, model)
    model_fn = build_model_fn(backbone.module, pick_device(device))
    image_size = module_image_size(backbone.module)
    embeddings = embed_images(model_fn, files, batch_size=batch_size, flip=flip, num_workers=num_workers,
                              image_size=image_size)
    written = write_embeddings(output, names, embeddings)
    log.info("embedded %d images (%s, flip=%s) -> %s", len(files), backbone.variant, flip,
             ", ".join(str(p) for p in written))
    return written
