"""The synthetic data set: determinism, held-out validation identities, counts, difficulty; and
the simple RecordDataset over it."""
from __future__ import annotations

import json
import logging
import pickle

import numpy as np
import pytest
import torch

from lvface.data.torch_loader import RecordDataset
from lvface.data.recordio import InsightFaceRecord
from lvface.data.synthetic import _encode_jpeg, make_val_pairs, render_face, write_synthetic_dataset
from lvface.data.images import normalize_images
from lvface.data.verification_bin import load_bin
from lvface.eval.verification import evaluate_pairs

logger = logging.getLogger(__name__)

SMALL = dict(num_identities=5, images_per_identity=3, val_identities=4, val_pairs=8)
FILES = ("train.rec", "train.idx", "val.bin", "meta.json")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    meta = write_synthetic_dataset(str(out), seed=3, **SMALL)
    return out, meta


def test_same_seed_same_bytes_other_seed_other_bytes(dataset, tmp_path):
    out, _ = dataset
    write_synthetic_dataset(str(tmp_path / "again"), seed=3, **SMALL)
    for name in FILES:
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes(), name
    write_synthetic_dataset(str(tmp_path / "other"), seed=4, **SMALL)
    for name in ("train.rec", "val.bin"):
        assert (tmp_path / "other" / name).read_bytes() != (out / name).read_bytes(), name


def test_counts_match_the_files(dataset):
    out, meta = dataset
    assert json.loads((out / "meta.json").read_text()) == meta
    record = InsightFaceRecord(str(out / "train.rec"))
    assert meta["num_images"] == record.num_images == 15
    assert meta["num_classes"] == record.num_classes == 5
    assert meta["seed"] == 3 and meta["image_size"] == 112
    np.testing.assert_array_equal(record.labels, np.repeat(np.arange(5), 3))
    images, issame = load_bin(str(out / "val.bin"))
    assert images.shape == (16, 3, 112, 112) and issame.size == meta["val_pairs"] == 8
    assert issame.sum() == meta["val_same_pairs"] == 4


def test_val_pairs_come_from_held_out_identities(dataset):
    out, meta = dataset
    pairs = make_val_pairs(3, SMALL["num_identities"], SMALL["val_identities"], SMALL["val_pairs"])
    held_out = range(*meta["val_identity_range"])
    assert list(held_out) == [5, 6, 7, 8]
    with open(out / "val.bin", "rb") as f:
        bins, issame = pickle.load(f, encoding="bytes")
    images_used = set()
    for pair_index, (identity_a, image_a, identity_b, image_b, same) in enumerate(pairs):
        assert identity_a in held_out and identity_b in held_out  # never a training identity
        assert same == (identity_a == identity_b) == issame[pair_index]
        images_used |= {(identity_a, image_a), (identity_b, image_b)}
        # the .bin holds exactly these renders
        assert bins[2 * pair_index] == _encode_jpeg(render_face(3, identity_a, image_a), 90)
        assert bins[2 * pair_index + 1] == _encode_jpeg(render_face(3, identity_b, image_b), 90)
    assert len(images_used) == 2 * len(pairs)  # no image is reused
    train_jpegs = {InsightFaceRecord(str(out / "train.rec"))[i][0] for i in range(15)}
    assert train_jpegs.isdisjoint(bins)


def test_raw_pixels_verify_poorly(tmp_path):
    """The task must not be trivial: cosine similarity of raw pixels is a weak verifier."""
    write_synthetic_dataset(str(tmp_path), num_identities=1, images_per_identity=1,
                            val_identities=40, val_pairs=300, seed=0)
    images, issame = load_bin(str(tmp_path / "val.bin"))
    pixels = normalize_images(images).reshape(len(images), -1).numpy()
    result = evaluate_pairs(pixels, issame)
    logger.info("raw-pixel cosine verification: accuracy %.3f, AUC %.3f",
                result["accuracy"], result["auc"])
    assert result["accuracy"] < 0.75


def test_images_vary_within_and_across_identities():
    same = [render_face(0, 7, image).astype(np.float32) for image in range(2)]
    assert same[0].shape == (112, 112, 3)
    assert np.abs(same[0] - same[1]).mean() > 10  # the nuisances are strong
    np.testing.assert_array_equal(render_face(0, 7, 1), render_face(0, 7, 1))
    assert render_face(0, 7, 1, image_size=64).shape == (64, 64, 3)


def test_record_dataset(dataset):
    out, _ = dataset
    train = RecordDataset(str(out / "train.rec"), train=True, flip_p=1.0, seed=0)
    evaluation = RecordDataset(str(out / "train.rec"), train=False)
    assert len(train) == 15 and train.num_classes == 5
    image, label = evaluation[4]
    assert image.shape == (3, 112, 112) and image.dtype == torch.float32
    assert label.dtype == torch.int64 and int(label) == 1
    assert -1.0 <= float(image.min()) and float(image.max()) <= 1.0
    flipped, _ = train[4]
    torch.testing.assert_close(flipped, image.flip(2))
    torch.testing.assert_close(evaluation[4][0], image)  # no randomness without train
    copy = pickle.loads(pickle.dumps(train))  # what a DataLoader worker receives
    torch.testing.assert_close(copy[4][0], flipped)
    loader = torch.utils.data.DataLoader(evaluation, batch_size=4, num_workers=1)
    labels = torch.cat([batch_labels for _, batch_labels in loader])
    assert labels.tolist() == np.repeat(np.arange(5), 3).tolist()
