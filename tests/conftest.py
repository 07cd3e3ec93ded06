"""Shared fixtures and helpers: small models covering every supported layer type,
data, a compile-and-fit, snapshots of the sparse state, and the invariant check.

Test modules import the helpers with ``from conftest import ...`` (tests/ has no
``__init__.py``: pytest puts it on ``sys.path``).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Most of a test's time is XLA compiling tiny models (every fit here uses jit_compile=True).
# Without LLVM's optimisations a first fit takes about a third less CPU time; the HLO, and so
# what keras_dst puts in the compiled step, is the same. Subprocesses inherit it. A set
# XLA_FLAGS (even empty: `XLA_FLAGS= python3 -m pytest ...`) is left as it is.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_dst.masks import sparse_targets
from keras_dst.scoring import ScoreInputs
from keras_dst.testing import assert_sparse_invariants  # noqa: F401  (re-exported)

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def all_layers_model(seed=0):
    """A functional model with one of every supported layer type, plus BN and biases."""
    keras.utils.set_random_seed(seed)
    L = keras.layers
    img = keras.Input((8, 8, 3), name="img")
    seq = keras.Input((8, 4), name="seq")
    vol = keras.Input((4, 4, 4, 2), name="vol")
    tok = keras.Input((5,), dtype="int32", name="tok")
    a = L.Conv2D(4, 3, padding="same", name="conv2d")(img)
    a = L.BatchNormalization(name="bn")(a)
    a = L.DepthwiseConv2D(3, padding="same", name="depthwise2d")(a)
    a = L.SeparableConv2D(4, 3, padding="same", name="separable2d")(a)
    a = L.Conv2DTranspose(4, 3, padding="same", name="conv2d_transpose")(a)
    a = L.GlobalAveragePooling2D()(a)
    b = L.Conv1D(6, 3, padding="same", name="conv1d")(seq)
    b = L.DepthwiseConv1D(3, padding="same", name="depthwise1d")(b)
    b = L.SeparableConv1D(6, 3, padding="same", name="separable1d")(b)
    b = L.Conv1DTranspose(6, 3, padding="same", name="conv1d_transpose")(b)
    b = L.MultiHeadAttention(2, 4, name="mha")(b, b)
    b = L.EinsumDense("btc,cd->btd", output_shape=(8, 5), bias_axes="d", name="einsum")(b)
    b = L.Flatten()(b)
    c = L.Conv3D(3, 2, padding="same", name="conv3d")(vol)
    c = L.Conv3DTranspose(3, 2, padding="same", name="conv3d_transpose")(c)
    c = L.GlobalAveragePooling3D()(c)
    d = L.Embedding(20, 4, name="embedding")(tok)
    d = L.Flatten()(d)
    x = L.Concatenate()([a, b, c, d])
    x = L.Dense(16, activation="relu", name="dense")(x)
    out = L.Dense(3, name="head")(x)
    return keras.Model([img, seq, vol, tok], out, name="all_layers")


def all_layers_data(n=16, seed=0):
    rng = np.random.default_rng(seed)
    x = [rng.normal(size=(n, 8, 8, 3)).astype("float32"),
         rng.normal(size=(n, 8, 4)).astype("float32"),
         rng.normal(size=(n, 4, 4, 4, 2)).astype("float32"),
         rng.integers(0, 20, size=(n, 5)).astype("int32")]
    y = rng.integers(0, 3, size=(n,))
    return x, y


class SubclassedNet(keras.Model):
    """A subclassed model of two `SparseWrapper` layers (20 inputs, 3 logits): they build in
    Keras's symbolic first call, their variables initialised later from initializers."""

    def __init__(self, **kwargs):
        import keras_dst

        super().__init__(**kwargs)
        self.hidden = keras_dst.prunable(keras.layers.Dense(32, activation="relu"), density=0.25)
        self.out = keras_dst.prunable(keras.layers.Dense(3), density=0.5)

    def call(self, x):
        return self.out(self.hidden(x))


def mlp(sizes=(20, 32, 16, 3), seed=0, name="mlp"):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((sizes[0],))
    x = inp
    for i, units in enumerate(sizes[1:-1]):
        x = keras.layers.Dense(units, activation="relu", name=f"fc{i + 1}")(x)
    out = keras.layers.Dense(sizes[-1], name=f"fc{len(sizes) - 1}")(x)
    return keras.Model(inp, out, name=name)


def classification_data(n=128, d=20, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype("float32")
    w = rng.normal(size=(d, classes))
    y = np.argmax(x @ w, axis=1)
    return x, y


def write_underneath(variable, value):
    """Writes `value` into `variable`'s tf.Variable through its handle (an
    AssignVariableOp), past every eager write that keras_dst checks."""
    raw = variable.value
    tf.raw_ops.AssignVariableOp(resource=raw.handle, value=tf.cast(value, raw.dtype))


def active_counts(model):
    import keras_dst

    return {k: int(v.sum()) for k, v in keras_dst.masks(model).items()}


def sparse_state(model):
    """``{weight path: (mask, weight)}``: numpy copies for every sparsified weight."""
    import keras_dst

    return {t.weight.path: (t.mask.numpy().copy(), t.weight.numpy().copy())
            for t in keras_dst.sparse_targets(model)}


def compile_and_fit(model, callbacks=(), optimizer=None, epochs=1, batch_size=16, data=None):
    """Compiles `model` (jit, `LOSS`, SGD(0.05) unless `optimizer`) and fits it on `data`
    (default: ``classification_data()``), without shuffling; returns the History."""
    model.compile(optimizer or keras.optimizers.SGD(0.05), LOSS, jit_compile=True)
    x, y = classification_data() if data is None else data
    return model.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=0, shuffle=False,
                     callbacks=list(callbacks))


def score_inputs(weight=None, gradient=None, mask=None, momentum=None, seed=(0, 0)):
    """A criterion's or growth rule's `ScoreInputs` from array-likes.

    The shape is that of the first of weight, gradient, mask given; weight and
    gradient default to zeros, mask to all True (float32, bool).
    """
    shape = next(np.shape(a) for a in (weight, gradient, mask) if a is not None)
    w = np.zeros(shape, np.float32) if weight is None else np.asarray(weight, np.float32)
    g = np.zeros(shape, np.float32) if gradient is None else np.asarray(gradient, np.float32)
    m = np.ones(shape, bool) if mask is None else np.asarray(mask, bool)
    return ScoreInputs(tf.constant(w), tf.constant(g), tf.constant(m),
                       tf.convert_to_tensor(seed, tf.int32),
                       None if momentum is None else tf.constant(momentum, tf.float32))


@pytest.fixture
def tmp_keras_path(tmp_path):
    return str(tmp_path / "model.keras")


class EveryStep(keras.callbacks.Callback):
    """After every optimizer step: `assert_sparse_invariants` with the given counts and the
    ever-active flags covering the masks; counts the steps and the steps that changed a mask."""

    def __init__(self, counts):
        super().__init__()
        self.counts, self.steps, self.changed, self._last = counts, 0, 0, None

    def on_train_batch_end(self, batch, logs=None):
        assert_sparse_invariants(self.model, self.counts, ever_active=True)
        masks = [np.array(t.mask.numpy()) for t in sparse_targets(self.model)]
        if self._last is not None and any((a != b).any() for a, b in zip(masks, self._last)):
            self.changed += 1
        self._last, self.steps = masks, self.steps + 1
