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
  constraints) and, for the first step of a `fit`, before its first batch
  (``on_train_batch_begin``).
* **When.** Steps with ``begin_step <= t <= end_step`` and
  ``(t - begin_step) % update_every == 0`` (`schedules.UpdateSteps`, TF-MOT's
  ``frequency``). Since ``t >= 1``, ``begin_step=0`` prunes first at
  ``t = update_every``.
* **How much.** Density ``d(t) = 1 - s(t)`` = `schedules.polynomial_density`
  (float32, the same operations on the sparsity ``s(t)`` as TF-MOT). Each
  sparsified weight of ``n`` entries keeps ``k = max(round(n * d(t)), 1)``
  entries, computed in float32 with round-half-to-even (``tf.round``), as
  TF-MOT's ``_update_mask``.
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

from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from keras_dst import schedules, topology, user_warnings, validation
from keras_dst.hooks import Hook
from keras_dst.masks import sparse_targets, without_kept_dense
from keras_dst.scoring import absolute
from keras_dst.step_switch import HookedCallback


def keep_count(size, density) -> tf.Tensor:
    """TF-MOT's number of entries kept: ``max(round(size * density), 1)``.

    Computed in float32 with round-half-to-even, exactly as TF-MOT (whose
    ``1 - sparsity`` is `density` here).

    Args:
      size: int, number of entries ``n`` of the weight.
      density: scalar float tensor or float, the target density ``d``.

    Returns:
      Scalar int32 tensor ``k`` in ``[1, n]`` (for ``d`` in (0, 1]).
    """
    kept = tf.cast(size, tf.float32) * tf.cast(density, tf.float32)
    return tf.cast(tf.maximum(tf.round(kept), 1.0), tf.int32)


class GradualEngine(Hook):
    """Graph-side state and logic of one `GradualPruning` run (a `hooks.Hook`).

    It prunes, at the end of optimizer step ``t - 1``, the masks that step ``t``
    of its `UpdateSteps` trains with (``step_offset = 1``).

    Args:
      targets: list of `SparseTarget` of the model.
      update_steps: `schedules.UpdateSteps` (begin, every, end: the ramp's grid;
        end resolved to an int > begin).
      initial_density, final_density, power: the ramp (see `GradualPruning`).
    """

    step_offset = 1

    def __init__(self, targets, update_steps, *, initial_density, final_density, power):
        super().__init__(update_steps)
        self.targets = list(targets)
        self.initial_density = float(initial_density)
        self.final_density = float(final_density)
        self.power = power
        self.sizes = [int(np.prod(t.weight.shape)) for t in self.targets]
        # Observability only: the target density of the last update.
        self.last_density = self.observed(tf.constant(self.initial_density, tf.float32),
                                          "gmp_last_density")

    def target_density(self, step) -> tf.Tensor:
        """float32 scalar: the target density ``d(step)`` of the ramp."""
        steps = self.update_steps
        return schedules.polynomial_density(step, self.initial_density, self.final_density,
                                            steps.begin, steps.end, self.power)

    def after_apply(self, optimizer, grads_by_variable):
        del grads_by_variable  # magnitude pruning needs no gradient
        self.maybe_update(tf.cast(optimizer.iterations, tf.int64) + 1)

    def maybe_update(self, step):
        """Prunes to ``d(step)`` if `step` (int64 scalar, 1-based) is an update step."""
        step = tf.cast(step, tf.int64)
        tf.cond(self.update_steps.is_update_step(step), lambda: self._update(step), tf.no_op)

    def _update(self, step):
        density = self.target_density(step)
        for t, size in zip(self.targets, self.sizes):
            magnitude = absolute(tf.cast(t.weight, tf.float32))
            mask = topology.select_highest(magnitude, tf.convert_to_tensor(t.mask),
                                           keep_count(size, density))
            t.weight.assign(tf.where(mask, t.weight, tf.zeros([], t.weight.dtype)))
            t.mask.assign(mask)
        self.last_density.assign(density)
        self.last_update_step.assign(step)
        return tf.no_op()


@keras.saving.register_keras_serializable(package="keras_dst")
class GradualPruning(HookedCallback):
    """Gradual magnitude pruning from dense to `final_density` (Zhu & Gupta, 2017).

    Use with a dense-masked model, compiled with any optimizer::

        model = keras_dst.prunable(model, density=1.0, distribution="uniform")
        model.compile("sgd", "sparse_categorical_crossentropy", jit_compile=True)
        model.fit(x, y, epochs=10, callbacks=[keras_dst.GradualPruning(0.1)])

    Every sparsified weight (but those of the layers `prunable` keeps dense, its
    `keep_dense`) is pruned, by magnitude and without regrowth, to the density
    ``d(t)`` of the polynomial ramp
    ``d(t) = 1 - s_f - (s_i - s_f) * (1 - (t - begin_step) / (end_step - begin_step)) ** power``
    (sparsities ``s_i = 1 - initial_density``, ``s_f = 1 - final_density``) at the
    steps ``t = begin_step + j * update_every <= end_step`` (``t >= 1``, the
    1-based index of the optimizer step whose forward pass first uses the pruned
    masks). Each weight of ``n`` entries keeps ``max(round(n * d(t)), 1)``
    entries: TF-MOT's ``prune_low_magnitude`` + ``PolynomialDecay`` semantics (see
    the module docstring for the exact correspondence and the deviations). The
    update runs inside the compiled step (a `tf.cond`, no host round-trip).

    The same vocabulary as `DynamicSparseTraining`: `update_every`, `begin_step`,
    `end_step`.

    Args:
      final_density: density every sparsified weight ends at, in (0, 1].
      update_every: steps between updates (int >= 1; TF-MOT's ``frequency``).
      begin_step: first step of the ramp (int >= 0).
      end_step: last step of the ramp (int > begin_step). None: the last update
        step (``begin_step + j * update_every``) not after 75% of `fit`'s total
        steps (``epochs * steps_per_epoch``), so that the final density is
        reached. An explicit `end_step` that is not ``begin_step`` plus a
        multiple of `update_every` is never an update step, and the final
        density is then never reached (as in TF-MOT): a warning says so.
      power: exponent of the ramp (a real > 0; 3 in the paper).
      initial_density: density at `begin_step`, in [final_density, 1].

    Logs (every batch and epoch; place it before CSVLogger / TensorBoard):
    ``density`` (active fraction of the weights it prunes, which `target_density`
    aims at: layers kept dense or frozen are left out, where `keras_dst.density`
    counts them) and
    ``target_density`` (``d(t)`` of the ramp's last update step; `initial_density`
    before the first).

    A callback that restores an earlier epoch's weights at the end of `fit`
    (``keras.callbacks.EarlyStopping(restore_best_weights=True)``) restores that
    epoch's masks with them: the model comes back at that epoch's density, above
    `final_density` if the ramp had not ended by then.
    """

    def __init__(self, final_density: float, update_every: int = 100, begin_step: int = 0,
                 end_step: Optional[int] = None, power: float = 3, initial_density: float = 1.0):
        super().__init__()
        self._first_batch = False  # the next batch is its fit's first
        self.final_density = validation.check_density(final_density, "final_density")
        self.initial_density = validation.check_density(initial_density, "initial_density")
        if self.final_density > self.initial_density:
            raise ValueError(
                f"final_density must be <= initial_density (pruning never regrows), got "
                f"final_density={final_density!r}, initial_density={initial_density!r}.")
        self.update_every = validation.check_positive_int(update_every, "update_every")
        self.begin_step = validation.check_step(begin_step, "begin_step")
        self.end_step = None if end_step is None else validation.check_step(
            end_step, "end_step", minimum=self.begin_step + 1,
            minimum_name=f"begin_step + 1 ({self.begin_step + 1})")
        self.power = validation.check_positive_real(power, "power")
        if self.end_step is not None and (self.end_step - self.begin_step) % self.update_every:
            user_warnings.warn(
                f"GradualPruning: end_step={self.end_step} is not begin_step={self.begin_step} "
                f"plus a multiple of update_every={self.update_every}, so no update happens at "
                f"end_step and final_density={self.final_density} is never reached (as in "
                "TF-MOT).")

    def resolved_end_step(self, total_steps: Optional[int] = None) -> int:
        """The ramp's end step: `end_step`, or for ``end_step=None`` the last update step
        within 75 % of the run's steps (`total_steps`; default: the current fit's).

        Raises:
          ValueError: 75 % of the run leaves no update step after `begin_step`;
            `total_steps` < 1, or unknown (no fit running).
        """
        if self.end_step is not None:
            return self.end_step
        if total_steps is None:
            total = self._total_steps("end_step=None (75% of fit's steps)")
        else:
            total = validation.check_positive_int(total_steps, "total_steps")
        updates = (3 * total // 4 - self.begin_step) // self.update_every
        if updates < 1:
            raise ValueError(
                f"GradualPruning: 75% of the run's {total} steps leaves no update step after "
                f"begin_step={self.begin_step} with update_every={self.update_every}; pass "
                "end_step=, or a smaller begin_step or update_every.")
        return self.begin_step + updates * self.update_every

    def update_steps(self, total_steps: Optional[int] = None) -> schedules.UpdateSteps:
        """The optimizer steps its pruning updates run at in a run of `total_steps` steps
        (default: the current fit's); raises as `resolved_end_step`."""
        return schedules.UpdateSteps(self.update_every, self.begin_step,
                                     self.resolved_end_step(total_steps))

    def _update_steps(self):
        return self.update_steps()

    def _end_from_this_fit(self):
        return self.end_step is None

    def _engine_key(self):
        return (self._update_steps(), self.final_density, self.initial_density, self.power)

    def _make_engine(self):
        targets = without_kept_dense(  # (prunable's keep_dense: left dense)
            sparse_targets(self.model, require=True, caller="GradualPruning", trainable_only=True),
            self.model, "GradualPruning")
        structured = [t for t in targets if t.pattern.kind != "unstructured"]
        if structured:
            raise ValueError(
                f"GradualPruning: weight '{structured[0].key}' has pattern "
                f"'{structured[0].pattern}'; gradual magnitude pruning keeps TF-MOT's "
                "unstructured semantics. Use DynamicSparseTraining for structured patterns.")
        return GradualEngine(targets, self._update_steps(), initial_density=self.initial_density,
                             final_density=self.final_density, power=self.power)

    def on_train_begin(self, logs=None):
        self._first_batch = True
        super().on_train_begin(logs)
        if self.engine is not None:  # (None: a fit of no epoch)
            self._warn_where_masks_are_below_the_ramp(self._optimizer_step() + 1)

    def on_train_batch_begin(self, batch, logs=None):
        if self.engine is not None and self._first_batch:
            # The first step of this fit has no previous step to prune at its end: its
            # update runs here, once every callback's on_train_begin has passed (a fit
            # that a later callback refuses changes no mask) and a backup is restored.
            self._first_batch = False
            with self.model.distribute_strategy.scope():
                self.engine.maybe_update(self._optimizer_step() + 1)
        super().on_train_batch_begin(batch, logs)

    def _warn_where_masks_are_below_the_ramp(self, step):
        """Warns, naming them, about the weights that hold fewer active entries than the
        ramp keeps at `step`: pruning never regrows, so they stay as they are until the
        ramp falls below them, and the final density is reached by the others first."""
        engine = self.engine
        density = float(engine.target_density(step))
        active = [int(np.count_nonzero(t.mask.numpy())) for t in engine.targets]
        below = [(t.key, a, size) for t, a, size in zip(engine.targets, active, engine.sizes)
                 if a < int(keep_count(size, density))]
        if below:
            listed = ", ".join(f"'{path}' ({active / size:.3f})" for path, active, size in below[:5])
            more = f" and {len(below) - 5} more" if len(below) > 5 else ""
            user_warnings.warn(
                f"GradualPruning: {listed}{more} hold fewer active entries than the ramp's "
                f"density {density:.3f} at step {step}; pruning never regrows, so they stay "
                "as they are until the ramp falls below them. Start from a dense-masked "
                "model (prunable(..., density=1.0)), or start the ramp at their density "
                "(initial_density=, begin_step=).")

    def _read_logs(self):
        engine = self.engine  # the masks as they are (they may have been set since an update)
        active = sum(int(np.count_nonzero(t.mask.numpy())) for t in engine.targets)
        return {"density": float(active / max(sum(engine.sizes), 1)),
                "target_density": self._target_density(engine)}

    def _target_density(self, engine) -> float:
        """``d(t)`` of the last update: the engine's, or, where this engine has not
        updated yet (a model reloaded, or a new configuration, past updates of the
        ramp; a restore made it forget them), the ramp's at its last update step before
        the next optimizer step."""
        if int(engine.last_update_step.numpy()) >= 0:
            return float(engine.last_density.numpy())
        last = engine.update_steps.last_at_or_before(self._optimizer_step() + 1)
        return engine.initial_density if last is None else float(engine.target_density(last))

    def get_config(self):
        return dict(final_density=self.final_density, update_every=self.update_every,
                    begin_step=self.begin_step, end_step=self.end_step, power=self.power,
                    initial_density=self.initial_density)
