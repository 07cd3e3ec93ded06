"""The dynamic sparse training callback: `DynamicSparseTraining` (floor 6)."""

import collections.abc
import numbers
from typing import Any, Callable, Mapping, Optional, Union

import keras
import numpy as np

from keras_dst import criteria as criteria_lib
from keras_dst import distributions, optimizer_state, topology, user_warnings, validation
from keras_dst import growth as growth_lib
from keras_dst import schedules as schedules_lib
from keras_dst.engine import TopologyEngine
from keras_dst.masks import sparse_targets, without_kept_dense
from keras_dst.step_switch import ScheduledCallback


@keras.saving.register_keras_serializable(package="keras_dst")
class DynamicSparseTraining(ScheduledCallback):
    """Dynamic sparse training: prune and regrow every `update_every` steps.

    Use with a model made by `keras_dst.prunable` (or built from
    `keras_dst.prunable(layer)` layers, and then called once on a batch before `fit`:
    Keras builds such a model when it traces the first step, after the callbacks
    start), compiled with any optimizer::

        model = keras_dst.prunable(model, density=0.1)
        model.compile("sgd", "sparse_categorical_crossentropy", jit_compile=True)
        model.fit(x, y, callbacks=[keras_dst.DynamicSparseTraining(
            prune="magnitude", grow="gradient", update_every=800)])

    The update runs inside the compiled training step (a loop of zero or one
    trip on the step counter, `keras_dst.hooks.run_if`: no host round-trip, one
    step to compile, nothing done at the other steps), at the optimizer steps of
    ``UpdateSteps(update_every, begin_step, end_step)``: ``t = begin_step + j *
    update_every`` (``t >= 1``, ``t <= end_step``), with the default
    ``begin_step=0`` the reference's ``update_every, 2 * update_every, ...``,
    counted by ``optimizer.iterations`` (so it resumes with the optimizer).
    Under a tf.distribute strategy the update runs in cross-replica context in a
    `tf.cond`, and executions that cannot hold an update step run a second
    compiled step without it (see `keras_dst.step_switch`).

    Args:
      prune: pruning criterion: a registered name (``magnitude``, ``set``,
        ``set_legacy``, ``mest``, ``snip``, ``sensitivity``,
        ``reciprocal_sensitivity``, ``random``, ``taylor_fo``,
        ``running_magnitude``, ``running_snip``, or one added with
        `keras_dst.register_criterion`), or a `Criterion` of a registered name
        (e.g. ``keras_dst.get_criterion("mest", gamma=0.1)``) or its config.
      grow: growth rule: ``"random"``, ``"gradient"`` (RigL), ``"momentum"``
        (SNFS), a registered name or a `GrowthRule` of one, or None (prune only: the
        layers `prunable` keeps dense are then left out, which it would shrink for good).
      update_every: ΔT, optimizer steps between updates (int >= 1).
      prune_rate: initial fraction p0 of each layer's active weights to replace,
        in (0, 1] (default 0.5), for a named `schedule`; a schedule object sets
        its own rates, and giving both is refused.
      schedule: ``"cosine"`` (default: p0 to 0.005 over all training steps),
        ``"constant"``, ``"linear"``, or a prune-rate schedule object
        (``keras_dst.schedules.CosineRate`` ...; a registered serializable
        callable of the step).
      begin_step: first step of the update grid (int >= 0; default 0).
      end_step: last step that may update: None (updates to the end, as the
        reference), an int step, or a float in (0, 1) as a fraction of all
        training steps (RigL's 0.75).
      ordering: when the update runs: ``"auto"`` (the criterion's own: the
        reference runs magnitude, SET and random after the optimizer step,
        gradient-based criteria before it), ``"after_optimizer"`` or
        ``"before_optimizer"``; the reference's flag values ``"before"`` (=
        after_optimizer) and ``"after"`` (= before_optimizer) are accepted.
      scope: ``"layer"`` (each layer prunes ``ceil(p a_l)``) or ``"global"`` (one
        ranking across all layers; each layer regrows what it lost).
      grow_exact: True: every layer regrows exactly what it lost; False: the
        reference's Bernoulli random growth (exact in expectation only), with
        ``grow="random"`` only.
      optimizer_state: ``"keep"`` (the reference: never touched) or ``"reset"``
        (the slots of the entries whose mask changed restart from their initial
        value: 0, or Adagrad's and Ftrl's ``initial_accumulator_value``).
      seed: int; all randomness is stateless in (seed, layer, step, the layer's count of
        entries ever active), for one ``jit_compile`` setting: XLA draws other random
        numbers than TensorFlow's kernels from the same seed, so a run and its resume
        use the same setting. Steps are the optimizer's: after ``compile`` with a new
        optimizer they count from 1 again (the schedule restarts, as Keras's learning
        rate schedules do), and the explored count keeps such a run from replaying the
        first run's draws.
      prune_params: dict of criterion parameters (e.g. ``{"gamma": 1.0}`` for mest).
      grow_params: dict of growth parameters.
      normalize, norm_type: score normalisation of the reference
        (``none``/``input``/``output``/``channel``/``depth``/``layer``; ``sum``, the
        reference's default, or ``max``), per group of each layer (`topology.normalize`).
      total_steps: steps of the whole run for the schedules; default
        ``epochs * steps_per_epoch`` of each `fit` (needed only by what is made
        from it: the cosine schedule, a fractional `end_step`). Pass it for one
        schedule over several `fit` calls; a fit that starts after the cosine
        schedule has ended warns. Refused with a schedule object (which sets its
        own steps) unless `end_step` is a fraction.

    `get_config` reports the criterion and growth rule by name with all their
    parameters (``prune_params``/``grow_params``), so an object passed as
    `prune`/`grow` round-trips; a criterion or rule that is not registered (a
    plain callable) is refused here, since a config could not restore it.

    Logs (every batch and epoch; place this callback before CSVLogger and
    TensorBoard so they see them): ``density``, ``prune_rate``, ``pruned``,
    ``grown``, ``mask_churn`` (grown / active at the last update), ``itop`` (fraction of
    entries ever active), and ``density/<weight key>`` (`keras_dst.masks` keys) per layer,
    all over the weights it updates (frozen layers left out, where `keras_dst.density`
    counts them).
    """

    supports_strategies = True

    def __init__(self, prune: Union[str, criteria_lib.Criterion, dict] = "magnitude",
                 grow: Union[str, growth_lib.GrowthRule, dict, None] = "random",
                 update_every: int = 100, prune_rate: Optional[float] = None,
                 schedule: Union[str, Callable, dict] = "cosine", begin_step: int = 0,
                 end_step: Union[int, float, None] = None, ordering: str = "auto",
                 scope: str = "layer", grow_exact: bool = True, optimizer_state: str = "keep",
                 seed: int = 0, prune_params: Optional[Mapping[str, Any]] = None,
                 grow_params: Optional[Mapping[str, Any]] = None, normalize: str = "none",
                 norm_type: str = "sum", total_steps: Optional[int] = None):
        super().__init__()
        self.criterion = _resolve(criteria_lib, "prune", prune, prune_params)
        if grow is None and grow_params:
            raise ValueError(f"DynamicSparseTraining: grow_params={grow_params!r} given with "
                             "grow=None (no growth rule to take them).")
        self.growth = None if grow is None else _resolve(growth_lib, "grow", grow, grow_params)
        self._set_schedule(update_every, schedule, prune_rate)
        self.begin_step = validation.check_step(begin_step, "begin_step")
        self.end_step = self._check_end_step(end_step)
        self.ordering = criteria_lib.canonical_ordering(ordering, "ordering", auto=True)
        self.scope = validation.check_choice(scope, ("layer", "global"), "scope")
        self.grow_exact = validation.check_bool(grow_exact, "grow_exact")
        if not self.grow_exact and (self.growth is None or self.growth.name != "random"):
            raise ValueError(
                f"DynamicSparseTraining: grow_exact=False (the reference's Bernoulli random "
                f"growth) applies to grow='random' only; grow={grow!r} "
                f"{'regrows nothing' if grow is None else 'regrows exactly what each layer lost'}"
                ". Leave grow_exact=True.")
        self.optimizer_state = validation.check_choice(optimizer_state, ("keep", "reset"),
                                                       "optimizer_state")
        self.seed = validation.check_seed(seed)
        self.normalize = validation.check_choice(normalize, topology.NORMALIZE_MODES, "normalize")
        with validation.errors_named(f"DynamicSparseTraining(prune={prune!r})"):
            criteria_lib.check_normalize(self.criterion, self.normalize)
        self.norm_type = validation.check_choice(norm_type, topology.NORM_TYPES, "norm_type")
        self.total_steps = schedules_lib.check_total_steps(total_steps, self.schedule,
                                                           isinstance(self.end_step, float))

    def _check_end_step(self, end_step):
        if end_step is None:
            return None
        if isinstance(end_step, numbers.Real) and not isinstance(end_step, (bool, numbers.Integral)):
            if not 0.0 < end_step < 1.0:
                raise ValueError(f"a float end_step is a fraction in (0, 1), "
                                 f"got end_step={end_step!r}.")
            return float(end_step)
        if not validation.is_int(end_step):
            raise TypeError(f"end_step must be None, an int step or a float fraction in (0, 1), "
                            f"got end_step={end_step!r}.")
        return validation.check_step(end_step, "end_step", minimum=max(self.begin_step, 1))

    @property
    def resolved_ordering(self) -> str:
        """The ordering of the run: the criterion's own for ``"auto"``."""
        return self.criterion.ordering if self.ordering == "auto" else self.ordering

    def update_steps(self, total_steps: Optional[int] = None) -> "schedules_lib.UpdateSteps":
        """The optimizer steps its updates run at (``UpdateSteps.any_between(1, n)``: does
        a run of ``n`` steps update?).

        Args:
          total_steps: the run's steps, which a fractional `end_step` is a fraction of
            (``int(end_step * total_steps)``); default: the constructor's `total_steps`,
            else the current fit's ``epochs * steps_per_epoch``.

        Raises:
          ValueError: a fractional `end_step` whose run length is unknown, or that leaves
            no step from `begin_step` on; `total_steps` < 1.
          TypeError: `total_steps` is not an int.
        """
        if total_steps is not None:
            total_steps = validation.check_positive_int(total_steps, "total_steps")
        end_step = self.end_step
        if not isinstance(end_step, float):
            return schedules_lib.UpdateSteps(self.update_every, self.begin_step, end_step)
        total = total_steps or self.total_steps or self._total_steps(f"end_step={end_step}")
        with validation.errors_named(f"DynamicSparseTraining(end_step={end_step}, a fraction "
                                     f"of the run's {total} steps)"):
            return schedules_lib.UpdateSteps(self.update_every, self.begin_step,
                                             int(end_step * total))

    def _update_steps(self):
        return self.update_steps()

    def _end_from_this_fit(self):
        return isinstance(self.end_step, float) and self.total_steps is None

    def _engine_key(self):
        # Criterion and GrowthRule compare by value (name, functions, params), the
        # schedule by its configuration: a fit of another length compiles again only
        # where the schedule or the update steps depend on it.
        return (self.criterion, self.growth, self._update_steps(), self._schedule_key(),
                self.resolved_ordering, self.scope, self.grow_exact, self.optimizer_state,
                self.seed, self.normalize, self.norm_type)

    def _make_engine(self):
        targets = sparse_targets(self.model, require=True, caller="DynamicSparseTraining",
                                 trainable_only=True)
        if self.growth is None:  # prune only: a layer kept dense would lose weights for good
            targets = without_kept_dense(targets, self.model, "DynamicSparseTraining(grow=None)")
        elif all(bool(np.all(t.mask.numpy())) for t in targets):
            # (every entry active: the regrowth refills exactly what the pruning took)
            user_warnings.warn(
                f"DynamicSparseTraining: every sparsified weight of model '{self.model.name}' "
                "that trains is dense (density 1.0), so its updates prune entries and regrow "
                "the same ones: the topology never changes. Make the model sparse "
                "(keras_dst.prunable(model, density=...) below 1, fewer layers in keep_dense, "
                "or keras_dst.set_masks).")
        if self.criterion.ema and not all(t.state.track_running_scores for t in targets):
            raise ValueError(
                f"DynamicSparseTraining: prune='{self.criterion.name}' keeps running scores; "
                "make the model with keras_dst.prunable(..., track_running_scores=True).")
        optimizer = optimizer_state.base_optimizer(self.model.optimizer)
        if self.optimizer_state == "reset":
            unmapped = optimizer_state.unmapped_state(optimizer, [t.weight for t in targets])
            if unmapped:
                raise ValueError(
                    f"DynamicSparseTraining(optimizer_state='reset'): optimizer "
                    f"{type(optimizer).__name__} keeps state that is not one value per weight "
                    f"entry ({len(unmapped)} variables, e.g. of shapes "
                    f"{sorted({tuple(v.shape) for v in unmapped})[:3]}: factored moments?), so "
                    "it cannot be reset where masks change; use optimizer_state='keep'.")
        if self.growth is not None and self.growth.needs_momentum:
            if optimizer_state.momentum(optimizer, targets[0].weight) is None:
                raise ValueError(
                    f"DynamicSparseTraining(grow={self.growth.name!r}): optimizer "
                    f"{type(optimizer).__name__} keeps no momentum; use SGD with momentum > 0 "
                    "or an Adam-like optimizer (Adam, AdamW, Nadam, Adamax, Lamb, Lion, ...).")
        return TopologyEngine(
            targets, self.criterion, self.growth, self._schedule(), self._update_steps(),
            ordering=self.resolved_ordering, scope=self.scope, grow_exact=self.grow_exact,
            optimizer_state=self.optimizer_state, seed=self.seed, normalize=self.normalize,
            norm_type=self.norm_type)

    def _read_logs(self):
        engine = self.engine
        self._check_last_rate(engine)
        totals = np.array([int(np.prod(t.weight.shape)) for t in engine.targets])
        # the masks as they are (they may have been set since the last update)
        active = np.array([int(np.count_nonzero(t.mask.numpy())) for t in engine.targets])
        _, pruned, grown = engine.layer_stats.numpy().T  # of the last update (0: none yet)
        ever = sum(int(np.count_nonzero(t.ever_active.numpy())) for t in engine.targets)
        logs = {
            "density": float(active.sum() / totals.sum()),
            "prune_rate": float(engine.last_rate.numpy()),
            "pruned": float(pruned.sum()),
            "grown": float(grown.sum()),
            "mask_churn": float(grown.sum() / max(active.sum(), 1)),
            "itop": float(ever / totals.sum()),
        }
        for t, a, n in zip(engine.targets, active, totals):
            logs[f"density/{t.key}"] = distributions.density_of(a, n)
        if self.growth is None:  # pruning without regrowth: the weights it has just emptied
            emptied = [t.key for t, a, p in zip(engine.targets, active, pruned) if p and not a]
            if emptied:
                user_warnings.warn(
                    f"DynamicSparseTraining(grow=None): the update at step "
                    f"{int(engine.last_update_step.numpy())} pruned the last active entries of "
                    f"{emptied}; such a layer passes nothing of its input on (pruning without "
                    "regrowth removes ceil(prune_rate * active) entries at every update, of "
                    "each layer or, in global scope, of all together). Lower prune_rate, stop "
                    "pruning earlier (end_step), or keep the layer dense (prunable(..., "
                    "keep_dense=[...])).")
        return logs

    def get_config(self):
        # (a criterion or rule registered again since, with overwrite=True, is refused: a
        # config would restore the new one)
        criteria_lib.check_serializable(self.criterion, "prune")
        prune = self.criterion.get_config()
        prune_params = prune.pop("params")
        if self.growth is not None:
            growth_lib.check_serializable(self.growth, "grow")
        return dict(prune=prune["name"] if list(prune) == ["name"] else prune,
                    grow=None if self.growth is None else self.growth.name,
                    **self._schedule_config(), begin_step=self.begin_step,
                    end_step=self.end_step, ordering=self.ordering,
                    scope=self.scope, grow_exact=self.grow_exact,
                    optimizer_state=self.optimizer_state, seed=self.seed,
                    prune_params=prune_params,
                    grow_params={} if self.growth is None else dict(self.growth.params),
                    normalize=self.normalize, norm_type=self.norm_type,
                    total_steps=self.total_steps)


def _resolve(registry_module, argument, value, params):
    """The registered criterion / growth rule `value` with `params` merged in.

    Raises ValueError naming `argument` when the name or a parameter is unknown,
    or when `value` could not be restored from a config (not registered).
    """
    get = (registry_module.get_criterion if registry_module is criteria_lib
           else registry_module.get_growth)
    if params is not None and not isinstance(params, collections.abc.Mapping):
        raise TypeError(f"DynamicSparseTraining: {argument}_params must be a dict of parameter "
                        f"values, got {argument}_params={params!r}.")
    with validation.errors_named(f"DynamicSparseTraining({argument}={value!r}, "
                                 f"{argument}_params={params!r})"):
        resolved = get(value, **(params or {}))
        registry_module.check_serializable(resolved, argument)
    return resolved
