"""The manifest of a checkpoint folder: every file's size and SHA-256, and who wrote it.

`manifest.json` is the last file written into a checkpoint (after every rank has finished and the
files have been hashed), so its presence marks a complete checkpoint and its checksums catch a
truncated or bit-flipped file on resume, evaluation and export. SHA-256 because hashlib has it in
every Python and it is the fastest hash there on CPUs with SHA instructions (measured on the 2-core
development machine: sha256 560 MB/s, blake2b 282, md5 320; xxhash is not a dependency); the training
run spreads the hashing over its ranks.

The manifest's own digest (`manifest_digest`) identifies the exact checkpoint: derived artefacts (the
universal conversion of lvface/checkpoint/manager.py) are keyed by it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "lvface-checkpoint-manifest"
ALGORITHM = "sha256"


class CheckpointCorrupt(ValueError):
    """A checkpoint file does not match its manifest (or the manifest is missing or unreadable)."""


def file_digest(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, ALGORITHM).hexdigest()


def describe_files(folder: Path, names: list[str]) -> dict[str, dict]:
    """{name: {size, sha256}} of `names` in `folder`."""
    return {name: {"size": (folder / name).stat().st_size, ALGORITHM: file_digest(folder / name)} for name in names}


def checkpoint_files(folder: Path) -> list[str]:
    """Every regular file under `folder` (relative, sorted), the manifest excepted."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def manifest_text(files: dict[str, dict], info: dict) -> str:
    return json.dumps({"format": FORMAT, "algorithm": ALGORITHM, **info, "files": files}, indent=1, sort_keys=True)


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise CheckpointCorrupt(f"{path} is missing: {folder} is not a complete lvface checkpoint (a save that "
                                f"did not finish, or a checkpoint written before manifests existed)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointCorrupt(f"{path} is unreadable: {exc}") from None
    if manifest.get("format") != FORMAT or manifest.get("algorithm") != ALGORITHM:
        raise CheckpointCorrupt(f"{path} is not an lvface checkpoint manifest")
    return manifest


def manifest_digest(folder: Path) -> str:
    """SHA-256 of the manifest file: names the exact checkpoint (every file's checksum is inside)."""
    return file_digest(Path(folder) / MANIFEST)


def check_files(folder: Path, names: list[str] | None = None) -> list[str]:
    """Problems (one line each, naming the file) of `names` (default: all) against the manifest."""
    folder = Path(folder)
    try:
        files = read_manifest(folder)["files"]
    except CheckpointCorrupt as exc:
        return [str(exc)]
    problems = []
    for name in files if names is None else names:
        path = folder / name
        expected = files.get(name)
        if expected is None:
            problems.append(f"{path} is not in {folder / MANIFEST}")
        elif not path.is_file():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != expected["size"]:
            problems.append(f"{path} has {path.stat().st_size} bytes, the manifest says {expected['size']} (truncated?)")
        elif file_digest(path) != expected[ALGORITHM]:
            problems.append(f"{path}: {ALGORITHM} does not match the manifest (the file is damaged)")
    return problems


def verify_file(path: str | Path) -> None:
    """Check one file against the manifest of its folder, if the folder has one (a plain backbone .pt
    from elsewhere has none, and is read as it is). Raises CheckpointCorrupt naming the file."""
    path = Path(path)
    if not (path.parent / MANIFEST).is_file():
        return
    problems = check_files(path.parent, [path.name])
    if problems:
        raise CheckpointCorrupt("; ".join(problems))
