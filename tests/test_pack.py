"""lvface pack / inspect: image folders and list files -> shards + manifest -> verify -> training loader."""
import argparse
import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import lvface.data.pack as packing
from lvface.data.images import decode_image
from lvface.data.index import RecordIndex
from lvface.data.loader import build_train_loader
from lvface.data.synthetic import render_face
from test_loader import config


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """WebFace42M layout: 5 identities x 4 images (112x112 JPEG), one 96x128 PNG, one unreadable file."""
    root = tmp_path_factory.mktemp("faces")
    for identity in range(5):
        folder = root / f"id_{identity:02d}"
        folder.mkdir()
        for image in range(4):
            Image.fromarray(render_face(2, identity, image)).save(folder / f"{image}.jpg", quality=92)
    Image.fromarray(render_face(2, 4, 9)).resize((96, 128)).save(root / "id_04" / "odd.png")
    (root / "id_00" / "broken.jpg").write_bytes(b"not an image")
    return root


_REAL_PACK_SHARD = packing.pack_shard


def _fail_on_shard_2(out_dir, shard, *args):
    """pack_shard, except that shard 2 dies (a module-level function: worker processes unpickle it)."""
    if shard == 2:
        raise OSError("disk full (simulated interruption)")
    return _REAL_PACK_SHARD(out_dir, shard, *args)


def run_cli(argv) -> int:
    parser = argparse.ArgumentParser()
    packing.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_pack_inspect_verify_read_round_trip(folders, tmp_path, capsys):
    out = tmp_path / "packed"
    assert run_cli(["pack", str(folders), "--out", str(out), "--shards", "3", "--workers", "2", "--quiet"]) == 0
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["num_images"] == 21 and meta["num_classes"] == 5 and meta["num_shards"] == 3
    assert meta["reencoded"] == 1 and meta["skipped"] == [str(folders / "id_00" / "broken.jpg")]
    labels = pq.read_table(out / "labels.parquet").to_pydict()
    assert labels["name"] == [f"id_{i:02d}" for i in range(5)] and labels["images"] == [4, 4, 4, 4, 5]
    manifest = pq.read_table(out / "manifest.parquet").to_pydict()
    assert len(set(manifest["key"])) == 21 and set(manifest["key"]) < set(range(22))  # the broken file's key is unused

    assert run_cli(["inspect", str(out), "--verify", "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "21 images, 5 identities" in printed and "0 problem(s)" in printed and "median 4" in printed
    assert packing.inspect(str(out), verify=True, workers=2, chunk=8, out=io.StringIO()) == 0  # 3 chunks, 2 processes

    # every record: bytes passed through (or a 112x112 re-encode), label from the folder, as in the manifest
    index = RecordIndex.open(str(out))
    assert index.num_images == 21 and len(index.files) == 3
    rows = {(s, o): (src, lab, n) for s, o, src, lab, n in zip(manifest["shard"], manifest["offset"],
                                                             manifest["source"], manifest["label"], manifest["length"])}
    for item in range(index.num_images):
        row = index.rows[item]
        source, label, length = rows[(int(row["file"]), int(row["offset"]))]
        payload = index.payload(item)
        assert len(payload) == length and index.labels([item])[0] == label
        assert labels["name"][label] == os.path.basename(os.path.dirname(source))
        if source.endswith(".jpg"):
            assert bytes(payload) == open(source, "rb").read()
        else:
            assert Image.open(io.BytesIO(bytes(payload))).size == (112, 112)
    # shuffled at pack time: the first shard already spans identities
    assert len(set(manifest["label"][:7])) >= 3

    # the training loader reads the folder of shards: every image once per epoch
    loader = build_train_loader(config(out, batch_size=3), rank=0, world_size=1, seed=0, device=torch.device("cpu"))
    seen = torch.cat([labels for _, labels in loader]).tolist()
    assert sorted(seen) == sorted(manifest["label"])


def test_pack_list_file_and_resume_after_interruption(folders, tmp_path, monkeypatch):
    listing = tmp_path / "train.lst"
    images = sorted(p for p in folders.glob("*/*.jpg") if p.name != "broken.jpg")
    listing.write_text("".join(f"{i}\t{int(p.parent.name[3:]) * 10}\t{p}\n" for i, p in enumerate(images)))
    clean = packing.pack(str(listing), str(tmp_path / "clean"), num_shards=4, workers=1, progress=False)
    assert clean["num_images"] == 20 and clean["num_classes"] == 5
    names = pq.read_table(tmp_path / "clean" / "labels.parquet").column("name").to_pylist()
    assert names == ["0", "10", "20", "30", "40"]  # integer labels keep their numeric order

    out = tmp_path / "resumed"
    monkeypatch.setattr(packing, "pack_shard", _fail_on_shard_2)
    with pytest.raises(OSError, match="simulated"):
        packing.pack(str(listing), str(out), num_shards=4, workers=1, progress=False)
    assert not (out / "dataset.json").exists() and not (out / "manifest-00002.parquet").exists()
    first_shard = os.stat(out / "train-00000-of-00004.rec").st_mtime_ns
    monkeypatch.setattr(packing, "pack_shard", _REAL_PACK_SHARD)
    resumed = packing.pack(str(listing), str(out), num_shards=4, workers=1, progress=False)
    assert resumed == clean and os.stat(out / "train-00000-of-00004.rec").st_mtime_ns == first_shard  # not redone
    for name in clean["shards"]:
        assert (out / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()
    assert packing.pack(str(listing), str(out), num_shards=4, progress=False) == clean  # complete: nothing to do
    with pytest.raises(ValueError, match="another plan"):
        packing.pack(str(listing), str(out), num_shards=4, seed=1, progress=False)


def test_inspect_verify_finds_a_corrupt_record(folders, tmp_path, capsys):
    out = tmp_path / "packed"
    packing.pack(str(folders), str(out), num_shards=1, workers=1, progress=False)
    index = RecordIndex.open(str(out))
    row = index.rows[3]
    rec = out / "train-00000-of-00001.rec"
    data = bytearray(rec.read_bytes())
    start = int(row["offset"]) + int(row["skip"])
    data[start + 200:start + 800] = bytes(600)  # wipe part of the scan: framing intact, image broken
    rec.write_bytes(bytes(data))
    assert decode_image(np.frombuffer(bytes(data[start:start + int(row["length"])]), np.uint8)) is None
    assert run_cli(["inspect", str(rec), "--verify"]) == 1
    assert packing.inspect(str(rec), verify=True, workers=2, chunk=4, out=io.StringIO()) == 2  # parallel too
    printed = capsys.readouterr().out
    assert f"offset {int(row['offset'])}: the image does not decode" in printed
    assert f"offset {int(row['offset'])}: differs from manifest.parquet" in printed


def test_pack_and_embed_take_the_same_image_files(tmp_path):
    from lvface.eval.embed import list_images

    folder = tmp_path / "id_0"
    folder.mkdir()
    for name in ("a.jpg", "b.TIF", "c.webp"):
        Image.fromarray(render_face(1, 0, 0)).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    packed = sorted(os.path.basename(path) for path, _ in packing.scan_sources(str(tmp_path)))
    names, _ = list_images(tmp_path)
    assert packed == ["a.jpg", "b.TIF", "c.webp"] and names == [f"id_0/{name}" for name in packed]
