"""MXNet RecordIO (.rec/.idx), byte-compatible with MXNet, insightface and DALI; pure Python + numpy.

Framing of one record (dmlc-core ``recordio``, little endian):

    uint32 magic 0xced7230a | uint32 lrecord = (cflag << 29) | length | payload | zero pad to 4 bytes

cflag 0 is a whole record. dmlc's writer never lets the magic appear 4-byte aligned inside a payload
(a reader that resynchronises by scanning for the magic would stop there): it cuts the payload at each
such word, drops the word, and writes the pieces as parts cflag 1 (first), 2 (middle), 3 (last); the
reader puts the magic back between parts. ``encode_record`` does exactly that, so a payload without
an aligned magic (nearly all) is one cflag-0 record and the bytes match MXNet's writer either way.

The payload of an image record starts with MXNet's IRHeader ``<IfQQ`` (flag, label, id, id2). flag > 0
means ``flag`` float32 labels follow the header and the header's own label field is 0 (``pack``).
The index ``.idx`` is text, one ``key\\toffset\\n`` line per record.

insightface layout (``train.rec``): key 0 is a header record with flag 2 and label
(first_identity_key, end_identity_key); keys 1..N are images (flag 0, label = class id); keys
N+1..N+C are identity records, label (first_image_key, end_image_key) of class c = key - N - 1.
Labels are float32, exact only below 2**24; our writer also stores the two integers exactly in
id/id2 of the header and identity records, and the reader uses them when they agree with the labels.
"""
from __future__ import annotations

import array
import logging
import mmap
import os
import re
import struct
from typing import Iterable, Iterator, NamedTuple

import numpy as np

from lvface.files import atomic_open, temp_name

logger = logging.getLogger(__name__)

RECORDIO_MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", RECORDIO_MAGIC)
_LENGTH_BITS = 29
_LENGTH_MASK = (1 << _LENGTH_BITS) - 1
IR_FORMAT = "<IfQQ"
IR_SIZE = struct.calcsize(IR_FORMAT)  # 24
_FLOAT32_EXACT = 1 << 24  # float32 holds every integer below this exactly


class RecordIOError(ValueError):
    """A .rec or .idx file is malformed; the message names the file, the offset and the fix."""


class IRHeader(NamedTuple):
    """MXNet's image record header. ``label`` is a float, or a float32 array when ``flag`` > 0."""

    flag: int
    label: float | np.ndarray
    id: int
    id2: int


# ----------------------------------------------------------------------------------------------
# IRHeader pack / unpack
# ----------------------------------------------------------------------------------------------


def pack(header: IRHeader | tuple, payload: bytes) -> bytes:
    """IRHeader + payload -> record bytes, as ``mx.recordio.pack``.

    A scalar label is stored in the header (flag 0, whatever ``header.flag`` says); an array label
    is written as ``flag = label.size`` float32 values after the header, with the header label 0.
    """
    header = IRHeader(*header)
    if np.ndim(header.label) == 0:
        head = struct.pack(IR_FORMAT, 0, float(header.label), int(header.id), int(header.id2))
        return head + bytes(payload)
    labels = np.asarray(header.label, dtype="<f4").ravel()
    head = struct.pack(IR_FORMAT, labels.size, 0.0, int(header.id), int(header.id2))
    return head + labels.tobytes() + bytes(payload)


def unpack(record: bytes | memoryview) -> tuple[IRHeader, bytes]:
    """Record bytes -> (IRHeader, payload), as ``mx.recordio.unpack``.

    With flag > 0 the header's label is the float32 array of ``flag`` labels that follows it.
    """
    record = memoryview(record)
    if len(record) < IR_SIZE:
        raise RecordIOError(
            f"record of {len(record)} bytes is shorter than the {IR_SIZE}-byte IRHeader; "
            "it is not an MXNet image record")
    flag, label, key_id, key_id2 = struct.unpack_from(IR_FORMAT, record, 0)
    payload_start = IR_SIZE
    if flag > 0:
        payload_start += 4 * flag
        if payload_start > len(record):
            raise RecordIOError(
                f"IRHeader says {flag} float32 labels follow it, but the record has only "
                f"{len(record) - IR_SIZE} bytes after the header")
        label = np.frombuffer(record[IR_SIZE:payload_start], dtype="<f4").astype(np.float32)
    return IRHeader(flag, label, key_id, key_id2), bytes(record[payload_start:])


# ----------------------------------------------------------------------------------------------
# record framing
# ----------------------------------------------------------------------------------------------


def _lrecord(cflag: int, length: int) -> bytes:
    return struct.pack("<II", RECORDIO_MAGIC, (cflag << _LENGTH_BITS) | length)


def split_lrecord(lrecord):
    """(cflag, length) of a frame's second word; Python ints and numpy uint32 arrays alike."""
    return lrecord >> _LENGTH_BITS, lrecord & _LENGTH_MASK


def frame_size(length: int) -> int:
    """Bytes of a frame that holds ``length`` record bytes: magic, lrecord, the bytes, zero pad to 4."""
    return 8 + length + (-length % 4)


def read_u32(buffer: np.ndarray, at: np.ndarray) -> np.ndarray:
    """The little-endian uint32 at each offset ``at`` of a uint8 buffer (vectorised)."""
    return buffer[np.asarray(at)[:, None] + np.arange(4)].view("<u4")[:, 0]


def frame_heads(buffer: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(magic, cflag, length as int64) of the frames at ``offsets`` of a uint8 buffer (each offset + 8
    within it): what a scan checks before trusting an .idx offset, without a Python loop per record."""
    cflag, length = split_lrecord(read_u32(buffer, offsets + 4))
    return read_u32(buffer, offsets), cflag, length.astype(np.int64)


def _aligned_magic_positions(record: bytes) -> list[int]:
    """Offsets i % 4 == 0 where the magic word sits in ``record`` (dmlc's writer cuts there)."""
    positions = []
    start = record.find(_MAGIC_BYTES)
    while start != -1:
        if start % 4 == 0:
            positions.append(start)
            start = record.find(_MAGIC_BYTES, start + 4)
        else:
            start = record.find(_MAGIC_BYTES, start + 1)
    return positions


def encode_record(record: bytes) -> bytes:
    """Frame one record for a .rec file, byte for byte as dmlc's ``RecordIOWriter::WriteRecord``."""
    record = bytes(record)
    if len(record) > _LENGTH_MASK:
        raise RecordIOError(f"a RecordIO record holds at most 2**29-1 bytes, got {len(record)}")
    pieces = []
    part_start = 0
    for cut in _aligned_magic_positions(record):
        pieces.append(_lrecord(1 if part_start == 0 else 2, cut - part_start))
        pieces.append(record[part_start:cut])  # whole words: no padding between parts
        part_start = cut + 4
    pieces.append(_lrecord(3 if part_start else 0, len(record) - part_start))
    pieces.append(record[part_start:])
    pieces.append(b"\0" * (-len(record) % 4))
    return b"".join(pieces)


def decode_record(buffer, offset: int, *, path: str = "<buffer>") -> tuple[bytes, int]:
    """Read the (possibly multi-part) record framed at ``offset`` -> (record bytes, next offset)."""
    size = len(buffer)
    parts = []
    position = offset
    while True:
        if position + 8 > size:
            raise RecordIOError(
                f"{path}: record at offset {offset} runs past the end of the file ({size} bytes) "
                f"at offset {position}; the file is truncated, or the .idx belongs to another "
                f".rec (rebuild it with `lvface reindex {path}`)")
        magic, lrecord = struct.unpack_from("<II", buffer, position)
        if magic != RECORDIO_MAGIC:
            raise RecordIOError(
                f"{path}: bad magic 0x{magic:08x} at offset {position} (expected "
                f"0x{RECORDIO_MAGIC:08x}); the file is corrupt or the .idx points inside a record "
                f"(rebuild it with `lvface reindex {path}`)")
        cflag, length = split_lrecord(lrecord)
        first = position == offset
        if (first and cflag not in (0, 1)) or (not first and cflag not in (2, 3)):
            raise RecordIOError(
                f"{path}: record part at offset {position} has continuation flag {cflag}, which "
                f"cannot {'start' if first else 'continue'} a record; the file is corrupt")
        start = position + 8
        if start + length > size:
            raise RecordIOError(
                f"{path}: record at offset {offset} needs {length} bytes at offset {start} but the "
                f"file ends at {size}; the file is truncated")
        parts.append(buffer[start:start + length])
        position += frame_size(length)
        if cflag in (0, 3):
            break
        parts.append(_MAGIC_BYTES)
    record = parts[0] if len(parts) == 1 else b"".join(parts)
    return bytes(record), position


def iter_records(rec_path: str) -> Iterator[tuple[int, bytes]]:
    """Yield (offset, record bytes) for every record of a .rec, in file order."""
    with open(rec_path, "rb") as f, _map_file(f) as buffer:
        offset = 0
        while offset < len(buffer):
            record, next_offset = decode_record(buffer, offset, path=rec_path)
            yield offset, record
            offset = next_offset


class _EmptyMap(bytes):
    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def _map_file(f):
    """Read-only mmap of an open file (an empty file cannot be mapped: an empty buffer instead)."""
    if os.fstat(f.fileno()).st_size == 0:
        return _EmptyMap()
    return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


# ----------------------------------------------------------------------------------------------
# .idx files
# ----------------------------------------------------------------------------------------------


def default_idx_path(rec_path: str) -> str:
    """``x/train.rec`` -> ``x/train.idx`` (the name MXNet and insightface expect)."""
    return os.path.splitext(rec_path)[0] + ".idx"


def _parse_idx(idx_path: str) -> tuple[np.ndarray, np.ndarray]:
    """Parse ``key\toffset`` lines -> (keys, offsets) int64 arrays in file order."""
    with open(idx_path, "rb") as f:
        text = f.read()
    body = text.strip()
    if not body:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    num_lines = body.count(b"\n") + 1
    try:  # fast path: integers separated by whitespace, two per line
        values = np.fromstring(body, dtype=np.int64, sep=" ")
    except ValueError:
        values = None
    if values is None or values.size != 2 * num_lines:  # blank lines, or an error to locate
        pairs = []
        for line_number, line in enumerate(body.split(b"\n"), start=1):
            fields = line.split()
            if not fields:
                continue
            try:
                key, offset = (int(field) for field in fields)
            except ValueError:
                raise RecordIOError(
                    f"{idx_path}: line {line_number} is {line[:80]!r}, expected 'key<TAB>offset'; "
                    f"rebuild the index with `lvface reindex <the .rec>`") from None
            pairs.append((key, offset))
        values = np.array(pairs, dtype=np.int64).reshape(-1)
    pairs = values.reshape(-1, 2)
    return pairs[:, 0].copy(), pairs[:, 1].copy()


def _write_idx_atomic(idx_path: str, keys: Iterable[int], offsets: Iterable[int]) -> None:
    with atomic_open(idx_path, "w", encoding="ascii", newline="\n") as f:
        f.writelines(f"{int(key)}\t{int(offset)}\n" for key, offset in zip(keys, offsets))


def build_index(rec_path: str, idx_path: str | None = None) -> str:
    """Scan ``rec_path`` and write its .idx (key = position of the record in the file: 0, 1, ...).

    That is the key MXNet's ``MXIndexedRecordIO`` and insightface give records written in order.
    Returns the .idx path.
    """
    if not os.path.isfile(rec_path):
        raise FileNotFoundError(f"no such file {rec_path!r}: cannot build an index for it")
    idx_path = idx_path or default_idx_path(rec_path)
    offsets = array.array("q")
    try:
        offsets.extend(offset for offset, _ in iter_records(rec_path))
    except RecordIOError as error:
        # the scan reads the .rec alone, so the reader's advice to re-index does not apply here
        reason = re.sub(r",? ?(or the \.idx[^;(]*)?\(?rebuild it with `lvface reindex [^`]*`\)?", "", str(error))
        raise RecordIOError(f"{rec_path} itself is damaged after {len(offsets)} intact records, so no index "
                            f"can be built for it: {reason}. Copy or write the .rec again (lvface pack, "
                            f"lvface synth)") from None
    _write_idx_atomic(idx_path, range(len(offsets)), offsets)
    logger.info("indexed %d records of %s into %s", len(offsets), rec_path, idx_path)
    return idx_path


# ----------------------------------------------------------------------------------------------
# writer
# ----------------------------------------------------------------------------------------------


class RecordIOWriter:
    """Write a .rec and its .idx; both appear under their final names only on a clean close.

    Records go to temporary files next to the targets; ``close()`` (or leaving the ``with`` block
    normally) flushes, fsyncs and renames both into place; an exception inside the block, or
    ``abort()``, deletes the temporary files and leaves any previous files untouched.
    """

    def __init__(self, rec_path: str, idx_path: str | None = None):
        self.rec_path = os.fspath(rec_path)
        self.idx_path = os.fspath(idx_path) if idx_path is not None else default_idx_path(self.rec_path)
        self._rec_tmp = temp_name(self.rec_path)
        self._idx_tmp = temp_name(self.idx_path)
        self._rec_file = open(self._rec_tmp, "xb")
        self._idx_file = open(self._idx_tmp, "x", encoding="ascii", newline="\n")
        self._keys = array.array("q")  # checked for duplicates at close (a set would not scale)
        self._position = 0
        self._open = True

    def write(self, key: int, record: bytes) -> int:
        """Append one record (IRHeader + payload, see ``pack``) under ``key``; returns its offset."""
        if not self._open:
            raise RecordIOError(f"{self.rec_path}: writer is closed")
        key = int(key)
        framed = encode_record(record)
        offset = self._position
        self._rec_file.write(framed)
        self._idx_file.write(f"{key}\t{offset}\n")
        self._keys.append(key)
        self._position += len(framed)
        return offset

    def write_record(self, key: int, header: IRHeader | tuple, payload: bytes) -> int:
        """``write(key, pack(header, payload))``."""
        return self.write(key, pack(header, payload))

    def _overwrite(self, offset: int, record: bytes) -> None:
        """Replace the record written at ``offset`` by one of exactly the same framed size."""
        framed = encode_record(record)
        self._rec_file.flush()
        with open(self._rec_tmp, "rb") as f:
            f.seek(offset)
            magic, lrecord = struct.unpack("<II", f.read(8))
        cflag, old_length = split_lrecord(lrecord)
        if magic != RECORDIO_MAGIC or cflag != 0 or len(framed) != frame_size(old_length):
            raise RecordIOError(f"{self.rec_path}: the record at offset {offset} cannot be replaced "
                                "in place by one of another size")
        self._rec_file.seek(offset)
        self._rec_file.write(framed)
        self._rec_file.seek(0, os.SEEK_END)

    def close(self) -> None:
        """Check the keys, flush, fsync and rename both files into place."""
        if not self._open:
            return
        self._open = False
        try:
            keys = np.frombuffer(self._keys, dtype=np.int64) if self._keys else np.zeros(0, np.int64)
            unique_keys, counts = np.unique(keys, return_counts=True)
            if unique_keys.size != keys.size:
                raise RecordIOError(f"{self.rec_path}: key {unique_keys[counts > 1][0]} was written "
                                    "more than once; keys must be unique (nothing was written)")
            for f in (self._rec_file, self._idx_file):
                f.flush()
                os.fsync(f.fileno())
                f.close()
            os.replace(self._rec_tmp, self.rec_path)
            os.replace(self._idx_tmp, self.idx_path)
        except BaseException:
            self._discard()
            raise

    def abort(self) -> None:
        """Discard everything written; the final paths are not touched."""
        if self._open:
            self._open = False
            self._discard()

    def _discard(self) -> None:
        self._rec_file.close()
        self._idx_file.close()
        self._remove_temps()

    def _remove_temps(self) -> None:
        for tmp_path in (self._rec_tmp, self._idx_tmp):
            if os.path.exists(tmp_path):
                os.unlink(tmp_path)

    def __len__(self) -> int:
        return len(self._keys)

    def __enter__(self) -> "RecordIOWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self) -> None:
        if getattr(self, "_open", False):
            self.abort()


# ----------------------------------------------------------------------------------------------
# reader
# ----------------------------------------------------------------------------------------------


class RecordIOReader:
    """Random access to a .rec through its .idx; the .rec is memory-mapped, lazily, per process.

    Pickling drops the mapping (a DataLoader worker maps the file again on first read).
    """

    def __init__(self, rec_path: str, idx_path: str | None = None):
        self.rec_path = os.fspath(rec_path)
        if not os.path.isfile(self.rec_path):
            raise FileNotFoundError(f"no such file {self.rec_path!r}: the RecordIO file is missing")
        self.idx_path = os.fspath(idx_path) if idx_path is not None else default_idx_path(self.rec_path)
        if not os.path.isfile(self.idx_path):
            raise FileNotFoundError(
                f"{self.idx_path} not found next to {self.rec_path}: every .rec needs its .idx; "
                f"rebuild it with `lvface reindex {self.rec_path}`")
        self._keys, self._offsets = _parse_idx(self.idx_path)
        self.file_size = os.path.getsize(self.rec_path)
        if len(np.unique(self._keys)) != len(self._keys):
            raise RecordIOError(f"{self.idx_path}: the same key appears twice; rebuild the index "
                                f"with `lvface reindex {self.rec_path}`")
        bad = np.flatnonzero((self._offsets < 0) | (self._offsets + 8 > self.file_size))
        if bad.size:
            raise RecordIOError(
                f"{self.rec_path}: key {self._keys[bad[0]]} is at offset {self._offsets[bad[0]]}, "
                f"past the end of the file ({self.file_size} bytes); the .rec is truncated or "
                f"{self.idx_path} belongs to another file (rebuild it with "
                f"`lvface reindex {self.rec_path}`)")
        # key -> row: direct when keys are 0..n-1 in order (the usual case), else a sorted lookup
        self._dense = bool(np.array_equal(self._keys, np.arange(len(self._keys))))
        self._sorted_rows = None if self._dense else np.argsort(self._keys, kind="stable")
        self._file = None
        self._buffer = None

    # -- lazily mapped buffer, re-opened after pickling ---------------------------------------
    @property
    def buffer(self):
        if self._buffer is None:
            self._file = open(self.rec_path, "rb")
            self._buffer = _map_file(self._file)
        return self._buffer

    def close(self) -> None:
        if self._buffer is not None:
            self._buffer.close()
            self._file.close()
        self._buffer = self._file = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_file"] = state["_buffer"] = None
        return state

    def __enter__(self) -> "RecordIOReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- index ---------------------------------------------------------------------------------
    @property
    def keys(self) -> np.ndarray:
        """Keys in .idx order (int64)."""
        return self._keys

    @property
    def offsets(self) -> np.ndarray:
        """Byte offsets in .idx order (int64), aligned with ``keys``."""
        return self._offsets

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: int) -> bool:
        return self._row(int(key), missing_ok=True) is not None

    def _row(self, key: int, missing_ok: bool = False):
        if self._dense:
            if 0 <= key < len(self._keys):
                return key
        else:
            position = np.searchsorted(self._keys, key, sorter=self._sorted_rows)
            if position < len(self._keys) and self._keys[self._sorted_rows[position]] == key:
                return int(self._sorted_rows[position])
        if missing_ok:
            return None
        raise KeyError(f"key {key} is not in {self.idx_path}")

    def offset_of(self, key: int) -> int:
        return int(self._offsets[self._row(int(key))])

    def offsets_of(self, keys: np.ndarray) -> np.ndarray:
        """Vectorised ``offset_of`` for an int array of keys."""
        keys = np.asarray(keys, dtype=np.int64)
        if self._dense:
            if keys.size and (keys.min() < 0 or keys.max() >= len(self._keys)):
                raise KeyError(f"some keys are not in {self.idx_path}")
            return self._offsets[keys]
        positions = np.searchsorted(self._keys, keys, sorter=self._sorted_rows)
        positions = np.minimum(positions, len(self._keys) - 1)
        rows = self._sorted_rows[positions]
        if not np.array_equal(self._keys[rows], keys):
            raise KeyError(f"some keys are not in {self.idx_path}")
        return self._offsets[rows]

    # -- records -------------------------------------------------------------------------------
    def read(self, key: int) -> bytes:
        """The record stored under ``key`` (IRHeader + payload, see ``unpack``)."""
        return self.read_at(self.offset_of(key))

    def read_at(self, offset: int) -> bytes:
        return decode_record(self.buffer, int(offset), path=self.rec_path)[0]

    def read_unpacked(self, key: int) -> tuple[IRHeader, bytes]:
        try:
            return unpack(self.read(key))
        except RecordIOError as error:
            if self.rec_path in str(error):
                raise
            raise RecordIOError(f"{self.rec_path}: key {key}: {error}") from error


# ----------------------------------------------------------------------------------------------
# insightface layout
# ----------------------------------------------------------------------------------------------


class RecordLayout(NamedTuple):
    """What ``write_insightface_rec`` wrote."""

    rec_path: str
    idx_path: str
    num_images: int
    num_classes: int


def _insightface_paths(prefix_or_dir: str) -> tuple[str, str]:
    prefix_or_dir = os.fspath(prefix_or_dir)
    if os.path.isdir(prefix_or_dir) or prefix_or_dir.endswith(os.sep):
        prefix = os.path.join(prefix_or_dir, "train")
    elif prefix_or_dir.endswith(".rec"):
        prefix = prefix_or_dir[:-4]
    else:
        prefix = prefix_or_dir
    return prefix + ".rec", prefix + ".idx"


def _range_header(first: int, end: int) -> IRHeader:
    """A record whose labels are a key range; exact copies of the two integers go in id/id2."""
    return IRHeader(2, np.array([first, end], dtype=np.float32), first, end)


def write_insightface_rec(prefix_or_dir: str, samples: Iterable[tuple[int, bytes]]) -> RecordLayout:
    """Write ``train.rec``/``train.idx`` in insightface's layout from (label, jpeg bytes) samples.

    ``prefix_or_dir`` is a directory (files ``train.rec``/``train.idx`` in it) or a path prefix
    (``prefix.rec``/``prefix.idx``). Samples must come grouped by label with labels 0, 1, 2, ...
    in ascending order without gaps (the label indexes the classifier, and identity record
    N+1+c describes class c). ``samples`` may be a generator; it is read once.
    """
    rec_path, idx_path = _insightface_paths(prefix_or_dir)
    class_starts: list[int] = []  # first image key of each class
    with RecordIOWriter(rec_path, idx_path) as writer:
        # Placeholder header: same framed size as the final one, patched once N and C are known.
        header_offset = writer.write_record(0, _range_header(0, 0), b"")
        key = 0
        for key, (label, jpeg) in enumerate(samples, start=1):
            label = int(label)
            if label != len(class_starts) - 1:
                if label != len(class_starts):
                    previous = len(class_starts) - 1
                    raise ValueError(
                        f"write_insightface_rec({rec_path}): sample {key - 1} has label {label} "
                        f"after label {previous}; samples must be grouped by label in ascending "
                        f"order 0, 1, 2, ... without gaps (expected {previous} or {previous + 1})")
                class_starts.append(key)
            writer.write_record(key, IRHeader(0, float(label), key, 0), jpeg)
        num_images, num_classes = key, len(class_starts)
        if num_classes >= _FLOAT32_EXACT:
            raise ValueError(f"{num_classes} classes: float32 labels are exact only below 2**24")
        first_identity_key = num_images + 1
        class_ends = class_starts[1:] + [num_images + 1]
        for class_id, (first, end) in enumerate(zip(class_starts, class_ends)):
            writer.write_record(first_identity_key + class_id, _range_header(first, end), b"")
        header = _range_header(first_identity_key, first_identity_key + num_classes)
        writer._overwrite(header_offset, pack(header, b""))
    logger.info("wrote %s: %d images, %d classes", rec_path, num_images, num_classes)
    return RecordLayout(rec_path, idx_path, num_images, num_classes)


def _exact_range(header: IRHeader) -> tuple[int, int]:
    """(first, end) of a range record: id/id2 when they agree with the float32 labels, else labels."""
    labels = np.asarray(header.label, dtype=np.float32).ravel()
    if labels.size < 2:
        raise RecordIOError(f"range record has {labels.size} labels, expected 2")
    if (np.float32(header.id) == labels[0] and np.float32(header.id2) == labels[1]
            and header.id <= header.id2):
        return int(header.id), int(header.id2)
    return int(labels[0]), int(labels[1])


class InsightFaceRecord:
    """Image records of an insightface ``train.rec`` (or of a plain .rec with no header record).

    With a header (key 0, flag > 0) the images are keys 1 .. first_identity_key-1, as insightface's
    ``MXFaceDataset`` reads them; without one every key in the .idx is an image, in .idx order.
    Labels are class ids (int64), read once from the records' headers and cached. Picklable: the
    reader maps the file again in the process that unpickles it.
    """

    def __init__(self, rec_path: str, idx_path: str | None = None):
        self.reader = RecordIOReader(rec_path, idx_path)
        self.rec_path = self.reader.rec_path
        self.has_header = False
        self.identity_keys = (0, 0)  # [first, end) keys of the identity records
        if 0 in self.reader:
            header, _ = self.reader.read_unpacked(0)
            self.has_header = header.flag > 0
        if self.has_header:
            first_identity, end_identity = _exact_range(header)
            self.identity_keys = (first_identity, end_identity)
            self.image_keys = np.arange(1, first_identity, dtype=np.int64)
            self.num_classes = end_identity - first_identity
        else:
            self.image_keys = self.reader.keys.copy()
        try:
            self.image_offsets = self.reader.offsets_of(self.image_keys)
        except KeyError:
            raise RecordIOError(
                f"{self.rec_path}: the header record says the images are keys 1..{len(self.image_keys)}"
                f" but {self.reader.idx_path} lacks some of them; rebuild it with "
                f"`lvface reindex {self.rec_path}`") from None
        self.labels = self._read_labels()
        if not self.has_header:
            self.num_classes = int(self.labels.max()) + 1 if self.labels.size else 0

    @property
    def num_images(self) -> int:
        return len(self.image_keys)

    def __len__(self) -> int:
        return len(self.image_keys)

    def __getitem__(self, index: int) -> tuple[bytes, int]:
        """(jpeg bytes, class id) of image ``index`` (0-based position in ``image_keys``)."""
        record = self.reader.read_at(self.image_offsets[index])
        _, payload = unpack(record)
        return payload, int(self.labels[index])

    def identity_range(self, class_id: int) -> tuple[int, int]:
        """[first, end) image keys of ``class_id``, from its identity record (needs a header)."""
        if not self.has_header:
            raise RecordIOError(f"{self.rec_path} has no insightface header: no identity records")
        header, _ = self.reader.read_unpacked(self.identity_keys[0] + int(class_id))
        return _exact_range(header)

    def _read_labels(self, chunk: int = 1 << 20) -> np.ndarray:
        """Class id of every image: gathered straight from the mapped headers, chunk by chunk.

        Each record starts magic(4) lrecord(4) flag(4) label(4): the class id is the float32 at
        +12, or the first of the label array at +32 when flag > 0 (insightface takes label[0]).
        Records too short, multi-part before the labels, or near the end fall back to ``unpack``.
        """
        buffer = np.frombuffer(self.reader.buffer, dtype=np.uint8)
        labels = np.empty(len(self.image_keys), dtype=np.int64)
        word = np.arange(4)
        for start in range(0, len(self.image_keys), chunk):
            offsets = self.image_offsets[start:start + chunk]
            fast = offsets + 36 <= buffer.size
            safe = np.where(fast, offsets, 0)
            magic, cflag, length = frame_heads(buffer, safe)
            flag = read_u32(buffer, safe + 8)
            fast &= (magic == RECORDIO_MAGIC) & (length >= IR_SIZE + 4 * np.minimum(flag, 1))
            fast &= (cflag == 0) | ((cflag == 1) & (length >= IR_SIZE + 4))
            label_at = np.where(flag > 0, 8 + IR_SIZE, 12)
            values = buffer[(safe + label_at)[:, None] + word].view("<f4")[:, 0]
            chunk_labels = values.astype(np.int64)
            for row in np.flatnonzero(~fast):
                header, _ = unpack(self.reader.read_at(offsets[row]))
                chunk_labels[row] = int(np.asarray(header.label).ravel()[0])
            labels[start:start + chunk] = chunk_labels
        return labels


def write_image_only_index(rec_path: str, out_idx: str, idx_path: str | None = None) -> str:
    """Write an .idx listing only the image records of ``rec_path`` (for DALI's MXNet reader).

    DALI's ``readers.mxnet`` turns every .idx line into a sample (header and identity records
    included, which hold no image), so give it this index. Keys and offsets are unchanged.
    """
    record = InsightFaceRecord(rec_path, idx_path)
    _write_idx_atomic(out_idx, record.image_keys, record.image_offsets)
    record.reader.close()
    return out_idx
