"""IJB-C / IJB-B 1:1 verification: alignment, meta files, aggregation, TAR@FAR, ranks, end to end."""
from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dist_utils import run_on_ranks
from lvface.data.synthetic import render_face
from lvface.eval.ijbc import (
    ARCFACE_TEMPLATE, AlignedIJBFaces, align_face, embed_faces, estimate_similarity, evaluate_ijb,
    format_tar_table, read_ijb_meta, roc_area, roc_curve, score_ijb, tar_at_far_nearest, template_features,
    write_roc_png,
)


# ---------------------------------------------------------------------------------------------
# an independent warp (numpy, cv2.warpAffine semantics: integer pixel centres, bilinear, black outside)
# ---------------------------------------------------------------------------------------------


def numpy_warp(src: np.ndarray, matrix: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """out[y, x] = bilinear sample of src at matrix^-1 (x, y); float32 (H, W, C); 0 where any of the
    four neighbours lies outside."""
    inverse = np.linalg.inv(matrix)
    ys, xs = np.mgrid[0:out_hw[0], 0:out_hw[1]].astype(np.float64)
    sx = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
    sy = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
    x0, y0 = np.floor(sx).astype(int), np.floor(sy).astype(int)
    fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]
    h, w = src.shape[:2]
    inside = (x0 >= 0) & (y0 >= 0) & (x0 + 1 < w) & (y0 + 1 < h)
    x0c, y0c = np.clip(x0, 0, w - 2), np.clip(y0, 0, h - 2)
    src = src.astype(np.float64)
    out = (src[y0c, x0c] * (1 - fx) * (1 - fy) + src[y0c, x0c + 1] * fx * (1 - fy)
           + src[y0c + 1, x0c] * (1 - fx) * fy + src[y0c + 1, x0c + 1] * fx * fy)
    return np.where(inside[..., None], out, 0.0).astype(np.float32)


def similarity(scale: float, angle: float, tx: float, ty: float) -> np.ndarray:
    c, s = scale * math.cos(angle), scale * math.sin(angle)
    return np.array([[c, -s, tx], [s, c, ty], [0.0, 0.0, 1.0]])


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:2, :2].T + matrix[:2, 2]


def place_face(face: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Paste an aligned 112x112 face into a larger loose crop at a random similarity transform:
    (crop uint8, the transform aligned -> crop, the 5 landmarks in the crop)."""
    scale, angle = rng.uniform(1.3, 1.7), rng.uniform(-0.35, 0.35)
    width, height = int(rng.integers(230, 260)), int(rng.integers(240, 270))
    centre = np.array([width / 2 + rng.uniform(-10, 10), height / 2 + rng.uniform(-10, 10)])
    matrix = similarity(scale, angle, 0.0, 0.0)
    matrix[:2, 2] = centre - apply(matrix, np.array([[55.5, 55.5]]))[0]
    warped = numpy_warp(face, matrix, (height, width))
    coverage = numpy_warp(np.ones((112, 112, 1), np.float32), matrix, (height, width))
    background = rng.uniform(40, 200, 3)[None, None] + rng.normal(0, 12, (height, width, 3))
    crop = np.clip(warped + (1 - coverage) * background + 0.5, 0, 255).astype(np.uint8)
    return crop, matrix, apply(matrix, ARCFACE_TEMPLATE).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# a miniature IJB-C: identities x templates x medias x images, loose crops, the three meta files
# ---------------------------------------------------------------------------------------------


def make_mini_ijb(root: Path, name: str = "IJBC", identities: int = 4, templates_per_identity: int = 2,
                  seed: int = 0) -> dict:
    """Write a miniature IJB set under root; return what the test needs to know about it."""
    rng = np.random.default_rng(seed)
    (root / "meta").mkdir(parents=True)
    (root / "loose_crop").mkdir()
    faces, ids, originals, identity_of, scores = [], [], [], [], []
    template_identity, template_id, media_id, image_index = {}, 100, 5000, 0
    for identity in range(identities):
        for _ in range(templates_per_identity):
            template_id += int(rng.integers(1, 4))  # ids with gaps, as the real files have
            template_identity[template_id] = identity
            for _ in range(int(rng.integers(1, 3))):  # 1-2 medias per template
                media_id += int(rng.integers(1, 4))
                for _ in range(int(rng.integers(1, 3))):  # 1-2 images per media
                    face = render_face(seed, identity, image_index, image_size=112)
                    crop, _, landmarks = place_face(face, rng)
                    image_name = f"{image_index + 1}.png"
                    Image.fromarray(crop).save(root / "loose_crop" / image_name)
                    score = float(rng.uniform(0.5, 1.0))
                    faces.append(f"{image_name} " + " ".join(f"{v:.4f}" for v in landmarks.ravel()) + f" {score:.6f}")
                    ids.append(f"{image_name} {template_id} {media_id}")
                    originals.append(face)
                    identity_of.append(identity)
                    scores.append(float(f"{score:.6f}"))
                    image_index += 1
    templates = sorted(template_identity)
    pairs = [(a, b, int(template_identity[a] == template_identity[b]))
             for i, a in enumerate(templates) for b in templates[i + 1:]]
    prefix = name.lower()
    (root / "meta" / f"{prefix}_name_5pts_score.txt").write_text("\n".join(faces) + "\n")
    (root / "meta" / f"{prefix}_face_tid_mid.txt").write_text("\n".join(ids) + "\n")
    (root / "meta" / f"{prefix}_template_pair_label.txt").write_text("".join(f"{a} {b} {same}\n" for a, b, same in pairs))
    return {"originals": np.stack(originals), "identity": np.array(identity_of), "scores": np.array(scores),
            "pairs": pairs, "template_identity": template_identity}


@pytest.fixture(scope="module")
def mini_ijb(tmp_path_factory):
    root = tmp_path_factory.mktemp("ijb") / "IJBC"
    return root, make_mini_ijb(root)


# ---------------------------------------------------------------------------------------------
# alignment
# ---------------------------------------------------------------------------------------------


def test_estimate_similarity_recovers_a_known_transform():
    rng = np.random.default_rng(1)
    for _ in range(5):
        matrix = similarity(rng.uniform(0.3, 3), rng.uniform(-3, 3), *rng.uniform(-50, 50, 2))
        estimated = estimate_similarity(apply(matrix, ARCFACE_TEMPLATE), ARCFACE_TEMPLATE)
        np.testing.assert_allclose(estimated, np.linalg.inv(matrix), atol=1e-9)


def test_estimate_similarity_is_the_least_squares_similarity():
    # with noisy points: [a -b; b a] x + t is linear in (a, b, tx, ty): solve it with lstsq
    rng = np.random.default_rng(2)
    src = ARCFACE_TEMPLATE + rng.normal(0, 3, (5, 2))
    dst = apply(similarity(1.7, 0.4, 10, -4), src) + rng.normal(0, 2, (5, 2))
    rows = []
    for (x, y) in src:
        rows += [[x, -y, 1, 0], [y, x, 0, 1]]
    a, b, tx, ty = np.linalg.lstsq(np.array(rows), dst.ravel(), rcond=None)[0]
    np.testing.assert_allclose(estimate_similarity(src, dst), [[a, -b, tx], [b, a, ty], [0, 0, 1]], atol=1e-9)
    with pytest.raises(ValueError, match="coincide"):
        estimate_similarity(np.ones((5, 2)), ARCFACE_TEMPLATE)


def _lstsq_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The least-squares similarity in float64, by a linear solve: [a -b; b a] x + t is linear in (a, b, tx, ty)."""
    rows = []
    for (x, y) in np.asarray(src, np.float64):
        rows += [[x, -y, 1, 0], [y, x, 0, 1]]
    a, b, tx, ty = np.linalg.lstsq(np.array(rows), np.asarray(dst, np.float64).ravel(), rcond=None)[0]
    return np.array([[a, -b, tx], [b, a, ty], [0, 0, 1]])


def _loose_landmarks(rng: np.random.Generator) -> np.ndarray:
    """5 float32 landmarks of a face somewhere in a loose crop, as the IJB meta files give them."""
    points = ARCFACE_TEMPLATE * rng.uniform(0.5, 4) @ np.array([[1, 0.2], [-0.2, 1]]) + rng.normal(0, 3, (5, 2))
    return (points + rng.uniform(0, 300, 2)).astype(np.float32)


def test_estimate_similarity_in_float32_is_the_float64_closed_form():
    # insightface gives skimage float32 landmarks and a float32 template, and skimage then computes in
    # float32; so do we (bit for bit, see the skimage test below). Same math as the float64 closed form:
    # equal up to float32 rounding, scaled by the magnitude the translation carries (|linear| * |points|;
    # 2.4 eps was the worst of 2000 draws here).
    rng = np.random.default_rng(4)
    eps = np.finfo(np.float32).eps
    float32_path_used = False
    for _ in range(50):
        landmarks = _loose_landmarks(rng)
        got = estimate_similarity(landmarks, ARCFACE_TEMPLATE)
        closed_form = _lstsq_similarity(landmarks, ARCFACE_TEMPLATE)
        magnitude = np.abs(closed_form[:2, :2]).max() * (1 + np.abs(landmarks).max())
        np.testing.assert_allclose(got, closed_form, rtol=0, atol=16 * eps * magnitude)
        float64 = estimate_similarity(landmarks.astype(np.float64), ARCFACE_TEMPLATE.astype(np.float64))
        np.testing.assert_allclose(float64, closed_form, rtol=0, atol=1e-9 * magnitude)
        float32_path_used |= not np.array_equal(got, float64)
    assert float32_path_used  # float32 points are not silently promoted


def test_estimate_similarity_equals_skimage_bit_for_bit():
    """Where scikit-image is installed: our estimate is skimage's SimilarityTransform.estimate to the last bit,
    for insightface's float32 inputs and for float64 ones."""
    transform = pytest.importorskip("skimage.transform")
    rng = np.random.default_rng(6)
    for _ in range(200):
        landmarks = _loose_landmarks(rng)
        for dtype in (np.float32, np.float64):
            reference = transform.SimilarityTransform()
            reference.estimate(landmarks.astype(dtype), ARCFACE_TEMPLATE.astype(dtype))
            assert np.array_equal(estimate_similarity(landmarks.astype(dtype), ARCFACE_TEMPLATE.astype(dtype)),
                                  reference.params)


def test_estimate_similarity_degenerate_points():
    line = np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]])
    matrix = estimate_similarity(line, 2 * line + 5)  # collinear (rank 1): still the exact similarity
    np.testing.assert_allclose(matrix, [[2, 0, 5], [0, 2, 5], [0, 0, 1]], atol=1e-12)
    with pytest.raises(ValueError, match="destination points coincide"):
        estimate_similarity(line, np.ones((5, 2)))


def _cut_crop(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A loose crop cut so tightly (left and top) that the aligned 112x112 window reaches outside it."""
    crop, _, landmarks = place_face(render_face(11, int(rng.integers(100)), 0, image_size=112), rng)
    cut = np.array([70, 75])
    return np.ascontiguousarray(crop[cut[1]:, cut[0]:]), (landmarks - cut).astype(np.float32)


def test_aligned_crop_equals_cv2_warp_affine(tmp_path):
    rng = np.random.default_rng(8)
    cases = [place_face(render_face(9, i, 0, image_size=112), rng)[::2] for i in range(3)]
    cases += [_cut_crop(rng) for _ in range(3)]
    for index, (crop, landmarks) in enumerate(cases):
        matrix = estimate_similarity(landmarks, ARCFACE_TEMPLATE)
        expected = cv2.warpAffine(crop, matrix[:2], (112, 112), borderValue=0.0)
        aligned = align_face(crop, landmarks)
        assert aligned.dtype == np.uint8 and np.array_equal(aligned, expected), index
        if index >= 3:
            # the part of the window outside the crop is black (cv2's borderValue 0), not repeated edge pixels
            inverse = np.linalg.inv(matrix)
            ys, xs = np.mgrid[0:112, 0:112]
            source_x = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
            source_y = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
            outside = (source_x < -1) | (source_y < -1)
            assert outside.sum() > 200 and (aligned[outside] == 0).all()
            replicated = cv2.warpAffine(crop, matrix[:2], (112, 112), borderMode=cv2.BORDER_REPLICATE)
            assert (replicated[outside] > 0).any(axis=-1).mean() > 0.9  # edge replication would not be black
    # through the dataset: decoded by cv2 (BGR) from a JPEG, warped, turned into RGB
    crop, landmarks = cases[3]
    cv2.imwrite(str(tmp_path / "face.jpg"), crop[..., ::-1].copy(), [cv2.IMWRITE_JPEG_QUALITY, 90])  # crop is RGB
    bgr = cv2.imread(str(tmp_path / "face.jpg"))
    expected = cv2.warpAffine(bgr, estimate_similarity(landmarks, ARCFACE_TEMPLATE)[:2], (112, 112), borderValue=0.0)
    item = AlignedIJBFaces(tmp_path, ["face.jpg"], landmarks[None])[0]  # (3, 112, 112) RGB
    assert np.array_equal(item.permute(1, 2, 0).numpy(), expected[..., ::-1])


def test_alignment_recovers_a_placed_face():
    rng = np.random.default_rng(3)
    for image in range(3):
        face = render_face(7, image, 0, image_size=112)
        crop, matrix, landmarks = place_face(face, rng)
        aligned = align_face(crop, landmarks)
        assert aligned.shape == (112, 112, 3) and aligned.dtype == np.uint8
        # the same warp by the independent numpy sampler: equal up to rounding (away from the border)
        reference = numpy_warp(crop, np.linalg.inv(matrix), (112, 112))
        diff = np.abs(aligned.astype(np.float32) - reference)[2:-2, 2:-2]
        assert diff.max() <= 1.0 + 1e-3, diff.max()
        # and the face that was placed, up to the blur of two bilinear resamplings (compared after a
        # Gaussian blur), much closer than with the landmarks one pixel off
        shifted = align_face(crop, landmarks + np.array([1.0, 0.0], np.float32))
        error, shifted_error = _blurred_error(aligned, face), _blurred_error(shifted, face)
        assert error < 1.0 and error < 0.5 * shifted_error, (error, shifted_error)


def _blurred_error(a: np.ndarray, b: np.ndarray) -> float:
    from PIL import ImageFilter

    def blur(x):
        return np.asarray(Image.fromarray(x).filter(ImageFilter.GaussianBlur(1)), np.float32)

    return float(np.abs(blur(a) - blur(b))[4:-4, 4:-4].mean())


# ---------------------------------------------------------------------------------------------
# meta files
# ---------------------------------------------------------------------------------------------


def test_read_meta(mini_ijb):
    root, truth = mini_ijb
    meta = read_ijb_meta(root, "ijbc")
    assert meta.name == "IJBC" and len(meta.image_names) == len(truth["identity"])
    assert meta.landmarks.shape == (len(truth["identity"]), 5, 2)
    np.testing.assert_allclose(meta.face_scores, truth["scores"], rtol=1e-6)
    assert meta.pair_templates.shape == (len(truth["pairs"]), 2)
    assert meta.pair_labels.tolist() == [bool(same) for _, _, same in truth["pairs"]]


def _copy_root(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


CORRUPTIONS = [
    # (meta file, how to corrupt it, a phrase the error must contain)
    ("ijbc_name_5pts_score.txt", lambda t: t.replace(t.splitlines()[2], " ".join(t.splitlines()[2].split()[:-1])),
     "ijbc_name_5pts_score.txt:3"),
    ("ijbc_name_5pts_score.txt", lambda t: t.replace(t.split()[3], "abc", 1), "ijbc_name_5pts_score.txt"),
    ("ijbc_face_tid_mid.txt", lambda t: "\n".join(t.splitlines()[:-1]) + "\n", "ijbc_face_tid_mid.txt"),
    ("ijbc_face_tid_mid.txt", lambda t: t.replace(t.split()[0], "other.png", 1), "ijbc_face_tid_mid.txt"),
    ("ijbc_face_tid_mid.txt", lambda t: t.replace(t.split()[1], "1.5", 1), "ijbc_face_tid_mid.txt"),
    ("ijbc_template_pair_label.txt", lambda t: t.replace(" 0\n", " 2\n", 1), "ijbc_template_pair_label.txt"),
    ("ijbc_template_pair_label.txt", lambda t: t + "101 x 1\n", "ijbc_template_pair_label.txt"),
    ("ijbc_template_pair_label.txt", lambda t: t + "101 102\n", "ijbc_template_pair_label.txt"),
    ("ijbc_template_pair_label.txt", lambda t: t + "101 999999 1\n", "ijbc_template_pair_label.txt"),
    ("ijbc_template_pair_label.txt", lambda t: "", "ijbc_template_pair_label.txt"),
    ("ijbc_name_5pts_score.txt", lambda t: "\n\n", "ijbc_name_5pts_score.txt"),
]


@pytest.mark.parametrize("index", range(len(CORRUPTIONS)))
def test_corrupt_meta_file_is_named(mini_ijb, tmp_path, index):
    file_name, corrupt, phrase = CORRUPTIONS[index]
    root = _copy_root(mini_ijb[0], tmp_path / "IJBC")
    path = root / "meta" / file_name
    path.write_text(corrupt(path.read_text()))
    with pytest.raises(ValueError) as error:
        read_ijb_meta(root, "IJBC")
    assert phrase in str(error.value), str(error.value)


@pytest.mark.parametrize("file_name", ["ijbc_name_5pts_score.txt", "ijbc_face_tid_mid.txt",
                                       "ijbc_template_pair_label.txt"])
def test_missing_meta_file_is_named(mini_ijb, tmp_path, file_name):
    root = _copy_root(mini_ijb[0], tmp_path / "IJBC")
    (root / "meta" / file_name).unlink()
    with pytest.raises(FileNotFoundError, match=file_name):
        read_ijb_meta(root, "IJBC")
    with pytest.raises(FileNotFoundError, match="ijbb_"):
        read_ijb_meta(mini_ijb[0], "IJBB")  # the IJB-B files are not there


def test_unreadable_image_is_named(mini_ijb, tmp_path):
    root = _copy_root(mini_ijb[0], tmp_path / "IJBC")
    (root / "loose_crop" / "2.png").write_bytes(b"not an image")
    meta = read_ijb_meta(root, "IJBC")
    dataset = AlignedIJBFaces(meta.image_dir, meta.image_names, meta.landmarks)
    with pytest.raises(ValueError, match="2.png"):
        dataset[1]


# ---------------------------------------------------------------------------------------------
# ROC and TAR @ FAR (the nearest-FPR convention of insightface's IJB table)
# ---------------------------------------------------------------------------------------------


def reference_tar_at_far(labels, scores, fars):
    """Straightforward loops: one ROC point per distinct threshold (counted directly), collinear
    points dropped as sklearn's roc_curve does, (0, 0) prepended, then insightface's table rule:
    flip the curve and take min over (|fpr - far|, index)."""
    labels, scores = list(map(bool, labels)), list(map(float, scores))
    points = []
    for threshold in sorted(set(scores), reverse=True):
        tp = sum(1 for s, same in zip(scores, labels) if s >= threshold and same)
        fp = sum(1 for s, same in zip(scores, labels) if s >= threshold and not same)
        points.append((fp, tp))
    kept = [points[0]]
    for i in range(1, len(points) - 1):
        (f0, t0), (f1, t1), (f2, t2) = points[i - 1], points[i], points[i + 1]
        if f0 - 2 * f1 + f2 != 0 or t0 - 2 * t1 + t2 != 0:
            kept.append(points[i])
    if len(points) > 1:
        kept.append(points[-1])
    kept = [(0, 0)] + kept
    fpr = [fp / kept[-1][0] for fp, _ in kept][::-1]
    tpr = [tp / kept[-1][1] for _, tp in kept][::-1]
    table = {}
    for far in fars:
        _, index = min(zip([abs(f - far) for f in fpr], range(len(fpr))))
        table[far] = tpr[index]
    return table


def test_tar_at_far_hand_worked_example():
    # scores: P .9, N .8, N .7, N .6, P .5, N .4 -> points (fp, tp): (0,1) (1,1) (2,1) (3,1) (3,2) (4,2);
    # (1,1) and (2,1) lie on a line and are dropped -> FPR 0, 0, .75, .75, 1. At FAR .5 the nearest FPR
    # is .75 (TPR .5 and 1): the larger, 1.0 (without the drop it would be FPR .5, TPR .5).
    labels = np.array([1, 0, 0, 0, 1, 0], bool)
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    fpr, tpr, thresholds = roc_curve(labels, scores)
    np.testing.assert_allclose(fpr, [0, 0, 0.75, 0.75, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
    assert thresholds[0] == np.inf and thresholds[1] == 0.9
    table = tar_at_far_nearest(fpr, tpr, [0.5, 0.1, 1e-6])
    assert {far: point["tar"] for far, point in table.items()} == {0.5: 1.0, 0.1: 0.5, 1e-6: 0.5}
    assert reference_tar_at_far(labels, scores, [0.5, 0.1, 1e-6]) == {0.5: 1.0, 0.1: 0.5, 1e-6: 0.5}


@pytest.mark.parametrize("seed", range(4))
def test_tar_at_far_matches_independent_computation(seed):
    rng = np.random.default_rng(seed)
    num_pos, num_neg = int(rng.integers(50, 300)), int(rng.integers(300, 1500))
    labels = np.r_[np.ones(num_pos, bool), np.zeros(num_neg, bool)]
    scores = np.r_[rng.normal(1.0, 1.0, num_pos), rng.normal(-1.0, 1.0, num_neg)]
    if seed % 2:
        scores = np.round(scores, 1)  # many ties
    order = rng.permutation(labels.size)
    labels, scores = labels[order], scores[order]
    fars = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 0.3)
    fpr, tpr, _ = roc_curve(labels, scores)
    got = {far: point["tar"] for far, point in tar_at_far_nearest(fpr, tpr, fars).items()}
    assert got == pytest.approx(reference_tar_at_far(labels, scores, fars), abs=1e-12)


def test_table_and_roc_png(tmp_path):
    fpr = np.array([0, 1e-5, 1e-3, 0.1, 1.0])
    tpr = np.array([0, 0.5, 0.8, 0.95, 1.0])
    path = write_roc_png(tmp_path / "roc.png", {"a": (fpr, tpr), "b": (fpr, tpr ** 2)}, title="test")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (800, 600)
        assert image.mode == "RGBA"
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3).astype(int)
    # non-blank: dark text and axes, and both curves in matplotlib's first two colours (C0, C1)
    assert (pixels.sum(1) < 200).mean() > 0.002
    for colour in ((31, 119, 180), (255, 127, 14)):
        assert (np.abs(pixels - colour).sum(1) < 30).sum() > 300, colour
    assert roc_area(fpr, tpr) == pytest.approx(np.trapezoid(tpr, fpr) if hasattr(np, "trapezoid") else np.trapz(tpr, fpr))
    table = format_tar_table({"a-IJBC": {1e-6: 0.5, 1e-5: 0.6, 1e-4: 0.7, 1e-3: 0.8, 1e-2: 0.9, 1e-1: 0.999}})
    assert "1e-06" in table and "99.90" in table and "a-IJBC" in table


# ---------------------------------------------------------------------------------------------
# aggregation, end to end with a "perfect" model
# ---------------------------------------------------------------------------------------------


def test_template_features_against_loops():
    rng = np.random.default_rng(5)
    features = rng.normal(size=(40, 8))
    templates = rng.choice([3, 9, 11, 20], size=40)
    medias = rng.choice([1, 2, 3], size=40) + 10 * templates  # medias belong to one template
    ids, feats = template_features(features, templates, medias)
    assert ids.tolist() == [3, 9, 11, 20]
    for row, template in enumerate(ids):
        total = np.zeros(8)
        for media in np.unique(medias[templates == template]):
            total += features[(templates == template) & (medias == media)].mean(0)
        np.testing.assert_allclose(feats[row], total / np.linalg.norm(total), atol=1e-12)


class NearestOriginalModel:
    """A "perfect" embedder for the miniature set: it recognises each aligned image (or its mirror)
    as the nearest of the faces that were placed into the crops, and returns that face's known
    feature: 3 * one-hot(identity) + per-image noise (another noise for the mirror image)."""

    def __init__(self, originals: np.ndarray, identity: np.ndarray, dim: int = 8, seed: int = 0):
        rng = np.random.default_rng(seed)
        bank = torch.from_numpy(originals).permute(0, 3, 1, 2).float() / 127.5 - 1  # (n, 3, 112, 112)
        self.bank = torch.cat([bank, torch.flip(bank, dims=[3])]).flatten(1)  # (2n, 3*112*112)
        onehot = np.eye(dim)[identity] * 3.0
        self.features = np.concatenate([onehot + rng.normal(0, 0.3, onehot.shape),
                                        onehot + rng.normal(0, 0.3, onehot.shape)])  # (2n, dim)
        self.max_error = 0.0

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        error = (batch.flatten(1)[:, None, :] - self.bank[None]).abs()[..., :].mean(-1)  # (B, 2n)
        best = error.argmin(1)
        self.max_error = max(self.max_error, float(error.min(1).values.max()))
        return torch.from_numpy(self.features[best.numpy()]).float()


def expected_scores(truth: dict, model: NearestOriginalModel, meta, detector_score: bool = True) -> np.ndarray:
    """insightface's aggregation written out with loops, from the known per-image features."""
    n = len(truth["identity"])
    image_feats = model.features[:n] + model.features[n:]
    if detector_score:
        image_feats = image_feats * truth["scores"][:, None]
    template_feats = {}
    for template in np.unique(meta.templates):
        total = 0
        for media in np.unique(meta.medias[meta.templates == template]):
            rows = np.flatnonzero((meta.templates == template) & (meta.medias == media))
            total = total + image_feats[rows].mean(0)
        template_feats[template] = total / np.linalg.norm(total)
    return np.array([template_feats[a] @ template_feats[b] for a, b, _ in truth["pairs"]])


def test_end_to_end_perfect_embedding(mini_ijb, tmp_path):
    root, truth = mini_ijb
    model = NearestOriginalModel(truth["originals"], truth["identity"])
    result = evaluate_ijb(model, root, "IJBC", batch_size=4, output_dir=tmp_path / "out", label="perfect")
    assert model.max_error < 0.05  # every aligned crop is (nearly) the face that was placed: alignment works
    assert result["tar_at_far"] == {far: 1.0 for far in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)}
    assert result["auc"] == 1.0
    assert result["num_pairs"] == len(truth["pairs"]) and result["num_templates"] == 8
    meta = read_ijb_meta(root, "IJBC")
    scores = np.load(result["scores_file"])
    np.testing.assert_allclose(scores, expected_scores(truth, model, meta), atol=1e-5)
    assert Path(result["roc_png"]).is_file() and Path(result["json_file"]).is_file()
    assert "perfect-IJBC" in result["table"]


def test_flip_and_detector_score_switches(mini_ijb):
    root, truth = mini_ijb
    model = NearestOriginalModel(truth["originals"], truth["identity"])
    meta = read_ijb_meta(root, "IJBC")
    dataset = AlignedIJBFaces(meta.image_dir, meta.image_names, meta.landmarks)
    plain = embed_faces(model, dataset, batch_size=3, flip=False)
    flipped = embed_faces(model, dataset, batch_size=5, flip=True)
    n = len(dataset)
    np.testing.assert_allclose(plain, model.features[:n], atol=1e-6)
    np.testing.assert_allclose(flipped, model.features[:n] + model.features[n:], atol=1e-6)
    unweighted = score_ijb(meta, flipped, detector_score=False)["scores"]
    np.testing.assert_allclose(unweighted, expected_scores(truth, model, meta, detector_score=False), atol=1e-5)
    weighted = score_ijb(meta, flipped)["scores"]
    assert np.abs(weighted - unweighted).max() > 1e-3  # the weights matter in this set


def insightface_protocol(face_features, face_scores, templates, medias, pairs):
    """insightface eval_ijbc.py's steps 3-5 (N1 D1 F1) written plainly: the flip-summed float32 features
    times the detector scores; per template, per media (ascending ids) the mean of its faces, summed
    over the medias; L2-normalised in float64; the cosine of each pair."""
    weighted = face_features * face_scores[:, None]  # float32, as insightface's arrays
    template_feats = {}
    for template in np.unique(templates):
        medias_of_template = medias[templates == template]
        rows_of_template = weighted[templates == template]
        media_feats = [rows_of_template[medias_of_template == media].mean(axis=0) for media in np.unique(medias_of_template)]
        total = np.sum(np.array(media_feats), axis=0).astype(np.float64)
        template_feats[template] = total / np.sqrt((total ** 2).sum())
    return np.array([template_feats[a] @ template_feats[b] for a, b in pairs])


def test_scores_equal_the_insightface_protocol(mini_ijb, tmp_path):
    root, truth = mini_ijb
    meta = read_ijb_meta(root, "IJBC")
    dataset = AlignedIJBFaces(meta.image_dir, meta.image_names, meta.landmarks)
    # the same aligned faces: cv2.imread (BGR), the estimated similarity, cv2.warpAffine, RGB
    for index in range(len(dataset)):
        bgr = cv2.imread(str(meta.image_dir / meta.image_names[index]))
        matrix = estimate_similarity(meta.landmarks[index], ARCFACE_TEMPLATE)
        expected = cv2.cvtColor(cv2.warpAffine(bgr, matrix[:2], (112, 112), borderValue=0.0), cv2.COLOR_BGR2RGB)
        assert np.array_equal(dataset[index].permute(1, 2, 0).numpy(), expected)
    # the same features: embed_faces is what evaluate_ijb runs
    features = embed_faces(pooled_features, dataset, batch_size=4)
    assert features.dtype == np.float32
    result = evaluate_ijb(pooled_features, root, "IJBC", batch_size=4, output_dir=tmp_path / "out", meta=meta)
    scores = np.load(result["scores_file"])
    expected = insightface_protocol(features, meta.face_scores, meta.templates, meta.medias, meta.pair_templates)
    # same math in the same precisions: equal to float64 rounding (an aggregation in float64 instead of
    # insightface's float32 differs by ~1e-8 and fails this)
    np.testing.assert_allclose(scores, expected, rtol=0, atol=64 * np.finfo(np.float64).eps)
    assert np.abs(expected - expected.mean()).max() > 1e-3  # scores that tell pairs apart, not a constant
    fars = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
    assert result["tar_at_far"] == pytest.approx(reference_tar_at_far(meta.pair_labels, expected, fars), abs=1e-12)
    fpr, tpr, _ = roc_curve(meta.pair_labels, expected)
    assert result["auc"] == pytest.approx(roc_area(fpr, tpr), abs=1e-12)
    with Image.open(result["roc_png"]) as image:
        assert image.size == (800, 600)


# ---------------------------------------------------------------------------------------------
# split over ranks
# ---------------------------------------------------------------------------------------------


def pooled_features(batch: torch.Tensor) -> torch.Tensor:
    return F.adaptive_avg_pool2d(batch, 4).flatten(1)  # (B, 48), a deterministic stand-in model


def embed_on_ranks(rank, world_size, group, root):
    meta = read_ijb_meta(root, "IJBC")
    dataset = AlignedIJBFaces(meta.image_dir, meta.image_names, meta.landmarks)
    odd = torch.utils.data.Subset(dataset, range(len(dataset) // 2 * 2 - 1))  # uneven slices: padded for all_gather
    features = embed_faces(pooled_features, odd, batch_size=2, rank=rank, world_size=world_size, group=group)
    result = evaluate_ijb(pooled_features, root, "IJBC", batch_size=2, rank=rank, world_size=world_size,
                          group=group, meta=meta)
    return features, (result["tar_at_far"] if result is not None else None)


def test_split_over_ranks_matches_one_process(mini_ijb):
    root, _ = mini_ijb
    meta = read_ijb_meta(root, "IJBC")
    dataset = AlignedIJBFaces(meta.image_dir, meta.image_names, meta.landmarks)
    single = embed_faces(pooled_features, dataset, batch_size=3)[: len(dataset) // 2 * 2 - 1]
    single_tars = evaluate_ijb(pooled_features, root, "IJBC", meta=meta)["tar_at_far"]
    (features0, tars0), (features1, tars1) = run_on_ranks(embed_on_ranks, 2, str(root))
    np.testing.assert_allclose(features0, single, atol=1e-6)
    np.testing.assert_allclose(features1, single, atol=1e-6)
    assert tars0 == single_tars and tars1 is None
