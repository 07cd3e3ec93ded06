"""Hooks into `optimizer.apply`: where the DST update meets the training step.

Every Keras `train_step` (the built-in one, a user's custom one, a subclassed
model's) ends in ``optimizer.apply(grads, variables)``. Hooking that call gives a
DST update everything it needs, inside the compiled step and with no second
training loop:

* the raw, *dense* loss gradients of the sparsified weights (the forward pass
  uses the stored kernels, whose inactive entries are 0, so their gradient is the
  true dense gradient) — free, they are the tensors the optimizer receives;
* the two orderings of the reference: `before_apply` runs ahead of the optimizer
  update ("after" ordering: prune/grow on pre-step weights), `after_apply` runs
  once the update and the mask constraints are done ("before" ordering).

With a `LossScaleOptimizer` the hook sits on the *inner* optimizer, which only
runs on finite steps: a step skipped for overflow neither advances the DST step
counter (`inner.iterations`) nor touches the topology, and the gradients seen
are already unscaled.
"""

import keras
import tensorflow as tf

from keras_dst import compat

_HOOKS_ATTR = "_keras_dst_hooks"
_ORIGINAL_ATTR = "_keras_dst_original_apply"


def base_optimizer(optimizer):
    """The optimizer that actually updates variables (unwraps loss scaling)."""
    while hasattr(optimizer, "inner_optimizer"):
        optimizer = optimizer.inner_optimizer
    return optimizer


def install(optimizer, hook, first=False):
    """Adds `hook` (an object with before_apply/after_apply) to `optimizer`.

    Hooks run in the order they were installed; ``first=True`` puts `hook` ahead
    of the others (an observer that must see the state before any update).

    Both methods are called as ``method(optimizer, grads_by_variable)`` where
    `grads_by_variable` maps ``id(variable)`` to its gradient tensor (or None).
    A hook whose attribute ``traced`` is False is skipped: the calls happen
    when a training function is traced, so it is left out of the functions
    traced meanwhile (see `callbacks.StepSwitch`).
    """
    optimizer = base_optimizer(optimizer)
    if getattr(optimizer, "gradient_accumulation_steps", None):
        raise NotImplementedError(
            "keras_dst does not support optimizers with gradient_accumulation_steps yet.")
    hooks = optimizer.__dict__.setdefault(_HOOKS_ATTR, [])
    if hook not in hooks:
        hooks.insert(0, hook) if first else hooks.append(hook)
    if _ORIGINAL_ATTR not in optimizer.__dict__:
        original = optimizer.apply

        def apply(grads, trainable_variables=None):
            variables = (list(trainable_variables) if trainable_variables is not None
                         else list(compat.optimizer_trainable_variables(optimizer)))
            grads = list(grads)
            by_var = {id(v): g for v, g in zip(variables, grads)}
            hooks = [h for h in optimizer.__dict__[_HOOKS_ATTR] if getattr(h, "traced", True)]
            for h in hooks:
                h.before_apply(optimizer, by_var)
            result = original(grads, trainable_variables)
            for h in hooks:
                h.after_apply(optimizer, by_var)
            return result

        optimizer.__dict__[_ORIGINAL_ATTR] = original
        optimizer.apply = apply
    return optimizer


def uninstall(optimizer, hook):
    """Removes `hook`; restores the plain `apply` when no hook is left."""
    optimizer = base_optimizer(optimizer)
    hooks = optimizer.__dict__.get(_HOOKS_ATTR, [])
    if hook in hooks:
        hooks.remove(hook)
    if not hooks and _ORIGINAL_ATTR in optimizer.__dict__:
        del optimizer.__dict__["apply"]
        del optimizer.__dict__[_ORIGINAL_ATTR]


def _slot_lists(optimizer) -> dict:
    trainable = compat.optimizer_trainable_variables(optimizer)
    n = len(trainable)
    return {name: value for name, value in vars(optimizer).items()
            if isinstance(value, list) and n and len(value) == n
            and value is not trainable
            and all(v is None or isinstance(v, keras.Variable) for v in value)
            and any(v is not None for v in value)}


def slot_variables(optimizer, variable) -> dict:
    """Per-weight optimizer state of `variable` as ``{slot list name: variable}``.

    Found generically: every list attribute of the optimizer holding one entry
    per trainable variable (SGD ``momentums``, Adam ``_momentums`` and
    ``_velocities``, ...). Empty for stateless optimizers.
    """
    optimizer = base_optimizer(optimizer)
    index = compat.optimizer_variable_index(optimizer, variable)
    return {name: slots[index] for name, slots in _slot_lists(optimizer).items()
            if slots[index] is not None and tuple(slots[index].shape) == tuple(variable.shape)}


def unmapped_state(optimizer, variables=None) -> list:
    """Per-weight optimizer variables that `slot_variables` cannot attribute to a weight.

    Those in no per-weight slot list, and slots whose shape is not their weight's
    (e.g. Adafactor's factored second moments of a kernel: their entries cannot be
    reset per weight entry). With `variables`, only the slots of those weights
    count in the second group.
    """
    optimizer = base_optimizer(optimizer)
    wanted = None if variables is None else {id(v) for v in variables}
    mapped = set()
    for slots in _slot_lists(optimizer).values():
        for weight, slot in zip(compat.optimizer_trainable_variables(optimizer), slots):
            if slot is not None and (len(slot.shape) == 0
                                     or tuple(slot.shape) == tuple(weight.shape)
                                     or (wanted is not None and id(weight) not in wanted)):
                mapped.add(id(slot))
    return [v for v in optimizer.variables if len(v.shape) > 0 and id(v) not in mapped]


def momentum(optimizer, variable):
    """The momentum signal of `variable` for momentum growth, or None.

    SGD: its momentum buffer; Adam-like (first and second moments): m / (sqrt(v) + 1e-8)
    (raw, not bias-corrected, as the reference); other optimizers with a
    ``_momentums`` list: that buffer.
    """
    first, second = compat.moment_slots(slot_variables(optimizer, variable))
    if first is None:
        return None
    if second is not None:
        return first / (tf.sqrt(second) + 1e-8)
    return first + 0.0
