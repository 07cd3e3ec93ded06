"""Compact builders of the benchmark architectures, for Keras 3 *and* tf_keras.

Every builder takes the Keras module to build with (``keras`` or ``tf_keras``), so
the TFMOT side (`tfmot_epoch.py`, Keras 2) trains exactly the same graphs as the
keras_dst side (`overhead.py`, Keras 3). All convolutions and dense layers keep
their default initialisers; BatchNormalization follows every convolution of
ResNet-56 and VGG-16 (as in the CIFAR literature).

| name     | input      | architecture                                                    |
|----------|------------|-----------------------------------------------------------------|
| mlp      | (784,)     | Dense 1024 relu - Dense 1024 relu - Dense 10                    |
| convnet  | (32,32,3)  | conv3x3 32 valid, relu, maxpool2, conv3x3 64 relu, maxpool2,    |
|          |            | conv3x3 128 relu, global average pool, Dense 10                 |
| resnet56 | (32,32,3)  | CIFAR ResNet-56 (He et al. 2016): 3 stages x 9 basic blocks,    |
|          |            | 16/32/64 filters, 1x1 conv projection shortcuts, GAP, Dense 10  |
| vgg16    | (32,32,3)  | VGG-16 (config D) conv3x3 + BN + relu, 5 max pools, then        |
|          |            | Dense 512 relu - Dense 10 (the usual CIFAR variant)             |
"""

INPUT_SHAPES = {
    "mlp": (784,),
    "convnet": (32, 32, 3),
    "resnet56": (32, 32, 3),
    "vgg16": (32, 32, 3),
}
NUM_CLASSES = 10
MODEL_NAMES = tuple(INPUT_SHAPES)


def mlp(k, hidden=(1024, 1024), input_shape=(784,), classes=NUM_CLASSES):
    inp = k.Input(input_shape)
    x = inp
    for i, units in enumerate(hidden):
        x = k.layers.Dense(units, activation="relu", name=f"fc{i + 1}")(x)
    out = k.layers.Dense(classes, name="logits")(x)
    return k.Model(inp, out, name="mlp")


def convnet(k, filters=(32, 64, 128), input_shape=(32, 32, 3), classes=NUM_CLASSES):
    L = k.layers
    inp = k.Input(input_shape)
    x = L.Conv2D(filters[0], 3, padding="valid", activation="relu", name="conv1")(inp)
    x = L.MaxPooling2D(2)(x)
    x = L.Conv2D(filters[1], 3, padding="valid", activation="relu", name="conv2")(x)
    x = L.MaxPooling2D(2)(x)
    x = L.Conv2D(filters[2], 3, padding="valid", activation="relu", name="conv3")(x)
    x = L.GlobalAveragePooling2D()(x)
    out = L.Dense(classes, name="logits")(x)
    return k.Model(inp, out, name="convnet")


def _conv_bn(k, x, filters, stride, name, relu=True, kernel=3):
    L = k.layers
    x = L.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False,
                 name=f"{name}_conv")(x)
    x = L.BatchNormalization(name=f"{name}_bn")(x)
    return L.Activation("relu", name=f"{name}_relu")(x) if relu else x


def resnet(k, depth=56, widths=(16, 32, 64), input_shape=(32, 32, 3), classes=NUM_CLASSES):
    """CIFAR ResNet-(6n+2) with basic blocks; depth 56 gives n = 9."""
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}.")
    n = (depth - 2) // 6
    L = k.layers
    inp = k.Input(input_shape)
    x = _conv_bn(k, inp, widths[0], 1, "stem")
    for s, width in enumerate(widths):
        for b in range(n):
            stride = 2 if (s > 0 and b == 0) else 1
            name = f"s{s + 1}b{b + 1}"
            y = _conv_bn(k, x, width, stride, f"{name}_a")
            y = _conv_bn(k, y, width, 1, f"{name}_b", relu=False)
            if stride != 1 or x.shape[-1] != width:
                x = _conv_bn(k, x, width, stride, f"{name}_proj", relu=False, kernel=1)
            x = L.Activation("relu", name=f"{name}_out")(L.Add(name=f"{name}_add")([x, y]))
    x = L.GlobalAveragePooling2D()(x)
    out = L.Dense(classes, name="logits")(x)
    return k.Model(inp, out, name=f"resnet{depth}")


VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                512, 512, 512, "M")


def vgg(k, config=VGG16_CONFIG, width=1.0, input_shape=(32, 32, 3), classes=NUM_CLASSES):
    L = k.layers
    inp = k.Input(input_shape)
    x = inp
    i = 0
    for c in config:
        if c == "M":
            x = L.MaxPooling2D(2)(x)
            continue
        i += 1
        x = _conv_bn(k, x, max(1, int(c * width)), 1, f"conv{i}")
    x = L.Flatten()(x)
    x = L.Dense(max(1, int(512 * width)), activation="relu", name="fc1")(x)
    out = L.Dense(classes, name="logits")(x)
    return k.Model(inp, out, name="vgg16")


def build(k, name, quick=False):
    """The model `name` built with Keras module `k`; `quick` gives a tiny version."""
    if name == "mlp":
        return mlp(k, hidden=(64, 64) if quick else (1024, 1024))
    if name == "convnet":
        return convnet(k, filters=(8, 16, 32) if quick else (32, 64, 128))
    if name == "resnet56":
        return resnet(k, depth=8 if quick else 56, widths=(4, 8, 16) if quick else (16, 32, 64))
    if name == "vgg16":
        return vgg(k, width=1 / 16 if quick else 1.0)
    raise ValueError(f"unknown model {name!r}; expected one of {MODEL_NAMES}.")


def compiled(k, keras_dst, name, *, sparse, seed, mask_seed=None, quick=False,
             learning_rate=0.01, jit_compile=True, pattern=None, metrics=None,
             **prunable_kwargs):
    """The model `name`, built after ``k.utils.set_random_seed(seed)``, made prunable when
    `sparse` (``keras_dst.prunable(model, seed=mask_seed, **prunable_kwargs)``, `mask_seed`
    defaulting to `seed`; with a `pattern`, the layers it does not fit keep unstructured
    masks), and compiled as every benchmark compiles it:
    SGD with momentum 0.9 at `learning_rate`, sparse categorical cross-entropy from logits
    (and `metrics`, a list of metric names, if given)."""
    k.utils.set_random_seed(seed)
    model = build(k, name, quick=quick)
    if sparse:
        if pattern is not None:
            prunable_kwargs.update(pattern=pattern,
                                   pattern_overrides=keras_dst.unfit_layers(model, pattern))
        model = keras_dst.prunable(model, seed=seed if mask_seed is None else mask_seed,
                                   **prunable_kwargs)
    model.compile(optimizer=k.optimizers.SGD(learning_rate, momentum=0.9),
                  loss=k.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=list(metrics) if metrics else None, jit_compile=jit_compile)
    return model


def synthetic_dataset(tf, name, batch_size, n_batches=8, seed=0):
    """A repeated tf.data dataset of random inputs of the model's shape (cached in memory).

    tf.data autotuning is off: with it, deleting the iterator at the end of every
    `fit` waits for the autotuning thread's current sleep, whose period doubles up
    to a minute (10 ms, 20 ms, ... 1.28 s, 2.56 s): TF 2.21 adds 0-2.5 s to
    whole-call fit times at random, more to longer fits, whatever the model. A
    fixed ``prefetch(2)`` leaves nothing to tune.
    """
    shape = INPUT_SHAPES[name]
    g = tf.random.Generator.from_seed(seed)
    n = batch_size * n_batches
    x = g.normal((n,) + tuple(shape))
    y = g.uniform((n,), 0, NUM_CLASSES, dtype=tf.int32)
    return (tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size, drop_remainder=True)
            .cache().repeat().prefetch(2).with_options(_without_autotuning(tf)))


def _without_autotuning(tf):
    options = tf.data.Options()
    options.autotune.enabled = False
    return options
