"""`prunable()` makes a model (or a layer) sparse; `strip()` makes it plain again.

Two ways to put masks on a model, one state (`layers.SparseState`) behind both:

* a Sequential or functional model (and such models nested in it) is **cloned**,
  its supported layers wrapped in `SparseWrapper`; the given model is untouched;
* any other model — subclassed, a library's `Model` subclass (keras-hub backbones
  and tasks, even those built functionally), or a graph model with one nested in
  it — cannot be rebuilt, so its masks are **attached in place** to its own
  supported layers (`layers.attach`) and the same object is returned.
"""

import collections
from typing import Iterable, Mapping, Optional, Union

import keras
import numpy as np

from keras_dst import compat, distributions, patterns, user_warnings, validation
from keras_dst import layers as sparse_layers
from keras_dst.layers import SparseWrapper, attached_state, layer_label
from keras_dst.masks import (
    guard_weight_io,
    layer_places,
    release_weight_io,
    sparse_states,
    weight_keys,
)
from keras_dst.validation import check_bool, check_choice, check_density, check_names, check_seed


def prunable(obj: "keras.layers.Layer", density: Optional[float] = None,
             distribution: Union[str, Mapping[str, float]] = "erk", *,
             keep_dense: Iterable[str] = (), density_overrides: Optional[Mapping[str, float]] = None,
             init: str = "exact", seed: int = 0, skip_unsupported: bool = False,
             track_running_scores: bool = False, pattern: "patterns.PatternLike" = "unstructured",
             pattern_overrides: Optional[Mapping[str, str]] = None,
             in_place: Optional[bool] = None) -> "keras.layers.Layer":
    """Makes a Keras model or layer sparse.

    **New model or the same one.** A model Keras can rebuild from its graph — a
    Sequential or functional model (``keras.Model(inputs, outputs)``), with only such
    models nested in it — is cloned: `prunable` returns a *new* model whose
    supported layers are wrapped in `SparseWrapper` (weights copied, then zeroed
    where the mask is 0; each wrapper named as its layer, so the layer and output
    names are the dense model's) and leaves `obj` untouched; it saves and loads with
    ``keras.models.load_model``. Any other model — subclassed, a library's `Model`
    subclass such as keras-hub's backbones and tasks (even when built
    functionally), or a graph model with one of those nested in it — cannot be
    rebuilt: its masks are *attached in place* to its own supported layers (no
    layer is added, the forward pass is unchanged) and `prunable` returns `obj`
    itself, changed; it loads with `keras_dst.load_model`. `in_place` chooses
    explicitly. Either way, use the returned model: ``model = prunable(model, ...)``.

    Args:
      obj: a built `keras.Model` (any kind), or a single `keras.layers.Layer`. A
        layer gives `SparseWrapper(layer)` (use it to build subclassed models
        sparse), or with ``in_place=True`` the layer itself with masks attached.
      density: the global target density D in (0, 1] over all sparsified weights.
        For a single layer, that layer's density. May be omitted with a
        distribution dict (which sets every layer's density); if given, it must be
        the density the dict gives.
      distribution: how D is spread over layers: ``"erk"`` (default, the
        reference), ``"er"``, ``"uniform"``, another registered name, or a dict
        ``{layer name: density}`` naming every sparsified layer.
      keep_dense: a layer name, or names, of layers kept fully dense (density 1;
        their masks exist but are all ones; a DST update with a growth rule can
        still reset their lowest-score weights, as in the reference; a prune-only
        update (``grow=None``) and `GradualPruning` leave them dense). Saved with
        the model.
      density_overrides: ``{layer name: density}`` imposed on those layers; the
        others share the rest of the budget.
      init: ``"exact"`` (default): exactly ``round(d_l n_l)`` active entries per
        weight, with counts summing to ``round(D N)``; ``"bernoulli"``: the
        reference's i.i.d. draw (counts exact in expectation only).
      seed: int; a model's masks are a pure function of (seed, the index of the
        sparsified layer in the model), a single layer's of (seed, its name).
      skip_unsupported: leave layers with weights that keras_dst cannot sparsify
        dense instead of raising a `TypeError`.
      track_running_scores: keep a running score per weight entry in each wrapper
        (needed by the running criteria, e.g. ``running_magnitude``).
      pattern: the sparsity pattern of every sparsified weight (see
        `keras_dst.patterns`): ``"unstructured"`` (default), ``"1xB"`` (e.g.
        ``"1x4"``: blocks of B consecutive entries along the kernel's input axis,
        the axis before the last), ``"N:M"`` (e.g. ``"2:4"``: exactly N active
        in every M consecutive input-axis entries; the layer's density is then
        N/M, fixed outside the distribution, and `density` may be omitted: N/M is
        the density of the weights that `keep_dense` and `density_overrides` leave
        free, those with another pattern sharing it, the fixed ones on top) or
        ``"fan_in"`` (every output unit
        has the same number of active inputs; the distribution still sets each
        layer's density). Kept through every DST update.
      pattern_overrides: ``{layer name: pattern}`` for layers that need another
        pattern (e.g. ``"unstructured"`` for a layer whose input axis is not a
        multiple of B, or ``"sep/depthwise_kernel"`` for one weight of a layer).
      in_place: ``None`` (default): clone what can be rebuilt, attach in place
        otherwise (above); ``True``: attach in place whatever the model (a graph
        model too); ``False``: clone, and a `TypeError` for a model that cannot be
        rebuilt.

    Layer names (in `keep_dense`, `density_overrides`, `pattern_overrides` and a
    `distribution` dict) match a layer's name or its path, and a name that matches no
    sparsified layer reaches the sparsified layers inside the layer it names (a block:
    ``"transformer_layer_0"``) or the weights of the sub-layers it names below one (a
    `MultiHeadAttention` is sparsified as one layer; its projections are sub-layers):
    library models repeat names in every block (``"query"`` matches the query
    projection of every attention layer, ``"transformer_layer_0/self_attention_layer/query"``
    one);
    where two layers share a path (keras-hub's CLIP encoders), their places in the
    model tell them apart (``"clip_text_encoder/encoder_block_0/attention"``).
    A layer's name followed by a weight's path below it names that weight alone
    (``"sep/depthwise_kernel"``, ``"mha/query/kernel"``).
    A layer given two different values (by two keys, or by two options) is
    refused, naming both; a single layer takes only `density`, `init`, `seed`,
    `track_running_scores`, `pattern` and `in_place`.
    With masks attached in place, a layer's supported sub-layers are found at any
    depth (a `MultiHeadAttention` or a layer defining `get_prunable_weights` is
    sparsified as a whole); layers whose weights are all vectors (normalisation,
    biases) stay dense.

    Returns:
      The sparse model (see above: a new one, or `obj`), or the wrapper layer
      (`obj` with ``in_place=True``).

    Raises:
      TypeError: wrong argument types, unsupported layer (names it and its class),
        ``in_place=False`` for a model that cannot be rebuilt.
      ValueError: density outside (0, 1] (or missing, without a distribution dict;
        or not the density a distribution dict gives), unknown distribution or
        layer name, a layer given two values, a model-only option for a layer,
        infeasible overrides, a model that is already prunable, an unbuilt model
        or layer, a pattern a layer's shape cannot take (names the layer and the
        remedy), an N:M pattern with another density.
    """
    keep_dense = check_names(keep_dense, "keep_dense")
    with validation.errors_named("prunable(): pattern"):
        pattern = patterns.parse(pattern)
    if density is not None:
        density = check_density(density)
    if pattern.kind == "nm":  # N:M fixes the density of every layer it applies to
        if density is not None or not isinstance(obj, keras.Model):
            density = patterns.pattern_density(pattern, density, "prunable(pattern=...)")
    elif density is None and (not isinstance(distribution, Mapping)
                              or not isinstance(obj, keras.Model)):
        raise ValueError("prunable() needs a density in (0, 1], e.g. density=0.1 (for a "
                         "model, or a distribution dict {layer name: density}).")
    init = check_choice(init, ("exact", "bernoulli"), "init")
    seed = check_seed(seed)
    skip_unsupported = check_bool(skip_unsupported, "skip_unsupported")
    if in_place is not None and not isinstance(in_place, bool):
        raise TypeError(f"prunable(): in_place must be None, True or False, got {in_place!r}.")
    if isinstance(obj, keras.Model):
        return _prunable_model(obj, density, distribution, keep_dense, density_overrides,
                               init, seed, skip_unsupported, track_running_scores,
                               pattern, pattern_overrides, in_place)
    if isinstance(obj, keras.layers.Layer):
        sparse_layers.check_not_sparse(obj)
        model_only = [name for name, given in (
            ("distribution", not isinstance(distribution, str) or distribution != "erk"),
            ("keep_dense", bool(keep_dense)), ("density_overrides", bool(density_overrides)),
            ("pattern_overrides", bool(pattern_overrides)),
            ("skip_unsupported", skip_unsupported)) if given]
        if model_only:
            raise ValueError(f"prunable(layer): {model_only[0]} applies to models; pass the "
                             "layer's density as density= and its pattern as pattern=.")
        options = dict(density=density, init=init, seed=distributions.stable_seed(seed, obj.name),
                       track_running_scores=track_running_scores, pattern=str(pattern))
        if in_place:
            sparse_layers.attach(obj, **options)
            return obj
        wrapper = SparseWrapper(obj, **options)
        if obj.built:
            wrapper.build(None)  # masks for the existing weights, which are kept
        return wrapper
    raise TypeError(f"prunable() takes a keras Model or Layer, got {type(obj).__name__}.")


def _why_not_rebuildable(model) -> Optional[str]:
    """None for a Sequential/functional model with only such models nested in it, each
    leaf layer in one of them; else why a clone with wrappers cannot stand for it."""
    def graphs(m):
        return compat.is_graph_model(m) and all(
            graphs(layer) for layer in m.layers if isinstance(layer, keras.Model))

    if not graphs(model):
        return (f"the subclassed model '{model.name}' ({type(model).__name__}), or a model "
                "nested in it: only Sequential and functional models can be cloned")
    seen = set()
    for layer in _walk(model):
        if id(layer) in seen:  # a clone gives each nested model a wrapper of its own
            return (f"model '{model.name}': its layer '{layer.name}' is shared by two "
                    "nested models, which clones would no longer share")
        seen.add(id(layer))
    return None


def _walk(model):
    """Every leaf layer of a graph model, recursing into nested graph models."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _walk(layer)
        else:
            yield layer


def _wrap_targets(model, skip_unsupported):
    """[(layer, prunable weights)] of a graph model's layers that get a wrapper."""
    result = []
    for layer in _walk(model):
        if sparse_layers.needs_no_wrapping(layer):
            continue
        if not sparse_layers.is_supported(layer):
            if skip_unsupported:
                continue
            if any(sparse_layers.is_supported(l) for l in compat.flatten_layers(layer)):
                raise TypeError(
                    f"Layer '{layer.name}' of class {type(layer).__name__} in model "
                    f"'{model.name}' is not supported by keras_dst as a whole, and a wrapper "
                    "cannot reach the layers inside it: pass in_place=True to attach masks "
                    "to them, define `get_prunable_weights()` on it, or pass "
                    "skip_unsupported=True to leave it dense.")
            sparse_layers.prunable_weights(layer)  # raises TypeError naming the layer
        sparse_layers.check_maskable(layer, "prunable()")
        weights = sparse_layers.prunable_weights(layer)
        if weights:
            result.append((layer, weights))
    return result


def _attach_targets(model, skip_unsupported):
    """[(layer, prunable weights)] of the supported layers of any model, at any depth.

    The outermost supported layer takes its prunable weights (a MultiHeadAttention
    its four projections); a weight reachable from two layers goes to the first.
    Then every other layer holding a matrix (`layers.is_matrix`) that it created
    trainable (frozen or not) that no target took is unsupported (`TypeError`, or left dense with `skip_unsupported`).
    """
    result, claimed, covered, seen = [], set(), set(), set()

    def visit(layer):
        if id(layer) in seen or sparse_layers.is_dense_by_design(layer):
            return
        seen.add(id(layer))
        if sparse_layers.is_supported(layer):
            if not layer.built:
                raise ValueError(
                    f"prunable(): layer '{layer_label(layer)}' of model '{model.name}' is not "
                    "built; call the model on a batch of data (or model.build(input_shape)) "
                    "first.")
            sparse_layers.check_maskable(layer, "prunable()")
            weights = [w for w in sparse_layers.prunable_weights(layer) if id(w) not in claimed]
            claimed.update(id(w) for w in weights)
            covered.update(id(l) for l in compat.flatten_layers(layer))
            if weights:
                result.append((layer, weights))
            return
        for child in compat.child_layers(layer):
            visit(child)

    visit(model)
    for layer in compat.flatten_layers(model, include_self=True):
        if id(layer) in covered or sparse_layers.is_supported(layer) \
                or sparse_layers.is_dense_by_design(layer):
            continue
        inside = {id(v) for child in compat.child_layers(layer) for v in child.weights}
        left = [w for w in layer.weights if id(w) not in inside and id(w) not in claimed
                and sparse_layers.is_trainable_by_design(layer, w)
                and sparse_layers.is_matrix(w)]
        if left and not skip_unsupported:
            raise TypeError(
                f"Layer '{layer_label(layer)}' of class {type(layer).__name__} is not "
                f"supported by keras_dst (its weights {[w.path for w in left]}): implement "
                "`get_prunable_weights()` on it, register its class with "
                "keras_dst.register_prunable_layer(), or pass skip_unsupported=True to "
                "leave it dense.")
    return result


def _prunable_model(model, density, distribution, keep_dense, density_overrides, init, seed,
                    skip_unsupported, track_running_scores, pattern, pattern_overrides,
                    in_place):
    if sparse_states(model):
        raise ValueError(f"prunable(): model '{model.name}' is already prunable "
                         "(it contains SparseWrapper layers or layers with masks attached).")
    not_rebuildable = _why_not_rebuildable(model)
    if in_place is None:
        in_place = not_rebuildable is not None
    if not in_place and not_rebuildable is not None:
        raise TypeError(
            f"prunable(in_place=False) cannot rebuild {not_rebuildable}. Leave "
            "in_place=None (or pass True) to attach the masks to its own layers in place.")
    if not model.built:
        raise ValueError(f"prunable(): model '{model.name}' is not built; give it an Input "
                         "or call model.build(input_shape) (or the model on a batch) first.")

    # 1. Decide, before changing anything, which layers get masks, and their densities.
    targets = (_attach_targets if in_place else _wrap_targets)(model, skip_unsupported)
    if not targets:
        raise ValueError(f"prunable(): model '{model.name}' has no layer with prunable weights.")
    label = layer_label if in_place else (lambda layer: layer.name)
    keys = _weight_keys(model, targets, in_place)
    names = _option_names(model)
    weight_names = _weight_names(targets, keys, names)
    densities, weight_patterns, kept = _plan(targets, keys, names, weight_names, label, density,
                                             distribution, keep_dense, density_overrides, init,
                                             pattern, pattern_overrides)
    frozen = [label(layer) for layer, weights in targets
              if any(not w.trainable and densities[keys[id(w)]] < 1.0 for w in weights)]
    if frozen:
        user_warnings.warn(
            f"prunable(): layers {frozen} of model '{model.name}' are frozen (trainable="
            "False): they are made sparse, and no step retrains what is left of them until "
            "they are unfrozen. To keep them dense, pass keep_dense=" + repr(frozen) + ".")

    def options(index, layer, weights):
        flags = [keys[id(w)] in kept for w in weights]
        return dict(density=[densities[keys[id(w)]] for w in weights], init=init,
                    seed=distributions.stable_seed(seed, index),
                    track_running_scores=track_running_scores,
                    pattern=[str(weight_patterns[keys[id(w)]]) for w in weights],
                    keep_dense=flags[0] if len(set(flags)) == 1 else flags)

    # 2a. Attach in place (all or nothing).
    if in_place:
        done = []
        try:
            for index, (layer, weights) in enumerate(targets):
                sparse_layers.attach(layer, **options(index, layer, weights))
                done.append(layer)
        except BaseException:
            for layer in done:
                sparse_layers.detach(layer)
            raise
        _retrace_training(model)
        guard_weight_io(model)
        return model

    # 2b. Clone with wrappers and copy the weights over.
    by_id = {id(layer): weights for layer, weights in targets}

    def clone(layer, index):
        if id(layer) not in by_id:
            return _rebuilt(layer), layer
        inner = _rebuilt(layer)
        inner.build_from_config(layer.get_build_config())
        # named as the layer it wraps: the model keeps the dense model's layer and
        # output names (compile's loss / metric dicts, `get_layer`, history keys)
        return SparseWrapper(inner, name=layer.name, **options(index, layer, by_id[id(layer)])), layer

    result = _clone_graph(model, clone)
    guard_weight_io(result)  # (set_weights / load_weights all or nothing)
    return result


def _weight_keys(model, targets, in_place) -> dict:
    """``{id(weight): key}``: the keys (`masks.weight_keys`) that `targets`' weights will
    have in the model `prunable` returns: their paths when attached in place; in a
    clone, the wrapped layer's name and the weight's path below it (``conv1/kernel``, as
    the clone's rebuilt layers name their variables)."""
    def in_clone(owner, layer, weight):
        return f"{layer.name}/{sparse_layers.relative_path(layer, weight)}"

    owned = [(layer, layer, w) for layer, weights in targets for w in weights]
    keys = weight_keys(model, owned, None if in_place else in_clone)
    return {id(w): key for (_, _, w), key in zip(owned, keys)}


def _option_names(model):
    """``names(layer)``: what an option of `prunable` may name a layer of `model` by: its
    name, its path, or its place in the model (`masks.layer_places`: where two layers
    share a path, as the encoders of keras-hub's CLIP do, only the place tells them
    apart)."""
    places = layer_places(model)

    def names(layer):
        return (layer.name, layer_label(layer), places[id(layer)])

    return names


def _weight_names(targets, keys, names) -> dict:
    """``{weight key: (below, above, own)}``: what else than its layer's names
    (`_option_names`) an option of `prunable` may name a weight by.

    * below: where the weight belongs to a sub-layer of its layer (the ``query``
      projection of a `MultiHeadAttention`, sparsified as one layer), each sub-layer on
      the way by its name and by its path below each of the layer's names (``"query"``,
      ``"mha/query"``);
    * above: each layer that contains its layer, by name and by the path or place of
      the layer down to it (``"transformer_layer_0"``, a functional model's nested
      ``"tower_a"``);
    * own: the weight alone, by each of its layer's names and its path below the layer
      (``"sep/depthwise_kernel"``, ``"mha/query/kernel"``): one of a layer's weights
      where the others take other values."""
    result = {}
    for layer, weights in targets:
        own = names(layer)
        above = []
        for n in own[1:]:  # the path and the place
            parts = n.split("/")[:-1]
            above += parts + ["/".join(parts[:i + 1]) for i in range(len(parts))]
        for w in weights:
            relative = sparse_layers.relative_path(layer, w)
            parts = relative.split("/")[:-1]
            below = []
            for i, part in enumerate(parts):
                below += [part] + [f"{n}/{'/'.join(parts[:i + 1])}" for n in own]
            result[keys[id(w)]] = (tuple(dict.fromkeys(below)), tuple(dict.fromkeys(above)),
                                   tuple(dict.fromkeys(f"{n}/{relative}" for n in own)))
    return result


def _missing_name(layer, distinct, names_of_weight, given, owner) -> str:
    """How a distribution dict's message names a weight of `layer` it misses: by the
    layer (`distinct`) where the dict names none of its weights, else by the sub-layer
    holding it below that name (``"mha/value"``), or by the weight's own name below it
    (``"sep/pointwise_kernel"``; `names_of_weight`: its `_weight_names` entry)."""
    if not any(p in given for p, other in owner.items() if other is layer):
        return distinct
    below, _, own = names_of_weight
    paths = [n for n in below if n.startswith(distinct + "/")]
    return min(paths, key=len) if paths else _own_name(own, distinct)


def _own_name(own, distinct) -> str:
    """Of a weight's own names (`_weight_names`), the one below its layer's `distinct` name."""
    return next(n for n in own if n.startswith(distinct + "/"))


def _distinct_names(targets, names) -> dict:
    """``{id(layer): key}``: for each layer of `targets`, the first of `names(layer)` (name,
    path, place) that no other layer of `targets` has: the shortest option key that
    reaches it alone."""
    counts = [collections.Counter(names(layer)[i] for layer, _ in targets) for i in range(2)]
    return {id(layer): next((n for n, c in zip(names(layer), counts) if c[n] == 1),
                            names(layer)[-1]) for layer, _ in targets}


def _plan(targets, keys, names, weight_names, label, density, distribution, keep_dense,
          density_overrides, init, pattern, pattern_overrides):
    """({weight key: density}, {weight key: Pattern}, {weight keys kept dense}) for
    `targets`, every option checked (`keys`: `_weight_keys`).

    `label(layer)` names a layer in messages; an option key reaches the weights of the
    layers it names (`names(layer)`), else those it names a sub-layer or a container
    of (`weight_names`: `_weight_names`).
    """
    owner, variables = {}, {}
    for layer, weights in targets:
        for w in weights:
            owner[keys[id(w)]] = layer
            variables[keys[id(w)]] = w
    shapes = {path: tuple(w.shape) for path, w in variables.items()}
    distinct = _distinct_names(targets, names)
    # what the messages of an unknown name list: the layers, and the sub-layers below them
    layer_names = str(sorted(set(distinct.values())))
    sub_layers = sorted({n for below, *_ in weight_names.values() for n in below if "/" not in n})
    if sub_layers:
        example = next(max(below, key=len) for below, *_ in weight_names.values() if below)
        layer_names += (f"; sub-layers holding their weights {sub_layers} (also by their path "
                        f"below the layer's, e.g. '{example}')")
    containers = sorted({n for _, above, _ in weight_names.values() for n in above if "/" not in n})
    if containers:
        layer_names += f"; layers containing them {containers}"
    several = next((_own_name(weight_names[keys[id(weights[0])]][2], distinct[id(layer)])
                    for layer, weights in targets if len(weights) > 1), None)
    if several is not None:
        layer_names += (f"; one weight of a layer by the layer's name and the weight's path "
                        f"below it, e.g. '{several}'")
    known = {k for path, layer in owner.items() for k in names(layer)} | \
        {k for below, above, own in weight_names.values() for k in below + above + own}

    def matching(key):
        """The weights `key` reaches: a sparsified layer's weights where it names one (a
        top-level Dense named "value" alone, not the attention layers' value
        projections), else those of the sub-layers and of the layers inside the
        containers it names, else the one weight it names."""
        return [p for p, layer in owner.items() if key in names(layer)] or \
            [p for p in owner if key in weight_names[p][0] + weight_names[p][1]] or \
            [p for p in owner if key in weight_names[p][2]]

    def refuse_two_values(path, value, source, other, other_source):
        raise ValueError(
            f"prunable(): layer '{label(owner[path])}' (weight '{path}') is given {value} by "
            f"{source} and {other} by {other_source}; give each weight one value.")

    def by_weight(entries):
        """{weight key: value}, {weight key: source} from ``[(source, key, value)]``
        (`source` names the option and key in messages); a weight given two different
        values raises, naming both."""
        values, sources = {}, {}
        for source, key, value in entries:
            for path in matching(key):
                if path in values and values[path] != value:
                    refuse_two_values(path, values[path], sources[path], value, source)
                values[path], sources[path] = value, source
        return values, sources

    fixed, fixed_by = by_weight(_named_overrides(keep_dense, density_overrides, known,
                                                 layer_names))
    weight_patterns = _weight_patterns(pattern, pattern_overrides, keep_dense, owner,
                                       variables, init, known, layer_names, by_weight, label)
    for path, p in weight_patterns.items():  # N:M: the density is N/M
        if p.kind == "nm":
            if path in fixed:
                patterns.pattern_density(p, fixed[path], f"layer '{label(owner[path])}'")
            fixed[path] = p.fixed_density
            fixed_by.setdefault(path, f"pattern '{p}'")
    sizes = {path: int(np.prod(shape)) for path, shape in shapes.items()}
    total = sum(sizes.values())
    if pattern.kind == "nm" and not isinstance(distribution, Mapping):
        # N:M's N/M is the density of the weights that keep_dense and density_overrides
        # leave free (those with another pattern share it); the fixed ones come on top.
        density = distributions.density_of(
            sum(fixed.get(path, pattern.fixed_density) * n for path, n in sizes.items()), total)
    if isinstance(distribution, Mapping):
        _check_known(distribution, "distribution", known, layer_names)
        per_weight, per_weight_by = by_weight(
            [(f"distribution['{key}']", key, check_density(value, f"distribution['{key}']"))
             for key, value in distribution.items()])
        missing = sorted({_missing_name(layer, distinct[id(layer)], weight_names[p],
                                        per_weight, owner)
                          for p, layer in owner.items() if p not in per_weight})
        if missing:
            raise ValueError(f"prunable(): the distribution dict must name every sparsified "
                             f"layer (or each of its weights); missing {missing}.")
        for path, value in fixed.items():
            if per_weight[path] != value:
                refuse_two_values(path, per_weight[path], per_weight_by[path], value,
                                  fixed_by[path])
        realised = distributions.density_of(
            sum(per_weight[path] * n for path, n in sizes.items()), total)
        # (with N:M, `density` is the pattern's N/M, checked per layer above)
        if density is not None and pattern.kind != "nm" and abs(realised - density) > 1e-6:
            raise ValueError(
                f"prunable(): the distribution dict gives a density of {realised:.6g} over "
                f"the sparsified weights, not density={density}; omit density (the dict sets "
                "every layer's) or make them agree.")
        density, distribution = realised, per_weight
    densities = distributions.layer_densities(shapes, density, distribution, fixed=fixed)
    if init == "exact":
        counts = distributions.active_counts(shapes, densities)
        for path, p in weight_patterns.items():  # a pattern's counts come in its units
            if p.kind != "unstructured":
                counts[path] = patterns.active_count(p, shapes[path], densities[path])
        asked = densities
        densities = {p: distributions.density_of(counts[p], sizes[p]) for p in shapes}
        _warn_where_counts_miss(asked, densities, sizes, weight_patterns,
                                lambda path: label(owner[path]))
    return densities, weight_patterns, {path for name in keep_dense for path in matching(name)}


def _warn_where_counts_miss(asked, got, sizes, weight_patterns, layer_of):
    """Warns (naming the layers) where the exact counts of `_plan` leave a weight asked to
    keep some entries with none, or make a fan_in weight denser than asked by more than
    a quarter (its floor of one input per output unit)."""
    empty = [path for path in asked if asked[path] > 0 and got[path] == 0 and sizes[path]]
    if empty:
        shown = ", ".join(f"'{layer_of(p)}' ({p}: {asked[p]:.3g} of {sizes[p]} entries)"
                          for p in empty)
        user_warnings.warn(
            f"prunable(): no active entry is left at the density asked (the count rounds to "
            f"0) in {shown}: such a layer passes nothing of its input on, and DST regrows "
            "only what it prunes, so it stays empty. Give it entries with "
            "density_overrides={...}, keep it dense with keep_dense=[...], or raise density.")
    denser = [path for path, p in weight_patterns.items()
              if p.kind == "fan_in" and got[path] > 1.25 * asked[path]]
    if denser:
        total = sum(sizes.values())
        overall = sum(got[p] * n for p, n in sizes.items()) / total
        wanted = sum(asked[p] * n for p, n in sizes.items()) / total
        shown = ", ".join(f"'{layer_of(p)}' {got[p]:.3g} (asked {asked[p]:.3g})"
                          for p in denser)
        user_warnings.warn(
            f"prunable(): pattern 'fan_in' gives every output unit a whole number of inputs, "
            f"at least one, so these layers are denser than asked: {shown}; the sparsified "
            f"weights' density is {overall:.4g}, not {wanted:.4g}.")


def _rebuilt(layer, caller="prunable()", purpose="to clone the model",
             remedy=", or pass in_place=True to attach the masks to the model's own layers"):
    """A new layer from `layer`'s config (the clone `prunable` wraps or keeps, the plain
    layer `strip` gives); a layer that cannot be rebuilt so is a TypeError naming it and
    the remedies."""
    try:
        return layer.__class__.from_config(layer.get_config())
    except Exception as e:  # noqa: BLE001 - whatever the user's class raises
        raise TypeError(
            f"{caller}: layer '{layer.name}' ({type(layer).__name__}) cannot be rebuilt from "
            f"its config {purpose} ({type(e).__name__}: {' '.join(str(e).split())}). Give it "
            f"a get_config() that its constructor takes (accepting **kwargs){remedy}.") from e


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
            _copy_weights(source.layer, target, _masked_values(source))
        elif source.weights:
            _copy_weights(source, target, lambda w: w.numpy())
        if isinstance(layer, SparseWrapper):
            layer.apply_masks()
    return cloned


def _masked_values(wrapper):
    """``value_of(w)`` for `_copy_weights` from `wrapper`'s inner layer: its weights,
    each sparsified one multiplied by its mask."""
    masks = {id(w): m for w, m in zip(wrapper.sparse_weights, wrapper.masks)}
    return lambda w: np.where(masks[id(w)].numpy(), w.numpy(), 0) if id(w) in masks else w.numpy()


def _plain_copy(wrapper):
    """`strip` of a bare `SparseWrapper`: a new layer of its inner layer's class and config,
    built as it is, with its weights ⊙ masks (the inner layer itself keeps the mask
    constraints and write guards the wrapper put on its variables)."""
    inner = wrapper.layer
    with compat.safe_mode_scope(False):
        plain = _rebuilt(inner, "strip()", f"to give a plain copy of SparseWrapper "
                         f"'{wrapper.name}'", remedy="")
    if inner.built:
        plain.build_from_config(inner.get_build_config())
        _copy_weights(inner, plain, _masked_values(wrapper))
    return plain


def _copy_weights(source, target, value_of):
    """``target.set_weights`` with ``value_of(w)`` of each weight `w` of `source`, matched
    by their paths below the layers (`layers.relative_name`): a layer rebuilt from its
    config may create its weights in another order (Keras's float8 layers create their
    scales first); by position where the names do not match one to one.
    """
    if len(source.weights) != len(target.weights):  # (else Keras's count, naming no cause)
        # (a layer's own config carries its LoRA rank and quantization; its parent's, not)
        changed = [layer_label(l) for l in compat.flatten_layers(source)
                   if getattr(l, "lora_enabled", False) or getattr(l, "quantization_mode", None)]
        raise ValueError(
            f"layer '{layer_label(source)}' rebuilt from its config has "
            f"{len(target.weights)} weights, not its {len(source.weights)}"
            + (f": LoRA or a quantization of {changed}, which its config does not carry; "
               "make the copy (strip, prunable) before enable_lora() / quantize(), or make "
               "the model prunable with in_place=True (masks attached, stripped in place)."
               if changed else "."))
    names = [sparse_layers.relative_name(source, w) for w in source.weights]
    wanted = [sparse_layers.relative_name(target, w) for w in target.weights]
    if len(set(names)) == len(names) and sorted(names) == sorted(wanted):
        by_name = dict(zip(names, source.weights))
        target.set_weights([value_of(by_name[n]) for n in wanted])
    else:
        target.set_weights([value_of(w) for w in source.weights])


def unfit_layers(model: "keras.Model", pattern: "patterns.PatternLike") -> dict:
    """The layers of `model` whose kernels cannot take `pattern`, as ``{key: "unstructured"}``.

    A layer only some of whose kernels cannot take it is given by those kernels
    (``"sep/depthwise_kernel"``: a `SeparableConv`'s pointwise kernel keeps `pattern`;
    ``"mha/query/kernel"``, ...: a `MultiHeadAttention`'s output projection does).

    Ready for ``prunable(model, ..., pattern=pattern, pattern_overrides=unfit_layers(model,
    pattern))`` when such layers should stay unstructured rather than be refused (e.g. a
    first convolution with 3 input channels and 1x4 blocks). A layer is keyed by its name,
    or by its path where another sparsified layer has the same name (the blocks of a
    library model), or by its place in the model where another has the same path too
    (keras-hub's CLIP encoders), so that the overrides reach exactly these layers.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"unfit_layers() needs a keras Model, got {model!r}.")
    with validation.errors_named("unfit_layers(): pattern"):
        pattern = patterns.parse(pattern)
    # the layers `prunable` would sparsify (a MultiHeadAttention as one, not its
    # projections), by the names its `pattern_overrides` takes
    targets = (_attach_targets if _why_not_rebuildable(model) else _wrap_targets)(
        model, skip_unsupported=True)
    names = _option_names(model)
    distinct = _distinct_names(targets, names)
    weight_names = _weight_names(targets, {id(w): id(w) for _, ws in targets for w in ws}, names)
    # a weight's own name reaches it alone where no layer, sub-layer or container and no
    # other weight goes by it (`prunable` tries those names first)
    taken = collections.Counter(n for layer, _ in targets for n in names(layer))
    for below, above, own in weight_names.values():
        taken.update(set(below + above))
        taken.update(own)
    unfit = {}
    for layer, weights in targets:
        keys = []
        for weight in weights:
            try:
                sparse_layers.check_pattern(pattern, layer, weight, layer.name)
            except ValueError:
                keys.append(_own_name(weight_names[id(weight)][2], distinct[id(layer)]))
        if keys:
            alone = len(keys) < len(weights) and all(taken[k] == 1 for k in keys)
            unfit.update(dict.fromkeys(keys if alone else [distinct[id(layer)]], "unstructured"))
    return unfit


def _weight_patterns(pattern, pattern_overrides, keep_dense, owner, variables, init, known,
                     layer_names, by_weight, label):
    """{weight key: Pattern}, checked against every weight's shape before anything changes.

    Layers in `keep_dense` are unstructured (all ones); `by_weight` (see `_plan`) refuses
    a layer given two patterns.
    """
    if pattern_overrides is None:
        pattern_overrides = {}
    _check_mapping(pattern_overrides, "pattern_overrides", "pattern")
    _check_known(pattern_overrides, "pattern_overrides", known, layer_names)
    parsed = {}
    for key, p in pattern_overrides.items():
        with validation.errors_named(f"prunable(): pattern_overrides['{key}']"):
            parsed[key] = str(patterns.parse(p))
    per_weight, _ = by_weight(
        [(f"pattern_overrides['{key}']", key, p) for key, p in parsed.items()]
        + [(f"keep_dense '{key}'", key, str(patterns.UNSTRUCTURED)) for key in keep_dense])
    result, unfit = {}, []
    for path, layer in owner.items():
        p = patterns.parse(per_weight[path]) if path in per_weight else pattern
        try:
            sparse_layers.check_pattern(p, layer, variables[path],
                                        f"layer '{label(layer)}' (weight '{path}')")
        except ValueError as e:
            unfit.append((label(layer), e, path in per_weight))
        result[path] = p
    if unfit:  # the first one's reason, and every layer named (not one per try)
        others = list(dict.fromkeys(name for name, _, _ in unfit[1:] if name != unfit[0][0]))
        if not others:
            raise unfit[0][1]
        hint = "" if any(overridden for *_, overridden in unfit) else (
            " (keras_dst.unfit_layers(model, pattern) gives them all, ready for "
            "pattern_overrides=)")
        raise ValueError(f"{unfit[0][1]} {len(others)} more layer(s) cannot take their pattern "
                         f"either: {others}{hint}.") from None
    structured = next((path for path, p in result.items() if p.kind != "unstructured"), None)
    if structured is not None and init != "exact":
        raise ValueError(f"prunable(): pattern '{result[structured]}' of layer "
                         f"'{label(owner[structured])}' needs init='exact', got init={init!r}.")
    return result


def _check_known(names, argument, known, layer_names) -> None:
    """Raises ValueError naming `argument` and its names not among `known` (the names that
    can name a sparsified layer or weight), with the sparsified layers."""
    unknown = sorted(set(names) - known)
    if unknown:
        raise ValueError(f"prunable(): unknown layer names {unknown} in {argument}; "
                         f"sparsified layers are {layer_names}.")


def _check_mapping(value, argument: str, what: str) -> None:
    """Raises TypeError unless `value` (the argument `argument`) is a dict {layer name:
    `what`}."""
    if not isinstance(value, Mapping):
        raise TypeError(f"prunable(): {argument} must be a dict {{layer name: {what}}}, got "
                        f"{type(value).__name__}.")


def _named_overrides(keep_dense, density_overrides, known, layer_names):
    """``[(source, layer name, density)]`` of `keep_dense` (density 1) and
    `density_overrides`, names checked."""
    overrides = [(f"keep_dense '{name}'", name, 1.0) for name in keep_dense]
    if density_overrides is not None:
        _check_mapping(density_overrides, "density_overrides", "density")
        overrides += [(f"density_overrides['{n}']", n,
                       check_density(d, f"density_overrides['{n}']"))
                      for n, d in density_overrides.items()]
    _check_known(keep_dense, "keep_dense", known, layer_names)
    _check_known(density_overrides or {}, "density_overrides", known, layer_names)
    return overrides


def _retrace_training(model):
    """After constraints were added or removed in place: a training step `model` already
    compiled applies the constraints it was traced with, so the next `fit` traces it
    again (as after ``compile()``)."""
    if isinstance(model, keras.Model) and getattr(model, "train_function", None) is not None:
        model.train_function = None


def strip(model: "keras.layers.Layer") -> "keras.layers.Layer":
    """A plain Keras model computing what the sparse one computes, without masks.

    Every sparsified weight ends up multiplied by its mask (kernel ⊙ mask), so the
    stripped model computes exactly what the masks say, also if a write keras_dst
    cannot see left non-zeros at masked entries. As `prunable`: a model with
    `SparseWrapper` layers (Sequential/functional) gives a *new* model with the same
    graph and the wrappers' inner layers; a model whose masks were attached in place
    is stripped *in place* (masks, constraints and write guards removed) and
    returned itself; a bare `SparseWrapper` gives a new layer like its inner one (same
    config, built alike) holding its weights ⊙ masks, and is left as it was.
    """
    if isinstance(model, SparseWrapper):
        return _plain_copy(model)
    if isinstance(model, keras.layers.Layer):
        attached = [l for l in compat.flatten_layers(model, include_self=True)
                    if attached_state(l) is not None]
        if attached:
            for layer in attached:
                sparse_layers.detach(layer)
            _retrace_training(model)
            release_weight_io(model)
            return model
    if not isinstance(model, keras.Model) or not compat.is_graph_model(model):
        raise TypeError(f"strip() needs a Sequential or functional model or a model with masks "
                        f"attached by prunable(), got {type(model).__name__}.")

    def clone(layer, index):
        inner = layer.layer if isinstance(layer, SparseWrapper) else layer
        return inner.__class__.from_config(inner.get_config()), layer

    return _clone_graph(model, clone)
