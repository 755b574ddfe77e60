"""The DALI loader (CPU pipeline, device_id=None) against the torch fallback: same order, same images."""
import io
import logging

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from test_loader import config, corrupt_rec, damaged_scan, epoch_labels, face_jpegs  # noqa: E402

from lvface.data.dali import DaliTrainLoader  # noqa: E402
from lvface.data.loader import build_train_loader  # noqa: E402
from lvface.data.torch_loader import TorchTrainLoader  # noqa: E402
from lvface.data.recordio import write_insightface_rec  # noqa: E402
from lvface.data.sampler import epoch_order  # noqa: E402

CPU = torch.device("cpu")
AUGMENTATIONS = dict(crop_p=0.5, color_p=0.5, grayscale_p=0.2, blur_p=0.5, mask_p=0.5)


@pytest.fixture(scope="module")
def jpegs():
    return face_jpegs(10, seed=1)


@pytest.fixture(scope="module")
def insightface_rec(tmp_path_factory, jpegs):
    """insightface layout (header record 0, identity records after the images), sorted by identity."""
    samples = [(identity, jpegs[(identity + j) % len(jpegs)]) for identity in range(12) for j in range(5)]
    return write_insightface_rec(str(tmp_path_factory.mktemp("insightface")), samples)


def both(rec, **overrides):
    kwargs = dict(rank=1, world_size=2, seed=11, device=CPU)
    kwargs.update({k: overrides.pop(k) for k in list(overrides) if k in ("rank", "world_size", "seed")})
    dali = build_train_loader(config(rec, loader="dali", dali_threads=2, **overrides), **kwargs)
    fallback = build_train_loader(config(rec, loader="torch", **overrides), **kwargs)
    assert isinstance(dali, DaliTrainLoader) and isinstance(fallback, TorchTrainLoader)
    return dali, fallback


@pytest.mark.parametrize("augment", [False, True], ids=["plain", "augmented"])
def test_dali_matches_fallback(insightface_rec, augment):
    overrides = dict(AUGMENTATIONS) if augment else {}
    dali, fallback = both(insightface_rec.rec_path, batch_size=6, **overrides)
    for loader in (dali, fallback):
        loader.set_epoch(2)
    pairs = list(zip(dali, fallback))
    assert len(pairs) == dali.batches_per_epoch == 5
    for (dali_images, dali_labels), (images, labels) in pairs:
        assert torch.equal(dali_labels, labels) and dali_labels.dtype == torch.int64
        assert dali_images.shape == images.shape == (6, 3, 112, 112) and dali_images.dtype == torch.float32
        levels = (dali_images - images).abs() * 127.5  # in uint8 steps
        if augment:  # each stage rounds to uint8: at most 2 steps apart, almost everywhere equal
            assert levels.max() <= 2.01 and levels.mean() < 0.01
        else:  # the same libjpeg-turbo decode: equal up to float rounding of the normalisation
            assert levels.max() < 1e-3
    order = epoch_order(60, 11, 2)
    expected = [order[k * 12 + 6:k * 12 + 12] // 5 for k in range(5)]  # rank 1's half; label = image // 5
    assert [labels.tolist() for _, labels in (pair[0] for pair in pairs)] == [e.tolist() for e in expected]


def test_dali_resume_on_another_world_size(insightface_rec):
    dali, fallback = both(insightface_rec.rec_path, batch_size=4, rank=2, world_size=3)
    for loader in (dali, fallback):
        loader.set_epoch(0, start_sample=24)
    assert len(dali) == (60 - 24) // 12 == 3
    assert epoch_labels(dali) == epoch_labels(fallback)
    assert dali.position() == 60 and epoch_labels(dali, 1) == epoch_labels(fallback, 1)
    assert len(dali) == 5


def test_dali_corrupt_jpeg_replaced_like_fallback(tmp_path, jpegs, caplog):
    bad = {3: jpegs[2][:900], 8: damaged_scan(jpegs[4]), 9: damaged_scan(jpegs[5])}  # 8, 9: DALI sees them
    rec = corrupt_rec(tmp_path, jpegs, bad, num_images=20)
    with caplog.at_level(logging.WARNING, logger="lvface.data.loader"):
        results = []
        for rank in range(2):
            dali, fallback = both(rec, batch_size=5, rank=rank, seed=3, flip=False)
            dali_batches, fallback_batches = list(dali), list(fallback)
            for (a, la), (b, lb) in zip(dali_batches, fallback_batches):
                assert torch.equal(la, lb) and a.shape == (5, 3, 112, 112)
                assert (a - b).abs().max() * 127.5 < 1e-3
            assert dali.bad_records == fallback.bad_records
            results.append((dali.bad_records, [lab for _, labels in dali_batches for lab in labels.tolist()]))
    assert sum(count for count, _ in results) == 3
    assert not set(bad) & {label for _, labels in results for label in labels}
    assert caplog.text.count("undecodable image skipped") == 6  # each loader logs each bad record


def test_dali_cpu_throughput_smoke(insightface_rec):
    """Two passes with prefetch 3 finish and leave the position at the end (pipelining bookkeeping)."""
    loader = build_train_loader(config(insightface_rec.rec_path, loader="dali", batch_size=8, prefetch=3),
                                rank=0, world_size=1, seed=0, device=CPU)
    for epoch in range(2):
        assert len(epoch_labels(loader, epoch)) == 7 and loader.position() == 56
    assert loader.bad_records == 0
    np.testing.assert_array_equal(
        np.sort(np.concatenate(epoch_labels(loader, 5))), np.sort(epoch_order(60, 0, 5)[:56] // 5))


def test_other_image_sizes_are_resized_alike(tmp_path):
    from PIL import Image

    from lvface.data.recordio import IRHeader, RecordIOWriter
    from lvface.data.synthetic import render_face

    rec = str(tmp_path / "sizes.rec")
    with RecordIOWriter(rec) as writer:
        for i, size in enumerate([(128, 128), (96, 96), (112, 112), (150, 120)]):
            out = io.BytesIO()
            Image.fromarray(render_face(0, i, 0)).resize(size).save(out, format="JPEG", quality=92)
            writer.write_record(i, IRHeader(0, float(i), i, 0), out.getvalue())
    dali, fallback = both(rec, batch_size=4, rank=0, world_size=1, flip=False)
    (a, la), (b, lb) = next(iter(dali)), next(iter(fallback))
    assert torch.equal(la, lb) and a.shape == b.shape == (4, 3, 112, 112)
    levels = (a - b).abs() * 127.5  # DALI's and PIL's bilinear resize agree within a step
    assert levels.max() <= 1.01 and levels.mean() < 0.3


def test_dali_pass_left_early_does_not_leak_into_the_next(insightface_rec):
    dali, fallback = both(insightface_rec.rec_path, batch_size=4, prefetch=3)
    for _ in zip(range(2), dali):
        pass  # stop after 2 of 7 batches, with 3 more in flight
    assert dali.position() == 16
    assert epoch_labels(dali, 1) == epoch_labels(fallback, 1)


# --------------------------------------------------------------------------------------------------
# wiped JPEG headers: DALI's CPU decoder crashed (SIGSEGV) on a batch of 64 holding one
# --------------------------------------------------------------------------------------------------
WIPE_EVERY = 100  # 60 of the 6,000 records of `lvface synth`'s default size


@pytest.fixture(scope="module")
def wiped_headers(tmp_path_factory):
    """`lvface synth` output (300 identities x 20 images) with the JPEG header of every 100th record
    zeroed: SOI and every table up to the start of scan."""
    from lvface.data.index import RecordIndex
    from lvface.data.synthetic import write_synthetic_dataset

    out = tmp_path_factory.mktemp("wiped") / "data"
    write_synthetic_dataset(str(out), num_identities=300, images_per_identity=20, val_identities=10,
                            val_pairs=20, seed=0)
    index = RecordIndex.open(out / "train.rec", cache=False)
    assert index.num_images == 6000
    raw = bytearray((out / "train.rec").read_bytes())
    for item in range(0, index.num_images, WIPE_EVERY):
        start = int(index.rows[item]["offset"]) + int(index.rows[item]["skip"])
        scan = raw.index(b"\xff\xda", start)
        raw[start:scan] = bytes(scan - start)
    (out / "train.rec").write_bytes(bytes(raw))
    for cache in out.glob("*.npy"):
        cache.unlink()
    return out


def test_header_check_rejects_what_dali_cannot_parse(jpegs):
    from lvface.data.dali import header_parses

    jpeg = jpegs[0]
    scan = jpeg.index(b"\xff\xda")
    as_array = lambda data: np.frombuffer(data, np.uint8)  # noqa: E731
    assert all(header_parses(as_array(j)) for j in jpegs)
    assert not header_parses(as_array(bytes(scan) + jpeg[scan:]))  # SOI and tables wiped
    assert not header_parses(as_array(jpeg[:2] + bytes(scan - 2) + jpeg[scan:]))  # SOI kept, tables wiped
    assert not header_parses(as_array(jpeg[:2] + jpeg[scan:]))  # no frame header
    assert not header_parses(as_array(b"not a jpeg at all" * 4))
    assert header_parses(as_array(b"\x89PNG\r\n\x1a\n" + bytes(40)))  # other formats: their signature


def test_wiped_jpeg_headers_skipped_like_torch_on_2_ranks(wiped_headers):
    """Both ranks of a 2-rank job, batches of 64 (the size at which DALI crashed): the same labels in
    every batch and the same skipped count as the torch loader, and every wiped record seen is skipped."""
    rec = wiped_headers / "train.rec"
    total = 0
    for rank in range(2):
        dali, fallback = both(rec, batch_size=64, rank=rank, seed=0, flip=False)
        dali_labels, fallback_labels = epoch_labels(dali, 0), epoch_labels(fallback, 0)
        assert len(dali_labels) == dali.batches_per_epoch == 46
        assert dali_labels == fallback_labels, rank
        assert dali.bad_records == fallback.bad_records > 0, rank
        order = dali.order
        items = np.concatenate([order.items(0, order.positions(0, batch)) for batch in range(46)])
        assert dali.bad_records == int(np.sum(items % WIPE_EVERY == 0)), rank
        total += dali.bad_records
        dali.close()
    assert 50 <= total <= 60


def test_training_run_on_wiped_headers_completes_with_dali_on_2_ranks(wiped_headers, tmp_path):
    import subprocess
    import sys

    import pyarrow.parquet as pq
    from run_utils import REPO, free_port, run_env

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "lvface.train", "--config", str(REPO / "configs" / "demo.yaml"),
           f"data.rec={wiped_headers / 'train.rec'}", "data.loader=dali", "data.batch_size=64", "eval.bins=[]",
           "train.log_every=1", "train.max_steps=3", f"train.output_dir={out}"]
    proc = subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert "undecodable image skipped" in log
    table = pq.read_table(out / "metrics.parquet").to_pydict()
    assert max(table["step"]) == 3 and max(table["bad_records"]) >= 1
