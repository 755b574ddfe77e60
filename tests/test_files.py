"""lvface/files.py: a write either lands whole under its name or leaves the previous file untouched, and a
failed write says which path and why (a real full disk: a 1 MiB tmpfs, where the machine allows mounts)."""

from __future__ import annotations

import json
import subprocess
import uuid

import numpy as np
import pytest
import torch

from lvface.files import FileWriteError, atomic_open, atomic_torch_save, atomic_write_json


def _leftovers(folder, name):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(name + ".tmp-"))


def test_atomic_open_replaces_only_on_a_clean_exit(tmp_path):
    target = tmp_path / "file.bin"
    with atomic_open(target) as handle:
        handle.write(b"first")
    with pytest.raises(KeyError):
        with atomic_open(target) as handle:
            handle.write(b"second, never finished")
            raise KeyError("the writer failed")
    assert target.read_bytes() == b"first"
    assert _leftovers(tmp_path, "file.bin") == []


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        with atomic_open(tmp_path / "absent" / "file.bin"):
            pass


def test_json_writer_converts_numpy_and_float_keys(tmp_path):
    path = tmp_path / "sub" / "report.json"
    atomic_write_json(path, {"tar": {1e-3: np.float32(0.5)}, "counts": np.arange(3), "n": np.int64(4)})
    assert json.loads(path.read_text()) == {"tar": {"0.001": 0.5}, "counts": [0, 1, 2], "n": 4}


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs: writes past it fail with ENOSPC, as on a full checkpoint disk."""
    mount_point = tmp_path / f"tiny-{uuid.uuid4().hex[:6]}"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); tests/test_faults.py injects the error")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=False)


def test_full_disk_names_the_path_and_keeps_the_old_file(tiny_disk):
    target = tiny_disk / "backbone.pt"
    atomic_torch_save({"w": torch.zeros(16)}, target)
    before = target.read_bytes()
    with pytest.raises(FileWriteError) as caught:
        atomic_torch_save({"w": torch.zeros(1 << 20)}, target)  # 4 MiB into 1 MiB
    message = str(caught.value)
    assert str(target) in message and "No space left on device" in message, message
    assert target.read_bytes() == before
    assert _leftovers(tiny_disk, "backbone.pt") == []
