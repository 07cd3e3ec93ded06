"""`prunable()` makes a model (or a layer) sparse; `strip()` makes it plain again."""

import keras
import numpy as np

from keras_dst import compat, distributions, patterns
from keras_dst import layers as sparse_layers
from keras_dst.layers import SparseWrapper
from keras_dst.masks import sparse_wrappers
from keras_dst.validation import check_choice, check_density, check_seed


def prunable(obj, density=None, distribution="erk", *, keep_dense=(), density_overrides=None,
             init="exact", seed=0, skip_unsupported=False, track_running_scores=False,
             pattern="unstructured", pattern_overrides=None):
    """Returns a sparse version of a Keras model or layer.

    Args:
      obj: a Sequential or functional `keras.Model` (built), or a single
        `keras.layers.Layer`. A model gives a new model with the same graph, its
        supported layers wrapped in `SparseWrapper` (weights copied, then zeroed
        where the mask is 0); nested Sequential/functional models are converted
        too. A layer gives `SparseWrapper(layer)`: use it to build subclassed
        models sparse. Subclassed models themselves cannot be rebuilt: a
        `TypeError` says so.
      density: the global target density D in (0, 1] over all sparsified weights.
        For a single layer, that layer's density.
      distribution: how D is spread over layers: ``"erk"`` (default, the
        reference), ``"er"``, ``"uniform"``, another registered name, or a dict
        ``{layer name: density}`` naming every sparsified layer.
      keep_dense: names of layers kept fully dense (density 1; their masks exist
        but are all ones; a DST update can still reset their lowest-score weights,
        as in the reference).
      density_overrides: ``{layer name: density}`` imposed on those layers; the
        others share the rest of the budget.
      init: ``"exact"`` (default): exactly ``round(d_l n_l)`` active entries per
        weight, with counts summing to ``round(D N)``; ``"bernoulli"``: the
        reference's i.i.d. draw (counts exact in expectation only).
      seed: int; masks are a pure function of (seed, weight index).
      skip_unsupported: leave layers with weights that keras_dst cannot sparsify
        dense instead of raising a `TypeError`.
      track_running_scores: keep a running score per weight entry in each wrapper
        (needed by the running criteria, e.g. ``running_magnitude``).
      pattern: the sparsity pattern of every sparsified weight (see
        `keras_dst.patterns`): ``"unstructured"`` (default), ``"1xB"`` (e.g.
        ``"1x4"``: blocks of B consecutive entries along the kernel's input axis,
        the axis before the last), ``"N:M"`` (e.g. ``"2:4"``: exactly N active
        in every M consecutive input-axis entries; the layer's density is then
        N/M, fixed outside the distribution) or ``"fan_in"`` (every output unit
        has the same number of active inputs; the distribution still sets each
        layer's density). Kept through every DST update.
      pattern_overrides: ``{layer name: pattern}`` for layers that need another
        pattern (e.g. ``"unstructured"`` for a layer whose input axis is not a
        multiple of B).

    Returns:
      The sparse model (a new object; `obj` is left untouched) or wrapper layer.

    Raises:
      TypeError: wrong argument types, unsupported layer (names it and its class),
        subclassed model.
      ValueError: density outside (0, 1], unknown distribution or layer name,
        infeasible overrides, a model that is already prunable, an unbuilt model,
        a pattern a layer's shape cannot take (names the layer and the remedy),
        an N:M pattern with another density.
    """
    pattern = patterns.parse(pattern)
    if pattern.kind == "nm":  # N:M fixes the density of every layer it applies to
        density = patterns.check_density(pattern, density, "prunable(pattern=...)")
    if density is None:
        raise ValueError("prunable() needs a density in (0, 1], e.g. density=0.1.")
    density = check_density(density)
    check_choice(init, ("exact", "bernoulli"), "init")
    seed = check_seed(seed)
    if isinstance(obj, keras.Model):
        return _prunable_model(obj, density, distribution, keep_dense, density_overrides,
                               init, seed, skip_unsupported, track_running_scores,
                               pattern, pattern_overrides)
    if isinstance(obj, keras.layers.Layer):
        if isinstance(obj, SparseWrapper):
            raise ValueError(f"Layer '{obj.name}' is already prunable (a SparseWrapper).")
        if pattern_overrides:
            raise ValueError("prunable(layer): pattern_overrides applies to models; pass "
                             "the layer's pattern as pattern=.")
        wrapper = SparseWrapper(obj, density=density, init=init,
                                seed=distributions.stable_seed(seed, obj.name),
                                track_running_scores=track_running_scores,
                                pattern=str(pattern))
        if obj.built:
            wrapper.build(None)  # masks for the existing weights, which are kept
        return wrapper
    raise TypeError(f"prunable() takes a keras Model or Layer, got {type(obj).__name__}.")


def _walk(model):
    """Every leaf layer of a graph model, recursing into nested graph models."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            if not compat.is_graph_model(layer):
                raise TypeError(
                    f"prunable() cannot rebuild the subclassed model '{layer.name}' "
                    f"({type(layer).__name__}) nested in '{model.name}': build its layers "
                    "with keras_dst.prunable(layer) in its __init__ instead.")
            yield from _walk(layer)
        else:
            yield layer


def _prunable_model(model, density, distribution, keep_dense, density_overrides, init, seed,
                    skip_unsupported, track_running_scores, pattern, pattern_overrides):
    if not compat.is_graph_model(model):
        raise TypeError(
            f"prunable() cannot rebuild the subclassed model '{model.name}' "
            f"({type(model).__name__}); create its layers with keras_dst.prunable(layer) "
            "in __init__ (it then trains sparse with model.fit as is).")
    if not model.built:
        raise ValueError(f"prunable(): model '{model.name}' is not built; give it an Input "
                         "or call model.build(input_shape) first.")
    if sparse_wrappers(model):
        raise ValueError(f"prunable(): model '{model.name}' is already prunable "
                         "(it contains SparseWrapper layers).")

    # 1. Decide, before changing anything, which layers get wrapped.
    to_wrap = {}  # id(layer) -> (layer, weights)
    for layer in _walk(model):
        if sparse_layers.needs_no_wrapping(layer):
            continue
        if not sparse_layers.is_supported(layer):
            if skip_unsupported:
                continue
            sparse_layers.prunable_weights(layer)  # raises TypeError naming the layer
        weights = sparse_layers.prunable_weights(layer)
        if weights:
            to_wrap[id(layer)] = (layer, weights)
    if not to_wrap:
        raise ValueError(f"prunable(): model '{model.name}' has no layer with prunable weights.")

    # 2. Per-weight densities, keyed by weight path, from the distribution.
    shapes, owner = {}, {}
    for layer, weights in to_wrap.values():
        for w in weights:
            shapes[w.path] = tuple(w.shape)
            owner[w.path] = layer.name
    layer_names = {layer.name for layer, _ in to_wrap.values()}
    fixed = {}
    for name, value in _named_overrides(keep_dense, density_overrides, layer_names):
        fixed.update({p: value for p, o in owner.items() if o == name})
    weight_patterns = _weight_patterns(pattern, pattern_overrides, keep_dense, owner, shapes,
                                       init, layer_names)
    for path, p in weight_patterns.items():  # N:M: the density is N/M
        if p.kind == "nm":
            if path in fixed:
                patterns.check_density(p, fixed[path], f"layer '{owner[path]}'")
            fixed[path] = p.n / p.m
    if isinstance(distribution, dict):
        unknown = set(distribution) - layer_names
        if unknown:
            raise ValueError(f"prunable(): distribution names unknown layers {sorted(unknown)}; "
                             f"sparsified layers are {sorted(layer_names)}.")
        distribution = {p: check_density(distribution[o], f"distribution['{o}']")
                        for p, o in owner.items() if o in distribution} | {
                            p: None for p, o in owner.items() if o not in distribution}
        missing = sorted({owner[p] for p, v in distribution.items() if v is None})
        if missing:
            raise ValueError(f"prunable(): the distribution dict must name every sparsified "
                             f"layer; missing {missing}.")
    densities = distributions.layer_densities(shapes, density, distribution, fixed=fixed)
    if init == "exact":
        counts = distributions.active_counts(shapes, densities)
        for path, p in weight_patterns.items():  # a pattern's counts come in its units
            if p.kind != "unstructured":
                counts[path] = patterns.active_count(p, shapes[path], densities[path])
        densities = {p: (counts[p] / int(np.prod(s)) if np.prod(s) else 1.0)
                     for p, s in shapes.items()}

    # 3. Clone with wrappers and copy the weights over.
    def clone(layer, index):
        if id(layer) not in to_wrap:
            return layer.__class__.from_config(layer.get_config()), layer
        _, weights = to_wrap[id(layer)]
        inner = layer.__class__.from_config(layer.get_config())
        inner.build_from_config(layer.get_build_config())
        new = SparseWrapper(inner, density=[densities[w.path] for w in weights],
                            init=init, seed=distributions.stable_seed(seed, index),
                            track_running_scores=track_running_scores,
                            pattern=[str(weight_patterns[w.path]) for w in weights])
        return new, layer

    return _clone_graph(model, clone)


def _clone_graph(model, clone):
    """Clones a Sequential/functional model layer by layer and copies the weights.

    Args:
      model: the model to clone (nested Sequential/functional models included).
      clone: ``clone(layer, index) -> (new_layer, source)``; `index` counts the
        layers cloned so far; `source` is the layer whose weights `new_layer` (or,
        for a `SparseWrapper`, its inner layer) receives; a `SparseWrapper` source
        gives its inner layer's weights with every sparsified one multiplied by
        its mask. A new `SparseWrapper` then zeroes its inactive weights.

    The layers are the caller's own objects in memory, so they are re-created
    outside Keras's safe mode (a `Lambda` holding a Python function clones too).
    """
    sources = {}

    def clone_function(layer):
        new, source = clone(layer, len(sources))
        sources[id(new)] = source
        return new

    with compat.safe_mode_scope(False):
        cloned = keras.models.clone_model(model, clone_function=clone_function, recursive=True)
    for layer in compat.flatten_layers(cloned):
        source = sources.get(id(layer))
        if source is None:
            continue
        target = layer.layer if isinstance(layer, SparseWrapper) else layer
        if isinstance(source, SparseWrapper):  # strip(): the inner weights, kernel ⊙ mask
            masks = {id(w): m for w, m in zip(source.sparse_weights, source.masks)}
            target.set_weights([
                np.where(masks[id(w)].numpy(), w.numpy(), 0) if id(w) in masks else w.numpy()
                for w in source.layer.weights])
        elif source.weights:
            target.set_weights(source.get_weights())
        if isinstance(layer, SparseWrapper):
            layer.apply_masks()
    return cloned


def _weight_patterns(pattern, pattern_overrides, keep_dense, owner, shapes, init, layer_names):
    """{weight path: Pattern}, checked against every weight's shape before anything changes.

    Layers in `keep_dense` are unstructured (all ones).
    """
    if pattern_overrides is None:
        pattern_overrides = {}
    if not isinstance(pattern_overrides, dict):
        raise TypeError("pattern_overrides must be a dict {layer name: pattern}, got "
                        f"{type(pattern_overrides).__name__}.")
    unknown = sorted(set(pattern_overrides) - layer_names)
    if unknown:
        raise ValueError(f"prunable(): unknown layer names {unknown} in pattern_overrides; "
                         f"sparsified layers are {sorted(layer_names)}.")
    per_layer = {name: patterns.parse(p) for name, p in pattern_overrides.items()}
    dense = {keep_dense} if isinstance(keep_dense, str) else set(keep_dense)
    result = {}
    for path, layer in owner.items():
        p = patterns.UNSTRUCTURED if layer in dense else per_layer.get(layer, pattern)
        patterns.check(p, shapes[path], f"layer '{layer}' (weight '{path}')")
        if p.kind != "unstructured" and init != "exact":
            raise ValueError(f"prunable(): pattern '{p}' of layer '{layer}' needs "
                             f"init='exact', got init={init!r}.")
        result[path] = p
    return result


def _named_overrides(keep_dense, density_overrides, layer_names):
    if isinstance(keep_dense, str):
        keep_dense = (keep_dense,)
    overrides = [(name, 1.0) for name in keep_dense]
    if density_overrides is not None:
        if not isinstance(density_overrides, dict):
            raise TypeError("density_overrides must be a dict {layer name: density}, got "
                            f"{type(density_overrides).__name__}.")
        overrides += [(n, check_density(d, f"density_overrides['{n}']"))
                      for n, d in density_overrides.items()]
    unknown = sorted({n for n, _ in overrides} - layer_names)
    if unknown:
        raise ValueError(f"prunable(): unknown layer names {unknown} in keep_dense/"
                         f"density_overrides; sparsified layers are {sorted(layer_names)}.")
    return overrides


def strip(model):
    """An ordinary Keras model with the same graph and weights, without wrappers.

    Every sparsified weight is copied multiplied by its mask (kernel ⊙ mask), so
    the stripped model computes exactly what the masks say, also if a write
    keras_dst cannot see left non-zeros at masked entries. Needs a Sequential or
    functional model; a bare `SparseWrapper` gives its inner layer (after
    zeroing its masked entries in place).
    """
    if isinstance(model, SparseWrapper):
        model.apply_masks()
        return model.layer
    if not isinstance(model, keras.Model) or not compat.is_graph_model(model):
        raise TypeError(f"strip() needs a Sequential or functional model, got "
                        f"{type(model).__name__}.")

    def clone(layer, index):
        inner = layer.layer if isinstance(layer, SparseWrapper) else layer
        return inner.__class__.from_config(inner.get_config()), layer

    return _clone_graph(model, clone)
