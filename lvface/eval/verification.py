"""The insightface 10-fold verification protocol on pair embeddings (LFW, CFP-FP, AgeDB-30, ...).

The protocol is insightface's `verification.evaluate`: squared L2 distance of the L2-normalised
pair embeddings, thresholds `np.arange(0, 4, 0.01)`, 10 contiguous folds (`KFold(shuffle=False)`),
threshold chosen by accuracy on the other 9 folds, accuracy measured on the held-out fold. The `.bin`
files themselves are read and written by lvface/data/verification_bin.py.
"""

from __future__ import annotations

import os
from pathlib import PurePath
from typing import Callable, Sequence

import numpy as np
import torch

from lvface.data.images import normalize_images
from lvface.progress import progress

FAR_TARGETS = (1e-3, 1e-2, 1e-1)


# ----------------------------------------------------------------------------------------------
# embeddings
# ----------------------------------------------------------------------------------------------


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm; zero rows stay zero (sklearn.preprocessing.normalize)."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    norms[norms == 0] = 1
    return x / norms[:, None]


def embed_with_norms(model_fn: Callable[[torch.Tensor], torch.Tensor], images_uint8: torch.Tensor,
                     batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(flip-sum embeddings as `embed_flip_sum` returns them, (n,) float64 norm of each image's raw
    embedding plus its mirror's): the norms make arcface_torch's XNorm, the mean raw-embedding norm
    over the images and their mirrors, ``norm_sums.sum() / (2 n)``."""
    outputs, norm_sums = [], []
    with torch.no_grad():
        for start in progress(range(0, len(images_uint8), batch_size), desc="verify: embed", unit="batch"):
            batch = normalize_images(images_uint8[start:start + batch_size])
            plain = model_fn(batch).detach().float().cpu()
            flipped = model_fn(torch.flip(batch, dims=[3])).detach().float().cpu()
            outputs.append((plain + flipped).numpy())
            norm_sums.append(plain.double().norm(dim=1).numpy() + flipped.double().norm(dim=1).numpy())
    if not outputs:
        return np.zeros((0, 512), dtype=np.float32), np.zeros(0)
    return _l2_normalize(np.concatenate(outputs)), np.concatenate(norm_sums)


def embed_flip_sum(model_fn: Callable[[torch.Tensor], torch.Tensor], images_uint8: torch.Tensor,
                   batch_size: int) -> np.ndarray:
    """Embeddings of each image plus its horizontal flip, summed, then L2-normalised -> (n, D).

    ``model_fn`` receives a float32 CPU batch (B, 3, H, W) normalised by ``normalize_images``
    (move it to the model's device inside) and returns (B, D) embeddings. Runs without autograd.
    """
    return embed_with_norms(model_fn, images_uint8, batch_size)[0]


def xnorm(norm_sums: np.ndarray) -> float:
    """arcface_torch's XNorm from `embed_with_norms`' per-image norm sums: the mean norm of the raw
    embeddings of the images and their mirrors."""
    return float(np.sum(norm_sums) / (2 * len(norm_sums))) if len(norm_sums) else float("nan")


def arcface_log_lines(name: str, step: int, result: dict, highest: float) -> list[str]:
    """The three lines arcface_torch's CallBackVerification logs per set, in its format, so that log
    parsers written for it read lvface's logs: XNorm, Accuracy-Flip (mean +- std over the 10 folds)
    and Accuracy-Highest (the best Accuracy-Flip of this set so far, `highest`)."""
    return [f"[{name}][{step}]XNorm: {result['xnorm']:f}",
            f"[{name}][{step}]Accuracy-Flip: {result['accuracy']:1.5f}+-{result['accuracy_std']:1.5f}",
            f"[{name}][{step}]Accuracy-Highest: {highest:1.5f}"]


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


def verification_set_names(paths: list[str]) -> list[str]:
    """A distinct name per .bin file, for result keys, metric labels and table rows: the file's stem
    where no other file has it, else the shortest trailing part of its path (without the extension)
    that tells it apart: ``a/lfw.bin`` and ``b/lfw.bin`` become ``a/lfw`` and ``b/lfw``. The same
    file given twice is an error naming it."""
    stems = [PurePath(os.path.splitext(os.path.abspath(path))[0]).parts for path in paths]
    first_listed: dict[tuple[str, ...], str] = {}
    for path, parts in zip(paths, stems):
        if parts in first_listed:
            raise ValueError(f"verification set {path} is listed twice ({first_listed[parts]} and {path}); "
                             "list each .bin file once")
        first_listed[parts] = path
    names = []
    for index, parts in enumerate(stems):
        others = stems[:index] + stems[index + 1:]
        # distinct absolute paths differ in some trailing part, at the latest at the root
        length = next(k for k in range(1, len(parts) + 1) if all(other[-k:] != parts[-k:] for other in others))
        names.append(PurePath(*parts[-length:]).as_posix())
    return names
