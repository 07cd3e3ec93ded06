"""The hook protocol: where an update meets the training step (floor 5).

Every Keras `train_step` (the built-in one, a user's custom one, a subclassed
model's) ends in ``optimizer.apply(grads, variables)``. A `Hook` installed on
the optimizer is traced into that call, so an update gets everything it needs
inside the compiled step, with no second training loop:

* the raw, *dense* loss gradients of the sparsified weights (the forward pass
  uses the stored kernels, whose inactive entries are 0, so their gradient is the
  true dense gradient): free, they are the tensors the optimizer receives;
* two places to run: `Hook.before_apply`, ahead of the optimizer's update, and
  `Hook.after_apply`, once the update and the mask constraints are done (or, for
  the weights the hook lists in `Hook.late_constraints`, before their constraints,
  which then run once after it).

With a `LossScaleOptimizer` the hooks sit on the *inner* optimizer, which only
runs on finite steps: a step skipped for overflow neither advances the step
counter (``inner.iterations``) nor reaches the hooks, and the gradients seen are
already unscaled. An optimizer's own ``loss_scale_factor`` is divided out of the
gradients the hooks see, as the optimizer divides it out of its update.

Which installed hooks a traced function contains is decided by the step switch
(`keras_dst.step_switch`) through `tracing`: a hook that cannot update in an
execution is left out of the function compiled for it, and a function traced
outside `tracing` contains none.
"""

import contextlib
import uuid

import tensorflow as tf

from keras_dst import compat, user_warnings
from keras_dst.optimizer_state import base_optimizer
from keras_dst.schedules import UpdateSteps

_HOOKS_ATTR = "_keras_dst_hooks"
_ORIGINAL_ATTR = "_keras_dst_original_apply"
_TRACED_ATTR = "_keras_dst_traced"


def step_gradients(owner: str, optimizer, targets, grads_by_variable) -> list:
    """The dense float32 gradient of each target's weight in this ``apply``, in order.

    Each is of the weight's shape: a `tf.IndexedSlices` (an Embedding's) summed into
    its rows, a gradient of unknown static shape reshaped; a weight this ``apply``
    does not update gets zeros, with a warning (at trace time) naming `owner`, the
    callback: right for a weight the loss does not reach (a train_step may leave
    those out), but another optimizer may train it (a GAN's), whose gradients and
    steps the hook never sees.

    Args:
      owner: the callback's name, for the warning.
      optimizer: the hooked optimizer.
      targets: the `masks.SparseTarget`s whose gradients the hook reads.
      grads_by_variable: ``id(variable) -> gradient`` of the ``apply`` (see `Hook`).
    """
    missing = [t.key for t in targets if grads_by_variable.get(id(t.weight)) is None]
    if missing:
        user_warnings.warn(
            f"{owner}: the optimizer it hooks ('{optimizer.name}', the one the model was "
            f"compiled with) does not update the sparse weights {missing} in this training "
            "step; their scores take their gradient as 0. If another optimizer trains them "
            f"(a GAN's, say), {owner} never sees their gradients or steps: make only the "
            "part of the model that model.optimizer trains sparse "
            "(keras_dst.prunable(model.part, ..., in_place=True)).")
    grads = []
    for t in targets:
        g = grads_by_variable.get(id(t.weight))
        if g is None:
            g = tf.zeros(t.weight.shape, tf.float32)
        elif isinstance(g, tf.IndexedSlices):  # an Embedding's: dense, of static shape
            g = tf.math.unsorted_segment_sum(g.values, g.indices, t.weight.shape[0])
        elif not g.shape.is_fully_defined():  # (one made dense already, e.g. keras-hub's)
            g = tf.reshape(g, t.weight.shape)
        grads.append(tf.cast(g, tf.float32))
    return grads


def summed_over_replicas(grads: list, needed: bool = True) -> list:
    """`grads` summed over the replicas of a tf.distribute strategy (as they are with one
    replica or outside a strategy): every replica then scores with the same gradient, so
    their masks agree. Nones where not `needed` (no rule of the run declares
    `needs_gradient`): a rule that reads them all the same fails, named, rather than
    score with gradients that were not summed (masks that would differ)."""
    if not needed:
        return [None] * len(grads)
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return list(grads)
    return ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)


def state_variable(value, name):
    """A non-trainable tf.Variable written from the compiled step (first replica wins)."""
    return tf.Variable(value, trainable=False, name=name,
                       synchronization=tf.VariableSynchronization.ON_WRITE,
                       aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)


class Hook:
    """Base of the engines that run inside ``optimizer.apply``.

    A hook declares:

    * `before_apply` / `after_apply` ``(optimizer, grads_by_variable)``: graph
      code traced ahead of the optimizer's update, or after it and its
      constraints. `grads_by_variable` maps ``id(variable)`` to its gradient
      tensor (or None). Both default to doing nothing.
    * `update_steps` (`schedules.UpdateSteps`): the steps at which it may change
      state. Step ``t`` of that rule is run in the ``optimizer.apply`` of the
      (1-based) optimizer step ``t - step_offset``.
    * `step_offset`: 0 when the hook updates for the optimizer step it runs in,
      1 when it prepares the next step (gradual pruning prunes at the end of
      step ``t - 1`` the masks that step ``t`` trains with).
    * `runs_every_step`: True when it must be traced into every compiled step
      (e.g. it keeps running scores); False lets the step switch leave it out of
      executions that hold no update step.
    * `first`: install ahead of the other hooks (an observer that must see the
      state before any update of the same step).
    * `last_update_step`: int64 variable, the step of its last update (-1: none
      yet); the host reads its logs again when it changes. It and the other
      variables of its logs' numbers (made with `observed`) are not part of a
      model's state: `forget_updates` puts them back where a restore took the
      model back before the last update.
    * `late_constraints`: the weights whose constraints may wait until after its
      `after_apply` (none by default).
    * `writes_masks`: True when its updates change masks (one such hook per
      `fit`); False for an observer.
    * `reached_apply`: set True once an ``optimizer.apply`` that contains it runs or
      is traced; False after a training step means that step never calls the
      hooked optimizer (its `train_step` applies optimizers of its own).

    Args:
      update_steps: the `UpdateSteps` of this hook.
    """

    step_offset = 0
    runs_every_step = False
    first = False
    writes_masks = True
    reached_apply = False

    def __init__(self, update_steps: UpdateSteps):
        self.update_steps = update_steps
        self.uid = uuid.uuid4().hex  # (which a deep copy keeps, as the engine it copies)
        self._observed = []
        self.last_update_step = self.observed(tf.constant(-1, tf.int64),
                                              f"{type(self).__name__}_last_update_step")

    def observed(self, value, name):
        """A `state_variable` of the numbers its logs show (not needed to resume), which
        `forget_updates` puts back to `value`."""
        variable = state_variable(value, name)
        self._observed.append((variable, value))
        return variable

    def forget_updates(self) -> None:
        """Puts the logs' numbers back to before any update (host): a restore took the
        model back before the last update they describe, which a resumed fit replays."""
        for variable, value in self._observed:
            variable.assign(value)

    def before_apply(self, optimizer, grads_by_variable):
        del optimizer, grads_by_variable

    def after_apply(self, optimizer, grads_by_variable):
        del optimizer, grads_by_variable

    def late_constraints(self, variables) -> list:
        """Of `variables` (those an ``apply`` updates), the ones whose constraint may run
        after this hook's `after_apply` rather than inside the optimizer's update.

        A hook lists a weight here only if its `after_apply` gives the same result
        either way (e.g. it reads the weight through the mask its constraint
        applies). The constraint then runs once, after the hook, where XLA can
        update the weight in place across an update loop that writes it (see
        `install`). Honoured only when the hook is the only one traced into the
        ``apply``. Default: none.
        """
        del variables
        return []

    def may_update_between(self, first: int, last: int) -> bool:
        """Can an ``optimizer.apply`` of the optimizer steps [first, last] update? (host)"""
        return self.update_steps.any_between(first + self.step_offset, last + self.step_offset)


def run_if(pred, fn, tensors=()):
    """Runs ``fn(*tensors)`` (traced graph code with side effects) only when `pred` holds.

    A loop of 0 or 1 trips, not a `tf.cond`: XLA keeps a loop's state in
    place, whereas a cond copies every variable its true branch writes through
    the false branch at every call. `tensors` reach `fn` through a select on the
    trip counter, so nothing computed from them can be hoisted out of the loop
    into the steps that do not update.

    The zero of that select is a scalar (broadcast), as everywhere a traced write
    zeroes entries: TensorFlow's graph optimizer folds a ``zeros_like`` of a static
    shape into a constant of that size before XLA sees it, at every compile (tens of
    milliseconds per megabyte).

    Args:
      pred: scalar bool tensor.
      fn: callable taking the gated `tensors`; its return value is ignored.
      tensors: tensors (or None) that `fn` reads and the loop does not write.
    """
    if tf.executing_eagerly():  # (`run_eagerly=True`: no loop to keep in place)
        if bool(pred):
            fn(*tensors)
        return

    def body(trip):
        first = tf.equal(trip, 0)
        gated = [t if t is None else tf.where(first, t, tf.zeros([], t.dtype)) for t in tensors]
        fn(*gated)
        return trip + 1

    tf.while_loop(lambda trip: trip < tf.cast(pred, tf.int32), body,
                  [tf.constant(0, tf.int32)], maximum_iterations=1)


def _unscaled(optimizer, grads) -> list:
    """`grads` divided by the optimizer's ``loss_scale_factor``, as its ``apply`` divides them.

    Keras multiplies the loss by ``loss_scale_factor`` in ``train_step`` and divides the
    gradients by it inside ``apply``: the hooks get the gradients of the loss itself.
    """
    scale = getattr(optimizer, "loss_scale_factor", None)
    if scale is None:
        return grads
    return [None if g is None
            else tf.IndexedSlices(g.values / scale, g.indices, g.dense_shape)
            if isinstance(g, tf.IndexedSlices) else g / scale for g in grads]


def installed(optimizer) -> list:
    """The hooks installed on `optimizer` (its base optimizer), in call order."""
    return list(base_optimizer(optimizer).__dict__.get(_HOOKS_ATTR, []))


@contextlib.contextmanager
def _constraints_removed(variables):
    """Within the block, `variables` have no constraint; yields ``[(variable, constraint)]``."""
    removed = [(v, v.constraint) for v in variables if v.constraint is not None]
    for v, _ in removed:
        v.constraint = None
    try:
        yield removed
    finally:
        for v, c in removed:
            v.constraint = c


def install(optimizer, hook: Hook):
    """Adds `hook` to `optimizer`'s ``apply`` (its base optimizer's: see `base_optimizer`).

    Hooks run in the order they were installed, except that a hook with
    ``first = True`` goes ahead of the others. Returns the base optimizer.

    The traced ``apply`` runs every hook's `Hook.before_apply`, the optimizer's
    update with its constraints, then every hook's `Hook.after_apply`. When one hook
    is traced, the constraints of the weights it lists in `Hook.late_constraints`
    run after its `after_apply` instead: a weight written by the optimizer, then
    maybe by an update loop, then by its constraint is updated in place, where a
    constraint ahead of the loop makes XLA copy the weight, or its mask, at every
    step.
    """
    optimizer = base_optimizer(optimizer)
    if getattr(optimizer, "gradient_accumulation_steps", None):
        raise NotImplementedError(
            f"keras_dst does not support gradient accumulation yet: optimizer "
            f"{type(optimizer).__name__} has gradient_accumulation_steps="
            f"{optimizer.gradient_accumulation_steps}; compile with an optimizer without it.")
    hooks = optimizer.__dict__.setdefault(_HOOKS_ATTR, [])
    if hook not in hooks:
        hooks.insert(0, hook) if hook.first else hooks.append(hook)
    if _ORIGINAL_ATTR not in optimizer.__dict__:
        original = optimizer.apply

        def apply(grads, trainable_variables=None):
            variables = (list(trainable_variables) if trainable_variables is not None
                         else list(compat.optimizer_trainable_variables(optimizer)))
            grads = list(grads)
            by_variable = {id(v): g for v, g in zip(variables, _unscaled(optimizer, grads))}
            if _TRACED_ATTR not in optimizer.__dict__:  # no step switch is running: the
                for h in list(optimizer.__dict__[_HOOKS_ATTR]):  # fit of these hooks raised
                    uninstall(optimizer, h)
                return original(grads, trainable_variables)
            traced = optimizer.__dict__[_TRACED_ATTR]
            hooks = [h for h in optimizer.__dict__[_HOOKS_ATTR] if h in traced]
            for h in hooks:
                h.reached_apply = True
            late = hooks[0].late_constraints(variables) if len(hooks) == 1 else []
            for h in hooks:
                h.before_apply(optimizer, by_variable)
            with _constraints_removed(late) as removed:
                result = original(grads, trainable_variables)
            for h in hooks:
                h.after_apply(optimizer, by_variable)
            for variable, constraint in removed:
                variable.assign(constraint(variable))
            return result

        optimizer.__dict__[_ORIGINAL_ATTR] = original
        optimizer.apply = apply
    return optimizer


def uninstall(optimizer, hook: Hook):
    """Removes `hook`; restores the plain ``apply`` when no hook is left."""
    optimizer = base_optimizer(optimizer)
    hooks = optimizer.__dict__.get(_HOOKS_ATTR, [])
    if hook in hooks:
        hooks.remove(hook)
    if not hooks and _ORIGINAL_ATTR in optimizer.__dict__:
        del optimizer.__dict__["apply"]
        del optimizer.__dict__[_ORIGINAL_ATTR]


@contextlib.contextmanager
def tracing(optimizer, hooks):
    """Within the block, a traced ``apply`` contains only the installed hooks in `hooks`.

    Outside any such block it contains none: a training function that is not the
    step switch's (a `compile()` made after a `fit` that raised, a user's own
    loop) traces the plain ``apply`` and uninstalls the hooks that such a `fit`
    left installed.

    (The hooks are read when, and only when, a function calling ``apply`` is
    traced: `step_switch.StepSwitch` wraps each call of its functions in this.)
    """
    optimizer = base_optimizer(optimizer)
    previous = optimizer.__dict__.get(_TRACED_ATTR)
    optimizer.__dict__[_TRACED_ATTR] = frozenset(hooks)
    try:
        yield
    finally:
        if previous is None:
            optimizer.__dict__.pop(_TRACED_ATTR, None)
        else:
            optimizer.__dict__[_TRACED_ATTR] = previous
