r"""Exported-model latency and size: dense vs each sparsity pattern x density (LiteRT, CPU).

For each model (``--models``: the MLP 784-1024-1024-10 and the small CIFAR conv
net of `bench_models`, random weights, random masks from
``keras_dst.prunable(model, density, pattern=...)``; layers whose input axis
cannot take a pattern stay unstructured) this exports, with `keras_dst.export`:

* ``dense``: the dense model, converted without the sparsity optimisation;
* one model per pattern (``--patterns``) x density (``--densities``; an N:M
  pattern runs once, at its density N/M), converted with it.

Each export is loaded in the LiteRT interpreter (``ai-edge-litert``; the
runtime's default XNNPACK delegate unless ``--noxnnpack``) once per thread count
(``--threads``: numbers, or ``all`` = every core) and batch size
(``--batch_sizes``), with random inputs. Then, INTERLEAVED, ``--repeats``
rounds: in round r every (export, batch, threads) measurement runs once, the
order reversed every other round, so that machine drift hits all alike. A
measurement is the mean wall time of ``invoke()`` over as many runs as fill
``--min_time_ms`` (the count is fixed per measurement after one untimed
calibration round). Reported: the median latency over rounds, and the speedup
= median over rounds of the per-round ratio dense / sparse (same batch size and
threads), with the 95 % confidence interval of the median from order statistics
(`bench_utils.median_ci`, from 6 rounds on). File sizes are exact.

Outputs (``--out``, prefix ``cpu`` / ``quick``): ``<prefix>_export.json`` (every
number, per-weight storage from the export reports, machine, command),
``<prefix>_export.md`` (tables and the issue's targets, met / MISSED / within
noise) and ``<prefix>_export_speedup.png`` (speedup vs density per pattern).

  python examples/benchmarks/export_latency.py                   # the full run
  python examples/benchmarks/export_latency.py --quick           # smoke test, numbers meaningless
"""

import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
if ROOT not in sys.path:  # keras_dst from this checkout when it is not installed
    sys.path.insert(1, ROOT)
import bench_models  # noqa: E402
import bench_utils  # noqa: E402

from examples import cli  # noqa: E402

FLAGS = flags.FLAGS
DEFAULT_PATTERNS = ["unstructured", "1x4", "1x16"]


def parse_pattern(spec):
    """`keras_dst.patterns.parse` (imported here: it imports TensorFlow)."""
    from keras_dst import patterns

    return patterns.parse(spec)


def parse_threads(text):
    """A thread count >= 1 or 'all'."""
    return "all" if str(text).strip() == "all" else bench_utils.positive_int(text)


def check_patterns(values):
    """absl validator of --patterns. The default list is valid: TensorFlow is imported (by
    keras_dst) only to check patterns given on the command line."""
    if list(values) == DEFAULT_PATTERNS:
        return True
    try:
        bench_utils.parse_items(values, parse_pattern, "a sparsity pattern")
    except ValueError as e:
        raise flags.ValidationError(str(e)) from None
    return True


def define_flags():
    """Defines this script's flags on absl's global FLAGS (when it runs: importing
    the module defines none, so that scripts and tests can import it)."""
    flags.DEFINE_bool("quick", False, "tiny run (MLP, 1x4 at 0.1, batch 1, 1 thread, 2 rounds): a "
                      "smoke test, numbers meaningless")
    flags.DEFINE_list("models", ["mlp", "convnet"], "models (examples/benchmarks/bench_models.py)")
    flags.DEFINE_list("patterns", DEFAULT_PATTERNS, "sparsity patterns "
                      "(keras_dst.patterns: unstructured, 1xB, N:M, fan_in)")
    flags.DEFINE_list("densities", ["0.2", "0.1", "0.05", "0.02"], "densities of the sparse models")
    flags.DEFINE_list("batch_sizes", ["1", "32"], "batch sizes")
    flags.DEFINE_list("threads", ["1", "all"], "interpreter threads ('all' = os.cpu_count())")
    flags.DEFINE_integer("repeats", 15, "timed rounds (6 or more give 95 % intervals)")
    flags.DEFINE_float("min_time_ms", 100.0, "wall time of one measurement (invoke() is repeated "
                       "until it is filled)")
    flags.DEFINE_enum("distribution", "erk", ["erk", "er", "uniform"], "how a density is spread "
                      "over layers (keras_dst.prunable)")
    flags.DEFINE_enum("quantize", "float32", ["float32", "int8"], "float32 exports, or int8 "
                      "weights and activations (random calibration inputs; the dense baseline is "
                      "int8 too)")
    flags.DEFINE_bool("xnnpack", True, "LiteRT's default XNNPACK delegate (False: builtin kernels)")
    flags.DEFINE_integer("seed", 0, "weights and masks")
    flags.DEFINE_string("out", os.path.join(HERE, "results"), "where results are written")
    flags.DEFINE_string("prefix", None, "file prefix (default: 'cpu', or 'quick' with --quick)")
    # Checked when the flags are parsed (one-line errors naming the flag, before any model is
    # built); --patterns last, as its check may import TensorFlow.
    bench_utils.register_list_check("models", bench_utils.one_of(bench_models.MODEL_NAMES),
                                    f"a model of {', '.join(bench_models.MODEL_NAMES)}")
    bench_utils.register_list_check("densities", bench_utils.density, "a density in (0, 1]")
    bench_utils.register_list_check("batch_sizes", bench_utils.positive_int, "a batch size >= 1")
    bench_utils.register_list_check("threads", parse_threads, "a thread count >= 1 or 'all'")
    flags.register_validator("repeats", lambda v: v >= 1, "--repeats must be >= 1")
    flags.register_validator("min_time_ms", lambda v: v > 0, "--min_time_ms must be > 0")
    flags.register_validator("patterns", check_patterns)


QUICK = dict(models=["mlp"], patterns=["1x4"], densities=["0.1"], batch_sizes=["1"],
             threads=["1"], repeats=2, min_time_ms=5.0)
# The targets on the MLP at batch 1 (1 thread): latency sparse / dense and size ratio
# (the conv net has no target: its sizes and latencies are reported as measured).
TARGET_MODEL = "mlp"
TARGETS = [("1x4", 0.1, "latency", 0.5, "≥ 2× faster than dense at batch 1"),
           ("1x4", 0.05, "latency", 0.25, "≥ 4× faster than dense at batch 1"),
           ("1x4", 0.1, "size", 0.15, "file ≤ 0.15× dense")]


def setting(name):
    """A flag's value, replaced by the QUICK value under --quick unless set explicitly."""
    if FLAGS.quick and name in QUICK and not FLAGS[name].present:
        return QUICK[name]
    return FLAGS[name].value


def thread_counts():
    counts = []
    for t in setting("threads"):
        n = os.cpu_count() if t == "all" else int(t)
        if n < 1:
            raise app.UsageError(f"--threads: {t!r} is not >= 1 or 'all'")
        if n not in counts:
            counts.append(n)
    return counts


def sparse_variants(patterns_lib):
    """[(pattern, density)], N:M once at N/M, in the order given."""
    out = []
    for spec in setting("patterns"):
        pattern = patterns_lib.parse(spec)
        if pattern.kind == "nm":
            out.append((str(pattern), pattern.n / pattern.m))
            continue
        for d in setting("densities"):
            out.append((str(pattern), float(d)))
    return out


def export_variants(model_name, workdir, log):
    """Exports the dense model and every sparse variant; returns [{name, pattern, density,
    path, report...}]."""
    import keras
    import numpy as np

    import keras_dst

    keras.utils.set_random_seed(FLAGS.seed)
    base = getattr(bench_models, model_name)(keras)
    quantize = None if FLAGS.quantize == "float32" else "int8"
    calibration = None
    if quantize:
        shape = bench_models.INPUT_SHAPES[model_name]
        calibration = np.random.default_rng(FLAGS.seed).normal(size=(64,) + shape).astype("float32")
    variants = []

    def add(name, model, pattern, density, sparsity):
        path = os.path.join(workdir, f"{model_name}_{name.replace(':', '-')}.tflite")
        start = time.perf_counter()
        report = keras_dst.export(model, path, quantize=quantize, representative_data=calibration,
                                  sparsity=sparsity, compare_dense=sparsity)
        seconds = time.perf_counter() - start
        stored = {}
        for w in report.weights:
            stored[w.stored] = stored.get(w.stored, 0) + 1
        variants.append(dict(
            name=name, pattern=pattern, density=density, path=path,
            file_bytes=report.file_bytes, dense_file_bytes=report.dense_file_bytes or
            report.file_bytes, densify_ops=report.densify_ops, sparse_kernels=report.sparse_kernels,
            weights=len(report.weights), stored=stored, export_seconds=round(seconds, 2),
            actual_density=None if not sparsity else keras_dst.density(model),
            layers=[dict(weight=w.weight, shape=list(w.shape), pattern=w.pattern,
                         density=round(w.density, 4), stored=w.stored, op=w.op, why=w.why,
                         kib=round(w.stored_bytes / 1024, 1)) for w in report.weights]))
        log(f"  exported {name:<22} {report.file_bytes / 1e6:8.3f} MB  "
            f"{report.sparse_kernels}/{len(report.weights)} on sparse kernels, "
            f"{report.densify_ops} DENSIFY ({seconds:.1f} s)")

    add("dense", base, "dense", 1.0, sparsity=False)
    for pattern, density in sparse_variants(keras_dst.patterns):
        model = keras_dst.prunable(base, density=density, distribution=FLAGS.distribution,
                                   pattern=pattern, seed=FLAGS.seed,
                                   pattern_overrides=keras_dst.unfit_layers(base, pattern) or None)
        add(f"{pattern}@{density:g}", model, pattern, density, sparsity=True)
    return variants


def time_variants(variants, batch_sizes, threads, log):
    """Interleaved rounds; returns {(name, batch, threads): [seconds per invoke, per round]}."""
    from keras_dst.export import LiteRTModel

    runtimes = {}
    for v in variants:
        for b in batch_sizes:
            for t in threads:
                runtime = LiteRTModel(v["path"], num_threads=t, xnnpack=None if FLAGS.xnnpack
                                      else False)
                runtime.prepare(batch_size=b, seed=FLAGS.seed)
                v.setdefault("xnnpack", runtime.xnnpack)
                runtimes[(v["name"], b, t)] = runtime
    keys = list(runtimes)
    runs = {}
    for key in keys:  # calibration (untimed): how many invokes fill --min_time_ms
        per_invoke = runtimes[key].time_invoke(runs=3)
        runs[key] = max(1, int(setting("min_time_ms") / 1e3 / max(per_invoke, 1e-7)))
    times = {key: [] for key in keys}
    rounds = setting("repeats")
    for _round, key in bench_utils.interleaved(keys, rounds):
        times[key].append(runtimes[key].time_invoke(runs=runs[key]))
    log(f"  {rounds} rounds x {len(keys)} measurements done")
    return times, runs


def summarize(variants, times, runs, batch_sizes, threads):
    """Per variant and (batch, threads): median latency [CI] and speedup vs dense [CI]."""
    results = []
    for v in variants:
        entry = {k: v[k] for k in v if k != "path"}
        entry["size_ratio"] = v["file_bytes"] / v["dense_file_bytes"]
        entry["latency"] = []
        for b in batch_sizes:
            for t in threads:
                xs, dense = times[(v["name"], b, t)], times[("dense", b, t)]
                speedup, speedup_ci = bench_utils.ratio_stats(dense, xs)
                ratio, ratio_ci = bench_utils.ratio_stats(xs, dense)
                entry["latency"].append(dict(
                    batch=b, threads=t, runs_per_measurement=runs[(v["name"], b, t)],
                    median_us=1e6 * bench_utils.median(xs),
                    median_us_ci95=[1e6 * c for c in bench_utils.median_ci(xs) or ()] or None,
                    speedup=speedup, speedup_ci95=speedup_ci,
                    time_ratio=ratio, time_ratio_ci95=ratio_ci, rounds_us=[1e6 * x for x in xs]))
        results.append(entry)
    return results


def cell(lat):
    ci = lat["speedup_ci95"]
    s = f"{lat['median_us']:.1f} µs ({lat['speedup']:.2f}×"
    return s + (f" [{ci[0]:.2f}, {ci[1]:.2f}])" if ci else ")")


def targets(model_result):
    rows = []
    by = {(v["pattern"], v["density"]): v for v in model_result["variants"]}
    for pattern, density, kind, limit, text in TARGETS:
        v = by.get((pattern, density))
        if v is None:
            continue
        if kind == "size":
            x, ci, shown = v["size_ratio"], None, f"{v['size_ratio']:.3f}× dense"
        else:
            lat = next((l for l in v["latency"] if l["batch"] == 1 and l["threads"] == 1), None)
            if lat is None:
                continue
            x, ci = lat["time_ratio"], lat["time_ratio_ci95"]
            shown = f"{lat['speedup']:.2f}× faster (time ratio {bench_utils.with_ci(x, ci)})"
        rows.append([f"{pattern} @ {density:g}", text, shown, bench_utils.verdict(x, limit, ci)])
    return rows


def write_report(out, prefix, doc):
    path = os.path.join(out, f"{prefix}_export.json")
    bench_utils.write_json(path, doc)
    m = doc["machine"]
    lines = [f"# Exported-model latency and size ({prefix.upper()}, LiteRT)", "",
             f"Device: {m.get('device')}; TensorFlow {m.get('tensorflow')}, "
             f"Keras {m.get('keras')}, "
             f"ai-edge-litert {doc['config']['litert']}, keras_dst {doc['config']['keras_dst']}; "
             f"{doc['config']['quantize']}, XNNPACK {'on' if doc['config']['xnnpack'] else 'off'}, "
             f"{doc['config']['distribution']} densities; {m.get('date_utc')}, load average "
             f"{m.get('load_average_1_5_15min')} (start) / {doc.get('load_average_end')} (end).",
             f"Command: `{doc['config']['command']}`", "",
             "Latency: median over interleaved rounds of the mean `invoke()` time; in brackets "
             "the speedup over the dense export (median of per-round ratios, 95 % interval). "
             "Size: the .tflite file. *sparse kernels*: weights on a sparse kernel / all "
             "sparsified weights; *DENSIFY*: weights expanded to dense at load."]
    if doc["config"]["quick"]:
        lines += ["", "**--quick run: a smoke test; the numbers mean nothing.**"]
    for name, r in doc["models"].items():
        head = ["variant", "file MB", "× dense", "sparse kernels", "DENSIFY"]
        combos = [(l["batch"], l["threads"]) for l in r["variants"][0]["latency"]]
        head += [f"batch {b}, {t} thr." for b, t in combos]
        rows = []
        for v in r["variants"]:
            rows.append([v["name"], f"{v['file_bytes'] / 1e6:.3f}", f"{v['size_ratio']:.3f}",
                         f"{v['sparse_kernels']}/{v['weights']}", v["densify_ops"]]
                        + [cell(l) for l in v["latency"]])
        lines += ["", f"## {name}", "", bench_utils.markdown_table(head, rows)]
        t = targets(r) if name == TARGET_MODEL else []
        if t:
            lines += ["", "Targets (issue):", "",
                      bench_utils.markdown_table(["variant", "target", "measured", "verdict"], t)]
        kinds, why = {}, {}
        for v in r["variants"][1:]:
            for layer in v["layers"]:
                key = (v["pattern"], layer["op"], layer["stored"])
                kinds.setdefault(key, set()).add(layer["weight"])
                why.setdefault(key, layer["why"])
        lines += ["", "What the converter stored (pattern, op: storage — weights; why, for the "
                  "first of them):", ""]
        lines += [f"* {p}, {op}: **{s}** — {', '.join(sorted(w))}; {why[(p, op, s)]}"
                  for (p, op, s), w in sorted(kinds.items())]
    lines.append("")
    with open(os.path.join(out, f"{prefix}_export.md"), "w") as f:
        f.write("\n".join(lines))
    return path


def plot(out, prefix, doc):
    """Speedup vs density per pattern, one panel per (model, batch, threads)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except ImportError:
        print("matplotlib is not installed: no figure")
        return None
    panels = [(name, l["batch"], l["threads"]) for name, r in doc["models"].items()
              for l in r["variants"][0]["latency"]]
    cols = max(1, len({(b, t) for _, b, t in panels}))
    rows = max(1, len(doc["models"]))
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
    combos = sorted({(b, t) for _, b, t in panels})
    for i, (name, r) in enumerate(doc["models"].items()):
        for j, (b, t) in enumerate(combos):
            ax = axes[i][j]
            by_pattern = {}
            for v in r["variants"][1:]:
                lat = next((l for l in v["latency"] if l["batch"] == b and l["threads"] == t), None)
                if lat is not None:
                    by_pattern.setdefault(v["pattern"], []).append((v["density"], lat))
            for pattern, points in sorted(by_pattern.items()):
                points.sort(key=lambda p: p[0])
                xs = [p[0] for p in points]
                ys = [p[1]["speedup"] for p in points]
                lo = [p[1]["speedup"] - (p[1]["speedup_ci95"] or [p[1]["speedup"]] * 2)[0]
                      for p in points]
                hi = [(p[1]["speedup_ci95"] or [p[1]["speedup"]] * 2)[1] - p[1]["speedup"]
                      for p in points]
                ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=2, label=pattern)
            ax.axhline(1.0, color="grey", lw=0.8, ls="--", label="dense export")
            ax.set_xscale("log")
            ax.set_yscale("log")
            densities = sorted({v["density"] for v in r["variants"][1:]})
            ax.set_xticks(densities)
            ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:g}"))
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
            ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}×"))
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())
            ax.set_xlabel("density")
            ax.set_ylabel("speedup over dense export")
            ax.set_title(f"{name}, batch {b}, {t} thread{'s' if t > 1 else ''}", fontsize=9)
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out, f"{prefix}_export_speedup.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv):
    del argv
    import keras
    import tensorflow as tf

    import keras_dst

    try:
        from importlib import metadata

        import ai_edge_litert  # noqa: F401
        litert_version = metadata.version("ai-edge-litert")
    except ImportError:
        raise app.UsageError('needs the LiteRT runtime: pip install "keras-dst[litert]"') from None
    prefix = bench_utils.output_prefix(FLAGS.prefix, FLAGS.quick, "cpu")
    batch_sizes = [int(b) for b in setting("batch_sizes")]  # checked at parse time
    threads = thread_counts()
    log = lambda s: print(s, flush=True)  # noqa: E731
    from absl import logging
    logging.set_verbosity(logging.WARNING)  # Keras's SavedModel writer logs at INFO
    machine = bench_utils.machine_info(tf, keras)
    config = dict(models=setting("models"), patterns=setting("patterns"),
                  densities=[float(d) for d in setting("densities")], batch_sizes=batch_sizes,
                  threads=threads, repeats=setting("repeats"), min_time_ms=setting("min_time_ms"),
                  distribution=FLAGS.distribution, quantize=FLAGS.quantize, xnnpack=FLAGS.xnnpack,
                  seed=FLAGS.seed, quick=FLAGS.quick, keras_dst=keras_dst.__version__,
                  litert=litert_version, command="python " + " ".join(sys.argv))
    doc = {"benchmark": "keras_dst exported-model latency and size (LiteRT)", "machine": machine,
           "config": config, "models": {}}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="keras_dst_export_bench_") as workdir:
        for name in setting("models"):
            log(f"[{name}] exporting")
            variants = export_variants(name, workdir, log)
            log(f"[{name}] timing {len(variants)} exports x batch {batch_sizes} x "
                f"threads {threads}")
            times, runs = time_variants(variants, batch_sizes, threads, log)
            doc["models"][name] = {"variants": summarize(variants, times, runs, batch_sizes,
                                                         threads)}
            for v in doc["models"][name]["variants"][1:]:
                first = v["latency"][0]
                log(f"  {v['name']:<22} {v['size_ratio']:.3f}× size, batch {first['batch']} "
                    f"{first['threads']} thr.: {cell(first)}")
    doc["load_average_end"] = bench_utils.load_average()
    doc["wall_seconds"] = round(time.perf_counter() - start, 1)
    os.makedirs(FLAGS.out, exist_ok=True)
    path = write_report(FLAGS.out, prefix, doc)
    figure = plot(FLAGS.out, prefix, doc)
    log(f"wrote {path}, {path[:-5]}.md" + (f", {figure}" if figure else "") +
        f" ({doc['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
