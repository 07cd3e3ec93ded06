"""One test per function of keras_dst/compat.py, run against the installed Keras.

Each function wraps a Keras internal; a Keras upgrade that changes one fails the
test named after it (and, ideally, nothing else).
"""

import copy

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_dst
from keras_dst import compat

L = keras.layers


def test_safe_mode_scope():
    config = L.Lambda(lambda t: t + 1.0).get_config()  # holds the lambda's bytecode
    load = lambda: L.Lambda.from_config(copy.deepcopy(config))  # noqa: E731
    with pytest.raises(ValueError, match="unsafe|safe_mode"):
        load()
    with compat.safe_mode_scope(False):
        layer = load()
        with compat.safe_mode_scope(True):  # nests
            with pytest.raises(ValueError, match="unsafe|safe_mode"):
                load()
        load()  # restored to False on exit
    np.testing.assert_allclose(np.asarray(layer(np.zeros((1, 2), "float32"))), 1.0)
    with pytest.raises(ValueError, match="unsafe|safe_mode"):  # restored to the default
        load()


def test_flatten_layers():
    inner = keras.Sequential([keras.Input((4,), name="inner_in"), L.Dense(4, name="i1"),
                              L.Dense(4, name="i2")], name="inner")
    shared = L.Dense(4, name="shared")
    x = keras.Input((4,), name="x")
    h = shared(inner(shared(x)))  # a layer used twice is listed once
    out = keras_dst.prunable(L.Dense(3, name="d"), density=0.5)(h)
    model = keras.Model(x, out, name="outer")
    layers = compat.flatten_layers(model)
    # Nested models, a wrapper's inner layer and the input layers, each once, depth first
    # in model order (Keras's own recursive listing reverses a nested model's layers).
    assert [l.name for l in layers] == ["x", "shared", "inner", "inner_in", "i1", "i2",
                                        "sparse_d", "d"]
    assert compat.flatten_layers(model, include_self=True) == [model] + layers
    assert compat.flatten_layers(L.Dense(2)) == []
    mha = L.MultiHeadAttention(2, 4, name="mha")
    mha(np.zeros((1, 3, 4), "float32"), np.zeros((1, 3, 4), "float32"))
    assert {"query", "key", "value", "attention_output"} <= {
        l.name for l in compat.flatten_layers(mha)}  # sub-layers of a plain layer


def test_is_graph_model():
    x = keras.Input((3,))
    y = L.Dense(2)(x)

    class Subclassed(keras.Model):
        def call(self, inputs):
            return inputs

    assert compat.is_graph_model(keras.Model(x, y))
    assert compat.is_graph_model(keras.Sequential([L.Dense(2)]))
    assert not compat.is_graph_model(Subclassed())
    assert not compat.is_graph_model(Subclassed(x, y))  # functional subclass: its own name


def test_optimizer_trainable_variables():
    a, b = keras.Variable(np.ones(2, "float32")), keras.Variable(np.ones(3, "float32"))
    opt = keras.optimizers.SGD(0.5)
    opt.build([a, b])
    variables = compat.optimizer_trainable_variables(opt)
    assert [id(v) for v in variables] == [id(a), id(b)]
    # It is the optimizer's own attribute (optimizer_state's slot scan skips it by identity).
    assert any(value is variables for value in vars(opt).values())
    opt.apply([np.ones(2, "float32"), np.ones(3, "float32")])  # no variables: these
    np.testing.assert_allclose(a.numpy(), 0.5)
    np.testing.assert_allclose(b.numpy(), 0.5)


def test_optimizer_variable_index():
    weights = [keras.Variable(np.zeros(shape, "float32")) for shape in ((2,), (3, 4), (5,))]
    opt = keras.optimizers.SGD(0.1, momentum=0.9)
    opt.build(weights)
    for i, w in enumerate(weights):
        assert compat.optimizer_variable_index(opt, w) == i
        assert tuple(opt.momentums[i].shape) == tuple(w.shape)  # indexes the slot lists
    with pytest.raises(KeyError):
        compat.optimizer_variable_index(opt, keras.Variable(np.zeros(2, "float32")))


def _slots_of_only_weight(optimizer, weight):
    """{attribute: slot} of an optimizer built for `weight` alone (no other compat call)."""
    optimizer.build([weight])
    return {name: value[0] for name, value in vars(optimizer).items()
            if isinstance(value, list) and len(value) == 1
            and isinstance(value[0], keras.Variable) and value[0] is not weight}


def test_moment_slots():
    w = keras.Variable(np.zeros((3, 2), "float32"))
    sgd = keras.optimizers.SGD(0.1, momentum=0.9)
    first, second, _ = compat.moment_slots(sgd, _slots_of_only_weight(sgd, w))
    assert first is sgd.momentums[0] and second is None

    adam = keras.optimizers.Adam()
    first, second, root = compat.moment_slots(adam, _slots_of_only_weight(adam, w))
    assert first is not None and second is not None and root
    assert "momentum" in first.path and "velocity" in second.path

    adamax = keras.optimizers.Adamax()  # its step divides m by u, not by sqrt(u)
    first, second, root = compat.moment_slots(adamax, _slots_of_only_weight(adamax, w))
    assert (first, second, root) == (adamax._m[0], adamax._u[0], False)

    # RMSprop's momentum buffer sums steps already divided by sqrt(velocity)
    rmsprop = keras.optimizers.RMSprop(momentum=0.5)
    slots = _slots_of_only_weight(rmsprop, w)
    assert "_velocities" in slots
    assert compat.moment_slots(rmsprop, slots) == (rmsprop._momentums[0], None, False)
    plain_rmsprop = keras.optimizers.RMSprop()
    assert compat.moment_slots(plain_rmsprop, _slots_of_only_weight(plain_rmsprop, w)) == (
        None, None, False)

    plain = keras.optimizers.SGD(0.1)
    assert compat.moment_slots(plain, _slots_of_only_weight(plain, w)) == (None, None, False)


def test_wrap_deferred_initializer():
    double = lambda init: (lambda shape, dtype=None: 2.0 * init(shape, dtype=dtype))  # noqa: E731
    with keras.StatelessScope():
        deferred = keras.Variable(initializer="ones", shape=(3,))
        assert compat.wrap_deferred_initializer(deferred, double)
    np.testing.assert_allclose(np.asarray(deferred.value), 2.0)
    ready = keras.Variable(np.ones(3, "float32"))
    assert not compat.wrap_deferred_initializer(ready, double)
    np.testing.assert_allclose(ready.numpy(), 1.0)

    # The keras_dst path: a subclassed model's first call builds its layers symbolically.
    class Model(keras.Model):
        def __init__(self):
            super().__init__()
            self.sparse = keras_dst.prunable(L.Dense(8), density=0.5)

        def call(self, inputs):
            return self.sparse(inputs)

    model = Model()
    model(np.ones((2, 4), "float32"))
    kernel, mask = model.sparse.layer.kernel.numpy(), model.sparse.masks[0].numpy()
    assert 0 < mask.sum() < mask.size
    assert (kernel[~mask] == 0).all() and (kernel[mask] != 0).all()


def test_on_raw_variables_now_or_after_the_deferred_initialisation():
    seen = []
    ready = keras.Variable(np.ones(3, "float32"))
    compat.on_raw_variables(ready, seen.append)
    assert len(seen) == 1 and isinstance(seen[0], tf.Variable) and seen[0] is ready.value
    with keras.StatelessScope():
        deferred = keras.Variable(initializer="ones", shape=(3,))
        compat.on_raw_variables(deferred, seen.append)
        assert len(seen) == 1  # not created yet
    # (leaving the scope initialises it)
    assert len(seen) == 2 and seen[1] is deferred.value
    np.testing.assert_allclose(np.asarray(deferred.value), 1.0)


def test_set_initial_epoch():
    epochs = []

    class Resume(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            compat.set_initial_epoch(self.model, 2)

        def on_epoch_begin(self, epoch, logs=None):
            epochs.append(epoch)

    model = keras.Sequential([keras.Input((2,)), L.Dense(1)])
    model.compile("sgd", "mse")
    history = model.fit(np.zeros((4, 2)), np.zeros((4, 1)), epochs=4, verbose=0,
                        callbacks=[Resume()])
    assert epochs == [2, 3] and len(history.history["loss"]) == 2


def test_keras_training_entry_and_inside_keras_fit():
    seen, inside = [], []

    def watch(force=False):  # what keras_dst installs as model.make_train_function
        seen.append(compat.keras_training_entry())
        return type(model).make_train_function(model, force=force)

    model = keras.Sequential([keras.Input((2,)), L.Dense(1)])
    model.compile("sgd", "mse")
    model.__dict__["make_train_function"] = watch
    in_fit = keras.callbacks.LambdaCallback(
        on_train_begin=lambda logs: inside.append(compat.inside_keras_fit(model)),
        on_epoch_begin=lambda e, l: model.make_train_function())
    model.fit(np.zeros((4, 2)), np.zeros((4, 1)), epochs=1, verbose=0, callbacks=[in_fit])
    model.train_on_batch(np.zeros((4, 2)), np.zeros((4, 1)))
    model.make_train_function()
    assert seen == ["fit", None, "train_on_batch", None]
    keras.callbacks.CallbackList([in_fit], model=model).on_train_begin()  # a user's loop
    assert inside == [True, False]
    # a user's loop of this model driven from a callback of another model's fit
    other = keras.Sequential([keras.Input((2,)), L.Dense(1)])
    other.compile("sgd", "mse")
    driver = keras.callbacks.LambdaCallback(on_train_begin=lambda logs: keras.callbacks.CallbackList(
        [in_fit], model=model).on_train_begin())
    other.fit(np.zeros((4, 2)), np.zeros((4, 1)), epochs=1, verbose=0, callbacks=[driver])
    assert inside == [True, False, False]


def test_child_layers():
    inner = keras.Sequential([keras.Input((4,)), L.Dense(4, name="c1")], name="child_model")

    class Block(L.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.a = L.Dense(4, name="a")
            self.pair = [L.Dense(4, name="p0"), L.Dense(4, name="p1")]
            self.model = inner

        def call(self, x):
            return self.model(self.pair[1](self.pair[0](self.a(x))))

    block = Block(name="block")
    block(np.zeros((1, 4), "float32"))
    # One level only: the attribute, the list's layers and the nested model, not c1.
    assert {l.name for l in compat.child_layers(block)} == {"a", "p0", "p1", "child_model"}
    assert compat.child_layers(L.Dense(2)) == []
    wrapper = keras_dst.prunable(L.Dense(3, name="d"), density=0.5)
    assert [l.name for l in compat.child_layers(wrapper)] == ["d"]


def test_created_trainable():
    block = keras.Sequential([keras.Input((4,)), L.Dense(3, name="d"),
                              L.BatchNormalization(name="bn")], name="block")
    expected = ["block/d/kernel", "block/d/bias", "block/bn/gamma", "block/bn/beta"]
    assert [v.path for v in compat.created_trainable(block)] == expected
    block.trainable = False  # frozen: every variable reads trainable=False, the list stays
    assert not any(v.trainable for v in block.weights)
    assert [v.path for v in compat.created_trainable(block)] == expected
    assert [v.path for v in compat.created_trainable(block.get_layer("bn"))] == expected[2:]


def test_set_own_variables_io(tmp_path):
    calls = []
    x = keras.Input((3,))
    dense = L.Dense(2, name="d")
    model = keras.Model(x, dense(x))

    def save(store):
        calls.append("save")
        type(dense).save_own_variables(dense, store)
        store["extra"] = np.arange(3)

    def load(store):
        calls.append(("load", sorted(store.keys())))
        assert np.array_equal(np.asarray(store["extra"]), np.arange(3))

    compat.set_own_variables_io(dense, save=save, load=load)
    path = str(tmp_path / "m.weights.h5")
    model.save_weights(path)  # Keras's saving calls the instance's functions
    model.load_weights(path)
    assert calls == ["save", ("load", ["0", "1", "extra"])]
    compat.set_own_variables_io(dense)  # back to the class's methods
    assert "save_own_variables" not in vars(dense) and "load_own_variables" not in vars(dense)
    with pytest.raises(ValueError, match="expected 2 variables"):  # the class checks the count
        model.load_weights(path)


@pytest.mark.parametrize("name,source", [("float8_from_mixed_bfloat16", "mixed_bfloat16"),
                                         ("int8_from_float32", "float32"),
                                         ("mixed_float16", "mixed_float16"), ("float32", "float32")])
def test_unquantized_policy(name, source):
    policy = keras.dtype_policies.get(name)
    unquantized = compat.unquantized_policy(policy)
    assert unquantized.name == source and not getattr(unquantized, "quantization_mode", None)
    if name == source:
        assert unquantized is policy


def test_inferred_input_signature():
    class DictModel(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, inputs):
            return self.dense(inputs["a"] + inputs["b"])

    model = DictModel()
    model({"a": np.zeros((3, 4), "float32"), "b": np.zeros((3, 4), "float32")})
    [signature] = compat.inferred_input_signature(model)
    assert sorted(signature) == ["a", "b"]
    assert tuple(signature["a"].shape) == (None, 4) and signature["a"].dtype == "float32"


def test_build_compiled_state():
    model = keras.Sequential([keras.Input((4,)), L.Dense(3)])
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    data = tf.data.Dataset.from_tensor_slices(
        (np.zeros((8, 4), "float32"), np.zeros((8,), "int32"))).batch(4)
    compat.build_compiled_state(model, (batch for batch in data))  # no spec: left alone
    assert not model._compile_metrics.built
    compat.build_compiled_state(model, iter(data))
    assert model._compile_metrics.built and model._compile_loss.built

    class OwnStep(keras.Sequential):  # (may pass the metrics another y: left to its trace)
        def train_step(self, data):
            return super().train_step(data)

    own = OwnStep([keras.Input((4,)), L.Dense(3)])
    own.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"])
    compat.build_compiled_state(own, iter(data))
    assert not own._compile_metrics.built


def test_optimizer_slot_lists():
    weights = [keras.Variable(np.ones((2, 3), "float32")), keras.Variable(np.ones(3, "float32"))]
    adam = keras.optimizers.Adam()
    adam.build(weights)
    slots = compat.optimizer_slot_lists(adam)
    assert {"_momentums", "_velocities"} <= set(slots)
    assert all(len(v) == 2 and tuple(v[0].shape) == (2, 3) for v in slots.values())
    plain = keras.optimizers.SGD()  # no momentum: no per-weight state
    plain.build(weights)
    assert compat.optimizer_slot_lists(plain) == {}


def test_on_and_off_checkpoint_restore(tmp_path):
    variable = keras.Variable(np.zeros(3, "float32"))
    path = tf.train.Checkpoint(v=keras.Variable(np.arange(3, dtype="float32"))).save(
        str(tmp_path / "ckpt"))
    seen = []
    compat.on_checkpoint_restore(variable, lambda value: seen.append(np.asarray(value)))
    tf.train.Checkpoint(v=variable).restore(path).expect_partial()
    assert len(seen) == 1 and seen[0].tolist() == [0.0, 1.0, 2.0]
    assert variable.numpy().tolist() == [0.0, 0.0, 0.0]  # (the assign chose not to write)
    compat.off_checkpoint_restore(variable)
    tf.train.Checkpoint(v=variable).restore(path).expect_partial()
    assert len(seen) == 1 and variable.numpy().tolist() == [0.0, 1.0, 2.0]


def test_checkpoint_restore_waits_for_and_delete_checkpoint_dependency(tmp_path):
    saved = tf.Module()
    saved.extra = tf.Module()
    saved.extra.v = tf.Variable([1.0, 2.0])
    path = tf.train.Checkpoint(root=saved).save(str(tmp_path / "ckpt"))
    holder = tf.Module()
    tf.train.Checkpoint(root=holder).restore(path).expect_partial()
    assert compat.checkpoint_restore_waits_for(holder, "extra")
    assert not compat.checkpoint_restore_waits_for(holder, "other")
    holder.extra = tf.Module()
    holder.extra.v = tf.Variable([0.0, 0.0])  # (restored as soon as it is tracked)
    assert holder.extra.v.numpy().tolist() == [1.0, 2.0]
    compat.delete_checkpoint_dependency(holder, "extra")
    assert "extra" not in holder.__dict__
    assert [name for name, _ in tf.train.Checkpoint(root=holder).root._trackable_children()
            .items() if name == "extra"] == []
    compat.delete_checkpoint_dependency(holder, "extra")  # (gone: nothing to do)


def test_off_raw_variables():
    variable = keras.Variable(np.ones(3, "float32"))
    compat.on_raw_variables(variable, lambda raw: setattr(raw, "marker", 1))
    assert variable.value.__dict__.get("marker") == 1
    compat.off_raw_variables(variable, "marker")
    assert "marker" not in variable.value.__dict__
    with keras.StatelessScope():
        deferred = keras.Variable(initializer="ones", shape=(3,))
        compat.on_raw_variables(deferred, lambda raw: setattr(raw, "marker", 1))
        compat.off_raw_variables(deferred, "marker")  # (the install still pending: dropped)
    assert "marker" not in deferred.value.__dict__


def test_tflite_schema():
    schema = compat.tflite_schema()
    assert hasattr(schema, "ModelT") and hasattr(schema, "SparsityParametersT")
