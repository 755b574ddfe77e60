"""IJB-C / IJB-B 1:N identification against a plain reference of the open-set protocol, on random
template features and on the miniature IJB set test_ijbc.py builds, end to end through the command."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lvface.eval.ijb_identification import (
    identification_metrics, read_identification_meta, read_template_subjects, score_identification,
)
from lvface.eval.ijbc import evaluate_ijb, read_ijb_meta, template_features
from test_ijbc import NearestOriginalModel, make_mini_ijb, pooled_features

FPIRS = (1e-2, 1e-1, 0.25, 0.5)
RANKS = (1, 2, 5)


def reference_identification(feats: dict[int, np.ndarray], gallery: list[tuple[int, int]],
                             probes: list[tuple[int, int]], fpirs=FPIRS, ranks=RANKS) -> dict:
    """The protocol in loops: per probe, its score against every gallery template; a mated probe's rank
    counts the gallery templates scoring strictly above its mate; the threshold at FPIR f is the lowest
    non-mated top score (or -inf) above which at most f of the non-mated searches score."""
    gallery_subjects = [subject for _, subject in gallery]
    mate_ranks, mate_scores, non_mated_top = [], [], []
    for template, subject in probes:
        scores = [float(np.dot(feats[template], feats[g])) for g, _ in gallery]
        if subject in gallery_subjects:
            mate = scores[gallery_subjects.index(subject)]
            mate_ranks.append(1 + sum(1 for score in scores if score > mate))
            mate_scores.append(mate)
        else:
            non_mated_top.append(max(scores))
    tpir = {}
    for f in fpirs:
        allowed = [t for t in [-np.inf] + non_mated_top if sum(1 for s in non_mated_top if s > t) <= f * len(non_mated_top)]
        threshold = min(allowed)
        tpir[f] = sum(1 for r, s in zip(mate_ranks, mate_scores) if r == 1 and s > threshold) / len(mate_ranks)
    return {"rank": {k: sum(1 for r in mate_ranks if r <= k) / len(mate_ranks) for k in ranks}, "tpir_at_fpir": tpir,
            "mated_searches": len(mate_ranks), "non_mated_searches": len(non_mated_top)}


@pytest.mark.parametrize("seed", range(4))
def test_metrics_equal_the_reference_on_random_features(seed):
    # small integer features: every score is exact in float64, and there are many ties
    rng = np.random.default_rng(seed)
    num_subjects, dim = int(rng.integers(30, 60)), 6
    gallery_subjects = rng.permutation(num_subjects)[: num_subjects // 2]
    probe_subjects = rng.integers(0, num_subjects, size=int(rng.integers(150, 300)))
    feats = {t: rng.integers(-2, 3, dim).astype(np.float64) for t in range(len(gallery_subjects) + len(probe_subjects))}
    gallery = [(t, int(s)) for t, s in enumerate(gallery_subjects)]
    probes = [(len(gallery) + i, int(s)) for i, s in enumerate(probe_subjects)]
    got = identification_metrics(np.stack([feats[t] for t, _ in probes]), probe_subjects,
                                 np.stack([feats[t] for t, _ in gallery]), gallery_subjects, FPIRS, RANKS)
    expected = reference_identification(feats, gallery, probes)
    assert got["rank"] == expected["rank"] and got["tpir_at_fpir"] == expected["tpir_at_fpir"]
    assert (got["mated_searches"], got["non_mated_searches"]) == (expected["mated_searches"], expected["non_mated_searches"])
    assert all(got["fpir"][f] <= f for f in FPIRS)


def test_hand_worked_example():
    # gallery: subjects 1, 2 (1-d features 1 and -1). Probes: mated 1 (0.9 -> rank 1), mated 2 (0.2: scores 0.2
    # against subject 1 and -0.2 against its mate -> rank 2), non-mated 7 (top 0.5), non-mated 8 (top 0.1).
    gallery = np.array([[1.0], [-1.0]])
    probes = np.array([[0.9], [0.2], [0.5], [-0.1]])
    result = identification_metrics(probes, np.array([1, 2, 7, 8]), gallery, np.array([1, 2]), (0.0, 0.5, 1.0), (1, 2))
    assert result["rank"] == {1: 0.5, 2: 1.0}
    # FPIR 0: threshold 0.5 (no non-mated above) -> 0.9 passes; 0.5: threshold 0.1 -> still only the first;
    # 1.0: threshold -inf -> the rank-1 one only (the second's mate is rank 2)
    assert result["threshold"] == {0.0: 0.5, 0.5: 0.1, 1.0: -np.inf}
    assert result["tpir_at_fpir"] == {0.0: 0.5, 0.5: 0.5, 1.0: 0.5}
    assert result["fpir"] == {0.0: 0.0, 0.5: 0.5, 1.0: 1.0}


def write_1n_meta(root: Path, truth: dict, name: str = "IJBC") -> tuple[dict, list]:
    """Galleries of the mini set: each subject's first template, subjects 0..n/2-1 in G1 and the rest in G2;
    every other template is a probe (mated in one gallery, non-mated in the other). Subjects are ids + 1000."""
    prefix, (first, second) = name.lower(), (("G1", "G2") if name == "IJBC" else ("S1", "S2"))
    by_subject: dict[int, list[int]] = {}
    for template, identity in sorted(truth["template_identity"].items()):
        by_subject.setdefault(identity + 1000, []).append(template)
    half = len(by_subject) // 2
    galleries = {first: [(ts[0], s) for s, ts in by_subject.items() if s - 1000 < half],
                 second: [(ts[0], s) for s, ts in by_subject.items() if s - 1000 >= half]}
    probes = [(t, s) for s, ts in by_subject.items() for t in ts[1:]]

    def write(path: Path, rows):  # one row per image, as the release's files: the template repeats
        path.write_text("TEMPLATE_ID,SUBJECT_ID,FILENAME\n" + "".join(f"{t},{s},img/{t}_{k}.jpg\n" for t, s in rows
                                                                      for k in range(2)))

    for gallery, rows in galleries.items():
        write(root / "meta" / f"{prefix}_1N_gallery_{gallery}.csv", rows)
    write(root / "meta" / f"{prefix}_1N_probe_mixed.csv", probes)
    return galleries, probes


@pytest.fixture(scope="module")
def mini_1n(tmp_path_factory):
    root = tmp_path_factory.mktemp("ijb1n") / "IJBC"
    truth = make_mini_ijb(root, identities=6, templates_per_identity=3, seed=4)
    galleries, probes = write_1n_meta(root, truth)
    return root, truth, galleries, probes


def test_end_to_end_equals_the_reference_on_the_mini_set(mini_1n, tmp_path):
    root, truth, galleries, probes = mini_1n
    meta = read_ijb_meta(root, "IJBC")
    result = evaluate_ijb(pooled_features, root, "IJBC", batch_size=4, protocol="both", output_dir=tmp_path / "out")
    assert result["tar_at_far"] and result["auc"] > 0  # 1:1 from the same pass
    identification = result["identification"]
    # the reference from scratch: embed as test_ijbc's protocol test does, aggregate by insightface's steps
    from lvface.eval.ijbc import AlignedIJBFaces, embed_faces

    features = embed_faces(pooled_features, AlignedIJBFaces(meta.image_dir, meta.image_names, meta.landmarks), batch_size=4)
    ids, feats = template_features(features, meta.templates, meta.medias, meta.face_scores)
    by_id = dict(zip(ids.tolist(), feats))
    fpirs, ranks = (1e-2, 1e-1), (1, 5)
    for name, gallery in galleries.items():
        expected = reference_identification(by_id, gallery, probes, fpirs, ranks)
        got = identification["galleries"][name]
        assert got["rank"] == pytest.approx(expected["rank"], abs=1e-12), name
        assert got["tpir_at_fpir"] == pytest.approx(expected["tpir_at_fpir"], abs=1e-12), name
        assert got["mated_searches"] + got["non_mated_searches"] == len(probes)
    assert identification["rank"][1] == pytest.approx(np.mean([identification["galleries"][g]["rank"][1] for g in galleries]))
    saved = json.loads((tmp_path / "out" / "ijbc_result.json").read_text())
    assert saved["identification"]["tpir_at_fpir"]["0.01"] == identification["tpir_at_fpir"][0.01]
    assert "TPIR@FPIR=1e-02" in identification["table"] and "rank-5" in identification["table"]


def test_a_perfect_model_identifies_every_probe(mini_1n):
    root, truth, _, _ = mini_1n
    model = NearestOriginalModel(truth["originals"], truth["identity"])
    result = evaluate_ijb(model, root, "IJBC", batch_size=4, protocol="1:N")
    assert "tar_at_far" not in result
    assert result["identification"]["rank"] == {1: 1.0, 5: 1.0}
    assert result["identification"]["tpir_at_fpir"] == {0.01: 1.0, 0.1: 1.0}


def test_bad_1n_meta_files_are_named(mini_1n, tmp_path):
    import shutil

    root = tmp_path / "IJBC"
    shutil.copytree(mini_1n[0], root)
    known = np.unique(read_ijb_meta(root, "IJBC").templates)
    g1 = root / "meta" / "ijbc_1N_gallery_G1.csv"
    text = g1.read_text()
    first_template, first_subject = text.splitlines()[1].split(",")[:2]
    cases = [
        (g1, text + f"{first_template},999,x.jpg\n", f"template {first_template} is listed with subjects"),
        (g1, text + f"99999,{first_subject},x.jpg\n", "has several templates"),
        (g1, text + "abc,1\n", "ijbc_1N_gallery_G1.csv:"),
        (g1, text + "99999,77,x.jpg\n", "template 99999 has no faces"),
        (root / "meta" / "ijbc_1N_gallery_G2.csv", None, "share subject"),
    ]
    for path, content, phrase in cases:
        original = path.read_text()
        path.write_text(content if content is not None else original + text.splitlines()[1] + "\n")
        with pytest.raises(ValueError, match=phrase):
            read_identification_meta(root, "IJBC", known)
        path.write_text(original)
    (root / "meta" / "ijbc_1N_probe_mixed.csv").unlink()
    with pytest.raises(FileNotFoundError, match="ijbc_1N_probe_mixed.csv"):
        read_identification_meta(root, "IJBC", known)
    assert read_template_subjects(g1)[0].tolist() == sorted({int(line.split(",")[0]) for line in text.splitlines()[1:]})


def test_eval_ijbc_command_with_protocol_both(mini_1n, tmp_path):
    import argparse

    import torch

    from lvface.eval import commands
    from lvface.models import build_vit

    torch.manual_seed(0)
    module = build_vit("vit_demo").eval()
    torch.save(module.state_dict(), tmp_path / "backbone.pt")
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "ijbc", "--checkpoint", str(tmp_path / "backbone.pt"), "--root", str(mini_1n[0]),
                              "--protocol", "both", "--batch", "8", "--workers", "0", "--output-dir",
                              str(tmp_path / "out"), "--json", str(tmp_path / "r.json")])
    assert args.func(args) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert set(result["identification"]["tpir_at_fpir"]) == {"0.01", "0.1"}
    assert set(result["identification"]["rank"]) == {"1", "5"} and result["tar_at_far"]
    assert set(result["identification"]["galleries"]) == {"G1", "G2"}


def test_score_identification_rows_follow_template_ids():
    # template ids out of order in the meta: rows are looked up by id, not by position
    from lvface.eval.ijb_identification import IdentificationMeta

    ids = np.array([3, 10, 11, 20, 21])
    feats = np.eye(5)[[0, 1, 2, 1, 2]]  # 20 looks like 10, 21 like 11
    meta = IdentificationMeta(galleries={"G1": (np.array([10]), np.array([1])), "G2": (np.array([11]), np.array([2]))},
                              probes=(np.array([20, 21]), np.array([1, 2])))
    result = score_identification(meta, ids, feats, fpir_targets=(0.5,), ranks=(1,))
    assert result["rank"] == {1: 1.0} and result["num_probes"] == 2
