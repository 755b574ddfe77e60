"""IJB-C / IJB-B 1:N identification: open-set search of probe templates in two disjoint galleries.

Input, beside the 1:1 meta files (insightface's release layout, ``meta/`` under the set's root)::

    ijbc_1N_gallery_G1.csv, ijbc_1N_gallery_G2.csv    (IJB-B: ijbb_1N_gallery_S1.csv, ..._S2.csv)
    ijbc_1N_probe_mixed.csv

CSV files with a header line whose first two columns are TEMPLATE_ID and SUBJECT_ID (one row per image:
a template's rows repeat its id). Template features are the 1:1 protocol's (lvface.eval.ijbc
``template_features``: detector-score-weighted, media-averaged, summed, L2-normalised), so one embedding
pass serves both protocols.

The protocol, as NIST and the IJB-C paper define it (each gallery holds one template per subject; the
two galleries hold disjoint subjects, and each probe's subject is in one of them), per gallery:

- every probe is one search; scores are cosines of template features;
- a *mated* search is a probe whose subject has a template in the gallery; its mate's rank is 1 + the
  number of gallery templates that score strictly higher than the mate;
- rank-k (CMC) = the fraction of mated searches whose mate ranks <= k (closed-set identification);
- a *non-mated* search is a probe whose subject is not in the gallery; at FPIR target f the threshold is
  the (k+1)-th highest top-1 score of the non-mated searches, k = floor(f * non-mated searches), so that
  at most a fraction f of them return a candidate scoring above it (FPIR <= f; the FPIR reached is
  reported too);
- TPIR at f = the fraction of mated searches whose mate ranks 1 and scores above that threshold.

The figures reported are the mean over the two galleries (and each gallery's own). insightface's
``ijb_1n.py`` differs: it searches the union of both galleries (every probe mated) and takes the
threshold from all non-mate scores, which is not open-set FPIR; its numbers are not these.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

FPIR_TARGETS = (1e-2, 1e-1)
RANKS = (1, 5)
GALLERY_NAMES = {"IJBC": ("G1", "G2"), "IJBB": ("S1", "S2")}


@dataclass
class IdentificationMeta:
    galleries: dict[str, tuple[np.ndarray, np.ndarray]]
    """Gallery name (G1, G2 / S1, S2) -> (template ids, subject ids), one row per template."""
    probes: tuple[np.ndarray, np.ndarray]
    """(template ids, subject ids) of the probe templates."""


def read_template_subjects(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(template ids sorted, their subject ids) from a 1:N CSV; a template with two subjects is an error."""
    if not path.is_file():
        raise FileNotFoundError(f"IJB 1:N meta file {path} is missing (expected insightface's layout: "
                                f"<root>/meta/<name>_1N_gallery_*.csv and <name>_1N_probe_mixed.csv)")
    subject_of: dict[int, int] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for line_number, row in enumerate(csv.reader(f), 1):
            if not row or (line_number == 1 and not row[0].strip().lstrip("-").isdigit()):
                continue  # blank lines; the header
            try:
                template, subject = int(row[0]), int(row[1])
            except (ValueError, IndexError):
                raise ValueError(f"{path}:{line_number}: expected 'TEMPLATE_ID,SUBJECT_ID,...', got "
                                 f"{','.join(row)[:80]!r}") from None
            if subject_of.setdefault(template, subject) != subject:
                raise ValueError(f"{path}:{line_number}: template {template} is listed with subjects "
                                 f"{subject_of[template]} and {subject}")
    if not subject_of:
        raise ValueError(f"{path}: lists no templates")
    templates = np.array(sorted(subject_of), dtype=np.int64)
    return templates, np.array([subject_of[t] for t in templates.tolist()], dtype=np.int64)


def read_identification_meta(root: str | Path, name: str, known_templates: np.ndarray) -> IdentificationMeta:
    """The 1:N gallery and probe files of IJB-C or IJB-B under `root`, checked: one template per subject
    in each gallery, galleries without common subjects, every template among `known_templates` (those
    the face file defines)."""
    meta_dir, prefix = Path(root) / "meta", name.lower()
    galleries = {}
    for gallery in GALLERY_NAMES[name.upper()]:
        path = meta_dir / f"{prefix}_1N_gallery_{gallery}.csv"
        templates, subjects = read_template_subjects(path)
        repeated = np.unique(subjects, return_counts=True)
        if (repeated[1] > 1).any():
            raise ValueError(f"{path}: subject {repeated[0][repeated[1] > 1][0]} has several templates; a gallery "
                             "holds one template per subject")
        galleries[gallery] = (templates, subjects)
    (first, (_, subjects_a)), (second, (_, subjects_b)) = galleries.items()
    shared = np.intersect1d(subjects_a, subjects_b)
    if shared.size:
        raise ValueError(f"galleries {first} and {second} of {name} share subject {shared[0]}; they must be disjoint")
    probe_file = meta_dir / f"{prefix}_1N_probe_mixed.csv"
    probes = read_template_subjects(probe_file)
    for path, templates in [(meta_dir / f"{prefix}_1N_gallery_{g}.csv", galleries[g][0]) for g in galleries] + [
            (probe_file, probes[0])]:
        unknown = np.setdiff1d(templates, known_templates)
        if unknown.size:
            raise ValueError(f"{path}: template {unknown[0]} has no faces in {prefix}_face_tid_mid.txt")
    return IdentificationMeta(galleries=galleries, probes=probes)


def identification_metrics(probe_feats: np.ndarray, probe_subjects: np.ndarray, gallery_feats: np.ndarray,
                           gallery_subjects: np.ndarray, fpir_targets: Sequence[float] = FPIR_TARGETS,
                           ranks: Sequence[int] = RANKS) -> dict:
    """One gallery: rank-k of the mated searches, TPIR at each FPIR, and the counts (see the module doc)."""
    scores = np.asarray(probe_feats, np.float64) @ np.asarray(gallery_feats, np.float64).T  # (P, G)
    mate_column = {int(s): i for i, s in enumerate(gallery_subjects.tolist())}
    mated = np.array([int(s) in mate_column for s in probe_subjects.tolist()], dtype=bool)
    if not mated.any() or mated.all():
        raise ValueError(f"identification needs mated and non-mated searches: {int(mated.sum())} of "
                         f"{len(mated)} probes have a template in this gallery")
    columns = np.array([mate_column[int(s)] for s in probe_subjects[mated].tolist()])
    mate_scores = scores[mated][np.arange(len(columns)), columns]
    mate_ranks = 1 + (scores[mated] > mate_scores[:, None]).sum(1)
    non_mated_top = np.sort(scores[~mated].max(1))[::-1]  # descending
    result = {"mated_searches": int(mated.sum()), "non_mated_searches": int((~mated).sum()),
              "gallery_templates": int(len(gallery_subjects)),
              "rank": {int(k): float((mate_ranks <= k).mean()) for k in ranks}, "tpir_at_fpir": {}, "fpir": {},
              "threshold": {}}
    for target in fpir_targets:
        allowed = int(np.floor(target * len(non_mated_top)))
        threshold = non_mated_top[allowed] if allowed < len(non_mated_top) else -np.inf
        result["threshold"][float(target)] = float(threshold)
        result["fpir"][float(target)] = float((non_mated_top > threshold).mean())
        result["tpir_at_fpir"][float(target)] = float(((mate_ranks == 1) & (mate_scores > threshold)).mean())
    return result


def score_identification(meta: IdentificationMeta, template_ids: np.ndarray, template_feats: np.ndarray,
                         fpir_targets: Sequence[float] = FPIR_TARGETS, ranks: Sequence[int] = RANKS) -> dict:
    """Every gallery's `identification_metrics` and their mean: {"galleries": {name: ...}, "tpir_at_fpir",
    "rank", "num_probes"}; `template_ids` sorted ascending, rows of `template_feats` L2-normalised."""

    def rows(templates: np.ndarray) -> np.ndarray:
        return template_feats[np.searchsorted(template_ids, templates)]

    probe_templates, probe_subjects = meta.probes
    probe_feats = rows(probe_templates)
    per_gallery = {name: identification_metrics(probe_feats, probe_subjects, rows(templates), subjects,
                                                fpir_targets, ranks)
                   for name, (templates, subjects) in meta.galleries.items()}
    return {
        "galleries": per_gallery, "num_probes": int(len(probe_templates)),
        "tpir_at_fpir": {float(f): float(np.mean([g["tpir_at_fpir"][float(f)] for g in per_gallery.values()]))
                         for f in fpir_targets},
        "rank": {int(k): float(np.mean([g["rank"][int(k)] for g in per_gallery.values()])) for k in ranks},
    }


def format_identification_table(label: str, result: dict) -> str:
    """TPIR (%) at each FPIR and rank-k (%), one row per gallery and their mean."""
    fpirs, ranks = list(result["tpir_at_fpir"]), list(result["rank"])
    header = ["gallery"] + [f"TPIR@FPIR={f:.0e}" for f in fpirs] + [f"rank-{k}" for k in ranks]
    body = [[name] + [f"{100 * g['tpir_at_fpir'][f]:.2f}" for f in fpirs] + [f"{100 * g['rank'][k]:.2f}" for k in ranks]
            for name, g in result["galleries"].items()]
    body.append([f"{label} (mean)"] + [f"{100 * result['tpir_at_fpir'][f]:.2f}" for f in fpirs]
                + [f"{100 * result['rank'][k]:.2f}" for k in ranks])
    widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in [header] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
