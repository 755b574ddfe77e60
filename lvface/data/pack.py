"""Image folders -> RecordIO shards + a Parquet manifest (``lvface pack``), and ``lvface inspect``.

    lvface pack /data/WebFace42M --out /data/wf42m_rec --workers 16      # one folder per identity
    lvface pack train.lst --out /data/rec                                # list file: `path label` lines
    lvface inspect /data/wf42m_rec --verify

Packing plan (a pure function of the sources, the seed and the shard count, so an interrupted run
resumes): sources sorted by (identity, path); identities named by their folder (or the list's label)
and numbered 0..C-1 in sorted order (numerically when every label is an integer); the samples shuffled
with the seed (so every shard, and any contiguous read, spans all identities); key k (0..N-1) = position
in that order; shard s holds keys [s * n, (s + 1) * n). The plan's fingerprint is stored in
``pack-plan.json``; a rerun with another plan in the same folder is refused, one with the same plan
resumes (or does nothing when ``dataset.json`` says the pack is complete).

Output, in ``--out``:
  ``train-SSSSS-of-TTTTT.rec/.idx``  plain MXNet RecordIO (image records only: flag 0, label = class id,
                                      id = key), each written to a temporary name and renamed when whole
  ``manifest.parquet``                one row per record: shard, offset, length (of the image bytes),
                                      label, key, source path, content hash (BLAKE2b-128 of the image
                                      bytes), reencoded
  ``labels.parquet``                  the label map: label, name, images
  ``dataset.json``                    counts, shards, seed, and the sources that could not be read

Each worker process writes whole shards; a finished shard leaves ``manifest-SSSSS.parquet`` (written
after its .rec/.idx are in place), which is what a resumed run skips on. Already 112x112 JPEG files
are copied byte for byte; anything else is decoded, converted to RGB, resized to 112x112 and encoded
as JPEG (``--quality``).
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from lvface.data.images import IMAGE_EXTENSIONS
from lvface.data.recordio import IRHeader, RecordIOWriter
from lvface.files import atomic_open

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_SCHEMA = pa.schema([("shard", pa.int32()), ("offset", pa.int64()), ("length", pa.int64()),
                             ("label", pa.int32()), ("key", pa.int64()), ("source", pa.string()),
                             ("hash", pa.string()), ("reencoded", pa.bool_())])


# --------------------------------------------------------------------------------------------------
# sources and the plan
# --------------------------------------------------------------------------------------------------


def scan_sources(source: str) -> list[tuple[str, str]]:
    """(path, identity name) of every image: a folder with one subfolder per identity, or a list file
    of ``path label`` lines (insightface .lst ``index<TAB>label<TAB>path`` too; relative paths are
    relative to the list file's folder)."""
    root = Path(source)
    if root.is_dir():
        samples = []
        for identity in sorted(p for p in root.iterdir() if p.is_dir()):
            for path in sorted(identity.iterdir()):
                if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                    samples.append((str(path), identity.name))
        if not samples:
            raise FileNotFoundError(f"{root}: no images in subfolders; pack expects one folder per identity "
                                    f"({', '.join(IMAGE_EXTENSIONS)} files), or a list file of 'path label' lines")
        return samples
    if root.is_file():
        samples = []
        for number, line in enumerate(root.read_text().splitlines(), start=1):
            fields = line.split("\t") if "\t" in line else line.split()
            if not fields or not line.strip():
                continue
            if len(fields) >= 3 and fields[0].strip().isdigit():  # insightface .lst: index, label(s), path
                path, label = fields[-1].strip(), fields[1].strip()
            elif len(fields) == 2:
                path, label = fields[0].strip(), fields[1].strip()
            else:
                raise ValueError(f"{root}: line {number} is {line[:80]!r}; expected 'path label' "
                                 f"or 'index<TAB>label<TAB>path'")
            path = path if os.path.isabs(path) else str(root.parent / path)
            samples.append((path, label))
        if not samples:
            raise ValueError(f"{root}: the list file has no 'path label' lines")
        return samples
    raise FileNotFoundError(f"{source}: no such folder or list file to pack")


def label_names(samples: list[tuple[str, str]]) -> list[str]:
    """Identity names in label order (numeric order when every name is an integer)."""
    names = set(name for _, name in samples)
    if all(name.lstrip("-").isdigit() for name in names):
        return sorted(names, key=int)
    return sorted(names)


def make_plan(samples: list[tuple[str, str]], *, seed: int, num_shards: int) -> dict:
    names = label_names(samples)
    label_of = {name: label for label, name in enumerate(names)}
    ordered = sorted((label_of[name], path) for path, name in samples)
    order = np.random.default_rng(seed).permutation(len(ordered))
    digest = hashlib.sha1("\n".join(f"{label}\t{path}" for label, path in ordered).encode()).hexdigest()
    return {"format_version": FORMAT_VERSION, "seed": seed, "num_shards": num_shards, "num_images": len(ordered),
            "num_classes": len(names), "sources_sha1": digest, "names": names,
            "labels": [ordered[i][0] for i in order], "paths": [ordered[i][1] for i in order]}


def shard_name(shard: int, num_shards: int) -> str:
    return f"train-{shard:05d}-of-{num_shards:05d}"


# --------------------------------------------------------------------------------------------------
# workers
# --------------------------------------------------------------------------------------------------

_progress = None  # a shared counter of packed images, set in each worker


def _init_worker(counter) -> None:
    global _progress
    _progress = counter


def image_bytes(path: str, image_size: int, quality: int) -> tuple[bytes, bool]:
    """(JPEG bytes, reencoded): the file itself when it is an image_size x image_size JPEG."""
    data = Path(path).read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        if image.format == "JPEG" and image.size == (image_size, image_size) and image.mode in ("RGB", "L"):
            return data, False
        image = image.convert("RGB")
        if image.size != (image_size, image_size):
            image = image.resize((image_size, image_size), Image.BILINEAR)
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=quality)
        return out.getvalue(), True


def pack_shard(out_dir: str, shard: int, num_shards: int, first_key: int, paths: list[str], labels: list[int],
               image_size: int, quality: int) -> tuple[int, list[str]]:
    """Write one shard and its manifest part; returns (images written, sources skipped)."""
    name = shard_name(shard, num_shards)
    rows = {field: [] for field in MANIFEST_SCHEMA.names}
    skipped = []
    with RecordIOWriter(os.path.join(out_dir, name + ".rec")) as writer:
        for count, (path, label) in enumerate(zip(paths, labels), start=1):
            key = first_key + count - 1
            try:
                payload, reencoded = image_bytes(path, image_size, quality)
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
                logger.warning("skipping %s: %s", path, error)
                skipped.append(path)
                continue
            offset = writer.write_record(key, IRHeader(0, float(label), key, 0), payload)
            for field, value in zip(MANIFEST_SCHEMA.names, (shard, offset, len(payload), label, key, path,
                                                            hashlib.blake2b(payload, digest_size=16).hexdigest(),
                                                            reencoded)):
                rows[field].append(value)
            if _progress is not None and count % 64 == 0:
                with _progress.get_lock():
                    _progress.value += 64
    table = pa.table(rows, schema=MANIFEST_SCHEMA).replace_schema_metadata({"skipped": json.dumps(skipped)})
    with atomic_open(os.path.join(out_dir, f"manifest-{shard:05d}.parquet")) as f:
        pq.write_table(table, f)
    if _progress is not None:
        with _progress.get_lock():
            _progress.value += len(paths) % 64
    return len(paths) - len(skipped), skipped


# --------------------------------------------------------------------------------------------------
# pack
# --------------------------------------------------------------------------------------------------


def pack(source: str, out_dir: str, *, seed: int = 0, num_shards: int = 0, images_per_shard: int = 100_000,
         workers: int = 0, image_size: int = 112, quality: int = 95, progress: bool = True) -> dict:
    """Pack ``source`` (see ``scan_sources``) into ``out_dir``; resumes an interrupted run. Returns dataset.json."""
    samples = scan_sources(source)
    num_shards = num_shards or max(1, math.ceil(len(samples) / images_per_shard))
    num_shards = min(num_shards, len(samples))
    plan = make_plan(samples, seed=seed, num_shards=num_shards)
    fingerprint = {k: plan[k] for k in ("format_version", "seed", "num_shards", "num_images", "sources_sha1")}
    fingerprint.update(image_size=image_size, quality=quality)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan_path = out / "pack-plan.json"
    if plan_path.is_file():
        previous = json.loads(plan_path.read_text())
        if previous != fingerprint:
            raise ValueError(f"{out} holds a pack of another plan ({plan_path}: {previous}); pack into an empty "
                             f"folder, or rerun with the same sources and options to resume")
        if (out / "dataset.json").is_file():
            logger.info("%s is already packed (dataset.json); nothing to do", out)
            return json.loads((out / "dataset.json").read_text())
    else:
        with atomic_open(str(plan_path), "w") as f:
            json.dump(fingerprint, f, indent=1)
    for stale in list(out.glob("train-*.tmp-*")) + list(out.glob("manifest-*.tmp-*")):
        stale.unlink()  # temporary files of an interrupted run (whole files are renamed into place)

    per_shard = math.ceil(plan["num_images"] / num_shards)
    todo = [s for s in range(num_shards) if not (out / f"manifest-{s:05d}.parquet").is_file()]
    done_images = sum(len(plan["paths"][s * per_shard:(s + 1) * per_shard]) for s in range(num_shards) if s not in todo)
    if len(todo) < num_shards:
        logger.info("resuming: %d of %d shards already packed in %s", num_shards - len(todo), num_shards, out)
    workers = workers or min(len(todo), os.cpu_count() or 1) or 1
    context = multiprocessing.get_context("fork" if sys.platform != "win32" else "spawn")
    counter = context.Value("q", 0)
    bar = _progress_bar(plan["num_images"], done_images, progress)
    with futures.ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker,
                                     initargs=(counter,)) as pool:
        jobs = [pool.submit(pack_shard, str(out), s, num_shards, s * per_shard,
                            plan["paths"][s * per_shard:(s + 1) * per_shard],
                            plan["labels"][s * per_shard:(s + 1) * per_shard], image_size, quality) for s in todo]
        pending = set(jobs)
        while pending:
            finished, pending = futures.wait(pending, timeout=0.5, return_when=futures.FIRST_COMPLETED)
            for job in finished:
                job.result()  # re-raise a worker's error
            bar.update(done_images + counter.value - bar.n)
    bar.close()
    return _finish(out, plan, fingerprint)


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="img", desc="pack", disable=not enabled, smoothing=0.1)


def _finish(out: Path, plan: dict, fingerprint: dict) -> dict:
    """Merge the manifest parts, write the label map and dataset.json."""
    num_shards = plan["num_shards"]
    parts = [pq.read_table(out / f"manifest-{s:05d}.parquet") for s in range(num_shards)]
    skipped = [path for part in parts for path in json.loads(part.schema.metadata[b"skipped"])]
    manifest = pa.concat_tables([part.replace_schema_metadata(None) for part in parts])
    with atomic_open(str(out / "manifest.parquet")) as f:
        pq.write_table(manifest, f)
    counts = np.bincount(manifest.column("label").to_numpy(), minlength=plan["num_classes"])
    labels = pa.table({"label": pa.array(np.arange(plan["num_classes"]), pa.int32()),
                       "name": pa.array(plan["names"], pa.string()), "images": pa.array(counts, pa.int64())})
    with atomic_open(str(out / "labels.parquet")) as f:
        pq.write_table(labels, f)
    meta = {"format_version": FORMAT_VERSION, "num_images": manifest.num_rows, "num_classes": plan["num_classes"],
            "num_shards": num_shards, "shards": [shard_name(s, num_shards) + ".rec" for s in range(num_shards)],
            "seed": plan["seed"], "image_size": fingerprint["image_size"],
            "reencoded": int(np.sum(manifest.column("reencoded").to_numpy())), "skipped": skipped}
    with atomic_open(str(out / "dataset.json"), "w") as f:
        json.dump(meta, f, indent=1)
    for s in range(num_shards):
        (out / f"manifest-{s:05d}.parquet").unlink()
    logger.info("packed %d images of %d identities into %d shards in %s (%d re-encoded, %d skipped)",
                meta["num_images"], meta["num_classes"], num_shards, out, meta["reencoded"], len(skipped))
    return meta


# --------------------------------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------------------------------


def load_manifest(folder: Path) -> dict | None:
    """manifest.parquet of a packed folder as sorted numpy columns (None when there is none).

    Rows are keyed by (shard << 40) | offset; ``hash`` is the hex digest as 32-byte strings (read from
    the Arrow buffers, not as 42M Python strings).
    """
    path = folder / "manifest.parquet"
    if not path.is_file():
        return None
    table = pq.read_table(path, columns=["shard", "offset", "length", "label", "hash"])
    shard = table.column("shard").to_numpy().astype(np.int64)
    keys = (shard << 40) | table.column("offset").to_numpy()
    hashes = table.column("hash").combine_chunks()
    offsets = np.frombuffer(hashes.buffers()[1], np.int32)[hashes.offset:hashes.offset + len(hashes) + 1]
    if hashes.null_count or not np.all(np.diff(offsets) == 32):
        raise ValueError(f"{path}: the hash column is not 32 hex digits per row; repack")
    data = np.frombuffer(hashes.buffers()[2], "S32", count=len(hashes), offset=int(offsets[0]))
    order = np.argsort(keys, kind="stable")
    meta_path = folder / "dataset.json"
    num_shards = json.loads(meta_path.read_text())["num_shards"] if meta_path.is_file() else int(shard.max()) + 1
    return {"keys": keys[order], "length": table.column("length").to_numpy()[order],
            "label": table.column("label").to_numpy()[order], "hash": data[order],
            "shard_of": {shard_name(s, num_shards) + ".rec": s for s in range(num_shards)}}


def _verify_range(index, manifest: dict | None, begin: int, end: int) -> list[str]:
    """Problems of images [begin, end): undecodable, or differing from the manifest."""
    from lvface.data.images import decode_image

    problems = []
    rows = index.rows[begin:end]
    if manifest is not None:
        shard_of = np.array([manifest["shard_of"].get(Path(f).name, -1) for f in index.files], np.int64)
        keys = (shard_of[rows["file"]] << 40) | rows["offset"]
        at = np.minimum(np.searchsorted(manifest["keys"], keys), len(manifest["keys"]) - 1)
        found = manifest["keys"][at] == keys
        same = found & (manifest["length"][at] == rows["length"]) & (manifest["label"][at] == rows["label"])
    for row, item in enumerate(range(begin, end)):
        payload = index.payload(item)
        if decode_image(payload) is None:
            problems.append(f"{index.where(item)}: the image does not decode")
        if manifest is None:
            continue
        if not found[row]:
            problems.append(f"{index.where(item)}: not in manifest.parquet")
        elif not same[row] or hashlib.blake2b(payload.tobytes(), digest_size=16).hexdigest().encode() != \
                manifest["hash"][at[row]]:
            problems.append(f"{index.where(item)}: differs from manifest.parquet (length, label or hash)")
    return problems


_verify_state: tuple = ()  # (index, manifest), set before forking the --verify workers


def _verify_chunk(begin: int, end: int) -> list[str]:
    return _verify_range(*_verify_state, begin, end)


def inspect(path: str, *, verify: bool = False, workers: int = 1, chunk: int = 4096, out=None) -> int:
    """Print what ``path`` holds; with ``verify`` decode every image (and check the manifest). Returns the
    number of problems found."""
    from lvface.data.index import RecordIndex

    global _verify_state
    out = out or sys.stdout
    index = RecordIndex.open(path)  # checks framing, offsets, truncation and labels
    labels = index.rows["label"].astype(np.int64)
    counts = np.bincount(labels, minlength=index.num_classes)
    present = counts[counts > 0]
    print(f"{path}: {len(index.files)} file(s), {index.num_images} images, {index.num_classes} identities "
          f"({len(present)} with images)", file=out)
    if present.size:
        q = np.percentile(present, [5, 50, 95])
        print(f"images per identity: min {present.min()}  p5 {q[0]:.0f}  median {q[1]:.0f}  mean "
              f"{present.mean():.1f}  p95 {q[2]:.0f}  max {present.max()}", file=out)
        edges = [1, 2, 6, 11, 21, 51, 101, 201, np.inf]
        for low, high in zip(edges[:-1], edges[1:]):
            number = int(np.sum((present >= low) & (present < high)))
            span = f"{low}" if high == low + 1 else (f"{low}-{int(high) - 1}" if np.isfinite(high) else f">={low}")
            print(f"  {span:>8} images: {number:>9} identities", file=out)
    if not verify:
        return 0
    manifest = load_manifest(Path(index.files[0]).parent)
    start = time.time()
    chunks = [(b, min(b + chunk, index.num_images)) for b in range(0, index.num_images, chunk)]
    problems: list[str] = []
    if workers > 1 and len(chunks) > 1:
        _verify_state = (index, manifest)
        context = multiprocessing.get_context("fork")
        with futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            for found in pool.map(_verify_chunk, *zip(*chunks)):
                problems += found
        _verify_state = ()
    else:
        for begin, end in chunks:
            problems += _verify_range(index, manifest, begin, end)
    for problem in problems[:50]:
        print(f"  {problem}", file=out)
    checked = "decoded every image" + (" and matched manifest.parquet" if manifest is not None else "")
    print(f"verify: {checked} in {time.time() - start:.1f}s: {len(problems)} problem(s)", file=out)
    return len(problems)


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------


def _pack_command(args: argparse.Namespace) -> int:
    meta = pack(args.source, args.out, seed=args.seed, num_shards=args.shards, images_per_shard=args.images_per_shard,
                workers=args.workers, image_size=args.image_size, quality=args.quality, progress=not args.quiet)
    print(json.dumps({k: v for k, v in meta.items() if k != "shards"}, indent=1))
    return 0


def _inspect_command(args: argparse.Namespace) -> int:
    return 1 if inspect(args.path, verify=args.verify, workers=args.workers) else 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("pack", help="image folders (one per identity) or a list file -> RecordIO "
                                                "shards + manifest.parquet")
    parser.add_argument("source", help="folder with one subfolder per identity, or a list file of 'path label'")
    parser.add_argument("--out", required=True, help="output folder (rerun with the same arguments to resume)")
    parser.add_argument("--shards", type=int, default=0, help="number of shards (default: from --images-per-shard)")
    parser.add_argument("--images-per-shard", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=0, help="processes (default: one per core)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pack-time shuffle")
    parser.add_argument("--image-size", type=int, default=112, help="images of other sizes are resized to this")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=_pack_command)

    parser = subparsers.add_parser("inspect", help="images, identities and images per identity of RecordIO data")
    parser.add_argument("path", help="a .rec file, a folder holding train.rec, or a folder of packed shards")
    parser.add_argument("--verify", action="store_true", help="decode every image; check manifest.parquet if present")
    parser.add_argument("--workers", type=int, default=1, help="processes for --verify")
    parser.set_defaults(func=_inspect_command)
