r"""Headline table of the benchmark results: ``results/<prefix>_summary.md``.

Reads ``<prefix>_overhead.json`` and ``<prefix>_scaling.json`` (written by
`overhead.py` and `scaling.py`) and writes one table per model with the ratios
the targets are stated in, each marked met / missed, then the compilation and
repeated-fit rows of each model (first fit, fit-loop window, later fit call, first fit
after a reload from disk).
An input that is missing is named on stdout and in the summary; with neither, the
script stops with an error naming them. No TensorFlow needed.

  python examples/benchmarks/summarize.py            # results/cpu_summary.md
"""

import os
import sys

from absl import app, flags

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
ROOT = os.path.dirname(os.path.dirname(HERE))
if ROOT not in sys.path:  # `from examples import cli` when run as a script
    sys.path.insert(1, ROOT)
import bench_utils  # noqa: E402
from bench_utils import fmt, with_ci  # noqa: E402

from examples import cli  # noqa: E402

FLAGS = flags.FLAGS


def define_flags():
    """Defines this script's flags on absl's global FLAGS (when it runs: importing
    the module defines none, so that scripts and tests can import it)."""
    flags.DEFINE_string("out_dir", os.path.join(HERE, "results"), "results folder")
    flags.DEFINE_string("prefix", "cpu", "file prefix")
    flags.DEFINE_string("note", "", "free text put under the title (e.g. contention, missing GPU)")


TARGETS = {"static": 1.01, "amortised": 1.03, "update_steps": 1.0, "tfmot": 0.7,
           "first_fit": 1.5, "fit_window": 1.03, "later_call": 1.05}
DST = ("dst_magnitude", "dst_snip")
INPUTS = ("overhead", "scaling")  # <prefix>_<name>.json, written by <name>.py


def read_inputs(out_dir, prefix):
    """The input documents ``{name: doc or None}`` of `INPUTS`, and the list of
    ``"<file> (missing | not readable JSON)"`` for those that could not be read."""
    docs, left_out = {}, []
    for name in INPUTS:
        path = os.path.join(out_dir, f"{prefix}_{name}.json")
        docs[name] = bench_utils.read_json(path)
        if docs[name] is None:
            why = "not readable JSON" if os.path.exists(path) else "missing"
            left_out.append(f"{prefix}_{name}.json ({why}; written by {name}.py)")
    return docs, left_out


def mark(x, limit, applies=True, ci=None):
    """'x [lo, hi] (verdict)'."""
    if x is None:
        return "n/a"
    s = with_ci(x, ci)
    return s if not applies else f"{s} ({bench_utils.verdict(x, limit, ci)})"


def fit_call_rows(m, r):
    """Rows of the compilation / repeated-fit table for the model entry `r`."""
    rows = []
    ff, fl = r.get("first_fit"), r.get("fit_loop")
    if ff:
        v = ff["variants"]
        rows.append([m, f"first fit DST/dense (≤ {TARGETS['first_fit']})",
                     f"{fmt(v['dense']['seconds'], '.2f')} s ({ff['repeats']} fresh model(s), "
                     f"{ff['steps']} steps)",
                     with_ci(v["static"]["ratio"], v["static"]["ratio_ci95"])]
                    + [mark(v[k]["ratio"], TARGETS["first_fit"], ci=v[k]["ratio_ci95"])
                       for k in DST])
    if fl:
        v = fl["variants"]
        d, st = v["dense"], v["static"]
        rows.append([m, f"fit-loop window DST/dense (≤ {TARGETS['fit_window']})",
                     f"{fmt(d['window_step_ms'], '.2f')} ms/step (calls 3-{fl['calls']}, "
                     f"{fl['window_steps']} steps each"
                     + (f", median of {fl['models']} models" if fl.get("models", 1) > 1 else "")
                     + ")",
                     with_ci(st["window_ratio"], st["window_ratio_ci95"])]
                    + [mark(v[k]["window_ratio"], TARGETS["fit_window"],
                            ci=v[k]["window_ratio_ci95"]) + f", {v[k]['updates_in_windows']} upd."
                       for k in DST])
        rows.append([m, f"later fit call DST/dense (≤ {TARGETS['later_call']} + update)",
                     f"{fmt(d['later_call_s'], '.2f')} s/call (call 1: "
                     f"{fmt(d['first_call_s'], '.2f')} s, 2: {fmt(d['second_call_s'], '.2f')} s)",
                     with_ci(st["later_call_ratio"], st["later_call_ratio_ci95"])]
                    + [bench_utils.later_call(v[k], TARGETS["later_call"]) for k in DST])
    rl = r.get("reload")
    if rl:  # (the first-fit target applies: a reloaded model compiles its step again)
        v = rl["variants"]
        rows.append([m, f"first fit after a reload from disk DST/dense (≤ "
                        f"{TARGETS['first_fit']}); load ×",
                     f"{fmt(v['dense']['first_fit_s'], '.2f')} s, load "
                     f"{fmt(v['dense']['load_s'], '.2f')} s ({rl['repeats']} reload(s), "
                     f"{rl['steps']} steps)",
                     f"{with_ci(v['static']['first_fit_ratio'], v['static']['first_fit_ratio_ci95'])}"
                     f"; load {fmt(v['static']['load_ratio'])}"]
                    + [f"{mark(v[k]['first_fit_ratio'], TARGETS['first_fit'], ci=v[k]['first_fit_ratio_ci95'])}"
                       f"; load {fmt(v[k]['load_ratio'])}" for k in DST])
    return rows


def main(argv):
    del argv
    docs, left_out = read_inputs(FLAGS.out_dir, FLAGS.prefix)
    if len(left_out) == len(INPUTS):
        sys.exit(f"error: nothing to summarize for --prefix={FLAGS.prefix} in "
                 f"--out_dir={FLAGS.out_dir}: " + ", ".join(left_out))
    over, scal = docs["overhead"], docs["scaling"]
    lines = [f"# keras_dst benchmark summary ({FLAGS.prefix.upper()})", ""]
    if FLAGS.note:
        lines += [FLAGS.note, ""]
    if left_out:
        print(f"note: left out of the summary: {', '.join(left_out)}")
        lines += [f"Left out: {', '.join(left_out)}.", ""]
    if over:
        rows, frows = [], []
        for m, r in over["models"].items():
            frows += fit_call_rows(m, r)
            v = r["variants"]
            mag, snip = v.get("dst_magnitude", {}), v.get("dst_snip", {})
            tm = r.get("tfmot") or {}
            big = m in ("resnet56", "vgg16")
            rows.append([
                m, f"{r['params_dense']:,}", r["batch_size"], fmt(r["dense_step_ms"], ".1f"),
                mark(v["static"]["ratio"], TARGETS["static"], ci=v["static"].get("ratio_ci95")),
                bench_utils.same_kernels(r),
                mark(mag.get("step_ratio"), None, False, mag.get("step_ratio_ci95")),
                mark(mag.get("amortised_ratio"), TARGETS["amortised"],
                     ci=mag.get("amortised_ratio_ci95")),
                fmt(mag.get("direct_ratio")),
                mark(snip.get("amortised_ratio"), TARGETS["amortised"],
                     ci=snip.get("amortised_ratio_ci95")),
                mark(mag.get("update_in_dense_steps"), TARGETS["update_steps"], big),
                mark(snip.get("update_in_dense_steps"), TARGETS["update_steps"], big),
                mark(tm.get("dst_magnitude_epoch_over_tfmot"), TARGETS["tfmot"],
                     ci=tm.get("dst_magnitude_epoch_over_tfmot_ci95")),
                fmt(tm.get("ratio_to_tf_keras_dense")),
                f"{100 * r['memory']['extra_over_dense_weights']:.1f} %",
                r["machine"]["date_utc"], r["machine"]["load_average_1_5_15min"],
            ])
        lines += [
            "## Overhead (ratios to the dense Keras 3 step; targets in the header)", "",
            "Each ratio is the median over rounds of the per-round ratio, in brackets its "
            "95 % confidence interval (order statistics). A target is met when the whole "
            "interval is within it, missed when all of it is above; otherwise this machine's "
            "noise cannot decide, and the median's side is given. `static kernels = dense`: "
            "the compiled static step has exactly the dense step's kernels (optimised HLO; "
            "the extra inputs are the masks), a check without noise.", "",
            bench_utils.markdown_table(
                ["model", "params", "batch", "dense ms/step", "static × (≤1.01)",
                 "static kernels = dense", "DST-mag step ×", "DST-mag amortised × (≤1.03)", "DST-mag direct ×",
                 "DST-snip amortised × (≤1.03)", "mag update / step (≤1, ResNet/VGG)",
                 "snip update / step (≤1, ResNet/VGG)", "DST epoch / TFMOT epoch (≤0.7)",
                 "TFMOT / tf_keras dense", "extra memory / dense weights", "run (UTC)",
                 "load avg at start"], rows),
            ""]
        if frows:
            lines += [
                "## Compilation and repeated fit calls (ratios to dense; targets in the rows)",
                "",
                "First fit: the first `fit` of a fresh model, compilation included, median over "
                "fresh models of the ratio to dense. Fit loop: repeated `fit(epochs=1)` calls with "
                "`evaluate` between them; calls 3..N (call 2 follows the other variants' "
                "compilations, which slow an already compiled step's next run: see the "
                "details): `window` = steps after each call's first "
                "one, `later fit call` = whole calls, per-call ratios to the dense call of the "
                "same round. A later call may exceed the target by its update steps' cost "
                "(k U / dense call): the bound shown is the target plus that; the verdict "
                "judges ratio - k U / dense call per call against the target.", "",
                bench_utils.markdown_table(
                    ["model", "measurement (target)", "dense", "static ×", "DST-mag ×",
                     "DST-snip ×"], frows),
                ""]
        lines += [f"Details: `{FLAGS.prefix}_overhead.md` / `.json`.", ""]
    if scal:
        pf, lf, host = scal["params_fit"], scal["layers_fit"], scal["host_roundtrip"]
        lines += [
            "## Mask-update scaling", "",
            bench_utils.markdown_table(
                ["weights (one layer)", "update ms", "ns / weight"],
                [[f"{r['n']:,}", fmt(1e3 * r["median_s"], ".1f"), fmt(r["per_weight_ns"], ".1f")]
                 for r in scal["params_scaling"]]),
            "",
            f"Exponent b of t ∝ n^b: {fmt(pf['exponent'], '.3f')} over n ≥ "
            f"{pf['fit_min_n']:g}, {fmt(pf['exponent_all_points'], '.3f')} over all points; "
            f"layers: t ∝ L^{fmt(lf['exponent'], '.3f')}, {fmt(lf['per_layer_ms'], '.2f')} ms "
            f"per layer of {scal['layers_scaling'][0]['n']:,} weights. Host round-trip check: "
            f"{'none found' if host['ok'] else 'HOST OPS FOUND'} ({host['hlo_sort_ops']} sort, "
            f"{host.get('hlo_scatter_ops', 'n/a')} scatter in the HLO of {host['layers']} layers).",
            "", f"Details: `{FLAGS.prefix}_scaling.md` / `.json`.", ""]
    path = os.path.join(FLAGS.out_dir, f"{FLAGS.prefix}_summary.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
