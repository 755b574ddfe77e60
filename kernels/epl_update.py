"""The EPL prototype update (see lvface/heads/prototypes.py for the method), as pure tensor math.

    epl_update_(prototypes, features, classes, mode=..., momentum=..., impl=<a key of EPL_IMPLS>)

The head runs the update that its margin-softmax backend names (kernels/registry.py, `epl_impl`).

features [M, D] normalised features of the global batch's rows (all the micro-batches of a step
concatenated), classes [M] their local rows, -1 for a row whose class is on another shard (skipped).
Per class j present:

    m_j = normalize(mean of its features)
    a_j = sigmoid(P_j . m_j)   (adaptive)   or   a_j = momentum   (momentum)
    P_j <- normalize(a_j P_j + (1 - a_j) m_j)

once per class, deterministic with repeated labels (no last-writer-wins scatter): the torch reference
sums with index_add_ in row order (deterministic on the CPU; on CUDA under
torch.use_deterministic_algorithms), the Triton kernel runs one program per class that sums its rows
in sorted (stable) order, then applies the update and the renormalisation in the same pass - one read
of the features and one read and write of the touched prototype rows.

No host sync, fixed shapes: the torch path sums into all C_local rows (index_add_ into a [C_local + 1, D]
buffer whose spare row takes the other shards' rows) and blends every row under a mask of the classes
seen - O(C_local * D) elementwise work per step instead of a data-dependent unique; each seen row gets
the same arithmetic, in the same order, as from the compact (unique) sums. The Triton path launches
one program per feature row, of which the first row of each class segment does the work. Both return
the number of classes updated as a 0-dim tensor on the device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MODES = ("adaptive", "momentum")

ClassSums = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (unique ids [U], sums [U, D], counts [U])


def class_feature_sums(features: torch.Tensor, classes: torch.Tensor) -> ClassSums:
    """Per-class sums of feature rows, compact: the reference of `segment_sums` (unique and bincount have
    data-dependent shapes - a host sync - so the training step does not use it).

    features [n, D]; classes [n] int64 (any ids). Returns (unique ids [U] sorted, sums [U, D], counts [U]).
    index_add_ sums in row order on the CPU; on CUDA run under torch.use_deterministic_algorithms for
    bit-identical sums.
    """
    unique, inverse = torch.unique(classes, sorted=True, return_inverse=True)
    sums = features.new_zeros(unique.numel(), features.shape[1]).index_add_(0, inverse, features)  # (U, D)
    counts = torch.bincount(inverse, minlength=unique.numel())  # (U,)
    return unique, sums, counts


def segment_sums(features: torch.Tensor, classes: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sums of feature rows into a fixed [num_rows, D], and the rows' counts [num_rows] int64.

    classes [n] int64 in [0, num_rows), or -1 for a row to skip. index_add_ sums in row order on the CPU
    (on CUDA under torch.use_deterministic_algorithms for bit-identical sums). No host sync.
    """
    slot = torch.where(classes >= 0, classes, torch.full_like(classes, num_rows))  # skipped rows: the spare row
    sums = features.new_zeros(num_rows + 1, features.shape[1]).index_add_(0, slot, features)[:num_rows]
    counts = torch.zeros(num_rows + 1, dtype=torch.int64, device=classes.device)
    counts.index_add_(0, slot, torch.ones_like(slot))
    return sums, counts[:num_rows]


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


@torch.no_grad()
def update_seen_prototypes_(
    prototypes: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor, *, mode: str, momentum: float
) -> torch.Tensor:
    """`update_prototypes_` over every row at once, applied where counts > 0: fixed shapes, no host sync.

    sums [C_local, D], counts [C_local] as `segment_sums` returns them. Returns the number of rows updated
    (a 0-dim int64 tensor)."""
    seen = counts > 0
    means = F.normalize(sums / counts.clamp(min=1).unsqueeze(1).to(sums.dtype), dim=1)  # (C_local, D)
    keep = prototype_factor(prototypes, means, mode, momentum).unsqueeze(1)  # (C_local, 1)
    blended = F.normalize(keep * prototypes + (1.0 - keep) * means, dim=1)
    prototypes.copy_(torch.where(seen.unsqueeze(1), blended, prototypes))
    return seen.sum()


def _torch_update_(prototypes, features, classes, *, mode: str, momentum: float) -> torch.Tensor:
    sums, counts = segment_sums(features, classes, prototypes.shape[0])
    return update_seen_prototypes_(prototypes, sums, counts, mode=mode, momentum=momentum)


def _triton_update_(prototypes, features, classes, *, mode: str, momentum: float) -> torch.Tensor:
    from lvface.kernels.triton_epl import triton_epl_update_  # imported here: lvface runs without triton

    return triton_epl_update_(prototypes, features, classes, mode=mode, momentum=momentum)


EPL_IMPLS = {"torch": _torch_update_, "triton": _triton_update_}
"""The implementations of the update, by name (the torch reference and the Triton kernel)."""


@torch.no_grad()
def epl_update_(
    prototypes: torch.Tensor, features: torch.Tensor, classes: torch.Tensor, *, mode: str, momentum: float,
    impl: str = "torch",
) -> int | torch.Tensor:
    """Update the prototypes of the classes in `classes` from their rows of `features`, in place (rows of
    class -1 skipped). Returns the number of classes updated: a 0-dim tensor on the device (no host
    sync), or 0 for no rows."""
    if mode not in MODES:
        raise ValueError(f"loss.prototype_update must be one of {', '.join(MODES)}, got {mode!r}")
    if impl not in EPL_IMPLS:
        raise ValueError(f"unknown EPL update impl {impl!r}; choose one of {', '.join(EPL_IMPLS)}")
    if classes.numel() == 0:
        return 0
    return EPL_IMPLS[impl](prototypes, features, classes, mode=mode, momentum=momentum)
