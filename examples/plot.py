r"""Figures from sweep results: the paper's Figure 1 and a criteria-overlap heatmap.

Figure 1: test accuracy vs. density (log x), one column per setup (model / dataset),
one row per growth rule, one curve per criterion with mean ± std over seeds, static
sparse training as its own curve and the dense model as a dashed horizontal line::

    python examples/plot.py --csv runs/sweep.csv --out runs/figure1
    python examples/plot.py --overlap overlap.json --out runs/overlap

Writes ``<out>.png`` and ``<out>.pdf``. The overlap input is the JSON of
`keras_dst.CriteriaOverlap` (``{"names": [...], "matrix": [[...]]}``) or a CSV whose
header row holds the names.
"""

import collections
import csv
import json
import os
import sys

import matplotlib
from absl import app, flags

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

METRICS = ("best_val_test_accuracy", "final_test_accuracy")


def read_rows(csv_path):
    """The rows of a sweep CSV as dicts (numbers converted)."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in ("density", "actual_density", *METRICS):
            if row.get(key) not in (None, ""):
                row[key] = float(row[key])
    return rows


def _mean_std(rows, metric):
    """{density: (mean, std)} over the seeds of `rows`."""
    by_density = collections.defaultdict(list)
    for row in rows:
        by_density[row["density"]].append(row[metric])
    return {d: (float(np.mean(v)), float(np.std(v))) for d, v in sorted(by_density.items())}


def _curve(ax, stats, label, **style):
    x = np.array(list(stats))
    mean, std = np.array([stats[d] for d in x]).T
    line, = ax.plot(x, mean, marker="o", markersize=3, label=label, **style)
    ax.fill_between(x, mean - std, mean + std, alpha=0.2, color=line.get_color(), linewidth=0)


def _save(fig, out):
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    paths = [f"{out}.png", f"{out}.pdf"]
    for path in paths:
        fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return paths


def plot_figure1(rows, out="figure1", metric="best_val_test_accuracy"):
    """Draws Figure 1 from sweep rows (a CSV path or `read_rows` output).

    Returns:
      The paths written (PNG and PDF).
    """
    if isinstance(rows, (str, os.PathLike)):
        rows = read_rows(rows)
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if not rows:
        raise ValueError("no rows to plot")
    setups = sorted({(r["model"], r["dataset"]) for r in rows})
    growths = sorted({r["grow"] for r in rows if r["method"] == "dst"}) or [""]
    fig, axes = plt.subplots(len(growths), len(setups), squeeze=False, sharex=True,
                             figsize=(4.2 * len(setups), 3.2 * len(growths)))
    for col, (model, dataset) in enumerate(setups):
        setup = [r for r in rows if (r["model"], r["dataset"]) == (model, dataset)]
        dense = [r[metric] for r in setup if r["method"] == "dense"]
        static = [r for r in setup if r["method"] == "static"]
        gmp = [r for r in setup if r["method"] == "gmp"]
        densities = sorted({r["density"] for r in setup if r["method"] != "dense"})
        for row, growth in enumerate(growths):
            ax = axes[row][col]
            criteria = sorted({r["prune"] for r in setup
                               if r["method"] == "dst" and r["grow"] == growth})
            for criterion in criteria:
                _curve(ax, _mean_std([r for r in setup if r["method"] == "dst" and
                                      r["prune"] == criterion and r["grow"] == growth],
                                     metric), criterion)
            if static:
                _curve(ax, _mean_std(static, metric), "static", color="black", linestyle=":")
            if gmp:
                _curve(ax, _mean_std(gmp, metric), "gmp", color="gray", linestyle="-.")
            if dense:
                ax.axhline(np.mean(dense), color="black", linestyle="--", linewidth=1,
                           label=f"dense ({np.mean(dense):.3f})")
            ax.set_xscale("log")
            if densities:
                ax.set_xticks(densities)
                ax.set_xticklabels([f"{d:g}" for d in densities], rotation=45, fontsize=7)
                ax.minorticks_off()
            title = f"{model} / {dataset}" + (f" — {growth} growth" if growth else "")
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("density")
            ax.set_ylabel(metric.replace("_", " "))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out)


def read_matrix(source):
    """(names, matrix) from a dict, a JSON file or a CSV file with a header of names."""
    if isinstance(source, dict):
        data = source
    elif str(source).endswith(".csv"):
        with open(source, newline="") as f:
            lines = list(csv.reader(f))
        names = lines[0][1:] if lines[0] and lines[0][0] == "" else lines[0]
        body = [line[-len(names):] for line in lines[1:]]
        data = {"names": names, "matrix": [[float(v) for v in line] for line in body]}
    else:
        with open(source) as f:
            data = json.load(f)
    names, matrix = list(data["names"]), np.asarray(data["matrix"], dtype=float)
    if matrix.shape != (len(names), len(names)):
        raise ValueError(f"the matrix must be {len(names)}x{len(names)} for names {names}, "
                         f"got shape {matrix.shape}")
    return names, matrix


def plot_overlap(source, out="overlap", title="Jaccard index of pruned sets"):
    """Heatmap of a square criteria-overlap (Jaccard) matrix; returns the paths written."""
    names, matrix = read_matrix(source)
    size = 1.0 + 0.7 * len(names)
    fig, ax = plt.subplots(figsize=(size + 1.0, size))
    image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if matrix[i, j] < 0.6 else "black")
    fig.colorbar(image, ax=ax)
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, out)


def define_flags(flag_values=flags.FLAGS):
    flags.DEFINE_string("csv", None, "Sweep CSV (examples/sweep.py) to draw Figure 1 from.",
                        flag_values=flag_values)
    flags.DEFINE_string("overlap", None, "Criteria-overlap JSON/CSV to draw as a heatmap.",
                        flag_values=flag_values)
    flags.DEFINE_string("out", None, "Output path without extension (default: figure1 / "
                        "overlap).", flag_values=flag_values)
    flags.DEFINE_enum("metric", "best_val_test_accuracy", METRICS, "Accuracy to plot.",
                      flag_values=flag_values)


def parse_flags(argv):
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        sys.exit(f"error: {e}")


def main(argv):
    FLAGS = flags.FLAGS
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}")
    if bool(FLAGS.csv) == bool(FLAGS.overlap):
        sys.exit("error: pass exactly one of --csv (Figure 1) or --overlap (heatmap)")
    try:
        paths = (plot_figure1(FLAGS.csv, FLAGS.out or "figure1", FLAGS.metric) if FLAGS.csv
                 else plot_overlap(FLAGS.overlap, FLAGS.out or "overlap"))
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"error: {type(e).__name__}: {e}")
    print("wrote " + ", ".join(paths))


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
