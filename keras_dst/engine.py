"""The DST topology update, as it runs inside the compiled training step.

`TopologyEngine` is a `hooks.Hook`. At every optimizer step it checks, on
device, whether the step is an update step (its `schedules.UpdateSteps`, with
``t`` the 1-based index of the optimizer step) and, inside a loop of zero or one
trip (`hooks.run_if`), prunes and regrows every sparsified weight:

1. ``r_l = ceil(p(t) * active_l)`` active entries with the lowest criterion score
   are removed (layer scope), or ``ceil(p * sum active)`` over all layers at once
   (global scope); the criterion's own selection rule for the SET family;
2. each layer regrows as many entries as it lost (exactly, or Bernoulli as the
   reference with ``grow_exact=False``), chosen by the growth score among its
   inactive entries (just-pruned ones included);
3. the mask is applied once, as the reference's ``apply_mask()`` after
   ``truncate_weights()`` (``sparselearning/core.py``): entries pruned for good
   go to 0, entries that were inactive and are grown start at 0, and an entry
   pruned and regrown in the same update keeps its value (it never left the
   mask as far as the weights are concerned);
4. optionally (``optimizer_state="reset"``) the optimizer slots of the entries
   whose mask changed restart from their initial value (0; Adagrad's and Ftrl's
   accumulators from ``initial_accumulator_value``).

Ordering "after_optimizer" runs this after the optimizer update (scoring the
updated weights), "before_optimizer" before it (the optimizer then moves the
regrown weights one step from 0). The engine reads every weight through its
mask (0 where the mask is False), so with "after_optimizer" the mask constraint
of a weight that has no other constraint runs once after the update instead of
inside the optimizer's (`late_constraints`): the same values, and XLA then
updates the weight in place across the update's loop instead of copying a
weight (or mask) at every step. A layer whose weight or gradient holds NaN/Inf at an
update step keeps its mask unchanged for that update (global scope: the whole
update is skipped), so densities stay exact.

Compile cost: the pruning and the growth of every layer run through one selection
loop over a row layout of all layers (`topology.prune_then_grow`), the per-layer
counts are one reduction (`topology.count_true_each`), and what the update already
knows is not counted again (in layer scope the entries each layer loses are its
count; after an exact update every layer holds as many active entries as before), so
the compiled update does not grow with the number of layers but by its writes (a
layer's weight, mask and ever-active flags).
"""

import tensorflow as tf

from keras_dst import criteria as criteria_lib
from keras_dst import distributions, patterns, topology
from keras_dst import optimizer_state as optimizer_state_lib
from keras_dst.hooks import Hook, run_if, step_gradients, summed_over_replicas
from keras_dst.layers import mask_is_only_constraint, score_layout
from keras_dst.scoring import ScoreInputs, is_finite


def _f32(x):
    return tf.cast(x, tf.float32)


# odd multiplier that spreads the explored counts over the seed's first word
_EXPLORED_STRIDE = 1_000_003


def draw_seed(seed: int, target, step):
    """The stateless seed (int64 [2]) of a target's random draws at optimizer step `step`:
    its own `seed` (`distributions.stable_seed` of the callback's seed and the target),
    moved by how many of the target's entries were ever active, and the step.

    The step count is the optimizer's, which a new optimizer (``compile`` made one) starts
    again from 1: with the explored count in the seed, such a run draws anew instead of
    replaying the first run's numbers at the same steps (its updates would largely undo
    each other's exploration), while a resume, which restores the ever-active flags,
    draws the same."""
    explored = tf.math.count_nonzero(target.ever_active, dtype=tf.int64)
    return tf.stack([tf.constant(seed, tf.int64) + explored * _EXPLORED_STRIDE, step])


def check_patterns(targets, criterion, growth, scope, grow_exact):
    """Refuses a DST configuration that cannot keep the targets' sparsity patterns exact.

    * 1xB blocks are pruned by a score: the SET family (a sign rule over
      entries) is refused; in global scope every target must have the same
      block size (one ranking of equal units).
    * N:M and fan_in refill every group with the growth rule: ``grow=None``
      (pruning without regrowth) would break the per-group counts.
    * Structured patterns keep exact counts: the Bernoulli random growth
      (``grow_exact=False``) is refused.

    Raises:
      ValueError: naming the first offending weight, its pattern and the remedy.
    """
    structured = [t for t in targets if t.pattern.kind != "unstructured"]
    if not structured:
        return
    first = structured[0]
    where = f"weight '{first.key}' has pattern '{first.pattern}'"
    blocks = [t for t in structured if t.pattern.kind == "block"]
    check_criterion_pattern(targets, criterion, f"DynamicSparseTraining(prune='{criterion.name}')")
    if scope == "global" and blocks and len({str(t.pattern) for t in targets}) > 1:
        first = {}
        for t in targets:
            first.setdefault(str(t.pattern), t.key)
        raise ValueError("DynamicSparseTraining(scope='global'): 1xB blocks are ranked across "
                         "layers only when every sparsified weight has the same pattern, the "
                         "layers kept dense (keep_dense) or given another pattern included; got "
                         + ", ".join(f"'{p}' (e.g. '{w}')" for p, w in sorted(first.items()))
                         + ". Use scope='layer'.")
    if growth is None and any(t.pattern.kind in ("nm", "fan_in") for t in structured):
        raise ValueError(f"DynamicSparseTraining(grow=None): {where}; N:M and fan_in keep "
                         "exact counts per group by regrowing what each group lost. Pass a "
                         "growth rule (e.g. grow='gradient').")
    if not grow_exact and growth is not None and growth.name == "random":
        raise ValueError(f"DynamicSparseTraining(grow_exact=False): {where}; structured "
                         "patterns keep exact counts. Use grow_exact=True.")


def check_criterion_pattern(targets, criterion, owner: str) -> None:
    """Refuses a criterion that cannot prune the targets in their pattern's units: 1xB
    blocks are pruned by a score, and the SET family (a sign rule) selects entries.

    Raises:
      ValueError: naming `owner`, the first weight with blocks and the remedy.
    """
    blocks = [t for t in targets if t.pattern.kind == "block"]
    if blocks and criterion.select is not None:
        raise ValueError(f"{owner}: weight '{blocks[0].key}' has 1xB blocks, which "
                         "are pruned by a score; the SET rules select single entries. Use a "
                         "score criterion (e.g. 'magnitude').")


def prune_counts(inputs, patterns_list, rate, *, scope: str, check_gradient: bool):
    """What a pruning starts from: ``(finite, units, unit, count)``.

    Args:
      inputs: per target, its pruning `ScoreInputs` (weight, gradient, mask).
      patterns_list: per target, its `patterns.Pattern`.
      rate: the prune rate p (scalar).
      scope: ``"layer"`` or ``"global"``.
      check_gradient: whether a non-finite gradient stops a layer's pruning (the
        update scores with it).

    Returns:
      `finite` [targets] bool (its weight, and gradient if checked, hold no NaN/Inf;
      global scope: all of them); `units` [targets] int32, its active selection units
      (entries, blocks for 1xB) and `unit` their size; `count`: the units to prune,
      ``ceil(p * units)`` per target ([targets], 0 where not finite) or of all their
      units together (global scope).
    """
    n = len(inputs)
    bad = [~is_finite(x.weight) for x in inputs]
    if check_gradient:
        bad = [b | ~is_finite(x.gradient) for b, x in zip(bad, inputs)]
    counts = topology.count_true_each(  # one reduction for all
        bad + [patterns.selection_units(p, x.mask) for p, x in zip(patterns_list, inputs)])
    finite, units = tf.equal(counts[:n], 0), counts[n:]
    unit = tf.constant([p.unit if p.kind == "block" else 1 for p in patterns_list])
    if scope == "global":
        finite = tf.fill([n], tf.reduce_all(finite))
        count = tf.where(finite[0], topology.prune_count(tf.reduce_sum(units), rate), 0)
    else:
        count = tf.where(finite, topology.prune_count(units, rate), 0)
    return finite, units, unit, count


def pruned_masks(criterion, inputs, patterns_list, rate, *, scope: str = "layer",
                 check_gradient: bool, scores=None, normalize: str = "none",
                 norm_type: str = "sum", layouts_list=None):
    """The masks after pruning (before growth), one per target; pure (no assignment).

    Prunes ``count`` selection units of each target (`prune_counts`) by `criterion`
    (`criteria.select_pruned` / `select_pruned_each`); targets with non-finite weights
    or gradients keep their mask (global scope: every target does). `scores`: the
    running scores of a running criterion.

    Returns:
      ``(masks, finite, active, removed)``: `finite` [targets] bool; `active` and
      `removed` [targets] int32, the entries active before the pruning and pruned by it.
    """
    finite, units, unit, count = prune_counts(inputs, patterns_list, rate, scope=scope,
                                              check_gradient=check_gradient)
    options = dict(scores_list=scores, normalize=normalize, norm_type=norm_type,
                   patterns_list=patterns_list, layouts_list=layouts_list)
    if scope == "global":
        pruned = criteria_lib.select_pruned(criterion, inputs, count, **options)
    else:
        pruned = criteria_lib.select_pruned_each(criterion, inputs, tf.unstack(count), **options)
    by_rule = criterion.select is not None and scores is None  # a rule: its own count
    if by_rule:
        pruned = [tf.where(finite[i], p, x.mask) for i, (p, x) in enumerate(zip(pruned, inputs))]
    # (a score selection with count 0 leaves a non-finite layer's mask as it is)
    if scope == "global" or by_rule:
        removed = units * unit - topology.count_true_each(pruned)  # per layer, or by a rule
    else:
        removed = tf.minimum(count, units) * unit  # a score selection takes exactly that
    return pruned, finite, units * unit, removed


class TopologyEngine(Hook):
    """Graph-side state and logic of one DST run (the hook of `DynamicSparseTraining`).

    Args:
      targets: list of `SparseTarget` (weight, mask, wrapper) of the model.
      criterion: a `criteria.Criterion`.
      growth: a `growth.GrowthRule`, or None for pruning without regrowth.
      schedule: callable step -> prune rate (float scalar tensor).
      update_steps: `schedules.UpdateSteps`, the optimizer steps that update.
      ordering, scope, grow_exact, optimizer_state, seed, normalize, norm_type:
        see `DynamicSparseTraining` (`ordering` canonical: "after_optimizer" or
        "before_optimizer").
    """

    def __init__(self, targets, criterion, growth, schedule, update_steps, *, ordering, scope,
                 grow_exact, optimizer_state, seed, normalize="none", norm_type="sum"):
        super().__init__(update_steps)
        self.targets = list(targets)
        self.criterion = criterion
        self.growth = growth
        self.schedule = schedule
        self.ordering = criteria_lib.canonical_ordering(ordering)
        self.scope = scope
        self.grow_exact = grow_exact
        self.optimizer_state = optimizer_state
        self.normalize = normalize
        self.norm_type = norm_type
        self._patterns = [t.pattern for t in self.targets]
        self._layouts = (None if normalize == "none"  # (only normalisation reads them)
                         else [score_layout(t.state.layer, t.weight) for t in self.targets])
        self._cross_replica = tf.distribute.has_strategy()  # made in the model's strategy scope
        check_patterns(self.targets, criterion, growth, scope, grow_exact)
        self._seeds = [(distributions.stable_seed(seed, i, "prune"),
                        distributions.stable_seed(seed, i, "grow"))
                       for i in range(len(self.targets))]
        n = len(self.targets)
        # Observability only (not needed to resume): the last update's numbers.
        # Columns of layer_stats: active, pruned, grown (the entries ever active are
        # counted by the host when it reads the logs, from the `ever_active` masks).
        self.layer_stats = self.observed(tf.zeros([n, 3], tf.int64), "dst_layer_stats")
        self.last_rate = self.observed(tf.constant(0.0), "dst_last_rate")
        self.skipped_layers = self.observed(tf.constant(0, tf.int64), "dst_skipped_layers")

    @property
    def runs_every_step(self):
        """Traced into every compiled step, the update in a `hooks.run_if` loop (one
        step to compile, nothing copied at the steps that do not update), except under
        a tf.distribute strategy: there the update runs in cross-replica context
        inside a `tf.cond`, and the step switch leaves it out of the executions
        without an update step. Running scores are updated at every step anyway."""
        return self.criterion.ema or not self._cross_replica

    # -- hook interface ---------------------------------------------------------
    def late_constraints(self, variables):
        """With "after_optimizer" (outside a tf.distribute strategy, whose update runs in
        `merge_call`): the sparsified weights among `variables` whose only constraint is
        their mask. The update reads them through their masks (`_masked_weight`) and
        writes 0 wherever the mask was False before it, so zeroing the rest afterwards
        with the final masks gives exactly what the constraint inside the optimizer's
        update followed by the update gives."""
        if not self._constraints_may_run_late:
            return []
        applied = {id(v) for v in variables}
        return [t.weight for t in self.targets
                if id(t.weight) in applied and mask_is_only_constraint(t.weight)]

    def before_apply(self, optimizer, grads_by_variable):
        if self.ordering == "before_optimizer":
            self._step(optimizer, tf.cast(optimizer.iterations, tf.int64) + 1, grads_by_variable)

    def after_apply(self, optimizer, grads_by_variable):
        if self.ordering == "after_optimizer":
            self._step(optimizer, tf.cast(optimizer.iterations, tf.int64), grads_by_variable)

    def _step(self, optimizer, step, grads_by_variable):
        """What runs in optimizer step `step` (1-based), where the run's ordering puts it
        (`hooks.step_gradients` warns, when traced, naming the sparse weights that this
        ``apply`` does not update)."""
        grads = step_gradients("DynamicSparseTraining", optimizer, self.targets,
                               grads_by_variable)
        if self.criterion.ema:  # running scores follow the run's ordering
            self._update_running_scores(step, grads)
        self._maybe_update(optimizer, step, grads)

    # -- pieces -------------------------------------------------------------------
    @property
    def _constraints_may_run_late(self):
        """Whether `late_constraints` may list weights: "after_optimizer", outside a
        tf.distribute strategy."""
        return self.ordering == "after_optimizer" and not self._cross_replica

    def _masked_weight(self, target):
        """`target`'s weight as float32, 0 where its mask is False: what the update and the
        running scores read. Where the mask constraint may run after them (see
        `late_constraints`) the optimizer may have moved masked entries, so the mask is
        applied here; elsewhere the weight already is (no extra work per step)."""
        weight = _f32(target.weight)
        if not self._constraints_may_run_late:
            return weight
        return tf.where(target.mask, weight, tf.zeros([], tf.float32))

    def _needs_gradient(self):
        return self.criterion.needs_gradient or (
            self.growth is not None and self.growth.needs_gradient)

    def _inputs(self, index, step, grad, mask, which, momentum=None):
        """ScoreInputs of target `index`; `which` 0 = pruning, 1 = growth (own seed)."""
        t = self.targets[index]
        return ScoreInputs(weight=self._masked_weight(t), gradient=grad, mask=mask,
                           seed=self._seed(index, which, step),
                           momentum=momentum if which == 1 else None)

    def _seed(self, index, which, step):
        """`draw_seed` of target `index` (`which` 0 = pruning, 1 = growth) at `step`."""
        return draw_seed(self._seeds[index][which], self.targets[index], step)

    def _reads(self, optimizer):
        """What the update reads and never writes, as tensors: ``(momenta, running scores)``
        (None where the configuration does not use them)."""
        momenta = None
        if self.growth is not None and self.growth.needs_momentum:
            momenta = [_f32(optimizer_state_lib.momentum(optimizer, t.weight)) for t in self.targets]
        scores = [tf.convert_to_tensor(t.running_score) for t in self.targets] \
            if self.criterion.ema else None
        return momenta, scores

    def _update_running_scores(self, step, grads):
        # S restarts from the current score on the first step after an update.
        restarted = tf.equal(tf.math.floormod(step - 1 - self.update_steps.begin,
                                              self.update_steps.every), 0)
        grads = summed_over_replicas(grads, self.criterion.needs_gradient)
        for t, g in zip(self.targets, grads):
            inputs = ScoreInputs(self._masked_weight(t), g, tf.convert_to_tensor(t.mask),
                                 tf.zeros([2], tf.int64))
            t.running_score.assign(criteria_lib.ema_update(t.running_score, self.criterion.evaluate(inputs),
                                                   tf.logical_not(restarted),
                                                   self.criterion.params["beta"]))

    def _maybe_update(self, optimizer, step, grads):
        ctx = tf.distribute.get_replica_context()
        if ctx is not None and tf.distribute.has_strategy():
            # Replica context of a tf.distribute strategy: a mirrored variable can only
            # be written in sync (merge_call), which tf.cond does not allow. So the
            # update runs once in cross-replica context, on the gradients summed over
            # replicas (the global-batch gradient), and every replica gets the same
            # new masks and weights.
            ctx.merge_call(self._cross_replica_update, args=(optimizer, step, grads))
            return
        # The update reads the step, gradients, momenta and running scores through
        # `run_if`, so that nothing computed from them (the schedule's rate, the scores)
        # is hoisted into the steps that do not update.
        momenta, scores = self._reads(optimizer)
        n, m = len(grads), len(momenta or ())

        def update(step, *read):
            self._update(optimizer, step, list(read[:n]), momenta=list(read[n:n + m]) or None,
                         scores=list(read[n + m:]) or None)

        run_if(self.update_steps.is_update_step(step), update,
               [step] + list(grads) + list(momenta or ()) + list(scores or ()))

    def _cross_replica_update(self, strategy, optimizer, step, grads):
        step = strategy.experimental_local_results(step)[0]

        def update():
            if self._needs_gradient():
                reduced = [strategy.reduce(tf.distribute.ReduceOp.SUM, g, axis=None)
                           for g in grads]
            else:
                reduced = [strategy.experimental_local_results(g)[0] for g in grads]
            return self._update(optimizer, step, reduced)

        tf.cond(self.update_steps.is_update_step(step), update, tf.no_op)

    def _prune_inputs(self, step, grads):
        """Per target, the `ScoreInputs` its pruning scores."""
        return [self._inputs(i, step, g, tf.convert_to_tensor(t.mask), 0)
                for i, (t, g) in enumerate(zip(self.targets, grads))]

    def prune_masks(self, step, grads, rate, scores=None):
        """`pruned_masks` of this run's targets, criterion, scope and normalisation."""
        return pruned_masks(self.criterion, self._prune_inputs(step, grads), self._patterns,
                            rate, scope=self.scope, check_gradient=self._needs_gradient(),
                            scores=scores, normalize=self.normalize, norm_type=self.norm_type,
                            layouts_list=self._layouts)

    def _one_loop(self, scores):
        """Whether pruning and growth can share one selection loop (`topology.prune_then_grow`):
        a score criterion, exact growth, and entries or 1xB blocks for every target."""
        return (self.growth is not None and (self.criterion.select is None or scores is not None)
                and (self.grow_exact or self.growth.name != "random")
                and all(p.kind in ("unstructured", "block") for p in self._patterns))

    def _prune_and_grow(self, step, grads, momenta, rate, scores):
        """`prune_masks` then `_regrow`, in one selection loop (see `_one_loop`)."""
        inputs = self._prune_inputs(step, grads)
        finite, units, unit, count = prune_counts(inputs, self._patterns, rate, scope=self.scope,
                                                  check_gradient=self._needs_gradient())
        unit_scores, unit_masks, expand = criteria_lib.unit_scores(
            self.criterion, inputs, scores, self.normalize, self.norm_type, self._patterns,
            self._layouts)

        def grow_scores(pruned_units):
            return [self._growth_scores(i, step, grads, momenta, pruned)
                    for i, pruned in enumerate(expand(pruned_units))]

        if self.scope == "global":
            pruned, grown, removed = topology.prune_then_grow(
                unit_scores, unit_masks, [count], grow_scores, [list(range(len(inputs)))])
        else:  # each layer loses its count (in [0, units]): known, not counted
            pruned, grown, removed = topology.prune_then_grow(
                unit_scores, unit_masks, tf.unstack(count), grow_scores,
                counts_within_active=True)
        return expand(pruned), expand(grown), finite, units * unit, removed * unit

    def _update(self, optimizer, step, grads, momenta=None, scores=None):
        """Prunes and regrows every target (`momenta`, `scores`: see `_reads`; read here
        when not given)."""
        if momenta is None and scores is None:
            momenta, scores = self._reads(optimizer)
        grads = summed_over_replicas(grads, self._needs_gradient())
        rate = self.schedule(step)  # float64 for the built-in schedules (see prune_count)
        before = [tf.convert_to_tensor(t.mask) for t in self.targets]
        if self._one_loop(scores):
            pruned, after, finite, active, removed = self._prune_and_grow(step, grads, momenta,
                                                                          rate, scores)
        else:
            pruned, finite, active, removed = self.prune_masks(step, grads, rate, scores)
            after = self._regrow(step, grads, momenta, before, pruned, removed)
        for t, m_old, m_new in zip(self.targets, before, after):
            # As the reference (`apply_mask()` once, after pruning and growth): an entry
            # active before and after the update keeps its value, even if it was pruned
            # and regrown in this update; an entry that was inactive starts from 0; a
            # pruned entry that stays inactive goes to 0.
            kept = tf.logical_and(m_old, m_new)
            t.weight.assign(tf.where(kept, t.weight, tf.zeros([], t.weight.dtype)))
            t.mask.assign(m_new)
            t.ever_active.assign(tf.logical_or(t.ever_active, m_new))
            if self.optimizer_state == "reset":
                changed = tf.not_equal(m_old, m_new)
                for name, slot in optimizer_state_lib.slot_variables(optimizer, t.weight).items():
                    initial = optimizer_state_lib.initial_slot_value(optimizer, name)
                    slot.assign(tf.where(changed, tf.constant(initial, slot.dtype), slot))
        if self._one_loop(scores):  # every layer regrew exactly what it lost
            now, grown = active, removed
        else:
            now = topology.count_true_each(after)
            grown = now - (active - removed)
        self.layer_stats.assign(tf.cast(tf.stack([now, removed, grown], axis=1), tf.int64))
        self.last_rate.assign(tf.cast(rate, tf.float32))
        self.last_update_step.assign(step)
        self.skipped_layers.assign(tf.reduce_sum(tf.cast(tf.logical_not(finite), tf.int64)))
        return tf.no_op()

    def _growth_scores(self, index, step, grads, momenta, pruned):
        """Target `index`'s growth scores given its pruned mask, in its growth units:
        summed per block for 1xB, per entry otherwise (N:M and fan_in refill entries)."""
        x = self._inputs(index, step, grads[index], pruned, 1,
                         None if momenta is None else momenta[index])
        scores = self.growth.evaluate(x)
        pattern = self._patterns[index]
        return patterns.block_scores(pattern, scores) if pattern.kind == "block" else scores

    def _regrow(self, step, grads, momenta, before, pruned, counts):
        """The masks after growth: each target regrows as many as it lost (`counts[i]`),
        in its pattern's units.

        Unstructured: `count` inactive entries of highest growth score (or the
        reference's Bernoulli draw); 1xB: as many whole blocks as were pruned,
        by the growth scores summed per block; N:M and fan_in: every group
        (M-group, output unit) regrows what it lost (`patterns.refill`). The
        unstructured and 1xB targets share one selection (`topology.grow_each`).
        """
        if self.growth is None:
            return pruned
        after = list(pruned)
        selected, scores_list, masks_list, lost = [], [], [], []
        for i, pattern in enumerate(self._patterns):
            if not self.grow_exact and self.growth.name == "random":
                after[i] = topology.grow_bernoulli(pruned[i], counts[i], self._seed(i, 1, step))
                continue
            scores = self._growth_scores(i, step, grads, momenta, pruned[i])
            if pattern.kind in ("nm", "fan_in"):
                after[i] = patterns.refill(pattern, before[i], pruned[i], scores)
                continue
            selected.append(i)
            scores_list.append(scores)
            if pattern.kind == "block":
                masks_list.append(patterns.block_mask(pattern, pruned[i]))
                lost.append(counts[i] // pattern.unit)  # whole blocks were pruned
            else:
                masks_list.append(pruned[i])
                lost.append(counts[i])
        if selected:
            grown = topology.grow_each(scores_list, masks_list, lost)
            for i, g in zip(selected, grown):
                pattern = self._patterns[i]
                after[i] = patterns.expand_blocks(pattern, g, pruned[i].shape) \
                    if pattern.kind == "block" else g
        return after
