"""`DynamicSparseTraining`: argument checks, errors at the start of fit, logs, serialization."""

import csv
import json
import math
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_dst
from keras_dst import criteria as criteria_lib
from keras_dst import hooks as hooks_lib
from keras_dst import schedules
from keras_dst.optimizer_state import base_optimizer
from keras_dst.step_switch import StepSwitch

from conftest import LOSS, active_counts, assert_sparse_invariants, classification_data, mlp

DST = keras_dst.DynamicSparseTraining


# ----------------------------------------------------------------------------
# Bad arguments: raised by the constructor, naming the argument and the value.


BAD_ARGUMENTS = [
    (dict(prune="magnitud"), ValueError, ["prune", "'magnitud'", "magnitude"]),
    (dict(prune="SNIPP"), ValueError, ["prune", "'SNIPP'"]),
    (dict(grow="gradiant"), ValueError, ["grow", "'gradiant'", "gradient"]),
    (dict(prune="mest", prune_params={"gama": 1.0}), ValueError, ["prune_params", "'gama'", "gamma"]),
    (dict(grow_params={"offset": 1.0}), ValueError, ["grow_params", "'offset'"]),
    (dict(update_every=0), ValueError, ["update_every", "0"]),
    (dict(update_every=-1), ValueError, ["update_every", "-1"]),
    (dict(update_every=1.5), TypeError, ["update_every", "1.5"]),
    (dict(update_every="10"), TypeError, ["update_every", "'10'"]),
    (dict(update_every=True), TypeError, ["update_every", "True"]),
    (dict(prune_rate=0), ValueError, ["prune_rate", "0"]),
    (dict(prune_rate=1.5), ValueError, ["prune_rate", "1.5"]),
    (dict(prune_rate=-0.1), ValueError, ["prune_rate", "-0.1"]),
    (dict(prune_rate=float("nan")), ValueError, ["prune_rate", "nan"]),
    (dict(prune_rate="x"), TypeError, ["prune_rate", "'x'"]),
    (dict(schedule="cosinus"), ValueError, ["schedule", "'cosinus'", "cosine"]),
    (dict(schedule=None), ValueError, ["schedule", "None"]),
    (dict(ordering="sideways"), ValueError, ["ordering", "'sideways'", "'auto'", "before",
                                             "after"]),
    (dict(ordering=None), ValueError, ["ordering", "None", "'auto'"]),
    (dict(scope="local"), ValueError, ["scope", "'local'", "global"]),
    (dict(optimizer_state="zero"), ValueError, ["optimizer_state", "'zero'", "reset"]),
    (dict(optimizer_state=None), ValueError, ["optimizer_state", "None"]),
    (dict(end_step=0), ValueError, ["end_step", "0"]),
    (dict(end_step=1.5), ValueError, ["end_step", "1.5"]),
    (dict(grow_exact="yes"), TypeError, ["grow_exact", "'yes'"]),
    (dict(grow="gradient", grow_exact=False), ValueError,
     ["grow_exact=False", "grow='random' only", "grow='gradient'", "exactly"]),
    (dict(grow=None, grow_exact=False), ValueError, ["grow_exact=False", "grow=None", "nothing"]),
    (dict(total_steps=100, schedule=schedules.CosineRate(0.3, 50)), ValueError,
     ["total_steps=100", "CosineRate", "own steps"]),
    (dict(seed="a"), TypeError, ["seed", "'a'"]),
    (dict(normalize="row"), ValueError, ["normalize", "'row'"]),
    (dict(norm_type="mean"), ValueError, ["norm_type", "'mean'"]),
    (dict(total_steps=0), ValueError, ["total_steps", "0"]),
    (dict(prune="mest", prune_params={"gamma": "x"}), TypeError,
     ["prune_params", "'mest'", "gamma must be a real number", "'x'"]),
    (dict(prune="mest", prune_params={"gamma": float("nan")}), ValueError,
     ["prune_params", "gamma must be finite", "nan"]),
    (dict(prune="running_magnitude", prune_params={"beta": 2.0}), ValueError,
     ["prune_params", "beta must be in [0, 1]", "2.0"]),
    (dict(prune="mest", prune_params=[("gamma", 1.0)]), TypeError,
     ["prune_params must be a dict", "[('gamma', 1.0)]"]),
    (dict(grow="gradient", grow_params=5), TypeError, ["grow_params must be a dict", "5"]),
    (dict(grow=None, grow_params={"offset": 1.0}), ValueError,
     ["grow_params={'offset': 1.0}", "grow=None"]),
    (dict(prune="set", normalize="layer"), ValueError,
     ["prune='set'", "sign rule", "normalize='layer'"]),
]


@pytest.mark.parametrize("kwargs,error,words", BAD_ARGUMENTS,
                         ids=[",".join(f"{k}={v!r}" for k, v in a[0].items()) for a in BAD_ARGUMENTS])
def test_bad_argument_is_refused_by_the_constructor(kwargs, error, words):
    with pytest.raises(error) as info:
        DST(**kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_good_arguments_are_accepted():
    for kwargs in (dict(prune="ReciprocalSensitivity", grow="gradient"), dict(prune="MEST"),
                   dict(prune="set", grow=None), dict(update_every=1, prune_rate=1.0),
                   dict(end_step=0.75), dict(end_step=10), dict(schedule=schedules.constant(0.1)),
                   dict(prune="mest", prune_params={"gamma": 0.1}), dict(seed=np.int64(3))):
        DST(**kwargs)


# ----------------------------------------------------------------------------
# Errors at the start of fit, before any weight changes.


def _fit_fails(model, optimizer, callback, error=ValueError):
    model.compile(optimizer=optimizer, loss=LOSS, jit_compile=True)
    before = [np.array(w) for w in model.get_weights()]
    x, y = classification_data(n=32)
    with pytest.raises(error) as info:
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[callback])
    after = model.get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(before, after)), "weights changed"
    assert int(base_optimizer(model.optimizer).iterations.numpy()) == 0
    assert "apply" not in vars(base_optimizer(model.optimizer))  # not left hooked
    return str(info.value)


def test_model_not_made_prunable_is_an_error_at_the_start_of_fit():
    message = _fit_fails(mlp(), keras.optimizers.SGD(0.1), DST())
    assert "prunable" in message


def test_reset_with_an_optimizer_whose_state_cannot_be_mapped_is_an_error():
    # Adafactor keeps factored (row / column) second moments of every kernel.
    message = _fit_fails(keras_dst.prunable(mlp(), density=0.3), keras.optimizers.Adafactor(),
                         DST(optimizer_state="reset"))
    assert "optimizer_state" in message and "Adafactor" in message and "keep" in message
    assert "not one value per weight entry" in message


def test_an_optimizer_that_accumulates_gradients_is_refused_naming_it():
    message = _fit_fails(keras_dst.prunable(mlp(), density=0.3),
                         keras.optimizers.SGD(0.1, gradient_accumulation_steps=2), DST(),
                         error=NotImplementedError)
    assert "SGD has gradient_accumulation_steps=2" in message


def test_numpy_bools_are_bools():
    callback = DST(grow="random", grow_exact=np.False_)
    assert callback.grow_exact is False
    assert keras_dst.DynamicSparseTraining.from_config(callback.get_config()).grow_exact is False


def test_reset_with_an_optimizer_with_unlisted_state_is_an_error():
    class ShadowSGD(keras.optimizers.SGD):
        """Keeps a per-weight buffer outside any per-variable slot list."""

        def build(self, variables):
            super().build(variables)
            self.shadow = {v.path: self.add_variable_from_reference(v, "shadow") for v in variables}

    message = _fit_fails(keras_dst.prunable(mlp(), density=0.3), ShadowSGD(0.1),
                         DST(optimizer_state="reset"))
    assert "optimizer_state" in message and "ShadowSGD" in message


def test_momentum_growth_without_momentum_is_an_error():
    message = _fit_fails(keras_dst.prunable(mlp(), density=0.3), keras.optimizers.SGD(0.1),
                         DST(grow="momentum"))
    assert "DynamicSparseTraining(grow='momentum'): optimizer SGD keeps no momentum" in message
    from keras_dst import growth as growth_lib

    @keras_dst.register_growth("test_only_momentum_too", needs_momentum=True)
    def momentum_too(inputs):
        return tf.abs(inputs.momentum)

    try:  # a registered momentum rule is named by its own name
        message = _fit_fails(keras_dst.prunable(mlp(), density=0.3), keras.optimizers.SGD(0.1),
                             DST(grow="test_only_momentum_too"))
        assert "DynamicSparseTraining(grow='test_only_momentum_too'): optimizer SGD" in message
    finally:
        growth_lib._GROWTH.unregister("test_only_momentum_too")


def test_momentum_growth_reads_adamax_moments():
    """Adamax keeps m and u (its step is m / u): it was refused as keeping no momentum."""
    from keras_dst import optimizer_state

    model = keras_dst.prunable(mlp(), density=0.3)
    model.compile(optimizer=keras.optimizers.Adamax(0.01), loss=LOSS)
    x, y = classification_data()
    dst = DST(grow="momentum", update_every=2)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[dst])
    assert sum(s[2] for s in dst.engine.layer_stats.numpy()) > 0  # it grew
    assert_sparse_invariants(model)
    optimizer, weight = model.optimizer, keras_dst.sparse_targets(model)[0].weight
    index = optimizer._get_variable_index(weight)
    m, u = optimizer._m[index].numpy(), optimizer._u[index].numpy()
    np.testing.assert_allclose(optimizer_state.momentum(optimizer, weight).numpy(),
                               m / (u + 1e-8), rtol=1e-6)


def test_momentum_growth_reads_rmsprops_buffer_alone():
    """RMSprop(momentum) keeps a velocity too, but its buffer already sums steps divided by
    sqrt(velocity): dividing again ranked by m / v."""
    from keras_dst import optimizer_state

    model = keras_dst.prunable(mlp(), density=0.3)
    model.compile(optimizer=keras.optimizers.RMSprop(0.01, momentum=0.5), loss=LOSS)
    x, y = classification_data()
    dst = DST(grow="momentum", update_every=2)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[dst])
    assert sum(s[2] for s in dst.engine.layer_stats.numpy()) > 0  # it grew
    optimizer, weight = model.optimizer, keras_dst.sparse_targets(model)[0].weight
    index = optimizer._get_variable_index(weight)
    np.testing.assert_array_equal(optimizer_state.momentum(optimizer, weight).numpy(),
                                  optimizer._momentums[index].numpy())


def test_running_criterion_without_track_running_scores_is_an_error():
    message = _fit_fails(keras_dst.prunable(mlp(), density=0.3), keras.optimizers.SGD(0.1),
                         DST(prune="running_magnitude"))
    assert "track_running_scores" in message


# ----------------------------------------------------------------------------
# Logs: History, CSVLogger, ITOP.


LOG_KEYS = ("density", "prune_rate", "pruned", "grown", "mask_churn", "itop")


class BatchLogs(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.logs = []

    def on_train_batch_end(self, batch, logs=None):
        self.logs.append(dict(logs))


def test_logs_in_history_and_csv_logger_and_itop_grows(tmp_path):
    model = keras_dst.prunable(mlp((20, 16, 3)), density=0.3)
    counts = active_counts(model)
    totals = {t.weight.path: int(np.prod(t.weight.shape)) for t in keras_dst.sparse_targets(model)}
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9), LOSS, jit_compile=True)
    x, y = classification_data(n=64)
    path = str(tmp_path / "log.csv")
    dst, batches = DST(prune="magnitude", grow="random", update_every=3), BatchLogs()
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False,
                        callbacks=[dst, keras.callbacks.CSVLogger(path), batches])
    assert_sparse_invariants(model, counts)
    layer_keys = [f"density/{p}" for p in counts]
    for key in (*LOG_KEYS, *layer_keys):
        assert len(history.history[key]) == 2, key
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    for key in (*LOG_KEYS, *layer_keys):
        np.testing.assert_allclose([float(r[key]) for r in rows], history.history[key], rtol=1e-6)

    h = {k: np.array(v) for k, v in history.history.items()}
    n_total = sum(totals.values())
    np.testing.assert_allclose(h["density"], sum(counts.values()) / n_total)
    for p in counts:
        np.testing.assert_allclose(h[f"density/{p}"], counts[p] / totals[p])
    # epoch 2 reports the update at step 6 (cosine over 8 steps)
    stats = dst.engine.layer_stats.numpy()
    p6 = 0.005 + (0.5 - 0.005) * (1 + math.cos(math.pi * 6 / 8)) / 2
    assert h["prune_rate"][1] == pytest.approx(p6, rel=1e-6)
    assert h["pruned"][1] == stats[:, 1].sum() == sum(math.ceil(p6 * c) for c in counts.values())
    assert h["grown"][1] == h["pruned"][1]
    assert h["mask_churn"][1] == pytest.approx(h["grown"][1] / sum(counts.values()))
    ever = sum(int(np.count_nonzero(t.ever_active.numpy())) for t in dst.engine.targets)
    assert h["itop"][1] == pytest.approx(ever / n_total)
    assert stats.shape == (len(counts), 3)

    # per batch: nothing before the first update, ITOP grows at every update (steps 3 and 6)
    itop = [b["itop"] for b in batches.logs]
    assert itop[0] == itop[1] == pytest.approx(sum(counts.values()) / n_total)
    assert batches.logs[0]["pruned"] == 0 and batches.logs[0]["prune_rate"] == 0
    assert itop[2] > itop[1] and itop[5] > itop[4]
    assert itop[3] == itop[2] and itop[6] == itop[7] == itop[5]
    assert all(b["pruned"] > 0 for b in batches.logs[2:])
    # the hook is removed at the end of fit
    assert "apply" not in vars(model.optimizer)


class FreshLogs(keras.callbacks.Callback):
    """After `dst` in the list: compares every batch's logs with a fresh device read."""

    def __init__(self, dst):
        super().__init__()
        self.dst, self.batches = dst, 0

    def on_train_batch_end(self, batch, logs=None):
        self.batches += 1
        fresh = self.dst._read_logs()
        assert {k: logs[k] for k in fresh} == fresh, f"stale logs at batch {batch}"


@pytest.mark.parametrize("steps_per_execution", [1, 2])
def test_device_is_read_only_at_epoch_edges_and_after_update_steps(monkeypatch,
                                                                    steps_per_execution):
    model = keras_dst.prunable(mlp((20, 16, 3)), density=0.3)
    model.compile(keras.optimizers.SGD(0.05), LOSS, jit_compile=True,
                  steps_per_execution=steps_per_execution)
    x, y = classification_data(n=160)  # 10 steps per epoch
    dst = DST(prune="magnitude", grow="random", update_every=4)
    reads = []
    refresh = dst._refresh
    monkeypatch.setattr(dst, "_refresh", lambda: (reads.append(1), refresh()))
    fresh = FreshLogs(dst)
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False, callbacks=[dst, fresh])
    assert fresh.batches == 20 // steps_per_execution
    # per epoch: its start, its end, and one batch per update step (4, 8 | 12, 16, 20),
    # plus the first batch of the fit (checks the host's step count)
    assert len(reads) == 2 * 2 + 5 + 1


@pytest.mark.parametrize("kind", ["gradual", "overlap"])
def test_an_epoch_s_last_execution_run_whole_past_steps_per_epoch_updates(kind):
    # On data that goes on, Keras runs an epoch's last execution whole: 3 executions of 3
    # steps for steps_per_epoch=7. A switched hook must be in the one holding step 18.
    model = keras_dst.prunable(mlp((20, 16, 3)), density=1.0, distribution="uniform")
    model.compile(keras.optimizers.SGD(0.05), LOSS, jit_compile=True, steps_per_execution=3)
    x, y = classification_data(n=640)
    callback = (keras_dst.GradualPruning(0.1, update_every=2, end_step=18) if kind == "gradual"
                else keras_dst.CriteriaOverlap(["magnitude", "snip"], update_every=4))
    model.fit(x, y, batch_size=32, epochs=2, steps_per_epoch=7, verbose=0, shuffle=False,
              callbacks=[callback])
    assert int(model.optimizer.iterations.numpy()) == 18
    if kind == "gradual":  # updates at 2, 4, ..., 18: the last in an epoch's last execution
        assert int(callback.engine.last_update_step.numpy()) == 18
        total = sum(int(np.prod(t.weight.shape)) for t in keras_dst.sparse_targets(model))
        active = sum(int(m.sum()) for m in keras_dst.masks(model).values())
        assert abs(active / total - 0.1) < 1e-2 and keras_dst.density(model) == active / total
    else:
        assert [step for step, _, _ in callback.history] == [4, 8, 12, 16]  # 8: in the
        # epoch's last execution (steps 7-9)


# ----------------------------------------------------------------------------
# Compiled steps: DST is in every step (its update in a zero-or-one-trip loop);
# the switched hooks (CriteriaOverlap, GradualPruning) only in the executions
# that may update.


class StepRecorder(keras.callbacks.Callback):
    """After `callback` in the list: per batch, whether its engine was in the step,
    the optimizer step after it, its last update step and the masks after it."""

    def __init__(self, callback):
        super().__init__()
        self.callback, self.rows = callback, []

    def on_train_batch_begin(self, batch, logs=None):
        self.needed = self.model.__dict__[StepSwitch.ATTR]._needed[self.callback.engine]

    def on_train_batch_end(self, batch, logs=None):
        self.rows.append((self.needed, int(self.model.optimizer.iterations.numpy()),
                          int(self.callback.engine.last_update_step.numpy()),
                          keras_dst.masks(self.model)))


@pytest.mark.parametrize("kind", ["dst", "overlap"])
@pytest.mark.parametrize("steps_per_execution", [1, 3])
def test_the_engine_runs_in_the_executions_that_may_update(steps_per_execution, kind):
    """DST's engine is in every execution and changes the masks exactly at its update
    steps; a switched hook (CriteriaOverlap) is only in the executions holding one of
    its update steps (and the first, which checks the host's count)."""
    model = keras_dst.prunable(mlp((20, 16, 3)), density=0.3)
    model.compile(keras.optimizers.SGD(0.05), LOSS, jit_compile=True,
                  steps_per_execution=steps_per_execution)
    x, y = classification_data(n=160)  # 10 steps per epoch
    callback = (DST(prune="magnitude", grow="gradient", update_every=4) if kind == "dst" else
                keras_dst.CriteriaOverlap(["magnitude", "snip"], update_every=4))
    recorder = StepRecorder(callback)
    previous_step, previous_update, previous_masks = 0, -1, keras_dst.masks(model)
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False,
              callbacks=[callback, recorder])
    for i, (needed, step, update, masks) in enumerate(recorder.rows):
        first = previous_step + 1
        holds_update = any(t % 4 == 0 for t in range(first, step + 1))
        # (an epoch's last execution runs 1 step here, the data ending: it is switched as
        # one that may run steps_per_execution steps, as on data that goes on)
        may_hold = any(t % 4 == 0 for t in range(first, first + steps_per_execution))
        assert needed == (kind == "dst" or may_hold or i == 0), (i, first, step)
        assert (update != previous_update) == holds_update, (i, first, step)
        changed = any((previous_masks[k] != masks[k]).any() for k in masks)
        assert changed == (holds_update and kind == "dst"), (i, first, step)
        previous_step, previous_update, previous_masks = step, update, masks
    assert int(callback.engine.last_update_step.numpy()) == 20
    switch = model.__dict__[StepSwitch.ATTR]  # after fit: the static step (or the switch
    # that compiles it on first use, if no execution ran it)
    assert model.train_function is switch._functions.get(frozenset(), switch)
    assert "apply" not in vars(base_optimizer(model.optimizer))  # no hook


def test_a_switched_hook_is_traced_only_into_its_own_step(monkeypatch):
    model = keras_dst.prunable(mlp((20, 16, 3)), density=0.3)
    model.compile(keras.optimizers.SGD(0.05), LOSS, jit_compile=True)
    x, y = classification_data(n=160)
    overlap = keras_dst.CriteriaOverlap(["magnitude", "snip"], update_every=5)
    calls = []
    original = keras_dst.overlap.OverlapEngine.before_apply
    monkeypatch.setattr(keras_dst.overlap.OverlapEngine, "before_apply",
                        lambda self, optimizer, *a: (
                            calls.append(self in hooks_lib.installed(optimizer) and self in
                                         vars(optimizer)["_keras_dst_traced"]),
                            original(self, optimizer, *a)))
    variants = []
    record = keras.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: variants.append(
        sorted(model.__dict__[StepSwitch.ATTR]._functions)))
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[overlap, record])
    assert calls and all(calls)  # the hook only ever ran while traced into a step
    assert sorted(variants[0], key=len) == [frozenset(), frozenset({overlap.engine})]  # two


def test_dst_compiles_one_step():
    model = keras_dst.prunable(mlp((20, 16, 3)), density=0.3)
    model.compile(keras.optimizers.SGD(0.05), LOSS, jit_compile=True)
    x, y = classification_data(n=160)
    dst = DST(prune="snip", grow="random", update_every=5)
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[dst])
    assert list(model.__dict__[StepSwitch.ATTR]._functions) == [frozenset({dst.engine})]


def test_running_criteria_keep_the_engine_in_every_step():
    model = keras_dst.prunable(mlp((20, 16, 3)), density=0.3, track_running_scores=True)
    model.compile(keras.optimizers.SGD(0.05), LOSS, jit_compile=True)
    x, y = classification_data(n=96)
    dst = DST(prune="running_magnitude", grow="random", update_every=4)
    recorder = StepRecorder(dst)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[dst, recorder])
    assert all(needed for needed, *_ in recorder.rows)


class TwoStepsPerBatch(keras.Model):
    """A custom train_step that applies the optimizer twice per batch."""

    def train_step(self, data):
        x, y = data
        for _ in range(2):
            with tf.GradientTape() as tape:
                loss = self.compute_loss(x=x, y=y, y_pred=self(x, training=True))
            grads = tape.gradient(loss, self.trainable_variables)
            self.optimizer.apply(grads, self.trainable_variables)
        return {"loss": loss}


@pytest.mark.parametrize("kind", ["dst", "overlap"])
def test_an_optimizer_ahead_of_the_batch_count_misses_no_update(kind):
    """A train_step applying the optimizer twice: DST (in every step) updates on time;
    a switched hook sees the device ahead of the host's count and runs in every step from
    then on; both warn (schedules sized by fit count its batches)."""
    sparse = keras_dst.prunable(mlp((20, 16, 3)), density=0.3)
    model = TwoStepsPerBatch(sparse.inputs, sparse.outputs)
    model.compile(keras.optimizers.SGD(0.05), LOSS, jit_compile=True)
    x, y = classification_data(n=160)  # 10 batches, 20 optimizer steps
    callback = (DST(prune="magnitude", grow="random", update_every=3) if kind == "dst" else
                keras_dst.CriteriaOverlap(["magnitude", "snip"], update_every=3))
    seen = []
    record = keras.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: seen.append(
        int(callback.engine.last_update_step.numpy())))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[callback, record])
    assert sum("more than once" in str(w.message) for w in caught) == 1
    assert int(model.optimizer.iterations.numpy()) == 20
    assert sorted(set(seen) - {-1})[-5:] == [6, 9, 12, 15, 18]  # none missed once detected
    if kind == "dst":
        assert sorted(set(seen) - {-1}) == [3, 6, 9, 12, 15, 18]


def test_a_fit_that_raised_leaves_no_engine_behind():
    model = keras_dst.prunable(mlp((20, 16, 3)), density=0.3)
    model.compile(keras.optimizers.SGD(0.05), LOSS, jit_compile=True)
    x, y = classification_data(n=64)

    def boom(batch, logs):
        if batch == 1:
            raise RuntimeError("boom")

    first = DST(update_every=2)
    with pytest.raises(RuntimeError, match="boom"):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0,
                  callbacks=[first, keras.callbacks.LambdaCallback(on_train_batch_end=boom)])
    hooks = lambda: vars(base_optimizer(model.optimizer))["_keras_dst_hooks"]
    assert hooks() == [first.engine]
    for callback in (DST(update_every=2), first):  # another callback, then the same again
        seen = []
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[
            callback, keras.callbacks.LambdaCallback(
                on_train_batch_end=lambda b, logs, seen=seen: seen.append(list(hooks())))])
        assert all(h == [callback.engine] for h in seen), seen
    assert "apply" not in vars(base_optimizer(model.optimizer))


def test_a_callback_list_reused_after_a_fit_that_raised_trains_again():
    """A keras.callbacks.CallbackList passed to fit again (a notebook cell re-run) keeps its
    `params`: after a fit interrupted mid-way, the next fit was refused as "this fit already
    has this callback"."""
    model = keras_dst.prunable(mlp((20, 16, 3)), density=0.3)
    model.compile(keras.optimizers.SGD(0.05), LOSS, jit_compile=True)
    x, y = classification_data(n=64)
    dst = DST(update_every=1, prune_rate=0.5)
    callbacks = keras.callbacks.CallbackList(
        [dst, keras.callbacks.LambdaCallback(on_train_batch_end=_boom_at_batch_1)],
        model=model, add_history=True, epochs=1, steps=4)
    with pytest.raises(KeyboardInterrupt):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=callbacks)
    callbacks.callbacks.pop(1)  # (the interruption's callback, removed in place)
    masks = keras_dst.masks(model)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=callbacks)
    assert any((masks[k] != v).any() for k, v in keras_dst.masks(model).items())
    assert "apply" not in vars(base_optimizer(model.optimizer))
    with pytest.raises(ValueError, match="pass it once"):  # a real duplicate still is one
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[dst, dst])


@pytest.fixture
def criterion_failing_when_traced():
    """A registered criterion that raises when traced (registered for the test only: the
    registry is global, and other modules parametrize over every registered name)."""
    def fails_when_traced(inputs):
        raise ValueError("this criterion cannot be traced")

    keras_dst.register_criterion("test_fails_when_traced", ordering="after_optimizer",
                                 needs_gradient=False, overwrite=True)(fails_when_traced)
    yield "test_fails_when_traced"
    criteria_lib._CRITERIA.unregister("test_fails_when_traced")


def _boom_at_batch_1(batch, logs):
    if batch == 1:
        raise KeyboardInterrupt


@pytest.mark.parametrize("failure, then", [
    ("callback", "fit"), ("callback", "compile_same_optimizer"), ("trace", "fit"),
    ("callback", "train_on_batch"), ("callback_at_batch_begin", "fit"),
    ("callback_at_batch_begin", "train_on_batch")])
def test_after_a_fit_that_raised_a_plain_fit_runs_the_static_step(
        failure, then, criterion_failing_when_traced):
    """A DST fit interrupted by a callback (or whose step failed to trace) never reaches
    on_train_end: the plain fit that follows, on the same compiled model or after a
    `compile()` with the same optimizer, must neither update the masks nor fail again.
    (A callback after DST's that raised in `on_train_batch_begin` left DST's preparation
    of that batch in place: the plain fit's first step ran the update.)"""
    model = keras_dst.prunable(mlp((20, 16, 3)), density=0.3)
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9), LOSS, jit_compile=True)
    x, y = classification_data(n=64)
    if failure.startswith("callback"):
        hook = "on_train_batch_begin" if failure.endswith("begin") else "on_train_batch_end"
        with pytest.raises(KeyboardInterrupt):
            model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[
                DST(update_every=1, prune_rate=0.5),
                keras.callbacks.LambdaCallback(**{hook: _boom_at_batch_1})])
    else:
        with pytest.raises(ValueError, match="cannot be traced"):
            model.fit(x, y, batch_size=16, epochs=1, verbose=0,
                      callbacks=[DST(prune=criterion_failing_when_traced, update_every=1)])
    if then == "compile_same_optimizer":
        model.compile(model.optimizer, LOSS, jit_compile=True)
    masks = keras_dst.masks(model)
    if then == "train_on_batch":
        for _ in range(3):
            model.train_on_batch(x[:16], y[:16])
    else:
        model.fit(x, y, batch_size=16, epochs=2, verbose=0)  # updates at every step if hooked
    after = keras_dst.masks(model)
    assert all((masks[k] == after[k]).all() for k in masks)
    assert "apply" not in vars(base_optimizer(model.optimizer))
    assert_sparse_invariants(model)
    # and DST trains again, with a hook of its own only while it fits
    dst = DST(update_every=1, prune_rate=0.5)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[dst])
    assert any((after[k] != v).any() for k, v in keras_dst.masks(model).items())
    assert "apply" not in vars(base_optimizer(model.optimizer))


@pytest.mark.parametrize("make", [lambda: DST(update_every=2, prune_rate=0.5, seed=3),
                                  lambda: keras_dst.GradualPruning(0.1, update_every=2,
                                                                   initial_density=0.3)],
                         ids=["dst", "gradual"])
def test_a_users_own_loop_of_callbacks_and_train_on_batch_trains_as_fit(make):
    """Keras's way to drive callbacks by hand: a CallbackList, then `train_on_batch` per
    batch. The callbacks' preparation of each step was dropped as stale at
    `train_on_batch`, so the first step ran without the update and the callback refused
    the model as one whose train_step skips its optimizer."""
    x, y = classification_data(n=64)
    states = []
    for by_hand in (False, True):
        model = keras_dst.prunable(mlp((20, 16, 3)), density=0.3, seed=0)
        model.compile(keras.optimizers.SGD(0.05), LOSS, jit_compile=True)
        callback = make()
        if by_hand:
            callbacks = keras.callbacks.CallbackList([callback], model=model, epochs=1, steps=4)
            callbacks.on_train_begin()
            callbacks.on_epoch_begin(0)
            for i in range(4):
                callbacks.on_train_batch_begin(i)
                logs = model.train_on_batch(x[16 * i:16 * (i + 1)], y[16 * i:16 * (i + 1)],
                                            return_dict=True)
                callbacks.on_train_batch_end(i, logs)
            callbacks.on_epoch_end(0)
            callbacks.on_train_end()
        else:
            model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0,
                      callbacks=[callback])
        states.append((int(callback.engine.last_update_step.numpy()), keras_dst.masks(model)))
    (fit_last, fit_masks), (hand_last, hand_masks) = states
    assert fit_last == hand_last >= 2
    assert all((fit_masks[k] == hand_masks[k]).all() for k in fit_masks)


@pytest.mark.parametrize("fit_before", [False, True], ids=["fresh", "after_a_fit"])
def test_a_users_gradient_tape_loop_with_the_callbacks_is_refused_naming_what_to_run(fit_before):
    """A loop of one's own (GradientTape, optimizer.apply_gradients) runs no update: it was
    told it skipped the optimizer it calls, and after a DST fit of an equal configuration
    (whose kept engine had reached `apply` then) it ran with no update and no word."""
    x, y = classification_data(n=64)
    model = keras_dst.prunable(mlp((20, 16, 3)), density=0.3)
    model.compile(keras.optimizers.SGD(0.05), LOSS, jit_compile=True)
    make = lambda: DST(update_every=3, schedule="constant")  # noqa: E731
    if fit_before:
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[make()])
    loss = keras.losses.get(LOSS)

    @tf.function(jit_compile=True)
    def step(xb, yb):
        with tf.GradientTape() as tape:
            value = loss(yb, model(xb, training=True))
        grads = tape.gradient(value, model.trainable_variables)
        model.optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return value

    callbacks = keras.callbacks.CallbackList([make()], model=model, epochs=1, steps=4)
    callbacks.on_train_begin()
    callbacks.on_epoch_begin(0)
    callbacks.on_train_batch_begin(0)
    logs = {"loss": float(step(x[:16], y[:16]))}
    with pytest.raises(ValueError, match=r"DynamicSparseTraining: this step did not run the "
                                         r"model's training function .* Run the steps with "
                                         r"model.fit, or with model.train_on_batch inside a "
                                         r"keras.callbacks.CallbackList"):
        callbacks.on_train_batch_end(0, logs)


@pytest.mark.parametrize("make, density", [
    (lambda: DST(update_every=3), 0.5),
    (lambda: keras_dst.GradualPruning(final_density=0.2, update_every=3), 1.0),
], ids=["dst", "gradual"])
def test_a_train_step_applying_the_optimizer_twice_is_told_how_to_size_the_run(make, density):
    """Updates fall on optimizer steps, twice as many as fit's batches here: a schedule
    sized by fit (the cosine's, GradualPruning's end_step=None) ended halfway; the DST
    callback (whose engine runs in every step) said nothing."""

    class TwiceApplied(keras.Model):
        def __init__(self):
            super().__init__()
            self.hidden = keras.layers.Dense(16, activation="relu")
            self.out = keras.layers.Dense(3)

        def call(self, x):
            return self.out(self.hidden(x))

        def train_step(self, data):
            super().train_step(data)
            return super().train_step(data)

    x, y = classification_data(n=64)
    model = TwiceApplied()
    model(x[:1])
    keras_dst.prunable(model, density=density)
    model.compile(keras.optimizers.SGD(0.05), LOSS, jit_compile=True)
    for _ in range(2):  # (the second fit's numbers are its own, not running totals)
        with pytest.warns(UserWarning, match=r"the optimizer made 2 steps in this fit where "
                                             r"its batches count 1 .* give the run's length "
                                             r"in optimizer steps"):
            model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[make()])


@pytest.mark.parametrize("same_configuration", [True, False])
def test_an_optimizer_assigned_after_a_fit_is_the_one_the_next_fit_trains_with(
        same_configuration):
    """`model.optimizer = ...` without compile(): the next DST fit of an equal configuration
    reused the function compiled with the old optimizer (the new one never stepped, and
    carried the hooks), one of another configuration traced the new one."""
    x, y = classification_data(n=64)
    model = keras_dst.prunable(mlp((20, 16, 3)), density=0.3)
    model.compile(keras.optimizers.SGD(0.05), LOSS, jit_compile=True)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[DST(update_every=3)])
    old = model.optimizer
    model.optimizer = keras.optimizers.Adam(0.01)
    second = DST(update_every=3 if same_configuration else 2)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[second])
    assert int(old.iterations.numpy()) == 4 and int(model.optimizer.iterations.numpy()) == 4
    assert int(second.engine.last_update_step.numpy()) >= 2  # it updated, hooked on Adam
    assert "apply" not in vars(old) and "apply" not in vars(model.optimizer)
    assert_sparse_invariants(model)


def test_a_fit_that_raised_then_a_compile_leaves_no_hook_on_the_old_optimizer():
    # (the next fit's switch uninstalled the raised fit's hooks from the new optimizer)
    x, y = classification_data(n=64)
    model = keras_dst.prunable(mlp((20, 16, 3)), density=0.3)
    model.compile(keras.optimizers.SGD(0.05), LOSS, jit_compile=True)

    class Stop(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[DST(), Stop()])
    old = model.optimizer
    assert "apply" in vars(old)  # the raised fit's hook, left installed
    model.compile(keras.optimizers.Adam(0.01), LOSS, jit_compile=True)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[DST()])
    assert "apply" not in vars(old) and "apply" not in vars(model.optimizer)


def _drive(callbacks, model, x, y, steps=4, epoch_begin=False, skip_batch_begin=()):
    """A loop of one's own of `callbacks` (a CallbackList) around model.train_on_batch on
    batches of 16 (but for the batches in `skip_batch_begin`, which get no
    on_train_batch_begin)."""
    callbacks.on_train_begin()
    if epoch_begin:
        callbacks.on_epoch_begin(0)
    for i in range(steps):
        if i not in skip_batch_begin:
            callbacks.on_train_batch_begin(i)
        logs = model.train_on_batch(x[16 * i:16 * (i + 1)], y[16 * i:16 * (i + 1)],
                                    return_dict=True)
        callbacks.on_train_batch_end(i, logs)
    callbacks.on_train_end()


def _callback_loop(model, callback, x, y, steps=4, epoch_begin=True, skip_batch_begin=()):
    """`_drive` of a CallbackList of `callback` made with epochs and steps."""
    _drive(keras.callbacks.CallbackList([callback], model=model, epochs=1, steps=steps),
           model, x, y, steps, epoch_begin, skip_batch_begin)


def test_a_loop_of_ones_own_without_on_epoch_begin_counts_the_optimizer_s_steps():
    """The host count started at 0 where no on_epoch_begin read the optimizer: a second
    loop warned that the optimizer made more steps than the host counted."""
    x, y = classification_data(n=64)
    model = keras_dst.prunable(mlp((20, 16, 3)), density=0.3)
    model.compile(keras.optimizers.SGD(0.05), LOSS, jit_compile=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            _callback_loop(model, DST(update_every=2, schedule="constant"), x, y,
                           epoch_begin=False)
    assert int(model.optimizer.iterations.numpy()) == 8


@pytest.mark.parametrize("skipped", [(0, 1, 2, 3), (2,)], ids=["every", "one_later"])
def test_a_loop_of_ones_own_skipping_on_train_batch_begin_is_told_so(skipped):
    # (skipped at a later batch, the step ended the updates for the rest of the loop,
    # without a word)
    x, y = classification_data(n=64)
    model = keras_dst.prunable(mlp((20, 16, 3)), density=0.3)
    model.compile(keras.optimizers.SGD(0.05), LOSS, jit_compile=True)
    with pytest.raises(ValueError, match=r"DynamicSparseTraining: the step ran before this "
                                         r"callback prepared it .* call "
                                         r"callbacks.on_train_batch_begin\(i\) before each "
                                         r"model.train_on_batch"):
        _callback_loop(model, DST(update_every=2), x, y, skip_batch_begin=skipped)


def test_a_compile_in_the_middle_of_a_loop_of_ones_own_is_refused():
    # (the recompiled model trained with Keras's plain function: every later update was
    # lost, without a word)
    x, y = classification_data(n=96)
    model = keras_dst.prunable(mlp((20, 16, 3)), density=0.3)
    model.compile(keras.optimizers.SGD(0.05), LOSS, jit_compile=True)
    callbacks = keras.callbacks.CallbackList([DST(update_every=2)], model=model, epochs=1,
                                             steps=6)
    callbacks.on_train_begin()
    callbacks.on_epoch_begin(0)
    with pytest.raises(ValueError, match=r"DynamicSparseTraining: the model's training "
                                         r"function was replaced during this run \(a "
                                         r"compile\(\), or a new model.optimizer\)"):
        for i in range(6):
            if i == 2:
                model.compile(model.optimizer, LOSS, jit_compile=True)
            callbacks.on_train_batch_begin(i)
            logs = model.train_on_batch(x[16 * i:16 * (i + 1)], y[16 * i:16 * (i + 1)],
                                        return_dict=True)
            callbacks.on_train_batch_end(i, logs)


def test_a_loop_of_ones_own_driven_from_another_model_s_fit_trains():
    # (a teacher's fit on the stack made the student's loop read as a fit: each
    # train_on_batch dropped the preparation, and the loop was refused)
    x, y = classification_data(n=64)
    student = keras_dst.prunable(mlp((20, 16, 3)), density=0.3)
    student.compile(keras.optimizers.SGD(0.05), LOSS, jit_compile=True)
    teacher = mlp((20, 16, 3))
    teacher.compile(keras.optimizers.SGD(0.05), LOSS)
    callback = DST(update_every=2, schedule="constant")
    driver = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: _callback_loop(student, callback, x, y))
    teacher.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[driver])
    assert int(callback.engine.last_update_step.numpy()) == 4


def test_a_loop_of_ones_own_under_a_strategy_builds_the_optimizer_in_its_scope():
    # (Keras's fit runs the callbacks inside the scope; a loop of one's own does not)
    x, y = classification_data(n=64)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        model = keras_dst.prunable(mlp((20, 16, 3)), density=0.3)
        model.compile(keras.optimizers.Adam(0.01), LOSS)
    callback = DST(update_every=2)
    _callback_loop(model, callback, x, y)
    assert int(callback.engine.last_update_step.numpy()) == 4
    assert_sparse_invariants(model)


def test_a_forced_rebuild_of_the_training_function_inside_a_fit_keeps_dst_updating():
    # (Keras's new function, traced without the hooks, uninstalled them: no update for the
    # rest of the fit, without a word)
    model = keras_dst.prunable(mlp((20, 16, 3)), density=0.3)
    model.compile(keras.optimizers.SGD(0.05), LOSS, jit_compile=True)
    x, y = classification_data(n=64)
    changed, last = [], [keras_dst.masks(model)]

    def record(batch, logs):
        now = keras_dst.masks(model)
        changed.append(any((last[0][k] != v).any() for k, v in now.items()))
        last[0] = now

    model.fit(x, y, batch_size=16, epochs=3, verbose=0, callbacks=[
        DST(update_every=2, prune_rate=0.5, schedule="constant"),
        keras.callbacks.LambdaCallback(
            on_epoch_begin=lambda epoch, logs: model.make_train_function(force=True),
            on_train_batch_end=record)])
    assert changed == [False, True] * 6  # optimizer steps 2, 4, ..., 12
    assert "apply" not in vars(base_optimizer(model.optimizer))
    masks = keras_dst.masks(model)
    model.make_train_function(force=True)  # between fits: a plain fit after it
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert all((masks[k] == v).all() for k, v in keras_dst.masks(model).items())


# ----------------------------------------------------------------------------
# Serialization.


def test_get_config_round_trip():
    callback = DST(prune="mest", grow="random", update_every=7, prune_rate=0.3,
                   schedule="linear", end_step=0.75, ordering="after", scope="global",
                   grow_exact=False, optimizer_state="reset", seed=3,
                   prune_params={"gamma": 0.5}, normalize="layer", norm_type="sum",
                   total_steps=100)
    config = json.loads(json.dumps(keras.saving.serialize_keras_object(callback)))
    clone = keras.saving.deserialize_keras_object(config)
    assert type(clone) is DST
    assert clone.get_config() == callback.get_config()
    assert clone.criterion.params["gamma"] == 0.5 and clone.criterion.name == "mest"
    assert clone.growth.name == "random" and clone.resolved_ordering == "before_optimizer"


@pytest.mark.parametrize("schedule", [schedules.constant(0.2), schedules.cosine(0.4, 50, 0.01),
                                      schedules.linear(0.3, 0.5, 10)], ids=repr)
def test_get_config_round_trip_with_a_schedule_object(schedule):
    callback = DST(schedule=schedule)
    config = json.loads(json.dumps(keras.saving.serialize_keras_object(callback)))
    clone = keras.saving.deserialize_keras_object(config)
    assert type(clone.schedule) is type(schedule)
    assert clone.schedule.get_config() == schedule.get_config()
    assert clone.get_config() == callback.get_config()
    for step in (0, 7, 40):
        assert float(clone.schedule(step)) == pytest.approx(float(schedule(step)))


def test_deserialized_callback_trains():
    config = keras.saving.serialize_keras_object(
        DST(prune="snip", grow="gradient", update_every=2, schedule="constant", prune_rate=0.25))
    callback = keras.saving.deserialize_keras_object(config)
    model = keras_dst.prunable(mlp((20, 16, 3)), density=0.3)
    counts = active_counts(model)
    before = keras_dst.masks(model)
    model.compile(keras.optimizers.SGD(0.05), LOSS, jit_compile=True)
    x, y = classification_data(n=32)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[callback])
    after = keras_dst.masks(model)
    assert any((before[k] != after[k]).any() for k in before)
    assert_sparse_invariants(model, counts)
    assert callback.engine.layer_stats.numpy()[:, 1].tolist() == [
        math.ceil(0.25 * c) for c in counts.values()]


# ----------------------------------------------------------------------------
# hooks.run_if: the update's zero-or-one-trip loop.


def test_run_if_runs_its_body_exactly_when_the_predicate_holds_under_xla():
    counter = tf.Variable(0.0)
    seen = tf.Variable(tf.zeros([3]))

    @tf.function(jit_compile=True)
    def step(pred, x):
        def body(gated):
            counter.assign_add(1.0)
            seen.assign(gated)
        hooks_lib.run_if(pred, body, [x])

    x = tf.constant([1.0, 2.0, 3.0])
    for pred in (False, True, False, True, True):
        step(tf.constant(pred), x)
    assert float(counter.numpy()) == 3.0
    np.testing.assert_array_equal(seen.numpy(), x.numpy())  # the body sees the tensor itself
    assert step.experimental_get_tracing_count() == 1


def test_dst_runs_eagerly():
    """`run_eagerly=True` (Keras's debugging mode) runs the update as plain Python."""
    model = keras_dst.prunable(mlp((20, 16, 3)), density=0.3)
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9), LOSS, run_eagerly=True)
    x, y = classification_data(n=64)
    counts, masks = active_counts(model), keras_dst.masks(model)
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[
        DST(prune="magnitude", grow="gradient", update_every=2, prune_rate=0.5)])
    assert any((masks[k] != v).any() for k, v in keras_dst.masks(model).items())
    assert_sparse_invariants(model, counts)
    assert history.history["pruned"][-1] > 0


@pytest.mark.parametrize("second", ["dst", "gradual"])
def test_a_second_callback_that_changes_masks_is_refused(second):
    model = keras_dst.prunable(mlp((20, 16, 3)), density=0.3)
    model.compile(keras.optimizers.SGD(0.05), LOSS, jit_compile=True)
    x, y = classification_data(n=64)
    other = (DST(prune="snip", update_every=3) if second == "dst" else
             keras_dst.GradualPruning(final_density=0.1, begin_step=0, end_step=8))
    masks = keras_dst.masks(model)
    with pytest.raises(ValueError, match=r"already has a callback that changes the masks "
                                         r"\(DynamicSparseTraining\); pass one per fit"):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0,
                  callbacks=[DST(update_every=1), other])
    assert "apply" not in vars(base_optimizer(model.optimizer))  # nothing left installed
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert all((masks[k] == v).all() for k, v in keras_dst.masks(model).items())
    # an observer joins a DST callback
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[
        DST(update_every=2), keras_dst.CriteriaOverlap(["magnitude", "snip"], update_every=2)])


@pytest.mark.parametrize("twice", ["equal", "same", "observer"])
def test_a_callback_twice_in_one_fit_is_refused(twice):
    """Equal configurations share one engine; a second callback of that configuration
    (or one listed twice) would go unnoticed, so it is refused like any second writer."""
    model = keras_dst.prunable(mlp((20, 16, 3)), density=0.3)
    model.compile(keras.optimizers.SGD(0.05), LOSS, jit_compile=True)
    x, y = classification_data(n=64)
    if twice == "observer":
        first = keras_dst.CriteriaOverlap(["magnitude", "snip"], update_every=2)
        second = keras_dst.CriteriaOverlap(["magnitude", "snip"], update_every=2)
        name = "CriteriaOverlap"
    else:
        first = DST(update_every=2)
        second = first if twice == "same" else DST(update_every=2)
        name = "DynamicSparseTraining"
    masks = keras_dst.masks(model)
    with pytest.raises(ValueError, match=f"{name}: this fit already has this callback, or "
                                         f"another {name} of an equal configuration"):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[first, second])
    assert "apply" not in vars(base_optimizer(model.optimizer))  # nothing left installed
    assert all((masks[k] == v).all() for k, v in keras_dst.masks(model).items())
    logs = model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[first]).history
    assert len(logs["loss"]) == 1


def test_logs_describe_this_model_and_its_masks_as_they_are():
    """A callback reused on another model reports that model; masks set between fits
    are the density logged by the next fit, before its first update."""
    x, y = classification_data(n=64)
    dst = DST(update_every=100)  # no update in these fits
    first = keras_dst.prunable(mlp((20, 16, 3)), density=0.3)
    second = keras_dst.prunable(mlp((20, 16, 3)), density=0.6)
    for model in (first, second):
        model.compile(keras.optimizers.SGD(0.05), LOSS, jit_compile=True)
        logs = model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[dst]).history
        assert logs["density"][-1] == pytest.approx(keras_dst.density(model))
        assert set(k for k in logs if k.startswith("density/")) == {
            f"density/{t.weight.path}" for t in keras_dst.sparse_targets(model)}
    masks = {k: np.ones_like(v) for k, v in keras_dst.masks(second).items()}
    keras_dst.set_masks(second, masks)
    logs = second.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[dst]).history
    assert logs["density"][-1] == 1.0


@pytest.mark.parametrize("make", [
    lambda: DST(update_every=100, schedule="constant"),
    lambda: keras_dst.GradualPruning(final_density=0.1, begin_step=200, end_step=300,
                                     initial_density=0.2),
], ids=["dst", "gradual"])
def test_logs_see_masks_written_during_a_fit_before_the_next_update(make):
    """A user's callback writing masks in the middle of a fit (no update in it): the next
    epoch's logs give the masks as they are, not those of the last update."""
    x, y = classification_data(n=64)
    model = keras_dst.prunable(mlp((20, 16, 3)), density=0.3)
    model.compile(keras.optimizers.SGD(0.05), LOSS, jit_compile=True)

    class DenseMasksAtEpoch1(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                keras_dst.set_masks(model, {k: np.ones_like(v)
                                            for k, v in keras_dst.masks(model).items()})

    logs = model.fit(x, y, batch_size=16, epochs=2, verbose=0,
                     callbacks=[DenseMasksAtEpoch1(), make()]).history
    assert logs["density"][0] == pytest.approx(0.3, abs=0.01)
    assert logs["density"][1] == 1.0 == keras_dst.density(model)
    if "itop" in logs:
        assert logs["itop"][1] == 1.0


def test_backup_and_restore_round_trips_its_config(tmp_path):
    backup = keras_dst.BackupAndRestore(str(tmp_path / "backup"), delete_checkpoint=False)
    config = json.loads(json.dumps(keras.saving.serialize_keras_object(backup)))
    clone = keras.saving.deserialize_keras_object(config)
    assert type(clone) is keras_dst.BackupAndRestore
    assert clone.get_config() == backup.get_config()


@pytest.mark.parametrize("make", [
    lambda: keras_dst.GradualPruning(final_density=0.1, begin_step=0, end_step=8),
    lambda: keras_dst.CriteriaOverlap(["magnitude", "snip"], update_every=2),
], ids=["gradual", "overlap"])
def test_callbacks_without_strategy_support_refuse_one_before_any_change(make):
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        model = keras_dst.prunable(mlp((20, 16, 3)), density=0.5)
        model.compile(keras.optimizers.SGD(0.05), LOSS)
    x, y = classification_data(n=32)
    callback = make()
    with pytest.raises(NotImplementedError, match=rf"{type(callback).__name__} does not support "
                                                  r"tf.distribute strategies yet \(the model is "
                                                  r"under MirroredStrategy\)"):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[callback])
    assert "apply" not in vars(base_optimizer(model.optimizer))
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)  # and the model trains


def test_a_score_of_the_wrong_shape_is_refused_naming_the_criterion():
    keras_dst.register_criterion("test_one_score_per_layer", ordering="after_optimizer",
                                 needs_gradient=False, overwrite=True)(
        lambda inputs: tf.reduce_sum(tf.abs(inputs.weight)))
    try:
        _check_a_score_of_the_wrong_shape_is_refused()
    finally:
        criteria_lib._CRITERIA.unregister("test_one_score_per_layer")


def _check_a_score_of_the_wrong_shape_is_refused():
    model = keras_dst.prunable(mlp((20, 16, 3)), density=0.3)
    model.compile(keras.optimizers.SGD(0.05), LOSS, jit_compile=True)
    x, y = classification_data(n=32)
    masks = keras_dst.masks(model)
    with pytest.raises(ValueError, match=r"Criterion 'test_one_score_per_layer' returned scores "
                                         r"of shape \(\) for a weight of shape \(20, 16\)"):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0,
                  callbacks=[DST(prune="test_one_score_per_layer", update_every=1)])
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert all((masks[k] == v).all() for k, v in keras_dst.masks(model).items())


def test_an_optimizer_with_moving_averages_is_refused_before_any_change():
    model = keras_dst.prunable(mlp((20, 16, 3)), density=0.3)
    model.compile(keras.optimizers.Adam(0.01, use_ema=True, name="averaging"), LOSS,
                  jit_compile=True)
    x, y = classification_data(n=32)
    with pytest.raises(ValueError, match=r"DynamicSparseTraining: optimizer 'averaging' has "
                                         r"use_ema=True; its moving averages hold values at "
                                         r"masked entries"):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[DST(update_every=1)])
    assert not base_optimizer(model.optimizer).built


@pytest.mark.parametrize("dst", [dict(prune="magnitude", grow="random"),
                                 dict(prune="snip", grow="gradient", optimizer_state="reset"),
                                 dict(prune="magnitude", grow="momentum")], ids=str)
def test_a_layer_frozen_after_prunable_keeps_its_mask_and_values(dst):
    """Fine-tuning: a layer frozen after `prunable` is not the optimizer's, so an update
    must not touch it (it pruned trained values for good and regrew entries that no step
    could move; with optimizer state to read, it failed on a KeyError)."""
    model = keras_dst.prunable(mlp((20, 16, 16, 3)), density=0.3)
    frozen = model.layers[1]
    frozen.trainable = False
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9), LOSS, jit_compile=True)
    x, y = classification_data(n=64)
    path = frozen.layer.kernel.path  # (the wrapper's inner Dense)
    before = {t.weight.path: (t.mask.numpy().copy(), t.weight.numpy().copy())
              for t in keras_dst.sparse_targets(model)}
    model.fit(x, y, batch_size=16, epochs=2, verbose=0,
              callbacks=[DST(update_every=2, prune_rate=0.5, **dst)])
    after = {t.weight.path: (t.mask.numpy(), t.weight.numpy())
             for t in keras_dst.sparse_targets(model)}
    np.testing.assert_array_equal(after[path][0], before[path][0])
    np.testing.assert_array_equal(after[path][1], before[path][1])
    assert any((after[k][0] != before[k][0]).any() for k in before if k != path)
    assert_sparse_invariants(model)


def test_a_model_whose_sparse_layers_are_all_frozen_is_refused():
    model = keras_dst.prunable(mlp((20, 16, 3)), density=0.3)
    for layer in model.layers:
        layer.trainable = False
    model.compile(keras.optimizers.SGD(0.05), LOSS)
    x, y = classification_data(n=32)
    with pytest.raises(ValueError, match=r"DynamicSparseTraining: every sparse layer of model "
                                         r"'.*' is frozen \(trainable=False\)"):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[DST(update_every=1)])


def test_set_masks_adds_what_it_activates_to_the_ever_active_flags():
    """The ITOP rate counts every entry ever trained with: entries activated by
    `set_masks` and pruned at the next update were missing from it."""
    model = keras_dst.prunable(mlp((20, 16, 3)), density=0.3)
    model.compile(keras.optimizers.SGD(0.05), LOSS, jit_compile=True)
    rng = np.random.default_rng(0)
    masks = {k: rng.permutation(v.ravel()).reshape(v.shape)  # same counts, moved
             for k, v in keras_dst.masks(model).items()}
    before = {t.weight.path: t.ever_active.numpy() for t in keras_dst.sparse_targets(model)}
    keras_dst.set_masks(model, masks)
    assert_sparse_invariants(model, ever_active=True)
    for t in keras_dst.sparse_targets(model):
        np.testing.assert_array_equal(t.ever_active.numpy(),
                                      before[t.weight.path] | masks[t.weight.path])
    x, y = classification_data(n=64)
    logs = model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[
        DST(prune="magnitude", grow="random", update_every=2)]).history
    assert_sparse_invariants(model, ever_active=True)
    ever = sum(int(np.count_nonzero(t.ever_active.numpy()))
               for t in keras_dst.sparse_targets(model))
    trained = sum(int(np.count_nonzero(before[p] | masks[p])) for p in masks)
    assert ever >= trained
    total = sum(v.size for v in masks.values())
    assert logs["itop"][-1] == pytest.approx(ever / total)


@pytest.mark.parametrize("make", [
    lambda: DST(update_every=2),  # the cosine schedule needs the fit's steps
    lambda: DST(update_every=2, end_step=0.5, schedule="constant"),
    lambda: keras_dst.GradualPruning(0.5, update_every=2),
    lambda: keras_dst.CriteriaOverlap(["magnitude", "snip"], update_every=2),
], ids=["dst_cosine", "dst_fraction", "gradual", "overlap"])
def test_a_fit_of_no_epoch_changes_nothing_and_a_later_fit_trains(make):
    """``fit(epochs=0)`` (a loop whose epoch count comes out 0) trains no step; the
    callbacks whose schedules take the fit's steps said the steps per epoch were unknown."""
    callback = make()
    gradual = isinstance(callback, keras_dst.GradualPruning)  # (starts dense)
    model = keras_dst.prunable(mlp((20, 16, 3)), density=1.0 if gradual else 0.3)
    model.compile(keras.optimizers.SGD(0.05), LOSS, jit_compile=True)
    x, y = classification_data(n=64)
    masks = keras_dst.masks(model)
    history = model.fit(x, y, batch_size=16, epochs=0, verbose=0, callbacks=[callback])
    assert history.history == {} and int(model.optimizer.iterations.numpy()) == 0
    assert all((keras_dst.masks(model)[k] == v).all() for k, v in masks.items())
    assert not hooks_lib.installed(base_optimizer(model.optimizer))
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[callback])
    assert int(model.optimizer.iterations.numpy()) == 4
    if not isinstance(callback, keras_dst.CriteriaOverlap):
        assert any((keras_dst.masks(model)[k] != v).any() for k, v in masks.items())
    assert_sparse_invariants(model)


def test_a_callback_list_made_by_hand_says_what_it_lacks():
    """Keras's fit gives a user's `CallbackList` neither its model nor its parameters: the
    errors say so (not "compile the model" or "pass steps_per_epoch=", which do not help),
    and a list made with them trains."""
    model = keras_dst.prunable(mlp((20, 16, 3)), density=0.3)
    model.compile(keras.optimizers.SGD(0.05), LOSS, jit_compile=True)
    x, y = classification_data(n=64)
    masks = keras_dst.masks(model)

    def fit(callbacks):
        model.fit(x, y, batch_size=16, epochs=1, steps_per_epoch=4, verbose=0,
                  callbacks=callbacks)

    with pytest.raises(ValueError, match=r"DynamicSparseTraining has no model: a keras\."
                                         r"callbacks\.CallbackList made by hand .*model="):
        fit(keras.callbacks.CallbackList([keras_dst.DynamicSparseTraining(update_every=2)]))
    with pytest.raises(ValueError, match=r"schedule='cosine' needs the number of training "
                                         r"steps, but this callback was given no fit "
                                         r"parameters: .*epochs= and steps=.*total_steps="):
        fit(keras.callbacks.CallbackList([keras_dst.DynamicSparseTraining(update_every=2)],
                                         model=model))
    assert int(model.optimizer.iterations.numpy()) == 0
    assert all((keras_dst.masks(model)[k] == v).all() for k, v in masks.items())
    fit(keras.callbacks.CallbackList([keras_dst.DynamicSparseTraining(update_every=2)],
                                     add_history=True, model=model, epochs=1, steps=4))
    assert any((keras_dst.masks(model)[k] != v).any() for k, v in masks.items())
    assert_sparse_invariants(model)


def test_a_new_optimizer_restarts_the_steps_but_does_not_replay_the_draws():
    """``compile`` with a new optimizer starts its step count at 1 again (the schedule
    restarts, as Keras's learning-rate schedules do); the random draws, keyed by step,
    used to repeat the first run's, so a second run with random growth largely undid
    its own exploration (16 entries changed where another seed changed 204)."""
    x, y = classification_data(n=320)

    def changed_in_second_run(second_seed):
        model = keras_dst.prunable(mlp((20, 32, 32, 3)), density=0.3)
        rates = []
        for seed in (0, second_seed):
            model.compile(keras.optimizers.Adam(1e-3), LOSS, jit_compile=True)  # new optimizer
            before = keras_dst.masks(model)
            history = model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[
                keras_dst.DynamicSparseTraining(prune="magnitude", grow="random", update_every=5,
                                                prune_rate=0.3, total_steps=40, seed=seed)])
            rates.append(history.history["prune_rate"])
            assert_sparse_invariants(model)
        assert rates[0] == rates[1]  # the step count (and so the schedule) restarted
        after = keras_dst.masks(model)
        return sum(int((after[k] != before[k]).sum()) for k in after)

    same_seed, other_seed = changed_in_second_run(0), changed_in_second_run(1)
    assert other_seed > 100
    assert same_seed > other_seed / 2, (same_seed, other_seed)


def test_prune_only_dst_leaves_the_layers_kept_dense_dense():
    # (grow=None pruned a keep_dense layer for good, as any other)
    model = keras_dst.prunable(mlp(), density=0.5, keep_dense=["fc3"])
    model.compile(keras.optimizers.SGD(0.05), LOSS)
    x, y = classification_data(n=64)
    before = active_counts(model)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[
        DST(grow=None, update_every=2, prune_rate=0.3, schedule="constant")])
    after = active_counts(model)
    kept = [t.key for t in keras_dst.sparse_targets(model) if t.state.keep_dense]
    assert kept == ["fc3/kernel"] and after["fc3/kernel"] == before["fc3/kernel"] == 16 * 3
    assert all(after[k] < before[k] for k in ("fc1/kernel", "fc2/kernel"))
    assert_sparse_invariants(model)
    only_dense = keras_dst.prunable(mlp(), density=1.0, keep_dense=["fc1", "fc2", "fc3"])
    only_dense.compile("sgd", LOSS)
    with pytest.raises(ValueError, match=r"grow=None\): every sparsified layer .* kept dense"):
        only_dense.fit(x, y, verbose=0, callbacks=[DST(grow=None)])


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_prune_only_dst_warns_once_where_it_empties_a_layer(scope):
    """Pruning without regrowth can prune a layer's last entries, which leaves a layer that
    passes nothing on: the update that does it says so, naming the weights; a layer emptied
    by the user (set_masks) is not blamed on the update."""
    model = keras_dst.prunable(mlp(), density=0.2, seed=0)
    masks = keras_dst.masks(model)
    with pytest.warns(UserWarning, match="'fc1/kernel' have no active entry"):
        keras_dst.set_masks(model, {"fc1/kernel": np.zeros_like(masks["fc1/kernel"])})
    model.compile(keras.optimizers.SGD(0.05), LOSS)
    x, y = classification_data(n=64)
    dst = DST(grow=None, update_every=1, prune_rate=0.9, schedule="constant", scope=scope)
    with pytest.warns(UserWarning, match=r"grow=None\): the update at step \d+ pruned the last "
                                         r"active entries of \[.*'fc3/kernel'.*\]") as seen:
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[dst])
    emptied = [str(w.message) for w in seen if "pruned the last active entries" in str(w.message)]
    named = sorted(k for k in masks if any(f"'{k}'" in m for m in emptied))
    assert named == ["fc2/kernel", "fc3/kernel"]  # (fc1: emptied by the user)
    assert all(n == 0 for n in active_counts(model).values())
    assert len(emptied) <= 2 and sum(m.count("'fc3/kernel'") for m in emptied) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nothing left to empty: no warning
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[dst])


def test_dst_of_a_model_whose_every_trained_weight_is_dense_says_nothing_would_change():
    """With every entry active, an update regrows exactly what it pruned: the warning names
    the model once per configuration; one sparse layer beside dense ones is a DST run, and
    a frozen sparse layer does not count (the update leaves it alone)."""
    x, y = classification_data(n=64)
    dense = keras_dst.prunable(mlp(), density=1.0, distribution="uniform")
    dense.compile(keras.optimizers.SGD(0.05), LOSS)
    masks = keras_dst.masks(dense)
    dst = DST(update_every=2, schedule="constant")
    with pytest.warns(UserWarning, match=rf"model '{dense.name}' that trains is dense "
                                         r"\(density 1.0\).*topology never changes") as seen:
        dense.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[dst])
    assert sum("topology never changes" in str(w.message) for w in seen) == 1
    assert all((keras_dst.masks(dense)[k] == v).all() for k, v in masks.items())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # (the same configuration: said once)
        dense.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[dst])

    mixed = keras_dst.prunable(mlp(), density=1.0, distribution="uniform")
    half = np.ones_like(masks["fc2/kernel"])
    half[::2] = 0
    keras_dst.set_masks(mixed, {"fc2/kernel": half})
    mixed.compile(keras.optimizers.SGD(0.05), LOSS)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        mixed.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[DST(update_every=2, schedule="constant")])
    mixed.get_layer("fc2").trainable = False
    mixed.compile(keras.optimizers.SGD(0.05), LOSS)
    with pytest.warns(UserWarning, match="topology never changes"):
        mixed.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[DST(update_every=2, schedule="constant")])


def test_update_steps_of_a_run_resolve_a_fractional_end_step_as_fit_does():
    """`update_steps(total_steps)` is the rule fit uses (examples check runs with it)."""
    x, y = classification_data(n=160)  # 10 steps an epoch
    dst = DST(update_every=4, end_step=0.75, schedule="constant")
    assert dst.update_steps(total_steps=30) == schedules.UpdateSteps(4, 0, 22)
    assert not DST(update_every=4, end_step=0.1).update_steps(total_steps=30).any_between(1, 30)
    with pytest.raises(ValueError, match="end_step"):  # (the fraction rounds to step 0)
        DST(update_every=4, end_step=0.01).update_steps(total_steps=30)
    for bad_total in (dst, DST(update_every=4, end_step=9)):
        with pytest.raises(ValueError, match="total_steps"):
            bad_total.update_steps(total_steps=0)
    with pytest.raises(ValueError, match="end_step=0.75"):  # (no fit: the run's length is unknown)
        dst.update_steps()
    assert DST(update_every=4, end_step=9).update_steps() == schedules.UpdateSteps(4, 0, 9)
    model = keras_dst.prunable(mlp(), density=0.3)
    model.compile(keras.optimizers.SGD(0.05), LOSS)
    model.fit(x, y, batch_size=16, epochs=3, verbose=0, callbacks=[dst])
    assert dst.engine.update_steps == dst.update_steps(total_steps=30)


def test_a_callback_list_without_params_runs_a_used_callback_beside_a_fresh_one():
    # (a CallbackList made without epochs/steps gives its callbacks no params: the used
    # one kept its earlier fit's, the fresh one had None, and the second on_train_begin
    # took the first's hook for an abandoned fit's: the first step was refused as
    # one "that ran before this callback prepared it")
    x, y = classification_data(n=64)
    model = keras_dst.prunable(mlp((20, 16, 3)), density=0.3)
    model.compile(keras.optimizers.SGD(0.05), LOSS, jit_compile=True)
    used = DST(update_every=2, schedule="constant")
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[used])
    fresh = keras_dst.CriteriaOverlap(["magnitude", "random"], update_every=2)
    callbacks = keras.callbacks.CallbackList([used, fresh], model=model)
    _drive(callbacks, model, x, y)
    assert int(used.engine.last_update_step.numpy()) == 8
    assert int(fresh.engine.last_update_step.numpy()) == 8


def test_a_gradient_tape_step_at_a_later_batch_of_a_loop_of_ones_own_is_refused():
    # (the first batch's check passed, and the tape step of batch 2 ran with no update,
    # without a word)
    x, y = classification_data(n=64)
    model = keras_dst.prunable(mlp((20, 16, 3)), density=0.3)
    model.compile(keras.optimizers.SGD(0.05), LOSS, jit_compile=True)
    loss = keras.losses.get(LOSS)

    @tf.function(jit_compile=True)
    def tape_step(xb, yb):
        with tf.GradientTape() as tape:
            value = loss(yb, model(xb, training=True))
        grads = tape.gradient(value, model.trainable_variables)
        model.optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return {"loss": value}

    callbacks = keras.callbacks.CallbackList([DST(update_every=2)], model=model, epochs=1,
                                             steps=4)
    callbacks.on_train_begin()
    callbacks.on_epoch_begin(0)
    with pytest.raises(ValueError, match=r"DynamicSparseTraining: this step did not run the "
                                         r"model's training function"):
        for i in range(4):
            xb, yb = x[16 * i:16 * (i + 1)], y[16 * i:16 * (i + 1)]
            callbacks.on_train_batch_begin(i)
            logs = (tape_step(xb, yb) if i == 2 else
                    model.train_on_batch(xb, yb, return_dict=True))
            callbacks.on_train_batch_end(i, logs)
    assert int(model.optimizer.iterations.numpy()) == 3


def test_a_restore_by_a_later_callback_of_a_loop_without_on_epoch_begin_warns_nothing(
        tmp_path):
    # (the host count was read at this callback's on_train_begin, before the later
    # callback moved the optimizer forward: the first batch saw more optimizer steps than
    # it counted, and warned of a train_step applying the optimizer twice)
    x, y = classification_data(n=64)
    model = keras_dst.prunable(mlp((20, 16, 3)), density=0.3)
    model.compile(keras.optimizers.SGD(0.05), LOSS, jit_compile=True)
    model.fit(x, y, batch_size=16, epochs=2, verbose=0)  # (8 steps)
    checkpoint = tf.train.Checkpoint(optimizer=model.optimizer)
    path = checkpoint.write(str(tmp_path / "ckpt"))
    model.optimizer.iterations.assign(0)
    restore = keras.callbacks.LambdaCallback(on_train_begin=lambda logs: checkpoint.read(path))
    callbacks = keras.callbacks.CallbackList(
        [DST(update_every=2, schedule="constant"), restore], model=model, epochs=1, steps=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _drive(callbacks, model, x, y)
    assert int(model.optimizer.iterations.numpy()) == 12


def _loop_begun(model, callbacks_list, **params):
    """A loop of one's own that stops (raises) after its callbacks' on_train_begin; its
    CallbackList."""
    callbacks = keras.callbacks.CallbackList(callbacks_list, model=model, **params)
    callbacks.on_train_begin()
    return callbacks


@pytest.mark.parametrize("second", ["same", "gradual"])
def test_a_loop_of_ones_own_after_one_that_stopped_before_its_first_step_trains(second):
    # (its hooks stayed installed: the same callback again was refused as "already in
    # this fit", a GradualPruning as a second mask writer)
    x, y = classification_data(n=64)
    model = keras_dst.prunable(mlp((20, 16, 3)), density=0.3)
    model.compile(keras.optimizers.SGD(0.05), LOSS, jit_compile=True)
    dst = DST(update_every=2, schedule="constant")
    _loop_begun(model, [dst], epochs=1, steps=4)
    callback = (dst if second == "same" else
                keras_dst.GradualPruning(0.1, update_every=2, initial_density=0.3))
    _callback_loop(model, callback, x, y)
    assert int(callback.engine.last_update_step.numpy()) >= 2  # it updated
    assert "apply" not in vars(model.optimizer)


def test_a_second_loop_of_equal_callbacks_without_params_says_how_to_end_the_first():
    x, y = classification_data(n=64)
    model = keras_dst.prunable(mlp((20, 16, 3)), density=0.3)
    model.compile(keras.optimizers.SGD(0.05), LOSS, jit_compile=True)
    first = _loop_begun(model, [DST(update_every=2, schedule="constant")])
    with pytest.raises(ValueError, match=r"pass it once. \(A loop of your own that stopped "
                                         r"before its first step: call its callbacks' "
                                         r"on_train_end\(\) before the next one.\)"):
        _loop_begun(model, [DST(update_every=2, schedule="constant")])
    first.on_train_end()  # as it says
    second = DST(update_every=2, schedule="constant")
    _callback_loop(model, second, x, y)
    assert int(second.engine.last_update_step.numpy()) == 4


def _used_and_fresh(model, x, y, compile_between):
    """A DST callback used in a fit (and the model compiled again after it, or not), and a
    fresh CriteriaOverlap: [fresh, used]."""
    used = DST(update_every=2, schedule="constant")
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[used])
    if compile_between:  # (a new learning rate)
        model.compile(keras.optimizers.SGD(0.01), LOSS, jit_compile=True)
    return [keras_dst.CriteriaOverlap(["magnitude", "random"], update_every=2), used]


@pytest.mark.parametrize("driver", ["loop", "fit"])
@pytest.mark.parametrize("compile_between", [False, True])
def test_a_callback_list_without_params_after_a_fit_and_a_compile_trains(
        driver, compile_between):
    # (the used callback's params, left over from a fit the switch no longer knew (a
    # compile made a new one), read as a new run's: the fresh callback's hook was
    # ended, and the first step refused as one "that ran before this callback prepared
    # it"; a CallbackList without params passed to fit, likewise)
    x, y = classification_data(n=64)
    model = keras_dst.prunable(mlp((20, 16, 3)), density=0.3)
    model.compile(keras.optimizers.SGD(0.05), LOSS, jit_compile=True)
    fresh, used = _used_and_fresh(model, x, y, compile_between)
    callbacks = keras.callbacks.CallbackList([fresh, used], model=model)
    if driver == "fit":
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False, callbacks=callbacks)
    else:
        _drive(callbacks, model, x, y)
    last = 4 if compile_between else 8  # (a new optimizer counts from 0)
    assert int(used.engine.last_update_step.numpy()) == last
    assert int(fresh.engine.last_update_step.numpy()) == last


@pytest.mark.parametrize("make", [
    lambda: keras_dst.CriteriaOverlap(["magnitude", "random"], update_every=3),
    lambda: keras_dst.GradualPruning(0.1, update_every=3, initial_density=0.3, end_step=9)],
    ids=["overlap", "gradual"])
def test_a_callback_listed_twice_in_a_loop_of_ones_own_is_refused(make):
    # (its second on_train_begin read as a retry of a loop that stopped before its first
    # step: a CriteriaOverlap listed twice then recorded nothing, without a word)
    x, y = classification_data(n=64)
    model = keras_dst.prunable(mlp((20, 16, 3)), density=0.3)
    model.compile(keras.optimizers.SGD(0.05), LOSS, jit_compile=True)
    callback = make()
    callbacks = keras.callbacks.CallbackList([callback, callback], model=model)
    callbacks.on_train_begin()
    with pytest.raises(ValueError, match=rf"{type(callback).__name__}: on_train_batch_begin "
                                         r"ran twice with no step between: this callback is "
                                         r"listed twice \(pass it once\)"):
        callbacks.on_train_batch_begin(0)


@pytest.mark.parametrize("stopped", ["after_train_begin", "after_batch_begin"])
def test_an_observer_loop_after_a_dst_loop_that_stopped_before_its_first_step_changes_no_mask(
        stopped):
    # (the stopped loop's DST hook stayed in the run the CriteriaOverlap's loop joined, and
    # pruned and regrew in its steps; stopped after its first on_train_batch_begin, its
    # preparation outlived it too)
    x, y = classification_data(n=64)
    model = keras_dst.prunable(mlp((20, 16, 3)), density=0.3)
    model.compile(keras.optimizers.SGD(0.05), LOSS, jit_compile=True)
    dst = DST(update_every=2, schedule="constant")
    begun = _loop_begun(model, [dst])
    if stopped == "after_batch_begin":
        begun.on_train_batch_begin(0)
    before = keras_dst.masks(model)
    observer = keras_dst.CriteriaOverlap(["magnitude", "random"], update_every=2,
                                         total_steps=8)
    callbacks = keras.callbacks.CallbackList([observer], model=model)
    _drive(callbacks, model, x, y)
    assert int(observer.engine.last_update_step.numpy()) == 4
    assert int(dst.engine.last_update_step.numpy()) < 0  # (never updated)
    after = keras_dst.masks(model)
    assert all((before[k] == after[k]).all() for k in before)
    assert "apply" not in vars(model.optimizer)


def test_a_compile_after_the_last_batch_of_a_hooked_fit_is_the_one_the_next_fit_runs():
    # (a layer unfrozen and the model compiled again with a new optimizer at the last
    # epoch's end: the hooked callback's on_train_end put back the training function of
    # the old compile, so the next fit trained with the old optimizer and the layer frozen)
    x, y = classification_data(n=64)
    model = keras_dst.prunable(mlp((20, 16, 3)), density=0.3)
    model.get_layer(index=1).trainable = False
    model.compile(keras.optimizers.SGD(0.05), LOSS, jit_compile=True)
    old = model.optimizer

    def unfreeze(epoch, logs):
        if epoch == 1:
            model.get_layer(index=1).trainable = True
            model.compile(keras.optimizers.SGD(0.05), LOSS, jit_compile=True)

    model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[
        keras.callbacks.LambdaCallback(on_epoch_end=unfreeze),
        keras_dst.CriteriaOverlap(["magnitude", "random"], update_every=3, total_steps=40)])
    kernel = model.get_layer(index=1).trainable_weights[0]
    before = kernel.numpy()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert int(old.iterations.numpy()) == 8 and int(model.optimizer.iterations.numpy()) == 4
    assert (kernel.numpy() != before).any()


def test_a_loop_of_ones_own_whose_data_ends_after_a_batch_begin_goes_on_to_its_next_epoch():
    # (the batch begun when the data ran out ran no step: the next epoch's first begin was
    # refused as a callback listed twice)
    x, y = classification_data(n=64)
    model = keras_dst.prunable(mlp((20, 16, 3)), density=0.3)
    model.compile(keras.optimizers.SGD(0.05), LOSS, jit_compile=True)
    callback = DST(update_every=2, schedule="constant", total_steps=8)
    callbacks = keras.callbacks.CallbackList([callback], model=model)
    callbacks.on_train_begin()
    for epoch in range(2):
        callbacks.on_epoch_begin(epoch)
        batches = iter(tf.data.Dataset.from_tensor_slices((x, y)).batch(16))
        for i in range(10):
            callbacks.on_train_batch_begin(i)
            try:
                xb, yb = next(batches)
            except StopIteration:
                break
            callbacks.on_train_batch_end(i, model.train_on_batch(xb, yb, return_dict=True))
        callbacks.on_epoch_end(epoch)
    callbacks.on_train_end()
    assert int(callback.engine.last_update_step.numpy()) == 8
