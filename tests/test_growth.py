"""Tests of keras_dst.growth: growth scores, registry, configs, and growth through topology."""

import json

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from keras_dst import growth, topology
from keras_dst.growth import GrowthRule, get_growth, register_growth
from keras_dst.registry import Registry

from conftest import score_inputs

SETTINGS = settings(max_examples=40, deadline=None)
SEED = tf.constant([9, 1])
VALUES = st.sampled_from([-2.0, -0.0, 0.0, 1.0, 3.0]) | st.floats(-10, 10, width=32, allow_subnormal=False)


def make_inputs(mask, gradient=None, momentum=None, seed=SEED):
    """Growth rules see zero weights: only the mask, gradient and momentum matter."""
    return score_inputs(mask=mask, gradient=gradient, momentum=momentum, seed=seed)


@SETTINGS
@given(st.data())
def test_scores_match_numpy(data):
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=3, max_side=5))
    g = data.draw(hnp.arrays(np.float32, shape, elements=VALUES))
    m = data.draw(hnp.arrays(np.float32, shape, elements=VALUES))
    inputs = make_inputs(np.zeros(shape, bool), g, m)
    np.testing.assert_array_equal(get_growth("gradient").evaluate(inputs).numpy(), np.abs(g))
    np.testing.assert_array_equal(get_growth("momentum").evaluate(inputs).numpy(), np.abs(m))
    random = get_growth("random").evaluate(inputs).numpy()
    assert random.shape == shape and random.dtype == np.float32
    assert ((0 <= random) & (random < 1)).all()
    np.testing.assert_array_equal(random, get_growth("random").evaluate(inputs).numpy())  # stateless


def test_requirements_flags():
    assert (get_growth("random").needs_gradient, get_growth("random").needs_momentum) == (False, False)
    assert get_growth("gradient").needs_gradient and not get_growth("gradient").needs_momentum
    assert get_growth("momentum").needs_momentum


def test_momentum_without_optimizer_momentum_raises():
    inputs = make_inputs([True, False])
    with pytest.raises(ValueError, match="optimizer has no momentum"):
        get_growth("momentum").evaluate(inputs)
    with pytest.raises(ValueError, match="optimizer has no momentum"):
        growth.momentum(inputs)  # the score function itself checks too


@SETTINGS
@given(st.integers(1, 60), st.integers(0, 70), st.integers(0, 2**16))
def test_gradient_growth_exact_count_among_inactive(n, count, seed):
    rng = np.random.default_rng(seed)
    mask = rng.random(n) < 0.5
    g = rng.integers(-2, 3, n).astype(np.float32)  # many ties and zero gradients
    new = topology.grow(get_growth("gradient").evaluate(make_inputs(mask, g)), tf.constant(mask), count).numpy()
    grown = new & ~mask
    assert grown.sum() == min(count, (~mask).sum())
    assert not (mask & ~new).any()
    if grown.any() and (~mask & ~new).any():
        assert np.abs(g)[grown].min() >= np.abs(g)[~mask & ~new].max()


def test_random_exact_growth_is_uniform_over_candidates():
    mask = np.array([True, False] * 5)

    def grown(seed):
        rule = get_growth("random")
        inputs = make_inputs(mask, seed=tf.stack([seed, 5]))
        return tf.logical_and(topology.grow(rule.evaluate(inputs), tf.constant(mask), 2), ~mask)

    traced = tf.function(grown)  # traced once for the 200 draws (eager: ~3x the time)
    np.testing.assert_array_equal(traced(tf.constant(3)), grown(tf.constant(3)))
    frequency = np.mean([traced(tf.constant(s)).numpy() for s in range(200)], axis=0)
    np.testing.assert_array_equal(frequency[mask], 0.0)
    assert np.all(np.abs(frequency[~mask] - 0.4) < 0.15)


def test_prune_then_grow_regrows_just_pruned_with_gradient():
    w = np.array([0.1, 2.0, -0.05, 1.0, 0.0, 0.0], np.float32)
    mask = np.array([True, True, True, True, False, False])
    g = np.array([9.0, 0.0, 8.0, 0.0, 1.0, 0.5], np.float32)
    pruned = topology.prune(tf.abs(tf.constant(w)), tf.constant(mask), 2)
    np.testing.assert_array_equal(pruned.numpy(), [0, 1, 0, 1, 0, 0])
    regrown = topology.grow(get_growth("gradient").evaluate(make_inputs(pruned.numpy(), g)), pruned, 2)
    np.testing.assert_array_equal(regrown.numpy(), mask)  # the large-gradient just-pruned ones come back


def test_registry_errors_and_custom_rule():
    assert set(growth.growth_names()) >= {"random", "gradient", "momentum"}
    with pytest.raises(ValueError, match="'rigl'.*gradient"):
        get_growth("rigl")
    with pytest.raises(ValueError, match="'scale'"):
        get_growth("gradient", scale=2.0)
    with pytest.raises(TypeError, match=r"Cannot interpret 3.5 as a growth rule"):
        get_growth(3.5)
    with pytest.raises(TypeError, match=r"The config of growth rule 'gradient': params must be "
                                        r"a dict, got params=None"):
        get_growth({"name": "gradient", "params": None})

    def signed_gradient(inputs, sign=1.0):
        return sign * inputs.gradient

    rule = get_growth(signed_gradient, sign=-1.0)
    assert (rule.name, rule.needs_gradient, rule.params["sign"]) == ("signed_gradient", True, -1.0)
    np.testing.assert_array_equal(rule.evaluate(make_inputs([False], [2.0])).numpy(), [-2.0])

    @register_growth("test_only_first_entries", params={"offset": 0.0})
    def first_entries(inputs, offset):
        return -tf.cast(tf.range(tf.size(inputs.mask)), tf.float32) + offset

    new = topology.grow(get_growth("test_only_first_entries").evaluate(make_inputs([False] * 4)),
                        tf.zeros([4], tf.bool), 2)
    np.testing.assert_array_equal(new.numpy(), [True, True, False, False])
    assert get_growth("test_only_first_entries", offset=1.0).params["offset"] == 1.0
    with pytest.raises(ValueError, match="already registered"):
        register_growth("test_only_first_entries")(first_entries)
    assert isinstance(get_growth(rule), GrowthRule)
    # bad registrations are refused when made, naming the rule, and register nothing
    for kwargs, error, message in [
            (dict(needs_momentum="yes"), TypeError, r"Growth rule 'test_only_bad': "
                                                    r"needs_momentum must be a bool"),
            (dict(params=5), TypeError, r"Growth rule 'test_only_bad': params must be a dict"),
            (dict(), ValueError, r"parameter\(s\) \['offset'\] have no default"),
            (dict(params={"offset": 0.0, "scale": 1.0}), ValueError,
             r"Growth rule 'test_only_bad': params \['scale'\] are not keyword parameters")]:
        with pytest.raises(error, match=message):
            register_growth("test_only_bad", **kwargs)(first_entries)
        assert "test_only_bad" not in growth.growth_names()
    try:  # a NumPy bool flag is stored as a bool: the config stays JSON
        register_growth("test_only_np", needs_gradient=np.bool_(True),
                        params={"offset": 0.0})(first_entries)
        assert get_growth("test_only_np").needs_gradient is True
    finally:
        growth._GROWTH.unregister("test_only_np")


def test_registry_is_the_shared_type_with_overwrite():
    assert isinstance(growth._GROWTH, Registry)

    def ones(inputs):
        return tf.ones_like(inputs.weight)

    def twos(inputs):
        return 2.0 * tf.ones_like(inputs.weight)

    try:
        register_growth("test_only_Ones")(ones)
        assert get_growth("TEST-ONLY-ONES").score is ones  # case, "_" and "-" ignored
        with pytest.raises(ValueError, match=r"growth rule 'test_only_ones' is already registered.*overwrite"):
            register_growth("test_only_ones")
        register_growth("test_only_ones", overwrite=True)(twos)
        assert get_growth("test_only_ones").score is twos
        with pytest.raises(ValueError, match=r"Unknown growth rule 'test_only_twos'; known: .*'gradient'"):
            get_growth("test_only_twos")
    finally:
        growth._GROWTH.unregister("test_only_ones")


@pytest.mark.parametrize("name, params", [("random", {}), ("gradient", {}), ("momentum", {})])
def test_growth_config_round_trip(name, params):
    original = get_growth(name, **params)
    config = original.get_config()
    assert config == {"name": name, "params": {}}
    restored = GrowthRule.from_config(json.loads(json.dumps(config)))
    assert restored == original and restored.get_config() == config
    # a config is accepted wherever a rule is, as a criterion's is (the callback's grow=)
    assert get_growth(json.loads(json.dumps(config))) == original


def test_a_config_without_a_name_is_refused_naming_its_keys():
    from keras_dst.criteria import Criterion
    for from_config, kind in ((GrowthRule.from_config, "growth rule"),
                              (Criterion.from_config, "criterion")):
        with pytest.raises(ValueError, match=f"A {kind} config needs a 'name' key; got the "
                                             r"keys \['params'\]"):
            from_config({"params": {}})


def test_growth_config_keeps_params_and_check_serializable():
    @register_growth("test_only_offset_gradient", needs_gradient=True, params={"offset": 0.0}, overwrite=True)
    def offset_gradient(inputs, offset):
        return tf.abs(inputs.gradient) + offset

    rule = get_growth("test_only_offset_gradient", offset=0.5)
    assert rule.get_config() == {"name": "test_only_offset_gradient", "params": {"offset": 0.5}}
    assert GrowthRule.from_config(rule.get_config()) == rule
    assert growth.check_serializable(rule, "grow") is rule
    with pytest.raises(ValueError, match="'colour'"):
        GrowthRule.from_config({"name": "gradient", "params": {}, "colour": "red"})

    def signed_gradient(inputs, sign=1.0):
        return sign * inputs.gradient

    plain = get_growth(signed_gradient, sign=-1.0)
    with pytest.raises(ValueError, match=r"grow='signed_gradient'.*keras_dst\.register_growth"):
        growth.check_serializable(plain, "grow")
    with pytest.raises(ValueError, match=r"growth='signed_gradient'.*register_growth"):
        plain.get_config()
    impostor = GrowthRule(name="gradient", score=signed_gradient, needs_gradient=True)
    with pytest.raises(ValueError, match=r"grow='gradient'.*score.*register_growth"):
        growth.check_serializable(impostor, "grow")
