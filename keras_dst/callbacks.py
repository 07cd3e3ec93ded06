"""Keras callbacks that drive sparse training: `DynamicSparseTraining`."""

import numbers

import keras
import numpy as np
import tensorflow as tf

from keras_dst import criteria as criteria_lib
from keras_dst import growth as growth_lib
from keras_dst import optimizer_hook
from keras_dst import schedules as schedules_lib
from keras_dst import topology
from keras_dst.engine import TopologyEngine
from keras_dst.masks import sparse_targets
from keras_dst.validation import check_choice, check_positive_int


class HookedCallback(keras.callbacks.Callback):
    """Base of callbacks that put an engine into the optimizer's `apply`.

    Subclasses implement `_make_engine()` and `_read_logs()`; this class installs
    the engine at the start of `fit`, re-traces the training function so that the
    compiled step contains it, removes it at the end, and adds the engine's
    numbers to `logs`.

    No host round-trip per batch: the host reads the engine's numbers once per
    epoch (at its start and end) and, within an epoch, only after a batch whose
    steps (the optimizer step at the epoch start + `batch` + 1, counted on the
    host) cross an update step of the grid `_update_grid()`. A step skipped by a
    `LossScaleOptimizer` (overflow) makes that count run ahead; batch-level logs
    may then lag an update until the next grid step or the epoch end, whose logs
    are always read from the device.
    """

    #: Hook before every other one (observers that must see the pre-update state).
    hook_first = False

    def __init__(self):
        super().__init__()
        self.engine = None
        self._logs = {}
        self._seen_update = None
        self._epoch_start_step = 0
        self._checked_step = 0

    def on_train_begin(self, logs=None):
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is None:
            raise ValueError(f"{type(self).__name__}: compile the model before fit().")
        base = optimizer_hook.base_optimizer(optimizer)
        if not base.built:
            base.build(self.model.trainable_variables)
        with self.model.distribute_strategy.scope():
            self.engine = self._make_engine()
        optimizer_hook.install(optimizer, self.engine, first=self.hook_first)
        self.model.make_train_function(force=True)

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def on_train_end(self, logs=None):
        if self.engine is not None:
            optimizer_hook.uninstall(self.model.optimizer, self.engine)
            self.model.train_function = None

    def _update_grid(self):
        """(period, offset): updates can only happen at steps offset + j * period."""
        return self.update_every, 0

    def _optimizer_step(self):
        return int(optimizer_hook.base_optimizer(self.model.optimizer).iterations.numpy())

    def on_epoch_begin(self, epoch, logs=None):
        if self.engine is not None:
            self._epoch_start_step = self._checked_step = self._optimizer_step()
            self._refresh()

    def on_train_batch_end(self, batch, logs=None):
        if self.engine is None or logs is None:
            return
        step = self._epoch_start_step + int(batch) + 1  # host count, no device read
        period, offset = self._update_grid()
        if (step - offset) // period != (self._checked_step - offset) // period:
            self._checked_step = step
            self._refresh()
        logs.update(self._logs)

    def on_epoch_end(self, epoch, logs=None):
        if self.engine is not None and logs is not None:
            self._refresh()
            logs.update(self._logs)

    def _refresh(self):
        """Re-reads the engine's numbers from the device if an update happened since."""
        last = int(self.engine.last_update_step.numpy())
        if last != self._seen_update:
            self._seen_update = last
            self._logs = self._read_logs()


@keras.saving.register_keras_serializable(package="keras_dst")
class DynamicSparseTraining(HookedCallback):
    """Dynamic sparse training: prune and regrow every `update_every` steps.

    Use with a model made by `keras_dst.prunable` (or built from
    `keras_dst.prunable(layer)` layers), compiled with any optimizer::

        model = keras_dst.prunable(model, density=0.1)
        model.compile("sgd", "sparse_categorical_crossentropy", jit_compile=True)
        model.fit(x, y, callbacks=[keras_dst.DynamicSparseTraining(
            prune="magnitude", grow="gradient", update_every=800)])

    The update runs inside the compiled training step (a `tf.cond` on the step
    counter, no host round-trip), at optimizer steps ``t = update_every,
    2 * update_every, ...`` counted by ``optimizer.iterations`` (so it resumes
    with the optimizer).

    Args:
      prune: pruning criterion: a registered name (``magnitude``, ``set``,
        ``set_legacy``, ``mest``, ``snip``, ``sensitivity``,
        ``reciprocal_sensitivity``, ``random``, ``taylor_fo``,
        ``running_magnitude``, ``running_snip``, or one added with
        `keras_dst.register_criterion`).
      grow: growth rule: ``"random"``, ``"gradient"`` (RigL), ``"momentum"``
        (SNFS), a registered name, or None (prune only).
      update_every: ΔT, optimizer steps between updates (int >= 1).
      prune_rate: initial fraction p0 of each layer's active weights to replace,
        in (0, 1].
      schedule: ``"cosine"`` (default: p0 to 0.005 over all training steps),
        ``"constant"``, ``"linear"``, or a callable of the step returning the rate.
      end_step: last step that may update: None (updates to the end, as the
        reference), an int step, or a float in (0, 1) as a fraction of all
        training steps (RigL's 0.75).
      ordering: ``"auto"`` (the reference: magnitude, SET and random prune after
        the optimizer step, gradient-based criteria before it), ``"before"`` or
        ``"after"`` (when the optimizer step happens relative to the update).
      scope: ``"layer"`` (each layer prunes ``ceil(p a_l)``) or ``"global"`` (one
        ranking across all layers; each layer regrows what it lost).
      grow_exact: True: every layer regrows exactly what it lost; False: the
        reference's Bernoulli random growth (exact in expectation only).
      optimizer_state: ``"keep"`` (the reference: never touched) or ``"reset"``
        (slots of pruned and regrown entries are zeroed).
      seed: int; all randomness is stateless in (seed, layer, step).
      prune_params: dict of criterion parameters (e.g. ``{"gamma": 1.0}`` for mest).
      grow_params: dict of growth parameters.
      normalize, norm_type: score normalisation of the reference
        (``none``/``input``/``output``/``channel``/``depth``/``layer``; ``max``/``sum``).
      total_steps: steps of the whole run for the schedules; default
        ``epochs * steps_per_epoch`` of `fit`.

    Logs (every batch and epoch; place this callback before CSVLogger and
    TensorBoard so they see them): ``density``, ``prune_rate``, ``pruned``,
    ``grown``, ``mask_churn`` (grown / active at the last update), ``itop`` (fraction of
    entries ever active), and ``density/<weight path>`` per layer.
    """

    def __init__(self, prune="magnitude", grow="random", update_every=100, prune_rate=0.5,
                 schedule="cosine", end_step=None, ordering="auto", scope="layer",
                 grow_exact=True, optimizer_state="keep", seed=0, prune_params=None,
                 grow_params=None, normalize="none", norm_type="max", total_steps=None):
        super().__init__()
        try:
            self.criterion = criteria_lib.get_criterion(prune, **(prune_params or {}))
        except ValueError as e:
            raise ValueError(f"DynamicSparseTraining(prune={prune!r}, "
                             f"prune_params={prune_params!r}): {e}") from None
        try:
            self.growth = None if grow is None else growth_lib.get_growth(
                grow, **(grow_params or {}))
        except ValueError as e:
            raise ValueError(f"DynamicSparseTraining(grow={grow!r}, "
                             f"grow_params={grow_params!r}): {e}") from None
        self.update_every = check_positive_int(update_every, "update_every")
        if isinstance(prune_rate, bool) or not isinstance(prune_rate, numbers.Real) \
                or not 0.0 < prune_rate <= 1.0:
            raise (TypeError if not isinstance(prune_rate, numbers.Real) or
                   isinstance(prune_rate, bool) else ValueError)(
                f"prune_rate must be a float in (0, 1], got prune_rate={prune_rate!r}.")
        self.prune_rate = float(prune_rate)
        if isinstance(schedule, dict):  # a serialized schedule object (get_config)
            schedule = keras.saving.deserialize_keras_object(schedule)
        if not callable(schedule):
            check_choice(schedule, tuple(schedules_lib.SCHEDULES), "schedule")
        self.schedule = schedule
        self.end_step = self._check_end_step(end_step)
        self.ordering = check_choice(ordering, ("auto", "before", "after"), "ordering")
        self.scope = check_choice(scope, ("layer", "global"), "scope")
        if not isinstance(grow_exact, bool):
            raise TypeError(f"grow_exact must be a bool, got grow_exact={grow_exact!r}.")
        self.grow_exact = grow_exact
        self.optimizer_state = check_choice(optimizer_state, ("keep", "reset"), "optimizer_state")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"seed must be an int, got seed={seed!r}.")
        self.seed = int(seed)
        self.prune_params = dict(prune_params or {})
        self.grow_params = dict(grow_params or {})
        self.normalize = normalize
        self.norm_type = norm_type
        check_choice(normalize, topology.NORMALIZE_MODES, "normalize")
        check_choice(norm_type, topology.NORM_TYPES, "norm_type")
        self.total_steps = (None if total_steps is None
                            else check_positive_int(total_steps, "total_steps"))
        self._prune_name = prune if isinstance(prune, str) else self.criterion.name
        self._grow_name = grow if (grow is None or isinstance(grow, str)) else self.growth.name

    @staticmethod
    def _check_end_step(end_step):
        if end_step is None:
            return None
        if isinstance(end_step, bool) or not isinstance(end_step, numbers.Real):
            raise TypeError(f"end_step must be None, an int step or a float fraction in (0, 1), "
                            f"got end_step={end_step!r}.")
        if isinstance(end_step, numbers.Integral):
            if end_step < 1:
                raise ValueError(f"end_step must be >= 1, got end_step={end_step!r}.")
            return int(end_step)
        if not 0.0 < end_step < 1.0:
            raise ValueError(f"a float end_step is a fraction in (0, 1), got end_step={end_step!r}.")
        return float(end_step)

    @property
    def resolved_ordering(self):
        return self.criterion.ordering if self.ordering == "auto" else self.ordering

    def _total_steps(self):
        if self.total_steps is not None:
            return self.total_steps
        epochs, steps = self.params.get("epochs"), self.params.get("steps")
        if not epochs or not steps:
            raise ValueError(
                "DynamicSparseTraining: the number of steps per epoch is unknown (a dataset "
                "without a length?); pass total_steps= to the callback or steps_per_epoch= "
                "to fit().")
        return int(epochs) * int(steps)

    def _make_engine(self):
        targets = sparse_targets(self.model, require=True, caller="DynamicSparseTraining")
        if self.criterion.ema and not all(t.wrapper.track_scores for t in targets):
            raise ValueError(
                f"DynamicSparseTraining: prune='{self._prune_name}' keeps running scores; "
                "make the model with keras_dst.prunable(..., track_scores=True).")
        optimizer = optimizer_hook.base_optimizer(self.model.optimizer)
        if self.optimizer_state == "reset":
            unmapped = optimizer_hook.unmapped_state(optimizer, [t.weight for t in targets])
            if unmapped:
                raise ValueError(
                    f"DynamicSparseTraining(optimizer_state='reset'): cannot map the state of "
                    f"optimizer {type(optimizer).__name__} to weights "
                    f"({[v.path for v in unmapped][:3]}...); use optimizer_state='keep'.")
        if self.growth is not None and self.growth.needs_momentum:
            if optimizer_hook.momentum(optimizer, targets[0].weight) is None:
                raise ValueError(
                    f"DynamicSparseTraining(grow='momentum'): optimizer "
                    f"{type(optimizer).__name__} keeps no momentum; use SGD with momentum > 0 "
                    "or an Adam-like optimizer.")
        total = self._total_steps()
        end_step = self.end_step
        if isinstance(end_step, float):
            end_step = int(end_step * total)
        schedule = schedules_lib.get_schedule(self.schedule, self.prune_rate, total)
        return TopologyEngine(
            targets, self.criterion, self.growth, schedule, update_every=self.update_every,
            end_step=end_step, ordering=self.resolved_ordering, scope=self.scope,
            grow_exact=self.grow_exact, optimizer_state=self.optimizer_state, seed=self.seed,
            normalize=self.normalize, norm_type=self.norm_type)

    def _read_logs(self):
        engine = self.engine
        stats = engine.layer_stats.numpy()
        totals = np.array([int(np.prod(t.weight.shape)) for t in engine.targets])
        if engine.last_update_step.numpy() < 0:  # no update yet: report the masks
            active = np.array([int(np.count_nonzero(t.mask.numpy())) for t in engine.targets])
            ever = np.array([int(np.count_nonzero(t.ever_active.numpy())) for t in engine.targets])
            stats = np.stack([active, 0 * active, 0 * active, ever], axis=1)
        active, pruned, grown, ever = stats.T
        logs = {
            "density": float(active.sum() / totals.sum()),
            "prune_rate": float(engine.last_rate.numpy()),
            "pruned": float(pruned.sum()),
            "grown": float(grown.sum()),
            "mask_churn": float(grown.sum() / max(active.sum(), 1)),
            "itop": float(ever.sum() / totals.sum()),
        }
        for t, a, n in zip(engine.targets, active, totals):
            logs[f"density/{t.weight.path}"] = float(a / n) if n else 1.0
        return logs

    def get_config(self):
        return dict(prune=self._prune_name, grow=self._grow_name, update_every=self.update_every,
                    prune_rate=self.prune_rate,
                    schedule=self.schedule if isinstance(self.schedule, str)
                    else keras.saving.serialize_keras_object(self.schedule),
                    end_step=self.end_step, ordering=self.ordering, scope=self.scope,
                    grow_exact=self.grow_exact, optimizer_state=self.optimizer_state,
                    seed=self.seed, prune_params=self.prune_params, grow_params=self.grow_params,
                    normalize=self.normalize, norm_type=self.norm_type,
                    total_steps=self.total_steps)

