"""keras-hub models made prunable as they are (no rebuild): BERT and GPT-2, small configs.

keras-hub's backbones and tasks are `Model` subclasses (built functionally, but their
own classes), so `prunable` attaches the masks to their layers in place. Built from
configs with random weights: nothing is downloaded. Skipped without keras-hub
(``pip install -e ".[hub]"``).
"""

import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_dst
from keras_dst.masks import layer_stats

from conftest import LOSS, EveryStep, active_counts, assert_sparse_invariants

keras_hub = pytest.importorskip("keras_hub")

def train_save_reload(model, x, y, tmp_path, steps):
    """DST through fit with invariants after every step; saved, refused by Keras's loader,
    reloaded by keras_dst with equal masks and predictions."""
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=LOSS, jit_compile=False)
    checker = EveryStep(active_counts(model))
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[
        keras_dst.DynamicSparseTraining(prune="magnitude", grow="gradient", update_every=2),
        checker])
    assert checker.steps == steps and checker.changed >= steps // 2 - 1
    path = str(tmp_path / f"{model.name}.keras")
    keras_dst.save_model(model, path)
    with pytest.raises(ValueError, match="could not be loaded"):
        keras.models.load_model(path)  # refused, not a silently dense model
    loaded = keras_dst.load_model(path)
    assert type(loaded) is type(model)
    a, b = keras_dst.masks(model), keras_dst.masks(loaded)
    assert a.keys() == b.keys()  # keras-hub names every layer: the paths match
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0),
                               atol=1e-5)
    assert_sparse_invariants(loaded, active_counts(model))
    return loaded


def bert_classifier(vocabulary_size, num_layers, hidden_dim, max_sequence_length):
    """A small `BertTextClassifier` (2 heads, 2 classes, no preprocessor), random weights."""
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=vocabulary_size, num_layers=num_layers, num_heads=2,
        hidden_dim=hidden_dim, intermediate_dim=2 * hidden_dim,
        max_sequence_length=max_sequence_length)
    return keras_hub.models.BertTextClassifier(backbone, num_classes=2, preprocessor=None)


def bert_data(n, length, vocabulary_size):
    """BERT inputs (random token ids, one segment, no padding), labels from the first token."""
    rng = np.random.default_rng(0)
    x = {"token_ids": rng.integers(0, vocabulary_size, (n, length)).astype("int32"),
         "segment_ids": np.zeros((n, length), "int32"),
         "padding_mask": np.ones((n, length), "int32")}
    return x, (x["token_ids"][:, 0] % 2).astype("int32")


def test_bert_text_classifier(tmp_path):
    clf = bert_classifier(vocabulary_size=300, num_layers=2, hidden_dim=32,
                          max_sequence_length=16)
    assert keras_dst.prunable(clf, density=0.2) is clf
    paths = set(keras_dst.masks(clf))
    # Dense, EinsumDense (inside MultiHeadAttention), Embedding, ReversibleEmbedding,
    # keras-hub's PositionEmbedding; LayerNormalization and biases stay dense.
    assert {"token_embedding/embeddings", "position_embedding/embeddings",
            "segment_embedding/embeddings", "pooled_dense/kernel", "logits/kernel",
            "transformer_layer_1/self_attention_layer/query/kernel",
            "transformer_layer_0/feedforward_intermediate_dense/kernel"} <= paths
    assert len(paths) == 17 and abs(keras_dst.density(clf) - 0.2) < 1e-4
    x, y = bert_data(n=32, length=12, vocabulary_size=300)
    train_save_reload(clf, x, y, tmp_path, steps=4)


def test_warnings_in_a_task_s_fit_point_at_the_users_line():
    """keras-hub's tasks override `fit` (`PipelineModel.fit`): a warning of keras_dst names
    the user's ``fit`` line, not keras-hub's."""
    import warnings

    clf = bert_classifier(vocabulary_size=50, num_layers=1, hidden_dim=8,
                          max_sequence_length=8)
    keras_dst.prunable(clf, density=0.5)
    clf.compile(optimizer=keras.optimizers.SGD(0.01), loss=LOSS)
    x, y = bert_data(n=8, length=8, vocabulary_size=50)
    dst = keras_dst.DynamicSparseTraining(update_every=1)
    clf.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[dst])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clf.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[dst])  # past the cosine
    ended = [w for w in caught if "prune-rate schedule has ended" in str(w.message)]
    assert ended and all(w.filename == __file__ for w in ended), [w.filename for w in ended]


@pytest.mark.parametrize("pattern", ["1x4", "fan_in"])
def test_bert_with_a_pattern_trains_where_it_fits(pattern):
    # unfit_layers names the attention blocks' query/key/value kernels (two output axes)
    # by the names prunable takes, not their output projection, which fits; the token
    # embedding's gradient reaches the optimizer dense with an unknown first dimension,
    # which the pattern's growth refused
    clf = bert_classifier(vocabulary_size=100, num_layers=1, hidden_dim=16,
                          max_sequence_length=8)
    unfit = keras_dst.unfit_layers(clf, pattern)
    qkv = [f"self_attention_layer/{n}/kernel" for n in ("query", "key", "value")]
    assert set(qkv) <= set(unfit) and "self_attention_layer" not in unfit
    keras_dst.prunable(clf, density=0.3, pattern=pattern, pattern_overrides=unfit)
    patterns = {t.weight.path: str(t.pattern) for t in keras_dst.sparse_targets(clf)}
    assert patterns["token_embedding/embeddings"] == pattern
    output = next(path for path in patterns if path.endswith("attention_output/kernel"))
    assert patterns[output] == pattern
    before = keras_dst.masks(clf)
    x, y = bert_data(n=16, length=8, vocabulary_size=100)
    clf.compile(optimizer=keras.optimizers.Adam(1e-3), loss=LOSS, jit_compile=False)
    clf.fit(x, y, batch_size=8, epochs=1, verbose=0,
            callbacks=[keras_dst.DynamicSparseTraining(prune="magnitude", grow="gradient",
                                                       update_every=1)])
    assert_sparse_invariants(clf, active_counts(clf))
    after = keras_dst.masks(clf)
    assert (after["token_embedding/embeddings"] != before["token_embedding/embeddings"]).any()
    for t in keras_dst.sparse_targets(clf):
        assert keras_dst.patterns.violation(t.pattern, after[t.weight.path]) is None


def test_gpt2_causal_lm(tmp_path):
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=200, num_layers=2, num_heads=2, hidden_dim=32, intermediate_dim=64,
        max_sequence_length=16)
    lm = keras_hub.models.GPT2CausalLM(backbone, preprocessor=None)
    assert keras_dst.prunable(lm, density=0.25) is lm
    assert "token_embedding/embeddings" in keras_dst.masks(lm)  # tied: also the LM head
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 200, (32, 13)).astype("int32")
    x = {"token_ids": tokens[:, :-1], "padding_mask": np.ones((32, 12), "int32")}
    loaded = train_save_reload(lm, x, tokens[:, 1:], tmp_path, steps=4)
    # Generation runs through the attention cache: the same sparse kernels.
    prompt = np.zeros((2, 14), "int32")
    prompt[:, :6] = tokens[:2, :6]
    mask = np.broadcast_to(np.arange(14) < 6, (2, 14))  # generate from position 6 on
    out = loaded.generate({"token_ids": prompt, "padding_mask": mask}, max_length=14,
                          stop_token_ids=None)
    assert out["token_ids"].shape == (2, 14)
    np.testing.assert_array_equal(out["token_ids"][:, :6], tokens[:2, :6])


def test_vit_image_classifier_leaves_its_class_token_dense(tmp_path):
    # The class token [1, 1, hidden] is a vector, not a matrix of an unknown layer: the
    # patch and position embeddings inside its layer get masks, the token stays dense.
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.ViTBackbone(image_shape=(16, 16, 3), patch_size=4,
                                            num_layers=1, num_heads=2, hidden_dim=16,
                                            mlp_dim=32)
    clf = keras_hub.models.ViTImageClassifier(backbone=backbone, num_classes=2,
                                              preprocessor=None)
    assert keras_dst.prunable(clf, density=0.3) is clf
    paths = set(keras_dst.masks(clf))
    embedding = "vit_patching_and_embedding"
    assert {f"{embedding}/patch_embedding/kernel",
            f"{embedding}/position_embedding/embeddings"} <= paths
    assert not any("class_token" in p for p in paths)
    x = np.random.default_rng(0).normal(size=(16, 16, 16, 3)).astype("float32")
    train_save_reload(clf, x, (x[:, 0, 0, 0] > 0).astype("int32"), tmp_path, steps=2)


def test_clip_encoders_with_same_named_layers_are_keyed_by_their_place(tmp_path):
    # CLIP's vision and text encoders create layers of the same names: their variables
    # share paths ('encoder_block_0/attention/query/kernel'), so those weights are keyed
    # by their place in the model, under each encoder's name.
    keras.utils.set_random_seed(0)
    vision = keras_hub.models.CLIPVisionEncoder(patch_size=4, hidden_dim=16, num_layers=1,
                                                num_heads=2, intermediate_dim=32,
                                                image_shape=(16, 16, 3))
    text = keras_hub.models.CLIPTextEncoder(vocabulary_size=50, embedding_dim=16,
                                            hidden_dim=16, num_layers=1, num_heads=2,
                                            intermediate_dim=32, max_sequence_length=8)
    clip = keras_hub.models.CLIPBackbone(vision, text, projection_dim=8)
    n, batch = 16, 8
    rng = np.random.default_rng(0)
    x = {"images": rng.random((n, 16, 16, 3)).astype("float32"),
         "token_ids": rng.integers(1, 50, (n, 8)).astype("int32")}
    clip(x)
    # options name one encoder's layer by its place ('encoder_block_0/attention' is the
    # name and path of both encoders' attention)
    assert keras_dst.prunable(clip, density=0.3,
                              keep_dense=["clip_text_encoder/encoder_block_0/attention"]) is clip
    keys = list(keras_dst.masks(clip))
    query = "encoder_block_0/attention/query/kernel"
    assert {f"clip_vision_encoder/{query}", f"clip_text_encoder/{query}"} <= set(keys)
    assert len(keys) == len(set(keys)) == len(keras_dst.sparse_targets(clip)) == 18
    assert keras_dst.masks(clip)[f"clip_text_encoder/{query}"].all()
    assert not keras_dst.masks(clip)[f"clip_vision_encoder/{query}"].all()
    # contrastive: image i goes with text i of its batch
    labels = np.tile(np.arange(batch), n // batch)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    clip.compile(keras.optimizers.Adam(1e-3), loss={"vision_logits": loss, "text_logits": loss},
                 jit_compile=True)
    before = keras_dst.masks(clip)
    checker = EveryStep(active_counts(clip))
    history = clip.fit(x, {"vision_logits": labels, "text_logits": labels}, batch_size=batch,
                       epochs=2, shuffle=False, verbose=0, callbacks=[
                           keras_dst.DynamicSparseTraining(update_every=2), checker])
    assert checker.steps == 4
    dense_1 = "encoder_block_0/dense_1/kernel"
    assert {f"density/clip_text_encoder/{dense_1}"} <= set(history.history)
    after = keras_dst.masks(clip)
    for encoder in ("clip_vision_encoder", "clip_text_encoder"):
        assert (after[f"{encoder}/{dense_1}"] != before[f"{encoder}/{dense_1}"]).any()
    path = str(tmp_path / "clip.keras")
    keras_dst.save_model(clip, path)
    loaded = keras_dst.load_model(path)
    # Rebuilt from its config, each encoder names its layers after itself
    # ('clip_vision_encoder_encoder_block_0'): no path repeats there, and the keys are
    # the new paths, in the same order, holding the same masks.
    reloaded = keras_dst.masks(loaded)
    assert f"clip_vision_encoder_{query}" in reloaded
    assert len(reloaded) == len(keys)
    for a, b in zip(after.values(), reloaded.values()):
        np.testing.assert_array_equal(a, b)
    for name, value in clip.predict(x, verbose=0).items():
        np.testing.assert_allclose(loaded.predict(x, verbose=0)[name], value, atol=1e-5)


def test_backbone_alone_names_and_strip():
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=100, num_layers=2, num_heads=2, hidden_dim=16, intermediate_dim=32,
        max_sequence_length=8)
    x = {"token_ids": np.ones((2, 8), "int32"), "segment_ids": np.zeros((2, 8), "int32"),
         "padding_mask": np.ones((2, 8), "int32")}
    # A name matches that layer in every block (a MultiHeadAttention is one layer with four
    # kernels), a path one layer.
    assert keras_dst.prunable(backbone, density=0.5, keep_dense=["self_attention_layer"],
                              density_overrides={
        "transformer_layer_1/feedforward_output_dense": 0.1}) is backbone
    densities = {r["path"]: r["density"] for r in layer_stats(backbone)}
    assert densities["transformer_layer_0/self_attention_layer/query/kernel"] == 1.0
    assert densities["transformer_layer_1/self_attention_layer/query/kernel"] == 1.0
    assert densities["transformer_layer_1/feedforward_output_dense/kernel"] == pytest.approx(0.1, abs=1e-3)
    assert densities["transformer_layer_0/feedforward_output_dense/kernel"] > 0.2
    out = backbone.predict(x, verbose=0)["sequence_output"]
    assert keras_dst.strip(backbone) is backbone and not keras_dst.masks(backbone)
    np.testing.assert_array_equal(backbone.predict(x, verbose=0)["sequence_output"], out)


def _hub_text():
    root = pathlib.Path(__file__).resolve().parents[1]
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from examples import hub_text  # defines no flags on import

    return root, hub_text


def test_hub_text_example_labels_need_word_order():
    _, hub_text = _hub_text()
    texts, labels = hub_text.make_data(300, seed=0)
    vocab = set(hub_text.vocabulary())
    for text, label in zip(texts, labels):
        words = text.split()
        assert set(words) <= vocab
        score, negated = 0, False
        for w in words:  # the rule, read left to right: a negation flips the next adjective
            if w in hub_text.NEGATIONS:
                negated = True
            elif w in hub_text.POSITIVE or w in hub_text.NEGATIVE:
                score += (1 if w in hub_text.POSITIVE else -1) * (-1 if negated else 1)
                negated = False
        assert score != 0 and label == int(score > 0), text
    assert 0.4 < labels.mean() < 0.6
    assert any(n in texts[i].split() for i in range(300) for n in hub_text.NEGATIONS)


@pytest.mark.slow
def test_hub_text_example_runs(tmp_path):
    root, _ = _hub_text()
    env = {**os.environ, "PYTHONPATH": str(root), "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(root / "examples" / "hub_text.py"), "--methods=dense,dst",
         "--num_train=96", "--num_test=64", "--epochs=2", "--update_every=2",
         "--hidden_dim=16", "--intermediate_dim=32", f"--output_dir={out}"],
        capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reloaded" in proc.stdout and "| DST (magnitude prune" in proc.stdout
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [r["method"] for r in runs] == ["dense", "dst"]
    assert abs(runs[1]["density"] - 0.2) < 1e-3


def test_keras_hub_embedding_tables_are_normalised_by_their_rows():
    # (PositionEmbedding's table, `position_embeddings`, was read as a Dense kernel: its
    # "input" normalisation ran per column, ReversibleEmbedding's per row)
    position = keras_hub.layers.PositionEmbedding(sequence_length=6)
    position.build((None, 6, 4))
    tables = keras_hub.layers.ReversibleEmbedding(10, 4, tie_weights=False)
    tables.build((None, 3))
    layout = keras_dst.layers.score_layout
    assert tuple(layout(position, position.position_embeddings)) == ("linear", (0,))
    assert tuple(layout(tables, tables.embeddings)) == ("linear", (0,))
    assert tuple(layout(tables, tables.reverse_embeddings)) == ("linear", (1,))  # [dim, vocab]
