"""Training augmentations: one definition, drawn by lvface, applied by DALI or by torch.

Every random choice is drawn here, not inside DALI or a DataLoader worker: the parameters of the
sample at global position ``p`` of ``epoch`` are a pure function of (seed, epoch, p), computed with a
counter-based hash (splitmix64, lvface/hashing.py), so they do not depend on the world size, the rank,
the batch or the loader. DALI receives them as per-sample argument inputs; the torch fallback applies
the same numbers with the same formulas (``apply_torch``), equal to DALI's output within 1 intensity
level per stage.

Order of the stages (each one is skipped entirely when its probability is 0):

    decode (RGB uint8, resized to S x S when it is another size)
    mask       synthetic occlusion of the lower face: two filled rectangles (band + chin)
    crop       square crop of side f * S, f ~ U(crop_min_scale, 1), anywhere inside; resized back to S
    colour     brightness, contrast, saturation factors ~ U(1 - strength, 1 + strength)
    grayscale  saturation 0 (DALI's colour twist in YIQ space: Y = 0.299 R + 0.587 G + 0.114 B)
    blur       Gaussian, sigma ~ U(blur_sigma), radius ceil(3 sigma), mirrored borders
    flip       horizontal
    normalise  (x / 255 - 0.5) / 0.5, CHW float32

The colour stage is DALI's ``color_twist``: out = b * (c * (M_s x - 128) + 128), M_s = YIQ^-1
diag(1, s, s) YIQ; each stage rounds to uint8 as DALI does.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from lvface.config import ConfigError
from lvface.data.images import IMAGE_SIZE
from lvface.hashing import fold, splitmix64_array

MASK_COLOURS = np.array([[232, 232, 236], [150, 192, 226], [38, 38, 44], [172, 172, 176]], np.float32)
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.321], [0.211, -0.523, 0.311]], np.float64)
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)

# hash streams: one per random quantity, so enabling one stage never changes another's draws
(_FLIP, _CROP, _CROP_SIZE, _CROP_X, _CROP_Y, _COLOUR, _BRIGHT, _CONTRAST, _SATURATION, _GRAY, _BLUR,
 _SIGMA, _MASK, _MASK_TOP, _MASK_BOTTOM, _MASK_WIDTH, _MASK_COLOUR) = range(17)


def uniform(seed: int, epoch: int, positions: np.ndarray, stream: int) -> np.ndarray:
    """U[0, 1) float64 per global position, a pure function of (seed, epoch, position, stream)."""
    counters = np.asarray(positions, dtype=np.int64).astype(np.uint64)
    bits = splitmix64_array(counters, fold(seed, epoch, stream, 0xA11))
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


class AugmentParams(NamedTuple):
    """Per-sample parameters of a batch (arrays with the batch on axis 0)."""

    flip: np.ndarray         # (B,) int32 0/1
    crop_anchor: np.ndarray  # (B, 2) int32 (x, y) of the crop's top-left corner
    crop_shape: np.ndarray   # (B, 2) int32 (w, h) of the crop (S, S: no crop)
    brightness: np.ndarray   # (B,) float32
    contrast: np.ndarray     # (B,) float32
    saturation: np.ndarray   # (B,) float32 (0: grayscale)
    blur_sigma: np.ndarray   # (B,) float32 (0: no blur)
    mask_anchor: np.ndarray  # (B, 4) float32 (y0, x0, y1, x1) of the two rectangles
    mask_shape: np.ndarray   # (B, 4) float32 (h0, w0, h1, w1); zeros: no mask
    mask_fill: np.ndarray    # (B, 3) float32 RGB

    def take(self, rows) -> "AugmentParams":
        return AugmentParams(*(field[rows] for field in self))


@dataclasses.dataclass(frozen=True)
class AugmentSpec:
    """Which augmentations run and how strong (from ``DataConfig``); probabilities per sample."""

    flip_p: float = 0.5
    crop_p: float = 0.0
    crop_min_scale: float = 0.8
    color_p: float = 0.0
    color_strength: float = 0.3
    grayscale_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.3, 1.5)
    mask_p: float = 0.0
    image_size: int = IMAGE_SIZE

    @classmethod
    def from_config(cls, data_cfg, *, image_size: int = IMAGE_SIZE) -> "AugmentSpec":
        spec = cls(flip_p=0.5 if data_cfg.flip else 0.0, crop_p=data_cfg.crop_p,
                   crop_min_scale=data_cfg.crop_min_scale, color_p=data_cfg.color_p,
                   color_strength=data_cfg.color_strength, grayscale_p=data_cfg.grayscale_p,
                   blur_p=data_cfg.blur_p, blur_sigma=tuple(data_cfg.blur_sigma), mask_p=data_cfg.mask_p,
                   image_size=image_size)
        for name in ("crop_p", "color_p", "grayscale_p", "blur_p", "mask_p"):
            if not 0.0 <= getattr(spec, name) <= 1.0:
                raise ConfigError(f"config key 'data.{name}' is {getattr(spec, name)}; it must be in [0, 1]")
        if not 0.0 < spec.crop_min_scale <= 1.0:
            raise ConfigError(f"config key 'data.crop_min_scale' is {spec.crop_min_scale}; it must be in (0, 1]")
        if not 0.0 <= spec.color_strength < 1.0:
            raise ConfigError(f"config key 'data.color_strength' is {spec.color_strength}; it must be in [0, 1)")
        low_high = spec.blur_sigma
        if len(low_high) != 2 or not 0.05 <= low_high[0] <= low_high[1] <= 3.0:
            raise ConfigError(f"config key 'data.blur_sigma' is {list(low_high)}; give [low, high] with "
                              f"0.05 <= low <= high <= 3")
        return spec

    @property
    def colour(self) -> bool:
        """Whether the colour stage (colour jitter and/or grayscale) runs."""
        return self.color_p > 0 or self.grayscale_p > 0

    def draw(self, seed: int, epoch: int, positions: np.ndarray) -> AugmentParams:
        """Parameters of the samples at these global positions of ``epoch`` (vectorised)."""
        positions = np.asarray(positions, dtype=np.int64)
        n, size = len(positions), self.image_size

        def u(stream):
            return uniform(seed, epoch, positions, stream)

        def chosen(p, stream):
            return u(stream) < p if p > 0 else np.zeros(n, bool)

        flip = chosen(self.flip_p, _FLIP).astype(np.int32)

        crop_anchor = np.zeros((n, 2), np.int32)
        crop_shape = np.full((n, 2), size, np.int32)
        crop = chosen(self.crop_p, _CROP)
        if crop.any():
            side = np.rint(size * (self.crop_min_scale + (1 - self.crop_min_scale) * u(_CROP_SIZE)))
            side = np.clip(side, 1, size).astype(np.int32)
            room = size - side + 1
            x = np.minimum((u(_CROP_X) * room).astype(np.int32), room - 1)
            y = np.minimum((u(_CROP_Y) * room).astype(np.int32), room - 1)
            crop_anchor[crop] = np.stack([x, y], 1)[crop]
            crop_shape[crop] = np.stack([side, side], 1)[crop]

        brightness = np.ones(n, np.float32)
        contrast = np.ones(n, np.float32)
        saturation = np.ones(n, np.float32)
        colour = chosen(self.color_p, _COLOUR)
        if colour.any():
            strength = self.color_strength
            for values, stream in ((brightness, _BRIGHT), (contrast, _CONTRAST), (saturation, _SATURATION)):
                values[colour] = (1 + strength * (2 * u(stream) - 1))[colour]
        saturation[chosen(self.grayscale_p, _GRAY)] = 0.0

        blur_sigma = np.zeros(n, np.float32)
        blur = chosen(self.blur_p, _BLUR)
        low, high = self.blur_sigma
        blur_sigma[blur] = (low + (high - low) * u(_SIGMA))[blur]

        mask_anchor = np.zeros((n, 4), np.float32)
        mask_shape = np.zeros((n, 4), np.float32)
        mask_fill = np.zeros((n, 3), np.float32)
        mask = chosen(self.mask_p, _MASK)
        if mask.any():
            # aligned 112x112 faces (insightface's template): nose tip near y = 0.64 S, chin at the bottom
            top = np.rint(size * (0.56 + 0.08 * u(_MASK_TOP)))
            bottom = np.minimum(np.rint(size * (0.93 + 0.07 * u(_MASK_BOTTOM))), size)
            half = np.rint(size * (0.30 + 0.06 * u(_MASK_WIDTH)))
            x0 = size // 2 - half
            band_end = np.rint(top + 0.7 * (bottom - top))
            inset = np.rint(half / 3)
            regions_anchor = np.stack([top, x0, band_end, x0 + inset], 1)
            regions_shape = np.stack([band_end - top, 2 * half, bottom - band_end, 2 * (half - inset)], 1)
            mask_anchor[mask] = regions_anchor[mask]
            mask_shape[mask] = regions_shape[mask]
            colour_index = np.minimum((u(_MASK_COLOUR) * len(MASK_COLOURS)).astype(int), len(MASK_COLOURS) - 1)
            mask_fill[mask] = MASK_COLOURS[colour_index][mask]
        return AugmentParams(flip, crop_anchor, crop_shape, brightness, contrast, saturation, blur_sigma,
                             mask_anchor, mask_shape, mask_fill)


# --------------------------------------------------------------------------------------------------
# the torch implementation (fallback loader); DALI's is in lvface/data/dali.py
# --------------------------------------------------------------------------------------------------


def colour_matrix(saturation: float) -> np.ndarray:
    """3x3 RGB matrix of a saturation change in YIQ space (as DALI's colour twist)."""
    return (_YIQ_TO_RGB @ np.diag([1.0, saturation, saturation]) @ _RGB_TO_YIQ).astype(np.float32)


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """1-D Gaussian of radius ceil(3 sigma), normalised (DALI's default window for a sigma)."""
    radius = int(np.ceil(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    return torch.from_numpy((taps / taps.sum()).astype(np.float32))


def _to_uint8(values: torch.Tensor) -> torch.Tensor:
    return values.round_().clamp_(0, 255).to(torch.uint8)


def apply_torch(images: torch.Tensor, params: AugmentParams, spec: AugmentSpec) -> torch.Tensor:
    """Augment a uint8 batch (B, S, S, 3) in place with ``params``; returns it (still uint8, HWC).

    The flip is left to the caller (a flip of the CHW result is cheapest): see ``flip_chw``.
    """
    size = spec.image_size
    if spec.mask_p > 0:
        for row in np.flatnonzero(params.mask_shape.any(1)):
            for region in range(2):
                y, x = params.mask_anchor[row, 2 * region:2 * region + 2].astype(int)
                h, w = params.mask_shape[row, 2 * region:2 * region + 2].astype(int)
                images[row, y:y + h, x:x + w] = torch.from_numpy(params.mask_fill[row]).to(torch.uint8)
    if spec.crop_p > 0:
        for row in np.flatnonzero(params.crop_shape[:, 0] != size):
            (x, y), (w, h) = params.crop_anchor[row], params.crop_shape[row]
            window = images[row, y:y + h, x:x + w].permute(2, 0, 1)[None].float()  # (1, 3, h, w)
            resized = F.interpolate(window, size=(size, size), mode="bilinear", align_corners=False)
            images[row] = _to_uint8(resized[0].permute(1, 2, 0))
    if spec.colour:
        rows = np.flatnonzero((params.brightness != 1) | (params.contrast != 1) | (params.saturation != 1))
        for row in rows:
            pixels = images[row].float()  # (S, S, 3)
            matrix = torch.from_numpy(colour_matrix(float(params.saturation[row])))
            b, c = float(params.brightness[row]), float(params.contrast[row])
            images[row] = _to_uint8(b * (c * (pixels @ matrix.T - 128.0) + 128.0))
    if spec.blur_p > 0:
        for row in np.flatnonzero(params.blur_sigma > 0):
            kernel = gaussian_kernel(float(params.blur_sigma[row]))
            radius = (len(kernel) - 1) // 2
            pixels = images[row].permute(2, 0, 1)[None].float()  # (1, 3, S, S)
            pixels = F.pad(pixels, (radius, radius, radius, radius), mode="reflect")  # mirror, edge once
            pixels = F.conv2d(pixels, kernel.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
            pixels = F.conv2d(pixels, kernel.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)
            images[row] = _to_uint8(pixels[0].permute(1, 2, 0))
    return images


def flip_chw(images: torch.Tensor, flip: np.ndarray) -> torch.Tensor:
    """Flip (B, C, H, W) images horizontally where ``flip`` is 1 (in place)."""
    rows = torch.from_numpy(np.flatnonzero(flip))
    if len(rows):
        images[rows] = images[rows].flip(-1)
    return images
