"""Every path that writes weights leaves a sparse model consistent: zeros where masked.

Keras writes weights outside the optimizer eagerly (`load_model`, `load_weights`,
`BackupAndRestore`, `set_weights`, `variable.assign`): keras_dst re-zeroes masked
entries there (a load warns with the count). A `tf.train.Checkpoint` holds the masks
and its restore goes through the same writes, whatever order it writes them in. A write
of a variable's handle underneath Keras: `density`/`summary` then report what the model
computes (with a warning), `strip` still gives kernel ⊙ mask, `apply_masks` repairs it
on demand and the next DST fit does so with a warning.
"""

import os
import re
import warnings
import zipfile

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_dst

from conftest import (
    LOSS,
    SubclassedNet,
    assert_sparse_invariants,
    classification_data,
    compile_and_fit,
    mlp,
    write_underneath,
)


def sparse_mlp():
    dense = mlp((20, 16, 3))
    return dense, keras_dst.prunable(dense, density=0.3)


def stray(model):
    return sum(int(np.count_nonzero(t.weight.numpy()[~t.mask.numpy()]))
               for t in keras_dst.sparse_targets(model))


def fill_kernels(h5_path, value=1.0):
    """Writes `value` into every 2-D float dataset (the kernels) of a weights file."""
    edited = []
    with h5py.File(h5_path, "r+") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and obj.ndim == 2 and obj.dtype.kind == "f":
                obj[...] = value
                edited.append(name)
        f.visititems(visit)
    assert edited
    return edited


def no_warning(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn()


def test_set_weights_with_dense_values_is_masked_silently():
    dense, model = sparse_mlp()
    before = keras_dst.masks(model)
    for layer in model.layers:  # warm start from the dense model, layer by layer
        if isinstance(layer, keras_dst.SparseWrapper):
            no_warning(lambda layer=layer: layer.layer.set_weights(
                dense.get_layer(layer.layer.name).get_weights()))
    no_warning(lambda: model.set_weights(model.get_weights()))
    assert stray(model) == 0
    assert_sparse_invariants(model)
    after = keras_dst.masks(model)
    assert all((before[k] == after[k]).all() for k in before)
    for t in keras_dst.sparse_targets(model):  # the active entries took the dense values
        source = dense.get_layer(t.wrapper.layer.name).kernel.numpy()
        np.testing.assert_array_equal(t.weight.numpy(), np.where(t.mask.numpy(), source, 0))


def test_variable_assign_is_masked():
    _, model = sparse_mlp()
    t = keras_dst.sparse_targets(model)[0]
    t.weight.assign(np.ones(t.weight.shape, "float32"))
    np.testing.assert_array_equal(t.weight.numpy(), t.mask.numpy().astype("float32"))


def test_load_model_of_a_file_with_nonzeros_at_masked_entries_warns_and_zeroes(tmp_path):
    _, model = sparse_mlp()
    path = str(tmp_path / "m.keras")
    model.save(path)
    unpacked = tmp_path / "unpacked"
    with zipfile.ZipFile(path) as z:
        z.extractall(unpacked)
    fill_kernels(str(unpacked / "model.weights.h5"))
    edited = str(tmp_path / "edited.keras")
    with zipfile.ZipFile(edited, "w") as z:
        for name in os.listdir(unpacked):
            z.write(unpacked / name, name)
    with pytest.warns(UserWarning, match=r"holds \d+ non-zero entries where its mask is 0"):
        loaded = keras.models.load_model(edited, safe_mode=True)
    assert stray(loaded) == 0
    assert keras_dst.density(loaded) == pytest.approx(keras_dst.density(model))
    for t in keras_dst.sparse_targets(loaded):  # active entries got the file's values
        assert np.all(t.weight.numpy()[t.mask.numpy()] == 1.0)


def test_load_weights_and_backup_and_restore_of_such_a_file_zero_them(tmp_path):
    _, model = sparse_mlp()
    model.compile(keras.optimizers.SGD(0.01), LOSS)
    weights = str(tmp_path / "m.weights.h5")
    model.save_weights(weights)
    fill_kernels(weights)
    with pytest.warns(UserWarning, match="non-zero entries where its mask is 0"):
        model.load_weights(weights)
    assert stray(model) == 0
    # BackupAndRestore restores through load_weights: a tampered backup is masked too
    backup = tmp_path / "backup"
    x, y = classification_data(n=32)
    model.fit(x, y, epochs=1, verbose=0, callbacks=[
        keras.callbacks.BackupAndRestore(str(backup), delete_checkpoint=False)])
    backup_files = [os.path.join(d, f) for d, _, fs in os.walk(backup) for f in fs
                    if f.endswith(".weights.h5")]
    assert backup_files
    fill_kernels(backup_files[0], 2.0)
    _, fresh = sparse_mlp()
    fresh.compile(keras.optimizers.SGD(0.0), LOSS)
    with pytest.warns(UserWarning, match="non-zero entries where its mask is 0"):
        fresh.fit(x, y, epochs=2, verbose=0, callbacks=[
            keras.callbacks.BackupAndRestore(str(backup), delete_checkpoint=False)])
    assert stray(fresh) == 0


def test_a_write_underneath_keras_is_reported_stripped_and_repaired():
    dense, model = sparse_mlp()
    for t in keras_dst.sparse_targets(model):  # dense values written through the handles
        write_underneath(t.weight, dense.get_layer(t.wrapper.layer.name).kernel.numpy())
    n_stray = stray(model)
    assert n_stray > 0
    masked_density = sum(int(t.mask.numpy().sum()) for t in keras_dst.sparse_targets(model)) / \
        sum(int(np.prod(t.weight.shape)) for t in keras_dst.sparse_targets(model))
    with pytest.warns(UserWarning, match="non-zero weights where its masks are 0"):
        computed = keras_dst.density(model)
    assert computed > masked_density  # what the model computes with, not its masks
    stripped = keras_dst.strip(model)  # kernel ⊙ mask all the same
    for t in keras_dst.sparse_targets(model):
        kernel = stripped.get_layer(t.wrapper.layer.name).kernel.numpy()
        np.testing.assert_array_equal(kernel, np.where(t.mask.numpy(), t.weight.numpy(), 0))
    assert keras_dst.apply_masks(model) == n_stray
    assert stray(model) == 0 and keras_dst.apply_masks(model) == 0
    assert no_warning(lambda: keras_dst.density(model)) == pytest.approx(masked_density)


class _PlainNet(keras.Model):
    """A subclassed model of plain layers: `prunable` attaches masks to them in place."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.fc1 = keras.layers.Dense(32, activation="relu", name="fc1")
        self.fc2 = keras.layers.Dense(3, name="fc2")

    def call(self, x):
        return self.fc2(self.fc1(x))


def _plain(seed=0):
    """A built `_PlainNet` (20 inputs, 3 logits), its weights drawn with `seed`."""
    keras.utils.set_random_seed(seed)
    model = _PlainNet(name="plain")
    model(np.ones((2, 20), "float32"))
    return model


def full_state(model):
    """Per sparsified weight, in order: (mask, ever-active flags, weight) as numpy."""
    return [(t.mask.numpy(), t.ever_active.numpy(), t.weight.numpy())
            for t in keras_dst.sparse_targets(model)]


def assert_same_state(a, b):
    """`full_state` lists `a` and `b` hold the same arrays, bit for bit."""
    for x, y in zip(a, b, strict=True):
        for u, v in zip(x, y, strict=True):
            np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("make", [lambda seed: keras_dst.prunable(mlp(seed=seed), density=0.3),
                                  lambda seed: keras_dst.prunable(_plain(seed), density=0.3)],
                         ids=["wrapped", "attached"])
def test_a_tf_train_checkpoint_holds_the_masks_and_restores_them_exactly(make, tmp_path):
    def compiled(model):
        model.compile(keras.optimizers.SGD(0.1, momentum=0.9), LOSS, jit_compile=True)
        return model

    def dst():
        return keras_dst.DynamicSparseTraining(update_every=3, total_steps=100)

    x, y = classification_data()
    model = compiled(make(0))
    initial = full_state(model)
    model.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[dst()])
    saved = full_state(model)
    assert any((a[0] != b[0]).any() for a, b in zip(initial, saved))  # the masks moved
    manager = tf.train.CheckpointManager(
        tf.train.Checkpoint(model=model, optimizer=model.optimizer), str(tmp_path), 1)
    manager.save()

    fresh = compiled(make(1))  # other initial weights and masks
    fresh.optimizer.build(fresh.trainable_variables)
    assert any((a[0] != b[0]).any() for a, b in zip(saved, full_state(fresh)))
    no_warning(lambda: tf.train.Checkpoint(model=fresh, optimizer=fresh.optimizer)
               .restore(manager.latest_checkpoint).assert_consumed())
    assert_same_state(saved, full_state(fresh))  # masks, flags and weights
    assert int(fresh.optimizer.iterations) == int(model.optimizer.iterations)
    assert_sparse_invariants(fresh)
    for m in (model, fresh):  # the restored run goes on exactly as the saved one
        m.fit(x, y, epochs=1, batch_size=16, verbose=0, shuffle=False, callbacks=[dst()])
    assert_sparse_invariants(fresh)
    assert_same_state(full_state(model), full_state(fresh))


@pytest.mark.parametrize("mask_first", [True, False])
def test_a_checkpoint_restore_in_either_order_leaves_the_weight_masked(mask_first):
    # What a restore calls on each variable (`Trackable._restore_from_tensors`), in
    # both orders: the weight's raw value is kept for a mask restored after it.
    _, model = sparse_mlp()
    t = keras_dst.sparse_targets(model)[0]
    rng = np.random.default_rng(0)
    weight = rng.normal(size=t.weight.shape).astype("float32")
    mask = ~t.mask.numpy()  # every entry changes
    writes = [(t.mask, mask), (t.weight, weight)]
    for variable, value in writes if mask_first else writes[::-1]:
        variable._restore_from_tensors({"VARIABLE_VALUE": tf.constant(value)})
    np.testing.assert_array_equal(t.mask.numpy(), mask)
    np.testing.assert_array_equal(t.weight.numpy(), np.where(mask, weight, 0))
    assert_sparse_invariants(model)


def test_a_checkpoint_without_masks_restores_the_weights_through_the_masks(tmp_path):
    dense = _plain(0)  # saved before `prunable`: the same keys, no masks
    path = tf.train.Checkpoint(model=dense).write(str(tmp_path / "dense"))
    model = keras_dst.prunable(_plain(1), density=0.3)
    masks = keras_dst.masks(model)
    no_warning(lambda: tf.train.Checkpoint(model=model).read(path).expect_partial())
    assert all((masks[k] == v).all() for k, v in keras_dst.masks(model).items())
    for t, layer in zip(keras_dst.sparse_targets(model), (dense.fc1, dense.fc2)):
        np.testing.assert_array_equal(t.weight.numpy(),
                                      np.where(t.mask.numpy(), layer.kernel.numpy(), 0))
    assert_sparse_invariants(model)


def test_a_checkpoint_restored_before_prunable_in_place_gives_the_saved_model(tmp_path):
    # The restore finds the layers' weights but not yet their masks: TensorFlow restores
    # those when `prunable` attaches them, and they apply to the restored weights.
    saved = keras_dst.prunable(_plain(0), density=0.3, seed=0)
    path = tf.train.Checkpoint(model=saved).write(str(tmp_path / "sparse"))
    model = _plain(1)
    tf.train.Checkpoint(model=model).read(path).expect_partial()
    model = keras_dst.prunable(model, density=0.3, seed=9)  # other initial masks
    assert_same_state(full_state(saved), full_state(model))
    assert_sparse_invariants(model)
    t = keras_dst.sparse_targets(model)[0]  # a later set_masks starts new entries at 0
    keras_dst.set_masks(model, {t.weight.path: np.ones(t.weight.shape, bool)})
    assert (t.weight.numpy()[~full_state(saved)[0][0]] == 0).all()

    # masks of another pattern waiting for `prunable`: refused, the model left as it was
    model = _plain(1)
    tf.train.Checkpoint(model=model).read(path).expect_partial()
    before = [w.numpy() for w in model.weights]
    with pytest.raises(ValueError, match="breaks its pattern '2:4'"):
        keras_dst.prunable(model, density=0.5, pattern="2:4")
    assert keras_dst.sparse_targets(model) == []
    for value, w in zip(before, model.weights):
        np.testing.assert_array_equal(value, w.numpy())
        assert w.constraint is None
    path = tf.train.Checkpoint(model=model).write(str(tmp_path / "after"))
    assert not [k for k, _ in tf.train.list_variables(path) if "keras_dst" in k]


def test_a_checkpoint_restore_of_masks_of_another_pattern_is_refused(tmp_path):
    path = tf.train.Checkpoint(model=keras_dst.prunable(mlp(), density=0.5)).write(
        str(tmp_path / "unstructured"))
    model = keras_dst.prunable(mlp(), density=0.5, pattern="2:4")
    masks = keras_dst.masks(model)
    with pytest.raises(ValueError, match=r"fc\d/kernel.*breaks its pattern '2:4'"):
        tf.train.Checkpoint(model=model).read(path)
    assert all((masks[k] == v).all() for k, v in keras_dst.masks(model).items())
    assert_sparse_invariants(model)


def test_a_dst_fit_repairs_a_model_written_underneath_keras():
    dense, model = sparse_mlp()
    for t in keras_dst.sparse_targets(model):
        write_underneath(t.weight, dense.get_layer(t.wrapper.layer.name).kernel.numpy())
    assert stray(model) > 0
    model.compile(keras.optimizers.SGD(0.0), keras.losses.SparseCategoricalCrossentropy(
        from_logits=True), jit_compile=True)
    x, y = classification_data(n=32)
    with pytest.warns(UserWarning, match="were set to 0"):
        model.fit(x, y, epochs=1, verbose=0,
                  callbacks=[keras_dst.DynamicSparseTraining(update_every=100)])
    assert_sparse_invariants(model)


@pytest.mark.parametrize("layer, shape", [(keras.layers.Dense(4), (None, 6)),
                                          (keras.layers.Conv2D(4, 3), (None, 5, 5, 4))])
def test_strip_of_a_bare_wrapper_gives_a_plain_layer_and_leaves_the_wrapper(layer, shape):
    # (it returned the wrapper's inner layer, whose kernel kept the mask constraint and
    # write guards: trained in a new model, or written, it stayed sparse)
    wrapper = keras_dst.prunable(layer, density=0.5)
    wrapper.build(shape)
    w = wrapper.sparse_weights[0]
    write_underneath(w, np.ones(w.shape, "float32"))
    mask = wrapper.masks[0].numpy()
    plain = keras_dst.strip(wrapper)
    assert type(plain) is type(layer) and plain is not layer
    assert plain.get_config() == layer.get_config()
    np.testing.assert_array_equal(plain.kernel.numpy(), mask.astype("float32"))  # kernel ⊙ mask
    np.testing.assert_array_equal(plain.bias.numpy(), layer.bias.numpy())
    assert plain.kernel.constraint is None
    plain.kernel.assign(np.ones(w.shape, "float32"))  # a plain variable: written as given
    assert np.all(plain.kernel.numpy() == 1.0)
    np.testing.assert_array_equal(w.numpy(), np.ones(w.shape, "float32"))  # the wrapper as it was
    with pytest.raises(ValueError):  # (still guarded)
        wrapper.set_weights([np.full(v.shape, 2.0) if v.dtype == bool else v
                             for v in wrapper.get_weights()])
    unbuilt = keras_dst.strip(keras_dst.prunable(keras.layers.Dense(3), density=0.5))
    assert type(unbuilt) is keras.layers.Dense and not unbuilt.built


def test_strip_of_a_bare_wrapper_whose_layer_has_no_config_names_it():
    class Scaled(keras.layers.Layer):  # built from an array: Keras cannot make its config
        def __init__(self, scale):
            super().__init__(name="scaled")
            self.scale = scale

        def build(self, shape):
            self.kernel = self.add_weight(shape=(shape[-1], 3))

        def call(self, x):
            return (x * self.scale) @ self.kernel

        def get_prunable_weights(self):
            return [self.kernel]

    wrapper = keras_dst.prunable(Scaled(np.ones(4, "float32")), density=0.5)
    wrapper.build((None, 4))
    with pytest.raises(TypeError, match=r"strip\(\): layer 'scaled' \(Scaled\) cannot be rebuilt "
                                        r"from its config to give a plain copy of SparseWrapper "
                                        r".*Give it a get_config\(\)"):
        keras_dst.strip(wrapper)


def test_set_weights_of_a_whole_state_with_other_masks_restores_it_exactly():
    """`model.set_weights` writes a wrapper's kernel before its mask: the kernel must end
    as the state's kernel ⊙ the state's mask, not masked by the masks it replaces."""
    _, model = sparse_mlp()
    other = keras_dst.prunable(mlp((20, 16, 3), seed=1), density=0.3, seed=5)
    assert any((a != b).any() for a, b in zip(keras_dst.masks(model).values(),
                                              keras_dst.masks(other).values()))
    state = other.get_weights()
    model.set_weights(state)
    for got, want in zip(model.get_weights(), state):
        np.testing.assert_array_equal(got, want)
    # the same list with dense kernels: kernel ⊙ the list's mask
    dense = [np.full(v.shape, 2.0, v.dtype) if v.dtype.kind == "f" and v.ndim == 2 else v
             for v in state]
    model.set_weights(dense)
    assert stray(model) == 0
    for t in keras_dst.sparse_targets(model):
        np.testing.assert_array_equal(t.weight.numpy(), np.where(t.mask.numpy(), 2.0, 0.0))


@pytest.mark.parametrize("value", [2.0, 0.5, -1.0, np.nan])
def test_a_mask_write_of_values_other_than_0_1_is_refused(value):
    """A bool mask variable reads any non-zero as True: `set_weights` with a mask of 2.0 or
    NaN made the layer dense, silently (`set_masks` refused the same values)."""
    _, model = sparse_mlp()
    state = model.get_weights()
    index = [i for i, v in enumerate(model.weights) if "kernel_mask" in v.path][0]
    bad = list(state)
    bad[index] = np.full(state[index].shape, value, "float32")
    masks_before = {k: v.copy() for k, v in keras_dst.masks(model).items()}
    with pytest.raises(ValueError, match=r"the mask written to '.*' holds values other than "
                                         r"0/1 \(e\.g\. " + re.escape(str(value))):
        model.set_weights(bad)
    for path, mask in keras_dst.masks(model).items():
        np.testing.assert_array_equal(mask, masks_before[path])
    assert stray(model) == 0
    with pytest.raises(ValueError, match=r"set_masks\(\): the mask for '.*' holds values other "
                                         r"than 0/1 \(e\.g\. "):
        keras_dst.set_masks(model, {next(iter(masks_before)): bad[index]})


def test_ever_active_flags_written_are_checked():
    """The ever-active flags (the ITOP rate's) took any value (0.5 read as True): non-0/1
    values and other shapes are refused like a mask's."""
    _, model = sparse_mlp()
    target = keras_dst.sparse_targets(model)[0]
    before = target.ever_active.numpy().copy()
    with pytest.raises(ValueError, match=r"the ever-active flags written to '.*' holds values "
                                         r"other than 0/1 \(e\.g\. 0\.5\); they were left as they "
                                         r"were"):
        target.ever_active.assign(np.full(before.shape, 0.5, "float32"))
    with pytest.raises(ValueError, match=r"the ever-active flags written to '.*' have shape "
                                         r"\(1, \d+\), the weight"):
        target.ever_active.assign(np.ones((1, before.shape[1]), bool))
    np.testing.assert_array_equal(target.ever_active.numpy(), before)
    state = model.get_weights()  # 0/1 floats are bools
    index = [i for i, v in enumerate(model.weights) if v is target.ever_active][0]
    state[index] = np.ones(state[index].shape, "float32")
    model.set_weights(state)
    assert target.ever_active.numpy().all()


def test_every_eager_write_keeps_the_ever_active_flags_true_under_the_mask(tmp_path):
    """A list, a file or an ``assign`` holding flags False where the mask is True was
    taken as it was: an active entry counted as never active (the ITOP rate, the
    draws' seeds). Now the flags written are joined with the mask, and a mask write
    adds what it activates; flags set beyond the mask stay."""
    _, model = sparse_mlp()
    targets = keras_dst.sparse_targets(model)
    flags = [i for i, v in enumerate(model.weights) if any(v is t.ever_active for t in targets)]
    state = model.get_weights()
    for i in flags:
        state[i] = np.zeros_like(state[i])
    model.set_weights(state)
    for t in targets:
        np.testing.assert_array_equal(t.ever_active.numpy(), t.mask.numpy())

    weights = str(tmp_path / "m.weights.h5")
    model.save_weights(weights)
    zeroed = []
    with h5py.File(weights, "r+") as f:
        def visit(name, obj):
            # a wrapper's own entries: its masks and flags in turn (vars/0, vars/1)
            if isinstance(obj, h5py.Dataset) and obj.dtype == bool and name.endswith("vars/1"):
                obj[...] = False
                zeroed.append(name)
        f.visititems(visit)
    assert len(zeroed) == len(targets)
    _, fresh = sparse_mlp()
    fresh.load_weights(weights)
    for t, saved in zip(keras_dst.sparse_targets(fresh), targets):
        np.testing.assert_array_equal(t.mask.numpy(), saved.mask.numpy())
        np.testing.assert_array_equal(t.ever_active.numpy(), t.mask.numpy())

    t = targets[0]
    mask = t.mask.numpy()
    off = tuple(np.argwhere(~mask)[0])
    on = tuple(np.argwhere(mask)[0])
    extra = t.mask.numpy()
    extra[tuple(np.argwhere(~mask)[1])] = True  # a flag beyond the mask
    t.ever_active.assign(extra)
    mask[off], mask[on] = True, False
    t.mask.assign(mask)
    np.testing.assert_array_equal(t.ever_active.numpy(), extra | mask)
    assert t.ever_active.numpy()[off] and t.ever_active.numpy()[on]

    # flags of a load stand for the loaded masks once the load wrote the weights (or a
    # step trained them): a later set_masks adds to them, it does not take them back
    for train in (False, True):
        _, model = sparse_mlp()
        model.compile(keras.optimizers.SGD(0.01), LOSS)
        model.load_weights(weights)
        loaded = {t.key: t.mask.numpy() for t in keras_dst.sparse_targets(model)}
        if train:
            x, y = classification_data(n=16)
            model.fit(x, y, epochs=1, verbose=0)
        new = {k: np.roll(m, 1, axis=1) for k, m in loaded.items()}
        keras_dst.set_masks(model, new)
        for t in keras_dst.sparse_targets(model):
            np.testing.assert_array_equal(t.ever_active.numpy(), loaded[t.key] | new[t.key])
    keras_dst.testing.assert_sparse_invariants(model, ever_active=True)


def test_a_weight_write_of_another_shape_is_refused_naming_the_weight():
    """Keras refuses a value of another shape; the write guard masked it first (a scalar
    or a row was broadcast over the kernel, a wrong shape failed inside TensorFlow)."""
    _, model = sparse_mlp()
    weight = keras_dst.sparse_targets(model)[0].weight
    before = weight.numpy().copy()
    for value in (1.0, np.ones(weight.shape[-1]), np.ones((1, weight.shape[-1])),
                  np.ones((weight.shape[0] + 1, weight.shape[1]))):
        with pytest.raises(ValueError, match=r"the value written to '.*kernel' has shape .*, the "
                                             r"weight \(\d+, \d+\); it was left as it was"):
            weight.assign(value)
        with pytest.raises(ValueError, match=r"has shape"):
            weight.value.assign(value)  # (the tf.Variable behind it)
    np.testing.assert_array_equal(weight.numpy(), before)


@pytest.mark.parametrize("masks, error, message", [
    (lambda m: [np.ones((2, 2))], TypeError, r"set_masks\(\): new_masks must be a dict"),
    (lambda m: None, TypeError, r"set_masks\(\): new_masks must be a dict"),
    (lambda m: {k: np.full(v.shape, "1") for k, v in m.items()}, TypeError,
     r"set_masks\(\): the mask for '.*' holds values of dtype <U1"),
    (lambda m: {k: [[1, 0], [1]] for k in m}, ValueError,
     r"set_masks\(\): the mask for '.*' is not an array"),
], ids=["list", "none", "strings", "ragged"])
def test_set_masks_names_itself_for_inputs_of_the_wrong_kind(masks, error, message):
    _, model = sparse_mlp()
    before = keras_dst.masks(model)
    with pytest.raises(error, match=message):
        keras_dst.set_masks(model, masks(before))
    assert all((keras_dst.masks(model)[k] == v).all() for k, v in before.items())


def test_a_warm_start_is_not_written_back_by_a_later_set_masks():
    """The raw dense values of a warm start wait for the mask write that follows them
    (`model.set_weights` writes a kernel before its mask); once the weights have trained
    they are stale, and a later `set_masks` keeps the trained weights (with the same masks
    it changes nothing)."""
    dense, model = sparse_mlp()
    for layer in model.layers:
        if isinstance(layer, keras_dst.SparseWrapper):
            layer.layer.set_weights(dense.get_layer(layer.layer.name).get_weights())
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9), LOSS, jit_compile=True)
    x, y = classification_data(n=64)
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[
        keras_dst.DynamicSparseTraining(prune="magnitude", grow="gradient", update_every=2)])
    weights = [t.weight.numpy().copy() for t in keras_dst.sparse_targets(model)]
    keras_dst.set_masks(model, keras_dst.masks(model))
    for t, before in zip(keras_dst.sparse_targets(model), weights):
        np.testing.assert_array_equal(t.weight.numpy(), before)
    assert_sparse_invariants(model)


def _subclassed():
    model = SubclassedNet(name="subclassed")
    model(np.ones((2, 20), "float32"))
    return model


@pytest.mark.parametrize("make", [lambda: sparse_mlp()[1], _subclassed], ids=["functional", "subclassed"])
@pytest.mark.parametrize("overwrite_every", [None, 3])
def test_a_plain_fit_with_ema_ends_with_the_averages_masked(make, overwrite_every):
    # Keras overwrites the weights with their moving averages at the end of fit (and every
    # `ema_overwrite_frequency` steps), writing the tf.Variable itself: the averages hold
    # what the optimizer wrote at masked entries before the mask constraint zeroed it
    model = make()
    masks = keras_dst.masks(model)
    optimizer = keras.optimizers.SGD(0.1, momentum=0.9, use_ema=True,
                                      ema_overwrite_frequency=overwrite_every)
    model.compile(optimizer, LOSS, jit_compile=True)
    x, y = classification_data(n=64)
    model.fit(x, y, epochs=2, batch_size=16, verbose=0)
    assert stray(model) == 0
    assert keras_dst.masks(model).keys() == masks.keys()
    averages = {id(v): a for v, a in zip(optimizer._trainable_variables,
                                         optimizer._model_variables_moving_average)}
    for t in keras_dst.sparse_targets(model):  # the weights are the averages, masked
        np.testing.assert_array_equal(masks[t.weight.path], t.mask.numpy())
        expected = np.where(t.mask.numpy(), averages[id(t.weight)].numpy(), 0)
        np.testing.assert_array_equal(t.weight.numpy(), expected)


def test_an_eager_write_of_the_tf_variable_itself_is_masked():
    for model in (sparse_mlp()[1], _subclassed()):
        for t in keras_dst.sparse_targets(model):
            t.weight.value.assign(np.ones(t.weight.shape, "float32"))
            np.testing.assert_array_equal(t.weight.numpy(), t.mask.numpy().astype("float32"))




def _attached():
    return keras_dst.prunable(_plain(), density=0.3)


def _quantize(model, mode):
    with warnings.catch_warnings():  # (Keras: "InputLayer does not have a quantize method")
        warnings.simplefilter("ignore")
        model.quantize(mode)


def _refusal(use) -> str:
    """The message of the ValueError that `use()` raises ("" if it raises none)."""
    try:
        use()
    except ValueError as e:
        return str(e)
    return ""


def _every_use_of_the_masks(model, masks, path):
    return {
        "density": lambda: keras_dst.density(model),
        "summary": lambda: keras_dst.summary(model, print_fn=lambda line: None),
        "masks": lambda: keras_dst.masks(model),
        "set_masks": lambda: keras_dst.set_masks(model, masks),
        "apply_masks": lambda: keras_dst.apply_masks(model),
        "assert_sparse_invariants": lambda: keras_dst.testing.assert_sparse_invariants(model),
        "DynamicSparseTraining": lambda: compile_and_fit(
            model, [keras_dst.DynamicSparseTraining(update_every=3)]),
        "model.save": lambda: model.save(path),
        "export": lambda: keras_dst.export(model, str(path.with_suffix("")),
                                           format="tf_saved_model"),
    }


@pytest.mark.parametrize("make", [lambda: sparse_mlp()[1], _attached], ids=["wrapped", "attached"])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_layer_quantized_to_integers_is_refused_wherever_its_masks_are_used(make, mode, tmp_path):
    # model.quantize() replaces a Dense's float kernel with an integer one: the masks
    # would describe (and DST would train) a variable the model no longer computes with,
    # and a wrapped model's file would not load
    model = make()
    compile_and_fit(model, [keras_dst.DynamicSparseTraining(update_every=3)])
    masks = keras_dst.masks(model)
    x, _ = classification_data(n=32)
    _quantize(model, mode)
    quantized = model.predict(x, verbose=0)
    for what, use in _every_use_of_the_masks(model, masks, tmp_path / "q.keras").items():
        assert re.search(rf"layer '.*fc1' is quantized \({mode}.*strip", _refusal(use)), what
    # the way out: strip gives the plain quantized model, the zeros kept
    stripped = keras_dst.strip(model)
    np.testing.assert_array_equal(stripped.predict(x, verbose=0), quantized)
    fc1 = next(l for l in stripped._flatten_layers() if l.name == "fc1")
    kernel = keras.ops.convert_to_numpy(fc1._kernel)  # the layer's quantized kernel
    if mode == "int8":  # (int4 packs two entries per byte)
        mask = next(m for p, m in masks.items() if "fc1" in p).astype(bool)
        assert not np.any(kernel[~mask])
    if make is not _attached:  # (Keras cannot reload a quantized subclassed model)
        stripped.save(tmp_path / "stripped.keras")
        reloaded = keras.models.load_model(tmp_path / "stripped.keras", safe_mode=True)
        np.testing.assert_array_equal(reloaded.predict(x, verbose=0), quantized)


def test_prunable_refuses_a_quantized_model_naming_the_layer():
    for make in (lambda: mlp((20, 16, 3)), lambda: _PlainNet(name="plain")):
        model = make()
        model(np.ones((2, 20), "float32"))
        _quantize(model, "int8")
        with pytest.raises(ValueError, match=r"prunable\(\): layer '.*fc1' is quantized \(int8"):
            keras_dst.prunable(model, density=0.3)
        assert all(keras_dst.layers.attached_state(l) is None for l in model._flatten_layers())


@pytest.mark.parametrize("make", [lambda: sparse_mlp()[1], _attached], ids=["wrapped", "attached"])
def test_a_layer_with_lora_is_refused_wherever_its_masks_are_used(make, tmp_path):
    # with LoRA a Dense computes with kernel + A @ B: dense, whatever its mask says
    model = make()
    masks = keras_dst.masks(model)
    fc1 = next(l for l in model._flatten_layers()
               if l.name == "fc1" and not isinstance(l, keras_dst.SparseWrapper))
    fc1.enable_lora(2)
    for what, use in _every_use_of_the_masks(model, masks, tmp_path / "l.keras").items():
        assert re.search(r"layer '.*fc1' has LoRA enabled", _refusal(use)), what


def _attention_net():
    inputs = keras.Input((20,))
    h = keras.layers.Reshape((5, 4))(inputs)
    h = keras.layers.MultiHeadAttention(2, 4, name="mha")(h, h)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(keras.layers.Flatten()(h)))


@pytest.mark.parametrize("in_place", [False, True], ids=["wrapped", "attached"])
@pytest.mark.parametrize("change", ["lora", "int8"])
def test_a_changed_projection_inside_attention_is_refused_wherever_its_masks_are_used(
        in_place, change, tmp_path):
    # an attention layer is sparsified as a whole; keras-hub's enable_lora (or a quantize)
    # reaches its query/value projections, layers inside it that compute densely then
    def change_query(model):
        mha = next(l for l in model._flatten_layers() if isinstance(l, keras.layers.MultiHeadAttention))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mha._query_dense.enable_lora(2) if change == "lora" else mha._query_dense.quantize("int8")

    expected = r"layer 'mha/query' \(inside layer 'mha'\) " + (
        "has LoRA enabled" if change == "lora" else r"is quantized \(int8")
    model = keras_dst.prunable(_attention_net(), density=0.3, in_place=in_place)
    masks = keras_dst.masks(model)
    change_query(model)
    for what, use in _every_use_of_the_masks(model, masks, tmp_path / "a.keras").items():
        assert re.search(expected, _refusal(use)), what
    dense = _attention_net()
    change_query(dense)
    with pytest.raises(ValueError, match=expected):
        keras_dst.prunable(dense, density=0.3, in_place=in_place)
    x, _ = classification_data(n=8)
    expected_outputs = model.predict(x, verbose=0)
    if in_place:  # the way out the message names: strip in place keeps the change
        np.testing.assert_array_equal(keras_dst.strip(model).predict(x, verbose=0),
                                      expected_outputs)
    else:  # a copy from the attention layer's config cannot hold its projection's change
        with pytest.raises(ValueError, match=r"layer 'mha' rebuilt from its config has 8 "
                                             r"weights, not its \d+: LoRA or a "
                                             r"quantization of \['mha/query'\].*before"):
            keras_dst.strip(model)


def test_a_wrapped_attention_layer_in_float8_trains_sparse_and_names_why_it_cannot_be_copied():
    # float8 keeps the float kernels (DST trains them sparse), but the attention layer's
    # config does not carry its projections' float8 policy: a copy names them
    model = keras_dst.prunable(_attention_net(), density=0.3)
    _quantize(model, "float8")
    compile_and_fit(model, [keras_dst.DynamicSparseTraining(update_every=3)])
    assert_sparse_invariants(model)
    with pytest.raises(ValueError, match=r"layer 'mha' rebuilt from its config has 8 weights, "
                                         r"not its \d+: LoRA or a quantization of "
                                         r"\['mha/query', .*in_place=True"):
        keras_dst.strip(model)


def test_an_unbuilt_wrapper_of_an_attention_layer_with_lora_writes_no_config():
    mha = keras.layers.MultiHeadAttention(2, 4, name="mha")
    z = np.zeros((1, 5, 4), "float32")
    mha(z, z)
    mha.query_dense.enable_lora(2)
    wrapper = keras_dst.SparseWrapper(mha, density=0.5)  # (not built: no masks yet)
    with pytest.raises(ValueError, match=r"layer 'mha/query' \(inside layer 'mha'\) has LoRA"):
        wrapper.get_config()


class _Block(keras.layers.Layer):
    """A layer whose only sparsified weight is its own kernel; it holds a Dense too."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.proj = keras.layers.Dense(4, name="proj")

    def build(self, input_shape):
        self.kernel = self.add_weight(name="kernel", shape=(input_shape[-1], 4))
        self.proj.build(input_shape)

    def get_prunable_weights(self):
        return [self.kernel]

    def call(self, x):
        return keras.ops.matmul(x, self.kernel) + self.proj(x)


def test_lora_on_a_layer_inside_a_prunable_layer_that_holds_no_sparse_weight_is_allowed():
    inputs = keras.Input((20,))
    model = keras.Model(inputs, keras.layers.Dense(3)(_Block(name="blk")(inputs)))
    block = model.get_layer("blk")
    block.proj.enable_lora(2)  # (its kernel is not sparsified: masks still hold blk's)
    keras_dst.prunable(model, density=0.3, in_place=True)
    compile_and_fit(model, [keras_dst.DynamicSparseTraining(update_every=3)])
    assert_sparse_invariants(model)
    block.kernel.assign(np.ones(block.kernel.shape))  # ... and keep it sparse
    assert_sparse_invariants(model)


@pytest.mark.parametrize("make", [lambda: sparse_mlp()[1], _attached], ids=["wrapped", "attached"])
def test_float8_keeps_the_float_weights_so_dst_trains_it_sparse(make, tmp_path):
    # Keras's float8 mode keeps the float kernel (trainable) and adds scales: the masks
    # still hold what the layer computes with
    model = make()
    before = keras_dst.masks(model)
    _quantize(model, "float8")
    compile_and_fit(model, [keras_dst.DynamicSparseTraining(update_every=2, prune_rate=0.5)])
    after = keras_dst.masks(model)
    assert any(np.any(before[k] != after[k]) for k in before)
    assert_sparse_invariants(model, expected_active={k: int(v.sum()) for k, v in before.items()})
    if make is not _attached:
        model.save(tmp_path / "f8.keras")
        reloaded = keras.models.load_model(tmp_path / "f8.keras", safe_mode=True)
        assert keras_dst.masks(reloaded).keys() == after.keys()
        for k in after:
            np.testing.assert_array_equal(keras_dst.masks(reloaded)[k], after[k])
    # strip gives the plain float8 model (its layers rebuilt from their configs create the
    # scales before the kernel: the weights are copied by name)
    x, _ = classification_data(n=32)
    expected = model.predict(x, verbose=0)
    stripped = keras_dst.strip(model)
    np.testing.assert_array_equal(stripped.predict(x, verbose=0), expected)
    if make is not _attached:
        stripped.save(tmp_path / "stripped.keras")
        reloaded = keras.models.load_model(tmp_path / "stripped.keras", safe_mode=True)
        np.testing.assert_array_equal(reloaded.predict(x, verbose=0), expected)


def test_prunable_makes_a_float8_model_sparse():
    dense = mlp((20, 16, 3))
    _quantize(dense, "float8")
    x, _ = classification_data(n=32)
    same = keras_dst.prunable(dense, density=1.0)  # weights copied by name, wrappers float32
    np.testing.assert_array_equal(same.predict(x, verbose=0), dense.predict(x, verbose=0))
    model = keras_dst.prunable(dense, density=0.3)
    counts = {k: int(v.sum()) for k, v in keras_dst.masks(model).items()}
    compile_and_fit(model, [keras_dst.DynamicSparseTraining(update_every=2, prune_rate=0.5)])
    assert_sparse_invariants(model, expected_active=counts)


def _frozen_copies(model, make, tmp_path):
    """`model` rebuilt every way Keras rebuilds one: `.keras` file (safe mode), config and
    `clone_model` for graph models; a new `make()` frozen alike that loads its weights
    file for a subclassed one (its class is not registered)."""
    if not keras_dst.compat.is_graph_model(model):
        model.save_weights(str(tmp_path / "frozen.weights.h5"))
        copy = make()
        keras_dst.sparse_targets(copy)[0].state.layer.trainable = False
        copy.load_weights(str(tmp_path / "frozen.weights.h5"))
        return {"load_weights": copy}
    path = str(tmp_path / "frozen.keras")
    model.save(path)
    return {"load_model": keras.models.load_model(path, safe_mode=True),
            "from_config": type(model).from_config(model.get_config()),
            "clone_model": keras.models.clone_model(model)}


@pytest.mark.parametrize("make", [lambda: sparse_mlp()[1], _attached], ids=["wrapped", "attached"])
def test_a_layer_frozen_after_prunable_saves_loads_and_clones_with_its_masks(make, tmp_path):
    """Freezing a sparse layer (fine-tuning) emptied its prunable weights, so the model could
    not be loaded, rebuilt from its config or cloned ("got 1 densities for 0 prunable
    weights")."""
    model = make()
    frozen = keras_dst.sparse_targets(model)[0].state.layer
    frozen.trainable = False
    masks, path = keras_dst.masks(model), keras_dst.sparse_targets(model)[0].weight.path
    for how, copy in _frozen_copies(model, make, tmp_path).items():
        assert sorted(keras_dst.masks(copy)) == sorted(masks), how
        trainable = {t.weight.path: t.weight.trainable for t in keras_dst.sparse_targets(copy)}
        assert sum(not v for v in trainable.values()) == 1, (how, trainable)
        if how.startswith("load_"):  # (the others start from initializers)
            for k, v in keras_dst.masks(copy).items():
                np.testing.assert_array_equal(v, masks[k], err_msg=f"{how} {k}")
            np.testing.assert_allclose(copy.predict(np.ones((2, 20), "float32"), verbose=0),
                                       model.predict(np.ones((2, 20), "float32"), verbose=0))
        assert_sparse_invariants(copy)
    # unfrozen, the reloaded layer trains sparse again, its masks updated by DST
    copy = next(c for how, c in _frozen_copies(model, make, tmp_path).items()
                if how.startswith("load_"))
    keras_dst.sparse_targets(copy)[0].state.layer.trainable = True
    compile_and_fit(copy, callbacks=[keras_dst.DynamicSparseTraining(update_every=1)])
    assert (keras_dst.masks(copy)[path] != masks[path]).any()
    assert_sparse_invariants(copy)


def test_prunable_makes_a_frozen_layer_sparse_and_it_stays_frozen():
    """A layer frozen before `prunable` was left dense without a word; it is made sparse
    like every supported layer (``keep_dense`` keeps it dense) and stays frozen."""
    dense = mlp((20, 16, 16, 3))
    frozen = next(layer for layer in dense.layers if layer.weights)
    frozen.trainable = False
    with pytest.warns(UserWarning, match=rf"prunable\(\): layers \['{frozen.name}'\] of model "
                                         r"'mlp' are frozen.*keep_dense=\['"):
        model = keras_dst.prunable(dense, density=0.3)
    first = model.get_layer(frozen.name)
    assert isinstance(first, keras_dst.SparseWrapper) and not first.trainable
    assert not first.layer.kernel.trainable
    assert all(v is not first.layer.kernel for v in model.trainable_weights)
    assert keras_dst.density(model) == pytest.approx(0.3, abs=0.01)
    before = keras_dst.masks(model)
    compile_and_fit(model, callbacks=[keras_dst.DynamicSparseTraining(update_every=1)])
    after = keras_dst.masks(model)
    path = first.layer.kernel.path
    np.testing.assert_array_equal(after[path], before[path])
    assert any((after[k] != before[k]).any() for k in before if k != path)
    kept = no_warning(lambda: keras_dst.prunable(dense, density=0.6, keep_dense=[frozen.name]))
    assert keras_dst.masks(kept)[path].all()


@pytest.mark.parametrize("how", ["wrappers", "in_place", "reloaded"])
def test_set_weights_checks_every_value_before_writing_any(how, tmp_path):
    # Keras writes set_weights' values one by one: a refused value (the last layer's mask
    # of another pattern, a value of another shape) left the weights before it written
    model = keras_dst.prunable(mlp(), density=0.5, pattern="2:4", in_place=how == "in_place")
    if how == "reloaded":
        model.save(tmp_path / "m.keras")
        model = keras_dst.load_model(tmp_path / "m.keras")
    targets = keras_dst.sparse_targets(model)
    variables = list(model.weights)
    if how == "in_place":  # get_weights carries the attached state after the model's own
        variables += [v for t in targets for v in (t.mask, t.ever_active)]
    before = model.get_weights()
    assert len(before) == len(variables)
    sparse = {id(t.weight) for t in targets}  # (doubled: still 0 where masked)
    changed = [v if v.dtype == bool else v * 2.0 if id(w) in sparse else v + 1.0
               for v, w in zip(before, variables)]
    last_mask = next(i for i, v in enumerate(variables) if v is targets[-1].mask)
    broken = list(changed)
    broken[last_mask] = np.ones_like(before[last_mask])  # 4 of every 4 active
    with pytest.raises(ValueError, match=r"fc3/kernel' breaks its pattern '2:4'"):
        model.set_weights(broken)
    misshapen = list(changed)
    misshapen[len(model.weights) - 1] = np.zeros(7, "float32")
    with pytest.raises(ValueError, match=r"'fc3/bias' has shape \(7,\), the weight \(3,\); "
                                         "no weight was written"):
        model.set_weights(misshapen)
    for value, now in zip(before, model.get_weights()):
        np.testing.assert_array_equal(value, now)
    model.set_weights(changed)  # the same values with nothing refused are all written
    for value, now in zip(changed, model.get_weights()):
        np.testing.assert_array_equal(value, now)
    assert_sparse_invariants(model)


def test_a_wrapper_s_set_weights_checks_every_value_before_writing_any():
    # (its masks come first: a value of another shape for its bias left them written)
    wrapper = keras_dst.prunable(mlp(), density=0.5, pattern="2:4").get_layer("fc1")
    before = wrapper.get_weights()
    paths = [w.path for w in wrapper.weights]
    values = list(before)
    values[paths.index("fc1/kernel_mask")] = ~before[paths.index("fc1/kernel_mask")]  # 2:4 too
    values[paths.index("fc1/bias")] = np.zeros(7, "float32")
    with pytest.raises(ValueError, match=r"SparseWrapper 'fc1'.set_weights\(\): the value for "
                                         r"'fc1/bias' has shape \(7,\)"):
        wrapper.set_weights(values)
    for value, now in zip(before, wrapper.get_weights()):
        np.testing.assert_array_equal(value, now)


@pytest.mark.parametrize("how", ["wrappers", "in_place", "reloaded"])
def test_a_refused_load_weights_leaves_the_model_as_it_was(how, tmp_path):
    # Keras loads a weights file layer by layer: the last layer's mask of another pattern
    # was refused after the layers before it had loaded the file's weights and masks, and
    # the optimizer's state, which it loads before it raises
    in_place = how == "in_place"
    other = keras_dst.prunable(mlp(seed=1), density=0.5, pattern="2:4", seed=1, in_place=in_place,
                               pattern_overrides={"fc3": "unstructured"})
    other.compile(keras.optimizers.Adam(0.1), "mse")
    other.fit(np.ones((4, 20), "float32"), np.ones((4, 3), "float32"), verbose=0)
    other.save_weights(tmp_path / "other.weights.h5")
    model = keras_dst.prunable(mlp(), density=0.5, pattern="2:4", in_place=in_place)
    if how == "reloaded":
        model.save(tmp_path / "m.keras")
        model = keras_dst.load_model(tmp_path / "m.keras")
    model.compile(keras.optimizers.Adam(0.1), "mse")
    model.optimizer.build(model.trainable_variables)
    before = model.get_weights()
    optimizer_before = [v.numpy() for v in model.optimizer.variables]
    with pytest.raises(ValueError, match=r"fc3/kernel' breaks its pattern '2:4'"):
        model.load_weights(tmp_path / "other.weights.h5")
    for value, now in zip(before, model.get_weights()):
        np.testing.assert_array_equal(value, now)
    for value, variable in zip(optimizer_before, model.optimizer.variables):
        np.testing.assert_array_equal(value, variable.numpy(), err_msg=variable.path)
    assert_sparse_invariants(model)
    model.save_weights(tmp_path / "same.weights.h5")  # a file of its pattern still loads
    keras_dst.prunable(mlp(seed=2), density=0.5, pattern="2:4", seed=2,
                       in_place=in_place).load_weights(tmp_path / "same.weights.h5")


@pytest.mark.parametrize("in_place", [False, True])
def test_set_weights_refuses_values_that_are_not_numbers_before_writing_any(in_place):
    # (an attached model wrote its masks, then Keras refused a string value after them)
    model = keras_dst.prunable(mlp(), density=0.5, in_place=in_place)
    before = model.get_weights()
    values = [~v if v.dtype == bool else v for v in before]  # other masks (valid: unstructured)
    values[len(model.weights) - 1] = np.full(3, "x")  # fc3/bias
    with pytest.raises(TypeError, match=r"'fc3/bias' holds values of dtype <U1, not numbers; "
                                        "no weight was written"):
        model.set_weights(values)
    for value, now in zip(before, model.get_weights()):
        np.testing.assert_array_equal(value, now)
    values[len(model.weights) - 1] = [0.5, 0.5, 0.5]  # a list of numbers is an array
    model.set_weights(values)
    np.testing.assert_array_equal(model.get_weights()[len(model.weights) - 1], [0.5] * 3)
    assert_sparse_invariants(model)


def test_an_attached_model_s_set_weights_names_both_lengths_it_takes():
    model = keras_dst.prunable(mlp(), density=0.5, in_place=True)
    with pytest.raises(ValueError, match=r"got 7 values; it takes 6 \(its own weights\) or 12 "
                                         r"\(with the 6 masks, ever-active flags"):
        model.set_weights(model.get_weights()[:7])


@pytest.mark.parametrize("in_place", [False, True])
def test_a_nested_model_s_weight_lists_are_guarded_too(in_place):
    inner = mlp(name="inner")
    inp = keras.Input((20,))
    model = keras_dst.prunable(keras.Model(inp, inner(inp)), density=0.5, pattern="2:4",
                               in_place=in_place)
    nested = model.get_layer("inner")
    before = nested.get_weights()
    assert len(before) == 12  # masks and flags included, attached or wrapped
    values = [v if v.dtype == bool else v * 2.0 for v in before]
    last_mask = [i for i, v in enumerate(before) if v.dtype == bool and v.shape == (16, 3)][0]
    values[last_mask] = np.ones((16, 3), bool)
    with pytest.raises(ValueError, match=r"fc3/kernel' breaks its pattern '2:4'"):
        nested.set_weights(values)
    for value, now in zip(before, nested.get_weights()):
        np.testing.assert_array_equal(value, now)


@pytest.mark.parametrize("file_tracks", [True, False])
def test_a_weights_file_with_running_scores_into_a_model_without_names_the_option(
        file_tracks, tmp_path):
    # (Keras's "Layer 'fc1' expected 2 variables, but received 3", with no word of why)
    keras_dst.prunable(mlp(), density=0.3, track_running_scores=file_tracks).save_weights(
        tmp_path / "m.weights.h5")
    model = keras_dst.prunable(mlp(), density=0.3, track_running_scores=not file_tracks)
    before = model.get_weights()
    with pytest.raises(ValueError, match=rf"SparseWrapper 'fc1': the file "
                                         rf"{'holds' if file_tracks else 'holds no'} running "
                                         rf"scores, and this layer was made with "
                                         rf"track_running_scores={not file_tracks}; make the "
                                         rf"model with track_running_scores={file_tracks}"):
        model.load_weights(tmp_path / "m.weights.h5")
    for value, now in zip(before, model.get_weights()):
        np.testing.assert_array_equal(value, now)
