"""The global sample order: an exact, seeded permutation per epoch, sliced by rank, resumable.

Position ``p`` of epoch ``e`` (0 <= p < N) holds image ``perm_e(p)``. ``perm_e`` is a keyed bijection
of [0, N): a 6-round balanced Feistel network over the smallest 4^h >= N with cycle walking (apply it
again while the value is >= N; every cycle of a permutation of the larger domain that starts inside
[0, N) comes back to it, so this is a permutation of [0, N)). Round keys come from (seed, epoch)
through splitmix64 (lvface/hashing.py). It is computed for any positions without materialising the
permutation: a rank evaluates only its own samples (no 340 MB array per rank at WebFace42M scale) and
the order is defined by lvface's code, not by a numpy version.

Slicing. With B images per rank and W ranks the global batch is G = B W. A pass that starts at global
position ``start`` (0 for a fresh epoch) has ``(N - start) // G`` steps; at step k rank r takes
positions ``start + k G + r B + [0, B)``. So every rank has the same number of batches (the ragged
tail, at most G - 1 samples, is dropped: the head's all-gather needs equal batches), a step consumes
positions [start + k G, start + (k + 1) G) whatever W is, and the state to save is one integer: the
global position. A run that resumes at position p on another world size takes exactly the samples
after p (minus its own ragged tail), each once.
"""
from __future__ import annotations

import numpy as np

from lvface.hashing import fold, splitmix64_array

FEISTEL_ROUNDS = 6


def _half_bits(num_items: int) -> int:
    """Bits of each Feistel half: the domain 4^h is the smallest power of 4 >= num_items (h >= 1)."""
    return max(1, ((max(num_items, 2) - 1).bit_length() + 1) // 2)


def permute(positions: np.ndarray, num_items: int, seed: int, epoch: int) -> np.ndarray:
    """perm(positions) for the keyed permutation of [0, num_items) of (seed, epoch); int64."""
    positions = np.asarray(positions, dtype=np.int64)
    if positions.size and (positions.min() < 0 or positions.max() >= num_items):
        raise IndexError(f"positions must lie in [0, {num_items})")
    half = _half_bits(num_items)
    mask = np.uint64((1 << half) - 1)
    keys = [fold(seed, epoch, round_index, 0xFE15) for round_index in range(FEISTEL_ROUNDS)]

    def feistel(values: np.ndarray) -> np.ndarray:
        left, right = values >> np.uint64(half), values & mask
        for key in keys:
            left, right = right, left ^ (splitmix64_array(right, key) & mask)
        return (left << np.uint64(half)) | right

    values = feistel(positions.astype(np.uint64))
    outside = np.flatnonzero(values >= np.uint64(num_items))
    while outside.size:  # cycle walking; the expected number of extra rounds is below 3
        values[outside] = feistel(values[outside])
        outside = outside[values[outside] >= np.uint64(num_items)]
    return values.astype(np.int64)


def epoch_order(num_items: int, seed: int, epoch: int) -> np.ndarray:
    """The whole permutation of an epoch (for tests and tools; loaders evaluate only their slice)."""
    return permute(np.arange(num_items), num_items, seed, epoch)


class GlobalOrder:
    """Which images rank ``rank`` of ``world_size`` reads, batch by batch, in each epoch."""

    def __init__(self, num_items: int, *, seed: int, batch_size: int, world_size: int, rank: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.num_items = int(num_items)
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.world_size = int(world_size)
        self.rank = int(rank)

    @property
    def global_batch(self) -> int:
        """Images consumed by one step of all ranks together."""
        return self.batch_size * self.world_size

    @property
    def batches_per_epoch(self) -> int:
        """Batches per rank in a whole epoch (equal on every rank)."""
        return self.num_items // self.global_batch

    def batches_from(self, start: int) -> int:
        """Batches per rank in a pass that starts at global position ``start``."""
        self.check_start(start)
        return (self.num_items - start) // self.global_batch

    def check_start(self, start: int) -> None:
        if not 0 <= start <= self.num_items:
            raise ValueError(f"start position {start} is outside [0, {self.num_items}] (the epoch's images)")

    def positions(self, start: int, batch: int) -> np.ndarray:
        """Global positions (B,) of this rank's ``batch``-th batch of the pass from ``start``."""
        first = start + batch * self.global_batch + self.rank * self.batch_size
        return np.arange(first, first + self.batch_size, dtype=np.int64)

    def local_position(self, start: int, local_index: np.ndarray | int) -> np.ndarray:
        """Global position of this rank's ``local_index``-th sample (0-based) of the pass from ``start``."""
        local_index = np.asarray(local_index, dtype=np.int64)
        batch, slot = np.divmod(local_index, self.batch_size)
        return start + batch * self.global_batch + self.rank * self.batch_size + slot

    def items(self, epoch: int, positions: np.ndarray) -> np.ndarray:
        """Image indices at global ``positions`` of ``epoch``."""
        return permute(positions, self.num_items, self.seed, epoch)
