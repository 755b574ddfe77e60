"""insightface ``.bin`` verification sets (LFW, CFP-FP, AgeDB-30, ...) and their 10-fold accuracy.

A ``.bin`` is ``pickle.dump((bins, issame_list))``: ``bins`` the JPEG bytes of 2P images (pair i is
images 2i and 2i+1), ``issame_list`` P booleans. insightface reads it with
``pickle.load(f, encoding="bytes")`` so that Python 2 pickles load too; ``load_bin`` does the same,
through an unpickler that only builds the plain containers a .bin holds (a pickle can run code).

The protocol is insightface's ``verification.evaluate``: squared L2 distance of the L2-normalised
pair embeddings, thresholds ``np.arange(0, 4, 0.01)``, 10 contiguous folds (``KFold(shuffle=False)``),
threshold chosen by accuracy on the other 9 folds, accuracy measured on the held-out fold.
"""
from __future__ import annotations

import io
import os
import pickle
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from lvface.data.recordio import atomic_open
from lvface.progress import progress

FAR_TARGETS = (1e-3, 1e-2, 1e-1)


# ----------------------------------------------------------------------------------------------
# .bin files
# ----------------------------------------------------------------------------------------------


def write_bin(path: str, jpegs: Sequence[bytes], issame: Sequence[bool]) -> None:
    """Write an insightface verification ``.bin`` (atomically: a temp file, then ``os.replace``)."""
    jpegs = [bytes(jpeg) for jpeg in jpegs]
    issame = [bool(same) for same in issame]
    if len(jpegs) != 2 * len(issame):
        raise ValueError(f"write_bin({path}): {len(jpegs)} images for {len(issame)} pairs; "
                         "need exactly 2 images per pair")
    with atomic_open(path, "wb") as f:
        pickle.dump((jpegs, issame), f, protocol=pickle.HIGHEST_PROTOCOL)


class _BinUnpickler(pickle.Unpickler):
    """Builds only what a .bin may hold: lists, tuples, bytes, bools, numpy arrays."""

    _ALLOWED = {
        ("_codecs", "encode"),  # how Python 3 pickles bytes at protocol < 3
        ("builtins", "bytearray"), ("builtins", "bytes"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refers to {module}.{name}, which a verification .bin "
                                         "never contains; refusing to build it")
        return super().find_class(module, name)


def _decode_rgb(data, image_size: int, path: str, index: int) -> np.ndarray:
    if isinstance(data, np.ndarray):
        data = data.tobytes()
    try:
        image = Image.open(io.BytesIO(bytes(data))).convert("RGB")
    except Exception as error:  # PIL raises several types for undecodable data
        raise ValueError(f"{path}: image {index} is not a decodable image ({error})") from error
    if image.size != (image_size, image_size):
        # insightface resizes the short side (mx.image.resize_short); we also centre-crop to square
        width, height = image.size
        scale = image_size / min(width, height)
        width, height = max(image_size, round(width * scale)), max(image_size, round(height * scale))
        image = image.resize((width, height), Image.BILINEAR)
        left, top = (width - image_size) // 2, (height - image_size) // 2
        image = image.crop((left, top, left + image_size, top + image_size))
    return np.asarray(image, dtype=np.uint8)


def load_bin(path: str, image_size: int = 112) -> tuple[torch.Tensor, np.ndarray]:
    """Read a ``.bin`` -> (images uint8 (2P, 3, H, W) RGB, issame bool (P,)).

    Reads insightface's own files (Python 2 or 3 pickles) and ours.
    """
    if not os.path.isfile(path):
        raise ValueError(f"verification set {path!r} not found")
    try:
        with open(path, "rb") as f:
            bins, issame = _BinUnpickler(f, encoding="bytes").load()
    except Exception as error:
        raise ValueError(f"{path}: not an insightface verification .bin: a pickle of "
                         f"(list of JPEG bytes, list of issame) was expected ({error})") from error
    issame = np.asarray(issame, dtype=np.bool_).ravel()
    if len(bins) != 2 * len(issame):
        raise ValueError(f"{path}: {len(bins)} images for {len(issame)} pairs; a .bin holds "
                         "exactly 2 images per pair")
    images = np.empty((len(bins), image_size, image_size, 3), dtype=np.uint8)
    for index, data in enumerate(bins):
        images[index] = _decode_rgb(data, image_size, path, index)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), issame


# ----------------------------------------------------------------------------------------------
# embeddings
# ----------------------------------------------------------------------------------------------


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB images -> float32 model input ``(x / 255 - 0.5) / 0.5`` in [-1, 1]."""
    return images.float().div_(255.0).sub_(0.5).div_(0.5)


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm; zero rows stay zero (sklearn.preprocessing.normalize)."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    norms[norms == 0] = 1
    return x / norms[:, None]


def embed_flip_sum(model_fn: Callable[[torch.Tensor], torch.Tensor], images_uint8: torch.Tensor,
                   batch_size: int) -> np.ndarray:
    """Embeddings of each image plus its horizontal flip, summed, then L2-normalised -> (n, D).

    ``model_fn`` receives a float32 CPU batch (B, 3, H, W) normalised by ``normalize_images``
    (move it to the model's device inside) and returns (B, D) embeddings. Runs without autograd.
    """
    outputs = []
    with torch.no_grad():
        for start in progress(range(0, len(images_uint8), batch_size), desc="verify: embed", unit="batch"):
            batch = normalize_images(images_uint8[start:start + batch_size])
            plain = model_fn(batch).detach().float().cpu()
            flipped = model_fn(torch.flip(batch, dims=[3])).detach().float().cpu()
            outputs.append((plain + flipped).numpy())
    if not outputs:
        return np.zeros((0, 512), dtype=np.float32)
    return _l2_normalize(np.concatenate(outputs))


# ----------------------------------------------------------------------------------------------
# 10-fold accuracy, ROC AUC, TAR @ FAR
# ----------------------------------------------------------------------------------------------


def kfold_slices(num_items: int, num_folds: int) -> list[slice]:
    """Contiguous folds as sklearn's ``KFold(n_splits, shuffle=False)``: the first n % k are 1 larger."""
    if num_folds < 2 or num_items < num_folds:
        raise ValueError(f"cannot split {num_items} pairs into {num_folds} folds "
                         "(need num_folds >= 2 and at least one pair per fold)")
    sizes = np.full(num_folds, num_items // num_folds)
    sizes[: num_items % num_folds] += 1
    ends = np.cumsum(sizes)
    return [slice(int(end - size), int(end)) for end, size in zip(ends, sizes)]


def _correct_counts(dist: np.ndarray, issame: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Correct predictions at each threshold, predicting "same" when dist < threshold (np.less)."""
    same = np.sort(dist[issame])
    different = np.sort(dist[~issame])
    true_accepts = np.searchsorted(same, thresholds, side="left")  # same with dist < t
    true_rejects = different.size - np.searchsorted(different, thresholds, side="left")  # dist >= t
    return true_accepts + true_rejects


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC of ``scores`` (higher = positive); ties count one half (Mann-Whitney U)."""
    scores, positive = np.asarray(scores, np.float64).ravel(), np.asarray(positive, np.bool_).ravel()
    num_pos, num_neg = int(positive.sum()), int((~positive).sum())
    if num_pos == 0 or num_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(scores.size, dtype=np.float64)
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], scores.size]
    average_rank = (starts + ends + 1) / 2.0  # ranks are 1-based: mean of starts+1 .. ends
    ranks[order] = np.repeat(average_rank, ends - starts)
    return float((ranks[positive].sum() - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg))


def tar_at_far(scores: np.ndarray, positive: np.ndarray,
               far_targets: Sequence[float] = FAR_TARGETS) -> dict[float, float]:
    """TAR at the operating point (accept score >= t) whose FAR is the largest <= each target."""
    scores, positive = np.asarray(scores, np.float64).ravel(), np.asarray(positive, np.bool_).ravel()
    num_pos, num_neg = int(positive.sum()), int((~positive).sum())
    if num_pos == 0 or num_neg == 0:
        return {float(far): float("nan") for far in far_targets}
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores, sorted_positive = scores[order], positive[order]
    # operating points: accept everything scoring >= each distinct score, plus "accept nothing"
    last_of_group = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]
    true_accepts = np.r_[0, np.cumsum(sorted_positive)[last_of_group]]
    false_accepts = np.r_[0, np.cumsum(~sorted_positive)[last_of_group]]
    far, tar = false_accepts / num_neg, true_accepts / num_pos
    # FAR and TAR both grow along the points: the largest FAR <= target carries the largest TAR
    return {float(target): float(tar[far <= target].max()) for target in far_targets}


def evaluate_pairs(embeddings: np.ndarray, issame: np.ndarray, nrof_folds: int = 10) -> dict:
    """insightface's verification protocol on (2P, D) embeddings (pair i = rows 2i, 2i+1).

    Returns ``accuracy`` (mean over folds), ``accuracy_std``, ``best_threshold`` (mean of the folds'
    chosen squared-L2 thresholds), ``fold_accuracies``, ``auc`` (ROC AUC of -distance over all
    pairs) and ``tar_at_far`` {1e-3, 1e-2, 1e-1: TAR}.
    """
    embeddings = np.asarray(embeddings)
    if not np.issubdtype(embeddings.dtype, np.floating):
        embeddings = embeddings.astype(np.float64)
    issame = np.asarray(issame, dtype=np.bool_).ravel()
    if embeddings.ndim != 2 or embeddings.shape[0] != 2 * issame.size:
        raise ValueError(f"evaluate_pairs: embeddings {embeddings.shape} for {issame.size} pairs; "
                         "need (2 * num_pairs, dim)")
    embeddings = _l2_normalize(embeddings)
    diff = embeddings[0::2] - embeddings[1::2]
    dist = np.sum(np.square(diff), 1)  # as insightface: in the embeddings' dtype

    thresholds = np.arange(0, 4, 0.01)
    folds = kfold_slices(issame.size, nrof_folds)
    correct_per_fold = np.stack([_correct_counts(dist[fold], issame[fold], thresholds)
                                 for fold in folds])
    correct_total = correct_per_fold.sum(0)
    fold_accuracies, best_thresholds = [], []
    for fold_index, fold in enumerate(folds):
        correct_train = correct_total - correct_per_fold[fold_index]  # same denominator: argmax on counts
        best = int(np.argmax(correct_train))  # first best, as np.argmax in insightface
        best_thresholds.append(thresholds[best])
        fold_accuracies.append(correct_per_fold[fold_index, best] / (fold.stop - fold.start))

    scores = -dist.astype(np.float64)
    return {
        "accuracy": float(np.mean(fold_accuracies)),
        "accuracy_std": float(np.std(fold_accuracies)),
        "best_threshold": float(np.mean(best_thresholds)),
        "fold_accuracies": [float(acc) for acc in fold_accuracies],
        "auc": roc_auc(scores, issame),
        "tar_at_far": tar_at_far(scores, issame),
        "num_pairs": int(issame.size),
    }
