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


def test_warnings_point_at_the_users_line():
    """keras_dst's warnings named a line inside keras_dst or Keras's callback list (fixed
    stack levels); `user_warnings.warn` names the first frame outside the libraries: the
    user's ``prunable(...)`` / ``model.fit(...)`` line, which warnings filters match."""
    import warnings

    import keras
    import numpy as np

    from conftest import mlp

    dense = mlp()
    dense.get_layer("fc1").trainable = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = keras_dst.prunable(dense, density=0.5)  # the frozen layer: a warning
    frozen = [w for w in caught if "frozen" in str(w.message)]
    assert frozen and all(w.filename == __file__ for w in frozen)

    model = keras_dst.prunable(mlp(), density=0.05)
    model.compile(keras.optimizers.SGD(0.01), "mse", jit_compile=True)
    x = np.zeros((8, int(model.inputs[0].shape[-1])), "float32")
    y = np.zeros((8, int(model.outputs[0].shape[-1])), "float32")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, y, epochs=1, batch_size=2, verbose=0,  # a ramp above the masks: warned
                  callbacks=[keras_dst.GradualPruning(0.01, update_every=1, initial_density=0.5)])
    ramp = [w for w in caught if "GradualPruning" in str(w.message)]
    assert ramp and all(w.filename == __file__ for w in ramp), [(w.filename, w.lineno) for w in ramp]


def test_the_arguments_of_the_smaller_entry_points_are_checked():
    """Each was a raw error naming nothing (AttributeError, "'int' object is not
    callable", os.fspath's), or silently took a meaningless value."""
    import keras
    import numpy as np

    from keras_dst import distributions, layers

    model = keras_dst.prunable(keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]),
                               density=0.5)
    before = keras_dst.masks(model)
    for call, error, message in [
            (lambda: keras_dst.unfit_layers(None, "2:4"), TypeError,
             r"unfit_layers\(\) needs a keras Model, got None"),
            (lambda: keras_dst.summary(model, print_fn=3), TypeError,
             r"summary\(\): print_fn must be callable, got print_fn=3"),
            (lambda: keras_dst.load_model(None), TypeError,
             r"keras_dst.load_model\(\): filepath must be a str or os.PathLike, got filepath=None"),
            (lambda: keras_dst.load_model("m.keras", safe_mode="no"), TypeError,
             r"keras_dst.load_model\(\): safe_mode must be a bool"),
            (lambda: keras_dst.sparse_targets(model, require="yes"), TypeError,
             r"sparse_targets\(\): require must be a bool"),
            (lambda: keras_dst.SparseWrapper(keras.layers.Dense(2, name="d"), density="0.5"),
             TypeError, r"^layer 'd': density must be .*, got density='0.5'"),
            (lambda: keras_dst.MaskConstraint(keras.Variable(np.ones(3, "float32"))), TypeError,
             r"MaskConstraint needs a bool mask variable"),
            (lambda: keras_dst.MaskConstraint(keras.Variable(np.ones(3, bool)), previous=3),
             TypeError, r"MaskConstraint: previous must be None or a constraint"),
            (lambda: keras_dst.MaskConstraint(keras.Variable(np.ones(3, bool)))(np.ones(4)),
             ValueError, r"a mask of shape \(3,\) cannot constrain a weight of shape \(4,\)"),
            (lambda: keras_dst.layer_densities({"a": "34"}, 0.5), ValueError,
             r"shape of layer 'a' must be fully known integers, got '34'"),
            (lambda: keras_dst.layer_densities({"a": (2.7, 3)}, 0.5), ValueError,
             r"shape of layer 'a' must be fully known integers, got \(2.7, 3\)"),
            (lambda: keras_dst.register_prunable_layer(keras.layers.Dense, [1, 2]), TypeError,
             r"register_prunable_layer\(\): weight_names must hold names \(str\), got 1"),
            (lambda: keras_dst.register_prunable_layer(keras.layers.Dense, []), ValueError,
             r"register_prunable_layer\(\) needs at least one weight name, .* got weight_names=\[\]"),
            (lambda: keras_dst.register_prunable_layer(keras.layers.Dense, ""), ValueError,
             r"register_prunable_layer\(\) needs .* no empty one, got weight_names=''"),
            (lambda: keras_dst.register_distribution("test_only_d", overwrite="no")(len), TypeError,
             r"^distribution 'test_only_d': overwrite must be a bool, got overwrite='no'")]:
        with pytest.raises(error, match=message):
            call()
    assert all((keras_dst.masks(model)[k] == v).all() for k, v in before.items())
    assert keras_dst.layer_densities({"a": (np.int64(4), 3)}, 0.5) == \
        distributions.layer_densities({"a": (4, 3)}, 0.5)
    assert layers._registered_names(keras.layers.Dense(2)) == ("kernel",)  # (unchanged)


@pytest.mark.parametrize("make, name", [
    (lambda: keras_dst.GradualPruning(0.5, begin_step=2**63, end_step=2**63 + 10), "begin_step"),
    (lambda: keras_dst.GradualPruning(0.5, end_step=2**63), "end_step"),
    (lambda: keras_dst.CriteriaOverlap(["magnitude", "snip"], update_every=2**64), "update_every"),
    (lambda: keras_dst.DynamicSparseTraining(update_every=2**63), "update_every"),
    (lambda: keras_dst.DynamicSparseTraining(end_step=2**63), "end_step"),
])
def test_steps_past_the_int64_step_counter_are_refused_when_made(make, name):
    """They were accepted, then failed inside fit with TensorFlow's conversion error (or an
    OverflowError) naming nothing, after the callback had installed its hook."""
    with pytest.raises(ValueError, match=rf"{name} must be <= 2\*\*63 - 1 \(an int64, as the step counter\)"):
        make()
    assert validation.check_step(2**63 - 1, "end_step") == 2**63 - 1
