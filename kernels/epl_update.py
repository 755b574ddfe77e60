"""The EPL prototype update (see lvface/heads/prototypes.py for the method), as pure tensor math.

    epl_update_(prototypes, features, classes, mode=..., momentum=..., impl=<a key of EPL_IMPLS>)

The head runs the update that its margin-softmax backend names (kernels/registry.py, `epl_impl`).

features [M, D] normalised features of the global batch's rows whose class is on this shard (all the
micro-batches of a step concatenated), classes [M] their local rows. Per class j present:

    m_j = normalize(mean of its features)
    a_j = sigmoid(P_j . m_j)   (adaptive)   or   a_j = momentum   (momentum)
    P_j <- normalize(a_j P_j + (1 - a_j) m_j)

once per class, deterministic with repeated labels (no last-writer-wins scatter): the torch reference
sums with index_add_ in row order (deterministic on the CPU; on CUDA under
torch.use_deterministic_algorithms), the Triton kernel runs one program per class that sums its rows
in sorted (stable) order, then applies the update and the renormalisation in the same pass - one read
of the features and one read and write of the touched prototype rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MODES = ("adaptive", "momentum")

ClassSums = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (unique ids [U], sums [U, D], counts [U])


def class_feature_sums(features: torch.Tensor, classes: torch.Tensor) -> ClassSums:
    """Per-class sums of feature rows.

    features [n, D]; classes [n] int64 (any ids). Returns (unique ids [U] sorted, sums [U, D], counts [U]).
    index_add_ sums in row order on the CPU; on CUDA run under torch.use_deterministic_algorithms for
    bit-identical sums.
    """
    unique, inverse = torch.unique(classes, sorted=True, return_inverse=True)
    sums = features.new_zeros(unique.numel(), features.shape[1]).index_add_(0, inverse, features)  # (U, D)
    counts = torch.bincount(inverse, minlength=unique.numel())  # (U,)
    return unique, sums, counts


def prototype_factor(prototypes: torch.Tensor, class_means: torch.Tensor, mode: str, momentum: float) -> torch.Tensor:
    """The weight a_j kept of the old prototype, per class: [U]."""
    if mode == "adaptive":
        similarity = (prototypes * class_means).sum(dim=1)  # (U,) both unit rows (or a zero prototype)
        return torch.sigmoid(similarity)
    if mode == "momentum":
        return torch.full((prototypes.shape[0],), momentum, dtype=prototypes.dtype, device=prototypes.device)
    raise ValueError(f"loss.prototype_update must be one of {', '.join(MODES)}, got {mode!r}")


@torch.no_grad()
def update_prototypes_(
    prototypes: torch.Tensor,
    rows: torch.Tensor,
    sums: torch.Tensor,
    counts: torch.Tensor,
    *,
    mode: str,
    momentum: float,
) -> None:
    """P[rows] <- normalize(a * P[rows] + (1 - a) * normalize(sums / counts)), in place, once per row.

    prototypes [C_local, D]; rows [U] unique local row ids; sums [U, D] sums of normalised features;
    counts [U].
    """
    if rows.numel() == 0:
        return
    means = F.normalize(sums / counts.unsqueeze(1).to(sums.dtype), dim=1)  # (U, D)
    old = prototypes.index_select(0, rows)  # (U, D)
    keep = prototype_factor(old, means, mode, momentum).unsqueeze(1)  # (U, 1)
    prototypes.index_copy_(0, rows, F.normalize(keep * old + (1.0 - keep) * means, dim=1))


def _torch_update_(prototypes, features, classes, *, mode: str, momentum: float) -> int:
    rows, sums, counts = class_feature_sums(features, classes)
    update_prototypes_(prototypes, rows, sums, counts, mode=mode, momentum=momentum)
    return int(rows.numel())


def _triton_update_(prototypes, features, classes, *, mode: str, momentum: float) -> int:
    from lvface.kernels.triton_epl import triton_epl_update_  # imported here: lvface runs without triton

    return triton_epl_update_(prototypes, features, classes, mode=mode, momentum=momentum)


EPL_IMPLS = {"torch": _torch_update_, "triton": _triton_update_}
"""The implementations of the update, by name (the torch reference and the Triton kernel)."""


@torch.no_grad()
def epl_update_(
    prototypes: torch.Tensor, features: torch.Tensor, classes: torch.Tensor, *, mode: str, momentum: float,
    impl: str = "torch",
) -> int:
    """Update the prototypes of the classes in `classes` from their rows of `features`, in place.
    Returns the number of classes updated (one host read: the number of distinct classes)."""
    if mode not in MODES:
        raise ValueError(f"loss.prototype_update must be one of {', '.join(MODES)}, got {mode!r}")
    if impl not in EPL_IMPLS:
        raise ValueError(f"unknown EPL update impl {impl!r}; choose one of {', '.join(EPL_IMPLS)}")
    if classes.numel() == 0:
        return 0
    return EPL_IMPLS[impl](prototypes, features, classes, mode=mode, momentum=momentum)
