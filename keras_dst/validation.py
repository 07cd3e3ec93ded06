"""Argument checks shared by every public entry point (floor 1: imports nothing from keras_dst).

Each check returns the value in its canonical type, or raises before any state
changes with a message that names the argument and the value it got:
``TypeError`` for a value of the wrong type, ``ValueError`` for one out of range.
Callers that know more context (a layer, a callback) prefix it to the message.
"""

import contextlib
import math
import numbers
import os
from typing import Collection, Hashable, Iterator, Optional

import numpy as np


def normalize_name(key: Hashable) -> Hashable:
    """The lookup form of a key: strings lower-cased without "_" and "-"; other keys unchanged.
    The one rule by which registered names (`registry.Registry`) and named options
    (`find_choice`) are matched."""
    if isinstance(key, str):
        return key.lower().replace("_", "").replace("-", "")
    return key


@contextlib.contextmanager
def errors_named(owner: str) -> Iterator[None]:
    """Re-raise a check's TypeError / ValueError with `owner` before its message.

    The one way a caller adds its context (a class, a layer, an argument) to the
    message of a check it runs: ``with errors_named("CosineRate"): ...`` turns
    "initial must be in (0, 1], got initial=5.0." into
    "CosineRate: initial must be in (0, 1], got initial=5.0.", same type.
    """
    try:
        yield
    except (TypeError, ValueError) as e:
        raise type(e)(f"{owner}: {e}") from None


def is_int(value) -> bool:
    """Whether `value` is an integer (numpy ints included, bools excluded)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """Whether `value` is a real number (ints and numpy numbers included, bools excluded)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_density(value, name: str = "density", allow_zero: bool = False) -> float:
    """A fraction: `value` as a float in (0, 1] ([0, 1] with `allow_zero`).

    Used for densities, prune rates and other fractions.

    Raises:
      TypeError: `value` is not a real number (bool included).
      ValueError: it is outside the interval, or NaN.
    """
    interval = "[0, 1]" if allow_zero else "(0, 1]"
    if not is_real(value):
        raise TypeError(f"{name} must be a float in {interval}, got {name}={value!r}.")
    low_ok = float(value) >= 0.0 if allow_zero else float(value) > 0.0
    if not (low_ok and float(value) <= 1.0):
        raise ValueError(f"{name} must be in {interval}, got {name}={value!r}.")
    return float(value)


def find_choice(value, choices: Collection[str]) -> Optional[str]:
    """The one of `choices` that `value` names, matched as registered names are (case,
    "_" and "-" ignored: ``"Global"`` gives ``"global"``), or None."""
    if isinstance(value, str):
        for choice in choices:
            if normalize_name(choice) == normalize_name(value):
                return choice
    return None


def check_choice(value, choices: Collection[str], name: str) -> str:
    """`find_choice`, else a ValueError naming `name`, the choices and `value`."""
    choice = find_choice(value, choices)
    if choice is None:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {name}={value!r}.")
    return choice


def check_names(value, name: str) -> tuple:
    """Names: one str, or an iterable (list, tuple, set) of str, as a tuple of str.

    Raises:
      TypeError: `value` is neither a str nor a list, tuple or set (a number, None, a
        dict), or holds something other than a str.
    """
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple, set, frozenset)):
        bad = [v for v in value if not isinstance(v, str)]
        if not bad:
            return tuple(value)
        raise TypeError(f"{name} must hold names (str), got {bad[0]!r} in {name}={value!r}.")
    raise TypeError(f"{name} must be a name or a list of names, got {name}={value!r}.")


_INT64_MAX = 2**63 - 1  # the largest step a model's int64 step counter holds, and our counts


def check_positive_int(value, name: str) -> int:
    """`value` as an int in [1, 2**63 - 1] (bool excluded)."""
    if not is_int(value):
        raise TypeError(f"{name} must be a positive int, got {name}={value!r}.")
    return check_step(value, name, minimum=1)


def check_step(value, name: str, minimum: int = 0, minimum_name: Optional[str] = None) -> int:
    """A training step: `value` as an int in [`minimum`, 2**63 - 1] (the optimizer's int64
    step counter; `minimum` named `minimum_name` in the message)."""
    if not is_int(value):
        raise TypeError(f"{name} must be an int step, got {name}={value!r}.")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum_name or minimum}, got {name}={value!r}.")
    if value > _INT64_MAX:
        raise ValueError(f"{name} must be <= 2**63 - 1 (an int64, as the step counter), got "
                         f"{name}={value!r}.")
    return int(value)


def check_seed(value, name: str = "seed", allow_none: bool = False) -> Optional[int]:
    """A random seed: `value` as an int (numpy ints accepted; None with `allow_none`)."""
    if value is None and allow_none:
        return None
    if not is_int(value):
        allowed = "an int or None" if allow_none else "an int"
        raise TypeError(f"{name} must be {allowed}, got {name}={value!r}.")
    return int(value)


def check_path(value, name: str) -> str:
    """`value` (a str or os.PathLike) as a str path."""
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a str or os.PathLike, got {name}={value!r}.")
    return os.fspath(value)


def check_bool(value, name: str) -> bool:
    """`value` if it is a bool (numpy bools accepted)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {name}={value!r}.")
    return bool(value)


def check_real(value, name: str) -> float:
    """`value` as a finite float."""
    if not is_real(value):
        raise TypeError(f"{name} must be a real number, got {name}={value!r}.")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {name}={value!r}.")
    return float(value)


def check_nonnegative_real(value, name: str) -> float:
    """`value` as a finite float >= 0."""
    value = check_real(value, name)
    if value < 0.0:
        raise ValueError(f"{name} must be >= 0, got {name}={value!r}.")
    return value


def check_positive_real(value, name: str) -> float:
    """`value` as a finite float > 0."""
    if not is_real(value):
        raise TypeError(f"{name} must be a real number > 0, got {name}={value!r}.")
    if not (float(value) > 0.0 and float(value) != float("inf")):
        raise ValueError(f"{name} must be a finite real > 0, got {name}={value!r}.")
    return float(value)
