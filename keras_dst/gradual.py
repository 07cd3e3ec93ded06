"""Gradual magnitude pruning, dense to sparse (Zhu & Gupta, 2017): `GradualPruning`.

The semantics are those of TF-MOT's ``prune_low_magnitude`` with a
``PolynomialDecay`` schedule and the ``UpdatePruningStep`` callback, so that a
run can be compared with TF-MOT step by step:

* **Step.** TF-MOT increments a ``pruning_step`` at the start of every training
  batch, so batch ``t`` (1-based) runs with ``pruning_step == t`` and updates its
  masks *before* its forward pass, from the weights left by the previous
  ``t - 1`` optimizer steps. Here ``t = optimizer.iterations + 1`` is the index of
  the step about to run: the update for step ``t`` runs at the end of optimizer
  step ``t - 1`` (inside the compiled step, after the update and the mask
  constraints) and, for the first step of a `fit`, in ``on_train_begin``.
* **When.** Steps with ``begin_step <= t <= end_step`` and
  ``(t - begin_step) % frequency == 0`` (`schedules.should_update`). Since
  ``t >= 1``, ``begin_step=0`` prunes first at ``t = frequency``.
* **How much.** Sparsity ``s(t)`` = `schedules.polynomial_sparsity` (float32,
  the same operations as TF-MOT). Each sparsified weight of ``n`` entries keeps
  ``k = max(round(n * (1 - s(t))), 1)`` entries, computed in float32 with
  round-half-to-even (``tf.round``), as TF-MOT's ``_update_mask``.
* **Which.** The ``k`` largest ``|w|``; among equal magnitudes the lower flat
  (row-major) index is kept first, the order of TF-MOT's ``tf.math.top_k``.

Deliberate differences from TF-MOT (none shows in ordinary runs):

* exactly ``k`` entries are kept: TF-MOT keeps every entry with ``|w| >=`` the
  k-th largest magnitude, i.e. more than ``k`` on ties at the threshold;
* no regrowth: only active entries compete. TF-MOT ranks all entries, and its
  pruned weights hold one optimizer step of drift (``-lr * g``) when the mask is
  recomputed (it zeroes them before each forward pass, keras_dst right after each
  optimizer step), so in TF-MOT a pruned weight could in principle come back;
* ``end_step`` must be ``> begin_step`` (TF-MOT divides by zero when equal).
"""

import numbers
import warnings

import keras
import numpy as np
import tensorflow as tf

from keras_dst import optimizer_hook
from keras_dst import schedules
from keras_dst import topology
from keras_dst.callbacks import HookedCallback
from keras_dst.engine import count_true, state_variable
from keras_dst.masks import sparse_targets
from keras_dst.validation import check_density, check_positive_int


def keep_count(size, sparsity) -> tf.Tensor:
    """TF-MOT's number of entries kept: ``max(round(size * (1 - sparsity)), 1)``.

    Computed in float32 with round-half-to-even, exactly as TF-MOT.

    Args:
      size: int, number of entries ``n`` of the weight.
      sparsity: scalar float tensor or float, the target sparsity ``s``.

    Returns:
      Scalar int32 tensor ``k`` in ``[1, n]`` (for ``s`` in [0, 1)).
    """
    kept = tf.cast(size, tf.float32) * (1.0 - tf.cast(sparsity, tf.float32))
    return tf.cast(tf.maximum(tf.round(kept), 1.0), tf.int32)


class GradualEngine:
    """Graph-side state and logic of one `GradualPruning` run (an optimizer hook).

    Args:
      targets: list of `SparseTarget` of the model.
      initial_sparsity, final_sparsity: the ramp ends, in [0, 1).
      begin_step, end_step, frequency, power: see `GradualPruning` (end_step
        resolved to an int > begin_step).
    """

    def __init__(self, targets, *, initial_sparsity, final_sparsity, begin_step, end_step,
                 frequency, power):
        self.targets = list(targets)
        self.initial_sparsity = float(initial_sparsity)
        self.final_sparsity = float(final_sparsity)
        self.begin_step = int(begin_step)
        self.end_step = int(end_step)
        self.frequency = int(frequency)
        self.power = power
        self.sizes = [int(np.prod(t.weight.shape)) for t in self.targets]
        # Observability only: active entries per target and the target sparsity
        # of the last update, and its step (-1: none yet).
        self.layer_active = state_variable(tf.zeros([len(self.targets)], tf.int64), "gmp_layer_active")
        self.last_sparsity = state_variable(tf.constant(self.initial_sparsity, tf.float32),
                                       "gmp_last_sparsity")
        self.last_update_step = state_variable(tf.constant(-1, tf.int64), "gmp_last_update_step")

    def sparsity(self, step) -> tf.Tensor:
        """float32 scalar: the target sparsity ``s(step)``."""
        return schedules.polynomial_sparsity(step, self.initial_sparsity, self.final_sparsity,
                                             self.begin_step, self.end_step, self.power,
                                             self.frequency)

    def is_update_step(self, step) -> tf.Tensor:
        """bool scalar: do the masks of (1-based) step `step` get pruned?"""
        return schedules.should_update(step, self.begin_step, self.end_step, self.frequency)

    # -- hook interface ---------------------------------------------------------
    def before_apply(self, optimizer, grads_by_var):
        del optimizer, grads_by_var  # magnitude pruning needs no gradient

    def after_apply(self, optimizer, grads_by_var):
        del grads_by_var
        self.maybe_update(tf.cast(optimizer.iterations, tf.int64) + 1)

    # -- the update ---------------------------------------------------------------
    def maybe_update(self, step):
        """Prunes to ``s(step)`` if `step` (int64 scalar, 1-based) is an update step."""
        step = tf.cast(step, tf.int64)
        tf.cond(self.is_update_step(step), lambda: self._update(step), tf.no_op)

    def _update(self, step):
        sparsity = self.sparsity(step)
        active = []
        for t, size in zip(self.targets, self.sizes):
            magnitude = tf.abs(tf.cast(t.weight, tf.float32))
            mask = topology.select_highest(magnitude, tf.convert_to_tensor(t.mask),
                                           keep_count(size, sparsity))
            t.weight.assign(tf.where(mask, t.weight, tf.zeros_like(t.weight)))
            t.mask.assign(mask)
            active.append(tf.cast(count_true(mask), tf.int64))
        self.layer_active.assign(tf.stack(active))
        self.last_sparsity.assign(sparsity)
        self.last_update_step.assign(step)
        return tf.no_op()


def _check_step(value, name, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {name}={value!r}.")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {name}={value!r}.")
    return int(value)


@keras.saving.register_keras_serializable(package="keras_dst")
class GradualPruning(HookedCallback):
    """Gradual magnitude pruning from dense to `final_density` (Zhu & Gupta, 2017).

    Use with a dense-masked model, compiled with any optimizer::

        model = keras_dst.prunable(model, density=1.0, distribution="uniform")
        model.compile("sgd", "sparse_categorical_crossentropy", jit_compile=True)
        model.fit(x, y, epochs=10, callbacks=[keras_dst.GradualPruning(0.1)])

    Every sparsified weight is pruned, by magnitude and without regrowth, to the
    density ``1 - s(t)`` of the polynomial ramp
    ``s(t) = s_f + (s_i - s_f) * (1 - (t - begin_step) / (end_step - begin_step)) ** power``
    (``s_i = 1 - initial_density``, ``s_f = 1 - final_density``) at the steps
    ``t = begin_step + j * frequency <= end_step`` (``t >= 1``, the 1-based index
    of the optimizer step whose forward pass first uses the pruned masks). Each
    weight of ``n`` entries keeps ``max(round(n * (1 - s(t))), 1)`` entries:
    TF-MOT's ``prune_low_magnitude`` + ``PolynomialDecay`` semantics (see the
    module docstring for the exact correspondence and the deviations). The
    update runs inside the compiled step (a `tf.cond`, no host round-trip).

    Args:
      final_density: density every sparsified weight ends at, in (0, 1].
      begin_step: first step of the ramp (int >= 0).
      end_step: last step of the ramp (int > begin_step). None: the last update
        step (``begin_step + j * frequency``) not after 75% of `fit`'s total steps
        (``epochs * steps_per_epoch``), so that the final density is reached. An
        explicit `end_step` that is not ``begin_step`` plus a multiple of
        `frequency` is never an update step, and the final density is then never
        reached (as in TF-MOT): a warning says so.
      frequency: steps between updates (int >= 1).
      power: exponent of the ramp (a real > 0; 3 in the paper).
      initial_density: density at `begin_step`, in [final_density, 1].

    Logs (every batch and epoch; place it before CSVLogger / TensorBoard):
    ``density`` (active fraction over all sparsified weights) and
    ``target_density`` (``1 - s(t)`` of the last update; `initial_density`
    before the first).
    """

    def __init__(self, final_density, begin_step=0, end_step=None, frequency=100, power=3,
                 initial_density=1.0):
        super().__init__()
        self.final_density = check_density(final_density, "final_density")
        self.initial_density = check_density(initial_density, "initial_density")
        if self.final_density > self.initial_density:
            raise ValueError(
                f"final_density must be <= initial_density (pruning never regrows), got "
                f"final_density={final_density!r}, initial_density={initial_density!r}.")
        self.begin_step = _check_step(begin_step, "begin_step", 0)
        self.end_step = None if end_step is None else _check_step(
            end_step, "end_step", self.begin_step + 1)
        self.frequency = check_positive_int(frequency, "frequency")
        if isinstance(power, bool) or not isinstance(power, numbers.Real):
            raise TypeError(f"power must be a real number > 0, got power={power!r}.")
        if not (np.isfinite(power) and power > 0):
            raise ValueError(f"power must be a finite real > 0, got power={power!r}.")
        self.power = power
        if self.end_step is not None and (self.end_step - self.begin_step) % self.frequency:
            warnings.warn(
                f"GradualPruning: end_step={self.end_step} is not begin_step={self.begin_step} "
                f"plus a multiple of frequency={self.frequency}, so no update happens at "
                f"end_step and final_density={self.final_density} is never reached (as in "
                "TF-MOT).", stacklevel=2)

    def resolved_end_step(self) -> int:
        """The ramp's end step for the current `fit` (resolves ``end_step=None``)."""
        if self.end_step is not None:
            return self.end_step
        epochs, steps = self.params.get("epochs"), self.params.get("steps")
        if not epochs or not steps:
            raise ValueError(
                "GradualPruning: end_step=None means 75% of fit's steps, but the number of "
                "steps per epoch is unknown (a dataset without a length?); pass end_step= "
                "to the callback or steps_per_epoch= to fit().")
        total = int(epochs) * int(steps)
        updates = (3 * total // 4 - self.begin_step) // self.frequency
        if updates < 1:
            raise ValueError(
                f"GradualPruning: 75% of fit's {total} steps leaves no update step after "
                f"begin_step={self.begin_step} with frequency={self.frequency}; pass "
                "end_step=, or a smaller begin_step or frequency.")
        return self.begin_step + updates * self.frequency

    def _engine_key(self):
        return tuple(sorted(self.get_config().items())) + (self.resolved_end_step(),)

    def _make_engine(self):
        targets = sparse_targets(self.model, require=True, caller="GradualPruning")
        return GradualEngine(targets, initial_sparsity=1.0 - self.initial_density,
                             final_sparsity=1.0 - self.final_density,
                             begin_step=self.begin_step, end_step=self.resolved_end_step(),
                             frequency=self.frequency, power=self.power)

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        # The first step of this fit has no previous step to prune at its end.
        step = int(optimizer_hook.base_optimizer(self.model.optimizer).iterations.numpy()) + 1
        with self.model.distribute_strategy.scope():
            self.engine.maybe_update(step)

    def _read_logs(self):
        engine = self.engine
        if engine.last_update_step.numpy() < 0:  # no update yet: report the masks
            active = np.array([np.count_nonzero(t.mask.numpy()) for t in engine.targets])
        else:
            active = engine.layer_active.numpy()
        return {"density": float(active.sum() / max(sum(engine.sizes), 1)),
                "target_density": float(1.0 - engine.last_sparsity.numpy())}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def _update_grid(self):
        # The engine prunes in after_apply of the step that ends with `iterations` = t,
        # as schedule step t + 1 (see GradualEngine.after_apply).
        return self.frequency, self.begin_step - 1

    def get_config(self):
        return dict(final_density=self.final_density, begin_step=self.begin_step,
                    end_step=self.end_step, frequency=self.frequency, power=self.power,
                    initial_density=self.initial_density)
