"""Step switching: which compiled training step runs, decided on the host (floor 5).

`DynamicSparseTraining` puts its update into every step, in a loop of zero or
one trip (`hooks.run_if`): one step to compile, nothing copied at the steps that
do not update. Hooks whose update sits in a `tf.cond` (`GradualPruning`,
`CriteriaOverlap`, DST under a tf.distribute strategy) would pay at every step:
XLA passes every variable the cond writes (weights, masks, ever-active flags,
optimizer slots) through its false branch as a copy (~7 % of a CPU MLP step).
For those the training function is compiled in variants, one per set of hooks
traced into it, and the host picks, before each execution, the variant with
exactly the hooks that may update in it (`Hook.may_update_between`, from the
hook's `UpdateSteps`; a hook with `runs_every_step` is always in). Without any
hook the step is the plain static-sparse step.

`HookedCallback` is the host side of a hook (the base of `DynamicSparseTraining`,
`GradualPruning` and `CriteriaOverlap`; `ScheduledCallback` adds the prune-rate
schedule of the first and last); `StepSwitch` is the model's training
function while hooked callbacks train, and keeps what it compiled.
"""

import functools
from typing import Optional

import keras
import tensorflow as tf

from keras_dst import compat, hooks, schedules, user_warnings, validation
from keras_dst.layers import eager_topology_writes
from keras_dst.masks import reapply_masks_if_needed, sparse_targets
from keras_dst.optimizer_state import base_optimizer


class StepSwitch:
    """`model.train_function` while hooked callbacks train: compiled step variants, kept.

    Calls (compiling on first use) the function traced with exactly the hooks
    that the callbacks marked as needed for the coming execution
    (`set_needed`); the hooks left out are not in that function at all (see
    `hooks.tracing`).

    Compiled once per model: the switch lives on the model across `fit` calls
    and keeps every variant it compiled, keyed by the set of hooks traced into
    it, and the hooks themselves, keyed by their configuration (`keep`): a later
    `fit` with the same callback, or with a new one of equal configuration,
    reuses both, so it compiles nothing; `evaluate` and `predict` in between do
    not touch them. When the last hooked callback of a `fit` ends,
    `model.train_function` becomes the static variant (or the switch, which
    compiles it on first use, as Keras would), so a later plain `fit` runs it
    with no hook. `model.compile()` (which gives the
    model a new training function) drops the switch and what it kept, as does a new
    ``model.optimizer`` assigned without it at the next hooked `fit`.

    A `fit` that raised (in a step, in a callback, or interrupted) never reaches
    `on_train_end`; its hooks stay installed until the next execution, which
    uninstalls them unless a hooked callback of the running `fit` prepared it
    (`set_needed`, before every batch), or until the next run's start (the next
    `fit`'s, or the first ``on_train_begin`` of a loop of one's own: `of`): a later
    plain `fit` (or `train_on_batch`) runs the static step, and a later hooked run
    installs its own hooks afresh. The switch watches ``model.make_train_function``,
    which Keras's `fit` and `train_on_batch` call before their first step (and `fit`
    before its callbacks' ``on_train_begin``): a preparation does not
    outlive the fit that made it (a callback listed after a hooked one that raised in
    ``on_train_batch_begin`` left it in place for the next plain `fit`), and a forced
    rebuild (``make_train_function(force=True)``, from a callback inside a `fit`, say)
    drops the compiled variants but keeps the switch as the training function (Keras's
    new function, traced without the hooks, would end the hooked callbacks' updates for the
    rest of the fit). The model's own ``make_train_function`` (its class's, or one set
    on it before) still runs at every call but a forced rebuild's, and whenever the
    switch compiles a variant.
    """

    ATTR = "_keras_dst_step_switch"

    def __init__(self, model):
        self.model = model
        self.optimizer = model.optimizer  # the one its hooks go on and its functions apply
        self.params = None     # the `params` dict of the fit now running (one per fit)
        self.driven_by_fit = True  # its callbacks run in Keras's fit (not a user's loop)
        self.engines = []      # hooks of the fit now running, in install order
        self._needed = {}      # hook -> traced into the coming execution?
        self._engines = {}     # configuration key -> hook, kept across fits
        self._functions = {}   # frozenset of traced hooks -> compiled train function
        self._prepared = False  # a hooked callback set up the coming execution
        self._owners = {}      # hook -> the name of its callback's class
        self._callbacks = []   # the callbacks whose hooks this run added
        self._ran = False      # an execution ran since the running fit's hooks were added
        self._building = False  # this switch is compiling a variant (`__call__`)
        self.executions = 0    # calls so far (an execution that raised counts)
        own = model.__dict__.get("make_train_function")  # (one set on the model before)
        self._model_make_train_function = own or functools.partial(
            type(model).make_train_function, model)
        model.__dict__["make_train_function"] = self._make_train_function

    def _make_train_function(self, force=False):
        """``model.make_train_function`` while this switch is the model's (see the class
        docstring): the model's own, and for the switch what the call means."""
        model = self.model
        if self._building or StepSwitch.current(model) is not self:
            return self._model_make_train_function(force=force)
        if not force:
            # A fit starts (before its callbacks' on_train_begin): a run that never reached
            # on_train_end is over. A train_on_batch starts: what a fit prepared is stale
            # (it raised after), what the callbacks of a user's own loop prepared
            # (CallbackList, then train_on_batch) is for this step.
            entry = compat.keras_training_entry()
            if entry == "fit":
                self._end_fit()
            if entry == "fit" or (entry == "train_on_batch" and self.driven_by_fit):
                self._prepared = False
            return self._model_make_train_function(force=force)
        self._functions = {}  # rebuilt, each on its next use
        model.train_function = self
        return self

    @classmethod
    def current(cls, model):
        """The switch of `model` if its functions are still the model's, and its optimizer
        (one assigned to ``model.optimizer`` without `compile()` is not in the functions
        compiled before); changes nothing."""
        switch = model.__dict__.get(cls.ATTR)
        if switch is None or not switch._owns(model.train_function):
            return None
        return switch if switch.optimizer is getattr(model, "optimizer", None) else None

    @classmethod
    def of(cls, model, callback, params, driven_by_fit: bool = True):
        """The switch of `model` for the run (a `fit`, or a user's own loop of
        ``CallbackList`` and ``train_on_batch``: `driven_by_fit` False) whose
        `callback` starts (``on_train_begin``); `params`: the ones its run gave it, or
        None (see `_starts_a_run`).

        Made on first use, or again after `model.compile()`; installed as
        `model.train_function` for this run, which ends the hooks of a run that
        never reached on_train_end.
        """
        switch = cls.current(model)
        if switch is None and cls.ATTR in model.__dict__:
            model.__dict__[cls.ATTR].release()  # compiled for an earlier compile()
        if switch is None:
            switch = cls(model)
            model.__dict__[cls.ATTR] = switch
        if switch._starts_a_run(callback, params, driven_by_fit):
            switch._end_fit()
            switch.params = params
        # (no batch of a run begins before all its callbacks' on_train_begin: what was
        # prepared is a stopped loop's)
        switch._needed, switch._prepared = {}, False
        switch.driven_by_fit = driven_by_fit
        switch._callbacks.append(callback)
        model.train_function = switch
        return switch

    def _starts_a_run(self, callback, params, driven_by_fit) -> bool:
        """Whether `callback`'s on_train_begin starts a run, rather than joining the one
        whose callbacks began before it (with no step since).

        A run that ran steps is over (no run steps before its callbacks begin), as is
        one of the other kind (a fit, then a loop of one's own); a fit's start ended
        the run before it already (`_make_train_function`). `params` are those the run
        gave its callbacks: Keras's fit gives each fit's its own, a ``CallbackList``
        made with epochs/steps its own, one made without (a loop's, or one passed to
        fit) none, its callbacks keeping those of their last run (they pass None
        then): other `params` than this run's start a run. In a loop, so does a
        callback that began already (its earlier loop stopped before its first
        step; one listed twice is refused at its first batch).
        """
        if self._ran or self.driven_by_fit != driven_by_fit:
            return True
        if not driven_by_fit and any(c is callback for c in self._callbacks):
            return True
        return params is not None and params is not self.params

    def _end_fit(self):
        """Uninstalls the hooks of the running (or an abandoned) run."""
        for engine in self.engines:
            hooks.uninstall(self.optimizer, engine)
        self.engines, self._needed, self._owners, self.params = [], {}, {}, None
        self._callbacks, self._ran = [], False

    def _owns(self, function):
        return function is self or any(function is f for f in self._functions.values())

    def kept(self, key):
        """The hook kept for configuration `key`, or None."""
        return self._engines.get(key)

    def keep(self, key, engine):
        """Keeps `engine` for later fits with an equal configuration `key`."""
        self._engines[key] = engine

    def add(self, engine, owner: str):
        """Installs `engine` (the hook of callback `owner`) on the model's optimizer for
        this fit.

        Raises:
          ValueError: `engine` changes masks and another hook of this fit does too
            (two DST or gradual-pruning callbacks would each change the masks that
            the other selects from), or `engine` is in this fit already (a second
            callback of an equal configuration, or, in a fit, one callback listed
            twice: in a loop, its second on_train_batch_begin is refused); the fit's
            hooks are uninstalled first.
        """
        if engine in self.engines:  # equal configurations share one engine
            self._end_fit()
            raise ValueError(
                f"{owner}: this fit already has this callback, or another {owner} of an "
                f"equal configuration; pass it once.{self._abandoned_loop_hint()}")
        writers = [self._owners.get(e, type(e).__name__) for e in self.engines
                   if e.writes_masks]
        if engine.writes_masks and writers:
            hint = self._abandoned_loop_hint()
            self._end_fit()
            raise ValueError(
                f"{owner}: this fit already has a callback that changes the masks "
                f"({writers[0]}); pass one per fit (CriteriaOverlap, which only observes, "
                f"can join it).{hint}")
        hooks.install(self.optimizer, engine)
        self._owners[engine] = owner
        self.engines.append(engine)

    def _abandoned_loop_hint(self) -> str:
        return ("" if self.driven_by_fit else " (A loop of your own that stopped before its "
                "first step: call its callbacks' on_train_end() before the next one.)")

    def set_needed(self, engine, needed: bool):
        """Whether `engine` is traced into the function of the coming execution."""
        self._needed[engine] = bool(needed)
        self._prepared = True

    def remove(self, engine):
        """Ends `engine`'s part in this fit; the last one out restores the static step."""
        hooks.uninstall(self.optimizer, engine)
        if engine in self.engines:
            self.engines.remove(engine)
        self._needed.pop(engine, None)
        if not self.engines:
            self._end_fit()
            if StepSwitch.current(self.model) is self:  # (not after a compile())
                self.model.train_function = self._functions.get(frozenset(), self)

    def release(self):
        """Uninstalls this switch's hooks and forgets its hooks and functions."""
        self._end_fit()
        self._engines, self._functions = {}, {}
        self.model.__dict__.pop(self.ATTR, None)
        if self.model.__dict__.get("make_train_function") == self._make_train_function:
            own = self._model_make_train_function
            if isinstance(own, functools.partial):
                del self.model.__dict__["make_train_function"]
            else:
                self.model.__dict__["make_train_function"] = own

    def __call__(self, *args, **kwargs):
        if self.engines and not self._prepared:  # the fit that installed them raised
            self._end_fit()
        for engine in [e for e in self.engines if e not in self._needed]:
            # (no callback of this run prepared it: a loop that stopped before its first
            # step left it, and a loop of callbacks that began after it went on)
            hooks.uninstall(self.optimizer, engine)
            self.engines.remove(engine)
        self._prepared, self._ran = False, True
        self.executions += 1
        key = frozenset(e for e in self.engines if self._needed[e])
        function = self._functions.get(key)
        if function is None:
            if args:  # (its first trace would build them, and trace again)
                compat.build_compiled_state(self.model, args[0])
            self._building = True
            try:
                self.model.make_train_function(force=True)
            finally:
                self._building = False
            function = self._functions[key] = self.model.train_function
            self.model.train_function = self
        with hooks.tracing(self.optimizer, key):
            return function(*args, **kwargs)


class HookedCallback(keras.callbacks.Callback):
    """Base of callbacks that put a `hooks.Hook` (their engine) into the optimizer's `apply`.

    Subclasses implement `_make_engine()`, `_engine_key()` and `_read_logs()`;
    this class installs the engine at the start of `fit`, has the training
    function compiled with it, removes it at the end, and adds the engine's
    numbers to `logs`.

    Step counting on the host, no host round-trip per batch: the host counts
    optimizer steps (exact after each device read) and, before each batch,
    asks the engine whether the execution may hold one of its update steps
    (`Hook.may_update_between`). Only such executions run the step compiled
    with the engine (see `StepSwitch`); the others run the plain sparse step.
    The device is read at the epoch edges, after the first execution of a `fit`
    and after each execution that may hold an update step: those reads
    re-synchronise the count and refresh the logs.

    The count is never behind the device: a step that a `LossScaleOptimizer`
    skips (overflow) makes it run ahead, so the execution that was expected to
    update may not have; the read after it sees that, and the following
    executions run with the engine until the device reaches the update step.
    Only a training step that applies the optimizer more than once per batch
    could put the device ahead; the read after the first execution (and every
    later one) detects it, and the engine then runs in every step.
    """

    supports_strategies = False  # (its engine writes in sync under a tf.distribute strategy)

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
        self._steps_warned = False  # the optimizer was seen ahead of the host count
        self._fit_start_step = 0  # the optimizer's step when this fit began
        self._last_params = None  # the `params` of its last run (see `StepSwitch.of`)
        self._batch_begun_at = None  # the switch's executions at a batch begin not ended

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def _engine_key(self):
        """Hashable: equal for two callbacks (of one class) that make equal engines
        for the current `fit` (its `params` included)."""
        raise NotImplementedError

    def _make_engine(self):
        """A new `hooks.Hook` for this callback's model and `fit` (checks come first)."""
        raise NotImplementedError

    def _read_logs(self) -> dict:
        """The engine's numbers for `logs` (host reads of its variables)."""
        raise NotImplementedError

    def _end_from_this_fit(self) -> bool:
        """Whether the engine's last update step is resolved from the running fit's length
        (e.g. an end_step left to its default or given as a fraction). Default: False."""
        return False

    # The constructor argument that gives the run's length instead (named by the error
    # of `_total_steps`).
    _length_argument = "end_step"

    def _total_steps(self, what: Optional[str]) -> Optional[int]:
        """``epochs * steps`` of the running `fit`. Where the steps per epoch are unknown:
        None if `what` is None, else a ValueError saying that `what` needs them."""
        params = self.params or {}  # (None: a CallbackList made without them)
        epochs, steps = params.get("epochs"), params.get("steps")
        if not epochs or not steps:
            if what is None:
                return None
            if "steps" not in params:  # fit always passes it (None where unknown)
                raise ValueError(
                    f"{type(self).__name__}: {what} needs the number of training steps, but "
                    "this callback was given no fit parameters: a keras.callbacks."
                    "CallbackList made by hand gets none from fit; make it with epochs= and "
                    f"steps= (CallbackList([...], model=model, epochs=..., steps=...)), pass "
                    f"{self._length_argument}= to {type(self).__name__}, or pass the "
                    "callback to fit(callbacks=[...]) itself.")
            if steps == 0:
                raise ValueError(f"{type(self).__name__}: this fit has no training data (0 "
                                 f"batches per epoch), so {what} has no steps to run over.")
            raise ValueError(
                f"{type(self).__name__}: {what} needs the number of training steps, but the "
                "number of steps per epoch is unknown (a dataset without a length?); pass "
                f"steps_per_epoch= to fit(), or {self._length_argument}= to "
                f"{type(self).__name__}.")
        return int(epochs) * int(steps)

    def on_train_begin(self, logs=None):
        self.engine, self._batch_begun_at = None, None
        if (self.params or {}).get("epochs") == 0:  # a fit of no epoch: nothing to hook
            return
        if self.model is None:
            raise ValueError(
                f"{type(self).__name__} has no model: a keras.callbacks.CallbackList made by "
                "hand gets none from fit; make it with model= (CallbackList([...], "
                "model=model)), or pass the callback to fit(callbacks=[...]) itself.")
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is None:
            raise ValueError(f"{type(self).__name__}: compile the model before fit().")
        if not self.supports_strategies:
            with self.model.distribute_strategy.scope():
                if tf.distribute.has_strategy():
                    raise NotImplementedError(
                        f"{type(self).__name__} does not support tf.distribute strategies "
                        f"yet (the model is under {type(self.model.distribute_strategy).__name__}"
                        "); DynamicSparseTraining does.")
        base = base_optimizer(optimizer)
        if getattr(base, "use_ema", False):
            raise ValueError(
                f"{type(self).__name__}: optimizer '{base.name}' has use_ema=True; its moving "
                "averages hold values at masked entries, which would overwrite the sparse "
                "weights (every ema_overwrite_frequency steps and at the end of fit). Compile "
                "with an optimizer without use_ema.")
        if not optimizer.built:
            # (a model of `prunable(layer)` wrappers is built by Keras only when it traces
            # the first step: refused unbuilt before the optimizer is built without them;
            # a LossScaleOptimizer is built whole, its inner optimizer with it: one that
            # made its own variables in the first trace had that trace run twice)
            sparse_targets(self.model, caller=type(self).__name__)
            with self.model.distribute_strategy.scope():  # (a loop of one's own is not in it)
                optimizer.build(self.model.trainable_variables)
        # The engine of an equal configuration is reused with the steps compiled
        # with it (see StepSwitch); a new one is made (and checked) before any
        # state changes.
        key = (type(self), self._engine_key())
        current = StepSwitch.current(self.model)
        engine = current.kept(key) if current is not None else None
        if engine is None:
            with self.model.distribute_strategy.scope():
                engine = self._make_engine()
        self.engine = engine
        reapply_masks_if_needed(self.model, type(self).__name__)
        # (a run that never ended left its engines installed: a fit's start, or the
        # start of a loop's run (StepSwitch.of), uninstalls them, this callback's
        # previous engine included; those of a run that a loop joined go at its first
        # step, which no callback of the loop prepared them for)
        # (the params this run gave: those of the callback's last run are left over from
        # it, where a CallbackList made without epochs/steps gave none)
        params = None if self.params is self._last_params else self.params
        self._last_params = self.params
        switch = StepSwitch.of(self.model, self, params, compat.inside_keras_fit(self.model))
        switch.keep(key, engine)
        switch.add(engine, type(self).__name__)
        self._every_step = engine.runs_every_step
        self._steps_warned = False
        self._verify = True
        self._seen_update, self._logs = None, {}  # (this model's, read afresh)
        # An end resolved from this fit's length that a later fit (not a resumed one, which
        # counts the whole run's steps) starts after: it updates nothing.
        steps, first = engine.update_steps, self._optimizer_step() + 1
        total = self._total_steps(None)
        if (steps.end is not None and self._end_from_this_fit() and total and first > total
                and not steps.any_between(first, steps.end)):
            user_warnings.warn(
                f"{type(self).__name__}: this fit runs optimizer steps {first}-"
                f"{first + total - 1} (1-based), all after its last update step ({steps.end}),"
                " so it updates nothing. Update steps count from the optimizer's first step, "
                "across fit calls, and an end_step left to its default or given as a fraction "
                f"is resolved against this fit's own {total} steps; pass begin_step= and "
                "end_step= that reach this fit.")

    def on_train_end(self, logs=None):
        if self.engine is not None:
            switch = self.model.__dict__.get(StepSwitch.ATTR)
            if switch is not None:
                switch.remove(self.engine)
            else:
                hooks.uninstall(self.model.optimizer, self.engine)

    def _optimizer_step(self):
        return int(base_optimizer(self.model.optimizer).iterations.numpy())

    def on_epoch_begin(self, epoch, logs=None):
        # (a batch begun at the end of the last epoch's data of unknown length may have
        # run no execution: a loop of one's own that fetches its batch after the begin)
        self._batch_begun_at = None
        if self.engine is not None:
            self._host_step = self._optimizer_step()
            self._forget_undone_updates()
            self._refresh()

    def _forget_undone_updates(self) -> bool:
        """Where a restore (`BackupAndRestore`, a checkpoint read) took the model back
        before the engine's last update (the engine stays with the model across fits),
        its numbers describe an update the model no longer holds, and the replayed update
        of that same step would not be read: they are forgotten (`Hook.forget_updates`).
        Returns whether they were."""
        last = int(self.engine.last_update_step.numpy())
        if last <= self._optimizer_step() + self.engine.step_offset:
            return False
        with self.model.distribute_strategy.scope():
            self.engine.forget_updates()
        self._seen_update = None
        return True

    def on_train_batch_begin(self, batch, logs=None):
        if self.engine is None:
            return
        switch = self.model.__dict__.get(StepSwitch.ATTR)
        executions = None if switch is None else switch.executions
        if self._batch_begun_at is not None and self._batch_begun_at == executions:
            # (not a batch whose on_train_batch_end never came because its execution
            # raised, as at the end of Keras's data of unknown length, nor one begun at
            # the end of an epoch: see on_epoch_begin)
            raise ValueError(
                f"{type(self).__name__}: on_train_batch_begin ran twice with no step "
                "between: this callback is listed twice (pass it once), or a loop of your "
                "own calls it twice.")
        self._batch_begun_at = executions
        if self._verify:  # a fit's first batch (also of a loop that calls no on_epoch_begin)
            # (after every callback's on_train_begin: a restore may have moved the step)
            self._host_step = self._fit_start_step = self._optimizer_step()
            self._forget_undone_updates()
        self._batch_begin = int(batch)
        # An execution runs `steps_per_execution` steps unless the data ends first: Keras
        # runs the last one of an epoch whole, past `steps_per_epoch`, on data that goes on
        # (a repeated dataset, arrays with `steps_per_epoch`), so it may hold that many.
        steps = int(getattr(self.model, "steps_per_execution", 1) or 1)
        self._read_after = self._verify or self.engine.may_update_between(
            self._host_step + 1, self._host_step + steps)
        if switch is not None:
            switch.set_needed(self.engine, self._every_step or self._read_after)

    def on_train_batch_end(self, batch, logs=None):
        if self.engine is None:
            return
        self._batch_begun_at = None
        self._host_step += int(batch) - self._batch_begin + 1  # no device read
        switch = self.model.__dict__.get(StepSwitch.ATTR)
        if switch is not None and StepSwitch.current(self.model) is not switch:  # (any batch)
            raise ValueError(
                f"{type(self).__name__}: the model's training function was replaced during "
                "this run (a compile(), or a new model.optimizer), so its steps no longer "
                "run the updates; compile before the run, and start the callbacks again "
                "(on_train_begin) after a compile.")
        if switch is None or switch._prepared or (self._verify and not switch._ran):
            # (any batch: the step its on_train_batch_begin prepared did not run)
            raise ValueError(
                f"{type(self).__name__}: this step did not run the model's training function "
                "(model.train_function, which keras_dst compiles with its updates): a loop of "
                "your own that computes gradients and applies them makes no update. Run the "
                "steps with model.fit, or with model.train_on_batch inside a "
                "keras.callbacks.CallbackList.")
        if switch is not None and self.engine not in switch.engines:  # (any batch)
            raise ValueError(
                f"{type(self).__name__}: the step ran before this callback prepared it (the "
                "training function runs only the updates the callbacks' on_train_batch_begin "
                "asked for, and ends them at a step nothing prepared): in a loop of your "
                "own, call callbacks.on_train_batch_begin(i) before each "
                "model.train_on_batch; in a fit, train this model with no fit or "
                "train_on_batch of its own from a callback.")
        if self._verify and not self.engine.reached_apply:
            optimizer = base_optimizer(self.model.optimizer)
            raise ValueError(
                f"{type(self).__name__}: the model's training step did not call the "
                f"optimizer it was compiled with ('{optimizer.name}', "
                f"{type(optimizer).__name__}), whose `apply` keras_dst hooks, so "
                f"{type(self).__name__} would never act. A train_step that applies optimizers of its own (a "
                "GAN's, say) is not supported: apply the sparse layers' gradients with "
                "model.optimizer.")
        if self._read_after:
            device = self._optimizer_step()
            if device > self._host_step and not self._steps_warned:
                self._every_step = self._steps_warned = True  # see the class docstring
                start = self._fit_start_step
                user_warnings.warn(
                    f"{type(self).__name__}: the optimizer made {device - start} steps in this "
                    f"fit where its batches count {self._host_step - start} (a train_step "
                    "applying it more than once?); "
                    "the engine now runs in every step. Update steps count optimizer steps, "
                    "while a schedule or end step resolved from fit's length (the cosine "
                    "schedule, a fractional end_step, GradualPruning's end_step=None) counts "
                    "its batches: give the run's length in optimizer steps (total_steps=, "
                    "end_step=).")
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
        """Re-reads the engine's numbers from the device if an update happened since, or
        masks were written since outside the training step (`set_masks` from a callback)."""
        seen = (int(self.engine.last_update_step.numpy()), eager_topology_writes())
        if seen != self._seen_update:
            self._seen_update = seen
            self._logs = self._read_logs()


# The built-in schedules, whose rates are in [0, 1] by construction.
_IN_RANGE = (schedules.CosineRate, schedules.ConstantRate, schedules.LinearRate)


class ScheduledCallback(HookedCallback):
    """A `HookedCallback` whose engine follows a prune-rate schedule (the base of
    `DynamicSparseTraining` and `CriteriaOverlap`): subclasses set `schedule`,
    `prune_rate` and `total_steps` as their constructors accept them."""

    _length_argument = "total_steps"

    def _set_schedule(self, update_every, schedule, prune_rate) -> None:
        """Checks and sets `update_every`, `schedule` and `prune_rate` (`total_steps` is
        the subclass's: what it may go with depends on its other arguments)."""
        self.update_every = validation.check_positive_int(update_every, "update_every")
        self.schedule = schedules.check_schedule(schedule, "schedule")
        self.prune_rate = schedules.check_prune_rate(prune_rate, self.schedule)

    def _schedule_config(self) -> dict:
        """The config entries of `_set_schedule`'s arguments, as the constructor takes them."""
        schedule = self.schedule if isinstance(self.schedule, str) else \
            keras.saving.serialize_keras_object(self.schedule)
        return dict(update_every=self.update_every, prune_rate=self.prune_rate,
                    schedule=schedule)

    def _schedule(self):
        """The prune-rate schedule of this fit (`schedules.for_run`)."""
        return schedules.for_run(self.schedule, self.prune_rate, self.total_steps,
                                 self._total_steps)

    def _schedule_key(self):
        """Equal for two fits whose schedules compute the same rates (`schedules.run_key`)."""
        return schedules.run_key(self.schedule, self.prune_rate, self.total_steps,
                                 self._total_steps)

    def _update_steps(self) -> "schedules.UpdateSteps":
        """The optimizer steps its engine updates at, for the current `fit`."""
        raise NotImplementedError

    # The update steps of a fit whose rates `on_train_begin` checks (a schedule that is not
    # a built-in one): the first ones, enough to catch a rule gone wrong, few enough to
    # cost nothing (each is one eager call of the schedule).
    _RATES_CHECKED = 200

    def on_train_begin(self, logs=None):
        if (self.params or {}).get("epochs") != 0 and getattr(self.model, "optimizer", None):
            self._check_rates()
        super().on_train_begin(logs)
        if self.engine is not None:
            self._warn_if_the_schedule_has_ended()

    def _check_rates(self):
        """Refuses, before anything changes, a schedule that is not a built-in one and gives
        a prune rate outside [0, 1] (or NaN) at one of this fit's first update steps."""
        schedule = self._schedule()
        if isinstance(schedule, _IN_RANGE):
            return
        first, total = self._optimizer_step() + 1, self._total_steps(None)
        steps = self._update_steps().steps_between(
            first, first + total - 1 if total else None, limit=self._RATES_CHECKED)
        for step in steps:
            self._check_rate(step, schedule(step))

    def _check_last_rate(self, engine):
        """`_check_rate` of the rate `engine`'s last update used (its `last_rate`), for a
        schedule that is not a built-in one: a rate out of range at a step past those
        `_check_rates` checked stops the fit at the next read of the logs."""
        step = int(engine.last_update_step.numpy())
        if step >= 0 and not isinstance(engine.schedule, _IN_RANGE):
            self._check_rate(step, engine.last_rate.numpy(), after=(
                f" (The rates of a fit's first {self._RATES_CHECKED} update steps are checked "
                "before it starts; this update came later and ran with the rate clamped to "
                "[0, 1].)"))

    def _check_rate(self, step, value, after=""):
        """Refuses a schedule's `value` at `step` that is not one real number in [0, 1]
        (NaN included), naming the schedule; `after` ends the message."""
        try:
            rate = tf.convert_to_tensor(value)
        except (TypeError, ValueError):
            rate = None
        if rate is None or rate.shape.rank != 0 or not (rate.dtype.is_floating
                                                        or rate.dtype.is_integer):
            raise ValueError(
                f"{type(self).__name__}: schedule={self.schedule!r} returns {value!r} at step "
                f"{step}; a schedule returns one number, the prune rate (a fraction in [0, 1]).")
        rate = float(rate.numpy())
        if not 0.0 <= rate <= 1.0:  # (NaN too)
            raise ValueError(
                f"{type(self).__name__}: schedule={self.schedule!r} gives the prune rate "
                f"{rate:.6g} at step {step}; a prune rate is a fraction in [0, 1].{after}")

    def _warn_if_the_schedule_has_ended(self):
        """Warns when a cosine schedule made from an earlier fit's length (no `total_steps`)
        has ended before this fit starts: every update would use its floor."""
        schedule, step = self.engine.schedule, self._optimizer_step()
        made_from_this_fit = self.total_steps is None and isinstance(self.schedule, str)
        if (made_from_this_fit and isinstance(schedule, schedules.CosineRate)
                and step >= schedule.total_steps):
            user_warnings.warn(
                f"{type(self).__name__}: this fit starts at optimizer step {step}, after the "
                f"cosine prune-rate schedule has ended: its {schedule.total_steps} steps are "
                "this fit's (epochs x steps per epoch), so every update of this fit uses the "
                f"final rate {schedule.floor}. For one schedule over several fit calls, pass "
                "total_steps= (the steps of the whole run).")
