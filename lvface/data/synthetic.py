"""The embedded default data set: synthetic face-like identities, written as real insightface files.

Each identity is a structured face-like pattern drawn once from its own random stream: head and jaw
shape, skin tone and an identity skin texture (low-frequency field + moles), hair colour and style,
ears, eyes (spacing, size, iris colour), brows (thickness, tilt), nose, mouth (width, curvature,
lip colour) and sometimes a beard or glasses. Each image is a random nuisance of it (strengths in
``Nuisances``): background colour and clutter, shift, scale, aspect, in-plane rotation, optional
blur, an occluding mask over the lower face or a band over the eyes, illumination gain, bias,
colour cast, side light and gamma, and Gaussian luminance noise. Identities differ in coarse
structure that survives the nuisances, while raw pixels (dominated by background, pose and light)
verify poorly. Measured with the defaults (300 x 20 train, val.bin of 1000 pairs over 100 held-out
identities): raw-pixel cosine 10-fold accuracy 0.59-0.61 (AUC ~0.63); vit_demo (dim 96, depth 4,
patch 9) with ArcFace (s 64, m 0.5), AdamW 1e-3 with a 30-step warm-up, batch 64, on 600 of the
pairs: 0.60 untrained, 0.77 after 6.4k images, 0.90 after 12.8k, 0.91 after 19.2k.

Everything is a pure function of (seed, identity, image): ``np.random.default_rng`` seeded with
``[seed, stream, identity, image]`` and PIL's baseline JPEG encoder at a fixed quality, so two runs
with the same arguments write byte-identical files (given the same numpy and Pillow builds: their
float maths and JPEG encoder decide the last bits).

Files: ``train.rec``/``train.idx`` (insightface layout, classes 0..num_identities-1), ``val.bin``
(insightface verification pairs over held-out identities num_identities.., half same, half different)
and ``meta.json``.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import json
import logging
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from lvface.data.recordio import write_insightface_rec
from lvface.files import atomic_open
from lvface.data.verification_bin import write_bin
from lvface.progress import progress

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_TEMPLATE_STREAM, _IMAGE_STREAM, _PAIR_STREAM = 0, 1, 2
_CANVAS = 112  # identities are drawn on the 112x112 canonical grid, then resampled to image_size

_HAIR_COLOURS = np.array([[25, 20, 18], [60, 40, 25], [110, 75, 40], [190, 150, 90],
                          [150, 60, 30], [140, 140, 140], [225, 220, 210]], np.float32)
_IRIS_COLOURS = np.array([[70, 45, 25], [40, 25, 15], [60, 110, 160], [70, 120, 70],
                          [110, 100, 60]], np.float32)


@dataclasses.dataclass(frozen=True)
class Nuisances:
    """Strength of the per-image nuisances; each value is drawn uniformly from its range."""

    rotation_deg: float = 12.0
    """In-plane rotation in [-r, r] degrees."""
    scale: tuple[float, float] = (0.9, 1.1)
    """Zoom around the face centre."""
    aspect: float = 0.05
    """Independent x and y scale jitter in [-a, a]."""
    shift_px: float = 6.0
    """Translation in [-s, s] pixels of the 112 grid."""
    blur_p: float = 0.25
    """Probability of a Gaussian blur of radius ``blur_radius``."""
    blur_radius: tuple[float, float] = (0.5, 1.3)
    mask_p: float = 0.25
    """Probability of a face mask over the lower face."""
    eye_band_p: float = 0.08
    """Probability of a band over the eyes."""
    gain: tuple[float, float] = (0.7, 1.3)
    """Overall illumination gain."""
    colour_cast: float = 0.08
    """Per-channel gain jitter in [-c, c]."""
    gamma: tuple[float, float] = (0.8, 1.25)
    side_light: float = 0.35
    """Amplitude in [0, a] of a linear light ramp across the image, any direction."""
    bias: float = 15.0
    """Brightness offset in [-b, b] grey levels."""
    noise_sigma: tuple[float, float] = (2.0, 10.0)
    """Standard deviation of the Gaussian luminance noise, grey levels."""


NUISANCES = Nuisances()


# ----------------------------------------------------------------------------------------------
# drawing helpers (soft-edged shapes on a float canvas)
# ----------------------------------------------------------------------------------------------

_YY, _XX = np.mgrid[0:_CANVAS, 0:_CANVAS].astype(np.float32)


def _ellipse(cy, cx, ry, rx, angle=0.0, edge=1.0) -> np.ndarray:
    """Coverage in [0, 1] of a rotated ellipse, antialiased over ~``edge`` pixels."""
    coverage = np.zeros((_CANVAS, _CANVAS), np.float32)
    reach = max(rx, ry) * (1 + 0.5 * edge / min(rx, ry)) + 1  # coverage is 0 beyond this
    y0, y1 = max(int(cy - reach), 0), min(int(cy + reach) + 2, _CANVAS)
    x0, x1 = max(int(cx - reach), 0), min(int(cx + reach) + 2, _CANVAS)
    if y0 >= y1 or x0 >= x1:
        return coverage
    cos, sin = np.cos(angle), np.sin(angle)
    dy, dx = _YY[y0:y1, x0:x1] - cy, _XX[y0:y1, x0:x1] - cx
    u, v = dx * cos + dy * sin, -dx * sin + dy * cos
    radius = np.sqrt((u / rx) ** 2 + (v / ry) ** 2)
    coverage[y0:y1, x0:x1] = np.clip((1.0 - radius) * min(rx, ry) / edge + 0.5, 0.0, 1.0)
    return coverage


def _paint(canvas: np.ndarray, coverage: np.ndarray, colour) -> None:
    """canvas (H, W, 4) RGBA float: paint ``colour`` (RGB) with ``coverage`` over it, in place."""
    rows, cols = np.flatnonzero(coverage.any(1)), np.flatnonzero(coverage.any(0))
    if rows.size == 0:
        return
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    coverage, region = coverage[box][..., None], canvas[box]
    region[..., :3] += coverage * (np.asarray(colour, np.float32) - region[..., :3])
    region[..., 3:] = np.maximum(region[..., 3:], coverage * 255.0)


def _smooth_field(rng: np.random.Generator, cells: int, size: int, channels: int = 1) -> np.ndarray:
    """Low-frequency random field in [-1, 1]: a cells x cells grid upsampled bicubically."""
    grid = rng.uniform(0, 255, (cells, cells, channels)).astype(np.uint8)
    image = Image.fromarray(grid[..., 0] if channels == 1 else grid)
    field = np.asarray(image.resize((size, size), Image.BICUBIC), np.float32)
    return (field / 127.5 - 1.0).reshape(size, size, channels)


# ----------------------------------------------------------------------------------------------
# one identity
# ----------------------------------------------------------------------------------------------


def _draw_head(canvas, rng, skin, hair, cx, cy, head_rx, head_ry, hair_style) -> np.ndarray:
    """Long hair behind the head, neck, ears, the textured face with moles, hair on top; returns the
    face's coverage (the beard grows inside it)."""
    if hair_style == 1:  # long hair behind the head
        length = rng.uniform(0.4, 1.1)
        _paint(canvas, _ellipse(cy + head_ry * length * 0.5, cx, head_ry * (0.9 + length * 0.5),
                                head_rx * rng.uniform(1.15, 1.35)), hair)
    neck = np.clip((head_rx * 0.55 - np.abs(_XX - cx)) / 1.0 + 0.5, 0, 1) * (_YY > cy + head_ry * 0.6)
    _paint(canvas, neck, skin * 0.8)
    # ears, head, jaw
    ear_y, ear_ry, ear_rx = cy + rng.uniform(-3, 5), rng.uniform(7, 11), rng.uniform(3.5, 7)
    for side in (-1, 1):
        _paint(canvas, _ellipse(ear_y, cx + side * head_rx * 0.97, ear_ry, ear_rx), skin * 0.92)
    head = _ellipse(cy, cx, head_ry, head_rx)
    jaw_width = rng.uniform(0.65, 1.0)
    jaw = _ellipse(cy + head_ry * 0.35, cx, head_ry * 0.65, head_rx * jaw_width)
    face = np.maximum(head * (_YY < cy + head_ry * 0.2), jaw)
    face = np.maximum(face, head * (jaw_width > 0.85))
    texture = 1.0 + rng.uniform(0.04, 0.14) * _smooth_field(rng, 6, _CANVAS)[..., 0]
    skin_layer = skin[None, None, :] * texture[..., None]
    canvas[..., :3] += face[..., None] * (skin_layer - canvas[..., :3])
    canvas[..., 3] = np.maximum(canvas[..., 3], face * 255.0)
    for _ in range(rng.poisson(2.0)):  # moles
        _paint(canvas, _ellipse(cy + rng.uniform(-20, 30), cx + rng.uniform(-22, 22),
                                rng.uniform(0.8, 1.8), rng.uniform(0.8, 1.8)) * face, skin * 0.45)
    if hair_style != 3:  # hair on top
        hairline = cy - head_ry * rng.uniform(0.25, 0.6) + (12 if hair_style == 2 else 0)
        slope = rng.uniform(-0.35, 0.35)
        above = np.clip(hairline + slope * (_XX - cx) - _YY + 0.5, 0, 1)
        cap = _ellipse(cy - 2, cx, head_ry + rng.uniform(2, 7), head_rx + rng.uniform(1, 5))
        _paint(canvas, cap * above, hair)
    return face


def _draw_eyes(canvas, rng, hair, cx) -> tuple[float, float, float]:
    """Eyes and brows; returns (eye_y, eye_dx, eye_rx), where glasses go."""
    eye_y, eye_dx = 51 + rng.uniform(-4, 5), rng.uniform(13, 21)
    eye_rx, eye_ry = rng.uniform(4.5, 8), rng.uniform(2.3, 4.5)
    iris = _IRIS_COLOURS[rng.integers(len(_IRIS_COLOURS))]
    brow_dy, brow_rx, brow_ry = rng.uniform(6, 11), rng.uniform(6, 10), rng.uniform(1.2, 2.8)
    brow_tilt = rng.uniform(-0.35, 0.35)
    for side in (-1, 1):
        ex = cx + side * eye_dx
        _paint(canvas, _ellipse(eye_y, ex, eye_ry, eye_rx), (235, 232, 225))
        _paint(canvas, _ellipse(eye_y, ex, min(eye_ry, 3.2), min(eye_ry, 3.2)), iris)
        _paint(canvas, _ellipse(eye_y, ex, 1.2, 1.2), (10, 10, 10))
        _paint(canvas, _ellipse(eye_y - brow_dy, ex, brow_ry, brow_rx, side * brow_tilt), hair * 0.8)
    return eye_y, eye_dx, eye_rx


def _draw_nose(canvas, rng, skin, cx, eye_y) -> float:
    """Bridge shading and nostrils; returns nose_y."""
    nose_y, nose_rx = 71 + rng.uniform(-4, 5), rng.uniform(3, 7)
    _paint(canvas, _ellipse((eye_y + nose_y) / 2, cx, (nose_y - eye_y) / 2, rng.uniform(1.5, 3)),
           skin * 0.85)
    for side in (-1, 1):
        _paint(canvas, _ellipse(nose_y, cx + side * nose_rx * 0.6, 1.6, nose_rx * 0.45), skin * 0.55)
    return nose_y


def _draw_mouth(canvas, rng, hair, face, cx) -> float:
    """The mouth, a curved band, over a beard sometimes; returns mouth_y."""
    mouth_y, mouth_w = 90 + rng.uniform(-5, 4), rng.uniform(8, 15)
    thickness, curve = rng.uniform(1.5, 4.5), rng.uniform(-5, 5)
    lips = np.array([170, 70, 70]) + rng.uniform(-40, 30, 3)
    centre_line = mouth_y + curve * ((_XX - cx) / mouth_w) ** 2
    band = np.clip(thickness / 2 - np.abs(_YY - centre_line) + 0.5, 0, 1)
    band *= np.clip(mouth_w - np.abs(_XX - cx) + 0.5, 0, 1)
    if rng.uniform() < 0.25:  # beard
        beard = face * np.clip(_YY - (mouth_y - 6 + rng.uniform(-4, 4)) + 0.5, 0, 1)
        _paint(canvas, beard, hair * 0.9)
    _paint(canvas, band, lips)
    return mouth_y


def _draw_glasses(canvas, rng, hair, cx, eye_y, eye_dx, eye_rx) -> None:
    if rng.uniform() < 0.15:
        frame = hair * 0.3 if rng.uniform() < 0.5 else np.array([30, 30, 35])
        for side in (-1, 1):
            outer = _ellipse(eye_y, cx + side * eye_dx, eye_rx + 4, eye_rx + 5)
            inner = _ellipse(eye_y, cx + side * eye_dx, eye_rx + 2.6, eye_rx + 3.6)
            _paint(canvas, np.clip(outer - inner, 0, 1), frame)


class _Identity:
    """The identity's drawing (RGBA uint8 on the canonical grid) and the landmarks nuisances need.

    Every feature draws from one generator in a fixed order (head, eyes, nose, mouth, glasses), so an
    identity is the same picture in every run and on every machine.
    """

    def __init__(self, seed: int, identity: int):
        rng = np.random.default_rng([seed, _TEMPLATE_STREAM, identity])
        canvas = np.zeros((_CANVAS, _CANVAS, 4), np.float32)
        tone = rng.uniform(0, 1)
        skin = np.array([95, 60, 42]) + tone * np.array([150, 150, 140]) + rng.uniform(-18, 18, 3)
        hair = _HAIR_COLOURS[rng.integers(len(_HAIR_COLOURS))] + rng.uniform(-15, 15, 3)
        cx, cy = 56 + rng.uniform(-2, 2), 58 + rng.uniform(-3, 3)
        head_rx, head_ry = rng.uniform(29, 40), rng.uniform(38, 50)
        hair_style = rng.integers(4)  # 0 short, 1 long, 2 fringe, 3 bald

        face = _draw_head(canvas, rng, skin, hair, cx, cy, head_rx, head_ry, hair_style)
        eye_y, eye_dx, eye_rx = _draw_eyes(canvas, rng, hair, cx)
        nose_y = _draw_nose(canvas, rng, skin, cx, eye_y)
        mouth_y = _draw_mouth(canvas, rng, hair, face, cx)
        _draw_glasses(canvas, rng, hair, cx, eye_y, eye_dx, eye_rx)

        self.rgba = np.clip(canvas, 0, 255).astype(np.uint8)
        self.centre = (cx, cy)
        self.eye_y, self.nose_y, self.mouth_y = eye_y, nose_y, mouth_y
        self.chin_y = cy + head_ry


# ----------------------------------------------------------------------------------------------
# one image: the identity under random nuisances
# ----------------------------------------------------------------------------------------------


def _occlude(face: Image.Image, identity: _Identity, rng: np.random.Generator,
             nuisances: Nuisances) -> None:
    """Draw, in place, sometimes a face mask over the lower face or a band over the eyes."""
    kind = rng.uniform()
    if kind >= nuisances.mask_p + nuisances.eye_band_p:
        return
    if rng.uniform() < 0.5:
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    else:
        colour = (int(rng.integers(180, 251)),) * 3
    if kind < nuisances.mask_p:
        top, bottom = identity.nose_y + rng.uniform(-6, 2), identity.chin_y + rng.uniform(-4, 4)
    else:
        top, bottom = identity.eye_y - rng.uniform(4, 8), identity.eye_y + rng.uniform(4, 8)
    half_width = rng.uniform(30, 44)
    cx = identity.centre[0]
    box = (cx - half_width, top, cx + half_width, bottom)
    ImageDraw.Draw(face).rounded_rectangle(box, radius=rng.uniform(1, 8), fill=colour + (255,))


@functools.lru_cache(maxsize=8)
def _ramps(size: int) -> tuple[np.ndarray, np.ndarray]:
    """x and y coordinate ramps in [-1, 1] on a size x size grid, (size, size, 1) each."""
    ramp = np.linspace(-1, 1, size, dtype=np.float32)
    return ramp[None, :, None], ramp[:, None, None]


def _backdrop(rng: np.random.Generator) -> Image.Image:
    """Background: a colour, a linear gradient and low-frequency clutter, as one smooth RGBA image.

    All three are smooth, so they are drawn on a few grid cells and upsampled bicubically.
    """
    cells = int(rng.integers(2, 6))
    centres = np.linspace(-1, 1, cells + 2)[1:-1]
    angle = rng.uniform(0, 2 * np.pi)
    gradient = (centres[None, :] * np.cos(angle) + centres[:, None] * np.sin(angle)) * rng.uniform(0, 60)
    grid = (rng.uniform(0, 255, 3) + gradient[..., None]
            + rng.uniform(-1, 1, (cells, cells, 3)) * rng.uniform(10, 70))
    rgba = np.full((cells, cells, 4), 255, np.uint8)
    rgba[..., :3] = np.clip(grid, 0, 255)
    return Image.fromarray(rgba).resize((_CANVAS, _CANVAS), Image.BICUBIC)


def _render_image(identity: _Identity, rng: np.random.Generator, image_size: int,
                  nuisances: Nuisances) -> np.ndarray:
    """One (image_size, image_size, 3) uint8 view of ``identity``."""
    face = Image.fromarray(identity.rgba)
    _occlude(face, identity, rng, nuisances)

    # pose: rotation, scale, aspect and shift around the face centre (PIL wants the inverse map)
    angle = np.deg2rad(rng.uniform(-nuisances.rotation_deg, nuisances.rotation_deg))
    scale = rng.uniform(*nuisances.scale)
    scale_x, scale_y = scale * (1 + rng.uniform(-nuisances.aspect, nuisances.aspect, 2))
    shift_x, shift_y = rng.uniform(-nuisances.shift_px, nuisances.shift_px, 2)
    cos, sin = np.cos(angle), np.sin(angle)
    inverse = np.array([[cos / scale_x, sin / scale_x], [-sin / scale_y, cos / scale_y]])
    cx, cy = identity.centre
    source_of_origin = np.array([cx, cy]) - inverse @ np.array([cx + shift_x, cy + shift_y])
    coefficients = (inverse[0, 0], inverse[0, 1], source_of_origin[0],
                    inverse[1, 0], inverse[1, 1], source_of_origin[1])
    face = face.transform((_CANVAS, _CANVAS), Image.AFFINE, coefficients, resample=Image.BILINEAR)

    image = Image.alpha_composite(_backdrop(rng), face).convert("RGB")
    if rng.uniform() < nuisances.blur_p:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(*nuisances.blur_radius)))
    if image_size != _CANVAS:
        image = image.resize((image_size, image_size), Image.BILINEAR)

    # illumination: gamma, gain with a colour cast (one table per channel), side light, bias;
    # then luminance noise
    cast = nuisances.colour_cast
    gain = 255 * rng.uniform(*nuisances.gain) * rng.uniform(1 - cast, 1 + cast, 3)
    tables = (np.arange(256) / 255.0)[None, :] ** rng.uniform(*nuisances.gamma) * gain[:, None]
    pixels = tables.astype(np.float32)[np.arange(3), np.asarray(image)]  # (H, W, 3)
    ramp_x, ramp_y = _ramps(image_size)
    light_angle, light_amplitude = rng.uniform(0, 2 * np.pi), rng.uniform(0, nuisances.side_light)
    pixels *= 1.0 + (ramp_x * np.cos(light_angle) + ramp_y * np.sin(light_angle)) * light_amplitude
    noise = rng.standard_normal((image_size, image_size, 1), dtype=np.float32)
    noise *= rng.uniform(*nuisances.noise_sigma)
    noise += rng.uniform(-nuisances.bias, nuisances.bias) + 0.5  # bias; + 0.5 rounds in astype
    pixels += noise
    return np.clip(pixels, 0, 255, out=pixels).astype(np.uint8)


def _encode_jpeg(pixels: np.ndarray, quality: int) -> bytes:
    """Baseline JPEG, 4:4:4, fixed quality: the same pixels always give the same bytes."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality, optimize=False,
                                 progressive=False, subsampling=0)
    return buffer.getvalue()


def _image_rng(seed: int, identity: int, image: int) -> np.random.Generator:
    return np.random.default_rng([seed, _IMAGE_STREAM, identity, image])


def render_face(seed: int, identity: int, image: int, image_size: int = 112,
                nuisances: Nuisances = NUISANCES) -> np.ndarray:
    """Image ``image`` of ``identity`` as (H, W, 3) uint8 RGB (deterministic in its arguments)."""
    return _render_image(_Identity(seed, identity), _image_rng(seed, identity, image), image_size,
                         nuisances)


# ----------------------------------------------------------------------------------------------
# the data set on disk
# ----------------------------------------------------------------------------------------------


def make_val_pairs(seed: int, first_identity: int, num_identities: int,
                   num_pairs: int) -> list[tuple[int, int, int, int, bool]]:
    """Pairs (identity_a, image_a, identity_b, image_b, issame) over the held-out identities.

    The first half of the pairs (rounded down) are same-identity, the rest different; then they
    are shuffled so every fold of the 10-fold protocol sees both kinds. Every image is fresh.
    """
    if num_pairs and num_identities < 2:
        raise ValueError(f"val_identities={num_identities}: different-identity pairs need >= 2")
    rng = np.random.default_rng([seed, _PAIR_STREAM])
    next_image = [0] * num_identities  # per held-out identity, so no image is used twice

    def fresh(local_identity: int) -> tuple[int, int]:
        next_image[local_identity] += 1
        return first_identity + local_identity, next_image[local_identity] - 1

    pairs = []
    num_same = num_pairs // 2
    for index in range(num_pairs):
        if index < num_same:
            a = b = int(rng.integers(num_identities))
        else:
            a, b = (int(v) for v in rng.choice(num_identities, 2, replace=False))
        pairs.append((*fresh(a), *fresh(b), index < num_same))
    order = rng.permutation(num_pairs)
    return [pairs[i] for i in order]


def write_synthetic_dataset(out_dir: str, *, num_identities: int = 300,
                            images_per_identity: int = 20, val_identities: int = 100,
                            val_pairs: int = 1000, seed: int = 0, image_size: int = 112,
                            jpeg_quality: int = 90, nuisances: Nuisances = NUISANCES) -> dict:
    """Write train.rec/train.idx, val.bin and meta.json under ``out_dir``; returns the meta.

    Train identities are 0..num_identities-1 (class id = identity); val.bin pairs come from the
    held-out identities num_identities..num_identities+val_identities-1, so none is in train.
    The same arguments give byte-identical files.
    """
    if num_identities < 1 or images_per_identity < 1:
        raise ValueError("write_synthetic_dataset: num_identities and images_per_identity must be >= 1")
    os.makedirs(out_dir, exist_ok=True)
    templates: dict[int, _Identity] = {}

    def jpeg_of(identity: int, image: int) -> bytes:
        if identity not in templates:
            if identity < num_identities:
                templates.clear()  # training identities come one after another: keep one
            templates[identity] = _Identity(seed, identity)
        pixels = _render_image(templates[identity], _image_rng(seed, identity, image), image_size,
                               nuisances)
        return _encode_jpeg(pixels, jpeg_quality)

    layout = write_insightface_rec(out_dir, progress(
        ((identity, jpeg_of(identity, image))
         for identity in range(num_identities) for image in range(images_per_identity)),
        desc="synth train.rec", total=num_identities * images_per_identity, unit="img"))

    pairs = make_val_pairs(seed, num_identities, val_identities, val_pairs)
    jpegs = [jpeg_of(identity, image) for identity_a, image_a, identity_b, image_b, _ in pairs
             for identity, image in ((identity_a, image_a), (identity_b, image_b))]
    issame = [same for *_, same in pairs]
    write_bin(os.path.join(out_dir, "val.bin"), jpegs, issame)

    meta = {
        "format_version": FORMAT_VERSION,
        "num_classes": layout.num_classes,
        "num_images": layout.num_images,
        "num_identities": num_identities,
        "images_per_identity": images_per_identity,
        "val_identities": val_identities,
        "val_pairs": val_pairs,
        "val_same_pairs": int(sum(issame)),
        "val_identity_range": [num_identities, num_identities + val_identities],
        "seed": seed,
        "image_size": image_size,
        "jpeg_quality": jpeg_quality,
        "nuisances": {name: list(value) if isinstance(value, tuple) else value
                      for name, value in dataclasses.asdict(nuisances).items()},
        "files": {"train_rec": "train.rec", "train_idx": "train.idx", "val_bin": "val.bin"},
    }
    with atomic_open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
        f.write("\n")
    logger.debug("wrote synthetic data set %s: %d images of %d identities, %d val pairs",
                 out_dir, layout.num_images, layout.num_classes, val_pairs)
    return meta


def describe_dataset(out_dir: str, meta: dict) -> str:
    """A few lines on what `write_synthetic_dataset` wrote (meta.json beside the files holds the rest)."""
    return "\n".join([
        f"synthetic data set in {out_dir} (every parameter in meta.json):",
        f"  train.rec  {meta['num_images']} images of {meta['num_classes']} identities, "
        f"{meta['image_size']}x{meta['image_size']} JPEG q{meta['jpeg_quality']}, seed {meta['seed']}",
        f"  val.bin    {meta['val_pairs']} pairs ({meta['val_same_pairs']} same identity) of "
        f"{meta['val_identities']} held-out identities",
    ])
