"""Assertions for tests of sparse models.

`assert_sparse_invariants` checks what must hold for every sparsified weight of a
keras_dst model at any time (after `prunable`, after every optimizer step, after
a topology update, after a load): call it from your own tests, or from a
callback after every batch::

    from keras_dst.testing import assert_sparse_invariants

    counts = assert_sparse_invariants(model)          # {weight key: active count}
    model.fit(x, y, callbacks=[keras_dst.DynamicSparseTraining(...)])
    assert_sparse_invariants(model, expected_active=counts)  # DST keeps every count
"""

from typing import Callable, Dict, Mapping, Optional, Sequence, Union

import keras
import numpy as np

from keras_dst import patterns
from keras_dst.masks import SparseTarget, sparse_targets

__all__ = ["assert_sparse_invariants"]


def assert_sparse_invariants(model: Union["keras.layers.Layer", Sequence[SparseTarget]],
                             expected_active: Union[Mapping[str, int], int,
                                                    Callable[[SparseTarget], Optional[int]],
                                                    None] = None, *,
                             finite: bool = True, ever_active: bool = False,
                             dtype: Optional[str] = None) -> Dict[str, int]:
    """Asserts the sparse invariants of every sparsified weight of `model`.

    For every sparsified weight (`keras_dst.sparse_targets`), in this order:

    * its mask is a bool variable of the weight's shape (and its running score,
      when tracked, a float32 variable of that shape);
    * with `dtype`, the weight's dtype is `dtype`;
    * the weight is exactly 0 wherever the mask is False;
    * the mask satisfies the weight's sparsity pattern (`keras_dst.patterns`:
      whole 1xB blocks, N per M-group, equal fan-in per output unit);
    * with `finite`, the weight is finite wherever the mask is True (so, with
      the previous check, everywhere);
    * with `ever_active`, ``ever_active`` is True wherever the mask is True (it
      holds during training and after every eager write of a mask or of its
      flags: `keras_dst.set_masks`, a load, ``set_weights``, ``assign``; only a
      write past the variables, e.g. into the `tf.Variable` behind one, may
      break it);
    * with `expected_active`, the number of active entries is the expected one.

    Args:
      model: a model or layer containing `SparseWrapper` layers, or a list of
        ``SparseTarget`` (``from keras_dst.masks import SparseTarget``: what
        ``keras_dst.sparse_targets(model)`` returns).
      expected_active: None (counts are not checked), or the expected number of
        active (mask True) entries as
        - a mapping ``{weight key: count}`` (`SparseTarget.key`: the weight's
          path, or its place in the model where paths repeat) that names every
          sparsified weight exactly (a missing or unknown key fails the check);
        - an int: the total over all sparsified weights;
        - a callable ``f(target) -> int or None`` called with each
          `SparseTarget` (None: that weight's count is not checked).
      finite: check that active entries are finite (no NaN/Inf).
      ever_active: check that ``ever_active`` contains the mask.
      dtype: the dtype every sparsified weight must have (e.g. "float32" under a
        mixed precision policy, where the weights stay float32), or None.

    Returns:
      ``{weight key: number of active entries}``, in model order.

    Raises:
      AssertionError: on the first violation; the message names the weight's key,
        the invariant, the number of offending entries and the index of the first.
        Also when `model` has no sparsified weight (a check of nothing).
      TypeError: `expected_active` is none of the above.
    """
    expected = _expected_counts(expected_active)
    if isinstance(model, (list, tuple)) and all(isinstance(t, SparseTarget) for t in model):
        targets = list(model)
    else:
        targets = sparse_targets(model, caller="assert_sparse_invariants()")
    if not targets:
        raise AssertionError(f"{getattr(model, 'name', model)!s} has no sparsified weights: "
                             "nothing to check")
    counts = {}
    for t in targets:
        counts[t.key] = _check_target(t, finite, ever_active, dtype)
    if expected is None:
        return counts
    if isinstance(expected, int):
        total = sum(counts.values())
        if total != expected:
            raise AssertionError(f"{total} active entries over {len(counts)} sparsified weights, "
                                 f"expected exactly {expected} "
                                 f"(per weight: {counts})")
        return counts
    if isinstance(expected, Mapping):
        unknown = sorted(set(expected) - set(counts))
        if unknown:
            raise AssertionError(f"expected_active names {unknown}, which are not sparsified "
                                 f"weights; those are {list(counts)}")
    for t in targets:
        path = t.key
        if isinstance(expected, Mapping):
            if path not in expected:
                raise AssertionError(f"{path}: no expected active count in expected_active")
            want = expected[path]
        else:
            want = expected(t)
            if want is None:
                continue
        if counts[path] != int(want):
            raise AssertionError(f"{path}: {counts[path]} active entries, expected exactly "
                                 f"{int(want)}")
    return counts


def _expected_counts(expected_active):
    if expected_active is None or isinstance(expected_active, Mapping) or \
            callable(expected_active):
        return expected_active
    if isinstance(expected_active, (int, np.integer)) and not isinstance(expected_active, bool):
        return int(expected_active)
    raise TypeError("expected_active must be None, a mapping {weight key: count}, an int "
                    f"(total) or a callable(target) -> int, got {expected_active!r}.")


def _dtype(variable) -> str:
    """'float32', 'bool', ... for a Keras variable (a string) or a tf.Variable (a DType)."""
    dtype = variable.dtype
    return getattr(dtype, "name", str(dtype))


def _first(bad) -> tuple:
    return tuple(int(i) for i in np.argwhere(bad)[0])


def _check_target(t, finite, ever_active, dtype) -> int:
    """Checks one `SparseTarget`; returns its number of active entries."""
    path = t.key
    shape = tuple(t.weight.shape)
    if _dtype(t.mask) != "bool" or tuple(t.mask.shape) != shape:
        raise AssertionError(f"{path}: mask is {_dtype(t.mask)}{tuple(t.mask.shape)}, "
                             f"expected bool{shape}")
    score = t.running_score
    if score is not None and (_dtype(score) != "float32" or tuple(score.shape) != shape):
        raise AssertionError(f"{path}: running score is {_dtype(score)}"
                             f"{tuple(score.shape)}, expected float32{shape}")
    if dtype is not None and _dtype(t.weight) != getattr(dtype, "name", str(dtype)):
        raise AssertionError(f"{path}: weight dtype is {_dtype(t.weight)}, expected {dtype}")
    m = np.asarray(t.mask.numpy())
    w = np.asarray(t.weight.numpy())
    if m.dtype != np.bool_ or m.shape != w.shape:  # the values, as read back
        raise AssertionError(f"{path}: mask reads back as {m.dtype}{m.shape}, "
                             f"expected bool{w.shape}")
    if w.dtype.kind not in "fc":  # e.g. bfloat16 (ml_dtypes): compare as float32
        w = w.astype(np.float32)
    stray = ~m & (w != 0)  # NaN counts as not 0
    if stray.any():
        first = _first(stray)
        raise AssertionError(f"{path}: {int(stray.sum())} inactive entries are not exactly 0 "
                             f"(first at index {first}: {w[first]!r})")
    if finite:
        bad = m & ~np.isfinite(w)
        if bad.any():
            first = _first(bad)
            raise AssertionError(f"{path}: {int(bad.sum())} active entries are non-finite "
                                 f"(first at index {first}: {w[first]!r})")
    problem = patterns.violation(t.pattern, m)
    if problem is not None:
        raise AssertionError(f"{path}: the mask breaks its pattern '{t.pattern}': {problem}")
    if ever_active:
        e = np.asarray(t.ever_active.numpy())
        missed = m & ~e.astype(bool)
        if missed.any():
            raise AssertionError(f"{path}: ever_active misses {int(missed.sum())} active "
                                 f"entries (first at index {_first(missed)})")
    return int(np.count_nonzero(m))
