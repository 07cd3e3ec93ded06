r"""Soak test: a long DST run that checks every sparse invariant at every update.

Trains a small MLP on scikit-learn's bundled digits (offline) with
`keras_dst.DynamicSparseTraining` for --steps optimizer steps, one topology update
every --update_every steps, and after every update checks (`InvariantChecker`):

* every mask is a bool array of its weight's shape;
* the active count of every sparsified weight equals its initial count, exactly;
* every inactive weight is exactly 0, and every weight is finite (no NaN/Inf);
* ``ever_active`` contains the mask, and the ITOP rate never decreases;
* the engine updated at exactly the expected steps (no update lost or doubled),
  and every layer regrew exactly what it pruned.

The first violation stops the run with a `SoakInvariantError` (exit status 1)
naming the step, the weight and the invariant. Not part of CI (10^5 steps take a
while on a CPU); ``tests/test_soak.py`` runs the same code for 200 steps::

    python examples/soak.py                                  # 10^5 steps, ΔT = 10
    python examples/soak.py --steps 20000 --prune snip --grow gradient --density 0.05

Cheap checks: the model is compiled with ``steps_per_execution = update_every``,
so the host sees the model once per update (right after it), and each check reads
the masks and weights of the three sparse kernels once (``ever_active`` twice).
The per-weight checks are `keras_dst.testing.assert_sparse_invariants`; the ITOP
rate, update steps and engine statistics are checked here.
"""

import math
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python examples/soak.py` as well as `import examples.soak`
    sys.path.insert(0, str(ROOT))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

import keras_dst  # noqa: E402
from examples import cli  # noqa: E402
from keras_dst.testing import assert_sparse_invariants  # noqa: E402

FLAGS = flags.FLAGS


def define_flags(flag_values=FLAGS):
    flags.DEFINE_integer("steps", 100_000, "Optimizer steps.", lower_bound=1,
                         flag_values=flag_values)
    flags.DEFINE_integer("update_every", 10, "ΔT: optimizer steps between topology updates.",
                         lower_bound=1, flag_values=flag_values)
    flags.DEFINE_integer("seed", 0, "Seed of the model, masks, data order and DST.",
                         flag_values=flag_values)
    flags.DEFINE_string("prune", "magnitude", "Pruning criterion (keras_dst.criterion_names()).",
                        flag_values=flag_values)
    flags.DEFINE_string("grow", "gradient", "Growth rule (keras_dst.growth_names()).",
                        flag_values=flag_values)
    flags.DEFINE_float("density", 0.1, "Global density in (0, 1] (ERK over the layers).",
                       flag_values=flag_values)
    flags.DEFINE_integer("batch_size", 32, "Batch size.", lower_bound=1, flag_values=flag_values)
    flags.DEFINE_integer("report_every", 1000, "Print a progress line every this many updates "
                         "(0: never).", lower_bound=0, flag_values=flag_values)
    flags.register_multi_flags_validator(
        ["steps", "update_every"], lambda v: _check_steps(v["steps"], v["update_every"]),
        flag_values=flag_values)


def _check_steps(steps, update_every):
    """True, or raises flags.ValidationError: the run must reach at least one update."""
    message = steps_error(steps, update_every)
    if message:
        raise flags.ValidationError(message)
    return True


def steps_error(steps, update_every):
    """Why `steps` and `update_every` check nothing, or None. The updates run at steps
    update_every, 2 * update_every, ... (`DynamicSparseTraining`'s default begin_step 0),
    so a run shorter than one period has none, and would "pass" without a check."""
    if steps < update_every:
        return (f"--steps={steps} is below --update_every={update_every}: no DST update would "
                "run, so no invariant would be checked")
    return None


class SoakInvariantError(AssertionError):
    """A sparse invariant does not hold (the message names step, weight and invariant)."""


def digits(seed=0):
    """Standardised digits as float32 (n, 64): ((x_train, y_train), (x_test, y_test))."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = x.astype("float32")
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=360, random_state=0,
                                                        stratify=y)
    mean, std = x_train.mean(), x_train.std()
    return ((x_train - mean) / std, y_train.astype("int64")), \
        ((x_test - mean) / std, y_test.astype("int64"))


def build_model(seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((64,))
    h = keras.layers.Dense(128, activation="relu", name="fc1")(inp)
    h = keras.layers.Dense(64, activation="relu", name="fc2")(h)
    return keras.Model(inp, keras.layers.Dense(10, name="head")(h))


def check_invariants(targets, expected, totals, previous_itop, step):
    """Checks the state of every sparse target; returns the ITOP count (sum of ever_active).

    The per-weight invariants (bool masks of the weight's shape, inactive entries
    exactly 0, finite weights, exact active counts, ``ever_active`` containing the
    mask) are `keras_dst.testing.assert_sparse_invariants`; the ITOP count may not
    decrease.

    Args:
      targets: `keras_dst.sparse_targets(model)`.
      expected: active count of each target (same order).
      totals: number of entries of each target.
      previous_itop: the ITOP count at the previous check (it may not decrease).
      step: optimizer step (for the messages).

    Raises:
      SoakInvariantError: on the first violation.
    """
    try:  # the per-weight invariants: keras_dst.testing's shared check
        assert_sparse_invariants(targets, {t.weight.path: c for t, c in zip(targets, expected)},
                                 finite=True, ever_active=True)
    except AssertionError as e:
        raise SoakInvariantError(f"step {step}: {e}") from e
    itop = sum(int(np.count_nonzero(t.ever_active.numpy())) for t in targets)
    if itop < previous_itop:
        raise SoakInvariantError(f"step {step}: ITOP count fell from {previous_itop} to {itop} "
                                 f"(rate {itop / sum(totals):.6f})")
    return itop


class InvariantChecker(keras.callbacks.Callback):
    """Runs `check_invariants` after every DST update (place it after the DST callback).

    Also checks that the engine's last update is the latest multiple of
    `update_every` (no update lost or repeated) and that every layer regrew
    exactly what it pruned.
    """

    def __init__(self, dst, update_every, report_every=0, print_fn=print):
        super().__init__()
        self.dst, self.update_every = dst, update_every
        self.report_every, self.print_fn = report_every, print_fn
        self.updates_checked = 0
        self.checks = 0

    def on_train_begin(self, logs=None):
        self.targets = keras_dst.sparse_targets(self.model)
        self.expected = [int(np.count_nonzero(t.mask.numpy())) for t in self.targets]
        self.totals = [int(np.prod(t.weight.shape)) for t in self.targets]
        self.itop = check_invariants(self.targets, self.expected, self.totals, 0, 0)
        self.last_update = -1
        self.start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        last = int(self.dst.engine.last_update_step.numpy())
        due = (step // self.update_every) * self.update_every
        if last != (due if due > 0 else -1):
            raise SoakInvariantError(f"step {step}: the engine's last update is at step {last}, "
                                     f"expected {due}")
        self.itop = check_invariants(self.targets, self.expected, self.totals, self.itop, step)
        self.checks += 1
        if last == self.last_update:
            return
        if self.last_update >= 0 and last != self.last_update + self.update_every:
            raise SoakInvariantError(
                f"step {step}: update at step {last} follows the one at {self.last_update}, "
                f"not {self.last_update + self.update_every}")
        stats = self.dst.engine.layer_stats.numpy()
        for t, (active, pruned, grown), count in zip(self.targets, stats, self.expected):
            if active != count or pruned != grown:
                raise SoakInvariantError(
                    f"step {step}: engine stats of {t.weight.path} are active={active} "
                    f"pruned={pruned} grown={grown}; expected active={count} and "
                    "pruned == grown")
        self.last_update = last
        self.updates_checked += 1
        if self.report_every and self.updates_checked % self.report_every == 0:
            self.print_fn(f"  step {step:>8}  updates checked {self.updates_checked:>7}  "
                          f"loss {logs.get('loss', float('nan')):.4f}  "
                          f"itop {self.itop / sum(self.totals):.4f}  "
                          f"{time.perf_counter() - self.start:8.1f} s", flush=True)


def run(steps=100_000, update_every=10, seed=0, prune="magnitude", grow="gradient",
        density=0.1, batch_size=32, report_every=0, print_fn=print):
    """Runs the soak; returns a summary dict. Raises `SoakInvariantError` on a violation,
    ValueError when the run would reach no update (`steps_error`)."""
    message = steps_error(steps, update_every)
    if message:
        raise ValueError(message)
    start = time.perf_counter()
    (x, y), (x_test, y_test) = digits()
    model = keras_dst.prunable(build_model(seed), density=density, seed=seed,  # (running_*
                               track_running_scores=keras_dst.get_criterion(prune).ema)  # keep them)
    # The host sees the model right after every update (and only then).
    per_epoch = math.gcd(steps, 1000 * update_every)
    model.compile(keras.optimizers.SGD(0.02, momentum=0.9, nesterov=True),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"], jit_compile=True,
                  steps_per_execution=math.gcd(update_every, per_epoch))
    dataset = (tf.data.Dataset.from_tensor_slices((x, y))
               .shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
               .repeat().batch(batch_size, drop_remainder=True).prefetch(4))
    dst = keras_dst.DynamicSparseTraining(prune=prune, grow=grow, update_every=update_every,
                                          seed=seed, total_steps=steps)
    checker = InvariantChecker(dst, update_every, report_every=report_every, print_fn=print_fn)
    model.fit(dataset, epochs=steps // per_epoch, steps_per_epoch=per_epoch, shuffle=False,
              verbose=0, callbacks=[dst, checker])
    final_step = int(model.optimizer.iterations.numpy())
    if final_step != steps:
        raise SoakInvariantError(f"ran {final_step} optimizer steps, expected {steps}")
    if checker.updates_checked != steps // update_every:
        raise SoakInvariantError(f"checked {checker.updates_checked} updates, expected "
                                 f"{steps // update_every}")
    _, accuracy = model.evaluate(x_test, y_test, batch_size=360, verbose=0)
    return dict(steps=final_step, updates_checked=checker.updates_checked,
                checks=checker.checks, wall_time_s=time.perf_counter() - start,
                final_test_accuracy=float(accuracy), density=keras_dst.density(model),
                itop=checker.itop / sum(checker.totals), prune=prune, grow=grow,
                update_every=update_every, seed=seed)


def main(argv):
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}")
    print(f"soak: {FLAGS.steps} steps, update_every={FLAGS.update_every}, prune={FLAGS.prune}, "
          f"grow={FLAGS.grow}, density={FLAGS.density}, seed={FLAGS.seed}", flush=True)
    try:
        summary = run(FLAGS.steps, FLAGS.update_every, FLAGS.seed, FLAGS.prune, FLAGS.grow,
                      FLAGS.density, FLAGS.batch_size, FLAGS.report_every)
    except SoakInvariantError as e:
        print(f"SOAK FAILED: {e}", flush=True)
        sys.exit(1)
    except (ValueError, TypeError) as e:
        sys.exit(f"error: {e}")
    print("SOAK PASSED: every invariant held at every update", flush=True)
    for key, value in summary.items():
        print(f"  {key:<20} {value:.4f}" if isinstance(value, float) else f"  {key:<20} {value}")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
