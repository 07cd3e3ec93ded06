"""`prunable()` on models that cannot be rebuilt: masks attached to a model's own layers.

A subclassed model (written without keras_dst), a model nested in a model, and a
graph model with ``in_place=True`` get their masks attached in place
(`keras_dst.layers.attach`): the same object comes back, no layer is added, the
forward pass is the layers' own. Everything downstream (DST, `GradualPruning`,
`CriteriaOverlap`, `masks`/`set_masks`, `density`/`summary`, `strip`, saving,
`BackupAndRestore`) works on them as on wrapper models. The keras-hub models are in
`test_hub.py`.
"""

import json
import os
import warnings
import zipfile

import keras
import numpy as np
import pytest

import keras_dst
from keras_dst import layers as layers_lib
from keras_dst.masks import sparse_states

from conftest import EveryStep, active_counts, assert_sparse_invariants, mlp

L = keras.layers
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


class Block(L.Layer):
    """A user's container layer (not supported as a whole): its Dense layers are."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.up = L.Dense(units * 2, activation="relu", name="up")
        self.down = L.Dense(units, name="down")
        self.norm = L.LayerNormalization(name="norm")

    def call(self, x):
        return self.norm(x + self.down(self.up(x)))


@keras.saving.register_keras_serializable(package="test_any_model")
class TextNet(keras.Model):
    """A subclassed model written without keras_dst: embedding, attention, conv, block, head."""

    def __init__(self, vocab=40, dim=8, classes=3, **kwargs):
        super().__init__(**kwargs)
        self.vocab, self.dim, self.classes = vocab, dim, classes
        self.embed = L.Embedding(vocab, dim, name="embed")
        self.attention = L.MultiHeadAttention(2, 4, name="attention")
        self.conv = L.Conv1D(dim, 3, padding="same", name="conv")
        self.block = Block(dim, name="block")
        self.head = L.Dense(classes, name="head")

    def call(self, tokens):
        h = self.embed(tokens)
        h = h + self.attention(h, h)
        h = self.block(self.conv(h))
        return self.head(keras.ops.mean(h, axis=1))

    def get_config(self):
        return {**super().get_config(), "vocab": self.vocab, "dim": self.dim,
                "classes": self.classes}


@keras.saving.register_keras_serializable(package="test_any_model")
class TwoDense(keras.Model):
    def __init__(self, out=3, **kwargs):
        super().__init__(**kwargs)
        self.out_units = out
        self.a = L.Dense(16, activation="relu", name="a")
        self.b = L.Dense(out, name="b")

    def call(self, x):
        return self.b(self.a(x))

    def get_config(self):
        return {**super().get_config(), "out": self.out_units}


def two_dense(seed=0):
    keras.utils.set_random_seed(seed)
    net = TwoDense(name="two_dense")
    net(np.zeros((1, 8), "float32"))
    return net


def dense_data(n=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype("float32")
    return x, (x[:, 0] > 0).astype("int32") + (x[:, 1] > 0).astype("int32")


def text_data(n=24, length=6, vocab=40, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, vocab, size=(n, length)).astype("int32")
    return x, (x[:, 0] % 3).astype("int32")


def text_net(seed=0):
    keras.utils.set_random_seed(seed)
    net = TextNet(name="text_net")
    net(text_data(n=2)[0])
    return net


def fit_dst(model, x, y, epochs=2, batch_size=8, callbacks=(), **dst):
    counts = active_counts(model)
    checker = EveryStep(counts)
    dst = keras_dst.DynamicSparseTraining(**{"prune": "magnitude", "grow": "gradient",
                                             "update_every": 2, **dst})
    model.fit(x, y, epochs=epochs, batch_size=batch_size, shuffle=False, verbose=0,
              callbacks=[dst, checker, *callbacks])
    return checker


def compile_model(model, optimizer=None):
    model.compile(optimizer or keras.optimizers.Adam(0.01), LOSS, jit_compile=False)
    return model


def sparse_state(model):
    """Every mask, flag, weight and optimizer variable, in order (not keyed by path:
    a subclassed model's auto-generated names differ between instances)."""
    state = [np.array(t.mask.numpy()) for t in keras_dst.sparse_targets(model)]
    state += [np.array(t.ever_active.numpy()) for t in keras_dst.sparse_targets(model)]
    state += [np.array(v.numpy()) for v in model.weights]
    state += [np.array(v.numpy()) for v in model.optimizer.variables]
    return state


def test_a_subclassed_model_gets_masks_on_its_own_layers_in_place():
    net = text_net()
    layers_before = {id(l) for l in net._flatten_layers()}
    x, _ = text_data()
    dense_out = net.predict(x, verbose=0)
    assert keras_dst.prunable(net, density=0.3) is net
    assert {id(l) for l in net._flatten_layers()} == layers_before  # no layer added
    # Every supported layer, at any depth: the attention as a whole (4 kernels), the
    # Dense layers inside the user's Block; LayerNormalization and biases stay dense.
    assert sorted(t.weight.path for t in keras_dst.sparse_targets(net)) == sorted([
        "text_net/embed/embeddings", "text_net/attention/query/kernel",
        "text_net/attention/key/kernel", "text_net/attention/value/kernel",
        "text_net/attention/attention_output/kernel", "text_net/conv/kernel",
        "text_net/block/up/kernel", "text_net/block/down/kernel", "text_net/head/kernel"])
    assert {t.wrapper for t in keras_dst.sparse_targets(net)} == {None}
    assert_sparse_invariants(net)
    # ERK over these weights, exact counts summing to round(D N).
    shapes = {t.weight.path: tuple(t.weight.shape) for t in keras_dst.sparse_targets(net)}
    erk = keras_dst.layer_densities(shapes, 0.3, "erk")
    total = sum(int(np.prod(s)) for s in shapes.values())
    assert sum(active_counts(net).values()) == round(0.3 * total)
    for path, count in active_counts(net).items():
        assert abs(count / np.prod(shapes[path]) - erk[path]) < 0.02, path
    assert abs(keras_dst.density(net) - 0.3) < 1e-3
    # The forward pass is the layers' own: the dense model's, with the masked weights.
    assert not np.allclose(net.predict(x, verbose=0), dense_out)
    lines = []
    keras_dst.summary(net, print_fn=lines.append)
    assert "text_net/attention" in lines[0] and "text_net/block/up/kernel" in lines[0]


def test_dst_trains_a_subclassed_model_with_invariants_after_every_step():
    net = compile_model(keras_dst.prunable(text_net(), density=0.3))
    x, y = text_data()
    checker = fit_dst(net, x, y)
    assert checker.steps == 6 and checker.changed >= 2  # updates at steps 2, 4, 6
    assert net.predict(x, verbose=0).shape == (24, 3)


def test_save_the_plain_loader_refuses_and_keras_dst_load_model_restores(tmp_path):
    net = compile_model(keras_dst.prunable(text_net(), density=0.3, track_running_scores=True))
    x, y = text_data()
    fit_dst(net, x, y, prune="running_magnitude", grow="random")
    path = str(tmp_path / "net.keras")
    keras_dst.save_model(net, path)
    with pytest.raises(ValueError, match="could not be loaded"):  # not a silently dense model
        keras.models.load_model(path)
    loaded = keras_dst.load_model(path)
    a, b = keras_dst.sparse_targets(net), keras_dst.sparse_targets(loaded)
    assert len(a) == len(b) == 9
    for ta, tb in zip(a, b):
        for name in ("mask", "ever_active", "running_score", "weight"):
            np.testing.assert_array_equal(getattr(ta, name).numpy(), getattr(tb, name).numpy())
    np.testing.assert_allclose(loaded.predict(x, verbose=0), net.predict(x, verbose=0), atol=1e-6)
    assert int(loaded.optimizer.iterations.numpy()) == int(net.optimizer.iterations.numpy())
    for va, vb in zip(net.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(va), np.asarray(vb))
    # It keeps training sparse, with exact counts (constraints and DST state are back).
    compile_model(loaded)
    checker = fit_dst(loaded, x, y, epochs=1, prune="running_magnitude", grow="random")
    assert checker.changed >= 1


def test_load_model_of_wrapper_and_dense_models_is_keras_s(tmp_path):
    sparse = keras_dst.prunable(mlp(), density=0.3)
    dense = mlp(name="dense_mlp")
    for model in (sparse, dense):
        path = str(tmp_path / f"{model.name}.keras")
        model.save(path)
        loaded = keras_dst.load_model(path)
        assert type(loaded) is type(keras.models.load_model(path))
        assert keras_dst.masks(loaded).keys() == keras_dst.masks(model).keys()


def test_a_directory_saved_unzipped_and_other_paths(tmp_path):
    """`model.save(path, zipped=False)` writes a directory: keras_dst.load_model restores an
    attached model's masks from it as from a `.keras` file, and loads a wrapper model's as
    Keras does; a legacy `.h5` file is Keras's to load."""
    net = compile_model(keras_dst.prunable(two_dense(), density=0.3))
    x, y = dense_data()
    fit_dst(net, x, y, epochs=1)
    directory = str(tmp_path / "net_dir")
    net.save(directory, zipped=False)
    with pytest.raises(ValueError, match="could not be loaded"):
        keras.models.load_model(directory)
    loaded = keras_dst.load_model(directory)
    for a, b in zip(sparse_state(net), sparse_state(loaded), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), net.predict(x, verbose=0), atol=1e-6)
    assert sorted(os.listdir(directory)) == sorted(["assets", "config.json", "metadata.json",
                                                    "model.weights.h5"])  # left as it was
    wrapped = keras_dst.prunable(mlp(), density=0.3)
    wrapped.save(str(tmp_path / "mlp_dir"), zipped=False)
    wrapped.save(str(tmp_path / "mlp.h5"))
    for path in ("mlp_dir", "mlp.h5"):
        loaded = keras_dst.load_model(str(tmp_path / path))
        assert keras_dst.masks(loaded).keys() == keras_dst.masks(wrapped).keys()
        for mask, again in zip(keras_dst.masks(wrapped).values(), keras_dst.masks(loaded).values()):
            np.testing.assert_array_equal(mask, again)


class Interrupt(Exception):
    pass


def test_backup_and_restore_resumes_an_attached_model_exactly(tmp_path):
    """A run killed mid-epoch 3 and restarted with a new model (the same code, as in a new
    process) ends bit-identical to the uninterrupted run: masks, flags, weights, Adam."""
    x, y = dense_data()  # 2 steps per epoch

    def run(backup, kill_at=None):
        model = compile_model(keras_dst.prunable(two_dense(), density=0.3, seed=3))

        def kill(batch, logs):
            if int(model.optimizer.iterations.numpy()) == kill_at:
                raise Interrupt()

        keras.utils.set_random_seed(1)
        model.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0, callbacks=[
            keras_dst.DynamicSparseTraining(prune="magnitude", grow="random", update_every=2,
                                            seed=5),
            keras_dst.BackupAndRestore(backup),
            keras.callbacks.LambdaCallback(on_train_batch_end=kill)])
        return model

    reference = sparse_state(run(str(tmp_path / "ref")))
    backup = str(tmp_path / "backup")
    with pytest.raises(Interrupt):
        run(backup, kill_at=5)  # mid-epoch 3; the backup is epoch 2's (after step 4's update)
    resumed = sparse_state(run(backup))
    assert len(reference) == len(resumed)
    for a, b in zip(reference, resumed):
        assert a.dtype == b.dtype and np.array_equal(a, b)


@keras.saving.register_keras_serializable(package="test_any_model")
class Holder(keras.Model):
    """A subclassed model holding a functional one."""

    def __init__(self, inner=None, **kwargs):
        super().__init__(**kwargs)
        self.inner = inner if inner is not None else mlp(name="held")
        self.out = L.Dense(3, name="holder_out")

    def call(self, x):
        return self.out(self.inner(x))

    def get_config(self):
        return {**super().get_config(),
                "inner": keras.saving.serialize_keras_object(self.inner)}

    @classmethod
    def from_config(cls, config):
        config["inner"] = keras.saving.deserialize_keras_object(config["inner"])
        return cls(**config)


def test_models_nested_in_models(tmp_path):
    # A functional model with a subclassed one nested: cannot be cloned, so in place.
    inner = two_dense()
    features = keras.Input((8,))
    outer = keras.Model(features, L.Dense(2, name="outer_head")(inner(features)), name="outer")
    assert keras_dst.prunable(outer, density=0.4) is outer
    assert sorted(t.weight.path for t in keras_dst.sparse_targets(outer)) == [
        "outer_head/kernel", "two_dense/a/kernel", "two_dense/b/kernel"]
    compile_model(outer)
    x, y = dense_data()
    fit_dst(outer, x, y % 2, epochs=1)
    path = str(tmp_path / "outer.keras")
    outer.save(path)
    loaded = keras_dst.load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), outer.predict(x, verbose=0), atol=1e-6)
    for a, b in zip(keras_dst.masks(outer).values(), keras_dst.masks(loaded).values()):
        np.testing.assert_array_equal(a, b)

    # A subclassed model holding a functional one: its layers get masks too.
    holder = Holder(name="holder")
    holder(np.zeros((2, 20), "float32"))
    assert keras_dst.prunable(holder, density=0.5) is holder
    assert sorted(t.weight.path for t in keras_dst.sparse_targets(holder)) == [
        "fc1/kernel", "fc2/kernel", "fc3/kernel", "holder/holder_out/kernel"]
    compile_model(holder)
    fit_dst(holder, np.random.default_rng(0).normal(size=(16, 20)).astype("float32"),
            np.arange(16) % 3, epochs=1)


def test_in_place_chooses_explicitly_and_strip_follows_prunable():
    x = np.random.default_rng(0).normal(size=(16, 20)).astype("float32")
    dense = mlp()
    wrapped = keras_dst.prunable(dense, density=0.3)  # graph model: a new one
    assert wrapped is not dense and any(st.wrapper for st in sparse_states(wrapped))
    attached = keras_dst.prunable(dense, density=0.3, in_place=True)  # the same one
    assert attached is dense and not any(st.wrapper for st in sparse_states(dense))
    # Same planning either way: ERK densities per layer.
    assert sorted(active_counts(wrapped).values()) == sorted(active_counts(attached).values())
    with pytest.raises(TypeError, match="in_place must be"):
        keras_dst.prunable(mlp(), density=0.3, in_place="yes")
    with pytest.raises(ValueError, match="already prunable"):
        keras_dst.prunable(dense, density=0.3)
    with pytest.raises(ValueError, match="already prunable"):
        keras_dst.prunable(dense.get_layer("fc1"), density=0.3)

    # strip() of an attached model: in place, weights ⊙ masks, plain variables again.
    kernel = dense.get_layer("fc1").kernel
    out = dense.predict(x, verbose=0)
    assert keras_dst.strip(dense) is dense and not keras_dst.sparse_targets(dense)
    np.testing.assert_array_equal(dense.predict(x, verbose=0), out)
    assert kernel.constraint is None and "assign" not in vars(kernel)
    kernel.assign(np.ones(kernel.shape, "float32"))  # no guard left: dense writes stay
    assert np.all(kernel.numpy() == 1)
    kernel.value.assign(np.full(kernel.shape, 2.0, "float32"))  # nor on its tf.Variable
    assert np.all(kernel.numpy() == 2)

    # A single layer: a wrapper, or with in_place=True the layer itself.
    layer = L.Dense(4)
    layer.build((None, 6))
    assert keras_dst.prunable(layer, density=0.5, in_place=True) is layer
    assert len(keras_dst.sparse_targets(layer)) == 1
    assert keras_dst.strip(layer) is layer and not keras_dst.sparse_targets(layer)


def test_set_masks_gradual_pruning_and_criteria_overlap_on_an_attached_model():
    x, y = dense_data()
    net = compile_model(keras_dst.prunable(two_dense(), density=0.5))
    path = "two_dense/b/kernel"
    new = np.zeros((16, 3), "uint8")
    new[:2] = 1
    keras_dst.set_masks(net, {path: new})
    np.testing.assert_array_equal(keras_dst.masks(net)[path], new)
    assert np.all(net.b.kernel.numpy()[2:] == 0)

    overlap = keras_dst.CriteriaOverlap(["magnitude", "snip"], update_every=2)
    net.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[overlap])
    assert overlap.history

    net = compile_model(keras_dst.prunable(two_dense(), density=1.0))
    gradual = keras_dst.GradualPruning(final_density=0.4, begin_step=0, end_step=4,
                                       update_every=2)
    net.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[gradual])
    assert_sparse_invariants(net)
    assert abs(keras_dst.density(net) - 0.4) < 0.02


def test_patterns_on_attached_masks_and_their_round_trip(tmp_path):
    net = two_dense()
    keras_dst.prunable(net, density=0.5, pattern="2:4", pattern_overrides={"b": "1x4"})
    assert [str(t.pattern) for t in keras_dst.sparse_targets(net)] == ["2:4", "1x4"]
    a = np.asarray(keras_dst.sparse_targets(net)[0].mask.numpy())  # (8, 16): 2 of every 4 inputs
    assert np.all(a.T.reshape(16, 2, 4).sum(-1) == 2)
    b = np.asarray(keras_dst.sparse_targets(net)[1].mask.numpy())  # (16, 3): blocks of 4 inputs
    assert np.all(np.isin(b.T.reshape(3, 4, 4).sum(-1), (0, 4)))
    path = str(tmp_path / "nm.keras")
    net.save(path)
    loaded = keras_dst.load_model(path)
    assert [str(t.pattern) for t in keras_dst.sparse_targets(loaded)] == ["2:4", "1x4"]
    for ta, tb in zip(keras_dst.sparse_targets(net), keras_dst.sparse_targets(loaded)):
        np.testing.assert_array_equal(ta.mask.numpy(), tb.mask.numpy())


def test_load_model_rejects_masks_that_no_longer_fit(tmp_path):
    """The file's config names another class than the one saved (a model whose code
    changed): masks that find no layer, or a layer of another shape, are an error."""
    net = keras_dst.prunable(two_dense(), density=0.5)
    path = str(tmp_path / "net.keras")
    net.save(path)

    def rewrite(config_edit):
        edited = str(tmp_path / "edited.keras")
        with zipfile.ZipFile(path) as src, zipfile.ZipFile(edited, "w") as dst:
            for info in src.infolist():
                data = src.read(info.filename)
                if info.filename == "config.json":
                    config = json.loads(data)
                    config_edit(config)
                    data = json.dumps(config).encode()
                dst.writestr(info, data)
        return edited

    def other_head(config):
        config["config"]["out"] = 5

    with pytest.raises(ValueError):  # head kernel (16, 5): its saved (16, 3) does not fit
        keras_dst.load_model(rewrite(other_head))

    def one_layer_fewer(config):
        config["class_name"], config["registered_name"] = "OneDense", "test_any_model>OneDense"

    with pytest.raises(ValueError, match=r"masks for 2 layers.*took them for 1"):
        keras_dst.load_model(rewrite(one_layer_fewer))


@keras.saving.register_keras_serializable(package="test_any_model")
class OneDense(keras.Model):
    def __init__(self, out=3, **kwargs):
        super().__init__(**kwargs)
        self.b = L.Dense(out, name="b")

    def call(self, x):
        return self.b(x[:, :16] if x.shape[-1] >= 16 else keras.ops.tile(x, (1, 2)))


def test_dense_weights_loaded_into_an_attached_model_keep_its_masks(tmp_path):
    dense = text_net()
    path = str(tmp_path / "dense.weights.h5")
    dense.save_weights(path)
    net = keras_dst.prunable(text_net(), density=0.3)
    counts = active_counts(net)
    with pytest.warns(UserWarning, match="non-zero entries where its mask is 0"):
        net.load_weights(path)  # a warm start from dense weights
    assert_sparse_invariants(net, counts)
    # The other way: a dense model refuses a file with masks (Keras's count check).
    sparse_path = str(tmp_path / "sparse.weights.h5")
    net.save_weights(sparse_path)
    with pytest.raises(ValueError):
        text_net().load_weights(sparse_path)


def test_errors_name_the_layer_and_change_nothing():
    class Gate(L.Layer):  # a 2-D weight keras_dst does not know
        def build(self, shape):
            self.gate = self.add_weight(shape=(shape[-1], shape[-1]), name="gate")
            self.scale = self.add_weight(shape=(shape[-1],), name="scale")  # vectors: fine

        def call(self, x):
            return x @ self.gate * self.scale

    class Net(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.fc = L.Dense(4, name="fc")
            self.gate = Gate(name="gate")

        def call(self, x):
            return self.gate(self.fc(x))

    net = Net(name="gated")
    with pytest.raises(ValueError, match="not built"):
        keras_dst.prunable(net, density=0.5)
    net(np.zeros((1, 3), "float32"))
    with pytest.raises(TypeError, match=r"'gated/gate'.*Gate.*gated/gate/gate"):
        keras_dst.prunable(net, density=0.5)
    net.gate.trainable = False  # frozen, it is still a 2-D weight left dense unasked
    with pytest.raises(TypeError, match=r"'gated/gate'.*Gate.*gated/gate/gate"):
        keras_dst.prunable(net, density=0.5)
    net.gate.trainable = True
    assert not keras_dst.sparse_targets(net) and net.fc.kernel.constraint is None
    with pytest.raises(ValueError, match="unknown layer names"):
        keras_dst.prunable(net, density=0.5, skip_unsupported=True, keep_dense=["nope"])
    assert not keras_dst.sparse_targets(net)
    keras_dst.prunable(net, density=0.5, skip_unsupported=True)  # the gate stays dense
    assert [t.weight.path for t in keras_dst.sparse_targets(net)] == ["gated/fc/kernel"]
    assert keras_dst.density(net) == 0.5 and net.gate.gate.constraint is None


def test_a_failing_attach_rolls_back_the_layers_already_done(monkeypatch):
    net = text_net()
    real, calls = layers_lib.attach, []

    def flaky(layer, **kwargs):
        calls.append(layer)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return real(layer, **kwargs)

    monkeypatch.setattr(layers_lib, "attach", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        keras_dst.prunable(net, density=0.3)
    assert not keras_dst.sparse_targets(net)
    assert all("save_own_variables" not in vars(l) for l in calls)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monkeypatch.setattr(layers_lib, "attach", real)
        assert keras_dst.prunable(net, density=0.3) is net


def test_masks_attached_after_a_fit_constrain_the_next_plain_fit():
    """A model that trained dense (its step compiled without constraints) and then got
    masks in place trains sparse in the next plain `fit`; stripped in place, dense again."""
    net = compile_model(two_dense(), keras.optimizers.SGD(0.05, momentum=0.9))
    x, y = dense_data(n=32)
    net.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert keras_dst.prunable(net, density=0.3) is net
    counts = active_counts(net)
    net.fit(x, y, batch_size=8, epochs=2, verbose=0)
    assert_sparse_invariants(net, counts)
    masks = [t.mask.numpy() for t in keras_dst.sparse_targets(net)]
    keras_dst.strip(net)
    net.fit(x, y, batch_size=8, epochs=1, verbose=0)
    kernels = [net.a.kernel.numpy(), net.b.kernel.numpy()]
    assert all(np.count_nonzero(k[~m]) > 0 for k, m in zip(kernels, masks))  # trained dense


def test_get_and_set_weights_carry_attached_state_so_early_stopping_restores_the_best_topology(
        tmp_path):
    # attached masks are not among model.weights: EarlyStopping(restore_best_weights=True)
    # put the best epoch's values back under the last epoch's masks
    model = keras_dst.prunable(two_dense(), density=0.3)
    own = len(model.weights)
    assert len(model.get_weights()) == own + 2 * 2  # masks and ever-active flags, 2 layers
    rng = np.random.default_rng(0)  # random labels: the validation loss soon rises
    x, y = rng.normal(size=(128, 8)).astype("float32"), rng.integers(0, 3, 128)
    xv, yv = rng.normal(size=(64, 8)).astype("float32"), rng.integers(0, 3, 64)
    snapshots = {}

    class Snapshot(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            snapshots[epoch] = (self.model.get_weights(), keras_dst.masks(self.model))

    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), LOSS)
    history = model.fit(x, y, validation_data=(xv, yv), batch_size=16, epochs=40, verbose=0,
                        callbacks=[keras_dst.DynamicSparseTraining(
                            update_every=4, schedule="constant", prune_rate=0.5),
                            Snapshot(), keras.callbacks.EarlyStopping(
                                patience=2, restore_best_weights=True)])
    best = int(np.argmin(history.history["val_loss"]))
    assert best < len(history.history["val_loss"]) - 1  # the last epoch's state differs
    weights, masks = snapshots[best]
    for path, mask in keras_dst.masks(model).items():
        np.testing.assert_array_equal(mask, masks[path])
    for a, b in zip(model.get_weights(), weights):
        np.testing.assert_array_equal(a, b)
    assert_sparse_invariants(model)
    keras_dst.save_model(model, tmp_path / "m.keras")  # a reloaded model carries it too
    loaded = keras_dst.load_model(tmp_path / "m.keras")
    for a, b in zip(loaded.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    # a warm start with the model's own weights keeps the masks; strip drops the state
    before = keras_dst.masks(model)
    model.set_weights([np.ones_like(w) for w in model.get_weights()[:own]])
    for path, mask in keras_dst.masks(model).items():
        np.testing.assert_array_equal(mask, before[path])
    keras_dst.strip(model)
    assert len(model.get_weights()) == own


class GAN(keras.Model):
    """A train_step with two optimizers of its own (a GAN's): `generator_optimizer` always,
    the discriminator's `model.optimizer` with `discriminator_on_model_optimizer`."""

    def __init__(self, discriminator_on_model_optimizer=False, **kwargs):
        super().__init__(**kwargs)
        self.generator = keras.Sequential([keras.Input((8,)), L.Dense(16, activation="relu", name="g1"),
                                           L.Dense(12, name="g2")], name="generator")
        self.discriminator = keras.Sequential([keras.Input((12,)),
                                               L.Dense(16, activation="relu", name="d1"),
                                               L.Dense(1, name="d2")], name="discriminator")
        self.on_model_optimizer = discriminator_on_model_optimizer

    def call(self, z):
        return self.discriminator(self.generator(z))

    def train_step(self, real):
        import tensorflow as tf

        bce = keras.losses.BinaryCrossentropy(from_logits=True)
        z = tf.random.normal((tf.shape(real)[0], 8), seed=1)
        ones, zeros = tf.ones_like(real[:, :1]), tf.zeros_like(real[:, :1])
        with tf.GradientTape() as tape:
            d_loss = bce(ones, self.discriminator(real)) + bce(zeros, self(z))
        d_vars = self.discriminator.trainable_variables
        d_optimizer = self.optimizer if self.on_model_optimizer else self.discriminator_optimizer
        d_optimizer.apply(tape.gradient(d_loss, d_vars), d_vars)
        with tf.GradientTape() as tape:
            g_loss = bce(ones, self(z))
        g_vars = self.generator.trainable_variables
        self.generator_optimizer.apply(tape.gradient(g_loss, g_vars), g_vars)
        return {"d_loss": d_loss, "g_loss": g_loss}


def _gan(on_model_optimizer):
    model = GAN(on_model_optimizer)
    model(np.zeros((2, 8), "float32"))
    model = keras_dst.prunable(model, density=0.3)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=True)
    model.discriminator_optimizer = keras.optimizers.Adam(1e-3)
    model.generator_optimizer = keras.optimizers.Adam(1e-3)
    return model


def test_a_train_step_that_never_calls_the_compiled_optimizer_is_refused_at_its_first_step():
    # every update runs inside model.optimizer.apply: a train_step with optimizers of its
    # own would train on with masks that never change (it did, without a word)
    model = _gan(on_model_optimizer=False)
    real = np.random.default_rng(0).normal(size=(64, 12)).astype("float32")
    for callback in (keras_dst.DynamicSparseTraining(update_every=1),
                     keras_dst.GradualPruning(0.1, update_every=1, end_step=4)):
        with pytest.raises(ValueError, match=rf"{type(callback).__name__}: the model's training "
                                             r"step did not call the optimizer it was compiled "
                                             r"with \('adam"):
            model.fit(real, batch_size=16, epochs=1, verbose=0, callbacks=[callback])
    model.fit(real, batch_size=16, epochs=1, verbose=0)  # static sparse training still works
    assert_sparse_invariants(model)


def test_sparse_weights_that_another_optimizer_trains_are_named_in_a_warning():
    # model.optimizer trains the discriminator, the generator's optimizer its own layers:
    # DST updates the generator's masks taking their gradient as 0 (as for weights the loss
    # does not reach, which a train_step may leave out of apply), so it says so
    model = _gan(on_model_optimizer=True)
    real = np.random.default_rng(0).normal(size=(64, 12)).astype("float32")
    for callback in (keras_dst.DynamicSparseTraining(update_every=1, grow="gradient"),
                     keras_dst.CriteriaOverlap(["magnitude", "snip"], update_every=1)):
        name = type(callback).__name__
        with pytest.warns(UserWarning, match=rf"{name}: the optimizer it hooks \('adam.*does not "
                                             r"update the sparse weights \['generator/g1/"
                                             r"kernel', 'generator/g2/kernel'\].*gradient as 0"):
            model.fit(real, batch_size=16, epochs=1, verbose=0, callbacks=[callback])
    assert_sparse_invariants(model)
    # with masks on the discriminator only, DST trains it
    model = GAN(True)
    model(np.zeros((2, 8), "float32"))
    assert keras_dst.prunable(model.discriminator, density=0.3, in_place=True) is model.discriminator
    model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=True)
    model.generator_optimizer = keras.optimizers.Adam(1e-3)
    masks = keras_dst.masks(model)
    assert sorted(masks) == ["discriminator/d1/kernel", "discriminator/d2/kernel"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(real, batch_size=16, epochs=1, verbose=0,
                  callbacks=[keras_dst.DynamicSparseTraining(update_every=1, grow="gradient")])
    assert not [w for w in caught if "does not update the sparse weights" in str(w.message)]
    assert any((masks[k] != v).any() for k, v in keras_dst.masks(model).items())
    assert_sparse_invariants(model)
