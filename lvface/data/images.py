"""Face images as the model sees them: decoding record bytes, and the one normalisation.

Every path that feeds the backbone uses the normalisation here: the torch loader, DALI's
crop_mirror_normalize (PIXEL_MEAN / PIXEL_STD), verification, IJB, `lvface embed` and the ONNX export's
documented input. It is insightface's: RGB, (x / 255 - 0.5) / 0.5, i.e. (x - 127.5) / 127.5.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

IMAGE_SIZE = 112
"""Aligned face crops are IMAGE_SIZE x IMAGE_SIZE pixels."""
PIXEL_MEAN = PIXEL_STD = 127.5
"""(x - 127.5) / 127.5 == (x / 255 - 0.5) / 0.5, per channel."""
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
"""Files that `lvface pack` and `lvface embed` take from a folder: the formats PIL decodes that face crops come in."""


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB images -> float32 model input (x / 255 - 0.5) / 0.5 in [-1, 1]."""
    return images.float().div_(255.0).sub_(0.5).div_(0.5)


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
