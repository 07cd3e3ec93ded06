"""Tests of keras_dst.criteria: scores, SET rules, registry, `select_pruned`, EMA, configs."""

import json
import math

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import keras_dst
from keras_dst import criteria, topology
from keras_dst.criteria import Criterion, get_criterion, register_criterion
from keras_dst.registry import Registry
from keras_dst.scoring import ScoreInputs

from conftest import score_inputs

SETTINGS = settings(max_examples=40, deadline=None)
SEED = tf.constant([4, 2])
# No subnormals: TensorFlow's CPU kernels flush them to zero (so `w > 0` differs from
# NumPy's), a platform property, not a criterion's.
VALUES = (st.sampled_from([-3.0, -1.0, -0.5, -0.0, 0.0, 0.5, 1.0, 2.0])
          | st.floats(-10, 10, width=32, allow_subnormal=False))
SHAPES = hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=4)


@st.composite
def weights_and_gradients(draw):
    shape = draw(SHAPES)
    w = draw(hnp.arrays(np.float32, shape, elements=VALUES))
    g = draw(hnp.arrays(np.float32, shape, elements=VALUES))
    mask = draw(hnp.arrays(np.bool_, shape))
    return w, g, mask


def make_inputs(w, g=None, mask=None, momentum=None):
    return score_inputs(w, g, mask, momentum, seed=SEED)


def count_active(mask):
    return int(tf.reduce_sum(tf.cast(mask, tf.int32)))


NUMPY_SCORES = {
    "magnitude": lambda w, g: np.abs(w),
    "mest": lambda w, g: np.abs(w) + np.float32(1.0) * np.abs(g),
    "snip": lambda w, g: np.abs(w * g) + np.float32(1e-5),
    "sensitivity": lambda w, g: np.abs(g) / (np.abs(w) + np.float32(1e-8)) + np.float32(1),
    "reciprocal_sensitivity": lambda w, g: np.abs(w) / (np.abs(g) + np.float32(1e-8)) + np.float32(1),
    "taylor_fo": lambda w, g: (w * g) ** 2,
    "running_magnitude": lambda w, g: np.abs(w),
    "running_snip": lambda w, g: np.abs(w * g),
}


@SETTINGS
@given(weights_and_gradients())
def test_scores_match_numpy(case):
    w, g, mask = case
    inputs = make_inputs(w, g, mask)
    for name, reference in NUMPY_SCORES.items():
        got = get_criterion(name).evaluate(inputs).numpy()
        assert got.shape == w.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, reference(w, g), rtol=1e-6, atol=1e-30, err_msg=name)  # TF flushes subnormals


def test_mest_gamma_param():
    w, g = np.array([1.0, -2.0, 0.0], np.float32), np.array([0.5, 0.5, -4.0], np.float32)
    got = get_criterion("mest", gamma=0.1).evaluate(make_inputs(w, g)).numpy()
    np.testing.assert_allclose(got, np.abs(w) + 0.1 * np.abs(g), rtol=1e-6)


def test_hand_worked_scores():
    inputs = make_inputs([2.0, -0.5, 0.0], [0.25, -4.0, 3.0])
    expect = {
        "magnitude": [2.0, 0.5, 0.0],
        "mest": [2.25, 4.5, 3.0],
        "snip": [0.5 + 1e-5, 2.0 + 1e-5, 1e-5],
        "sensitivity": [1.125, 9.0, 3e8 + 1],
        "reciprocal_sensitivity": [9.0, 1.125, 1.0],
        "taylor_fo": [0.25, 4.0, 0.0],
    }
    for name, values in expect.items():
        np.testing.assert_allclose(get_criterion(name).evaluate(inputs).numpy(), values, rtol=1e-6, err_msg=name)


@pytest.mark.parametrize("name, ordering, needs_gradient", [
    ("magnitude", "after_optimizer", False), ("set", "after_optimizer", False),
    ("set_legacy", "after_optimizer", False), ("random", "after_optimizer", False),
    ("running_magnitude", "after_optimizer", False), ("mest", "before_optimizer", True),
    ("snip", "before_optimizer", True), ("sensitivity", "before_optimizer", True),
    ("reciprocal_sensitivity", "before_optimizer", True), ("taylor_fo", "before_optimizer", True),
    ("running_snip", "before_optimizer", True),
])
def test_reference_ordering_mapping(name, ordering, needs_gradient):
    c = get_criterion(name)
    assert (c.ordering, c.needs_gradient) == (ordering, needs_gradient)
    assert c.ema == name.startswith("running")


@pytest.mark.parametrize("name", ["magnitude", "mest", "snip", "sensitivity", "reciprocal_sensitivity",
                                  "taylor_fo", "random"])
@pytest.mark.parametrize("rate", [0.5, 0.1, 0.005])
def test_exact_removed_count_and_lowest_scores(name, rate):
    rng = np.random.default_rng(1)
    w = rng.normal(size=(40, 25)).astype(np.float32)  # continuous: no ties
    g = rng.normal(size=(40, 25)).astype(np.float32)
    mask = rng.random((40, 25)) < 0.4
    w = np.where(mask, w, 0.0)
    inputs = make_inputs(w, g, mask)
    criterion = get_criterion(name)
    r = topology.prune_count(mask.sum(), rate)
    assert int(r) == math.ceil(rate * mask.sum())
    new = criteria.select_pruned(criterion, [inputs], r)[0].numpy()
    assert mask.sum() - new.sum() == int(r)
    assert not (new & ~mask).any()
    scores = criterion.evaluate(inputs).numpy()
    assert scores[mask & ~new].max() <= scores[new].min()


def test_random_is_seeded_uniform_subset():
    mask = np.ones(20, bool)
    random = get_criterion("random")

    def removed(seed):
        inputs = ScoreInputs(tf.zeros([20]), tf.zeros([20]), tf.constant(mask), tf.stack([seed, 0]))
        return tf.logical_not(criteria.select_pruned(random, [inputs], 5)[0])

    np.testing.assert_array_equal(removed(tf.constant(1)), removed(tf.constant(1)))
    traced = tf.function(removed)  # traced once for the 300 draws (eager: ~3x the time)
    np.testing.assert_array_equal(traced(tf.constant(1)), removed(tf.constant(1)))
    frequency = np.mean([traced(tf.constant(s)).numpy() for s in range(300)], axis=0)
    assert frequency.sum() == pytest.approx(5)
    assert np.all(np.abs(frequency - 0.25) < 0.12)  # every position about equally likely


# ---------------------------------------------------------------------------
# SET family.


def np_set(w, mask, r):
    """Correct SET, count-exact: h smallest non-negatives, h negatives closest to 0."""
    h = -(-max(r, 0) // 2)
    flat, active = w.ravel(), mask.ravel()
    idx = np.arange(flat.size)
    non_neg = [i for i in np.lexsort((idx, flat)) if active[i] and not flat[i] < 0]
    neg = [i for i in np.lexsort((idx, -flat)) if active[i] and flat[i] < 0]
    removed = np.zeros(flat.size, bool)
    removed[non_neg[:h]] = True
    removed[neg[:h]] = True
    return (mask.ravel() & ~removed).reshape(w.shape)


def np_set_legacy(w, mask, r):
    """Legacy rule with the reference's Python indexing (index -1 = last)."""
    h = -(-max(r, 0) // 2)
    active = w[mask]
    pos, neg = np.sort(active[active > 0]), np.sort(active[active < 0])
    keep = np.zeros(w.shape, bool)
    if pos.size:
        theta_p = pos[min(h, pos.size) - 1]
        keep |= mask & (w > 0) & (w > theta_p)
    if neg.size:
        theta_q = neg[min(h, neg.size) - 1]
        keep |= mask & (w < 0) & (w < theta_q)
    return keep


def set_new_mask(name, w, mask, r):
    return criteria.select_pruned(get_criterion(name), [make_inputs(w, mask=mask)], r)[0].numpy()


@SETTINGS
@given(weights_and_gradients(), st.integers(0, 30))
def test_set_matches_reference(case, r):
    w, _, mask = case
    np.testing.assert_array_equal(set_new_mask("set", w, mask, r), np_set(w, mask, r))


@SETTINGS
@given(weights_and_gradients(), st.integers(0, 30))
def test_set_legacy_matches_reference(case, r):
    w, _, mask = case
    np.testing.assert_array_equal(set_new_mask("set_legacy", w, mask, r), np_set_legacy(w, mask, r))


def test_set_removes_half_per_sign():
    w = np.array([0.3, -0.1, 0.2, -0.5, 0.9, -0.05, 0.1, -2.0, 0.7, -0.3], np.float32)
    new = set_new_mask("set", w, np.ones(10, bool), 4)  # h = 2
    removed = set(np.flatnonzero(~new))
    assert removed == {6, 2, 5, 1}  # positives 0.1, 0.2; negatives -0.05, -0.1
    new = set_new_mask("set", w, np.ones(10, bool), 3)  # h = 2 as well (2h = r + 1)
    assert set(np.flatnonzero(~new)) == {6, 2, 5, 1}


def test_set_edge_cases():
    only_positive = np.array([0.5, 0.1, 0.3], np.float32)
    new = set_new_mask("set", only_positive, np.ones(3, bool), 4)  # h = 2, no negative: no shift
    np.testing.assert_array_equal(new, [True, False, False])
    np.testing.assert_array_equal(set_new_mask("set", only_positive, np.ones(3, bool), 0), [True] * 3)  # h = 0
    with_zero = np.array([0.0, 0.2, -0.3, 0.1], np.float32)
    np.testing.assert_array_equal(set_new_mask("set", with_zero, np.ones(4, bool), 1), [False, True, False, True])
    inactive = np.array([0.0, 0.2, 0.0, 0.1], np.float32)
    np.testing.assert_array_equal(set_new_mask("set", inactive, np.array([0, 1, 0, 1], bool), 2),
                                  [False, True, False, False])


def test_set_legacy_edge_cases():
    w = np.array([0.5, 0.1, -0.3, -0.2, -0.9], np.float32)
    # r = 0, h = 0: every positive goes, and the negative closest to zero.
    np.testing.assert_array_equal(set_new_mask("set_legacy", w, np.ones(5, bool), 0), [0, 0, 1, 0, 1])
    # h = 1: smallest positive; keep h - 1 = 0 negatives.
    np.testing.assert_array_equal(set_new_mask("set_legacy", w, np.ones(5, bool), 2), [1, 0, 0, 0, 0])
    # No negative at all: no crash, positives follow the rule.
    np.testing.assert_array_equal(set_new_mask("set_legacy", np.array([0.5, 0.1], np.float32), np.ones(2, bool), 2),
                                  [1, 0])
    # No positive at all.
    only_negative = np.array([-0.5, -0.1, -0.3], np.float32)  # h = 2: keep the h - 1 = 1 most negative
    np.testing.assert_array_equal(set_new_mask("set_legacy", only_negative, np.ones(3, bool), 4), [1, 0, 0])


@pytest.mark.parametrize("rate", [0.5, 0.1, 0.005])
def test_set_vs_legacy_on_gaussian_weights(rate):
    w = np.random.default_rng(0).standard_normal(10000).astype(np.float32)
    mask = np.ones(10000, bool)
    r = int(topology.prune_count(10000, rate))
    h = -(-r // 2)
    correct = set_new_mask("set", w, mask, r)
    legacy = set_new_mask("set_legacy", w, mask, r)
    assert (~correct).sum() == 2 * h
    assert set(np.flatnonzero(~correct)) == set(np.flatnonzero(~np_set(w, mask, r)))
    assert (~legacy).sum() == (w < 0).sum() + 1  # all negatives but h - 1, plus h positives


def test_set_refuses_normalisation():
    with pytest.raises(ValueError, match="normalize"):
        criteria.select_pruned(get_criterion("set"), [make_inputs([1.0, -1.0])], 1, normalize="layer")
    with pytest.raises(ValueError, match="no per-entry score"):
        get_criterion("set").evaluate(make_inputs([1.0]))


def test_global_set_equals_set_on_concatenation():
    rng = np.random.default_rng(3)
    layers = [rng.normal(size=s).astype(np.float32) for s in ((3, 4), (5,), (2, 2, 2))]
    masks = [rng.random(w.shape) < 0.7 for w in layers]
    inputs = [make_inputs(np.where(m, w, 0), mask=m) for w, m in zip(layers, masks)]
    new = criteria.select_pruned(get_criterion("set"), inputs, 6)
    flat_w = np.concatenate([np.where(m, w, 0).ravel() for w, m in zip(layers, masks)])
    expected = np_set(flat_w, np.concatenate([m.ravel() for m in masks]), 6)
    np.testing.assert_array_equal(np.concatenate([n.numpy().ravel() for n in new]), expected)
    assert [n.shape for n in new] == [w.shape for w in layers]


def test_set_under_xla():
    set_criterion, legacy = get_criterion("set"), get_criterion("set_legacy")

    @tf.function(jit_compile=True)
    def both(w, mask, count):
        inputs = ScoreInputs(w, tf.zeros_like(w), mask, SEED)
        return (criteria.select_pruned(set_criterion, [inputs], count)[0],
                criteria.select_pruned(legacy, [inputs], count)[0])

    rng = np.random.default_rng(5)
    w = rng.integers(-3, 4, (6, 7)).astype(np.float32)  # ties and zeros
    mask = rng.random((6, 7)) < 0.8
    w = np.where(mask, w, 0)
    for r in (0, 1, 5, 12):
        new, new_legacy = both(w, mask, tf.constant(r))
        np.testing.assert_array_equal(new.numpy(), np_set(w, mask, r))
        np.testing.assert_array_equal(new_legacy.numpy(), np_set_legacy(w, mask, r))
    assert both.experimental_get_tracing_count() == 1


# ---------------------------------------------------------------------------
# Running criteria.


def test_ema_update_sequence():
    c = get_criterion("running_snip")
    assert c.params["beta"] == 0.9 and c.ema
    scores = [np.array([1.0, 4.0], np.float32), np.array([3.0, 0.0], np.float32), np.array([2.0, 2.0], np.float32)]
    state, initialized = tf.zeros([2]), tf.constant(False)
    expected = None
    for s in scores:
        state = criteria.ema_update(state, tf.constant(s), initialized, c.params["beta"])
        expected = s if expected is None else 0.9 * expected + 0.1 * s
        initialized = tf.constant(True)
        np.testing.assert_allclose(state.numpy(), expected, rtol=1e-6)
    # Cleared after an update: the next value restarts from the score.
    restarted = criteria.ema_update(state, tf.constant([7.0, 8.0]), tf.constant(False), 0.9)
    np.testing.assert_array_equal(restarted.numpy(), [7.0, 8.0])
    frozen = criteria.ema_update(tf.constant([1.0]), tf.constant([5.0]), True, 1.0)
    np.testing.assert_array_equal(frozen.numpy(), [1.0])
    assert get_criterion("running_magnitude", beta=0.5).params["beta"] == 0.5


# ---------------------------------------------------------------------------
# `select_pruned`: a criterion applied across tensors (layer or global scope).


def test_select_pruned_layer_and_global_scope():
    w = [tf.constant([[0.1, -3.0], [2.0, -0.2]]), tf.constant([0.05, 4.0, 0.0])]
    masks = [tf.ones([2, 2], tf.bool), tf.constant([True, True, False])]
    inputs = [ScoreInputs(wi, tf.zeros_like(wi), mi, tf.constant([1, 2])) for wi, mi in zip(w, masks)]
    magnitude = get_criterion("magnitude")
    layer = criteria.select_pruned(magnitude, inputs[:1], 1)
    np.testing.assert_array_equal(layer[0].numpy(), [[0, 1], [1, 1]])
    both = criteria.select_pruned(magnitude, inputs, 2)
    np.testing.assert_array_equal(both[0].numpy(), [[0, 1], [1, 1]])
    np.testing.assert_array_equal(both[1].numpy(), [0, 1, 0])
    # Precomputed scores (e.g. an EMA state) replace the criterion's score.
    custom = criteria.select_pruned(magnitude, inputs[:1], 1, scores_list=[tf.constant([[9.0, 9.0], [0.0, 9.0]])])
    np.testing.assert_array_equal(custom[0].numpy(), [[1, 1], [0, 1]])


def test_select_pruned_normalizes_per_layer():
    # Layer 0 has large magnitudes, layer 1 small ones: without normalisation
    # both removals come from layer 1, with "layer" normalisation (by the sum) one each.
    w = [tf.constant([10.0, 20.0, 40.0]), tf.constant([1.0, 2.0, 4.0])]
    inputs = [ScoreInputs(wi, tf.zeros_like(wi), tf.ones([3], tf.bool), tf.constant([0, 0])) for wi in w]
    magnitude = get_criterion("magnitude")
    plain = criteria.select_pruned(magnitude, inputs, 2)
    assert [int(tf.reduce_sum(tf.cast(m, tf.int32))) for m in plain] == [3, 1]
    normed = criteria.select_pruned(magnitude, inputs, 2, normalize="layer")
    assert [int(tf.reduce_sum(tf.cast(m, tf.int32))) for m in normed] == [2, 2]


def _reference_global_prune(scores, masks, rate):
    """The reference's global pruning (`GlobalPruner.get_threshold` in
    sparselearning/pruners.py) with score normalisation "layer" (sum): masked scores
    divided by their layer's sum, threshold at the k-th lowest of all, k = zeros +
    ceil(rate * nonzeros), entries above it kept."""
    normed = [s * m / (s * m).sum() for s, m in zip(scores, masks)]
    nonzeros = sum(int(m.sum()) for m in masks)
    k = sum(m.size for m in masks) - nonzeros + math.ceil(rate * nonzeros)
    threshold = np.sort(np.concatenate([n.ravel() for n in normed]))[k - 1]
    return [n > threshold for n in normed], math.ceil(rate * nonzeros)


@pytest.mark.parametrize("name, params, reference_score", [
    ("reciprocal_sensitivity", {"offset": 0.0}, lambda w, g: np.abs(w) / (np.abs(g) + 1e-8)),
    ("snip", {"offset": 1e-8}, lambda w, g: np.abs(w * g) + 1e-8)])
def test_global_scope_with_normalisation_reproduces_the_reference_with_its_global_offset(
        name, params, reference_score):
    """The reference scores reciprocal sensitivity without its layer-wise +1, and SNIP with
    1e-8 for 1e-5, in global scope (`ReciprocalSensitivityGlobalPruner`,
    `SNIPGlobalPruner`); with normalisation the offset enters each layer's sum and moves
    entries between layers, so the `offset` parameter reproduces it."""
    rng = np.random.default_rng(3)
    shapes, rate = [(12, 10), (30, 4)], 0.3
    w = [rng.normal(size=s).astype(np.float32) * scale for s, scale in zip(shapes, (1.0, 0.05))]
    g = [rng.normal(size=s).astype(np.float32) * scale for s, scale in zip(shapes, (0.01, 1.0))]
    m = [rng.random(s) < 0.6 for s in shapes]
    w = [wi * mi for wi, mi in zip(w, m)]  # inactive weights are 0, as in a masked model
    expected, count = _reference_global_prune([reference_score(*a) for a in zip(w, g)], m, rate)
    inputs = [ScoreInputs(tf.constant(wi), tf.constant(gi), tf.constant(mi), tf.constant([0, 0]))
              for wi, gi, mi in zip(w, g, m)]
    got = criteria.select_pruned(get_criterion(name, **params), inputs, count, normalize="layer")
    for new, want in zip(got, expected):
        np.testing.assert_array_equal(new.numpy(), want)
    if name == "reciprocal_sensitivity":  # the layer-wise +1 moves entries between the layers here
        default = criteria.select_pruned(get_criterion(name), inputs, count, normalize="layer")
        assert any((d.numpy() != e).any() for d, e in zip(default, expected))


def test_select_pruned_nonfinite_gradients_keep_exact_count():
    w = tf.random.stateless_normal([50], seed=[1, 1])
    g = tf.tensor_scatter_nd_update(tf.ones([50]), [[3], [10], [20]], [np.nan, np.inf, -np.inf])
    mask = tf.constant(np.arange(50) < 40)
    inputs = ScoreInputs(w, g, mask, tf.constant([0, 0]))
    for name in ("snip", "mest", "sensitivity", "reciprocal_sensitivity", "taylor_fo"):
        new = criteria.select_pruned(get_criterion(name), [inputs], 10)[0]
        assert int(tf.reduce_sum(tf.cast(new, tf.int32))) == 30, name
        assert not (new.numpy() & ~mask.numpy()).any(), name
    regrown = topology.grow(tf.abs(g), new, 10)
    assert int(tf.reduce_sum(tf.cast(regrown, tf.int32))) == 40


# ---------------------------------------------------------------------------
# Registry.


def test_names_and_lookup():
    names = criteria.criterion_names()
    for name in ("magnitude", "set", "set_legacy", "mest", "snip", "sensitivity", "reciprocal_sensitivity",
                 "random", "taylor_fo", "running_magnitude", "running_snip"):
        assert name in names
    assert get_criterion("ReciprocalSensitivity").name == "reciprocal_sensitivity"
    assert get_criterion("MEST").name == "mest"


def test_unknown_name_and_param_errors():
    with pytest.raises(ValueError, match="'nope'.*magnitude"):
        get_criterion("nope")
    with pytest.raises(ValueError, match="'gama'"):
        get_criterion("mest", gama=1.0)
    with pytest.raises(ValueError, match="'beta'"):
        get_criterion("snip", beta=0.1)
    with pytest.raises(ValueError, match="ordering"):
        get_criterion("magnitude", ordering="during")
    with pytest.raises(ValueError, match="gradient"):
        get_criterion("snip").evaluate(ScoreInputs(tf.ones([2]), None, tf.ones([2], tf.bool), SEED))
    with pytest.raises(TypeError, match=r"Cannot interpret 42 as a criterion; use a name"):
        get_criterion(42)
    with pytest.raises(TypeError, match=r"The config of criterion 'magnitude': params must be a "
                                        r"dict, got params=None"):
        get_criterion({"name": "magnitude", "params": None})


def test_params_are_merged_and_immutable():
    base = get_criterion("mest")
    tuned = get_criterion(base, gamma=10.0)
    assert base.params["gamma"] == 1.0 and tuned.params["gamma"] == 10.0
    with pytest.raises(TypeError):
        tuned.params["gamma"] = 3.0
    assert get_criterion("magnitude", ordering="before_optimizer").ordering == "before_optimizer"


def test_callable_and_registered_custom_criterion():
    def weight_times_grad(inputs, power=1.0):
        return tf.abs(inputs.weight * inputs.gradient) ** power

    c = get_criterion(weight_times_grad, power=2.0)
    assert (c.name, c.ordering, c.needs_gradient, dict(c.params)) == ("weight_times_grad", "before_optimizer", True,
                                                                      {"power": 2.0})
    np.testing.assert_allclose(c.evaluate(make_inputs([2.0], [3.0])).numpy(), [36.0])
    with pytest.raises(ValueError, match="'exponent'"):
        get_criterion(weight_times_grad, exponent=2.0)
    assert get_criterion(weight_times_grad, ordering="after_optimizer").ordering == "after_optimizer"

    @register_criterion("test_only_negated_magnitude", ordering="after_optimizer", needs_gradient=False,
                        params={"scale": 1.0})
    def negated(inputs, scale):
        return -scale * tf.abs(inputs.weight)

    assert "test_only_negated_magnitude" in criteria.criterion_names()
    new = criteria.select_pruned(get_criterion("test_only_negated_magnitude"), [make_inputs([1.0, 5.0, 2.0])], 1)
    np.testing.assert_array_equal(new[0].numpy(), [True, False, True])
    with pytest.raises(ValueError, match="already registered"):
        register_criterion("test_only_negated_magnitude", ordering="after_optimizer")(negated)


def test_criterion_validation():
    with pytest.raises(ValueError, match="exactly one"):
        Criterion(name="x", score=None, ordering="after_optimizer")
    with pytest.raises(ValueError, match="ordering"):
        Criterion(name="x", score=lambda i: i.weight, ordering="sometime")


def test_registration_refuses_what_would_fail_at_the_first_step():
    """Bad registrations are refused when made, naming the criterion, and leave nothing
    registered (they failed at the first training step, or with a message that named
    nothing)."""
    def scaled(inputs, k, beta=None):  # (beta: a running criterion's parameter)
        return k * tf.abs(inputs.weight)

    cases = [
        (dict(params=[1, 2]), TypeError, r"Criterion 'test_only_bad': params must be a dict"),
        (dict(needs_gradient="yes"), TypeError, r"Criterion 'test_only_bad': needs_gradient must "
                                                r"be a bool"),
        (dict(ema=True, params={"k": 1.0}), ValueError, r"'test_only_bad' is a running "
                                                        r"criterion \(ema=True\): give it .*'beta'"),
        (dict(), ValueError, r"Criterion 'test_only_bad': its function's parameter\(s\) \['k'\] "
                             r"have no default and params= gives none"),
        (dict(params={"k": 1.0, "zz": 2.0}), ValueError,
         r"Criterion 'test_only_bad': params \['zz'\] are not keyword parameters of its "
         r"function \(it takes \['beta', 'k'\] after its inputs\)"),
        (dict(params={"k": float("nan")}), ValueError, r"criterion 'test_only_bad': k must be "
                                                       r"finite, got k=nan"),
        (dict(ema=True, params={"k": 1.0, "beta": "0.9"}), TypeError,
         r"Criterion 'test_only_bad': the running average's beta must be a number in \[0, 1\], "
         r"got beta='0.9'"),
        (dict(params={"k": 1.0}, select="yes"), TypeError,
         r"register_criterion\('test_only_bad'\): select must be a bool, got select='yes'"),
        (dict(params={"k": 1.0}, overwrite="no"), TypeError,
         r"criterion 'test_only_bad': overwrite must be a bool, got overwrite='no'"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            register_criterion("test_only_bad", ordering="after_optimizer", **kwargs)(scaled)
        assert "test_only_bad" not in criteria.criterion_names()
    try:  # NumPy numbers become Python numbers: the configs stay JSON
        register_criterion("test_only_bad", ordering="after_optimizer",
                           params={"k": np.float32(2.0)})(scaled)
        criterion = get_criterion("test_only_bad", k=np.int64(3), needs_gradient=np.bool_(False))
        assert type(criterion.params["k"]) is float and criterion.needs_gradient is False
        json.dumps(criterion.get_config())
        json.dumps(keras_dst.DynamicSparseTraining(prune=criterion).get_config())
    finally:
        criteria._CRITERIA.unregister("test_only_bad")
    def as_text(inputs):
        return tf.strings.as_string(inputs.weight)

    with pytest.raises(TypeError, match=r"Criterion 'as_text' returned scores of dtype string"):
        get_criterion(as_text).evaluate(make_inputs([1.0, 2.0]))

    def with_numpy(inputs):
        return inputs.weight.numpy()

    @tf.function
    def traced(w):
        inputs = ScoreInputs(w, None, tf.ones_like(w, tf.bool), tf.zeros([2], tf.int64))
        return get_criterion(with_numpy, needs_gradient=False).evaluate(inputs)

    with pytest.raises(AttributeError, match=r"Criterion 'with_numpy' \(its function is traced "
                                             r"into the training step.*no \.numpy\(\)\)"):
        traced(tf.constant([1.0, 2.0]))


def test_a_selection_rule_s_result_is_checked():
    def flat_count(inputs, count):
        return tf.zeros([3], tf.bool)

    def floats(inputs, count):
        return tf.zeros_like(inputs.weight)

    inputs = [make_inputs([1.0, 2.0, 3.0, 4.0])]
    for fn, error, message in [
        (flat_count, ValueError, r"Criterion 'test_only_sel' selected a tensor of shape \(3,\) "
                                 r"for a weight of shape \(4,\)"),
        (floats, TypeError, r"Criterion 'test_only_sel' selected with dtype float32; a selection "
                            r"function returns a bool tensor")]:
        register_criterion("test_only_sel", ordering="after_optimizer", needs_gradient=False,
                           select=True, overwrite=True)(fn)
        try:
            with pytest.raises(error, match=message):
                criteria.select_pruned(get_criterion("test_only_sel"), inputs, 1)
        finally:
            criteria._CRITERIA.unregister("test_only_sel")


def test_a_score_of_unknown_shape_is_checked_when_it_runs_and_none_is_refused_named():
    """A tf.numpy_function's result has no static shape: a transposed score passed the
    compatibility check and pruned other entries (it is now checked when it runs, and one
    of the right shape computed in a loop still works); a function without its `return`
    gave TensorFlow's "None values not supported" naming nothing."""
    def transposed(inputs):
        return tf.numpy_function(lambda w: np.abs(w).T.copy(), [inputs.weight], tf.float32)

    def looped(inputs):  # rows stacked from a TensorArray: static shape (None, 3)
        rows = tf.TensorArray(tf.float32, size=tf.shape(inputs.weight)[0])
        rows = tf.while_loop(lambda i, r: i < tf.shape(inputs.weight)[0],
                             lambda i, r: (i + 1, r.write(i, tf.abs(inputs.weight[i]))),
                             (0, rows))[1]
        return rows.stack()

    def forgot_return(inputs):
        tf.abs(inputs.weight)

    @tf.function
    def traced(fn, w):
        inputs = ScoreInputs(w, None, tf.ones_like(w, tf.bool), tf.zeros([2], tf.int64))
        return get_criterion(fn, needs_gradient=False).evaluate(inputs)

    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"(?s)\[3,2\] is not compatible with expected shape \[2,3\].*"
                             r"shape_of_Criterion_transposed_returned_scores"):
        traced(transposed, tf.ones([2, 3]))
    weight = tf.constant([[1.0, -2.0, 3.0], [-4.0, 5.0, -6.0]])
    np.testing.assert_array_equal(traced(looped, weight), np.abs(weight))
    looped.__name__ = "größe Δ"  # (its check's op name is made of ASCII: TF refused this one)
    np.testing.assert_array_equal(traced(looped, weight), np.abs(weight))
    with pytest.raises(TypeError, match=r"Criterion 'forgot_return' returned None, not a tensor"):
        traced(forgot_return, tf.ones([2, 3]))


def test_a_selection_rule_takes_its_own_keyword_parameters_but_not_a_running_average():
    def every_other(inputs, count, start=0):
        return tf.logical_and(inputs.mask, tf.range(tf.size(inputs.mask)) % 2 == start)

    try:
        register_criterion("test_only_sel", ordering="after_optimizer", needs_gradient=False,
                           select=True)(every_other)
        assert get_criterion("test_only_sel", start=1).params == {"start": 1}  # (was refused)
        with pytest.raises(ValueError, match=r"Unknown parameter 'count'"):
            get_criterion("test_only_sel", count=1)
    finally:
        criteria._CRITERIA.unregister("test_only_sel")
    with pytest.raises(ValueError, match=r"Criterion 'test_only_sel_ema': a running criterion "
                                         r"\(ema=True\) averages per-entry scores"):
        register_criterion("test_only_sel_ema", ordering="after_optimizer", select=True, ema=True,
                           params={"beta": 0.9})(every_other)
    assert "test_only_sel_ema" not in criteria.criterion_names()


@pytest.mark.parametrize("value", [np.ones(3), tf.ones([3]), print, {1: 2.0}, [np.ones(2)]],
                         ids=["ndarray", "tensor", "function", "int_keys", "nested_ndarray"])
def test_a_parameter_value_a_config_cannot_hold_is_refused_naming_it(value):
    """An array parameter was accepted: its config was not JSON, a Keras round trip gave
    back a dict in its place, and a later fit failed comparing it ("truth value of an
    array is ambiguous")."""
    def scaled(inputs, factor=1.0):
        return tf.abs(inputs.weight) * tf.reduce_mean(tf.cast(factor, tf.float32))

    with pytest.raises(TypeError, match=r"criterion 'scaled'.*parameter 'factor' must be a number, "
                                        r"bool, str, None, or a list, tuple or str-keyed dict of them"):
        get_criterion(scaled, factor=value)
    with pytest.raises(TypeError, match=r"DynamicSparseTraining\(prune='mest'.*parameter 'gamma'"):
        keras_dst.DynamicSparseTraining(prune="mest", prune_params={"gamma": value})


@pytest.mark.parametrize("value", ["no", 0, 1.0, None])
def test_a_flag_parameter_takes_a_bool_only(value):
    """A parameter whose registered default is a bool took any value ("no" is truthy); a
    default of the function's own declares no type (``clip=False`` may take a number)."""
    @keras_dst.register_criterion("test_only_signed", ordering="after", needs_gradient=False,
                                  params={"use_abs": True})
    def signed(inputs, use_abs, clip=False):
        return tf.abs(inputs.weight) if use_abs else inputs.weight

    try:
        with pytest.raises(TypeError, match=r"criterion 'test_only_signed'.*use_abs must be a "
                                            rf"bool, got use_abs={value!r}"):
            get_criterion("test_only_signed", use_abs=value)
        assert get_criterion("test_only_signed", use_abs=np.bool_(False), clip=0.5).params == {
            "use_abs": False, "clip": 0.5}
    finally:
        criteria._CRITERIA.unregister("test_only_signed")


def test_list_and_tuple_parameters_round_trip_through_json():
    def weighted(inputs, factors=(1.0, 2.0)):
        return tf.abs(inputs.weight) * factors[0]

    try:
        register_criterion("test_only_weighted", ordering="after_optimizer", needs_gradient=False,
                           params={"factors": (1.0, 2.0)})(weighted)
        criterion = get_criterion("test_only_weighted", factors=[3.0, np.float32(4.0)])
        assert criterion.params["factors"] == (3.0, 4.0)  # (a tuple: immutable, as the entry)
        config = json.loads(json.dumps(criterion.get_config()))
        assert Criterion.from_config(config) == criterion
    finally:
        criteria._CRITERIA.unregister("test_only_weighted")


def test_a_callback_config_names_the_argument_of_a_rule_registered_again():
    """A growth rule registered again (overwrite=True) after a callback was made was
    written by name into its config, which then restored the new rule; a criterion's
    refusal named `criterion=` for the callback's `prune=`."""
    from keras_dst import growth as growth_lib

    def grow_first(inputs):
        return -tf.cast(tf.range(tf.size(inputs.weight)), tf.float32)

    def grow_last(inputs):
        return tf.cast(tf.range(tf.size(inputs.weight)), tf.float32)

    def kept(inputs):
        return tf.abs(inputs.weight)

    try:
        keras_dst.register_growth("test_only_grow")(grow_first)
        register_criterion("test_only_kept", ordering="after_optimizer", needs_gradient=False)(kept)
        callback = keras_dst.DynamicSparseTraining(prune="test_only_kept", grow="test_only_grow")
        callback.get_config()
        keras_dst.register_growth("test_only_grow", overwrite=True)(grow_last)
        with pytest.raises(ValueError, match=r"grow='test_only_grow' cannot be saved in a config"):
            callback.get_config()
        keras_dst.register_growth("test_only_grow", overwrite=True)(grow_first)
        register_criterion("test_only_kept", ordering="after_optimizer", overwrite=True)(grow_last)
        with pytest.raises(ValueError, match=r"prune='test_only_kept' cannot be saved in a config"):
            callback.get_config()
    finally:
        growth_lib._GROWTH.unregister("test_only_grow")
        criteria._CRITERIA.unregister("test_only_kept")


def test_registry_is_the_shared_type_with_overwrite():
    assert isinstance(criteria._CRITERIA, Registry)

    def doubled(inputs):
        return 2.0 * tf.abs(inputs.weight)

    def tripled(inputs):
        return 3.0 * tf.abs(inputs.weight)

    try:
        register_criterion("test_only_Doubled", ordering="before", needs_gradient=False)(doubled)
        assert get_criterion("TEST-ONLY-DOUBLED").score is doubled  # case, "_" and "-" ignored
        # A taken name is refused with the kind and the name, even before decorating.
        with pytest.raises(ValueError, match=r"criterion 'test_only_doubled' is already registered.*overwrite"):
            register_criterion("test_only_doubled", ordering="before")
        register_criterion("test_only_doubled", ordering="before", needs_gradient=False, overwrite=True)(tripled)
        assert get_criterion("test_only_doubled").score is tripled
        with pytest.raises(ValueError, match=r"Unknown criterion 'test_only_halved'; known: .*'magnitude'"):
            get_criterion("test_only_halved")
        old = get_criterion("test_only_doubled")  # replaced under another spelling:
        register_criterion("TEST_only_doubled", ordering="before", needs_gradient=False,
                           overwrite=True)(doubled)
        with pytest.raises(ValueError, match=r"criterion='test_only_doubled' cannot be saved in a "
                                             r"config: its registration was replaced by the "
                                             r"criterion registered as 'TEST_only_doubled'"):
            old.get_config()
    finally:
        criteria._CRITERIA.unregister("test_only_doubled")


# ---------------------------------------------------------------------------
# Configs (round trip through get_config / from_config).


@pytest.mark.parametrize("make", [
    lambda: get_criterion("mest", gamma=0.1),
    lambda: get_criterion("magnitude"),
    lambda: get_criterion("running_snip"),
    lambda: get_criterion("running_magnitude", beta=0.5),
    lambda: get_criterion("set_legacy"),
    lambda: get_criterion("snip", ordering="before"),
    lambda: get_criterion("magnitude", ordering="after", needs_gradient=True),
])
def test_criterion_config_round_trip(make):
    original = make()
    config = original.get_config()
    restored = Criterion.from_config(config)
    assert restored == original
    assert restored.get_config() == config
    assert Criterion.from_config(json.loads(json.dumps(config))) == original  # plain JSON values


def test_criterion_config_contents():
    assert get_criterion("mest", gamma=0.1).get_config() == {"name": "mest", "params": {"gamma": 0.1}}
    assert get_criterion("running_snip").get_config() == {"name": "running_snip", "params": {"beta": 0.9}}
    assert get_criterion("snip", ordering="before").get_config() == {
        "name": "snip", "params": {"offset": 1e-5}, "ordering": "after_optimizer"}
    assert get_criterion("MEST", ordering="after").get_config() == {"name": "mest", "params": {"gamma": 1.0}}
    with pytest.raises(ValueError, match="'colour'"):
        Criterion.from_config({"name": "mest", "params": {}, "colour": "red"})


def test_check_serializable():
    for name in ("mest", "set", "running_magnitude"):
        c = get_criterion(name, ordering="after")
        assert criteria.check_serializable(c, "prune") is c

    def weight_times_grad(inputs, power=1.0):
        return tf.abs(inputs.weight * inputs.gradient) ** power

    plain = get_criterion(weight_times_grad, power=2.0)
    message = r"prune='weight_times_grad'.*keras_dst\.register_criterion"
    with pytest.raises(ValueError, match=message):
        criteria.check_serializable(plain, "prune")
    with pytest.raises(ValueError, match=r"criterion='weight_times_grad'.*register_criterion"):
        plain.get_config()
    # A callable under a registered name is not that criterion either.
    impostor = get_criterion(weight_times_grad)
    impostor = Criterion(name="snip", score=impostor.score, ordering="after")
    with pytest.raises(ValueError, match=r"overlap='snip'.*score.*register_criterion"):
        criteria.check_serializable(impostor, "overlap")


def test_is_finite_holds_eagerly_in_a_graph_and_under_xla_also_negated():
    # a graph without XLA rewrites ~(a < b) as a >= b, False at NaN: the engine's
    # non-finite check (~is_finite) missed NaN there
    from keras_dst.scoring import is_finite

    x = tf.constant([1.0, -0.0, np.nan, np.inf, -np.inf, 3e38, -1e-45], tf.float32)
    expected = np.isfinite(x.numpy())

    def finite(v):
        return is_finite(v)

    def bad_count(v):
        return tf.reduce_sum(tf.cast(~is_finite(v), tf.int32))

    for run in (lambda f: f, tf.function, lambda f: tf.function(f, jit_compile=True)):
        np.testing.assert_array_equal(run(finite)(x).numpy(), expected)
        assert int(run(bad_count)(x)) == 3


def test_the_built_in_functions_keep_their_defaults_when_called_directly():
    """(A user's criterion calling `criteria.snip(inputs)` failed when `offset` came in.)"""
    inputs = make_inputs([2.0, -0.5], [0.25, 4.0])
    np.testing.assert_allclose(criteria.snip(inputs), [0.5 + 1e-5, 2.0 + 1e-5])
    np.testing.assert_allclose(criteria.reciprocal_sensitivity(inputs),
                               [2.0 / (0.25 + 1e-8) + 1.0, 0.5 / (4.0 + 1e-8) + 1.0])
