"""Tests of the EPL prototype update (lvface/kernels/epl_update.py, triton_epl.py) against its torch
reference. Interpreter set-up: tests/kernel_utils.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_on_ranks
from kernel_utils import INTERPRET_TIMEOUT, assert_close_relative, use_interpreter
from kernel_utils import device as run_device

from lvface.kernels.epl_update import epl_update_

EPL_CASES = [("adaptive", torch.float32), ("momentum", torch.float32), ("adaptive", torch.bfloat16)]


def epl_inputs(feature_dtype):
    generator = torch.Generator().manual_seed(5)
    prototypes = F.normalize(torch.randn(19, 24, generator=generator), dim=1)
    prototypes[[2, 7]] = 0.0  # never seen: the first update makes them the class mean
    classes = torch.tensor([7, 3, 3, 11, 7, 7, 0, 18, 3, 2, 11, 5])  # repeats, unsorted
    features = F.normalize(torch.randn(classes.numel(), 24, generator=generator), dim=1).to(feature_dtype)
    return prototypes, features, classes


def epl_cases(rank, world, group, cases):
    use_interpreter()
    device = run_device()
    out = []
    for mode, feature_dtype in cases:
        prototypes, features, classes = (t.to(device) for t in epl_inputs(feature_dtype))
        count = epl_update_(prototypes, features, classes, mode=mode, momentum=0.8, impl="triton")
        out.append((count, prototypes.cpu()))
    return out


@pytest.mark.cuda
def test_triton_epl_update_matches_torch_reference():
    results = run_on_ranks(epl_cases, 1, EPL_CASES, timeout=INTERPRET_TIMEOUT)[0]
    for (mode, feature_dtype), (count, got) in zip(EPL_CASES, results):
        prototypes, features, classes = epl_inputs(feature_dtype)
        want = prototypes.double()
        assert epl_update_(want, features.double(), classes, mode=mode, momentum=0.8, impl="torch") == count == 7
        untouched = torch.ones(19, dtype=torch.bool)
        untouched[classes] = False
        assert torch.equal(got[untouched], prototypes[untouched]), f"{mode}: rows without samples changed"
        assert_close_relative(got, want, 1e-6, f"EPL update, {mode}, {feature_dtype}")
        torch.testing.assert_close(got[[2, 7]].norm(dim=1), torch.ones(2), rtol=1e-6, atol=1e-6)


def test_epl_update_is_deterministic_with_repeated_labels():
    """The class mean, not the last sample written: permuting the rows of a class changes nothing
    beyond rounding, and a class of k copies of one feature moves as a class with that one sample."""
    prototypes, features, classes = epl_inputs(torch.float64)
    once = prototypes.double().clone()
    epl_update_(once, features, classes, mode="adaptive", momentum=0.0)
    order = torch.randperm(classes.numel(), generator=torch.Generator().manual_seed(1))
    permuted = prototypes.double().clone()
    epl_update_(permuted, features[order], classes[order], mode="adaptive", momentum=0.0)
    torch.testing.assert_close(permuted, once, rtol=1e-12, atol=1e-14)
    tripled = prototypes.double().clone()
    epl_update_(tripled, features[:1].repeat(3, 1), classes[:1].repeat(3), mode="adaptive", momentum=0.0)
    single = prototypes.double().clone()
    epl_update_(single, features[:1], classes[:1], mode="adaptive", momentum=0.0)
    torch.testing.assert_close(tripled, single, rtol=1e-12, atol=1e-14)
