r"""Where a fresh model's first training step spends its time: dense, static sparse, DST.

The first `fit` of a model traces its training step and compiles it with XLA
before the first batch runs; `overhead.py` times the whole first fit, this
script splits its first batch into parts. For each model and variant (in turn,
the order reversed every other repeat; ``--repeats`` freshly built and compiled
models each), one ``fit`` of 2 steps:

* ``first batch``: from ``on_train_begin`` to the end of batch 0 (trace,
  compilation and one step);
* ``trace``: Python time inside ``model.train_step`` while `tf.function`
  traces it (Keras, the model, and for DST the update's ops);
* the XLA compilation, from the files XLA writes when dumping (this script
  sets ``--xla_dump_to`` to a temporary folder before TensorFlow starts, for
  the training step's module only):
  ``to HLO`` from the end of the trace to the unoptimised HLO module (TF's
  graph passes and the graph -> HLO conversion, tf2xla), ``HLO passes`` to
  the optimised module, ``codegen`` to the last LLVM module written;
* ``LLVM modules``: how many LLVM modules XLA's CPU backend compiled for the
  step (one per kernel, plus parts holding the loop and scalar code): codegen
  time grows with it.

Dumping adds a little time to every part; the dense run pays it too. The
medians over repeats go to ``<out_dir>/<prefix>_compile_breakdown.{json,md}``
(prefix "cpu"/"gpu", "quick" under ``--quick``).

  python examples/benchmarks/compile_breakdown.py                 # mlp, convnet
  python examples/benchmarks/compile_breakdown.py --models=mlp --repeats=5
"""

import atexit
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
DUMP_DIR = tempfile.mkdtemp(prefix="xla_dump_")
atexit.register(shutil.rmtree, DUMP_DIR, True)  # also when the flags are refused
os.environ["XLA_FLAGS"] = " ".join(filter(None, [
    os.environ.get("XLA_FLAGS"), f"--xla_dump_to={DUMP_DIR}",
    "--xla_dump_hlo_module_re=.*one_step_on_data.*"]))

from absl import app, flags  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
if ROOT not in sys.path:  # `from examples import cli` when run as a script
    sys.path.insert(1, ROOT)
import bench_models  # noqa: E402
import bench_utils  # noqa: E402
from bench_utils import fmt  # noqa: E402

from examples import cli  # noqa: E402

FLAGS = flags.FLAGS


def define_flags():
    """Defines this script's flags on absl's global FLAGS (when it runs: importing
    the module defines none, so that scripts and tests can import it)."""
    flags.DEFINE_list("models", ["mlp", "convnet"], f"models, of {bench_models.MODEL_NAMES}")
    flags.DEFINE_integer("repeats", 3, "fresh models per variant")
    flags.DEFINE_integer("batch_size", None, "batch size (default: 128; 32 for resnet56 / vgg16)")
    flags.DEFINE_float("density", 0.1, "density of the sparse variants")
    flags.DEFINE_integer("update_every", 100, "DST update period")
    flags.DEFINE_integer("seed", 0, "seed")
    flags.DEFINE_bool("quick", False, "tiny models, 1 repeat (a smoke run; numbers mean nothing)")
    flags.DEFINE_string("out_dir", os.path.join(HERE, "results"), "where results go")
    flags.DEFINE_string("prefix", None, "result file prefix (default: cpu / gpu, quick)")
    # Checked when the flags are parsed (one-line errors naming the flag, before any work).
    bench_utils.register_list_check("models", bench_utils.one_of(bench_models.MODEL_NAMES),
                                    f"a model of {', '.join(bench_models.MODEL_NAMES)}")
    flags.register_validator("repeats", lambda v: v >= 1, "--repeats must be >= 1")
    flags.register_validator("batch_size", lambda v: v is None or v >= 1, "--batch_size must be >= 1")
    flags.register_validator("density", lambda v: 0 < v <= 1, "--density must be in (0, 1]")
    flags.register_validator("update_every", lambda v: v >= 1, "--update_every must be >= 1")


VARIANTS = ("dense", "static", "dst_magnitude", "dst_snip")
PARTS = ("first_batch_s", "trace_s", "to_hlo_s", "hlo_passes_s", "codegen_s", "llvm_modules")


def build(keras, keras_dst, model_name, variant):
    """A freshly built and compiled model of `variant` and its callbacks."""
    model = bench_models.compiled(keras, keras_dst, model_name, sparse=variant != "dense",
                                  seed=FLAGS.seed, quick=FLAGS.quick, density=FLAGS.density)
    callbacks = []
    if variant.startswith("dst_"):
        callbacks.append(keras_dst.DynamicSparseTraining(
            prune=variant[len("dst_"):], grow="gradient", update_every=FLAGS.update_every,
            seed=FLAGS.seed))
    return model, callbacks


def xla_times(since, until):
    """Times (since the trace's end) of the training step's dump files written in
    [since, until]: ``(hlo, optimised, last_llvm, llvm_modules)``, or None."""
    files = []
    for name in os.listdir(DUMP_DIR):
        if "one_step_on_data" not in name:
            continue
        t = os.path.getmtime(os.path.join(DUMP_DIR, name))
        if since <= t <= until:
            files.append((t, name))
    first = [t for t, n in files if n.endswith("before_optimizations.txt")]
    optimised = [t for t, n in files if n.endswith("after_optimizations.txt")]
    llvm = [t for t, n in files if n.endswith("ir-with-opt.ll")]
    if not (first and optimised and llvm):
        return None
    return min(first), min(optimised), max(llvm), len(llvm)


def first_fit(keras, keras_dst, tf, model_name, variant, batch_size):
    """One fresh model's 2-step first fit, its first batch split in parts (see module doc)."""
    model, callbacks = build(keras, keras_dst, model_name, variant)
    data = bench_models.synthetic_dataset(tf, model_name, batch_size, seed=FLAGS.seed)
    trace_s, trace_end = [], []
    train_step = model.train_step

    def timed_train_step(batch):
        start = time.perf_counter()
        out = train_step(batch)
        trace_s.append(time.perf_counter() - start)
        trace_end.append(time.time())
        return out

    model.train_step = timed_train_step
    marks = {}
    clock = keras.callbacks.LambdaCallback(
        on_train_begin=lambda logs: marks.setdefault("begin", time.time()),
        on_train_batch_end=lambda batch, logs: marks.setdefault(batch, time.time()))
    model.fit(data, epochs=1, steps_per_epoch=2, verbose=0, callbacks=callbacks + [clock])
    begin = marks["begin"]
    first_batch = marks[0] - begin
    record = {"first_batch_s": first_batch, "trace_s": sum(trace_s)}
    times = xla_times(begin, marks[0])
    if times is not None:
        hlo, optimised, last_llvm, modules = times
        end = max(trace_end)
        record.update(to_hlo_s=hlo - end, hlo_passes_s=optimised - hlo,
                      codegen_s=last_llvm - optimised, llvm_modules=modules)
    return record


def run_model(keras, keras_dst, tf, model_name, log):
    batch_size = FLAGS.batch_size or (32 if model_name in ("resnet56", "vgg16") else 128)
    repeats = 1 if FLAGS.quick else FLAGS.repeats
    # the process's one-time costs (XLA / LLVM start-up, lazy imports), untimed
    for variant in VARIANTS:
        first_fit(keras, keras_dst, tf, model_name, variant, batch_size)
    records = {v: [] for v in VARIANTS}
    for r, variant in bench_utils.interleaved(VARIANTS, repeats):
        rec = first_fit(keras, keras_dst, tf, model_name, variant, batch_size)
        records[variant].append(rec)
        log(f"  {model_name} {variant:<14} repeat {r + 1}: " + "  ".join(
            f"{k} {fmt(rec.get(k), '.3f' if k.endswith('_s') else 'd')}" for k in PARTS))
    medians = {v: {k: bench_utils.median([rec[k] for rec in recs if k in rec])
                   for k in PARTS} for v, recs in records.items()}
    return {"model": model_name, "batch_size": batch_size, "repeats": repeats,
            "records": records, "median": medians}


def markdown(results, info):
    lines = ["# First batch of a fresh model: trace and XLA compilation, by part", "",
             f"{info['date_utc']}, {info['device']}, TensorFlow {info['tensorflow']}, "
             f"Keras {info['keras']}; load average at start {info['load_average_1_5_15min']}.",
             "",
             "Medians over fresh models (`compile_breakdown.py`); seconds, except LLVM modules. "
             "`to HLO` = TF graph passes and the graph -> HLO conversion; `codegen` = LLVM "
             "optimisation and code generation of the step's kernels. `DST extra` = the DST "
             "first batch minus the dense one.", ""]
    header = ["model", "variant", "first batch", "trace", "to HLO", "HLO passes", "codegen",
              "LLVM modules", "DST extra"]
    rows = []
    for res in results:
        dense = res["median"]["dense"]["first_batch_s"]
        for v in VARIANTS:
            m = res["median"][v]
            rows.append([res["model"], v] + [
                fmt(m[k], ".3f" if k.endswith("_s") else ".0f") for k in PARTS] + [
                fmt(m["first_batch_s"] - dense, "+.3f") if v.startswith("dst_") else ""])
    lines.append(bench_utils.markdown_table(header, rows))
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    import keras
    import tensorflow as tf

    import keras_dst

    info = bench_utils.machine_info(tf, keras)
    prefix = FLAGS.prefix or ("quick" if FLAGS.quick else bench_utils.device_prefix(tf))
    results = []
    try:
        for model_name in FLAGS.models:
            results.append(run_model(keras, keras_dst, tf, model_name, print))
    finally:
        shutil.rmtree(DUMP_DIR, ignore_errors=True)
    out = os.path.join(FLAGS.out_dir, f"{prefix}_compile_breakdown")
    bench_utils.write_json(out + ".json", {"machine": info, "results": results})
    with open(out + ".md", "w") as f:
        f.write(markdown(results, info))
    print(markdown(results, info))
    print(f"wrote {out}.json / .md")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
