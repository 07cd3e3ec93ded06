"""CriteriaOverlap: pairwise Jaccard of the sets that criteria would prune."""

import copy
import json
import math
import os
import tempfile

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_dst

from conftest import LOSS, classification_data, compile_and_fit, mlp, sparse_state


@keras_dst.register_criterion("square", ordering="after_optimizer", needs_gradient=False,
                              overwrite=True)
def square(inputs):
    """Same ranking as magnitude."""
    return inputs.weight ** 2


@keras_dst.register_criterion("largest", ordering="after_optimizer", needs_gradient=False,
                              overwrite=True)
def largest(inputs):
    """Prunes the largest magnitudes: the opposite of magnitude."""
    return -tf.abs(inputs.weight)


def test_jaccard_values_on_a_frozen_state_and_nothing_changes():
    model = keras_dst.prunable(mlp(), density=0.5, distribution="uniform")
    before = sparse_state(model)
    overlap = keras_dst.CriteriaOverlap(["magnitude", "square", "largest"], update_every=3,
                                        prune_rate=0.5)
    # lr 0: a frozen state
    logs = compile_and_fit(model, [overlap], keras.optimizers.SGD(0.0)).history
    after = sparse_state(model)
    for path, (mask, weight) in before.items():  # nothing changed
        np.testing.assert_array_equal(after[path][0], mask)
        np.testing.assert_array_equal(after[path][1], weight)
    # Expected sets, per layer r = ceil(a / 2) lowest / highest |w| among active.
    low, high = [], []
    for mask, weight in before.values():
        magnitude = np.abs(weight[mask])
        r = math.ceil(0.5 * mask.sum())
        order = np.argsort(magnitude, kind="stable")
        low.append(np.isin(np.arange(mask.sum()), order[:r]))
        high.append(np.isin(np.arange(mask.sum()), order[-r:]))
    low, high = np.concatenate(low), np.concatenate(high)
    expected = (low & high).sum() / (low | high).sum()
    assert [step for step, _, _ in overlap.history] == [3, 6]
    for _step, names, matrix in overlap.history:
        assert names == ["magnitude", "square", "largest"]
        np.testing.assert_allclose(np.diag(matrix), 1.0)
        assert matrix[0, 1] == 1.0  # identical criteria
        np.testing.assert_allclose(matrix[0, 2], expected, rtol=1e-6)
        np.testing.assert_array_equal(matrix, matrix.T)
    assert logs["jaccard/magnitude/square"][-1] == 1.0
    assert logs["jaccard/magnitude/largest"][-1] == pytest.approx(expected, rel=1e-6)
    assert "jaccard/square/magnitude" not in logs


def test_training_is_identical_with_and_without_overlap(tmp_path):
    runs = []
    for callbacks in ([], [keras_dst.CriteriaOverlap(["magnitude", "random", "snip"],
                                                     update_every=2, schedule="cosine")]):
        model = keras_dst.prunable(mlp(), density=0.3)
        compile_and_fit(model, callbacks, keras.optimizers.Adam(0.01))
        runs.append((sparse_state(model), [v.numpy() for v in model.optimizer.variables]))
    (state, slots), (state_overlap, slots_overlap) = runs
    for path, (mask, weight) in state.items():
        np.testing.assert_array_equal(state_overlap[path][0], mask)
        np.testing.assert_allclose(state_overlap[path][1], weight, rtol=1e-6, atol=1e-7)
    for a, b in zip(slots, slots_overlap):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)

    overlap = callbacks[0]
    assert [s for s, _, _ in overlap.history] == [2, 4, 6, 8]
    for _, _, matrix in overlap.history:
        off_diagonal = matrix[~np.eye(3, dtype=bool)]
        assert np.all(off_diagonal < 1.0) and np.all(off_diagonal >= 0.0)
        assert matrix[0, 1] < 0.6  # magnitude vs random: about chance level

    path = tmp_path / "overlap.json"
    overlap.save_json(path)
    saved = json.loads(path.read_text())
    assert saved["names"] == ["magnitude", "random", "snip"]
    assert [h["step"] for h in saved["history"]] == [2, 4, 6, 8]
    mean = np.mean([m for _, _, m in overlap.history], axis=0)
    np.testing.assert_allclose(saved["matrix"], mean, rtol=1e-6)
    overlap.save_json(path, matrix="last")
    np.testing.assert_allclose(json.loads(path.read_text())["matrix"], overlap.history[-1][2])


def test_with_dst_overlap_sees_the_state_before_the_dst_update():
    """DST listed first, prune only: the overlap must still see the pre-update masks."""
    seen = tf.Variable(0, dtype=tf.int64)

    @keras_dst.register_criterion("test_overlap_probe", ordering="after_optimizer",
                                  needs_gradient=False, overwrite=True)
    def probe(inputs):  # magnitude, and counts the active entries it is shown
        seen.assign_add(tf.reduce_sum(tf.cast(inputs.mask, tf.int64)))
        return tf.abs(inputs.weight)

    model = keras_dst.prunable(mlp(), density=0.5, distribution="uniform")
    counts = []

    class Counter(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            counts.append(sum(int(m.sum()) for m in keras_dst.masks(model).values()))

    start = sum(int(m.sum()) for m in keras_dst.masks(model).values())
    dst = keras_dst.DynamicSparseTraining(prune="magnitude", grow=None, update_every=4,
                                          prune_rate=0.5, schedule="constant", ordering="after")
    overlap = keras_dst.CriteriaOverlap(["magnitude", "test_overlap_probe"], update_every=4)
    logs = compile_and_fit(model, [dst, overlap, Counter()], keras.optimizers.SGD(0.05)).history
    active_before = [start] + counts  # active_before[t - 1]: masks in effect at step t
    assert active_before[4] < active_before[3]  # the DST pruned at step 4
    assert int(seen.numpy()) == active_before[3] + active_before[7]  # steps 4 and 8
    assert [s for s, _, _ in overlap.history] == [4, 8]
    assert all(m[0, 1] == 1.0 for _, _, m in overlap.history)
    assert "pruned" in logs and "jaccard/magnitude/test_overlap_probe" in logs


def test_a_csv_log_has_the_jaccard_columns_when_the_first_update_comes_after_epoch_one(
        tmp_path):
    # CSVLogger fixes its columns at the end of the first epoch: the keys are there
    # from the first batch (NaN before the first update), one History entry per epoch.
    model = keras_dst.prunable(mlp(), density=0.5)
    overlap = keras_dst.CriteriaOverlap(["magnitude", "snip"], update_every=12)
    path = tmp_path / "history.csv"
    history = compile_and_fit(model, [overlap, keras.callbacks.CSVLogger(str(path))],
                              epochs=3).history  # 8 steps per epoch: updates at 12, 24
    values = history["jaccard/magnitude/snip"]
    assert len(values) == 3 and math.isnan(values[0])
    assert 0.0 <= values[1] <= 1.0 and 0.0 <= values[2] <= 1.0
    with open(path) as f:
        header, *rows = [line.strip().split(",") for line in f]
    column = header.index("jaccard/magnitude/snip")
    assert [float(r[column]) for r in rows[1:]] == pytest.approx(values[1:])


def test_an_embedding_is_scored_with_its_dense_gradient():
    """An Embedding's gradient is a `tf.IndexedSlices` of the looked-up rows (a token seen
    twice, twice): the scores use it summed into the table's shape, as DST does."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 6, (16, 4))  # 6 tokens: many repeated rows
    y = rng.integers(0, 3, 16)
    dense = keras.Sequential([keras.Input((4,), dtype="int32"), keras.layers.Embedding(6, 8),
                              keras.layers.Flatten(), keras.layers.Dense(3)])
    model = keras_dst.prunable(dense, density=0.5, distribution="uniform")
    targets = keras_dst.sparse_targets(model)
    with tf.GradientTape() as tape:
        loss = LOSS(y, model(x))
    gradients = tape.gradient(loss, [t.weight for t in targets])
    assert isinstance(gradients[0], tf.IndexedSlices)
    magnitude, snip = [], []  # per layer r = ceil(a / 2) lowest scores among active
    for t, gradient in zip(targets, gradients):
        weight, mask = t.weight.numpy(), t.mask.numpy()
        r = math.ceil(0.5 * mask.sum())
        for chosen, score in ((magnitude, weight), (snip, weight * tf.convert_to_tensor(gradient))):
            order = np.argsort(np.abs(np.asarray(score)[mask]), kind="stable")
            chosen.append(np.isin(np.arange(mask.sum()), order[:r]))
    overlap = keras_dst.CriteriaOverlap(["magnitude", "snip"], update_every=1, prune_rate=0.5,
                                        schedule="constant")
    compile_and_fit(model, [overlap], keras.optimizers.SGD(0.0), batch_size=16, data=(x, y))
    magnitude, snip = np.concatenate(magnitude), np.concatenate(snip)
    expected = (magnitude & snip).sum() / (magnitude | snip).sum()
    assert 0.0 < expected < 1.0
    np.testing.assert_allclose(overlap.history[0][2][0, 1], expected, rtol=1e-6)


def test_on_blocks_each_criterion_prunes_whole_blocks_as_dst_would():
    """With 1xB blocks a DST update prunes ``ceil(p * blocks)`` whole blocks; the overlap
    compared entry sets that no update could prune. The SET rules, which DST refuses on
    blocks, are refused here too."""
    model = keras_dst.prunable(mlp((32, 16, 8)), density=0.5, pattern="1x4",
                               distribution="uniform")
    targets = keras_dst.sparse_targets(model)
    with pytest.raises(ValueError, match=r"CriteriaOverlap\('set'\): weight '.*' has 1xB "
                                         r"blocks.*Use a score criterion"):
        compile_and_fit(model, [keras_dst.CriteriaOverlap(["magnitude", "set"])])
    overlap = keras_dst.CriteriaOverlap(["magnitude", "snip", "random"], update_every=1)
    compile_and_fit(model, [overlap], keras.optimizers.SGD(0.0),
                    data=classification_data(n=32, d=32))
    rng = np.random.default_rng(0)
    grads = [tf.constant(rng.normal(size=t.weight.shape), tf.float32) for t in targets]
    sets = overlap.engine.pruned_sets(tf.constant(1, tf.int64), grads, tf.constant(0.5))
    for criterion, flat in zip(overlap.names, sets):
        offset = 0
        for t in targets:
            (rows, cols), mask = t.weight.shape, t.mask.numpy()
            pruned = flat.numpy()[offset:offset + rows * cols].reshape(rows // 4, 4, cols)
            offset += rows * cols
            assert (pruned.all(axis=1) == pruned.any(axis=1)).all(), (criterion, t.weight.path)
            blocks = mask.reshape(rows // 4, 4, cols).any(axis=1).sum()
            assert pruned.any(axis=1).sum() == math.ceil(0.5 * blocks), criterion


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(criteria="magnitude"), TypeError, "criteria"),
    # (a set's order, which names the matrix's rows and the logs, changes across processes)
    (dict(criteria={"magnitude", "snip"}), TypeError, "criteria must be a list .* got the set"),
    (dict(criteria=["magnitude", None]), TypeError, r"criteria\[1\]=None\): a criterion here is"),
    (dict(criteria=["magnitude"]), ValueError, "at least two"),
    (dict(criteria=["magnitude", "Magnitude"]), ValueError, "distinct"),
    (dict(criteria=["magnitude", "nope"]), ValueError, "nope"),
    (dict(criteria=["magnitude", "running_magnitude"]), ValueError, "running"),
    (dict(criteria=["magnitude", "snip"], update_every=0), ValueError, "update_every"),
    (dict(criteria=["magnitude", "snip"], prune_rate=0.0), ValueError, "prune_rate"),
    (dict(criteria=["magnitude", "snip"], prune_rate=True), TypeError, "prune_rate"),
    (dict(criteria=["magnitude", "snip"], schedule="bogus"), ValueError, "schedule"),
    (dict(criteria=["magnitude", "snip"], seed="0"), TypeError, "seed"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        keras_dst.CriteriaOverlap(**kwargs)


def test_errors_at_fit_and_before_any_update(tmp_path):
    overlap = keras_dst.CriteriaOverlap(["magnitude", "snip"])
    with pytest.raises(ValueError, match="no update recorded"):
        overlap.save_json(tmp_path / "x.json")
    with pytest.raises(ValueError, match="matrix"):
        overlap.save_json(tmp_path / "x.json", matrix="median")
    dense = mlp()
    dense.compile("sgd", "mse")
    x, y = classification_data()
    with pytest.raises(ValueError, match="CriteriaOverlap.*no sparse layers"):
        dense.fit(x, y, verbose=0, callbacks=[overlap])


def test_config_round_trip():
    overlap = keras_dst.CriteriaOverlap(["magnitude", "mest", "set"], update_every=50,
                                        prune_rate=0.25, schedule="cosine", total_steps=1000,
                                        seed=3)
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(overlap))
    assert isinstance(clone, keras_dst.CriteriaOverlap)
    assert clone.get_config() == overlap.get_config()


def test_history_records_each_update_once_across_fits_and_models():
    # every fit re-reads the last update at its start: it was appended again, and
    # save_json's mean weighed it twice
    overlap = keras_dst.CriteriaOverlap(["magnitude", "snip"], update_every=4,
                                        schedule="constant")
    x, y = classification_data(n=64)
    model = keras_dst.prunable(mlp(), density=0.5)
    model.compile(keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(
        from_logits=True))
    for _ in range(2):  # 8 steps per fit
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[overlap])
    assert [step for step, _, _ in overlap.history] == [4, 8, 12, 16]
    other = keras_dst.prunable(mlp(seed=1), density=0.5)  # reused on another model
    other.compile(keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(
        from_logits=True))
    other.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[overlap])
    assert [step for step, _, _ in overlap.history] == [4, 8, 12, 16, 4, 8]


def build():
    """The resume tests' model: sparse MLP, seeded masks, SGD."""
    model = keras_dst.prunable(mlp(), density=0.5, seed=0)
    model.compile(keras.optimizers.SGD(0.1), LOSS)
    return model


class StopAt14(keras.callbacks.Callback):
    """Raises KeyboardInterrupt after optimizer step 14 (a crash mid-training)."""

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations) == 14:
            raise KeyboardInterrupt


class Refuse(keras.callbacks.Callback):
    """Refuses the fit at its start (as a misconfigured callback would)."""

    def on_train_begin(self, logs=None):
        raise ValueError("refused")


def test_a_fit_resumed_from_a_backup_does_not_record_the_replayed_updates_again(tmp_path):
    """A fit stopped at step 14 (backup at step 8) and resumed on a model built again
    (another engine) replays the update of step 12: it was recorded twice, and
    save_json's mean weighed it twice."""
    x, y = classification_data(n=64)

    def fit(model, overlap, *extra):
        model.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0,
                  callbacks=[overlap, keras_dst.BackupAndRestore(str(tmp_path / "backup")), *extra])

    whole = keras_dst.CriteriaOverlap(["magnitude", "snip"], update_every=4)
    build().fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0, callbacks=[whole])
    resumed = keras_dst.CriteriaOverlap(["magnitude", "snip"], update_every=4)
    with pytest.raises(KeyboardInterrupt):
        fit(build(), resumed, StopAt14())
    assert [step for step, _, _ in resumed.history] == [4, 8, 12]
    fit(build(), resumed)
    assert [step for step, _, _ in resumed.history] == [4, 8, 12, 16, 20, 24]
    for (_, _, got), (_, _, want) in zip(resumed.history, whole.history):
        np.testing.assert_allclose(got, want)


def test_a_fit_on_another_model_past_step_0_records_its_updates():
    """(An update was taken for a replay where another model's matched a recorded one: two
    criteria that always agree give the same matrix at every update.)"""
    x, y = classification_data(n=64)
    overlap = keras_dst.CriteriaOverlap(["snip", "taylor_fo"], update_every=4)  # (always agree)
    first = keras_dst.prunable(mlp(), density=0.5, seed=0)
    first.compile(keras.optimizers.SGD(0.1), LOSS)
    first.fit(x, y, batch_size=8, epochs=3, verbose=0, callbacks=[overlap])
    other = keras_dst.prunable(mlp(seed=1), density=0.5, seed=1)
    other.compile(keras.optimizers.SGD(0.1), LOSS)
    other.fit(x, y, batch_size=8, epochs=1, verbose=0)  # (warmed up without the callback)
    other.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[overlap])
    assert [step for step, _, _ in overlap.history] == [4, 8, 12, 16, 20, 24, 12, 16, 20, 24]


def test_a_fit_continued_after_a_stop_or_a_refusal_records_each_update_once():
    """A fit stopped by an exception (no backup) and fit again, or a fit refused at its
    start by another callback and run again, recorded the last update a second time."""
    x, y = classification_data(n=64)  # 8 steps an epoch

    for stop, expected in ((StopAt14(), [4, 8, 12, 16, 20]), (Refuse(), [4, 8, 12, 16])):
        overlap = keras_dst.CriteriaOverlap(["magnitude", "snip"], update_every=4)
        model = build()
        if isinstance(stop, Refuse):
            model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[overlap])
        with pytest.raises((KeyboardInterrupt, ValueError)):
            model.fit(x, y, batch_size=8, epochs=3, verbose=0, callbacks=[overlap, stop])
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[overlap])
        assert [step for step, _, _ in overlap.history] == expected


@pytest.mark.parametrize("between", ["refused", "no_epoch"])
def test_a_fit_that_records_nothing_between_a_stop_and_its_resume_keeps_the_resume(
        tmp_path, between):
    """A fit refused at its start, or of no epoch, between a stop and the resume from the
    backup took the mark of the stopped fit with it: the replayed update was recorded twice."""
    x, y = classification_data(n=64)  # 8 steps an epoch

    overlap = keras_dst.CriteriaOverlap(["magnitude", "snip"], update_every=4)
    backup = str(tmp_path / "backup")
    with pytest.raises(KeyboardInterrupt):
        build().fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0,
                    callbacks=[overlap, keras_dst.BackupAndRestore(backup), StopAt14()])
    if between == "refused":
        with pytest.raises(ValueError, match="refused"):
            build().fit(x, y, batch_size=8, epochs=3, verbose=0, callbacks=[overlap, Refuse()])
    else:
        build().fit(x, y, batch_size=8, epochs=0, verbose=0, callbacks=[overlap])
    build().fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0,
                callbacks=[overlap, keras_dst.BackupAndRestore(backup)])
    assert [step for step, _, _ in overlap.history] == [4, 8, 12, 16, 20, 24]


def test_a_restore_after_a_finished_fit_and_a_copy_of_the_callback_record_what_runs():
    """A checkpoint read back to step 22 after a finished fit to 24: the update of step 24
    that the next fit runs again was not recorded (the last recorded step); a deep copy of
    the callback made after a fit recorded that fit's last update again."""
    x, y = classification_data(n=64)  # 8 steps an epoch
    model = keras_dst.prunable(mlp(), density=0.5, seed=0)
    model.compile(keras.optimizers.SGD(0.1), LOSS)
    overlap = keras_dst.CriteriaOverlap(["magnitude", "snip"], update_every=4)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[overlap])
    copied = copy.deepcopy(overlap)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[copied])
    assert [step for step, _, _ in copied.history] == [4, 8, 12, 16]
    model.fit(x[:48], y[:48], batch_size=8, epochs=1, verbose=0, callbacks=[copied])  # to 22
    checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
    path = checkpoint.write(os.path.join(tempfile.mkdtemp(), "ckpt"))
    model.fit(x[:16], y[:16], batch_size=8, epochs=1, verbose=0, callbacks=[copied])  # 24
    checkpoint.read(path).assert_consumed()
    model.fit(x[:16], y[:16], batch_size=8, epochs=1, verbose=0, callbacks=[copied])  # 24 again
    assert [step for step, _, _ in copied.history] == [4, 8, 12, 16, 20, 24, 24]
