"""Argument checks shared by every public entry point (clear errors, raised early)."""

import numbers


def check_density(value, name="density", allow_zero=False):
    """Returns `value` as a float if it is a real number in (0, 1] ([0, 1] with `allow_zero`).

    Raises:
      TypeError: if `value` is not a real number (bool included).
      ValueError: if it is outside (0, 1] or NaN.
    """
    interval = "[0, 1]" if allow_zero else "(0, 1]"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float in {interval}, got {name}={value!r}.")
    low_ok = float(value) >= 0.0 if allow_zero else float(value) > 0.0
    if not (low_ok and float(value) <= 1.0):
        raise ValueError(f"{name} must be in {interval}, got {name}={value!r}.")
    return float(value)


def check_choice(value, choices, name):
    """Returns `value` if it is one of `choices`, else raises a ValueError naming both."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {name}={value!r}.")
    return value


def check_positive_int(value, name):
    """Returns `value` if it is an int >= 1 (bool excluded)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {name}={value!r}.")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {name}={value!r}.")
    return int(value)
