"""Subcommands `lvface eval verify`, `lvface eval ijbc` and `lvface embed` (`lvface export` is export.py's).

    lvface eval verify --checkpoint out/checkpoints --bin lfw.bin cfp_fp.bin agedb_30.bin [--json r.json]
    lvface eval ijbc   --checkpoint out/checkpoints --root IJB_release/IJBC [--name IJBC] [--output-dir DIR]
                       [--protocol 1:1|1:N|both]
    lvface embed       --checkpoint backbone.pt --input faces/ --output emb.parquet [--flip] [--landmarks L]
    lvface export      --checkpoint out/checkpoints --output model.onnx [--opset 17]

--checkpoint takes a checkpoint tag folder, a checkpoints folder (or output_dir) holding `latest`, or
a plain insightface / LVFace backbone .pt; --model names the variant when it cannot be read from the
checkpoint's config.yaml or inferred from the tensor shapes. `eval ijbc` splits the embedding over
ranks when started by a launcher (torchrun, deepspeed, mpirun, srun); everything else runs in one
process. Heavy imports happen inside the commands, so `lvface --help` stays fast.
"""

from __future__ import annotations

import argparse
import logging

from lvface.checkpoint.files import add_checkpoint_args
from lvface.files import atomic_write_json

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# eval verify
# ----------------------------------------------------------------------------------------------


def run_verify(checkpoint: str, bins: list[str], *, model: str | None = None, batch_size: int = 64,
               device: str = "auto") -> dict[str, dict]:
    """10-fold accuracy, AUC, TAR@FAR and XNorm of each .bin set: {set name: evaluate_pairs result plus
    `xnorm` and `path`}. The set name is the file's stem, or a longer part of its path where two files
    share a stem."""
    from lvface.checkpoint.files import load_backbone
    from lvface.data.verification_bin import load_bin
    from lvface.eval.verification import verification_set_names
    from lvface.eval.embed import build_model_fn, pick_device
    from lvface.eval.verification import embed_with_norms, evaluate_pairs, xnorm

    names = verification_set_names(bins)  # before the model loads: a listed-twice file fails fast
    backbone = load_backbone(checkpoint, model)
    model_fn = build_model_fn(backbone.module, pick_device(device))
    results = {}
    for name, path in zip(names, bins):
        images, issame = load_bin(path, image_size=backbone.module.image_size)
        embeddings, norm_sums = embed_with_norms(model_fn, images, batch_size)
        results[name] = {**evaluate_pairs(embeddings, issame), "xnorm": xnorm(norm_sums), "path": str(path)}
    return results


def checkpoint_step(checkpoint: str) -> int:
    """The training step of an lvface checkpoint (its train_state.json), 0 for a plain backbone file:
    the `[set][step]` of the arcface_torch-style lines."""
    import json

    from lvface.checkpoint.files import TRAIN_STATE_FILE, resolve_checkpoint

    path = resolve_checkpoint(checkpoint)
    state_file = path / TRAIN_STATE_FILE if path.is_dir() else None
    if state_file is None or not state_file.is_file():
        return 0
    try:
        return int(json.loads(state_file.read_text())["step"])
    except (ValueError, TypeError, KeyError) as error:
        raise ValueError(f"{state_file}: no integer 'step' in it ({error!r}); the checkpoint is damaged") from None


def format_verify_table(results: dict[str, dict]) -> str:
    """One row per set: pairs, accuracy ± std (%), AUC, TAR at each FAR, mean threshold."""
    fars = sorted({far for result in results.values() for far in result["tar_at_far"]})
    header = ["set", "pairs", "accuracy (%)", "AUC"] + [f"TAR@FAR={far:.0e}" for far in fars] + ["threshold"]
    rows = [header]
    for name, r in results.items():
        rows.append([name, str(r["num_pairs"]), f"{100 * r['accuracy']:.2f} ± {100 * r['accuracy_std']:.2f}",
                     f"{r['auc']:.5f}"] + [f"{r['tar_at_far'][far]:.4f}" for far in fars] +
                    [f"{r['best_threshold']:.3f}"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _verify(args: argparse.Namespace) -> int:
    from lvface.eval.verification import arcface_log_lines

    results = run_verify(args.checkpoint, args.bin, model=args.model, batch_size=args.batch, device=args.device)
    step = checkpoint_step(args.checkpoint)
    for name, result in results.items():  # the lines training logs, so one parser reads both
        for line in arcface_log_lines(name, step, result, result["accuracy"]):
            log.info("%s", line)
    log.info("verification (insightface 10-fold protocol, flip-sum embeddings)\n%s", format_verify_table(results))
    if args.json:
        atomic_write_json(args.json, results)
    return 0


# ----------------------------------------------------------------------------------------------
# eval ijbc
# ----------------------------------------------------------------------------------------------


def _ijbc(args: argparse.Namespace) -> int:
    from lvface.distributed import detect_launcher
    from lvface.checkpoint.files import load_backbone
    from lvface.eval.embed import build_model_fn, pick_device
    import numpy as np

    from lvface.eval.ijb_identification import read_identification_meta
    from lvface.eval.ijbc import evaluate_ijb, read_ijb_meta

    # a missing or corrupt meta file fails before the model loads
    meta = read_ijb_meta(args.root, args.name)
    identification = (read_identification_meta(args.root, meta.name, np.unique(meta.templates))
                      if args.protocol != "1:1" else None)
    rank, world_size, group, device = 0, 1, None, pick_device(args.device)
    if detect_launcher() != "single":
        from lvface.distributed import init_distributed

        info = init_distributed()
        rank, world_size, group = info.rank, info.world_size, info.group
        device = info.device if args.device == "auto" else device
    backbone = load_backbone(args.checkpoint, args.model)
    model_fn = build_model_fn(backbone.module, device)
    output_dir = args.output_dir or f"{args.name.lower()}_result"
    result = evaluate_ijb(model_fn, args.root, args.name, batch_size=args.batch, num_workers=args.workers,
                          flip=not args.no_flip, detector_score=not args.no_detector_score, rank=rank,
                          world_size=world_size, group=group, device=device, output_dir=output_dir,
                          label=args.label or backbone.variant, image_size=backbone.module.image_size,
                          meta=meta, protocol=args.protocol, identification=identification)
    if result is not None and args.json:
        atomic_write_json(args.json, result)
    return 0


# ----------------------------------------------------------------------------------------------
# embed
# ----------------------------------------------------------------------------------------------


def _embed(args: argparse.Namespace) -> int:
    from lvface.eval.embed import run_embed

    run_embed(args.checkpoint, args.input, args.output, model=args.model, batch_size=args.batch, flip=args.flip,
              num_workers=args.workers, device=args.device, landmarks_file=args.landmarks)
    return 0


def register(subparsers) -> None:
    """Add `eval` (verify, ijbc) and `embed` to the lvface command line."""
    evaluate = subparsers.add_parser("eval", help="evaluate a checkpoint: verify (.bin sets), ijbc (IJB-C / IJB-B)")
    eval_sub = evaluate.add_subparsers(dest="eval_command", required=True)

    verify = eval_sub.add_parser("verify", help="10-fold accuracy, AUC and TAR@FAR on insightface .bin sets")
    add_checkpoint_args(verify)
    verify.add_argument("--bin", nargs="+", required=True, help="verification .bin files (lfw.bin cfp_fp.bin ...)")
    verify.add_argument("--batch", type=int, default=64, help="images per forward pass")
    verify.add_argument("--json", default=None, help="also write the results as JSON here")
    verify.set_defaults(func=_verify)

    ijbc = eval_sub.add_parser("ijbc", help="IJB-C / IJB-B 1:1 verification (TAR at FAR 1e-6..1e-1, ROC plot) and "
                               "1:N identification (TPIR at FPIR 1e-2/1e-1, rank-1/5)")
    add_checkpoint_args(ijbc)
    ijbc.add_argument("--root", required=True, help="IJB folder holding meta/ and loose_crop/ (e.g. IJB_release/IJBC)")
    ijbc.add_argument("--name", default="IJBC", type=str.upper, choices=["IJBC", "IJBB"], help="which set")
    ijbc.add_argument("--protocol", default="1:1", choices=["1:1", "1:N", "both"],
                      help="1:1 template verification, 1:N open-set identification (needs meta/<name>_1N_*.csv), "
                           "or both from one embedding pass")
    ijbc.add_argument("--batch", type=int, default=128, help="faces per forward pass (x2 with the mirror images)")
    ijbc.add_argument("--workers", type=int, default=4, help="image-decoding worker processes per rank")
    ijbc.add_argument("--output-dir", default=None,
                      help="scores .npy, ROC .png and result .json (default ./<name>_result)")
    ijbc.add_argument("--label", default=None, help="row label in the table and plot (default: the variant)")
    ijbc.add_argument("--no-flip", action="store_true", help="do not add the mirror image's feature")
    ijbc.add_argument("--no-detector-score", action="store_true", help="do not weight features by the face score")
    ijbc.add_argument("--json", default=None, help="also write the result as JSON here")
    ijbc.set_defaults(func=_ijbc)

    embed = subparsers.add_parser("embed", help="aligned 112x112 face images -> embeddings (.npy or .parquet); "
                                  "other sizes are skipped and listed in <output>.skipped.txt unless --landmarks aligns them")
    add_checkpoint_args(embed)
    embed.add_argument("--input", required=True, help="folder of aligned images (recursive) or a list file")
    embed.add_argument("--output", required=True, help="out.npy (+ out.paths.txt) or out.parquet (path, embedding)")
    embed.add_argument("--batch", type=int, default=64, help="images per forward pass")
    embed.add_argument("--flip", action="store_true", help="add the mirror image's embedding before normalising")
    embed.add_argument("--workers", type=int, default=2, help="image-decoding worker processes")
    embed.add_argument("--landmarks", default=None,
                       help="file of '<image> x1 y1 ... x5 y5' lines (eyes, nose, mouth corners): those images are "
                            "aligned to the ArcFace template first, whatever their size")
    embed.set_defaults(func=_embed)
