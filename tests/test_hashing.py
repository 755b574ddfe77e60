"""splitmix64 against the reference generator's published outputs, and the vectorised form against the scalar."""
import numpy as np

from lvface.hashing import GOLDEN_GAMMA, MASK64, fold, splitmix64, splitmix64_array


def test_splitmix64_matches_the_reference_sequence():
    # Vigna's splitmix64.c seeded with 0: next() adds the gamma to the state, then mixes it.
    state, outputs = 0, []
    for _ in range(3):
        outputs.append(splitmix64(state))
        state = (state + GOLDEN_GAMMA) & MASK64
    assert outputs == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]


def test_array_form_equals_the_scalar_form():
    values = np.array([0, 1, 2**63, MASK64, 123456789], dtype=np.uint64)
    key = fold(7, -1, 3)
    assert splitmix64_array(values, key).tolist() == [splitmix64(int(v) ^ key) for v in values]


def test_fold_takes_negative_integers_modulo_2_64():
    assert fold(-1) == splitmix64(MASK64) != fold(1)
    assert fold(3, 4, start=GOLDEN_GAMMA) == splitmix64(splitmix64(GOLDEN_GAMMA ^ 3) ^ 4)
