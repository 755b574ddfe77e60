"""What the kernel tests (tests/test_kernel_*.py) share: running Triton under the interpreter without a
GPU, and the relative comparison against float64 references.

The Triton kernels run on this CPU under the interpreter (TRITON_INTERPRET=1), natively where CUDA is
present. triton.jit reads TRITON_INTERPRET when a kernel module is imported, so the interpreted tests run
in the rank-pool processes of tests/dist_utils.py, which set the variable before their first import of
lvface.kernels.triton_*; the pytest process never imports those modules (other tests are unaffected).
"""

from __future__ import annotations

import os

import torch

INTERPRET_TIMEOUT = 900.0  # seconds for one interpreted batch on a busy 2-core machine


def use_interpreter() -> None:
    """Interpret the Triton kernels unless a GPU is present (call before importing them)."""
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def assert_close_relative(got, want, tol, what):
    """|got - want| <= tol * (|want| + max |want|): relative to the entry and to the tensor's scale."""
    got = got.double()
    assert not torch.isnan(got).any(), f"{what}: unwritten (NaN) elements at {torch.isnan(got).nonzero()[:5].tolist()}"
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * float(want.abs().max()), msg=what)
