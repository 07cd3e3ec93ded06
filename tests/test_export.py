"""keras_dst.export: LiteRT / SavedModel exports compute what `strip(model)` computes, and the
report says truthfully (read back from the .tflite flatbuffer) what the converter stored sparse.

Tests that run an export need the LiteRT runtime (``pip install "keras-dst[litert]"``) and skip
without it; conversion-only tests (the report, the errors) need TensorFlow alone.
"""

import os
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_dst
from keras_dst import compat
from keras_dst.export import LiteRTModel, _parse, _read_constants

from conftest import all_layers_data, all_layers_model, assert_sparse_invariants

try:
    import ai_edge_litert  # noqa: F401
    HAS_LITERT = True
except ImportError:
    HAS_LITERT = False
needs_litert = pytest.mark.skipif(not HAS_LITERT, reason='needs pip install "keras-dst[litert]"')

FLOAT_TOL = 1e-4
# int8 (README "Deploying a sparse model"): the sparse int8 export computes what the dense
# int8 export computes up to 2 steps of the output's int8 scale (the 1x16 kernel rounds its
# accumulators differently); against the float model, the difference is int8 quantisation's:
# relative RMS error ≤ 0.1 and top-1 agreement ≥ 95 % (random-weight MLPs).
INT8_RMS_TOL, INT8_TOP1 = 0.1, 0.95


def output_step(path):
    """The int8 quantisation step of the tensor the model's DEQUANTIZE output op reads."""
    schema = compat.tflite_schema()
    with open(path, "rb") as f:
        model = _parse(f.read())
    graph = model.subgraphs[0]
    codes = [max(c.builtinCode, c.deprecatedBuiltinCode) for c in model.operatorCodes]
    last = [op for op in graph.operators
            if codes[op.opcodeIndex] == schema.BuiltinOperator.DEQUANTIZE][-1]
    return float(graph.tensors[last.inputs[0]].quantization.scale[0])


def assert_int8_close(got, expected):
    rms = np.sqrt(np.mean((got - expected) ** 2) / np.mean(expected ** 2))
    assert rms <= INT8_RMS_TOL
    assert np.mean(got.argmax(1) == expected.argmax(1)) >= INT8_TOP1


def mlp(sizes=(32, 64, 32, 4), seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((sizes[0],))
    x = inputs
    for i, units in enumerate(sizes[1:-1]):
        x = keras.layers.Dense(units, activation="relu", name=f"fc{i + 1}")(x)
    return keras.Model(inputs, keras.layers.Dense(sizes[-1], name="head")(x))


def conv_net(seed=0):
    keras.utils.set_random_seed(seed)
    L = keras.layers
    inputs = keras.Input((12, 12, 8))
    x = L.Conv2D(16, 3, padding="same", name="conv1")(inputs)
    x = L.BatchNormalization(name="bn")(x)  # folded into conv1 by the converter
    x = L.ReLU()(x)
    x = L.DepthwiseConv2D(3, name="depthwise")(x)
    x = L.Conv2D(16, 1, activation="relu", name="pointwise")(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, L.Dense(4, name="head")(x))


def data(shape, n=16, seed=1):
    return np.random.default_rng(seed).normal(size=(n,) + tuple(shape)).astype("float32")


def sparse(model, pattern="unstructured", density=0.1, **kwargs):
    density = None if ":" in pattern else density
    return keras_dst.prunable(model, density=density, distribution="uniform", pattern=pattern,
                              **kwargs)


def by_weight(report):
    return {w.weight: w for w in report.weights}


def assert_same_outputs(report, model, x, tol=FLOAT_TOL):
    expected = keras_dst.strip(model).predict(x, verbose=0)
    got = report.load().predict(x)
    assert np.max(np.abs(got - expected)) <= tol
    return got, expected


# --------------------------------------------------------------------------- #
# Patterns on Dense layers: outputs and storage
# --------------------------------------------------------------------------- #


@needs_litert
@pytest.mark.parametrize("pattern,stored", [
    ("1x4", "sparse (block 1x4)"),
    ("1x16", "sparse (block 1x4)"),  # float32 kernels use 1x4 blocks; 1x16 blocks are 1x4 blocks
    ("unstructured", "densified (CSR)"),
    ("2:4", "densified (CSR)"),
    ("fan_in", "densified (CSR)"),
])
def test_dense_mlp_each_pattern_outputs_equal_strip_and_report(tmp_path, pattern, stored):
    model = sparse(mlp(), pattern)
    report = keras_dst.export(model, tmp_path / "m.tflite", compare_dense=pattern == "1x4")
    assert_same_outputs(report, model, data((32,)))
    assert [w.stored for w in report.weights] == [stored] * 3
    assert all(w.op == "FULLY_CONNECTED" and w.pattern == pattern for w in report.weights)
    if stored.startswith("sparse"):
        assert report.sparse_kernels == 3 and report.densify_ops == 0
        assert all("runs its sparse kernel" in w.why for w in report.weights)
    else:
        assert report.sparse_kernels == 0 and report.densify_ops == 3
        assert all("of its zeros fill such blocks (the converter needs > 90 %)" in w.why
                   and "DENSIFY" in w.why for w in report.weights)
    if pattern == "1x4":  # 10 % of the weights + their block indices, against all of them
        assert report.dense_file_bytes > report.file_bytes
        assert report.size_ratio < 0.3


def test_orientation_tflite_blocks_run_along_the_keras_input_axis(tmp_path):
    """FULLY_CONNECTED stores the kernel transposed ([out, in]) and its 1x4 blocks run along
    dimension 1, the input axis: keras_dst's 1xB axis (kernel axis -2). The decoded sparse
    tensor is exactly kernel.T."""
    model = sparse(mlp((16, 8, 4)), "1x4", density=0.25)
    report = keras_dst.export(model, tmp_path / "m.tflite", compare_dense=False)
    with open(report.path, "rb") as f:
        constants, _ = _read_constants(_parse(f.read()))
    kernels = {t.weight.path: np.where(t.mask.numpy(), t.weight.numpy(), 0)
               for t in keras_dst.sparse_targets(model)}
    blocked = [c for c in constants if c.block == 4]
    assert len(blocked) == 2
    for c in blocked:
        match = [k for k in kernels.values()
                 if k.T.shape == c.shape and np.array_equal(k.T, c.values)]
        assert len(match) == 1, c.name
    assert by_weight(report)["fc1/kernel"].shape == (16, 8)


def test_unstructured_at_very_low_density_is_block_encoded_with_stored_zeros(tmp_path):
    """When >= 90 % of the zeros happen to fill whole 1x4 blocks, the converter block-encodes
    an unstructured weight too (the report says so)."""
    model = sparse(mlp((64, 256, 4)), "unstructured", density=0.02)
    report = keras_dst.export(model, tmp_path / "m.tflite", compare_dense=False)
    row = by_weight(report)["fc1/kernel"]
    assert row.stored == "sparse (block 1x4)" and "zeros inside active blocks" in row.why


def test_1x4_weight_with_active_zeros_says_how_many_and_why(tmp_path):
    """A 1x4 weight whose active entries hold exact zeros (regrown at 0 and given no gradient
    since) has zeros outside whole blocks: the converter densifies it, and the report counts
    those active zeros (not int8 rounding: this export is float32)."""
    model = sparse(mlp((64, 32, 4)), "1x4", density=0.5)
    target = [t for t in keras_dst.sparse_targets(model) if t.weight.path == "fc1/kernel"][0]
    kernel, mask = target.weight.numpy(), target.mask.numpy()
    rows, cols = np.nonzero(mask[::4])  # one entry (the first) of 200 active blocks
    kernel[rows[:200] * 4, cols[:200]] = 0.0  # and 1024 masked zeros: 84 % of the zeros in blocks
    target.weight.assign(kernel)
    report = keras_dst.export(model, tmp_path / "m.tflite", compare_dense=False)
    row = by_weight(report)["fc1/kernel"]
    assert row.stored == "densified (CSR)"
    assert ("only 83.6% of its zeros fill such blocks (the converter needs > 90 %; 200 active weights "
            "are exactly 0, e.g. regrown at 0") in row.why
    assert "int8" not in row.why
    assert by_weight(report)["head/kernel"].stored == "sparse (block 1x4)"


@needs_litert
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("in_place", [False, True])
def test_a_mixed_precision_model_exports_computing_in_float32(tmp_path, policy, in_place):
    """LiteRT has no 16-bit float MatMul/BiasAdd/Relu kernels (the converter refused a
    mixed-precision model): the export computes with the float32 variables in float32, says so,
    and leaves the model's own policies as they were."""
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = sparse(mlp((32, 16, 4)), "1x4", density=0.25, in_place=in_place)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    x = data((32,))
    report = keras_dst.export(model, tmp_path / "m.tflite", compare_dense=False)
    assert any(f"the layers of mixed precision ({policy})" in note for note in report.notes)
    assert [w.stored for w in report.weights] == ["sparse (block 1x4)"] * 2
    assert {layer.dtype_policy.name for layer in model.layers[1:]} == {policy}
    source = model if in_place else keras_dst.strip(model)  # kernels ⊙ masks, float32 variables
    reference = keras.models.clone_model(source, clone_function=lambda layer: layer.__class__.from_config(
        {**layer.get_config(), "dtype": "float32"}))
    for mine, theirs in zip(reference.layers, source.layers):
        values = {v.name: v for v in theirs.weights}  # (attached masks are weights of theirs too)
        for v in mine.weights:
            v.assign(values[v.name])
    assert np.max(np.abs(report.load().predict(x) - reference.predict(x, verbose=0))) <= FLOAT_TOL


# --------------------------------------------------------------------------- #
# Other layer types
# --------------------------------------------------------------------------- #


@needs_litert
def test_conv_net_outputs_equal_and_convolutions_are_densified(tmp_path):
    model = sparse(conv_net(), "unstructured", density=0.2)
    report = keras_dst.export(model, tmp_path / "c.tflite")
    assert_same_outputs(report, model, data((12, 12, 8)))
    rows = by_weight(report)
    for path in ("conv1/kernel", "depthwise/kernel", "pointwise/kernel"):
        assert rows[path].stored == "densified (CSR)", path
        assert "has no sparse kernel" in rows[path].why
    assert "folded BatchNormalization" in rows["conv1/kernel"].why
    assert rows["conv1/kernel"].op == "CONV_2D"
    assert rows["depthwise/kernel"].op == "DEPTHWISE_CONV_2D"
    assert report.file_bytes < report.dense_file_bytes


@needs_litert
@pytest.mark.slow
def test_every_supported_layer_type_outputs_equal_and_is_found(tmp_path):
    model = keras_dst.prunable(all_layers_model(), density=0.2)
    report = keras_dst.export(model, tmp_path / "all.tflite", compare_dense=False)
    x, _ = all_layers_data(8)
    assert_same_outputs(report, model, x)
    rows = by_weight(report)
    assert len(rows) == len(keras_dst.sparse_targets(model))
    assert not [w for w in report.weights if w.stored == "not found"]
    assert rows["embedding/embeddings"].stored == "dense"
    assert rows["embedding/embeddings"].op == "GATHER"
    assert "never compressed" in rows["conv3d/kernel"].why
    assert rows["mha/query/kernel"].op == "FULLY_CONNECTED"
    assert rows["conv2d_transpose/kernel"].op == "TRANSPOSE_CONV"
    # a list of inputs in the Keras model's order, though the signature sorts them by name
    assert report.input_names == ["img", "seq", "vol", "tok"]
    with pytest.raises(ValueError, match=r"different numbers of samples: \{'img': 8, 'seq': 7"):
        report.load().predict([x[0], x[1][:7], x[2], x[3]])


@needs_litert
@pytest.mark.parametrize("as_dict", [False, True])
def test_several_outputs_come_back_as_keras_predict_returns_them(tmp_path, as_dict):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8,))
    hidden = keras.layers.Dense(12, activation="relu", name="hidden")(inputs)
    # 12 outputs (output_10 comes after output_9); as a dict, keys whose sorted order is
    # neither the order of definition nor that of their lengths
    names = ["b", "aa_long"] + [f"h{i}" for i in range(10)]
    heads = [keras.layers.Dense(i + 1, name=name)(hidden) for i, name in enumerate(names)]
    outputs = dict(zip(names, heads)) if as_dict else heads
    model = sparse(keras.Model(inputs, outputs), density=0.5)
    report = keras_dst.export(model, tmp_path / "o.tflite", compare_dense=False)
    x = data((8,), n=5)
    expected, got = keras_dst.strip(model).predict(x, verbose=0), report.load().predict(x)
    assert type(got) is type(expected)
    if as_dict:
        assert sorted(got) == sorted(expected)
        pairs = [(got[name], expected[name]) for name in expected]
    else:
        assert len(got) == len(expected) == 12
        pairs = list(zip(got, expected))
    for g, e in pairs:
        assert g.shape == e.shape and np.max(np.abs(g - e)) <= FLOAT_TOL


@needs_litert
def test_plain_model_without_masks_exports_and_reports_its_zeros(tmp_path):
    model = mlp((16, 8, 4))
    report = keras_dst.export(model, tmp_path / "d.tflite", compare_dense=False)
    assert_same_outputs(report, model, data((16,)))
    assert [w.pattern for w in report.weights] == ["dense"] * 2
    assert all(w.stored == "dense" and "< 30 % zeros" in w.why for w in report.weights)


@needs_litert
def test_subclassed_model_of_prunable_layers_is_exported_as_it_is(tmp_path):
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.fc = keras_dst.prunable(keras.layers.Dense(16, activation="relu"), density=0.1,
                                         pattern="1x4")
            self.head = keras.layers.Dense(3)

        def call(self, x):
            return self.head(self.fc(x))

    keras.utils.set_random_seed(0)
    model = Net()
    x = data((32,))
    expected = model.predict(x, verbose=0)
    report = keras_dst.export(model, tmp_path / "s.tflite", compare_dense=False)
    assert np.max(np.abs(report.load().predict(x) - expected)) <= FLOAT_TOL
    assert [w.stored for w in report.weights] == ["sparse (block 1x4)"]


@needs_litert
@pytest.mark.parametrize("fmt, name", [("litert", "a.tflite"), ("tf_saved_model", "a_saved")])
def test_a_model_with_masks_attached_in_place_keeps_them_after_export(tmp_path, fmt, name):
    # export used strip(), which detaches attached masks in place: the caller's model lost
    # them and trained dense afterwards
    model = keras_dst.prunable(mlp((32, 16, 4)), density=0.25, pattern="1x4", in_place=True)
    masks = keras_dst.masks(model)
    x = data((32,))
    expected = model.predict(x, verbose=0)
    report = keras_dst.export(model, tmp_path / name, format=fmt, compare_dense=False)
    if fmt == "litert":
        assert np.max(np.abs(report.load().predict(x) - expected)) <= FLOAT_TOL
    assert keras_dst.masks(model).keys() == masks.keys()
    for path, mask in keras_dst.masks(model).items():
        np.testing.assert_array_equal(mask, masks[path])
    model.compile(keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(
        from_logits=True), jit_compile=True)
    model.fit(x, np.zeros(len(x), "int32"), epochs=1, verbose=0)
    assert_sparse_invariants(model)
    for path, mask in keras_dst.masks(model).items():
        np.testing.assert_array_equal(mask, masks[path])


@needs_litert
def test_converter_padding_bug_is_repaired(tmp_path):
    """The converter block-encodes a very sparse weight whose input axis is not a multiple of
    4 (here 6) and loses values (wrong outputs, TF 2.21); export stores it dense instead."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    x = keras.layers.Dense(256, name="fc")(inputs)
    model = keras_dst.prunable(keras.Model(inputs, keras.layers.Dense(3, name="head")(x)),
                               distribution={"fc": 0.02, "head": 1.0})
    report = keras_dst.export(model, tmp_path / "p.tflite", compare_dense=False)
    assert_same_outputs(report, model, data((6,), n=64))
    row = by_weight(report)["fc/kernel"]
    assert row.stored == "dense" and "loses values" in row.why


@needs_litert
def test_two_repaired_weights_that_share_the_converters_empty_buffer_keep_their_own(tmp_path):
    """Two all-zero weights with 6 inputs: the converter block-encodes both (the padding bug
    above) into one shared empty buffer; each gets its own dense copy (writing both into that
    buffer broke the export and the file)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((10,))
    x = keras.layers.Dense(6, name="d0")(inputs)
    x = keras.layers.Dense(6, name="d1", bias_initializer="random_normal")(x)
    outputs = keras.layers.Dense(3, name="d2", bias_initializer="random_normal")(x)
    model = keras_dst.prunable(keras.Model(inputs, outputs), density=0.5)
    with pytest.warns(UserWarning, match="'d1/kernel', 'd2/kernel' have no active entry"):
        keras_dst.set_masks(model, {"d1/kernel": np.zeros((6, 6), bool),
                                    "d2/kernel": np.zeros((6, 3), bool)})
    report = keras_dst.export(model, tmp_path / "z.tflite", compare_dense=False)
    assert_same_outputs(report, model, data((10,), n=16))
    rows = by_weight(report)
    assert rows["d1/kernel"].stored == rows["d2/kernel"].stored == "dense"


# --------------------------------------------------------------------------- #
# int8
# --------------------------------------------------------------------------- #


@needs_litert
def test_int8_1x16_runs_sparse_kernels_within_the_documented_tolerance(tmp_path):
    model = sparse(mlp((64, 128, 64, 8)), "1x16")
    calibration = data((64,), n=128, seed=2)
    x = data((64,), n=256)
    dataset = tf.data.Dataset.from_tensor_slices((calibration, np.zeros(128))).batch(16)
    report = keras_dst.export(model, tmp_path / "q.tflite", quantize="int8",
                              representative_data=dataset)
    assert [w.stored for w in report.weights] == ["sparse (block 1x16)"] * 3
    assert report.sparse_kernels == 3 and report.densify_ops == 0
    dense = keras_dst.export(model, tmp_path / "q_dense.tflite", quantize="int8",
                             representative_data=dataset, sparsity=False, compare_dense=False)
    assert all(w.stored == "dense" for w in dense.weights)
    got = report.load().predict(x)
    # the sparse int8 kernel rounds differently from the dense one: at most 2 output steps
    assert np.max(np.abs(got - dense.load().predict(x))) <= 2.01 * output_step(report.path)
    assert_int8_close(got, keras_dst.strip(model).predict(x, verbose=0))
    assert report.file_bytes < dense.file_bytes == report.dense_file_bytes


@needs_litert
def test_int8_with_1x4_blocks_is_densified_and_says_it_needs_1x16(tmp_path):
    model = sparse(mlp((64, 128, 64, 8)), "1x4")
    report = keras_dst.export(model, tmp_path / "q.tflite", quantize="int8",
                              representative_data=data((64,), n=128, seed=2), compare_dense=False)
    assert all(w.stored == "densified (CSR)" and "needs 1x16 blocks" in w.why
               for w in report.weights)
    assert any("XNNPACK" in n for n in report.notes)
    with pytest.warns(UserWarning, match="XNNPACK"):  # XNNPACK refuses int8 + DENSIFY
        runtime = report.load()
    assert not runtime.xnnpack
    x = data((64,), n=256)
    assert_int8_close(runtime.predict(x), keras_dst.strip(model).predict(x, verbose=0))


@needs_litert
def test_int8_calibrates_inputs_whose_names_are_not_identifiers(tmp_path):
    # (the SavedModel signature calls 'img-in' 'img_in', the converter's calibration keeps
    # 'img-in': every form of representative_data failed with KeyError: 'img-in')
    keras.utils.set_random_seed(0)
    a, b = keras.Input((16,), name="img-in"), keras.Input((16,), name="b.x")
    hidden = keras.layers.Dense(16, activation="relu")(keras.layers.Concatenate()([a, b]))
    model = sparse(keras.Model([a, b], keras.layers.Dense(4)(hidden)), "1x16", density=0.5)
    xa, xb = data((16,), n=64, seed=2), data((16,), n=64, seed=3)
    expected = keras_dst.strip(model).predict([xa, xb], verbose=0)
    for calibration in ([xa, xb], {"b.x": xb, "img-in": xa}):
        report = keras_dst.export(model, tmp_path / "q.tflite", quantize="int8",
                                  representative_data=calibration, compare_dense=False)
        assert report.input_names == ["img-in", "b.x"]
        assert_int8_close(report.load().predict([xa, xb]), expected)
    with pytest.raises(ValueError, match=r"keys \['b_x', 'img_in'\] must be the model's input "
                                         r"names \['img-in', 'b.x'\]"):
        keras_dst.export(model, tmp_path / "r.tflite", quantize="int8",
                         representative_data={"b_x": xb, "img_in": xa})


@needs_litert
def test_int8_sequence_model_falls_back_when_xnnpack_refuses_it_at_the_first_invocation(tmp_path):
    """XNNPACK accepts this model when it is allocated and refuses it when it first runs
    (`predict` raised 'failed to delegate FULLY_CONNECTED node'); with xnnpack=None the
    runtime switches to the builtin kernels there, as at allocation."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((None, 16), name="seq")
    x = keras.layers.Dense(32, activation="relu", name="d1")(inputs)
    outputs = keras.layers.Dense(4, name="head")(keras.layers.GlobalAveragePooling1D()(x))
    model = keras_dst.prunable(keras.Model(inputs, outputs), density=0.3)
    x = np.random.default_rng(0).normal(size=(32, 8, 16)).astype("float32")
    report = keras_dst.export(model, tmp_path / "s.tflite", quantize="int8",
                              representative_data=x, compare_dense=False)
    expected = keras_dst.strip(model).predict(x, verbose=0)
    for prepare in (False, True):
        runtime = report.load()
        with pytest.warns(UserWarning, match="XNNPACK delegate refused"):
            if prepare:
                runtime.prepare(batch_size=2, shapes={"seq": (8, 16)})
            else:
                assert_int8_close(runtime.predict(x), expected)
        assert not runtime.xnnpack
    assert_int8_close(runtime.predict(x), expected)
    with pytest.raises(RuntimeError, match="XNNPack"):  # asked for: no fall-back
        report.load(xnnpack=True).predict(x)


# --------------------------------------------------------------------------- #
# SavedModel, report, runtime, errors
# --------------------------------------------------------------------------- #


def test_tf_saved_model_serves_the_stripped_model(tmp_path):
    model = sparse(mlp((16, 8, 4)), "1x4", density=0.25)
    report = keras_dst.export(model, tmp_path / "sm", format="tf_saved_model")
    loaded = tf.saved_model.load(report.path)
    x = data((16,))
    served = loaded.serve(tf.constant(x)).numpy()
    assert np.max(np.abs(served - keras_dst.strip(model).predict(x, verbose=0))) <= FLOAT_TOL
    signature = loaded.signatures["serving_default"]
    assert np.allclose(next(iter(signature(tf.constant(x)).values())).numpy(), served)
    assert all(w.stored == "dense" for w in report.weights) and report.dense_file_bytes is None
    assert report.file_bytes == directory_bytes(report.path) > 0
    # into a directory holding other files: the SavedModel's bytes only (they counted)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.bin").write_bytes(b"x" * 100_000)
    again = keras_dst.export(model, tmp_path / "used", format="tf_saved_model")
    assert again.file_bytes == directory_bytes(again.path) - 100_000


def directory_bytes(path):
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path)
               for f in files)


def test_report_prints_a_table_with_sizes(tmp_path):
    model = sparse(mlp((16, 8, 4)), "1x4", density=0.25)
    report = keras_dst.export(model, tmp_path / "m.tflite")
    text = str(report)
    assert "fc1/kernel" in text and "sparse (block 1x4)" in text and "why" in text
    assert "x dense" in text and "2 of 2 weights on sparse kernels" in text
    assert os.path.getsize(report.path) == report.file_bytes


def test_the_report_s_columns_stay_aligned_for_long_weight_keys(tmp_path):
    # (a key longer than its column's 30 characters moved every later column of its row)
    inputs = keras.Input((16,))
    outputs = keras.layers.Dense(4, name="a_dense_layer_with_a_long_name_indeed")(
        keras.layers.Dense(8, name="fc")(inputs))
    model = keras_dst.prunable(keras.Model(inputs, outputs), density=0.25)
    lines = str(keras_dst.export(model, tmp_path / "m.tflite", compare_dense=False)).splitlines()
    header, rows = lines[1], [line for line in lines[3:] if "/kernel" in line]
    assert len(rows) == 2
    starts = [header.index(name) for name in ("shape", "pattern", "stored", "op ")]
    for row in rows:
        assert [row[i - 1] for i in starts] == [" "] * 4 and all(row[i] != " " for i in starts)


@needs_litert
def test_int8_weights_whose_input_axis_takes_no_1x16_blocks_say_so(tmp_path):
    # (it read "its zeros are not in such blocks" whatever the zeros)
    model = sparse(mlp((40, 64, 8)), "unstructured", density=0.05)
    report = keras_dst.export(model, tmp_path / "q.tflite", quantize="int8",
                              representative_data=data((40,), n=64, seed=2), compare_dense=False)
    first = report.weights[0]
    assert first.stored == "densified (CSR)"
    assert "its input axis of 40 is not a multiple of 16, so it holds no such blocks" in first.why


@needs_litert
def test_litert_model_inputs_and_timing(tmp_path):
    model = sparse(mlp((16, 8, 4)), "1x4", density=0.25)
    report = keras_dst.export(model, tmp_path / "m.tflite", compare_dense=False)
    runtime = LiteRTModel(report.path, num_threads=1)
    x = data((16,), n=5)
    assert runtime.predict(x, batch_size=2).shape == (5, 4)
    assert np.allclose(runtime.predict({runtime.input_names[0]: x}), runtime.predict(x))
    assert np.allclose(runtime.predict([x]), runtime.predict(x))  # as Keras's predict([x])
    runtime.prepare(batch_size=3)
    assert runtime.time_invoke(runs=3) > 0
    with pytest.raises(ValueError, match="batch_size"):
        runtime.prepare(batch_size=0)
    with pytest.raises(ValueError, match="runs"):
        runtime.time_invoke(runs=0)  # (was a ZeroDivisionError)
    with pytest.raises(ValueError, match="missing"):
        runtime.predict({"nope": x})
    with pytest.warns(UserWarning, match=r"inputs \['nope'\] are not the model's .* ignored"):
        assert np.allclose(runtime.predict({runtime.input_names[0]: x, "nope": x}), runtime.predict(x))
    # inputs of another shape were reshaped by the runtime (7 features, or a list of two batches
    # for one input, gave outputs for other samples), an empty batch failed inside predict
    name = runtime.input_names[0]
    for bad in (data((15,), n=5), x[0], [x, x]):
        with pytest.raises(ValueError, match=rf"input '{name}' has shape .*batch of shape \(None, 16\)"):
            runtime.predict(bad)
    with pytest.raises(ValueError, match="no samples"):
        runtime.predict(x[:0])
    with pytest.raises(ValueError, match=rf"input '{name}' is not an array of numbers"):
        runtime.predict("x")


@needs_litert
def test_a_list_of_inputs_maps_to_the_model_order_read_from_the_file(tmp_path):
    """The signature lists inputs sorted ('alpha', 'zeta'); a `LiteRTModel` made from the
    path alone mapped a list in that order (outputs of swapped inputs, silently)."""
    a, b = keras.Input((8,), name="zeta"), keras.Input((8,), name="alpha")
    outputs = keras.layers.Dense(2)(keras.layers.Concatenate()([a, b * 3.0]))
    model = keras_dst.prunable(keras.Model([a, b], outputs), density=0.5)
    xa, xb = data((8,), seed=1), data((8,), seed=2)
    report = keras_dst.export(model, tmp_path / "two.tflite", compare_dense=False)
    runtime = LiteRTModel(report.path)
    assert report.input_names == runtime.input_names == ["zeta", "alpha"]
    expected = model.predict([xa, xb], verbose=0)
    np.testing.assert_allclose(runtime.predict([xa, xb]), expected, atol=FLOAT_TOL)
    np.testing.assert_allclose(runtime.predict({"alpha": xb, "zeta": xa}), expected, atol=FLOAT_TOL)
    swapped = LiteRTModel(report.path, input_names=["alpha", "zeta"])  # the caller's order
    np.testing.assert_allclose(swapped.predict([xb, xa]), expected, atol=FLOAT_TOL)
    for bad in (["nope"], ["zeta"], "zeta"):
        with pytest.raises(ValueError, match=r"input_names=.* does not name the model's inputs "
                                             r"\['zeta', 'alpha'\]"):
            LiteRTModel(report.path, input_names=bad)
    # the file's bytes (bytes or a bytearray) and NumPy thread counts are taken
    content = bytearray(open(report.path, "rb").read())
    np.testing.assert_allclose(LiteRTModel(content, num_threads=np.int64(1)).predict([xa, xb]),
                               expected, atol=FLOAT_TOL)
    for kwargs, error, message in [
            (dict(model=None), TypeError, r"LiteRTModel: model must be a str or os.PathLike"),
            (dict(num_threads=0), ValueError, r"LiteRTModel: num_threads must be >= 1"),
            (dict(xnnpack="no"), TypeError, r"LiteRTModel: xnnpack must be a bool"),
            # (the runtime's "Could not open ... The model allocation is null/empty")
            (dict(model=report.path + ".gone"), FileNotFoundError,
             r"LiteRTModel: model='.*two.tflite.gone' is no file; it takes a .tflite file"),
            (dict(model=tmp_path), FileNotFoundError, r"LiteRTModel: model='.*' is a directory"),
            (dict(model=b""), ValueError, r"^LiteRTModel: model=b'' is empty")]:
        with pytest.raises(error, match=message):
            LiteRTModel(**{"model": report.path, **kwargs})


@needs_litert
def test_a_subclassed_model_called_on_a_dict_exports_inputs_named_by_its_keys(tmp_path):
    class TwoInputs(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.za = keras_dst.prunable(keras.layers.Dense(8, name="za"), density=0.5)
            self.al = keras_dst.prunable(keras.layers.Dense(8, name="al"), density=0.5)
            self.head = keras.layers.Dense(2, name="head")

        def call(self, inputs):
            return self.head(self.za(inputs["zeta"]) + 3.0 * self.al(inputs["alpha"]))

    x = {"zeta": data((8,), seed=1), "alpha": data((8,), seed=2)}
    model = TwoInputs(name="two")
    model(x)
    report = keras_dst.export(model, tmp_path / "d.tflite", compare_dense=False)
    assert sorted(report.input_names) == ["alpha", "zeta"]  # were args_0, args_0_1
    np.testing.assert_allclose(report.load().predict(x), model.predict(x, verbose=0),
                               atol=FLOAT_TOL)


@needs_litert
def test_a_sequence_model_runs_at_any_length_and_is_timed_at_a_given_one(tmp_path):
    keras.utils.set_random_seed(0)
    tokens = keras.Input((None,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(50, 8, name="embedding")(tokens)
    x = keras.layers.Conv1D(8, 3, padding="same", activation="relu", name="conv")(x)
    x = keras.layers.GlobalMaxPooling1D()(x)
    model = sparse(keras.Model(tokens, keras.layers.Dense(3, name="head")(x)), density=0.3)
    runtime = keras_dst.export(model, tmp_path / "seq.tflite", compare_dense=False).load()
    reference = keras_dst.strip(model)
    for length in (5, 11):
        ids = np.random.default_rng(length).integers(0, 50, size=(4, length))
        assert np.max(np.abs(runtime.predict(ids) - reference.predict(ids, verbose=0))) <= FLOAT_TOL
    with pytest.raises(ValueError, match=r"inputs 'tokens' \(None,\) have .*shapes=\{'tokens': \(\.\.\.\)\}"):
        runtime.prepare(batch_size=2)
    for bad, error, words in [({"nope": (3,)}, ValueError, "unknown inputs \\['nope'\\]"),
                              ({"tokens": (3, 4)}, ValueError, "shape \\(None,\\)"),
                              ({"tokens": (0,)}, ValueError, "shapes\\['tokens'\\]\\[0\\]"),
                              ([7], TypeError, "shapes must be a dict")]:
        with pytest.raises(error, match=words):
            runtime.prepare(batch_size=2, shapes=bad)
    runtime.prepare(batch_size=2, shapes={"tokens": (7,)})
    assert runtime.interpreter.get_input_details()[0]["shape"].tolist() == [2, 7]
    assert runtime.time_invoke(runs=2) > 0


def test_missing_runtime_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    with pytest.raises(ImportError, match=r"keras-dst\[litert\]"):
        LiteRTModel(b"not a model")


class Det(keras.layers.Layer):
    """A layer whose op (MatrixDeterminant) has no LiteRT builtin."""

    def call(self, x):
        return tf.linalg.det(x)

    def compute_output_shape(self, shape):
        return shape[:-2]


def test_errors_name_the_argument_and_value(tmp_path):
    model = sparse(mlp((16, 8, 4)), "1x4", density=0.25)
    path = tmp_path / "m.tflite"
    with pytest.raises(ValueError, match=r"format.*'onnx'"):
        keras_dst.export(model, path, format="onnx")
    with pytest.raises(ValueError, match=r"quantize.*'int4'"):
        keras_dst.export(model, path, quantize="int4")
    with pytest.raises(ValueError, match=r"must end with '.tflite'"):
        keras_dst.export(model, tmp_path / "m.bin")
    with pytest.raises(ValueError, match="representative_data"):
        keras_dst.export(model, path, quantize="int8")
    with pytest.raises(ValueError, match="tf_saved_model"):
        keras_dst.export(model, tmp_path / "sm", format="tf_saved_model", quantize="int8",
                         representative_data=data((16,)))
    with pytest.raises(TypeError, match="keras.Model"):
        keras_dst.export(keras.layers.Dense(3), path)
    with pytest.raises(TypeError, match="filepath"):
        keras_dst.export(model, 3)
    with pytest.raises(TypeError, match="compare_dense"):
        keras_dst.export(model, path, compare_dense="yes")
    with pytest.raises(ValueError, match="calibration_steps"):
        keras_dst.export(model, path, calibration_steps=0)
    with pytest.raises(ValueError, match="not built"):
        keras_dst.export(keras.Sequential([keras.layers.Dense(3)]), path)
    with pytest.raises(ValueError, match="representative_data calibrates quantize='int8'"):
        keras_dst.export(model, path, representative_data=data((16,)))
    # samples of another shape: a rank too low was converted to a float32 file reported
    # as int8; a width mismatch failed inside the converter
    for bad, shape in ((np.zeros(200, "float32"), r"\(\)"), (data((5,)), r"\(5,\)")):
        with pytest.raises(ValueError, match=rf"representative_data for input '.*' has samples "
                                             rf"of shape {shape}; the model takes inputs of "
                                             r"shape \(None, 16\)"):
            keras_dst.export(model, path, quantize="int8", representative_data=bad)
    # non-finite calibration samples: an inf crashed the converter's process, a NaN gave
    # a float32 file reported as int8
    # values that are not numbers: numpy's "could not convert string to float"
    with pytest.raises(ValueError, match=r"representative_data for input '.*' holds values "
                                         r"of type <U1 that are not float32, the input's dtype"):
        keras_dst.export(model, path, quantize="int8", representative_data=[["a"] * 16] * 4)
    with pytest.raises(ValueError, match=r"representative_data for input '.*' holds values "
                                         r"of type <U32 that are not float32"):  # (a later row)
        keras_dst.export(model, path, quantize="int8",
                         representative_data=np.array([[0.5] * 16] * 2 + [["oops"] * 16]))
    for value in (np.inf, np.nan):
        bad = data((16,))
        bad[3, 5] = value
        with pytest.raises(ValueError, match=r"representative_data for input '.*' holds NaN "
                                             r"or inf in 1 of the \d+ calibration samples"):
            keras_dst.export(model, path, quantize="int8", representative_data=bad)
    assert not path.exists()
    # a destination that cannot be written: refused before converting (was an OSError after)
    (tmp_path / "dir.tflite").mkdir()
    (tmp_path / "afile").write_text("")
    with pytest.raises(ValueError, match=r"filepath='.*dir.tflite' is a directory"):
        keras_dst.export(model, tmp_path / "dir.tflite")
    with pytest.raises(ValueError, match=r"filepath='.*afile' is a file; a SavedModel is a "
                                         r"directory"):
        keras_dst.export(model, tmp_path / "afile", format="tf_saved_model")
    with pytest.raises(ValueError, match=r"filepath='.*m.tflite' lies below '.*afile', a file"):
        keras_dst.export(model, tmp_path / "afile" / "sub" / "m.tflite")
    # one the file system refuses (a name too long for it): refused before converting,
    # naming it, and the folders that the probe made are gone
    long_name = tmp_path / "new" / "sub" / ("x" * 300 + ".tflite")
    for where, format in ((long_name, "litert"), (tmp_path / "new" / ("y" * 300), "tf_saved_model")):
        with pytest.raises(ValueError, match=r"filepath='.*(x{300}|y{300}).*' cannot be "
                                             r"written: File name too long"):
            keras_dst.export(model, where, format=format)
    assert not (tmp_path / "new").exists()
    before = sorted(os.listdir(tmp_path))
    keras_dst.export(model, tmp_path / "made" / "here.tflite", compare_dense=False)
    assert sorted(os.listdir(tmp_path)) == sorted(before + ["made"])
    with pytest.raises(ValueError, match=r"quantize must be one of \[None, 'int8'\], got "
                                         r"quantize='int4'"):
        keras_dst.export(model, path, quantize="int4")


def test_a_float16_model_is_a_clear_error_naming_its_16_bit_layers(tmp_path):
    """Variables and computation in float16 (not a mixed policy): the error names the layer
    and its policy, not only the ops, and points at float32 / mixed precision."""
    inputs = keras.Input((8,))
    x = keras.layers.Dense(16, activation="relu", dtype="float16", name="half")(inputs)
    model = sparse(keras.Model(inputs, keras.layers.Dense(4, name="head")(x)), density=0.5)
    with pytest.raises(ValueError, match=r"MatMul \(layer 'half'\).*16-bit float.*'half' \(float16\)"
                                         r".*mixed_float16"):
        keras_dst.export(model, tmp_path / "half.tflite", compare_dense=False)
    assert not (tmp_path / "half.tflite").exists()
    # a failed export leaves an existing file's bytes, and a dangling link, as they were
    # (the destination's probe, before converting)
    (tmp_path / "old.tflite").write_bytes(b"kept")
    (tmp_path / "dangling.tflite").symlink_to(tmp_path / "nowhere")
    for where in ("old.tflite", "dangling.tflite"):
        with pytest.raises(ValueError, match=r"MatMul \(layer 'half'\)"):
            keras_dst.export(model, tmp_path / where, compare_dense=False)
    assert (tmp_path / "old.tflite").read_bytes() == b"kept"
    assert (tmp_path / "dangling.tflite").is_symlink() and not (tmp_path / "nowhere").exists()

def test_a_keras_quantized_model_is_a_clear_error_pointing_at_quantize_int8(tmp_path):
    """The README's way to quantize is `strip(model).quantize(...)`; LiteRT cannot take
    Keras's int8 layers: the error names them and points at export(quantize='int8')."""
    plain = keras_dst.strip(sparse(mlp(), density=0.5))
    plain.quantize("int8")
    with pytest.raises(ValueError, match=r"quantized by Keras.*'fc1' \(int8\).*'head' \(int8\)"
                                         r".*quantize='int8', representative_data"):
        keras_dst.export(plain, tmp_path / "q.tflite", compare_dense=False)
    assert not (tmp_path / "q.tflite").exists()



def test_a_model_the_converter_cannot_handle_is_a_clear_error(tmp_path):
    inputs = keras.Input((4, 4))
    x = Det(name="det")(keras.layers.Dense(4, name="fc")(inputs))
    model = sparse(keras.Model(inputs, x), density=0.5)
    with pytest.raises(ValueError, match=r"MatrixDeterminant \(layer 'det'\).*tf_saved_model"):
        keras_dst.export(model, tmp_path / "bad.tflite")
    assert not (tmp_path / "bad.tflite").exists()


@keras.saving.register_keras_serializable(package="test_export")
class TiedLM(keras.Model):
    """An embedding whose table is also the output projection (tied weights)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.embedding = keras.layers.ReversibleEmbedding(32, 16, name="embedding")
        self.mid = keras.layers.Dense(16, name="mid")

    def call(self, x):
        return self.embedding(self.mid(self.embedding(x)), reverse=True)


def test_a_model_whose_sparsity_pass_fails_points_at_sparsity_false(tmp_path):
    """The converter's sparsity pass fails on tied embeddings (a table read by a gather and
    a matmul) with an empty RuntimeError; the error says so and that sparsity=False
    converts the model, which it does."""
    ids = np.random.default_rng(0).integers(0, 32, (8, 6)).astype("int32")
    model = TiedLM(name="tied")
    model(ids[:2])
    model = keras_dst.prunable(model, density=0.3)
    with pytest.raises(ValueError, match=r"cannot convert model 'tied': its sparsity "
                                         r"optimisation fails \(RuntimeError.*\); layer "
                                         r"'embedding' reads its sparse table twice.*\. Without "
                                         r"it the model converts: export\(\.\.\., "
                                         r"sparsity=False\).*keep_dense=\['embedding'\]"):
        keras_dst.export(model, tmp_path / "tied.tflite", compare_dense=False)
    report = keras_dst.export(model, tmp_path / "tied.tflite", sparsity=False, compare_dense=False)
    np.testing.assert_allclose(report.load().predict(ids), model.predict(ids, verbose=0),
                               atol=1e-5)
    # the remedy the error names: the table trained dense, the rest stored sparse
    kept = TiedLM(name="tied")
    kept(ids[:2])
    kept = keras_dst.prunable(kept, density=0.8, keep_dense=["embedding"])  # mid at 0.4
    report = keras_dst.export(kept, tmp_path / "kept.tflite", compare_dense=False)
    stored = {w.weight: w.stored for w in report.weights}
    assert stored["tied/embedding/embeddings"] == "dense", stored
    assert stored["tied/mid/kernel"] != "dense", stored
    # (its reason was "FULLY_CONNECTED/GATHER weights are never compressed (only
    # FULLY_CONNECTED ... are)", where the table is dense)
    table = next(w for w in report.weights if w.weight == "tied/embedding/embeddings")
    assert table.why.startswith("0% zeros: the converter keeps weights with < 30 % zeros dense"), table.why
    np.testing.assert_allclose(report.load().predict(ids), kept.predict(ids, verbose=0),
                               atol=1e-5)


def test_a_weight_no_op_of_which_compresses_is_said_so_whatever_its_zeros(tmp_path):
    """An embedding table with few zeros read "20% zeros: the converter keeps weights with
    < 30 % zeros dense", as if pruning further would compress it: a GATHER never does."""
    inputs = keras.Input((5,), dtype="int32")
    x = keras.layers.Flatten()(keras.layers.Embedding(40, 8, name="table")(inputs))
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(x))
    model = keras_dst.prunable(model, density=0.7, density_overrides={"table": 0.8})
    report = keras_dst.export(model, tmp_path / "table.tflite", compare_dense=False)
    table = by_weight(report)["table/embeddings"]
    assert (table.op, table.stored) == ("GATHER", "dense")
    assert table.why.startswith("GATHER weights are never compressed"), table.why


def test_a_share_of_zeros_under_the_converter_s_threshold_never_reads_as_it():
    # ("30% zeros: the converter keeps weights with < 30 % zeros dense")
    from keras_dst.export import _percent_down

    assert [_percent_down(f) for f in (0.2975, 0.0, 0.2, 0.29999, 1.0)] == [
        "29.7%", "0%", "20%", "29.9%", "100%"]
