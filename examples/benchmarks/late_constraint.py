r"""A/B of where a DST step applies the mask constraint ("after_optimizer" ordering).

keras_dst applies the mask constraint of each sparsified weight once after the
update's loop (`keras_dst.hooks.Hook.late_constraints`); before, Keras applied it
inside the optimizer's update, ahead of the loop, and XLA copied weights (or
masks) at every step. This script measures both in one process, beside dense
and static sparse models, in the pattern of the fit loop of `overhead.py`:

* ``--fit_loop_models`` K fresh models per variant, each timed on its first
  ``fit`` (compilation included; ratio to the dense first fit of the same model
  index);
* then ``--rounds`` R rounds in which every model runs ``evaluate`` on one batch
  and one ``fit(epochs=1)`` of ``--steps`` steps (ΔT = ``--update_every``, so a
  call holds its update steps), the order reversed every other round; a call's
  window is the time from the end of its first batch to the end of its last,
  per step. Per round, the median over a variant's K models; ratio to dense per
  round, median and 95 % interval over rounds (round 1 left out: it follows the
  first fits).

Variant ``dst_inside`` is DST with the constraint inside the optimizer's update
(``TopologyEngine.late_constraints`` returns no weight while it is traced): the
state before the change. Results go to ``<out_dir>/<prefix>_late_constraint.{json,md}``.
Run with ``TF_NUM_INTRAOP_THREADS=1 TF_NUM_INTEROP_THREADS=1 taskset -c 1`` for a
single-threaded (less noisy) measurement; pass ``--prefix`` so the files differ.

  python examples/benchmarks/late_constraint.py                      # mlp, K = 3, R = 9
  python examples/benchmarks/late_constraint.py --quick --out_dir=/tmp/bench
"""

import gc
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
if ROOT not in sys.path:  # `from examples import cli` when run as a script
    sys.path.insert(1, ROOT)
import bench_models  # noqa: E402
import bench_utils  # noqa: E402
from bench_utils import fmt, with_ci  # noqa: E402

from examples import cli  # noqa: E402

FLAGS = flags.FLAGS


def define_flags():
    """Defines this script's flags on absl's global FLAGS (when it runs: importing
    the module defines none, so that scripts and tests can import it)."""
    flags.DEFINE_enum("model", "mlp", bench_models.MODEL_NAMES, "model (examples/benchmarks/bench_models.py)")
    flags.DEFINE_integer("fit_loop_models", 3, "fresh models per variant")
    flags.DEFINE_integer("rounds", 9, "fit-loop rounds (every model one fit call per round)")
    flags.DEFINE_integer("steps", 100, "steps per fit call")
    flags.DEFINE_integer("update_every", 100, "ΔT of the DST variants")
    flags.DEFINE_integer("batch_size", 128, "batch size")
    flags.DEFINE_float("density", 0.1, "density of the sparse variants")
    flags.DEFINE_integer("seed", 0, "seed")
    flags.DEFINE_bool("quick", False, "tiny model, 1 model per variant, 3 rounds of 4 steps (a smoke "
                      "run; numbers meaningless)")
    flags.DEFINE_string("out_dir", os.path.join(HERE, "results"), "where results go")
    flags.DEFINE_string("prefix", None, "file prefix (default: cpu / gpu, quick under --quick)")
    # Checked when the flags are parsed (one-line errors naming the flag, before any work);
    # --quick replaces the counts by its own.
    for _name, _low in (("fit_loop_models", 1), ("rounds", 2), ("steps", 2), ("update_every", 1),
                        ("batch_size", 1)):
        flags.register_validator(_name, lambda v, low=_low: v >= low, f"--{_name} must be >= {_low}")
    flags.register_validator("density", lambda v: 0 < v <= 1, "--density must be in (0, 1]")


VARIANTS = ("dense", "static", "dst_late", "dst_inside")


def build(keras, keras_dst, variant, seed):
    """A fresh compiled model of `variant` and its callbacks."""
    model = bench_models.compiled(keras, keras_dst, FLAGS.model, sparse=variant != "dense",
                                  seed=seed, mask_seed=FLAGS.seed, quick=FLAGS.quick,
                                  density=FLAGS.density)
    callbacks = []
    if variant.startswith("dst_"):  # a constant rate: every call's update prunes alike
        callbacks.append(keras_dst.DynamicSparseTraining(
            prune="magnitude", grow="gradient", update_every=4 if FLAGS.quick else FLAGS.update_every,
            schedule="constant", prune_rate=0.1, seed=FLAGS.seed))
    return model, callbacks


def main(argv):
    del argv
    import keras
    import tensorflow as tf

    import keras_dst
    from keras_dst.engine import TopologyEngine

    late = TopologyEngine.late_constraints

    def constraints_inside(self, variables):
        return []

    models = 1 if FLAGS.quick else FLAGS.fit_loop_models
    rounds = 3 if FLAGS.quick else FLAGS.rounds
    steps = 4 if FLAGS.quick else FLAGS.steps
    batch_size = 8 if FLAGS.quick else FLAGS.batch_size
    info = bench_utils.machine_info(tf, keras)
    data = bench_models.synthetic_dataset(tf, FLAGS.model, batch_size, seed=FLAGS.seed)
    x, y = next(iter(data))

    class Clock(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.times = []

        def on_train_batch_end(self, batch, logs=None):
            self.times.append(time.perf_counter())

    def fit(model, callbacks):
        clock = Clock()
        gc.disable()
        try:
            start = time.perf_counter()
            model.fit(data, epochs=1, steps_per_epoch=steps, verbose=0,
                      callbacks=callbacks + [clock])
            seconds = time.perf_counter() - start
        finally:
            gc.enable()
        return seconds, (clock.times[-1] - clock.times[0]) / (len(clock.times) - 1)

    runs, first = {}, {v: [] for v in VARIANTS}
    try:
        for k, variant in bench_utils.interleaved(VARIANTS, models):
            # (the switch is read while the step is traced: during the first fit)
            TopologyEngine.late_constraints = constraints_inside if variant == "dst_inside" else late
            runs[variant, k] = build(keras, keras_dst, variant, FLAGS.seed + k)
            first[variant].append(fit(*runs[variant, k])[0])
            print(f"first fit {k + 1}: {variant:<10} {first[variant][-1]:.3f} s", flush=True)
    finally:
        TopologyEngine.late_constraints = late
    windows = {v: [] for v in VARIANTS}  # per round: median over the models, s/step
    order = [(v, k) for v in VARIANTS for k in range(models)]
    for r in range(rounds):
        per_model = {v: [] for v in VARIANTS}
        for variant, k in (order if r % 2 == 0 else order[::-1]):
            model, callbacks = runs[variant, k]
            model.evaluate(x, y, batch_size=int(x.shape[0]), verbose=0)
            per_model[variant].append(fit(model, callbacks)[1])
        for v in VARIANTS:
            windows[v].append(bench_utils.median(per_model[v]))
        print(f"round {r + 1}: " + ", ".join(f"{v} {1e3 * windows[v][-1]:.2f} ms/step"
                                            for v in VARIANTS), flush=True)
    results = {}
    for v in VARIANTS:
        res = {"first_fit_s": first[v], "window_ms": [1e3 * w for w in windows[v]]}
        if v != "dense":
            res["first_fit_ratio"], res["first_fit_ratio_ci95"] = bench_utils.ratio_stats(
                first[v], first["dense"])
            res["window_ratio"], res["window_ratio_ci95"] = bench_utils.ratio_stats(
                windows[v][1:], windows["dense"][1:])
        results[v] = res
    prefix = FLAGS.prefix or ("quick" if FLAGS.quick else bench_utils.device_prefix(tf))
    out = os.path.join(FLAGS.out_dir, f"{prefix}_late_constraint")
    config = {"model": FLAGS.model, "fit_loop_models": models, "rounds": rounds, "steps": steps,
              "update_every": 4 if FLAGS.quick else FLAGS.update_every, "batch_size": batch_size,
              "density": FLAGS.density, "quick": FLAGS.quick,
              "threads": os.environ.get("TF_NUM_INTRAOP_THREADS", "default"),
              "command": " ".join(sys.argv)}
    info["load_average_end"] = bench_utils.load_average()
    bench_utils.write_json(out + ".json", {"machine": info, "config": config, "results": results})
    rows = [[v, fmt(bench_utils.median(results[v]["window_ms"][1:]), ".2f"),
             with_ci(results[v].get("window_ratio"), results[v].get("window_ratio_ci95")),
             fmt(bench_utils.median(first[v]), ".2f"),
             with_ci(results[v].get("first_fit_ratio"), results[v].get("first_fit_ratio_ci95"))]
            for v in VARIANTS]
    text = "\n".join([
        "# The mask constraint after the update's loop vs inside the optimizer's update", "",
        f"{info['date_utc']}, {info['device']}, TensorFlow {info['tensorflow']}, Keras "
        f"{info['keras']}; load average {info['load_average_1_5_15min']} (start) / "
        f"{info['load_average_end']} (end); threads: {config['threads']}.", "",
        f"`late_constraint.py`: {config['model']}, {models} fresh model(s) per variant, "
        f"{rounds} rounds of one `fit(epochs=1)` of {steps} steps per model (ΔT = "
        f"{config['update_every']}: the DST calls hold their update steps), `evaluate` "
        "before each. Window = from the end of a call's first batch to the end of its last, "
        "per step, median over the models; ratios to dense per round (round 1 left out), "
        "median [95 % interval]. `dst_inside`: the constraint inside the optimizer's update "
        "(the state before the change).", "",
        bench_utils.markdown_table(["variant", "window ms/step", "window / dense",
                                    "first fit s", "first fit / dense"], rows), ""])
    with open(out + ".md", "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {out}.json / .md")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
