"""`lvface plot RUN_DIR`: PNGs of a run's loss, learning rate, verification accuracy and throughput,
drawn with matplotlib from the run's Parquet metrics log (RUN_DIR/metrics.parquet).

    lvface plot demo_out/run                 # -> demo_out/run/plots/{loss,lr,accuracy,throughput}.png
    lvface plot demo_out/run --out figures

The log has one row per logged step (step, epoch, loss, lr, images_per_s, bad_records) and one row
per verification (step, <set>_accuracy); a plot takes the rows where its column is present.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from lvface.run_folder import METRICS_NAME, RunFolder

log = logging.getLogger(__name__)

# (file stem, title, y label, columns)
PLOTS = (
    ("loss", "Training loss", "loss", ("loss",)),
    ("lr", "Learning rate (backbone; the head follows it)", "learning rate", ("lr",)),
    ("throughput", "Throughput (all ranks)", "images / s", ("images_per_s",)),
)


def _series(table: dict, column: str) -> tuple[list, list]:
    pairs = [(s, v) for s, v in zip(table["step"], table[column]) if v is not None and s is not None]
    return [s for s, _ in pairs], [v for _, v in pairs]


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write the PNGs of a run; returns their paths. Raises FileNotFoundError without a metrics log."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    import pyarrow.parquet as pq

    run_dir = Path(run_dir)
    log_path = RunFolder(run_dir).metrics
    if not log_path.is_file():
        raise FileNotFoundError(f"{log_path} not found: pass the run's train.output_dir (the folder holding "
                                f"{METRICS_NAME}, written by rank 0 at every checkpoint)")
    table = pq.read_table(log_path).to_pydict()
    out = Path(out_dir) if out_dir else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    accuracy_columns = sorted(c for c in table if c.endswith("_accuracy"))
    plots = list(PLOTS)
    if accuracy_columns:
        plots.append(("accuracy", "Verification accuracy (10-fold)", "accuracy", tuple(accuracy_columns)))
    written = []
    for stem, title, ylabel, columns in plots:
        series = {c: _series(table, c) for c in columns if c in table}
        series = {c: xy for c, xy in series.items() if xy[0]}
        if not series:
            log.warning("%s: no %s in the log; %s.png not drawn", log_path, "/".join(columns), stem)
            continue
        figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
        for column, (steps, values) in series.items():
            label = column.removesuffix("_accuracy") if stem == "accuracy" else column
            axes.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=label)
        axes.set_title(f"{title} -- {run_dir.name}")
        axes.set_xlabel("optimizer step")
        axes.set_ylabel(ylabel)
        axes.grid(True, alpha=0.3)
        if len(series) > 1 or stem == "accuracy":
            axes.legend()
        figure.tight_layout()
        path = out / f"{stem}.png"
        figure.savefig(path)
        plt.close(figure)
        written.append(path)
    log.info("wrote %s", ", ".join(str(p) for p in written))
    return written


def _plot_command(args: argparse.Namespace) -> int:
    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("plot", help="PNGs of a run's loss, lr, verification accuracy and images/s",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help=f"the run's train.output_dir (holds {METRICS_NAME})")
    parser.add_argument("--out", default=None, help="folder for the PNGs (default RUN_DIR/plots)")
    parser.set_defaults(func=_plot_command)
