"""The head's backend table (lvface/kernels/registry.py): a row is all it takes to add a backend.

A backend is registered here by one `register(...)` call, chosen through the config (`loss.impl`),
and trained through ShardedMarginHead, against the chunked backend it wraps (float64, bitwise: the
wrapper changes no arithmetic, so any difference would be the head taking another path).
"""

from __future__ import annotations

import logging

import pytest
import torch

from lvface.config import ConfigError, load_config
from lvface.heads import IMPLS, ShardedMarginHead
from lvface.kernels import registry
from lvface.kernels.epl_update import EPL_IMPLS
from lvface.kernels.margin_ce import TorchMarginCE

NUM_CLASSES, DIM = 13, 8
STAGES = "loss.stages=[{name: early, end_epoch: 1, sample_rate: 0.5, centers: both}]"


class CountingMarginCE(TorchMarginCE):
    """The torch backend, counting the passes the head asks of it."""

    instances: list = []

    def __init__(self, chunk_bytes: int):
        super().__init__(chunk_bytes)
        self.forwards = self.backwards = 0
        CountingMarginCE.instances.append(self)

    def forward(self, *args, **kwargs):
        self.forwards += 1
        return super().forward(*args, **kwargs)

    def backward(self, *args, **kwargs):
        self.backwards += 1
        return super().backward(*args, **kwargs)


@pytest.fixture
def registered():
    """Register a backend for one test, and leave the table as it was."""
    names = []

    def add(backend: registry.HeadBackend) -> registry.HeadBackend:
        names.append(backend.name)
        return registry.register(backend)

    CountingMarginCE.instances = []
    yield add
    for name in names:
        registry.BACKENDS.pop(name, None)


def _train(cfg, steps: int = 2):
    """Two steps of the head alone on one process (float64): losses, the gradients and the prototypes."""
    generator = torch.Generator().manual_seed(4)
    head = ShardedMarginHead(NUM_CLASSES, DIM, cfg.loss, group=None, seed=7).double()
    losses, grads = [], []
    for _ in range(steps):
        embeddings = torch.randn(6, DIM, generator=generator, dtype=torch.float64).requires_grad_()
        labels = torch.randint(0, NUM_CLASSES, (6,), generator=generator)
        head.weight.grad = None
        loss = head(embeddings, labels)
        loss.backward()
        head.update_prototypes()
        losses.append(loss.detach())
        grads.append((embeddings.grad, head.weight.grad.clone()))
    return head, losses, grads


def test_a_new_backend_is_one_registry_row_chosen_by_config(registered, caplog):
    registered(registry.HeadBackend(
        "counting", lambda loss_cfg: CountingMarginCE(round(loss_cfg.chunk_mb * registry.MIB)),
        summary="the torch backend, counting its passes",
    ))
    assert "counting" in IMPLS  # the config's allowed values and heads.IMPLS read the table
    small_chunks = "loss.chunk_mb=0.0003"  # ~300 bytes: several chunks
    cfg = load_config(None, ["loss.impl=counting", small_chunks, STAGES])
    with caplog.at_level(logging.INFO, logger="lvface.heads.sharded_softmax"):
        head, losses, grads = _train(cfg)
    assert head.resolved_impl == "counting"
    assert any(r.getMessage() == "head margin softmax: loss.impl=counting -> counting on cpu" for r in caplog.records)
    (backend,) = CountingMarginCE.instances  # built once, from the loss config's chunk budget
    assert backend.chunk_bytes == round(0.0003 * (1 << 20))
    assert (backend.forwards, backend.backwards) == (4, 4)  # two steps, two CE terms (W and P) each

    reference, ref_losses, ref_grads = _train(load_config(None, ["loss.impl=chunked", small_chunks, STAGES]))
    assert reference.resolved_impl == "chunked"
    flat = lambda losses, grads: losses + [g for pair in grads for g in pair]  # noqa: E731
    for got, want in zip(flat(losses, grads), flat(ref_losses, ref_grads), strict=True):
        assert torch.equal(got, want)
    assert torch.equal(head.prototypes, reference.prototypes) and head.prototypes.abs().sum() > 0


def test_the_backends_row_picks_its_prototype_update(registered, monkeypatch):
    calls = []

    def spy_update(prototypes, features, classes, *, mode, momentum):
        calls.append(classes.clone())
        return EPL_IMPLS["torch"](prototypes, features, classes, mode=mode, momentum=momentum)

    monkeypatch.setitem(EPL_IMPLS, "spy", spy_update)
    registered(registry.HeadBackend("spied", lambda loss_cfg: TorchMarginCE(), epl_impl="spy"))
    head, _, _ = _train(load_config(None, ["loss.impl=spied", STAGES]), steps=1)
    assert len(calls) == 1 and calls[0].numel() == 6
    with pytest.raises(ValueError, match="epl_impl 'nowhere' is not one of torch, triton, spy"):
        registered(registry.HeadBackend("lost", None, epl_impl="nowhere"))


def test_device_rules_and_reproducibility_come_from_the_row(registered, caplog):
    registered(registry.HeadBackend("gpu_only", lambda loss_cfg: TorchMarginCE(), devices=("cuda",)))
    registered(registry.HeadBackend("loose", lambda loss_cfg: TorchMarginCE(), deterministic=False))
    with caplog.at_level(logging.INFO, logger="lvface.heads.sharded_softmax"):
        ShardedMarginHead(NUM_CLASSES, DIM, load_config(None, ["loss.impl=loose"]).loss, group=None)(
            torch.randn(4, DIM), torch.tensor([0, 1, 2, 3]))
    assert any(r.getMessage() == "head margin softmax: loss.impl=loose -> loose on cpu (sums not bitwise "
               "reproducible run to run)" for r in caplog.records)
    cfg = load_config(None, ["loss.impl=gpu_only"])
    head = ShardedMarginHead(NUM_CLASSES, DIM, cfg.loss, group=None)
    with pytest.raises(ValueError, match=r"loss.impl=gpu_only runs on CUDA tensors; the head is on cpu: set "
                                         r"loss.impl to auto or chunked"):
        head(torch.randn(4, DIM), torch.tensor([0, 1, 2, 3]))
    assert registry.resolve("gpu_only", "cuda").name == "gpu_only"


def test_an_unknown_backend_is_a_config_error_listing_the_table(registered):
    registered(registry.HeadBackend("counting", lambda loss_cfg: TorchMarginCE()))
    names = ", ".join(["auto", *registry.BACKENDS])
    assert names == "auto, triton, triton_atomic, chunked, dense, counting"
    with pytest.raises(ConfigError, match=f"config key 'loss.impl' is 'fused'; choose one of {names}$"):
        load_config(None, ["loss.impl=fused"])
    cfg = load_config(None, ["loss.impl=counting"])
    cfg.loss.impl = "fused"  # a LossConfig changed in code is checked by the head as a file would be
    with pytest.raises(ConfigError, match=f"choose one of {names}$"):
        ShardedMarginHead(NUM_CLASSES, DIM, cfg.loss, group=None)
    with pytest.raises(ValueError, match="name 'chunked' is taken"):
        registry.register(registry.HeadBackend("chunked", None))
