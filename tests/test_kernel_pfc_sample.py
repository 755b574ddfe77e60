"""Tests of the Partial-FC sampler (lvface/kernels/pfc_sample.py): a fixed sample size (no host sync),
the host draw's rows while the positives fit the budget, deterministic per seed, step and shard, and a
random subset of the positives beyond the budget."""

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
            assert rows is not None or host_rows is None  # the host sampler grows to all rows past the budget
            if rows is None:
                assert torch.equal(targets, labels)
                continue
            positives = labels[labels >= 0].unique()
            here = labels >= 0
            assert rows.numel() == int(rate * num_local), "a fixed sample size: no host sync"
            assert torch.equal(rows, rows.sort().values) and rows.unique().numel() == rows.numel()
            if positives.numel() <= rows.numel():  # the positives fit: the host sampler's rows exactly
                assert torch.equal(rows, host_rows) and torch.equal(targets, host_targets)
                assert torch.equal(rows[targets[here]], labels[here]), "remapped labels point at their class"
            kept = here & (targets >= 0)
            assert torch.equal(rows[targets[kept]], labels[kept]), "remapped labels point at their class"
            assert set(labels[here & ~kept].tolist()).isdisjoint(rows.tolist()), "-1: the class is not sampled"
            assert torch.equal(targets[~here], labels[~here])


def test_sampler_is_deterministic_per_seed_step_and_shard():
    labels = torch.tensor([3, -1, 3, 17, 40, -1])
    draw = lambda step, start: select_rows(labels, 64, 0.25, sample_seed(1, step, start))[0]  # noqa: E731
    assert torch.equal(draw(5, 0), draw(5, 0)), "a resume at step 5 redraws the same sample"
    assert not torch.equal(draw(5, 0), draw(6, 0))
    assert not torch.equal(draw(5, 0), draw(5, 64))


def test_sampler_beyond_the_budget_keeps_its_size_and_a_random_subset_of_positives():
    labels = torch.arange(20)  # 20 positives, budget int(0.1 * 40) = 4
    rows, targets = select_rows(labels, 40, 0.1, 0)
    assert rows.numel() == 4 and bool((rows < 20).all()), "positives first"
    assert torch.equal(targets[rows], torch.arange(4)) and int((targets >= 0).sum()) == 4
    assert not torch.equal(rows, select_rows(labels, 40, 0.1, 1)[0]), "the subset is drawn, not the lowest ids"
