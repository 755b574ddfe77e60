"""One reader of backbone weights: training's checkpoint.init_backbone accepts every form that
`lvface eval` and `lvface export` accept, and the choices the config validates are the registries of
the modules that implement them."""

from __future__ import annotations

import pytest
import torch

from lvface.checkpoint.files import LATEST, load_backbone, load_backbone_into
from lvface.config import ConfigError, from_dict
from lvface.heads import margin as margin_module
from lvface.heads.margin import Margin, margin_from_config
from lvface.models import build_vit
from lvface.run_folder import RunFolder


def _source():
    torch.manual_seed(0)
    module = build_vit("vit_demo")
    with torch.no_grad():  # non-default BatchNorm statistics, so buffers are checked too
        for name, buffer in module.named_buffers():
            if buffer.is_floating_point():
                buffer.uniform_(0.5, 1.5)
    return module


def _forms(tmp_path, state):
    """Every form a user may bring, written as a real file or folder."""
    forms = {}

    def save(name, obj):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(obj, path)
        return path

    forms["plain"] = save("plain.pt", state)
    forms["module_prefix"] = save("ddp.pt", {f"module.{k}": v for k, v in state.items()})
    forms["backbone_prefix"] = save("wrapped.pt", {f"backbone.{k}": v for k, v in state.items()})
    forms["arcface_torch_resume"] = save("resume.pt", {"state_dict_backbone": state, "epoch": 3})
    forms["model_wrapper"] = save("model.pt", {"model": state})
    forms["state_dict_wrapper"] = save("sd.pt", {"state_dict": {f"module.{k}": v for k, v in state.items()}})
    tag = RunFolder(tmp_path / "run").checkpoints / "step00000004"
    save("run/checkpoints/step00000004/backbone.pt", state)
    (tag.parent / LATEST).write_text("step00000004\n")
    forms["tag_folder"] = tag
    forms["checkpoints_with_latest"] = tag.parent
    forms["output_dir"] = tmp_path / "run"
    return forms


def test_init_backbone_reads_every_form_eval_and_export_read(tmp_path):
    source = _source()
    reference = {k: v.clone() for k, v in source.state_dict().items()}
    for form, path in _forms(tmp_path, reference).items():
        target = build_vit("vit_demo")  # fresh, different weights
        load_backbone_into(target, path)  # what checkpoint.init_backbone does in training
        for key, value in target.state_dict().items():
            assert torch.equal(value, reference[key]), (form, key)
        evaluated = load_backbone(path).module  # what eval and export build
        for key, value in evaluated.state_dict().items():
            assert torch.equal(value, reference[key]), (form, key)


def test_init_backbone_mismatch_names_the_file(tmp_path):
    path = tmp_path / "other.pt"
    torch.save(build_vit("vit_t").state_dict(), path)
    with pytest.raises(ValueError, match=r"other.pt does not match the configured backbone \(model.name\)"):
        load_backbone_into(build_vit("vit_demo"), path)
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_backbone_into(build_vit("vit_demo"), tmp_path / "absent.pt")


def test_a_new_margin_is_one_class_and_one_registry_line(monkeypatch):
    class ShiftedCosine(Margin):  # a CosFace variant: only the target cosine changes (the rule)
        def target_value(self, cos):
            return cos - 0.25

        def target_slope(self, cos):
            return torch.ones_like(cos)

    with pytest.raises(ConfigError, match="'loss.margin' is 'shifted'; choose one of combined"):
        from_dict({"loss": {"margin": "shifted"}})
    monkeypatch.setitem(margin_module.MARGINS, "shifted", ShiftedCosine)
    cfg = from_dict({"loss": {"margin": "shifted"}})
    margin = margin_from_config(cfg.loss)
    cos = torch.tensor([0.5, -0.2], dtype=torch.float64)
    assert isinstance(margin, ShiftedCosine)
    assert torch.allclose(margin.target_logit(cos), cfg.loss.scale * (cos - 0.25), rtol=0, atol=1e-12)
