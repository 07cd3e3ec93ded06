"""Tests of keras_dst.criteria: scores, SET rules, registry, normalisation, EMA."""

import math

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from conftest import score_inputs
from keras_dst import criteria, topology
from keras_dst.criteria import Criterion, get_criterion, register_criterion
from keras_dst.scoring import ScoreInputs

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
    ("magnitude", "before", False), ("set", "before", False), ("set_legacy", "before", False),
    ("random", "before", False), ("running_magnitude", "before", False), ("mest", "after", True),
    ("snip", "after", True), ("sensitivity", "after", True), ("reciprocal_sensitivity", "after", True),
    ("taylor_fo", "after", True), ("running_snip", "after", True),
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
    new = topology.apply_selection(criterion, [inputs], r)[0].numpy()
    assert mask.sum() - new.sum() == int(r)
    assert not (new & ~mask).any()
    scores = criterion.evaluate(inputs).numpy()
    assert scores[mask & ~new].max() <= scores[new].min()


def test_random_is_seeded_uniform_subset():
    mask = np.ones(20, bool)
    random = get_criterion("random")

    def removed(seed):
        inputs = ScoreInputs(tf.zeros([20]), tf.zeros([20]), tf.constant(mask), tf.stack([seed, 0]))
        return tf.logical_not(topology.apply_selection(random, [inputs], 5)[0])

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
    return topology.apply_selection(get_criterion(name), [make_inputs(w, mask=mask)], r)[0].numpy()


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
        topology.apply_selection(get_criterion("set"), [make_inputs([1.0, -1.0])], 1, normalize="layer")
    with pytest.raises(ValueError, match="no per-entry score"):
        get_criterion("set").evaluate(make_inputs([1.0]))


def test_global_set_equals_set_on_concatenation():
    rng = np.random.default_rng(3)
    layers = [rng.normal(size=s).astype(np.float32) for s in ((3, 4), (5,), (2, 2, 2))]
    masks = [rng.random(w.shape) < 0.7 for w in layers]
    inputs = [make_inputs(np.where(m, w, 0), mask=m) for w, m in zip(layers, masks)]
    new = topology.apply_selection(get_criterion("set"), inputs, 6)
    flat_w = np.concatenate([np.where(m, w, 0).ravel() for w, m in zip(layers, masks)])
    expected = np_set(flat_w, np.concatenate([m.ravel() for m in masks]), 6)
    np.testing.assert_array_equal(np.concatenate([n.numpy().ravel() for n in new]), expected)
    assert [n.shape for n in new] == [w.shape for w in layers]


def test_set_under_xla():
    set_criterion, legacy = get_criterion("set"), get_criterion("set_legacy")

    @tf.function(jit_compile=True)
    def both(w, mask, count):
        inputs = ScoreInputs(w, tf.zeros_like(w), mask, SEED)
        return (topology.apply_selection(set_criterion, [inputs], count)[0],
                topology.apply_selection(legacy, [inputs], count)[0])

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
# Normalisation.


def np_normalize(scores, mask, axes, norm_type):
    if norm_type == "max":
        stat = np.max(np.where(mask, scores, -np.inf), axis=axes, keepdims=True)
    else:
        stat = np.sum(np.where(mask, scores, 0.0), axis=axes, keepdims=True)
    stat = np.where(np.any(mask, axis=axes, keepdims=True), stat, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(stat == 0, 0.0, scores / np.where(stat == 0, 1.0, stat))


@pytest.mark.parametrize("shape, mode, axes", [
    ((4, 3), "input", (0,)), ((4, 3), "output", (1,)), ((4, 3), "layer", None), ((4, 3), "channel", None),
    ((4, 3), "depth", None), ((2, 2, 3, 4), "channel", (0, 1, 2)), ((2, 2, 3, 4), "depth", (0, 1)),
    ((2, 2, 3, 4), "input", None), ((5, 3, 4), "channel", (0, 1)), ((7,), "input", None),
])
@pytest.mark.parametrize("norm_type", ["max", "sum"])
def test_normalize_keras_axes(shape, mode, axes, norm_type):
    rng = np.random.default_rng(0)
    scores = np.abs(rng.normal(size=shape)).astype(np.float32)
    mask = rng.random(shape) < 0.6
    mask.reshape(-1)[0] = False
    scores.reshape(-1)[-1] = 0.0
    got = topology.normalize(tf.constant(scores), tf.constant(mask), mode, norm_type).numpy()
    np.testing.assert_allclose(got, np_normalize(scores, mask, axes, norm_type), rtol=1e-6)


def test_normalize_zero_group_gives_zero_not_nan():
    scores = tf.constant([[0.0, 2.0], [0.0, 4.0]])  # column 0 all zero
    mask = tf.constant([[True, True], [True, False]])
    got = criteria.normalize(scores, mask, "input", "max").numpy()
    np.testing.assert_allclose(got, [[0.0, 1.0], [0.0, 2.0]])  # inactive (4.0) not in the statistic
    empty = criteria.normalize(tf.constant([[3.0]]), tf.constant([[False]]), "layer", "sum").numpy()
    np.testing.assert_array_equal(empty, [[0.0]])
    assert criteria.normalize(scores, mask, "none") is scores


def test_normalize_bad_arguments():
    with pytest.raises(ValueError, match="'rows'"):
        criteria.normalize(tf.zeros([2]), tf.ones([2], tf.bool), "rows")
    with pytest.raises(ValueError, match="'mean'"):
        criteria.normalize(tf.zeros([2]), tf.ones([2], tf.bool), "layer", "mean")


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
    with pytest.raises(ValueError):
        get_criterion(42)


def test_params_are_merged_and_immutable():
    base = get_criterion("mest")
    tuned = get_criterion(base, gamma=10.0)
    assert base.params["gamma"] == 1.0 and tuned.params["gamma"] == 10.0
    with pytest.raises(TypeError):
        tuned.params["gamma"] = 3.0
    assert get_criterion("magnitude", ordering="after").ordering == "after"


def test_callable_and_registered_custom_criterion():
    def weight_times_grad(inputs, power=1.0):
        return tf.abs(inputs.weight * inputs.gradient) ** power

    c = get_criterion(weight_times_grad, power=2.0)
    assert (c.name, c.ordering, c.needs_gradient, dict(c.params)) == ("weight_times_grad", "after", True,
                                                                      {"power": 2.0})
    np.testing.assert_allclose(c.evaluate(make_inputs([2.0], [3.0])).numpy(), [36.0])
    with pytest.raises(ValueError, match="'exponent'"):
        get_criterion(weight_times_grad, exponent=2.0)
    assert get_criterion(weight_times_grad, ordering="before").ordering == "before"

    @register_criterion("test_only_negated_magnitude", ordering="before", needs_gradient=False,
                        params={"scale": 1.0})
    def negated(inputs, scale):
        return -scale * tf.abs(inputs.weight)

    assert "test_only_negated_magnitude" in criteria.criterion_names()
    new = topology.apply_selection(get_criterion("test_only_negated_magnitude"), [make_inputs([1.0, 5.0, 2.0])], 1)
    np.testing.assert_array_equal(new[0].numpy(), [True, False, True])
    with pytest.raises(ValueError, match="already registered"):
        register_criterion("test_only_negated_magnitude", ordering="before")(negated)


def test_criterion_validation():
    with pytest.raises(ValueError, match="exactly one"):
        Criterion(name="x", score=None, ordering="before")
    with pytest.raises(ValueError, match="ordering"):
        Criterion(name="x", score=lambda i: i.weight, ordering="sometime")
