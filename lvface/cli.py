"""The `lvface` console script.

    lvface synth --out demo_data                     # the embedded synthetic identities, as RecordIO + .bin
    lvface train --config configs/demo.yaml [k=v]    # one process (use the deepspeed launcher for more)
    lvface config show --config configs/demo.yaml [k=v]  # the resolved config, each key with its help
    lvface reindex data/train.rec                    # write train.idx again from the .rec
"""

from __future__ import annotations

import argparse
import logging
import sys


# Modules that add subcommands (reshard; eval, embed; export; pack, inspect; plot; config show; report).
COMMAND_MODULES: list[str] = ["lvface.checkpoint.manager", "lvface.eval.commands", "lvface.export", "lvface.data.pack",
                              "lvface.plot", "lvface.config_help", "lvface.report"]


def _synth(args: argparse.Namespace) -> int:
    from lvface.data.synthetic import describe_dataset, write_synthetic_dataset

    meta = write_synthetic_dataset(
        args.out, num_identities=args.identities, images_per_identity=args.images_per_identity,
        val_identities=args.val_identities, val_pairs=args.val_pairs, seed=args.seed,
    )
    print(describe_dataset(args.out, meta))
    return 0


def _reindex(args: argparse.Namespace) -> int:
    from lvface.data.recordio import build_index

    idx_path = build_index(args.rec, args.idx)
    with open(idx_path, "rb") as f:
        records = sum(1 for _ in f)
    print(f"wrote {idx_path}: {records} records of {args.rec}")
    return 0


def _train(rest: list[str]) -> int:
    from lvface.train import cli

    return cli(rest)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    parser = argparse.ArgumentParser(prog="lvface", description="LVFace training system")
    sub = parser.add_subparsers(dest="command", required=True)

    synth = sub.add_parser("synth", help="write the synthetic face-identity data set (train.rec/.idx, val.bin)")
    synth.add_argument("--out", required=True, help="output folder")
    synth.add_argument("--identities", type=int, default=300, help="training identities")
    synth.add_argument("--images-per-identity", type=int, default=20)
    synth.add_argument("--val-identities", type=int, default=100, help="held-out identities for val.bin")
    synth.add_argument("--val-pairs", type=int, default=600, help="verification pairs in val.bin")
    synth.add_argument("--seed", type=int, default=0)

    reindex = sub.add_parser("reindex", help="write a .rec's .idx again (key = record position, as MXNet and "
                             "insightface number records) when it is missing or belongs to another file")
    reindex.add_argument("rec", help="the .rec file")
    reindex.add_argument("--idx", default=None, help="the .idx to write (default: next to the .rec, same stem)")
    reindex.set_defaults(func=_reindex)

    sub.add_parser("train", help="train in this process: lvface train --config FILE [section.key=value ...] "
                   "(every key and its help: lvface config show)", add_help=False)
    # Other commands register themselves: each module has register(subparsers), setting args.func.
    import importlib

    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(sub)

    if argv and argv[0] == "train":
        return _train(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "synth":
        try:
            return _synth(args)
        except (ValueError, OSError) as exc:
            print(f"lvface synth: error: {exc}", file=sys.stderr)
            return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as exc:
        print(f"lvface {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
