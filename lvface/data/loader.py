"""Training data: the record index, the loader contract, and the torch DataLoader fallback.

``build_train_loader`` is what the trainer calls. It opens the data as a ``RecordIndex`` (every image
record of one or more RecordIO files: file, offset, payload, label), checks it at start, and returns a
``TrainLoader``: ``DaliTrainLoader`` (lvface/data/dali.py) when DALI is installed or asked for, else
``TorchTrainLoader`` here. Both read the same samples in the same order (``GlobalOrder``: an exact
permutation per epoch, sliced by rank, resumable from a global position on any world size), apply the
same augmentation parameters (``AugmentSpec.draw``), replace an undecodable image the same way, and
return normalised float images and int64 labels on the training device.

The index is memory-mapped: the .idx of every file is parsed once and the per-image columns (offset,
payload length, label, file) are cached as one .npy next to the data (or under ~/.cache/lvface when that
folder is read-only), keyed by the paths, sizes and mtimes of the files; every rank and DataLoader
worker maps the same pages.

Checks at start (each error names the file and the byte offset): an .idx entry past the end of its .rec,
a record that runs past the end of the file (truncated .rec), an .idx offset that is not a record
boundary, a record too short for its header, and a label outside [0, num_classes). A JPEG that fails
to decode during training is not an error: it is skipped and replaced (``TrainLoader._replacement``),
counted in ``bad_records`` and logged with its file and offset.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import mmap
import os
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, get_worker_info

from lvface.config import ConfigError
from lvface.data.augment import IMAGE_SIZE, AugmentParams, AugmentSpec, apply_torch, flip_chw
from lvface.data.recordio import (IR_SIZE, RECORDIO_MAGIC, InsightFaceRecord, RecordIOError, atomic_open,
                                  decode_record, default_idx_path, unpack)
from lvface.data.sampler import GlobalOrder
from lvface.eval.verification import normalize_images

logger = logging.getLogger(__name__)

INDEX_VERSION = 1
INDEX_DTYPE = np.dtype([("offset", "<i8"), ("length", "<u4"), ("label", "<i4"), ("skip", "<u2"),
                        ("file", "<u2")])
"""One image record: record ``offset`` in file ``file``; the payload starts ``skip`` bytes after it and is
``length`` bytes long. ``skip`` 0 marks a multi-part record (read through ``decode_record``)."""
MAX_REPLACEMENT_TRIES = 1024
_LENGTH_MASK = (1 << 29) - 1


# --------------------------------------------------------------------------------------------------
# the record index
# --------------------------------------------------------------------------------------------------


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


def _u32(buffer: np.ndarray, at: np.ndarray) -> np.ndarray:
    return buffer[at[:, None] + np.arange(4)].view("<u4")[:, 0]


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
        magic, lrecord = _u32(buffer, offsets), _u32(buffer, offsets + 4)
        bad = np.flatnonzero(magic != RECORDIO_MAGIC)
        if bad.size:
            raise RecordIOError(
                f"{rec_path}: no record at offset {offsets[bad[0]]} (bad magic 0x{magic[bad[0]]:08x}): the .idx "
                f"does not point at record boundaries of this file; rebuild it with "
                f"lvface.data.recordio.build_index({rec_path!r})")
        cflag, length = lrecord >> 29, (lrecord & _LENGTH_MASK).astype(np.int64)
        bad = np.flatnonzero(cflag > 1)
        if bad.size:
            raise RecordIOError(f"{rec_path}: the .idx points into the middle of a multi-part record at offset "
                                f"{offsets[bad[0]]}; rebuild it with lvface.data.recordio.build_index({rec_path!r})")
        whole = cflag == 0
        end = offsets + 8 + length
        bad = np.flatnonzero(whole & (end > size))
        if bad.size:
            at = bad[0]
            raise RecordIOError(f"{rec_path}: the record at offset {offsets[at]} needs {length[at]} bytes but the "
                                f"file ends at {size}: the .rec is truncated (copy it again, or repack)")
        has_flag = whole & (length >= 4)
        flag = np.zeros(len(offsets), np.int64)
        flag[has_flag] = _u32(buffer, offsets[has_flag] + 8)
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
                                        f".idx; rebuild it with lvface.data.recordio.build_index({path!r})")
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


# --------------------------------------------------------------------------------------------------
# decoding (the torch path) and a cheap completeness check (both paths)
# --------------------------------------------------------------------------------------------------


def looks_complete(payload: np.ndarray) -> bool:
    """False for an empty payload or a JPEG without its end marker (truncated); other bytes pass to the
    decoder, which has the last word. Saves DALI a failed batch for the common corruptions."""
    if len(payload) < 4:
        return False
    if payload[0] == 0xFF and payload[1] == 0xD8:
        if payload[-1] == 0xD9 and payload[-2] == 0xFF:
            return True
        return bytes(payload[-16:]).rstrip(b"\0").endswith(b"\xff\xd9")  # zero padding after the marker
    return True


def decode_image(payload: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray | None:
    """RGB uint8 (size, size, 3) from image bytes (PIL), or None when they do not decode."""
    if not looks_complete(payload):
        return None
    try:
        with Image.open(io.BytesIO(payload)) as image:
            image = image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    return np.asarray(image)


# --------------------------------------------------------------------------------------------------
# the loader contract
# --------------------------------------------------------------------------------------------------


class TrainLoader:
    """Batches of one rank: ``for epoch: loader.set_epoch(epoch); for images, labels in loader``.

    images: float32 (B, 3, 112, 112) normalised (x / 255 - 0.5) / 0.5 on ``device``; labels: int64 (B,).
    ``start_sample`` (global samples of the first epoch already consumed, from ``position()`` of the
    run that saved it, on any world size) applies to the first pass only.
    """

    def __init__(self, index: RecordIndex, data_cfg, *, rank: int, world_size: int, seed: int,
                 device: torch.device, start_sample: int = 0):
        self.index = index
        self.spec = AugmentSpec.from_config(data_cfg)
        self.order = GlobalOrder(index.num_images, seed=seed, batch_size=data_cfg.batch_size,
                                 world_size=world_size, rank=rank)
        if self.order.batches_per_epoch == 0:
            raise ConfigError(f"{index.files[0]}: {index.num_images} images give no batch of data.batch_size="
                              f"{data_cfg.batch_size} per rank on {world_size} ranks: lower data.batch_size")
        self.order.check_start(start_sample)
        self.seed = int(seed)
        self.device = torch.device(device)
        self.epoch = 0
        self._start = self._first_start = self._position = int(start_sample)
        self.bad_records = 0

    num_images = property(lambda self: self.index.num_images)
    num_classes = property(lambda self: self.index.num_classes)
    batch_size = property(lambda self: self.order.batch_size)

    @property
    def batches_per_epoch(self) -> int:
        """Batches per rank in a whole epoch, equal on every rank (the ragged tail is dropped)."""
        return self.order.batches_per_epoch

    def set_epoch(self, epoch: int, start_sample: int | None = None) -> None:
        """Start ``epoch`` at global position ``start_sample``; None: the constructor's ``start_sample``
        the first time, else 0 (a resumed run may also pass the saved position here, after building)."""
        if start_sample is not None:
            self.order.check_start(start_sample)
        self.epoch = int(epoch)
        self._start = self._position = self._first_start if start_sample is None else int(start_sample)
        self._first_start = 0

    def position(self) -> int:
        """Global samples of the current epoch consumed so far (all ranks), counting the batches yielded."""
        return self._position

    def __len__(self) -> int:
        """Batches of the current pass (fewer than batches_per_epoch after a mid-epoch resume)."""
        return self.order.batches_from(self._start)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, start = self.epoch, self._start
        self._first_start = 0
        self._position = start
        for images, labels in self._batches(epoch, start):
            self._position += self.order.global_batch
            yield images, labels

    def _batches(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def close(self) -> None:
        """Release worker processes or pipelines (the loader can be iterated again afterwards)."""

    # -- pieces shared by the implementations -----------------------------------------------------
    def _job(self, epoch: int, start: int, batch: int) -> tuple[np.ndarray, np.ndarray, AugmentParams]:
        """(global positions, image indices, augmentation parameters) of this rank's batch."""
        positions = self.order.positions(start, batch)
        return positions, self.order.items(epoch, positions), self.spec.draw(self.seed, epoch, positions)

    def _labels(self, items: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self.index.labels(items)).to(self.device, non_blocking=True)

    def _replacement(self, epoch: int, start: int, batch: int, slot: int, item: int,
                     decodes: Callable[[int], bool]) -> int:
        """An image to stand in for the undecodable ``item`` in ``slot`` of ``batch``: the first that
        decodes among the next samples of this rank's shard of the pass (wrapping), so shapes and the
        rank's share hold. Counts and logs the bad record."""
        local = batch * self.order.batch_size + slot
        count = self.order.batches_from(start) * self.order.batch_size
        self.bad_records += 1
        for step in range(1, min(count, MAX_REPLACEMENT_TRIES + 1)):
            position = self.order.local_position(start, (local + step) % count)
            candidate = int(self.order.items(epoch, np.array([position]))[0])
            if decodes(candidate):
                logger.warning("undecodable image skipped: %s (epoch %d, global position %d); replaced by %s "
                               "(%d bad records so far on rank %d)", self.index.where(item), epoch,
                               int(self.order.local_position(start, local)), self.index.where(candidate),
                               self.bad_records, self.order.rank)
                return candidate
        raise RecordIOError(f"{self.index.where(item)}: the image does not decode, nor do the next "
                            f"{min(count - 1, MAX_REPLACEMENT_TRIES)} images of rank {self.order.rank}'s shard; "
                            f"the data is not images this decoder reads (run `lvface inspect --verify`)")


# --------------------------------------------------------------------------------------------------
# the torch DataLoader fallback
# --------------------------------------------------------------------------------------------------


def _decode_augment(index: RecordIndex, items: np.ndarray, params: AugmentParams, spec: AugmentSpec):
    """uint8 (B, 3, S, S) images of ``items`` augmented with ``params``; slots that failed to decode
    are left zero and listed."""
    size = spec.image_size
    pixels = np.zeros((len(items), size, size, 3), np.uint8)
    bad = []
    for slot, payload in enumerate(index.payloads(items)):
        image = decode_image(payload, size)
        if image is None:
            bad.append(slot)
        else:
            pixels[slot] = image
    images = apply_torch(torch.from_numpy(pixels), params, spec).permute(0, 3, 1, 2).contiguous()
    return flip_chw(images, params.flip), bad


class _BatchDecoder(Dataset):
    """Map-style dataset whose items are whole batches: (epoch, start, batch) -> uint8 images, items, bad
    slots. Workers compute the order and the augmentation parameters themselves (a few integers cross the
    process boundary, not index arrays)."""

    def __init__(self, loader: "TorchTrainLoader"):
        self.index, self.order, self.spec, self.seed = loader.index, loader.order, loader.spec, loader.seed

    def __getitem__(self, job: tuple[int, int, int]):
        epoch, start, batch = job
        positions = self.order.positions(start, batch)
        items = self.order.items(epoch, positions)
        images, bad = _decode_augment(self.index, items, self.spec.draw(self.seed, epoch, positions), self.spec)
        return images, torch.from_numpy(items), bad


class _Jobs:
    """The DataLoader's sampler: the (epoch, start, batch) items of the current pass (set by the loader;
    it holds no reference to the loader, so the two form no cycle)."""

    def __init__(self, order: GlobalOrder):
        self.order, self.epoch, self.start = order, 0, 0

    def __iter__(self):
        return iter([(self.epoch, self.start, batch) for batch in range(len(self))])

    def __len__(self) -> int:
        return self.order.batches_from(self.start)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # one core per worker: decoding is the work


class TorchTrainLoader(TrainLoader):
    """The DataLoader path: ``num_workers`` processes decode whole batches with PIL and apply the
    augmentations in torch (uint8); the training process normalises on the device."""

    def __init__(self, index: RecordIndex, data_cfg, **kwargs):
        super().__init__(index, data_cfg, **kwargs)
        self._jobs = _Jobs(self.order)
        workers = data_cfg.num_workers
        self._loader = torch.utils.data.DataLoader(
            _BatchDecoder(self), batch_size=None, sampler=self._jobs, num_workers=workers,
            prefetch_factor=max(1, data_cfg.prefetch) if workers else None, persistent_workers=workers > 0,
            pin_memory=self.device.type == "cuda", worker_init_fn=_worker_init if workers else None)

    def _decodes(self, item: int) -> bool:
        return decode_image(self.index.payload(item), self.spec.image_size) is not None

    def _batches(self, epoch: int, start: int):
        self._jobs.epoch, self._jobs.start = epoch, start
        for batch, (images, items, bad) in enumerate(self._loader):
            if bad:
                positions = self.order.positions(start, batch)
                params = self.spec.draw(self.seed, epoch, positions)
                items = items.numpy().copy()
                for slot in bad:
                    items[slot] = self._replacement(epoch, start, batch, slot, int(items[slot]), self._decodes)
                    fixed, _ = _decode_augment(self.index, items[slot:slot + 1], params.take([slot]), self.spec)
                    images[slot] = fixed[0]
                items = torch.from_numpy(items)
            images = images.to(self.device, non_blocking=True)
            yield normalize_images(images), self._labels(items.numpy())

    def close(self) -> None:
        """Stop the worker processes now (they also stop when the loader is garbage-collected)."""
        iterator = getattr(self._loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self._loader._iterator = None


# --------------------------------------------------------------------------------------------------
# the trainer's entry point
# --------------------------------------------------------------------------------------------------


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def cuda_driver_version() -> int | None:
    """The newest CUDA version the installed driver supports, in cuDriverGetVersion's units
    (1000 * major + 10 * minor: 13000 is CUDA 13.0), or None where no driver library answers."""
    import ctypes

    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            library = ctypes.CDLL(name)
        except OSError:
            continue
        version = ctypes.c_int(0)
        if library.cuDriverGetVersion(ctypes.byref(version)) == 0:  # needs no cuInit
            return int(version.value)
    return None


def dali_required_driver() -> int:
    """The CUDA driver version the installed DALI build needs: its CUDA major version (the cuda130
    wheels run on any 13.x driver by minor-version compatibility, not on a 12.x one)."""
    import nvidia.dali

    built_with = int(getattr(nvidia.dali, "__cuda_version__", 13000))  # e.g. 13492 for a 13.x toolkit
    return built_with // 1000 * 1000


def _cuda_version_text(version: int) -> str:
    return f"{version // 1000}.{version % 1000 // 10}"


def choose_loader(requested: str, *, device: torch.device, dali_importable: bool, driver_version: int | None,
                  dali_driver: int | None) -> tuple[str, str | None]:
    """Which loader runs: 'dali' or 'torch', and why, when auto passed DALI over (a message to log).

    On the CPU DALI runs CPU pipelines and needs no driver. On a CUDA device the DALI build must fit
    the driver: with loader=auto an old or unreadable driver falls back to the torch loader; an
    explicit data.loader=dali is an error that says what to change.
    """
    if requested == "torch":
        return "torch", None
    if not dali_importable:
        if requested == "dali":
            raise ConfigError("data.loader=dali but nvidia-dali is not installed; install nvidia-dali-cuda130 "
                              "(or the build for your driver's CUDA, e.g. nvidia-dali-cuda120), or set data.loader=torch")
        return "torch", None
    if device.type != "cuda":
        return "dali", None
    if driver_version is not None and dali_driver is not None and driver_version >= dali_driver:
        return "dali", None
    found = ("an unreadable CUDA driver version (libcuda's cuDriverGetVersion did not answer)"
             if driver_version is None else f"a driver for CUDA {_cuda_version_text(driver_version)}")
    need = _cuda_version_text(dali_driver) if dali_driver is not None else "?"
    problem = f"the installed DALI build needs a driver for CUDA >= {need} and this node has {found}"
    if requested == "dali":
        raise ConfigError(f"data.loader=dali: {problem}; update the NVIDIA driver, install the DALI build for the "
                          f"driver's CUDA (e.g. nvidia-dali-cuda120), or set data.loader=torch")
    return "torch", (f"data.loader=auto: {problem}; using the torch loader instead (update the driver or install "
                     f"the matching DALI build for GPU decoding; set data.loader=torch to silence this)")


def build_train_loader(data_cfg, *, rank: int, world_size: int, seed: int, device: torch.device,
                       start_sample: int = 0) -> TrainLoader:
    """The training loader of this rank (see ``TrainLoader``), DALI or torch per ``data_cfg.loader``."""
    if not data_cfg.rec:
        raise ConfigError("data.rec is empty; set it to a train.rec file (next to its train.idx) or a folder of "
                          "`lvface pack` shards, or run `lvface synth --out DIR` first")
    try:
        index = RecordIndex.open(data_cfg.rec, num_classes=data_cfg.num_classes)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"data.rec={data_cfg.rec}: {error}") from None
    if data_cfg.num_images and data_cfg.num_images != index.num_images:
        raise ConfigError(f"data.num_images is {data_cfg.num_images} but {data_cfg.rec} holds {index.num_images} "
                          f"images; set data.num_images=0 to read it from the data")
    device = torch.device(device)
    importable = data_cfg.loader != "torch" and dali_available()
    on_cuda = importable and device.type == "cuda"
    choice, fallback = choose_loader(data_cfg.loader, device=device, dali_importable=importable,
                                     driver_version=cuda_driver_version() if on_cuda else None,
                                     dali_driver=dali_required_driver() if on_cuda else None)
    if fallback:
        logger.warning("%s", fallback)
    kwargs = dict(rank=rank, world_size=world_size, seed=seed, device=device, start_sample=start_sample)
    if choice == "dali":
        from lvface.data.dali import DaliTrainLoader

        loader = DaliTrainLoader(index, data_cfg, **kwargs)
    else:
        loader = TorchTrainLoader(index, data_cfg, **kwargs)
    logger.info("%s loader: %d images, %d identities, %d batches of %d per rank per epoch on %d ranks",
                choice, index.num_images, index.num_classes, loader.batches_per_epoch, data_cfg.batch_size,
                world_size)
    return loader


# --------------------------------------------------------------------------------------------------
# a plain Dataset (evaluation and simple tools)
# --------------------------------------------------------------------------------------------------


class RecordDataset(Dataset):
    """(image float (3, S, S) in [-1, 1], label int64) for each image record of ``rec_path``.

    In train mode each image is flipped horizontally with probability ``flip_p``, drawn from a
    per-process generator seeded with (seed, epoch, worker id): call ``set_epoch`` before each epoch
    for new flips (DataLoader workers get a fresh copy of the dataset every epoch unless
    ``persistent_workers``). Picklable: the .rec is memory-mapped lazily in each process. Training
    uses ``build_train_loader`` (global order, resume, augmentations); this is for simple reads.
    """

    def __init__(self, rec_path: str, *, train: bool, flip_p: float = 0.5, seed: int = 0,
                 image_size: int = IMAGE_SIZE, idx_path: str | None = None):
        self.record = InsightFaceRecord(rec_path, idx_path)
        self.train = train
        self.flip_p = flip_p if train else 0.0
        self.seed = seed
        self.image_size = image_size
        self.epoch = 0
        self._rng: np.random.Generator | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self._rng = None

    @property
    def labels(self) -> np.ndarray:
        """Class id of every item, int64 (no decoding)."""
        return self.record.labels

    @property
    def num_classes(self) -> int:
        return self.record.num_classes

    def __len__(self) -> int:
        return len(self.record)

    def _flip_rng(self) -> np.random.Generator:
        if self._rng is None:
            worker = get_worker_info()
            self._rng = np.random.default_rng([self.seed, self.epoch, worker.id if worker else 0])
        return self._rng

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        jpeg, label = self.record[index]
        image = Image.open(io.BytesIO(jpeg)).convert("RGB")
        if image.size != (self.image_size, self.image_size):
            image = image.resize((self.image_size, self.image_size), Image.BILINEAR)
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)  # (3, H, W)
        if self.flip_p > 0 and self._flip_rng().uniform() < self.flip_p:
            pixels = pixels.flip(2)
        return normalize_images(pixels), torch.tensor(label, dtype=torch.int64)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_rng"] = None  # each process draws its own flips
        return state
