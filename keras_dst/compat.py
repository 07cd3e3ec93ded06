"""Every use of Keras internals (private attributes, `keras.src`) in keras_dst.

keras_dst needs a few things Keras 3 has no public API for. Each one is wrapped
here, in one function, so that a Keras upgrade that changes an internal breaks
this file (and exactly one test of tests/test_compat.py) and nothing else. The
rest of the package calls these functions and never touches a private Keras
attribute.

Written against, and tested with, Keras 3.15 (TensorFlow backend). Every
docstring names the internal it relies on, the Keras versions that have it and
the public API it stands in for, if any.
"""

import sys
from typing import Optional

import keras
from keras.src.backend.tensorflow import trainer as tf_trainer
from keras.src.saving import serialization_lib
from keras.src.trainers import trainer as trainer_lib


def safe_mode_scope(safe_mode):
    """A context manager that sets Keras's deserialization safe mode inside it.

    Relies on `keras.src.saving.serialization_lib.SafeModeScope` (Keras 3, checked on
    3.15; it saves and restores the global "safe_mode_saving" flag).
    The public `keras.config.enable_unsafe_deserialization()` switches safe mode
    off for the whole process with no way back; a scope is needed to re-create a
    caller's own layers (a `Lambda` included) and leave the flag as it was.
    """
    return serialization_lib.SafeModeScope(safe_mode)


def flatten_layers(layer, include_self: bool = False) -> list:
    """Every layer nested inside `layer` (itself first with `include_self`), at any depth,
    each once, depth first in model order (a layer, then the layers inside it, in the
    order it tracks them).

    Relies on ``Layer._flatten_layers(include_self=False, recursive=False)`` (Keras 3,
    checked on 3.15): the layers Keras tracks on a layer (including a `Wrapper`'s
    inner layer, the sub-layers of `MultiHeadAttention`, the layers of nested models
    and of subclassed models/layers), in order. (Its ``recursive=True`` lists the
    layers of a nested model in reverse.) No public API lists them: `Model.layers`
    is one level only, and a plain `Layer` has no ``layers``.
    """
    result, seen = [], {id(layer)}

    def visit(parent):
        for child in parent._flatten_layers(include_self=False, recursive=False):
            if id(child) not in seen:
                seen.add(id(child))
                result.append(child)
                visit(child)

    visit(layer)
    return [layer] + result if include_self else result


def is_graph_model(model) -> bool:
    """True for a Sequential or functional model (one `keras.models.clone_model` rebuilds).

    Keras exports no `Functional` class: `keras.Model(inputs, outputs)` returns
    an instance of `keras.src.models.functional.Functional`, recognised here by
    its class name (Keras 3, checked on 3.15). ``_is_graph_network`` is the
    tf.keras / Keras 2 flag for the same thing; Keras 3 never sets it, it is
    read (default False) for models that still carry it. A subclass of
    `keras.Model` built functionally (``super().__init__(inputs, outputs)``) has
    its own class name and counts as subclassed.
    """
    return isinstance(model, keras.Sequential) or getattr(model, "_is_graph_network", False) \
        or type(model).__name__ == "Functional"


def optimizer_trainable_variables(optimizer) -> list:
    """The variables `optimizer` was built for, in its build order (its own list object).

    Relies on ``BaseOptimizer._trainable_variables`` (Keras 3, checked on 3.15),
    set by ``optimizer.build(variables)``; ``optimizer.apply(grads)`` without
    variables updates these. Keras 3 optimizers have no public
    ``trainable_variables`` (``optimizer.variables`` is the optimizer's own
    state: iterations, learning rate, slots).
    """
    return optimizer._trainable_variables


def optimizer_variable_index(optimizer, variable) -> int:
    """Index of `variable` in the optimizer's build order (and in its per-weight slot lists).

    Relies on ``BaseOptimizer._get_variable_index`` (Keras 3, checked on 3.15;
    a dict keyed by ``id(variable)`` filled by `build`), which Keras's own
    ``update_step`` implementations use to find a weight's slots. Raises
    KeyError for a variable the optimizer was not built for. No public API.
    """
    return optimizer._get_variable_index(variable)


def optimizer_slot_lists(optimizer) -> dict:
    """The per-weight state of `optimizer` (a base optimizer) as ``{attribute name: list}``:
    every list attribute that holds one entry (a variable, or None) per variable it was
    built for, in the same order (SGD ``momentums``, Adam ``_momentums`` and
    ``_velocities``, ...).

    Relies on Keras's optimizers keeping such lists as instance attributes, most of them
    private (Keras 3, checked on 3.15); found by their shape, not their names, so an
    optimizer of a user's keeps its own slots too. No public API maps a weight to its
    optimizer state.
    """
    trainable = optimizer_trainable_variables(optimizer)
    n = len(trainable)
    # (not its list of all its variables, ``_variables``, which has n entries by chance
    # where n is 2 + its slot count: the step counter is among them)
    return {name: value for name, value in vars(optimizer).items()
            if isinstance(value, list) and n and len(value) == n
            and value is not trainable
            and all(v is None or isinstance(v, keras.Variable) for v in value)
            and any(v is not None for v in value)
            and not any(v is optimizer.iterations for v in value)}


def moment_slots(optimizer, slots) -> tuple:
    """The moment buffers among the per-weight slots of one weight: ``(first, second, root)``.

    `slots` maps the attribute of `optimizer` (a base optimizer) that holds a
    per-weight slot list to that weight's slot (`optimizer_state.slot_variables`).
    Relies on the attribute names of Keras's optimizers (Keras 3, checked on 3.15):
    Adam, AdamW, Nadam, Lamb keep ``_momentums`` (first moment) and ``_velocities``
    (second); Adamax keeps ``_m`` and ``_u`` (the infinity norm that its step
    divides by, where Adam's divides by the root of its second moment); SGD keeps
    its momentum buffer in ``momentums``, Lion and Muon in ``_momentums``, and so
    does RMSprop with momentum, though it also keeps ``_velocities``: its buffer
    sums steps already divided by their root (as ``torch.optim.RMSprop``'s
    ``momentum_buffer``, which the reference reads alone). Returns
    ``(m, v, True)`` for Adam's moments (the step scales by ``1 / sqrt(v)``),
    ``(m, u, False)`` for Adamax's (by ``1 / u``), ``(buffer, None, False)`` for a
    momentum buffer alone, ``(None, None, False)`` otherwise. No public API.
    """
    if isinstance(optimizer, keras.optimizers.RMSprop):
        return slots.get("_momentums"), None, False
    if "_momentums" in slots and "_velocities" in slots:
        return slots["_momentums"], slots["_velocities"], True
    if "_m" in slots and "_u" in slots:
        return slots["_m"], slots["_u"], False
    for name in ("momentums", "_momentums"):
        if name in slots:
            return slots[name], None, False
    return None, None, False


def wrap_deferred_initializer(variable, wrap) -> bool:
    """Replaces the pending initializer of a not-yet-initialised `variable` by `wrap(it)`.

    A variable created inside a stateless scope (the symbolic build Keras runs
    for subclassed models) keeps its initializer and is initialised later, from
    ``variable._initializer`` (Keras 3, checked on 3.15:
    ``KerasVariable._deferred_initialize``). Returns True when there was one to
    wrap, False for an initialised variable (then write its value instead). No
    public API.
    """
    pending = getattr(variable, "_initializer", None)
    if pending is None:
        return False
    variable._initializer = wrap(pending)
    return True


def on_raw_variables(variable, install) -> None:
    """Calls ``install(raw)`` for each `tf.Variable` that holds `variable`'s value: now,
    or right after its deferred initialisation creates them.

    Keras 3's TensorFlow backend keeps a `KerasVariable`'s value in ``_value``, a
    `tf.Variable` (one per replica inside a distributed variable's ``values``;
    checked on 3.15), created later for a variable made inside a stateless scope
    (``KerasVariable._deferred_initialize``). Some Keras code writes that
    `tf.Variable` directly, past ``KerasVariable.assign``: the optimizer's EMA
    overwrite (``TFOptimizer._overwrite_model_variables_with_average_value``, at
    the end of `fit` with ``use_ema=True``). No public API.
    """
    raws = _raw_variables(variable)
    if raws:
        for raw in raws:
            install(raw)
        return
    deferred = variable._deferred_initialize

    def deferred_initialize():
        deferred()
        variable.__dict__.pop("_deferred_initialize", None)
        for raw in _raw_variables(variable):
            install(raw)

    variable._deferred_initialize = deferred_initialize


def checkpoint_restore_waits_for(trackable, name: str) -> bool:
    """Whether a `tf.train.Checkpoint` restore called earlier waits for `trackable` to get
    a dependency called `name` (TensorFlow's ``Trackable._deferred_dependencies``: it
    restores that dependency's variables as soon as it is assigned). No public API."""
    return name in getattr(trackable, "_deferred_dependencies", {})


def delete_checkpoint_dependency(trackable, name: str) -> None:
    """Removes `trackable`'s attribute `name` and its dependency in TensorFlow's object
    graph, also after an assignment that raised half way. TensorFlow's
    ``Trackable._track_trackable`` (checked on 2.21) appends the reference to
    ``_self_unconditional_checkpoint_dependencies``, restores what waited for it (which
    may raise), then records the name, and only then is the attribute set; deleting an
    attribute (``AutoTrackable.__delattr__``) drops a recorded one. No public API."""
    if name in trackable.__dict__:
        delattr(trackable, name)
        return
    references = getattr(trackable, "_self_unconditional_checkpoint_dependencies", None)
    if references is not None:
        references[:] = [r for r in references if r.name != name]


def on_checkpoint_restore(variable, assign) -> None:
    """Makes a `tf.train.Checkpoint` restore of `variable` call ``assign(value)``.

    Keras 3's TensorFlow `Variable._restore_from_tensors` (the `Trackable` method a
    checkpoint restore calls; checked on 3.15) writes its `tf.Variable` through the
    handle, past every ``assign``. An instance-level override (removed by deleting
    the instance attribute ``_restore_from_tensors``) takes its place; the value comes
    under TensorFlow's ``"VARIABLE_VALUE"`` key. No public API.
    """

    def restore_from_tensors(restored_tensors):
        return assign(restored_tensors["VARIABLE_VALUE"])

    variable._restore_from_tensors = restore_from_tensors


def off_checkpoint_restore(variable) -> None:
    """Undoes `on_checkpoint_restore`: a checkpoint restore of `variable` writes through
    its class's ``_restore_from_tensors`` again."""
    variable.__dict__.pop("_restore_from_tensors", None)


def off_raw_variables(variable, attribute: str) -> None:
    """Undoes `on_raw_variables`: drops the instance attribute `attribute` that its
    `install` set on each `tf.Variable` of `variable`, or the install still pending."""
    variable.__dict__.pop("_deferred_initialize", None)
    for raw in _raw_variables(variable):
        raw.__dict__.pop(attribute, None)


def _raw_variables(variable) -> list:
    value = getattr(variable, "_value", None)
    if value is None:  # not initialised yet
        return []
    return list(getattr(value, "values", None) or (value,))


_TRAINING_ENTRIES = ("fit", "train_on_batch")


def _keras_training_entry(frame) -> Optional[str]:
    """``"fit"`` or ``"train_on_batch"`` where `frame` runs Keras's, else None."""
    name = frame.f_code.co_name
    return name if (name in _TRAINING_ENTRIES and
                    frame.f_globals.get("__name__", "").startswith("keras.")) else None


def keras_training_entry() -> Optional[str]:
    """``"fit"`` or ``"train_on_batch"`` where the function that called our caller is
    Keras's (the caller being a ``model.make_train_function`` that keras_dst installed:
    `step_switch.StepSwitch`), else None.

    Relies on Keras's trainers (``keras.src.backend.*.trainer``, Keras 3, checked on
    3.15) calling ``self.make_train_function()`` directly from ``fit`` and
    ``train_on_batch``, before their first step; read from the Python stack (CPython's
    ``sys._getframe``). Keras has no public signal that a training call begins before
    its callbacks run (a `fit` without keras_dst callbacks runs none of keras_dst's).
    """
    return _keras_training_entry(sys._getframe(2))


def inside_keras_fit(model) -> bool:
    """Whether Keras's ``fit`` of `model` is on the Python stack of the caller: a
    callback's ``on_train_begin`` called by the `fit` it belongs to, not by a
    ``keras.callbacks.CallbackList`` that a user's own loop drives (also not one that a
    callback of another model's `fit` drives). Same reliance as `keras_training_entry`,
    and on the ``self`` of Keras's ``fit``."""
    frame = sys._getframe(1)
    while frame is not None:
        if _keras_training_entry(frame) == "fit" and frame.f_locals.get("self") is model:
            return True
        frame = frame.f_back
    return False


def set_initial_epoch(model, epoch):
    """Makes the current `model.fit` call resume at `epoch` (0-based), from a callback.

    Relies on ``Trainer._initial_epoch`` (Keras 3, checked on 3.15): `fit` reads
    it after ``on_train_begin``; Keras's own `keras.callbacks.BackupAndRestore`
    sets it the same way. The public ``fit(initial_epoch=...)`` is out of a
    callback's reach.
    """
    model._initial_epoch = epoch


def build_compiled_state(model, iterator) -> None:
    """Builds `model`'s compiled metrics and loss (their variables) from the element spec
    of `iterator`, the `tf.data` iterator `fit` passes its training function, where they
    are not built yet: what Keras itself does before a `fit` under a tf.distribute
    strategy. Otherwise the first trace of the training step builds them, and
    `tf.function` traces the whole step (a DST update included) a second time, since a
    trace that created variables is not the one it keeps.

    Relies on ``Trainer._symbolic_build(data_batch=...)``, ``Trainer._compile_metrics``
    and ``Trainer._compile_loss`` (Keras 3, checked on 3.15; ``_maybe_symbolic_build``
    calls the first with a reduced batch under a strategy), and on Keras's own
    ``TensorFlowTrainer.train_step`` and ``Trainer.compute_loss`` / ``compute_metrics``:
    a model that overrides one of them may hand the metrics another ``y`` than the
    data's (which decides, e.g., the accuracy a metric "accuracy" stands for), so its
    trace builds them, as before. No public API builds them. An iterator without an
    element spec (``train_on_batch`` passes a generator) or a model Keras cannot call
    symbolically leaves them to the trace too.
    """
    own = type(model)
    if (own.train_step is not tf_trainer.TensorFlowTrainer.train_step
            or own.compute_loss is not trainer_lib.Trainer.compute_loss
            or own.compute_metrics is not trainer_lib.Trainer.compute_metrics):
        return
    unbuilt = [state for state in (getattr(model, "_compile_metrics", None),
                                   getattr(model, "_compile_loss", None))
               if state is not None and not state.built]
    spec = getattr(iterator, "element_spec", None)
    if not unbuilt or spec is None:
        return
    try:
        with model.distribute_strategy.scope():
            model._symbolic_build(data_batch=spec)
    except Exception:  # noqa: BLE001 (the trace builds them, and raises what it raises)
        pass


def tflite_schema():
    """The TFLite flatbuffer schema's Python object API (the generated module).

    Both LiteRT (``ai_edge_litert.schema_py_generated``) and TensorFlow
    (``tensorflow.lite.python.schema_py_generated``, TF 2.x, checked on 2.21) ship
    it; neither is a documented API. No public API reads a ``.tflite`` file's tensors
    and their sparsity.
    """
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:
        from tensorflow.lite.python import schema_py_generated as schema
    return schema


def child_layers(layer) -> list:
    """The layers directly inside `layer` (one level down), each once, in Keras's order.

    Relies on ``Layer._flatten_layers(include_self=False, recursive=False)`` (Keras 3,
    checked on 3.15): the layers Keras tracks on `layer` itself (attributes, lists and
    dicts of layers, a `Wrapper`'s inner layer, a functional model's graph layers).
    `flatten_layers` is the same walk at every depth; no public API gives one level.
    """
    return list(layer._flatten_layers(include_self=False, recursive=False))


def set_own_variables_io(layer, save=None, load=None):
    """Makes Keras's saving call ``save(store)`` / ``load(store)`` for `layer`'s own state.

    Keras writes and reads a layer's entry of a weights file (``model.save``,
    ``save_weights``, ``load_weights``, ``load_model``, and so `BackupAndRestore`
    and `ModelCheckpoint`) by calling ``layer.save_own_variables(store)`` and
    ``layer.load_own_variables(store)``, looked up on the layer object
    (``keras.src.saving.saving_lib._save_state`` / ``_load_state``, Keras 3, checked on
    3.15), so a function set on the instance replaces the class's method for that
    layer only. Those two methods are Keras's documented extension point, but for a
    class one writes; a library's layer can only be given them per instance.
    A None argument restores the class's method.
    """
    for name, function in (("save_own_variables", save), ("load_own_variables", load)):
        if function is None:
            layer.__dict__.pop(name, None)
        else:
            layer.__dict__[name] = function


def created_trainable(layer) -> list:
    """The variables that `layer` and the layers inside it created trainable, whether or
    not they are frozen now.

    Relies on ``Layer._trainable_variables`` (Keras 3, checked on 3.15): the variables a
    layer tracks as created with ``trainable=True``. ``layer.trainable = False`` sets
    each of them to ``trainable=False`` but leaves them in that list (and sets them back
    when the layer is unfrozen), so it tells a frozen weight from a weight that is never
    trained (a statistic, a fixed embedding). The public ``Variable.trainable`` and
    ``layer.trainable_weights`` reflect the freezing and cannot.
    """
    return [v for inner in flatten_layers(layer, include_self=True)
            for v in getattr(inner, "_trainable_variables", ())]


def unquantized_policy(policy):
    """The dtype policy a quantized one was made from (``"float8_from_mixed_bfloat16"`` ->
    ``"mixed_bfloat16"``); any other policy as it is.

    Keras names a quantized policy ``"<mode>_from_<source policy>"``
    (``keras.src.dtype_policies.QuantizedDTypePolicy``, Keras 3.0 to 3.15; the source
    policy is kept in its private ``_source_name`` only). A wrapper around a quantized
    layer takes the source policy: with the quantized one, Keras would route the
    wrapper's own call to a quantized call it does not have.
    """
    if not getattr(policy, "quantization_mode", None):
        return policy
    return keras.dtype_policies.get(policy.name.split("_from_", 1)[1])


def inferred_input_signature(model):
    """The input signature Keras's ``model.export`` infers for a built `model` (a
    list of one structure of `keras.InputSpec`, e.g. ``[{"a": InputSpec, ...}]``).

    Relies on `keras.src.export.export_utils.get_input_signature` (Keras 3, checked on
    3.15): ``model.export`` calls it when no ``input_signature`` is given, and has no
    public way to return it. `keras_dst.export` reads it to name the inputs of a
    subclassed model called on a dict (Keras leaves them unnamed: ``args_0``, ...).
    """
    from keras.src.export import export_utils

    return export_utils.get_input_signature(model)
