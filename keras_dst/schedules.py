"""Prune-rate schedules and the gradual-pruning sparsity curve.

The prune-rate schedules are those of the reference (`CosineDecay`,
`ConstantDecay`, `LinearDecay` in `sparselearning/decay_schedulers.py` of github
alooow/fantastic_weights_paper), in closed form.

A prune-rate schedule is a callable of the global step (int tensor or int;
int64 fine) returning a float32 scalar tensor, the rate `p` used by an update
at that step. The built-ins are small serializable classes (`get_config` /
`from_config`, registered with Keras under package "keras_dst"):

* `CosineRate` (`cosine(...)`): p(t) = floor + (initial - floor) *
  (1 + cos(pi * min(t, T) / T)) / 2, the reference's cosine annealing with
  floor 0.005 over all training steps T; stays at `floor` after T.
* `ConstantRate` (`constant(...)`): p(t) = initial.
* `LinearRate` (`linear(...)`): p(t) = initial * factor ** floor(t / every)
  (the reference's unused "linear": x0.99 every 600 steps).

`get_schedule` resolves these by name ("cosine", "constant", "linear"; case,
"_" and "-" ignored); `register_schedule` adds a name.

`polynomial_sparsity` / `should_update` reproduce the semantics of
TF-MOT's `PolynomialDecay` pruning schedule (Zhu & Gupta, 2017).
"""

import math

import keras
import tensorflow as tf

from keras_dst.registry import Registry

_PI = math.pi


def _step(step) -> tf.Tensor:
    # float64, as the reference's Python arithmetic: the prune count ceil(p * a) of a
    # large layer depends on the last bits of p.
    return tf.cast(tf.convert_to_tensor(step), tf.float64)


class _Schedule:
    """Base: `get_config` returns the constructor arguments."""

    _fields = ()

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
      initial: rate at step 0 (0.5 in the paper).
      total_steps: T, the step at which `floor` is reached (all training steps).
      floor: final rate (0.005 in the reference).
    """

    _fields = ("initial", "total_steps", "floor")

    def __init__(self, initial: float, total_steps: int, floor: float = 0.005):
        if total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {total_steps}.")
        self.initial, self.total_steps, self.floor = float(initial), int(total_steps), float(floor)

    def __call__(self, step) -> tf.Tensor:
        progress = tf.minimum(_step(step), float(self.total_steps)) / float(self.total_steps)
        return self.floor + (self.initial - self.floor) * (1.0 + tf.cos(_PI * progress)) / 2.0


@keras.saving.register_keras_serializable(package="keras_dst")
class ConstantRate(_Schedule):
    """The same rate at every step.

    Args:
      initial: the rate.
    """

    _fields = ("initial",)

    def __init__(self, initial: float):
        self.initial = float(initial)

    def __call__(self, step) -> tf.Tensor:
        return tf.zeros_like(_step(step)) + self.initial


@keras.saving.register_keras_serializable(package="keras_dst")
class LinearRate(_Schedule):
    """Step decay: `initial * factor ** floor(step / every)`.

    Args:
      initial: rate at step 0.
      factor: multiplier applied every `every` steps.
      every: period in steps.
    """

    _fields = ("initial", "factor", "every")

    def __init__(self, initial: float, factor: float = 0.99, every: int = 600):
        if every <= 0:
            raise ValueError(f"every must be positive, got {every}.")
        self.initial, self.factor, self.every = float(initial), float(factor), int(every)

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


SCHEDULES = Registry("prune-rate schedule")  # iterating gives the names


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
      ValueError: `name` is taken and `overwrite` is False.
    """
    SCHEDULES.check_available(name, overwrite)

    def decorator(factory):
        SCHEDULES.register(name, factory, overwrite=overwrite)
        return factory

    return decorator


@register_schedule("cosine")
def _cosine_factory(initial, total_steps):
    if total_steps is None:
        raise ValueError("The 'cosine' schedule needs total_steps.")
    return cosine(initial, total_steps)


register_schedule("constant")(lambda initial, total_steps: constant(initial))
register_schedule("linear")(lambda initial, total_steps: linear(initial))


def get_schedule(schedule, initial: float = 0.5, total_steps=None):
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


def _check_range(begin_step: int, end_step: int, frequency: int, allow_forever: bool):
    if begin_step < 0:
        raise ValueError(f"begin_step must be >= 0, got {begin_step}.")
    if frequency <= 0:
        raise ValueError(f"frequency must be > 0, got {frequency}.")
    if allow_forever and end_step == -1:
        return
    too_small = end_step < begin_step if allow_forever else end_step <= begin_step
    if too_small:
        relation = ">=" if allow_forever else ">"
        raise ValueError(f"end_step ({end_step}) must be {relation} begin_step ({begin_step}).")


def polynomial_sparsity(step, initial_sparsity: float, final_sparsity: float, begin_step: int, end_step: int,
                        power: float = 3, frequency: int = 100) -> tf.Tensor:
    """Target sparsity of gradual pruning (Zhu & Gupta; TF-MOT `PolynomialDecay`).

    sparsity = final + (initial - final) * (1 - q) ** power with
    q = clip((step - begin_step) / (end_step - begin_step), 0, 1): `initial`
    up to `begin_step`, `final` from `end_step` on. `frequency` is only
    validated here (see `should_update`); it is accepted so that both
    functions take the same arguments.

    Args:
      step: int tensor or int, the global step.
      initial_sparsity: sparsity at `begin_step`, in [0, 1).
      final_sparsity: sparsity from `end_step` on, in [0, 1).
      begin_step: first step of the ramp (>= 0).
      end_step: last step of the ramp (> begin_step; TF-MOT divides by zero
        when equal, we refuse it).
      power: exponent (3 in the paper).
      frequency: pruning period in steps (> 0).

    Returns:
      float32 scalar tensor.

    Raises:
      ValueError: invalid sparsities or steps.
    """
    for name, value in (("initial_sparsity", initial_sparsity), ("final_sparsity", final_sparsity)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}.")
    _check_range(begin_step, end_step, frequency, allow_forever=False)
    # float32, as TF-MOT's PolynomialDecay (parity with it step by step)
    step = tf.cast(tf.convert_to_tensor(step), tf.float32)
    progress = (step - float(begin_step)) / float(end_step - begin_step)
    progress = tf.clip_by_value(progress, 0.0, 1.0)
    return final_sparsity + (initial_sparsity - final_sparsity) * tf.pow(1.0 - progress, float(power))


def should_update(step, begin_step: int, end_step: int, frequency: int = 100) -> tf.Tensor:
    """Whether gradual pruning acts at `step` (TF-MOT semantics).

    True iff begin_step <= step <= end_step and (step - begin_step) % frequency
    == 0; `end_step = -1` means no end.

    Args:
      step: int tensor or int, the global step.
      begin_step: first pruning step (>= 0).
      end_step: last pruning step (>= begin_step), or -1 for no end.
      frequency: period in steps (> 0).

    Returns:
      bool scalar tensor.
    """
    _check_range(begin_step, end_step, frequency, allow_forever=True)
    step = tf.cast(tf.convert_to_tensor(step), tf.int64)
    in_range = step >= begin_step
    if end_step != -1:
        in_range &= step <= end_step
    return in_range & tf.equal(tf.math.floormod(step - begin_step, frequency), 0)
