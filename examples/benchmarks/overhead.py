r"""Training-step overhead of keras_dst: dense vs static sparse vs DST (vs TFMOT).

For each model (MLP 784-1024-1024-10, the small CIFAR conv net, ResNet-56,
VGG-16; synthetic inputs of the right shapes) this trains, in ONE process and
INTERLEAVED (round r runs epoch r of every variant in turn, the order reversed
every other round, so that machine drift hits all variants alike):

* ``dense``          the plain Keras model;
* ``static``         ``keras_dst.prunable(model, density)``, no callback;
* ``dst_magnitude``  + ``DynamicSparseTraining(prune="magnitude", grow="gradient",
                     update_every=ΔT)``;
* ``dst_snip``       + ``DynamicSparseTraining(prune="snip", grow="gradient", ...)``
                     (a gradient-based criterion: update before the optimizer step);
* ``*_dt1``          the two DST variants with ΔT = 1 (an update at EVERY step;
                     only used to measure the cost of one update, method B);
* ``tfmot_pruned`` / ``tfmot_dense`` (``--tfmot``): TFMOT prune_low_magnitude and a
                     plain tf_keras model, each in its own subprocess
                     (`tfmot_epoch.py`) whose epochs join the same round-robin.

All compile with ``jit_compile=True`` (``--jit_compile``) and SGD(momentum 0.9).
For the step times each variant keeps ONE `fit` call (compiled once); the rounds
are epochs of it. Round 0 (compilation) is discarded. Step time = epoch wall
time / steps. Compilation and repeated `fit` calls are measured apart (below).

Cost of one full mask update (all layers), U:

* method A "isolated": the update of the callback's engine
  (``TopologyEngine._update``, every layer: scoring, prune, regrow, weight and
  mask writes) compiled alone with ``tf.function(jit_compile=True)`` on the
  gradients of one batch; median wall time of ``--isolated_repeats`` calls.
* method B "in-step": the ΔT=1 variant does an update at every step. With
  ``t1`` its step time and ``t`` the ΔT variant's step time in the same round
  (which holds ``u`` update steps out of ``S``): ``U = (t1 - t) / (1 - u / S)``.
  Median over rounds. This is the cost inside the fused XLA step.

Headline ratios (median over rounds of per-round ratios to the dense step of the
same round, with the 95 % confidence interval of the median from order
statistics): ``step`` = a DST step without update, ``amortised`` = the average
step over ΔT steps INCLUDING one update: ``(t_no_update + U / ΔT) / t_dense``,
with U from method B when measured, else A. ``direct`` = mean step time over all
timed epochs (whatever updates fell into them: listed) / dense.

Compiled step (no noise): the optimised XLA HLO of the dense and of the static
model's ``train_step``, kernel counts compared (fusions, dots, convolutions,
copies); the static step should have exactly the dense kernels plus the masks
as inputs.

Memory: bytes of the masks + ever-active flags (+ running scores when tracked +
the engine's few counters) vs the bytes of the dense model's weights. No
gradient is stored: the update uses the gradients of the current step.

Compilation and repeated ``fit`` calls, for dense, static and the two DST
variants (same configuration as above, ``total_steps`` = the fit loop's steps):
every ``fit`` here is ``model.fit(epochs=1, steps_per_epoch=S)``
(``--fit_call_steps`` S, default ``--steps_per_epoch``), timed whole and in its
step window: from the end of batch 0 to the end of the last batch
(``time.perf_counter()`` in ``on_train_batch_end``) over its S - 1 steps (the
first step of the call, with the fit's set-up, left out).

* First fit (``--first_fit_repeats`` R, 0 skips): in each repeat, for every
  variant in turn (the order reversed every other repeat): build and compile a
  fresh model, time its FIRST fit, tracing and XLA compilation included (a DST
  model compiles one step, with its update inside; `compile_breakdown.py` splits
  that compilation in parts). The previous repeat's
  models are deleted and collected; not ``keras.backend.clear_session()``,
  which drops the kernels of the live models (their next call would re-create
  them). Ratio = median over repeats of the ratio to the dense first fit of the
  same repeat (95 % interval from R = 6 on). Target: DST <= 1.5 x dense.
* Fit loop (``--fit_loop_calls`` N, 0 skips; ``--fit_loop_models`` K models per
  variant, default 1, a call's time being the median over them): the first K
  repeats' models go on, as
  in a notebook or a loop that evaluates between epochs: ``model.evaluate`` on
  one batch, then fit call i, for every variant in turn (order reversed every
  other call; the DST callback is the same object in every call). Call 1 is
  their first fit, reported alone; keras_dst compiles its step once per model
  and configuration, so calls 2..N compile nothing. Call 2 is also reported alone: it
  follows the other variants' first fits, after which the first run of an
  already compiled step is slow (~0.2 s for a DST step of the --quick MLP on
  CPU; a few hundredths for a dense one; hardly any after the model's own
  ``evaluate``), a cost that a single model's loop does not pay. For calls
  3..N, per-call ratios to the dense call of the same round, median and 95 %
  interval (from N = 8 on): ``window_ratio`` (target <= 1.03; the windows hold
  the update steps that fall into them, listed) and ``later_call_ratio`` (target <= 1.05 + amortised
  update: a call holding k update steps may exceed the dense call by k U, U as
  above; ``later_call_update_allowance`` = median of k U / t_dense_call,
  ``later_call_net_ratio`` = ratio - k U / t_dense_call per call, judged
  against 1.05).

* Reload from disk (``--reload_repeats`` L <= R, 0 skips): the first L repeats'
  models, after their first fit, are saved to ``.keras`` (untimed), then, for every
  variant in turn (the order reversed every other repeat), loaded
  (``keras_dst.load_model``, timed) and fit twice (``fit(epochs=1)``, timed whole) with
  a new DST callback of an equal configuration: the reloaded model compiles its step in
  its first fit, as a fresh process would (a notebook reopened, a resumed job), and
  nothing in its second. Ratios to dense's per repeat: median and 95 % interval (from
  L = 6 on).

``--fit_calls_only`` runs only these, in a fresh process (one untimed short fit
of a tiny model per variant first takes the process's one-time costs), and
merges them into the model's entry already in the JSON (which gives U).

Writes ``<out_dir>/<prefix>_overhead.json`` and ``.md`` (prefix "cpu"/"gpu" from
the device). Results of models run earlier into the same files are kept (a
model's entry is replaced when it is run again), so the four models may be run
by separate invocations.

  python examples/benchmarks/overhead.py --models=mlp,convnet --tfmot
  python examples/benchmarks/overhead.py --models=vgg16 --batch_size=32 --steps_per_epoch=6 \
      --fit_calls_only --first_fit_repeats=3 --fit_loop_calls=5   # after a full run
  python examples/benchmarks/overhead.py --quick --out_dir=/tmp/bench   # smoke run
"""

import gc
import math
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
ROOT = os.path.dirname(os.path.dirname(HERE))
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
    flags.DEFINE_bool("quick", False, "tiny models, few steps (a smoke test, numbers meaningless)")
    flags.DEFINE_list("models", list(bench_models.MODEL_NAMES), "models to run")
    flags.DEFINE_integer("epochs", 5, "timed epochs (rounds) per variant; one more untimed "
                         "epoch (compilation) comes first")
    flags.DEFINE_integer("steps_per_epoch", 100, "steps per epoch of the main variants "
                         "(a multiple of --update_every makes the 'direct' column cover updates)")
    flags.DEFINE_integer("batch_size", 128, "batch size")
    flags.DEFINE_float("density", 0.1, "global density of the sparse variants (ERK)")
    flags.DEFINE_string("pattern", "unstructured", "sparsity pattern of the sparse variants "
                        "(unstructured, 1xB, N:M, fan_in; layers that cannot take it stay "
                        "unstructured); use a --prefix per pattern")
    flags.DEFINE_integer("update_every", 100, "ΔT of the DST variants")
    flags.DEFINE_enum("update_cost", "both", ["isolated", "every1", "both", "none"],
                      "how to measure one mask update (see the module docstring)")
    flags.DEFINE_integer("every1_steps", 5, "steps per epoch of the ΔT=1 variants")
    flags.DEFINE_integer("isolated_repeats", 5, "timed calls of the isolated update")
    flags.DEFINE_bool("tfmot", False, "also time TFMOT prune_low_magnitude (and a tf_keras dense "
                      "model) in subprocesses (needs tensorflow-model-optimization + tf-keras)")
    flags.DEFINE_bool("jit_compile", True, "XLA-compile the train steps (both sides)")
    flags.DEFINE_float("learning_rate", 0.01, "SGD learning rate (momentum 0.9)")
    flags.DEFINE_list("metrics", [], "metrics every variant is compiled with (e.g. accuracy), "
                      "as most users compile")
    flags.DEFINE_string("out_dir", os.path.join(HERE, "results"), "where results are written")
    flags.DEFINE_string("prefix", None, "file prefix; default 'cpu' or 'gpu' from the device")
    flags.DEFINE_integer("seed", 0, "random seed (same initial weights for every variant)")
    flags.DEFINE_integer("first_fit_repeats", 3, "fresh models per variant whose FIRST fit is timed "
                         "(compilation included), interleaved across variants; 0 skips; 6 or more "
                         "give the ratio's 95 % interval")
    flags.DEFINE_integer("fit_loop_calls", 8, "fit loop: model.fit(epochs=1) calls per variant, "
                         "evaluate between them, interleaved across variants; 0 skips, else >= 3 "
                         "(calls 3..N are the later calls; 8 or more give their 95 % intervals)")
    flags.DEFINE_integer("fit_loop_models", 1, "fit loop: models per variant (the first repeats' "
                         "models), each making every call; a call's time is the median over them "
                         "(two fresh models of one variant can differ by a few % in step time "
                         "on CPU, so one model per variant decides a 1.03 target by chance)")
    flags.DEFINE_integer("reload_repeats", None, "reload from disk: the first L first-fit "
                         "repeats' models saved to .keras, loaded and fit twice (a new callback "
                         "of equal configuration); 0 skips, at most --first_fit_repeats "
                         "(default: 3 or --first_fit_repeats if fewer)")
    flags.DEFINE_integer("fit_call_steps", None, "steps of every first fit and fit-loop call, "
                         ">= 2 (default: --steps_per_epoch)")
    flags.DEFINE_bool("fit_calls_only", False, "skip the step-time round robin (and the update cost, "
                      "compiled-step and memory parts): only the first-fit and fit-loop measurements "
                      "run, merged into the model's entry already in the JSON (same batch size, "
                      "density, ΔT and jit_compile), whose update cost U gives the later-call bound")


QUICK = dict(epochs=2, steps_per_epoch=4, batch_size=8, every1_steps=2, isolated_repeats=2,
             update_every=4, first_fit_repeats=1, fit_loop_calls=3, reload_repeats=1)


def setting(name):
    """A flag's value, replaced by the QUICK value under --quick unless set explicitly."""
    if FLAGS.quick and name in QUICK and not FLAGS[name].present:
        return QUICK[name]
    if name == "fit_call_steps" and FLAGS.fit_call_steps is None:
        return setting("steps_per_epoch")
    if name == "reload_repeats" and FLAGS.reload_repeats is None:
        return min(3, setting("first_fit_repeats"))
    return getattr(FLAGS, name)


# -- variants ----------------------------------------------------------------------
DST_VARIANTS = {"dst_magnitude": "magnitude", "dst_snip": "snip"}


def iterations(model):
    """The optimizer's step counter (python int; reading it waits for the device)."""
    return int(model.optimizer.iterations.numpy())


def build_variant(keras, keras_dst, model_name, variant, total_steps=None, quick=None):
    """The compiled model of `variant` and its DST callback (None for dense / static).

    `total_steps` goes to the callback (its schedule's length; default: the
    steps of each `fit`); `quick` overrides --quick (tiny model)."""
    pattern = keras_dst.patterns.parse(FLAGS.pattern)
    model = bench_models.compiled(
        keras, keras_dst, model_name, sparse=variant != "dense", seed=FLAGS.seed,
        quick=FLAGS.quick if quick is None else quick, learning_rate=FLAGS.learning_rate,
        jit_compile=FLAGS.jit_compile, pattern=pattern, metrics=FLAGS.metrics,
        density=None if pattern.kind == "nm" else FLAGS.density)
    return model, dst_callback(keras_dst, variant, total_steps)


def dst_callback(keras_dst, variant, total_steps=None):
    """The DST callback of `variant` (a new object at every call; None for dense / static)."""
    if not variant.startswith("dst_"):
        return None
    base = variant[:-4] if variant.endswith("_dt1") else variant
    every = 1 if variant.endswith("_dt1") else setting("update_every")
    return keras_dst.DynamicSparseTraining(prune=DST_VARIANTS[base], grow="gradient",
                                           update_every=every, seed=FLAGS.seed,
                                           total_steps=total_steps)


class FitVariant(bench_utils.KerasFitParticipant):
    def __init__(self, keras, keras_dst, tf, model_name, variant, steps, epochs):
        self.model, self.dst = build_variant(keras, keras_dst, model_name, variant)
        self.steps = steps
        self.variant = variant
        ds = bench_models.synthetic_dataset(tf, model_name, setting("batch_size"), seed=FLAGS.seed)
        self.dataset = ds
        model, dst = self.model, self.dst

        def fit(extra, n_epochs):
            model.fit(ds, epochs=n_epochs, steps_per_epoch=steps, verbose=0,
                      callbacks=([dst] if dst is not None else []) + extra)

        super().__init__(variant, fit, epochs,
                         lambda: iterations(model), keras.callbacks.Callback)


class TfmotVariant(bench_utils.Participant):
    """`tfmot_epoch.py --interactive` in a subprocess; one 'go' line per epoch."""

    def __init__(self, model_name, variant, steps, epochs):
        self.name = f"tfmot_{variant}"
        self.steps = steps
        self.summary = None
        self._log = tempfile.NamedTemporaryFile("w+", suffix=f"_{self.name}.log", delete=False)
        self._cmd = [sys.executable, os.path.join(HERE, "tfmot_epoch.py"), "--interactive",
                     f"--model={model_name}", f"--variant={variant}", f"--epochs={epochs}",
                     f"--steps_per_epoch={steps}", f"--batch_size={setting('batch_size')}",
                     f"--density={FLAGS.density}", f"--frequency={setting('update_every')}",
                     f"--learning_rate={FLAGS.learning_rate}", f"--seed={FLAGS.seed}",
                     f"--jit_compile={FLAGS.jit_compile}"] + (["--quick"] if FLAGS.quick else [])
        self._proc = None

    def _read(self):
        while True:
            line = self._proc.stdout.readline()
            if not line:
                self._log.flush()
                self._log.seek(0)
                tail = self._log.read()[-3000:]
                raise RuntimeError(f"{self.name}: subprocess ended early; stderr tail:\n{tail}")
            if line.startswith("JSON "):
                import json
                return json.loads(line[5:])

    def start(self):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
        self._proc = subprocess.Popen(self._cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=self._log, text=True, env=env)
        self._read()  # {"ready": true}: model built, fit started

    def run_epoch(self):
        self._proc.stdin.write("go\n")
        self._proc.stdin.flush()
        return self._read()

    def stop(self):
        if self._proc is None:
            return
        try:
            self.summary = self._read().get("summary")
        except RuntimeError:
            self.summary = None
        self._proc.stdin.close()
        self._proc.wait(timeout=120)
        os.unlink(self._log.name)


def tfmot_available():
    probe = ("import importlib.util as u, sys; "
             "sys.exit(0 if u.find_spec('tensorflow_model_optimization') and "
             "u.find_spec('tf_keras') else 1)")
    return subprocess.run([sys.executable, "-c", probe]).returncode == 0


# -- method A: the update compiled alone ---------------------------------------------
def isolated_update_seconds(tf, keras, fit_variant, repeats):
    """Median wall time of the callback's full update compiled alone (all layers)."""
    engine = fit_variant.dst.engine
    model = fit_variant.model
    optimizer = model.optimizer
    x, y = next(iter(fit_variant.dataset))
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    weights = [t.weight for t in engine.targets]
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x, training=True))
    grads = [tf.cast(g, tf.float32) for g in tape.gradient(loss, weights)]

    @tf.function(jit_compile=True)
    def update(step, grads):
        engine._update(optimizer, step, grads)
        return engine.last_update_step.read_value()

    step = tf.constant(setting("update_every"), tf.int64)
    t0 = time.perf_counter()
    update(step, grads).numpy()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        update(step, grads).numpy()  # .numpy() waits for the device
        times.append(time.perf_counter() - t0)
    return {"median_s": bench_utils.median(times), "all_s": times, "first_call_s": first}


# -- the compiled step, kernel by kernel ------------------------------------------------
def compare_compiled_steps(tf, dense, static):
    x, y = next(iter(dense.dataset))  # both variants train on the same synthetic data
    d = bench_utils.compiled_step_kernels(tf, dense.model, x, y)
    s = bench_utils.compiled_step_kernels(tf, static.model, x, y)
    return {"dense": d, "static": s, "static_same_kernels": d["kernels"] == s["kernels"],
            "static_extra_inputs": s["inputs"] - d["inputs"]}


# -- memory ----------------------------------------------------------------------------
def memory_report(keras_dst, dense_model, sparse_model, engine=None):
    def nbytes(v):
        return int(math.prod(v.shape)) * v.dtype.size if hasattr(v.dtype, "size") else \
            int(math.prod(v.shape)) * __import__("numpy").dtype(v.dtype).itemsize

    targets = keras_dst.sparse_targets(sparse_model)
    dense_bytes = sum(nbytes(v) for v in dense_model.weights)
    kernel_bytes = sum(nbytes(t.weight) for t in targets)
    mask_bytes = sum(nbytes(t.mask) for t in targets)
    ever_bytes = sum(nbytes(t.ever_active) for t in targets)
    score_bytes = sum(nbytes(t.running_score) for t in targets if t.running_score is not None)
    engine_bytes = 0
    if engine is not None:
        engine_bytes = sum(nbytes(v) for v in (engine.layer_stats, engine.last_rate,
                                                engine.last_update_step, engine.skipped_layers))
    extra = mask_bytes + ever_bytes + score_bytes + engine_bytes
    largest = max(int(math.prod(t.weight.shape)) for t in targets)
    return {
        "dense_weight_bytes": dense_bytes,
        "sparsified_kernel_bytes": kernel_bytes,
        "mask_bytes": mask_bytes,
        "ever_active_bytes": ever_bytes,
        "running_score_bytes": score_bytes,
        "engine_state_bytes": engine_bytes,
        "stored_gradient_bytes": 0,
        "extra_bytes": extra,
        "extra_over_dense_weights": extra / dense_bytes,
        "largest_layer_entries": largest,
        # not stored: live only inside the update of the largest layer
        "transient_update_bytes_largest_layer_estimate": largest * (8 + 8 + 4 + 4 + 1),
    }


# -- analysis --------------------------------------------------------------------------
def per_step(records):
    return [r["seconds"] / r["steps"] for r in records]


def updates_in(rec, every):
    """Update steps t (1-based, t % every == 0) within the epoch's (it0, it1]."""
    return rec["it1"] // every - rec["it0"] // every


def analyse(model_name, records, isolated, steps, extra):
    every = setting("update_every")
    timed = {k: v[1:] for k, v in records.items()}  # round 0 = compilation
    t = {k: per_step(v) for k, v in timed.items()}
    dense = t["dense"]
    rounds = len(dense)
    out = {"model": model_name, "rounds_timed": rounds, "steps_per_epoch": steps,
           "dense_step_ms": 1e3 * bench_utils.median(dense),
           "dense_step_ms_range": [1e3 * x for x in bench_utils.spread(dense)],
           "variants": {}}

    def ratio(xs):
        return bench_utils.ratio_stats(xs, dense)[0]

    def ci(xs):  # 95 % interval of the median per-round ratio (None below 6 rounds)
        return bench_utils.ratio_stats(xs, dense)[1]

    def best(xs, extra=0.0):  # fastest round over fastest dense round: interference
        return (min(xs) + extra) / min(dense)  # only ever slows a round down

    out["variants"]["static"] = {"step_ms": 1e3 * bench_utils.median(t["static"]),
                                 "ratio": ratio(t["static"]), "ratio_ci95": ci(t["static"]),
                                 "ratio_best": best(t["static"])}
    for v in DST_VARIANTS:
        if v not in t:
            continue
        recs = timed[v]
        u = [updates_in(r, every) for r in recs]
        tv = t[v]
        res = {"update_every": every, "updates_in_timed_epochs": sum(u),
               "timed_steps": sum(r["steps"] for r in recs)}
        u_b = None
        if f"{v}_dt1" in t:
            t1 = t[f"{v}_dt1"]
            u_b = bench_utils.median([(a - b) / (1.0 - k / steps)
                                      for a, b, k in zip(t1, tv, u)])
            res["dt1_step_ms"] = 1e3 * bench_utils.median(t1)
        u_a = isolated.get(v, {}).get("median_s") if isolated else None
        cost = u_b if u_b is not None else u_a
        res["update_ms_in_step_B"] = None if u_b is None else 1e3 * u_b
        res["update_ms_isolated_A"] = None if u_a is None else 1e3 * u_a
        res["update_method"] = ("B (in-step, dt1 - dt)" if u_b is not None else
                                "A (isolated)" if u_a is not None else None)
        if cost is not None:
            t_nu = [a - k * cost / steps for a, k in zip(tv, u)]
            res["step_ms"] = 1e3 * bench_utils.median(t_nu)
            res["step_ratio"] = ratio(t_nu)
            t_amortised = [x + cost / every for x in t_nu]
            res["amortised_ratio"] = ratio(t_amortised)
            res["step_ratio_ci95"] = ci(t_nu)
            res["amortised_ratio_ci95"] = ci(t_amortised)
            res["step_ratio_best"] = best(t_nu)
            res["amortised_ratio_best"] = best(t_nu, cost / every)
            res["update_in_dense_steps"] = cost / bench_utils.median(dense)
            res["update_in_dense_steps_A"] = None if u_a is None else u_a / bench_utils.median(dense)
            res["update_in_dense_steps_B"] = None if u_b is None else u_b / bench_utils.median(dense)
        else:  # only no-update rounds can be used
            clean = [(a, b) for a, b, k in zip(tv, dense, u) if k == 0]
            res["step_ms"] = 1e3 * bench_utils.median([a for a, _ in clean]) if clean else None
            res["step_ratio"] = bench_utils.median([a / b for a, b in clean]) if clean else None
            res["amortised_ratio"] = None
            res["update_in_dense_steps"] = None
        res["direct_ratio"] = (sum(r["seconds"] for r in recs) / res["timed_steps"]) / (
            sum(r["seconds"] for r in timed["dense"]) /
            sum(r["steps"] for r in timed["dense"]))
        out["variants"][v] = res
    if "tfmot_pruned" in t:
        tf_recs = timed["tfmot_pruned"]
        res = {"step_ms": 1e3 * bench_utils.median(t["tfmot_pruned"]),
               "ratio_to_keras3_dense": ratio(t["tfmot_pruned"]),
               "updates_in_timed_epochs_approx": sum(
                   (r["it1"] - 1) // every - (r["it0"] - 1) // every for r in tf_recs)}
        if "tfmot_dense" in t:
            res["tf_keras_dense_step_ms"] = 1e3 * bench_utils.median(t["tfmot_dense"])
            res["ratio_to_tf_keras_dense"] = bench_utils.median(
                [a / b for a, b in zip(t["tfmot_pruned"], t["tfmot_dense"])])
        # ours / TFMOT, epoch for epoch (same steps, same rounds)
        epoch_ratios = [a["seconds"] / b["seconds"] for a, b in zip(timed["dst_magnitude"], tf_recs)]
        res["dst_magnitude_epoch_over_tfmot"] = bench_utils.median(epoch_ratios)
        res["dst_magnitude_epoch_over_tfmot_ci95"] = bench_utils.median_ci(epoch_ratios)
        res["dst_magnitude_epoch_over_tfmot_best"] = (
            min(r["seconds"] for r in timed["dst_magnitude"]) /
            min(r["seconds"] for r in tf_recs))
        if "dst_magnitude" in out["variants"] and out["variants"]["dst_magnitude"].get(
                "amortised_ratio") is not None:
            m = out["variants"]["dst_magnitude"]
            res["note"] = ("dst_magnitude_epoch_over_tfmot compares whole epochs, each "
                           f"holding the updates listed ({m['updates_in_timed_epochs']} for DST, "
                           "~" + str(res["updates_in_timed_epochs_approx"]) + " for TFMOT)")
        out["tfmot"] = res
    out.update(extra)
    return out


def step_overhead(keras, tf, keras_dst, model_name, log):
    """The step-time round robin, the update cost, the compiled-step check, memory."""
    rounds = setting("epochs") + 1
    steps = setting("steps_per_epoch")
    cost_mode = FLAGS.update_cost
    variants = ["dense", "static", *DST_VARIANTS]
    if cost_mode in ("every1", "both"):
        variants += [f"{v}_dt1" for v in DST_VARIANTS]
    participants = []
    for v in variants:
        s = setting("every1_steps") if v.endswith("_dt1") else steps
        participants.append(FitVariant(keras, keras_dst, tf, model_name, v, s, rounds))
    use_tfmot = FLAGS.tfmot and tfmot_available()
    if FLAGS.tfmot and not use_tfmot:
        log("  --tfmot: tensorflow-model-optimization / tf-keras not importable; skipped")
    if use_tfmot:
        participants += [TfmotVariant(model_name, "pruned", steps, rounds),
                         TfmotVariant(model_name, "dense", steps, rounds)]
    log(f"[{model_name}] variants: {[p.name for p in participants]}, {rounds} rounds "
        f"(first untimed), {steps} steps/epoch, batch {setting('batch_size')}")
    t0 = time.perf_counter()
    records = bench_utils.round_robin(participants, rounds, log=log)
    log(f"[{model_name}] round robin took {time.perf_counter() - t0:.1f} s")
    by_name = {p.name: p for p in participants}
    isolated = {}
    if cost_mode in ("isolated", "both"):
        for v in DST_VARIANTS:
            iso = isolated_update_seconds(tf, keras, by_name[v], setting("isolated_repeats"))
            isolated[v] = iso
            log(f"[{model_name}] isolated update {v}: {1e3 * iso['median_s']:.1f} ms "
                f"(first call incl. compile {iso['first_call_s']:.1f} s)")
    dense_model = by_name["dense"].model
    compiled = compare_compiled_steps(tf, by_name["dense"], by_name["static"])
    log(f"[{model_name}] compiled step: static has the dense kernels: "
        f"{compiled['static_same_kernels']} ({compiled['dense']['kernels']}), "
        f"+{compiled['static_extra_inputs']} inputs (the masks)")
    extra = {
        "compiled_step": compiled,
        "batch_size": setting("batch_size"),
        "density": FLAGS.density,
        "jit_compile": FLAGS.jit_compile,
        "params_dense": int(dense_model.count_params()),
        "memory": memory_report(keras_dst, dense_model, by_name["dst_magnitude"].model,
                                by_name["dst_magnitude"].dst.engine),
        "isolated_update": isolated,
        "raw_epochs": records,
        "tfmot_summary": {p.name: p.summary for p in participants
                          if isinstance(p, TfmotVariant)},
        "wall_seconds": time.perf_counter() - t0,
    }
    return analyse(model_name, records, isolated, steps, extra)


# -- first fit and fit loop: compilation and repeated fit calls --------------------------
FIT_VARIANTS = ("dense", "static", *DST_VARIANTS)


def batch_clock(keras):
    """A callback keeping ``times``: time.perf_counter() at the end of each training
    batch of the current fit. (A callback with ``on_train_batch_end`` makes Keras run
    the batch callbacks synchronously, after the step's logs reached the host, so
    these are the ends of the steps.)"""

    class BatchClock(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.times = []

        def on_train_batch_end(self, batch, logs=None):
            self.times.append(time.perf_counter())

    return BatchClock()


class FitRun:
    """A freshly built and compiled model of one variant, its DST callback (the same
    object in every fit) and its data."""

    def __init__(self, keras, keras_dst, tf, model_name, variant, total_steps, path=None):
        t0 = time.perf_counter()
        if path is None:
            self.model, self.dst = build_variant(keras, keras_dst, model_name, variant,
                                                 total_steps)
        else:  # a reload from disk: the saved model, a new callback of equal configuration
            self.model = keras_dst.load_model(path)
            self.dst = dst_callback(keras_dst, variant, total_steps)
        self.build_s = time.perf_counter() - t0  # build (+ prunable) + compile, or load
        self.total_steps = total_steps
        self.dataset = bench_models.synthetic_dataset(tf, model_name, setting("batch_size"),
                                                      seed=FLAGS.seed)
        self.batch = next(iter(self.dataset))

    def fit(self, steps, clock):
        """One ``model.fit(epochs=1, steps_per_epoch=steps)``, timed.

        Returns ``seconds`` (the whole call), the optimizer steps ``(it0, it1]``
        it ran, and its step window: ``window_s`` from the end of batch 0 to the
        end of the last batch, over ``window_steps`` = steps - 1 (the first step
        of every fit, with the fit's set-up, left out). Python's garbage
        collector is paused during the call (as `timeit` does): a collection of
        the whole heap would land on whichever variant runs then.
        """
        it0 = iterations(self.model)
        callbacks = ([self.dst] if self.dst is not None else []) + [clock]
        gc.disable()
        try:
            t0 = time.perf_counter()
            self.model.fit(self.dataset, epochs=1, steps_per_epoch=steps, verbose=0,
                           callbacks=callbacks)
            seconds = time.perf_counter() - t0
        finally:
            gc.enable()
        it1 = iterations(self.model)
        return {"seconds": seconds, "it0": it0, "it1": it1, "steps": it1 - it0,
                "window_s": clock.times[-1] - clock.times[0],
                "window_steps": len(clock.times) - 1}

    def reloaded(self, keras, keras_dst, tf, model_name, variant, folder):
        """This model saved to ``<folder>/<variant>.keras`` (untimed) and loaded again
        (timed: ``build_s``), as a new `FitRun`."""
        path = os.path.join(folder, f"{variant}.keras")
        self.model.save(path)
        return FitRun(keras, keras_dst, tf, model_name, variant, self.total_steps, path)

    def evaluate(self):
        """``model.evaluate`` on one batch (untimed; its first call compiles the test step)."""
        x, y = self.batch
        self.model.evaluate(x, y, batch_size=int(x.shape[0]), verbose=0)


def warm_up(keras, keras_dst, tf):
    """One short fit of a tiny model per variant, untimed: the process's one-time costs
    (XLA / LLVM start-up, lazy imports) fall here, not into the first timed fit."""
    dataset = bench_models.synthetic_dataset(tf, "mlp", 8, seed=FLAGS.seed)
    for v in FIT_VARIANTS:
        model, dst = build_variant(keras, keras_dst, "mlp", v, quick=True)
        model.fit(dataset, epochs=1, steps_per_epoch=2, verbose=0,
                  callbacks=[dst] if dst is not None else [])


def fit_call_records(keras, keras_dst, tf, model_name, log):
    """The first fits of fresh models, the fit loop and the reloads: ``(first, loop,
    reload)``, each ``{variant: [record]}`` (see `FitRun.fit`; a reload's record is its
    ``load_s`` and its two fits' records) or None when disabled.

    Each repeat (--first_fit_repeats), for every variant in turn (the order
    reversed every other repeat): build and compile a fresh model, time its
    first fit. The first K repeats' models (--fit_loop_models) then go on as the
    fit loop: calls 2..N (--fit_loop_calls) of every variant in turn (order
    reversed every other call), each of its K models in turn (order reversed
    every other call), ``evaluate`` on one batch before each; the loop's call 1
    is their first fit. A call's record is the median over the K models
    (`merged_calls`). The first L repeats' models (--reload_repeats) are saved after
    their first fit (before the fit loop's calls), and in turn loaded and fit twice
    (`FitRun.reloaded`). (No ``keras.backend.clear_session()``: it drops the
    kernels of the live models, and their next call would pay to re-create
    them; the previous repeat's models are deleted and collected.)
    """
    repeats, calls, steps = (setting("first_fit_repeats"), setting("fit_loop_calls"),
                             setting("fit_call_steps"))
    clock = batch_clock(keras)
    first, loop = {v: [] for v in FIT_VARIANTS}, None

    def timed(label, run, v):
        rec = dict(run.fit(steps, clock), build_s=run.build_s)
        log(f"  {label}: {v:<14} {rec['seconds']:8.3f} s  {rec['steps']} steps  (window "
            f"{1e3 * rec['window_s'] / max(rec['window_steps'], 1):.2f} ms/step)")
        return rec

    instances = setting("fit_loop_models") if calls else 0
    reloads = setting("reload_repeats")
    reload = {v: [] for v in FIT_VARIANTS} if reloads else None
    kept = []  # the first `instances` repeats' runs, for the fit loop
    for r in range(max(repeats, instances)):
        runs = {}
        for _, v in bench_utils.interleaved(FIT_VARIANTS, r + 1, start=r):
            # (total_steps: the schedule's length, which the loop's calls, or the first
            # fit and the two after a reload, reach)
            runs[v] = FitRun(keras, keras_dst, tf, model_name, v, max(calls, 3) * steps)
            first[v].append(timed(f"first fit {r + 1}", runs[v], v))
        if r < reloads:  # (saved after their first fit, before the fit loop's)
            with tempfile.TemporaryDirectory() as folder:
                for _, v in bench_utils.interleaved(FIT_VARIANTS, r + 1, start=r):
                    run = runs[v].reloaded(keras, keras_dst, tf, model_name, v, folder)
                    log(f"  reload {r + 1}: {v:<14} {run.build_s:8.3f} s (load)")
                    reload[v].append({"load_s": run.build_s,
                                      "fits": [timed(f"reload {r + 1}, fit {i + 1}", run, v)
                                               for i in range(2)]})
                    del run
        if r < instances:
            kept.append(runs)
        if r + 1 == instances:
            calls_of = {v: [[first[v][k]] for k in range(instances)] for v in FIT_VARIANTS}
            for i, v in bench_utils.interleaved(FIT_VARIANTS, calls, start=1):
                for k in (range(instances) if i % 2 == 0 else reversed(range(instances))):
                    kept[k][v].evaluate()
                    calls_of[v][k].append(timed(f"fit call {i + 1} (model {k + 1})",
                                                kept[k][v], v))
            loop = {v: merged_calls(calls_of[v]) for v in FIT_VARIANTS}
            kept = []
        del runs
        gc.collect()  # the repeat's models, before the next repeat's are built
    return (first if repeats else None), loop, reload


def merged_calls(per_model):
    """One record per fit-loop call from the records of every model of a variant
    (``per_model[k][i]``: model k's call i): the medians over the models of
    ``seconds`` and ``window_s`` (the models make the same steps), the rest from the
    first model, and ``seconds_per_model``."""
    merged = []
    for calls in zip(*per_model):
        rec = dict(calls[0])
        rec["seconds"] = bench_utils.median([c["seconds"] for c in calls])
        rec["window_s"] = bench_utils.median([c["window_s"] for c in calls])
        rec["seconds_per_model"] = [c["seconds"] for c in calls]
        merged.append(rec)
    return merged


def update_cost_s(result):
    """U (seconds) of a DST variant's result: method B when measured, else A, else None."""
    ms = result.get("update_ms_in_step_B")
    ms = result.get("update_ms_isolated_A") if ms is None else ms
    return None if ms is None else ms / 1e3


def analyse_first_fits(records):
    """Median first-fit time per variant; per-repeat ratios to the dense first fit of
    the same repeat: median and 95 % interval."""
    every = setting("update_every")
    dense = [r["seconds"] for r in records["dense"]]
    out = {"repeats": len(dense), "steps": records["dense"][0]["steps"], "variants": {}}
    for v, recs in records.items():
        xs = [r["seconds"] for r in recs]
        res = {"seconds": bench_utils.median(xs), "seconds_all": xs,
               "build_s": bench_utils.median([r["build_s"] for r in recs])}
        if v != "dense":
            res["ratio"], res["ratio_ci95"] = bench_utils.ratio_stats(xs, dense)
        if v in DST_VARIANTS:
            res["updates"] = updates_in(recs[0], every)
        out["variants"][v] = res
    return out


def analyse_reloads(records):
    """Per variant: median load time and times of the two fits after the reload; per-repeat
    ratios to dense's (first fit, compilation included; second fit): median and 95 %
    interval."""
    dense = records["dense"]
    out = {"repeats": len(dense), "steps": dense[0]["fits"][0]["steps"], "variants": {}}
    for v, recs in records.items():
        res = {"load_s": bench_utils.median([r["load_s"] for r in recs])}
        for i, key in enumerate(("first_fit", "second_fit")):
            xs = [r["fits"][i]["seconds"] for r in recs]
            res[f"{key}_s"], res[f"{key}_s_all"] = bench_utils.median(xs), xs
            if v != "dense":
                res[f"{key}_ratio"], res[f"{key}_ratio_ci95"] = bench_utils.ratio_stats(
                    xs, [r["fits"][i]["seconds"] for r in dense])
        if v != "dense":
            res["load_ratio"], res["load_ratio_ci95"] = bench_utils.ratio_stats(
                [r["load_s"] for r in recs], [r["load_s"] for r in dense])
        out["variants"][v] = res
    return out


def analyse_fit_loop(records, update_costs):
    """Fit-loop numbers per variant.

    Call 1 (compilation) and call 2 are reported alone: call 2 runs after the
    other variants' first fits, and the first run of a compiled step after
    another model compiled and ran its own is slow (~0.2 s for a DST step of the
    --quick MLP on CPU, a few hundredths for a dense one; hardly any after the
    model's own ``evaluate``), a cost no single-model loop pays. Calls 3..N give per-call ratios to the dense
    call of the same round (median, 95 % interval): whole calls
    (``later_call_ratio``) and step windows (``window_ratio``). With U
    (`update_costs`: {variant: seconds or None}) a DST call holding k update
    steps may exceed the target by k U / t_dense_call
    (``later_call_update_allowance``, median over rounds);
    ``later_call_net_ratio`` = ratio - that, per round (judged against the
    target alone).
    """
    every = setting("update_every")

    def window(recs):
        return [r["window_s"] / r["window_steps"] for r in recs]

    dense = records["dense"]
    d_later = [r["seconds"] for r in dense[2:]]
    d_window = window(dense[2:])
    out = {"calls": len(dense), "steps_per_call": dense[0]["steps"],
           "models": len(dense[0].get("seconds_per_model", [None])),
           "window_steps": dense[0]["window_steps"], "later_calls": len(d_later),
           "variants": {}, "raw_calls": records}
    for v, recs in records.items():
        later = [r["seconds"] for r in recs[2:]]
        win = window(recs[2:])
        res = {"first_call_s": recs[0]["seconds"], "second_call_s": recs[1]["seconds"],
               "later_call_s": bench_utils.median(later),
               "window_step_ms": 1e3 * bench_utils.median(win)}
        if v != "dense":
            res["first_call_ratio"] = recs[0]["seconds"] / dense[0]["seconds"]
            res["second_call_ratio"] = recs[1]["seconds"] / dense[1]["seconds"]
            res["later_call_ratio"], res["later_call_ratio_ci95"] = bench_utils.ratio_stats(
                later, d_later)
            res["window_ratio"], res["window_ratio_ci95"] = bench_utils.ratio_stats(win, d_window)
        if v in DST_VARIANTS:
            k = [updates_in(r, every) for r in recs[2:]]
            res["updates_per_later_call"] = k
            res["updates_in_windows"] = sum((r["it1"] // every) - (r["it0"] + 1) // every
                                            for r in recs[2:])
            cost = update_costs.get(v)
            res["update_ms_used"] = None if cost is None else 1e3 * cost
            if cost is not None:
                allowance = [n * cost / t for n, t in zip(k, d_later)]
                net = [a / t - e for a, t, e in zip(later, d_later, allowance)]
                res["later_call_update_allowance"] = bench_utils.median(allowance)
                res["later_call_net_ratio"] = bench_utils.median(net)
                res["later_call_net_ratio_ci95"] = bench_utils.median_ci(net)
        out["variants"][v] = res
    return out


def fit_calls(keras, tf, keras_dst, model_name, update_costs, log):
    """The first-fit and fit-loop measurements (those enabled): {key: results}."""
    t0 = time.perf_counter()
    first, loop, reload = fit_call_records(keras, keras_dst, tf, model_name, log)
    out = {}
    if first:
        ff = out["first_fit"] = analyse_first_fits(first)
        log(f"[{model_name}] first fit: dense {ff['variants']['dense']['seconds']:.2f} s, " +
            ", ".join(f"{v} {fmt(ff['variants'][v]['ratio'])}x" for v in FIT_VARIANTS[1:]))
    if loop:
        fl = out["fit_loop"] = analyse_fit_loop(loop, update_costs)
        log(f"[{model_name}] fit loop: window " +
            ", ".join(f"{v} {fmt(fl['variants'][v]['window_ratio'])}x" for v in FIT_VARIANTS[1:])
            + "; later call " +
            ", ".join(f"{v} {fmt(fl['variants'][v]['later_call_ratio'])}x"
                      for v in FIT_VARIANTS[1:]))
    if reload:
        rl = out["reload"] = analyse_reloads(reload)
        log(f"[{model_name}] reload: dense load {rl['variants']['dense']['load_s']:.2f} s, "
            f"first fit {rl['variants']['dense']['first_fit_s']:.2f} s; " +
            ", ".join(f"{v} first fit {fmt(rl['variants'][v]['first_fit_ratio'])}x second "
                      f"{fmt(rl['variants'][v]['second_fit_ratio'])}x"
                      for v in FIT_VARIANTS[1:]))
    out["fit_calls_wall_seconds"] = time.perf_counter() - t0
    return out


def run_model(model_name, log, stored=None):
    """All measurements of one model; with `stored` (its earlier entry, under
    --fit_calls_only) only the fit-call ones, merged into it."""
    import keras
    import tensorflow as tf

    import keras_dst

    if stored is None:
        out = step_overhead(keras, tf, keras_dst, model_name, log)
    else:
        out = {k: v for k, v in stored.items()
               if k not in ("first_fit", "fit_loop", "reload")}
        warm_up(keras, keras_dst, tf)  # a fresh process: nothing compiled yet
    costs = {v: update_cost_s(out["variants"].get(v, {})) for v in DST_VARIANTS}
    out.update(fit_calls(keras, tf, keras_dst, model_name, costs, log))
    return out


def stored_entry(out_dir, prefix, model_name):
    """The model's entry in the JSON, for --fit_calls_only; its settings must be ours."""
    doc = bench_utils.read_json(os.path.join(out_dir, f"{prefix}_overhead.json")) or {}
    entry = doc.get("models", {}).get(model_name)
    if entry is None:
        raise app.UsageError(f"--fit_calls_only: no {model_name} entry in "
                             f"{out_dir}/{prefix}_overhead.json; run without it first")
    ours = {"batch_size": setting("batch_size"), "density": FLAGS.density,
            "jit_compile": FLAGS.jit_compile, "update_every": setting("update_every")}
    theirs = {k: entry["config"].get(k, entry.get(k)) for k in ours}
    if ours != theirs:
        raise app.UsageError(f"--fit_calls_only: {model_name} entry has {theirs}, "
                             f"this run {ours}")
    return entry


# -- report ----------------------------------------------------------------------------
METHOD_NOTES = """\
How to read this table (see BUILD.md#benchmarks):

* Step times are wall time per training step (epoch time / steps) through
  `model.fit`, all variants in one process, epochs interleaved round-robin;
  round 0 (compilation) discarded; ratios are medians over rounds of the
  per-round ratio to the dense model's step in the same round; in brackets
  the 95 % confidence interval of that median (order statistics, no
  normality assumed; none below 6 rounds). The JSON also holds the "best"
  ratio: fastest round of the variant / fastest dense round.
* `static kernels = dense`: the XLA-compiled `train_step` of the static model
  has exactly the dense model's kernels (the same number of fusions, dots,
  convolutions, copies in the optimised HLO), its only extra inputs being the
  masks: the mask constraint is fused into the optimizer's update kernels, so
  its cost is reading one byte per weight. This comparison has no noise.
* `static` = `keras_dst.prunable` model without callback (mask constraint only).
* `DST step` = a DST step WITHOUT an update (the plain sparse step: the
  update step is compiled separately, see `keras_dst.step_switch.StepSwitch`);
  `DST amort.` =
  average step over ΔT steps INCLUDING one full mask update:
  `(t_step + U/ΔT) / t_dense`.
* `update (steps)` = U, one full mask update of all layers, in dense steps.
  Method B (in-step) = (step time with ΔT=1 - step time with ΔT) / (1 - u/S);
  method A (isolated) = `TopologyEngine._update` compiled alone
  (`tf.function(jit_compile=True)`), median of repeated calls. The amortised
  column uses B when measured, else A.
* `direct` = mean step time over the timed epochs (holding the listed number
  of real update steps) / dense: a cross-check without any model.
* memory = (masks + ever-active flags [+ running scores] + engine counters) /
  dense model weights; no gradient is stored (the update uses the step's own).
* First fit: wall time of the first `fit` (one epoch of the listed steps) of a
  freshly built and compiled model, tracing and XLA compilation included (a
  DST model compiles one step, its update inside); each repeat builds
  a fresh model of every variant in turn and times it; the ratio is the median
  over repeats of the ratio to the dense first fit of the same repeat [95 %
  interval from 6 repeats on]. `model build` (not in the fit's time): building
  the model, `prunable` for the sparse ones, and `compile`, median over repeats.
* Fit loop: the models of the first repeat go on: `evaluate` on one batch,
  then `fit(epochs=1)` again (the same DST callback, `total_steps` = the loop's
  steps), N calls in all, call i of every variant in turn. Call 1 (their first
  fit) holds the compilation: its time alone, and its ratio; call 2 follows the
  other variants' compilations, which slow the first run of an already
  compiled step (not so in a single model's loop): also alone. Calls 3..N:
  `window` = time from the end of batch 0 to the end of the last batch / its
  steps (each call's first step, with its set-up, left out), `later call` = the
  whole call; per-call ratios to the dense call of the same round, median [95 %
  interval from 8 calls on]. A DST call holding k update steps may exceed the
  dense call by k U: `update +a` is the median of k U / t_dense_call, `net` =
  ratio - that, per call.
* Reload from disk: the first repeats' models, after their first fit, saved to
  `.keras` and loaded again (`keras_dst.load_model`), then fit twice with a new
  callback of an equal configuration: the load, the first fit after it
  (compilation included: a reloaded model compiles its step again, as in a new
  process) and the second (nothing compiled), each as a ratio to dense's in the
  same repeat, median [95 % interval from 6 repeats on].
"""


def pair(d, key):
    """'median [lo, hi]' of a ratio stored as `key` and `key_ci95` in `d`."""
    return bench_utils.with_ci(d.get(key), d.get(f"{key}_ci95"))


def write_report(out_dir, prefix, results, machine, config):
    path_json = os.path.join(out_dir, f"{prefix}_overhead.json")
    old = bench_utils.read_json(path_json) or {}
    models = dict(old.get("models", {}))
    for r in results:
        r["machine"] = machine
        r["config"] = config
        models[r["model"]] = r
    order = [m for m in bench_models.MODEL_NAMES if m in models] + \
        [m for m in models if m not in bench_models.MODEL_NAMES]
    models = {m: models[m] for m in order}
    doc = {"benchmark": "keras_dst training-step overhead", "models": models}
    bench_utils.write_json(path_json, doc)

    rows, trows, mrows, frows, lrows, rrows = [], [], [], [], [], []
    for m, r in models.items():
        v = r["variants"]
        mag, snip = v.get("dst_magnitude", {}), v.get("dst_snip", {})
        rows.append([
            m, r["batch_size"], r["steps_per_epoch"], r["rounds_timed"],
            fmt(r["dense_step_ms"], ".1f"), pair(v["static"], "ratio"), bench_utils.same_kernels(r),
            pair(mag, "step_ratio"), pair(mag, "amortised_ratio"),
            fmt(mag.get("update_in_dense_steps"), ".2f"),
            fmt(mag.get("update_in_dense_steps_A"), ".2f"),
            f"{fmt(mag.get('direct_ratio'))} ({mag.get('updates_in_timed_epochs', 0)} upd.)",
            pair(snip, "step_ratio"), pair(snip, "amortised_ratio"),
            fmt(snip.get("update_in_dense_steps"), ".2f"),
            fmt(snip.get("update_in_dense_steps_A"), ".2f"),
        ])
        ff, fl = r.get("first_fit"), r.get("fit_loop")
        if ff:
            fv = ff["variants"]
            frows.append([m, ff["repeats"], ff["steps"], fmt(fv["dense"]["seconds"], ".2f")] +
                         [f"{pair(fv[k], 'ratio')} ({fmt(fv[k]['seconds'], '.2f')} s)"
                          for k in FIT_VARIANTS[1:]] +
                         [f"{fmt(fv['dense'].get('build_s'), '.2f')} / "
                          f"{fmt(fv['static'].get('build_s'), '.2f')}"])
        if fl:
            lv = fl["variants"]
            d = lv["dense"]
            lrows.append([m, f"{fl['calls']} × {fl['steps_per_call']}"
                          + (f", {fl['models']} models" if fl.get("models", 1) > 1 else ""),
                          f"{fmt(d['first_call_s'], '.2f')} / {fmt(d['second_call_s'], '.2f')}",
                          fmt(d["later_call_s"], ".3f"), fmt(d["window_step_ms"], ".2f")] +
                         [pair(lv[k], "window_ratio") for k in FIT_VARIANTS[1:]] +
                         [f"{fmt(lv[k]['first_call_ratio'])} / {fmt(lv[k]['second_call_ratio'])}"
                          for k in DST_VARIANTS] +
                         [f"{bench_utils.later_call(lv[k])} "
                          f"({sum(lv[k]['updates_per_later_call'])} upd.)" for k in DST_VARIANTS])
        rl = r.get("reload")
        if rl:
            rv = rl["variants"]
            rrows.append([m, rl["repeats"], rl["steps"],
                          f"{fmt(rv['dense']['load_s'], '.2f')} / "
                          f"{fmt(rv['dense']['first_fit_s'], '.2f')} / "
                          f"{fmt(rv['dense']['second_fit_s'], '.2f')}"] +
                         [f"{pair(rv[k], 'load_ratio')} / {pair(rv[k], 'first_fit_ratio')} / "
                          f"{pair(rv[k], 'second_fit_ratio')}" for k in FIT_VARIANTS[1:]])
        mem = r["memory"]
        mrows.append([m, f"{r['params_dense']:,}", f"{mem['dense_weight_bytes'] / 2**20:.2f}",
                      f"{mem['mask_bytes'] / 2**20:.2f}", f"{mem['ever_active_bytes'] / 2**20:.2f}",
                      f"{mem['engine_state_bytes']}", "0",
                      f"{100 * mem['extra_over_dense_weights']:.1f} %"])
        if r.get("tfmot"):
            tm = r["tfmot"]
            trows.append([m, fmt(mag.get("step_ms"), ".1f"), fmt(tm["step_ms"], ".1f"),
                          fmt(tm.get("tf_keras_dense_step_ms"), ".1f"),
                          fmt(tm.get("ratio_to_tf_keras_dense")),
                          pair(tm, "dst_magnitude_epoch_over_tfmot"),
                          f"{mag.get('updates_in_timed_epochs')} / "
                          f"~{tm['updates_in_timed_epochs_approx']}"])
    any_r = next(iter(models.values()))
    mach = any_r["machine"]
    lines = [
        f"# keras_dst training-step overhead ({prefix.upper()})", "",
        f"Device: {mach.get('device')}; TensorFlow {mach.get('tensorflow')}, Keras "
        f"{mach.get('keras')}, keras_dst {any_r['config'].get('keras_dst')}. "
        f"jit_compile={any_r['jit_compile']}, SGD(momentum 0.9), density "
        f"{any_r['density']} (ERK), ΔT={any_r['config'].get('update_every')}, synthetic data.",
        "Per-model date / load average / sizes: see the JSON file "
        f"(`{prefix}_overhead.json`).", "",
        "## Step time, ratios to dense", "",
        bench_utils.markdown_table(
            ["model", "batch", "steps/ep", "rounds", "dense ms/step", "static ×",
             "static kernels = dense", "DST-mag step ×",
             "DST-mag amort. ×", "mag update (steps, used)", "mag update (steps, A)",
             "DST-mag direct ×", "DST-snip step ×", "DST-snip amort. ×",
             "snip update (steps, used)", "snip update (steps, A)"], rows),
        "", "## Memory", "",
        bench_utils.markdown_table(
            ["model", "params", "dense weights MiB", "masks MiB", "ever-active MiB",
             "engine bytes", "stored grads", "extra / dense weights"], mrows),
    ]
    if frows:
        lines += ["", "## First fit of a fresh model (tracing and compilation included)", "",
                  bench_utils.markdown_table(
                      ["model", "fresh models", "steps", "dense s", "static × (s)",
                       "DST-mag × (s)", "DST-snip × (s)",
                       "model build s, dense / sparse"], frows)]
    if lrows:
        lines += ["", "## Fit loop: repeated fit(epochs=1) calls, evaluate between them", "",
                  bench_utils.markdown_table(
                      ["model", "calls × steps", "dense call 1 / 2 s", "dense later call s",
                       "dense window ms/step", "static window ×", "DST-mag window ×",
                       "DST-snip window ×", "DST-mag call 1 / 2 ×", "DST-snip call 1 / 2 ×",
                       "DST-mag later call ×", "DST-snip later call ×"], lrows)]
    if rrows:
        lines += ["", "## Reload from disk: load, then fit twice (a new callback of equal "
                  "configuration)", "",
                  bench_utils.markdown_table(
                      ["model", "repeats", "steps", "dense load / fit 1 / fit 2 s",
                       "static × (load / fit 1 / fit 2)", "DST-mag × (load / fit 1 / fit 2)",
                       "DST-snip × (load / fit 1 / fit 2)"], rrows)]
    if trows:
        lines += ["", "## Against TFMOT (prune_low_magnitude, ConstantSparsity, frequency ΔT)", "",
                  bench_utils.markdown_table(
                      ["model", "DST-mag ms/step (no upd.)", "TFMOT ms/step", "tf_keras dense ms/step",
                       "TFMOT / tf_keras dense", "DST-mag epoch / TFMOT epoch",
                       "updates timed (DST / TFMOT)"], trows)]
    lines += ["", "## Per-model runs", ""]
    for m, r in models.items():
        mc = r["machine"]
        lines.append(f"* {m}: {mc.get('date_utc')}, load avg {mc.get('load_average_1_5_15min')} "
                     f"(start) / {r.get('load_average_end')} (end), "
                     f"wall {r.get('wall_seconds', 0):.0f} s, update cost methods: "
                     f"{r['variants'].get('dst_magnitude', {}).get('update_method')}")
        fc = r.get("fit_calls_run")
        if fc:
            lines.append(f"  first fit / fit loop (--fit_calls_only): {fc['machine']['date_utc']}, "
                         f"load avg {fc['machine']['load_average_1_5_15min']} (start) / "
                         f"{fc['load_average_end']} (end)")
    lines += ["", METHOD_NOTES]
    with open(os.path.join(out_dir, f"{prefix}_overhead.md"), "w") as f:
        f.write("\n".join(lines))
    return path_json


def main(argv):
    del argv
    import keras
    import tensorflow as tf

    import keras_dst

    prefix = FLAGS.prefix or bench_utils.device_prefix(tf)
    if FLAGS.quick and not FLAGS.prefix:
        prefix = "quick"
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    log = lambda s: print(s, flush=True)  # noqa: E731
    calls, repeats = setting("fit_loop_calls"), setting("first_fit_repeats")
    if calls in (1, 2) or min(calls, repeats) < 0:
        raise app.UsageError("--fit_loop_calls must be 0 or >= 3, --first_fit_repeats >= 0")
    if setting("fit_loop_models") < 1:
        raise app.UsageError("--fit_loop_models must be >= 1")
    if not 0 <= setting("reload_repeats") <= repeats:
        raise app.UsageError("--reload_repeats must be in [0, --first_fit_repeats] (it reloads "
                             "the first-fit repeats' models)")
    if (calls or repeats) and setting("fit_call_steps") < 2:
        raise app.UsageError("--fit_call_steps must be >= 2 (the step window leaves out step 1)")
    config = {name: setting(name) for name in
              ("epochs", "steps_per_epoch", "batch_size", "update_every", "every1_steps",
               "isolated_repeats", "first_fit_repeats", "fit_loop_calls", "fit_loop_models",
               "reload_repeats")}
    config.update(fit_call_steps=setting("fit_call_steps"), fit_calls_only=FLAGS.fit_calls_only,
                  density=FLAGS.density, pattern=FLAGS.pattern, update_cost=FLAGS.update_cost,
                  quick=FLAGS.quick,
                  jit_compile=FLAGS.jit_compile, learning_rate=FLAGS.learning_rate,
                  metrics=list(FLAGS.metrics), keras_dst=keras_dst.__version__, command=" ".join(sys.argv))
    for model_name in FLAGS.models:
        if model_name not in bench_models.MODEL_NAMES:
            raise app.UsageError(f"unknown model {model_name!r}")
        machine = bench_utils.machine_info(tf, keras)
        if FLAGS.fit_calls_only:  # merged into the earlier run's entry, which keeps that
            # run's machine and config; this run's go under "fit_calls_run"
            r = run_model(model_name, log, stored_entry(FLAGS.out_dir, prefix, model_name))
            r["fit_calls_run"] = {"machine": machine, "config": config,
                                  "load_average_end": bench_utils.load_average()}
            path = write_report(FLAGS.out_dir, prefix, [r], r["machine"], r["config"])
        else:
            r = run_model(model_name, log)
            r["load_average_end"] = bench_utils.load_average()
            path = write_report(FLAGS.out_dir, prefix, [r], machine, config)
        v = r["variants"]
        log(f"[{model_name}] static {fmt(v['static']['ratio'])}x, DST-mag step "
            f"{fmt(v['dst_magnitude'].get('step_ratio'))}x amortised "
            f"{fmt(v['dst_magnitude'].get('amortised_ratio'))}x, update "
            f"{fmt(v['dst_magnitude'].get('update_in_dense_steps'), '.2f')} steps -> {path}")
    print(open(os.path.join(FLAGS.out_dir, f"{prefix}_overhead.md")).read())


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
