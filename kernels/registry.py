"""The head's margin cross-entropy backends: one table, name -> how to build one and where it runs.

Everything that depends on the choice of backend reads this table: the values config accepts for
`loss.impl` (IMPLS), what the head builds (`build_backend`), the package and device checks, what
`auto` picks, and which EPL prototype update runs beside the backend. A new backend is one file in
kernels/ (a class with the forward / backward of kernels/margin_ce.py) plus one `register(...)` line
at the bottom of this file; nothing else names it.

`auto` is not a backend: on a tensor's device type it picks the first entry, in table order, whose
`default_on` names that device type (or "*") and whose package is installed.
"""

from __future__ import annotations

import collections.abc
import importlib.util
import os
from dataclasses import dataclass
from typing import Any, Callable

from lvface.kernels.epl_update import EPL_IMPLS
from lvface.kernels.margin_ce import TorchMarginCE

AUTO = "auto"
ANY_DEVICE = "*"
MIB = 1 << 20


@dataclass(frozen=True)
class HeadBackend:
    """One row of the table."""

    name: str
    """The `loss.impl` value."""
    factory: Callable[[Any], Any] | None
    """The loss config -> a fresh backend object (forward / backward, see kernels/margin_ce.py), built at
    the head's first forward; None: the dense autograd reference that the head runs itself."""
    devices: tuple[str, ...] = (ANY_DEVICE,)
    """torch device types whose tensors it runs on ("*": any)."""
    epl_impl: str = "torch"
    """The EPL prototype update that runs beside it: a key of kernels/epl_update.EPL_IMPLS."""
    deterministic: bool = True
    """Whether the loss and gradients are bitwise the same run to run on the same machine."""
    bf16_operands: bool = False
    """Whether it can read bf16 copies of the embeddings and W while accumulating in fp32 (loss.head_dtype)."""
    default_on: tuple[str, ...] = ()
    """Device types on which `auto` picks it ("*": any; earlier rows win)."""
    requires: str | None = None
    """A package it imports; the name is refused where that package is not installed."""
    interpreter_env: str | None = None
    """An environment variable that, set to 1, lets it run on CPU tensors too (an interpreter)."""
    summary: str = ""
    """One line for the docs and errors."""

    def runs_on(self, device_type: str) -> bool:
        if ANY_DEVICE in self.devices or device_type in self.devices:
            return True
        return self.interpreter_env is not None and device_type == "cpu" and os.environ.get(self.interpreter_env) == "1"

    def installed(self) -> bool:
        return self.requires is None or package_available(self.requires)


BACKENDS: dict[str, HeadBackend] = {}
"""name -> HeadBackend, in the order `auto` tries them."""


class _Names(collections.abc.Sequence):
    """The `loss.impl` values, read from the table whenever asked: auto, then every backend."""

    def __getitem__(self, index):
        return (AUTO, *BACKENDS)[index]

    def __len__(self) -> int:
        return 1 + len(BACKENDS)

    def __repr__(self) -> str:
        return repr(tuple(self))


IMPLS = _Names()


def register(backend: HeadBackend) -> HeadBackend:
    """Add a row; the name must be new and its EPL update must exist."""
    if backend.name == AUTO or backend.name in BACKENDS:
        raise ValueError(f"head backend name {backend.name!r} is taken; pick another")
    if backend.epl_impl not in EPL_IMPLS:
        raise ValueError(f"head backend {backend.name!r}: epl_impl {backend.epl_impl!r} is not one of "
                         f"{', '.join(EPL_IMPLS)}")
    BACKENDS[backend.name] = backend
    return backend


def package_available(name: str) -> bool:
    """Whether the package imports here (checked without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except ValueError:  # a stub in sys.modules without a spec, e.g. sys.modules[name] = None
        return False


def lookup(name: str) -> HeadBackend:
    """The row named `name` (not auto), or a ValueError listing every value of loss.impl."""
    if name not in BACKENDS:
        raise ValueError(f"loss.impl={name!r} is unknown; choose one of {', '.join(IMPLS)}")
    return BACKENDS[name]


def check_installed(name: str) -> None:
    """Raise unless `name` is auto or a backend whose package is installed."""
    if name == AUTO:
        return
    backend = lookup(name)
    if not backend.installed():
        raise ValueError(
            f"loss.impl={name} needs the {backend.requires} package, which is not installed: install "
            f"{backend.requires}, or set loss.impl to {AUTO} ({name} where available) or one of "
            f"{', '.join(n for n, b in BACKENDS.items() if b.installed())}"
        )


def auto_pick(device_type: str) -> HeadBackend:
    for backend in BACKENDS.values():
        wanted = ANY_DEVICE in backend.default_on or device_type in backend.default_on
        if wanted and backend.installed() and backend.runs_on(device_type):
            return backend
    raise ValueError(f"loss.impl={AUTO}: no installed backend is the default on {device_type}; set loss.impl to "
                     f"one of {', '.join(BACKENDS)}")


def resolve(name: str, device_type: str) -> HeadBackend:
    """The backend that `name` means for tensors on `device_type`, checked to run there."""
    if name == AUTO:
        return auto_pick(device_type)
    check_installed(name)
    backend = lookup(name)
    if not backend.runs_on(device_type):
        devices = " or ".join(d.upper() for d in backend.devices)
        also = f" (or under {backend.interpreter_env}=1)" if backend.interpreter_env else ""
        raise ValueError(
            f"loss.impl={name} runs on {devices} tensors{also}; the head is on {device_type}: set loss.impl to "
            f"{AUTO} or {auto_pick(device_type).name}"
        )
    return backend


def build_backend(backend: HeadBackend, loss_cfg):
    """A fresh backend object for `loss_cfg` (None for the dense reference)."""
    return None if backend.factory is None else backend.factory(loss_cfg)


# --------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------


def _chunked(loss_cfg) -> TorchMarginCE:
    return TorchMarginCE(chunk_bytes=round(loss_cfg.chunk_mb * MIB))


def _triton(backward: str) -> Callable[[Any], Any]:
    def factory(loss_cfg):
        from lvface.kernels.triton_margin_ce import TritonMarginCE  # imported here: lvface runs without triton

        return TritonMarginCE(backward=backward)

    return factory


register(HeadBackend(
    "triton", _triton("two_pass"), devices=("cuda",), epl_impl="triton", default_on=("cuda",), requires="triton",
    bf16_operands=True, interpreter_env="TRITON_INTERPRET",
    summary="fused Triton kernels (kernels/triton_margin_ce.py), backward in two recompute passes",
))
register(HeadBackend(
    "triton_atomic", _triton("atomic"), devices=("cuda",), epl_impl="triton", deterministic=False,
    bf16_operands=True, requires="triton", interpreter_env="TRITON_INTERPRET",
    summary="the Triton kernels with a one-pass backward adding d embeddings with fp32 atomics",
))
register(HeadBackend(
    "chunked", _chunked, default_on=(ANY_DEVICE,),
    summary="torch GEMMs over class chunks in a reused workspace of loss.chunk_mb (kernels/margin_ce.py)",
))
register(HeadBackend(
    "dense", None,
    summary="autograd over the full [N, C_used] logits (lvface/heads/sharded_softmax.py): the reference",
))
