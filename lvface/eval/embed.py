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
from lvface.data.images import IMAGE_EXTENSIONS, normalize_images
from lvface.files import atomic_open
from lvface.progress import progress

log = logging.getLogger(__name__)


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


def read_landmarks_file(path: str | Path, names: Sequence[str]) -> dict[str, np.ndarray]:
    """`--landmarks FILE`: "<image name as listed> x1 y1 ... x5 y5" per line (eyes, nose tip, mouth
    corners in the image's pixels, the IJB meta file's layout without the score) -> {name: (5, 2)}.
    Names not among `names` are an error naming the line (a typo would silently skip the alignment)."""
    path, known, landmarks = Path(path), set(names), {}
    if not path.is_file():
        raise FileNotFoundError(f"--landmarks {path}: no such file")
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        try:
            points = np.array([float(v) for v in fields[1:]], np.float32)
        except ValueError:
            points = np.zeros(0, np.float32)
        if points.size != 10 or not np.isfinite(points).all():
            raise ValueError(f"{path}:{number}: expected '<image> x1 y1 x2 y2 x3 y3 x4 y4 x5 y5', got {line.strip()[:80]!r}")
        if fields[0] not in known:
            raise ValueError(f"{path}:{number}: image {fields[0]!r} is not among the --input images "
                             "(name it as the output lists it: relative to the folder, or as in the list file)")
        landmarks[fields[0]] = points.reshape(5, 2)
    return landmarks


class AlignedImageFiles(torch.utils.data.Dataset):
    """Face images -> (uint8 (3, S, S) RGB tensor, "" or why the image is skipped).

    An image of S x S pixels is taken as aligned; one with landmarks is aligned with them (the ArcFace
    5-point template, as IJB evaluation aligns); anything else, or a file that cannot be decoded, is
    returned as a black image with the reason, so that one bad file does not end the whole job."""

    def __init__(self, files: Sequence[Path], image_size: int = 112,
                 landmarks: Sequence[np.ndarray | None] | None = None) -> None:
        self.files, self.image_size = list(files), image_size
        self.landmarks = list(landmarks) if landmarks is not None else [None] * len(self.files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        path, size = self.files[index], self.image_size
        try:
            with Image.open(path) as image:
                pixels = np.array(image.convert("RGB"))
        except (OSError, ValueError) as error:
            return torch.zeros(3, size, size, dtype=torch.uint8), f"cannot read the image ({error})"
        if self.landmarks[index] is not None:
            from lvface.eval.ijbc import align_face

            pixels = align_face(pixels, self.landmarks[index], size)
        elif pixels.shape[:2] != (size, size):
            return (torch.zeros(3, size, size, dtype=torch.uint8),
                    f"{pixels.shape[1]}x{pixels.shape[0]} pixels, not an aligned {size}x{size} crop")
        return torch.from_numpy(pixels).permute(2, 0, 1).contiguous(), ""  # (3, S, S)


def embed_images(model_fn: Callable[[torch.Tensor], torch.Tensor], files: Sequence[Path], *,
                 batch_size: int = 64, flip: bool = False, num_workers: int = 0, image_size: int = 112,
                 landmarks: Sequence[np.ndarray | None] | None = None) -> tuple[np.ndarray, dict[int, str]]:
    """(L2-normalised float32 embeddings (n_kept, D) of the images that were aligned or could be
    aligned, {index in `files`: why it was skipped} for the others); with `flip`, of each image's
    embedding plus its horizontal mirror's (the verification convention)."""
    loader = torch.utils.data.DataLoader(AlignedImageFiles(files, image_size, landmarks), batch_size=batch_size,
                                         num_workers=num_workers, shuffle=False)
    outputs, skipped, offset = [], {}, 0
    with torch.no_grad():
        for images, reasons in progress(loader, desc="embed", unit="batch"):
            keep = [i for i, reason in enumerate(reasons) if not reason]
            skipped.update({offset + i: reason for i, reason in enumerate(reasons) if reason})
            offset += len(reasons)
            if not keep:
                continue
            batch = normalize_images(images[keep])  # (B, 3, S, S) in [-1, 1]
            features = model_fn(batch).float()
            if flip:
                features = features + model_fn(torch.flip(batch, dims=[3])).float()
            outputs.append(torch.nn.functional.normalize(features, dim=1).numpy())
    if not outputs:
        return np.zeros((0, 0), np.float32), skipped
    return np.concatenate(outputs).astype(np.float32, copy=False), skipped


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
              flip: bool = False, num_workers: int = 0, device: str = "auto",
              landmarks_file: str | None = None) -> list[Path]:
    """`lvface embed`: checkpoint + images -> embeddings file(s). Images that are not aligned crops
    (and have no landmarks) or cannot be read are skipped, counted, and listed with the reason in
    `<output stem>.skipped.txt`; the job fails only when no image is left."""
    if Path(output).suffix.lower() not in (".npy", ".parquet"):
        raise ValueError(f"--output {output}: the extension must be .npy or .parquet")
    names, files = list_images(source)
    points = read_landmarks_file(landmarks_file, names) if landmarks_file else {}
    backbone = load_backbone(checkpoint, model)
    model_fn = build_model_fn(backbone.module, pick_device(device))
    embeddings, skipped = embed_images(model_fn, files, batch_size=batch_size, flip=flip, num_workers=num_workers,
                                       image_size=backbone.module.image_size,
                                       landmarks=[points.get(name) for name in names])
    skipped_file = Path(output).with_suffix(".skipped.txt")
    if skipped:
        skipped_file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(skipped_file, "w", encoding="utf-8") as handle:
            handle.write("".join(f"{names[i]}\t{reason}\n" for i, reason in sorted(skipped.items())))
        first = ", ".join(f"{names[i]} ({reason})" for i, reason in sorted(skipped.items())[:3])
        log.warning("skipped %d of %d images (listed in %s): %s%s; align them first or give their 5 landmarks "
                    "with --landmarks", len(skipped), len(files), skipped_file, first, ", ..." if len(skipped) > 3 else "")
    elif skipped_file.exists():
        skipped_file.unlink()  # an earlier run's list would describe other images
    if len(skipped) == len(files):
        raise ValueError(f"--input {source}: none of the {len(files)} images could be embedded (see {skipped_file})")
    kept = [name for i, name in enumerate(names) if i not in skipped]
    written = write_embeddings(output, kept, embeddings)
    log.info("embedded %d images (%s, flip=%s, %d aligned with landmarks, %d skipped) -> %s", len(kept),
             backbone.variant, flip, len(points), len(skipped), ", ".join(str(p) for p in written))
    return written
