"""IJB-C and IJB-B 1:1 template verification, computed the way insightface's IJB scripts do (1:N
identification from the same template features: lvface/eval/ijb_identification.py).

Input: the insightface release layout under one root (e.g. ``IJB_release/IJBC``)::

    meta/ijbc_name_5pts_score.txt      "<image> x1 y1 x2 y2 x3 y3 x4 y4 x5 y5 <detector score>" per face
    meta/ijbc_face_tid_mid.txt         "<image> <template id> <media id>", the same faces in the same order
    meta/ijbc_template_pair_label.txt  "<template id> <template id> <1 same | 0 different>" per pair
    loose_crop/<image>                 the loose face crops the landmarks refer to

(``ijbb_*`` for IJB-B.) The protocol (insightface ``eval_ijbc.py`` / ``onnx_ijbc.py``, test mode
N1 D1 F1), reproduced to the last bit -- the same crops, features and scores given the same model:

1. align: decode with OpenCV (``cv2.imread``, BGR); the similarity transform (least squares, Umeyama)
   taking the float32 landmarks onto the ArcFace 112x112 template, in float32 as skimage's
   ``SimilarityTransform.estimate`` computes it; ``cv2.warpAffine`` (bilinear, black outside the
   crop); BGR -> RGB;
2. embed: feature(image) + feature(mirror image), *not* normalised (its norm carries quality), times
   the face's detector score;
3. aggregate: the mean of each media's (video's or photo's) faces, summed over a template's medias
   (float32, in insightface's order), L2-normalised (float64);
4. score: the cosine of the two templates of each pair; the ROC of sklearn's ``roc_curve`` (with its
   default ``drop_intermediate``) and, for each FAR in 1e-6 .. 1e-1, the TAR of the ROC point whose
   FPR is nearest (ties: the larger TAR) -- the numbers published IJB tables are made of.

Embedding is batched and, when a process group is given, split over ranks: each rank embeds a
contiguous slice, the features are all-gathered, and rank 0 aggregates and scores.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import cv2
import numpy as np
import torch
import torch.distributed as dist

from lvface.data.images import normalize_images
from lvface.files import atomic_write_json
from lvface.progress import progress

log = logging.getLogger(__name__)

# ArcFace's 5-point template for 112x112 crops: eye centres, nose tip, mouth corners (x, y), in pixel
# coordinates with pixel centres on integers. Built as insightface's eval_ijbc.py builds it -- its
# 96x112 template in float32, shifted right by 8 in float32 -- so that the float32 values are the same
# (the last x differs by one float32 ulp from the literal 70.7299).
ARCFACE_TEMPLATE = (np.array([[30.2946, 51.6963], [65.5318, 51.5014], [48.0252, 71.7366],
                              [33.5493, 92.3655], [62.7299, 92.2041]], dtype=np.float32)
                    + np.array([8.0, 0.0], dtype=np.float32))
IJB_FAR_TARGETS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
IJB_NAMES = ("IJBC", "IJBB")
SCORE_CHUNK = 20_000  # pairs scored at once (3 temporary (chunk, D) float64 arrays)


# ----------------------------------------------------------------------------------------------
# alignment
# ----------------------------------------------------------------------------------------------


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The similarity transform (rotation, uniform scale, translation; no reflection) minimising
    sum ||T(src_i) - dst_i||^2, as a (3, 3) float64 matrix acting on (x, y, 1). Closed form (Umeyama 1991):

        covariance C = dst_c^T src_c / n,  C = U diag(s) V^T,  R = U diag(1, d) V^T with d = sign det C,
        scale = (s_1 + d s_2) / var(src),  t = mean(dst) - scale R mean(src)

    Computed in the precision of the points (float32 for float32 landmarks and template, as
    insightface's IJB evaluation gives them to skimage's ``SimilarityTransform.estimate``; float64
    otherwise), with skimage's order of operations, so that the matrix is the one skimage returns to
    the last bit: cv2.warpAffine rounds source positions to 1/1024 pixel, and a float64 estimate of
    float32 landmarks changed 1 or 2 of a crop's 37632 bytes by one grey level in 7 crops of 10.
    """
    src, dst = np.asarray(src), np.asarray(dst)
    dtype = np.result_type(src, dst, np.float32)
    src, dst = src.astype(dtype, copy=False), dst.astype(dtype, copy=False)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise ValueError(f"estimate_similarity: need two (n >= 2, 2) point sets, got {src.shape} and {dst.shape}")
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_var = src_c.var(axis=0).sum()  # (sum of squared distances to the mean) / n
    if not src_var > 1e-12:
        raise ValueError("estimate_similarity: the source points coincide; no transform is defined")
    cov = dst_c.T @ src_c / len(src)  # (2, 2)
    signs = np.array([1.0, -1.0 if np.linalg.det(cov) < 0 else 1.0])
    u, s, vt = np.linalg.svd(cov)
    rank = np.count_nonzero(s > s.max() * 2 * np.finfo(np.float64).eps)
    if rank == 0:
        raise ValueError("estimate_similarity: the destination points coincide; no transform is defined")
    if rank == 1:
        # collinear points (rank 1): det C is 0 up to rounding, the reflection is decided by det U det V
        rotation = u @ vt if np.linalg.det(u) * np.linalg.det(vt) > 0 else u @ np.diag([1.0, -1.0]) @ vt
    else:
        rotation = u @ np.diag(signs) @ vt
    scale = 1.0 / src_var * (s @ signs)  # this grouping: numpy promotes it as skimage's expression
    matrix = np.eye(3)
    matrix[:2, 2] = dst_mean - scale * (rotation @ src_mean)
    matrix[:2, :2] = rotation * scale
    return matrix


def warp_affine(image: np.ndarray, matrix: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Output pixel p takes the input at matrix^-1 p (integer pixel centres), bilinear, black outside:
    ``cv2.warpAffine`` with insightface's arguments. `size` is (width, height); channels keep their order."""
    matrix = np.asarray(matrix, np.float64)
    return cv2.warpAffine(image, np.ascontiguousarray(matrix[:2]), size, flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)


def align_face(image: np.ndarray, landmarks: np.ndarray, image_size: int = 112) -> np.ndarray:
    """A loose crop uint8 (H, W, 3) and its 5 landmarks (5, 2) -> the aligned face uint8 (S, S, 3), in
    the crop's channel order (a PIL image is taken as RGB). float32 landmarks give insightface's crop."""
    if not isinstance(image, np.ndarray):
        image = np.asarray(image.convert("RGB"))
    template = ARCFACE_TEMPLATE * (image_size / 112.0)  # float32, unchanged at 112
    matrix = estimate_similarity(np.asarray(landmarks).reshape(5, 2), template)
    return warp_affine(image, matrix, (image_size, image_size))


def read_ijb_image(path: str | Path) -> np.ndarray:
    """An IJB loose crop as uint8 (H, W, 3) BGR, decoded as insightface decodes it (``cv2.imread``, which
    also applies the EXIF orientation); ValueError naming the file when it cannot be read."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        reason = "no such file" if not Path(path).is_file() else "OpenCV cannot decode it"
        raise ValueError(f"IJB image {path}: cannot read it ({reason})")
    return image


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
    """Face `index` of an IJB set, aligned as insightface aligns it: uint8 (3, S, S) RGB."""

    def __init__(self, image_dir: Path, image_names: Sequence[str], landmarks: np.ndarray, image_size: int = 112):
        self.image_dir, self.image_names, self.landmarks = Path(image_dir), list(image_names), landmarks
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.image_names)

    def __getitem__(self, index: int) -> torch.Tensor:
        path = self.image_dir / self.image_names[index]
        image = read_ijb_image(path)  # BGR, as insightface reads it; the warp is per channel
        try:
            aligned = align_face(image, self.landmarks[index], self.image_size)
        except ValueError as error:
            raise ValueError(f"IJB image {path}: {error}") from error
        aligned = cv2.cvtColor(aligned, cv2.COLOR_BGR2RGB)
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


def _sums_in_row_order(values: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per group of consecutive rows [starts[g], starts[g + 1]): the sum of its rows added one after
    the other, ((r0 + r1) + r2) + ..., and the group sizes. That is the order of ``np.sum(rows, axis=0)``
    (and np.mean) that insightface calls per group; np.add.reduceat adds in another order, which in
    float32 gives other last bits."""
    sizes = np.diff(np.r_[starts, len(values)])
    sums = values[starts].copy()
    for offset in range(1, int(sizes.max(initial=1))):
        longer = np.flatnonzero(sizes > offset)
        sums[longer] += values[starts[longer] + offset]
    return sums, sizes


def template_features(face_features: np.ndarray, templates: np.ndarray, medias: np.ndarray,
                      face_weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(template ids sorted ascending, L2-normalised template features (T, D) float64): the mean of
    each (template, media) group's face features (each times its weight, if given), summed over the
    template's medias in ascending media id, then normalised.

    As insightface's ``image2template_feature``: the weighting, the media means and the sums over
    medias are computed in the features' precision (float32 for a model's features and the meta
    file's detector scores), faces in file order; the normalisation is float64 (sklearn's normalize).
    """
    features = np.asarray(face_features)
    if face_weights is not None:
        features = features * np.asarray(face_weights)[:, None]
    order = np.lexsort((medias, templates))  # by template, then media; file order within a media
    features = features[order]
    sorted_templates, sorted_medias = templates[order], medias[order]
    new_media = np.r_[True, (sorted_templates[1:] != sorted_templates[:-1]) | (sorted_medias[1:] != sorted_medias[:-1])]
    media_starts = np.flatnonzero(new_media)
    media_sums, media_sizes = _sums_in_row_order(features, media_starts)
    media_means = media_sums / media_sizes[:, None].astype(media_sums.dtype)  # (M, D), as np.mean divides
    media_templates = sorted_templates[media_starts]
    template_starts = np.flatnonzero(np.r_[True, media_templates[1:] != media_templates[:-1]])
    summed = _sums_in_row_order(media_means, template_starts)[0].astype(np.float64)  # (T, D)
    norms = np.sqrt(np.einsum("ij,ij->i", summed, summed))
    norms[norms == 0] = 1.0
    return media_templates[template_starts], summed / norms[:, None]


def pair_scores(template_ids: np.ndarray, template_feats: np.ndarray, pair_templates: np.ndarray) -> np.ndarray:
    """Cosine similarity (float64) of each pair's templates; `template_ids` sorted ascending. Summed
    as insightface sums it (``np.sum(a * b, -1)``), so the scores agree to the last bit."""
    rows = np.searchsorted(template_ids, pair_templates)  # (P, 2)
    clipped = np.minimum(rows, len(template_ids) - 1)
    if (rows >= len(template_ids)).any() or (template_ids[clipped] != pair_templates).any():
        raise ValueError("pair_scores: a pair names a template without features")
    scores = np.empty(len(pair_templates), dtype=np.float64)
    for start in range(0, len(pair_templates), SCORE_CHUNK):
        chunk = rows[start:start + SCORE_CHUNK]
        scores[start:start + SCORE_CHUNK] = np.sum(template_feats[chunk[:, 0]] * template_feats[chunk[:, 1]], axis=-1)
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


def roc_area(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """The area under an ROC from `roc_curve` by the trapezoidal rule: ``sklearn.metrics.auc(fpr, tpr)``."""
    fpr, tpr = np.asarray(fpr, np.float64), np.asarray(tpr, np.float64)
    return float((np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0).sum())


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
                  far_range: tuple[float, float] = (1e-6, 1.0), size: tuple[int, int] = (800, 600),
                  mark_fars: Sequence[float] = IJB_FAR_TARGETS) -> Path:
    """TAR against FAR (log axis) for each (fpr, tpr) curve, with the TAR@FAR points of `mark_fars`
    (nearest-FPR convention) marked and labelled, drawn with matplotlib into a PNG of `size` pixels.

    Uses matplotlib's Figure and Agg canvas directly, not pyplot: no window opens and the process's
    matplotlib backend is left as it is.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    dpi = 100
    figure = Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    low, high = far_range
    for index, (label, (fpr, tpr)) in enumerate(curves.items()):
        fpr, tpr = np.asarray(fpr, np.float64), np.asarray(tpr, np.float64)
        colour = f"C{index % 10}"
        # FPR 0 has no place on a log axis: drawn at the axis' left end
        axes.plot(np.clip(fpr, low, high), tpr, color=colour, linewidth=1.5,
                  label=f"{label} (AUC {100 * roc_area(fpr, tpr):.2f}%)")
        points = tar_at_far_nearest(fpr, tpr, [far for far in mark_fars if low <= far <= high])
        marked = {point["index"]: point for point in points.values()}  # neighbouring FARs can share a point
        for point in marked.values():
            x = min(max(point["fpr"], low), high)
            axes.plot([x], [point["tar"]], marker="o", markersize=5, color=colour, linestyle="none")
            axes.annotate(f"{100 * point['tar']:.2f}", (x, point["tar"]), textcoords="offset points",
                          xytext=(4, -12 - 10 * index), fontsize=7, color=colour)
    axes.set_xscale("log")
    axes.set_xlim(low, high)
    axes.set_ylim(0.0, 1.01)
    axes.set_xticks([10.0 ** e for e in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)])
    axes.grid(True, which="major", linestyle="--", linewidth=0.6)
    axes.set_xlabel("False Accept Rate (log)")
    axes.set_ylabel("True Accept Rate")
    axes.set_title(title)
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    figure.savefig(tmp, format="png", dpi=dpi)
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
        "auc": roc_area(fpr, tpr),
    }


PROTOCOLS = ("1:1", "1:N", "both")


def _verification_outputs(meta: IJBMeta, scored: dict, label: str, output_dir: Path | None) -> dict:
    """The 1:1 part of the result (TAR@FAR table, AUC) and, with `output_dir`, its scores .npy and ROC .png."""
    row_label = f"{label}-{meta.name}"
    table = format_tar_table({row_label: scored["tar_at_far"]})
    result = {"num_pairs": int(len(meta.pair_labels)), "tar_at_far": scored["tar_at_far"],
              "operating_points": scored["operating_points"], "auc": scored["auc"], "table": table}
    if output_dir is not None:
        scores_file = output_dir / f"{meta.name.lower()}_scores.npy"
        np.save(scores_file, scored["scores"])
        roc_file = write_roc_png(output_dir / f"{meta.name.lower()}_roc.png",
                                 {row_label: (scored["fpr"], scored["tpr"])}, title=f"{meta.name} 1:1 verification")
        result.update(scores_file=str(scores_file), roc_png=str(roc_file))
    log.info("%s TAR @ FAR (nearest-FPR convention), AUC %.5f:\n%s", meta.name, result["auc"], table)
    return result


def _identification_result(meta: IJBMeta, identification, features: np.ndarray, detector_score: bool,
                           label: str) -> dict:
    from lvface.eval.ijb_identification import format_identification_table, score_identification

    weights = meta.face_scores if detector_score else None
    template_ids, template_feats = template_features(features, meta.templates, meta.medias, weights)
    result = score_identification(identification, template_ids, template_feats)
    result["table"] = format_identification_table(f"{label}-{meta.name}", result)
    log.info("%s 1:N identification, open set (TPIR at FPIR, rank-k of the mated searches):\n%s", meta.name,
             result["table"])
    return result


def evaluate_ijb(model_fn: Callable[[torch.Tensor], torch.Tensor], root: str | Path, name: str = "IJBC", *,
                 batch_size: int = 128, num_workers: int = 0, flip: bool = True, detector_score: bool = True,
                 rank: int = 0, world_size: int = 1, group: dist.ProcessGroup | None = None,
                 device: torch.device | str = "cpu", output_dir: str | Path | None = None,
                 label: str = "model", image_size: int = 112, meta: IJBMeta | None = None,
                 protocol: str = "1:1", identification=None) -> dict | None:
    """IJB-C / IJB-B evaluation of `model_fn` (a normalised float32 CPU batch -> (B, D)): `protocol` 1:1
    (template verification), 1:N (open-set identification, lvface.eval.ijb_identification) or both, from
    one embedding pass.

    Every rank reads the meta files and embeds its slice; rank 0 returns the results (others None)
    and, with `output_dir`, writes `<name>_result.json` (and for 1:1 `<name>_scores.npy`, `<name>_roc.png`).
    `meta` / `identification`: the already-read meta files of (root, name), to read them once.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"--protocol {protocol}: choose one of {', '.join(PROTOCOLS)}")
    meta = meta if meta is not None else read_ijb_meta(root, name)
    if protocol != "1:1" and identification is None:
        from lvface.eval.ijb_identification import read_identification_meta

        identification = read_identification_meta(root, meta.name, np.unique(meta.templates))
    dataset = AlignedIJBFaces(meta.image_dir, meta.image_names, meta.landmarks, image_size)
    log.info("%s: %d faces, %d templates, %d pairs; embedding on %d rank(s)", meta.name, len(dataset),
             len(np.unique(meta.templates)), len(meta.pair_labels), world_size)
    features = embed_faces(model_fn, dataset, batch_size=batch_size, flip=flip, num_workers=num_workers,
                           rank=rank, world_size=world_size, group=group, device=device)
    if rank != 0:
        return None
    out = Path(output_dir) if output_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    result = {"name": meta.name, "label": label, "protocol": protocol, "num_faces": len(dataset),
              "num_templates": int(len(np.unique(meta.templates))), "flip": flip, "detector_score": detector_score}
    if protocol != "1:N":
        scored = score_ijb(meta, features, detector_score=detector_score)
        result.update(_verification_outputs(meta, scored, label, out))
    if protocol != "1:1":
        result["identification"] = _identification_result(meta, identification, features, detector_score, label)
    if out is not None:
        json_file = out / f"{meta.name.lower()}_result.json"
        result["json_file"] = str(json_file)
        atomic_write_json(json_file, result)
    return result
