"""Tests of keras_dst.topology: the one selection routine."""

import ast
import inspect
import math
import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import keras_dst
from keras_dst import topology

SETTINGS = settings(max_examples=40, deadline=None)

# Few distinct values -> many ties; plus signed zeros and non-finite values.
TIE_VALUES = st.sampled_from([-2.0, -1.0, -0.0, 0.0, 0.5, 1.0, 3.0, np.inf, -np.inf, np.nan])
SHAPES = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=5)


@st.composite
def scored_masks(draw, values=TIE_VALUES):
    shape = draw(SHAPES)
    scores = draw(hnp.arrays(np.float32, shape, elements=values))
    mask = draw(hnp.arrays(np.bool_, shape))
    count = draw(st.integers(-1, scores.size + 2))
    return scores, mask, count


def np_select(scores, eligible, count, lowest):
    """Reference: stable order by (NaN last-in-importance, value, flat index)."""
    flat, elig = scores.ravel(), eligible.ravel()
    nan = np.isnan(flat)
    value = np.where(nan, 0.0, flat) if lowest else np.where(nan, 0.0, -flat)
    importance_group = (~nan).astype(int) if lowest else nan.astype(int)
    order = np.lexsort((np.arange(flat.size), value, importance_group))
    order = [i for i in order if elig[i]]
    chosen = np.zeros(flat.size, bool)
    chosen[order[: max(count, 0)]] = True
    return chosen.reshape(scores.shape)


def np_prune(scores, mask, count):
    return mask & ~np_select(scores, mask, count, lowest=True)


def np_grow(scores, mask, count):
    return mask | np_select(scores, ~mask, count, lowest=False)


@SETTINGS
@given(scored_masks())
def test_prune_matches_reference_with_ties_and_nonfinite(case):
    scores, mask, count = case
    new = topology.prune(tf.constant(scores), tf.constant(mask), tf.constant(count)).numpy()
    np.testing.assert_array_equal(new, np_prune(scores, mask, count))
    assert not (new & ~mask).any()  # inactive never chosen (never activated)
    assert mask.sum() - new.sum() == min(max(count, 0), mask.sum())


@SETTINGS
@given(scored_masks())
def test_grow_matches_reference_with_ties_and_nonfinite(case):
    scores, mask, count = case
    new = topology.grow(tf.constant(scores), tf.constant(mask), tf.constant(count)).numpy()
    np.testing.assert_array_equal(new, np_grow(scores, mask, count))
    assert not (mask & ~new).any()
    assert new.sum() - mask.sum() == min(max(count, 0), (~mask).sum())


def test_tie_break_lower_index_first():
    scores = tf.constant([1.0, 0.0, 1.0, -0.0, 0.0, 2.0])
    mask = tf.constant([True, True, True, True, True, True])
    # Zeros (both signs) tie: indices 1, 3, 4 -> remove 1 and 3.
    np.testing.assert_array_equal(topology.prune(scores, mask, 2).numpy(), [1, 0, 1, 0, 1, 1])
    # Growth ties at 1.0: indices 0 and 2 -> index 0 first.
    np.testing.assert_array_equal(topology.grow(scores, ~mask, 2).numpy(), [1, 0, 0, 0, 0, 1])


def test_nan_is_least_important():
    scores = tf.constant([np.nan, -np.inf, 5.0, np.nan])
    np.testing.assert_array_equal(topology.prune(scores, tf.ones([4], tf.bool), 1).numpy(), [0, 1, 1, 1])
    np.testing.assert_array_equal(topology.grow(scores, tf.zeros([4], tf.bool), 3).numpy(), [1, 1, 1, 0])


def test_inactive_never_chosen_even_with_lowest_scores():
    scores = tf.constant([-9.0, 1.0, -9.0, 2.0, 3.0])
    mask = tf.constant([False, True, False, True, True])
    np.testing.assert_array_equal(topology.prune(scores, mask, 2).numpy(), [0, 0, 0, 0, 1])
    np.testing.assert_array_equal(topology.prune(scores, mask, 10).numpy(), [0, 0, 0, 0, 0])


@SETTINGS
@given(st.integers(1, 200), st.integers(0, 1000))
def test_exact_removed_count_without_ties(active, per_mille):
    rate, n = per_mille / 1000, active + 7
    scores = tf.random.stateless_normal([n], seed=[active, 3])
    mask = tf.concat([tf.ones([active], tf.bool), tf.zeros([7], tf.bool)], 0)
    r = topology.prune_count(tf.reduce_sum(tf.cast(mask, tf.int32)), rate)
    new = topology.prune(scores, mask, r)
    expected = -(-per_mille * active // 1000)  # exact ceil(rate * active)
    assert int(r) == expected
    assert active - int(tf.reduce_sum(tf.cast(new, tf.int32))) == expected
    # The removed ones are the r lowest active scores.
    kept_min = np.min(scores.numpy()[new.numpy()], initial=np.inf)
    removed_max = np.max(scores.numpy()[mask.numpy() & ~new.numpy()], initial=-np.inf)
    assert removed_max < kept_min


@pytest.mark.parametrize("active, rate, expected", [
    (10, 0.5, 5), (10, np.float32(0.1), 1), (10, np.float32(0.3), 3), (1000, np.float32(0.7), 700),
    (7, 0.3, 3), (3, 0.0, 0), (3, 1.0, 3), (3, 1.5, 3), (3, -0.2, 0), (0, 0.5, 0), (1, 0.005, 1),
])
def test_prune_count_cases(active, rate, expected):
    assert int(topology.prune_count(tf.constant(active), tf.constant(rate, tf.float32))) == expected


@SETTINGS
@given(st.integers(0, 4999), st.integers(0, 1000))
def test_prune_count_decimal_rates(active, per_mille):
    rate = tf.constant(per_mille / 1000, tf.float32)
    expected = min(-(-per_mille * active // 1000), active)
    assert int(topology.prune_count(active, rate)) == expected


@SETTINGS
@given(st.lists(scored_masks(), min_size=1, max_size=3), st.integers(0, 40))
def test_global_prune_is_prune_over_concatenation(layers, count):
    scores = [s for s, _, _ in layers]
    masks = [m for _, m, _ in layers]
    new = topology.global_prune([tf.constant(s) for s in scores], [tf.constant(m) for m in masks], count)
    flat = np_prune(np.concatenate([s.ravel() for s in scores]), np.concatenate([m.ravel() for m in masks]), count)
    np.testing.assert_array_equal(np.concatenate([n.numpy().ravel() for n in new]), flat)
    assert [n.shape for n in new] == [m.shape for m in masks]


def test_global_prune_chooses_across_layers():
    scores = [tf.constant([[5.0, 1.0], [6.0, 7.0]]), tf.constant([0.5, 8.0, 2.0])]
    masks = [tf.ones([2, 2], tf.bool), tf.constant([True, True, False])]
    new = topology.global_prune(scores, masks, 2)
    np.testing.assert_array_equal(new[0].numpy(), [[1, 0], [1, 1]])
    np.testing.assert_array_equal(new[1].numpy(), [0, 1, 0])


def test_pruned_positions_can_be_regrown():
    mask = tf.ones([6], tf.bool)  # a dense layer
    scores = tf.constant([3.0, 1.0, 4.0, 0.5, 9.0, 2.0])
    pruned = topology.prune(scores, mask, 2)
    np.testing.assert_array_equal(pruned.numpy(), [1, 0, 1, 0, 1, 1])
    regrown = topology.grow(tf.constant([0.0, 5.0, 0.0, 7.0, 0.0, 0.0]), pruned, 2)
    np.testing.assert_array_equal(regrown.numpy(), mask.numpy())


def test_grow_bernoulli_mean_and_edges():
    mask = tf.constant(np.arange(1000) % 2 == 0)  # 500 inactive
    grown = [int(tf.reduce_sum(tf.cast(topology.grow_bernoulli(mask, 50, tf.constant([s, 7])), tf.int32))) - 500
             for s in range(200)]
    assert abs(np.mean(grown) - 50) < 2.5
    assert np.std(grown) > 2  # random, not exact
    new = topology.grow_bernoulli(mask, 50, tf.constant([1, 2]))
    assert not (mask.numpy() & ~new.numpy()).any()
    assert bool(tf.reduce_all(topology.grow_bernoulli(mask, 600, tf.constant([1, 2]))))
    full = tf.ones([5], tf.bool)
    np.testing.assert_array_equal(topology.grow_bernoulli(full, 3, tf.constant([1, 2])).numpy(), full.numpy())
    empty = tf.zeros([5], tf.bool)
    np.testing.assert_array_equal(topology.grow_bernoulli(empty, 0, tf.constant([1, 2])).numpy(), empty.numpy())


def test_empty_tensor():
    empty = tf.zeros([0, 3])
    assert topology.prune(empty, tf.zeros([0, 3], tf.bool), 2).shape == (0, 3)
    assert topology.grow(empty, tf.zeros([0, 3], tf.bool), 2).shape == (0, 3)


def test_jaccard():
    a = tf.constant([True, True, False, False])
    b = tf.constant([True, False, True, False])
    assert float(topology.jaccard(a, b)) == pytest.approx(1 / 3)
    assert float(topology.jaccard(a, a)) == 1.0
    assert float(topology.jaccard(tf.zeros([3], tf.bool), tf.zeros([3], tf.bool))) == 1.0
    assert float(topology.jaccard(a, ~a)) == 0.0


def test_prune_grow_global_under_xla_with_dynamic_count():
    @tf.function(jit_compile=True)
    def step(scores, mask, other_scores, other_mask, count):
        pruned = topology.prune(scores, mask, count)
        regrown = topology.grow(-scores, pruned, count)
        both = topology.global_prune([scores, other_scores], [mask, other_mask], count)
        bernoulli = topology.grow_bernoulli(pruned, count, tf.constant([3, 4]))
        r = topology.prune_count(tf.reduce_sum(tf.cast(mask, tf.int32)), 0.5)
        return pruned, regrown, both, bernoulli, r

    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, (4, 6)).astype(np.float32)  # ties
    mask = rng.random((4, 6)) < 0.7
    other = rng.integers(0, 4, (5,)).astype(np.float32)
    other_mask = rng.random(5) < 0.7
    for count in (0, 3, 7, 100):  # same compiled function, different values
        pruned, regrown, both, _, r = step(scores, mask, other, other_mask, tf.constant(count))
        np.testing.assert_array_equal(pruned.numpy(), np_prune(scores, mask, count))
        np.testing.assert_array_equal(regrown.numpy(), np_grow(-scores, np_prune(scores, mask, count), count))
        flat = np_prune(np.concatenate([scores.ravel(), other]), np.concatenate([mask.ravel(), other_mask]), count)
        np.testing.assert_array_equal(np.concatenate([both[0].numpy().ravel(), both[1].numpy()]), flat)
        assert int(r) == math.ceil(0.5 * mask.sum())
    assert step.experimental_get_tracing_count() == 1


@pytest.mark.parametrize("kind", ["normal", "few_values", "nan_inf", "all_equal"])
def test_large_selections_over_many_rows_match_the_reference(kind):
    n = 3 * 1024 + 37  # several rows of the layout, the last one padded
    rng = np.random.default_rng(7)
    scores = {"normal": rng.normal(size=n),
              "few_values": rng.integers(-2, 3, size=n).astype(float),
              "nan_inf": rng.choice([np.nan, np.inf, -np.inf, 0.0, -0.0, 1.5], size=n),
              "all_equal": np.full(n, 0.25)}[kind].astype(np.float32)
    mask = rng.random(n) < 0.3
    select = tf.function(lambda s, m, c: (topology.prune(s, m, c), topology.grow(s, m, c)),
                         jit_compile=True)
    for count in (0, 1, 432, int(mask.sum()) - 1, n):
        pruned, grown = select(tf.constant(scores), tf.constant(mask), tf.constant(count))
        np.testing.assert_array_equal(pruned.numpy(), np_prune(scores, mask, count))
        np.testing.assert_array_equal(grown.numpy(), np_grow(scores, mask, count))


def test_selection_passes_stop_early_and_stay_bounded(monkeypatch):
    """An interpolated probe that counts exactly `count` ends the search: scores spread like
    weights take far fewer counting passes than a bisection's 33; a tie split searches
    the layout's positions only (here 2**15, not 2**31); and a count above the eligible
    number ends at once."""
    passes = []
    count = topology._Groups.count
    monkeypatch.setattr(topology._Groups, "count",
                        lambda self, flags: passes.append(1) or count(self, flags))
    rng = np.random.default_rng(3)
    n = 20 * 1024
    weights = np.abs(rng.normal(size=n)).astype(np.float32)
    mask = rng.random(n) < 0.3
    k = int(0.3 * mask.sum())
    cases = [(weights, mask, k, True, 26), (weights, ~mask, k, False, 26),
             (np.where(rng.random(n) < 0.5, 0.0, weights).astype(np.float32), mask, k, True, 50),
             (weights, mask, n, True, 8)]
    for scores, eligible, c, lowest, bound in cases:
        passes.clear()  # eager: the loop body runs once per pass
        chosen = topology.select_each([scores], [eligible], [c], lowest)[0].numpy()
        np.testing.assert_array_equal(chosen, np_select(scores, eligible, c, lowest=lowest))
        assert len(passes) <= bound, (lowest, c, len(passes))


def test_group_counts_are_exact_past_float32_integers():
    """Counts per group are float32 sums below 2**24 positions (no conversion kernel) and
    float64 sums from there on, exact in both: a group of 2**24 + 5 entries counts 2**24 + 5."""
    small = topology.RowLayout([(1000, 10), (7,)])
    assert topology._Groups.of(small, [[0], [1]])._sum_dtype == tf.float32
    layout = topology.RowLayout([(2**24 + 5,), (3,)])
    groups = topology._Groups.of(layout, [[0], [1]])
    assert groups._sum_dtype == tf.float64
    packed = layout.pack([tf.ones([2**24 + 5], tf.bool), tf.ones([3], tf.bool)], False)
    assert groups.count(packed).numpy().tolist() == [2**24 + 5, 3]


def test_select_each_is_one_selection_per_group():
    """Grouped selections equal the separate ones, ties across tensors go to the earlier one,
    and every count value runs through one compiled function (one loop for all groups)."""
    rng = np.random.default_rng(11)
    shapes = [(7, 5), (0, 3), (2000,), (3, 4, 2), (1,)]
    scores = [rng.choice([np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, 2.0, 0.5],
                         size=s).astype(np.float32) for s in shapes]
    masks = [rng.random(s) < 0.5 for s in shapes]
    groups = [[0, 2], [1], [3, 4]]

    @tf.function(jit_compile=True)
    def select(scores, masks, counts, lowest_counts):
        each = topology.select_each(scores, masks, tf.unstack(lowest_counts), lowest=True)
        grouped = topology.select_each(scores, masks, tf.unstack(counts), lowest=False,
                                       groups=groups)
        return each, grouped

    for _ in range(4):
        counts = rng.integers(0, 1200, size=3)
        lowest_counts = rng.integers(0, 60, size=5)
        each, grouped = select([tf.constant(x) for x in scores], [tf.constant(m) for m in masks],
                               tf.constant(counts, tf.int32), tf.constant(lowest_counts, tf.int32))
        for i, (x, m, c) in enumerate(zip(scores, masks, lowest_counts)):
            np.testing.assert_array_equal(each[i].numpy(), np_select(x, m, c, lowest=True))
        for g, c in zip(groups, counts):
            flat = np_select(np.concatenate([scores[i].ravel() for i in g]),
                             np.concatenate([masks[i].ravel() for i in g]), c, lowest=False)
            got = np.concatenate([grouped[i].numpy().ravel() for i in g])
            np.testing.assert_array_equal(got, flat)
    assert select.experimental_get_tracing_count() == 1


# ---------------------------------------------------------------------------
# Normalisation (`normalize`).


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


DEPTHWISE, TABLE = topology.ScoreLayout("depthwise"), topology.ScoreLayout("linear", (0,))
QUERY = topology.ScoreLayout("linear", (1, 2))  # MultiHeadAttention's [dim, heads, head dim]


@pytest.mark.parametrize("shape, layout, mode, axes", [
    # a depthwise kernel [taps..., input channels, multiplier]: per output channel (its
    # taps), as the reference's dims (1, 2, 3) of PyTorch's [C * m, 1, kh, kw] (it was
    # normalised with one statistic per multiplier, across channels)
    ((3, 3, 4, 2), DEPTHWISE, "channel", (0, 1)), ((3, 3, 4, 2), DEPTHWISE, "depth", (0, 1)),
    ((5, 4, 1), DEPTHWISE, "channel", (0,)), ((3, 3, 4, 2), DEPTHWISE, "input", None),
    # an embedding table [rows, dim]: its rows are the units, as PyTorch's Embedding (a
    # Dense kernel is PyTorch's Linear transposed)
    ((6, 4), TABLE, "input", (1,)), ((6, 4), TABLE, "output", (0,)), ((6, 4), TABLE, "channel", None),
    # an EinsumDense kernel by the axes its equation keeps (they were read as a conv's)
    ((8, 2, 4), QUERY, "input", (0,)), ((8, 2, 4), QUERY, "output", (1, 2)),
    ((8, 2, 4), QUERY, "channel", None), ((8, 2, 4), QUERY, "depth", None),
])
def test_normalize_groups_as_the_reference_does_on_pytorch_s_layout(shape, layout, mode, axes):
    rng = np.random.default_rng(1)
    scores = np.abs(rng.normal(size=shape)).astype(np.float32)
    mask = rng.random(shape) < 0.6
    got = topology.normalize(tf.constant(scores), tf.constant(mask), mode, "sum", layout).numpy()
    np.testing.assert_allclose(got, np_normalize(scores, mask, axes, "sum"), rtol=1e-6)


def test_score_layouts_of_the_supported_layers():
    layers_ = {
        "dense": (keras.layers.Dense(3), (None, 4), ("linear", (1,))),
        "depthwise": (keras.layers.DepthwiseConv2D(3, depth_multiplier=2), (None, 6, 6, 4),
                      ("depthwise", ())),
        "conv1d_transpose": (keras.layers.Conv1DTranspose(3, 2), (None, 5, 4), ("conv", ())),
        "embedding": (keras.layers.Embedding(10, 4), (None, 3), ("linear", (0,))),
        "einsum": (keras.layers.EinsumDense("abc,cde->abde", (None, 2, 4)), (None, 5, 8),
                   ("linear", (1, 2))),
    }
    for name, (layer, shape, layout) in layers_.items():
        layer.build(shape)
        assert tuple(keras_dst.layers.score_layout(layer, layer.weights[0])) == layout, name
    separable = keras.layers.SeparableConv2D(4, 3)
    separable.build((None, 6, 6, 3))
    assert keras_dst.layers.score_layout(separable, separable.depthwise_kernel).kind == "depthwise"
    assert keras_dst.layers.score_layout(separable, separable.pointwise_kernel).kind == "conv"
    mha = keras.layers.MultiHeadAttention(2, 4)
    mha.build((None, 5, 8), (None, 5, 8))
    assert keras_dst.layers.score_layout(mha, mha.query_dense.kernel).output_axes == (1, 2)
    assert keras_dst.layers.score_layout(mha, mha.output_dense.kernel).output_axes == (2,)


def test_dst_normalises_a_depthwise_kernel_per_output_channel():
    """A DST update with normalize="channel" prunes each output channel of a depthwise
    kernel by its own share of the scores (one statistic per channel, as the reference)."""
    inputs = keras.Input((4, 4, 2))
    model = keras_dst.prunable(
        keras.Model(inputs, keras.layers.DepthwiseConv2D(2, use_bias=False, name="dw")(inputs)),
        density=1.0)
    kernel = model.get_layer("dw").sparse_weights[0]
    # channel 0's taps are 100x channel 1's: one statistic for both would prune channel 1 first
    values = np.array([[1.0, 2.0], [3.0, 4.0]], "float32")[..., None]
    kernel.assign(np.stack([values * 100.0, values], axis=2))
    model.compile(keras.optimizers.SGD(0.0), "mse")
    model.fit(np.ones((2, 4, 4, 2), "float32"), np.zeros((2, 3, 3, 2), "float32"), verbose=0,
              callbacks=[keras_dst.DynamicSparseTraining(
                  update_every=1, prune_rate=0.5, schedule="constant", grow=None,
                  normalize="channel")])
    mask = keras_dst.masks(model)[kernel.path][..., 0]
    # per channel, the two smallest of the four taps go (ratio to that channel's sum)
    np.testing.assert_array_equal(mask[:, :, 0], [[False, False], [True, True]])
    np.testing.assert_array_equal(mask[:, :, 1], [[False, False], [True, True]])


def test_normalize_zero_group_gives_zero_not_nan():
    scores = tf.constant([[0.0, 2.0], [0.0, 4.0]])  # column 0 all zero
    mask = tf.constant([[True, True], [True, False]])
    got = topology.normalize(scores, mask, "input", "max").numpy()
    np.testing.assert_allclose(got, [[0.0, 1.0], [0.0, 2.0]])  # inactive (4.0) not in the statistic
    empty = topology.normalize(tf.constant([[3.0]]), tf.constant([[False]]), "layer", "sum").numpy()
    np.testing.assert_array_equal(empty, [[0.0]])
    assert topology.normalize(scores, mask, "none") is scores


def test_normalize_bad_arguments():
    with pytest.raises(ValueError, match="'rows'"):
        topology.normalize(tf.zeros([2]), tf.ones([2], tf.bool), "rows")
    with pytest.raises(ValueError, match="'mean'"):
        topology.normalize(tf.zeros([2]), tf.ones([2], tf.bool), "layer", "mean")


def test_topology_is_pure():
    """topology knows scores, masks and counts only: no keras_dst import, no criterion."""
    tree = ast.parse(inspect.getsource(topology))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module)
    assert not [m for m in imported if m.startswith("keras_dst")], imported
    assert "criterion" not in inspect.getsource(topology).lower()


@pytest.mark.parametrize("scope", ["layer", "global", "layer_within_active"])
def test_prune_then_grow_is_a_prune_followed_by_a_growth(scope):
    """The one-loop update equals its two steps: prune (per layer or globally), then each
    tensor regrows what it lost, growth scores computed from the pruned masks; with
    counts known to lie within the active entries, nothing is counted and the result is
    the same."""
    rng = np.random.default_rng(5)
    shapes = [(9, 7), (1500,), (2, 3, 4)]
    n = len(shapes)
    groups = [list(range(n))] if scope == "global" else None
    within = scope == "layer_within_active"

    def grow_scores(pruned, grads):  # depends on the pruned masks, as a growth rule may
        return [tf.where(m, 0.0, g) for m, g in zip(pruned, grads)]

    @tf.function(jit_compile=True)
    def fused(scores, masks, counts, grads):
        return topology.prune_then_grow(scores, masks, tf.unstack(counts),
                                        lambda pruned: grow_scores(pruned, grads), groups,
                                        counts_within_active=within)

    @tf.function(jit_compile=True)
    def stepwise(scores, masks, counts, grads):
        if groups:
            pruned = topology.global_prune(scores, masks, counts[0])
        else:
            pruned = topology.prune_each(scores, masks, tf.unstack(counts))
        removed = topology.count_true_each(masks) - topology.count_true_each(pruned)
        grown = topology.grow_each(grow_scores(pruned, grads), pruned, tf.unstack(removed))
        return pruned, grown, removed

    for _ in range(3):
        scores = [tf.constant(rng.choice([np.nan, np.inf, -np.inf, 0.0, -0.0, 0.5, 1.0, 2.0],
                                         size=s).astype(np.float32)) for s in shapes]
        grads = [tf.constant(rng.integers(-2, 3, size=s).astype(np.float32)) for s in shapes]
        masks = [tf.constant(rng.random(s) < 0.4) for s in shapes]
        counts = tf.constant(rng.integers(0, 400, size=1 if groups else n), tf.int32)
        if within:
            counts = tf.minimum(counts, topology.count_true_each(masks))
        got, want = fused(scores, masks, counts, grads), stepwise(scores, masks, counts, grads)
        for a, b in zip(got[0] + got[1], want[0] + want[1]):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
        np.testing.assert_array_equal(got[2].numpy(), want[2].numpy())


def _largest_constant(hlo: str) -> int:
    """Elements of the largest constant in an HLO module's text."""
    sizes = [math.prod(int(d) for d in dims.split(",") if d) if dims else 1
             for dims in re.findall(r"\w+\[([\d,]*)\](?:\{[\d,]*\})? constant\(", hlo)]
    return max(sizes, default=0)


def test_compiled_selections_embed_no_constant_of_the_layout_size():
    """TensorFlow folds a tensor computed from constants alone (a range of positions, a
    fill of the scores' shape, packed ones) into a constant of that size in the program,
    which costs compile time in every part of XLA: the selections build those from the
    runtime inputs or compare rows and columns instead."""
    shapes = [(300, 256), (256, 100), (100,)]
    entries = sum(math.prod(s) for s in shapes)

    @tf.function(jit_compile=True)
    def update(scores, masks, grads):
        pruned, grown, _ = topology.prune_then_grow(
            scores, masks, [tf.constant(5)] * len(shapes),
            lambda pruned: [tf.where(m, 0.0, g) for m, g in zip(pruned, grads)])
        chosen = topology.select_each(scores, masks, [tf.constant(7)] * len(shapes), True)
        return pruned, grown, chosen

    rng = np.random.default_rng(0)
    scores = [tf.constant(rng.normal(size=s).astype(np.float32)) for s in shapes]
    masks = [tf.constant(rng.random(s) < 0.3) for s in shapes]
    grads = [tf.constant(rng.normal(size=s).astype(np.float32)) for s in shapes]
    hlo = update.experimental_get_compiler_ir(scores, masks, grads)(stage="hlo")
    largest = _largest_constant(hlo)
    assert 0 < largest < entries // 16, (largest, entries)


@pytest.mark.parametrize("lowest", [True, False])
def test_keys_of_a_packed_layout_compile_into_the_pack_kernel(lowest):
    """XLA fuses a concatenation into its consumer only when the consumer reads each of
    its elements once; the score order reads the bit pattern only, so the keys of the
    packed scores (pruning and growth alike) are one kernel with the pack, not two
    (each kernel costs XLA:CPU compile time; a second one also re-reads the layout)."""
    shapes = [(300, 256), (256, 100), (100,)]
    layout = topology.RowLayout(shapes)

    @tf.function(jit_compile=True)
    def keys(weights, masks):
        return topology._keys(layout.pack(
            [tf.abs(tf.where(m, w, 0.0)) for w, m in zip(weights, masks)], 0.0), lowest)

    rng = np.random.default_rng(0)
    weights = [tf.constant(rng.normal(size=s).astype(np.float32)) for s in shapes]
    masks = [tf.constant(rng.random(s) < 0.3) for s in shapes]
    hlo = keys.experimental_get_compiler_ir(weights, masks)(stage="optimized_hlo")
    entry = hlo[hlo.index("\nENTRY"):]
    assert len(re.findall(r"= \S+ fusion\(", entry)) == 1, entry


def test_score_order_is_monotone_on_special_values():
    """-0.0 and +0.0 share a key, NaN ranks below -inf, infinities at the ends, and
    subnormal scores rank by value (read from the bits: a float comparison under the
    CPU's denormals-are-zero mode tied them with 0)."""
    x = tf.constant([np.nan, -np.inf, -3.0, -1e-45, -0.0, 0.0, 1e-45, 2.0, np.inf],
                    tf.float32)
    order = topology._score_order(x).numpy()
    assert order[0] == np.iinfo(np.int32).min and order[1] == -2139095041
    assert order[4] == order[5] == 0
    assert all(order[i] < order[i + 1] for i in (0, 1, 2, 3, 5, 6, 7))
    assert topology._score_order(tf.constant([-np.nan, np.float32("nan")])).numpy().tolist() \
        == [np.iinfo(np.int32).min] * 2


def test_selection_spreads_per_group_values_without_a_dot():
    """The selection's only dots are its counts (entries per row, rows per group, in
    float32 below 2**24 positions); each row's group values come by a gather, one small
    kernel (a float64 dot per spread was two in both loops: the dot and its operand's
    cast)."""
    shapes = [(300, 256), (256, 100), (100,)]

    @tf.function(jit_compile=True)
    def update(scores, masks, grads):
        return topology.prune_then_grow(
            scores, masks, [tf.constant(5)] * len(shapes),
            lambda pruned: [tf.where(m, 0.0, g) for m, g in zip(pruned, grads)],
            counts_within_active=True)

    rng = np.random.default_rng(0)
    scores = [tf.constant(rng.normal(size=s).astype(np.float32)) for s in shapes]
    masks = [tf.constant(rng.random(s) < 0.3) for s in shapes]
    grads = [tf.constant(rng.normal(size=s).astype(np.float32)) for s in shapes]
    hlo = update.experimental_get_compiler_ir(scores, masks, grads)(stage="optimized_hlo")
    dots = re.findall(r"= (\w+)\[[\d,]*\]\S* dot\(", hlo)
    assert dots == ["f32", "f32"], dots
