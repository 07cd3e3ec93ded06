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
  SeparableConv, ``embeddings`` of Embedding, and the ``kernel`` of every
  projection inside MultiHeadAttention. `register_prunable_layer` adds a class.
* biases, normalisation parameters and non-trainable statistics are never
  sparsified.
"""

import warnings
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf

from keras_dst import compat, distributions, patterns, validation
from keras_dst.registry import Registry
from keras_dst.validation import check_choice, check_density

_PRUNABLE_LAYERS = Registry("prunable layer class")  # class -> tuple of weight names

# Layers whose weights stay dense by design (normalisation, etc.).
_DENSE_BY_DESIGN = (
    keras.layers.BatchNormalization,
    keras.layers.LayerNormalization,
    keras.layers.GroupNormalization,
    keras.layers.UnitNormalization,
    keras.layers.Normalization,
)


def register_prunable_layer(layer_class, weight_names: Sequence[str], overwrite: bool = False):
    """Declares which weights of `layer_class` (and subclasses) are prunable.

    A subclass uses the registration of its nearest registered class in its
    method resolution order.

    Args:
      layer_class: a `keras.layers.Layer` subclass.
      weight_names: names of the variables to sparsify (`variable.name`, e.g.
        ``("kernel",)``). Variables of nested sub-layers with these names count.
      overwrite: replace an existing registration of `layer_class`.

    Raises:
      TypeError: `layer_class` is not a Layer subclass.
      ValueError: `weight_names` is empty or a single string, or
        `layer_class` is already registered and `overwrite` is False.
    """
    if not (isinstance(layer_class, type) and issubclass(layer_class, keras.layers.Layer)):
        raise TypeError(
            f"register_prunable_layer() needs a keras Layer class, got {layer_class!r}."
        )
    if isinstance(weight_names, str) or not weight_names:
        raise ValueError(
            "register_prunable_layer() needs a non-empty sequence of weight names, "
            f"got weight_names={weight_names!r}."
        )
    _PRUNABLE_LAYERS.register(layer_class, tuple(weight_names), overwrite=overwrite)


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


def _registered_names(layer):
    for cls in type(layer).__mro__:
        if cls in _PRUNABLE_LAYERS:
            return _PRUNABLE_LAYERS.get(cls)
    return None


def is_supported(layer) -> bool:
    """True if `layer` can be wrapped (protocol method or registered class)."""
    return hasattr(layer, "get_prunable_weights") or _registered_names(layer) is not None


def needs_no_wrapping(layer) -> bool:
    """True for layers with nothing to sparsify (no weights, or dense by design)."""
    if isinstance(layer, _DENSE_BY_DESIGN):
        return True
    if isinstance(layer, keras.Model):
        return False
    return not layer.weights if layer.built else not _has_weight_creating_build(layer)


def _has_weight_creating_build(layer) -> bool:
    # An unbuilt layer of a class that never creates weights (Flatten, ReLU, ...)
    # keeps the base `Layer.build`.
    return type(layer).build is not keras.layers.Layer.build


def prunable_weights(layer) -> list:
    """The variables of a *built* `layer` that are sparsified, in a stable order.

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
            "with keras_dst.register_prunable_layer(), or pass skip_unsupported=True."
        )
    return [v for v in layer.weights if v.name in names and v.trainable]


class MaskConstraint(keras.constraints.Constraint):
    """Zeroes a weight wherever its bool mask is False (after any prior constraint).

    Installed on each sparsified variable by `SparseWrapper`; Keras optimizers call
    it right after every update. It is bound to a mask *variable*, so it is not a
    serializable object: it never appears in a layer's config (Keras layers
    serialize their own ``kernel_constraint``, which stays the user's), and the
    wrapper re-installs it when it is built. `get_config` says so.
    """

    def __init__(self, mask, previous=None):
        self.mask = mask
        self.previous = previous

    def __call__(self, w):
        if self.previous is not None:
            w = self.previous(w)
        return tf.where(self.mask, w, tf.zeros_like(w))

    def get_config(self):
        raise TypeError(
            "MaskConstraint is bound to a mask variable and is not serializable; the "
            "SparseWrapper re-creates it when it is built. Serialize the model (its "
            "SparseWrapper layers) instead.")


def _relative_name(layer, variable) -> str:
    prefix = layer.path + "/" if getattr(layer, "path", None) else ""
    path = variable.path
    rel = path[len(prefix):] if path.startswith(prefix) else variable.name
    return rel.replace("/", "_")


@keras.saving.register_keras_serializable(package="keras_dst")
class SparseWrapper(keras.layers.Wrapper):
    """Makes a Keras layer sparse: bool masks plus weights kept at exact zero.

    Args:
      layer: the layer to sparsify (built or not). Must be supported (see module
        docstring).
      density: target fraction of active entries, a float in [0, 1] for every
        prunable weight, or one float per prunable weight (in
        `prunable_weights(layer)` order). The initial active count of a weight of
        n entries is ``round(density * n)`` in ``"exact"`` init.
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
      **kwargs: base `Layer` arguments (name, ...).

    After `build`, `sparse_weights` lists the sparsified variables, `masks` their
    masks (same order, same shapes, dtype bool) and `ever_active` bool variables
    that record every entry that was ever active (for the ITOP rate). With
    `track_running_scores`, `running_scores` holds the running scores.
    """

    def __init__(self, layer, density=1.0, init="exact", seed=None, track_running_scores=False,
                 pattern="unstructured", **kwargs):
        if "track_scores" in kwargs:  # the name in configs saved by keras_dst 0.1
            track_running_scores = kwargs.pop("track_scores")
        if not isinstance(layer, keras.layers.Layer):
            raise TypeError(
                f"SparseWrapper needs a keras Layer, got {type(layer).__name__}: {layer!r}."
            )
        if isinstance(layer, SparseWrapper):
            raise ValueError(
                f"Layer '{layer.name}' is already a SparseWrapper (already prunable)."
            )
        if not is_supported(layer):
            prunable_weights(layer)  # raises the TypeError that names the layer
        check_choice(init, ("exact", "bernoulli"), "init")
        densities = [density] if np.isscalar(density) else list(density)
        for d in densities:
            check_density(d, name=f"density (layer '{layer.name}')", allow_zero=True)
        seed = validation.check_seed(seed, allow_none=True)
        pattern_list = [pattern] if isinstance(pattern, (str, patterns.Pattern)) or pattern is None \
            else list(pattern)
        parsed = [patterns.parse(p) for p in pattern_list]
        if init != "exact" and any(p.kind != "unstructured" for p in parsed):
            raise ValueError(f"SparseWrapper(layer '{layer.name}'): pattern={pattern!r} needs "
                             f"init='exact' (exact counts per block, group or unit), got "
                             f"init={init!r}.")
        if 1 in (len(parsed), len(densities)) or len(parsed) == len(densities):
            n = max(len(parsed), len(densities))  # (else `build` reports the lengths)
            for p, d in zip(parsed * n if len(parsed) == 1 else parsed,
                            densities * n if len(densities) == 1 else densities):
                patterns.check_density(p, d, f"layer '{layer.name}'")
        kwargs.setdefault("name", f"sparse_{layer.name}")
        kwargs.setdefault("dtype", layer.dtype_policy)
        super().__init__(layer, **kwargs)
        self.density = density if np.isscalar(density) else [float(d) for d in density]
        self.init = init
        self.seed = int(seed) if seed is not None else distributions.stable_seed(layer.name)
        self.track_running_scores = validation.check_bool(track_running_scores,
                                                          "track_running_scores")
        self.pattern = str(parsed[0]) if len(parsed) == 1 and not isinstance(pattern, (list, tuple)) \
            else [str(p) for p in parsed]
        self.patterns = []  # one `patterns.Pattern` per sparsified weight, after build
        self.supports_masking = getattr(layer, "supports_masking", False)
        self.sparse_weights = []
        self.masks = []
        self.ever_active = []
        self.running_scores = []
        # id(weight) -> raw value of its last eager write, while a mask write may follow
        # (see `_guard_writes`); a plain dict outside Keras's tracking.
        object.__setattr__(self, "_pending_writes", {})

    # -- building -----------------------------------------------------------
    def build(self, input_shape=None):
        if not self.layer.built:
            if input_shape is None:
                raise ValueError(
                    f"SparseWrapper '{self.name}': cannot build layer '{self.layer.name}' "
                    "without an input shape; build the layer before wrapping it.")
            self.layer.build(input_shape)
        self._create_masks()
        self.built = True

    def get_build_config(self):
        return {"layer_build_config": self.layer.get_build_config()}

    def build_from_config(self, config):
        inner = (config or {}).get("layer_build_config")
        if inner and not self.layer.built:
            self.layer.build_from_config(inner)
        if self.layer.built and not self.built:
            self.build(None)

    def _create_masks(self):
        weights = prunable_weights(self.layer)
        densities = (
            [float(self.density)] * len(weights)
            if np.isscalar(self.density)
            else list(self.density)
        )
        if len(densities) != len(weights):
            raise ValueError(
                f"SparseWrapper '{self.name}': got {len(densities)} densities for "
                f"{len(weights)} prunable weights of layer '{self.layer.name}'."
            )
        specs = [self.pattern] * len(weights) if isinstance(self.pattern, str) else self.pattern
        if len(specs) != len(weights):
            raise ValueError(
                f"SparseWrapper '{self.name}': got {len(specs)} patterns for "
                f"{len(weights)} prunable weights of layer '{self.layer.name}'.")
        self.patterns = [patterns.parse(p) for p in specs]
        for w, p, d in zip(weights, self.patterns, densities):
            where = f"layer '{self.layer.name}' weight '{w.name}'"
            patterns.check(p, tuple(w.shape), where)
            patterns.check_density(p, d, where)
        self.sparse_weights = weights
        self.masks, self.ever_active, self.running_scores = [], [], []
        for i, (w, d, p) in enumerate(zip(weights, densities, self.patterns)):
            name = _relative_name(self.layer, w)

            def initial_mask(shape, dtype=None, d=d, i=i, p=p):
                return self._initial_mask(shape, d, i, p)

            mask = self._state_variable(f"{name}_mask", w.shape, "bool", initial_mask)
            self.masks.append(mask)
            self.ever_active.append(
                self._state_variable(f"{name}_ever_active", w.shape, "bool", initial_mask))
            if self.track_running_scores:
                self.running_scores.append(self._state_variable(
                    f"{name}_running_score", w.shape, "float32", "zeros"))
            w.constraint = MaskConstraint(mask, previous=_original_constraint(w))
            _zero_initial_value(w, initial_mask)
            _guard_writes(w, mask, self)

    def _state_variable(self, name, shape, dtype, initializer):
        return self.add_weight(name=name, shape=shape, dtype=dtype, initializer=initializer,
                               trainable=False, aggregation="only_first_replica")

    def _initial_mask(self, shape, density, index, pattern):
        seed = tf.constant([self.seed % (2**31 - 1), index], dtype=tf.int32)
        if self.init == "bernoulli":
            return distributions.bernoulli_mask(shape, density, seed)
        return patterns.initial_mask(pattern, shape, density, seed)

    def apply_masks(self):
        """Zeroes every sparsified weight where its mask is False."""
        self._pending_writes.clear()
        for w, m in zip(self.sparse_weights, self.masks):
            w.assign(tf.where(m, w, tf.zeros_like(w)))

    def load_own_variables(self, store):
        """Loads the masks (and flags, scores); the weights the inner layer loads next
        are then zeroed where these masks are False, with a warning that counts the
        non-zero entries dropped (see `_guard_writes`)."""
        super().load_own_variables(store)
        for w in self.sparse_weights:
            w._keras_dst_loading = True

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

    # -- config -----------------------------------------------------------------
    def get_config(self):
        config = super().get_config()
        config.update({"density": self.density, "init": self.init, "seed": self.seed,
                       "track_running_scores": self.track_running_scores,
                       "pattern": self.pattern})
        return config


def _zero_initial_value(variable, initial_mask):
    """Zeroes `variable` where `initial_mask` is False, now or at its deferred init.

    Inside a stateless scope (the symbolic build Keras runs for subclassed
    models) variables are initialised later from their initializer, so the
    masking is folded into that initializer; otherwise it is written eagerly.
    """
    def masked(pending):
        def initializer(shape, dtype=None):
            value = pending(shape, dtype=dtype)
            return tf.where(initial_mask(shape), value, tf.zeros_like(value))
        return initializer

    if compat.wrap_deferred_initializer(variable, masked):
        return
    with tf.init_scope():
        variable.assign(tf.where(initial_mask(variable.shape), variable,
                                 tf.zeros_like(variable)))


def masked_nonzeros(value, mask) -> tf.Tensor:
    """Number of non-zero entries of `value` where the bool `mask` is False (int64 scalar):
    what a weight computes with beyond its mask."""
    return tf.math.count_nonzero(tf.logical_and(tf.logical_not(mask), tf.not_equal(value, 0)))


def _guard_writes(variable, mask, wrapper):
    """Makes every eager write of `variable` or `mask` keep the weight's zeros where the
    mask is False.

    Keras writes weights outside the optimizer with ``variable.assign`` (eager):
    ``load_model``, ``load_weights`` (and so ``BackupAndRestore``),
    ``set_weights``, a user's own ``assign``. Instance-level ``assign`` methods on
    the weight and on its mask mask the value there, so no such write can make
    the model compute densely while its masks say otherwise. Writes traced into a
    compiled function (the optimizer's update, the DST engine) pass through
    untouched: there the `MaskConstraint` already runs, and the compiled step
    stays the dense one.

    A bulk write may set the weight before its mask (``model.set_weights`` lists
    a wrapper's kernel before its mask): a weight write that drops non-zeros
    under the current mask keeps its raw value until the next eager mask write,
    which then applies the new mask to it (`SparseWrapper.apply_masks` drops it).

    A write during a load (flagged by `SparseWrapper.load_own_variables`, which
    Keras calls right before the inner layer loads its weights) that holds
    non-zeros at masked entries warns with their count; ``set_weights`` (e.g. a
    warm start from dense weights) masks silently, as documented.
    """
    assign_weight, assign_mask = type(variable).assign, type(mask).assign
    pending = wrapper._pending_writes

    def guarded_weight_assign(value):
        if not tf.executing_eagerly():
            return assign_weight(variable, value)
        value = tf.cast(tf.convert_to_tensor(value), variable.dtype)
        dropped = int(masked_nonzeros(value, mask))
        if dropped:
            pending[id(variable)] = value
        else:
            pending.pop(id(variable), None)
        if variable.__dict__.pop("_keras_dst_loading", False) and dropped:
            warnings.warn(
                f"SparseWrapper '{wrapper.name}': the loaded '{variable.path}' holds "
                f"{dropped} non-zero entries where its mask is 0; they were set to 0 "
                "(the saved mask wins; use keras_dst.set_masks to change the topology).",
                stacklevel=2)
        return assign_weight(variable, tf.where(mask, value, tf.zeros_like(value)))

    def guarded_mask_assign(value):
        result = assign_mask(mask, value)
        if tf.executing_eagerly():
            raw = pending.pop(id(variable), None)
            source = variable.value if raw is None else raw
            assign_weight(variable, tf.where(mask, source, tf.zeros_like(source)))
        return result

    variable.assign = guarded_weight_assign
    mask.assign = guarded_mask_assign


def _original_constraint(variable):
    c = variable.constraint
    while isinstance(c, MaskConstraint):
        c = c.previous
    return c
