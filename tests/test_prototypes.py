"""Tests of lvface.heads.prototypes (EPL prototype update), lvface.heads.curriculum (stages) and the
head's use of them.

The distributed update (each rank updates its shard from the gathered batch) is compared on gloo groups
of 1..4 ranks with a per-class loop written here, over two steps of two accumulated micro-batches.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_on_ranks

from lvface.config import LossConfig, StageConfig, from_dict
from lvface.heads import ShardedMarginHead, stage_for_epoch, update_prototypes_
from lvface.heads.prototypes import class_feature_sums, prototype_factor

NUM_CLASSES, DIM = 11, 6


def reference_update(prototypes, features, labels, mode, momentum):
    """One EPL update per class present, from the mean of its normalised features (loop, float64)."""
    out = prototypes.clone()
    x_hat = F.normalize(features, dim=1)
    for cls in sorted(set(labels.tolist())):
        mean = F.normalize(x_hat[labels == cls].mean(0), dim=0)
        old = out[cls]
        a = torch.sigmoid(old @ mean) if mode == "adaptive" else torch.tensor(momentum, dtype=old.dtype)
        out[cls] = F.normalize(a * old + (1 - a) * mean, dim=0)
    return out


def test_first_sight_sets_the_class_mean_and_updates_follow_the_rule():
    torch.manual_seed(0)
    features = F.normalize(torch.randn(7, DIM, dtype=torch.float64), dim=1)
    labels = torch.tensor([2, 2, 5, 2, 9, 5, 0])
    for mode in ("adaptive", "momentum"):
        prototypes = torch.zeros(NUM_CLASSES, DIM, dtype=torch.float64)
        rows, sums, counts = class_feature_sums(features, labels)
        assert rows.tolist() == [0, 2, 5, 9] and counts.tolist() == [1, 3, 2, 1]
        update_prototypes_(prototypes, rows, sums, counts, mode=mode, momentum=0.9)
        for cls in (0, 2, 5, 9):  # zero start: P = normalised class mean under either rule
            torch.testing.assert_close(prototypes[cls], F.normalize(features[labels == cls].mean(0), dim=0))
        assert prototypes[[1, 3, 4]].abs().sum() == 0
        second = F.normalize(torch.randn(7, DIM, dtype=torch.float64), dim=1)
        expected = reference_update(prototypes, second, labels, mode, 0.9)
        update_prototypes_(prototypes, *class_feature_sums(second, labels), mode=mode, momentum=0.9)
        torch.testing.assert_close(prototypes, expected, rtol=1e-12, atol=1e-14)


def test_adaptive_factor_is_sigmoid_of_cosine_and_class_sums_merge_micro_batches():
    p = F.normalize(torch.randn(4, DIM, dtype=torch.float64), dim=1)
    m = F.normalize(torch.randn(4, DIM, dtype=torch.float64), dim=1)
    torch.testing.assert_close(prototype_factor(p, m, "adaptive", 0.0), torch.sigmoid((p * m).sum(1)))
    torch.testing.assert_close(prototype_factor(p, m, "momentum", 0.7), torch.full((4,), 0.7, dtype=torch.float64))
    with pytest.raises(ValueError, match="prototype_update"):
        prototype_factor(p, m, "ema", 0.5)
    # two micro-batches of one step, concatenated as the head does before its one update
    features = torch.cat([torch.ones(3, 2), torch.full((2, 2), 2.0)])
    rows, sums, counts = class_feature_sums(features, torch.tensor([4, 1, 4, 1, 7]))
    assert rows.tolist() == [1, 4, 7] and counts.tolist() == [2, 2, 1]
    assert sums[:, 0].tolist() == [3.0, 2.0, 2.0]


def micro_batches():
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(2, 2, 12, DIM, generator=generator, dtype=torch.float64)  # (step, micro, N, D)
    labels = torch.randint(0, NUM_CLASSES, (2, 2, 12), generator=generator)
    labels[0, 0, :3] = 4  # a repeated class
    return features, labels


def distributed_updates(rank, world, group, mode):
    cfg = LossConfig(prototype_update=mode, prototype_momentum=0.8, stages=[StageConfig(sample_rate=0.5)],
                     chunk_mb=256 / (1 << 20))  # 256 bytes: many chunks
    head = ShardedMarginHead(NUM_CLASSES, DIM, cfg, group=group).double()
    features, labels = micro_batches()
    batch = 12 // world
    local = slice(rank * batch, (rank + 1) * batch)
    after = []
    for step in range(2):
        for micro in range(2):
            head(features[step, micro, local].clone().requires_grad_(), labels[step, micro, local]).backward()
        head.update_prototypes()
        after.append(head.prototypes.clone())
    return after


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_distributed_update_matches_the_per_class_reference(world):
    for mode in ("adaptive", "momentum"):
        results = run_on_ranks(distributed_updates, world, mode)
        features, labels = micro_batches()
        expected = torch.zeros(NUM_CLASSES, DIM, dtype=torch.float64)
        for step in range(2):  # the micro-batches of a step are one update
            expected = reference_update(expected, features[step].reshape(-1, DIM), labels[step].reshape(-1), mode, 0.8)
            got = torch.cat([r[step] for r in results])
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14, msg=f"{mode}, step {step}, {world} ranks")


def test_update_is_deterministic_and_prototypes_are_a_buffer():
    cfg = LossConfig()
    runs = []
    for _ in range(2):
        head = ShardedMarginHead(NUM_CLASSES, DIM, cfg, group=None)
        features, labels = micro_batches()
        head(features[0, 0].float(), labels[0, 0]).backward()
        assert head.update_prototypes() == len(set(labels[0, 0].tolist()))
        assert head.update_prototypes() == 0  # consumed
        runs.append(head.prototypes.clone())
    assert torch.equal(runs[0], runs[1])
    assert "prototypes" in head.state_dict() and not head.prototypes.requires_grad
    assert [name for name, _ in head.named_parameters()] == ["weight"]


# --------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------


def test_default_curriculum_is_the_papers_two_stages():
    stages = LossConfig().stages
    assert [(s.name, s.end_epoch, s.sample_rate, s.centers) for s in stages] == [
        ("early", 40.0, 0.3, "learned"),
        ("stable", 100.0, 1.0, "both"),
    ]
    assert stages[1].prototype_weight == 0.5
    assert stage_for_epoch(stages, 0.0).name == "early"
    assert stage_for_epoch(stages, 39.99).name == "early"
    assert stage_for_epoch(stages, 40.0).name == "stable"
    assert stage_for_epoch(stages, 250.0).name == "stable"


def test_three_stage_schedule_is_expressible_and_runs():
    cfg = from_dict({"loss": {"stages": [
        {"name": "sampled", "end_epoch": 20, "sample_rate": 0.3, "centers": "learned"},
        {"name": "pull", "end_epoch": 40, "sample_rate": 0.3, "centers": "learned", "center_penalty": 1.0},
        {"name": "full", "end_epoch": 100, "sample_rate": 1.0, "centers": "prototypes"},
    ]}})
    head = ShardedMarginHead(NUM_CLASSES, DIM, cfg.loss, group=None)
    features, labels = micro_batches()
    for epoch in (0, 25, 60):
        head.set_stage(stage_for_epoch(cfg.loss.stages, epoch))
        head.zero_grad()
        head(features[0, 0].float().requires_grad_(), labels[0, 0]).backward()
        head.update_prototypes()
        if head.stage.name == "full":  # prototypes only: W takes no part
            assert head.weight.grad is None and head.last_sampled_rows is None
        elif head.stage.name == "pull":
            assert head.weight.grad is not None and head.last_sampled_rows is not None


def test_stage_switch_is_logged_once_and_bad_stages_refused(caplog):
    head = ShardedMarginHead(NUM_CLASSES, DIM, LossConfig(), group=None)
    stable = LossConfig().stages[1]
    with caplog.at_level(logging.INFO, logger="lvface.heads.sharded_softmax"):
        head.set_stage(stable)
        head.set_stage(stable)
    switches = [r.getMessage() for r in caplog.records if "head stage" in r.getMessage()]
    assert switches == [
        "head stage 'early' -> 'stable' (until epoch 100): sample_rate=1, centers=both, prototype_weight=0.5"
    ]
    with pytest.raises(ValueError, match="centers"):
        StageConfig(centers="mixed").validate()
    with pytest.raises(ValueError, match="sample_rate"):
        head.set_stage(StageConfig(sample_rate=0.0))
