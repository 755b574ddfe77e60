"""The training loader: global order, rank slices, resume, start-up checks, bad records (torch path)."""
import dataclasses
import logging
import os

import numpy as np
import pytest
import torch

from lvface.config import ConfigError, DataConfig, load_config
from lvface.data.augment import AugmentSpec, apply_torch, flip_chw
from lvface.data.images import decode_image
from lvface.data.index import RecordIndex
from lvface.data.loader import build_train_loader
from lvface.data.recordio import IRHeader, RecordIOError, RecordIOWriter, write_insightface_rec
from lvface.data.sampler import GlobalOrder, epoch_order, permute
from lvface.data.synthetic import _encode_jpeg, render_face

CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# helpers (also used by test_dali.py and test_pack.py)
# ---------------------------------------------------------------------------------------------


def face_jpegs(count: int, seed: int = 0) -> list[bytes]:
    return [_encode_jpeg(render_face(seed, i % 7, i), 90) for i in range(count)]


def write_unique_rec(path, num_images: int, jpegs: list[bytes]) -> str:
    """A headerless .rec where image i has label i (labels name the images)."""
    rec = str(path / "unique.rec")
    with RecordIOWriter(rec) as writer:
        for i in range(num_images):
            writer.write_record(i, IRHeader(0, float(i), i, 0), jpegs[i % len(jpegs)])
    return rec


def config(rec, **overrides) -> DataConfig:
    base = dict(rec=str(rec), batch_size=4, loader="torch", num_workers=0)
    base.update(overrides)
    return DataConfig(**base)


def epoch_labels(loader, epoch=None, start=0) -> list[list[int]]:
    if epoch is not None:
        loader.set_epoch(epoch, start_sample=start)
    return [labels.tolist() for _, labels in loader]


@pytest.fixture(scope="module")
def jpegs():
    return face_jpegs(8)


@pytest.fixture(scope="module")
def unique_rec(tmp_path_factory, jpegs):
    return write_unique_rec(tmp_path_factory.mktemp("unique"), 61, jpegs)


# ---------------------------------------------------------------------------------------------
# order
# ---------------------------------------------------------------------------------------------


def test_permutation_is_exact_seeded_and_per_epoch():
    for n in (1, 2, 3, 10, 257, 1000):
        assert sorted(epoch_order(n, 5, 0).tolist()) == list(range(n))
    order = epoch_order(1000, 5, 0)
    np.testing.assert_array_equal(order, epoch_order(1000, 5, 0))
    assert not np.array_equal(order, epoch_order(1000, 5, 1))
    assert not np.array_equal(order, epoch_order(1000, 6, 0))
    np.testing.assert_array_equal(permute([3, 999, 0], 1000, 5, 0), order[[3, 999, 0]])
    assert np.abs(np.corrcoef(np.arange(1000), order)[0, 1]) < 0.1  # shuffled, not shifted


@pytest.mark.parametrize("world_size", [1, 3, 4])
def test_every_sample_once_per_epoch_across_ranks(world_size):
    n, batch = 103, 5
    orders = [GlobalOrder(n, seed=1, batch_size=batch, world_size=world_size, rank=r) for r in range(world_size)]
    steps = orders[0].batches_per_epoch
    assert steps == n // (batch * world_size)
    seen = np.concatenate([o.items(2, o.positions(0, b)) for o in orders for b in range(steps)])
    assert len(seen) == len(set(seen.tolist())) == steps * batch * world_size  # ragged tail dropped
    np.testing.assert_array_equal(np.sort(seen), np.sort(epoch_order(n, 1, 2)[:steps * batch * world_size]))


def test_loader_ranks_cover_the_epoch_once(unique_rec):
    loaders = [build_train_loader(config(unique_rec), rank=r, world_size=3, seed=9, device=CPU) for r in range(3)]
    per_rank = [epoch_labels(loader, epoch=1) for loader in loaders]
    assert {len(batches) for batches in per_rank} == {loaders[0].batches_per_epoch} == {5}  # 61 // 12
    labels = [label for batches in per_rank for batch in batches for label in batch]
    assert len(labels) == len(set(labels)) == 60
    step_sets = [sorted(sum((per_rank[r][k] for r in range(3)), [])) for k in range(5)]
    expected = epoch_order(61, 9, 1)
    assert step_sets == [sorted(expected[k * 12:(k + 1) * 12].tolist()) for k in range(5)]
    assert loaders[0].position() == 60 and loaders[0].num_classes == 61 and loaders[0].num_images == 61


def test_resume_mid_epoch_same_and_other_world_size(unique_rec):
    epoch, seed = 3, 4
    full = [epoch_labels(build_train_loader(config(unique_rec), rank=r, world_size=2, seed=seed, device=CPU), epoch)
            for r in range(2)]
    # stop after 3 of 7 steps on 2 ranks
    first = [build_train_loader(config(unique_rec), rank=r, world_size=2, seed=seed, device=CPU) for r in range(2)]
    consumed = []
    for loader in first:
        loader.set_epoch(epoch)
        for step, (_, labels) in enumerate(loader):
            consumed += labels.tolist()
            if step == 2:
                break
    position = first[0].position()
    assert position == 3 * 8 == first[1].position()
    # same world size: exactly the remaining batches of the uninterrupted run
    for r in range(2):
        resumed = build_train_loader(config(unique_rec), rank=r, world_size=2, seed=seed, device=CPU)
        resumed.set_epoch(epoch, start_sample=position)
        assert len(resumed) == 4
        assert epoch_labels(resumed) == full[r][3:]
    # 3 ranks: the samples after `position`, each once, minus the new ragged tail
    resumed = [build_train_loader(config(unique_rec), rank=r, world_size=3, seed=seed, device=CPU) for r in range(3)]
    rest_batches = [epoch_labels(loader, epoch, start=position) for loader in resumed]
    rest = [label for batches in rest_batches for batch in batches for label in batch]
    order = epoch_order(61, seed, epoch)
    steps = (61 - position) // 12
    assert sorted(rest) == sorted(order[position:position + steps * 12].tolist())
    assert not set(rest) & set(consumed) and sorted(consumed) == sorted(order[:position].tolist())
    late = build_train_loader(config(unique_rec), rank=1, world_size=3, seed=seed, device=CPU)
    epoch_labels(late, 0)  # a loader that has already run a pass takes a resume position as well
    assert epoch_labels(late, epoch, start=position) == rest_batches[1]
    # the next epoch starts at 0 again
    assert len(resumed[0]) == steps
    resumed[0].set_epoch(epoch + 1)
    assert len(resumed[0]) == resumed[0].batches_per_epoch == 61 // 12


def test_identity_sorted_file_gives_mixed_batches(tmp_path, jpegs):
    samples = [(identity, jpegs[j % len(jpegs)]) for identity in range(40) for j in range(8)]  # sorted by identity
    layout = write_insightface_rec(str(tmp_path), samples)
    loader = build_train_loader(config(layout.rec_path, batch_size=16), rank=0, world_size=1, seed=0, device=CPU)
    distinct = [len(set(batch)) for batch in epoch_labels(loader, 0)]
    assert len(distinct) == 20 and min(distinct) >= 9 and np.mean(distinct) >= 12  # a file-order batch has 2


def test_insightface_rec_with_header_and_identity_records(tmp_path, jpegs):
    samples = [(identity, jpegs[(3 * identity + j) % len(jpegs)]) for identity in range(5) for j in range(3)]
    layout = write_insightface_rec(str(tmp_path), samples)
    index = RecordIndex.open(str(tmp_path))  # the folder holding train.rec
    assert index.num_images == 15 and index.num_classes == 5
    for item, (label, jpeg) in enumerate(samples):
        assert bytes(index.payload(item)) == jpeg and index.labels([item])[0] == label
    loader = build_train_loader(config(layout.rec_path, batch_size=5, flip=False), rank=0, world_size=1, seed=2,
                                device=CPU)
    images, labels = next(iter(loader))
    order = epoch_order(15, 2, 0)[:5]
    assert labels.tolist() == [samples[i][0] for i in order] and labels.dtype == torch.int64
    decoded = [np.array(decode_image(np.frombuffer(samples[i][1], np.uint8))) for i in order]
    expected = torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert images.shape == (5, 3, 112, 112) and images.dtype == torch.float32
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=0)
    # a configured class count must match the header
    with pytest.raises(ConfigError, match="data.num_classes is 7"):
        build_train_loader(config(layout.rec_path, num_classes=7), rank=0, world_size=1, seed=0, device=CPU)


# ---------------------------------------------------------------------------------------------
# start-up checks and bad records
# ---------------------------------------------------------------------------------------------


def _copy(rec, tmp_path, name, data=None, idx=None):
    target = tmp_path / f"{name}.rec"
    target.write_bytes(data if data is not None else open(rec, "rb").read())
    (tmp_path / f"{name}.idx").write_text(idx if idx is not None else open(rec[:-4] + ".idx").read())
    return str(target)


def test_clear_errors_at_start(tmp_path, unique_rec):
    data = open(unique_rec, "rb").read()
    lines = open(unique_rec[:-4] + ".idx").read().splitlines()
    last_offset = int(lines[-1].split()[1])
    # truncated .rec: the last record runs past the end
    truncated = _copy(unique_rec, tmp_path, "truncated", data=data[:-100])
    with pytest.raises(RecordIOError, match=f"truncated.rec: the record at offset {last_offset} .* truncated"):
        RecordIndex.open(truncated, cache=False)
    # an .idx entry past the end of the file
    past = _copy(unique_rec, tmp_path, "past", idx="\n".join(lines + [f"61\t{len(data) + 64}"]) + "\n")
    with pytest.raises(RecordIOError, match=f"past.rec: key 61 is at offset {len(data) + 64}, past the end"):
        build_train_loader(config(past), rank=0, world_size=1, seed=0, device=CPU)
    # an .idx offset that is not a record boundary
    inside = _copy(unique_rec, tmp_path, "inside", idx="\n".join(lines[:-1] + [f"60\t{last_offset + 12}"]) + "\n")
    with pytest.raises(RecordIOError, match=f"offset {last_offset + 12}"):
        RecordIndex.open(inside, cache=False)
    # a label outside num_classes
    with pytest.raises(RecordIOError, match=f"unique.rec: the record at offset {last_offset} has label 60, "
                                            r"outside \[0, num_classes=60\)"):
        build_train_loader(config(unique_rec, num_classes=60), rank=0, world_size=1, seed=0, device=CPU)
    with pytest.raises(ConfigError, match="data.num_images is 5"):
        build_train_loader(config(unique_rec, num_images=5), rank=0, world_size=1, seed=0, device=CPU)
    with pytest.raises(ConfigError, match="lower data.batch_size"):
        build_train_loader(config(unique_rec, batch_size=31), rank=0, world_size=2, seed=0, device=CPU)


def corrupt_rec(tmp_path, jpegs, bad: dict[int, bytes], num_images=24) -> str:
    """unique-label .rec with some payloads replaced."""
    rec = str(tmp_path / "corrupt.rec")
    with RecordIOWriter(rec) as writer:
        for i in range(num_images):
            writer.write_record(i, IRHeader(0, float(i), i, 0), bad.get(i, jpegs[i % len(jpegs)]))
    return rec


def damaged_scan(jpeg: bytes) -> bytes:
    """A JPEG whose entropy-coded data is wiped: markers intact (passes the cheap check), decode fails."""
    data = bytearray(jpeg)
    data[300:900] = bytes(600)
    return bytes(data)


def test_corrupt_jpeg_is_replaced_counted_and_logged(tmp_path, jpegs, caplog):
    bad = {5: b"not a jpeg at all" * 4, 11: jpegs[0][:700], 17: damaged_scan(jpegs[1])}
    rec = corrupt_rec(tmp_path, jpegs, bad)
    index = RecordIndex.open(rec)
    offsets = {i: int(index.rows[i]["offset"]) for i in bad}
    with caplog.at_level(logging.WARNING, logger="lvface.data.loader"):
        loaders = [build_train_loader(config(rec, num_workers=1), rank=r, world_size=2, seed=1, device=CPU)
                   for r in range(2)]
        batches = [[(images, labels.tolist()) for images, labels in loader] for loader in loaders]
    assert sum(loader.bad_records for loader in loaders) == 3
    for rank, rank_batches in enumerate(batches):
        labels = [label for _, batch in rank_batches for label in batch]
        assert not set(labels) & set(bad) and len(labels) == 12  # shapes hold, bad images gone
        shard = {int(i) for b in range(3) for i in loaders[rank].order.items(0, loaders[rank].order.positions(0, b))}
        assert set(labels) <= shard  # replacements come from the same rank's shard
        for images, batch in rank_batches:
            assert images.shape == (4, 3, 112, 112)
    for i, offset in offsets.items():
        assert f"corrupt.rec offset {offset}" in caplog.text
    for loader in loaders:
        loader.close()


# ---------------------------------------------------------------------------------------------
# augmentations and config
# ---------------------------------------------------------------------------------------------


def test_augment_parameters_depend_only_on_position():
    spec = AugmentSpec(flip_p=0.5, crop_p=0.5, color_p=0.5, grayscale_p=0.3, blur_p=0.5, mask_p=0.5)
    whole = spec.draw(7, 2, np.arange(100))
    part = spec.draw(7, 2, np.arange(40, 60))
    for a, b in zip(whole.take(np.arange(40, 60)), part):
        np.testing.assert_array_equal(a, b)
    assert 30 < whole.flip.sum() < 70 and (whole.saturation == 0).any() and (whole.blur_sigma > 0).any()
    assert (whole.crop_shape[:, 0] < 112).any() and (whole.crop_shape >= int(0.8 * 112) - 1).all()
    assert not np.array_equal(spec.draw(7, 3, np.arange(100)).flip, whole.flip)
    off = AugmentSpec(flip_p=0.0).draw(7, 2, np.arange(10))
    assert off.flip.sum() == 0 and (off.crop_shape == 112).all() and (off.mask_shape == 0).all()


def test_torch_augmentations(jpegs):
    pixels = torch.from_numpy(np.stack([decode_image(np.frombuffer(j, np.uint8)) for j in jpegs[:4]]))
    spec = AugmentSpec(flip_p=1.0, mask_p=1.0, grayscale_p=1.0)
    params = spec.draw(0, 0, np.arange(4))
    out = apply_torch(pixels.clone(), params, spec)
    y, x = params.mask_anchor[0, :2].astype(int)
    h, w = params.mask_shape[0, :2].astype(int)
    region = out[0, y:y + h, x:x + w].int()
    assert h > 10 and w > 50 and region.max() - region.min() <= 1  # a flat mask (then made grey)
    assert (out[..., 0].int() - out[..., 1].int()).abs().max() <= 1  # grayscale: channels equal (rounding)
    chw = flip_chw(out.permute(0, 3, 1, 2).contiguous(), params.flip)
    torch.testing.assert_close(chw, out.permute(0, 3, 1, 2).flip(-1))


def test_data_config_fields(tmp_path):
    cfg = load_config(None, ["data.loader=torch", "data.crop_p=0.2", "data.blur_sigma=[0.5, 1.0]"])
    assert cfg.data.loader == "torch" and cfg.data.crop_p == 0.2 and cfg.data.blur_sigma == [0.5, 1.0]
    with pytest.raises(ConfigError, match="data.loader"):
        load_config(None, ["data.loader=pil"])
    with pytest.raises(ConfigError, match="data.mask_p"):
        AugmentSpec.from_config(dataclasses.replace(DataConfig(), mask_p=1.5))
    assert os.path.isfile("configs/lvface_vit_l_wf42m.yaml") and load_config("configs/lvface_vit_l_wf42m.yaml")
