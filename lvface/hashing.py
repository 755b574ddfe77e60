"""splitmix64: the counter-based hash behind every seeded draw that must survive a resume.

The sample order (lvface/data/sampler.py), the augmentation parameters (lvface/data/augment.py) and the
Partial-FC sample (kernels/pfc_sample.py) all derive their randomness from integers (seed, epoch, step,
position, shard) through this one hash, so a resumed run recomputes any draw from its counters instead
of saving generator state. It has no lvface imports: kernels/ and data/ both sit above it.
"""

from __future__ import annotations

import numpy as np

MASK64 = (1 << 64) - 1
GOLDEN_GAMMA = 0x9E3779B97F4A7C15
"""splitmix64's increment (2**64 / golden ratio, odd)."""


def splitmix64(value: int) -> int:
    """The splitmix64 output for state ``value`` (Python ints, 64-bit wrapping arithmetic)."""
    value = (value + GOLDEN_GAMMA) & MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & MASK64
    return value ^ (value >> 31)


def fold(*values: int, start: int = 0) -> int:
    """Fold integers (any sign, taken modulo 2**64) into one 64-bit key: ``key = splitmix64(key ^ value)``."""
    key = start
    for value in values:
        key = splitmix64(key ^ (int(value) & MASK64))
    return key


def splitmix64_array(values: np.ndarray, key: int) -> np.ndarray:
    """``splitmix64(values ^ key)`` of a uint64 array (vectorised; numpy's uint64 arithmetic wraps)."""
    z = (values ^ np.uint64(key)) + np.uint64(GOLDEN_GAMMA)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))
