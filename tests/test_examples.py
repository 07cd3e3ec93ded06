"""End-to-end tests of examples/ (train.py, sweep.py, plot.py, models.py, data.py).

TFDS datasets are replaced by `tfds.testing.mock_data` (no network); `digits` is
bundled with scikit-learn. Models that take long to trace on a CPU (ResNets, VGG,
WRN) run in the slow pass only.
"""

import csv
import json
import math
import os
import pathlib
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
from absl import flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import keras_dst  # noqa: E402
from examples import data, deploy, models, optim, plot, sweep, train  # noqa: E402
from examples.cli import parse_flags  # noqa: E402

tfds = pytest.importorskip("tensorflow_datasets")

TINY = dict(epochs=1, batch_size=4, update_every=1, verbose=0, jit_compile="false")
DIGITS = dict(TINY, batch_size=256, update_every=2)  # 5 steps per epoch
SLOW_BUILDS = ("vgg16", "resnet110", "mlp_cifar10", "resnet50")
RESULT_KEYS = {"config", "final_test_accuracy", "best_val_test_accuracy", "best_val_accuracy",
               "best_epoch", "final_val_accuracy", "density", "layer_densities", "num_params",
               "steps", "steps_per_epoch", "train_size", "train_time_s", "total_time_s",
               "history", "output_dir"}


@pytest.fixture
def mock_tfds():
    with tfds.testing.mock_data(num_examples=8):
        yield


@pytest.fixture
def higgs_dir(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "higgs.npz", x=rng.normal(size=(60, 24)).astype("float32"),
             y=rng.integers(0, 2, 60))
    return str(tmp_path)


def _run(tmp_path, **config):
    return train.run({**TINY, "output_dir": str(tmp_path / "run"), **config})


def _check_run(results, config):
    """Documented outputs exist and are consistent."""
    out = pathlib.Path(results["output_dir"])
    assert RESULT_KEYS <= set(results)
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["final_test_accuracy"] == results["final_test_accuracy"]
    assert on_disk["config"]["method"] == config.get("method", "dst")
    for key in ("final_test_accuracy", "best_val_test_accuracy", "best_val_accuracy"):
        assert 0.0 <= results[key] <= 1.0
    assert results["steps"] == results["steps_per_epoch"] * on_disk["config"]["epochs"]
    assert (out / "model.keras").exists() and (out / "best.keras").exists()
    assert (out / "history.csv").exists()
    method = on_disk["config"]["method"]
    model = keras.models.load_model(out / "model.keras")  # (its weights, not masks or flags)
    plain = model if method == "dense" else keras_dst.strip(model)
    assert results["num_params"] == plain.count_params() < (
        model.count_params() if method in ("static", "dst") else math.inf)
    if method == "dense":
        assert results["density"] == 1.0 and results["layer_densities"] == {}
    elif method in ("static", "dst"):
        assert results["density"] == pytest.approx(on_disk["config"]["density"], abs=1e-3)
        assert results["layer_densities"]


# -- models and data ----------------------------------------------------------------

@pytest.mark.parametrize("name,shape,classes,weights,biases", [
    ("mlp_cifar10", (32, 32, 3), 10, 3072 * 1024 + 1024 * 512 + 5120, 1546),
    ("conv_cifar10", (32, 32, 3), 10, 94304, 234),
    ("lenet5", (28, 28, 1), 10, 500 + 25000 + 400000 + 5000, 580),
    ("mlp_higgs", (24,), 1, 71936, 513),
    ("resnet56", (32, 32, 3), 10, None, 10),
])
def test_model_sizes_match_the_spec(name, shape, classes, weights, biases):
    model = models.get_model(name, shape, classes)
    count = lambda part: sum(int(np.prod(w.shape)) for w in model.trainable_weights  # noqa
                             if w.name == part)
    if weights is not None:
        assert count("kernel") == weights
    assert count("bias") == biases


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_BUILDS
                                  else n for n in models.model_names()])
def test_every_model_builds_and_is_prunable(name):
    shape = {"mlp_higgs": (24,), "mlp_digits": (8, 8, 1), "lenet5": (28, 28, 1),
             "resnet50": (64, 64, 3)}.get(name, (32, 32, 3))
    options = {"depth": 10, "width": 1} if name == "wide_resnet" else {}
    model = models.get_model(name, shape, 10, **options)
    sparse = keras_dst.prunable(model, density=0.2)
    assert keras_dst.density(sparse) == pytest.approx(0.2, abs=1e-3)


def test_unknown_model_and_dataset_are_value_errors():
    with pytest.raises(ValueError, match="unknown model"):
        models.get_model("nope", (8, 8, 1), 10)
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load("nope", 32)
    with pytest.raises(ValueError, match="6n"):
        models.get_model("wide_resnet", (32, 32, 3), 10, depth=11)


def test_torch_default_init():
    model = models.get_model("conv_cifar10", (32, 32, 3), 10)
    kernel, bias = model.get_layer("conv2").get_weights()
    bound = 1.0 / np.sqrt(3 * 3 * 32)
    assert np.abs(kernel).max() <= bound and np.abs(bias).max() <= bound
    assert np.abs(kernel).max() > 0.9 * bound  # uniform over the full range


def test_torch_bias_is_a_builtin_uniform_of_the_fan_in():
    init = models.torch_bias(64, seed=5)
    assert type(init) is keras.initializers.RandomUniform  # no custom object to load
    assert (init.minval, init.maxval) == (-0.125, 0.125)
    legacy = models.TorchBiasUniform(64, seed=5)  # what earlier versions built
    np.testing.assert_array_equal(np.asarray(init((100,))), np.asarray(legacy((100,))))


def test_torch_sgd_matches_pytorch_formula():
    """b <- mu b + g + wd w;  w <- w - lr (g + wd w + mu b) (Nesterov), two steps."""
    w = keras.Variable(np.array([1.0, -2.0], "float32"))
    opt = optim.TorchSGD(0.1, momentum=0.9, nesterov=True, l2=0.01)
    g = np.array([0.5, 0.25], "float32")
    expected, buf = np.array([1.0, -2.0]), np.zeros(2)
    for _ in range(2):
        opt.apply([g], [w])
        d = g + 0.01 * expected
        buf = 0.9 * buf + d
        expected = expected - 0.1 * (d + 0.9 * buf)
    np.testing.assert_allclose(w.numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("l2, error", [("0.1", TypeError), (float("nan"), ValueError), (-1.0, ValueError)])
def test_torch_sgd_refuses_a_bad_l2_naming_it(l2, error):
    with pytest.raises(error, match="l2"):
        optim.TorchSGD(0.1, momentum=0.9, l2=l2)


@pytest.mark.parametrize("kwargs, error, name", [
    (dict(momentum="0.9"), TypeError, "momentum"),
    (dict(momentum=True), TypeError, "momentum"),
    (dict(momentum=float("nan")), ValueError, "momentum"),
    (dict(momentum=1.5), ValueError, "momentum"),
    (dict(momentum=0.9, nesterov="yes"), TypeError, "nesterov"),
    (dict(momentum=0.9, nesterov=1), TypeError, "nesterov"),
    (dict(momentum=0.0, nesterov=True), ValueError, "nesterov=True needs momentum > 0"),
])
def test_torch_sgd_refuses_a_bad_momentum_or_nesterov_naming_it(kwargs, error, name):
    with pytest.raises(error, match=name):
        optim.TorchSGD(0.1, **kwargs)
    optim.TorchSGD(0.1, momentum=0.0, nesterov=False)  # plain SGD


def test_step_decay_drops_at_half_and_three_quarters():
    schedule = optim.step_decay(0.1, epochs=100, steps_per_epoch=10)
    lr = lambda step: float(schedule(step))  # noqa: E731
    assert lr(499) == pytest.approx(0.1) and lr(500) == pytest.approx(0.01)
    assert lr(749) == pytest.approx(0.01) and lr(750) == pytest.approx(0.001)


def test_digits_split_is_fixed():
    train_ds, val_ds, test_ds, info = data.load("digits", 32)
    assert (info["train_size"], info["val_size"], info["test_size"]) == (1257, 180, 360)
    assert info["steps_per_epoch"] == 40 and info["input_shape"] == (8, 8, 1)
    again = data.load("digits", 32, seed=5)[2]
    np.testing.assert_array_equal(next(iter(test_ds))[1], next(iter(again))[1])


def test_tfds_pipelines_on_mock_data(mock_tfds):
    for name, shape in [("cifar10", (32, 32, 3)), ("fashion_mnist", (28, 28, 1)),
                        ("cifar100", (32, 32, 3))]:
        train_ds, _, test_ds, info = data.load(name, 4)
        x, y = next(iter(train_ds))
        assert x.shape == (4, *shape) and x.dtype == "float32" and info["input_shape"] == shape
        assert info["steps_per_epoch"] == 2


# -- train.py ------------------------------------------------------------------------

@pytest.mark.parametrize("model,dataset,method", [
    ("mlp_digits", "digits", "dst"),
    ("conv_cifar10", "cifar10", "dst"),
    ("lenet5", "fashion_mnist", "dst"),
    ("mlp_higgs", "higgs", "dst"),
    ("mlp_cifar10", "cifar10", "dense"),
    pytest.param("resnet20", "cifar10", "dst", marks=pytest.mark.slow),
    pytest.param("resnet56", "cifar10", "dst", marks=pytest.mark.slow),
    pytest.param("vgg16", "cifar100", "dst", marks=pytest.mark.slow),
    pytest.param("wide_resnet", "cifar10", "dst", marks=pytest.mark.slow),
    pytest.param("mlp_cifar10", "cifar10", "dst", marks=pytest.mark.slow),
    pytest.param("resnet50", "imagenet2012", "static", marks=pytest.mark.slow),
])
def test_train_every_model(tmp_path, mock_tfds, higgs_dir, model, dataset, method):
    config = dict(model=model, dataset=dataset, method=method, data_dir=higgs_dir)
    if dataset == "digits":
        config.update(batch_size=256)
    if model == "wide_resnet":
        config.update(depth=10, width=2)
    if dataset == "imagenet2012":
        config.update(batch_size=2)
    results = _run(tmp_path, **config)
    _check_run(results, config)


METHOD_CASES = [
    dict(method="dense"),
    dict(method="static", density=0.2, distribution="uniform"),
    dict(method="dst", prune="magnitude", grow="random"),
    dict(method="dst", prune="snip", grow="gradient", init="bernoulli"),
    dict(method="dst", prune="set", grow="random", scope="global", grow_exact=False),
    dict(method="gmp", density=0.3),
]


@pytest.mark.parametrize("case", METHOD_CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_train_every_method(tmp_path, case):
    results = train.run({**DIGITS, "output_dir": str(tmp_path / "run"), **case})
    _check_run(results, case)
    if case["method"] == "gmp":
        assert results["density"] == pytest.approx(case["density"], abs=0.02)


@pytest.mark.slow
@pytest.mark.parametrize("prune", keras_dst.criterion_names())
@pytest.mark.parametrize("grow", keras_dst.growth_names())
def test_train_every_criterion_and_growth(tmp_path, prune, grow):
    results = train.run({**DIGITS, "output_dir": str(tmp_path / "run"), "prune": prune,
                         "grow": grow})
    _check_run(results, {"method": "dst"})


def test_dst_logs_and_checkpoints_reload(tmp_path):
    results = train.run({**DIGITS, "epochs": 2, "output_dir": str(tmp_path / "run")})
    out = pathlib.Path(results["output_dir"])
    with open(out / "history.csv", newline="") as f:
        header = next(csv.reader(f))
    assert {"density", "itop", "mask_churn", "pruned", "grown"} <= set(header)
    assert any(h.startswith("density/") for h in header)  # per-layer, for TensorBoard too
    assert results["history"]["density"][-1] == pytest.approx(0.1, abs=1e-3)

    _, _, test_ds, _ = data.load("digits", 256)
    for name, key in (("model.keras", "final_test_accuracy"),
                      ("best.keras", "best_val_test_accuracy")):
        loaded = keras.models.load_model(out / name)
        assert isinstance(loaded.optimizer, optim.TorchSGD)
        accuracy = loaded.evaluate(test_ds, verbose=0, return_dict=True)["accuracy"]
        assert accuracy == pytest.approx(results[key], abs=1e-6)
        assert keras_dst.density(loaded) == pytest.approx(results["density"])
    if train.tensorboard(str(tmp_path / "tb_probe")):
        assert any((out / "tb").rglob("*tfevents*"))


@pytest.mark.parametrize("fmt", ["litert", "tf_saved_model"])
def test_export_flag_evaluates_the_exported_model(tmp_path, fmt, capsys):
    """--export: the trained model is exported and scored on the test set; LiteRT also
    reports its size and batch-1 speedup against the dense export (the issue's one command,
    `train.py --pattern 1x4 --density 0.05 --export litert`, on a short run)."""
    if fmt == "litert":
        pytest.importorskip("ai_edge_litert")
    results = train.run({**DIGITS, "output_dir": str(tmp_path / "run"), "pattern": "1x4",
                         "density": 0.05, "export": fmt})
    exported = results["export"]
    out = pathlib.Path(results["output_dir"])
    assert json.loads((out / "results.json").read_text())["export"] == exported
    # float32 export: same predictions up to float rounding, so the same accuracy
    assert exported["test_accuracy"] == pytest.approx(results["final_test_accuracy"], abs=0.01)
    printed = capsys.readouterr().out
    assert "test accuracy" in printed
    if fmt == "litert":
        assert (out / "model.tflite").exists() and (out / "model_dense.tflite").exists()
        assert exported["size_ratio"] < 0.2 and exported["speedup"] > 0
        assert set(exported["stored"].values()) == {"sparse (block 1x4)"}
        # the speed is printed in words whichever way it went (no wall-clock outcome is asserted)
        assert deploy._speed_words(exported["speedup"]) in printed and "x the dense export" in printed
    else:
        assert (out / "saved_model" / "saved_model.pb").exists()


LOAD_ALONE = """
import json, sys
import keras, keras_dst
import numpy as np
model = keras.models.load_model(sys.argv[1])  # safe_mode=True, the default
np.save(sys.argv[2], model.predict(np.load(sys.argv[3]), verbose=0))
opt = model.optimizer
print(json.dumps({"type": type(opt).__module__ + "." + type(opt).__name__, "l2": opt.l2,
                  "iterations": int(opt.iterations.numpy()),
                  "examples": sorted(m for m in sys.modules if m.split(".")[0] == "examples")}))
"""


def test_trained_model_loads_with_keras_dst_alone(tmp_path):
    """A model.keras of train.py loads in a fresh process that imports only keras and
    keras_dst: same optimizer (TorchSGD and its state) and same predictions."""
    results = train.run({**DIGITS, "output_dir": str(tmp_path / "run")})
    path = pathlib.Path(results["output_dir"]) / "model.keras"
    _, _, test_ds, _ = data.load("digits", 256)
    x = np.concatenate([batch for batch, _ in test_ds.as_numpy_iterator()])
    np.save(tmp_path / "x.npy", x)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3",
           "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", LOAD_ALONE, str(path), str(tmp_path / "p.npy"),
                           str(tmp_path / "x.npy")], capture_output=True, text=True, env=env,
                          cwd=str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info == {"type": "keras_dst.optimizers.TorchSGD", "l2": 5e-4,
                    "iterations": results["steps"], "examples": []}
    expected = keras.models.load_model(path).predict(x, verbose=0)
    np.testing.assert_array_equal(np.load(tmp_path / "p.npy"), expected)
    y = np.concatenate([labels for _, labels in test_ds.as_numpy_iterator()])
    accuracy = float(np.mean(np.argmax(expected, -1) == y))
    assert accuracy == pytest.approx(results["final_test_accuracy"], abs=1e-6)


def test_objects_of_earlier_files_still_deserialize():
    """Files saved before TorchSGD moved into keras_dst name "keras_dst_examples>..."."""
    opt = keras.saving.deserialize_keras_object({
        "module": "examples.optim", "class_name": "TorchSGD",
        "registered_name": "keras_dst_examples>TorchSGD",
        "config": {"name": "torch_sgd", "learning_rate": 0.1, "momentum": 0.9,
                   "nesterov": True, "l2": 0.01}})
    assert isinstance(opt, keras_dst.optimizers.TorchSGD) and opt.l2 == 0.01
    init = keras.saving.deserialize_keras_object({
        "module": "examples.models", "class_name": "TorchBiasUniform",
        "registered_name": "keras_dst_examples>TorchBiasUniform",
        "config": {"fan_in": 16, "seed": 3}})
    np.testing.assert_array_equal(np.asarray(init((50,))),
                                  np.asarray(models.torch_bias(16, seed=3)((50,))))
    assert float(np.abs(np.asarray(init((50,)))).max()) <= 0.25


def test_overlap_flag_writes_a_plottable_matrix(tmp_path):
    criteria = ["magnitude", "snip", "random"]
    plain = train.run({**DIGITS, "output_dir": str(tmp_path / "plain")})
    results = train.run({**DIGITS, "output_dir": str(tmp_path / "run"),
                         "overlap": ",".join(criteria)})
    assert results["config"]["overlap"] == criteria
    # CriteriaOverlap only observes: the run is the same as without it.
    assert results["final_test_accuracy"] == plain["final_test_accuracy"]
    saved = json.loads(pathlib.Path(results["overlap_file"]).read_text())
    assert saved["names"] == criteria and len(saved["history"]) == 2  # steps 2 and 4
    matrix = np.array(saved["matrix"])
    np.testing.assert_allclose(np.diag(matrix), 1.0)
    np.testing.assert_allclose(matrix, matrix.T)
    paths = plot.plot_overlap(results["overlap_file"], str(tmp_path / "overlap"))
    assert all(os.path.getsize(p) > 1000 for p in paths)
    config = {**train.default_config(), "method": "dst"}
    assert sweep.run_key(config) == sweep.run_key({**config, "overlap": []})
    assert sweep.run_key(config) != sweep.run_key({**config, "overlap": criteria})


def test_run_rejects_bad_configs(tmp_path):
    for bad in ({"model": "nope"}, {"density": 0.0}, {"density": 1.5}, {"epochs": 0},
                {"prune": "nope"}, {"typo_key": 1}, {"overlap": ["magnitude"]},
                {"overlap": ["magnitude", "nope"]}, {"overlap": ["magnitude", "running_snip"]},
                {"overlap": ["snip", "magnitude"], "method": "dense"},
                {"method": "dense", "pattern": "1x4"}, {"method": "gmp", "strategy": "mirrored"},
                {"overlap": ["snip", "magnitude"], "strategy": "mirrored"}):
        with pytest.raises(ValueError):
            train.run({**DIGITS, "output_dir": str(tmp_path), **bad})


@pytest.mark.parametrize("method,update_every", [("dst", 11), ("gmp", 8)])
def test_a_run_that_reaches_no_update_is_refused_before_its_outputs(method, update_every,
                                                                    tmp_path):
    # DST would train a static sparse model (gmp leave a dense one) under their name; a
    # run of 2 x 5 steps whose first update is at step 11 (gmp: 75 % of it is 7 steps)
    config = {**DIGITS, "epochs": 2, "method": method, "update_every": update_every,
              "output_dir": str(tmp_path / "run")}
    with pytest.raises(ValueError, match=rf"--method={method}: no update would run: "
                                         rf"--update_every={update_every} is past the run's 10 "
                                         r"steps.*\(--epochs=2 x 5 batches of --batch_size=256\)"):
        train.run(config)
    assert not (tmp_path / "run").exists()
    config = {**train.default_config(), **config}
    assert train.run_steps(config) == 10  # what a sweep checks before its first run
    with pytest.raises(ValueError, match="no update would run"):
        train.check_callbacks(config, 10)
    train.check_callbacks({**config, "update_every": update_every - 1 - 3 * (method == "gmp")},
                          10)


def test_train_size_is_the_loaded_training_split():
    _, _, _, info = data.load("digits", 100)
    assert data.train_size("digits") == info["train_size"]
    assert info["steps_per_epoch"] == data.steps_per_epoch(info["train_size"], 100)
    assert data.steps_per_epoch(info["train_size"], 100, drop_remainder=True) == \
        info["train_size"] // 100
    assert data.train_size("mnist", data_dir="/nonexistent") is None  # (not prepared here)


def test_a_model_that_does_not_fit_the_dataset_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"--model=conv_cifar10 cannot be built for "
                                         r"--dataset=digits \(examples of shape \(8, 8, 1\)\): "
                                         r".*MaxPooling2D.*zero or negative"):
        train.run({**DIGITS, "output_dir": str(tmp_path), "model": "conv_cifar10"})


def test_nesterov_without_momentum_is_refused_by_validate():
    config = {**train.default_config(), "momentum": 0.0}
    assert config["nesterov"]
    with pytest.raises(ValueError, match=r"--momentum=0.0 with --nesterov.*--nonesterov"):
        train.validate(config)
    train.validate({**config, "nesterov": False})


def test_momentum_growth_without_momentum_is_refused_by_validate_first():
    # (it asked for --nonesterov first, then the fit refused the growth rule)
    config = {**train.default_config(), "method": "dst", "grow": "momentum", "momentum": 0.0}
    for nesterov in (True, False):
        with pytest.raises(ValueError, match=r"--grow=momentum grows where the optimizer's "
                                             r"momentum is largest; --momentum=0.0 keeps none"):
            train.validate({**config, "nesterov": nesterov})
    train.validate({**config, "grow": "gradient", "nesterov": False})


def test_an_nm_pattern_with_another_density_is_refused_by_validate():
    config = {**train.default_config(), "method": "dst", "pattern": "2:4"}
    with pytest.raises(ValueError, match=r"--density: pattern '2:4' has density 2/4"):
        train.validate({**config, "density": 0.1})
    train.validate({**config, "density": 0.5})


@pytest.mark.parametrize("argv, density", [
    (["--pattern", "2:4"], 0.5),              # left out: the pattern's N/M
    (["--pattern", "1:8"], 0.125),
    (["--pattern", "1x4"], 0.1),              # not N:M: the flag's default
    (["--pattern", "2:4", "--density", "0.3"], 0.3),  # given: kept, and refused below
])
def test_a_command_line_without_density_takes_an_nm_patterns_own(argv, density):
    fv = flags.FlagValues()
    train.define_flags(fv)
    parse_flags(["prog", *argv], fv)
    config = train.config_from_flags(fv)
    assert config["density"] == density
    if density == 0.3:
        with pytest.raises(ValueError, match=r"--density: pattern '2:4' has density 2/4"):
            train.validate({**train.default_config(), **config})
    else:
        train.validate({**train.default_config(), **config})


def test_a_litert_export_without_the_runtime_is_refused_before_training(monkeypatch):
    monkeypatch.setattr(train.importlib.util, "find_spec",
                        lambda name, *a: None if name == "ai_edge_litert" else object())
    with pytest.raises(ValueError, match=r"--export=litert .* LiteRT runtime, which is not "
                                         r"installed: python3 -m pip install \"\.\[litert\]\""):
        train.validate({**train.default_config(), "export": "litert"})


# -- sweep.py and plot.py ------------------------------------------------------------

def _csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_sweep_resumes_after_interruption(tmp_path):
    base = dict(DIGITS)
    runs = sweep.grid(["static", "dst"], ["magnitude"], ["random"], [0.2], [1])
    assert len(runs) == 2
    path = str(tmp_path / "sweep.csv")
    calls = []

    def interrupted_on_second(config):
        calls.append(config)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return train.run(config)

    with pytest.raises(KeyboardInterrupt):
        sweep.sweep(base, runs, path, run_fn=interrupted_on_second, print_fn=lambda *_: None)
    rows = _csv_rows(path)
    assert [r["method"] for r in rows] == ["static"]

    calls.clear()
    counted = lambda config: calls.append(config) or train.run(config)  # noqa: E731
    assert sweep.sweep(base, runs, path, run_fn=counted, print_fn=lambda *_: None) == (1, [])
    assert [c["method"] for c in calls] == ["dst"]
    assert sweep.sweep(base, runs, path, run_fn=counted, print_fn=lambda *_: None) == (0, [])
    rows = _csv_rows(path)
    assert [r["method"] for r in rows] == ["static", "dst"]
    assert len({r["key"] for r in rows}) == 2 and set(sweep.COLUMNS) == set(rows[0])
    assert float(rows[1]["actual_density"]) == pytest.approx(0.2, abs=1e-3)


def test_a_run_that_refuses_its_config_in_process_names_the_run(tmp_path):
    """(was a traceback from the middle of the sweep)"""
    runs = sweep.grid(["dense"], ["magnitude"], ["random"], [0.2], [1])

    def refused(config):
        raise ValueError("--model=conv_cifar10 cannot be built for --dataset=digits")

    with pytest.raises(ValueError, match=r"^run 1/1 \(dense_s1_\w+\): --model=conv_cifar10"):
        sweep.sweep(dict(DIGITS), runs, str(tmp_path / "s.csv"), run_fn=refused,
                    print_fn=lambda *_: None)


@pytest.mark.slow  # two fresh Python processes
def test_sweep_in_subprocesses_survives_a_crashed_run(tmp_path, monkeypatch):
    base = dict(DIGITS)
    runs = sweep.grid(["static"], ["magnitude"], ["random"], [0.2, 0.3], [1])
    monkeypatch.chdir(tmp_path)  # a relative path: the runs' processes work here too
    path = os.path.join("rel", "sweep.csv")
    messages, started = [], []

    def first_crashes(config):  # a value the run's own check trips on (TypeError): status 1
        started.append(config)
        return sweep.run_in_subprocess({**config, "epochs": "x"} if len(started) == 1 else config)

    executed, failed = sweep.sweep(base, runs, path, run_fn=first_crashes,
                                   print_fn=messages.append)
    assert executed == 2 and len(failed) == 1 and failed[0].startswith("static_")
    assert any("FAILED" in m for m in messages)
    assert (tmp_path / "rel" / "sweep_runs").is_dir() and not (ROOT / "rel").exists()
    rows = _csv_rows(path)
    assert [float(r["density"]) for r in rows] == [0.3]  # the crashed run left no row
    assert float(rows[0]["actual_density"]) == pytest.approx(0.3, abs=1e-3)


def test_a_run_that_refuses_its_config_in_its_own_process_stops_the_sweep(tmp_path):
    """(it was reported as a crash, with a traceback, and the sweep went on to refuse the
    same way in every run like it)"""
    runs = sweep.grid(["static"], ["magnitude"], ["random"], [0.2, 0.3], [1])
    with pytest.raises(ValueError, match=r"^run 1/2 \(static_.*\): --epochs=-1: must be >= 1"):
        sweep.sweep({**DIGITS, "epochs": -1}, runs, str(tmp_path / "s.csv"),
                    run_fn=sweep.run_in_subprocess, print_fn=lambda m: None)
    assert not (tmp_path / "s.csv").exists()


@pytest.mark.parametrize("argv,match", [
    (["--seeds", "1,1"], r"--seeds repeats 1$"),
    (["--densities", "0.1,0.10"], r"--densities repeats 0.1$"),
    # a callback's own argument check, for every run before the first
    (["--methods", "dense,dst", "--prune", "magnitude", "--grow", "random,gradient",
      "--nogrow_exact"],
     r"^dst_magnitude_gradient_.*grow_exact=False"),
    # a flag no run of the grid reads
    (["--methods", "dense,static", "--depth", "16"], r"--depth=16 is not used by any run of "
                                                     r"this sweep: it applies to --model wide_resnet"),
    (["--methods", "static", "--schedule", "linear"], r"--schedule=linear is not used by any run"),
    (["--methods", "dense,static", "--prune", "snip"], r"--prune=snip is not used by any run .* "
                                                       r"--method dst"),
    # a run that would reach no update (checked with the dataset's batches per epoch)
    (["--methods", "dense,static,gmp,dst", "--epochs", "1"],
     r"^gmp_.*--method=gmp: no update would run: --update_every=50 is past the run's 40 "
     r"steps \(gmp prunes during the first 75% of them\)"),
    (["--methods", "dst", "--epochs", "1", "--update_every", "41"],
     r"^dst_.*--method=dst: no update would run: --update_every=41 is past the run's 40 steps"),
    # the outputs' places
    (["--csv", "."], r"--csv=\.: it is a directory, not a file"),
    (["--csv", os.path.join(__file__, "s.csv")], r"--csv=.*s\.csv: .*test_examples\.py is a file"),
    (["--csv", "s.csv", "--runs_dir", os.path.join(__file__, "r")],
     r"--runs_dir=.*: .*test_examples\.py is a file"),
])
def test_a_sweep_refuses_before_its_first_run(argv, match):
    fv = flags.FlagValues()
    sweep.define_flags(fv)
    parse_flags(["sweep.py", *argv], fv)
    with pytest.raises(ValueError, match=match):
        sweep.plan(fv)


def test_sweep_keys():
    config = {**train.default_config(), "method": "dense"}
    assert sweep.run_key(config) == sweep.run_key({**config, "prune": "snip", "density": 0.3,
                                                   "output_dir": "elsewhere"})
    assert sweep.run_key(config) != sweep.run_key({**config, "epochs": 3})
    dst = {**config, "method": "dst"}
    assert sweep.run_key(dst) != sweep.run_key({**dst, "prune": "snip"})
    # settings a method uses are in its key: gmp's period (a gmp run with another
    # --update_every was skipped as done), the overlap callback's schedule
    gmp = {**config, "method": "gmp"}
    assert sweep.run_key(gmp) != sweep.run_key({**gmp, "update_every": 1})
    assert sweep.run_key(gmp) == sweep.run_key({**gmp, "prune": "snip", "prune_rate": 0.1})
    static = {**config, "method": "static"}
    assert sweep.run_key(static) == sweep.run_key({**static, "update_every": 1})
    overlap = {**static, "overlap": ["magnitude", "snip"]}
    for key, value in (("update_every", 1), ("prune_rate", 0.1), ("schedule", "constant")):
        assert sweep.run_key(overlap) != sweep.run_key({**overlap, key: value})
    runs = sweep.grid(["dense", "static", "dst"], ["magnitude", "snip"], ["random", "gradient"],
                      [0.1, 0.2], [1, 2])
    assert len(runs) == 2 + 2 * 2 + 2 * 2 * 2 * 2
    with pytest.raises(ValueError, match="criteria"):
        sweep.parse_grid(["dst"], ["nope"], ["random"], ["0.1"], ["1"])
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        sweep.parse_grid(["dst"], ["magnitude"], ["random"], ["2"], ["1"])


def _fake_sweep_csv(path):
    rng = np.random.default_rng(0)
    rows = [dict(method="dense", prune="", grow="", density=1.0, seed=s) for s in (1, 2)]
    rows += [dict(method="static", prune="", grow="", density=d, seed=s)
             for d in (0.05, 0.1, 0.2) for s in (1, 2)]
    rows += [dict(method="dst", prune=p, grow=g, density=d, seed=s)
             for p in ("magnitude", "snip") for g in ("random", "gradient")
             for d in (0.05, 0.1, 0.2) for s in (1, 2)]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sweep.COLUMNS)
        writer.writeheader()
        for i, row in enumerate(rows):
            acc = 0.9 - 0.1 * (row["method"] == "static") + 0.01 * rng.normal()
            writer.writerow({**{c: "" for c in sweep.COLUMNS}, **row, "key": str(i),
                             "model": "mlp_digits", "dataset": "digits", "epochs": 1,
                             "final_test_accuracy": acc, "best_val_test_accuracy": acc,
                             "best_val_accuracy": acc, "actual_density": row["density"]})


def test_plot_figure1_and_overlap(tmp_path):
    _fake_sweep_csv(tmp_path / "sweep.csv")
    paths = plot.plot_figure1(str(tmp_path / "sweep.csv"), str(tmp_path / "fig1"))
    assert [pathlib.Path(p).suffix for p in paths] == [".png", ".pdf"]
    assert all(os.path.getsize(p) > 1000 for p in paths)
    paths = plot.plot_figure1(str(tmp_path / "sweep.csv"), str(tmp_path / "zoom"), ymin=0.85)
    assert all(os.path.getsize(p) > 1000 for p in paths)
    table = plot.summary_table(str(tmp_path / "sweep.csv")).splitlines()
    assert table[0].endswith("| d=0.05 | d=0.1 | d=0.2 | d=1 |")
    assert len(table) == 2 + 1 + 1 + 2 * 2  # header, dense, static, criteria x growths
    assert "(2)" in table[-1] and " ± " in table[-1]
    overlap = {"names": ["magnitude", "snip", "set"],
               "matrix": [[1.0, 0.4, 0.7], [0.4, 1.0, 0.3], [0.7, 0.3, 1.0]]}
    (tmp_path / "overlap.json").write_text(json.dumps(overlap))
    paths = plot.plot_overlap(str(tmp_path / "overlap.json"), str(tmp_path / "overlap"))
    assert all(os.path.getsize(p) > 1000 for p in paths)
    with pytest.raises(ValueError, match="matrix"):
        plot.plot_overlap({"names": ["a"], "matrix": [[1, 0]]}, str(tmp_path / "bad"))


def test_figure1_and_its_table_keep_the_patterns_of_a_csv_apart(tmp_path, monkeypatch):
    """A sweep CSV holding runs of two patterns (sweep.py run with two --pattern values)
    gives one curve and one table row per pattern, not their pooled mean."""
    rows = [dict(method="dense", prune="", grow="", density=1.0, seed=1, pattern="")]
    rows += [dict(method=m, prune=p, grow=g, density=d, seed=s, pattern=pattern)
             for m, p, g in (("static", "", ""), ("dst", "magnitude", "gradient"))
             for pattern in ("unstructured", "1x4") for d in (0.1, 0.2) for s in (1, 2)]
    path = tmp_path / "sweep.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sweep.COLUMNS)
        writer.writeheader()
        for i, row in enumerate(rows):
            acc = 0.5 if row["pattern"] == "1x4" else 0.9
            writer.writerow({**{c: "" for c in sweep.COLUMNS}, **row, "key": str(i),
                             "model": "mlp_digits", "dataset": "digits", "epochs": 1,
                             "final_test_accuracy": acc, "best_val_test_accuracy": acc,
                             "best_val_accuracy": acc, "actual_density": row["density"]})
    table = plot.summary_table(str(path)).splitlines()
    assert table[0].startswith("| setup | method | growth | criterion | pattern | d=0.1 |")
    cells = {tuple(c.strip() for c in line.split("|")[2:6]): line for line in table[2:]}
    assert "0.5000 ± 0.0000 (2)" in cells[("dst", "gradient", "magnitude", "1x4")]
    assert "0.9000 ± 0.0000 (2)" in cells[("dst", "gradient", "magnitude", "unstructured")]
    assert "0.5000 ± 0.0000 (2)" in cells[("static", "", "", "1x4")]
    assert not any("0.7000" in line for line in table)  # nothing pooled
    drawn = {}
    real_curve = plot._curve
    monkeypatch.setattr(plot, "_curve", lambda ax, stats, label, ymin=None, **style: (
        drawn.__setitem__(label, stats), real_curve(ax, stats, label, ymin, **style)))
    plot.plot_figure1(str(path), str(tmp_path / "fig1"))
    assert sorted(drawn) == ["magnitude [1x4]", "magnitude [unstructured]", "static [1x4]",
                             "static [unstructured]"]
    assert drawn["magnitude [1x4]"][0.1] == (0.5, 0.0)
    assert drawn["static [unstructured]"][0.2] == (0.9, 0.0)


# -- flags ----------------------------------------------------------------------------

BAD_TRAIN_FLAGS = {
    "model": ["--model", "nope"],
    "dataset": ["--dataset", "nope"],
    "method": ["--method", "nope"],
    "prune": ["--prune", "nope"],
    "grow": ["--grow", "nope"],
    "density_zero": ["--density", "0"],
    "density_big": ["--density", "1.5"],
    "epochs": ["--epochs", "0"],
    "prune_rate": ["--prune_rate", "2"],
    "not_a_number": ["--lr", "fast"],
    "unknown_flag": ["--learning_rate", "0.1"],
    "export": ["--export", "onnx"],
    "momentum": ["--momentum", "-1"],
    "seed": ["--seed", "4294967296"],
}


def _flag_error(define, argv):
    """The exit message of parsing `argv` with the flags of `define` (fresh FlagValues)."""
    fv = flags.FlagValues()
    define(fv)
    with pytest.raises(SystemExit) as exit_info:
        parse_flags(["prog", *argv], fv)
    return str(exit_info.value.code)


@pytest.mark.parametrize("case", sorted(BAD_TRAIN_FLAGS))
def test_bad_train_flags_are_one_line_errors(case):
    message = _flag_error(train.define_flags, BAD_TRAIN_FLAGS[case])
    assert message.startswith("error:") and "\n" not in message


def test_flags_parse_into_a_valid_config():
    fv = flags.FlagValues()
    train.define_flags(fv)
    parse_flags(["prog", "--density", "0.3", "--nonesterov", "--method", "static"], fv)
    config = train.config_from_flags(fv)
    assert config == {**train.default_config(), "density": 0.3, "nesterov": False,
                      "method": "static"}
    train.validate(config)
    help_text = fv.get_help()
    for _, name, *_ in train.FLAG_SPECS:
        assert name in help_text


@pytest.mark.parametrize("argv,match", [
    (["--method", "dense", "--density", "0.05"], r"--density=0.05 is not used .* static, dst or gmp"),
    (["--method", "static", "--prune", "snip"], r"--prune=snip .* --method dst$"),
    (["--method", "gmp", "--schedule", "linear"], r"--schedule=linear .* --method dst or --overlap"),
    (["--method", "dense", "--update_every", "10"], r"--update_every=10 .* dst or gmp, or --overlap"),
    (["--tpu", "my-tpu"], r"--tpu=my-tpu .* --strategy tpu"),
    (["--width", "4"], r"--width=4 .* --model wide_resnet"),
    (["--pattern", "2:4", "--distribution", "er"], r"--distribution=er .* without an N:M"),
    (["--grow", "gradient", "--grow_exact"], r"--grow_exact is not used .* with --grow random"),
    (["--data_dir", "/tmp/x"], r"--data_dir=/tmp/x .* the TFDS datasets and higgs"),
])
def test_a_flag_the_run_would_ignore_is_refused(argv, match):
    """(`--method dense --density 0.05` trained a dense model without a word)"""
    fv = flags.FlagValues()
    train.define_flags(fv)
    parse_flags(["prog", *argv], fv)
    with pytest.raises(ValueError, match=match):
        train.check_given_flags_apply({**train.default_config(), **train.config_from_flags(fv)}, fv)


@pytest.mark.parametrize("name,value,match", [
    ("depth", 15, r"must be 0 .* or 6n \+ 4"),
    ("width", -2, r"must be >= 0"),
])
def test_wide_resnet_shape_flags_are_checked_before_the_model(name, value, match):
    """(the error blamed the dataset: "cannot be built for --dataset=digits")"""
    fv = flags.FlagValues()
    train.define_flags(fv)
    with pytest.raises(SystemExit, match=f"--{name} {match}"):
        parse_flags(["prog", "--model", "wide_resnet", f"--{name}", str(value)], fv)
    with pytest.raises(ValueError, match=f"--{name}={value}: {match}"):
        train.validate({**train.default_config(), "model": "wide_resnet", name: value})


@pytest.mark.parametrize("argv", [
    ["--method", "static", "--overlap", "magnitude,snip", "--prune_rate", "0.3", "--schedule",
     "linear", "--update_every", "10", "--density", "0.2"],
    ["--method", "gmp", "--update_every", "10", "--density", "0.2"],
    ["--model", "wide_resnet", "--width", "4", "--depth", "10"],
    ["--dataset", "higgs", "--data_dir", "/tmp/x"],
    ["--pattern", "1x4", "--distribution", "er", "--grow", "random", "--nogrow_exact"],
    ["--prune", "snip", "--grow", "gradient", "--scope", "global"],
    ["--method", "dense"],  # defaults of flags it ignores are not "given"
])
def test_flags_the_run_reads_are_accepted(argv):
    fv = flags.FlagValues()
    train.define_flags(fv)
    parse_flags(["prog", *argv], fv)
    train.check_given_flags_apply({**train.default_config(), **train.config_from_flags(fv)}, fv)


def test_stray_arguments_are_one_line_errors():
    with pytest.raises(SystemExit, match="^error: unexpected arguments"):
        train.main(["train.py", "oops"])
    with pytest.raises(SystemExit, match="^error: unexpected arguments"):
        sweep.main(["sweep.py", "oops"])


@pytest.mark.parametrize("argv,match", [
    (["--densities", "0.1,2"], r"\(0, 1\]"),
    (["--prune", "magnitude,nope"], "criteria"),
    (["--methods", "dst,sparse"], "methods"),
    (["--seeds", "one"], "ints"),
])
def test_bad_sweep_flags_are_value_errors(argv, match):
    fv = flags.FlagValues()
    sweep.define_flags(fv)
    parse_flags(["sweep.py", *argv], fv)
    with pytest.raises(ValueError, match=match):
        sweep.plan(fv)


def test_sweep_takes_a_pattern_in_any_spelling_and_leaves_the_dense_baseline_without():
    """`--pattern 1X4` ran under another key than `1x4` (a redone run, two rows in the
    pattern table); a pattern with the default --methods (dense among them) was refused,
    naming a --method flag the sweep does not have."""
    fv = flags.FlagValues()
    sweep.define_flags(fv)
    parse_flags(["sweep.py", "--pattern", "1X4", "--methods", "dense,static,dst"], fv)
    base, runs = sweep.plan(fv)
    assert base["pattern"] == "1x4"
    assert {r["method"] for r in runs if r.get("pattern") == "unstructured"} == {"dense"}
    spelled = {**train.default_config(), **base, **runs[-1]}
    assert sweep.run_key(spelled) == sweep.run_key({**spelled, "pattern": "1x4"})
    fv = flags.FlagValues()
    sweep.define_flags(fv)
    parse_flags(["sweep.py", "--pattern", "2:4", "--methods", "gmp,dst"], fv)
    with pytest.raises(ValueError, match=r"--pattern=2:4: gmp prunes unstructured; leave gmp out "
                                         r"of --methods"):
        sweep.plan(fv)


def test_train_names_a_bad_pattern_and_an_output_dir_that_is_a_file(tmp_path):
    with pytest.raises(ValueError, match=r"^--pattern=1x1: Unknown sparsity pattern"):
        train.validate({**train.default_config(), "method": "dst", "pattern": "1x1"})
    afile = tmp_path / "afile"
    afile.write_text("")
    for path, where in ((afile, "it"), (afile / "sub", str(afile))):
        with pytest.raises(ValueError, match=rf"^--output_dir={re.escape(str(path))}: "
                                             rf"{re.escape(where)} is a file, not a directory"):
            train.validate({**train.default_config(), "output_dir": str(path)})


def test_a_run_into_an_earlier_runs_directory_removes_what_would_mix(tmp_path, capsys):
    """A second run into one --output_dir left the first's TensorBoard events (two runs'
    curves in one plot) and exports (beside a results.json without an export)."""
    out = tmp_path / "run"
    (out / "tb" / "train").mkdir(parents=True)
    (out / "model.tflite").write_text("old")
    (out / "notes.txt").write_text("mine")
    assert train._output_dir({**train.default_config(), "output_dir": str(out)}) == str(out)
    assert sorted(os.listdir(out)) == ["model.tflite", "notes.txt", "tb"]  # (at fit's start)
    train.PrepareOutputDir(str(out)).on_train_begin()
    assert sorted(os.listdir(out)) == ["notes.txt"]
    assert "removed ['tb', 'model.tflite']" in capsys.readouterr().out


def test_the_export_report_says_slower_where_the_sparse_export_is_slower():
    """(0.80 was printed as "0.80 x faster")"""
    assert deploy._speed_words(1.5) == "1.50 x faster"
    assert deploy._speed_words(0.8) == "1.25 x slower"


def test_a_refused_run_leaves_an_earlier_runs_outputs_as_they_were(tmp_path):
    """A model that cannot be built for the dataset was refused after the earlier run's
    TensorBoard logs and overlap.json had been removed."""
    out = tmp_path / "run"
    (out / "tb").mkdir(parents=True)
    (out / "overlap.json").write_text("{}")
    with pytest.raises(ValueError, match=r"--model=conv_cifar10 cannot be built for --dataset=digits"):
        train.run({**DIGITS, "model": "conv_cifar10", "output_dir": str(out)})
    assert sorted(os.listdir(out)) == ["overlap.json", "tb"]
    # refused by a callback's argument check, and by the config's check (momentum growth
    # needs an optimizer with momentum)
    with pytest.raises(ValueError, match=r"grow_exact=False"):
        train.run({**DIGITS, "grow": "gradient", "grow_exact": False, "output_dir": str(out)})
    with pytest.raises(ValueError, match=r"--momentum=0.0 keeps none"):
        train.run({**DIGITS, "grow": "momentum", "momentum": 0.0, "nesterov": False,
                   "output_dir": str(out)})
    assert sorted(os.listdir(out)) == ["overlap.json", "tb"]


# -- command lines (run concurrently: each one imports TensorFlow) --------------------

CLI_BAD_FLAGS = {"model": ["--model", "nope"], "density": ["--density", "1.5"]}
# The commands each test reads (a callable gets the test's parameters).
CLI_COMMANDS = {
    "test_bad_flags_exit_with_one_line_error": lambda params: [f"bad_{params['case']}"],
    "test_helpfull_documents_every_flag": lambda params: ["helpfull"],
    "test_train_command_line": lambda params: ["train"],
    "test_sweep_and_plot_command_lines": lambda params: ["sweep_dry", "plot"],
}


def _selected_commands(session, every):
    """Commands of the `cli` tests this session runs (`-m`, `-k` and paths applied);
    `every` if one of them is not in CLI_COMMANDS."""
    needed = set()
    for item in session.items:
        if "cli" not in getattr(item, "fixturenames", ()):
            continue
        name = getattr(item, "originalname", item.name)
        if name not in CLI_COMMANDS:
            return set(every)
        callspec = getattr(item, "callspec", None)
        needed.update(CLI_COMMANDS[name](callspec.params if callspec else {}))
    return needed


@pytest.fixture(scope="module")
def cli(request, tmp_path_factory):
    """Runs the command lines the session's tests read, all at once; returns
    {name: CompletedProcess}. The tests that read it are in one `xdist_group` so that
    under pytest-xdist's ``--dist loadgroup`` one worker runs the commands, once."""
    tmp = tmp_path_factory.mktemp("cli")
    _fake_sweep_csv(tmp / "sweep.csv")
    script = lambda name: [sys.executable, str(ROOT / "examples" / name)]  # noqa: E731
    commands = {f"bad_{k}": script("train.py") + v for k, v in CLI_BAD_FLAGS.items()}
    commands.update({
        "helpfull": script("train.py") + ["--helpfull"],
        "train": script("train.py") + ["--epochs", "2", "--batch_size", "256",
                                       "--update_every", "5", "--output_dir", str(tmp / "run")],
        "sweep_dry": script("sweep.py") + ["--methods", "dense,dst", "--prune", "magnitude",
                                           "--grow", "random,gradient", "--densities", "0.1",
                                           "--seeds", "1,2", "--dry_run",
                                           "--csv", str(tmp / "none.csv"), "--epochs", "3"],
        "plot": script("plot.py") + ["--csv", str(tmp / "sweep.csv"), "--out",
                                     str(tmp / "fig")],
    })
    needed = _selected_commands(request.session, commands)
    commands = {k: c for k, c in commands.items() if k in needed}
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    procs = {k: subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env=env, cwd=str(tmp)) for k, c in commands.items()}
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        results[name] = subprocess.CompletedProcess(commands[name], proc.returncode, out, err)
    results["tmp"] = tmp
    return results


# --density 1.5 is the same exit path as --model nope (a flag validator); both are also
# checked in-process in test_bad_train_flags_are_one_line_errors.
@pytest.mark.parametrize("case", [
    pytest.param(c, marks=pytest.mark.slow if c == "density" else ()) for c in sorted(CLI_BAD_FLAGS)])
@pytest.mark.xdist_group("cli")
def test_bad_flags_exit_with_one_line_error(cli, case):
    proc = cli[f"bad_{case}"]
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr


@pytest.mark.slow  # the flags' help text is checked in-process in test_flags_parse_into_...
@pytest.mark.xdist_group("cli")
def test_helpfull_documents_every_flag(cli):
    text = cli["helpfull"].stdout + cli["helpfull"].stderr
    for _, name, *_ in train.FLAG_SPECS:
        assert f"--{name}" in text or f"--[no]{name}" in text, name


@pytest.mark.xdist_group("cli")
def test_train_command_line(cli):
    proc = cli["train"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "final epoch" in proc.stdout and "best-val model" in proc.stdout
    results = json.loads((cli["tmp"] / "run" / "results.json").read_text())
    assert results["config"]["epochs"] == 2 and results["steps"] == 10


@pytest.mark.xdist_group("cli")
def test_sweep_and_plot_command_lines(cli):
    dry = cli["sweep_dry"]
    assert dry.returncode == 0, dry.stderr[-3000:]
    todo = [line for line in dry.stdout.splitlines() if line.startswith("todo")]
    assert len(todo) == 2 + 2 * 2
    assert cli["plot"].returncode == 0, cli["plot"].stderr[-3000:]
    assert (cli["tmp"] / "fig.png").exists() and (cli["tmp"] / "fig.pdf").exists()


@pytest.mark.slow
def test_default_command_runs_dst_on_digits(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "train.py"), "--verbose",
                           "2"], capture_output=True, text=True, cwd=str(tmp_path),
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "runs").glob("*/results.json"))
    results = json.loads(runs[0].read_text())
    assert results["config"]["method"] == "dst" and results["steps"] == 1200
    assert results["final_test_accuracy"] > 0.85
