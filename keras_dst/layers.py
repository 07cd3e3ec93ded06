"""The sparse layer wrapper and the protocol that says which weights are prunable.

`SparseWrapper` wraps any supported Keras layer. It owns one non-trainable bool
*mask* variable per sparsified weight (same shape as the weight) and keeps the
weight at exact zero wherever the mask is False. It does **not** touch the
forward pass: the wrapped layer computes with its stored kernel, whose inactive
entries are already 0. Sparsity is enforced after every optimizer update by a
`MaskConstraint` installed on the weight variable (Keras optimizers apply
variable constraints right after each update, inside the compiled step), so the
loss gradient of an inactive weight is the true dense gradient, which is what
gradient growth needs.

Which weights are prunable:

* a layer that defines ``get_prunable_weights()`` (returning a list of its
  variables) opts in with exactly those weights (the custom-layer protocol, the
  same method name as TFMOT's `PrunableLayer`);
* otherwise the class registry below names them: ``kernel`` of Dense, EinsumDense
  and every convolution, ``depthwise_kernel``/``pointwise_kernel`` of
  SeparableConv, ``embeddings`` of Embedding, the ``kernel`` of every
  projection inside MultiHeadAttention, and ``kernel``/``recurrent_kernel`` of
  the recurrent layers and cells (SimpleRNN, GRU, LSTM, ConvLSTM: the cell's input
  and recurrent kernels, ``[inputs, gates x units]`` and ``[units, gates x units]``,
  taps first for ConvLSTM). `register_prunable_layer` adds a class.
* biases, normalisation parameters and non-trainable statistics are never
  sparsified; a layer whose weights are all vectors or scalars (e.g. a library's
  own RMS normalisation) has nothing to sparsify.

Masks live in a `SparseState`: owned by a `SparseWrapper` (Sequential and
functional models, single layers), or attached to a layer of a model in place
(`attach`: subclassed and library models, which cannot be rebuilt with wrappers).
"""

import contextlib
import inspect
import json
from typing import Optional, Sequence, Union

import keras
import numpy as np
import tensorflow as tf

from keras_dst import compat, distributions, patterns, topology, user_warnings, validation
from keras_dst.registry import Registry
from keras_dst.validation import check_choice, check_density, check_names, errors_named

_PRUNABLE_LAYERS = Registry("prunable layer class", by_name=False)  # class -> tuple of weight names

# Layers whose weights stay dense by design (normalisation, etc.).
_DENSE_BY_DESIGN = (
    keras.layers.BatchNormalization,
    keras.layers.LayerNormalization,
    keras.layers.GroupNormalization,
    keras.layers.UnitNormalization,
    keras.layers.Normalization,
)


def register_prunable_layer(layer_class: type, weight_names: Sequence[str],
                            overwrite: bool = False) -> None:
    """Declares which weights of `layer_class` (and subclasses) are prunable.

    A subclass uses the registration of its nearest registered class in its
    method resolution order.

    Args:
      layer_class: a `keras.layers.Layer` subclass.
      weight_names: names of the variables to sparsify (`variable.name`, e.g.
        ``("kernel",)``; one name alone is taken as a list of one). Variables of
        nested sub-layers with these names count.
      overwrite: replace an existing registration of `layer_class`.

    Raises:
      TypeError: `layer_class` is not a Layer subclass, `weight_names` not a str or a
        list, tuple or set of str.
      ValueError: `weight_names` is empty, or `layer_class` is already registered and
        `overwrite` is False.
    """
    if not (isinstance(layer_class, type) and issubclass(layer_class, keras.layers.Layer)):
        raise TypeError(
            f"register_prunable_layer() needs a keras Layer class, got {layer_class!r}."
        )
    with errors_named("register_prunable_layer()"):
        names = check_names(weight_names, "weight_names")
    if not names or not all(names):
        raise ValueError(
            f"register_prunable_layer() needs at least one weight name, and no empty one, got "
            f"weight_names={weight_names!r}."
        )
    names = tuple(dict.fromkeys(names))
    _PRUNABLE_LAYERS.register(layer_class, names, overwrite=overwrite)


for _cls in (
    keras.layers.Dense,
    keras.layers.EinsumDense,
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.Conv3D,
    keras.layers.Conv1DTranspose,
    keras.layers.Conv2DTranspose,
    keras.layers.Conv3DTranspose,
    keras.layers.DepthwiseConv1D,
    keras.layers.DepthwiseConv2D,
    keras.layers.MultiHeadAttention,
):
    register_prunable_layer(_cls, ("kernel",))
register_prunable_layer(keras.layers.SeparableConv1D, ("depthwise_kernel", "pointwise_kernel"))
register_prunable_layer(keras.layers.SeparableConv2D, ("depthwise_kernel", "pointwise_kernel"))
register_prunable_layer(keras.layers.Embedding, ("embeddings",))
# Recurrent layers: the weights live in their cell (`layer.cell.kernel`), found by name
# among the layer's variables. Gates are stacked along the output axis, so every
# pattern keeps its meaning (blocks, groups and fan-in run along the inputs of one gate
# unit). A generic `keras.layers.RNN(cell)` is not registered, its cells are: a wrapper
# cannot reach them, masks attached in place can (`prunable(..., in_place=True)`).
for _cls in (
    keras.layers.SimpleRNN,
    keras.layers.GRU,
    keras.layers.LSTM,
    keras.layers.ConvLSTM1D,
    keras.layers.ConvLSTM2D,
    keras.layers.ConvLSTM3D,
    keras.layers.SimpleRNNCell,  # (in a generic `keras.layers.RNN`, also stacked: in place)
    keras.layers.GRUCell,
    keras.layers.LSTMCell,
):
    register_prunable_layer(_cls, ("kernel", "recurrent_kernel"))
if hasattr(keras.layers, "ReversibleEmbedding"):  # recent Keras 3: keras-hub's token embedding
    register_prunable_layer(keras.layers.ReversibleEmbedding,
                            ("embeddings", "reverse_embeddings"))

# Layers of libraries keras_dst does not import, by "module.QualifiedName" (matched
# through the MRO, like registered classes): a library model's layers are then
# supported without importing the library here.
_PRUNABLE_BY_NAME = {
    "keras_hub.src.layers.modeling.position_embedding.PositionEmbedding": ("embeddings",),
}


def _registered_names(layer):
    for cls in type(layer).__mro__:
        if cls in _PRUNABLE_LAYERS:
            return _PRUNABLE_LAYERS.get(cls)
        names = _PRUNABLE_BY_NAME.get(f"{cls.__module__}.{cls.__qualname__}")
        if names is not None:
            return names
    return None


def is_supported(layer) -> bool:
    """True if `layer` can be wrapped (protocol method or registered class)."""
    return hasattr(layer, "get_prunable_weights") or _registered_names(layer) is not None


# Depthwise kernels: (layer classes, kernel attribute).
_DEPTHWISE_KERNELS = (
    ((keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D), "kernel"),
    ((keras.layers.SeparableConv1D, keras.layers.SeparableConv2D), "depthwise_kernel"),
)
# Kernels not laid out [taps..., inputs, outputs]: (layer classes, kernel attribute,
# their layout) for `check_pattern`.
_OTHER_LAYOUTS = (
    ((keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose, keras.layers.Conv3DTranspose),
     "kernel", "[taps..., filters, input channels], its last axis its input"),
) + tuple((classes, attribute, "[taps..., input channels, depth multiplier], each output "
           "channel reading the taps of one input channel")
          for classes, attribute in _DEPTHWISE_KERNELS)


def score_layout(layer, weight) -> "topology.ScoreLayout":
    """How the reference's score normalisation (`topology.normalize`) groups `weight` of
    `layer` (or of a layer inside it): a depthwise kernel per output channel, an
    `EinsumDense` kernel by the axes its equation keeps in the output, an embedding
    table (a 2-D weight named ``embeddings``: `Embedding`'s, keras-hub's
    `ReversibleEmbedding`'s and `PositionEmbedding`'s) with its rows as units, as
    PyTorch's ``Embedding``; otherwise by rank (`topology.default_layout`)."""
    for sub in compat.flatten_layers(layer, include_self=True):
        for classes, attribute in _DEPTHWISE_KERNELS:
            if isinstance(sub, classes) and getattr(sub, attribute, None) is weight:
                return topology.ScoreLayout("depthwise")
        if isinstance(sub, keras.layers.EinsumDense) and sub.kernel is weight:
            kernel, output = _einsum_kernel_axes(sub)
            return topology.ScoreLayout(
                "linear", tuple(i for i, axis in enumerate(kernel) if axis in output))
    if len(weight.shape) == 2 and weight.name == "embeddings":  # (PositionEmbedding's
        return topology.ScoreLayout("linear", (0,))                 # is position_embeddings)
    return topology.default_layout(len(weight.shape))


def _einsum_kernel_axes(layer):
    """(kernel axes, output axes) of an `EinsumDense`'s equation, as letters."""
    kernel, output = layer.equation.replace("...", "").split(",")[1].split("->")
    return kernel, output


def check_pattern(pattern, layer, weight, where: str) -> None:
    """Raises ValueError naming `where` if `weight` of `layer` cannot take `pattern`.

    Patterns read a kernel as ``[positions..., inputs, outputs]`` (`patterns.check`:
    the shape, e.g. an input axis that is a multiple of the block): its last axis
    must be its only output axis. Dense and convolution kernels are laid out so
    (a separable convolution's pointwise kernel too); a transposed convolution's is
    not (``[taps..., filters, input channels]``: its last axis is its input, so blocks
    would run along its outputs and a constant fan-in would be a constant fan-out),
    nor a depthwise kernel (``[taps..., input channels, depth multiplier]``: an output
    channel reads the taps of one input channel, so blocks and groups would run across
    output channels); an `EinsumDense` kernel is when every other
    axis is contracted with the input (MultiHeadAttention's output projection,
    ``abcd,cde->abe``), not when it keeps several output axes (its query/key/value
    projections, ``abc,cde->abde``: ``[model dim, heads, head dim]``, whose blocks
    would run along the heads).
    """
    structured = patterns.parse(pattern).kind != "unstructured"
    # the layout first: a kernel whose last axis is not its only output axis fails the
    # shape check too (MultiHeadAttention's [model dim, heads, head dim]), misleadingly
    for sub in compat.flatten_layers(layer, include_self=True) if structured else []:
        for classes, attribute, layout in _OTHER_LAYOUTS:
            if isinstance(sub, classes) and getattr(sub, attribute, None) is weight:
                raise ValueError(
                    f"{where}: pattern '{pattern}' needs a kernel whose last axis is its only "
                    f"output axis; {type(sub).__name__} '{sub.name}' has its {attribute} laid "
                    f"out {layout}; {patterns.REMEDY}.")
        if isinstance(sub, keras.layers.EinsumDense) and sub.kernel is weight:
            kernel, output = _einsum_kernel_axes(sub)
            outputs = "".join(axis for axis in kernel if axis in output)
            if outputs != kernel[-1:]:
                raise ValueError(
                    f"{where}: pattern '{pattern}' needs a kernel whose last axis is its only "
                    f"output axis; EinsumDense '{sub.name}' ({sub.equation}) has kernel axes "
                    f"'{kernel}' with outputs '{outputs}'; {patterns.REMEDY}.")
    patterns.check(pattern, tuple(weight.shape), where)


def is_dense_by_design(layer) -> bool:
    """True for normalisation layers, whose parameters are never sparsified."""
    return isinstance(layer, _DENSE_BY_DESIGN)


def is_matrix(weight) -> bool:
    """Whether a weight of a layer keras_dst does not know holds a matrix (a kernel, a
    table): at least two of its axes are longer than 1. One with at most one such axis,
    whatever its rank, is a vector: a bias, a scale, a ViT's class token ``[1, 1,
    hidden]``; it is never a reason to refuse its layer."""
    return sum(size > 1 for size in weight.shape) >= 2


def needs_no_wrapping(layer) -> bool:
    """True for layers with nothing to sparsify: dense by design, no weights, a supported
    layer with no weight of rank >= 2, or a layer keras_dst does not know holding no
    matrix (`is_matrix`: only biases, the scales of a library's own normalisation
    layers, ...)."""
    if isinstance(layer, _DENSE_BY_DESIGN):
        return True
    if isinstance(layer, keras.Model):
        return False
    if not layer.built:
        return not _has_weight_creating_build(layer)
    if is_supported(layer):
        return not any(len(w.shape) >= 2 for w in layer.weights)
    return not any(is_matrix(w) for w in layer.weights)


def _has_weight_creating_build(layer) -> bool:
    # An unbuilt layer of a class that never creates weights (Flatten, ReLU, ...)
    # keeps the base `Layer.build`.
    return type(layer).build is not keras.layers.Layer.build


def _scope_of_strategy_of(weights):
    """The `tf.distribute` scope the masks of `weights` are made in: that of the strategy
    whose distributed variables hold them when no strategy is in scope (masks attached
    outside the scope to a model built inside it), so that each replica keeps its own
    copy as it does of the weights; else none (the scope in force, if any)."""
    if not tf.distribute.has_strategy():
        for w in weights:
            if isinstance(w.value, tf.distribute.DistributedValues):
                return w.value.distribute_strategy.scope()
    return contextlib.nullcontext()


def check_maskable(layer, owner: str, sparse_weights: Optional[Sequence] = None) -> None:
    """Raises a ValueError naming `owner` and the layer when masks cannot hold what
    `layer` computes: it, or a layer inside it (the query/key/value/output projections
    of a `MultiHeadAttention`, which keras-hub's ``enable_lora`` reaches), was quantized
    to integers (``model.quantize("int8")``, ``"int4"``, ...: its float weights were
    replaced by integer ones that masks and constraints never see) or has LoRA enabled
    (``enable_lora``: it computes with ``kernel + A @ B``, a dense update of its kernel)
    while it holds one of the sparsified weights (`sparse_weights`; default: the
    layer's `prunable_weights`). ``"float8"`` keeps the float weights (trainable; an
    entry at 0 stays 0), so masks still hold them. Keras layers only; any other layer
    passes.
    """
    if sparse_weights is None and layer.built:
        try:
            sparse_weights = prunable_weights(layer)
        except (TypeError, ValueError):  # (not prunable: its own check names it)
            pass
    sparse = None if sparse_weights is None else {id(w) for w in sparse_weights}
    for inner in compat.flatten_layers(layer, include_self=True):
        mode = getattr(inner, "quantization_mode", None)
        if mode and mode != "float8":  # (its float weights are gone: no longer sparse_weights)
            reason = f"is quantized ({mode}, by model.quantize())"
        elif getattr(inner, "lora_enabled", False) and (
                inner is layer or sparse is None or any(id(w) in sparse for w in inner.weights)):
            reason = ("has LoRA enabled (it computes with its kernel plus a dense low-rank "
                      "update; a layer kept dense with keep_dense holds masks too)")
        else:
            continue
        where = "" if inner is layer else f" (inside layer '{layer_label(layer)}')"
        raise ValueError(
            f"{owner}: layer '{layer_label(inner)}'{where} {reason}, so keras_dst's masks no "
            "longer hold what it computes. Quantize or add LoRA once sparse training is "
            "done, to keras_dst.strip(model): a plain Keras model that keeps the zeros.")


def prunable_weights(layer) -> list:
    """The variables of a *built* `layer` that are sparsified, in a stable order.

    A registered layer's named weights that it created trainable
    (`is_trainable_by_design`): a layer frozen now (``trainable=False``) has the same
    prunable weights as when it is trained, so its masks are made, saved and loaded
    alike.

    Raises:
      TypeError: if the layer is neither registered nor implements the protocol.
      ValueError: if the protocol returns something that is not a variable of
        the layer.
    """
    if hasattr(layer, "get_prunable_weights"):
        weights = list(layer.get_prunable_weights())
        own = {id(v) for v in layer.weights}
        for w in weights:
            if id(w) not in own:
                raise ValueError(
                    f"Layer '{layer.name}' ({type(layer).__name__}).get_prunable_weights() "
                    f"returned {w!r}, which is not one of the layer's variables."
                )
        return weights
    names = _registered_names(layer)
    if names is None:
        raise TypeError(
            f"Layer '{layer.name}' of class {type(layer).__name__} is not supported by "
            "keras_dst: implement `get_prunable_weights()` on it, register its class "
            "with keras_dst.register_prunable_layer(), or, in a model, leave it dense with "
            "prunable(model, skip_unsupported=True)."
        )
    named = [v for v in layer.weights if v.name in names]
    if layer.weights and not named:  # (a registration's typo would leave it dense)
        raise TypeError(
            f"Layer '{layer.name}' of class {type(layer).__name__} is registered as prunable "
            f"with weight names {list(names)}, but has no variable of these names (its "
            f"variables: {[v.name for v in layer.weights]}); fix its "
            "keras_dst.register_prunable_layer() call.")
    return [v for v in named if is_trainable_by_design(layer, v)]


def is_trainable_by_design(layer, variable) -> bool:
    """Whether `layer` (or a layer inside it) created `variable` trainable: True for a
    weight frozen with ``trainable=False``, False for one that is never trained (a
    statistic, a fixed table)."""
    return any(variable is v for v in compat.created_trainable(layer))


class MaskConstraint(keras.constraints.Constraint):
    """Zeroes a weight wherever its bool mask is False (after any prior constraint).

    Installed on each sparsified variable by `SparseWrapper`; Keras optimizers call
    it right after every update. It is bound to a mask *variable*, so it is not a
    serializable object: it never appears in a layer's config (Keras layers
    serialize their own ``kernel_constraint``, which stays the user's), and the
    wrapper re-installs it when it is built. `get_config` says so.
    """

    def __init__(self, mask: "keras.Variable", previous: Optional[keras.constraints.Constraint] = None):
        if getattr(mask, "dtype", None) not in ("bool", tf.bool):
            raise TypeError(f"MaskConstraint needs a bool mask variable, got mask={mask!r}.")
        if previous is not None and not callable(previous):
            raise TypeError(f"MaskConstraint: previous must be None or a constraint (callable), "
                            f"got previous={previous!r}.")
        self.mask = mask
        self.previous = previous

    def __call__(self, w):
        if self.previous is not None:
            w = self.previous(w)
        if not tf.TensorShape(self.mask.shape).is_compatible_with(w.shape):
            raise ValueError(f"MaskConstraint: a mask of shape {tuple(self.mask.shape)} cannot "
                             f"constrain a weight of shape {tuple(w.shape)}.")
        return tf.where(self.mask, w, tf.zeros([], w.dtype))

    def get_config(self):
        raise TypeError(
            "MaskConstraint is bound to a mask variable and is not serializable; the "
            "SparseWrapper re-creates it when it is built. Serialize the model (its "
            "SparseWrapper layers) instead.")


def mask_is_only_constraint(variable) -> bool:
    """Whether `variable`'s constraint is its `MaskConstraint` alone (none of the user's
    runs before it), so that applying it is exactly zeroing where the mask is False."""
    constraint = variable.constraint
    return isinstance(constraint, MaskConstraint) and constraint.previous is None


def relative_path(layer, variable) -> str:
    """`variable`'s path below `layer` (``kernel``; ``query/kernel`` in a
    MultiHeadAttention): the same for a layer and its clone, whatever their own paths."""
    prefix = layer.path + "/" if getattr(layer, "path", None) else ""
    path = variable.path
    return path[len(prefix):] if path.startswith(prefix) else variable.name


def relative_name(layer, variable) -> str:
    """`relative_path` as one name (``query/kernel`` -> ``query_kernel``)."""
    return relative_path(layer, variable).replace("/", "_")


def _per_weight_pairs(a: list, b: list) -> list:
    """The pairs of two per-weight settings, each a list of one value per weight or of
    one value for every weight (repeated); [] where their lengths disagree (`create`,
    which knows the weights, reports that)."""
    if len(a) != len(b) and 1 not in (len(a), len(b)):
        return []
    n = max(len(a), len(b))
    return list(zip(a * n if len(a) == 1 else a, b * n if len(b) == 1 else b))


class SparseState:
    """The sparse state of one layer and what keeps its weights at 0 where masked.

    Per prunable weight of `layer` (`prunable_weights`): a bool *mask* variable, a bool
    *ever-active* variable (every entry that was ever active, for the ITOP rate) and,
    with `track_running_scores`, a float32 running score; each weight gets a
    `MaskConstraint` (re-zeroes it after every optimizer update) and a write guard
    (see `_guard_writes`). Nothing touches the layer's forward pass.

    The one implementation behind both places masks live:

    * a `SparseWrapper` owns one; its variables are the wrapper's weights (so a
      Sequential/functional model saves and loads them as any Keras layer's);
    * `attach` puts one on a layer of a model as it is (subclassed and library
      models, which cannot be rebuilt with wrappers); its variables belong to no
      layer and are written into the layer's own entry of weights files.

    Args:
      layer: the layer whose weights are sparsified.
      density, init, seed, track_running_scores, pattern: see `SparseWrapper`.
      owner: how messages name the state (e.g. ``"SparseWrapper 'fc1'"``).
      wrapper: the `SparseWrapper` that owns it, or None for an attached state.

    Raises:
      ValueError: a bad density, init, seed or pattern (nothing is created).
    """

    def __init__(self, layer, density=None, init="exact", seed=None, track_running_scores=False,
                 pattern="unstructured", owner=None, wrapper=None, keep_dense=False):
        init = check_choice(init, ("exact", "bernoulli"), "init")
        owner = owner or f"layer '{layer_label(layer)}'"
        listed = isinstance(pattern, (list, tuple))
        parsed = []
        for i, p in enumerate(pattern if listed else [pattern]):
            with validation.errors_named(f"{owner}: pattern" + (f"[{i}]" if listed else "")):
                parsed.append(patterns.parse(p))
        if density is None:  # the patterns' own: N/M for an N:M weight, 1 (dense) otherwise
            own = [p.fixed_density or 1.0 for p in parsed]
            density = own if listed else own[0]
        scalar = np.ndim(density) == 0  # (a 0-d array too; a str is refused below)
        with validation.errors_named(f"layer '{layer.name}'"):
            densities = [check_density(d, name="density", allow_zero=True)
                         for d in ([density] if scalar else list(density))]
        per_weight = isinstance(keep_dense, (list, tuple, np.ndarray))
        if per_weight:
            kept = [validation.check_bool(k, f"keep_dense[{i}]") for i, k in enumerate(keep_dense)]
        elif isinstance(keep_dense, (bool, np.bool_)):
            kept = [bool(keep_dense)]
        else:
            raise TypeError(f"keep_dense must be a bool or a list of bools (one per prunable "
                            f"weight), got keep_dense={keep_dense!r}.")
        if any(k and float(d) != 1.0 for k, d in _per_weight_pairs(kept, densities)):
            raise ValueError(f"layer '{layer.name}': keep_dense={keep_dense!r} needs density "
                             f"1 for the weights it keeps dense, got density={density!r}.")
        seed = validation.check_seed(seed, allow_none=True)
        if init != "exact" and any(p.kind != "unstructured" for p in parsed):
            raise ValueError(f"{owner}: pattern={pattern!r} needs init='exact' (exact counts "
                             f"per block, group or unit), got init={init!r}.")
        for p, d in _per_weight_pairs(parsed, densities):
            patterns.pattern_density(p, d, f"layer '{layer.name}'")
        self.layer = layer
        self.owner = owner
        self.wrapper = wrapper
        self.density = densities[0] if scalar else densities
        self.init = init
        self.seed = int(seed) if seed is not None else distributions.stable_seed(layer.name)
        self.track_running_scores = validation.check_bool(track_running_scores,
                                                          "track_running_scores")
        self.keep_dense = kept if per_weight else kept[0]
        self.pattern = [str(p) for p in parsed] if listed else str(parsed[0])
        self.patterns = []  # one `patterns.Pattern` per sparsified weight, once created
        self.sparse_weights = []
        self.masks = []
        self.ever_active = []
        self.running_scores = []
        self.created = False
        # id(weight) -> raw value of its last eager write, while a mask write may follow
        # (see `_guard_writes`).
        self._pending_writes = {}

    @property
    def label(self) -> str:
        """The layer as reports name it: its name in a wrapper, its path when attached
        (library models repeat names such as ``query`` in every block)."""
        return self.layer.name if self.wrapper is not None else layer_label(self.layer)

    def get_config(self) -> dict:
        config = {"density": self.density, "init": self.init, "seed": self.seed,
                  "track_running_scores": self.track_running_scores, "pattern": self.pattern}
        if np.any(self.keep_dense):  # (absent otherwise: the configs of earlier versions)
            config["keep_dense"] = self.keep_dense
        return config

    def is_kept_dense(self, weight) -> bool:
        """Whether the sparsified `weight` is kept dense on purpose (`keep_dense`).

        Raises:
          ValueError: `weight` is not one of the layer's sparsified weights.
        """
        index = next((i for i, w in enumerate(self.sparse_weights) if w is weight), None)
        if index is None:
            raise ValueError(f"{self.owner}: '{getattr(weight, 'path', weight)}' is not one "
                             "of its sparsified weights.")
        return self.keep_dense if isinstance(self.keep_dense, bool) else self.keep_dense[index]

    def check_write(self, target, value) -> None:
        """Raises as an eager write of `value` to `target` would, and writes nothing: the
        refusals of the write guard (`_guard_writes`) for a mask (0/1, its pattern) or
        ever-active flags (0/1, shape); nothing for any other variable (a sparsified
        weight's one refusal, its shape, is `check_weight_list`'s for every value).
        `set_weights` checks every value with it before writing any."""
        for i, weight in enumerate(self.sparse_weights):
            if target is self.masks[i]:
                _check_mask_value(self, weight, self.patterns[i], value)
            elif target is self.ever_active[i]:
                _check_flags_value(self, weight, value)

    def variables(self) -> list:
        """The state variables, in creation (and saving) order."""
        result = []
        for i in range(len(self.masks)):
            result += [self.masks[i], self.ever_active[i]]
            if self.running_scores:
                result.append(self.running_scores[i])
        return result

    def create(self, make_variable):
        """Creates the state of every prunable weight of the (built) layer.

        Args:
          make_variable: ``(name, shape, dtype, initializer) -> variable``; called
            mask, ever-active flag (and running score) per weight, in that order.
        """
        check_maskable(self.layer, self.owner)
        weights = prunable_weights(self.layer)
        densities = (
            [float(self.density)] * len(weights)
            if np.isscalar(self.density)
            else list(self.density)
        )
        if len(densities) != len(weights):
            raise ValueError(
                f"{self.owner}: got {len(densities)} densities for "
                f"{len(weights)} prunable weights of layer '{self.layer.name}'."
            )
        if not isinstance(self.keep_dense, bool) and len(self.keep_dense) != len(weights):
            raise ValueError(
                f"{self.owner}: got {len(self.keep_dense)} keep_dense flags for "
                f"{len(weights)} prunable weights of layer '{self.layer.name}'.")
        specs = [self.pattern] * len(weights) if isinstance(self.pattern, str) else self.pattern
        if len(specs) != len(weights):
            raise ValueError(
                f"{self.owner}: got {len(specs)} patterns for "
                f"{len(weights)} prunable weights of layer '{self.layer.name}'.")
        parsed = [patterns.parse(p) for p in specs]
        for w, p, d in zip(weights, parsed, densities):
            where = f"layer '{self.layer.name}' weight '{w.name}'"
            check_pattern(p, self.layer, w, where)
            patterns.pattern_density(p, d, where)
        self.patterns = parsed
        self.sparse_weights = weights
        self.masks, self.ever_active, self.running_scores = [], [], []
        # A checkpoint restored into the model before `prunable` restores the masks once
        # they are tracked (below): they then apply to the weights as they were.
        restoring = compat.checkpoint_restore_waits_for(self._holder, _CHECKPOINT_ATTR)
        raws = []
        with _scope_of_strategy_of(weights):  # (masks per replica, as the weights)
            for i, (w, d, p) in enumerate(zip(weights, densities, self.patterns)):
                name = relative_name(self.layer, w)

                # The mask, the ever-active flags and the weight's zeroing use the same
                # draw: made once when eager, during this build only (a symbolic draw is not
                # kept, and a deferred initializer, run later, draws afresh and keeps none).
                cache = {"open": True}

                def initial_mask(shape, dtype=None, d=d, i=i, p=p, cache=cache):
                    if "mask" in cache:
                        return cache["mask"]
                    mask = self._initial_mask(shape, d, i, p)
                    if cache.get("open") and tf.executing_eagerly():
                        cache["mask"] = mask
                    return mask

                mask = make_variable(f"{name}_mask", w.shape, "bool", initial_mask)
                self.masks.append(mask)
                self.ever_active.append(
                    make_variable(f"{name}_ever_active", w.shape, "bool", initial_mask))
                if self.track_running_scores:
                    self.running_scores.append(make_variable(
                        f"{name}_running_score", w.shape, "float32", keras.initializers.Zeros()))
                w.constraint = MaskConstraint(mask, previous=_original_constraint(w))
                raws.append(_zero_initial_value(w, initial_mask, keep_raw=restoring))
                cache.clear()  # closed: the initializers may outlive the build
                _guard_writes(w, mask, self.ever_active[-1], self, p)
                if raws[-1] is not None:  # the raw value for the mask write to come
                    self.keep_raw_value(w, raws[-1])
        try:
            setattr(self._holder, _CHECKPOINT_ATTR, _CheckpointedVariables(self))
        except Exception:  # (a restore waiting for masks of another pattern)
            self._unguard()
            for w, raw in zip(weights, raws):  # the weights as they were
                if raw is not None:
                    w.assign(raw)
            raise
        finally:
            for v in weights + self.ever_active:  # (not for a later `set_masks`)
                self._pending_writes.pop(id(v), None)
        self.created = True

    @property
    def _holder(self):
        """The layer that holds the state in TensorFlow's object graph: the wrapper, or
        the layer it is attached to."""
        return self.wrapper if self.wrapper is not None else self.layer

    def keep_raw_value(self, variable, raw, watched=()):
        """Keeps `raw`, a value `variable` (a weight or its ever-active flags) was written
        with before the mask changed entries of it, for the next eager write of its mask
        (`_guard_writes`), as long as `variable` and the `watched` variables hold what
        they hold now."""
        self._pending_writes[id(variable)] = (
            raw, [(v, tf.identity(v.value)) for v in (variable, *watched)])

    def _initial_mask(self, shape, density, index, pattern):
        seed = tf.constant([self.seed % (2**31 - 1), index], dtype=tf.int32)
        if self.init == "bernoulli":
            return distributions.bernoulli_mask(shape, density, seed)
        return patterns.initial_mask(pattern, shape, density, seed)

    def apply_masks(self) -> None:
        """Zeroes every sparsified weight where its mask is False."""
        self._pending_writes.clear()
        for w, m in zip(self.sparse_weights, self.masks):
            w.assign(tf.where(m, w, tf.zeros_like(w)))

    def mark_loading(self):
        """Flags the weights so that their next eager write (a load) warns about non-zero
        entries where the mask is False (see `_guard_writes`)."""
        for w in self.sparse_weights:
            w.__dict__["_keras_dst_loading"] = True

    def release(self):
        """Zeroes the masked entries, then removes the constraints and write guards: the
        weights are plain variables again (what `strip` leaves)."""
        self.apply_masks()
        self._unguard()

    def _unguard(self):
        """Removes the constraints, write guards and checkpoint dependency of `create`."""
        for w in self.sparse_weights:
            w.constraint = _original_constraint(w)
            for name in ("assign", "_keras_dst_loading"):
                w.__dict__.pop(name, None)
            compat.off_checkpoint_restore(w)
            compat.off_raw_variables(w, "assign")
        compat.delete_checkpoint_dependency(self._holder, _CHECKPOINT_ATTR)


_CHECKPOINT_ATTR = "_keras_dst_variables"


class _CheckpointedVariables(tf.Module):
    """A `SparseState`'s variables as a dependency of the layer that holds them
    (attribute ``_keras_dst_variables``) in TensorFlow's object graph, so that
    `tf.train.Checkpoint` / `tf.train.CheckpointManager` save and restore the masks
    with the weights they mask (keys ``.../_keras_dst_variables/masks/0/...``). Keras's
    own files (``.keras``, ``.weights.h5``) do not read it: they store the variables
    as the wrapper's weights or in the attached layer's entry."""

    def __init__(self, state):
        super().__init__(name="keras_dst_variables")
        self.masks = list(state.masks)
        self.ever_active = list(state.ever_active)
        self.running_scores = list(state.running_scores)


def layer_label(layer) -> str:
    """A layer's path (``block/attention/query``: unique inside a model), else its name."""
    return getattr(layer, "path", None) or layer.name


@keras.saving.register_keras_serializable(package="keras_dst")
class SparseWrapper(keras.layers.Wrapper):
    """Makes a Keras layer sparse: bool masks plus weights kept at exact zero.

    Args:
      layer: the layer to sparsify (built or not). Must be supported (see module
        docstring).
      density: target fraction of active entries, a float in [0, 1] for every
        prunable weight, or one float per prunable weight (in
        `prunable_weights(layer)` order). The initial active count of a weight of
        n entries is ``round(density * n)`` in ``"exact"`` init. None (default): the
        pattern's own, N/M for an N:M weight, 1 (dense) for the others.
      init: ``"exact"`` (default: exactly that many active entries at uniformly
        random positions) or ``"bernoulli"`` (the reference: each entry active with
        probability `density`).
      seed: int seed of the initial masks. ``None`` derives one from the layer
        name. Masks are drawn with stateless RNG from (seed, weight index), so the
        same seed gives the same masks in every process.
      track_running_scores: also keep a float32 running score per entry (needed by the
        running criteria such as ``running_magnitude``, whose EMA must survive a
        checkpoint).
      pattern: the sparsity pattern of every prunable weight (``"unstructured"``,
        ``"1xB"``, ``"N:M"``, ``"fan_in"``; see `keras_dst.patterns`), or one per
        prunable weight. A structured pattern needs ``init="exact"``; an N:M
        weight's density must be N/M.
      keep_dense: the layer is kept dense on purpose (`prunable`'s `keep_dense`; density
        1), or one flag per prunable weight (a `MultiHeadAttention`'s value projection
        alone): `GradualPruning` leaves such weights dense, while a DST update may
        reset their lowest-score entries, as in the reference.
      **kwargs: base `Layer` arguments (name, ...).

    The state lives in a `SparseState` (`sparse_state`), whose variables are the
    wrapper's weights. After `build`, `sparse_weights` lists the sparsified
    variables, `masks` their masks (same order, same shapes, dtype bool) and
    `ever_active` bool variables that record every entry that was ever active (for
    the ITOP rate). With `track_running_scores`, `running_scores` holds the running
    scores.
    """

    def __init__(self, layer: keras.layers.Layer,
                 density: Union[float, Sequence[float], None] = None,
                 init: str = "exact", seed: Optional[int] = None, track_running_scores: bool = False,
                 pattern: Union[patterns.PatternLike, Sequence[patterns.PatternLike]] = "unstructured",
                 keep_dense: Union[bool, Sequence[bool]] = False, **kwargs):
        if "track_scores" in kwargs:  # the name in configs saved by keras_dst 0.1
            track_running_scores = kwargs.pop("track_scores")
        if not isinstance(layer, keras.layers.Layer):
            raise TypeError(
                f"SparseWrapper needs a keras Layer, got {type(layer).__name__}: {layer!r}."
            )
        check_not_sparse(layer)
        if not is_supported(layer):
            prunable_weights(layer)  # raises the TypeError that names the layer
        state = SparseState(layer, density=density, init=init, seed=seed,
                            track_running_scores=track_running_scores, pattern=pattern,
                            owner=f"SparseWrapper(layer '{layer.name}')", keep_dense=keep_dense)
        kwargs.setdefault("name", f"sparse_{layer.name}")
        kwargs.setdefault("dtype", compat.unquantized_policy(layer.dtype_policy))
        kwargs.setdefault("trainable", layer.trainable)  # a frozen layer's wrapper reads frozen
        super().__init__(layer, **kwargs)
        state.owner, state.wrapper = f"SparseWrapper '{self.name}'", self
        self._sparse_state = state
        self.supports_masking = getattr(layer, "supports_masking", False)

    # -- the state (see SparseState) -------------------------------------------
    @property
    def sparse_state(self) -> SparseState:
        return self._sparse_state

    density = property(lambda self: self._sparse_state.density)
    init = property(lambda self: self._sparse_state.init)
    seed = property(lambda self: self._sparse_state.seed)
    track_running_scores = property(lambda self: self._sparse_state.track_running_scores)
    pattern = property(lambda self: self._sparse_state.pattern)
    keep_dense = property(lambda self: self._sparse_state.keep_dense)
    patterns = property(lambda self: self._sparse_state.patterns)
    sparse_weights = property(lambda self: self._sparse_state.sparse_weights)
    masks = property(lambda self: self._sparse_state.masks)
    ever_active = property(lambda self: self._sparse_state.ever_active)
    running_scores = property(lambda self: self._sparse_state.running_scores)

    # -- building -----------------------------------------------------------
    def build(self, input_shape=None):
        if not self.layer.built:
            if input_shape is None:
                raise ValueError(
                    f"SparseWrapper '{self.name}': cannot build layer '{self.layer.name}' "
                    "without an input shape; build the layer before wrapping it.")
            try:  # (a build taking several shapes: MultiHeadAttention's)
                signature = inspect.signature(self.layer.build)
            except (TypeError, ValueError):  # (no signature to read: let the build say)
                signature = None
            if signature is not None:
                try:
                    signature.bind(input_shape)
                except TypeError as e:
                    raise ValueError(
                        f"SparseWrapper '{self.name}': cannot build layer '{self.layer.name}' "
                        f"({type(self.layer).__name__}) from the shape of its first input "
                        f"(its build{signature} cannot take it alone: {e}); build the layer "
                        "before wrapping it (call it once on its inputs).") from e
            self.layer.build(input_shape)
        self._sparse_state.create(self._state_variable)
        self.built = True

    def get_build_config(self):
        return {"layer_build_config": self.layer.get_build_config()}

    def build_from_config(self, config):
        inner = (config or {}).get("layer_build_config")
        if inner and not self.layer.built:
            self.layer.build_from_config(inner)
        if self.layer.built and not self.built:
            self.build(None)

    def _state_variable(self, name, shape, dtype, initializer):
        return self.add_weight(name=name, shape=shape, dtype=dtype, initializer=initializer,
                               trainable=False, aggregation="only_first_replica")

    def apply_masks(self) -> None:
        """Zeroes every sparsified weight where its mask is False."""
        self._sparse_state.apply_masks()

    def set_weights(self, weights):
        """Keras's ``set_weights``, after every value is checked (`check_weight_list`):
        a refused value (another shape, a mask that is not 0/1 or breaks the pattern)
        raises before any weight is written."""
        weights = list(weights)
        if len(weights) == len(self.weights):  # (else Keras names the lengths)
            weights = check_weight_list([self._sparse_state], self.weights, weights,
                                        f"SparseWrapper '{self.name}'")
        super().set_weights(weights)

    def load_own_variables(self, store):
        """Loads the masks (and flags, scores); the weights the inner layer loads next
        are then zeroed where these masks are False, with a warning that counts the
        non-zero entries dropped (see `_guard_writes`).

        Raises:
          ValueError: the file holds running scores and this layer keeps none, or the
            reverse (naming `track_running_scores`); else Keras's count of entries.
        """
        state = self._sparse_state
        n, stored = len(state.masks), len(store.keys())
        tracked = state.track_running_scores
        if n and stored == n * (2 + (not tracked)):  # (masks and flags, + one score each)
            raise ValueError(
                f"SparseWrapper '{self.name}': the file {'holds no' if tracked else 'holds'} "
                f"running scores, and this layer was made with track_running_scores={tracked}"
                f"; make the model with track_running_scores={not tracked} to load it.")
        super().load_own_variables(store)
        state.mark_loading()

    # -- forward: untouched ----------------------------------------------------
    def call(self, inputs, *args, **kwargs):
        return self.layer(inputs, *args, **kwargs)

    def compute_output_shape(self, *args, **kwargs):
        return self.layer.compute_output_shape(*args, **kwargs)

    def compute_output_spec(self, *args, **kwargs):
        return self.layer.compute_output_spec(*args, **kwargs)

    def compute_mask(self, inputs, previous_mask=None):
        if hasattr(self.layer, "compute_mask"):
            return self.layer.compute_mask(inputs, previous_mask)
        return previous_mask

    @property
    def reset_state(self):
        """The wrapped layer's ``reset_state`` (a stateful RNN's, ``Bidirectional``'s): code
        that resets a model's states layer by layer (``for layer in model.layers: if
        hasattr(layer, "reset_state"): layer.reset_state()``, as Keras's RNN documents)
        reaches it through the wrapper. An AttributeError where the layer has none."""
        return self._wrapped_method("reset_state")

    @property
    def reset_states(self):
        """The wrapped layer's ``reset_states`` (Keras's older name), as `reset_state`."""
        return self._wrapped_method("reset_states")

    def _wrapped_method(self, name):
        method = getattr(self.layer, name, None)
        if method is None:
            raise AttributeError(f"SparseWrapper '{self.name}': its layer '{self.layer.name}' "
                                 f"({type(self.layer).__name__}) has no '{name}'.")
        return method

    # -- config -----------------------------------------------------------------
    def get_config(self):
        state = self._sparse_state  # (a file it could not load)
        check_maskable(self.layer, f"SparseWrapper '{self.name}'",
                       state.sparse_weights if state.created else None)
        config = super().get_config()
        config.update(state.get_config())
        return config


# -- masks attached to a layer in place ------------------------------------------------
#
# A subclassed or library model cannot be rebuilt with wrappers, but its layers can
# carry the same `SparseState`: `attach` creates it on the layer as it is (the
# forward pass stays the layer's own call). Its variables belong to no layer; Keras
# writes and reads them with the layer's own entry of a weights file (``model.save``,
# ``save_weights``, ``load_weights``, `BackupAndRestore`), under keys that start with
# ``keras_dst_`` next to the layer's own ``0``, ``1``, ... Keras's plain loader, given
# such an entry for a layer without masks, refuses it (the layer expected fewer
# variables); `keras_dst.load_model` attaches the masks first (`attaching_saved_masks`).

_ATTACHED = "_keras_dst_sparse_state"
_KEY_PREFIX = "keras_dst_"
_CONFIG_KEY = "keras_dst_config"


def is_state_entry(key) -> bool:
    """Whether `key`, an entry of a layer's store in a weights file, is keras_dst's (an
    attached mask, flags, running score or their config), not the layer's own."""
    return str(key).startswith(_KEY_PREFIX)


def holds_state(store) -> bool:
    """Whether a layer's store in a weights file holds keras_dst's entries (attached masks)."""
    return _CONFIG_KEY in store
_FORMAT = 1


def attached_state(layer):
    """The `SparseState` attached to `layer` in place, or None."""
    return layer.__dict__.get(_ATTACHED)


def check_not_sparse(layer) -> None:
    """Raises ValueError naming `layer` where it is a `SparseWrapper` or has masks attached
    (a layer is made prunable once)."""
    if isinstance(layer, SparseWrapper) or attached_state(layer) is not None:
        raise ValueError(f"Layer '{layer_label(layer)}' is already prunable (a SparseWrapper "
                         "or a layer with masks attached).")


def attach(layer, density=None, init="exact", seed=None, track_running_scores=False,
           pattern="unstructured", keep_dense=False) -> SparseState:
    """Attaches masks to a built layer in place (no wrapper, no change to its call).

    Arguments as `SparseWrapper`. The layer's weights are zeroed where the initial
    masks are False. Returns the new `SparseState`.

    Raises:
      ValueError: the layer is not built or is already prunable; bad arguments.
      TypeError: the layer is not supported.
    """
    check_not_sparse(layer)
    if not is_supported(layer):
        prunable_weights(layer)  # raises the TypeError that names the layer
    if not layer.built:
        raise ValueError(f"Layer '{layer_label(layer)}' is not built; call the model on a batch "
                         "(or build it) before making it prunable.")
    state = SparseState(layer, density=density, init=init, seed=seed,
                        track_running_scores=track_running_scores, pattern=pattern,
                        keep_dense=keep_dense)
    scope = [keras.name_scope(part) for part in layer_label(layer).split("/") if part]

    def make_variable(name, shape, dtype, initializer):
        with contextlib.ExitStack() as stack:
            for s in scope:
                stack.enter_context(s)
            return keras.Variable(initializer=initializer, shape=shape, dtype=dtype,
                                  trainable=False, name=name, aggregation="only_first_replica")

    state.create(make_variable)
    layer.__dict__[_ATTACHED] = state
    save_class, load_class = _class_own_variables_io(layer)

    def save_own_variables(store):
        check_maskable(layer, "keras_dst (saving)", state.sparse_weights)
        save_class(store)
        for key, value in _store_entries(state):
            store[key] = value

    def load_own_variables(store):
        _load_entries(state, store)
        state.mark_loading()
        load_class(_KerasEntries(store))

    compat.set_own_variables_io(layer, save=save_own_variables, load=load_own_variables)
    return state


def detach(layer):
    """Removes the masks attached to `layer`, leaving its weights ⊙ masks (strip in place)."""
    state = attached_state(layer)
    if state is None:
        return None
    state.release()
    compat.set_own_variables_io(layer)
    del layer.__dict__[_ATTACHED]
    return state


def _class_own_variables_io(layer):
    cls = type(layer)
    return (lambda store: cls.save_own_variables(layer, store),
            lambda store: cls.load_own_variables(layer, store))


def _store_entries(state):
    entries = []
    for i in range(len(state.masks)):
        entries += [(f"{_KEY_PREFIX}{i}_mask", state.masks[i]),
                    (f"{_KEY_PREFIX}{i}_ever_active", state.ever_active[i])]
        if state.running_scores:
            entries.append((f"{_KEY_PREFIX}{i}_running_score", state.running_scores[i]))
    config = dict(state.get_config(), format=_FORMAT, layer=state.label,
                  layer_class=type(state.layer).__name__,
                  weights=[w.name for w in state.sparse_weights],
                  shapes=[list(w.shape) for w in state.sparse_weights])
    entries.append((_CONFIG_KEY, np.frombuffer(json.dumps(config).encode("utf-8"), np.uint8)))
    return entries


def read_store_config(store):
    """The keras_dst config of a layer's entry in a weights file, or None."""
    if not holds_state(store):
        return None
    config = json.loads(np.asarray(store[_CONFIG_KEY], dtype=np.uint8).tobytes().decode("utf-8"))
    if config.get("format") != _FORMAT:
        raise ValueError(f"keras_dst: the masks saved for layer '{config.get('layer')}' are in "
                         f"format {config.get('format')!r}; this keras_dst reads format {_FORMAT}.")
    return config


def _load_entries(state, store):
    """Writes the masks (flags, scores) a layer's entry holds into `state`; an entry
    without them (dense weights) leaves the masks as they are."""
    config = read_store_config(store)
    if config is None:
        return
    shapes = [list(w.shape) for w in state.sparse_weights]
    if config["shapes"] != shapes or bool(config["track_running_scores"]) \
            != state.track_running_scores:
        raise ValueError(
            f"{state.owner}: the file holds masks for weights of shapes {config['shapes']} "
            f"(track_running_scores={config['track_running_scores']}), the layer has "
            f"{shapes} (track_running_scores={state.track_running_scores}).")
    for i in range(len(state.masks)):
        state.masks[i].assign(np.asarray(store[f"{_KEY_PREFIX}{i}_mask"], dtype=bool))
        state.ever_active[i].assign(np.asarray(store[f"{_KEY_PREFIX}{i}_ever_active"], dtype=bool))
        if state.running_scores:
            state.running_scores[i].assign(np.asarray(store[f"{_KEY_PREFIX}{i}_running_score"]))


class _KerasEntries:
    """A layer's entry of a weights file without keras_dst's keys: what the layer's own
    `load_own_variables` expects (it checks the number of entries)."""

    def __init__(self, store):
        self._store = store

    def keys(self):
        return [k for k in self._store.keys() if not is_state_entry(k)]

    def __len__(self):
        return len(self.keys())

    def __iter__(self):
        return iter(self.keys())

    def __contains__(self, key):
        return not is_state_entry(key) and key in self._store

    def __getitem__(self, key):
        if is_state_entry(key):
            raise KeyError(key)
        return self._store[key]

    def get(self, key, default=None):
        return self[key] if key in self else default

    def items(self):
        return [(k, self._store[k]) for k in self.keys()]

    def values(self):
        return [self._store[k] for k in self.keys()]


@contextlib.contextmanager
def attaching_saved_masks(model):
    """Inside, loading weights into `model` attaches the masks the file holds to each
    supported layer that has none yet (what `keras_dst.load_model` does after Keras
    rebuilt a model whose masks were attached in place). Yields the list of the
    states attached."""
    attached, hooked = [], []
    for layer in compat.flatten_layers(model, include_self=True):
        if isinstance(layer, SparseWrapper) or attached_state(layer) is not None \
                or not layer.built or not is_supported(layer):
            continue

        def load(store, layer=layer):
            config = read_store_config(store)
            if config is None:
                return type(layer).load_own_variables(layer, store)
            state = attach(layer, density=config["density"], init=config["init"],
                           seed=config["seed"],
                           track_running_scores=config["track_running_scores"],
                           pattern=config["pattern"], keep_dense=config.get("keep_dense", False))
            attached.append(state)
            return layer.load_own_variables(store)  # the hook `attach` installed

        compat.set_own_variables_io(layer, load=load)
        hooked.append((layer, load))
    try:
        yield attached
    finally:
        for layer, load in hooked:
            if layer.__dict__.get("load_own_variables") is load:
                compat.set_own_variables_io(layer)


def _zero_initial_value(variable, initial_mask, keep_raw=False):
    """Zeroes `variable` where `initial_mask` is False, now or at its deferred init.

    Inside a stateless scope (the symbolic build Keras runs for subclassed
    models) variables are initialised later from their initializer, so the
    masking is folded into that initializer; otherwise it is written eagerly.
    With `keep_raw`, returns the value written over (None when deferred or not asked).
    """
    def masked(pending):
        def initializer(shape, dtype=None):
            value = pending(shape, dtype=dtype)
            return tf.where(initial_mask(shape), value, tf.zeros_like(value))
        return initializer

    if compat.wrap_deferred_initializer(variable, masked):
        return None
    with tf.init_scope():
        raw = tf.identity(variable.value) if keep_raw else None
        variable.assign(tf.where(initial_mask(variable.shape), variable,
                                 tf.zeros_like(variable)))
    return raw


def check_mask_array(array: np.ndarray, where: str, after: str = "") -> None:
    """Raises unless `array` can be a mask (or ever-active flags): bools, or numbers that
    are all 0 or 1. `where` starts the message (what was written, and where), `after`
    ends it.

    Raises:
      TypeError: `array` holds neither bools nor numbers (strings, objects).
      ValueError: it holds numbers other than 0 and 1 (NaN included), up to three named.
    """
    if array.dtype.kind not in "biuf":
        raise TypeError(f"{where} holds values of dtype {array.dtype}; a mask holds bools "
                        f"or 0/1{after}.")
    bad = non_binary_values(array)
    if bad:  # a bool variable would read any of them as True
        raise ValueError(f"{where} holds values other than 0/1 (e.g. "
                         f"{', '.join(map(str, bad))}){after}.")


def non_binary_values(array: np.ndarray) -> list:
    """Up to three distinct values of `array` other than 0 and 1 (NaN included), sorted:
    what makes it no mask (empty for a bool array or one of 0/1 only)."""
    if array.dtype == bool:
        return []
    bad = array[~np.isin(array, (0, 1))]
    return sorted({float(v) if np.isfinite(v) else repr(float(v)) for v in bad.ravel()[:1000]},
                  key=str)[:3]


def masked_nonzeros(value, mask) -> tf.Tensor:
    """Number of non-zero entries of `value` where the bool `mask` is False (int64 scalar):
    what a weight computes with beyond its mask."""
    return tf.math.count_nonzero(tf.logical_and(tf.logical_not(mask), tf.not_equal(value, 0)))


def _same_bits(a, b) -> bool:
    """Whether two float (or bool) tensors of one shape and dtype hold the same bits
    (NaNs too)."""
    if a.dtype == tf.bool:
        return bool(tf.reduce_all(tf.equal(a, b)))
    ints = {2: tf.int16, 4: tf.int32, 8: tf.int64}[a.dtype.size]
    return bool(tf.reduce_all(tf.equal(tf.bitcast(a, ints), tf.bitcast(b, ints))))


_eager_topology_writes = 0


def eager_topology_writes() -> int:
    """How many eager writes of masks or ever-active flags were made in this process
    (`set_masks`, ``set_weights``, a load or restore; the DST updates inside a compiled
    training step are not counted, those of a ``run_eagerly=True`` fit are): a
    callback's logs re-read the masks when it has changed."""
    return _eager_topology_writes


def _guard_writes(variable, mask, flags, state, pattern):
    """Makes every eager write of `variable` or `mask` keep the weight's zeros where the
    mask is False; eager writes of the mask and of its ever-active `flags` take 0/1 values
    only.

    Keras writes weights outside the optimizer with ``variable.assign`` (eager):
    ``load_model``, ``load_weights`` (and so ``BackupAndRestore``),
    ``set_weights``, a user's own ``assign``; the optimizer's EMA overwrite at the
    end of `fit` writes the `tf.Variable` behind the weight directly
    (`compat.on_raw_variables`). Instance-level ``assign`` methods on the weight,
    on the `tf.Variable`s holding it, and on its mask mask the value there, so no
    such write can make the model compute densely while its masks say otherwise.
    Eager writes of the mask or of its flags keep the flags True wherever the mask is
    (an active entry was ever active, whatever the flags a file or list held); flags
    written before their mask (a bulk write or a restore in either order) keep their
    raw value for that mask write, as a weight does, unless the weight was written or
    trained in between (the mask they were joined with was in use).
    Writes traced into a compiled function (the optimizer's update, the DST
    engine) pass through untouched: there the `MaskConstraint` already runs, and
    the compiled step stays the dense one.

    A bulk write may set the weight before its mask (``model.set_weights`` lists
    a wrapper's kernel before its mask): a weight write that drops non-zeros
    under the current mask keeps its raw value for the next eager mask write,
    which then applies the new mask to it, unless the weight changed since
    (a training step, another write: the raw value is stale then, and the mask
    applies to the weight as it is; `SparseWrapper.apply_masks` drops it).

    An eager mask write that breaks the weight's `pattern` (a file or `set_weights`
    of a model made with another pattern) raises ValueError before the mask changes.

    `tf.train.Checkpoint` restores are such writes too (`compat.on_checkpoint_restore`).

    A write during a load (flagged by `SparseState.mark_loading`, which the wrapper's
    or the attached layer's `load_own_variables` calls once the masks are loaded and
    before the weights are) that holds non-zeros at masked entries warns with their
    count; ``set_weights`` (e.g. a warm start from dense weights) masks silently, as
    documented.
    """
    assign_weight, assign_mask, assign_flags = \
        type(variable).assign, type(mask).assign, type(flags).assign
    pending = state._pending_writes

    def checked(value, dtype):
        """`value` as a tensor of `dtype`, refused unless it has the weight's shape (as
        Keras refuses it; the masking below would broadcast or fail in TensorFlow)."""
        value = tf.cast(tf.convert_to_tensor(value), dtype)
        if value.shape != variable.shape:
            raise ValueError(f"{state.owner}: the value written to '{variable.path}' has shape "
                             f"{tuple(value.shape)}, the weight {tuple(variable.shape)}; it "
                             "was left as it was.")
        return value

    def _unwritten(target):
        """The value last written to `target` (the weight or the flags) before the mask
        changed it, if nothing it was kept with changed since (`keep_raw_value`); else
        its value."""
        raw, watched = pending.pop(id(target), (None, ()))
        if raw is None or not all(_same_bits(v.value, snapshot) for v, snapshot in watched):
            return target.value  # no raw value, or a stale one: a variable changed since
        return raw

    def guarded_weight_assign(value):
        if not tf.executing_eagerly():
            return assign_weight(variable, value)
        value = checked(value, variable.dtype)
        dropped = int(masked_nonzeros(value, mask))
        if variable.__dict__.pop("_keras_dst_loading", False) and dropped:
            user_warnings.warn(
                f"{state.owner}: the loaded '{variable.path}' holds "
                f"{dropped} non-zero entries where its mask is 0; they were set to 0 "
                "(the mask wins; use keras_dst.set_masks to change the topology).")
        written = tf.where(mask, value, tf.zeros_like(value))
        pending.pop(id(variable), None)
        pending.pop(id(flags), None)  # (flags written before: joined with the mask in use)
        result = assign_weight(variable, written)
        if dropped:
            state.keep_raw_value(variable, value)
        return result

    def guarded_mask_assign(value):
        global _eager_topology_writes
        if tf.executing_eagerly():
            _check_mask_value(state, variable, pattern, value)
        result = assign_mask(mask, value)
        if tf.executing_eagerly():
            _eager_topology_writes += 1
            assign_flags(flags, tf.logical_or(_unwritten(flags), mask))
            raw = _unwritten(variable)
            assign_weight(variable, tf.where(mask, raw, tf.zeros_like(raw)))
        return result

    def guard_raw(raw):  # eager writes of the tf.Variable itself, past `variable.assign`
        assign_raw = type(raw).assign

        def guarded_raw_assign(value, *args, **kwargs):
            if tf.executing_eagerly():
                value = checked(value, raw.dtype)
                value = tf.where(tf.convert_to_tensor(mask), value, tf.zeros_like(value))
            return assign_raw(raw, value, *args, **kwargs)

        raw.assign = guarded_raw_assign

    def guarded_flags_assign(value):
        global _eager_topology_writes
        if not tf.executing_eagerly():  # (the DST update)
            return assign_flags(flags, value)
        array = _check_flags_value(state, variable, value).astype(bool)
        written = np.logical_or(array, mask.numpy())
        pending.pop(id(flags), None)
        result = assign_flags(flags, written)
        _eager_topology_writes += 1
        if not np.array_equal(array, written):
            # for a mask written next in the same load or restore: not once the weight is
            # written or trained (`mask` was in use since)
            state.keep_raw_value(flags, array, watched=[variable])
        return result

    variable.assign = guarded_weight_assign
    mask.assign = guarded_mask_assign
    flags.assign = guarded_flags_assign
    compat.on_raw_variables(variable, guard_raw)
    # A checkpoint restore (`tf.train.Checkpoint`) writes the weight, the mask and the
    # flags, in no set order, through their `tf.Variable`s' handles: route them through
    # the writes above, which keep the raw weight for a mask written after it.
    for target in (variable, mask, flags):
        compat.on_checkpoint_restore(target, target.assign)


def check_weight_list(states, variables, values, owner: str) -> list:
    """Checks the values ``set_weights`` writes to `variables` one by one, all before any
    is written, and returns them as arrays (what it then writes).

    Refused as Keras would refuse it only as it comes, after writing those before it: a
    value that is not numbers or bools (strings, objects, ragged nested lists), a value of
    another shape than its variable, and a value the write guard of one of `states`
    refuses (`SparseState.check_write`). `owner` names the model or layer.

    Raises:
      TypeError: a value is not numbers or bools.
      ValueError: another shape, or a refused mask or ever-active flags.
    """
    by_variable = {id(v): state for state in states for v in state.masks + state.ever_active}
    arrays = []
    for variable, value in zip(variables, values):
        where = f"{owner}.set_weights(): the value for '{variable.path}'"
        try:
            array = np.asarray(value)
        except (TypeError, ValueError) as e:  # (ragged nested lists)
            raise TypeError(f"{where} is not an array ({e}); no weight was written.") from None
        if array.dtype.kind in "OSUMm":
            raise TypeError(f"{where} holds values of dtype {array.dtype}, not numbers; no "
                            "weight was written.")
        if array.shape != tuple(variable.shape):
            raise ValueError(f"{where} has shape {array.shape}, the weight "
                             f"{tuple(variable.shape)}; no weight was written.")
        state = by_variable.get(id(variable))
        if state is not None:
            state.check_write(variable, array)
        arrays.append(array)
    return arrays


def _check_mask_value(state, variable, pattern, value):
    """Raises unless `value` can be the mask of the weight `variable`: 0/1 values
    (`check_mask_array`) that keep its `pattern`."""
    array = np.asarray(value)
    check_mask_array(array, f"{state.owner}: the mask written to '{variable.path}'",
                     "; it was left as it was")
    problem = None if pattern.kind == "unstructured" else \
        patterns.violation(pattern, array.astype(bool))
    if problem is not None:  # (a mask of a model made with another pattern)
        raise ValueError(
            f"{state.owner}: the mask written to '{variable.path}' breaks its "
            f"{problem}; it was left as it was. Write masks of this pattern "
            "(e.g. load weights saved by a model made prunable the same way).")


def _check_flags_value(state, variable, value) -> np.ndarray:
    """`value` as an array, refused unless it can be the ever-active flags of the weight
    `variable`: 0/1 values of its shape."""
    array = np.asarray(value)
    check_mask_array(array, f"{state.owner}: the ever-active flags written to "
                            f"'{variable.path}'", "; they were left as they were")
    if array.shape != tuple(variable.shape):
        raise ValueError(f"{state.owner}: the ever-active flags written to "
                         f"'{variable.path}' have shape {array.shape}, the weight "
                         f"{tuple(variable.shape)}; they were left as they were.")
    return array


def _original_constraint(variable):
    c = variable.constraint
    while isinstance(c, MaskConstraint):
        c = c.previous
    return c
