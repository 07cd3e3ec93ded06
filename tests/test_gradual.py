"""GradualPruning: Zhu & Gupta gradual magnitude pruning with TF-MOT semantics."""

import json
import os
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest

import keras_dst
from keras_dst import schedules
from keras_dst.gradual import GradualEngine

from conftest import LOSS, assert_sparse_invariants, classification_data, compile_and_fit, mlp, sparse_state

HERE = os.path.dirname(os.path.abspath(__file__))


class MaskRecorder(keras.callbacks.Callback):
    """states[i]: {path: (mask, kernel)} in effect for optimizer step i + 1.

    Index 0 is taken before the first batch (place this after GradualPruning, which
    prunes for the fit's first step then), index i after step i.
    """

    def __init__(self, check_zeros=False):
        super().__init__()
        self.states = []
        self.check_zeros = check_zeros

    def _record(self):
        if self.check_zeros:
            assert_sparse_invariants(self.model)
        self.states.append(sparse_state(self.model))

    def on_train_batch_begin(self, batch, logs=None):
        if not self.states:
            self._record()

    def on_train_batch_end(self, batch, logs=None):
        self._record()


def expected_keep(n, step, initial_density, final_density, begin, end, power):
    """Independent float64 Zhu & Gupta formula: entries kept at an update step."""
    progress = min(max((step - begin) / (end - begin), 0.0), 1.0)
    s_i, s_f = 1.0 - initial_density, 1.0 - final_density
    sparsity = s_f + (s_i - s_f) * (1.0 - progress) ** power
    return max(int(np.round(n * (1.0 - sparsity))), 1)


def _fit(callback, epochs=2, optimizer=None, recorder=None, model=None):
    model = model or keras_dst.prunable(mlp(), density=1.0, distribution="uniform")
    callbacks = [callback] + ([recorder] if recorder is not None else [])
    history = compile_and_fit(model, callbacks, optimizer, epochs)
    return model, history


SCHEDULE = dict(final_density=0.2, begin_step=1, end_step=13, update_every=3, power=3,
                initial_density=0.8)  # updates at steps 1, 4, 7, 10, 13 of 16


def test_curve_final_density_and_zeros():
    recorder = MaskRecorder(check_zeros=True)
    model, history = _fit(keras_dst.GradualPruning(**SCHEDULE), optimizer=keras.optimizers.Adam(0.01),
                          recorder=recorder)
    sizes = {t.weight.path: int(np.prod(t.weight.shape)) for t in keras_dst.sparse_targets(model)}
    args = (SCHEDULE["initial_density"], SCHEDULE["final_density"], SCHEDULE["begin_step"],
            SCHEDULE["end_step"], SCHEDULE["power"])
    assert len(recorder.states) == 17
    for step in range(1, 17):  # masks used by optimizer step `step`
        last_update = max(u for u in (1, 4, 7, 10, 13) if u <= step)
        for path, n in sizes.items():
            active = int(recorder.states[step - 1][path][0].sum())
            assert active == expected_keep(n, last_update, *args), (step, path)
    final = {path: int(round(n * 0.2)) for path, n in sizes.items()}
    assert_sparse_invariants(model, final)
    assert history.history["target_density"][-1] == pytest.approx(0.2)
    assert history.history["density"][-1] == pytest.approx(sum(final.values()) / sum(sizes.values()))


def test_masks_keep_the_largest_magnitudes():
    model = keras_dst.prunable(mlp(), density=1.0, distribution="uniform")
    initial = {t.weight.path: t.weight.numpy().copy() for t in keras_dst.sparse_targets(model)}
    recorder = MaskRecorder()
    _fit(keras_dst.GradualPruning(**SCHEDULE), optimizer=keras.optimizers.SGD(0.0),
         recorder=recorder, model=model)  # lr 0: the weights stay the initial ones
    for state in recorder.states:
        for path, (mask, kernel) in state.items():
            order = np.argsort(-np.abs(initial[path]).ravel(), kind="stable")
            expected = np.zeros(mask.size, bool)
            expected[order[:int(mask.sum())]] = True
            np.testing.assert_array_equal(mask.ravel(), expected, err_msg=path)
            np.testing.assert_array_equal(kernel, np.where(mask, initial[path], 0.0))


def test_end_step_none_is_75_percent_aligned_to_update_every():
    callback = keras_dst.GradualPruning(0.25, update_every=5)
    model, _ = _fit(callback)  # 2 epochs x 8 steps: 75% = 12, last update at 10
    assert callback.resolved_end_step() == 10
    assert_sparse_invariants(model, {t.weight.path: int(round(0.25 * np.prod(t.weight.shape)))
                                     for t in keras_dst.sparse_targets(model)})


def test_update_steps_of_a_run_of_given_length_need_no_fit():
    callback = keras_dst.GradualPruning(0.25, update_every=5, begin_step=2)
    steps = callback.update_steps(total_steps=16)  # 75% = 12: updates at 2, 7, 12
    assert [t for t in range(1, 17) if steps.any_between(t, t)] == [2, 7, 12]
    assert callback.resolved_end_step(total_steps=16) == 12
    with pytest.raises(ValueError, match=r"75% of the run's 8 steps leaves no update step after "
                                         r"begin_step=2 with update_every=5"):
        callback.update_steps(total_steps=8)
    with pytest.raises(ValueError, match="end_step=None .* needs the number of training steps"):
        callback.update_steps()  # (no fit running, no length given)
    explicit = keras_dst.GradualPruning(0.25, update_every=5, end_step=10)
    assert explicit.update_steps(total_steps=8).end == 10  # (the ramp's own end)


def test_a_fit_after_the_last_update_step_warns_that_it_updates_nothing():
    callback = keras_dst.GradualPruning(0.25, update_every=5)
    model, _ = _fit(callback)  # 16 steps; 75% of them: updates up to step 10
    before = {k: v.copy() for k, v in keras_dst.masks(model).items()}
    x, y = classification_data()
    fit = dict(batch_size=16, epochs=2, verbose=0, shuffle=False)
    # a second ramp to a lower density: its steps count from the optimizer's first, so
    # the default end (75% of this fit's 16 steps) lies before it (it pruned nothing, silently)
    with pytest.warns(UserWarning, match=r"GradualPruning: this fit runs optimizer steps "
                                         r"17-32 \(1-based\), all after its last update step "
                                         r"\(10\), so it updates nothing.*begin_step="):
        model.fit(x, y, callbacks=[keras_dst.GradualPruning(0.1, update_every=5)], **fit)
    assert all((keras_dst.masks(model)[k] == v).all() for k, v in before.items())
    with warnings.catch_warnings():  # the remedy the warning names
        warnings.simplefilter("error")
        model.fit(x, y, callbacks=[keras_dst.GradualPruning(
            0.1, update_every=5, begin_step=32, end_step=42, initial_density=0.25)], **fit)
    assert keras_dst.density(model) == pytest.approx(0.1, abs=0.01)
    # a resumed run (initial_epoch) counts the whole run's steps: no warning
    # (its first half ran the ramp the whole run resolves: 75 % of 32 steps, up to 20)
    resumed, _ = _fit(keras_dst.GradualPruning(0.25, update_every=5, end_step=20))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed.fit(x, y, callbacks=[keras_dst.GradualPruning(0.25, update_every=5)],
                    **{**fit, "epochs": 4, "initial_epoch": 2})


def test_weights_sparser_than_the_ramp_are_named_and_wait_for_it():
    """A model already sparse (here 0.3, from DST say) under a ramp starting dense: its
    weights cannot follow the ramp (pruning never regrows); a warning names them, they
    keep their masks until the ramp falls below 0.3, then follow it to the end."""
    model = keras_dst.prunable(mlp(), density=0.3, distribution="uniform")
    before = {k: v.copy() for k, v in keras_dst.masks(model).items()}
    callback = keras_dst.GradualPruning(0.1, update_every=1, begin_step=0, end_step=12)
    recorder = MaskRecorder()
    with pytest.warns(UserWarning, match=r"GradualPruning: '.*kernel' \(0\.300\).* fewer "
                                         r"active entries than the ramp's density 0\.793 at "
                                         r"step 1; pruning never regrows"):
        _fit(callback, recorder=recorder, model=model)
    for step in (1, 2, 3, 4):  # d(t) = 0.1 + 0.9 (1 - t/12)^3: 0.79 ... 0.37, above 0.3
        for path, (mask, _) in recorder.states[step - 1].items():
            np.testing.assert_array_equal(mask, before[path], err_msg=(step, path))
    for path, (mask, _) in recorder.states[4].items():  # d(5) = 0.275: the ramp reaches them
        assert mask.sum() < before[path].sum(), path
    assert keras_dst.density(model) == pytest.approx(0.1, abs=0.01)
    dense = keras_dst.prunable(mlp(), density=1.0, distribution="uniform")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _fit(keras_dst.GradualPruning(0.1, update_every=1, begin_step=0, end_step=12),
             model=dense)


@pytest.mark.parametrize("second", ["itself", "dst"])
def test_a_fit_refused_by_a_later_callback_prunes_nothing(second):
    """GradualPruning prunes for a fit's first step before its first batch, once every
    callback's on_train_begin has passed: a callback listed after it that refuses the
    fit leaves masks and weights as they were (it pruned to d(1) first)."""
    model = keras_dst.prunable(mlp(), density=1.0, distribution="uniform")
    model.compile(keras.optimizers.SGD(0.05), LOSS)
    before = sparse_state(model)
    gradual = keras_dst.GradualPruning(0.2, update_every=1, end_step=8)
    other = gradual if second == "itself" else keras_dst.DynamicSparseTraining(update_every=2)
    x, y = classification_data()
    with pytest.raises(ValueError, match="pass (it|one per fit)"):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[gradual, other])
    after = sparse_state(model)
    for path, (mask, kernel) in before.items():
        np.testing.assert_array_equal(after[path][0], mask, err_msg=path)
        np.testing.assert_array_equal(after[path][1], kernel, err_msg=path)


def test_logged_density_is_that_of_the_masks_as_they_are():
    """After set_masks (or a load) between fits, the logged density is the masks', not
    the last update's."""
    model, _ = _fit(keras_dst.GradualPruning(0.2, update_every=2, end_step=8))
    keras_dst.set_masks(model, {k: np.ones_like(v) for k, v in keras_dst.masks(model).items()})
    x, y = classification_data()
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0,
                        callbacks=[keras_dst.GradualPruning(0.2, update_every=2, end_step=8)])
    assert history.history["density"] == [1.0]


@pytest.mark.parametrize("epochs_before", [1, 2])
def test_target_density_after_a_reload_is_the_ramp_s_not_initial_density(tmp_path, epochs_before):
    """A new callback on a reloaded model logged `initial_density` as `target_density`
    until its own first update, and for ever once the ramp had ended (fit 1: mid-ramp,
    fit 2: past its end)."""
    config = dict(final_density=0.2, update_every=4, end_step=16)  # 8 steps an epoch
    x, y = classification_data()
    one = keras_dst.prunable(mlp(), density=1.0, distribution="uniform")
    history = compile_and_fit(one, [keras_dst.GradualPruning(**config)], epochs=epochs_before + 1).history
    split = keras_dst.prunable(mlp(), density=1.0, distribution="uniform")
    compile_and_fit(split, [keras_dst.GradualPruning(**config)], epochs=epochs_before)
    keras_dst.save_model(split, str(tmp_path / "m.keras"))
    loaded = keras_dst.load_model(str(tmp_path / "m.keras"))
    recorded = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: recorded.append(logs["target_density"]))
    resumed = loaded.fit(x, y, batch_size=16, epochs=epochs_before + 1, initial_epoch=epochs_before,
                         verbose=0, shuffle=False, callbacks=[keras_dst.GradualPruning(**config), record])
    assert resumed.history["target_density"][-1] == pytest.approx(history["target_density"][-1])
    assert recorded[0] < 1.0  # (the ramp's value at the reload, not initial_density)
    if epochs_before == 2:
        assert recorded == [pytest.approx(0.2)] * 8


@pytest.mark.parametrize("in_place", [False, True])
def test_layers_kept_dense_stay_dense_also_after_a_reload(tmp_path, in_place):
    """prunable's keep_dense layers are left dense by GradualPruning (it pruned them to the
    ramp like the others), also in a model loaded from a file."""
    model = keras_dst.prunable(mlp(), density=1.0, distribution="uniform", keep_dense="fc3",
                               in_place=in_place)
    assert [t.state.keep_dense for t in keras_dst.sparse_targets(model)] == [False, False, True]
    compile_and_fit(model)
    keras_dst.save_model(model, str(tmp_path / "m.keras"))
    loaded = keras_dst.load_model(str(tmp_path / "m.keras"))
    assert [t.state.keep_dense for t in keras_dst.sparse_targets(loaded)] == [False, False, True]
    x, y = classification_data()
    loaded.fit(x, y, batch_size=16, epochs=2, verbose=0,
               callbacks=[keras_dst.GradualPruning(0.2, update_every=2, end_step=24)])
    densities = {t.weight.path: t.mask.numpy().mean() for t in keras_dst.sparse_targets(loaded)}
    assert list(densities.values())[:2] == [pytest.approx(0.2, abs=0.01)] * 2
    assert list(densities.values())[2] == 1.0
    only_dense = keras_dst.prunable(mlp(), density=1.0, keep_dense=["fc1", "fc2", "fc3"])
    with pytest.raises(ValueError, match=r"GradualPruning: every sparsified layer of model .* is "
                                         r"kept dense"):
        compile_and_fit(only_dense, [keras_dst.GradualPruning(0.2, update_every=2, end_step=8)])


@pytest.mark.slow
def test_split_fit_resumes_like_one_fit():
    config = dict(final_density=0.3, begin_step=0, end_step=12, update_every=4)
    one, _ = _fit(keras_dst.GradualPruning(**config), epochs=2)
    split = keras_dst.prunable(mlp(), density=1.0, distribution="uniform")
    _fit(keras_dst.GradualPruning(**config), epochs=1, model=split)
    x, y = classification_data()
    split.fit(x, y, epochs=2, initial_epoch=1, batch_size=16, verbose=0, shuffle=False,
              callbacks=[keras_dst.GradualPruning(**config)])
    for path, mask in keras_dst.masks(one).items():
        np.testing.assert_array_equal(keras_dst.masks(split)[path], mask)


@pytest.mark.parametrize("kwargs, error, name", [
    (dict(final_density=0.0), ValueError, "final_density"),
    (dict(final_density=1.5), ValueError, "final_density"),
    (dict(final_density="0.1"), TypeError, "final_density"),
    (dict(final_density=0.5, initial_density=0.4), ValueError, "initial_density"),
    (dict(final_density=0.5, initial_density=0.0), ValueError, "initial_density"),
    (dict(final_density=0.5, update_every=0), ValueError, "update_every"),
    (dict(final_density=0.5, update_every=2.5), TypeError, "update_every"),
    (dict(final_density=0.5, begin_step=-1), ValueError, "begin_step"),
    (dict(final_density=0.5, begin_step=10, end_step=10), ValueError, "end_step"),
    (dict(final_density=0.5, end_step=True), TypeError, "end_step"),
    (dict(final_density=0.5, power=0), ValueError, "power"),
    (dict(final_density=0.5, power="3"), TypeError, "power"),
])
def test_bad_arguments_name_the_argument(kwargs, error, name):
    with pytest.raises(error, match=name):
        keras_dst.GradualPruning(**kwargs)


def test_unaligned_end_step_warns():
    with pytest.warns(UserWarning, match="never reached"):
        keras_dst.GradualPruning(0.5, begin_step=0, end_step=10, update_every=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        keras_dst.GradualPruning(0.5, begin_step=1, end_step=10, update_every=3)


def test_fit_time_errors():
    dense = mlp()
    dense.compile("sgd", "mse")
    x, y = classification_data()
    with pytest.raises(ValueError, match="GradualPruning.*no sparse layers"):
        dense.fit(x, y, verbose=0, callbacks=[keras_dst.GradualPruning(0.5, end_step=100)])
    sparse = keras_dst.prunable(mlp(), density=1.0)
    sparse.compile("sgd", LOSS)
    with pytest.raises(ValueError, match="no update step"):  # 75% of 8 steps < update_every
        sparse.fit(x, y, batch_size=16, verbose=0, callbacks=[keras_dst.GradualPruning(0.5)])

    def batches():
        while True:
            yield x[:16], y[:16]

    with pytest.raises(ValueError, match="end_step=None"):
        sparse.fit(batches(), steps_per_epoch=None, epochs=1, verbose=0, shuffle=False,
                   callbacks=[keras_dst.GradualPruning(0.5)])


def test_config_round_trip():
    callback = keras_dst.GradualPruning(0.1, begin_step=5, end_step=105, update_every=10, power=2,
                                        initial_density=0.9)
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(callback))
    assert isinstance(clone, keras_dst.GradualPruning)
    assert clone.get_config() == callback.get_config()


# ---------------------------------------------------------------------------
# TF-MOT parity (the script runs in its own process: TF-MOT switches tf.keras
# to Keras 2 process-wide).


def _tfmot_available():
    probe = subprocess.run([sys.executable, "-c", "import tensorflow_model_optimization, tf_keras"],
                           capture_output=True)
    return probe.returncode == 0


def _keras3_model(reference):
    config = json.loads(str(reference["config"]))
    sizes = config["sizes"]
    model = mlp(tuple(sizes))
    for i in range(len(sizes) - 1):
        model.get_layer(f"fc{i + 1}").set_weights([reference[f"kernel{i}"], reference[f"bias{i}"]])
    return keras_dst.prunable(model, density=1.0, distribution="uniform"), config


def _gradual_kwargs(config):
    return dict(final_density=1.0 - config["final_sparsity"],
                initial_density=1.0 - config["initial_sparsity"],
                begin_step=config["begin_step"], end_step=config["end_step"],
                update_every=config["frequency"], power=config["power"])


@pytest.mark.tfmot
def test_tfmot_parity(tmp_path):
    """Same model, weights, data and SGD: TF-MOT's masks at every step, in two ways.

    1. Trajectory: both frameworks train 16 steps; the masks used by every step
       (hence the sparsity-vs-step curve) must be identical.
    2. Same weights: at each TF-MOT update, our engine prunes TF-MOT's own
       pre-update weights and masks; the result must be TF-MOT's new mask. This
       holds even if float differences in training ever made trajectories differ.
    """
    if not _tfmot_available():
        pytest.skip("needs the tfmot extra (tensorflow-model-optimization, tf-keras)")
    out = tmp_path / "tfmot.npz"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    run = subprocess.run([sys.executable, os.path.join(HERE, "tfmot_parity.py"), str(out)],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    reference = np.load(out)
    model, config = _keras3_model(reference)
    paths = [t.weight.path for t in keras_dst.sparse_targets(model)]
    tfmot_masks = [reference[f"masks{i}"] for i in range(len(paths))]

    # 1. Trajectory.
    model.compile(keras.optimizers.SGD(config["learning_rate"]), "mse", jit_compile=True)
    recorder = MaskRecorder()
    model.fit(reference["x"], reference["y"], batch_size=config["batch_size"],
              epochs=config["epochs"], shuffle=False, verbose=0,
              callbacks=[keras_dst.GradualPruning(**_gradual_kwargs(config)), recorder])
    steps = len(tfmot_masks[0]) - 1
    for i, path in enumerate(paths):
        ours = np.stack([recorder.states[t - 1][path][0] for t in range(1, steps + 1)])
        theirs = tfmot_masks[i][1:]
        np.testing.assert_array_equal(ours.sum(axis=(1, 2)), theirs.sum(axis=(1, 2)),
                                      err_msg=f"{path}: active counts per step")
        np.testing.assert_array_equal(ours, theirs, err_msg=f"{path}: masks")

    # 2. Same weights.
    fresh, _ = _keras3_model(reference)
    targets = keras_dst.sparse_targets(fresh)
    kwargs = _gradual_kwargs(config)
    engine = GradualEngine(
        targets, schedules.UpdateSteps(kwargs["update_every"], kwargs["begin_step"], kwargs["end_step"]),
        initial_density=kwargs["initial_density"], final_density=kwargs["final_density"],
        power=kwargs["power"])
    updates = range(config["begin_step"], config["end_step"] + 1, config["frequency"])
    for step in updates:
        for i, t in enumerate(targets):
            before = tfmot_masks[i][step - 1]
            t.mask.assign(before)
            t.weight.assign(reference[f"kernels{i}"][step - 1] * before)
        engine.maybe_update(step)
        for i, t in enumerate(targets):
            np.testing.assert_array_equal(t.mask.numpy(), tfmot_masks[i][step],
                                          err_msg=f"{paths[i]} at step {step}")


def test_default_end_on_data_without_a_length_names_the_argument_that_gives_it():
    import tensorflow as tf

    model = keras_dst.prunable(mlp(), density=1.0, distribution="uniform")
    model.compile("sgd", LOSS)
    x, y = classification_data()
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(16).filter(lambda *_: True)
    with pytest.raises(ValueError, match=r"end_step=None .* needs the number of training steps.*"
                                         r"steps_per_epoch= to fit\(\), or end_step= to "
                                         r"GradualPruning\."):
        model.fit(data, epochs=1, verbose=0,
                  callbacks=[keras_dst.GradualPruning(final_density=0.5, update_every=2)])
