"""The `eval verify`, `eval ijbc`, `embed` and `export` subcommands, end to end on tiny inputs."""
from __future__ import annotations

import argparse
import io
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import lvface.cli
from lvface import export
from lvface.data.images import normalize_images
from lvface.data.synthetic import render_face
from lvface.data.verification_bin import load_bin, write_bin
from lvface.eval import commands
from lvface.eval.verification import verification_set_names
from lvface.eval.verification import embed_flip_sum, evaluate_pairs
from lvface.models import build_vit
from test_ijbc import make_mini_ijb


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lvface")
    subparsers = parser.add_subparsers(dest="command", required=True)
    commands.register(subparsers)
    export.register(subparsers)
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    """A vit_demo backbone saved as a plain insightface-style file, and the module."""
    torch.manual_seed(0)
    module = build_vit("vit_demo")
    module.train()
    with torch.no_grad():
        module(torch.randn(4, 3, 112, 112))  # non-trivial BatchNorm statistics
    module.eval()
    path = tmp_path_factory.mktemp("ckpt") / "backbone.pt"
    torch.save({f"module.{k}": v for k, v in module.state_dict().items()}, path)
    return path, module


def _jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def test_eval_verify_end_to_end(backbone, tmp_path, caplog):
    path, module = backbone
    jpegs, issame = [], []
    for pair in range(10):  # 5 same, 5 different, interleaved
        same = pair % 2 == 0
        jpegs += [_jpeg(render_face(3, pair, 0)), _jpeg(render_face(3, pair if same else pair + 100, 1))]
        issame.append(same)
    write_bin(str(tmp_path / "tiny.bin"), jpegs, issame)
    write_bin(str(tmp_path / "tiny2.bin"), jpegs[::-1], issame[::-1])
    args = parse(["eval", "verify", "--checkpoint", str(path), "--bin", str(tmp_path / "tiny.bin"),
                  str(tmp_path / "tiny2.bin"), "--batch", "8", "--json", str(tmp_path / "verify.json")])
    with caplog.at_level(logging.INFO):
        assert args.func(args) == 0
    results = json.loads((tmp_path / "verify.json").read_text())
    assert list(results) == ["tiny", "tiny2"] and results["tiny"]["num_pairs"] == 10
    images, same = load_bin(str(tmp_path / "tiny.bin"))
    with torch.no_grad():
        expected = evaluate_pairs(embed_flip_sum(module, images, 8), same)
    assert results["tiny"]["accuracy"] == pytest.approx(expected["accuracy"])
    assert results["tiny"]["accuracy_std"] == pytest.approx(expected["accuracy_std"])
    assert results["tiny"]["auc"] == pytest.approx(expected["auc"])
    assert set(results["tiny"]["tar_at_far"]) == {"0.001", "0.01", "0.1"}
    table = next(r.getMessage() for r in caplog.records if "10-fold" in r.getMessage())
    assert "tiny2" in table and "±" in table and "TAR@FAR=1e-03" in table
    # arcface_torch's lines, as training logs them; step 0 for a backbone file without train_state.json
    tiny = results["tiny"]
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("[tiny]")] == [
        f"[tiny][0]XNorm: {tiny['xnorm']:f}", f"[tiny][0]Accuracy-Flip: {tiny['accuracy']:1.5f}+-{tiny['accuracy_std']:1.5f}",
        f"[tiny][0]Accuracy-Highest: {tiny['accuracy']:1.5f}"]
    assert tiny["xnorm"] > 0


def test_verify_keys_two_bins_with_one_name_apart(backbone, tmp_path):
    # a/tiny.bin and b/tiny.bin: keyed by the stem they would overwrite each other; both results stay
    path, module = backbone
    jpegs, issame = [], []
    for pair in range(10):  # the 10-fold protocol needs >= 10 pairs per set
        same = pair % 2 == 0
        jpegs += [_jpeg(render_face(4, pair, 0)), _jpeg(render_face(4, pair if same else pair + 50, 1))]
        issame.append(same)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_bin(str(tmp_path / "a" / "tiny.bin"), jpegs, issame)
    write_bin(str(tmp_path / "b" / "tiny.bin"), jpegs[2:] + jpegs[:2], issame[1:] + issame[:1])
    bins = [str(tmp_path / "a" / "tiny.bin"), str(tmp_path / "b" / "tiny.bin")]
    results = commands.run_verify(str(path), bins, batch_size=10, device="cpu")
    assert list(results) == ["a/tiny", "b/tiny"]
    assert [results[name]["path"] for name in results] == bins
    assert results["a/tiny"]["num_pairs"] == results["b/tiny"]["num_pairs"] == 10
    table = commands.format_verify_table(results)
    assert "a/tiny" in table and "b/tiny" in table
    with pytest.raises(ValueError, match="listed twice"):
        commands.run_verify(str(path), [bins[0], str(tmp_path / "a" / ".." / "a" / "tiny.bin")])


def test_training_callback_keys_two_bins_with_one_name_apart(tmp_path):
    from lvface.eval.callback import VerificationCallback

    jpegs = [_jpeg(render_face(6, i, 0)) for i in range(24)]
    for folder, count in (("a", 12), ("b", 10)):
        (tmp_path / folder).mkdir()
        write_bin(str(tmp_path / folder / "lfw.bin"), jpegs[:2 * count], [i % 2 == 0 for i in range(count)])
    bins = [str(tmp_path / "a" / "lfw.bin"), str(tmp_path / "b" / "lfw.bin")]
    callback = VerificationCallback(bins, 4, rank=0, world_size=1, group=None, device="cpu")
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, 8))
    results = callback(module, step=3)
    assert list(results) == ["a/lfw", "b/lfw"]
    assert [results[name]["num_pairs"] for name in results] == [12, 10]


def test_verification_set_names():
    assert verification_set_names(["lfw.bin", "cfp_fp.bin"]) == ["lfw", "cfp_fp"]
    assert verification_set_names(["x/a/lfw.bin", "y/a/lfw.bin", "z/cfp.bin"]) == ["x/a/lfw", "y/a/lfw", "cfp"]
    assert verification_set_names(["/lfw.bin", "/x/lfw.bin"]) == ["/lfw", "x/lfw"]  # nothing shorter tells /lfw apart


def _write_faces(folder: Path, count: int) -> list[np.ndarray]:
    folder.mkdir(parents=True)
    faces = [render_face(5, identity, 0) for identity in range(count)]
    for index, face in enumerate(faces):
        sub = folder / ("a" if index % 2 else "b")
        sub.mkdir(exist_ok=True)
        Image.fromarray(face).save(sub / f"{index:02d}.png")
    return faces


def test_embed_npy_and_parquet(backbone, tmp_path):
    path, module = backbone
    faces = _write_faces(tmp_path / "faces", 5)
    args = parse(["embed", "--checkpoint", str(path), "--input", str(tmp_path / "faces"), "--output",
                  str(tmp_path / "emb.npy"), "--batch", "2", "--workers", "0"])
    assert args.func(args) == 0
    embeddings = np.load(tmp_path / "emb.npy")
    names = (tmp_path / "emb.paths.txt").read_text().split()
    assert names == sorted(names) and len(names) == 5 and names[0] == "a/01.png"
    order = [int(Path(name).stem) for name in names]
    images = torch.from_numpy(np.stack([faces[i] for i in order])).permute(0, 3, 1, 2)
    with torch.no_grad():
        plain = torch.nn.functional.normalize(module(normalize_images(images)), dim=1).numpy()
        flipped = embed_flip_sum(module, images, 4)
    assert embeddings.dtype == np.float32 and embeddings.shape == (5, 512)
    np.testing.assert_allclose(embeddings, plain, atol=1e-5)

    (tmp_path / "list.txt").write_text("# aligned faces\nfaces/b/00.png\n\nfaces/a/03.png\n")
    args = parse(["embed", "--checkpoint", str(path), "--input", str(tmp_path / "list.txt"), "--output",
                  str(tmp_path / "emb.parquet"), "--flip", "--workers", "0"])
    assert args.func(args) == 0
    table = pq.read_table(tmp_path / "emb.parquet")
    embedding_type = table.schema.field("embedding").type
    assert table.column_names == ["path", "embedding"]
    assert pa.types.is_list(embedding_type) and embedding_type.value_type == pa.float32()
    assert table.column("path").to_pylist() == ["faces/b/00.png", "faces/a/03.png"]
    got = np.array(table.column("embedding").to_pylist(), np.float32)
    np.testing.assert_allclose(got, flipped[[order.index(0), order.index(3)]], atol=1e-5)


def test_embed_skips_and_counts_unaligned_images(backbone, tmp_path, caplog):
    path, module = backbone
    (tmp_path / "faces").mkdir()
    faces = [render_face(5, i, 0) for i in range(3)]
    for i, face in enumerate(faces):
        Image.fromarray(face).save(tmp_path / "faces" / f"{i}.png")
    Image.new("RGB", (150, 150), (90, 60, 30)).save(tmp_path / "faces" / "big.png")
    (tmp_path / "faces" / "broken.jpg").write_bytes(b"not a jpeg")
    args = parse(["embed", "--checkpoint", str(path), "--input", str(tmp_path / "faces"), "--output",
                  str(tmp_path / "e.npy"), "--workers", "2", "--batch", "2"])
    with caplog.at_level(logging.INFO):
        assert args.func(args) == 0
    names = (tmp_path / "e.paths.txt").read_text().split()
    assert names == ["0.png", "1.png", "2.png"]
    images = torch.from_numpy(np.stack(faces)).permute(0, 3, 1, 2)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(module(normalize_images(images)), dim=1).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "e.npy"), expected, atol=1e-5)
    skipped = (tmp_path / "e.skipped.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in skipped] == ["big.png", "broken.jpg"]
    assert "150x150 pixels, not an aligned 112x112 crop" in skipped[0] and "cannot read" in skipped[1]
    assert any("skipped 2 of 5 images" in r.getMessage() for r in caplog.records)

    # with its 5 landmarks the 150x150 image is aligned and embedded: equal to aligning it by hand
    from lvface.eval.ijbc import ARCFACE_TEMPLATE, align_face

    loose = np.asarray(Image.open(tmp_path / "faces" / "big.png").convert("RGB"))
    points = ARCFACE_TEMPLATE * 1.2 + 5
    (tmp_path / "lm.txt").write_text("big.png " + " ".join(f"{v:.4f}" for v in points.ravel()) + "\n")
    args = parse(["embed", "--checkpoint", str(path), "--input", str(tmp_path / "faces"), "--output",
                  str(tmp_path / "l.npy"), "--workers", "0", "--landmarks", str(tmp_path / "lm.txt")])
    assert args.func(args) == 0
    names = (tmp_path / "l.paths.txt").read_text().split()
    assert names == ["0.png", "1.png", "2.png", "big.png"]
    aligned = align_face(loose, np.array([float(f"{v:.4f}") for v in points.ravel()], np.float32).reshape(5, 2))
    with torch.no_grad():
        big = torch.nn.functional.normalize(module(normalize_images(torch.from_numpy(aligned).permute(2, 0, 1)[None])), dim=1)
    np.testing.assert_allclose(np.load(tmp_path / "l.npy")[3], big[0].numpy(), atol=1e-5)
    assert (tmp_path / "l.skipped.txt").read_text().split("\t")[0] == "broken.jpg"

    (tmp_path / "bad_lm.txt").write_text("nope.png " + " ".join(["1"] * 10) + "\n")
    args = parse(["embed", "--checkpoint", str(path), "--input", str(tmp_path / "faces"), "--output",
                  str(tmp_path / "x.npy"), "--landmarks", str(tmp_path / "bad_lm.txt")])
    with pytest.raises(ValueError, match="bad_lm.txt:1: image 'nope.png'"):
        args.func(args)
    (tmp_path / "only").mkdir()
    Image.new("RGB", (100, 120)).save(tmp_path / "only" / "big.png")
    args = parse(["embed", "--checkpoint", str(path), "--input", str(tmp_path / "only"), "--output",
                  str(tmp_path / "o.npy"), "--workers", "0"])
    with pytest.raises(ValueError, match="none of the 1 images"):
        args.func(args)
    args = parse(["embed", "--checkpoint", str(path), "--input", str(tmp_path / "faces"), "--output",
                  str(tmp_path / "e.csv")])
    with pytest.raises(ValueError, match=r"\.npy or \.parquet"):
        args.func(args)


def test_export_command(backbone, tmp_path):
    path, module = backbone
    args = parse(["export", "--checkpoint", str(path), "--output", str(tmp_path / "m.onnx"), "--latency-runs", "3",
                  "--json", str(tmp_path / "report.json")])
    assert args.func(args) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["passed"] and report["opset"] == 17 and report["model"] == "vit_demo"
    assert report["exporter"].startswith("torch.onnx.export (TorchScript")
    assert report["latency"]["runs"] == 3 and (tmp_path / "m.onnx").stat().st_size < 2**30


def test_eval_ijbc_command(backbone, tmp_path):
    root = tmp_path / "IJBC"
    make_mini_ijb(root, identities=3)
    args = parse(["eval", "ijbc", "--checkpoint", str(backbone[0]), "--root", str(root), "--batch", "4",
                  "--workers", "0", "--output-dir", str(tmp_path / "out"), "--json", str(tmp_path / "r.json")])
    assert args.func(args) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["name"] == "IJBC"
    assert set(result["tar_at_far"]) == {"1e-06", "1e-05", "0.0001", "0.001", "0.01", "0.1"}
    assert all(0.0 <= tar <= 1.0 for tar in result["tar_at_far"].values())
    with Image.open(tmp_path / "out" / "ijbc_roc.png") as image:
        assert image.format == "PNG"
    assert np.load(tmp_path / "out" / "ijbc_scores.npy").shape == (result["num_pairs"],)


def test_cli_main_reports_errors(backbone, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(lvface.cli, "COMMAND_MODULES", ["lvface.eval.commands", "lvface.export"])
    root = tmp_path / "IJBC"
    (root / "meta").mkdir(parents=True)
    (root / "loose_crop").mkdir()
    code = lvface.cli.main(["eval", "ijbc", "--checkpoint", str(backbone[0]), "--root", str(root)])
    assert code == 2 and "ijbc_name_5pts_score.txt" in capsys.readouterr().err
    code = lvface.cli.main(["export", "--checkpoint", str(tmp_path / "nothing"), "--output", str(tmp_path / "m.onnx")])
    assert code == 2 and "no such file or folder" in capsys.readouterr().err
