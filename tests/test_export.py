"""ONNX export: every variant's architecture, parity through onnxruntime, MFR checks, checkpoint inputs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from dist_utils import free_port
from lvface.checkpoint.files import CONFIG_FILE, LATEST, load_backbone, load_state_dict_from_checkpoint, strip_prefixes
from lvface.export import (
    INPUT_NAME, build_export_model, check_onnx, export_checkpoint, export_onnx, format_report,
    synthetic_face_batch,
)
from lvface.models import VIT_VARIANTS, build_vit
from lvface.run_folder import RunFolder

REPO = Path(__file__).resolve().parents[1]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def run_onnx(path: Path, inputs: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {INPUT_NAME: inputs.numpy()})[0]


def warm_batchnorm(module: torch.nn.Module) -> None:
    """Non-trivial BatchNorm running statistics (a fresh model has mean 0, var 1)."""
    module.train()
    with torch.no_grad():
        for _ in range(2):
            module(torch.randn(4, 3, 112, 112))


def tiny(name: str) -> torch.nn.Module:
    """The variant's architecture (its masking / checkpointing / drop-path presets kept) at a width and
    depth a 2-core CPU exports in a second; vit_demo at its real size."""
    return build_vit(name) if name == "vit_demo" else build_vit(name, embed_dim=64, depth=2)


@pytest.mark.parametrize("name", list(VIT_VARIANTS))
def test_export_every_variant_architecture(name, tmp_path):
    torch.manual_seed(0)
    module = tiny(name)
    warm_batchnorm(module)  # leaves it in train mode: masking / checkpointing are on there
    path = export_onnx(module, tmp_path / f"{name}.onnx")
    assert module.training  # export works on a copy

    report = check_onnx(path, module, parity_batches=(2,), latency_runs=3 if name == "vit_demo" else 0)
    assert report["passed"], format_report(report)
    assert report["opset"] == 17 and report["feature_dim"] == 512 and report["min_cosine"] >= 0.99999
    assert {c["check"] for c in report["checks"]} >= {"input name", "input shape (NCHW)", "output count",
                                                      "narrow (fp16/bf16/int8) initializers", "file size (MiB)"}

    # the file computes the eval-mode module (no masking, no drop path), at any batch size
    inputs = torch.cat([torch.rand(2, 3, 112, 112) * 2 - 1, synthetic_face_batch(3)])
    with torch.no_grad():
        expected = module.eval()(inputs).numpy()
    got = run_onnx(path, inputs)
    assert got.shape == (5, 512) and cosines(got, expected).min() >= 0.99999

    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == ["data"] and len(model.graph.output) == 1
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 112, 112]
    assert all(init.data_type == onnx.TensorProto.FLOAT for init in model.graph.initializer
               if init.data_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT, onnx.TensorProto.BFLOAT16))


def test_failed_checks_are_reported(tmp_path):
    # an fp16 initialiser (unused, so onnxruntime still runs the file): MFR's loader rejects the file
    torch.manual_seed(0)
    module = build_vit("vit_demo", embed_dim=32, depth=1)
    path = export_onnx(module, tmp_path / "m.onnx")
    model = onnx.load(str(path))
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.ones(4, np.float16), "half_weight"))
    onnx.save(model, str(tmp_path / "bad.onnx"))
    report = check_onnx(tmp_path / "bad.onnx", module, parity_batches=(2,), latency_runs=0)
    failed = {c["check"] for c in report["checks"] if not c["passed"]}
    assert not report["passed"] and failed == {"narrow (fp16/bf16/int8) initializers", "weight dtype"}
    assert "FAIL" in format_report(report) and "overall: FAILED" in format_report(report)


def test_export_plain_insightface_pt_with_module_prefix(tmp_path):
    torch.manual_seed(1)
    module = build_vit("vit_demo")
    warm_batchnorm(module)
    module.eval()
    torch.save({f"module.{k}": v for k, v in module.state_dict().items()}, tmp_path / "backbone.pth")
    report = export_checkpoint(tmp_path / "backbone.pth", tmp_path / "model.onnx", latency_runs=0, parity_batches=(2,))
    assert report["passed"] and report["model"] == "vit_demo" and report["opset"] == 17
    inputs = synthetic_face_batch(4)
    with torch.no_grad():
        expected = module(inputs).numpy()
    assert cosines(run_onnx(tmp_path / "model.onnx", inputs), expected).min() >= 0.99999


def test_variant_named_or_refused(tmp_path):
    odd = build_vit("vit_demo", embed_dim=64, depth=3)  # no preset has these sizes
    torch.save({f"backbone.{k}": v for k, v in odd.state_dict().items()}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="--model"):
        load_backbone(tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="--model"):
        load_backbone(tmp_path / "odd.pt", model="vit_t")  # named, but the weights do not fit
    vit = build_vit("vit_demo")
    torch.save({"state_dict": vit.state_dict()}, tmp_path / "wrapped.pt")
    loaded = load_backbone(tmp_path / "wrapped.pt", model="vit_demo")
    assert loaded.variant == "vit_demo" and not loaded.module.training
    assert loaded.module.mask_ratio == 0 and not loaded.module.using_checkpoint
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_backbone(tmp_path / "missing")


def test_lvface_checkpoint_folder_uses_backbone_pt_and_config(tmp_path):
    torch.manual_seed(2)
    module = build_vit("vit_demo")
    root = RunFolder(tmp_path / "out").checkpoints
    tag = root / "step00000010"
    tag.mkdir(parents=True)
    torch.save(module.state_dict(), tag / "backbone.pt")
    (tag / CONFIG_FILE).write_text("model:\n  name: vit_demo\n  num_features: 512\n")
    (root / LATEST).write_text("step00000010")
    for checkpoint in (tag, root, tmp_path / "out"):
        loaded = load_backbone(checkpoint)
        assert loaded.variant == "vit_demo" and loaded.source.endswith("backbone.pt")
    (tag / CONFIG_FILE).write_text("model:\n  name: vit_t\n")  # config and weights disagree: a clear error
    with pytest.raises(ValueError, match="vit_t"):
        load_backbone(root)
    assert load_backbone(root, model="vit_demo").variant == "vit_demo"


def test_strip_prefixes():
    assert list(strip_prefixes({"module.backbone.pos_embed": 1, "backbone.blocks.0.x": 2, "norm.weight": 3})) == [
        "pos_embed", "blocks.0.x", "norm.weight"]


# ---------------------------------------------------------------------------------------------
# ZeRO-3: a real DeepSpeed checkpoint, written in a subprocess (keeps this process free of the
# default process group DeepSpeed creates)
# ---------------------------------------------------------------------------------------------

ZERO3_SCRIPT = textwrap.dedent("""
    import json, sys
    import deepspeed, torch
    from lvface.models import build_vit

    out, config_path = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    deepspeed.init_distributed(dist_backend="gloo")
    config = json.load(open(config_path))
    for key, value in {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                       "train_batch_size": 2, "gradient_clipping": 1.0}.items():
        config[key] = value
    config["optimizer"]["params"] = {"lr": 1e-3, "weight_decay": 0.05, "betas": [0.9, 0.999], "eps": 1e-8}
    config["bf16"] = {"enabled": False}
    config["fp16"] = {"enabled": False}
    config["steps_per_print"] = 10**9
    assert config["zero_optimization"]["stage"] == 3
    model = build_vit("vit_demo")
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    loss = engine(torch.randn(2, 3, 112, 112)).square().mean()
    engine.backward(loss)
    engine.step()
    engine.save_checkpoint(out, tag="step1")
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        gathered = {k: v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
                    for k, v in engine.module.state_dict().items()}
    torch.save(gathered, out + "/gathered.pt")
    # under ZeRO-3 the model-states file holds no full weights (only the buffers)
    states = torch.load(out + "/step1/zero_pp_rank_0_mp_rank_00_model_states.pt", weights_only=False)
    params = [k for k in states["module"] if k not in set(states["buffer_names"])]
    print("MODEL_STATES_NUMEL", sum(states["module"][k].numel() for k in params), len(params))
""")


@pytest.fixture(scope="module")
def zero3_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3") / "checkpoints"
    out.mkdir()
    script = out.parent / "zero3.py"
    script.write_text(ZERO3_SCRIPT)
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), str(out), str(REPO / "configs" / "zero3.json")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    numel, count = map(int, proc.stdout.split("MODEL_STATES_NUMEL")[1].split()[:2])
    assert count > 0
    return out, numel


def test_export_from_zero3_checkpoint(zero3_checkpoint, tmp_path):
    root, model_states_numel = zero3_checkpoint
    assert model_states_numel == 0  # the full weights live only in the ZeRO shards
    assert not (root / "step1" / "backbone.pt").exists()
    gathered = torch.load(root / "gathered.pt", weights_only=True)
    state_dict, _, source = load_state_dict_from_checkpoint(root / "step1")
    assert "DeepSpeed" in source and set(state_dict) == set(gathered)
    for key, value in gathered.items():
        torch.testing.assert_close(state_dict[key], value, rtol=0, atol=0)

    # the checkpoints folder: DeepSpeed's `latest` names the tag
    report = export_checkpoint(root, tmp_path / "zero3.onnx", latency_runs=0, parity_batches=(2,))
    assert report["passed"], format_report(report)
    assert report["model"] == "vit_demo"
    reference = build_vit("vit_demo", mask_ratio=0.0, drop_path_rate=0.0)
    reference.load_state_dict(gathered)
    inputs = torch.cat([synthetic_face_batch(3), torch.rand(2, 3, 112, 112) * 2 - 1])
    with torch.no_grad():
        expected = reference.eval()(inputs).numpy()
    assert cosines(run_onnx(tmp_path / "zero3.onnx", inputs), expected).min() >= 0.99999
    assert json.dumps(report, default=str)  # the report is JSON-serialisable for --json


def test_build_export_model_is_eval_form():
    module = build_vit("vit_b", embed_dim=64, depth=2)
    export_model = build_export_model(module)
    assert not export_model.training and export_model.mask_ratio == 0 and not export_model.using_checkpoint
    assert export_model.args.attn_impl == "math" and export_model.args.drop_path_rate == 0
    assert module.training and module.mask_ratio == 0.05  # the original is untouched


# ---------------------------------------------------------------------------------------------
# .safetensors out and in
# ---------------------------------------------------------------------------------------------


def test_safetensors_round_trip_through_a_real_file(tmp_path):
    from safetensors import safe_open

    import lvface.cli
    from lvface.checkpoint.files import load_backbone_into

    torch.manual_seed(0)
    module = build_vit("vit_demo")
    warm_batchnorm(module)
    module.eval()
    torch.save({f"module.{k}": v for k, v in module.state_dict().items()}, tmp_path / "backbone.pt")
    out = tmp_path / "w" / "backbone.safetensors"
    assert lvface.cli.main(["export", "--checkpoint", str(tmp_path / "backbone.pt"), "--output", str(out),
                            "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] and report["model"] == "vit_demo" and report["safetensors"] == str(out)
    # the file, read by safetensors itself: every tensor and buffer, bit for bit, and the metadata
    with safe_open(str(out), framework="pt") as handle:
        assert handle.metadata()["lvface.model"] == "vit_demo"
        stored = {key: handle.get_tensor(key) for key in handle.keys()}
    expected = module.state_dict()
    assert stored.keys() == expected.keys()
    assert all(torch.equal(stored[k], expected[k]) and stored[k].dtype == expected[k].dtype for k in expected)
    # read back wherever a backbone is read: eval/embed/export (load_backbone) and training's init_backbone
    loaded = load_backbone(out)
    x = torch.randn(3, 3, 112, 112)
    with torch.no_grad():
        assert torch.equal(loaded.module(x), module(x))
    fresh = build_vit("vit_demo")
    assert "backbone file" in load_backbone_into(fresh, out)
    assert all(torch.equal(fresh.state_dict()[k], expected[k]) for k in expected)
    # --format names it whatever the extension; a damaged file is named in the error
    assert lvface.cli.main(["export", "--checkpoint", str(out), "--output", str(tmp_path / "again.weights"),
                            "--format", "safetensors", "--no-check"]) == 0
    from safetensors.torch import load_file

    again = load_file(str(tmp_path / "again.weights"))
    assert all(torch.equal(again[k], expected[k]) for k in expected) and again.keys() == expected.keys()
    (tmp_path / "bad.safetensors").write_bytes(out.read_bytes()[:100])
    with pytest.raises(ValueError, match="bad.safetensors: not a readable .safetensors file"):
        load_backbone(tmp_path / "bad.safetensors")
