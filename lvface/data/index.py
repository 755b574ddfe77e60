"""The record index: every image record of one or more RecordIO files, checked once and memory-mapped.

`RecordIndex.open(rec)` resolves a train.rec (next to its .idx) or a folder of `lvface pack` shards,
and holds per image: file, record offset, payload offset and length, label. The .idx of every file is
parsed once and the columns are cached as one .npy next to the data (or under ~/.cache/lvface when that
folder is read-only), keyed by the paths, sizes and mtimes of the files; every rank and DataLoader
worker maps the same pages.

Checks at open (each error names the file and the byte offset): an .idx entry past the end of its
.rec, a record that runs past the end of the file (truncated .rec), an .idx offset that is not a record
boundary, a record too short for its header, and a label outside [0, num_classes).
"""
from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
from pathlib import Path

import numpy as np

from lvface.config import ConfigError
from lvface.data.recordio import (IR_SIZE, RECORDIO_MAGIC, InsightFaceRecord, RecordIOError, decode_record,
                                  default_idx_path, frame_heads, read_u32, unpack)
from lvface.files import atomic_open

logger = logging.getLogger(__name__)

INDEX_VERSION = 1
INDEX_DTYPE = np.dtype([("offset", "<i8"), ("length", "<u4"), ("label", "<i4"), ("skip", "<u2"),
                        ("file", "<u2")])
"""One image record: record ``offset`` in file ``file``; the payload starts ``skip`` bytes after it and is
``length`` bytes long. ``skip`` 0 marks a multi-part record (read through ``decode_record``)."""


def resolve_rec_files(path: str | os.PathLike) -> list[str]:
    """The .rec files of ``path`` (``data.rec``): a file, a folder holding train.rec, or a folder of shards."""
    path = Path(path)
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        if (path / "train.rec").is_file():
            return [str(path / "train.rec")]
        shards = sorted(str(p) for p in path.glob("*.rec"))
        if shards:
            return shards
        raise FileNotFoundError(f"{path}: the folder holds no train.rec and no *.rec shards; give a RecordIO file "
                                f"or a folder written by `lvface pack`")
    raise FileNotFoundError(f"{path} not found: give a train.rec (next to its train.idx) or a folder of `lvface "
                            f"pack` shards (create data with `lvface synth --out DIR` or `lvface pack`)")


def _scan_file(rec_path: str, file_number: int, chunk: int = 1 << 20) -> tuple[np.ndarray, InsightFaceRecord]:
    """Index rows of the image records of one .rec, checking the framing of every record."""
    record = InsightFaceRecord(rec_path)  # checks .idx offsets against the file size; reads the labels
    buffer = np.frombuffer(record.reader.buffer, dtype=np.uint8)
    size = buffer.size
    rows = np.zeros(record.num_images, INDEX_DTYPE)
    rows["offset"] = record.image_offsets
    rows["label"] = record.labels
    rows["file"] = file_number
    for begin in range(0, record.num_images, chunk):
        offsets = record.image_offsets[begin:begin + chunk]
        magic, cflag, length = frame_heads(buffer, offsets)
        bad = np.flatnonzero(magic != RECORDIO_MAGIC)
        if bad.size:
            raise RecordIOError(
                f"{rec_path}: no record at offset {offsets[bad[0]]} (bad magic 0x{magic[bad[0]]:08x}): the .idx "
                f"does not point at record boundaries of this file; rebuild it with "
                f"`lvface reindex {rec_path}`")
        bad = np.flatnonzero(cflag > 1)
        if bad.size:
            raise RecordIOError(f"{rec_path}: the .idx points into the middle of a multi-part record at offset "
                                f"{offsets[bad[0]]}; rebuild it with `lvface reindex {rec_path}`")
        whole = cflag == 0
        end = offsets + 8 + length
        bad = np.flatnonzero(whole & (end > size))
        if bad.size:
            at = bad[0]
            raise RecordIOError(f"{rec_path}: the record at offset {offsets[at]} needs {length[at]} bytes but the "
                                f"file ends at {size}: the .rec is truncated (copy it again, or repack)")
        has_flag = whole & (length >= 4)
        flag = np.zeros(len(offsets), np.int64)
        flag[has_flag] = read_u32(buffer, offsets[has_flag] + 8)
        skip = 8 + IR_SIZE + 4 * flag
        payload = length - IR_SIZE - 4 * flag
        bad = np.flatnonzero(whole & (payload < 0))
        if bad.size:
            raise RecordIOError(f"{rec_path}: the record at offset {offsets[bad[0]]} ({length[bad[0]]} bytes) is "
                                f"too short for its image header; the file is corrupt")
        block = rows[begin:begin + chunk]
        block["skip"] = np.where(whole, skip, 0)
        block["length"] = np.where(whole, payload, 0)
        for row in np.flatnonzero(~whole):  # multi-part: walk it (raises on a truncated one)
            _, image = unpack(decode_record(buffer, int(offsets[row]), path=rec_path)[0])
            block["length"][row] = len(image)
    return rows, record


class RecordIndex:
    """Every image record of the training data, memory-mapped; payloads read from mapped files.

    Picklable (a DataLoader worker maps the files again on first use).
    """

    def __init__(self, files: list[str], rows: np.ndarray, num_classes: int):
        self.files = files
        self.rows = rows
        self.num_classes = int(num_classes)
        self._buffers: dict[int, mmap.mmap] = {}

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def open(cls, rec: str | os.PathLike, *, num_classes: int = 0, cache: bool = True) -> "RecordIndex":
        """Index ``rec`` (see ``resolve_rec_files``) and check it; ``num_classes`` 0 reads it from the data."""
        files = resolve_rec_files(rec)
        for path in files:
            if not os.path.isfile(default_idx_path(path)):
                raise FileNotFoundError(f"{default_idx_path(path)} not found next to {path}: every .rec needs its "
                                        f".idx; rebuild it with `lvface reindex {path}`")
        rows, meta = _load_cached(files) if cache else (None, None)
        if rows is None:
            rows, meta = cls._scan(files)
            if cache:
                rows = _store_cached(files, rows, meta)
        index = cls(files, rows, _num_classes(files, meta, num_classes))
        index.check_labels()
        return index

    @staticmethod
    def _scan(files: list[str]) -> tuple[np.ndarray, dict]:
        parts, header_classes = [], []
        for number, path in enumerate(files):
            rows, record = _scan_file(path, number)
            parts.append(rows)
            header_classes.append(record.num_classes if record.has_header else None)
            record.reader.close()
        rows = np.concatenate(parts) if parts else np.zeros(0, INDEX_DTYPE)
        meta = {"header_classes": header_classes,
                "max_label": int(rows["label"].max()) if len(rows) else -1}
        return rows, meta

    def check_labels(self) -> None:
        labels = self.rows["label"]
        bad = np.flatnonzero((labels < 0) | (labels >= self.num_classes))
        if bad.size:
            row = self.rows[bad[0]]
            raise RecordIOError(
                f"{self.files[row['file']]}: the record at offset {row['offset']} has label {row['label']}, outside "
                f"[0, num_classes={self.num_classes}) ({bad.size} such records); fix data.num_classes or the data")

    # -- access ------------------------------------------------------------------------------------
    @property
    def num_images(self) -> int:
        return len(self.rows)

    def labels(self, items: np.ndarray) -> np.ndarray:
        return self.rows["label"][np.asarray(items)].astype(np.int64)

    def where(self, item: int) -> str:
        """'FILE offset N' of an image, for messages."""
        row = self.rows[int(item)]
        return f"{self.files[row['file']]} offset {row['offset']}"

    def _buffer(self, file_number: int) -> np.ndarray:
        """The mapped file as a uint8 array (mapped once per process)."""
        buffer = self._buffers.get(file_number)
        if buffer is None:
            with open(self.files[file_number], "rb") as f:
                buffer = np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), dtype=np.uint8)
            self._buffers[file_number] = buffer
        return buffer

    def payload(self, item: int) -> np.ndarray:
        """The image bytes (uint8 array; a view of the mapped file for a single-part record)."""
        return self.payloads(np.array([item]))[0]

    def payloads(self, items: np.ndarray) -> list[np.ndarray]:
        """``payload`` of several images (one gather of their index rows)."""
        rows = self.rows[np.asarray(items)]
        out = []
        for offset, length, _, skip, file_number in rows.tolist():
            buffer = self._buffer(file_number)
            if skip:
                out.append(buffer[offset + skip:offset + skip + length])
            else:
                record, _ = decode_record(buffer, offset, path=self.files[file_number])
                out.append(np.frombuffer(unpack(record)[1], dtype=np.uint8))
        return out

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_buffers"] = {}
        return state


def _num_classes(files: list[str], meta: dict, configured: int) -> int:
    header_classes = [c for c in meta["header_classes"] if c is not None]
    if len(header_classes) == len(files) and len(set(header_classes)) == 1:
        found = header_classes[0]
        if configured and configured != found:
            raise ConfigError(f"data.num_classes is {configured} but {files[0]} holds {found} identities (its header "
                              f"record); set data.num_classes=0 to read it from the data")
        return found
    return configured or meta["max_label"] + 1  # headerless shards: labels 0..max (checked against it)


def _fingerprint(files: list[str]) -> str:
    parts = [INDEX_VERSION]
    for path in files:
        for p in (path, default_idx_path(path)):
            stat = os.stat(p)
            parts.append([os.path.abspath(p), stat.st_size, stat.st_mtime_ns])
    return hashlib.sha1(json.dumps(parts).encode()).hexdigest()[:20]


def _cache_paths(files: list[str]) -> list[Path]:
    key = _fingerprint(files)
    name = f"{Path(files[0]).stem}-{key}"
    return [Path(files[0]).parent / ".lvface-index" / name, Path.home() / ".cache" / "lvface" / "index" / name]


def _load_cached(files: list[str]) -> tuple[np.ndarray | None, dict | None]:
    for base in _cache_paths(files):
        meta_path = base.with_suffix(".json")
        if meta_path.is_file():
            try:
                meta = json.loads(meta_path.read_text())
                rows = np.load(base.with_suffix(".npy"), mmap_mode="r")
            except (OSError, ValueError) as error:
                logger.warning("ignoring the unreadable index cache %s: %s", base, error)
                continue
            if rows.dtype == INDEX_DTYPE:
                return rows, meta
    return None, None


def _store_cached(files: list[str], rows: np.ndarray, meta: dict) -> np.ndarray:
    """Write the index next to the data (else under ~/.cache); return it memory-mapped."""
    for base in _cache_paths(files):
        try:
            base.parent.mkdir(parents=True, exist_ok=True)
            with atomic_open(str(base.with_suffix(".npy"))) as f:
                np.save(f, rows)
            with atomic_open(str(base.with_suffix(".json")), "w") as f:
                json.dump(meta, f)
            return np.load(base.with_suffix(".npy"), mmap_mode="r")
        except OSError as error:
            logger.info("cannot cache the record index at %s (%s)", base, error)
    logger.warning("could not cache the record index of %s anywhere: every start will re-read the .idx", files[0])
    return rows
