"""Tests of keras_dst.schedules: prune-rate schedules and the polynomial sparsity curve."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from keras_dst import schedules
from keras_dst.registry import Registry

SETTINGS = settings(max_examples=40, deadline=None)


@pytest.mark.parametrize("step, expected, tol", [
    (0, 0.5, 1e-7), (800, 0.4994, 1e-4), (8000, 0.4395, 1e-4), (17600, 0.2525, 1e-6),
    (30000, 0.0312, 1e-4), (35200, 0.005, 1e-7), (50000, 0.005, 1e-7),
])
def test_cosine_matches_spec_example(step, expected, tol):
    rate = schedules.cosine(0.5, total_steps=35200)(tf.constant(step, tf.int64))
    assert rate.dtype == tf.float64 and rate.shape == ()  # as the reference's arithmetic
    assert float(rate) == pytest.approx(expected, abs=tol)


@SETTINGS
@given(st.integers(0, 10**6), st.integers(1, 10**5), st.floats(0.0, 1.0, exclude_min=True),
       st.floats(0.0, 0.1))
def test_cosine_formula(step, total, initial, floor):
    expected = floor + (initial - floor) * (1 + math.cos(math.pi * min(step, total) / total)) / 2
    assert float(schedules.CosineRate(initial, total, floor)(step)) == pytest.approx(expected, abs=1e-6)


def test_constant_and_linear():
    assert float(schedules.constant(0.25)(tf.constant(12345, tf.int64))) == 0.25
    linear = schedules.linear(0.5)
    for step, k in ((0, 0), (599, 0), (600, 1), (1799, 2), (6000, 10)):
        assert float(linear(step)) == pytest.approx(0.5 * 0.99**k, rel=1e-6)
    assert float(schedules.linear(1.0, factor=0.5, every=10)(35)) == pytest.approx(0.125)


def test_get_schedule():
    assert float(schedules.get_schedule("cosine", 0.5, total_steps=100)(100)) == pytest.approx(0.005)
    assert float(schedules.get_schedule("constant", 0.3)(7)) == pytest.approx(0.3)
    assert float(schedules.get_schedule("linear", 0.3)(600)) == pytest.approx(0.297)
    custom = lambda step: tf.constant(0.1)  # noqa: E731
    assert schedules.get_schedule(custom) is custom
    with pytest.raises(ValueError, match="'cosinus'"):
        schedules.get_schedule("cosinus", 0.5, 100)
    with pytest.raises(ValueError, match="total_steps"):
        schedules.get_schedule("cosine", 0.5)
    with pytest.raises(ValueError, match="total_steps"):
        schedules.cosine(0.5, total_steps=0)
    with pytest.raises(ValueError, match="every"):
        schedules.linear(0.5, every=0)


def test_a_run_s_schedule_and_its_key():
    def steps_of(known):
        def run_steps(what):
            if known is None and what is not None:
                raise ValueError(f"{what} needs the number of training steps")
            return known
        return run_steps

    def key(schedule, total=None, known=100):
        return schedules.run_key(schedule, 0.5, total, steps_of(known))

    assert schedules.for_run("cosine", 0.5, None, steps_of(100)).total_steps == 100
    assert schedules.for_run("cosine", 0.5, 30, steps_of(100)).total_steps == 30
    assert isinstance(schedules.for_run("constant", 0.5, None, steps_of(None)), schedules.ConstantRate)
    with pytest.raises(ValueError, match="schedule='cosine' needs the number"):
        schedules.for_run("cosine", 0.5, None, steps_of(None))
    # by value: the length matters where the schedule is made from it
    assert key("constant", known=10) == key("constant", known=20) == key("constant", known=None)
    assert key("cosine", known=10) != key("cosine", known=20)
    assert key("cosine", known=40) == key("cosine", total=40, known=10) == key(schedules.cosine(0.5, 40))
    assert key(schedules.cosine(0.5, 40)) != key(schedules.cosine(0.5, 41))
    # a factory's result without a config: by its arguments; a plain callable by identity
    schedules.register_schedule("test_only_closure")(
        lambda initial, total: (lambda step: tf.constant(initial, tf.float64)))
    try:
        assert key("test_only_closure", known=10) == key("test_only_closure", known=10)
        assert key("test_only_closure", known=10) != key("test_only_closure", known=20)
    finally:
        schedules.SCHEDULES.unregister("test_only_closure")
    rate = schedules.constant(0.1).__call__
    assert key(rate) == key(rate) and key(rate) != key(schedules.constant(0.1).__call__)


def test_schedule_registry_is_the_shared_type():
    assert isinstance(schedules.SCHEDULES, Registry)
    assert tuple(schedules.SCHEDULES) == ("constant", "cosine", "linear")  # callbacks validate against these
    assert float(schedules.get_schedule("Cosine", 0.5, total_steps=100)(0)) == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"Unknown prune-rate schedule 'cosinus'; known: 'constant', 'cosine'"):
        schedules.get_schedule("cosinus", 0.5, 100)
    with pytest.raises(ValueError, match=r"prune-rate schedule 'linear' is already registered.*overwrite=True"):
        schedules.register_schedule("linear")

    calls = []

    @schedules.register_schedule("test_only_halving")
    def halving(initial, total_steps):
        calls.append((initial, total_steps))
        return schedules.linear(initial, factor=0.5, every=10)

    try:
        rate = schedules.get_schedule("test-only-halving", 0.4, total_steps=50)
        assert calls == [(0.4, 50)] and float(rate(10)) == pytest.approx(0.2)
        schedules.register_schedule("test_only_halving", overwrite=True)(
            lambda initial, total_steps: schedules.constant(initial / 4))
        assert float(schedules.get_schedule("test_only_halving", 0.4)(10)) == pytest.approx(0.1)
    finally:
        schedules.SCHEDULES.unregister("test_only_halving")
    assert "test_only_halving" not in schedules.SCHEDULES


@pytest.mark.parametrize("schedule", [schedules.cosine(0.5, 1000, 0.01), schedules.constant(0.2),
                                      schedules.linear(0.4, 0.9, 50)])
def test_schedules_serialize_and_trace(schedule):
    clone = type(schedule).from_config(schedule.get_config())
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(schedule))
    traced = tf.function(lambda step: schedule(step), jit_compile=True)
    for step in (0, 77, 999, 5000):
        expected = float(schedule(step))
        assert float(clone(step)) == expected == float(restored(step))
        assert float(traced(tf.constant(step, tf.int64))) == pytest.approx(expected, abs=1e-7)


def tfmot_sparsity(step, initial, final, begin, end, power):
    p = min(1.0, max(0.0, (step - begin) / (end - begin)))
    return final + (initial - final) * (1 - p) ** power


@SETTINGS
@given(st.integers(0, 3000), st.floats(0, 0.99), st.floats(0, 0.99), st.integers(0, 1000),
       st.integers(1, 2000), st.sampled_from([1, 2, 3]))
def test_polynomial_density_curve(step, initial, final, begin, length, power):
    end = begin + length
    got = schedules.polynomial_density(tf.constant(step, tf.int64), 1.0 - initial, 1.0 - final,
                                       begin, end, power)
    assert float(got) == pytest.approx(1.0 - tfmot_sparsity(step, initial, final, begin, end, power),
                                       abs=1e-6)


def test_polynomial_density_values():
    curve = [float(schedules.polynomial_density(s, 1.0, 0.2, 100, 1100)) for s in (0, 100, 600, 1100, 5000)]
    np.testing.assert_allclose(curve, [1.0, 1.0, 0.2 + 0.8 * 0.5**3, 0.2, 0.2], atol=1e-6)
    with pytest.raises(ValueError, match="final_density"):
        schedules.polynomial_density(0, 1.0, 0.0, 0, 10)
    with pytest.raises(ValueError, match="end_step"):
        schedules.polynomial_density(0, 1.0, 0.5, 10, 10)
    with pytest.raises(ValueError, match="begin_step"):
        schedules.polynomial_density(0, 1.0, 0.5, -1, 10)


def test_update_steps_is_tfmot_s_rule():
    """begin <= t <= end and (t - begin) % every == 0 (TF-MOT's PolynomialDecay.should_prune)."""
    steps = schedules.UpdateSteps(every=100, begin=100, end=500)
    got = [bool(steps.is_update_step(s)) for s in (0, 99, 100, 150, 200, 500, 600)]
    assert got == [False, False, True, False, True, True, False]
    forever = schedules.UpdateSteps(every=1000)
    assert bool(forever.is_update_step(tf.constant(10**6, tf.int64)))  # None: no end
    assert not bool(forever.is_update_step(tf.constant(10**6 + 1, tf.int64)))
    assert not bool(forever.is_update_step(0))  # steps are 1-based
    with pytest.raises(ValueError, match="update_every"):
        schedules.UpdateSteps(every=0)
    with pytest.raises(ValueError, match="end_step"):
        schedules.UpdateSteps(every=1, begin=10, end=5)
    with pytest.raises(TypeError, match="begin_step"):
        schedules.UpdateSteps(every=1, begin=1.5)

    @tf.function(jit_compile=True)
    def traced(step):
        return steps.is_update_step(step), schedules.polynomial_density(step, 0.9, 0.1, 100, 500)

    flag, density = traced(tf.constant(300, tf.int64))
    assert bool(flag) and float(density) == pytest.approx(1.0 - tfmot_sparsity(300, 0.1, 0.9, 100, 500, 3),
                                                          abs=1e-6)


@SETTINGS
@given(st.integers(1, 7), st.integers(0, 12), st.one_of(st.none(), st.integers(0, 30)),
       st.integers(0, 40), st.integers(0, 8))
def test_the_host_rule_agrees_with_the_device_rule(every, begin, end, first, length):
    """`any_between` (host, before an execution) is exact against `is_update_step` (device)."""
    if end is not None and end < max(begin, 1):
        end = max(begin, 1) + end
    steps = schedules.UpdateSteps(every, begin, end)
    last = first + length
    device = any(bool(steps.is_update_step(t)) for t in range(first, last + 1))
    assert steps.any_between(first, last) == device


@SETTINGS
@given(st.integers(1, 7), st.integers(0, 12), st.one_of(st.none(), st.integers(0, 30)), st.integers(0, 60))
def test_last_update_step_at_or_before_agrees_with_the_device_rule(every, begin, end, step):
    if end is not None and end < max(begin, 1):
        end = max(begin, 1) + end
    steps = schedules.UpdateSteps(every, begin, end)
    due = [t for t in range(0, step + 1) if bool(steps.is_update_step(t))]
    assert steps.last_at_or_before(step) == (due[-1] if due else None)


def test_prune_count_of_a_large_layer_is_the_float64_ceiling_of_the_reference():
    """The reference computes ceil(p * a) with p from Python float64 arithmetic. For layers
    of >= 10^5 active weights a float32 rate puts the count one off in some (step, a); the
    built-in schedules compute in float64, so every count equals the reference's."""
    from keras_dst import topology

    total, differ = 10_000, 0
    schedule = schedules.cosine(0.5, total)
    for step in range(100, total, 100):
        p = 0.005 + (0.5 - 0.005) * (1 + math.cos(math.pi * step / total)) / 2
        for active in (123_457, 1_000_003, 2_359_296):
            want = math.ceil(p * active)
            assert int(topology.prune_count(active, schedule(step))) == want, (step, active)
            differ += int(topology.prune_count(active, tf.cast(schedule(step), tf.float32))) != want
    assert differ > 0  # the float32 rate really was off somewhere: the check can fail


@pytest.mark.parametrize("make, error, message", [
    (lambda: schedules.CosineRate(5.0, 10), ValueError,
     "CosineRate: initial must be in (0, 1], got initial=5.0."),
    (lambda: schedules.CosineRate(0.5, float("nan")), TypeError,
     "CosineRate: total_steps must be a positive int, got total_steps=nan."),
    (lambda: schedules.CosineRate(0.5, 1.5), TypeError,
     "CosineRate: total_steps must be a positive int, got total_steps=1.5."),
    (lambda: schedules.CosineRate(0.5, 10, floor=-0.1), ValueError,
     "CosineRate: floor must be in [0, 1], got floor=-0.1."),
    (lambda: schedules.ConstantRate(-1.0), ValueError,
     "ConstantRate: initial must be in (0, 1], got initial=-1.0."),
    (lambda: schedules.ConstantRate(float("nan")), ValueError,
     "ConstantRate: initial must be in (0, 1], got initial=nan."),
    (lambda: schedules.LinearRate(0.5, 0.9, every=0.5), TypeError,
     "LinearRate: every must be a positive int, got every=0.5."),
    (lambda: schedules.LinearRate(0.5, factor=1.5), ValueError,
     "LinearRate: factor must be in (0, 1], got factor=1.5."),
])
def test_a_schedule_refuses_rates_outside_a_fraction(make, error, message):
    """A schedule object is a prune rate over steps: the constructor checks what
    `prune_rate=` is checked for (a rate above 1 pruned every active weight; a negative
    or NaN one silently skipped every update)."""
    with pytest.raises(error) as info:
        make()
    assert str(info.value) == message
