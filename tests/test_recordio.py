"""MXNet RecordIO reader/writer: exact bytes, insightface layout, errors, atomic writes, DALI."""
from __future__ import annotations

import io
import os
import pickle
import struct

import numpy as np
import pytest
from PIL import Image

from lvface.data import recordio
from lvface.data.recordio import (
    IRHeader, InsightFaceRecord, RecordIOError, RecordIOReader, RecordIOWriter, build_index,
    decode_record, encode_record, pack, unpack, write_image_only_index, write_insightface_rec,
)

MAGIC = b"\x0a\x23\xd7\xce"  # 0xced7230a little endian


def _jpeg(seed: int, size: int = 32, comment: bytes | None = None) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90, subsampling=0)
    jpeg = buffer.getvalue()
    if comment is not None:  # a COM segment right after SOI
        jpeg = jpeg[:2] + b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment + jpeg[2:]
    return jpeg


def _jpeg_with_aligned_magic(seed: int) -> bytes:
    """A valid JPEG whose record (24-byte IRHeader + JPEG) holds the magic at 4-byte aligned spots."""
    first = 24 + 2 + 4  # IRHeader, SOI, COM marker + length
    comment = b"c" * (-first % 4) + MAGIC + b"pad!" + MAGIC + b"xy"
    return _jpeg(seed, comment=comment)


# ---------------------------------------------------------------------------------------------
# IRHeader and framing
# ---------------------------------------------------------------------------------------------


def test_pack_unpack_scalar_label():
    record = pack(IRHeader(5, 3.0, 7, 9), b"payload")  # a scalar label forces flag 0
    assert record == struct.pack("<IfQQ", 0, 3.0, 7, 9) + b"payload"
    header, payload = unpack(record)
    assert header == IRHeader(0, 3.0, 7, 9) and payload == b"payload"


def test_pack_unpack_label_array():
    labels = np.array([4.0, 11.5, -2.0], np.float32)
    record = pack((0, labels, 1, 2), b"xyz")
    assert record == struct.pack("<IfQQ", 3, 0.0, 1, 2) + labels.tobytes() + b"xyz"
    header, payload = unpack(record)
    assert header.flag == 3 and header.id == 1 and header.id2 == 2 and payload == b"xyz"
    np.testing.assert_array_equal(header.label, labels)
    assert header.label.dtype == np.float32


def test_unpack_rejects_short_records():
    with pytest.raises(RecordIOError, match="shorter than"):
        unpack(b"\0" * 10)
    with pytest.raises(RecordIOError, match="labels"):
        unpack(struct.pack("<IfQQ", 5, 0.0, 0, 0) + b"\0" * 8)


def test_record_bytes_match_the_spec(tmp_path):
    rec, idx = tmp_path / "a.rec", tmp_path / "a.idx"
    with RecordIOWriter(str(rec), str(idx)) as writer:
        writer.write_record(7, IRHeader(0, 3.0, 7, 0), b"abcde")
        writer.write_record(8, IRHeader(0, np.array([1.0, 2.0]), 0, 0), b"")
    first = (MAGIC + (29).to_bytes(4, "little")                  # lrecord: cflag 0, length 24 + 5
             + (0).to_bytes(4, "little") + bytes.fromhex("00004040")  # flag 0, label 3.0f
             + (7).to_bytes(8, "little") + (0).to_bytes(8, "little")  # id 7, id2 0
             + b"abcde" + b"\0\0\0")                                  # payload, pad to 4 bytes
    second = (MAGIC + (32).to_bytes(4, "little")
              + (2).to_bytes(4, "little") + bytes(4) + bytes(16)     # flag 2, label 0, ids 0
              + bytes.fromhex("0000803f") + bytes.fromhex("00000040"))  # 1.0f, 2.0f
    assert len(first) == 40
    assert rec.read_bytes() == first + second
    assert idx.read_text() == "7\t0\n8\t40\n"


def test_frame_heads_read_what_encode_record_wrote():
    records = [b"abcde", b"ABCD" + MAGIC + b"EF", b"", b"x" * 1001]
    framed = [encode_record(record) for record in records]
    buffer = np.frombuffer(b"".join(framed), dtype=np.uint8)
    offsets = np.cumsum([0] + [len(f) for f in framed[:-1]])
    magic, cflag, length = recordio.frame_heads(buffer, offsets)
    assert magic.tolist() == [recordio.RECORDIO_MAGIC] * 4
    assert cflag.tolist() == [0, 1, 0, 0] and length.tolist() == [5, 4, 0, 1001]  # part 1 of the cut record
    for whole in (0, 2, 3):
        assert recordio.frame_size(int(length[whole])) == len(framed[whole])
    assert recordio.split_lrecord((3 << 29) | 2) == (3, 2)


def test_multi_part_framing_matches_dmlc():
    record = b"ABCD" + MAGIC + b"EF"
    framed = encode_record(record)
    assert framed == (MAGIC + ((1 << 29) | 4).to_bytes(4, "little") + b"ABCD"
                      + MAGIC + ((3 << 29) | 2).to_bytes(4, "little") + b"EF" + b"\0\0")
    assert decode_record(framed, 0) == (record, len(framed))
    # magic first, twice in a row, and last: empty parts are legal
    for record in (MAGIC + b"xy", MAGIC + MAGIC, b"1234" + MAGIC, MAGIC):
        framed = encode_record(record)
        assert decode_record(framed, 0) == (record, len(framed))
    # an unaligned magic is left alone: one cflag-0 part
    record = b"A" + MAGIC + b"BCD"
    assert encode_record(record)[4:8] == (8).to_bytes(4, "little")


# ---------------------------------------------------------------------------------------------
# writer / reader
# ---------------------------------------------------------------------------------------------


def test_writer_reader_round_trip(tmp_path):
    rec = tmp_path / "data.rec"
    payloads = {10: b"x" * 13, 3: b"", 42: MAGIC * 3 + b"tail", 0: bytes(range(256))}
    with RecordIOWriter(str(rec)) as writer:  # .idx defaults to data.idx
        offsets = [writer.write_record(key, IRHeader(0, float(key), key, 0), payload)
                   for key, payload in payloads.items()]
    lines = (tmp_path / "data.idx").read_text().splitlines()
    assert lines == [f"{key}\t{offset}" for key, offset in zip(payloads, offsets)]
    reader = RecordIOReader(str(rec))
    assert list(reader.keys) == list(payloads) and len(reader) == 4
    assert 42 in reader and 5 not in reader
    for key, payload in payloads.items():
        header, read_payload = reader.read_unpacked(key)
        assert read_payload == payload and header.label == float(key) and header.id == key
        assert reader.read(key) == pack(IRHeader(0, float(key), key, 0), payload)
    with pytest.raises(KeyError):
        reader.read(5)
    copy = pickle.loads(pickle.dumps(reader))  # a DataLoader worker re-maps the file
    assert copy.read_unpacked(42)[1] == payloads[42]
    reader.close()
    assert [offset for offset, _ in recordio.iter_records(str(rec))] == offsets


def test_empty_files(tmp_path):
    with RecordIOWriter(str(tmp_path / "e.rec")):
        pass
    reader = RecordIOReader(str(tmp_path / "e.rec"))
    assert len(reader) == 0
    assert build_index(str(tmp_path / "e.rec"), str(tmp_path / "f.idx"))
    assert (tmp_path / "f.idx").read_text() == ""


def test_writer_is_atomic(tmp_path):
    rec = tmp_path / "train.rec"
    with pytest.raises(RuntimeError, match="boom"):
        with RecordIOWriter(str(rec)) as writer:
            writer.write_record(0, IRHeader(0, 1.0, 0, 0), b"data")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []  # no final files, no temporary leftovers
    # a previous good file survives a failed rewrite untouched
    write_insightface_rec(str(tmp_path), [(0, b"a"), (1, b"b")])
    before = rec.read_bytes()
    with pytest.raises(ValueError, match="ascending"):
        write_insightface_rec(str(tmp_path), [(0, b"a"), (1, b"b"), (0, b"c")])
    assert rec.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["train.idx", "train.rec"]
    with pytest.raises(RecordIOError, match="key 3 was written more than once"):
        with RecordIOWriter(str(tmp_path / "dup.rec")) as writer:
            writer.write(3, b"a" * 24)
            writer.write(3, b"b" * 24)
    assert sorted(os.listdir(tmp_path)) == ["train.idx", "train.rec"]


# ---------------------------------------------------------------------------------------------
# insightface layout
# ---------------------------------------------------------------------------------------------


def _samples(class_sizes):
    return [(label, _jpeg(10 * label + j)) for label, size in enumerate(class_sizes) for j in range(size)]


def test_insightface_layout(tmp_path):
    samples = _samples([2, 3, 1])
    layout = write_insightface_rec(str(tmp_path), samples)
    assert layout.num_images == 6 and layout.num_classes == 3
    reader = RecordIOReader(layout.rec_path)
    assert list(reader.keys) == list(range(10))  # header, 6 images, 3 identities
    header, payload = reader.read_unpacked(0)
    assert header.flag == 2 and payload == b""
    np.testing.assert_array_equal(header.label, [7, 10])  # identity records are keys 7..9
    for key, (label, jpeg) in enumerate(samples, start=1):
        header, payload = reader.read_unpacked(key)
        assert header.flag == 0 and header.label == float(label) and payload == jpeg
    expected_ranges = [(1, 3), (3, 6), (6, 7)]
    for class_id, (first, end) in enumerate(expected_ranges):
        header, payload = reader.read_unpacked(7 + class_id)
        np.testing.assert_array_equal(header.label, [first, end])
        assert header.flag == 2 and payload == b""

    record = InsightFaceRecord(layout.rec_path)
    assert record.has_header and record.num_images == 6 and record.num_classes == 3
    np.testing.assert_array_equal(record.image_keys, np.arange(1, 7))
    assert record.labels.dtype == np.int64 and record.image_keys.dtype == np.int64
    np.testing.assert_array_equal(record.labels, [0, 0, 1, 1, 1, 2])
    assert [record[i] for i in range(6)] == [(jpeg, label) for label, jpeg in samples]
    assert [record.identity_range(c) for c in range(3)] == expected_ranges
    assert pickle.loads(pickle.dumps(record))[4] == (samples[4][1], 1)


def test_insightface_prefix_and_label_checks(tmp_path):
    layout = write_insightface_rec(str(tmp_path / "shard"), _samples([1, 1]))
    assert layout.rec_path == str(tmp_path / "shard.rec") and os.path.isfile(tmp_path / "shard.idx")
    with pytest.raises(ValueError, match="without gaps"):
        write_insightface_rec(str(tmp_path / "gap"), [(0, b"a"), (2, b"b")])
    with pytest.raises(ValueError, match="ascending"):
        write_insightface_rec(str(tmp_path / "start"), [(1, b"a")])
    assert not os.path.exists(tmp_path / "gap.rec") and not os.path.exists(tmp_path / "start.rec")


def test_plain_rec_without_header(tmp_path):
    rec = tmp_path / "plain.rec"
    labels = [3, 0, 2, 2]
    with RecordIOWriter(str(rec)) as writer:
        for key, label in enumerate(labels):
            writer.write_record(key, IRHeader(0, float(label), key, 0), _jpeg(key))
        # an image record with a label array (insightface takes label[0]) and a multi-part one
        writer.write_record(4, IRHeader(0, np.array([1.0, 9.0]), 4, 0), _jpeg(4))
        writer.write_record(5, IRHeader(0, 5.0, 5, 0), _jpeg_with_aligned_magic(5))
    record = InsightFaceRecord(str(rec))
    assert not record.has_header and record.num_images == 6 and record.num_classes == 6
    np.testing.assert_array_equal(record.labels, labels + [1, 5])
    assert record[5] == (_jpeg_with_aligned_magic(5), 5)


def test_exact_range_beyond_float32():
    # 2**24 + 1 is not a float32: the labels round, id/id2 keep the integers
    first, end = 2**24 + 1, 2**24 + 3
    header = IRHeader(2, np.array([first, end], np.float32), first, end)
    assert recordio._exact_range(header) == (first, end)
    insightface_header = IRHeader(2, np.array([7, 10], np.float32), 0, 0)  # files from elsewhere
    assert recordio._exact_range(insightface_header) == (7, 10)


def test_build_index_reproduces_idx(tmp_path):
    layout = write_insightface_rec(str(tmp_path), _samples([3, 2]) + [(2, _jpeg_with_aligned_magic(1))])
    rebuilt = build_index(layout.rec_path, str(tmp_path / "rebuilt.idx"))
    assert (tmp_path / "rebuilt.idx").read_bytes() == (tmp_path / "train.idx").read_bytes()
    os.remove(layout.idx_path)
    assert build_index(layout.rec_path) == layout.idx_path
    assert (tmp_path / "train.idx").read_bytes() == (tmp_path / "rebuilt.idx").read_bytes()
    assert rebuilt == str(tmp_path / "rebuilt.idx")


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        RecordIOReader(str(tmp_path / "nothing.rec"))
    layout = write_insightface_rec(str(tmp_path), _samples([1]))
    os.remove(layout.idx_path)
    with pytest.raises(FileNotFoundError) as error:
        InsightFaceRecord(layout.rec_path)
    message = str(error.value)
    assert f"{tmp_path}/train.idx not found next to {layout.rec_path}" in message
    assert f"`lvface reindex {layout.rec_path}`" in message


def test_truncated_and_corrupt_files(tmp_path):
    layout = write_insightface_rec(str(tmp_path), _samples([2, 2]))
    data = open(layout.rec_path, "rb").read()
    reader = RecordIOReader(layout.rec_path)
    last_image_offset = reader.offset_of(4)
    identity_offset = reader.offset_of(5)
    reader.close()

    # cut inside the last image: its offset is valid, its payload is not all there
    with open(layout.rec_path, "wb") as f:
        f.write(data[:last_image_offset + 100])
    with pytest.raises(RecordIOError) as error:
        RecordIOReader(layout.rec_path)  # identity records now lie past the end
    assert layout.rec_path in str(error.value) and f"offset {identity_offset}" in str(error.value)
    assert "past the end" in str(error.value)
    shortened_idx = tmp_path / "short.idx"
    shortened_idx.write_text("".join(open(layout.idx_path).readlines()[:5]))
    reader = RecordIOReader(layout.rec_path, str(shortened_idx))
    with pytest.raises(RecordIOError) as error:
        reader.read(4)
    assert layout.rec_path in str(error.value) and "truncated" in str(error.value)
    assert f"record at offset {last_image_offset}" in str(error.value)
    reader.close()

    # a flipped byte in a magic
    corrupt = bytearray(data)
    corrupt[last_image_offset] ^= 0xFF
    with open(layout.rec_path, "wb") as f:
        f.write(corrupt)
    reader = RecordIOReader(layout.rec_path)
    with pytest.raises(RecordIOError, match=f"bad magic 0x[0-9a-f]{{8}} at offset {last_image_offset}"):
        reader.read(4)
    reader.close()
    with pytest.raises(RecordIOError, match="bad magic"):
        build_index(layout.rec_path, str(tmp_path / "x.idx"))

    # a malformed .idx line
    bad_idx = tmp_path / "bad.idx"
    bad_idx.write_text("0\t0\n1\tforty\n")
    with pytest.raises(RecordIOError, match="line 2"):
        RecordIOReader(layout.rec_path, str(bad_idx))


# ---------------------------------------------------------------------------------------------
# DALI reads our files
# ---------------------------------------------------------------------------------------------


def _dali_reader_outputs(rec, idx, num_samples, batch_size, decode):
    dali = pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, types

    @dali.pipeline_def(batch_size=batch_size, num_threads=1, device_id=None, seed=0)
    def pipeline():
        jpegs, labels = fn.readers.mxnet(path=[rec], index_path=[idx], random_shuffle=False,
                                         name="reader")
        if decode:
            return jpegs, fn.decoders.image(jpegs, device="cpu", output_type=types.RGB), labels
        return jpegs, labels

    pipe = pipeline()
    pipe.build()
    assert pipe.epoch_size("reader") == num_samples
    outputs = []
    while len(outputs) < num_samples:  # the reader runs on into the next epoch: keep the first pass
        batch = pipe.run()
        outputs += [tuple(np.array(output.at(i)) for output in batch) for i in range(batch_size)]
    return list(zip(*outputs[:num_samples]))


@pytest.fixture
def face_rec(tmp_path):
    from lvface.data.synthetic import _encode_jpeg, render_face
    samples = [(label, _encode_jpeg(render_face(0, label, j), 90)) for label in range(3) for j in range(2)]
    samples.insert(3, (1, _jpeg_with_aligned_magic(99)))  # a multi-part record in the middle
    return write_insightface_rec(str(tmp_path), samples)


def test_dali_reads_image_only_index(face_rec, tmp_path):
    image_idx = write_image_only_index(face_rec.rec_path, str(tmp_path / "images.idx"))
    record = InsightFaceRecord(face_rec.rec_path)
    jpegs, images, labels = _dali_reader_outputs(face_rec.rec_path, image_idx, record.num_images,
                                                 batch_size=3, decode=True)
    assert [int(label.item()) for label in labels] == record.labels.tolist()
    for index, (data, image) in enumerate(zip(jpegs, images)):
        jpeg, _ = record[index]
        assert bytes(data) == jpeg  # also the last image, whose "size" runs to the end of file
        expected = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
        assert image.shape == expected.shape
        assert np.abs(image.astype(int) - expected).max() <= 3


def test_dali_behaviour_on_full_insightface_index(face_rec, tmp_path):
    """What DALI does with insightface's own .idx (why write_image_only_index exists):
    every .idx line is a sample, in file-offset order; header and identity records come out as
    empty images with 2-element labels (which the decoder then rejects)."""
    record = InsightFaceRecord(face_rec.rec_path)
    total = len(record.reader)
    # a shuffled .idx changes nothing: DALI sorts the offsets
    lines = open(face_rec.idx_path).readlines()
    shuffled = tmp_path / "shuffled.idx"
    shuffled.write_text("".join(lines[i] for i in np.random.default_rng(0).permutation(len(lines))))
    data, labels = _dali_reader_outputs(face_rec.rec_path, str(shuffled), total, batch_size=4,
                                        decode=False)
    sizes = [item.size for item in data]
    assert sizes[0] == 0 and labels[0].tolist() == [record.num_images + 1, total]
    for position, (jpeg, label) in enumerate(record[i] for i in range(record.num_images)):
        assert bytes(data[position + 1]) == jpeg and labels[position + 1].tolist() == [label]
    for class_id in range(record.num_classes):
        position = 1 + record.num_images + class_id
        assert sizes[position] == 0
        assert tuple(labels[position].astype(int)) == record.identity_range(class_id)
