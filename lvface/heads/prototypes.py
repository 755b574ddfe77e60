"""EPL empirical prototypes: the method, and the names the head and the config use for it.

Prototypes (EPL, Fan et al. 2024, arXiv 2405.12447): P_j is the expectation of the normalised features
of class j, kept as a running average in a buffer P_local [C_local, D] beside the learned centers
W_local. It has no gradient; it moves only through `update_prototypes_`:

    m_j = normalize(mean of the normalised features of class j in the global batch)
    a_j = sigmoid(cos(P_j, m_j))            prototype_update = "adaptive" (EPL's similarity-adaptive
                                                                 factor alpha_x = sigma(s(x, P)))
    a_j = prototype_momentum                prototype_update = "momentum"
    P_j <- normalize(a_j * P_j + (1 - a_j) * m_j)

applied once per class present in the global batch (every rank sees the gathered batch, so each
updates its own shard with no communication), from the class mean: a class with k samples in the batch
moves once, deterministically, rather than k times in a last-writer-wins scatter. EPL updates per
sample; with one sample per class the two agree exactly. All the micro-batches of a step are one
update (the head concatenates them before the update).

P starts at zero. A zero row has cosine 0 with anything, so its first update gives
normalize(a * 0 + (1 - a) * m_j) = m_j under either rule: a class's prototype is its first batch mean,
with no "seen" flag. A class never seen keeps P_j = 0 (its prototype logit is s * 0).

The tensor math (torch reference and Triton kernel) lives in lvface/kernels/epl_update.py; when each
stage uses the prototypes is the curriculum's (lvface/heads/curriculum.py).
"""

from __future__ import annotations

from lvface.kernels.epl_update import (  # noqa: F401 (re-exported: the update's home is kernels/)
    MODES as PROTOTYPE_UPDATES,
    class_feature_sums,
    prototype_factor,
    update_prototypes_,
)
