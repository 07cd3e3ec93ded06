"""The optimizer's per-weight state, found generically (floor 2).

`slot_variables` maps a weight to its optimizer slots (SGD momentum, Adam's
moments, ...), which ``optimizer_state="reset"`` restores to their initial value
(`initial_slot_value`) where a mask changed;
`momentum` gives the signal of momentum growth (SNFS); `base_optimizer` unwraps
loss scaling (the inner optimizer is the one that updates variables).
"""

import tensorflow as tf

from keras_dst import compat


def base_optimizer(optimizer):
    """The optimizer that actually updates variables (unwraps loss scaling)."""
    while hasattr(optimizer, "inner_optimizer"):
        optimizer = optimizer.inner_optimizer
    return optimizer


def slot_variables(optimizer, variable) -> dict:
    """Per-weight optimizer state of `variable` as ``{slot list name: variable}``.

    Found generically: every list attribute of the optimizer holding one entry
    per trainable variable (SGD ``momentums``, Adam ``_momentums`` and
    ``_velocities``, ...). Empty for stateless optimizers.
    """
    optimizer = base_optimizer(optimizer)
    index = compat.optimizer_variable_index(optimizer, variable)
    return {name: slots[index] for name, slots in compat.optimizer_slot_lists(optimizer).items()
            if slots[index] is not None and tuple(slots[index].shape) == tuple(variable.shape)}


def initial_slot_value(optimizer, slot_list: str) -> float:
    """What the slots of list `slot_list` (a key of `slot_variables`) hold before the
    optimizer's first step, which ``optimizer_state="reset"`` restores: 0, except the
    accumulators of optimizers that start them at ``initial_accumulator_value``
    (Adagrad, Ftrl: Ftrl's step divides by the accumulator's root, so at 0 an entry
    without a gradient becomes NaN).
    """
    optimizer = base_optimizer(optimizer)
    if "accumulator" in slot_list and hasattr(optimizer, "initial_accumulator_value"):
        return float(optimizer.initial_accumulator_value)
    return 0.0


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
    for slots in compat.optimizer_slot_lists(optimizer).values():
        for weight, slot in zip(compat.optimizer_trainable_variables(optimizer), slots):
            if slot is not None and (len(slot.shape) == 0
                                     or tuple(slot.shape) == tuple(weight.shape)
                                     or (wanted is not None and id(weight) not in wanted)):
                mapped.add(id(slot))
    return [v for v in optimizer.variables if len(v.shape) > 0 and id(v) not in mapped]


def momentum(optimizer, variable):
    """The momentum signal of `variable` for momentum growth, or None.

    SGD: its momentum buffer; Adam-like (first and second moments): m / (sqrt(v) + 1e-8)
    (raw, not bias-corrected, as the reference); Adamax: m / (u + 1e-8), its
    infinity norm u in the place of sqrt(v); other optimizers with a ``_momentums``
    list (Lion, Muon, RMSprop, whose buffer is already divided by sqrt(v)): that buffer.
    """
    first, second, root = compat.moment_slots(base_optimizer(optimizer),
                                              slot_variables(optimizer, variable))
    if first is None:
        return None
    if second is not None:
        return first / ((tf.sqrt(second) if root else second) + 1e-8)
    return first + 0.0
