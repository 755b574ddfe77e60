"""`lvface config show` (the resolved config, each key under its help) and list-index overrides."""
from __future__ import annotations

import dataclasses

import pytest
import yaml

import lvface.cli
from lvface.config import Config, ConfigError, load_config
from lvface.config_help import field_help, format_config


def _sections(cfg: Config):
    for section in dataclasses.fields(cfg):
        yield section.name, getattr(cfg, section.name)


def test_every_key_has_its_help_and_the_output_reads_back(tmp_path):
    cfg = load_config("configs/demo.yaml", ["loss.stages.1.prototype_weight=0.3"])
    text = format_config(cfg)
    assert yaml.safe_load(text) == cfg.to_dict()  # valid YAML of the resolved values
    (tmp_path / "resolved.yaml").write_text(text)
    assert load_config(tmp_path / "resolved.yaml") == cfg  # a config --config reads back to the same run
    lines = text.splitlines()
    for name, section in _sections(cfg):
        helps = field_help(type(section))
        start = lines.index(f"{name}:")
        for item in dataclasses.fields(section):
            assert helps.get(item.name), f"{name}.{item.name} has no docstring in lvface/config.py"
            # the key's line (in its section) comes right after its help, word for word, wrapped
            row = next(i for i in range(start, len(lines)) if lines[i].startswith(f"  {item.name}:"))
            comment = []
            for line in reversed(lines[:row]):
                if not line.lstrip().startswith("#"):
                    break
                comment.insert(0, line.strip()[2:])
            assert " ".join(comment).endswith(helps[item.name]), (name, item.name)
    from lvface.config import StageConfig

    assert set(field_help(StageConfig)) == {item.name for item in dataclasses.fields(StageConfig)}
    assert f"# {field_help(StageConfig)['prototype_weight']}" in text  # list items: help on the first item
    assert "prototype_weight: 0.3" in text and "stages:" in text
    assert yaml.safe_load(format_config(cfg, comments=False)) == cfg.to_dict()
    assert "#" not in format_config(cfg, comments=False)


def test_list_index_overrides():
    default = Config()
    cfg = load_config(None, ["loss.stages.0.end_epoch=2", "loss.stages.1.prototype_weight=0.3",
                             "data.blur_sigma.1=2.5"])
    expected = dataclasses.replace(default.loss.stages[0], end_epoch=2.0)
    assert cfg.loss.stages[0] == expected
    assert cfg.loss.stages[1] == dataclasses.replace(default.loss.stages[1], prototype_weight=0.3)
    assert cfg.data.blur_sigma == [default.data.blur_sigma[0], 2.5]
    # over a file's list: the file's items, one field changed
    demo = load_config("configs/demo.yaml")
    cfg = load_config("configs/demo.yaml", ["loss.stages.1.prototype_weight=0.3"])
    assert cfg.loss.stages[0] == demo.loss.stages[0]
    assert cfg.loss.stages[1] == dataclasses.replace(demo.loss.stages[1], prototype_weight=0.3)
    assert dataclasses.replace(cfg, loss=demo.loss) == demo  # nothing else moved
    with pytest.raises(ConfigError, match=r"'loss.stages.2': loss.stages has 2 items \(indices 0..1\)"):
        load_config(None, ["loss.stages.2.prototype_weight=0.3"])
    with pytest.raises(ConfigError, match="prototype_wieght"):
        load_config(None, ["loss.stages.1.prototype_wieght=0.3"])  # a typo inside an item is still an error


def test_config_show_command_and_train_help(capsys):
    assert lvface.cli.main(["config", "show", "--config", "configs/demo.yaml", "loss.stages.1.prototype_weight=0.3",
                            "train.epochs=2"]) == 0
    out = capsys.readouterr().out
    shown = yaml.safe_load(out)
    assert shown["loss"]["stages"][1]["prototype_weight"] == 0.3 and shown["train"]["epochs"] == 2.0
    assert "# Peak learning rate (after warmup)." in out
    assert lvface.cli.main(["config", "show", "train.epochz=2"]) == 2
    assert "train.epochz" in capsys.readouterr().err
    from lvface.train import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    assert "lvface config show" in capsys.readouterr().out
