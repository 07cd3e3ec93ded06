r"""Memory kept per discarded model: train-and-discard cycles in one process.

A sweep trains many models one after the other in one process. Each cycle here
builds a small MLP, compiles it (`jit_compile=True`), trains it for a few steps,
evaluates it and drops it (``del model; keras.backend.clear_session();
gc.collect()``), for three variants interleaved: ``dense`` (plain Keras),
``static`` (`keras_dst.prunable`, no callback) and ``dst``
(+ `DynamicSparseTraining`, two `fit` calls). The resident set size (RSS) is read
after every cycle; the growth per model is the least-squares slope of RSS over
the cycles after `--warmup` cycles per variant.

Target: DST's growth per model within 1 MB of dense's.

Writes ``<out_dir>/<prefix>_memory.json`` and ``.md`` (prefix "cpu", "quick" under
``--quick``: a smoke run never overwrites a measurement's files).

  python examples/benchmarks/memory.py --cycles=50
  python examples/benchmarks/memory.py --quick --out_dir=/tmp/bench   # smoke run
"""

import gc
import json
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
import bench_utils  # noqa: E402

from examples import cli  # noqa: E402

FLAGS = flags.FLAGS

VARIANTS = ("dense", "static", "dst")
QUICK = (6, 2)  # cycles, warm-up of a --quick run


def check_cycles(values):
    """absl validator of --cycles / --warmup: the slope needs 2 cycles after the warm-up
    (a --quick run uses its own counts)."""
    if values["quick"]:
        return True
    cycles, warmup = values["cycles"], values["warmup"]
    if warmup < 0:
        raise flags.ValidationError(f"--warmup={warmup} must be >= 0")
    if cycles < warmup + 2:
        raise flags.ValidationError(
            f"--cycles={cycles} must be at least --warmup={warmup} + 2 (the growth per model is "
            "the slope over the cycles after the warm-up)")
    return True


def define_flags():
    """Defines this script's flags on absl's global FLAGS (when it runs: importing
    the module defines none, so that scripts and tests can import it)."""
    flags.DEFINE_bool("quick", False, "6 cycles, warm-up 2 (a smoke "
                      "test, numbers meaningless; --cycles / --warmup ignored)")
    flags.DEFINE_integer("cycles", 50, "train-and-discard cycles per variant")
    flags.DEFINE_integer("warmup", 5, "first cycles per variant left out of the slope")
    flags.DEFINE_string("out_dir", os.path.join(HERE, "results"), "where <prefix>_memory.{json,md} go")
    flags.DEFINE_string("prefix", None, "file prefix (default: 'cpu', or 'quick' with --quick)")
    flags.register_multi_flags_validator(["quick", "cycles", "warmup"], check_cycles)


def rss_mb():
    """Resident set size of this process in MB (Linux /proc; else the peak RSS)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cycle(variant, x, y):
    """Builds, trains, evaluates and discards one model of `variant`."""
    import keras

    import keras_dst

    inp = keras.Input((x.shape[1],))
    h = keras.layers.Dense(128, activation="relu")(inp)
    model = keras.Model(inp, keras.layers.Dense(10)(h))
    if variant != "dense":
        model = keras_dst.prunable(model, density=0.1)
    model.compile(keras.optimizers.SGD(0.01, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=True)
    callbacks = ([keras_dst.DynamicSparseTraining(update_every=4, total_steps=16)]
                 if variant == "dst" else [])
    for _ in range(2):
        model.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=callbacks)
        model.evaluate(x[:64], y[:64], verbose=0)
    del model, callbacks
    keras.backend.clear_session()
    gc.collect()


def slope(ys):
    """Least-squares slope of ys over their index."""
    n = len(ys)
    if n < 2:
        return float("nan")
    mx, my = (n - 1) / 2, sum(ys) / n
    return sum((i - mx) * (y - my) for i, y in enumerate(ys)) / sum((i - mx) ** 2 for i in range(n))


def write_report(out_dir, prefix, result):
    """Writes `<prefix>_memory.json` and `.md` into `out_dir`; returns the .md text."""
    cycles, warmup, rss = result["cycles"], result["warmup"], result["rss_mb"]
    per_model = result["growth_mb_per_model"]
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{prefix}_memory.json"), "w") as f:
        json.dump(result, f, indent=1)
    lines = ["# Memory kept per discarded model (CPU)", ""]
    if result.get("quick"):
        lines += [f"**--quick smoke run ({cycles} cycles): not a measurement, the numbers mean "
                  "nothing and the target is not judged.**", ""]
    lines += [f"{cycles} train-and-discard cycles per variant, interleaved in one process "
              f"(slope over cycles {warmup}..{cycles - 1}); command: "
              f"`{result.get('command', 'python examples/benchmarks/memory.py')}`.", "",
              "| variant | RSS after warm-up MB | RSS at the end MB | growth per model MB |",
              "|---|---|---|---|"]
    for v in VARIANTS:
        lines.append(f"| {v} | {rss[v][warmup]:.1f} | {rss[v][-1]:.1f} | {per_model[v]:.3f} |")
    verdict = ("not judged: --quick run" if result.get("quick")
               else "met" if result["dst_minus_dense_mb"] <= 1.0 else "MISSED")
    lines += ["", f"DST - dense: {result['dst_minus_dense_mb']:+.3f} MB per model "
              f"(target <= 1 MB: {verdict})."]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, f"{prefix}_memory.md"), "w") as f:
        f.write(text)
    return text


def main(argv):
    del argv
    import numpy as np

    cycles, warmup = QUICK if FLAGS.quick else (FLAGS.cycles, FLAGS.warmup)
    prefix = bench_utils.output_prefix(FLAGS.prefix, FLAGS.quick, "cpu")
    try:  # before the cycles, not when writing their results
        cli.check_directory(FLAGS.out_dir, "--out_dir")
    except ValueError as e:
        sys.exit(f"error: {e}")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 64)).astype("float32")
    y = rng.integers(0, 10, size=256)
    rss = {v: [] for v in VARIANTS}
    start = time.time()
    for r, variant in bench_utils.interleaved(list(VARIANTS), cycles):
        cycle(variant, x, y)
        rss[variant].append(rss_mb())
        if variant == VARIANTS[-1] or r % 2:
            print(f"  cycle {r}: {variant:<7} RSS {rss[variant][-1]:.1f} MB", flush=True)
    per_model = {v: slope(rss[v][warmup:]) for v in VARIANTS}
    result = dict(cycles=cycles, warmup=warmup, quick=FLAGS.quick, rss_mb=rss,
                  growth_mb_per_model=per_model,
                  dst_minus_dense_mb=per_model["dst"] - per_model["dense"],
                  seconds=time.time() - start, command="python " + " ".join(sys.argv),
                  machine=bench_utils.machine_info())
    print(write_report(FLAGS.out_dir, prefix, result), end="")
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
