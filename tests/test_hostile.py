"""Hostile inputs (issue #6, item 5): non-finite weights, degenerate layer sizes,
all-equal scores, corrupted configs, and what a `.keras` file may contain.

Every fit here checks the sparse invariants after *every* optimizer step (the
`StepChecker` callback below raises inside `fit`), not only at the end.
"""

import json
import os
import subprocess
import sys
import zipfile

import keras
import numpy as np
import pytest

import keras_dst

from conftest import LOSS, active_counts, all_layers_model, assert_sparse_invariants, mlp


class StepChecker(keras.callbacks.Callback):
    """After every batch: bool masks, inactive entries exactly 0, exact per-weight counts,
    ever_active containing the mask, finite weights unless `finite=False`
    (`assert_sparse_invariants`).

    Also records the masks and the engine's numbers of every step (`states`).
    Put it after the DST callback.
    """

    def __init__(self, dst, counts, finite=True):
        super().__init__()
        self.dst, self.counts, self.finite = dst, counts, finite
        self.states = []

    def on_train_batch_end(self, batch, logs=None):
        targets = keras_dst.sparse_targets(self.model)
        state = {"masks": [], "weights": [],
                 "last_update": int(self.dst.engine.last_update_step.numpy()),
                 "skipped": int(self.dst.engine.skipped_layers.numpy()),
                 "stats": np.array(self.dst.engine.layer_stats.numpy())}
        assert_sparse_invariants(targets, self.counts, finite=self.finite, ever_active=True)
        for t in targets:
            state["masks"].append(np.array(t.mask.numpy()))
            state["weights"].append(np.array(t.weight.numpy()))
        self.states.append(state)


def fit_checked(model, x, y, epochs=1, batch_size=8, finite=True, jit_compile=True,
                **dst_kwargs):
    dst = keras_dst.DynamicSparseTraining(**dst_kwargs)
    checker = StepChecker(dst, active_counts(model), finite=finite)
    model.compile(keras.optimizers.SGD(0.05), LOSS, jit_compile=jit_compile)
    model.fit(x, y, epochs=epochs, batch_size=batch_size, shuffle=False, verbose=0,
              callbacks=[dst, checker])
    return dst, checker


# ----------------------------------------------------------------------------
# NaN / Inf in the weights themselves (gradients finite) at update steps.
#
# An Embedding row that no input token selects gets an exactly-zero gradient, so
# NaN/Inf written into it stays there, never reaches the loss, and leaves every
# gradient finite: only the engine's weight check stands between it and the
# selection.

VOCAB, USED = 40, 20  # tokens are drawn from [0, USED); rows >= USED are never looked up


def embedding_model(seed=0):
    keras.utils.set_random_seed(seed)
    tok = keras.Input((4,), dtype="int32")
    h = keras.layers.Embedding(VOCAB, 4, name="emb")(tok)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(12, activation="relu", name="fc")(h)
    return keras.Model(tok, keras.layers.Dense(3, name="head")(h))


def poison_unused_rows(model, values=(np.nan, np.inf, -np.inf)):
    """Writes `values` (NaN, +Inf, -Inf) into active entries of unused embedding rows (and
    NaN into an inactive one, which the mask constraint must wipe). Returns the positions."""
    target = next(t for t in keras_dst.sparse_targets(model) if "emb" in t.weight.path)
    w, m = target.weight.numpy().copy(), target.mask.numpy()
    unused = np.zeros_like(m)
    unused[USED:] = True
    active = np.argwhere(m & unused)[:3]
    inactive = np.argwhere(~m & unused)[0]
    for (i, j), value in zip(active, values):
        w[i, j] = value
    w[tuple(inactive)] = np.nan
    target.weight.assign(w)
    return target.weight.path, [tuple(a) for a in active], tuple(inactive)


@pytest.mark.parametrize("prune,grow,scope,jit_compile", [
    ("magnitude", "random", "layer", True),
    ("snip", "gradient", "layer", True),
    # without XLA the graph optimizer rewrites comparisons: NaN alone was counted finite
    ("magnitude", "gradient", "global", False),
    ("magnitude", "random", "layer", False),
    pytest.param("magnitude", "gradient", "global", True, marks=pytest.mark.slow)])
def test_non_finite_weights_skip_that_layer_and_corrupt_nothing(prune, grow, scope,
                                                               jit_compile):
    model = keras_dst.prunable(embedding_model(), density=0.4, distribution="uniform")
    counts = active_counts(model)
    path, poisoned, inactive_nan = poison_unused_rows(
        model, (np.nan,) * 3 if not jit_compile else (np.nan, np.inf, -np.inf))
    rng = np.random.default_rng(0)
    x = rng.integers(0, USED, size=(48, 4)).astype("int32")
    y = rng.integers(0, 3, size=(48,))
    before = keras_dst.masks(model)
    dst, checker = fit_checked(model, x, y, finite=False, jit_compile=jit_compile,
                               prune=prune, grow=grow, scope=scope, update_every=2,
                               schedule="constant", prune_rate=0.3)
    paths = [t.weight.path for t in keras_dst.sparse_targets(model)]
    emb = paths.index(path)
    updates = [s for s in checker.states if s["last_update"] >= 0]
    assert len({s["last_update"] for s in updates}) == 3  # steps 2, 4, 6 updated
    for s in checker.states:
        # the poisoned layer never changed its mask, nor pruned or grew anything
        np.testing.assert_array_equal(s["masks"][emb], before[path].astype(bool))
        # the non-finite values stayed exactly where they were written, nowhere else
        w = s["weights"][emb]
        bad = {tuple(i) for i in np.argwhere(~np.isfinite(w))}
        assert bad == set(poisoned), bad
        assert w[inactive_nan] == 0  # the constraint wiped the NaN at the inactive entry
        for i, other in enumerate(s["weights"]):
            if i != emb:
                assert np.all(np.isfinite(other))
    last = checker.states[-1]
    assert tuple(last["stats"][emb][1:3]) == (0, 0)
    if scope == "layer":  # only the poisoned layer is skipped; the healthy ones updated
        assert last["skipped"] == 1
        for i, p in enumerate(paths):
            if i != emb:
                assert np.any(last["masks"][i] != before[p].astype(bool)), p
                assert last["stats"][i][1] == last["stats"][i][2] > 0
    else:  # global scope: one ranking across layers, so the whole update is skipped
        assert last["skipped"] == len(paths)
        for i, p in enumerate(paths):
            np.testing.assert_array_equal(last["masks"][i], before[p].astype(bool))
    assert keras_dst.density(model) == sum(counts.values()) / sum(
        int(np.prod(t.weight.shape)) for t in keras_dst.sparse_targets(model))
    assert np.all(np.isfinite(model.predict(x, verbose=0)))  # the used rows are healthy


@pytest.mark.slow
def test_layer_recovers_once_its_weights_are_finite_again():
    model = keras_dst.prunable(embedding_model(), density=0.4, distribution="uniform")
    path, poisoned, _ = poison_unused_rows(model)
    rng = np.random.default_rng(1)
    x = rng.integers(0, USED, size=(32, 4)).astype("int32")
    y = rng.integers(0, 3, size=(32,))
    before = keras_dst.masks(model)
    fit_checked(model, x, y, finite=False, update_every=2, schedule="constant", prune_rate=0.3)
    np.testing.assert_array_equal(keras_dst.masks(model)[path], before[path])
    target = next(t for t in keras_dst.sparse_targets(model) if t.weight.path == path)
    w = target.weight.numpy()
    for p in poisoned:
        w[p] = 0.5
    target.weight.assign(w)
    dst, checker = fit_checked(model, x, y, update_every=2, schedule="constant", prune_rate=0.3)
    assert checker.states[-1]["skipped"] == 0
    assert np.any(keras_dst.masks(model)[path] != before[path])


# ----------------------------------------------------------------------------
# Degenerate sizes: a 0-size kernel, a 1-element kernel, 0 and 1 active entries.


def test_dense_with_zero_units_is_a_clear_keras_error():
    with pytest.raises(ValueError, match="units"):
        keras.layers.Dense(0)


def degenerate_model(seed=0):
    """Kernels of 0 entries (0 active), 1 entry (1 active), 12 entries (0 active), 18 (1 active)."""
    keras.utils.set_random_seed(seed)
    W = keras_dst.SparseWrapper
    empty_in, one_in, x_in = keras.Input((0,)), keras.Input((1,)), keras.Input((6,))
    a = W(keras.layers.Dense(3, name="empty"), density=0.5)(empty_in)     # kernel (0, 3)
    b = W(keras.layers.Dense(1, name="single"), density=1.0)(one_in)      # kernel (1, 1)
    c = W(keras.layers.Dense(2, name="none_active"), density=0.0)(x_in)   # kernel (6, 2)
    h = keras.layers.Concatenate()([a, b, c])
    out = W(keras.layers.Dense(3, name="head"), density=1 / 18)(h)        # kernel (6, 3)
    return keras.Model([empty_in, one_in, x_in], out)


def degenerate_data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    x = [np.zeros((n, 0), "float32"), rng.normal(size=(n, 1)).astype("float32"),
         rng.normal(size=(n, 6)).astype("float32")]
    return x, rng.integers(0, 3, size=(n,))


@pytest.mark.parametrize("prune,grow,kwargs", [
    ("magnitude", "random", {}),
    ("snip", "gradient", {}),
    pytest.param("set", "momentum", {}, marks=pytest.mark.slow),
    ("sensitivity", "gradient", {"scope": "global"}),
    pytest.param("magnitude", "gradient", {"normalize": "input"}, marks=pytest.mark.slow),
])
def test_zero_size_and_one_element_layers_keep_exact_counts(prune, grow, kwargs):
    model = degenerate_model()
    counts = active_counts(model)
    assert list(counts.values()) == [0, 1, 0, 1]
    x, y = degenerate_data()
    dst = keras_dst.DynamicSparseTraining(prune=prune, grow=grow, update_every=1,
                                          schedule="constant", prune_rate=1.0, **kwargs)
    checker = StepChecker(dst, counts)
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9), LOSS, jit_compile=True)
    history = model.fit(x, y, epochs=1, batch_size=8, shuffle=False, verbose=0,
                        callbacks=[dst, checker])
    assert len(checker.states) == 4 and checker.states[-1]["last_update"] == 4
    assert np.all(np.isfinite(history.history["loss"]))
    logs = {k: v[-1] for k, v in history.history.items()}
    assert logs["density"] == 2 / (0 + 1 + 12 + 18) and np.isfinite(logs["mask_churn"])
    assert all(np.isfinite(v) for v in logs.values())
    assert keras_dst.density(model) == 2 / 31
    keras_dst.summary(model, print_fn=lambda s: None)  # no division by zero


def test_global_density_so_low_that_layers_get_zero_or_one_weight():
    model = keras_dst.prunable(mlp((20, 32, 16, 3)), density=0.001)  # round(0.001 * 1200) = 1
    counts = active_counts(model)
    assert sum(counts.values()) == 1 and sorted(counts.values()) == [0, 0, 1]
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 20)).astype("float32"), rng.integers(0, 3, size=(32,))
    dst, checker = fit_checked(model, x, y, prune="magnitude", grow="gradient", update_every=1,
                               schedule="constant", prune_rate=1.0)
    assert checker.states[-1]["last_update"] == 4
    # the single active weight was pruned (rate 1) and one regrown, at every update
    assert [tuple(s["stats"].sum(axis=0)[:3]) for s in checker.states] == [(1, 1, 1)] * 4


# ----------------------------------------------------------------------------
# All-equal scores: exact counts and the documented tie-break (lower flat index first).


def _lowest_indices(mask, count):
    flat = np.flatnonzero(mask)
    return flat[:count]


@pytest.mark.parametrize("prune", ["magnitude", pytest.param("snip", marks=pytest.mark.slow)])
def test_all_equal_scores_break_ties_by_lower_flat_index_deterministically(prune):
    """fc1 kernel: every active weight 0.5 and the input all zeros, so its gradient is
    exactly 0: every pruning score (|w| or |w g| + 1e-5) and every growth score (|g|)
    ties. The first update then removes the r active entries of lowest flat index and
    regrows the r inactive entries (just-pruned included) of lowest flat index."""
    def run():
        model = keras_dst.prunable(mlp((10, 8, 3)), density=0.4, distribution="uniform")
        target = keras_dst.sparse_targets(model)[0]
        m0 = target.mask.numpy()
        target.weight.assign(np.where(m0, 0.5, 0.0).astype("float32"))
        x, y = np.zeros((16, 10), "float32"), np.arange(16) % 3
        dst, checker = fit_checked(model, x, y, prune=prune, grow="gradient", update_every=2,
                                   schedule="constant", prune_rate=0.25)
        return m0, checker.states

    m0, states = run()
    r = int(np.ceil(0.25 * m0.sum()))
    pruned = m0.ravel().copy()
    pruned[_lowest_indices(m0.ravel(), r)] = False
    expected = pruned.copy()
    expected[_lowest_indices(~pruned, r)] = True
    first_update = states[1]
    assert first_update["last_update"] == 2
    np.testing.assert_array_equal(first_update["masks"][0].ravel(), expected)
    assert tuple(first_update["stats"][0][:3]) == (m0.sum(), r, r)
    # the same masks at every step of a second run
    m0_again, states_again = run()
    np.testing.assert_array_equal(m0, m0_again)
    for a, b in zip(states, states_again):
        for ma, mb in zip(a["masks"], b["masks"]):
            np.testing.assert_array_equal(ma, mb)


# ----------------------------------------------------------------------------
# Corrupted configs: a clear ValueError/TypeError naming the value, before any state exists.


def test_callback_config_with_an_unknown_criterion_names_it():
    config = keras_dst.DynamicSparseTraining().get_config()
    with pytest.raises(ValueError, match="'nope'.*known: .*magnitude"):
        keras_dst.DynamicSparseTraining.from_config({**config, "prune": "nope"})
    serialized = keras.saving.serialize_keras_object(keras_dst.DynamicSparseTraining())
    for key, value in [("prune", "nope"), ("grow", "nope_grow"), ("schedule", "nope_schedule"),
                       ("scope", "nope_scope"), ("update_every", 0), ("prune_rate", 1.5)]:
        bad = json.loads(json.dumps(serialized))
        bad["config"][key] = value
        with pytest.raises(ValueError, match=str(value)) as info:
            keras.saving.deserialize_keras_object(bad)
        assert key in str(info.value)


@pytest.mark.parametrize("key,value,error", [
    ("density", 1.5, ValueError), ("density", -0.1, ValueError),
    ("density", float("nan"), ValueError), ("density", [0.5, 2.0], ValueError),
    ("density", "0.5", TypeError), ("init", "nope", ValueError),
])
def test_sparse_wrapper_config_with_a_bad_value_names_it(key, value, error):
    serialized = keras.saving.serialize_keras_object(
        keras_dst.prunable(keras.layers.Dense(3), density=0.5))
    bad = json.loads(json.dumps(serialized))
    bad["config"][key] = value
    shown = "2.0" if isinstance(value, list) else str(value)
    with pytest.raises(error, match=f"{key}.*{shown}"):
        keras.saving.deserialize_keras_object(bad)


def _rewrite_keras_file(src, dst, edit):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename == "config.json":
                config = json.loads(data)
                edit(config)
                data = json.dumps(config).encode()
            zout.writestr(item, data)


def _wrappers(config):
    """Every SparseWrapper config dict inside a model config."""
    if isinstance(config, dict):
        if config.get("class_name") == "SparseWrapper":
            yield config["config"]
        for v in config.values():
            yield from _wrappers(v)
    elif isinstance(config, list):
        for v in config:
            yield from _wrappers(v)


@pytest.mark.parametrize("key,value,error", [("init", "nope", ValueError),
                                             ("density", 7.0, ValueError)])
def test_keras_file_with_a_bad_wrapper_config_fails_loading_naming_the_value(
        tmp_path, key, value, error):
    model = keras_dst.prunable(mlp(), density=0.3)
    good = tmp_path / "good.keras"
    model.save(good)
    bad = tmp_path / "bad.keras"

    def edit(config):
        next(_wrappers(config))[key] = value

    _rewrite_keras_file(good, bad, edit)
    with pytest.raises(error, match=f"{key}.*{value}"):
        keras.models.load_model(bad, safe_mode=True)
    keras.models.load_model(good, safe_mode=True)  # the untouched file still loads


# ----------------------------------------------------------------------------
# .keras files: safe_mode loading of every layer type after DST, no pickled code.

_LOADER = """
import sys, numpy as np, keras
import keras_dst  # registers its classes; nothing else (no custom_objects, no test code)
model = keras.models.load_model(sys.argv[1], safe_mode=True)
m = keras_dst.masks(model)
np.savez(sys.argv[2], **{k.replace("/", "|"): v for k, v in m.items()})
"""


def _assert_no_code_in_archive(path):
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        assert set(names) <= {"metadata.json", "config.json", "model.weights.h5"}, names
        text = archive.read("config.json").decode()
        for marker in ("__lambda__", "Lambda", "function_type", "bytecode", "marshal", "pickle"):
            assert marker not in text, marker
        for name in names:  # no pickle stream anywhere (protocol 2+ starts with 0x80)
            assert not archive.read(name)[:1] == b"\x80", name


def test_every_layer_type_loads_with_safe_mode_in_a_fresh_process(tmp_path):
    """test_training checks the in-process round trip after training; this one loads
    in a process that imported nothing but keras_dst (DST state variables included)."""
    model = keras_dst.prunable(all_layers_model(), density=0.3, track_running_scores=True)
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9), LOSS)
    path = tmp_path / "dst.keras"
    keras_dst.save_model(model, path)
    _assert_no_code_in_archive(path)
    out = tmp_path / "masks.npz"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # keras_dst importable
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p))
    subprocess.run([sys.executable, "-c", _LOADER, str(path), str(out)], check=True,
                   cwd=tmp_path, timeout=300, env=env)
    loaded = {k.replace("|", "/"): v for k, v in np.load(out).items()}
    expected = keras_dst.masks(model)
    wrapped = {type(t.wrapper.layer).__name__ for t in keras_dst.sparse_targets(model)}
    assert len(wrapped) == 14, wrapped  # every supported layer type is in the file
    assert loaded.keys() == expected.keys()
    for k in expected:
        np.testing.assert_array_equal(loaded[k], expected[k])


def test_unsafe_lambda_layer_is_refused_by_safe_mode_so_the_check_can_fail(tmp_path):
    """Sanity check of `_assert_no_code_in_archive` and of safe_mode itself."""
    inp = keras.Input((4,))
    h = keras.layers.Lambda(lambda t: t * 2)(inp)
    model = keras.Model(inp, keras.layers.Dense(2)(h))
    path = tmp_path / "lambda.keras"
    model.save(path)
    with pytest.raises(AssertionError):
        _assert_no_code_in_archive(path)
    with pytest.raises(ValueError, match="safe_mode"):
        keras.models.load_model(path, safe_mode=True)
