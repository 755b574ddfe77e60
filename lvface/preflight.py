"""The run's input files, opened and their headers read before the process group or DeepSpeed starts.

A wrong path or a file of the wrong kind would otherwise surface only after distributed init and
DeepSpeed's op build (a minute or more), once per rank. Only headers are read here, so this costs
milliseconds on any data size: the first RecordIO frame and `.idx` line of each training file, the
pickle opening of each verification `.bin`, the existence of the checkpoint paths and the DeepSpeed
JSON. The full reads (the index, the images) stay with the loaders, which report what they find.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from lvface.config import Config, ConfigError
from lvface.data.index import resolve_rec_files
from lvface.data.recordio import RECORDIO_MAGIC, default_idx_path
from lvface.tracking import check_tracking

_PICKLE_STARTS = (b"\x80", b"(", b"]", b"}")  # protocol 2+ opcode, or a protocol 0/1 container


def _first_index_line(idx: str) -> tuple[int, int] | None:
    with open(idx, "rb") as handle:
        for line in handle:
            if line.strip():
                fields = line.split()
                try:
                    key, offset = (int(field) for field in fields)
                except ValueError:
                    raise ConfigError(f"{idx}: the first line is {line[:80]!r}, not 'key<TAB>offset': not a "
                                      f"RecordIO index") from None
                return key, offset
    return None


def check_rec(rec: str) -> None:
    """data.rec: each .rec and its .idx exist, the .idx starts with a key/offset line and the .rec has a
    RecordIO frame at that offset."""
    if not rec:
        raise ConfigError("data.rec is empty; set it to a train.rec file (next to its train.idx) or a folder of "
                          "`lvface pack` shards, or run `lvface synth --out DIR` first")
    try:
        files = resolve_rec_files(rec)
    except FileNotFoundError as error:
        raise ConfigError(f"data.rec={rec}: {error}") from None
    for path in files:
        idx = default_idx_path(path)
        if not os.path.isfile(idx):
            raise ConfigError(f"data.rec={rec}: {idx} not found next to {path}: every .rec needs its .idx")
        first = _first_index_line(idx)
        if first is None:
            raise ConfigError(f"data.rec={rec}: {idx} is empty")
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            handle.seek(first[1])
            head = handle.read(4)
        if first[1] + 8 > size or struct.unpack("<I", head)[0] != RECORDIO_MAGIC:
            raise ConfigError(f"data.rec={rec}: {path} has no RecordIO record at offset {first[1]}, where {idx} "
                              f"puts its first one: not a RecordIO file, or the .idx belongs to another .rec")


def check_bin(path: str) -> None:
    """One eval.bins entry: a readable file that opens like a pickle."""
    if not os.path.isfile(path):
        raise ConfigError(f"eval.bins: verification set {path} not found; give insightface .bin files "
                          f"(lfw.bin, ...) or eval.bins=[] to train without verification")
    with open(path, "rb") as handle:
        head = handle.read(1)
    if head not in _PICKLE_STARTS:
        raise ConfigError(f"eval.bins: {path} is not an insightface verification .bin (a pickle of images and "
                          f"pair labels): it starts with {head!r}")


def check_inputs(cfg: Config, ds_config: str | Path | None = None) -> None:
    """Every input of a training run that can be checked without a rank: raises ConfigError naming the key."""
    check_rec(cfg.data.rec)
    check_tracking(cfg.metrics)
    for path in cfg.eval.bins:
        check_bin(path)
    if cfg.checkpoint.init_backbone and not os.path.exists(cfg.checkpoint.init_backbone):
        raise ConfigError(f"checkpoint.init_backbone={cfg.checkpoint.init_backbone} not found")
    if cfg.checkpoint.resume not in ("", "auto") and not os.path.exists(cfg.checkpoint.resume):
        raise ConfigError(f"checkpoint.resume={cfg.checkpoint.resume} not found; give a checkpoint folder, 'auto' "
                          f"(the output folder's latest, if any) or '' (a fresh run)")
    if ds_config is not None:
        path = Path(ds_config)
        if not path.is_file():
            raise ConfigError(f"DeepSpeed config {path} not found; pass an existing JSON file to --ds_config")
        try:
            json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {error}") from None
