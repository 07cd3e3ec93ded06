"""How much pruning criteria agree: `CriteriaOverlap` (the paper's Section 4.3, Figure 6).

At each of its update steps, from one and the same state (weights, the step's
dense gradient, masks), every criterion selects the weights it *would* prune,
exactly as a layer-scope DST update would (``r = ceil(p * a)`` of each layer's
active selection units, 1xB blocks whole: `engine.pruned_masks`), without changing
anything. For each pair of
criteria the Jaccard index ``|A & B| / |A | B|`` of the pruned sets is taken over
the whole model (the union of the per-layer sets; 1 when both are empty).
"""

import json
import os
from typing import Callable, Optional, Sequence, Union

import keras
import numpy as np
import tensorflow as tf

from keras_dst import criteria as criteria_lib
from keras_dst import distributions, topology, validation
from keras_dst import schedules as schedules_lib
from keras_dst.engine import check_criterion_pattern, draw_seed, pruned_masks
from keras_dst.hooks import Hook, step_gradients, summed_over_replicas
from keras_dst.masks import sparse_targets
from keras_dst.scoring import ScoreInputs
from keras_dst.step_switch import ScheduledCallback


class OverlapEngine(Hook):
    """Graph-side state and logic of `CriteriaOverlap` (a read-only `hooks.Hook`).

    Installed first (``first = True``), it sees the state before any DST update
    of the same step.

    Args:
      targets: list of `SparseTarget` of the model.
      criteria: list of `criteria.Criterion` (C >= 2, none with running scores).
      schedule: callable step -> prune rate (float scalar tensor).
      update_steps: `schedules.UpdateSteps`, the steps that compute.
      seed: int; the random criterion draws as `DynamicSparseTraining` with the same
        seed (`engine.draw_seed`).
    """

    first = True
    writes_masks = False

    def __init__(self, targets, criteria, schedule, update_steps, *, seed):
        super().__init__(update_steps)
        self.targets = list(targets)
        self.criteria = list(criteria)
        self.schedule = schedule
        self._seeds = [distributions.stable_seed(seed, i, "prune") for i in range(len(targets))]
        c = len(self.criteria)
        self.matrix = self.observed(tf.eye(c), "overlap_jaccard")  # [C, C] float32

    def before_apply(self, optimizer, grads_by_variable):
        step = tf.cast(optimizer.iterations, tf.int64) + 1

        def update():  # (the gradients are made dense at the update steps only)
            grads = step_gradients("CriteriaOverlap", optimizer, self.targets,
                                   grads_by_variable)
            return self._update(step, summed_over_replicas(
                grads, any(c.needs_gradient for c in self.criteria)))

        tf.cond(self.update_steps.is_update_step(step), update, tf.no_op)

    def pruned_sets(self, step, grads, rate):
        """What each criterion would prune: C flat bool tensors over all targets (pure).

        Each is what a layer-scope DST update with that criterion would prune
        (`engine.pruned_masks`: ``ceil(p * a)`` of each target's selection units, 1xB
        blocks included; a target with non-finite values prunes nothing).
        """
        inputs = [ScoreInputs(weight=tf.cast(t.weight, tf.float32), gradient=g,
                              mask=tf.convert_to_tensor(t.mask),
                              seed=draw_seed(s, t, step))
                  for t, g, s in zip(self.targets, grads, self._seeds)]
        patterns_list = [t.pattern for t in self.targets]
        sets = []
        for criterion in self.criteria:  # one selection over all layers per criterion
            kept, _, _, _ = pruned_masks(criterion, inputs, patterns_list, rate,
                                         check_gradient=criterion.needs_gradient)
            sets.append(tf.concat([tf.reshape(x.mask & ~k, [-1]) for x, k in zip(inputs, kept)],
                                  axis=0))
        return sets

    def _update(self, step, grads):
        rate = self.schedule(step)
        sets = self.pruned_sets(step, grads, rate)
        self.matrix.assign(tf.stack([tf.stack([topology.jaccard(a, b) for b in sets])
                                     for a in sets]))
        self.last_update_step.assign(step)
        return tf.no_op()


@keras.saving.register_keras_serializable(package="keras_dst")
class CriteriaOverlap(ScheduledCallback):
    """Records how similar the weight sets chosen by several pruning criteria are.

    Every `update_every` optimizer steps (``t = update_every, 2 * update_every,
    ...``, as `DynamicSparseTraining`), each criterion selects, per layer, the
    ``r = ceil(p(t) * a)`` active weights it would prune (in the layer's pattern
    units, as DST prunes them: 1xB blocks whole; the SET family: its own rule, refused
    on blocks as by DST) from the same weights, the step's dense gradient and the current masks.
    Nothing changes: masks, weights and optimizer state are left as they are.
    The pairwise Jaccard index of those sets, over all layers together, is
    logged and kept in `history`.

    Alone on a static sparse model it measures the overlap along a static run;
    together with `DynamicSparseTraining` (either order in the callback list)
    it runs in ``before_apply``, before the optimizer step and before that step's
    DST update, so the criteria score the state the DST update starts from
    (for a DST criterion with ``"before"`` ordering the DST itself then scores
    the post-step weights)::

        model.fit(x, y, callbacks=[
            keras_dst.DynamicSparseTraining(prune="magnitude", update_every=800),
            keras_dst.CriteriaOverlap(["snip", "mest", "magnitude", "set", "random"],
                                      update_every=800)])

    Args:
      criteria: at least two criteria with distinct names: registered names,
        or `Criterion` objects (e.g. ``keras_dst.get_criterion("mest", gamma=0.1)``)
        of registered criteria. Running (EMA) criteria are refused.
      update_every: steps between computations (int >= 1).
      prune_rate: the rate ``p`` (initial rate for a named schedule), in (0, 1]
        (default 0.5); a schedule object sets its own rates, and giving both is
        refused.
      schedule: ``"constant"`` (default), ``"cosine"``, ``"linear"`` (as
        `DynamicSparseTraining`) or a callable of the step.
      total_steps: steps of the whole run for ``"cosine"``; default
        ``epochs * steps_per_epoch`` of `fit`. Refused with a schedule object (which
        sets its own steps).
      seed: int; the ``random`` criterion draws what `DynamicSparseTraining`
        with the same seed would.

    Attributes:
      history: list of ``(step, names, matrix)``, one per update seen by the host
        (the device is read once per batch; with ``steps_per_execution >
        update_every`` intermediate updates are not recorded). ``matrix`` is a
        float numpy array [C, C], ``matrix[i, j]`` the Jaccard index of criteria i
        and j. It spans every fit of this callback, on whichever model (a callback
        reused on another model goes on appending: make one per model to keep them
        apart). A fit that starts past step 0 right after a fit that an exception
        stopped is taken for its resume from a backup: it replaces the stopped fit's
        updates after its start by those it replays (a run started over from step 0
        appends them again).
      names: the criteria names, in order.

    Logs: ``jaccard/<a>/<b>`` for every pair a before b in `criteria`, from the
    last update (NaN before the first one: the keys are logged from the first batch, so
    a `keras.callbacks.CSVLogger` that fixes its columns at the first epoch's end
    records them).
    """

    def __init__(self, criteria: Sequence[Union[str, criteria_lib.Criterion, dict]],
                 update_every: int = 100, prune_rate: Optional[float] = None,
                 schedule: Union[str, Callable, dict] = "constant",
                 total_steps: Optional[int] = None, seed: int = 0):
        super().__init__()
        if isinstance(criteria, (str, dict, criteria_lib.Criterion)) or callable(criteria) \
                or not hasattr(criteria, "__iter__"):
            raise TypeError(f"criteria must be a list of criteria, got criteria={criteria!r}.")
        if isinstance(criteria, (set, frozenset)):  # (its order, which names the matrix's
            raise TypeError(  # rows and the logs, would change from one process to the next)
                f"criteria must be a list of criteria (in the order of the matrix's rows), "
                f"got the set {criteria!r}.")
        self.criteria = []
        for i, c in enumerate(criteria):
            if not isinstance(c, (str, dict, criteria_lib.Criterion)) and not callable(c):
                raise TypeError(  # (get_criterion's message offers running criteria)
                    f"CriteriaOverlap(criteria[{i}]={c!r}): a criterion here is a registered "
                    "name (not running_*), a Criterion of one, or its config.")
            with validation.errors_named(f"CriteriaOverlap(criteria[{i}]={c!r})"):
                resolved = criteria_lib.get_criterion(c)
                criteria_lib.check_serializable(resolved, f"criteria[{i}]")
            self.criteria.append(resolved)
        self.names = [c.name for c in self.criteria]
        if len(self.names) < 2:
            raise ValueError(f"criteria needs at least two criteria, got criteria={criteria!r}.")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"criteria names must be distinct, got {self.names}.")
        running = [c.name for c in self.criteria if c.ema]
        if running:
            raise ValueError(f"CriteriaOverlap does not support running criteria {running}.")
        self._set_schedule(update_every, schedule, prune_rate)
        self.total_steps = schedules_lib.check_total_steps(total_steps, self.schedule)
        self.seed = validation.check_seed(seed)
        self.history = []
        self._recorded = None  # (engine uid, step) of the last update in `history`
        self._open_from = None  # index in `history` of the running fit's first entry
        self._interrupted_from = None

    def _engine_key(self):
        return (tuple(self.criteria), self.update_every, self._schedule_key(), self.seed)

    def _make_engine(self):
        targets = sparse_targets(self.model, require=True, caller="CriteriaOverlap",
                                 trainable_only=True)
        for criterion in self.criteria:
            check_criterion_pattern(targets, criterion, f"CriteriaOverlap('{criterion.name}')")
        return OverlapEngine(targets, self.criteria, self._schedule(), self._update_steps(),
                             seed=self.seed)

    def _update_steps(self):
        return schedules_lib.UpdateSteps(self.update_every)

    def _read_logs(self):
        step = int(self.engine.last_update_step.numpy())
        if step < 0:  # NaN: the keys are there from the first batch (a `CSVLogger` fixes
            matrix = np.full([len(self.names)] * 2, np.nan)  # its columns at epoch 1)
        else:
            matrix = self.engine.matrix.numpy().astype(float)
            if self._recorded != (self.engine.uid, step):  # (a later fit reads the same update)
                self._recorded = (self.engine.uid, step)
                self.history.append((step, list(self.names), matrix))
        return {f"jaccard/{a}/{b}": float(matrix[i, j])
                for i, a in enumerate(self.names) for j, b in enumerate(self.names) if i < j}

    def on_train_begin(self, logs=None):
        # The entries of the last fit that never ended (an exception stopped it), kept
        # through fits that record nothing (refused at their start, of no epoch) until a
        # fit's first batch (`_drop_undone`).
        stopped = self._open_from
        if stopped is not None and (self._interrupted_from is None or stopped < len(self.history)):
            self._interrupted_from = stopped
        self._open_from = len(self.history)
        super().on_train_begin(logs)

    def on_epoch_begin(self, epoch, logs=None):
        if self._interrupted_from is not None:  # (after a backup's restore, in on_train_begin)
            self._drop_undone(self._optimizer_step())
        super().on_epoch_begin(epoch, logs)

    def on_train_batch_begin(self, batch, logs=None):
        if self._interrupted_from is not None:  # (a loop that calls no on_epoch_begin)
            self._drop_undone(self._optimizer_step())
        super().on_train_batch_begin(batch, logs)

    def on_train_end(self, logs=None):
        self._open_from = None
        super().on_train_end(logs)

    def _forget_undone_updates(self):
        forgot = super()._forget_undone_updates()
        if forgot:  # (a restore took the model back: the last recorded step runs again)
            self._recorded = None
        return forgot

    def _drop_undone(self, start):
        """A fit that starts at step `start` > 0 after a fit that never ended (an exception
        stopped it, or a callback refused it) is taken for that run resumed from a backup:
        the stopped fit's updates after `start` are dropped from `history` (this fit
        replays them). A fit from step 0 (a run started over) drops nothing."""
        first, self._interrupted_from = self._interrupted_from, None
        kept = [entry for entry in self.history[first:] if entry[0] <= start]
        if start > 0 and len(kept) < len(self.history) - first:
            self.history[first:] = kept
            self._open_from = len(self.history)
            # (the replayed update may have the step last recorded: the engine's numbers of
            # the dropped updates are forgotten, HookedCallback._forget_undone_updates)
            self._recorded = None

    def save_json(self, path: Union[str, os.PathLike], matrix: str = "mean") -> None:
        """Writes ``{"names", "matrix", "history": [{"step", "matrix"}, ...]}`` to `path`.

        Args:
          path: file path.
          matrix: ``"mean"`` (mean over `history`) or ``"last"`` (the last update).

        Raises:
          ValueError: unknown `matrix`, or nothing recorded yet.
        """
        matrix = validation.check_choice(matrix, ("mean", "last"), "matrix")
        if not self.history:
            raise ValueError("CriteriaOverlap.save_json(): no update recorded yet.")
        matrices = np.stack([m for _, _, m in self.history])
        summary = matrices.mean(axis=0) if matrix == "mean" else matrices[-1]
        with open(path, "w") as f:
            json.dump({"names": list(self.names), "matrix": summary.tolist(),
                       "history": [{"step": s, "matrix": m.tolist()}
                                   for s, _, m in self.history]}, f, indent=1)

    def get_config(self):
        return dict(criteria=[_criterion_config(c) for c in self.criteria],
                    **self._schedule_config(), total_steps=self.total_steps, seed=self.seed)


def _criterion_config(criterion):
    """A registered criterion's name when it has its default parameters, else its config."""
    default = criteria_lib.get_criterion(criterion.name)
    return criterion.name if criterion == default else criterion.get_config()
