r"""Figures from sweep results: the paper's Figure 1, a criteria-overlap heatmap, and
accuracy per sparsity pattern (``--patterns a.csv,b.csv``).

Figure 1: test accuracy vs. density (log x), one column per setup (model / dataset),
one row per growth rule, one curve per criterion with mean ± std over seeds, static
sparse training as its own curve and the dense model as a dashed horizontal line (a CSV
holding runs of several sparsity patterns gets one curve per pattern)::

    python examples/plot.py --csv runs/sweep.csv --out runs/figure1
    python examples/plot.py --overlap runs/run0/overlap.json --out runs/overlap

Writes ``<out>.png`` and ``<out>.pdf``; with ``--csv`` it also prints the numbers as a
Markdown table (mean ± std over seeds per criterion and density); ``--ymin`` sets the
bottom of the y axes (below the data's highest value). ``--patterns`` prints a table and
draws curves whose every cell or point is the mean over the seeds of one configuration
(method, criterion and growth, epochs), pattern and density; CSVs holding several
configurations get one row or curve per configuration, named after its pattern. Every
input is read and checked before anything is printed. The overlap input is the JSON that
``train.py --overlap a,b,...`` writes (`keras_dst.CriteriaOverlap.save_json`:
``{"names": [...], "matrix": [[...]], ...}``, the mean over the updates) or a CSV whose
header row holds the names.
"""

import collections
import csv
import json
import math
import os
import pathlib
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python examples/plot.py` as well as `import examples.plot`
    sys.path.insert(0, str(ROOT))

import matplotlib  # noqa: E402
from absl import app, flags  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from examples import cli  # noqa: E402

METRICS = ("best_val_test_accuracy", "final_test_accuracy")


def read_rows(csv_path):
    """The rows of a sweep CSV as dicts (numbers converted; ValueError names the line of
    one that is not a number)."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    for line, row in enumerate(rows, start=2):  # (line 1 is the header)
        for key in ("density", "actual_density", *METRICS):
            if row.get(key) not in (None, ""):
                try:
                    row[key] = float(row[key])
                except ValueError:
                    raise ValueError(f"{csv_path} line {line}: {key}={row[key]!r} is not a "
                                     "number") from None
    return rows


# The columns (besides the metric) that the tables and figures group rows by.
GROUPED_BY = ("model", "dataset", "method", "prune", "grow", "density")


def _read_input(read, path, flag):
    """`read(path)`, its errors as ValueErrors naming `flag` (the command-line flag the
    path came from) and the file."""
    try:
        return read(path)
    except OSError as e:
        raise ValueError(f"{flag}={path}: cannot read it: {e.strerror or e}") from None
    except ValueError as e:
        raise ValueError(f"{flag}={path}: {e}") from None


def load_rows(paths, metric, flag):
    """The rows of the sweep CSVs `paths`, checked before anything is printed or drawn:
    every file readable and holding rows with the columns the tables and figures group
    by, and every row a number for `metric` and `density`.

    Raises:
      ValueError: naming `flag` (the command-line flag the paths came from) and the file.
    """
    rows = []
    for path in paths:
        found = _read_input(read_rows, path, flag)
        if not found:
            raise ValueError(f"{flag}={path}: no rows to plot (the file is empty or only a header)")
        missing = [c for c in (*GROUPED_BY, metric) if c not in found[0]]
        if missing:
            raise ValueError(f"{flag}={path}: no column {', '.join(missing)} (not a sweep.py CSV?)")
        for line, row in enumerate(found, start=2):
            blank = [c for c in ("density", metric) if not isinstance(row[c], float)]
            if blank:
                raise ValueError(f"{flag}={path} line {line}: no number for {', '.join(blank)}")
        rows += found
    return rows


def check_ymin(rows, metric, ymin):
    """Refuses a `ymin` (bottom of the y axes) at or above every value of `metric` in
    `rows`: the figure would show no data (an accuracy is at most 1)."""
    if ymin is None:
        return
    if not math.isfinite(ymin):
        raise ValueError(f"--ymin={ymin}: must be a finite number")
    if not rows:
        return
    top = max(r[metric] for r in rows)
    if ymin >= top:
        raise ValueError(f"--ymin={ymin:g} is at or above the highest {metric} in the data "
                         f"({top:.4f}): the figure would show no data")


def _pattern(row):
    """A row's sparsity pattern: "dense" for the dense model, "unstructured" where the
    CSV has no pattern (written before sweep.py had --pattern)."""
    return "dense" if row["method"] == "dense" else (row.get("pattern") or "unstructured")


MARKERS = "os^Dv<>p"  # one per pattern in Figure 1 (the pattern's position in sorted order)


def _mean_std(rows, metric):
    """{density: (mean, std)} over the seeds of `rows`."""
    by_density = collections.defaultdict(list)
    for row in rows:
        by_density[row["density"]].append(row[metric])
    return {d: (float(np.mean(v)), float(np.std(v))) for d, v in sorted(by_density.items())}


def _curve(ax, stats, label, ymin=None, **style):
    x = np.array(list(stats))
    mean, std = np.array([stats[d] for d in x]).T
    if ymin is not None and (mean < ymin).any():
        label += f" (below {ymin:g} at d=" + ",".join(f"{d:g}" for d in x[mean < ymin]) + ")"
    line, = ax.plot(x, mean, **{"marker": "o", "markersize": 3, "label": label, **style})
    ax.fill_between(x, mean - std, mean + std, alpha=0.2, color=line.get_color(), linewidth=0)


def _pattern_curves(ax, runs, label, patterns, metric, ymin, **style):
    """One `_curve` of `runs` per pattern of `patterns` they hold, named "[pattern]" and
    marked by it where there are several patterns."""
    for i, pattern in enumerate(patterns):
        of_pattern = [r for r in runs if _pattern(r) == pattern]
        if of_pattern:
            _curve(ax, _mean_std(of_pattern, metric),
                   label + (f" [{pattern}]" if len(patterns) > 1 else ""), ymin,
                   marker=MARKERS[i % len(MARKERS)], **style)


def _save(fig, out):
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    paths = [f"{out}.png", f"{out}.pdf"]
    for path in paths:
        fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return paths


def plot_figure1(rows, out="figure1", metric="best_val_test_accuracy", ymin=None):
    """Draws Figure 1 from sweep rows (a CSV path or `read_rows` output).

    `ymin` (optional) is the bottom of the y axes; curves that go below it say so in
    the legend. Rows of several sparsity patterns (a CSV that sweep.py wrote with
    different --pattern values) are not pooled: each criterion, static and gmp gets one
    curve per pattern, named "[pattern]" and marked by it.

    Returns:
      The paths written (PNG and PDF).
    """
    if isinstance(rows, (str, os.PathLike)):
        rows = read_rows(rows)
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if not rows:
        raise ValueError("no rows to plot")
    check_ymin(rows, metric, ymin)
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
        patterns = sorted({_pattern(r) for r in setup if r["method"] != "dense"})

        for row, growth in enumerate(growths):
            ax = axes[row][col]
            criteria = sorted({r["prune"] for r in setup
                               if r["method"] == "dst" and r["grow"] == growth})
            for criterion in criteria:
                _pattern_curves(ax, [r for r in setup if r["method"] == "dst" and
                                     r["prune"] == criterion and r["grow"] == growth],
                                criterion, patterns, metric, ymin)
            _pattern_curves(ax, static, "static", patterns, metric, ymin, color="black",
                            linestyle=":")
            _pattern_curves(ax, gmp, "gmp", patterns, metric, ymin, color="gray", linestyle="-.")
            if dense:
                ax.axhline(np.mean(dense), color="black", linestyle="--", linewidth=1,
                           label=f"dense ({np.mean(dense):.3f})")
            ax.set_xscale("log")
            if ymin is not None:
                top = max(ax.dataLim.y1, ymin + 1e-3)
                ax.set_ylim(ymin, top + 0.05 * (top - ymin))
            if densities:
                ax.set_xticks(densities)
                ax.set_xticklabels([f"{d:g}" for d in densities], rotation=45, fontsize=7)
                ax.minorticks_off()
                ax.xaxis.set_tick_params(labelbottom=True)  # on every row, not only the last
            title = f"{model} / {dataset}" + (f" — {growth} growth" if growth else "")
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("density")
            ax.set_ylabel(metric.replace("_", " "))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out)


def summary_table(rows, metric="best_val_test_accuracy"):
    """Markdown table of `metric`: mean ± std over seeds (and the seed count) per setup,
    method, growth and criterion (rows) and density (columns); with a pattern column
    where the sparse rows have several sparsity patterns (not pooled)."""
    if isinstance(rows, (str, os.PathLike)):
        rows = read_rows(rows)
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    several = len({_pattern(r) for r in rows if r["method"] != "dense"}) > 1
    groups = collections.defaultdict(list)
    for r in rows:
        key = (f"{r['model']} / {r['dataset']}", r["method"], r["grow"], r["prune"])
        groups[key + ((_pattern(r),) if several else ())].append(r)
    order = {"dense": 0, "static": 1, "gmp": 2, "dst": 3}
    keys = sorted(groups, key=lambda k: (k[0], order.get(k[1], 9), *k[2:]))
    densities = sorted({r["density"] for r in rows})
    columns = ["setup", "method", "growth", "criterion"] + (["pattern"] if several else [])
    lines = ["| " + " | ".join(columns) + " | " + " | ".join(f"d={d:g}" for d in densities) + " |",
             "|---" * (len(columns) + len(densities)) + "|"]
    for key in keys:
        stats = _mean_std(groups[key], metric)
        counts = collections.Counter(r["density"] for r in groups[key])
        cells = [f"{stats[d][0]:.4f} ± {stats[d][1]:.4f} ({counts[d]})" if d in stats else ""
                 for d in densities]
        lines.append("| " + " | ".join([*key, *cells]) + " |")
    return "\n".join(lines)


def _pattern_rows(rows_or_csvs):
    """Rows from a CSV path, or a list of CSV paths and/or row dicts."""
    rows = []
    for source in ([rows_or_csvs] if isinstance(rows_or_csvs, (str, os.PathLike)) else rows_or_csvs):
        rows += read_rows(source) if isinstance(source, (str, os.PathLike)) else [source]
    return rows


def _configuration(row):
    """What a run of a pattern cell holds fixed besides its pattern and density (the
    columns sweep.py writes): method, criterion and growth (DST), epochs."""
    return (row["method"], row.get("prune") or "", row.get("grow") or "",
            str(row.get("epochs") or ""))


def _labels(configurations):
    """{configuration: its name in a table or legend}: "" for every sparse one when
    there is only one (the pattern alone names a cell), else the method, DST's
    criterion/growth, and the epochs when they differ."""
    sparse = {c for c in configurations if c[0] != "dense"}
    epochs = len({c[3] for c in configurations}) > 1
    labels = {}
    for c in configurations:
        method, prune, grow, n = c
        parts = [] if (method == "dense" or len(sparse) == 1) else [
            f"{method} {prune}/{grow}" if method == "dst" else method]
        parts += [f"{n} epochs"] if epochs else []
        labels[c] = ", ".join(parts)
    return labels


def pattern_cells(rows, metric="best_val_test_accuracy"):
    """{(model, dataset): {(configuration, pattern, density): [metric values]}}: each
    cell the seeds of one configuration (`_configuration`), one pattern ("dense" for
    the dense model) and one density.

    Raises:
      ValueError: a cell holds a seed twice: its runs differ in a setting that the CSV
        has no column for (e.g. --lr), and their mean would not be over seeds.
    """
    setups = collections.defaultdict(lambda: collections.defaultdict(list))
    for r in rows:
        setups[(r["model"], r["dataset"])][(_configuration(r), _pattern(r), r["density"])].append(r)
    for (model, dataset), cells in setups.items():
        labels = _labels({c for c, _, _ in cells})
        for (config, pattern, density), cell in cells.items():
            seeds = collections.Counter(r["seed"] for r in cell if r.get("seed") not in (None, ""))
            twice = sorted(str(s) for s, n in seeds.items() if n > 1)
            if twice:
                name = pattern + (f" ({labels[config]})" if labels[config] else "")
                raise ValueError(
                    f"{model} / {dataset}, {name} at density {density:g} has seed(s) "
                    f"{', '.join(twice)} more than once: the same run read twice, or runs that "
                    "differ in a setting the CSV has no column for (e.g. --lr; plot those from "
                    "separate CSVs)")
    return {setup: {key: [r[metric] for r in cell] for key, cell in cells.items()}
            for setup, cells in sorted(setups.items())}


def plot_patterns(rows_or_csvs, out="patterns", metric="best_val_test_accuracy"):
    """Accuracy vs density per sparsity pattern (the sparse rows of one or more sweep CSVs).

    One panel per setup (model / dataset), one curve per pattern and configuration
    (method, criterion/growth: `pattern_cells`; named in the legend when a setup has
    more than one) with mean ± std over seeds, the dense model as a dashed line.
    Returns the written paths.
    """
    cells = pattern_cells(_pattern_rows(rows_or_csvs), metric)
    if not cells:
        raise ValueError("no rows to plot")
    fig, axes = plt.subplots(1, len(cells), figsize=(5.0 * len(cells), 3.6), squeeze=False)
    for ax, ((model, dataset), groups) in zip(axes[0], cells.items()):
        labels = _labels({c for c, _, _ in groups})
        curves = collections.defaultdict(dict)
        for (config, pattern, density), values in groups.items():
            curves[(config, pattern)][density] = values
        for (config, pattern), by_density in sorted(  # the dense line first, then by pattern
                curves.items(), key=lambda kv: (kv[0][1] != "dense", kv[0][1], kv[0][0])):
            label = pattern + (f" ({labels[config]})" if labels[config] else "")
            if pattern == "dense":
                mean = np.mean([v for vs in by_density.values() for v in vs])
                ax.axhline(mean, color="k", linestyle="--", linewidth=1, label=label)
                continue
            _curve(ax, {d: (float(np.mean(v)), float(np.std(v)))
                        for d, v in sorted(by_density.items())}, label)
        ax.set_xscale("log")
        ticks = sorted({d for _, pattern, d in groups if pattern != "dense"})
        ax.set_xticks(ticks, [f"{d:g}" for d in ticks])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_title(f"{model} / {dataset}")
        ax.set_xlabel("density")
        ax.set_ylabel(metric.replace("_", " "))
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out)


def pattern_table(rows_or_csvs, metric="best_val_test_accuracy"):
    """Markdown: mean ± std over seeds (and their number) per setup, configuration
    (method, criterion/growth: `pattern_cells`; named after the pattern when a setup
    has more than one), pattern and density, and the difference to unstructured masks
    of the same configuration and density in percentage points."""
    lines = ["| setup | pattern | density | accuracy (mean ± std, seeds) | vs unstructured |",
             "|---|---|---|---|---|"]
    for (model, dataset), groups in pattern_cells(_pattern_rows(rows_or_csvs), metric).items():
        labels = _labels({c for c, _, _ in groups})
        for (config, pattern, density), values in sorted(
                groups.items(), key=lambda kv: (kv[0][2], labels[kv[0][0]], kv[0][1])):
            base = groups.get((config, "unstructured", density))
            diff = ("" if pattern in ("unstructured", "dense") or not base
                    else f"{100 * (np.mean(values) - np.mean(base)):+.1f} pp")
            name = pattern + (f" ({labels[config]})" if labels[config] else "")
            lines.append(f"| {model} / {dataset} | {name} | {density:g} | "
                         f"{np.mean(values):.4f} ± {np.std(values):.4f} ({len(values)}) | {diff} |")
    return "\n".join(lines)


def read_matrix(source):
    """(names, matrix) from a dict, a JSON file or a CSV file with a header of names.

    Raises:
      OSError: the file cannot be read.
      ValueError: it holds no square matrix of numbers with its names.
    """
    if isinstance(source, dict):
        data = source
    elif str(source).endswith(".csv"):
        with open(source, newline="") as f:
            lines = [line for line in csv.reader(f) if line]
        if not lines:
            raise ValueError("the file is empty")
        names = lines[0][1:] if lines[0][0] == "" else lines[0]
        matrix = []
        for number, line in enumerate(lines[1:], start=2):
            try:
                matrix.append([float(v) for v in line[-len(names):]])
            except ValueError:
                raise ValueError(f"line {number} holds a value that is not a number: "
                                 f"{line}") from None
        data = {"names": names, "matrix": matrix}
    else:
        with open(source) as f:
            try:
                data = json.load(f)
            except ValueError as e:
                raise ValueError(f"not JSON ({e})") from None
    if not isinstance(data, dict) or not {"names", "matrix"} <= set(data):
        raise ValueError('no "names" and "matrix" (the JSON that train.py --overlap writes, '
                         "or a CSV whose header row holds the names)")
    try:
        names, matrix = list(data["names"]), np.asarray(data["matrix"], dtype=float)
    except (TypeError, ValueError):
        raise ValueError("its matrix is not a table of numbers") from None
    if matrix.shape != (len(names), len(names)):
        raise ValueError(f"the matrix must be {len(names)}x{len(names)} for names {names}, "
                         f"got shape {matrix.shape}")
    return names, matrix


def load_matrix(path, flag):
    """`read_matrix(path)`, its errors naming `flag` and the file (ValueError)."""
    return _read_input(read_matrix, path, flag)


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
    ax.set_title("\n".join(textwrap.wrap(title, 48)), fontsize=10)
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
    flags.DEFINE_float("ymin", None, "Bottom of Figure 1's y axes (default: automatic; --csv "
                       "only; below the data's highest value); curves below it are marked in "
                       "the legend.", flag_values=flag_values)
    flags.DEFINE_list("patterns", None, "Sweep CSVs with a pattern column (sweep.py --pattern): "
                      "accuracy vs density per pattern, one panel per setup, and a table.",
                      flag_values=flag_values)
    flags.DEFINE_string("title", None, "Title of the overlap heatmap (default: 'Jaccard index "
                        "of pruned sets').", flag_values=flag_values)


def main(argv):
    FLAGS = flags.FLAGS
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}")
    if sum(bool(v) for v in (FLAGS.csv, FLAGS.overlap, FLAGS.patterns)) != 1:
        sys.exit("error: pass exactly one of --csv (Figure 1), --overlap (heatmap) or "
                 "--patterns (accuracy per sparsity pattern)")
    if FLAGS.ymin is not None and not FLAGS.csv:
        sys.exit(f"error: --ymin={FLAGS.ymin:g}: it sets the bottom of Figure 1's y axes (--csv)")
    if FLAGS.title is not None and not FLAGS.overlap:
        sys.exit(f"error: --title={FLAGS.title}: it titles the overlap heatmap (--overlap)")
    if FLAGS["metric"].present and FLAGS.overlap:
        sys.exit(f"error: --metric={FLAGS.metric}: the overlap heatmap (--overlap) shows "
                 "Jaccard indices, not an accuracy")
    # Every input is read and checked (and the figure drawn) before anything is printed:
    # an error is the one line printed.
    text = ""
    try:
        if FLAGS.out:
            cli.check_directory(os.path.dirname(os.path.abspath(FLAGS.out)), "the directory of --out")
        if FLAGS.overlap:
            names, matrix = load_matrix(FLAGS.overlap, "--overlap")
            paths = plot_overlap({"names": names, "matrix": matrix}, FLAGS.out or "overlap",
                                 FLAGS.title or "Jaccard index of pruned sets")
        elif FLAGS.csv:
            rows = load_rows([FLAGS.csv], FLAGS.metric, "--csv")
            check_ymin(rows, FLAGS.metric, FLAGS.ymin)
            text = (f"{FLAGS.metric}: mean ± std over seeds (number of seeds)\n"
                    + summary_table(rows, FLAGS.metric))
            paths = plot_figure1(rows, FLAGS.out or "figure1", FLAGS.metric, FLAGS.ymin)
        else:
            rows = load_rows(FLAGS.patterns, FLAGS.metric, "--patterns")
            text = pattern_table(rows, FLAGS.metric)
            paths = plot_patterns(rows, FLAGS.out or "patterns", FLAGS.metric)
    except ValueError as e:  # (these name the flag and file)
        sys.exit(f"error: {e}")
    except (OSError, KeyError) as e:
        sys.exit(f"error: {type(e).__name__}: {e}")
    if text:
        print(text)
    print("wrote " + ", ".join(paths))


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
