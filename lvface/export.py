"""ONNX export of the backbone in the form MFR-Ongoing (insightface's face recognition benchmark) takes;
and the backbone's weights as .safetensors (`export_safetensors`), the format weights are exchanged in.

The file holds the backbone alone, in eval form (no token masking, no activation checkpointing, no
stochastic depth, BatchNorm with running statistics), fp32 weights:

    input  `data`       float32 [batch, 3, 112, 112], RGB, (pixel / 255 - 0.5) / 0.5, batch dynamic
    output `embedding`  float32 [batch, 512], not L2-normalised

Exporter: torch.onnx.export with the TorchScript exporter (`dynamo=False`). torch 2.13's default
dynamo exporter needs the `onnxscript` package, which lvface does not depend on; the TorchScript
exporter needs nothing beyond torch and turns this architecture into plain ONNX ops. Opset 17 is the
default: the first opset with a LayerNormalization op (one fused node per norm instead of a
ReduceMean/Sub/Pow/Sqrt/Div chain), and run by every onnxruntime since 1.12. Attention is
exported through the explicit math path (`attn_impl="math"`: MatMul, Softmax, MatMul), which computes
the same function as SDPA with the same weights.

After writing the file, `check_onnx` runs it in onnxruntime and reports:
- parity: cosine of onnxruntime's and PyTorch's embeddings >= 0.99999 on random inputs and on
  synthetic faces (`lvface.data.synthetic.render_face`), at several batch sizes;
- the checks insightface's `onnx_helper.ArcFaceORT.check` applies to MFR-Ongoing submissions: a 4-d
  input with a symbolic batch dimension and 112x112 spatial size, exactly one output, a graph of at
  least 8 nodes, no initialiser narrower than 4 bytes per element (no fp16/bf16/int8 weights), a
  feature dimension <= 512, a file under 1024 MiB, and the input normalisation MFR will infer (127.5 /
  127.5 unless the first 8 node names start with both Sub and Mul); the batch-1 latency (MFR's
  statistic: the 6th fastest of 50 runs) on this machine against MFR's 15 ms, for information only.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from lvface.models import VisionTransformer
from lvface.progress import progress

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
INPUT_NAME = "data"
OUTPUT_NAME = "embedding"
PARITY_MIN_COSINE = 0.99999
MFR_MAX_SIZE_MIB = 1024
MFR_MAX_FEATURE_DIM = 512
MFR_MAX_LATENCY_MS = 15.0
MFR_MIN_NODES = 8
ONNX_PROTOBUF_LIMIT = 2**31 - 1


def build_export_model(module: VisionTransformer) -> VisionTransformer:
    """A new fp32 CPU copy of `module` in eval form, with explicit-math attention, for tracing."""
    args = dataclasses.replace(module.args, mask_ratio=0.0, using_checkpoint=False, drop_path_rate=0.0,
                               drop_rate=0.0, attn_impl="math")
    patch_size = module.patch_embed.proj.kernel_size[0]
    with torch.device("meta"):  # the weights come from `module`
        export_model = VisionTransformer(args, num_features=module.num_features, img_size=module.image_size,
                                         patch_size=patch_size)
    state = {key: value.detach().float().cpu().clone() if value.is_floating_point() else value.detach().cpu().clone()
             for key, value in module.state_dict().items()}
    export_model.load_state_dict(state, strict=True, assign=True)
    return export_model.float().eval()


def export_onnx(module: VisionTransformer, output: str | Path, opset: int = DEFAULT_OPSET) -> Path:
    """Write `module` (any mode; exported in eval form) as an ONNX file with a dynamic batch axis."""
    output = Path(output)
    export_model = build_export_model(module)
    weight_bytes = sum(t.numel() * t.element_size() for t in export_model.state_dict().values())
    if weight_bytes > ONNX_PROTOBUF_LIMIT:
        raise ValueError(f"the backbone's fp32 weights take {weight_bytes / 2**30:.2f} GiB: over ONNX's 2 GiB "
                         f"single-file limit (and MFR-Ongoing's 1 GiB); export a smaller variant")
    size = export_model.image_size
    example = torch.randn(2, 3, size, size)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp{os.getpid()}")
    # torch >= 2.5 has both exporters and, from 2.9, defaults to dynamo: ask for TorchScript by name
    choose_exporter = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    with warnings.catch_warnings():
        # the TorchScript exporter announces its deprecation; it is the exporter chosen on purpose (module doc)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        with torch.no_grad():
            torch.onnx.export(
                export_model, (example,), str(tmp), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, opset_version=opset,
                do_constant_folding=True, keep_initializers_as_inputs=False, **choose_exporter,
            )
    os.replace(tmp, output)
    log.info("exported %s (opset %d, %.1f MiB)", output, opset, output.stat().st_size / 2**20)
    return output


# ----------------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------------


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def synthetic_face_batch(count: int, image_size: int = 112, seed: int = 0) -> torch.Tensor:
    """`count` synthetic faces (different identities), normalised (x / 255 - 0.5) / 0.5: (count, 3, S, S)."""
    from lvface.data.synthetic import render_face

    faces = np.stack([render_face(seed, identity, 0, image_size=image_size) for identity in range(count)])
    return torch.from_numpy(faces).permute(0, 3, 1, 2).float().div(255.0).sub(0.5).div(0.5)


def _parity(session, module: torch.nn.Module, inputs: torch.Tensor) -> dict:
    with torch.no_grad():
        expected = module(inputs).float().numpy()
    got = session.run(None, {INPUT_NAME: inputs.numpy()})[0]
    cosines = _cosines(got, expected)
    return {"batch": int(inputs.shape[0]), "min_cosine": float(cosines.min()),
            "max_abs_diff": float(np.abs(got - expected).max())}


def _narrow_tensor_types() -> set[int]:
    """ONNX element types with fewer than 4 bytes per element (what MFR rejects as weights)."""
    from onnx import TensorProto

    names = ["FLOAT16", "BFLOAT16", "INT8", "UINT8", "INT16", "UINT16", "BOOL", "FLOAT8E4M3FN",
             "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ", "INT4", "UINT4", "FLOAT4E2M1"]
    return {getattr(TensorProto, name) for name in names if hasattr(TensorProto, name)}


def _latency_ms(session, image_size: int, runs: int) -> dict:
    blob = np.random.default_rng(0).uniform(-1, 1, (1, 3, image_size, image_size)).astype(np.float32)
    session.run(None, {INPUT_NAME: blob})  # warm-up
    costs = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {INPUT_NAME: blob})
        costs.append((time.perf_counter() - start) * 1000)
    costs.sort()
    return {"runs": runs, "mfr_style_ms": costs[min(5, runs - 1)], "median_ms": costs[runs // 2]}


def _interface_checks(check, session, model) -> int | None:
    """MFR's interface rules: one float NCHW input named INPUT_NAME with a symbolic batch, one output of
    at most MFR_MAX_FEATURE_DIM features, enough graph nodes. Returns the feature dimension."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    shape = list(inputs[0].shape)
    check("input name", inputs[0].name, f"'{INPUT_NAME}'", inputs[0].name == INPUT_NAME)
    check("input count", len(inputs), "1", len(inputs) == 1)
    check("input type", inputs[0].type, "tensor(float)", inputs[0].type == "tensor(float)")
    check("input shape (NCHW)", str(shape), "[batch, 3, 112, 112], batch symbolic",
          len(shape) == 4 and isinstance(shape[0], str) and shape[1:] == [3, 112, 112])
    check("output count", len(outputs), "1", len(outputs) == 1)
    feature_dim = outputs[0].shape[-1] if outputs else None
    check("feature dimension", feature_dim, f"<= {MFR_MAX_FEATURE_DIM} (lvface: 512)",
          isinstance(feature_dim, int) and feature_dim <= MFR_MAX_FEATURE_DIM)
    check("graph nodes", len(model.graph.node), f">= {MFR_MIN_NODES}", len(model.graph.node) >= MFR_MIN_NODES)
    return feature_dim


def _weight_checks(check, model, onnx_path: Path) -> float:
    """MFR's weight rules (fp32 only, nothing narrower, a size limit) and the input normalisation its
    loader infers from the first nodes' names. Returns the file size in MiB."""
    from onnx import TensorProto

    narrow = _narrow_tensor_types()
    narrow_initializers = [init.name for init in model.graph.initializer if init.data_type in narrow]
    narrow_constants = [node.name for node in model.graph.node if node.op_type == "Constant"
                        and any(attr.t.data_type in narrow for attr in node.attribute if attr.name == "value")]
    check("narrow (fp16/bf16/int8) initializers", len(narrow_initializers), "0", not narrow_initializers)
    check("narrow (fp16/bf16/int8) constants", len(narrow_constants), "0", not narrow_constants)
    float_types = {init.data_type for init in model.graph.initializer if init.data_type in
                   (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16)}
    check("weight dtype", sorted(TensorProto.DataType.Name(t) for t in float_types), "FLOAT only",
          float_types <= {TensorProto.FLOAT})
    size_mib = onnx_path.stat().st_size / 2**20
    check("file size (MiB)", round(size_mib, 3), f"< {MFR_MAX_SIZE_MIB}", size_mib < MFR_MAX_SIZE_MIB)
    first_names = [node.name for node in model.graph.node[:8]]
    mfr_subtracts = any(n.startswith(("Sub", "_minus")) for n in first_names)
    mfr_multiplies = any(n.startswith(("Mul", "_mul")) for n in first_names)
    mfr_norm = (0.0, 1.0) if (mfr_subtracts and mfr_multiplies) else (127.5, 127.5)
    check("input normalisation MFR infers (mean, std)", list(mfr_norm), "[127.5, 127.5] = (x/255-0.5)/0.5",
          mfr_norm == (127.5, 127.5))
    return size_mib


def _parity_checks(check, session, module, image_size: int, parity_batches, feature_dim) -> tuple[list, float]:
    """onnxruntime against PyTorch on random inputs and synthetic faces, and the dynamic batch.
    Returns (parity entries, the smallest cosine)."""
    parity = []
    generator = torch.Generator().manual_seed(0)
    for batch in progress(parity_batches, desc="export: parity", unit="batch"):
        random_inputs = torch.rand(batch, 3, image_size, image_size, generator=generator) * 2 - 1
        parity.append({"inputs": "random uniform [-1, 1]", **_parity(session, module, random_inputs)})
        faces = synthetic_face_batch(batch, image_size)
        parity.append({"inputs": "synthetic faces", **_parity(session, module, faces)})
    min_cosine = min(entry["min_cosine"] for entry in parity)
    check("parity: min cosine onnxruntime vs PyTorch", round(min_cosine, 9), f">= {PARITY_MIN_COSINE}",
          min_cosine >= PARITY_MIN_COSINE)
    output_shapes_ok = all(
        session.run(None, {INPUT_NAME: np.zeros((b, 3, image_size, image_size), np.float32)})[0].shape
        == (b, feature_dim) for b in (1, 3))
    check("dynamic batch (runs at 1 and 3)", output_shapes_ok, "True", output_shapes_ok)
    return parity, min_cosine


def check_onnx(onnx_path: str | Path, module: torch.nn.Module, *, parity_batches: tuple[int, ...] = (1, 5),
               latency_runs: int = 50) -> dict:
    """Parity of the ONNX file with `module` through onnxruntime, and MFR-Ongoing's submission checks.

    Returns a report dict; report["passed"] is True when parity and every required check pass.
    """
    import onnx
    import onnxruntime as ort

    onnx_path = Path(onnx_path)
    module = build_export_model(module) if isinstance(module, VisionTransformer) else module.float().eval()
    image_size = module.image_size if isinstance(module, VisionTransformer) else 112
    model = onnx.load(str(onnx_path))
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    checks: list[dict] = []

    def check(name: str, value, requirement: str, passed: bool, required: bool = True) -> None:
        checks.append({"check": name, "value": value, "requirement": requirement, "passed": bool(passed),
                       "required": required})

    feature_dim = _interface_checks(check, session, model)
    size_mib = _weight_checks(check, model, onnx_path)
    parity, min_cosine = _parity_checks(check, session, module, image_size, parity_batches, feature_dim)
    latency = _latency_ms(session, image_size, latency_runs) if latency_runs > 0 else None
    if latency is not None:
        check("latency batch 1, this machine (ms)", round(latency["mfr_style_ms"], 3),
              f"MFR: <= {MFR_MAX_LATENCY_MS} on its machine (information)",
              latency["mfr_style_ms"] <= MFR_MAX_LATENCY_MS, required=False)
    opset = next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), None)
    return {
        "onnx": str(onnx_path), "opset": opset, "size_mib": size_mib, "feature_dim": feature_dim,
        "parity": parity, "min_cosine": min_cosine, "latency": latency, "checks": checks,
        "passed": all(c["passed"] for c in checks if c["required"]),
        "onnxruntime": ort.__version__, "torch": torch.__version__,
    }


def format_report(report: dict) -> str:
    """The check table of a `check_onnx` / `export_checkpoint` report."""
    rows = [("check", "value", "requirement", "result")]
    for c in report["checks"]:
        result = ("ok" if c["passed"] else "FAIL") if c["required"] else ("ok" if c["passed"] else "over (info)")
        rows.append((c["check"], str(c["value"]), c["requirement"], result))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    head = [f"ONNX {report['onnx']}: opset {report['opset']}, {report['size_mib']:.1f} MiB, "
            f"feature dim {report['feature_dim']}"]
    if "model" in report:
        head.append(f"model {report['model']} ({report['parameters']:,} parameters) from {report['source']}")
    if "exporter" in report:
        head.append(f"exporter {report['exporter']}, onnxruntime {report['onnxruntime']}, torch {report['torch']}")
    for entry in report["parity"]:
        head.append(f"parity {entry['inputs']:<22} batch {entry['batch']}: min cosine {entry['min_cosine']:.9f}, "
                    f"max |diff| {entry['max_abs_diff']:.2e}")
    head.append(f"overall: {'PASSED' if report['passed'] else 'FAILED'}")
    return "\n".join(head[:-1] + lines + head[-1:])


def export_checkpoint(checkpoint: str | Path, output: str | Path, *, model: str | None = None,
                      opset: int = DEFAULT_OPSET, check: bool = True, latency_runs: int = 50,
                      parity_batches: tuple[int, ...] = (1, 5)) -> dict:
    """`lvface export`: any checkpoint `lvface.checkpoint.files.load_backbone` reads -> ONNX, checked."""
    from lvface.checkpoint.files import load_backbone
    from lvface.models import count_parameters

    backbone = load_backbone(checkpoint, model, attn_impl="math")
    path = export_onnx(backbone.module, output, opset)
    report = {"onnx": str(path), "opset": opset, "model": backbone.variant, "source": backbone.source,
              "parameters": count_parameters(backbone.module),
              "exporter": "torch.onnx.export (TorchScript, dynamo=False)"}
    if check:
        report.update(check_onnx(path, backbone.module, parity_batches=parity_batches, latency_runs=latency_runs))
        log.info("export report\n%s", format_report(report))
    return report


def export_safetensors(module: torch.nn.Module, output: str | Path, *, variant: str, source: str) -> Path:
    """Write `module`'s fp32 state_dict (insightface key names, BatchNorm buffers included) as a
    .safetensors file, with the variant and source in its metadata; written under a temporary name and
    moved into place. Any lvface command reading a backbone reads it back (`--checkpoint x.safetensors`),
    as do other frameworks' safetensors loaders."""
    from safetensors.torch import save

    from lvface.files import atomic_open

    tensors = {key: (value.detach().float() if value.is_floating_point() else value.detach()).cpu().contiguous().clone()
               for key, value in module.state_dict().items()}
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(output) as handle:
        handle.write(save(tensors, metadata={"format": "pt", "lvface.model": variant, "lvface.source": source}))
    return output


def export_safetensors_checkpoint(checkpoint: str | Path, output: str | Path, *, model: str | None = None,
                                  check: bool = True) -> dict:
    """`lvface export --format safetensors`: any checkpoint -> .safetensors; the check reads the file back
    through the backbone reader and compares every tensor bit for bit."""
    from lvface.checkpoint.files import load_backbone, read_state_dict_file

    backbone = load_backbone(checkpoint, model)
    path = export_safetensors(backbone.module, output, variant=backbone.variant, source=backbone.source)
    report = {"safetensors": str(path), "model": backbone.variant, "source": backbone.source,
              "tensors": len(backbone.module.state_dict()), "bytes": path.stat().st_size}
    if check:
        expected, got = backbone.module.state_dict(), read_state_dict_file(path)
        report["passed"] = got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
        log.info("wrote %s: %d tensors of %s (%s), %.1f MiB; read back %s", path, report["tensors"], backbone.variant,
                 backbone.source, report["bytes"] / 2**20, "equal, bit for bit" if report["passed"] else "DIFFERENT")
    return report


def _export_format(args) -> str:
    """--format, else the --output extension (.safetensors), else onnx."""
    if args.format:
        return args.format
    return "safetensors" if Path(args.output).suffix.lower() == ".safetensors" else "onnx"


def _export_command(args) -> int:
    from lvface.files import atomic_write_json

    if _export_format(args) == "safetensors":
        report = export_safetensors_checkpoint(args.checkpoint, args.output, model=args.model, check=not args.no_check)
    else:
        report = export_checkpoint(args.checkpoint, args.output, model=args.model, opset=args.opset,
                                   check=not args.no_check, latency_runs=args.latency_runs)
    if args.json:
        atomic_write_json(args.json, report)
    if not args.no_check and not report["passed"]:
        log.error("%s was written but failed the checks above", args.output)
        return 1
    return 0


def register(subparsers) -> None:
    """`lvface export --checkpoint CKPT --output model.onnx`: ONNX for MFR-Ongoing, checked; or
    `--output backbone.safetensors` (`--format safetensors`): the weights, for exchange."""
    from lvface.checkpoint.files import add_checkpoint_args

    export = subparsers.add_parser("export", help="backbone -> ONNX for MFR-Ongoing (parity and submission checks), "
                                   "or -> .safetensors weights")
    add_checkpoint_args(export, device=False)  # export and its checks run on the CPU
    export.add_argument("--output", required=True, help="the .onnx or .safetensors file to write")
    export.add_argument("--format", choices=["onnx", "safetensors"], default=None,
                        help="default: safetensors for an --output ending in .safetensors, else onnx")
    export.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (17: first with LayerNormalization)")
    export.add_argument("--no-check", action="store_true",
                        help="skip the onnxruntime parity and MFR checks (safetensors: the read-back comparison)")
    export.add_argument("--latency-runs", type=int, default=50, help="batch-1 runs timed for the latency line")
    export.add_argument("--json", default=None, help="also write the report as JSON here")
    export.set_defaults(func=_export_command)
