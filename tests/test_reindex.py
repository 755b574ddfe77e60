"""`lvface reindex`: the fix that RecordIO's index errors advise works, and says so when it cannot."""
from __future__ import annotations

import re
import shutil

import pytest

import lvface.cli
from lvface.data.recordio import RecordIOError, RecordIOReader, RecordIOWriter


def _write_rec(path, count: int, seed: int) -> list[bytes]:
    records = [bytes([seed, i]) * (50 + 37 * i + 11 * seed) for i in range(count)]
    with RecordIOWriter(str(path)) as writer:
        for key, record in enumerate(records):
            writer.write(key, record)
    return records


def _advised_command(error: Exception) -> list[str]:
    match = re.search(r"`lvface (reindex [^`]+)`", str(error))
    assert match, str(error)
    return match.group(1).split()


def test_reindex_fixes_a_missing_or_foreign_index(tmp_path, capsys):
    records = _write_rec(tmp_path / "a.rec", 12, seed=1)
    _write_rec(tmp_path / "other.rec", 7, seed=2)
    (tmp_path / "a.idx").unlink()
    for broken in ("missing", "foreign"):
        with pytest.raises((RecordIOError, FileNotFoundError)) as error:
            reader = RecordIOReader(str(tmp_path / "a.rec"))
            [reader.read(key) for key in range(12)]
        assert lvface.cli.main(_advised_command(error.value)) == 0  # what the message says to run
        assert f"12 records of {tmp_path / 'a.rec'}" in capsys.readouterr().out
        reader = RecordIOReader(str(tmp_path / "a.rec"))
        assert [reader.read(key) for key in range(12)] == records, broken
        shutil.copy(tmp_path / "other.idx", tmp_path / "a.idx")  # next round: another file's index


@pytest.mark.parametrize("cut", ["inside a record", "inside a record header"])
def test_reindex_of_a_truncated_rec_says_the_rec_is_damaged(tmp_path, capsys, cut):
    _write_rec(tmp_path / "a.rec", 12, seed=3)
    data = (tmp_path / "a.rec").read_bytes()
    offsets = [int(line.split()[1]) for line in (tmp_path / "a.idx").read_text().splitlines()]
    end = len(data) * 2 // 3 if cut == "inside a record" else offsets[9] + 4
    (tmp_path / "a.rec").write_bytes(data[:end])
    with pytest.raises(RecordIOError) as error:
        reader = RecordIOReader(str(tmp_path / "a.rec"))
        [reader.read(key) for key in range(12)]
    assert lvface.cli.main(_advised_command(error.value)) == 2
    message = capsys.readouterr().err
    assert "a.rec itself is damaged after" in message and "truncated" in message
    assert "`lvface reindex" not in message  # no advice that leads back here
