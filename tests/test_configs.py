"""Every object a constructor accepts round-trips through get_config/from_config with its
parameters, or is refused at construction with an error naming the argument."""

import copy
import json
import pickle

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_dst
from keras_dst import schedules
from keras_dst.callbacks import DynamicSparseTraining as DST

from conftest import classification_data, compile_and_fit, mlp


def round_trip(obj):
    config = json.loads(json.dumps(keras.saving.serialize_keras_object(obj)))
    return keras.saving.deserialize_keras_object(config, safe_mode=True)


def test_a_criterion_object_keeps_its_parameters():
    callback = DST(prune=keras_dst.get_criterion("mest", gamma=0.1))
    assert callback.get_config()["prune_params"] == {"gamma": 0.1}
    clone = round_trip(callback)
    assert clone.criterion == callback.criterion and clone.criterion.params["gamma"] == 0.1
    assert clone.get_config() == callback.get_config()


def test_prune_params_and_a_criterion_object_merge():
    callback = DST(prune=keras_dst.get_criterion("running_snip", beta=0.5),
                   prune_params={"beta": 0.7})
    assert round_trip(callback).criterion.params["beta"] == 0.7


def test_a_criterion_with_an_ordering_override_round_trips():
    criterion = keras_dst.get_criterion("magnitude", ordering="before_optimizer")
    callback = DST(prune=criterion)
    clone = round_trip(callback)
    assert clone.criterion == criterion and clone.resolved_ordering == "before_optimizer"
    assert clone.get_config() == callback.get_config()


def test_a_growth_rule_object_keeps_its_parameters():
    @keras_dst.register_growth("test_configs_scaled_gradient", needs_gradient=True,
                               params={"scale": 1.0}, overwrite=True)
    def scaled(inputs, scale):
        return scale * tf.abs(inputs.gradient)

    callback = DST(grow=keras_dst.get_growth("test_configs_scaled_gradient", scale=3.0))
    assert callback.get_config()["grow_params"] == {"scale": 3.0}
    clone = round_trip(callback)
    assert clone.growth == callback.growth and clone.growth.params["scale"] == 3.0
    # its config, as grow= (the signature's dict; a criterion's config works as prune=)
    assert DST(grow=callback.growth.get_config()).growth == callback.growth


@pytest.mark.parametrize("entry", [
    keras_dst.get_criterion("mest", gamma=0.2),
    keras_dst.get_criterion("magnitude", ordering="before_optimizer"),
    keras_dst.get_growth("gradient"),
], ids=["mest", "magnitude_before", "gradient"])
def test_criteria_and_growth_rules_round_trip_through_keras_serialization(entry):
    """Registered Keras objects, as the schedules are: a Keras config (or a custom
    object's) holding one deserializes with safe_mode=True."""
    clone = round_trip(entry)
    assert type(clone) is type(entry) and clone == entry
    assert clone.get_config() == entry.get_config()


def test_a_plain_callable_criterion_is_refused_at_construction():
    def my_score(inputs):
        return tf.abs(inputs.weight)

    with pytest.raises(ValueError, match=r"prune=.*my_score.*register_criterion"):
        DST(prune=my_score)
    with pytest.raises(ValueError, match=r"criteria\[1\].*register_criterion"):
        keras_dst.CriteriaOverlap(["magnitude", my_score])


def test_a_plain_callable_growth_rule_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"grow=.*register_growth"):
        DST(grow=lambda inputs: tf.abs(inputs.gradient))


def test_a_lambda_schedule_is_refused_and_a_schedule_object_round_trips():
    with pytest.raises(ValueError, match="schedule=.*cannot be restored"):
        DST(schedule=lambda step: 0.1)
    with pytest.raises(ValueError, match="schedule"):
        keras_dst.CriteriaOverlap(["magnitude", "snip"], schedule=lambda step: 0.1)
    overlap = keras_dst.CriteriaOverlap(["magnitude", "snip"], schedule=schedules.linear(0.3))
    clone = round_trip(overlap)
    assert clone.schedule.get_config() == overlap.schedule.get_config()


# the two callbacks that take a prune-rate schedule (and prune_rate / total_steps beside it)
SCHEDULED_CALLBACKS = pytest.mark.parametrize(
    "make", [DST, lambda **kw: keras_dst.CriteriaOverlap(["magnitude", "snip"], **kw)],
    ids=["dst", "overlap"])


@SCHEDULED_CALLBACKS
def test_prune_rate_with_a_schedule_object_is_refused_not_ignored(make):
    # the object sets its own rates: a prune_rate beside it used to be dropped silently
    with pytest.raises(ValueError, match=r"prune_rate=0\.2 was given with schedule=.*"
                                         r"CosineRate\(initial="):
        make(prune_rate=0.2, schedule=schedules.CosineRate(0.3, 100))
    with_object = make(schedule=schedules.CosineRate(0.3, 100))
    assert with_object.prune_rate is None
    assert with_object.get_config()["prune_rate"] is None
    assert round_trip(with_object).schedule.get_config() == with_object.schedule.get_config()
    assert make().prune_rate == 0.5  # a named schedule's default
    assert make(prune_rate=0.2, schedule="constant").prune_rate == 0.2
    with pytest.raises(ValueError, match=r"prune_rate must be in \(0, 1\], got prune_rate=1\.5"):
        make(prune_rate=1.5, schedule="constant")


@SCHEDULED_CALLBACKS
def test_total_steps_with_a_schedule_object_is_refused_unless_a_fraction_end_step_uses_it(make):
    # the object sets its own steps: a total_steps beside it used to be dropped silently
    with pytest.raises(ValueError, match=r"total_steps=500 was given with schedule=.*"
                                         r"CosineRate\(initial="):
        make(total_steps=500, schedule=schedules.CosineRate(0.3, 100))
    for named in ("cosine", "constant", "linear"):  # (named: the run's length, if used)
        assert make(total_steps=500, schedule=named).total_steps == 500
    with pytest.raises(ValueError, match=r"total_steps must be >= 1, got total_steps=0"):
        make(total_steps=0)
    if make is DST:  # its fractional end_step is a step of the run: total_steps sets it
        dst = DST(total_steps=500, schedule=schedules.CosineRate(0.3, 100), end_step=0.75)
        assert dst.total_steps == 500 and round_trip(dst).get_config() == dst.get_config()
        assert dst._update_steps().end == 375


def test_criteria_overlap_keeps_criterion_parameters():
    overlap = keras_dst.CriteriaOverlap(
        [keras_dst.get_criterion("mest", gamma=0.1), "snip",
         keras_dst.get_criterion("magnitude", ordering="before_optimizer")])
    clone = round_trip(overlap)
    assert clone.criteria == overlap.criteria
    assert clone.criteria[0].params["gamma"] == 0.1
    assert clone.get_config() == overlap.get_config()


def test_the_reference_ordering_flags_are_aliases():
    assert DST(ordering="before").ordering == "after_optimizer"
    assert DST(ordering="after").ordering == "before_optimizer"
    assert round_trip(DST(ordering="after")).ordering == "before_optimizer"
    assert keras_dst.get_criterion("magnitude", ordering="after").ordering == "before_optimizer"
    with pytest.raises(ValueError, match="ordering.*after_optimizer"):
        DST(ordering="later")


def test_every_named_option_is_matched_as_registered_names_are():
    """Criteria, growth rules, schedules and distributions ignored case, "_" and "-";
    the other named options took only their exact spelling ("Global", "1X4", "Exact"
    were refused). Now every name is matched one way and kept in its canonical form."""
    callback = DST(prune="Magnitude", schedule="COSINE", ordering="Before", scope="Global",
                   optimizer_state="Reset", normalize="Layer", norm_type="SUM")
    config = callback.get_config()
    assert {k: config[k] for k in ("prune", "schedule", "ordering", "scope", "optimizer_state",
                                   "normalize", "norm_type")} == dict(
        prune="magnitude", schedule="cosine", ordering="after_optimizer", scope="global",
        optimizer_state="reset", normalize="layer", norm_type="sum")
    assert round_trip(callback).get_config() == config
    model = keras_dst.prunable(mlp(), density=0.5, init="Exact", pattern="Fan-In")
    wrapper = [layer for layer in model.layers if isinstance(layer, keras_dst.SparseWrapper)][0]
    assert wrapper.get_config()["init"] == "exact"
    assert [str(t.pattern) for t in keras_dst.sparse_targets(model)] == ["fan_in"] * 3
    assert keras_dst.patterns.parse("1X4") == keras_dst.patterns.parse("1x4")
    with pytest.raises(ValueError, match=r"scope must be one of \['global', 'layer'\], got "
                                         r"scope='globe'"):
        DST(scope="globe")


def test_gradual_pruning_round_trips():
    callback = keras_dst.GradualPruning(0.2, update_every=5, begin_step=3, end_step=53, power=2,
                                        initial_density=0.9)
    clone = round_trip(callback)
    assert clone.get_config() == callback.get_config()


@pytest.mark.parametrize("density", [np.float32(0.5), [np.float64(0.5)], (np.float32(0.25),)])
def test_a_wrapper_s_numpy_density_is_a_json_config_float(density):
    wrapper = keras_dst.SparseWrapper(keras.layers.Dense(4), density=density)
    config = json.loads(json.dumps(wrapper.get_config()))  # (a numpy scalar did not dump)
    assert config["density"] == (float(density) if np.ndim(density) == 0
                                 else [float(d) for d in density])
    assert all(type(d) is float for d in np.atleast_1d(wrapper.get_config()["density"]).tolist())


def test_the_mask_constraint_is_not_a_serializable_object():
    assert keras.saving.get_registered_object("keras_dst>MaskConstraint") is None
    model = keras_dst.prunable(keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]),
                               density=0.5)
    constraint = keras_dst.sparse_targets(model)[0].weight.constraint
    assert isinstance(constraint, keras_dst.MaskConstraint)
    with pytest.raises(TypeError, match="not serializable"):
        constraint.get_config()
    assert "MaskConstraint" not in json.dumps(keras.saving.serialize_keras_object(model))


@pytest.mark.parametrize("make", [
    lambda: DST(prune=keras_dst.get_criterion("mest", gamma=0.2), grow="gradient", update_every=2),
    lambda: keras_dst.CriteriaOverlap(["magnitude", "snip"], update_every=2),
    lambda: keras_dst.GradualPruning(0.3, update_every=2, end_step=4),
], ids=["DynamicSparseTraining", "CriteriaOverlap", "GradualPruning"])
def test_callbacks_deep_copy_and_pickle_before_and_after_a_fit(make):
    """A tuner deep-copies the callbacks of every trial (keras-tuner does): the criteria's
    read-only parameter view made DST and CriteriaOverlap refuse it."""
    callback = make()
    for clone in (copy.deepcopy(callback), pickle.loads(pickle.dumps(callback))):
        assert type(clone) is type(callback) and clone.get_config() == callback.get_config()
    density = 1.0 if isinstance(callback, keras_dst.GradualPruning) else 0.3
    compile_and_fit(keras_dst.prunable(mlp(), density=density), [callback])
    clone = copy.deepcopy(callback)  # (as used: it holds the model and engine of that fit)
    model = keras_dst.prunable(mlp(), density=density)
    masks = keras_dst.masks(model)
    compile_and_fit(model, [clone])
    if isinstance(clone, keras_dst.CriteriaOverlap):  # it observes, and its copy goes on
        assert callback.history and len(clone.history) == 2 * len(callback.history)
    else:
        assert any((masks[k] != v).any() for k, v in keras_dst.masks(model).items())


@pytest.mark.parametrize("entry", [keras_dst.get_criterion("mest", gamma=0.2),
                                   keras_dst.get_criterion("set"),
                                   keras_dst.get_growth("gradient")], ids=lambda e: e.name)
def test_criteria_and_growth_rules_are_values_that_copy_and_pickle(entry):
    assert copy.copy(entry) is entry and copy.deepcopy(entry) is entry
    restored = pickle.loads(pickle.dumps(entry))
    assert restored == entry and dict(restored.params) == dict(entry.params)
    with pytest.raises(TypeError):  # still read-only
        restored.params["gamma"] = 1.0


@keras.saving.register_keras_serializable(package="test_configs")
class StepRate:
    """A user's schedule object: `rate` up to step `until`, then `after`."""

    def __init__(self, rate, until=0, after=0.0):
        self.rate, self.until, self.after = rate, until, after

    def __call__(self, step):
        return tf.where(tf.cast(step, tf.int64) <= self.until, self.rate, self.after)

    def get_config(self):
        return {"rate": self.rate, "until": self.until, "after": self.after}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


@SCHEDULED_CALLBACKS
@pytest.mark.parametrize("rate", [2.0, -0.3, float("nan")])
def test_a_user_schedule_s_rate_out_of_range_is_refused_before_anything_changes(make, rate):
    """A schedule object (not a built-in) is evaluated at the fit's update steps before the
    fit changes anything: a rate outside [0, 1] replaced every active weight (2.0) or
    silently updated nothing (NaN, negative)."""
    model = keras_dst.prunable(mlp(), density=0.3)
    masks = keras_dst.masks(model)
    callback = make(update_every=2, schedule=StepRate(0.3, until=6, after=rate))
    with pytest.raises(ValueError, match=rf"{type(callback).__name__}: schedule=.*StepRate.* "
                                         r"gives the prune rate (2|-0\.3|nan) at step 8; a "
                                         r"prune rate is a fraction in \[0, 1\]"):
        compile_and_fit(model, [callback])
    assert all((keras_dst.masks(model)[k] == v).all() for k, v in masks.items())
    assert int(model.optimizer.iterations.numpy()) == 0
    compile_and_fit(model, [make(update_every=2, schedule=StepRate(0.3, until=6, after=0.1))])


@keras.saving.register_keras_serializable(package="test_configs")
class OddRate:
    """A user's schedule object that returns `value` (not one number)."""

    def __init__(self, value):
        self.value = value

    def __call__(self, step):
        return self.value

    def get_config(self):
        return {"value": self.value}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


@SCHEDULED_CALLBACKS
@pytest.mark.parametrize("value,shown", [("0.3", "'0.3'"), ([0.3, 0.3], r"\[0.3, 0.3\]"),
                                         (True, "True")], ids=["str", "list", "bool"])
def test_a_user_schedule_that_returns_no_number_is_refused_before_anything_changes(make, value,
                                                                                     shown):
    """A string failed inside the compiled step, a vector with a message naming nothing."""
    model = keras_dst.prunable(mlp(), density=0.3)
    masks = keras_dst.masks(model)
    with pytest.raises(ValueError, match=r"schedule=.*OddRate.* returns " + shown + r" at step 2; "
                                         r"a schedule returns one number"):
        compile_and_fit(model, [make(update_every=2, schedule=OddRate(value))])
    assert all((keras_dst.masks(model)[k] == v).all() for k, v in masks.items())
    assert int(model.optimizer.iterations.numpy()) == 0


def test_a_user_schedule_s_rate_out_of_range_after_the_checked_steps_stops_the_fit(monkeypatch):
    """Past the update steps checked before the fit, a rate outside [0, 1] ran clamped and
    was logged as it was, with no error."""
    monkeypatch.setattr(DST, "_RATES_CHECKED", 2)  # steps 2 and 4 checked, not 6
    model = keras_dst.prunable(mlp(), density=0.3)
    with pytest.raises(ValueError, match=r"DynamicSparseTraining: schedule=.*StepRate.* gives the "
                                         r"prune rate 2 at step 6; .* first 2 update steps are "
                                         r"checked .* clamped to \[0, 1\]"):
        compile_and_fit(model, [DST(update_every=2, schedule=StepRate(0.3, until=4, after=2.0))])
    assert int(model.optimizer.iterations.numpy()) == 6
    keras_dst.testing.assert_sparse_invariants(model)


def test_a_schedule_object_that_cannot_be_restored_says_why():
    @keras.saving.register_keras_serializable(package="test_configs")
    class NeedsMore:
        def __init__(self, rate, extra):
            self.rate, self.extra = rate, extra

        def __call__(self, step):
            return self.rate

        def get_config(self):  # (and no from_config: Keras cannot rebuild it)
            return {"rate": self.rate, "extra": self.extra}

    with pytest.raises(ValueError, match=r"schedule=.*NeedsMore.* cannot be restored from a "
                                         r"config \(TypeError: Unable to reconstruct an instance "
                                         r"of 'NeedsMore' because the class is missing a "
                                         r"`from_config\(\)` method"):
        DST(schedule=NeedsMore(0.3, 1))


def test_criteria_overlap_warns_when_a_cosine_schedule_of_an_earlier_fit_has_ended():
    model = keras_dst.prunable(mlp(), density=0.3)
    compile_and_fit(model, [keras_dst.CriteriaOverlap(["magnitude", "snip"], schedule="cosine")])
    x, y = classification_data()
    with pytest.warns(UserWarning, match=r"CriteriaOverlap: this fit starts at optimizer step 8, "
                                         r"after the cosine prune-rate schedule has ended"):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0,
                  callbacks=[keras_dst.CriteriaOverlap(["magnitude", "snip"], schedule="cosine")])


def test_a_callback_list_made_without_params_trains():
    """Keras takes a CallbackList as callbacks=; one made without epochs/steps has no
    params (an AttributeError in the schedule's key)."""
    model = keras_dst.prunable(mlp(), density=0.3)
    model.compile(keras.optimizers.SGD(0.05), "sparse_categorical_crossentropy")
    x, y = classification_data()
    callbacks = keras.callbacks.CallbackList([DST(update_every=3, schedule="constant")],
                                             model=model, add_history=True)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=callbacks)
    assert int(model.optimizer.iterations.numpy()) == 8
