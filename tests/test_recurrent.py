"""Recurrent layers (SimpleRNN, GRU, LSTM, ConvLSTM): their input and recurrent kernels are
sparsified like any kernel, wrapped or attached in place, through DST, patterns, files and
`strip`."""

import keras
import numpy as np
import pytest

import keras_dst

from conftest import EveryStep, active_counts, sparse_state

L = keras.layers


def _encoder_decoder():
    """An LSTM whose states start a second LSTM (functional, wrapped)."""
    inp = keras.Input((6, 4))
    seq, h, c = L.LSTM(8, return_sequences=True, return_state=True, name="encoder")(inp)
    x = L.LSTM(8, name="decoder")(seq, initial_state=[h, c])
    return keras.Model(inp, L.Dense(3, name="head")(x))


def _masked_gru():
    """A GRU reading an Embedding with `mask_zero` (the mask passes through the wrappers)."""
    inp = keras.Input((6,), dtype="int32")
    x = L.Embedding(12, 4, mask_zero=True, name="embedding")(inp)
    return keras.Model(inp, L.Dense(3, name="head")(L.GRU(8, name="gru")(x)))


def _stacked():
    return keras.Sequential([keras.Input((6, 4)),
                             L.SimpleRNN(8, return_sequences=True, name="simple_rnn"),
                             L.Reshape((6, 8, 1)),
                             L.ConvLSTM1D(2, 3, name="conv_lstm"),
                             L.Flatten(), L.Dense(3, name="head")])


def _bidirectional():
    """Bidirectional holds two LSTMs a wrapper cannot reach: their masks are attached."""
    return keras.Sequential([keras.Input((6, 4)), L.Bidirectional(L.LSTM(8, name="lstm"), name="bidi"),
                             L.Dense(3, name="head")])


def _generic_rnn():
    """Keras's generic RNN over stacked cells: the cells' masks are attached."""
    cells = [L.GRUCell(8, name="gru_cell"), L.SimpleRNNCell(8, name="simple_rnn_cell")]
    return keras.Sequential([keras.Input((6, 4)), L.RNN(cells, name="rnn"),
                             L.Dense(3, name="head")])


MODELS = {  # name -> (model, recurrent layers, prunable() options)
    "encoder_decoder": (_encoder_decoder, ["encoder", "decoder"], {}),
    "masked_gru": (_masked_gru, ["gru"], {}),
    "simple_rnn_conv_lstm": (_stacked, ["simple_rnn", "conv_lstm"], {}),
    "bidirectional": (_bidirectional, ["forward_lstm", "backward_lstm"], {"in_place": True}),
    "generic_rnn": (_generic_rnn, ["gru_cell", "simple_rnn_cell"], {"in_place": True}),
}


def _data(name, n=32, seed=0):
    rng = np.random.default_rng(seed)
    if name == "masked_gru":
        x = rng.integers(1, 12, size=(n, 6)).astype("int32")
        x[:, 4:] = 0  # padding the Embedding masks
    else:
        x = rng.normal(size=(n, 6, 4)).astype("float32")
    return x, rng.integers(0, 3, size=(n,))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_recurrent_kernels_train_sparse_and_survive_a_file_and_strip(name, tmp_path):
    make, recurrent, options = MODELS[name]
    keras.utils.set_random_seed(0)
    model = keras_dst.prunable(make(), density=0.3, **options)
    paths = {t.weight.path for t in keras_dst.sparse_targets(model)}
    for layer in recurrent:  # both kernels of every recurrent layer, never a bias
        for weight in ("kernel", "recurrent_kernel"):
            assert any(f"/{layer}/" in f"/{p}" and p.endswith(f"cell/{weight}") for p in paths), \
                (layer, weight, sorted(paths))
    assert not any(p.endswith("bias") for p in paths)
    counts = active_counts(model)
    before = sparse_state(model)
    model.compile(keras.optimizers.Adam(0.01),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=True)
    x, y = _data(name)
    every_step = EveryStep(counts)
    model.fit(x, y, epochs=1, batch_size=8, verbose=0, shuffle=False, callbacks=[
        keras_dst.DynamicSparseTraining(prune="magnitude", grow="gradient", update_every=2,
                                        prune_rate=0.3), every_step])
    assert every_step.steps == 4 and every_step.changed >= 1
    after = sparse_state(model)
    assert any(not np.array_equal(before[p][0], after[p][0]) for p in paths if "cell" in p)

    path = str(tmp_path / "model.keras")
    keras_dst.save_model(model, path)
    loaded = keras_dst.load_model(path)
    reloaded = list(sparse_state(loaded).values())  # (paths name the model: compare in order)
    assert len(reloaded) == len(after)
    for (mask, weight), (mask_read, weight_read) in zip(after.values(), reloaded):
        np.testing.assert_array_equal(mask_read, mask)
        np.testing.assert_array_equal(weight_read, weight)
    expected = model.predict(x, verbose=0)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), expected, atol=1e-6)
    np.testing.assert_allclose(keras_dst.strip(model).predict(x, verbose=0), expected, atol=1e-6)


def test_patterns_run_along_the_inputs_of_each_gate_unit():
    """2:4 on an LSTM: every 4 consecutive inputs of one gate unit (kernel [4, 4 x 8] and
    recurrent kernel [8, 4 x 8]) hold exactly 2 active entries, before and after DST."""
    keras.utils.set_random_seed(0)
    model = keras_dst.prunable(
        keras.Sequential([keras.Input((6, 4)), L.LSTM(8, name="lstm"), L.Dense(3, name="head")]),
        density=0.5, pattern="2:4")
    model.compile(keras.optimizers.SGD(0.05),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=True)
    x, y = _data("lstm")
    model.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[
        keras_dst.DynamicSparseTraining(update_every=2, prune_rate=0.5)])
    masks = keras_dst.masks(model)
    assert sorted(masks) == ["head/kernel", "lstm/lstm_cell/kernel",
                             "lstm/lstm_cell/recurrent_kernel"]
    for mask in masks.values():
        groups = mask.reshape(-1, 4, mask.shape[-1]).sum(axis=1)
        assert (groups == 2).all()


def test_litert_export_names_the_recurrent_layer_and_the_saved_model_serves_it(tmp_path):
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    model = keras_dst.prunable(
        keras.Sequential([keras.Input((6, 4)), L.LSTM(8, name="lstm"), L.Dense(3, name="head")]),
        density=0.3)
    with pytest.raises(ValueError, match=r"TensorList.*'lstm'.*tf_saved_model"):
        keras_dst.export(model, tmp_path / "model.tflite")
    assert not (tmp_path / "model.tflite").exists()
    keras_dst.export(model, tmp_path / "serving", format="tf_saved_model")
    x, _ = _data("lstm", n=4)
    serving = tf.saved_model.load(str(tmp_path / "serving"))  # (kept: it owns the variables)
    np.testing.assert_allclose(serving.serve(tf.constant(x)).numpy(), model.predict(x, verbose=0), atol=1e-6)


def test_a_wrapper_cannot_reach_the_cells_of_a_generic_rnn_so_in_place_is_named():
    model = _generic_rnn()
    with pytest.raises(TypeError, match=r"'rnn' of class RNN.*in_place=True"):
        keras_dst.prunable(model, density=0.3)
    assert not keras_dst.sparse_targets(model)  # nothing attached by the refusal


def test_a_wrapped_stateful_rnn_resets_its_states_through_the_wrapper():
    """Keras's RNN documents resetting a stateful model layer by layer with
    ``reset_state()``; the wrapper passes it through (and has none for other layers)."""
    model = keras.Sequential([keras.Input((3, 2), batch_size=4),
                              L.LSTM(5, stateful=True, name="lstm"), L.Dense(2, name="head")])
    sparse = keras_dst.prunable(model, density=0.5)
    x = np.random.default_rng(0).normal(size=(4, 3, 2)).astype("float32")
    first = sparse.predict(x, verbose=0)
    carried = sparse.predict(x, verbose=0)
    assert not np.allclose(first, carried)  # the states carried over: the check can fail
    resettable = [layer for layer in sparse.layers if hasattr(layer, "reset_state")]
    assert [layer.layer.name for layer in resettable] == ["lstm"]
    for layer in resettable:
        layer.reset_state()
    np.testing.assert_allclose(sparse.predict(x, verbose=0), first, rtol=1e-6)
    resettable[0].reset_states()
    np.testing.assert_allclose(sparse.predict(x, verbose=0), first, rtol=1e-6)
    with pytest.raises(AttributeError, match="layer 'head' \\(Dense\\) has no 'reset_state'"):
        sparse.get_layer("head").reset_state()
