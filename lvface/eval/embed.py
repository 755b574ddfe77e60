"""Embeddings of aligned face images (`lvface embed`), and the model function the evaluators call.

Weights come from any checkpoint users bring through `lvface.checkpoint.files.load_backbone`; this
module turns the backbone into a batch -> embedding function and writes embeddings of a folder or list
of aligned 112x112 images as .npy or .parquet.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from lvface.checkpoint.files import load_backbone
from lvface.data.images import normalize_images
from lvface.files import atomic_open
from lvface.progress import progress

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


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
    if suffix == ".npy":
        paths_file = output.with_suffix(".paths.txt")
        with atomic_open(output) as handle:
            np.save(handle, embeddings.astype(np.float32, copy=False))
        with atomic_open(paths_file, "w", encoding="utf-8") as handle:
            handle.write("".join(f"{name}\n" for name in names))
        return [output, paths_file]
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        values = pa.array(np.ascontiguousarray(embeddings, dtype=np.float32).ravel(), type=pa.float32())
        offsets = pa.array(np.arange(0, embeddings.size + 1, embeddings.shape[1], dtype=np.int32))
        table = pa.table({"path": pa.array(list(names), type=pa.string()),
                          "embedding": pa.ListArray.from_arrays(offsets, values)})
        with atomic_open(output) as handle:
            pq.write_table(table, handle)
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
    image_size = backbone.module.image_size
    embeddings = embed_images(model_fn, files, batch_size=batch_size, flip=flip, num_workers=num_workers,
                              image_size=image_size)
    written = write_embeddings(output, names, embeddings)
    log.info("embedded %d images (%s, flip=%s) -> %s", len(files), backbone.variant, flip,
             ", ".join(str(p) for p in written))
    return written
