"""insightface verification `.bin` files (LFW, CFP-FP, AgeDB-30, ...): reading and writing the format.

A `.bin` is `pickle.dump((bins, issame_list))`: `bins` the JPEG bytes of 2P images (pair i is images
2i and 2i+1), `issame_list` P booleans. insightface reads it with `pickle.load(f, encoding="bytes")`
so that Python 2 pickles load too; `load_bin` does the same, through an unpickler that only builds the
plain containers a .bin holds (a pickle can run code). The protocol that scores a set lives in
lvface/eval/verification.py.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from lvface.files import atomic_open


def write_bin(path: str, jpegs: Sequence[bytes], issame: Sequence[bool]) -> None:
    """Write an insightface verification ``.bin`` (atomically: a temp file, then ``os.replace``)."""
    jpegs = [bytes(jpeg) for jpeg in jpegs]
    issame = [bool(same) for same in issame]
    if len(jpegs) != 2 * len(issame):
        raise ValueError(f"write_bin({path}): {len(jpegs)} images for {len(issame)} pairs; "
                         "need exactly 2 images per pair")
    with atomic_open(path, "wb") as f:
        pickle.dump((jpegs, issame), f, protocol=pickle.HIGHEST_PROTOCOL)


class _BinUnpickler(pickle.Unpickler):
    """Builds only what a .bin may hold: lists, tuples, bytes, bools, numpy arrays."""

    _ALLOWED = {
        ("_codecs", "encode"),  # how Python 3 pickles bytes at protocol < 3
        ("builtins", "bytearray"), ("builtins", "bytes"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refers to {module}.{name}, which a verification .bin "
                                         "never contains; refusing to build it")
        return super().find_class(module, name)


def _decode_rgb(data, image_size: int, path: str, index: int) -> np.ndarray:
    if isinstance(data, np.ndarray):
        data = data.tobytes()
    try:
        image = Image.open(io.BytesIO(bytes(data))).convert("RGB")
    except Exception as error:  # PIL raises several types for undecodable data
        raise ValueError(f"{path}: image {index} is not a decodable image ({error})") from error
    if image.size != (image_size, image_size):
        # insightface resizes the short side (mx.image.resize_short); we also centre-crop to square
        width, height = image.size
        scale = image_size / min(width, height)
        width, height = max(image_size, round(width * scale)), max(image_size, round(height * scale))
        image = image.resize((width, height), Image.BILINEAR)
        left, top = (width - image_size) // 2, (height - image_size) // 2
        image = image.crop((left, top, left + image_size, top + image_size))
    return np.asarray(image, dtype=np.uint8)


def load_bin(path: str, image_size: int = 112) -> tuple[torch.Tensor, np.ndarray]:
    """Read a ``.bin`` -> (images uint8 (2P, 3, H, W) RGB, issame bool (P,)).

    Reads insightface's own files (Python 2 or 3 pickles) and ours.
    """
    if not os.path.isfile(path):
        raise ValueError(f"verification set {path!r} not found")
    try:
        with open(path, "rb") as f:
            bins, issame = _BinUnpickler(f, encoding="bytes").load()
    except Exception as error:
        raise ValueError(f"{path}: not an insightface verification .bin: a pickle of "
                         f"(list of JPEG bytes, list of issame) was expected ({error})") from error
    issame = np.asarray(issame, dtype=np.bool_).ravel()
    if len(bins) != 2 * len(issame):
        raise ValueError(f"{path}: {len(bins)} images for {len(issame)} pairs; a .bin holds "
                         "exactly 2 images per pair")
    images = np.empty((len(bins), image_size, image_size, 3), dtype=np.uint8)
    for index, data in enumerate(bins):
        images[index] = _decode_rgb(data, image_size, path, index)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), issame
