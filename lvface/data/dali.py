"""The DALI loader: lvface's global order fed to DALI's JPEG decoder; GPU ("mixed") decode on CUDA.

Why an external source and not ``fn.readers.mxnet``. The reader takes the offsets of the .idx, sorts
them and reads in file order; its ``random_shuffle`` draws from a local buffer (1,024 samples), so an
identity-sorted file gives batches of a few identities, and its order cannot be resumed at a global
position or re-sliced for another world size. Here lvface decides every sample: ``GlobalOrder`` gives
this rank's image indices, the record bytes are sliced out of the memory-mapped .rec (no copy, no
parsing: the offsets and payload lengths come from the ``RecordIndex``) and fed to the pipeline with
``feed_input``, together with the per-sample augmentation parameters. Measured on a 2-core CPU
(benchmarks/results/data-cpu-epyc-2core-2026-11-28.md; CPU pipeline, decode + flip + normalise, equal
threads, median of 5): feeding 3,273 / 5,167 images/s at 1 / 2 threads, the reader 3,639 / 5,476: the
reader is 6-11% faster (the run ranges overlap). The cost is the main thread's work per batch of 128: 1.3 ms for the order,
the augmentation draw and the payload views, 1.4 ms for ``feed_input`` (22 us per image, a ceiling
near 45,000 images/s per rank on that CPU). We pay it because the reader cannot give the order the
trainer needs; decoding dominates either way. Header and identity records never reach the decoder
(the index holds image records only), so insightface files are read as they are.

Augmentations are per-sample branches (DALI conditionals): a sample pays only for the stages drawn
for it, and a 112x112 image is never resized (that identity resize alone cost 40% of the pipeline).

Pipelining: the pipeline runs with DALI's queue depth 1 and this loader keeps ``data.prefetch``
batches scheduled ahead (``schedule_run`` per fed batch, ``outputs`` in order).

Undecodable images: the feeder drops payloads that cannot be complete JPEGs (``looks_complete``) or
whose header DALI cannot parse (``header_parses``) before DALI sees them, through the bad-record path
the torch loader uses (``TrainLoader._replacement``). The header check is not an optimisation: DALI
2.4's CPU decoder (``fn.decoders.image``) parses every sample's header first, and when one fails (no
image signature, or a JPEG whose marker segments are broken: a wiped SOI or wiped tables) in a batch
large enough to be split across its worker tasks (about 32 samples and up on 1-2 threads), the
process dies with SIGSEGV in a worker task of ``ImageDecoder<CPUBackend>::RunImpl`` (gdb) instead of
raising (small batches raise). A JPEG whose header parses but whose entropy-coded data is damaged is
decoded with a warning or raises cleanly. The walk costs about 9 us per image on the 2-core CPU
(1.2 ms per batch of 128, main thread). If the decoder still fails on a batch, the batch's samples
are decoded one by one in a probe pipeline (same decoder device) to find the bad ones, each is
replaced by the next decodable sample of the rank's shard, and the pipeline is rebuilt and re-fed
from that batch on, so the order of the batches and their contents stay deterministic.
"""
from __future__ import annotations

import collections
import logging

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.pytorch import feed_ndarray

from lvface.data.augment import AugmentParams
from lvface.data.base import TrainLoader
from lvface.data.images import PIXEL_MEAN, PIXEL_STD, looks_complete
from lvface.data.index import RecordIndex

logger = logging.getLogger(__name__)


# Signatures of the formats DALI's decoder reads (besides JPEG, whose header is walked): PNG, BMP,
# TIFF (both byte orders), JPEG 2000 (box and codestream), PNM (P1-P6), WebP (RIFF....WEBP).
_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"BM", b"II*\x00", b"MM\x00*", b"\x00\x00\x00\x0cjP  ", b"\xff\x4f\xff\x51",
               b"P1", b"P2", b"P3", b"P4", b"P5", b"P6")
# SOF markers (frame headers: baseline, extended, progressive, lossless, arithmetic); C4, C8, CC are not.
_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field: TEM and the restart markers.
_STANDALONE = frozenset([0x01, *range(0xD0, 0xD8)])


def header_parses(payload: np.ndarray) -> bool:
    """Whether DALI's decoder can parse the header of ``payload`` (see the module docstring: a header it
    cannot parse may crash it). A JPEG needs SOI, a chain of well-formed marker segments, a frame header
    with a non-zero size and a start of scan; other formats need their signature."""
    data = memoryview(payload).cast("B") if isinstance(payload, np.ndarray) else memoryview(payload)
    if len(data) < 4:
        return False
    if data[0] != 0xFF or data[1] != 0xD8:
        head = bytes(data[:12])
        return head.startswith(_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")
    position, framed, end = 2, False, len(data)
    while position + 4 <= end:
        if data[position] != 0xFF:
            return False
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        if marker in _STANDALONE:
            position += 2
            continue
        if marker in (0x00, 0xD8, 0xD9):
            return False
        length = data[position + 2] << 8 | data[position + 3]
        if length < 2 or position + 2 + length > end:
            return False
        if marker in _FRAME_MARKERS:
            if length < 8 or not (data[position + 5] << 8 | data[position + 6]) or not (
                    data[position + 7] << 8 | data[position + 8]) or not data[position + 9]:
                return False  # zero height, width or component count
            framed = True
        elif marker == 0xDA:
            return framed
        position += 2 + length
    return False


def _feedable(payload: np.ndarray) -> bool:
    """Bytes that may reach DALI's decoder: complete (``looks_complete``) with a header it parses."""
    return looks_complete(payload) and header_parses(payload)


class _Job:
    """One batch on its way through the pipeline."""

    def __init__(self, batch: int, items: np.ndarray, params: AugmentParams, payloads: list[np.ndarray]):
        self.batch, self.items, self.params, self.payloads = batch, items, params, payloads


class DaliTrainLoader(TrainLoader):
    """DALI decode + augment + normalise of this rank's batches (see the module docstring)."""

    def __init__(self, index: RecordIndex, data_cfg, **kwargs):
        super().__init__(index, data_cfg, **kwargs)
        self.threads = max(1, data_cfg.dali_threads)
        self.prefetch = max(1, data_cfg.prefetch)
        if self.device.type == "cuda":
            self.device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
            self.decode_device = "mixed"
        else:
            self.device_id, self.decode_device = None, "cpu"
        self._pipe: Pipeline | None = None
        self._probe: Pipeline | None = None

    # -- pipelines ---------------------------------------------------------------------------------
    def _build(self) -> Pipeline:
        spec, size, decode_device = self.spec, self.spec.image_size, self.decode_device

        def source(name, dtype, ndim):
            return fn.external_source(name=name, dtype=dtype, ndim=ndim, no_copy=False)

        @pipeline_def(enable_conditionals=True)
        def graph():
            # Every stage is a per-sample branch (DALI conditionals): a sample pays only for the
            # augmentations drawn for it. (A resize of a 112x112 image to 112x112 alone costs 40%.)
            jpegs = source("jpegs", types.UINT8, 1)
            images = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB)
            shape = fn.peek_image_shape(jpegs)  # (H, W, C) from the header
            if (shape[0] != size) | (shape[1] != size):
                images = fn.resize(images, size=[size, size])
            if spec.mask_p > 0:
                mask_anchor, mask_shape = source("mask_anchor", types.FLOAT, 1), source("mask_shape", types.FLOAT, 1)
                mask_fill = source("mask_fill", types.FLOAT, 1)
                if source("masked", types.BOOL, 0):
                    images = fn.erase(images, anchor=mask_anchor, shape=mask_shape, axis_names="HW",
                                      fill_value=mask_fill)
            if spec.crop_p > 0:
                crop_anchor, crop_shape = source("crop_anchor", types.INT32, 1), source("crop_shape", types.INT32, 1)
                if source("cropped", types.BOOL, 0):
                    images = fn.slice(images, crop_anchor, crop_shape, axis_names="WH")
                    images = fn.resize(images, size=[size, size], interp_type=types.INTERP_LINEAR, antialias=False)
            if spec.colour:
                brightness, contrast = source("brightness", types.FLOAT, 0), source("contrast", types.FLOAT, 0)
                saturation = source("saturation", types.FLOAT, 0)
                if source("coloured", types.BOOL, 0):
                    images = fn.color_twist(images, brightness=brightness, contrast=contrast, saturation=saturation)
            if spec.blur_p > 0:
                sigma = source("blur_sigma", types.FLOAT, 0)
                if source("blurred", types.BOOL, 0):
                    images = fn.gaussian_blur(images, sigma=sigma)
            return fn.crop_mirror_normalize(images, mirror=source("flip", types.INT32, 0), mean=[PIXEL_MEAN] * 3,
                                            std=[PIXEL_STD] * 3, dtype=types.FLOAT, output_layout="CHW")

        pipe = graph(batch_size=self.order.batch_size, num_threads=self.threads, device_id=self.device_id,
                     prefetch_queue_depth=1, seed=self.seed & 0x7FFFFFFF, exec_dynamic=True)
        pipe.build()
        return pipe

    def _feed(self, pipe: Pipeline, job: _Job) -> None:
        spec, params = self.spec, job.params
        pipe.feed_input("jpegs", job.payloads)
        inputs = {"flip": params.flip}
        if spec.mask_p > 0:
            inputs.update(masked=params.mask_shape.any(1), mask_anchor=params.mask_anchor,
                          mask_shape=params.mask_shape, mask_fill=params.mask_fill)
        if spec.crop_p > 0:
            inputs.update(cropped=params.crop_shape[:, 0] != spec.image_size, crop_anchor=params.crop_anchor,
                          crop_shape=params.crop_shape)
        if spec.colour:
            inputs.update(coloured=(params.brightness != 1) | (params.contrast != 1) | (params.saturation != 1),
                          brightness=params.brightness, contrast=params.contrast, saturation=params.saturation)
        if spec.blur_p > 0:
            inputs.update(blurred=params.blur_sigma > 0, blur_sigma=params.blur_sigma)
        for name, values in inputs.items():
            pipe.feed_input(name, np.ascontiguousarray(values))
        pipe.schedule_run()

    def _decodes(self, item: int) -> bool:
        """Whether DALI's decoder (on this loader's device) decodes the image (a batch-of-1 probe)."""
        payload = self.index.payload(item)
        if not _feedable(payload):
            return False
        if self._probe is None:
            self._probe = Pipeline(batch_size=1, num_threads=1, device_id=self.device_id, prefetch_queue_depth=1,
                                   exec_dynamic=True)
            with self._probe:
                jpegs = fn.external_source(name="jpegs", dtype=types.UINT8, ndim=1, no_copy=False)
                self._probe.set_outputs(fn.decoders.image(jpegs, device=self.decode_device, output_type=types.RGB))
            self._probe.build()
        self._probe.feed_input("jpegs", [payload])
        try:
            self._probe.run()
        except RuntimeError:
            self._probe = None  # a failed pipeline is not reused
            return False
        return True

    # -- batches -----------------------------------------------------------------------------------
    def _make_job(self, epoch: int, start: int, batch: int) -> _Job:
        _, items, params = self._job(epoch, start, batch)
        payloads = self.index.payloads(items)
        for slot in [slot for slot, payload in enumerate(payloads) if not _feedable(payload)]:
            items[slot] = self._replacement(epoch, start, batch, slot, int(items[slot]), self._feedable)
            payloads[slot] = self.index.payload(items[slot])
        return _Job(batch, items, params, payloads)

    def _feedable(self, item: int) -> bool:
        return _feedable(self.index.payload(item))

    def _batches(self, epoch: int, start: int):
        num_batches = self.order.batches_from(start)
        if self._pipe is None:
            self._pipe = self._build()
        pending: collections.deque[_Job] = collections.deque()
        next_batch = 0
        try:
            while next_batch < num_batches or pending:
                while next_batch < num_batches and len(pending) < self.prefetch:
                    job = self._make_job(epoch, start, next_batch)
                    self._feed(self._pipe, job)
                    pending.append(job)
                    next_batch += 1
                job = pending[0]
                try:
                    (images,) = self._pipe.outputs(*self._stream())
                except RuntimeError as error:
                    self._repair(epoch, start, job, error)
                    self._pipe = self._build()  # DALI marks a pipeline invalid after an operator error
                    for waiting in pending:
                        self._feed(self._pipe, waiting)
                    continue
                pending.popleft()
                yield self._to_torch(images), self._labels(job.items)
        finally:
            if pending:  # a pass left early: batches of it are still queued in the pipeline
                self._pipe = None

    def _repair(self, epoch: int, start: int, job: _Job, error: RuntimeError) -> None:
        bad = [slot for slot, item in enumerate(job.items) if not self._decodes(int(item))]
        if not bad:
            raise RuntimeError(f"DALI failed on batch {job.batch} of epoch {epoch} (rank {self.order.rank}) and "
                               f"every image of it decodes alone: {error}") from error
        for slot in bad:
            job.items[slot] = self._replacement(epoch, start, job.batch, slot, int(job.items[slot]), self._decodes)
            job.payloads[slot] = self.index.payload(job.items[slot])

    def close(self) -> None:
        self._pipe = self._probe = None

    def _stream(self) -> tuple:
        return (torch.cuda.current_stream(self.device),) if self.device.type == "cuda" else ()

    def _to_torch(self, images) -> torch.Tensor:
        dense = images.as_tensor()  # (B, 3, S, S) float32
        out = torch.empty(dense.shape(), dtype=torch.float32, device=self.device)
        stream = self._stream()
        feed_ndarray(dense, out, cuda_stream=stream[0] if stream else None)
        return out
