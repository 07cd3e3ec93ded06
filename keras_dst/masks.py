"""Reading and writing the masks of a sparse model, and reporting its density.

Every function takes any model (Sequential, functional, subclassed, a library's,
nested) or layer whose masks live in `SparseWrapper` layers or are attached to its
own layers (`keras_dst.layers.attach`).
"""

import collections
from typing import Any, Callable, Dict, List, Mapping, NamedTuple

import keras
import numpy as np
import tensorflow as tf

from keras_dst import compat, distributions, patterns, user_warnings
from keras_dst.layers import (
    SparseState,
    SparseWrapper,
    attached_state,
    check_mask_array,
    check_maskable,
    check_weight_list,
    masked_nonzeros,
    relative_path,
)
from keras_dst.validation import check_bool, errors_named


class SparseTarget(NamedTuple):
    """One sparsified weight and the state kept for it.

    Attributes:
      weight: the sparsified variable.
      mask: its bool mask variable (same shape).
      ever_active: bool variable, True where the entry was ever active.
      running_score: float32 running-score variable (the running average of a
        running criterion), or None without `track_running_scores`.
      wrapper: the `SparseWrapper` that owns them, or None when the masks are
        attached to the layer in place.
      pattern: its `patterns.Pattern` (unstructured, 1xB, N:M or fan_in).
      state: the `SparseState` that owns them (the wrapper's, or the attached one).
      key: the weight's name in keras_dst's dicts and logs (`masks`, `set_masks`,
        `layer_stats`, ``density/<key>`` logs, export rows): see `weight_keys`.
    """

    weight: "keras.Variable"
    mask: "keras.Variable"
    ever_active: "keras.Variable"
    running_score: "keras.Variable | None"
    wrapper: "SparseWrapper | None"
    pattern: "patterns.Pattern"
    state: "SparseState"
    key: str


def layer_places(root) -> Dict[int, str]:
    """``{id(layer): place}`` for `root` and every layer inside it: a layer's place is the
    names of the layers from `root` (excluded) down to it, joined by "/"
    (``tower_a/fc``; `root`'s own place is its name). Unlike variable paths, places do not
    depend on the name scopes the layers were built in: a model rebuilt from its config
    has the same ones where it gives its layers the same names. A layer held in two
    places takes the first one reached (breadth first)."""
    places = {id(root): root.name}
    queue = collections.deque([(root, "")])
    while queue:
        parent, prefix = queue.popleft()
        for child in compat.child_layers(parent):
            if id(child) not in places:
                places[id(child)] = prefix + child.name
                queue.append((child, prefix + child.name + "/"))
    return places


def weight_keys(root, weights, natural: Callable = None) -> List[str]:
    """The keys of sparsified weights inside `root`, one per ``(owner, layer, weight)``
    of `weights` (`owner`: the layer that sits in `root`'s layer tree, a `SparseWrapper`
    or the layer itself; `layer`: the layer whose own weight `weight` is).

    A weight's key is ``natural(owner, layer, weight)`` (default: ``weight.path``, as
    Keras names variables) where that key is unique among `weights`; where it repeats
    (two sub-models creating layers of the same names, e.g. keras-hub's CLIP encoders,
    or nested models whose variable paths Keras drops on a clone or a reload), it is
    the weight's place in `root` instead: `owner`'s place (`layer_places`), then the
    weight's path below `layer` (``tower_a/fc/kernel``). Where places repeat too (a
    subclassed model holding two layers of one name), the second and later weights of
    one key get ``#2``, ``#3``, ... in model order.
    """
    natural = natural or (lambda owner, layer, weight: weight.path)
    keys = [natural(*entry) for entry in weights]
    counts = collections.Counter(keys)
    if all(n == 1 for n in counts.values()):
        return keys
    places = layer_places(root)
    keys = [key if counts[key] == 1 else
            f"{places[id(owner)]}/{relative_path(layer, weight)}"
            for key, (owner, layer, weight) in zip(keys, weights)]
    seen = collections.Counter()
    for i, key in enumerate(keys):  # places repeat too: numbered in model order
        seen[key] += 1
        if seen[key] > 1:
            keys[i] = f"{key}#{seen[key]}"
    return keys


def sparse_states(model) -> list:
    """Every `SparseState` inside `model` (itself included), in model order: those of its
    `SparseWrapper` layers and those attached to its layers in place."""
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(f"Expected a keras Model or Layer, got {type(model).__name__}.")
    states = []
    for layer in compat.flatten_layers(model, include_self=True):
        if isinstance(layer, SparseWrapper):
            states.append(layer.sparse_state)
        elif attached_state(layer) is not None:
            states.append(attached_state(layer))
    return states


def guard_weight_io(model) -> None:
    """Makes ``model.get_weights()`` / ``set_weights()`` carry the state attached in place
    to its layers, and its ``set_weights`` / ``load_weights`` all or nothing.

    * Attached state (masks, ever-active flags, running scores) is not among
      ``model.weights`` (Keras's loader must refuse such a file rather than load it
      dense), so a get/set round trip (Keras's ``EarlyStopping(restore_best_weights=
      True)``) restored the values without their masks: `get_weights` lists it after
      the model's own weights, as a wrapper's weights list a wrapper's. `set_weights`
      still takes the model's own weights alone (a warm start keeps the masks); with
      the state too, the masks are written first, then the values.
    * Keras writes the values of `set_weights` one by one, and `load_weights` layer by
      layer: a refused value (a mask of another pattern, another shape) left those
      before it written. `set_weights` checks every value before it writes any
      (`layers.check_weight_list`); `load_weights` puts the model's variables, its
      attached state and its optimizer's variables (a weights file holds them too, and
      Keras loads the entries it can before it raises) back as they were when it raises.

    Instance methods on `model` and on every model nested in it (`prunable` and
    `keras_dst.load_model` install them); `strip` removes them (`release_weight_io`).
    """
    if not isinstance(model, keras.Layer):
        return
    for nested in compat.flatten_layers(model, include_self=True):
        if isinstance(nested, keras.Model) and "get_weights" not in nested.__dict__:
            _guard_model_weight_io(nested)


def _guard_model_weight_io(model) -> None:
    """`guard_weight_io` of one model (not of the models nested in it)."""
    cls = type(model)

    def attached_variables(states):
        return [v for state in states if state.wrapper is None
                for v in state.masks + state.ever_active + state.running_scores]

    def get_weights():
        return cls.get_weights(model) + [v.numpy() for v in attached_variables(sparse_states(model))]

    def set_weights(weights):
        states = sparse_states(model)
        weights, own, extra = list(weights), list(model.weights), attached_variables(states)
        if extra and len(weights) not in (len(own), len(own) + len(extra)):
            raise ValueError(
                f"model '{model.name}'.set_weights(): got {len(weights)} values; it takes "
                f"{len(own)} (its own weights) or {len(own) + len(extra)} (with the "
                f"{len(extra)} masks, ever-active flags and running scores attached to its "
                "layers, as get_weights() lists them); no weight was written.")
        carried = extra if len(weights) == len(own) + len(extra) else []
        if len(weights) == len(own) + len(carried):  # (else Keras names the lengths)
            weights = check_weight_list(states, own + carried, weights, f"model '{model.name}'")
        for variable, value in zip(carried, weights[len(own):]):  # the masks first
            variable.assign(value)
        cls.set_weights(model, weights[:len(own)] if carried else weights)

    def load_weights(*args, **kwargs):
        states = sparse_states(model)
        # masks and flags first: each then applies to the weight as it is, which the
        # values written after it restore
        first = [v for state in states for v in state.masks + state.ever_active]
        listed = {id(v) for v in first}
        optimizer = getattr(model, "optimizer", None)  # a weights file holds its state too
        variables = first + [v for v in list(model.variables) + attached_variables(states)
                             + list(getattr(optimizer, "variables", None) or [])
                             if id(v) not in listed]
        saved = [v.numpy() for v in variables]
        try:
            return cls.load_weights(model, *args, **kwargs)
        except BaseException:
            for variable, value in zip(variables, saved):
                variable.assign(value)
            raise

    model.get_weights, model.set_weights, model.load_weights = (get_weights, set_weights,
                                                                load_weights)


def release_weight_io(model) -> None:
    """Undoes `guard_weight_io` (on `model` and the models nested in it)."""
    for nested in compat.flatten_layers(model, include_self=True):
        for name in ("get_weights", "set_weights", "load_weights"):
            nested.__dict__.pop(name, None)


def without_kept_dense(targets, model, caller: str) -> list:
    """`targets` less the weights `prunable` keeps dense (`keep_dense`): what an update
    that prunes without regrowing may prune (it would shrink them for good).

    Raises:
      ValueError: naming `caller`, where every target is kept dense.
    """
    targets = [t for t in targets if not t.state.is_kept_dense(t.weight)]
    if not targets:
        raise ValueError(f"{caller}: every sparsified layer of model '{model.name}' is kept "
                         "dense (prunable(..., keep_dense=...)); there is nothing to prune.")
    return targets


def sparse_targets(model: "keras.layers.Layer", require: bool = False, caller: str = "keras_dst",
                   trainable_only: bool = False) -> List["SparseTarget"]:
    """Every sparsified weight of `model` as `SparseTarget`s, in a stable order.

    Args:
      model: a model or layer.
      require: raise a ValueError when there is nothing sparsified (with
        `trainable_only`, nothing trainable).
      caller: name used in that error message.
      trainable_only: only the weights that are trainable now: what an update
        changes (a layer frozen after `prunable` keeps its mask and values).

    Raises:
      ValueError: naming `caller` and the layer, for a layer not built yet or one
        whose masks no longer hold what it computes (quantized, LoRA:
        `keras_dst.layers.check_maskable`).
    """
    with errors_named("sparse_targets()"):
        require = check_bool(require, "require")
        trainable_only = check_bool(trainable_only, "trainable_only")
    entries = []  # (state, weight, mask, ever_active, running score, pattern)
    for state in sparse_states(model):
        if not state.created:
            raise ValueError(
                f"{caller}: layer '{state.wrapper.name if state.wrapper else state.label}' is "
                "not built yet; call the model once on a batch (e.g. model(x[:1])) or "
                "model.build(input_shape) first (without a tf.distribute strategy, Keras "
                "builds a model's layers only when it traces the first step of fit, after "
                "the callbacks start)."
            )
        check_maskable(state.layer, caller, state.sparse_weights)
        scores = state.running_scores or [None] * len(state.masks)
        entries.extend((state, *fields) for fields in zip(
            state.sparse_weights, state.masks, state.ever_active, scores, state.patterns))
    keys = weight_keys(model, [(s.wrapper or s.layer, s.layer, w) for s, w, *_ in entries])
    targets = [SparseTarget(w, m, e, score, s.wrapper, p, s, key)
               for (s, w, m, e, score, p), key in zip(entries, keys)]
    if require and not targets:
        raise ValueError(
            f"{caller}: model '{getattr(model, 'name', model)}' has no sparse layers. "
            "Make it with keras_dst.prunable(model, density=...) (or build it from "
            "keras_dst.prunable(layer) layers) first."
        )
    if trainable_only:
        targets = [t for t in targets if t.weight.trainable]
        if require and not targets:
            raise ValueError(f"{caller}: every sparse layer of model "
                             f"'{getattr(model, 'name', model)}' is frozen (trainable=False); "
                             "there is nothing to update.")
    return targets


def masks(model: "keras.layers.Layer") -> Dict[str, np.ndarray]:
    """Masks of `model` as ``{key: numpy uint8 array of 0/1}``, in model order.

    A key is the weight's variable path (``conv1/kernel``), or where two sparsified
    weights of `model` share a path, the weight's place in the model (see
    `weight_keys`)."""
    return {t.key: np.asarray(t.mask.numpy(), dtype=np.uint8)
            for t in sparse_targets(model, caller="masks()")}


def set_masks(model: "keras.layers.Layer", new_masks: Mapping[str, Any]) -> None:
    """Replaces masks from ``{key: 0/1 or bool array}`` (the keys of `masks`).

    Every entry is validated (known path, same shape, only 0/1 values, the
    weight's sparsity pattern kept) before any mask changes. Weights are then
    zeroed where the new mask is 0 (every eager mask write does so, see
    `layers._guard_writes`), so the model stays consistent. The entries a new mask
    activates are added to the weight's ever-active flags (the ITOP rate counts them).
    A mask without any active entry is written, with a warning (DST leaves it empty).

    Raises:
      TypeError: `new_masks` is not a dict, or a mask holds neither bools nor numbers.
      ValueError: unknown path, shape mismatch, non-binary values or a broken
        pattern (e.g. three active entries in a group of a 2:4 weight).
    """
    if not isinstance(new_masks, Mapping):
        raise TypeError(f"set_masks(): new_masks must be a dict {{weight key: mask}} (as "
                        f"masks() returns), got {type(new_masks).__name__}.")
    by_path = {t.key: t for t in sparse_targets(model, require=True, caller="set_masks()")}
    checked = {}
    for path, value in new_masks.items():
        if path not in by_path:
            raise ValueError(f"set_masks(): no sparsified weight at path '{path}'. "
                             f"Known paths: {sorted(by_path)}.")
        try:
            array = np.asarray(value)
        except ValueError as e:  # (ragged nested lists)
            raise ValueError(f"set_masks(): the mask for '{path}' is not an array: {e}") from None
        target = by_path[path]
        if array.shape != tuple(target.weight.shape):
            raise ValueError(f"set_masks(): mask for '{path}' has shape {array.shape}, but the "
                             f"weight has shape {tuple(target.weight.shape)}.")
        check_mask_array(array, f"set_masks(): the mask for '{path}'")
        problem = patterns.violation(target.pattern, array.astype(bool))
        if problem is not None:
            raise ValueError(f"set_masks(): mask for '{path}' breaks the weight's {problem}")
        checked[path] = array.astype(bool)
    empty = [path for path, array in checked.items() if array.size and not array.any()]
    if empty:  # (before the writes: a warnings filter that raises leaves the masks as they were)
        user_warnings.warn(
            f"set_masks(): the masks of {', '.join(repr(p) for p in empty)} have no active entry: "
            "such a weight passes nothing of its input on, and DST regrows only what it prunes, "
            "so it stays empty (as prunable() warns for a density that rounds to 0).")
    for path, array in checked.items():
        target = by_path[path]
        # its write guard zeroes the weight where it is 0 and adds the entries it
        # activates to the ever-active flags (they will be trained: the ITOP rate)
        target.mask.assign(array)


def apply_masks(model: "keras.layers.Layer") -> int:
    """Zeroes every sparsified weight of `model` where its mask is 0.

    For writes keras_dst cannot see: keras_dst already re-zeroes what
    ``load_model``, ``load_weights``, ``set_weights`` and ``variable.assign``
    write (eagerly), and what a ``tf.train.Checkpoint`` restores, but a write of a
    variable's handle (``tf.raw_ops.AssignVariableOp``) goes underneath Keras. Call
    this after such a write.

    Returns:
      The number of non-zero entries that were zeroed (0 for a consistent model).
    """
    targets = sparse_targets(model, require=True, caller="apply_masks()")
    stray = sum(_stray_entries(targets))
    _zero_masked(targets)
    return stray


def _stray_entries(targets) -> list:
    """Per target: non-zero entries where the mask is 0 (what the model computes with
    beyond its mask), counted on the device (one small read)."""
    if not targets:
        return []
    return [int(c) for c in tf.stack([masked_nonzeros(t.weight, t.mask)
                                      for t in targets]).numpy()]


def _zero_masked(targets):
    """Zeroes the weights of `targets` where their masks are 0 (one pass per layer)."""
    for state in {id(t.state): t.state for t in targets}.values():
        state.apply_masks()


def reapply_masks_if_needed(model, caller) -> int:
    """Zeroes stray entries (see `layer_stats`) with a warning naming `caller`; returns
    how many there were."""
    targets = sparse_targets(model, caller=caller)
    stray = sum(_stray_entries(targets))
    if stray:
        user_warnings.warn(f"{caller}: {stray} weights were non-zero where their masks are 0 "
                           "(written by a path keras_dst cannot see, e.g. a write of the "
                           "variable's handle); they were set to 0.")
        _zero_masked(targets)
    return stray


def layer_stats(model, caller: str = "layer_stats()") -> list:
    """Per sparsified weight: dict(layer, path, shape, pattern, active, total, density, stray).

    Raises a ValueError naming `caller` for a model with no sparse layers.

    ``active`` counts the entries the model computes with: its mask's active
    entries plus ``stray``, the non-zero entries where the mask is 0 (0 unless a
    write keras_dst cannot see put them there; see `apply_masks`). A model with
    stray entries warns.
    """
    rows = []
    targets = sparse_targets(model, require=True, caller=caller)
    for t, stray in zip(targets, _stray_entries(targets)):
        active = int(np.count_nonzero(t.mask.numpy())) + stray
        total = int(np.prod(t.weight.shape))
        rows.append(dict(layer=t.state.label, path=t.key,
                         shape=tuple(t.weight.shape), pattern=str(t.pattern),
                         active=active, total=total,
                         density=distributions.density_of(active, total), stray=stray))
    stray = {r["path"]: r["stray"] for r in rows if r["stray"]}
    if stray:
        user_warnings.warn(
            f"Model '{getattr(model, 'name', model)}' computes with {sum(stray.values())} "
            f"non-zero weights where its masks are 0 ({stray}); the density counts them. "
            "keras_dst.apply_masks(model) zeroes them.")
    return rows


def density(model: "keras.layers.Layer") -> float:
    """Fraction of active entries over all sparsified weights of `model`."""
    rows = layer_stats(model, "density()")
    total = sum(r["total"] for r in rows)
    if total == 0:
        raise ValueError(
            f"density(): model '{getattr(model, 'name', model)}' has no sparsified weights; "
            "make it with keras_dst.prunable() first.")
    return sum(r["active"] for r in rows) / total


def summary(model: "keras.layers.Layer", print_fn: Callable[[str], Any] = print) -> None:
    """Prints a table of layer, weight shape, pattern, active/total and density per weight.

    Columns widen to fit (a library model's layer paths are long).

    Raises:
      TypeError: `print_fn` is not callable.
      ValueError: `model` has no sparse layers (as `density`).
    """
    if not callable(print_fn):
        raise TypeError(f"summary(): print_fn must be callable, got print_fn={print_fn!r}.")
    rows = layer_stats(model, "summary()")
    wl = max([28] + [len(r["layer"]) for r in rows])
    wp = max([34] + [len(r["path"]) for r in rows])
    header = (f"{'layer':<{wl}} {'weight':<{wp}} {'shape':<20} {'pattern':<12} "
              f"{'active/total':>22} {'density':>8}")
    lines = [header, "-" * len(header)]
    for r in rows:
        counts = f"{r['active']}/{r['total']}"
        lines.append(f"{r['layer']:<{wl}} {r['path']:<{wp}} {str(r['shape']):<20} "
                     f"{r['pattern']:<12} {counts:>22} {r['density']:>8.4f}")
    active = sum(r["active"] for r in rows)
    total = sum(r["total"] for r in rows)
    lines.append("-" * len(header))
    lines.append(f"{'total':<{wl + wp + 35}} {f'{active}/{total}':>22} "
                 f"{distributions.density_of(active, total):>8.4f}")
    print_fn("\n".join(lines))
