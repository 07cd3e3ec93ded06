"""Prune-rate schedules, the gradual-pruning density curve, and when updates happen.

The prune-rate schedules are those of the reference (`CosineDecay`,
`ConstantDecay`, `LinearDecay` in `sparselearning/decay_schedulers.py` of github
alooow/fantastic_weights_paper), in closed form.

A prune-rate schedule is a callable of the global step (int tensor or int;
int64 fine) returning a float scalar tensor, the rate `p` used by an update at
that step (float64 for the built-ins: see `topology.prune_count`). The built-ins
are small serializable classes (`get_config` / `from_config`, registered with
Keras under package "keras_dst"):

* `CosineRate` (`cosine(...)`): p(t) = floor + (initial - floor) *
  (1 + cos(pi * min(t, T) / T)) / 2, the reference's cosine annealing with
  floor 0.005 over all training steps T; stays at `floor` after T.
* `ConstantRate` (`constant(...)`): p(t) = initial.
* `LinearRate` (`linear(...)`): p(t) = initial * factor ** floor(t / every)
  (the reference's unused "linear": x0.99 every 600 steps).

`get_schedule` resolves these by name ("cosine", "constant", "linear"; case,
"_" and "-" ignored); `register_schedule` adds a name.

`polynomial_density` and `UpdateSteps` reproduce the semantics of TF-MOT's
`PolynomialDecay` pruning schedule (Zhu & Gupta, 2017); `UpdateSteps` is also
the update rule of every hook (see `keras_dst.hooks`).
"""

import dataclasses
import json
import math
import warnings
from typing import Optional

import keras
import tensorflow as tf

from keras_dst import validation
from keras_dst.registry import Registry

_PI = math.pi


def _step(step) -> tf.Tensor:
    # float64, as the reference's Python arithmetic: the prune count ceil(p * a) of a
    # large layer depends on the last bits of p.
    return tf.cast(tf.convert_to_tensor(step), tf.float64)


class _Schedule:
    """Base: `get_config` returns the constructor arguments."""

    _fields = ()

    def _check(self, check, value, name, **kwargs):
        """`check(value, name)` (a `validation` check), its error naming this class."""
        with validation.errors_named(type(self).__name__):
            return check(value, name, **kwargs)

    def get_config(self):
        return {name: getattr(self, name) for name in self._fields}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


@keras.saving.register_keras_serializable(package="keras_dst")
class CosineRate(_Schedule):
    """Cosine annealing from `initial` to `floor` over `total_steps`, then constant.

    Args:
      initial: rate at step 0, in (0, 1] (0.5 in the paper).
      total_steps: T >= 1, the step at which `floor` is reached (all training steps).
      floor: final rate, in [0, 1] (0.005 in the reference).
    """

    _fields = ("initial", "total_steps", "floor")

    def __init__(self, initial: float, total_steps: int, floor: float = 0.005):
        self.initial = self._check(validation.check_density, initial, "initial")
        self.total_steps = self._check(validation.check_positive_int, total_steps, "total_steps")
        self.floor = self._check(validation.check_density, floor, "floor", allow_zero=True)

    def __call__(self, step) -> tf.Tensor:
        progress = tf.minimum(_step(step), float(self.total_steps)) / float(self.total_steps)
        return self.floor + (self.initial - self.floor) * (1.0 + tf.cos(_PI * progress)) / 2.0


@keras.saving.register_keras_serializable(package="keras_dst")
class ConstantRate(_Schedule):
    """The same rate at every step.

    Args:
      initial: the rate, in (0, 1].
    """

    _fields = ("initial",)

    def __init__(self, initial: float):
        self.initial = self._check(validation.check_density, initial, "initial")

    def __call__(self, step) -> tf.Tensor:
        return tf.zeros_like(_step(step)) + self.initial


@keras.saving.register_keras_serializable(package="keras_dst")
class LinearRate(_Schedule):
    """Step decay: `initial * factor ** floor(step / every)`.

    Args:
      initial: rate at step 0, in (0, 1].
      factor: multiplier applied every `every` steps, in (0, 1].
      every: period in steps (>= 1).
    """

    _fields = ("initial", "factor", "every")

    def __init__(self, initial: float, factor: float = 0.99, every: int = 600):
        self.initial = self._check(validation.check_density, initial, "initial")
        self.factor = self._check(validation.check_density, factor, "factor")
        self.every = self._check(validation.check_positive_int, every, "every")

    def __call__(self, step) -> tf.Tensor:
        factor = tf.constant(self.factor, tf.float64)
        return self.initial * tf.pow(factor, tf.floor(_step(step) / float(self.every)))


def cosine(initial: float, total_steps: int, floor: float = 0.005) -> CosineRate:
    """`CosineRate(initial, total_steps, floor)`."""
    return CosineRate(initial, total_steps, floor)


def constant(initial: float) -> ConstantRate:
    """`ConstantRate(initial)`."""
    return ConstantRate(initial)


def linear(initial: float, factor: float = 0.99, every: int = 600) -> LinearRate:
    """`LinearRate(initial, factor, every)`."""
    return LinearRate(initial, factor, every)


SCHEDULES = Registry("prune-rate schedule",
                     register_with="keras_dst.schedules.register_schedule")  # iterating gives the names


def register_schedule(name: str, *, overwrite: bool = False):
    """Decorator registering a prune-rate schedule factory under `name`.

    The factory is called by `get_schedule` as ``factory(initial,
    total_steps)`` (``total_steps`` may be None) and returns a callable
    step -> float32 scalar tensor (serializable, like the built-ins, if it is
    to be saved with a model).

    Args:
      name: registry name (lookup ignores case, "_" and "-").
      overwrite: replace an existing registration of `name`.

    Returns:
      A decorator that registers the factory and returns it unchanged.

    Raises:
      TypeError: `name` is not a str, `overwrite` not a bool, or the decorated
        object is not callable.
      ValueError: `name` is empty, or taken and `overwrite` is False.
    """
    return SCHEDULES.decorator(name, overwrite)


@register_schedule("cosine")
def _cosine_factory(initial, total_steps):
    if total_steps is None:
        raise ValueError("The 'cosine' schedule needs total_steps.")
    return cosine(initial, total_steps)


register_schedule("constant")(lambda initial, total_steps: constant(initial))
register_schedule("linear")(lambda initial, total_steps: linear(initial))


def check_schedule(schedule, name: str = "schedule"):
    """A prune-rate schedule argument that a config can restore, as the constructor keeps it.

    Accepts a name of `SCHEDULES`, a schedule object that round-trips through
    ``keras.saving.serialize_keras_object`` in safe mode (the built-ins, or a
    registered class with `get_config`), or the serialized form of one (a dict,
    from a callback's `get_config`), which is deserialized.

    Raises:
      ValueError: an unknown name, or an object a config cannot restore (e.g. a
        lambda or an unregistered function), naming the argument.
    """
    if isinstance(schedule, dict):
        schedule = keras.saving.deserialize_keras_object(schedule, safe_mode=True)
    if isinstance(schedule, str):
        if schedule not in SCHEDULES:
            raise ValueError(f"{name} must be one of {sorted(SCHEDULES)} or a schedule object, "
                             f"got {name}={schedule!r}{SCHEDULES.unknown_key_hint()}.")
        return SCHEDULES.registered_key(schedule)
    if not callable(schedule):
        raise ValueError(f"{name} must be one of {sorted(SCHEDULES)} or a schedule object "
                         f"(a callable of the step), got {name}={schedule!r}.")
    try:
        with warnings.catch_warnings():  # Keras warns about lambdas: refused below
            warnings.simplefilter("ignore")
            restored = keras.saving.deserialize_keras_object(
                keras.saving.serialize_keras_object(schedule), safe_mode=True)
        restorable = callable(restored)
        cause = "" if restorable else f" (it restored {restored!r}, not a callable)"
    except Exception as e:  # noqa: BLE001 - any failure means "cannot be restored"
        restorable, cause = False, f" ({type(e).__name__}: {e})"
    if not restorable:
        raise ValueError(
            f"{name}={schedule!r} cannot be restored from a config{cause}: use a built-in name, "
            "a keras_dst.schedules object (CosineRate, ConstantRate, LinearRate), or a class "
            "registered with keras.saving.register_keras_serializable that has get_config() "
            "and from_config().")
    return schedule


DEFAULT_PRUNE_RATE = 0.5


def check_prune_rate(prune_rate, schedule) -> Optional[float]:
    """A callback's `prune_rate` for its `schedule` (as `check_schedule` returned it).

    A named schedule starts at `prune_rate` (default `DEFAULT_PRUNE_RATE`); a
    schedule object carries its own rates, so `prune_rate` stays None there.

    Raises:
      TypeError, ValueError: `prune_rate` is not a fraction in (0, 1].
      ValueError: `prune_rate` given with a schedule object (it would be ignored).
    """
    if isinstance(schedule, str):
        return validation.check_density(
            DEFAULT_PRUNE_RATE if prune_rate is None else prune_rate, "prune_rate")
    if prune_rate is not None:
        raise ValueError(
            f"prune_rate={prune_rate!r} was given with schedule={schedule!r}, which sets its "
            "own rates: pass the initial rate to the schedule (e.g. "
            "keras_dst.schedules.CosineRate(initial=..., total_steps=...)) and leave "
            "prune_rate unset.")
    return None


def check_total_steps(total_steps, schedule, fraction_end_step: bool = False) -> Optional[int]:
    """A callback's `total_steps` (None: each `fit`'s own steps) for its `schedule` (as
    `check_schedule` returned it).

    The run's length sets the steps of a named schedule and the step of a fractional
    `end_step` (`fraction_end_step`); a schedule object carries its own steps.

    Raises:
      TypeError, ValueError: `total_steps` is not an int >= 1.
      ValueError: `total_steps` given with a schedule object and no fractional
        `end_step` (it would be ignored).
    """
    if total_steps is None:
        return None
    total_steps = validation.check_positive_int(total_steps, "total_steps")
    if not isinstance(schedule, str) and not fraction_end_step:
        raise ValueError(
            f"total_steps={total_steps!r} was given with schedule={schedule!r}, which sets its "
            "own steps (and no fractional end_step uses it): pass the steps to the schedule "
            "(e.g. keras_dst.schedules.CosineRate(initial=..., total_steps=...)) and leave "
            "total_steps unset.")
    return total_steps


def get_schedule(schedule, initial: float = DEFAULT_PRUNE_RATE, total_steps=None):
    """Resolves a prune-rate schedule.

    Args:
      schedule: "cosine", "constant", "linear" (or a name added with
        `register_schedule`), or a callable of the step (returned unchanged).
      initial: initial rate for named schedules.
      total_steps: T for "cosine" (required there, ignored by "constant" and
        "linear").

    Returns:
      A callable step -> float32 scalar tensor.

    Raises:
      ValueError: unknown name (names it and the known ones), or "cosine"
        without total_steps.
    """
    if callable(schedule):
        return schedule
    return SCHEDULES.get(schedule)(initial, total_steps)


def for_run(schedule, initial: float, total_steps: Optional[int], run_steps):
    """The prune-rate schedule of a training run (a callback's `schedule` argument).

    A named schedule is made with `total_steps`, or else with the run's length
    ``run_steps(None)`` (None when unknown), which it needs only if its factory
    does: "cosine" does, "constant" and "linear" do not. Where a factory refuses
    an unknown length, ``run_steps(what)`` raises the caller's error.

    Args:
      schedule, initial: as `get_schedule`.
      total_steps: the callback's explicit run length, or None.
      run_steps: callable ``what -> int or None``: the run's steps (epochs times
        steps per epoch); with a description `what`, raises ValueError naming it
        when they are unknown.
    """
    if callable(schedule) or total_steps is not None:
        return get_schedule(schedule, initial, total_steps)
    steps = run_steps(None)
    try:
        return get_schedule(schedule, initial, steps)
    except ValueError:
        if steps is None:
            run_steps(f"schedule={schedule!r}")
        raise


def run_key(schedule, initial: float, total_steps: Optional[int], run_steps):
    """Hashable, and equal for two runs whose schedules (`for_run`, same arguments)
    compute the same rates: the class and config of that schedule where it has a
    `get_config` (so "cosine" depends on the run's length, "constant" does not),
    else the arguments it was made from (a callable by identity).
    """
    made = for_run(schedule, initial, total_steps, run_steps)
    if callable(getattr(made, "get_config", None)):
        return type(made), json.dumps(made.get_config(), sort_keys=True, default=repr)
    if callable(schedule):
        return schedule
    return schedule, initial, total_steps if total_steps is not None else run_steps(None)


def polynomial_density(step, initial_density: float, final_density: float, begin_step: int,
                       end_step: int, power: float = 3) -> tf.Tensor:
    """Target density of gradual pruning (Zhu & Gupta, 2017; TF-MOT `PolynomialDecay`).

    ``1 - s`` with the sparsity ``s = s_f + (s_i - s_f) * (1 - q) ** power``,
    ``s_i = 1 - initial_density``, ``s_f = 1 - final_density`` and
    ``q = clip((step - begin_step) / (end_step - begin_step), 0, 1)``:
    `initial_density` up to `begin_step`, `final_density` from `end_step` on.
    Computed in float32 with TF-MOT's operations on the sparsity, so that a run
    matches TF-MOT step by step.

    Args:
      step: int tensor or int, the global step.
      initial_density: density at `begin_step`, in (0, 1].
      final_density: density from `end_step` on, in (0, 1].
      begin_step: first step of the ramp (>= 0).
      end_step: last step of the ramp (> begin_step; TF-MOT divides by zero
        when equal, we refuse it).
      power: exponent (3 in the paper).

    Returns:
      float32 scalar tensor.

    Raises:
      ValueError, TypeError: invalid densities or steps (naming the argument).
    """
    initial_sparsity = 1.0 - validation.check_density(initial_density, "initial_density")
    final_sparsity = 1.0 - validation.check_density(final_density, "final_density")
    begin_step = validation.check_step(begin_step, "begin_step")
    end_step = validation.check_step(end_step, "end_step", minimum=begin_step + 1,
                                     minimum_name=f"begin_step + 1 ({begin_step + 1})")
    step = tf.cast(tf.convert_to_tensor(step), tf.float32)
    progress = (step - float(begin_step)) / float(end_step - begin_step)
    progress = tf.clip_by_value(progress, 0.0, 1.0)
    sparsity = final_sparsity + (initial_sparsity - final_sparsity) * tf.pow(1.0 - progress, float(power))
    return 1.0 - sparsity


@dataclasses.dataclass(frozen=True)
class UpdateSteps:
    """When a hook updates: the one rule read by the compiled step and the host alike.

    The (1-based) steps ``t`` with ``max(begin, 1) <= t``, ``t <= end`` (no bound
    when `end` is None) and ``(t - begin) % every == 0``. With ``begin=0`` these
    are ``every, 2 * every, ...``, the update steps of the reference
    (``sparselearning/core.py``: ``Masking.step`` updates when
    ``steps % update_frequency == 0``); with ``begin > 0`` they are TF-MOT's
    ``PolynomialDecay`` pruning steps (``begin + j * every``).

    Attributes:
      every: period in steps (int >= 1).
      begin: first step of the grid (int >= 0).
      end: last step that may update (int >= begin), or None for no end.
    """

    every: int
    begin: int = 0
    end: Optional[int] = None

    def __post_init__(self):
        object.__setattr__(self, "every", validation.check_positive_int(self.every, "update_every"))
        object.__setattr__(self, "begin", validation.check_step(self.begin, "begin_step"))
        if self.end is not None:
            object.__setattr__(self, "end", validation.check_step(
                self.end, "end_step", minimum=max(self.begin, 1),
                minimum_name=f"begin_step ({self.begin})" if self.begin > 1 else None))

    def is_update_step(self, step) -> tf.Tensor:
        """bool scalar tensor: is `step` (int tensor or int) an update step? Traces under XLA."""
        step = tf.cast(tf.convert_to_tensor(step), tf.int64)
        due = (step >= max(self.begin, 1)) & tf.equal(tf.math.floormod(step - self.begin, self.every), 0)
        if self.end is not None:
            due &= step <= self.end
        return due

    def any_between(self, first: int, last: int) -> bool:
        """Does the step range [first, last] (inclusive) hold an update step? (host, exact)."""
        return bool(self.steps_between(first, last, limit=1))

    def last_at_or_before(self, step: int) -> Optional[int]:
        """The last update step ``<= step`` (host, exact), or None before the first."""
        high = int(step) if self.end is None else min(int(step), self.end)
        last = self.begin + (high - self.begin) // self.every * self.every
        return last if high >= self.begin and last >= max(self.begin, 1) else None

    def steps_between(self, first: int, last: Optional[int], limit: int) -> list:
        """The first `limit` update steps in [first, last] (inclusive; `last` None: no
        bound but `end`), in order (host)."""
        low = max(int(first), self.begin, 1)
        next_update = self.begin + -(-(low - self.begin) // self.every) * self.every
        high = min(h for h in (last, self.end, next_update + (limit - 1) * self.every)
                   if h is not None)
        return list(range(next_update, int(high) + 1, self.every)[:limit]) if low <= high else []
