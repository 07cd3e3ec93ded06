"""The DST topology update, as it runs inside the compiled training step.

`TopologyEngine` is an optimizer hook (see `optimizer_hook`). At every optimizer
step it checks, on device, whether the step is an update step
(``t % update_every == 0`` and ``t <= end_step``, with ``t`` the 1-based index of
the optimizer step) and, inside a `tf.cond`, prunes and regrows every sparsified
weight:

1. ``r_l = ceil(p(t) * active_l)`` active entries with the lowest criterion score
   are removed (layer scope), or ``ceil(p * sum active)`` over all layers at once
   (global scope); the criterion's own selection rule for the SET family;
2. pruned weights are set to 0;
3. each layer regrows as many entries as it lost (exactly, or Bernoulli as the
   reference with ``grow_exact=False``), chosen by the growth score among its
   inactive entries (just-pruned ones included); regrown weights start at 0;
4. optionally the optimizer slots of pruned and regrown entries are zeroed.

Ordering "before" runs this after the optimizer update (scoring the updated
weights), ordering "after" before it (the optimizer then moves the regrown
weights one step from 0). A layer whose weight or gradient holds NaN/Inf at an
update step keeps its mask unchanged for that update (global scope: the whole
update is skipped), so densities stay exact.
"""

import keras
import numpy as np
import tensorflow as tf

from keras_dst import criteria as criteria_lib
from keras_dst import distributions
from keras_dst import growth as growth_lib
from keras_dst import optimizer_hook
from keras_dst import topology
from keras_dst.scoring import ScoreInputs


def _f32(x):
    return tf.cast(x, tf.float32)


def _count(mask):
    return tf.reduce_sum(tf.cast(mask, tf.int32))


class TopologyEngine:
    """Graph-side state and logic of one DST run (owned by a callback).

    Args:
      targets: list of `SparseTarget` (weight, mask, wrapper) of the model.
      criterion: a `criteria.Criterion`.
      growth: a `growth.GrowthRule`, or None for pruning without regrowth.
      schedule: callable step -> prune rate (float32 scalar tensor).
      update_every, end_step, ordering, scope, grow_exact, optimizer_state,
      seed, normalize, norm_type: see `DynamicSparseTraining`.
    """

    def __init__(self, targets, criterion, growth, schedule, *, update_every, end_step,
                 ordering, scope, grow_exact, optimizer_state, seed, normalize="none",
                 norm_type="max"):
        self.targets = list(targets)
        self.criterion = criterion
        self.growth = growth
        self.schedule = schedule
        self.update_every = int(update_every)
        self.end_step = end_step
        self.ordering = ordering
        self.scope = scope
        self.grow_exact = grow_exact
        self.optimizer_state = optimizer_state
        self.normalize = normalize
        self.norm_type = norm_type
        self._seeds = [(distributions.stable_seed(seed, i, "prune"),
                        distributions.stable_seed(seed, i, "grow"))
                       for i in range(len(self.targets))]
        n = len(self.targets)
        with tf.init_scope():
            # Observability only (not needed to resume): last update's numbers.
            self.layer_stats = tf.Variable(tf.zeros([n, 4], tf.int64), trainable=False,
                                           name="dst_layer_stats")  # active, pruned, grown, ever
            self.last_rate = tf.Variable(0.0, trainable=False, name="dst_last_rate")
            self.last_update_step = tf.Variable(tf.constant(-1, tf.int64), trainable=False,
                                                name="dst_last_update_step")
            self.skipped_layers = tf.Variable(tf.constant(0, tf.int64), trainable=False,
                                              name="dst_skipped_layers")

    # -- hook interface ---------------------------------------------------------
    def before_apply(self, optimizer, grads_by_var):
        step = tf.cast(optimizer.iterations, tf.int64) + 1
        grads = self._grads(grads_by_var)
        if self.criterion.ema and self.criterion.ordering == "after":
            self._update_running_scores(step, grads)
        if self.ordering == "after":
            self._maybe_update(optimizer, step, grads)

    def after_apply(self, optimizer, grads_by_var):
        step = tf.cast(optimizer.iterations, tf.int64)
        grads = self._grads(grads_by_var)
        if self.criterion.ema and self.criterion.ordering == "before":
            self._update_running_scores(step, grads)
        if self.ordering == "before":
            self._maybe_update(optimizer, step, grads)

    # -- pieces -------------------------------------------------------------------
    def _grads(self, grads_by_var):
        grads = []
        for t in self.targets:
            g = grads_by_var.get(id(t.weight))
            grads.append(tf.zeros(t.weight.shape, tf.float32) if g is None else _f32(g))
        return grads

    def is_update_step(self, step):
        due = tf.logical_and(step > 0, tf.equal(step % self.update_every, 0))
        if self.end_step is not None:
            due = tf.logical_and(due, step <= self.end_step)
        return due

    def _inputs(self, optimizer, index, step, grad, which):
        t = self.targets[index]
        seed = tf.stack([tf.constant(self._seeds[index][which], tf.int64), step])
        momentum = None
        if which == 1 and self.growth is not None and self.growth.needs_momentum:
            momentum = optimizer_hook.momentum(optimizer, t.weight)
            momentum = None if momentum is None else _f32(momentum)
        return ScoreInputs(weight=_f32(t.weight), gradient=grad, mask=tf.convert_to_tensor(t.mask),
                           seed=tf.cast(seed, tf.int32) if False else seed, momentum=momentum)

    def _update_running_scores(self, step, grads):
        first = tf.equal((step - 1) % self.update_every, 0)
        for i, t in enumerate(self.targets):
            state = t.score
            inputs = ScoreInputs(_f32(t.weight), grads[i], tf.convert_to_tensor(t.mask),
                                 tf.constant([0, 0], tf.int64))
            score = self.criterion.base_score(inputs, **self.criterion.params)
            state.assign(criteria_lib.ema_update(state, score, tf.logical_not(first),
                                                 self.criterion.params["beta"]))

    def _maybe_update(self, optimizer, step, grads):
        tf.cond(self.is_update_step(step),
                lambda: self._update(optimizer, step, grads),
                lambda: tf.no_op())

    def _reduce_across_replicas(self, grads):
        ctx = tf.distribute.get_replica_context()
        if ctx is None or ctx.num_replicas_in_sync == 1 or not self.criterion.needs_gradient \
                and not (self.growth is not None and self.growth.needs_gradient):
            return grads
        return ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)

    def _update(self, optimizer, step, grads):
        grads = self._reduce_across_replicas(grads)
        rate = tf.cast(self.schedule(step), tf.float32)
        prune_inputs = [self._inputs(optimizer, i, step, g, 0) for i, g in enumerate(grads)]
        if self.criterion.ema:
            prune_inputs = [x._replace(weight=x.weight) for x in prune_inputs]
        finite = [self._finite(x) for x in prune_inputs]
        old = [x.mask for x in prune_inputs]
        active = [_count(m) for m in old]

        if self.scope == "global":
            all_finite = tf.reduce_all(tf.stack(finite))
            count = topology.prune_count(tf.add_n(active), rate)
            pruned = topology.apply_selection(self.criterion, self._scored(prune_inputs), count,
                                              normalize=self._normalizer())
            pruned = [tf.where(all_finite, p, m) for p, m in zip(pruned, old)]
            finite = [all_finite] * len(old)
        else:
            pruned = []
            for x, a, ok in zip(self._scored(prune_inputs), active, finite):
                p = topology.apply_selection(self.criterion, [x], topology.prune_count(a, rate),
                                             normalize=self._normalizer())[0]
                pruned.append(tf.where(ok, p, x.mask))

        updates = []
        for i, (t, m_old, m_pruned, a) in enumerate(zip(self.targets, old, pruned, active)):
            removed = a - _count(m_pruned)
            m_new = self._regrow(optimizer, i, step, grads[i], m_pruned, removed)
            updates.append((t, m_old, m_pruned, m_new, a, removed))

        stats = []
        for t, m_old, m_pruned, m_new, a, removed in updates:
            weight = tf.where(m_pruned, t.weight, tf.zeros_like(t.weight))
            t.weight.assign(tf.where(m_new, weight, tf.zeros_like(weight)))
            t.mask.assign(m_new)
            ever = t.ever_active
            ever.assign(tf.logical_or(ever, m_new))
            if self.optimizer_state == "reset":
                changed = tf.logical_or(tf.logical_and(m_old, tf.logical_not(m_pruned)),
                                        tf.logical_and(m_new, tf.logical_not(m_pruned)))
                for slot in optimizer_hook.slot_variables(optimizer, t.weight).values():
                    slot.assign(tf.where(changed, tf.zeros_like(slot), slot))
            grown = _count(m_new) - _count(m_pruned)
            stats.append(tf.cast(tf.stack([_count(m_new), removed, grown, _count(ever)]), tf.int64))
        self.layer_stats.assign(tf.stack(stats))
        self.last_rate.assign(rate)
        self.last_update_step.assign(step)
        self.skipped_layers.assign(tf.reduce_sum(tf.cast(tf.logical_not(tf.stack(finite)),
                                                         tf.int64)))
        return tf.no_op()

    def _scored(self, inputs):
        if not self.criterion.ema:
            return inputs
        # Running criteria score with their stored EMA.
        return [x._replace(weight=x.weight) for x in inputs]

    def _normalizer(self):
        return (self.normalize, self.norm_type)

    def _finite(self, x):
        ok = tf.reduce_all(tf.math.is_finite(x.weight))
        if self.criterion.needs_gradient or (self.growth is not None and self.growth.needs_gradient):
            ok = tf.logical_and(ok, tf.reduce_all(tf.math.is_finite(x.gradient)))
        return ok

    def _regrow(self, optimizer, index, step, grad, pruned, count):
        if self.growth is None:
            return pruned
        if not self.grow_exact and self.growth.name == "random":
            seed = tf.stack([tf.constant(self._seeds[index][1], tf.int64), step])
            return topology.grow_bernoulli(pruned, count, seed)
        x = self._inputs(optimizer, index, step, grad, 1)._replace(mask=pruned)
        scores = self.growth.score(x, **self.growth.params)
        return topology.grow(scores, pruned, count)
