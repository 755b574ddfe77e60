"""IJB-C and IJB-B 1:1 template verification, computed the way insightface's IJB scripts do.

Input: the insightface release layout under one root (e.g. ``IJB_release/IJBC``)::

    meta/ijbc_name_5pts_score.txt      "<image> x1 y1 x2 y2 x3 y3 x4 y4 x5 y5 <detector score>" per face
    meta/ijbc_face_tid_mid.txt         "<image> <template id> <media id>", the same faces in the same order
    meta/ijbc_template_pair_label.txt  "<template id> <template id> <1 same | 0 different>" per pair
    loose_crop/<image>                 the loose face crops the landmarks refer to

(``ijbb_*`` for IJB-B.) The protocol (insightface ``eval_ijbc.py`` / ``onnx_ijbc.py``, test mode
N1 D1 F1):

1. align: the similarity transform (least squares, Umeyama) taking the 5 landmarks onto the ArcFace
   112x112 template, bilinear warp, black outside the crop;
2. embed: feature(image) + feature(mirror image), *not* normalised (its norm carries quality), times
   the face's detector score;
3. aggregate: the mean of each media's (video's or photo's) faces, summed over a template's medias,
   L2-normalised;
4. score: the cosine of the two templates of each pair; the ROC of sklearn's ``roc_curve`` (with its
   default ``drop_intermediate``) and, for each FAR in 1e-6 .. 1e-1, the TAR of the ROC point whose
   FPR is nearest (ties: the larger TAR) -- the numbers published IJB tables are made of.

Embedding is batched and, when a process group is given, split over ranks: each rank embeds a
contiguous slice, the features are all-gathered, and rank 0 aggregates and scores.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFont

from lvface.eval.verification import normalize_images, roc_auc
from lvface.progress import progress

log = logging.getLogger(__name__)

# ArcFace's 5-point template for 112x112 crops: eye centres, nose tip, mouth corners (x, y), in pixel
# coordinates with pixel centres on integers (insightface's 96x112 template shifted right by 8).
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)
IJB_FAR_TARGETS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
IJB_NAMES = ("IJBC", "IJBB")
SCORE_CHUNK = 100_000  # pairs scored at once


# ----------------------------------------------------------------------------------------------
# alignment
# ----------------------------------------------------------------------------------------------


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The similarity transform (rotation, uniform scale, translation; no reflection) minimising
    sum ||T(src_i) - dst_i||^2, as a (3, 3) matrix acting on (x, y, 1). Closed form (Umeyama 1991):

        covariance C = dst_c^T src_c / n,  C = U diag(s) V^T,  R = U diag(1, d) V^T with d = sign det C,
        scale = (s_1 + d s_2) / var(src),  t = mean(dst) - scale R mean(src)
    """
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise ValueError(f"estimate_similarity: need two (n >= 2, 2) point sets, got {src.shape} and {dst.shape}")
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_var = (src_c**2).sum() / len(src)
    if src_var <= 1e-12:
        raise ValueError("estimate_similarity: the source points coincide; no transform is defined")
    cov = dst_c.T @ src_c / len(src)  # (2, 2)
    u, s, vt = np.linalg.svd(cov)
    d = np.array([1.0, 1.0 if np.linalg.det(cov) >= 0 else -1.0])
    rotation = u @ np.diag(d) @ vt
    scale = float((s * d).sum() / src_var)
    matrix = np.eye(3)
    matrix[:2, :2] = scale * rotation
    matrix[:2, 2] = dst_mean - scale * rotation @ src_mean
    return matrix


def warp_affine(image: Image.Image, matrix: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """``cv2.warpAffine(image, matrix[:2], size)``: output pixel p takes the input at matrix^-1 p,
    bilinear, black outside. Both use integer pixel centres; PIL samples at centres + 0.5, hence the
    half-pixel shifts around the inverse."""
    matrix = np.asarray(matrix, np.float64)
    if matrix.shape == (2, 3):
        matrix = np.vstack([matrix, [0.0, 0.0, 1.0]])
    inverse = np.linalg.inv(matrix)  # output -> input coordinates
    linear, shift = inverse[:2, :2], inverse[:2, 2]
    offset = shift + 0.5 - linear @ np.array([0.5, 0.5])
    coefficients = (linear[0, 0], linear[0, 1], offset[0], linear[1, 0], linear[1, 1], offset[1])
    return image.transform(size, Image.Transform.AFFINE, coefficients, resample=Image.Resampling.BILINEAR,
                           fillcolor=0)


def align_face(image: Image.Image | np.ndarray, landmarks: np.ndarray, image_size: int = 112) -> np.ndarray:
    """A loose crop and its 5 landmarks (5, 2) -> the aligned face, uint8 (S, S, 3) RGB."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    template = ARCFACE_TEMPLATE * (image_size / 112.0)
    matrix = estimate_similarity(np.asarray(landmarks, np.float64).reshape(5, 2), template)
    return np.array(warp_affine(image.convert("RGB"), matrix, (image_size, image_size)))


# ----------------------------------------------------------------------------------------------
# meta files
# ----------------------------------------------------------------------------------------------


@dataclass
class IJBMeta:
    name: str
    image_dir: Path
    image_names: list[str]
    landmarks: np.ndarray  # (n, 5, 2) float32
    face_scores: np.ndarray  # (n,) float32, the detector's
    templates: np.ndarray  # (n,) int64
    medias: np.ndarray  # (n,) int64
    pair_templates: np.ndarray  # (p, 2) int64
    pair_labels: np.ndarray  # (p,) bool


def _meta_file(meta_dir: Path, name: str, kind: str) -> Path:
    path = meta_dir / f"{name.lower()}_{kind}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"IJB meta file {path} is missing (expected the insightface layout "
                                f"<root>/meta/{name.lower()}_{{name_5pts_score,face_tid_mid,template_pair_label}}.txt)")
    return path


def _read_lines(path: Path, num_fields: int, layout: str) -> list[list[str]]:
    rows = []
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            for line_number, line in enumerate(f, 1):
                fields = line.split()
                if not fields:
                    continue
                if len(fields) != num_fields:
                    raise ValueError(f"{path}:{line_number}: {len(fields)} fields where '{layout}' has "
                                     f"{num_fields}: {line.strip()[:80]!r}")
                rows.append(fields)
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}: not a text meta file ({error})") from error
    if not rows:
        raise ValueError(f"{path}: holds no lines; expected '{layout}' per line")
    return rows


def _numbers(path: Path, rows: list[list[str]], columns: slice, dtype, layout: str) -> np.ndarray:
    try:
        values = np.array([row[columns] for row in rows], dtype=np.float64)
    except ValueError as error:
        bad = next(i for i, row in enumerate(rows) if not _all_numbers(row[columns]))
        raise ValueError(f"{path}: entry {bad + 1} is not '{layout}': {' '.join(rows[bad])[:80]!r}") from error
    if not np.isfinite(values).all():
        raise ValueError(f"{path}: non-finite numbers in '{layout}' columns")
    if np.issubdtype(dtype, np.integer) and not (values == np.round(values)).all():
        raise ValueError(f"{path}: non-integer ids in '{layout}'")
    return values.astype(dtype)


def _all_numbers(tokens: Sequence[str]) -> bool:
    try:
        [float(token) for token in tokens]
    except ValueError:
        return False
    return True


def _read_pairs(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """IJB-C has 15.7M pairs: read with pyarrow's multi-threaded CSV reader."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    layout = "<template id> <template id> <label 0|1>"
    try:
        table = pacsv.read_csv(
            path, read_options=pacsv.ReadOptions(column_names=["t1", "t2", "label"]),
            parse_options=pacsv.ParseOptions(delimiter=" ", ignore_empty_lines=True),
            convert_options=pacsv.ConvertOptions(column_types={"t1": pa.int64(), "t2": pa.int64(),
                                                               "label": pa.int64()}))
    except (pa.ArrowInvalid, pa.ArrowTypeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not an IJB pair file ('{layout}' per line): {error}") from error
    if table.num_rows == 0:
        raise ValueError(f"{path}: holds no pairs; expected '{layout}' per line")
    if any(table.column(c).null_count for c in ("t1", "t2", "label")):
        raise ValueError(f"{path}: empty fields; expected '{layout}' per line")
    pairs = np.stack([table.column("t1").to_numpy(), table.column("t2").to_numpy()], axis=1)
    labels = table.column("label").to_numpy()
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"{path}: labels other than 0 and 1 in the third column ({layout})")
    return pairs, labels.astype(bool)


def read_ijb_meta(root: str | Path, name: str = "IJBC") -> IJBMeta:
    """Read and cross-check the three meta files of IJB-C or IJB-B under `root`."""
    name = name.upper()
    if name not in IJB_NAMES:
        raise ValueError(f"--name {name}: must be one of {', '.join(IJB_NAMES)}")
    root = Path(root)
    meta_dir, image_dir = root / "meta", root / "loose_crop"
    faces_file = _meta_file(meta_dir, name, "name_5pts_score")
    ids_file = _meta_file(meta_dir, name, "face_tid_mid")
    pairs_file = _meta_file(meta_dir, name, "template_pair_label")
    if not image_dir.is_dir():
        raise FileNotFoundError(f"IJB image folder {image_dir} is missing (the loose crops the landmarks refer to)")

    faces_layout = "<image> x1 y1 ... x5 y5 <score>"
    faces = _read_lines(faces_file, 12, faces_layout)
    landmarks = _numbers(faces_file, faces, slice(1, 11), np.float32, faces_layout).reshape(-1, 5, 2)
    face_scores = _numbers(faces_file, faces, slice(11, 12), np.float32, faces_layout).ravel()

    ids_layout = "<image> <template id> <media id>"
    ids = _read_lines(ids_file, 3, ids_layout)
    if len(ids) != len(faces):
        raise ValueError(f"{ids_file} lists {len(ids)} faces but {faces_file} lists {len(faces)}; they must "
                         "list the same faces in the same order")
    mismatch = next((i for i, (a, b) in enumerate(zip(faces, ids)) if a[0] != b[0]), None)
    if mismatch is not None:
        raise ValueError(f"{ids_file} entry {mismatch + 1} is image {ids[mismatch][0]!r} but {faces_file} entry "
                         f"{mismatch + 1} is {faces[mismatch][0]!r}; they must list the same faces in the same order")
    templates = _numbers(ids_file, ids, slice(1, 2), np.int64, ids_layout).ravel()
    medias = _numbers(ids_file, ids, slice(2, 3), np.int64, ids_layout).ravel()

    pair_templates, pair_labels = _read_pairs(pairs_file)
    known = np.isin(pair_templates, np.unique(templates))
    if not known.all():
        row = int(np.flatnonzero(~known.all(1))[0])
        raise ValueError(f"{pairs_file}: pair {row + 1} ({pair_templates[row, 0]} {pair_templates[row, 1]}) names a "
                         f"template that {ids_file} does not define")
    return IJBMeta(name=name, image_dir=image_dir, image_names=[row[0] for row in faces], landmarks=landmarks,
                   face_scores=face_scores, templates=templates, medias=medias, pair_templates=pair_templates,
                   pair_labels=pair_labels)


# ----------------------------------------------------------------------------------------------
# embedding (batched, split over ranks)
# ----------------------------------------------------------------------------------------------


class AlignedIJBFaces(torch.utils.data.Dataset):
    """Face `index` of an IJB set, aligned: uint8 (3, S, S) RGB."""

    def __init__(self, image_dir: Path, image_names: Sequence[str], landmarks: np.ndarray, image_size: int = 112):
        self.image_dir, self.image_names, self.landmarks = Path(image_dir), list(image_names), landmarks
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.image_names)

    def __getitem__(self, index: int) -> torch.Tensor:
        path = self.image_dir / self.image_names[index]
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
        except (OSError, ValueError) as error:
            raise ValueError(f"IJB image {path}: cannot read it ({error})") from error
        try:
            aligned = align_face(image, self.landmarks[index], self.image_size)
        except ValueError as error:
            raise ValueError(f"IJB image {path}: {error}") from error
        return torch.from_numpy(aligned).permute(2, 0, 1).contiguous()  # (3, S, S)


def _rank_slice(num_items: int, rank: int, world_size: int) -> slice:
    per_rank = math.ceil(num_items / world_size)
    return slice(min(rank * per_rank, num_items), min((rank + 1) * per_rank, num_items))


def embed_faces(model_fn: Callable[[torch.Tensor], torch.Tensor], dataset: torch.utils.data.Dataset, *,
                batch_size: int = 128, flip: bool = True, num_workers: int = 0, rank: int = 0,
                world_size: int = 1, group: dist.ProcessGroup | None = None,
                device: torch.device | str = "cpu", log_every: int = 200) -> np.ndarray:
    """Features (n, D) float32 of every face, not normalised: model(image) [+ model(mirror image)].

    With world_size > 1 each rank embeds the contiguous slice `_rank_slice(n, rank, world_size)`, then
    the slices (zero-padded to one length) are all-gathered over `group` as (per_rank, D) tensors on
    `device` (a CUDA device under NCCL). Every rank gets the full array.
    """
    mine = _rank_slice(len(dataset), rank, world_size)
    subset = torch.utils.data.Subset(dataset, range(mine.start, mine.stop))
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, num_workers=num_workers, shuffle=False)
    outputs = []
    start = time.perf_counter()
    with torch.no_grad():
        for batch_index, images in enumerate(progress(loader, desc="ijb: embed", unit="batch")):
            if rank == 0 and batch_index and batch_index % log_every == 0:
                done = batch_index * batch_size
                log.info("embedded %d / %d faces on rank 0 (%.1f faces/s)", done, len(subset),
                         done / (time.perf_counter() - start))
            batch = normalize_images(images)  # (B, 3, S, S) in [-1, 1]
            if flip:
                both = model_fn(torch.cat([batch, torch.flip(batch, dims=[3])])).float()  # (2B, D)
                features = both[: len(batch)] + both[len(batch):]
            else:
                features = model_fn(batch).float()
            outputs.append(features.cpu())
    local = torch.cat(outputs) if outputs else None
    if world_size == 1:
        return local.numpy() if local is not None else np.zeros((0, 0), np.float32)
    # every rank needs D for the padding, also one whose slice is empty
    dim = torch.tensor([local.shape[1] if local is not None else 0], dtype=torch.int64, device=device)
    dist.all_reduce(dim, op=dist.ReduceOp.MAX, group=group)
    per_rank = math.ceil(len(dataset) / world_size)
    padded = torch.zeros(per_rank, int(dim.item()), dtype=torch.float32, device=device)
    if local is not None:
        padded[: len(local)] = local.to(device)
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded, group=group)  # world_size x (per_rank, D)
    return torch.cat(gathered)[: len(dataset)].cpu().numpy()


# ----------------------------------------------------------------------------------------------
# aggregation and scores
# ----------------------------------------------------------------------------------------------


def template_features(face_features: np.ndarray, templates: np.ndarray, medias: np.ndarray,
                      face_weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(template ids sorted ascending, L2-normalised template features (T, D) float64): the mean of
    each (template, media) group's face features (each times its weight, if given), summed over the
    template's medias."""
    order = np.lexsort((medias, templates))  # by template, then media
    features = np.asarray(face_features)[order].astype(np.float64, copy=False)  # (n, D), one copy
    if face_weights is not None:
        features *= np.asarray(face_weights, np.float64)[order, None]
    sorted_templates, sorted_medias = templates[order], medias[order]
    new_media = np.r_[True, (sorted_templates[1:] != sorted_templates[:-1]) | (sorted_medias[1:] != sorted_medias[:-1])]
    media_starts = np.flatnonzero(new_media)
    media_sizes = np.diff(np.r_[media_starts, len(order)])
    media_means = np.add.reduceat(features, media_starts, axis=0) / media_sizes[:, None]  # (M, D)
    media_templates = sorted_templates[media_starts]
    template_starts = np.flatnonzero(np.r_[True, media_templates[1:] != media_templates[:-1]])
    summed = np.add.reduceat(media_means, template_starts, axis=0)  # (T, D)
    norms = np.linalg.norm(summed, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return media_templates[template_starts], summed / norms


def pair_scores(template_ids: np.ndarray, template_feats: np.ndarray, pair_templates: np.ndarray) -> np.ndarray:
    """Cosine similarity (float64) of each pair's templates; `template_ids` sorted ascending."""
    rows = np.searchsorted(template_ids, pair_templates)  # (P, 2)
    clipped = np.minimum(rows, len(template_ids) - 1)
    if (rows >= len(template_ids)).any() or (template_ids[clipped] != pair_templates).any():
        raise ValueError("pair_scores: a pair names a template without features")
    scores = np.empty(len(pair_templates), dtype=np.float64)
    for start in range(0, len(pair_templates), SCORE_CHUNK):
        chunk = rows[start:start + SCORE_CHUNK]
        scores[start:start + SCORE_CHUNK] = np.einsum("ij,ij->i", template_feats[chunk[:, 0]],
                                                      template_feats[chunk[:, 1]])
    return scores


def roc_curve(labels: np.ndarray, scores: np.ndarray, drop_intermediate: bool = True
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), equal to ``sklearn.metrics.roc_curve(labels, scores)``.

    One point per distinct score (accept score >= threshold), from the highest score down, then:
    with `drop_intermediate`, points where both the FP and the TP counts run on a straight line
    (second difference 0 in both) are removed; a first point (0, 0) at threshold +inf is added.
    """
    labels = np.asarray(labels, dtype=bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.size != scores.size:
        raise ValueError(f"roc_curve: {labels.size} labels for {scores.size} scores")
    if labels.all() or not labels.any():
        raise ValueError("roc_curve: needs both positive (same) and negative (different) pairs")
    order = np.argsort(scores, kind="mergesort")[::-1]
    sorted_scores, sorted_labels = scores[order], labels[order]
    last_of_value = np.r_[np.flatnonzero(np.diff(sorted_scores)), scores.size - 1]
    true_positives = np.cumsum(sorted_labels)[last_of_value]
    false_positives = last_of_value + 1 - true_positives
    thresholds = sorted_scores[last_of_value]
    if drop_intermediate and len(false_positives) > 2:
        bends = np.logical_or(np.diff(false_positives, 2), np.diff(true_positives, 2))
        keep = np.flatnonzero(np.r_[True, bends, True])
        false_positives, true_positives, thresholds = false_positives[keep], true_positives[keep], thresholds[keep]
    false_positives, true_positives = np.r_[0, false_positives], np.r_[0, true_positives]
    thresholds = np.r_[np.inf, thresholds]
    return false_positives / false_positives[-1], true_positives / true_positives[-1], thresholds


def tar_at_far_nearest(fpr: np.ndarray, tpr: np.ndarray, far_targets: Sequence[float] = IJB_FAR_TARGETS
                       ) -> dict[float, dict[str, float]]:
    """For each target FAR, the ROC point whose FPR is nearest it (ties: the later point, i.e. the
    larger TPR), as insightface's IJB table: {far: {"tar", "fpr", "index"}}."""
    result = {}
    for target in far_targets:
        distance = np.abs(fpr - target)
        index = int(np.flatnonzero(distance == distance.min())[-1])
        result[float(target)] = {"tar": float(tpr[index]), "fpr": float(fpr[index]), "index": index}
    return result


# ----------------------------------------------------------------------------------------------
# report: table and ROC plot
# ----------------------------------------------------------------------------------------------


def format_tar_table(rows: Mapping[str, Mapping[float, float]], far_targets: Sequence[float] = IJB_FAR_TARGETS) -> str:
    """A text table of TAR (%) per row label and FAR, as insightface prints it."""
    header = ["method"] + [f"{far:.0e}" for far in far_targets]
    body = [[label] + [f"{100 * tars[float(far)]:.2f}" for far in far_targets] for label, tars in rows.items()]
    widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header))]
    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def fmt(row):
        return "| " + " | ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                                 enumerate(zip(row, widths))) + " |"

    return "\n".join([line, fmt(header), line] + [fmt(row) for row in body] + [line])


def write_roc_png(path: str | Path, curves: Mapping[str, tuple[np.ndarray, np.ndarray]], *, title: str = "ROC",
                  far_range: tuple[float, float] = (1e-6, 1.0), size: tuple[int, int] = (800, 600)) -> Path:
    """TAR against FAR (log axis) for each curve, drawn with PIL (no matplotlib needed)."""
    path = Path(path)
    width, height = size
    left, right, top, bottom = 70, 20, 40, 60
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    log_lo, log_hi = math.log10(far_range[0]), math.log10(far_range[1])

    def to_px(far: np.ndarray, tar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = (np.log10(np.clip(far, far_range[0], far_range[1])) - log_lo) / (log_hi - log_lo)
        return left + x * (width - left - right), top + (1 - tar) * (height - top - bottom)

    for decade in range(int(round(log_lo)), int(round(log_hi)) + 1):
        x, _ = to_px(np.array([10.0**decade]), np.array([0.0]))
        draw.line([(x[0], top), (x[0], height - bottom)], fill=(225, 225, 225))
        draw.text((x[0] - 12, height - bottom + 6), f"1e{decade}", fill="black", font=font)
    for tenth in range(11):
        _, y = to_px(np.array([1.0]), np.array([tenth / 10]))
        draw.line([(left, y[0]), (width - right, y[0])], fill=(225, 225, 225))
        draw.text((left - 30, y[0] - 6), f"{tenth / 10:.1f}", fill="black", font=font)
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    draw.text((width // 2 - 60, height - 25), "False Accept Rate (log)", fill="black", font=font)
    draw.text((8, top - 25), "True Accept Rate", fill="black", font=font)
    draw.text((width // 2 - 4 * len(title), 12), title, fill="black", font=font)
    colours = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]
    for index, (label, (fpr, tpr)) in enumerate(curves.items()):
        colour = colours[index % len(colours)]
        x, y = to_px(np.asarray(fpr, np.float64), np.asarray(tpr, np.float64))
        draw.line(list(zip(x.tolist(), y.tolist())), fill=colour, width=2)
        legend_y = top + 10 + 16 * index
        draw.line([(width - right - 190, legend_y + 6), (width - right - 170, legend_y + 6)], fill=colour, width=2)
        draw.text((width - right - 165, legend_y), label[:28], fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------------
# the whole evaluation
# ----------------------------------------------------------------------------------------------


def score_ijb(meta: IJBMeta, face_features: np.ndarray, *, detector_score: bool = True,
              far_targets: Sequence[float] = IJB_FAR_TARGETS) -> dict:
    """Aggregate face features into templates and score the pairs: scores, ROC, TAR@FAR, AUC."""
    weights = meta.face_scores if detector_score else None
    template_ids, template_feats = template_features(face_features, meta.templates, meta.medias, weights)
    scores = pair_scores(template_ids, template_feats, meta.pair_templates)
    fpr, tpr, thresholds = roc_curve(meta.pair_labels, scores)
    points = tar_at_far_nearest(fpr, tpr, far_targets)
    return {
        "scores": scores, "fpr": fpr, "tpr": tpr, "thresholds": thresholds,
        "tar_at_far": {far: point["tar"] for far, point in points.items()},
        "operating_points": {far: {**point, "threshold": float(thresholds[point["index"]])}
                             for far, point in points.items()},
        "auc": roc_auc(scores, meta.pair_labels),
    }


def evaluate_ijb(model_fn: Callable[[torch.Tensor], torch.Tensor], root: str | Path, name: str = "IJBC", *,
                 batch_size: int = 128, num_workers: int = 0, flip: bool = True, detector_score: bool = True,
                 rank: int = 0, world_size: int = 1, group: dist.ProcessGroup | None = None,
                 device: torch.device | str = "cpu", output_dir: str | Path | None = None,
                 label: str = "model", image_size: int = 112, meta: IJBMeta | None = None) -> dict | None:
    """IJB-C / IJB-B 1:1 verification of `model_fn` (a normalised float32 CPU batch -> (B, D)).

    Every rank reads the meta files and embeds its slice; rank 0 returns the results (others None)
    and, with `output_dir`, writes `<name>_scores.npy`, `<name>_roc.png` and `<name>_result.json`.
    `meta`: the already-read meta files of (root, name), to read them once.
    """
    meta = meta if meta is not None else read_ijb_meta(root, name)
    dataset = AlignedIJBFaces(meta.image_dir, meta.image_names, meta.landmarks, image_size)
    log.info("%s: %d faces, %d templates, %d pairs; embedding on %d rank(s)", meta.name, len(dataset),
             len(np.unique(meta.templates)), len(meta.pair_labels), world_size)
    features = embed_faces(model_fn, dataset, batch_size=batch_size, flip=flip, num_workers=num_workers,
                           rank=rank, world_size=world_size, group=group, device=device)
    if rank != 0:
        return None
    scored = score_ijb(meta, features, detector_score=detector_score)
    row_label = f"{label}-{meta.name}"
    table = format_tar_table({row_label: scored["tar_at_far"]})
    result = {
        "name": meta.name, "label": label, "num_faces": len(dataset),
        "num_templates": int(len(np.unique(meta.templates))), "num_pairs": int(len(meta.pair_labels)),
        "flip": flip, "detector_score": detector_score,
        "tar_at_far": scored["tar_at_far"], "operating_points": scored["operating_points"],
        "auc": scored["auc"], "table": table,
    }
    if output_dir is not None:
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        scores_file = output_dir / f"{meta.name.lower()}_scores.npy"
        np.save(scores_file, scored["scores"])
        roc_file = write_roc_png(output_dir / f"{meta.name.lower()}_roc.png",
                                 {row_label: (scored["fpr"], scored["tpr"])}, title=f"{meta.name} 1:1 verification")
        json_file = output_dir / f"{meta.name.lower()}_result.json"
        result.update(scores_file=str(scores_file), roc_png=str(roc_file), json_file=str(json_file))
        json_file.write_text(json.dumps(jsonable(result), indent=1))
    log.info("%s TAR @ FAR (nearest-FPR convention), AUC %.5f:\n%s", meta.name, result["auc"], table)
    return result


def jsonable(value):
    """Floats as dict keys become strings, numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {(f"{k:g}" if isinstance(k, float) else k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
