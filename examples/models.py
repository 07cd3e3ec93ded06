"""Keras functional builders for the models of the study (Nowak et al., "Fantastic Weights
and How to Find Them", NeurIPS 2023, arXiv:2306.12230: MLP, small conv net and LeNet-5,
MLP-Higgs, CIFAR ResNet-56, VGG-16, WRN; ImageNet ResNet-50).

Every builder is ``builder(input_shape, num_classes, **options) -> keras.Model``;
`get_model(name, input_shape, num_classes)` looks one up by name. Layer sizes,
bias use and initialisation follow the reference PyTorch models:

* "PyTorch default" init (MLPs, small conv net, LeNet-5): kernels
  ``VarianceScaling(1/3, "fan_in", "uniform")`` = U(±1/sqrt(fan_in)) and biases
  U(±1/sqrt(fan_in)) (`torch_bias`, a built-in `RandomUniform` with the bounds of the
  layer's fan-in);
* ResNets: Kaiming-normal (fan_in, ReLU gain, untruncated) on conv and linear
  kernels; VGG and WRN: Kaiming-normal fan_out on convs;
* BatchNormalization with PyTorch's defaults (momentum 0.1 = Keras 0.9, eps 1e-5).

`num_classes=1` gives a single logit (binary tasks such as Higgs).
"""

import math

import keras

L = keras.layers


# -- initialisers and layer helpers ------------------------------------------------

def torch_bias(fan_in, seed=None):
    """PyTorch's default bias init for Linear/Conv: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    A built-in `keras.initializers.RandomUniform`, so saved models need no custom
    object for it.
    """
    bound = 1.0 / math.sqrt(max(int(fan_in), 1))
    return keras.initializers.RandomUniform(minval=-bound, maxval=bound, seed=seed)


def torch_kernel():
    """PyTorch's default Linear/Conv weight init (kaiming_uniform with a=sqrt(5))."""
    return keras.initializers.VarianceScaling(1.0 / 3.0, "fan_in", "uniform")


def kaiming_normal(mode="fan_in"):
    """Untruncated Kaiming-normal with ReLU gain (torch.nn.init.kaiming_normal_)."""
    return keras.initializers.VarianceScaling(2.0, mode, "untruncated_normal")


def torch_dense(x, units, activation=None, name=None):
    """Linear layer with PyTorch's default init, applied to `x`."""
    return L.Dense(units, activation=activation, kernel_initializer=torch_kernel(),
                   bias_initializer=torch_bias(x.shape[-1]), name=name)(x)


def torch_conv(x, filters, kernel_size, activation=None, padding="valid", name=None):
    """Conv2D with bias and PyTorch's default init, applied to `x`."""
    return L.Conv2D(filters, kernel_size, padding=padding, activation=activation,
                    kernel_initializer=torch_kernel(),
                    bias_initializer=torch_bias(kernel_size ** 2 * x.shape[-1]),
                    name=name)(x)


def batch_norm(name=None):
    """BatchNormalization with PyTorch's defaults."""
    return L.BatchNormalization(momentum=0.9, epsilon=1e-5, name=name)


def conv_bn(x, filters, kernel_size, strides=1, init="fan_in", relu=True, name=None):
    """Bias-free conv -> BN (-> ReLU), the building block of the ResNet and VGG."""
    x = L.Conv2D(filters, kernel_size, strides=strides, padding="same", use_bias=False,
                 kernel_initializer=kaiming_normal(init), name=name)(x)
    x = batch_norm(name=None if name is None else f"{name}_bn")(x)
    return L.ReLU()(x) if relu else x


def _mlp(input_shape, num_classes, hidden, name):
    inputs = keras.Input(input_shape)
    x = L.Flatten()(inputs) if len(input_shape) > 1 else inputs
    for i, units in enumerate(hidden):
        x = torch_dense(x, units, "relu", name=f"fc{i + 1}")
    outputs = torch_dense(x, num_classes, name=f"fc{len(hidden) + 1}")
    return keras.Model(inputs, outputs, name=name)


# -- the models ----------------------------------------------------------------------

def mlp_digits(input_shape, num_classes):
    """Small MLP for the offline `digits` dataset: flatten -> 256 -> 128 -> classes."""
    return _mlp(input_shape, num_classes, (256, 128), "mlp_digits")


def mlp_cifar10(input_shape, num_classes):
    """The paper's MLP: flatten (3072) -> 1024 -> 512 -> classes, ReLU, biases on."""
    return _mlp(input_shape, num_classes, (1024, 512), "mlp_cifar10")


def mlp_higgs(input_shape, num_classes):
    """MLP-Higgs: 24 -> 256 -> 256 -> 1 logit (num_classes=1)."""
    return _mlp(input_shape, num_classes, (256, 256), "mlp_higgs")


def conv_cifar10(input_shape, num_classes):
    """The paper's "small conv" net (94 304 weights + 234 biases on CIFAR-10)."""
    inputs = keras.Input(input_shape)
    x = torch_conv(inputs, 32, 3, "relu", name="conv1")
    x = L.MaxPooling2D(2)(x)
    x = torch_conv(x, 64, 3, "relu", name="conv2")
    x = L.MaxPooling2D(2)(x)
    x = torch_conv(x, 128, 3, "relu", name="conv3")
    x = L.GlobalAveragePooling2D()(x)
    outputs = torch_dense(x, num_classes, name="fc")
    return keras.Model(inputs, outputs, name="conv_cifar10")


def conv_digits(input_shape, num_classes):
    """A small conv net for 8 x 8 digits (the offline conv setup): three 3x3 convolutions
    (32, 64, 64 filters, same padding, two 2x2 max-pools), global average pooling, a
    linear classifier."""
    inputs = keras.Input(input_shape)
    x = torch_conv(inputs, 32, 3, "relu", padding="same", name="conv1")
    x = L.MaxPooling2D(2)(x)
    x = torch_conv(x, 64, 3, "relu", padding="same", name="conv2")
    x = L.MaxPooling2D(2)(x)
    x = torch_conv(x, 64, 3, "relu", padding="same", name="conv3")
    x = L.GlobalAveragePooling2D()(x)
    outputs = torch_dense(x, num_classes, name="fc")
    return keras.Model(inputs, outputs, name="conv_digits")


def lenet5(input_shape, num_classes):
    """Caffe LeNet-5 (the reference's `mlp_fmnist`): conv5x5 20, conv5x5 50, 500, classes."""
    inputs = keras.Input(input_shape)
    x = torch_conv(inputs, 20, 5, "relu", name="conv1")
    x = L.MaxPooling2D(2)(x)
    x = torch_conv(x, 50, 5, "relu", name="conv2")
    x = L.MaxPooling2D(2)(x)
    x = L.Flatten()(x)
    x = torch_dense(x, 500, "relu", name="fc3")
    outputs = torch_dense(x, num_classes, name="fc4")
    return keras.Model(inputs, outputs, name="lenet5")


def resnet(input_shape, num_classes, depth=56):
    """He et al.'s CIFAR ResNet-`depth` (depth = 6n + 2): 3 stages of n basic blocks.

    3x3 stem conv 16 + BN + ReLU; stages of 16, 32, 64 filters, the first block of
    stages 2 and 3 with stride 2 and a 1x1 stride-2 conv + BN projection shortcut;
    global average pooling; linear classifier. Convs are bias-free.
    """
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n + 2 (20, 32, 44, 56, 110), got {depth}.")
    blocks = (depth - 2) // 6
    inputs = keras.Input(input_shape)
    x = conv_bn(inputs, 16, 3, name="stem")
    for stage, filters in enumerate((16, 32, 64)):
        for block in range(blocks):
            strides = 2 if stage > 0 and block == 0 else 1
            prefix = f"s{stage + 1}b{block + 1}"
            y = conv_bn(x, filters, 3, strides, name=f"{prefix}_conv1")
            y = conv_bn(y, filters, 3, relu=False, name=f"{prefix}_conv2")
            if strides != 1 or x.shape[-1] != filters:
                x = conv_bn(x, filters, 1, strides, relu=False, name=f"{prefix}_shortcut")
            x = L.ReLU()(L.Add()([x, y]))
    x = L.GlobalAveragePooling2D()(x)
    outputs = L.Dense(num_classes, kernel_initializer=kaiming_normal(),
                      bias_initializer=torch_bias(x.shape[-1]), name="fc")(x)
    return keras.Model(inputs, outputs, name=f"resnet{depth}")


VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                512, 512, 512)


def vgg16(input_shape, num_classes):
    """CIFAR VGG-16-BN of the reference: 13 bias-free conv3x3 + BN + ReLU, 4 max-pools,
    AvgPool2, linear classifier (N(0, 0.01) weights, zero bias)."""
    inputs = keras.Input(input_shape)
    x = inputs
    for i, item in enumerate(VGG16_CONFIG):
        if item == "M":
            x = L.MaxPooling2D(2)(x)
        else:
            x = conv_bn(x, item, 3, init="fan_out", name=f"conv{i + 1}")
    x = L.AveragePooling2D(2)(x)
    x = L.Flatten()(x)
    outputs = L.Dense(num_classes, kernel_initializer=keras.initializers.RandomNormal(0.0, 0.01),
                      bias_initializer="zeros", name="fc")(x)
    return keras.Model(inputs, outputs, name="vgg16")


def wide_resnet(input_shape, num_classes, depth=16, width=8, dropout=0.0):
    """Zagoruyko & Komodakis' WRN-`depth`-`width` (depth = 6n + 4), pre-activation blocks.

    3x3 stem conv 16; 3 groups of n blocks with 16k, 32k, 64k filters (stride 2 at
    the start of groups 2 and 3); block = BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3,
    1x1 conv shortcut when the shape changes; BN-ReLU, global average pooling,
    linear. Kaiming-normal fan_out convs, bias-free.
    """
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"WRN depth must be 6n + 4 (10, 16, 22, 28, 40), got {depth}.")
    blocks = (depth - 4) // 6
    conv = lambda f, k, s=1, name=None: L.Conv2D(  # noqa: E731
        f, k, strides=s, padding="same", use_bias=False,
        kernel_initializer=kaiming_normal("fan_out"), name=name)
    inputs = keras.Input(input_shape)
    x = conv(16, 3, name="stem")(inputs)
    for group, filters in enumerate((16 * width, 32 * width, 64 * width)):
        for block in range(blocks):
            strides = 2 if group > 0 and block == 0 else 1
            prefix = f"g{group + 1}b{block + 1}"
            pre = L.ReLU()(batch_norm()(x))
            y = conv(filters, 3, strides, name=f"{prefix}_conv1")(pre)
            y = L.ReLU()(batch_norm()(y))
            if dropout:
                y = L.Dropout(dropout)(y)
            y = conv(filters, 3, name=f"{prefix}_conv2")(y)
            if strides != 1 or x.shape[-1] != filters:
                x = conv(filters, 1, strides, name=f"{prefix}_shortcut")(pre)
            x = L.Add()([x, y])
    x = L.GlobalAveragePooling2D()(L.ReLU()(batch_norm()(x)))
    outputs = L.Dense(num_classes, bias_initializer="zeros", name="fc")(x)
    return keras.Model(inputs, outputs, name=f"wrn{depth}_{width}")


def resnet50(input_shape, num_classes):
    """ImageNet ResNet-50 (keras.applications, from scratch; its convs carry biases)."""
    return keras.applications.ResNet50(weights=None, input_shape=tuple(input_shape),
                                       classes=num_classes, classifier_activation=None)


MODELS = {
    "mlp_digits": mlp_digits,
    "mlp_cifar10": mlp_cifar10,
    "conv_cifar10": conv_cifar10,
    "conv_digits": conv_digits,
    "lenet5": lenet5,
    "mlp_higgs": mlp_higgs,
    "resnet20": lambda s, c: resnet(s, c, depth=20),
    "resnet32": lambda s, c: resnet(s, c, depth=32),
    "resnet56": lambda s, c: resnet(s, c, depth=56),
    "resnet110": lambda s, c: resnet(s, c, depth=110),
    "vgg16": vgg16,
    "wide_resnet": wide_resnet,
    "resnet50": resnet50,
}


def model_names():
    """Names accepted by `get_model`."""
    return tuple(MODELS)


def get_model(name, input_shape, num_classes, **options):
    """Builds model `name` for inputs of `input_shape` and `num_classes` outputs.

    Args:
      name: one of `model_names()`.
      input_shape: shape of one example (no batch axis).
      num_classes: number of logits (1 for a binary task with a single logit).
      **options: builder options, e.g. ``depth``/``width`` for ``wide_resnet``.

    Raises:
      ValueError: unknown name or invalid options.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}'; choose one of {', '.join(MODELS)}.")
    return MODELS[name](tuple(input_shape), int(num_classes), **options)


# -- files saved by earlier versions -------------------------------------------------

@keras.saving.register_keras_serializable(package="keras_dst_examples")
class TorchBiasUniform(keras.initializers.RandomUniform):
    """Legacy: the bias initializer of models saved before `torch_bias` replaced it.

    Such .keras files name "keras_dst_examples>TorchBiasUniform" and still load after
    ``import examples.models`` (or ``from examples import train``). Same values as
    ``torch_bias(fan_in, seed)``.
    """

    def __init__(self, fan_in, seed=None):
        bound = 1.0 / math.sqrt(max(int(fan_in), 1))
        super().__init__(minval=-bound, maxval=bound, seed=seed)
        self.fan_in = int(fan_in)

    def get_config(self):
        return {"fan_in": self.fan_in, "seed": super().get_config()["seed"]}
