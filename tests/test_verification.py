"""insightface .bin verification sets and the 10-fold protocol."""
from __future__ import annotations

import io
import logging
import re
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from lvface.data.images import normalize_images
from lvface.data.verification_bin import load_bin, write_bin
from lvface.eval.verification import embed_flip_sum, evaluate_pairs, kfold_slices


def _jpeg(seed: int, size=(112, 112)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _decode(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))


# ---------------------------------------------------------------------------------------------
# .bin files
# ---------------------------------------------------------------------------------------------


def test_bin_round_trip(tmp_path):
    jpegs = [_jpeg(i) for i in range(6)]
    path = str(tmp_path / "val.bin")
    write_bin(path, jpegs, [True, False, True])
    assert os.listdir(tmp_path) == ["val.bin"]
    images, issame = load_bin(path)
    assert images.dtype == torch.uint8 and images.shape == (6, 3, 112, 112)
    assert issame.dtype == np.bool_ and issame.tolist() == [True, False, True]
    for image, jpeg in zip(images, jpegs):
        np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), _decode(jpeg))
    # the insightface way reads our file: bytes and bools
    with open(path, "rb") as f:
        bins, issame_list = pickle.load(f, encoding="bytes")
    assert bins == jpegs and issame_list == [True, False, True]


def test_protocol_2_bin_loaded_the_insightface_way(tmp_path):
    # Python 3 pickles bytes at protocol 2 through _codecs.encode; insightface's own files (from
    # Python 2) hold str objects that encoding="bytes" turns into bytes
    jpegs = [_jpeg(i, size=(120, 128)) for i in range(4)]  # also not 112x112: resized
    path = tmp_path / "lfw.bin"
    with open(path, "wb") as f:
        pickle.dump((jpegs, np.array([False, True])), f, protocol=2)
    with open(path, "rb") as f:
        bins, issame_list = pickle.load(f, encoding="bytes")
    assert bins == jpegs
    images, issame = load_bin(str(path), image_size=112)
    assert images.shape == (4, 3, 112, 112) and issame.tolist() == [False, True]


def test_bad_bin_files(tmp_path):
    with pytest.raises(ValueError, match="missing.bin"):
        load_bin(str(tmp_path / "missing.bin"))
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"this is not a pickle")
    with pytest.raises(ValueError, match="garbage.bin"):
        load_bin(str(garbage))
    uneven = tmp_path / "uneven.bin"
    uneven.write_bytes(pickle.dumps(([_jpeg(0)] * 3, [True])))
    with pytest.raises(ValueError, match="uneven.bin.*2 images per pair"):
        load_bin(str(uneven))
    hostile = tmp_path / "hostile.bin"
    hostile.write_bytes(pickle.dumps((os.getcwd, [True])))  # any global but the allowed few
    with pytest.raises(ValueError, match="hostile.bin.*refusing"):
        load_bin(str(hostile))
    broken = tmp_path / "broken.bin"
    broken.write_bytes(pickle.dumps(([b"not a jpeg", _jpeg(1)], [True])))
    with pytest.raises(ValueError, match="broken.bin: image 0"):
        load_bin(str(broken))
    with pytest.raises(ValueError, match="2 images per pair"):
        write_bin(str(tmp_path / "w.bin"), [_jpeg(0)], [True])


# ---------------------------------------------------------------------------------------------
# embeddings
# ---------------------------------------------------------------------------------------------


def test_normalize_images():
    images = torch.tensor([0, 51, 255], dtype=torch.uint8).reshape(1, 3, 1, 1)
    expected = torch.tensor([-1.0, 51 / 255 * 2 - 1, 1.0]).reshape(1, 3, 1, 1)
    torch.testing.assert_close(normalize_images(images), expected)
    assert normalize_images(images).dtype == torch.float32


def test_embed_flip_sum():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (7, 3, 8, 8), dtype=torch.uint8)
    projection = torch.randn(3 * 8 * 8, 512)
    calls = []

    def model_fn(batch):
        calls.append(batch.shape[0])
        return batch.reshape(batch.shape[0], -1) @ projection

    embeddings = embed_flip_sum(model_fn, images, batch_size=3)
    x = normalize_images(images)
    summed = (x.reshape(7, -1) @ projection + x.flip(3).reshape(7, -1) @ projection).numpy()
    expected = summed / np.linalg.norm(summed, axis=1, keepdims=True)
    assert embeddings.shape == (7, 512)
    np.testing.assert_allclose(embeddings, expected, rtol=1e-4, atol=1e-5)
    assert calls == [3, 3, 3, 3, 1, 1]  # plain and flipped per batch; no partial-batch padding


# ---------------------------------------------------------------------------------------------
# 10-fold accuracy
# ---------------------------------------------------------------------------------------------


def _pairs_with_distances(distances: np.ndarray, dim: int = 512, seed: int = 0) -> np.ndarray:
    """(2P, dim) unit embeddings whose pair i has squared L2 distance distances[i] (in [0, 4]).

    All pairs share one plane, so equal distances give bit-identical pairs (exact ties).
    """
    basis, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((dim, 2)))
    embeddings = np.zeros((2 * len(distances), dim))
    for i, distance in enumerate(distances):
        cos = 1 - distance / 2  # |a - b|^2 = 2 - 2 cos
        embeddings[2 * i] = basis[:, 0]
        embeddings[2 * i + 1] = cos * basis[:, 0] + np.sqrt(max(0.0, 1 - cos**2)) * basis[:, 1]
    return embeddings


def test_kfold_slices_like_sklearn():
    sizes = [s.stop - s.start for s in kfold_slices(23, 10)]
    assert sizes == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]  # sklearn KFold: the first n % k folds get 1 more
    assert kfold_slices(23, 10)[0].start == 0 and kfold_slices(23, 10)[-1].stop == 23
    with pytest.raises(ValueError):
        kfold_slices(5, 10)


def test_perfect_separation():
    issame = np.array([True, False] * 50)
    distances = np.where(issame, 0.3, 2.5)
    result = evaluate_pairs(_pairs_with_distances(distances), issame)
    assert result["accuracy"] == 1.0 and result["accuracy_std"] == 0.0
    assert result["auc"] == 1.0
    assert result["tar_at_far"] == {1e-3: 1.0, 1e-2: 1.0, 1e-1: 1.0}
    assert 0.3 < result["best_threshold"] <= 2.5


def test_exactly_ninety_percent():
    # Each fold of 20 pairs: 9 same at 0.5 and 9 different at 3.0 (separable), plus one same pair
    # at 3.0 and one different pair at 0.5 that no threshold can get right: every threshold in
    # (0.5, 3.0] scores 18/20 on every fold, nothing scores more, so the answer is 0.9 exactly.
    # (0.505 and 3.005 keep float rounding away from the 0.01 threshold grid.)
    issame, distances = [], []
    for _ in range(10):
        issame += [True] * 9 + [False] * 9 + [True, False]
        distances += [0.505] * 9 + [3.005] * 9 + [3.005, 0.505]  # between thresholds
    issame, distances = np.array(issame), np.array(distances)
    result = evaluate_pairs(_pairs_with_distances(distances), issame)
    assert result["fold_accuracies"] == pytest.approx([0.9] * 10)
    assert result["accuracy"] == pytest.approx(0.9) and result["accuracy_std"] == pytest.approx(0.0)
    assert result["best_threshold"] == pytest.approx(0.51)  # np.argmax takes the first best


def _insightface_reference(embeddings, issame, nrof_folds=10):
    """insightface recognition/arcface_torch/eval/verification.py calculate_roc, loops and all."""
    thresholds = np.arange(0, 4, 0.01)
    embeddings = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    dist = np.sum(np.square(embeddings[0::2] - embeddings[1::2]), 1)
    n = len(issame)
    fold_sizes = np.full(nrof_folds, n // nrof_folds)
    fold_sizes[: n % nrof_folds] += 1
    indices, start, accuracy = np.arange(n), 0, []
    for size in fold_sizes:
        test_set = indices[start:start + size]
        train_set = np.setdiff1d(indices, test_set)
        start += size

        def acc(threshold, subset):
            predict = np.less(dist[subset], threshold)
            actual = issame[subset]
            tp = np.sum(np.logical_and(predict, actual))
            tn = np.sum(np.logical_and(np.logical_not(predict), np.logical_not(actual)))
            return float(tp + tn) / dist[subset].size

        best = int(np.argmax([acc(t, train_set) for t in thresholds]))
        accuracy.append(acc(thresholds[best], test_set))
    return np.array(accuracy)


def test_matches_insightface_reference_on_random_embeddings():
    rng = np.random.default_rng(1)
    num_pairs = 157  # folds of 16 and 15
    issame = rng.uniform(size=num_pairs) < 0.5
    identity = rng.standard_normal((num_pairs, 64))
    noise = 0.9
    a = identity + noise * rng.standard_normal((num_pairs, 64))
    b = np.where(issame[:, None], identity, rng.standard_normal((num_pairs, 64))) \
        + noise * rng.standard_normal((num_pairs, 64))
    embeddings = np.empty((2 * num_pairs, 64), np.float32)
    embeddings[0::2], embeddings[1::2] = a, b
    expected = _insightface_reference(embeddings, issame)
    result = evaluate_pairs(embeddings, issame)
    np.testing.assert_allclose(result["fold_accuracies"], expected)
    assert result["accuracy"] == pytest.approx(expected.mean())
    assert result["accuracy_std"] == pytest.approx(expected.std())
    assert 0.6 < result["accuracy"] < 1.0  # a non-trivial case


def test_auc_and_tar_at_far_against_brute_force():
    rng = np.random.default_rng(2)
    num_pairs = 400
    issame = rng.uniform(size=num_pairs) < 0.4
    # coarse distances so there are many ties
    distances = np.round(np.clip(np.where(issame, 1.0, 1.8) + 0.5 * rng.standard_normal(num_pairs),
                                 0, 4), 1)
    result = evaluate_pairs(_pairs_with_distances(distances, dim=8), issame)
    embeddings = _pairs_with_distances(distances, dim=8)
    dist = np.sum((embeddings[0::2] - embeddings[1::2]) ** 2, 1)
    score = -dist
    positive, negative = score[issame], score[~issame]
    wins = (positive[:, None] > negative[None, :]).sum() + 0.5 * (positive[:, None] == negative[None, :]).sum()
    assert result["auc"] == pytest.approx(wins / (positive.size * negative.size))
    candidates = np.concatenate([np.unique(score), [np.inf]])
    for target, tar in result["tar_at_far"].items():
        best_far, best_tar = -1.0, 0.0
        for threshold in candidates:  # accept score >= threshold
            far = np.mean(negative >= threshold)
            accepted = np.mean(positive >= threshold)
            if far <= target and (far > best_far or (far == best_far and accepted > best_tar)):
                best_far, best_tar = far, accepted
        assert tar == pytest.approx(best_tar), target
    assert 0 < result["tar_at_far"][1e-2] < result["tar_at_far"][1e-1] < 1


def test_evaluate_pairs_rejects_bad_shapes():
    with pytest.raises(ValueError, match="2 \\* num_pairs"):
        evaluate_pairs(np.ones((5, 4)), np.ones(3, bool))


# ---------------------------------------------------------------------------------------------
# arcface_torch's log lines: XNorm, Accuracy-Flip, Accuracy-Highest
# ---------------------------------------------------------------------------------------------

ARCFACE_LINE = re.compile(r"^\[(?P<name>[\w/]+)\]\[(?P<step>\d+)\](?:XNorm: (?P<xnorm>\d+\.\d{6})|"
                          r"Accuracy-Flip: (?P<acc>\d\.\d{5})\+-(?P<std>\d\.\d{5})|Accuracy-Highest: (?P<best>\d\.\d{5}))$")


def _tiny_bin(path, seed: int = 6, pairs: int = 12) -> str:
    from lvface.data.synthetic import render_face
    from lvface.data.verification_bin import write_bin

    jpegs = []
    for pair in range(pairs):
        for image in (render_face(seed, pair, 0), render_face(seed, pair if pair % 2 == 0 else pair + 100, 1)):
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="JPEG", quality=95)
            jpegs.append(buffer.getvalue())
    write_bin(str(path), jpegs, [pair % 2 == 0 for pair in range(pairs)])
    return str(path)


def _parse_arcface_lines(messages: list[str]) -> list[dict]:
    parsed = [ARCFACE_LINE.match(message) for message in messages if message.startswith("[")]
    assert all(parsed), messages
    return [{k: v for k, v in m.groupdict().items() if v is not None} for m in parsed]


def test_callback_logs_arcface_lines_with_xnorm_and_best_so_far(tmp_path, caplog):
    from lvface.data.verification_bin import load_bin
    from lvface.eval.callback import VerificationCallback

    path = _tiny_bin(tmp_path / "lfw.bin")
    callback = VerificationCallback([path], 4, rank=0, world_size=1, group=None, device="cpu")
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, 8))
    accuracies = {}
    with caplog.at_level(logging.INFO, logger="lvface.eval.callback"):
        for step in (3, 7, 9):
            if step == 7:  # weights that score worse: Accuracy-Highest keeps the earlier best
                with torch.no_grad():
                    module[2].weight.mul_(0).add_(torch.randn_like(module[2].weight))
            accuracies[step] = callback(module, step=step)["lfw"]["accuracy"]
    lines = _parse_arcface_lines([r.getMessage() for r in caplog.records])
    assert [(line["name"], int(line["step"])) for line in lines] == [("lfw", s) for s in (3, 3, 3, 7, 7, 7, 9, 9, 9)]
    # XNorm: the mean norm of the raw embeddings of all images and their mirrors (float64 reference)
    images, _ = load_bin(path)
    x = normalize_images(images).double()
    with torch.no_grad():
        module_64 = module.double()
        norms = torch.cat([module_64(x).norm(dim=1), module_64(x.flip(3)).norm(dim=1)])
        module.float()
    assert float(lines[-3]["xnorm"]) == pytest.approx(norms.mean().item(), rel=1e-5)
    for index, step in enumerate((3, 7, 9)):
        assert float(lines[3 * index + 1]["acc"]) == pytest.approx(accuracies[step], abs=5e-6)
        best = max(accuracies[s] for s in (3, 7, 9) if s <= step)
        assert float(lines[3 * index + 2]["best"]) == pytest.approx(best, abs=5e-6)
    assert accuracies[7] < accuracies[3]  # the case the best-so-far is for did happen
    assert callback.highest["lfw"] == max(accuracies.values())


def _callback_on_ranks(rank, world_size, group, path):
    from lvface.eval.callback import VerificationCallback

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, 8))
    callback = VerificationCallback([path], 4, rank=rank, world_size=world_size, group=group, device="cpu")
    return callback(module, step=1)


def test_callback_xnorm_over_ranks_equals_one_process(tmp_path):
    from dist_utils import run_on_ranks

    path = _tiny_bin(tmp_path / "odd.bin", pairs=11)  # 22 images: 3 ranks get 8, 8 and 6 (padded)
    single = _callback_on_ranks(0, 1, None, path)["odd"]
    results = run_on_ranks(_callback_on_ranks, 3, path)
    assert results[1] == {} and results[2] == {}
    assert results[0]["odd"]["xnorm"] == pytest.approx(single["xnorm"], rel=1e-6)
    assert results[0]["odd"]["accuracy"] == single["accuracy"]
