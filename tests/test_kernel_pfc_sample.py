"""Tests of the Partial-FC sampler (lvface/kernels/pfc_sample.py): device and host draws agree, are
deterministic per seed, step and shard, and keep every positive class."""

from __future__ import annotations

import torch

from lvface.kernels.pfc_sample import host_select_rows, sample_seed, select_rows



def test_device_sampler_draws_the_host_samplers_rows():
    generator = torch.Generator().manual_seed(3)
    for num_local, rate, n in ((50, 0.3, 40), (50, 0.3, 8), (1000, 0.1, 64), (7, 0.5, 30)):
        labels = torch.randint(-1, num_local, (n,), generator=generator)
        for step in range(3):
            seed = sample_seed(9, step, 100)
            rows, targets = select_rows(labels, num_local, rate, seed)
            host_rows, host_targets = host_select_rows(labels, num_local, rate, seed)
            assert (rows is None) == (host_rows is None)
            if rows is None:
                assert torch.equal(targets, labels)
                continue
            assert torch.equal(rows, host_rows) and torch.equal(targets, host_targets)
            positives = labels[labels >= 0].unique()
            assert rows.numel() == max(int(rate * num_local), positives.numel())
            assert torch.equal(rows, rows.sort().values) and rows.unique().numel() == rows.numel()
            here = labels >= 0
            assert torch.equal(rows[targets[here]], labels[here]), "remapped labels point at their class"
            assert torch.equal(targets[~here], labels[~here])


def test_sampler_is_deterministic_per_seed_step_and_shard():
    labels = torch.tensor([3, -1, 3, 17, 40, -1])
    draw = lambda step, start: select_rows(labels, 64, 0.25, sample_seed(1, step, start))[0]  # noqa: E731
    assert torch.equal(draw(5, 0), draw(5, 0)), "a resume at step 5 redraws the same sample"
    assert not torch.equal(draw(5, 0), draw(6, 0))
    assert not torch.equal(draw(5, 0), draw(5, 64))


