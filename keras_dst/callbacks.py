"""Keras callbacks that drive sparse training: `DynamicSparseTraining`."""

import numbers
import warnings

import keras
import numpy as np
import tensorflow as tf

from keras_dst import criteria as criteria_lib
from keras_dst import growth as growth_lib
from keras_dst import optimizer_hook
from keras_dst import schedules as schedules_lib
from keras_dst import topology
from keras_dst.engine import TopologyEngine
from keras_dst.masks import reapply_masks_if_needed, sparse_targets
from keras_dst.validation import check_choice, check_positive_int


class StepSwitch:
    """`model.train_function` while hooked callbacks train: compiled step variants, kept.

    An update touches the topology only every few steps, but a `tf.cond` in the
    compiled step is not free: XLA passes every variable the update writes
    (weights, masks, ever-active flags, optimizer slots) through the cond's
    false branch as a copy, at every step (~7 % of a CPU MLP step). So the
    training function is compiled in variants: a hook whose engine has
    ``needed = False`` for the coming execution is left out of the traced step
    (see `optimizer_hook.install`); a callback sets ``needed`` before each
    batch, and this switch calls (compiling on first use) the function traced
    with exactly the needed engines. Without any engine in it, the step is the
    plain static-sparse step.

    Compiled once per model: the switch lives on the model across `fit` calls
    and keeps every variant it compiled, keyed by the set of engines traced
    into it, and the engines themselves, keyed by their configuration
    (`keep`): a later `fit` with the same callback, or with a new one of
    equal configuration, reuses both, so it compiles nothing; `evaluate` and
    `predict` in between do not touch them. When the last hooked callback of a
    `fit` ends, `model.train_function` becomes the static variant, so a later
    plain `fit` runs it with no hook and no compile. `model.compile()` (which
    gives the model a new training function) drops the switch and what it kept.
    Engines left installed by a `fit` that raised are uninstalled when the next
    `fit` starts.
    """

    ATTR = "_keras_dst_step_switch"

    def __init__(self, model):
        self.model = model
        self.params = None     # the `params` dict of the fit now running (one per fit)
        self.engines = []      # engines hooked in the fit now running, in hook order
        self._engines = {}     # configuration key -> engine, kept across fits
        self._functions = {}   # frozenset of traced engines -> compiled train function

    @classmethod
    def current(cls, model):
        """The switch of `model` if its functions are still the model's; changes nothing."""
        switch = model.__dict__.get(cls.ATTR)
        return switch if switch is not None and switch._owns(model.train_function) else None

    @classmethod
    def of(cls, model, params):
        """The switch of `model` for the `fit` whose callbacks share `params`.

        Made on first use, or again after `model.compile()`; installed as
        `model.train_function` for this fit.
        """
        switch = cls.current(model)
        if switch is None and cls.ATTR in model.__dict__:
            model.__dict__[cls.ATTR].release()  # compiled for an earlier compile()
        if switch is None:
            switch = cls(model)
            model.__dict__[cls.ATTR] = switch
        if switch.params is not params:
            for engine in switch.engines:  # a fit that never reached on_train_end
                optimizer_hook.uninstall(model.optimizer, engine)
            switch.engines = []
            switch.params = params
        model.train_function = switch
        return switch

    def _owns(self, function):
        return function is self or any(function is f for f in self._functions.values())

    def keep(self, key, engine):
        """Keeps `engine` for later fits with an equal configuration `key`."""
        self._engines[key] = engine

    def add(self, engine):
        if engine not in self.engines:
            self.engines.append(engine)

    def remove(self, engine):
        """Ends `engine`'s part in this fit; the last one out restores the static step."""
        if engine in self.engines:
            self.engines.remove(engine)
        if not self.engines:
            self.params = None
            self.model.train_function = self._functions.get(frozenset())

    def release(self):
        """Uninstalls this switch's hooks and forgets its engines and functions."""
        for engine in self.engines:
            optimizer_hook.uninstall(self.model.optimizer, engine)
        self.engines, self._engines, self._functions = [], {}, {}
        self.model.__dict__.pop(self.ATTR, None)

    def __call__(self, *args, **kwargs):
        key = frozenset(e for e in self.engines if getattr(e, "needed", True))
        for engine in self.engines:
            engine.traced = engine in key  # read when (and only when) the function traces
        function = self._functions.get(key)
        if function is None:
            self.model.make_train_function(force=True)
            function = self._functions[key] = self.model.train_function
            self.model.train_function = self
        return function(*args, **kwargs)


class HookedCallback(keras.callbacks.Callback):
    """Base of callbacks that put an engine into the optimizer's `apply`.

    Subclasses implement `_make_engine()` and `_read_logs()`; this class installs
    the engine at the start of `fit`, has the training function compiled with
    it, removes it at the end, and adds the engine's numbers to `logs`.

    Step counting on the host, no host round-trip per batch: the host counts
    optimizer steps (exact after each device read) and, before each batch,
    decides whether the execution may hold an update step of the grid
    `_update_grid()`. Only such executions run the step compiled with the
    engine (see `StepSwitch`); the others run the plain sparse step. The device
    is read at the epoch edges, after the first execution of a `fit` and after
    each execution that may hold an update step: those reads re-synchronise the
    count and refresh the logs.

    The count is never behind the device: a step that a `LossScaleOptimizer`
    skips (overflow) makes it run ahead, so the execution that was expected to
    update may not have; the read after it sees that, and the following
    executions run with the engine until the device reaches the update step.
    Only a training step that applies the optimizer more than once per batch
    could put the device ahead; the read after the first execution (and every
    later one) detects it, and the engine then runs in every step.
    """

    #: Hook before every other one (observers that must see the pre-update state).
    hook_first = False

    def __init__(self):
        super().__init__()
        self.engine = None
        self._logs = {}
        self._seen_update = None
        self._host_step = 0       # optimizer steps done, as counted on the host (>= device)
        self._batch_begin = 0
        self._read_after = False  # read the device after this execution
        self._verify = False      # first execution of the fit: check the count
        self._every_step = False  # the engine must run in every step

    def on_train_begin(self, logs=None):
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is None:
            raise ValueError(f"{type(self).__name__}: compile the model before fit().")
        base = optimizer_hook.base_optimizer(optimizer)
        if not base.built:
            base.build(self.model.trainable_variables)
        # The engine of an equal configuration is reused with the steps compiled
        # with it (see StepSwitch); a new one is made (and checked) before any
        # state changes.
        key = (type(self), self._engine_key())
        current = StepSwitch.current(self.model)
        engine = current._engines.get(key) if current is not None else None
        if engine is None:
            with self.model.distribute_strategy.scope():
                engine = self._make_engine()
        self.engine = engine
        reapply_masks_if_needed(self.model, type(self).__name__)
        # (a fit that raised left its engines installed: StepSwitch.of
        # uninstalls them, this callback's previous engine included)
        switch = StepSwitch.of(self.model, self.params)
        switch.keep(key, engine)
        optimizer_hook.install(optimizer, engine, first=self.hook_first)
        self._every_step = bool(getattr(engine, "needs_every_step", False))
        self._verify = True
        switch.add(engine)

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def on_train_end(self, logs=None):
        if self.engine is not None:
            optimizer_hook.uninstall(self.model.optimizer, self.engine)
            switch = self.model.__dict__.get(StepSwitch.ATTR)
            if switch is not None:
                switch.remove(self.engine)

    def _engine_key(self):
        """Hashable: equal for two callbacks (of one class) that make equal engines
        for the current `fit` (its `params` included)."""
        raise NotImplementedError

    def _update_grid(self):
        """(period, offset): the engine can only update while running a (1-based)
        optimizer step t with ``(t - offset) % period == 0``."""
        return self.update_every, 0

    def _may_update(self, first, last):
        """Does the step range [first, last] (1-based, inclusive) hold a grid step?"""
        period, offset = self._update_grid()
        return (last - offset) // period != (first - 1 - offset) // period

    def _optimizer_step(self):
        return int(optimizer_hook.base_optimizer(self.model.optimizer).iterations.numpy())

    def on_epoch_begin(self, epoch, logs=None):
        if self.engine is not None:
            self._host_step = self._optimizer_step()
            self._refresh()

    def on_train_batch_begin(self, batch, logs=None):
        if self.engine is None:
            return
        self._batch_begin = int(batch)
        steps = int(getattr(self.model, "steps_per_execution", 1) or 1)
        per_epoch = (self.params or {}).get("steps")
        if per_epoch:  # the last execution of an epoch may be shorter
            steps = max(1, min(steps, int(per_epoch) - self._batch_begin))
        self._read_after = self._verify or self._may_update(self._host_step + 1,
                                                             self._host_step + steps)
        self.engine.needed = self._every_step or self._read_after

    def on_train_batch_end(self, batch, logs=None):
        if self.engine is None:
            return
        self._host_step += int(batch) - self._batch_begin + 1  # no device read
        if self._read_after:
            device = self._optimizer_step()
            if device > self._host_step and not self._every_step:
                self._every_step = True  # see the class docstring
                warnings.warn(
                    f"{type(self).__name__}: the optimizer made {device} steps where the host "
                    f"counted {self._host_step} (a train_step applying it more than once?); "
                    "the engine now runs in every step.", stacklevel=2)
            self._host_step = device
            self._verify = False
            self._refresh()
        if logs is not None:
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
    with the optimizer). Executions of the training function that cannot hold
    an update step run a second compiled step without the update (see
    `StepSwitch`), unless the criterion keeps running scores (updated at every
    step).

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
        (the slots of the entries whose mask changed are zeroed).
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

    def _engine_key(self):
        # Criterion and GrowthRule compare by value (name, functions, params); a
        # schedule object or callable by identity.
        return (self.criterion, self.growth, self.update_every, self.prune_rate, self.schedule,
                self.end_step, self._total_steps(), self.resolved_ordering, self.scope,
                self.grow_exact, self.optimizer_state, self.seed, self.normalize, self.norm_type)

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

