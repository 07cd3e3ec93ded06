"""Tests of keras_dst.patterns and topology.select_highest_per_group (the pure pattern core)."""

import contextlib
import dataclasses
import math
import re

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from keras_dst import patterns, topology

SETTINGS = settings(max_examples=40, deadline=None)
TIE_VALUES = st.sampled_from([-2.0, -1.0, -0.0, 0.0, 0.5, 1.0, 3.0, np.inf, -np.inf, np.nan])
REMEDY = ("give it another pattern (a model's: prunable(..., pattern_overrides={...}) or "
          "keep_dense=[...]; a single layer's: another pattern=)")


def np_count(mask) -> int:
    return int(np.asarray(mask).sum())


# --------------------------------------------------------------------------- #
# Strategies
# --------------------------------------------------------------------------- #

PATTERN_SPECS = st.one_of(
    st.just("unstructured"),
    st.just("fan_in"),
    st.integers(2, 8).map(lambda b: f"1x{b}"),
    st.integers(2, 8).flatmap(lambda m: st.integers(1, m - 1).map(lambda n: f"{n}:{m}")),
)


@st.composite
def patterned_shapes(draw, specs=PATTERN_SPECS):
    """(pattern, shape, density): Dense-like [I, O] or conv-like [kh, kw, I, O] fitting the pattern."""
    pattern = patterns.parse(draw(specs))
    i = pattern.unit * draw(st.integers(1, 4))
    o = draw(st.integers(1, 5))
    taps = draw(st.sampled_from([(), (1, 1), (3, 3), (2, 3)]))
    density = pattern.n / pattern.m if pattern.kind == "nm" else draw(st.integers(0, 1000)) / 1000
    return pattern, taps + (i, o), density


# --------------------------------------------------------------------------- #
# Parsing
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("spec, kind, block, n, m", [
    ("unstructured", "unstructured", 1, 0, 0), ("fan_in", "fan_in", 1, 0, 0),
    ("1x4", "block", 4, 0, 0), ("1x16", "block", 16, 0, 0), ("2:4", "nm", 1, 2, 4),
    ("1:8", "nm", 1, 1, 8), (" 2:4 ", "nm", 1, 2, 4),
])
def test_parse_fields_and_str_round_trip(spec, kind, block, n, m):
    p = patterns.parse(spec)
    assert (p.kind, p.block, p.n, p.m) == (kind, block, n, m)
    assert str(p) == spec.strip()
    assert patterns.parse(str(p)) == p
    assert patterns.parse(p) is p


@SETTINGS
@given(PATTERN_SPECS)
def test_parse_str_round_trip_property(spec):
    p = patterns.parse(spec)
    assert str(p) == spec and patterns.parse(str(p)) == p and hash(p) == hash(patterns.parse(spec))


def test_none_is_unstructured_and_pattern_is_frozen():
    assert patterns.parse(None) == patterns.UNSTRUCTURED == patterns.Pattern()
    assert str(patterns.parse(None)) == "unstructured"
    with pytest.raises(dataclasses.FrozenInstanceError):
        patterns.parse("2:4").n = 1
    assert patterns.parse("1x4").unit == 4 and patterns.parse("2:8").unit == 8
    assert patterns.parse("fan_in").unit == 1
    # names matched as registered names are: case, "_" and "-" ignored
    assert patterns.parse("FAN_IN") == patterns.parse("Fan-In") == patterns.parse("fan_in")
    assert patterns.parse("1X4") == patterns.parse("1x4")


@pytest.mark.parametrize("bad", ["1x1", "1x0", "1x", "x4", "2x4", "4:4", "0:4", "5:4", "2:4:8", ":4",
                                 "1x\u0661\u0666", "\u0662:4",  # (digits other than ASCII's)
                                 "", "dense", "fan", "nm", 4, 2.5, True, ("2", "4")])
def test_parse_rejects_bad_values_naming_them_and_the_accepted_forms(bad):
    with pytest.raises(ValueError if isinstance(bad, str) else TypeError) as err:
        patterns.parse(bad)
    assert repr(bad) in str(err.value)
    assert "'1xB'" in str(err.value) and "'N:M'" in str(err.value) and "'fan_in'" in str(err.value)


@pytest.mark.parametrize("fields", [dict(kind="block", block=1), dict(kind="nm", n=4, m=4),
                                    dict(kind="nm", n=0, m=4), dict(kind="dense"),
                                    dict(kind="unstructured", block=4), dict(kind="fan_in", n=1, m=2)])
def test_invalid_pattern_objects_are_refused(fields):
    with pytest.raises(ValueError):
        patterns.Pattern(**fields)


# --------------------------------------------------------------------------- #
# Shape and density checks
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("spec, shape", [("1x4", (6, 8)), ("2:4", (3, 3, 6, 8)), ("1x16", (3, 3, 8, 32)),
                                         ("fan_in", (8,)), ("2:4", (8,)), ("1x4", ())])
def test_check_errors_name_the_layer_shape_pattern_and_remedy(spec, shape):
    with pytest.raises(ValueError) as err:
        patterns.check(spec, shape, "conv_7")
    message = str(err.value)
    assert "conv_7" in message and str(tuple(shape)) in message and f"'{spec}'" in message
    assert REMEDY in message


@pytest.mark.parametrize("spec, shape", [("unstructured", ()), ("unstructured", (5,)), ("unstructured", (3, 5)),
                                         ("1x4", (8, 3)), ("1x4", (3, 3, 16, 2)), ("2:4", (4, 1)),
                                         ("fan_in", (7, 3)), ("fan_in", (3, 3, 5, 2)), ("2:4", (0, 3))])
def test_check_accepts_fitting_shapes(spec, shape):
    patterns.check(spec, shape, "layer")


def test_pattern_density():
    assert patterns.pattern_density("2:4", None, "d") == 0.5
    assert patterns.pattern_density("2:4", 0.5 + 1e-10, "d") == 0.5
    assert patterns.pattern_density("1:8", 0.125, "d") == 0.125
    with pytest.raises(ValueError, match=r"dense_3.*'2:4'.*0\.5.*0\.3"):
        patterns.pattern_density("2:4", 0.3, "dense_3")
    with pytest.raises(ValueError, match="2:4"):
        patterns.pattern_density("2:4", 0.5 + 1e-5, "d")
    # 1/3 as a user writes it (the error suggested "use 0.333333", then refused it)
    assert patterns.pattern_density("1:3", 0.333333, "d") == 1 / 3
    assert patterns.pattern_density("1:3", np.float32(1 / 3), "d") == 1 / 3
    with pytest.raises(ValueError, match=r"density 0\.33 was asked; drop it or use 1/3\."):
        patterns.pattern_density("1:3", 0.33, "d")
    assert patterns.pattern_density("1x4", 0.3, "d") == 0.3
    assert patterns.pattern_density(None, 1.0, "d") == 1.0
    with pytest.raises(ValueError, match="needs a density"):
        patterns.pattern_density("fan_in", None, "d")
    with pytest.raises(ValueError):
        patterns.pattern_density("1x4", 1.5, "d")


@pytest.mark.parametrize("spec, shape, density, expected", [
    ("unstructured", (10, 3), 0.25, 8),  # 7.5 -> 8 (half up)
    ("1x4", (8, 3), 0.25, 8),  # 6 blocks, 1.5 -> 2 blocks
    ("2:4", (8, 3), None, 12),
    ("fan_in", (3, 3, 4, 5), 0.2, 35),  # 7.2 -> 7 per output unit
    ("fan_in", (10, 4), 0.0, 4),  # at least 1 per output unit
    ("fan_in", (10, 4), 1.0, 40),
])
def test_active_count(spec, shape, density, expected):
    assert patterns.active_count(spec, shape, density) == expected
    mask = patterns.initial_mask(spec, shape, density, tf.constant([3, 4]))
    assert np_count(mask) == expected


# --------------------------------------------------------------------------- #
# Initial masks
# --------------------------------------------------------------------------- #


@SETTINGS
@given(patterned_shapes(), st.integers(0, 2**31 - 1))
def test_initial_mask_satisfies_pattern_with_exact_counts(case, seed_value):
    pattern, shape, density = case
    seed = tf.constant([seed_value, 7])
    mask = patterns.initial_mask(pattern, shape, density, seed)
    assert mask.dtype == tf.bool and tuple(mask.shape) == shape
    m = mask.numpy()
    assert patterns.violation(pattern, m) is None
    assert np_count(m) == patterns.active_count(pattern, shape, density)
    p, i, o = math.prod(shape[:-2]), shape[-2], shape[-1]
    view = m.reshape(p, i, o)
    if pattern.kind == "block":
        blocks = view.reshape(p, i // pattern.block, pattern.block, o)[:, :, 0, :]
        assert blocks.sum() == math.floor(density * blocks.size + 0.5)
    elif pattern.kind == "nm":
        assert (view.reshape(p, i // pattern.m, pattern.m, o).sum(axis=2) == pattern.n).all()
    elif pattern.kind == "fan_in":
        assert (view.sum(axis=(0, 1)) == patterns.fan_in_count(shape, density)).all()
    else:
        assert m.sum() == math.floor(density * m.size + 0.5)
    np.testing.assert_array_equal(patterns.initial_mask(pattern, shape, density, seed).numpy(), m)


def test_unstructured_initial_mask_is_exact_mask():
    seed = tf.constant([5, 6])
    np.testing.assert_array_equal(patterns.initial_mask(None, (7, 9), 0.3, seed).numpy(),
                                  patterns.distributions.exact_mask((7, 9), 19, seed).numpy())


@pytest.mark.parametrize("spec, shape, density, frequency", [
    ("1x2", (4, 3), 0.5, 0.5),  # 3 of 6 blocks
    ("2:4", (4, 2), None, 0.5),
    ("1:4", (2, 4, 2), None, 0.25),
    ("fan_in", (2, 3, 2), 0.34, 1 / 3),  # 2 of 6 inputs per output unit
    ("fan_in", (20, 2), 0.25, 0.25),  # 5 of 20: the bisection path
])
def test_initial_mask_positions_are_uniform(spec, shape, density, frequency):
    draw = tf.function(lambda seed: patterns.initial_mask(spec, shape, density, seed))
    runs = 300
    total = sum(draw(tf.constant([s, 11])).numpy().astype(int) for s in range(runs))
    # Each entry is active with probability `frequency`: 5 standard deviations.
    assert np.abs(total / runs - frequency).max() < 5 * math.sqrt(frequency * (1 - frequency) / runs)


def test_initial_masks_under_xla():
    cases = [("unstructured", (6, 5), 0.4), ("1x4", (3, 3, 8, 4), 0.3), ("2:4", (3, 3, 8, 4), None),
             ("fan_in", (3, 3, 8, 4), 0.1), ("fan_in", (5, 3), 0.5)]
    for spec, shape, density in cases:
        draw = tf.function(lambda seed, spec=spec, shape=shape, density=density:
                           patterns.initial_mask(spec, shape, density, seed), jit_compile=True)
        for s in range(3):
            mask = draw(tf.constant([s, 1]))
            assert patterns.violation(spec, mask.numpy()) is None, spec
            assert np_count(mask) == patterns.active_count(spec, shape, density), spec
        assert draw.experimental_get_tracing_count() == 1


def test_initial_mask_checks_shape_and_density():
    with pytest.raises(ValueError, match=re.escape(REMEDY)):
        patterns.initial_mask("1x4", (6, 2), 0.5, tf.constant([0, 0]))
    with pytest.raises(ValueError, match="2:4"):
        patterns.initial_mask("2:4", (8, 2), 0.25, tf.constant([0, 0]))


# --------------------------------------------------------------------------- #
# The invariant can fail
# --------------------------------------------------------------------------- #


@SETTINGS
@given(patterned_shapes(st.sampled_from(["1x2", "1x4", "2:4", "1:3", "3:4", "fan_in"])), st.data())
def test_violation_found_when_one_entry_flips(case, data):
    pattern, shape, density = case
    if pattern.kind == "fan_in" and shape[-1] < 2:
        shape = shape[:-1] + (2,)  # one output unit always has "equal" fan-in
    mask = patterns.initial_mask(pattern, shape, density, tf.constant([1, 2])).numpy()
    flat = mask.reshape(-1).copy()
    index = data.draw(st.integers(0, flat.size - 1))
    flat[index] = ~flat[index]
    broken = flat.reshape(shape)
    message = patterns.violation(pattern, broken)
    assert message is not None and str(pattern) in message


def test_violation_messages_locate_the_group():
    mask = np.zeros((8, 3), bool)
    mask[[0, 1, 4, 5], :] = True  # 2:4 everywhere
    assert patterns.violation("2:4", mask) is None
    mask[6, 2] = True
    assert patterns.violation("2:4", mask) == ("pattern '2:4': group (p=0, inputs 4..7, output 2) "
                                               "has 3 active entries, not 2")
    assert "output unit 2 has 5 active inputs, output unit 0 has 4" in patterns.violation("fan_in", mask)
    assert patterns.violation("1x4", mask) == ("pattern '1x4': block (p=0, inputs 0..3, output 0) "
                                               "is partly active: [1, 1, 0, 0]")
    assert patterns.violation("unstructured", mask) is None and patterns.violation(None, mask) is None


# --------------------------------------------------------------------------- #
# Blocks: aggregation and expansion
# --------------------------------------------------------------------------- #


@SETTINGS
@given(patterned_shapes(st.integers(2, 8).map(lambda b: f"1x{b}")), st.data())
def test_block_scores_sum_and_expand_round_trip(case, data):
    pattern, shape, density = case
    scores = data.draw(hnp.arrays(np.float32, shape, elements=st.floats(-4, 4, width=32,
                                                                            allow_subnormal=False)))
    b = pattern.block
    view = scores.reshape(shape[:-2] + (shape[-2] // b, b, shape[-1]))
    summed = patterns.block_scores(pattern, tf.constant(scores)).numpy()
    np.testing.assert_allclose(summed, view.sum(axis=-2), rtol=1e-6, atol=1e-5)
    mask = patterns.initial_mask(pattern, shape, density, tf.constant([2, 3]))
    blocks = patterns.block_mask(pattern, mask)
    assert tuple(blocks.shape) == shape[:-2] + (shape[-2] // b, shape[-1])
    np.testing.assert_array_equal(patterns.expand_blocks(pattern, blocks, shape).numpy(), mask.numpy())
    np.testing.assert_array_equal(patterns.block_mask(pattern, patterns.expand_blocks(pattern, blocks, shape)),
                                  blocks.numpy())
    # Float per-block values expand to every entry of their block.
    expanded = patterns.expand_blocks(pattern, tf.constant(summed), shape).numpy()
    np.testing.assert_array_equal(expanded, np.repeat(summed, b, axis=-2))


def test_block_scores_nan_and_infinities():
    scores = np.array([[1.0, 2.0], [np.nan, 3.0], [np.inf, 1.0], [-np.inf, 1.0],
                       [np.inf, 0.0], [1.0, 0.0]], np.float32)  # (6, 2): blocks of 2 along I
    summed = patterns.block_scores("1x2", tf.constant(scores)).numpy()  # (3, 2)
    assert np.isnan(summed[0, 0]) and summed[0, 1] == 5.0
    assert np.isnan(summed[1, 0])  # +inf and -inf in one block
    assert summed[1, 1] == 2.0 and summed[2, 0] == np.inf and summed[2, 1] == 0.0


def test_block_selection_workflow_prunes_and_grows_whole_blocks():
    """The 1xB update: select on block scores, expand back; NaN blocks go first; ties to lower index."""
    shape = (8, 3)  # 2 x 3 blocks of 4
    w = np.arange(24, dtype=np.float32).reshape(shape) - 8.0
    w[5, 1] = np.nan  # block (1, 1) is NaN: pruned first
    mask = tf.ones(shape, tf.bool)
    blocks = patterns.block_mask("1x4", mask)
    scores = patterns.block_scores("1x4", tf.abs(tf.constant(w)))
    kept = topology.prune(scores, blocks, 2)
    new = patterns.expand_blocks("1x4", kept, shape).numpy()
    # Block |w| sums (w[i, o] = 3 i + o - 8): (0, o) = 16, 14, 12; (1, o) = 34, nan, 42 -> prune nan and 12.
    np.testing.assert_array_equal(kept.numpy(), [[1, 1, 0], [1, 0, 1]])
    assert patterns.violation("1x4", new) is None and new.sum() == 16
    np.testing.assert_array_equal(new[:4, 2], [False] * 4)
    # Growth ties (all zero): the block of lower flat index first.
    grown = topology.grow(tf.zeros_like(scores), kept, 1)
    np.testing.assert_array_equal(grown.numpy(), [[1, 1, 1], [1, 0, 1]])


def test_sum_ranks_blocks_like_tfmot_average_pooling():
    rng = np.random.default_rng(0)
    w = np.abs(rng.normal(size=(3, 3, 16, 8))).astype(np.float32)
    summed = patterns.block_scores("1x4", tf.constant(w))
    mean = tf.reduce_mean(tf.reshape(w, [3, 3, 4, 4, 8]), axis=-2)
    blocks = tf.ones(summed.shape, tf.bool)
    for count in (1, 50, 200):
        np.testing.assert_array_equal(topology.prune(summed, blocks, count).numpy(),
                                      topology.prune(mean, blocks, count).numpy())


def test_block_helpers_refuse_other_patterns():
    with pytest.raises(ValueError, match="2:4"):
        patterns.block_scores("2:4", tf.zeros([4, 2]))
    with pytest.raises(ValueError, match="multiple of 4"):
        patterns.block_scores("1x4", tf.zeros([6, 2]))


# --------------------------------------------------------------------------- #
# Groups
# --------------------------------------------------------------------------- #


@SETTINGS
@given(patterned_shapes(st.one_of(st.just("fan_in"),
                                  st.integers(2, 8).flatmap(lambda m: st.integers(1, m - 1).map(
                                      lambda n: f"{n}:{m}")))))
def test_groups_match_definition_and_round_trip(case):
    pattern, shape, _ = case
    x = np.arange(math.prod(shape), dtype=np.float32).reshape(shape)
    grouped = patterns.groups(pattern, tf.constant(x)).numpy()
    assert grouped.shape == patterns.group_shape(pattern, shape)
    p, i, o = math.prod(shape[:-2]), shape[-2], shape[-1]
    view = x.reshape(p, i, o)
    if pattern.kind == "nm":
        expected = view.reshape(p, i // pattern.m, pattern.m, o).transpose(0, 1, 3, 2).reshape(-1, pattern.m)
    else:
        expected = view.reshape(p * i, o).T
    np.testing.assert_array_equal(grouped, expected)
    assert (np.diff(grouped, axis=1) > 0).all()  # row order is the flat order
    np.testing.assert_array_equal(patterns.ungroup(pattern, tf.constant(grouped), shape).numpy(), x)


def test_groups_small_example_and_refusals():
    x = tf.reshape(tf.range(16), [8, 2])  # x[i, o] = 2 * i + o
    np.testing.assert_array_equal(patterns.groups("2:4", x).numpy(),
                                  [[0, 2, 4, 6], [1, 3, 5, 7], [8, 10, 12, 14], [9, 11, 13, 15]])
    np.testing.assert_array_equal(patterns.groups("fan_in", x).numpy(),
                                  [[0, 2, 4, 6, 8, 10, 12, 14], [1, 3, 5, 7, 9, 11, 13, 15]])
    for spec in ("1x4", "unstructured"):
        with pytest.raises(ValueError, match=spec):
            patterns.groups(spec, x)


@SETTINGS
@given(patterned_shapes(st.sampled_from(["2:4", "1:4", "3:8", "fan_in"])),
       st.integers(0, 100), st.integers(0, 2**31 - 1))
def test_refill_keeps_the_pattern_and_the_count(case, percent, seed_value):
    pattern, shape, density = case
    before = patterns.initial_mask(pattern, shape, density, tf.constant([seed_value, 0]))
    prune_scores = tf.random.stateless_normal(shape, seed=[seed_value, 1])
    r = topology.prune_count(tf.reduce_sum(tf.cast(before, tf.int32)), percent / 100)
    pruned = topology.prune(prune_scores, before, r)
    growth = tf.random.stateless_normal(shape, seed=[seed_value, 2])
    after = patterns.refill(pattern, before, pruned, growth).numpy()
    assert patterns.violation(pattern, after) is None
    assert after.sum() == np_count(before) and not (pruned.numpy() & ~after).any()
    # Each group's regrown entries are its best inactive-after-prune ones.
    grouped = patterns.groups(pattern, tf.constant(after)).numpy() & ~patterns.groups(pattern, pruned).numpy()
    eligible = ~patterns.groups(pattern, pruned).numpy()
    lost = grouped.sum(axis=1)
    np.testing.assert_array_equal(grouped, np_select_per_group(patterns.groups(pattern, growth).numpy(),
                                                                eligible, lost))


def test_refill_regrows_just_pruned_entries_when_best():
    before = tf.constant([[True], [True], [False], [False]])  # one 2:4 group, as (4, 1)
    pruned = tf.constant([[False], [True], [False], [False]])
    growth = tf.constant([[5.0], [0.0], [1.0], [1.0]])
    np.testing.assert_array_equal(patterns.refill("2:4", before, pruned, growth).numpy(), before.numpy())
    growth = tf.constant([[0.0], [0.0], [1.0], [1.0]])  # tie at 1.0: index 2 first
    np.testing.assert_array_equal(patterns.refill("2:4", before, pruned, growth).numpy().ravel(),
                                  [False, True, True, False])


# --------------------------------------------------------------------------- #
# select_highest_per_group against a NumPy oracle
# --------------------------------------------------------------------------- #


def np_select_per_group(scores, eligible, counts):
    """Reference: per row, stable order by (NaN last, -score, index); the first eligible ones."""
    chosen = np.zeros(scores.shape, bool)
    for g in range(scores.shape[0]):
        row = scores[g]
        nan = np.isnan(row)
        order = np.lexsort((np.arange(row.size), np.where(nan, 0.0, -row), nan.astype(int)))
        picked = [j for j in order if eligible[g, j]][:max(int(counts[g]), 0)]
        chosen[g, picked] = True
    return chosen


@contextlib.contextmanager
def rank_max_group(value):
    """Forces one implementation path of select_highest_per_group (read at trace time)."""
    saved = topology._RANK_MAX_GROUP
    topology._RANK_MAX_GROUP = value
    try:
        yield
    finally:
        topology._RANK_MAX_GROUP = saved


@st.composite
def grouped_cases(draw, max_side=40):
    g = draw(st.integers(1, 6))
    s = draw(st.integers(1, max_side))
    # (no subnormals: TensorFlow's CPU kernels flush them to zero, so they tie with 0)
    values = draw(st.sampled_from([TIE_VALUES, st.floats(width=32, allow_subnormal=False)]))
    scores = draw(hnp.arrays(np.float32, (g, s), elements=values))
    eligible = draw(hnp.arrays(np.bool_, (g, s)))
    counts = draw(hnp.arrays(np.int32, (g,), elements=st.integers(-1, s + 2)))
    return scores, eligible, counts


def assert_matches_oracle(scores, eligible, counts, chosen):
    chosen = np.asarray(chosen)
    np.testing.assert_array_equal(chosen, np_select_per_group(scores, eligible, counts))
    assert not (chosen & ~eligible).any()
    np.testing.assert_array_equal(chosen.sum(axis=1), np.minimum(np.maximum(counts, 0), eligible.sum(axis=1)))


@SETTINGS
@given(grouped_cases())
def test_select_highest_per_group_matches_oracle(case):
    scores, eligible, counts = case
    chosen = topology.select_highest_per_group(tf.constant(scores), tf.constant(eligible), tf.constant(counts))
    assert_matches_oracle(scores, eligible, counts, chosen)


@pytest.mark.parametrize("path", ["rank", "bisect"])
@SETTINGS
@given(case=grouped_cases(max_side=20))
def test_both_paths_match_oracle(path, case):
    scores, eligible, counts = case
    with rank_max_group(10**9 if path == "rank" else 0):
        chosen = topology.select_highest_per_group(tf.constant(scores), tf.constant(eligible),
                                                   tf.constant(counts))
    assert_matches_oracle(scores, eligible, counts, chosen)


def test_select_highest_per_group_tie_and_nan_rules():
    scores = tf.constant([[1.0, 0.0, 1.0, -0.0, 0.0], [np.nan, -np.inf, 5.0, np.nan, np.inf]])
    eligible = tf.ones([2, 5], tf.bool)
    chosen = topology.select_highest_per_group(scores, eligible, tf.constant([3, 4]))
    # Row 0: the two 1.0s, then the first of the tied zeros (index 1). Row 1: NaNs last, the lower one first.
    np.testing.assert_array_equal(chosen.numpy().astype(int), [[1, 1, 1, 0, 0], [1, 1, 1, 0, 1]])
    ineligible_best = topology.select_highest_per_group(scores, tf.constant([[False, True, False, True, True]] * 2),
                                                        tf.constant([2, 9]))
    np.testing.assert_array_equal(ineligible_best.numpy().astype(int), [[0, 1, 0, 1, 0], [0, 1, 0, 1, 1]])


@pytest.mark.parametrize("shape", [(0, 4), (3, 0)])
def test_select_highest_per_group_empty(shape):
    counts = tf.zeros([shape[0]], tf.int32)
    chosen = topology.select_highest_per_group(tf.zeros(shape), tf.zeros(shape, tf.bool), counts)
    assert chosen.shape == shape


def test_select_highest_per_group_refuses_other_ranks():
    with pytest.raises(ValueError, match=r"\[G, S\]"):
        topology.select_highest_per_group(tf.zeros([4]), tf.ones([4], tf.bool), tf.constant([1]))


@pytest.mark.parametrize("s", [4, 16, 17, 300])  # both paths on either side of _RANK_MAX_GROUP
def test_select_highest_per_group_under_xla_with_dynamic_counts(s):
    select = tf.function(topology.select_highest_per_group, jit_compile=True)
    rng = np.random.default_rng(s)
    g = 7
    scores = rng.choice([np.nan, np.inf, -np.inf, 0.0, -0.0, 1.5, 2.0, -3.0], size=(g, s)).astype(np.float32)
    eligible = rng.random((g, s)) < 0.6
    for trial in range(4):  # same compiled function, different count values
        counts = rng.integers(-1, s + 3, size=g).astype(np.int32)
        if trial == 0:
            counts[:] = 0
        chosen = select(tf.constant(scores), tf.constant(eligible), tf.constant(counts))
        assert_matches_oracle(scores, eligible, counts, chosen)
    assert select.experimental_get_tracing_count() == 1


def test_large_groups_with_few_distinct_values_under_xla():
    rng = np.random.default_rng(1)
    g, s = 33, 2000
    scores = rng.integers(-2, 3, size=(g, s)).astype(np.float32)
    scores[rng.random((g, s)) < 0.05] = np.nan
    eligible = rng.random((g, s)) < 0.5
    counts = rng.integers(0, s // 2 + 1, size=g).astype(np.int32)
    select = tf.function(topology.select_highest_per_group, jit_compile=True)
    assert_matches_oracle(scores, eligible, counts,
                          select(tf.constant(scores), tf.constant(eligible), tf.constant(counts)))


@pytest.mark.parametrize("spec, shape", [("2:4", (3, 3, 8, 4)), ("fan_in", (3, 3, 8, 4)), ("1x4", (3, 3, 8, 4))])
def test_pattern_updates_under_xla_with_dynamic_counts(spec, shape):
    """One compiled DST-like step per pattern: prune r (a tensor) entries or blocks, regrow as many."""

    @tf.function(jit_compile=True)
    def step(mask, w, g, r):
        if spec == "1x4":
            blocks = patterns.block_mask(spec, mask)
            kept = topology.prune(patterns.block_scores(spec, tf.abs(w)), blocks, r)
            removed = tf.reduce_sum(tf.cast(blocks, tf.int32) - tf.cast(kept, tf.int32))
            grown = topology.grow(patterns.block_scores(spec, tf.abs(g)), kept, removed)
            return patterns.expand_blocks(spec, grown, shape)
        pruned = topology.prune(tf.abs(w), mask, r)
        return patterns.refill(spec, mask, pruned, tf.abs(g))

    density = None if spec == "2:4" else 0.3
    mask = patterns.initial_mask(spec, shape, density, tf.constant([0, 1]))
    for i, r in enumerate((0, 5, 17, 1000)):
        w = tf.random.stateless_normal(shape, seed=[i, 2]) * tf.cast(mask, tf.float32)
        g = tf.random.stateless_normal(shape, seed=[i, 3])
        new = step(mask, w, g, tf.constant(r))
        assert patterns.violation(spec, new.numpy()) is None
        assert np_count(new) == np_count(mask)
        mask = new
    assert step.experimental_get_tracing_count() == 1
