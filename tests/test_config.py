"""Strict configuration: YAML files, dotted overrides, errors that name the key and the fix."""

from pathlib import Path

import pytest
import torch
import yaml

from lvface.config import Config, ConfigError, StageConfig, from_dict, load_config, parse_overrides
from lvface.engine import build_ds_config
from lvface.schedule import lr_factor

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"


def test_defaults_are_the_papers_curriculum():
    cfg = Config()
    early, stable = cfg.loss.stages
    assert (early.end_epoch, early.sample_rate, early.centers) == (40.0, 0.3, "learned")
    assert (stable.end_epoch, stable.sample_rate, stable.centers, stable.prototype_weight) == (100.0, 1.0, "both", 0.5)
    assert (cfg.loss.scale, cfg.loss.m1, cfg.loss.m2, cfg.loss.m3) == (64.0, 1.0, 0.5, 0.0)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.to_dict() == from_dict(yaml.safe_load(cfg.to_yaml())).to_dict()


@pytest.mark.parametrize("variant", ["t", "s", "b", "l"])
def test_wf42m_configs_hold_the_published_settings(variant):
    cfg = load_config(CONFIGS / f"lvface_vit_{variant}_wf42m.yaml")
    assert cfg.model.name == f"vit_{variant}"
    assert (cfg.data.num_classes, cfg.data.num_images, cfg.data.batch_size) == (2059906, 42474557, 384)
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay) == (1e-3, 0.1)
    assert (cfg.loss.scale, cfg.loss.m2) == (64.0, 0.5)
    assert [(s.end_epoch, s.sample_rate) for s in cfg.loss.stages] == [(40.0, 0.3), (100.0, 1.0)]
    assert cfg.train.epochs == 100


def test_precedence_file_then_command_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 7\n  seed: 3\ndata:\n  batch_size: 32\n")
    cfg = load_config(path, ["train.epochs=2", "--data.batch_size", "16", "loss.stages=[{end_epoch: 5}]"])
    assert cfg.train.epochs == 2.0 and isinstance(cfg.train.epochs, float)  # int coerced to float
    assert cfg.train.seed == 3
    assert cfg.data.batch_size == 16
    assert len(cfg.loss.stages) == 1 and cfg.loss.stages[0].end_epoch == 5.0


def test_unknown_key_names_the_nearest_valid_key(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("optimizer:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: unknown config key 'optimizer.learning_rate'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"unknown config key 'train.epoch'; did you mean 'train.epochs'"):
        load_config(None, ["train.epoch=3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'; did you mean 'train'"):
        from_dict({"trian": {}})
    with pytest.raises(ConfigError, match=r"'loss.stages\[0\].sample_rat'; did you mean 'loss.stages\[0\].sample_rate'"):
        from_dict({"loss": {"stages": [{"sample_rat": 0.3}]}})
    with pytest.raises(ConfigError, match=r"unknown config key 'optimizer.name': the backbone and the head always "
                                          r"train with AdamW .*; delete the key"):
        from_dict({"optimizer": {"name": "adamw"}})


def test_wrong_types_name_key_and_expected_type():
    with pytest.raises(ConfigError, match=r"'data.batch_size' must be an integer, got 'many'"):
        load_config(None, ["data.batch_size=many"])
    with pytest.raises(ConfigError, match=r"'data.batch_size' must be an integer, got 1.5"):
        from_dict({"data": {"batch_size": 1.5}})
    with pytest.raises(ConfigError, match=r"'data.flip' must be true or false, got 1"):
        from_dict({"data": {"flip": 1}})
    with pytest.raises(ConfigError, match=r"'eval.bins' must be a list"):
        from_dict({"eval": {"bins": "lfw.bin"}})
    with pytest.raises(ConfigError, match=r"'model' must be a mapping"):
        from_dict({"model": "vit_t"})


def test_choices_and_cross_field_checks():
    with pytest.raises(ConfigError, match=r"'schedule.decay' is 'linear'; choose one of polynomial, cosine, constant"):
        from_dict({"schedule": {"decay": "linear"}})
    with pytest.raises(ConfigError, match=r"'loss.stages\[1\].centers' is 'W'"):
        from_dict({"loss": {"stages": [{"end_epoch": 1}, {"end_epoch": 2, "centers": "W"}]}})
    with pytest.raises(ConfigError, match=r"'loss.stages\[1\].end_epoch' is 1.0, not after"):
        from_dict({"loss": {"stages": [{"end_epoch": 2}, {"end_epoch": 1}]}})
    with pytest.raises(ConfigError, match=r"sample_rate' is 0.0"):
        from_dict({"loss": {"stages": [{"end_epoch": 2, "sample_rate": 0.0}]}})
    with pytest.raises(ConfigError, match=r"config key 'loss.stages' is empty; give at least one stage"):
        from_dict({"loss": {"stages": []}})


def test_each_section_validates_itself_under_its_key():
    cfg = Config()
    for section in ("model", "data", "loss", "optimizer", "schedule", "train", "eval", "checkpoint", "metrics"):
        getattr(cfg, section).validate()  # the defaults are valid
    cfg.optimizer.betas = [0.9]
    with pytest.raises(ConfigError, match=r"config key 'optimizer.betas' must have two numbers"):
        cfg.optimizer.validate()
    with pytest.raises(ConfigError, match=r"config key 'loss.stages\[name=late\].prototype_weight' is 2.0"):
        StageConfig(name="late", prototype_weight=2.0).validate()  # a stage built in code is named by its name


def test_three_stage_schedule_is_expressible():
    cfg = from_dict({"loss": {"stages": [
        {"name": "sampled", "end_epoch": 20, "sample_rate": 0.3},
        {"name": "pull", "end_epoch": 40, "sample_rate": 0.3, "center_penalty": 1.0},
        {"name": "full", "end_epoch": 100, "sample_rate": 1.0, "centers": "both"},
    ]}})
    assert [s.name for s in cfg.loss.stages] == ["sampled", "pull", "full"]
    assert cfg.loss.stages[1].center_penalty == 1.0


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="has no value"):
        parse_overrides(["--train.epochs"])
    with pytest.raises(ConfigError, match="must be dotted"):
        parse_overrides(["epochs=3"])
    with pytest.raises(ConfigError, match="not an override"):
        parse_overrides(["configs/demo.yaml"])
    with pytest.raises(ConfigError, match=r"config file .*missing.yaml not found"):
        load_config("missing.yaml")


def test_deepspeed_auto_fields_filled_and_conflicts_refused():
    cfg = load_config(None, ["data.batch_size=8", "train.gradient_accumulation_steps=2", "optimizer.lr=0.002"])
    ds = build_ds_config(CONFIGS / "zero2.json", cfg, world_size=4, device=torch.device("cpu"))
    assert ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 64
    assert ds["optimizer"]["params"]["lr"] == 0.002
    assert ds["gradient_clipping"] == 5.0
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False  # CPU: fp32
    assert ds["zero_optimization"]["stage"] == 2
    with pytest.raises(ConfigError, match=r"'train_micro_batch_size_per_gpu' is 4 but lvface's config implies 8"):
        build_ds_config({"train_micro_batch_size_per_gpu": 4}, cfg, world_size=1, device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="train.precision is fp32 but the DeepSpeed config enables bf16"):
        build_ds_config({"bf16": {"enabled": True}}, load_config(None, ["train.precision=fp32"]), 1, torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"missing.json not found"):
        build_ds_config("missing.json", cfg, 1, torch.device("cpu"))


@pytest.mark.parametrize("name", ["zero1.json", "zero2.json", "zero3.json"])
def test_shipped_deepspeed_configs_reduce_gradients_in_fp32(name):
    # bf16 gradients summed over 64 ranks lose the low bits of small contributions; the shipped
    # configs ask DeepSpeed to communicate in fp32. Read back through DeepSpeed's own parser.
    from deepspeed.runtime.config import get_communication_data_type

    cfg = load_config(None, ["train.precision=bf16"])
    ds = build_ds_config(CONFIGS / name, cfg, world_size=64, device=torch.device("cpu"))
    assert ds["bf16"]["enabled"] is True
    assert get_communication_data_type(ds) == torch.float32


def test_lr_schedule_warmup_then_decay():
    # warmup 10 steps of 100, polynomial power 2 to zero
    values = [lr_factor(s, 100, 10, "polynomial", 2.0, 0.0) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0)
    assert values[55] == pytest.approx((1 - 45 / 90) ** 2)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    assert lr_factor(100, 100, 10, "cosine", 2.0, 0.1) == pytest.approx(0.1)
    assert lr_factor(55, 100, 10, "cosine", 2.0, 0.0) == pytest.approx(0.5)
