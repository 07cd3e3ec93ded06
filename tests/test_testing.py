"""keras_dst.testing.assert_sparse_invariants: passes on a consistent model, fails on
each violation with a message naming the weight and the first offending entry."""

import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_dst
import keras_dst.testing
from keras_dst.masks import SparseTarget
from keras_dst.testing import assert_sparse_invariants

from conftest import mlp, write_underneath


@pytest.fixture
def model():
    return keras_dst.prunable(mlp(), density=0.3)


def _first(model):
    return keras_dst.sparse_targets(model)[0]


def _fails(match, *args, **kwargs):
    with pytest.raises(AssertionError, match=match) as info:
        assert_sparse_invariants(*args, **kwargs)
    return str(info.value)


def test_passes_on_a_consistent_model_and_returns_the_counts(model):
    """(After DST steps too: tests/test_hostile.py, test_mixed_precision.py and
    examples/soak.py call it after every optimizer step.)"""
    assert keras_dst.testing.assert_sparse_invariants is assert_sparse_invariants
    counts = assert_sparse_invariants(model)
    targets = keras_dst.sparse_targets(model)
    assert list(counts) == [t.weight.path for t in targets]  # model order
    assert counts == {k: int(v.sum()) for k, v in keras_dst.masks(model).items()}
    # every accepted form of expected_active, and every optional check
    assert assert_sparse_invariants(model, counts, ever_active=True, dtype="float32") == counts
    assert_sparse_invariants(model, sum(counts.values()))
    assert_sparse_invariants(model, np.int64(sum(counts.values())))
    assert_sparse_invariants(model, lambda t: counts[t.weight.path])
    assert_sparse_invariants(model, lambda t: None)  # no count checked
    assert_sparse_invariants(targets, counts)  # a list of SparseTargets


def test_non_zero_at_a_masked_entry_fails_naming_weight_and_index(model):
    t = _first(model)
    w, m = t.weight.numpy(), t.mask.numpy()
    index = tuple(int(i) for i in np.argwhere(~m)[0])
    w[index] = 1e-30
    write_underneath(t.weight, w)  # underneath Keras: keras_dst's eager assign would re-zero it
    message = _fails("not exactly 0", model)
    assert message.startswith(t.weight.path)
    assert f"1 inactive entries are not exactly 0 (first at index {index}" in message
    # also with every other check off
    _fails("not exactly 0", model, finite=False)


def test_nan_at_a_masked_entry_is_not_zero(model):
    t = _first(model)
    w = t.weight.numpy()
    w[tuple(np.argwhere(~t.mask.numpy())[0])] = np.nan
    write_underneath(t.weight, w)
    _fails(f"^{re.escape(t.weight.path)}: 1 inactive entries are not exactly 0", model,
           finite=False)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_active_weight_fails_unless_finite_is_off(model, value):
    t = _first(model)
    w = t.weight.numpy()
    index = tuple(int(i) for i in np.argwhere(t.mask.numpy())[2])
    w[index] = value
    t.weight.assign(w)
    message = _fails("non-finite", model)
    assert message == (f"{t.weight.path}: 1 active entries are non-finite "
                       f"(first at index {index}: {w[index]!r})")
    assert_sparse_invariants(model, finite=False)


def test_wrong_counts_fail_naming_weight_and_counts(model):
    counts = assert_sparse_invariants(model)
    path = list(counts)[1]
    wrong = dict(counts, **{path: counts[path] + 1})
    assert _fails("expected exactly", model, wrong) == (
        f"{path}: {counts[path]} active entries, expected exactly {counts[path] + 1}")
    total = sum(counts.values())
    _fails(f"^{total} active entries over 3 sparsified weights, expected exactly {total - 1}",
           model, total - 1)
    _fails(f"^{re.escape(path)}: .* expected exactly 0",
           model, lambda t: 0 if t.weight.path == path else None)
    # a mapping must name every sparsified weight, and only those
    _fails(f"{re.escape(path)}: no expected active count",
           model, {k: v for k, v in counts.items() if k != path})
    _fails("names \\['nowhere/kernel'\\], which are not sparsified weights",
           model, dict(counts, **{"nowhere/kernel": 1}))


def test_a_count_change_by_a_mask_write_fails(model):
    counts = assert_sparse_invariants(model)
    t = _first(model)
    m = t.mask.numpy()
    m[tuple(np.argwhere(~m)[0])] = True  # one more active entry (its weight stays 0)
    t.mask.assign(m)
    _fails(f"{re.escape(t.weight.path)}: {counts[t.weight.path] + 1} active entries, "
           f"expected exactly {counts[t.weight.path]}", model, counts)


def test_ever_active_missing_an_active_entry_fails_when_checked(model):
    t = _first(model)
    ever = t.ever_active.numpy()
    index = tuple(int(i) for i in np.argwhere(t.mask.numpy())[0])
    ever[index] = False
    type(t.ever_active).assign(t.ever_active, ever)  # past the write guard
    assert_sparse_invariants(model)  # not checked by default
    _fails(f"ever_active misses 1 active entries \\(first at index {re.escape(str(index))}\\)",
           model, ever_active=True)


def _swap(target, **fields):
    return [target._replace(**fields)]


def test_mask_of_wrong_dtype_or_shape_fails(model):
    t = _first(model)
    shape = tuple(t.weight.shape)
    as_float = keras.Variable(t.mask.numpy().astype("float32"), trainable=False)
    _fails(f"mask is float32{re.escape(str(shape))}, expected bool", _swap(t, mask=as_float))
    transposed = keras.Variable(t.mask.numpy().T, dtype="bool", trainable=False)
    _fails(f"mask is bool{re.escape(str(shape[::-1]))}, expected bool{re.escape(str(shape))}",
           _swap(t, mask=transposed))


def test_tf_variables_and_dtype_objects_are_read_like_keras_variables(model):
    t = _first(model)
    as_tf = t._replace(mask=tf.Variable(t.mask.numpy()), ever_active=tf.Variable(
        t.ever_active.numpy()))
    assert_sparse_invariants([as_tf], dtype=tf.float32, ever_active=True)
    _fails("mask is float32", [t._replace(mask=tf.Variable(t.mask.numpy().astype("float32")))])
    _fails("weight dtype is float32, expected", model, dtype=tf.float16)


def test_score_of_wrong_dtype_or_shape_and_weight_of_wrong_dtype_fail(model):
    t = _first(model)
    shape = tuple(t.weight.shape)
    assert_sparse_invariants(_swap(t, running_score=keras.Variable(np.zeros(shape, "float32"))))
    _fails("running score is float16",
           _swap(t, running_score=keras.Variable(np.zeros(shape, "float16"), dtype="float16")))
    _fails("running score is float32\\(3,\\)",
           _swap(t, running_score=keras.Variable(np.zeros((3,), "float32"))))
    _fails(f"{re.escape(t.weight.path)}: weight dtype is float32, expected float16",
           model, dtype="float16")


def test_model_without_sparse_weights_and_bad_expected_active():
    with pytest.raises(AssertionError, match="no sparsified weights"):
        assert_sparse_invariants(mlp())
    with pytest.raises(AssertionError, match="no sparsified weights"):
        assert_sparse_invariants([])
    model = keras_dst.prunable(mlp(), density=0.3)
    for bad in ("12", True, 1.5, [1, 2, 3]):
        with pytest.raises(TypeError, match="expected_active"):
            assert_sparse_invariants(model, bad)


def test_sparse_target_fields_the_check_relies_on():
    # the test above builds SparseTargets with _replace: keep it honest
    assert {"weight", "mask", "ever_active", "running_score", "pattern"} <= set(SparseTarget._fields)


def test_a_mask_that_breaks_its_pattern_fails():
    model = keras_dst.prunable(mlp((16, 8, 4)), density=0.5, pattern="1x4")
    assert_sparse_invariants(model)
    t = _first(model)
    mask = t.mask.numpy()
    row, col = np.argwhere(mask)[0]
    mask[row, col] = False  # one entry of an active block
    write_underneath(t.mask, mask)  # (keras_dst refuses such a write)
    write_underneath(t.weight, np.where(mask, t.weight.numpy(), 0))
    _fails(r"breaks its pattern '1x4'", model)


def test_the_testing_module_comes_with_the_package():
    """`keras_dst.testing.assert_sparse_invariants(model)`, as documented, after a bare
    `import keras_dst` (a fresh process: here the tests imported it already)."""
    code = "import keras_dst; print(keras_dst.testing.assert_sparse_invariants.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("assert_sparse_invariants")


def test_summary_and_density_refuse_a_model_without_sparse_layers():
    plain = mlp((4, 3))
    for report in (keras_dst.density, keras_dst.summary):
        with pytest.raises(ValueError, match=r"has no sparse layers"):
            report(plain)
