"""keras_dst.validation: the shared argument checks and the one way to name their owner."""

import pathlib

import pytest

import keras_dst
from keras_dst import validation


@pytest.mark.parametrize("check, value, error", [
    (validation.check_density, 5.0, ValueError),
    (validation.check_density, "half", TypeError),
    (validation.check_positive_int, 0, ValueError),
    (validation.check_positive_int, 1.5, TypeError),
])
def test_errors_named_prefixes_the_owner_and_keeps_the_type(check, value, error):
    with pytest.raises(error) as info:
        with validation.errors_named("Owner(x=1)"):
            check(value, "x")
    assert str(info.value).startswith("Owner(x=1): x must ")
    assert info.value.__suppress_context__  # the re-raise shows one message, not two


def test_errors_named_passes_values_and_other_errors_through():
    with validation.errors_named("Owner"):
        assert validation.check_density(0.5, "x") == 0.5
    with pytest.raises(KeyError, match="^'k'$"):
        with validation.errors_named("Owner"):
            {}["k"]


def test_every_owner_prefix_is_the_helper_s():
    # one rule in one place: the modules that name a check's owner use the helper,
    # not their own try/except re-raise
    package = pathlib.Path(keras_dst.__file__).parent
    for path in package.glob("*.py"):
        if path.name == "validation.py":
            continue
        text = path.read_text()
        assert "raise type(e)(" not in text, path.name
