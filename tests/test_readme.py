"""The README's Python blocks run as written.

Each block leaves some names to the reader (`model`, `x`, `y`, `x_test`, ...); a test
here gives it small stand-ins, runs the block's text unchanged in a fresh namespace and
checks what its comments promise. A block with placeholders (``clf.compile(...)``) is a
sketch of a path another test covers (named below); any other new block fails
`test_every_block_is_run_or_is_a_sketch` until a test runs it.
"""

import pathlib
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_dst
from keras_dst import criteria as criteria_lib

from conftest import assert_sparse_invariants, classification_data, mlp, score_inputs

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"

# a marker that names each block, and what runs it
QUICKSTART = "keras_dst.strip(model)                             # ordinary Keras model"
PATTERNS = 'pattern_overrides={"conv1": "unstructured"}'
CRITERION = '@keras_dst.register_criterion("weight_times_grad"'
DEPLOY = 'keras_dst.export(model, "model.tflite")'
SKETCHES = {"keras_hub.models.BertTextClassifier": "tests/test_hub.py::test_bert_text_classifier"}


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def block(marker):
    found = [text for text in python_blocks() if marker in text]
    assert len(found) == 1, f"{len(found)} README blocks hold {marker!r}"
    return found[0]


def run(text, **names):
    namespace = {"keras": keras, "keras_dst": keras_dst, "tf": tf, "np": np, **names}
    exec(compile(text, str(README), "exec"), namespace)
    return namespace


def test_every_block_is_run_or_is_a_sketch():
    markers = (QUICKSTART, PATTERNS, CRITERION, DEPLOY, *SKETCHES)
    for text in python_blocks():
        assert sum(marker in text for marker in markers) == 1, f"no test runs this README block:\n{text}"
        if any(marker in text for marker in SKETCHES):
            assert "(...)" in text  # a sketch, run for real by the test SKETCHES names


def classifier(seed=0):
    """The quick start's `model`: a softmax classifier for `classification_data`."""
    model = mlp(seed=seed)
    outputs = keras.layers.Softmax()(model.output)
    return keras.Model(model.input, outputs)


def test_quickstart(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # it writes log.csv
    x, y = classification_data(n=32)  # one step per epoch: 100 steps
    ns = run(block(QUICKSTART), model=classifier(), x=x, y=y)
    model, plain = ns["model"], ns["plain"]
    assert_sparse_invariants(model)
    assert keras_dst.density(model) == pytest.approx(0.1, abs=0.01)
    assert int(model.optimizer.iterations.numpy()) == 100
    header = (tmp_path / "log.csv").read_text().splitlines()[0].split(",")
    assert {"density", "itop", "loss"} <= set(header)  # "sees density, itop, ..."
    assert not any(isinstance(layer, keras_dst.SparseWrapper) for layer in plain.layers)
    np.testing.assert_allclose(plain.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)


def conv_net(seed=0):
    """A model whose first convolution, named conv1, reads 3 input channels."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(16, 3, name="conv1", activation="relu")(inputs)
    h = keras.layers.Conv2D(16, 3, name="conv2", activation="relu")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inputs, keras.layers.Dense(4, name="head")(h))


def test_patterns(capsys):
    model = run(block(PATTERNS), model=conv_net())["model"]
    pattern_of = {line.split()[0]: line.split(")")[1].split()[0]  # the column after the shape
                  for line in capsys.readouterr().out.splitlines() if ")" in line}
    assert pattern_of == {"conv1": "unstructured", "conv2": "1x4", "head": "1x4"}  # "shows each pattern"
    assert keras_dst.density(model) == pytest.approx(0.1, abs=0.01)
    assert_sparse_invariants(model)  # every 1x4 block whole


def test_a_criterion_added_as_the_readme_shows_trains():
    try:
        ns = run(block(CRITERION))
        assert "weight_times_grad" in keras_dst.criterion_names()
        model = keras_dst.prunable(mlp(), density=0.3)
        model.compile(keras.optimizers.SGD(0.05), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      jit_compile=True)
        before = keras_dst.masks(model)
        x, y = classification_data(n=64)
        history = model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[
            keras_dst.DynamicSparseTraining(prune="weight_times_grad", grow="gradient", update_every=2)])
        assert history.history["pruned"][-1] > 0
        assert any((before[path] != mask).any() for path, mask in keras_dst.masks(model).items())
        assert_sparse_invariants(model)
        scores = ns["weight_times_grad"](score_inputs(weight=[[1.0, -2.0]], gradient=[[3.0, 0.5]]))
        np.testing.assert_allclose(scores.numpy(), [[3.0, 1.0]])  # |weight * gradient|
    finally:
        criteria_lib._CRITERIA.unregister("weight_times_grad")


def test_deploy(tmp_path, monkeypatch, capsys):
    pytest.importorskip("ai_edge_litert", reason='needs pip install "keras-dst[litert]"')
    monkeypatch.chdir(tmp_path)  # it writes model.tflite, model_int8.tflite, serving/
    x_train, _ = classification_data(n=256)
    x_test, _ = classification_data(n=32, seed=1)
    model = keras_dst.prunable(classifier(), density=0.2, pattern="1x4")
    ns = run(block(DEPLOY), model=model, x_train=x_train, x_test=x_test)
    assert "model.tflite" in capsys.readouterr().out  # print(report)
    expected = keras_dst.strip(model).predict(x_test, verbose=0)
    np.testing.assert_allclose(ns["probabilities"], expected, atol=1e-5)  # "= strip(model).predict"
    assert (tmp_path / "model_int8.tflite").stat().st_size > 0
    assert (tmp_path / "serving" / "saved_model.pb").exists()
