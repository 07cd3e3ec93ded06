"""prunable() / strip() / masks utilities on every kind of model."""

import warnings

import keras
import numpy as np
import pytest

import keras_dst
from keras_dst import compat
from keras_dst import layers as layers_lib
from keras_dst.registry import Registry

from conftest import (
    active_counts,
    all_layers_data,
    all_layers_model,
    assert_sparse_invariants,
    mlp,
)

EXPECTED_SPARSE = {"conv2d", "depthwise2d", "separable2d", "conv2d_transpose", "conv1d",
                   "depthwise1d", "separable1d", "conv1d_transpose", "mha", "einsum", "conv3d",
                   "conv3d_transpose", "embedding", "dense", "head"}


def test_every_supported_layer_is_wrapped_and_others_are_not():
    sparse = keras_dst.prunable(all_layers_model(), density=0.3)
    wrapped = {l.layer.name for l in sparse.layers if isinstance(l, keras_dst.SparseWrapper)}
    assert wrapped == EXPECTED_SPARSE
    paths = set(keras_dst.masks(sparse))
    assert "separable2d/depthwise_kernel" in paths and "separable2d/pointwise_kernel" in paths
    assert {p for p in paths if p.startswith("mha/")} == {
        "mha/query/kernel", "mha/key/kernel", "mha/value/kernel", "mha/attention_output/kernel"}
    assert "embedding/embeddings" in paths
    assert not any("bias" in p or "bn" in p for p in paths)
    assert_sparse_invariants(sparse)


@pytest.mark.parametrize("density", [0.05, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("distribution", ["erk", "er", "uniform"])
def test_exact_init_hits_global_count(density, distribution):
    model = mlp((30, 40, 20, 5))
    sparse = keras_dst.prunable(model, density=density, distribution=distribution)
    total = sum(int(np.prod(w.shape)) for w in [l.kernel for l in model.layers[1:]])
    assert sum(active_counts(sparse).values()) == int(np.floor(density * total + 0.5))
    assert_sparse_invariants(sparse)


def test_bernoulli_init_is_close_not_exact():
    model = mlp((100, 200, 10))
    sparse = keras_dst.prunable(model, density=0.3, distribution="uniform", init="bernoulli")
    d = keras_dst.density(sparse)
    assert abs(d - 0.3) < 0.02
    assert_sparse_invariants(sparse)


def test_weights_are_copied_then_zeroed_and_original_untouched():
    model = mlp()
    before = [w.copy() for w in model.get_weights()]
    sparse = keras_dst.prunable(model, density=0.3, distribution="uniform")
    for t in keras_dst.sparse_targets(sparse):
        original = model.get_layer(t.wrapper.layer.name).kernel.numpy()
        m = t.mask.numpy()
        np.testing.assert_array_equal(t.weight.numpy()[m], original[m])
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(sparse.get_layer("fc1").layer.bias.numpy(),
                                  model.get_layer("fc1").bias.numpy())


def test_each_initial_mask_is_drawn_once(monkeypatch):
    """The mask, its ever-active flags and the weight's zeroing share one draw per
    weight (a draw is a partition of a uniform sample of the weight's size)."""
    from keras_dst import patterns
    draws = []
    original = patterns.initial_mask

    def counted(pattern, shape, density, seed):
        draws.append(tuple(shape))
        return original(pattern, shape, density, seed)

    monkeypatch.setattr(patterns, "initial_mask", counted)
    sparse = keras_dst.prunable(mlp((30, 40, 20, 5)), density=0.3, distribution="uniform")
    assert sorted(draws) == sorted(tuple(t.weight.shape) for t in keras_dst.sparse_targets(sparse))
    for t in keras_dst.sparse_targets(sparse):
        np.testing.assert_array_equal(t.ever_active.numpy(), t.mask.numpy())
    assert_sparse_invariants(sparse)


def test_same_seed_same_masks_other_seed_other_masks():
    a = keras_dst.masks(keras_dst.prunable(mlp(), density=0.2, seed=3))
    b = keras_dst.masks(keras_dst.prunable(mlp(), density=0.2, seed=3))
    c = keras_dst.masks(keras_dst.prunable(mlp(), density=0.2, seed=4))
    assert all((a[k] == b[k]).all() for k in a)
    assert any((a[k] != c[k]).any() for k in a)


def test_keep_dense_and_overrides():
    sparse = keras_dst.prunable(mlp((30, 40, 20, 5)), density=0.3, keep_dense=["fc3"],
                                density_overrides={"fc2": 0.5})
    counts = active_counts(sparse)
    assert counts["fc3/kernel"] == 20 * 5
    assert counts["fc2/kernel"] == 400
    total = 30 * 40 + 40 * 20 + 20 * 5
    assert sum(counts.values()) == int(np.floor(0.3 * total + 0.5))
    with pytest.raises(ValueError, match="infeasible"):
        keras_dst.prunable(mlp((30, 40, 20, 5)), density=0.2, keep_dense=["fc1"])


def _attention_model():
    inp = keras.Input((6, 8))
    h = keras.layers.MultiHeadAttention(2, 4, name="mha")(inp, inp)
    return keras.Model(inp, keras.layers.Dense(3, name="head")(keras.layers.Flatten()(h)))


@pytest.mark.parametrize("in_place", [False, True])
def test_options_reach_the_projections_of_an_attention_layer(in_place, tmp_path):
    """A MultiHeadAttention is sparsified as one layer: its projections' names, which the
    docstring gave as examples ("query"), were refused as unknown. Now an option reaches
    a sub-layer's weights by its name or its path below the layer's, and keep_dense holds
    per weight (GradualPruning leaves only that projection dense; a reload keeps it)."""
    model = keras_dst.prunable(
        _attention_model(), density=0.3, distribution="uniform", in_place=in_place,
        density_overrides={"query": 0.5}, keep_dense=["mha/value"])
    densities = {k: float(m.mean()) for k, m in keras_dst.masks(model).items()}
    assert densities["mha/query/kernel"] == 0.5 and densities["mha/value/kernel"] == 1.0
    assert densities["mha/key/kernel"] < 0.5
    structured = keras_dst.prunable(_attention_model(), density=0.3, in_place=in_place,
                                    pattern_overrides={"mha/attention_output": "fan_in"})
    assert [str(t.pattern) for t in keras_dst.sparse_targets(structured)] == [
        "unstructured", "unstructured", "unstructured", "fan_in", "unstructured"]
    state = keras_dst.sparse_targets(model)[0].state
    assert state.keep_dense == [False, False, True, False]
    model.compile(keras.optimizers.SGD(0.01), "mse", jit_compile=True)
    x = np.random.default_rng(0).random((32, 6, 8), "float32")
    model.fit(x, np.zeros((32, 3), "float32"), epochs=1, batch_size=4, verbose=0,
              callbacks=[keras_dst.GradualPruning(0.1, update_every=1, initial_density=0.3)])
    after = {k: float(m.mean()) for k, m in keras_dst.masks(model).items()}
    assert after["mha/value/kernel"] == 1.0 and after["mha/query/kernel"] < 0.5
    path = str(tmp_path / "m.keras")
    keras_dst.save_model(model, path)
    loaded = keras_dst.load_model(path)
    assert keras_dst.sparse_targets(loaded)[0].state.keep_dense == [False, False, True, False]

    with pytest.raises(ValueError, match=r"unknown layer names \['qury'\] in "
                                         r"density_overrides; sparsified layers are \['head', "
                                         r"'mha'\]; sub-layers holding their weights "
                                         r"\['attention_output', 'key', 'query', 'value'\]"):
        keras_dst.prunable(_attention_model(), density=0.3, density_overrides={"qury": 0.5})
    with pytest.raises(ValueError, match=r"unknown layer names \['vlue'\] in keep_dense; "):
        keras_dst.prunable(_attention_model(), density=0.3, keep_dense=["vlue"],
                           density_overrides={"query": 0.5})
    with pytest.raises(ValueError, match=r"weight 'mha/query/kernel'\) is given 0.5 by "
                                         r"density_overrides\['query'\] and 0.2 by "
                                         r"density_overrides\['mha'\]"):
        keras_dst.prunable(_attention_model(), density=0.3,
                           density_overrides={"query": 0.5, "mha": 0.2})


def test_a_name_of_a_sparsified_layer_reaches_that_layer_only():
    """A top-level Dense named like a projection ("value"): its name reaches it alone, as
    before sub-layers could be named (every key reaching it reached the projections too);
    a distribution dict naming some projections says which it misses."""
    inp = keras.Input((6, 8))
    h = keras.layers.Flatten()(keras.layers.MultiHeadAttention(2, 4, name="mha")(inp, inp))
    model = keras.Model(inp, keras.layers.Dense(1, name="value")(h))
    sparse = keras_dst.prunable(model, density=0.3, keep_dense=["value"])
    densities = {k: float(m.mean()) for k, m in keras_dst.masks(sparse).items()}
    assert densities["value/kernel"] == 1.0 and densities["mha/value/kernel"] < 1.0
    sparse = keras_dst.prunable(model, distribution={"mha": 0.3, "value": 0.5})
    densities = {k: round(float(m.mean()), 2) for k, m in keras_dst.masks(sparse).items()}
    assert densities["value/kernel"] == 0.5 and densities["mha/value/kernel"] == 0.3
    with pytest.raises(ValueError, match=r"must name every sparsified layer \(or each of its "
                                         r"weights\); missing \['mha/attention_output', "
                                         r"'mha/value'\]"):
        keras_dst.prunable(model, distribution={"query": 0.5, "key": 0.5, "value": 0.3})


def test_a_wrapper_takes_keep_dense_per_weight_and_checks_it():
    with pytest.raises(ValueError, match=r"keep_dense=\[False, True\] needs density 1 for "
                                         r"the weights it keeps dense"):
        keras_dst.SparseWrapper(keras.layers.Dense(2), density=[0.5, 0.5], keep_dense=[False, True])
    with pytest.raises(TypeError, match=r"keep_dense must be a bool or a list of bools \(one "
                                        r"per prunable weight\), got keep_dense='yes'"):
        keras_dst.SparseWrapper(keras.layers.Dense(2), keep_dense="yes")
    with pytest.raises(TypeError, match=r"keep_dense\[1\] must be a bool, got keep_dense\[1\]=2"):
        keras_dst.SparseWrapper(keras.layers.Dense(2), keep_dense=[True, 2])
    mha = keras.layers.MultiHeadAttention(2, 4, name="mha")
    x = np.zeros((1, 6, 8), "float32")
    mha(x, x)
    with pytest.raises(ValueError, match="got 2 keep_dense flags for 4 prunable weights"):
        layers_lib.attach(mha, density=1.0, keep_dense=[False, True])
    assert layers_lib.attached_state(mha) is None
    state = layers_lib.attach(mha, density=[0.5, 0.5, 1.0, 0.5],
                              keep_dense=[False, False, True, False])
    assert [state.is_kept_dense(w) for w in state.sparse_weights] == [False, False, True, False]
    with pytest.raises(ValueError, match=r"'mha/query/bias' is not one of its sparsified weights"):
        state.is_kept_dense(mha.query_dense.bias)  # (not sparsified)
    assert state.get_config()["keep_dense"] == [False, False, True, False]


def test_custom_distribution_dict():
    sparse = keras_dst.prunable(mlp((30, 40, 20, 5)),
                                distribution={"fc1": 0.1, "fc2": 0.5, "fc3": 1.0})
    counts = active_counts(sparse)
    assert counts == {"fc1/kernel": 120, "fc2/kernel": 400, "fc3/kernel": 100}


def test_nested_sequential_inside_functional():
    inner = keras.Sequential([keras.Input((16,)), keras.layers.Dense(8, name="inner_fc")],
                             name="inner")
    inp = keras.Input((10,))
    x = keras.layers.Dense(16, name="outer_fc")(inp)
    model = keras.Model(inp, keras.layers.Dense(2, name="out")(inner(x)))
    sparse = keras_dst.prunable(model, density=0.5, distribution="uniform")
    assert set(keras_dst.masks(sparse)) == {"outer_fc/kernel", "inner_fc/kernel", "out/kernel"}
    x_data = np.random.default_rng(0).normal(size=(4, 10)).astype("float32")
    np.testing.assert_allclose(keras_dst.strip(sparse).predict(x_data, verbose=0),
                               sparse.predict(x_data, verbose=0), atol=1e-6)


def test_strip_gives_plain_model_with_same_predictions():
    sparse = keras_dst.prunable(all_layers_model(), density=0.3)
    plain = keras_dst.strip(sparse)
    assert not any(isinstance(l, keras_dst.SparseWrapper)
                   for l in compat.flatten_layers(plain))
    x, _ = all_layers_data()
    np.testing.assert_allclose(plain.predict(x, verbose=0), sparse.predict(x, verbose=0),
                               atol=1e-5)


def test_model_with_a_python_lambda_layer_is_made_prunable_and_stripped():
    # the user's own in-memory Lambda is cloned although Keras's safe mode would refuse
    # to deserialize it from a file
    inp = keras.Input((10,))
    h = keras.layers.Lambda(lambda t: t * 2.0)(inp)
    model = keras.Model(inp, keras.layers.Dense(3, name="fc")(h))
    sparse = keras_dst.prunable(model, density=0.5)
    assert set(keras_dst.masks(sparse)) == {"fc/kernel"}
    x_data = np.random.default_rng(0).normal(size=(4, 10)).astype("float32")
    kernel = sparse.get_layer("fc").layer.kernel.numpy()
    np.testing.assert_allclose(sparse.predict(x_data, verbose=0),
                               2.0 * x_data @ kernel + sparse.get_layer("fc").layer.bias.numpy(),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(keras_dst.strip(sparse).predict(x_data, verbose=0),
                               sparse.predict(x_data, verbose=0), atol=1e-6)
    with pytest.raises(ValueError, match="safe_mode"):  # safe mode is still on afterwards
        keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(
            keras.layers.Lambda(lambda t: t)))


def test_summary_and_density(capsys):
    sparse = keras_dst.prunable(mlp(), density=0.25, distribution="uniform")
    keras_dst.summary(sparse)
    out = capsys.readouterr().out
    assert "fc1/kernel" in out and "active/total" in out
    assert keras_dst.density(sparse) == pytest.approx(0.25, abs=1e-3)


def test_set_masks_validates_everything_before_writing():
    sparse = keras_dst.prunable(mlp(), density=0.5)
    before = keras_dst.masks(sparse)
    good = np.zeros((20, 32))
    with pytest.raises(ValueError, match="shape"):
        keras_dst.set_masks(sparse, {"fc1/kernel": good, "fc2/kernel": np.ones((3, 3))})
    with pytest.raises(ValueError, match="fc9/kernel"):
        keras_dst.set_masks(sparse, {"fc1/kernel": good, "fc9/kernel": good})
    with pytest.raises(ValueError, match="0/1"):
        keras_dst.set_masks(sparse, {"fc1/kernel": np.full((20, 32), 2)})
    after = keras_dst.masks(sparse)
    assert all((before[k] == after[k]).all() for k in before)
    with pytest.warns(UserWarning, match=r"set_masks\(\): the masks of 'fc1/kernel' have no active entry"):
        keras_dst.set_masks(sparse, {"fc1/kernel": good})
    assert keras_dst.masks(sparse)["fc1/kernel"].sum() == 0
    assert_sparse_invariants(sparse)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a mask with active entries: no warning
        keras_dst.set_masks(sparse, {"fc1/kernel": before["fc1/kernel"]})


# ---- bad inputs: clear errors, raised before anything changes -----------------------------
@pytest.mark.parametrize("density,error", [(0.0, ValueError), (1.5, ValueError), (-0.1, ValueError),
                                           ("0.1", TypeError), (True, TypeError),
                                           (None, ValueError)])
def test_bad_density(density, error):
    with pytest.raises(error, match="density"):
        keras_dst.prunable(mlp(), density=density)


def test_skip_unsupported_must_be_a_bool():
    with pytest.raises(TypeError, match=r"skip_unsupported must be a bool, got skip_unsupported=1"):
        keras_dst.prunable(mlp(), density=0.1, skip_unsupported=1)


def test_unknown_distribution():
    with pytest.raises(ValueError, match="gaussian"):
        keras_dst.prunable(mlp(), density=0.1, distribution="gaussian")


class _Bilinear(keras.layers.Layer):
    """A layer with a 2-D weight that keras_dst knows nothing of."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=(input_shape[-1], input_shape[-1]), name="w")

    def call(self, x):
        return x @ self.w


def test_unsupported_layer_names_layer_and_class():
    inp = keras.Input((5, 3))
    x = keras.layers.Flatten()(_Bilinear(name="my_bilinear")(inp))
    model = keras.Model(inp, keras.layers.Dense(2)(x))
    with pytest.raises(TypeError, match=r"my_bilinear.*_Bilinear"):
        keras_dst.prunable(model, density=0.5)
    sparse = keras_dst.prunable(model, density=0.5, skip_unsupported=True)
    assert set(keras_dst.masks(sparse)) == {"dense/kernel"} or len(keras_dst.masks(sparse)) == 1


class _Token(keras.layers.Layer):
    """A layer keras_dst does not know that adds a learned token of `shape`."""

    def __init__(self, shape, **kwargs):
        super().__init__(**kwargs)
        self.token = self.add_weight(shape=shape, initializer="ones", name="token")

    def call(self, x):
        return x + self.token


@pytest.mark.parametrize("in_place", [False, True])
def test_an_unknown_layer_holding_only_a_vector_of_any_rank_is_left_dense(in_place):
    # A class token [1, 1, d] is a vector (one axis longer than 1), like a bias; a
    # learned [2, d] table is a matrix, whose unknown layer is refused.
    def model(shape):
        inp = keras.Input((2, 4))
        x = keras.layers.Flatten()(_Token(shape, name="token_layer")(inp))
        return keras.Model(inp, keras.layers.Dense(2, name="head")(x))

    sparse = keras_dst.prunable(model((1, 1, 4)), density=0.5, in_place=in_place)
    assert set(keras_dst.masks(sparse)) == {"head/kernel"}
    with pytest.raises(TypeError, match=r"token_layer.*_Token"):
        keras_dst.prunable(model((2, 4)), density=0.5, in_place=in_place)


def test_already_prunable():
    sparse = keras_dst.prunable(mlp(), density=0.5)
    with pytest.raises(ValueError, match="already prunable"):
        keras_dst.prunable(sparse, density=0.5)
    with pytest.raises(ValueError, match="already prunable"):
        keras_dst.prunable(sparse.layers[1], density=0.5)


def test_unknown_layer_names_in_options():
    with pytest.raises(ValueError, match="nope"):
        keras_dst.prunable(mlp(), density=0.5, keep_dense=["nope"])
    with pytest.raises(ValueError, match="fc2"):
        keras_dst.prunable(mlp(), density=0.5, distribution={"fc1": 0.5})


def test_subclassed_model_cannot_be_rebuilt_so_its_masks_are_attached_in_place():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.fc = keras.layers.Dense(3)

        def call(self, x):
            return self.fc(x)

    net = Net()
    net(np.zeros((1, 4), "float32"))
    with pytest.raises(TypeError, match="cannot rebuild the subclassed model"):
        keras_dst.prunable(net, density=0.5, in_place=False)
    assert not keras_dst.sparse_targets(net)  # the refusal changed nothing
    assert keras_dst.prunable(net, density=0.5) is net  # in_place=None: attached
    assert [t.wrapper for t in keras_dst.sparse_targets(net)] == [None]


def test_a_layer_shared_by_two_nested_models_gets_its_masks_in_place():
    # clones of the two nested models would each wrap the layer: one layer, one mask
    shared = keras.layers.Dense(8, name="shared")
    subs = []
    for name in ("sub1", "sub2"):
        inp = keras.Input((4,))
        subs.append(keras.Model(inp, keras.layers.Dense(4, name=f"{name}_out")(shared(inp)),
                                name=name))
    inp = keras.Input((4,))
    model = keras.Model(inp, keras.layers.Add()([subs[0](inp), subs[1](inp)]))
    with pytest.raises(TypeError, match=r"cannot rebuild model '.*': its layer 'shared' is "
                                        r"shared by two nested models.*in_place=None"):
        keras_dst.prunable(model, density=0.5, in_place=False)
    assert not keras_dst.sparse_targets(model)  # the refusal changed nothing
    assert keras_dst.prunable(model, density=0.5) is model  # attached in place
    paths = [t.weight.path for t in keras_dst.sparse_targets(model)]
    assert sorted(paths) == ["shared/kernel", "sub1_out/kernel", "sub2_out/kernel"]
    x = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")
    model.compile(keras.optimizers.SGD(0.1), "mse", jit_compile=True)
    before = keras_dst.masks(model)
    model.fit(x, x, batch_size=4, verbose=0,
              callbacks=[keras_dst.DynamicSparseTraining(update_every=2)])
    assert_sparse_invariants(model)
    assert (keras_dst.masks(model)["shared/kernel"] != before["shared/kernel"]).any()
    assert keras_dst.unfit_layers(model, "1x4") == {}


def _two_towers(tower):
    """A model adding two `tower(name)` sub-models, each with a Dense named 'fc'."""
    inp = keras.Input((4,))
    subs = [tower("tower_a"), tower("tower_b")]
    return keras.Model(inp, keras.layers.Add()([subs[0](inp), subs[1](inp)]), name="towers")


def _functional_tower(name):  # its 'fc' is made outside the tower: path 'fc/kernel'
    inp = keras.Input((4,))
    return keras.Model(inp, keras.layers.Dense(3, name="fc")(inp), name=name)


def _sequential_tower(name):  # 'tower_a/fc/kernel', but 'fc/kernel' in a clone or a reload
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="fc")], name=name)


@pytest.mark.parametrize("tower,in_place", [(_functional_tower, None),
                                            (_sequential_tower, None),
                                            (_sequential_tower, True)])
def test_same_named_layers_of_two_sub_models_are_keyed_by_their_place(tower, in_place, tmp_path):
    # Keras gives both kernels the path 'fc/kernel' (from the start, or in the clone and
    # after a reload): masks() must still hold one entry per sparsified weight, keyed by
    # the weight's place in the model, the same before and after a save and load.
    model = keras_dst.prunable(_two_towers(tower), density=0.5, in_place=in_place)
    keys = ["tower_a/fc/kernel", "tower_b/fc/kernel"]
    assert list(keras_dst.masks(model)) == keys
    assert [t.key for t in keras_dst.sparse_targets(model)] == keys
    lines = []
    keras_dst.summary(model, print_fn=lines.append)
    assert all(any(k in line for line in lines) for k in keys)
    assert list(assert_sparse_invariants(model)) == keys
    x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
    model.compile(keras.optimizers.SGD(0.1), "mse", jit_compile=True)
    before = keras_dst.masks(model)
    history = model.fit(x, x[:, :3], batch_size=4, verbose=0,
                        callbacks=[keras_dst.DynamicSparseTraining(update_every=2)])
    assert {f"density/{k}" for k in keys} <= set(history.history)
    after = keras_dst.masks(model)
    assert all((after[k] != before[k]).any() for k in keys)  # both towers were updated
    # set_masks reaches each tower's own kernel
    new = {k: np.ones_like(v) for k, v in after.items()}
    new["tower_b/fc/kernel"][0] = 0
    keras_dst.set_masks(model, new)
    assert keras_dst.masks(model)["tower_a/fc/kernel"].all()
    assert not keras_dst.masks(model)["tower_b/fc/kernel"][0].any()
    path = str(tmp_path / "towers.keras")
    model.save(path)
    loaded = keras_dst.load_model(path)
    assert {k: v.tolist() for k, v in keras_dst.masks(loaded).items()} == \
        {k: v.tolist() for k, v in keras_dst.masks(model).items()}
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


def test_options_name_same_named_layers_of_two_sub_models_by_their_place():
    # both 'fc' layers have the name and the path 'fc': only the place names one
    model = _two_towers(_functional_tower)
    unfit = keras_dst.unfit_layers(model, "1x8")  # (4, 3) kernels: 4 inputs, not 8
    assert unfit == {"tower_a/fc": "unstructured", "tower_b/fc": "unstructured"}
    # errors list each layer by the shortest key that reaches it alone
    with pytest.raises(ValueError, match=r"unknown layer names \['tower_c/fc'\].*sparsified "
                                         r"layers are \['tower_a/fc', 'tower_b/fc'\]"):
        keras_dst.prunable(model, density=0.5, keep_dense=["tower_c/fc"])
    with pytest.raises(ValueError, match=r"must name every sparsified layer \(or each of its "
                                         r"weights\); missing \['tower_b/fc'\]"):
        keras_dst.prunable(model, distribution={"tower_a/fc": 0.5})
    sparse = keras_dst.prunable(model, density=0.6, keep_dense=["tower_b/fc"], pattern="1x8",
                                pattern_overrides={"tower_a/fc": "unstructured"})
    masks = keras_dst.masks(sparse)
    assert masks["tower_b/fc/kernel"].all() and not masks["tower_a/fc/kernel"].all()


@pytest.mark.parametrize("tower,in_place", [(_functional_tower, None), (_sequential_tower, True)])
def test_a_name_of_a_layer_containing_sparsified_ones_reaches_them_all(tower, in_place):
    """Naming a block (a keras-hub "transformer_layer_0", a nested tower) to keep it dense
    or give it a density was refused as an unknown layer name."""
    model = _two_towers(tower)
    sparse = keras_dst.prunable(model, density=0.6, keep_dense=["tower_b"], in_place=in_place)
    masks = keras_dst.masks(sparse)
    assert masks["tower_b/fc/kernel"].all() and not masks["tower_a/fc/kernel"].all()
    sparse = keras_dst.prunable(_two_towers(tower), distribution={"tower_a": 0.25, "tower_b": 0.5},
                                in_place=in_place)
    assert {k: float(m.mean()) for k, m in keras_dst.masks(sparse).items()} == {
        "tower_a/fc/kernel": 0.25, "tower_b/fc/kernel": 0.5}
    with pytest.raises(ValueError, match=r"sparsified layers are \['tower_a/fc', 'tower_b/fc'\]; "
                                         r"layers containing them \['tower_a', 'tower_b'\]"):
        keras_dst.prunable(_two_towers(tower), density=0.5, keep_dense=["tower_c"],
                           in_place=in_place)


def test_two_layers_of_one_name_in_one_subclassed_model_are_numbered():
    # the same path and the same place: the second is numbered, none is lost
    class Twice(keras.Model):
        def __init__(self):
            super().__init__(name="twice")
            self.first = keras_dst.prunable(keras.layers.Dense(8, name="x"), density=0.5)
            self.second = keras_dst.prunable(keras.layers.Dense(2, name="x"), density=0.5)

        def call(self, x):
            return self.second(self.first(x))

    model = Twice()
    x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
    model(x[:1])
    masks = keras_dst.masks(model)
    assert [(k, v.shape) for k, v in masks.items()] == [("sparse_x/kernel", (4, 8)),
                                                        ("sparse_x/kernel#2", (8, 2))]
    keras_dst.set_masks(model, {"sparse_x/kernel#2": np.ones((8, 2))})
    assert model.second.sparse_state.masks[0].numpy().all()
    assert not model.first.sparse_state.masks[0].numpy().all()
    model.compile(keras.optimizers.SGD(0.1), "mse", jit_compile=True)
    history = model.fit(x, x[:, :2], batch_size=8, verbose=0,
                        callbacks=[keras_dst.DynamicSparseTraining(update_every=2)])
    assert {"density/sparse_x/kernel", "density/sparse_x/kernel#2"} <= set(history.history)
    assert_sparse_invariants(model)


def test_prunable_errors_name_the_weight_as_masks_will_key_it():
    # the clone's kernel is 'conv1/kernel' (not the input model's 'net/conv1/kernel')
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(8, 3, name="conv1"),
                              keras.layers.Flatten(), keras.layers.Dense(4, name="fc")],
                             name="net")
    assert model.layers[0].kernel.path == "net/conv1/kernel"
    with pytest.raises(ValueError, match=r"layer 'conv1' \(weight 'conv1/kernel'\): pattern "
                                         r"'1x4' needs the input axis"):
        keras_dst.prunable(model, density=0.5, pattern="1x4")
    assert "conv1/kernel" in keras_dst.masks(keras_dst.prunable(model, density=0.5))


def test_wrong_object_type():
    with pytest.raises(TypeError, match="Model or Layer"):
        keras_dst.prunable("model", density=0.5)


def test_custom_layer_protocol_and_registration():
    class Scale(keras.layers.Layer):
        def build(self, input_shape):
            self.w = self.add_weight(shape=(input_shape[-1], 4), name="w")
            self.b = self.add_weight(shape=(4,), name="b", initializer="zeros")

        def call(self, x):
            return x @ self.w + self.b

        def get_prunable_weights(self):
            return [self.w]

    inp = keras.Input((6,))
    model = keras.Model(inp, Scale(name="scale")(inp))
    sparse = keras_dst.prunable(model, density=0.5)
    assert list(keras_dst.masks(sparse)) == ["scale/w"]
    assert keras_dst.masks(sparse)["scale/w"].sum() == 12

    class Other(keras.layers.Layer):
        def build(self, input_shape):
            self.kern = self.add_weight(shape=(input_shape[-1], 2), name="kern")

        def call(self, x):
            return x @ self.kern

    keras_dst.register_prunable_layer(Other, ["kern"])
    model = keras.Model(inp, Other(name="other")(inp))
    assert list(keras_dst.masks(keras_dst.prunable(model, density=0.5))) == ["other/kern"]


def test_prunable_layer_registry_is_the_shared_type():
    assert isinstance(layers_lib._PRUNABLE_LAYERS, Registry)
    with pytest.raises(ValueError, match=r"prunable layer class 'Dense' is already registered.*overwrite=True"):
        keras_dst.register_prunable_layer(keras.layers.Dense, ["kernel"])

    class Pair(keras.layers.Layer):
        def build(self, input_shape):
            self.a = self.add_weight(shape=(input_shape[-1], 2), name="a")
            self.b = self.add_weight(shape=(2, 2), name="b")

        def call(self, x):
            return x @ self.a @ self.b

    class ChildPair(Pair):  # no registration of its own: found through the MRO
        pass

    try:
        keras_dst.register_prunable_layer(Pair, ["a"])
        with pytest.raises(ValueError, match=r"prunable layer class '.*Pair' is already registered"):
            keras_dst.register_prunable_layer(Pair, ["b"])
        assert layers_lib._registered_names(ChildPair()) == ("a",)
        keras_dst.register_prunable_layer(Pair, "b", overwrite=True)  # one name alone
        assert layers_lib._registered_names(ChildPair()) == ("b",)
        keras_dst.register_prunable_layer(Pair, ["a", "b", "a"], overwrite=True)
        assert layers_lib._registered_names(ChildPair()) == ("a", "b")
        inp = keras.Input((6,))
        model = keras.Model(inp, ChildPair(name="child")(inp))
        assert list(keras_dst.masks(keras_dst.prunable(model, density=0.5))) == ["child/a", "child/b"]
    finally:
        layers_lib._PRUNABLE_LAYERS.unregister(Pair)


def test_a_registration_naming_no_variable_of_the_layer_is_refused():
    """A typo in `register_prunable_layer` (a weight name the layer does not have) would
    leave the layer dense without a word: prunable() names the layer and its variables."""

    class Typo(keras.layers.Layer):
        def build(self, input_shape):
            self.kernel = self.add_weight(shape=(input_shape[-1], 2), name="kernel")

        def call(self, x):
            return x @ self.kernel

    keras_dst.register_prunable_layer(Typo, ["kernal"])
    try:
        inp = keras.Input((6,))
        model = keras.Model(inp, Typo(name="typo")(inp))
        with pytest.raises(TypeError, match=r"Layer 'typo' of class .*Typo is registered as "
                                            r"prunable with weight names \['kernal'\], but has no "
                                            r"variable of these names \(its variables: \['kernel'\]\)"):
            keras_dst.prunable(model, density=0.5)
    finally:
        layers_lib._PRUNABLE_LAYERS.unregister(Typo)


def nested_mlp():
    inner = keras.Sequential([keras.Input((20,)), keras.layers.Dense(16, name="d1")], name="seq")
    inputs = keras.Input((20,))
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(inner(inputs)))


def test_a_layer_given_two_values_is_refused_naming_both():
    """An option naming a layer twice (by name and by path), or two options for one
    layer, used to let the last one win silently."""
    cases = [
        (dict(density=0.5, keep_dense=["fc2"], density_overrides={"fc2": 0.25}),
         r"'fc2'.*given 1.0 by keep_dense 'fc2' and 0.25 by density_overrides\['fc2'\]"),
        (dict(density=0.5, keep_dense=["fc1"], pattern_overrides={"fc1": "1x4"}),
         r"'fc1'.*given 1x4 by pattern_overrides\['fc1'\] and unstructured by keep_dense"),
        (dict(distribution={"fc1": 0.5, "fc2": 0.5, "fc3": 1.0}, keep_dense=["fc2"]),
         r"'fc2'.*given 0.5 by distribution\['fc2'\] and 1.0 by keep_dense 'fc2'"),
    ]
    for options, message in cases:
        with pytest.raises(ValueError, match=message):
            keras_dst.prunable(mlp(), **options)
    model = nested_mlp()
    # the weight named as the clone's masks() will key it (its input path: 'seq/d1/kernel')
    with pytest.raises(ValueError, match=r"\(weight 'd1/kernel'\) is given 0.5 by "
                                         r"distribution\['d1'\] and "
                                         r"0.1 by distribution\['seq/d1'\]"):
        keras_dst.prunable(model, distribution={"d1": 0.5, "seq/d1": 0.1, "head": 1.0})
    with pytest.raises(ValueError, match=r"0.25 by density_overrides\['d1'\] and 0.75 by "
                                         r"density_overrides\['seq/d1'\]"):
        keras_dst.prunable(model, density=0.5, density_overrides={"d1": 0.25, "seq/d1": 0.75})
    # the same value twice is one value
    sparse = keras_dst.prunable(model, distribution={"d1": 0.5, "seq/d1": 0.5, "head": 1.0})
    assert keras_dst.density(sparse) == pytest.approx((160 + 48) / (320 + 48))


def test_keep_dense_takes_names_only():
    for bad in (5, None, 1.5, ["fc1", 2]):
        with pytest.raises(TypeError, match="keep_dense"):
            keras_dst.prunable(mlp(), density=0.5, keep_dense=bad)
    one = keras_dst.prunable(mlp(), density=0.5, keep_dense="fc3")  # one name
    assert keras_dst.masks(one)["fc3/kernel"].all()


def test_a_distribution_dict_sets_the_density_a_given_one_must_agree():
    sizes = {"fc1": 20 * 32, "fc2": 32 * 16, "fc3": 16 * 3}
    dict_ = {"fc1": 0.25, "fc2": 0.5, "fc3": 1.0}
    realised = sum(dict_[k] * n for k, n in sizes.items()) / sum(sizes.values())
    sparse = keras_dst.prunable(mlp(), distribution=dict_)
    assert keras_dst.density(sparse) == pytest.approx(realised, abs=1e-3)
    keras_dst.prunable(mlp(), density=realised, distribution=dict_)
    with pytest.raises(ValueError, match=f"density of {realised:.6g} .*not density=0.1"):
        keras_dst.prunable(mlp(), density=0.1, distribution=dict_)
    with pytest.raises(ValueError, match="needs a density"):
        keras_dst.prunable(mlp(), distribution="erk")


@pytest.mark.parametrize("option", [dict(distribution="bogus"), dict(distribution="uniform"),
                                    dict(keep_dense=["fc1"]), dict(density_overrides={"x": 0.5}),
                                    dict(pattern_overrides={"x": "1x4"})])
def test_a_single_layer_refuses_the_options_of_models(option):
    layer = keras.layers.Dense(4)
    layer.build((None, 8))
    kernel = layer.kernel.numpy()
    with pytest.raises(ValueError, match=f"prunable\\(layer\\): {next(iter(option))} applies "
                                         "to models"):
        keras_dst.prunable(layer, density=0.5, **option)
    assert np.array_equal(layer.kernel.numpy(), kernel) and layer.kernel.constraint is None


def test_the_sparse_model_keeps_the_dense_model_s_layer_and_output_names(tmp_path):
    """Wrappers are named as their layers: a loss / metric dict keyed by the model's
    output names compiles the sparse model too (the wrappers were 'sparse_<name>', and
    fit refused the dict), and `get_layer` finds the same names."""
    inputs = keras.Input((8,))
    h = keras.layers.Dense(16, activation="relu", name="body")(inputs)
    dense = keras.Model(inputs, [keras.layers.Dense(3, name="cls")(h),
                                 keras.layers.Dense(1, name="reg")(h)])
    sparse = keras_dst.prunable(dense, density=0.5)
    assert sparse.output_names == dense.output_names == ["cls", "reg"]
    assert isinstance(sparse.get_layer("body"), keras_dst.SparseWrapper)
    sparse.compile("adam", loss={"cls": keras.losses.SparseCategoricalCrossentropy(
        from_logits=True), "reg": "mse"}, metrics={"cls": ["accuracy"]}, jit_compile=True)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 8)).astype("float32")
    y = {"cls": rng.integers(0, 3, 32), "reg": rng.normal(size=(32, 1))}
    history = sparse.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[
        keras_dst.DynamicSparseTraining(update_every=1)]).history
    assert {"cls_loss", "reg_loss", "cls_accuracy"} <= set(history)
    assert_sparse_invariants(sparse)
    sparse.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras", safe_mode=True)
    assert loaded.output_names == ["cls", "reg"]
    np.testing.assert_array_equal(loaded.predict(x, verbose=0)[0], sparse.predict(x, verbose=0)[0])
    assert keras_dst.strip(sparse).output_names == ["cls", "reg"]


def test_a_layer_left_without_active_entries_is_named_in_a_warning():
    # uniform 0.03: round(0.03 * 18) = 0 entries for fc3 (it would stay empty under DST)
    with pytest.warns(UserWarning, match=r"no active entry .* in 'fc3' \(fc3/kernel: 0\.03 of 18 "
                                         r"entries\).*density_overrides"):
        model = keras_dst.prunable(mlp((10, 6, 6, 3)), density=0.03, distribution="uniform")
    assert int(np.sum(keras_dst.masks(model)["fc3/kernel"])) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # entries for every layer: no warning
        keras_dst.prunable(mlp((10, 6, 6, 3)), density=0.3, distribution="uniform")
        keras_dst.prunable(mlp((10, 6, 6, 3)), distribution={"fc1": 0.03, "fc2": 0.03, "fc3": 0.5})


def test_fan_in_denser_than_asked_is_named_in_a_warning():
    with pytest.warns(UserWarning, match=r"'fan_in' gives every output unit a whole number of "
                                         r"inputs, at least one, so these layers are denser than "
                                         r"asked: 'fc1' 0\.1 \(asked .*not 0\.05"):
        model = keras_dst.prunable(mlp((10, 6, 3)), density=0.05, pattern="fan_in")
    assert abs(keras_dst.density(model) - 9 / 78) < 1e-9


def test_a_layer_that_cannot_be_rebuilt_from_its_config_is_named_with_the_remedies():
    class Scale(keras.layers.Layer):  # its constructor takes no **kwargs
        def __init__(self, k):
            super().__init__()
            self.k = k

        def call(self, x):
            return x * self.k

    inputs = keras.Input((8,))
    model = keras.Model(inputs, keras.layers.Dense(4, name="b")(Scale(2.0, )(
        keras.layers.Dense(8, name="a")(inputs))))
    with pytest.raises(TypeError, match=r"prunable\(\): layer 'scale' \(Scale\) cannot be rebuilt "
                                        r"from its config to clone the model \(TypeError: .*\)\. "
                                        r".*or pass in_place=True"):
        keras_dst.prunable(model, density=0.5)
    assert keras_dst.prunable(model, density=0.5, in_place=True) is model
    assert keras_dst.density(model) == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("option", [
    dict(distribution="er"), dict(keep_dense=["x"]), dict(density_overrides={"x": 0.5}),
    dict(pattern_overrides={"x": "2:4"}), dict(skip_unsupported=True)])
def test_a_layer_refuses_the_options_of_a_model_naming_them(option):
    (name,) = option
    with pytest.raises(ValueError, match=rf"prunable\(layer\): {name} applies to models"):
        keras_dst.prunable(keras.layers.Dense(3), density=0.5, **option)


def test_an_unsupported_layer_alone_is_not_told_to_pass_skip_unsupported():
    class Custom(keras.layers.Layer):
        def build(self, input_shape):
            self.w = self.add_weight(shape=(input_shape[-1], 3), name="w")

        def call(self, x):
            return x @ self.w

    layer = Custom(name="mine")
    layer.build((None, 4))
    with pytest.raises(TypeError, match=r"Layer 'mine' of class Custom is not supported .*in a "
                                        r"model, leave it dense with prunable\(model, "
                                        r"skip_unsupported=True\)"):
        keras_dst.prunable(layer, density=0.5)


@pytest.mark.parametrize("in_place", [False, True], ids=["wrapped", "attached"])
def test_options_name_one_weight_of_a_layer_by_the_layers_name_and_its_path(in_place):
    # a SeparableConv's depthwise kernel alone: its pointwise kernel ([1, in, out], where a
    # MobileNet computes) keeps the model's pattern and density
    def separable():
        inputs = keras.Input((10, 8))
        x = keras.layers.SeparableConv1D(8, 3, name="sep")(inputs)
        return keras.Model(inputs, keras.layers.Dense(8, name="head")(x))

    model = separable()
    assert keras_dst.unfit_layers(model, "1x4") == {"sep/depthwise_kernel": "unstructured"}
    sparse = keras_dst.prunable(separable(), density=0.25, pattern="1x4", in_place=in_place,
                                pattern_overrides={"sep/depthwise_kernel": "unstructured"},
                                density_overrides={"sep/depthwise_kernel": 0.5})
    by_path = {t.weight.path: (str(t.pattern), float(t.mask.numpy().mean()))
               for t in keras_dst.sparse_targets(sparse)}
    assert by_path["sep/depthwise_kernel"] == ("unstructured", 0.5)
    assert by_path["sep/pointwise_kernel"][0] == by_path["head/kernel"][0] == "1x4"
    kept = keras_dst.prunable(model, density=0.5, keep_dense=["sep/pointwise_kernel"],
                              in_place=False)
    assert keras_dst.masks(kept)["sep/pointwise_kernel"].all()
    assert not keras_dst.masks(kept)["sep/depthwise_kernel"].all()
    with pytest.raises(ValueError, match=r"unknown layer names \['sep/kernel'\] in keep_dense; "
                                         r"sparsified layers are \['head', 'sep'\]; one weight "
                                         r"of a layer by the layer's name and the weight's path "
                                         r"below it, e.g. 'sep/depthwise_kernel'"):
        keras_dst.prunable(model, density=0.25, keep_dense=["sep/kernel"], in_place=False)
    with pytest.raises(ValueError, match=r"weight 'sep/pointwise_kernel'\) is given 2:4 by "
                                         r"pattern_overrides\['sep/pointwise_kernel'\] and "
                                         r"fan_in by pattern_overrides\['sep'\]"):
        keras_dst.prunable(model, density=0.5, pattern="1x4", in_place=False,
                           pattern_overrides={"sep/pointwise_kernel": "2:4", "sep": "fan_in"})


def test_a_weight_s_own_name_that_another_layer_goes_by_is_not_given_by_unfit_layers():
    # the Dense 'depthwise_kernel' inside the nested model 'sep' has the place
    # 'sep/depthwise_kernel', which prunable reads first: unfit_layers keys the separable
    # layer whole, so that its overrides reach it
    inner_in = keras.Input((10, 8))
    conv = keras.Model(inner_in, keras.layers.SeparableConv1D(8, 3, name="sep")(inner_in),
                       name="convs")
    dense_in = keras.Input((8, 8))
    dense = keras.Model(dense_in, keras.layers.Dense(8, name="depthwise_kernel")(dense_in),
                        name="sep")
    inputs = keras.Input((10, 8))
    model = keras.Model(inputs, dense(conv(inputs)))
    unfit = keras_dst.unfit_layers(model, "1x4")
    assert list(unfit.values()) == ["unstructured"] and len(unfit) == 1
    sparse = keras_dst.prunable(model, density=0.5, pattern="1x4", pattern_overrides=unfit)
    by_path = {t.weight.path: str(t.pattern) for t in keras_dst.sparse_targets(sparse)}
    assert sorted(by_path.values()) == ["1x4", "unstructured", "unstructured"]


def test_distribution_dicts_name_one_weight_and_a_missing_one_by_its_own_name():
    inputs = keras.Input((10, 8))
    x = keras.layers.SeparableConv1D(8, 3, name="sep")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(8, name="head")(x))
    with pytest.raises(ValueError, match=r"must name every sparsified layer \(or each of its "
                                         r"weights\); missing \['sep/pointwise_kernel'\]"):
        keras_dst.prunable(model, distribution={"sep/depthwise_kernel": 0.5, "head": 0.5})
    sparse = keras_dst.prunable(model, distribution={"sep/depthwise_kernel": 0.5, "head": 0.5,
                                                     "sep/pointwise_kernel": 0.25})
    assert {k: float(m.mean()) for k, m in keras_dst.masks(sparse).items()} == {
        "sep/depthwise_kernel": 0.5, "sep/pointwise_kernel": 0.25, "head/kernel": 0.5}


def test_wrapping_an_unbuilt_layer_whose_build_takes_several_shapes_says_to_build_it():
    # (MultiHeadAttention.build(query_shape, value_shape): Keras's TypeError named neither)
    wrapper = keras_dst.prunable(keras.layers.MultiHeadAttention(2, 8, name="mha"), density=0.3)
    inputs = keras.Input((6, 16))
    with pytest.raises(ValueError, match=r"SparseWrapper 'sparse_mha': cannot build layer 'mha' "
                                         r"\(MultiHeadAttention\) from the shape of its first "
                                         r"input .*build the layer before wrapping it"):
        wrapper(inputs, inputs)
    built = keras.layers.MultiHeadAttention(2, 8, name="mha2")
    built(inputs, inputs)
    assert keras_dst.prunable(built, density=0.3)(inputs, inputs).shape == (None, 6, 16)

    class Buggy(keras.layers.Dense):  # a genuine TypeError of a build keeps its own words
        def build(self, input_shape):
            return input_shape[-1] + None

    with pytest.raises(TypeError, match="unsupported operand"):
        keras_dst.prunable(Buggy(3), density=0.5)(keras.Input((4,)))
