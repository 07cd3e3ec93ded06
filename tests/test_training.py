"""Static sparse training through plain model.fit, saving and checkpoints."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_dst

from conftest import (
    SubclassedNet,
    active_counts,
    all_layers_data,
    all_layers_model,
    assert_sparse_invariants,
    classification_data,
    mlp,
)

OPTIMIZERS = {
    "sgd": lambda: keras.optimizers.SGD(0.05),
    "sgd_momentum": lambda: keras.optimizers.SGD(0.05, momentum=0.9),
    "sgd_nesterov": lambda: keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True),
    "adam": lambda: keras.optimizers.Adam(0.01),
    "adamw": lambda: keras.optimizers.AdamW(0.01, weight_decay=0.1),
    "rmsprop": lambda: keras.optimizers.RMSprop(0.01, momentum=0.5),
    "lion": lambda: keras.optimizers.Lion(0.01),
}


def _compile(model, optimizer):
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=True)


# The full optimizer x layer-type matrix runs in CI's slow pass; Adam on every layer type
# runs in the default pass in test_save_load_roundtrip_keeps_masks_weights_optimizer.
FAST = {"sgd_nesterov"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in FAST else pytest.mark.slow)
                                  for n in sorted(OPTIMIZERS)])
def test_every_optimizer_and_layer_type_stays_sparse(name):
    sparse = keras_dst.prunable(all_layers_model(), density=0.3)
    counts = active_counts(sparse)
    _compile(sparse, OPTIMIZERS[name]())
    kernels_before = {t.weight.path: t.weight.numpy().copy() for t in keras_dst.sparse_targets(sparse)}
    x, y = all_layers_data()
    sparse.fit(x, y, epochs=2, batch_size=8, verbose=0)
    assert_sparse_invariants(sparse, counts)
    moved = [not np.allclose(kernels_before[t.weight.path], t.weight.numpy())
             for t in keras_dst.sparse_targets(sparse)]
    assert sum(moved) > len(moved) // 2  # it really trained
    np.testing.assert_allclose(keras_dst.strip(sparse).predict(x, verbose=0),
                               sparse.predict(x, verbose=0), atol=1e-5)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_keeps_mlp_sparse(name):
    sparse = keras_dst.prunable(mlp(), density=0.2)
    counts = active_counts(sparse)
    _compile(sparse, OPTIMIZERS[name]())
    x, y = classification_data()
    sparse.fit(x, y, epochs=2, batch_size=32, verbose=0)
    assert_sparse_invariants(sparse, counts)


def test_dense_gradient_is_nonzero_at_inactive_positions():
    """The forward pass has no mask multiply: inactive weights get real gradients."""
    import tensorflow as tf

    sparse = keras_dst.prunable(mlp(), density=0.2, distribution="uniform")
    x, y = classification_data()
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    target = keras_dst.sparse_targets(sparse)[0]
    with tf.GradientTape() as tape:
        loss = loss_fn(y, sparse(x))
    grad = tape.gradient(loss, target.weight.value).numpy()
    assert np.count_nonzero(grad[~target.mask.numpy()]) > 0


def test_subclassed_model_trains_sparse_from_the_first_step():
    net = SubclassedNet()
    _compile(net, keras.optimizers.Adam(0.01))
    x, y = classification_data()
    net.fit(x, y, epochs=1, batch_size=32, verbose=0)
    counts = active_counts(net)
    assert sorted(counts.values()) == [48, 160]
    assert_sparse_invariants(net, counts)


def test_a_subclassed_model_of_wrappers_is_called_once_before_a_dst_fit():
    # Keras builds it when it traces the first step, after the callbacks start: the
    # callback names the unbuilt layer and the remedy, and the remedy works
    net = SubclassedNet()
    _compile(net, keras.optimizers.SGD(0.05))
    x, y = classification_data()
    dst = keras_dst.DynamicSparseTraining(update_every=2)
    with pytest.raises(ValueError, match=r"DynamicSparseTraining: layer 'sparse_dense(_\d+)?' is "
                                         r"not built yet; call the model once on a batch "
                                         r"\(e\.g\. model\(x\[:1\]\)\)"):
        net.fit(x, y, epochs=1, batch_size=32, verbose=0, callbacks=[dst])
    assert not net.hidden.built and not net.optimizer.built  # refused before any change
    net(x[:1])
    counts = active_counts(net)
    before = keras_dst.masks(net)
    net.fit(x, y, epochs=1, batch_size=32, verbose=0, callbacks=[dst])
    assert_sparse_invariants(net, counts)
    assert any((before[k] != m).any() for k, m in keras_dst.masks(net).items())


def test_subclassed_model_initial_weights_are_zero_where_masked():
    net = SubclassedNet()
    net(np.zeros((1, 20), "float32"))
    assert_sparse_invariants(net)


def test_save_load_roundtrip_keeps_masks_weights_optimizer(tmp_keras_path):
    sparse = keras_dst.prunable(all_layers_model(), density=0.3)
    _compile(sparse, keras.optimizers.Adam(0.01))
    x, y = all_layers_data()
    counts = active_counts(sparse)
    kernels_before = [t.weight.numpy().copy() for t in keras_dst.sparse_targets(sparse)]
    sparse.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert_sparse_invariants(sparse, counts)
    moved = [not np.allclose(before, t.weight.numpy())
             for before, t in zip(kernels_before, keras_dst.sparse_targets(sparse))]
    assert sum(moved) > len(moved) // 2  # it really trained
    sparse.save(tmp_keras_path)
    loaded = keras.models.load_model(tmp_keras_path, safe_mode=True)
    a, b = keras_dst.masks(sparse), keras_dst.masks(loaded)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), sparse.predict(x, verbose=0), atol=1e-6)
    assert int(loaded.optimizer.iterations.numpy()) == int(sparse.optimizer.iterations.numpy())
    for va, vb in zip(sparse.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_allclose(np.asarray(va), np.asarray(vb))
    # and it keeps training sparse after loading
    loaded.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert_sparse_invariants(loaded, counts)


def test_subclassed_model_save_load(tmp_path):
    @keras.saving.register_keras_serializable(package="tests")
    class Net(SubclassedNet):
        pass

    net = Net()
    _compile(net, "adam")
    x, y = classification_data()
    net.fit(x, y, epochs=1, verbose=0)
    path = str(tmp_path / "net.keras")
    net.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), net.predict(x, verbose=0), atol=1e-6)
    assert sorted(active_counts(loaded).values()) == sorted(active_counts(net).values())


def test_model_checkpoint_and_backup_keep_masks(tmp_path):
    sparse = keras_dst.prunable(mlp(), density=0.3)
    _compile(sparse, "sgd")
    x, y = classification_data()
    ckpt = str(tmp_path / "best.keras")
    sparse.fit(x, y, epochs=2, verbose=0, callbacks=[
        keras.callbacks.ModelCheckpoint(ckpt),
        keras.callbacks.BackupAndRestore(str(tmp_path / "backup"), delete_checkpoint=False)])
    restored = keras.models.load_model(ckpt)
    a, b = keras_dst.masks(sparse), keras_dst.masks(restored)
    assert all((a[k] == b[k]).all() for k in a)
    fresh = keras_dst.prunable(mlp(), density=0.3, seed=99)
    _compile(fresh, "sgd")
    fresh.load_weights(os.path.join(str(tmp_path / "backup"), "latest.weights.h5"))
    c = keras_dst.masks(fresh)
    assert all((a[k] == c[k]).all() for k in a)


def test_mask_shape_mismatch_in_saved_file_is_an_error(tmp_path):
    sparse = keras_dst.prunable(mlp(), density=0.3)
    path = str(tmp_path / "w.weights.h5")
    sparse.save_weights(path)
    other = keras_dst.prunable(mlp((20, 33, 16, 3)), density=0.3)
    with pytest.raises(ValueError):
        other.load_weights(path)


def _step_kernels(model, x, y):
    from examples.benchmarks import bench_utils
    model.fit(x, y, epochs=1, batch_size=len(x), verbose=0)  # builds the optimizer
    compiled = bench_utils.compiled_step_kernels(tf, model, x, y)
    return compiled["kernels"], compiled["inputs"]


@pytest.mark.parametrize("build,name,extra", [
    (mlp, "sgd", 0), (mlp, "adam", 0),
    pytest.param(all_layers_model, "adam", 0, marks=pytest.mark.slow),
    pytest.param(all_layers_model, "sgd_momentum", 0, marks=pytest.mark.slow),
    # plain SGD updates the Embedding table row-sparsely (a scatter of the IndexedSlices
    # gradient); the mask constraint then costs one select over the whole table
    pytest.param(all_layers_model, "sgd", 1, marks=pytest.mark.slow),
], ids=["mlp-sgd", "mlp-adam", "all_layers-adam", "all_layers-sgd_momentum", "all_layers-sgd"])
def test_static_sparse_step_compiles_to_the_dense_kernels(build, name, extra):
    """The mask constraint adds no kernel to the compiled step: XLA fuses it into
    the optimizer's update of each weight, so the sparse step runs exactly the
    dense step's fusions, dots and convolutions, with the masks as extra inputs.
    The one exception is a row-sparse (scatter) update, documented in BUILD.md."""
    x, y = all_layers_data() if build is all_layers_model else classification_data(n=16)
    dense = build()
    _compile(dense, OPTIMIZERS[name]())
    sparse = keras_dst.prunable(build(), density=0.3)
    _compile(sparse, OPTIMIZERS[name]())
    dense_kernels, dense_inputs = _step_kernels(dense, x, y)
    sparse_kernels, sparse_inputs = _step_kernels(sparse, x, y)
    dense_kernels["fusion"] += extra
    assert sparse_kernels == dense_kernels
    assert sparse_inputs - dense_inputs == len(keras_dst.sparse_targets(sparse))
