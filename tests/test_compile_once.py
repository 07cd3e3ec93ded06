"""A DST model compiles its training step once: later `fit` calls trace nothing new.

The trace count is the number of times Keras's `train_step` runs in Python: once
per traced (and so XLA-compiled) training-step variant.
"""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_dst
from keras_dst import optimizer_state
from keras_dst.step_switch import StepSwitch

from conftest import LOSS, classification_data, mlp

DST = keras_dst.DynamicSparseTraining


def traced_model(metrics=None, **prunable_kwargs):
    """A compiled sparse MLP and the list that grows by one at every trace of its step."""
    model = keras_dst.prunable(mlp((20, 16, 3)), density=0.3, **prunable_kwargs)
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9), LOSS, metrics=metrics,
                  jit_compile=True)
    traces, train_step = [], model.train_step

    def counting_train_step(data):
        traces.append(1)
        return train_step(data)

    model.train_step = counting_train_step
    return model, traces


def fit(model, callbacks=(), epochs=1):
    x, y = classification_data(n=150)  # 10 batches of 16, the last one short
    model.fit(x, y, batch_size=16, epochs=epochs, verbose=0, shuffle=False,
              callbacks=list(callbacks))


def hooked(model):
    return "apply" in vars(optimizer_state.base_optimizer(model.optimizer))


def test_repeated_fits_with_evaluate_between_trace_only_in_the_first():
    model, traces = traced_model()
    x, y = classification_data(n=40)
    dst = DST(prune="magnitude", grow="gradient", update_every=3)
    counts, masks = [], [keras_dst.masks(model)]
    for _ in range(3):
        fit(model, [dst])
        counts.append(len(traces))
        model.evaluate(x, y, verbose=0)
        model.predict(x, verbose=0)
        masks.append(keras_dst.masks(model))
    assert counts == [1, 1, 1]  # one step, the update inside, traced in the first fit
    for before, after in zip(masks, masks[1:]):  # every fit really updated the topology
        assert any((before[k] != after[k]).any() for k in before)
    assert not hooked(model)


@pytest.mark.parametrize("kind", ["dst", "gradual"])
def test_compiled_metrics_are_built_before_the_first_trace(kind):
    """With ``compile(metrics=...)`` the first fit traced its step twice: Keras builds the
    metrics' variables in the first trace, which `tf.function` then traces again. They are
    built from the data's spec first (as Keras does under a strategy): as many traces as
    without metrics (DST: one step; GradualPruning: the static step and the one with its
    update), and the same numbers as a twin whose first trace builds them."""
    def metrics():
        return ["accuracy", keras.metrics.SparseTopKCategoricalAccuracy(k=2, name="top2")]

    def make():
        return DST(update_every=3, schedule="constant") if kind == "dst" else \
            keras_dst.GradualPruning(0.2, update_every=3, end_step=30)

    x, y = classification_data(n=150)
    counts = {}
    for with_metrics in (False, True):
        model, traces = traced_model(metrics=metrics() if with_metrics else None)
        counts[with_metrics] = []
        for _ in range(2):
            history = model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False,
                                callbacks=[make()])
            counts[with_metrics].append(len(traces))
    assert counts[True] == counts[False] == ([1, 1] if kind == "dst" else [2, 2])
    assert {"accuracy", "top2"} <= set(history.history)
    twin = keras_dst.prunable(mlp((20, 16, 3)), density=0.3)
    twin.compile(keras.optimizers.SGD(0.05, momentum=0.9), LOSS, metrics=metrics(),
                 jit_compile=True)
    twin.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    twin.set_weights(model.get_weights())
    expected = twin.evaluate(x, y, batch_size=16, verbose=0, return_dict=True)
    result = model.evaluate(x, y, batch_size=16, verbose=0, return_dict=True)
    for name in ("loss", "accuracy", "top2"):
        np.testing.assert_allclose(result[name], expected[name], rtol=1e-6)


def test_a_custom_train_step_builds_its_metrics_from_the_y_it_passes():
    """A `train_step` of one's own may hand the metrics another ``y`` than the data's (here
    one-hot labels from class indices), which decides what "accuracy" is: such a model's
    metrics are built in its trace, as plain Keras builds them (built from the data's
    spec, "accuracy" became the sparse one and the fit failed on the one-hot labels)."""

    class OneHotInStep(keras.Model):
        def train_step(self, data):
            x, y = data
            y = tf.one_hot(tf.cast(y, "int32"), 3)
            with tf.GradientTape() as tape:
                y_pred = self(x, training=True)
                loss = self.compute_loss(x=x, y=y, y_pred=y_pred)
            self.optimizer.apply(tape.gradient(loss, self.trainable_variables),
                                 self.trainable_variables)
            return self.compute_metrics(x, y, y_pred)

    x, y = classification_data(n=64)
    logged = []
    for hooked in (False, True):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((int(x.shape[1]),))
        model = keras_dst.prunable(OneHotInStep(inputs, keras.layers.Dense(3)(inputs)),
                                   density=0.5, seed=1)
        model.compile(keras.optimizers.SGD(0.05),
                      keras.losses.CategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"], jit_compile=True)
        callbacks = [DST(update_every=100, schedule="constant")] if hooked else []
        history = model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False,
                            callbacks=callbacks)  # (no update: the same weights)
        logged.append(history.history["accuracy"])
    assert logged[0] == logged[1]


def test_a_loss_scale_optimizer_is_built_whole_before_the_first_trace():
    """Under mixed_float16 the first fit traced its step twice: keras_dst built the inner
    optimizer only, and the LossScaleOptimizer made its own variables in the first trace."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model, traces = traced_model()
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        dst = DST(prune="snip", grow="gradient", update_every=3)
        counts = []
        for _ in range(2):
            fit(model, [dst])
            counts.append(len(traces))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert counts == [1, 1]


def test_epoch_edges_and_later_updates_trace_nothing():
    model, traces = traced_model()
    fit(model, [DST(prune="snip", grow="gradient", update_every=4)], epochs=3)
    assert len(traces) == 1


def test_equal_configuration_reuses_a_changed_one_compiles_once():
    model, traces = traced_model()
    fit(model, [DST(update_every=3, seed=1)])
    assert len(traces) == 1
    fit(model, [DST(update_every=3, seed=1)])  # a new callback, equal configuration
    assert len(traces) == 1
    fit(model, [DST(update_every=4, seed=1)])  # changed: its step is new
    assert len(traces) == 2
    fit(model, [DST(update_every=4, seed=1)])
    fit(model, [DST(update_every=3, seed=1)])
    assert len(traces) == 2
    mest = keras_dst.get_criterion("mest", gamma=0.5)  # parameters are configuration too
    fit(model, [DST(prune=mest)])
    fit(model, [DST(prune=keras_dst.get_criterion("mest", gamma=0.5))])
    fit(model, [DST(prune=keras_dst.get_criterion("mest", gamma=2.0))])
    assert len(traces) == 4


def test_a_fit_of_another_length_compiles_again_only_where_the_schedule_depends_on_it():
    """A fit's length is configuration only through what is made from it: the horizon
    of the default cosine schedule (without total_steps)."""
    model, traces = traced_model()
    x, y = classification_data(n=160)

    def fit_batches(n, callback):
        model.fit(x[:16 * n], y[:16 * n], batch_size=16, verbose=0, shuffle=False,
                  callbacks=[callback])

    fit_batches(10, DST(update_every=3, schedule="constant"))
    fit_batches(5, DST(update_every=3, schedule="constant"))  # its rates do not depend on it
    assert len(traces) == 1
    fit_batches(10, DST(update_every=3, total_steps=40))  # cosine over 40 steps
    fit_batches(5, DST(update_every=3, total_steps=40))
    fit_batches(7, DST(update_every=3, schedule=keras_dst.schedules.cosine(0.5, 40)))  # the same
    assert len(traces) == 2
    with pytest.warns(UserWarning, match="after the cosine prune-rate schedule has ended"):
        fit_batches(5, DST(update_every=3))  # cosine over this fit's 5 steps: a new schedule
    assert len(traces) == 3
    fit_batches(6, DST(update_every=3))  # and over 6
    assert len(traces) == 4
    with warnings.catch_warnings(record=True) as caught:  # an explicit horizon: the user's
        warnings.simplefilter("always")
        fit_batches(5, DST(update_every=3, schedule=keras_dst.schedules.cosine(0.5, 40)))
        fit_batches(5, DST(update_every=3, total_steps=40))
    assert not [w for w in caught if "prune-rate schedule has ended" in str(w.message)]
    assert len(traces) == 4
    # an end_step fraction resolves against this fit's steps: past it, the fit updates nothing
    with pytest.warns(UserWarning, match=r"DynamicSparseTraining: this fit runs optimizer steps "
                                         r"\d+-\d+ \(1-based\), all after its last update step"):
        fit_batches(5, DST(update_every=3, schedule="constant", end_step=0.5))


def test_a_schedule_that_needs_no_length_trains_on_a_dataset_without_one():
    model, _ = traced_model()
    x, y = classification_data(n=64)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(16).filter(lambda *_: True)
    assert data.cardinality() == tf.data.UNKNOWN_CARDINALITY
    dst = DST(update_every=2, schedule="constant")
    model.fit(data, epochs=2, verbose=0, callbacks=[dst])
    assert int(dst.engine.last_update_step.numpy()) == 8
    with pytest.raises(ValueError, match=r"schedule='cosine' needs the number of training steps.*"
                                         r"steps_per_epoch= to fit\(\), or total_steps= to "
                                         r"DynamicSparseTraining"):
        model.fit(data, epochs=1, verbose=0, callbacks=[DST(update_every=2)])
    with pytest.raises(ValueError, match="end_step=0.5 needs the number of training steps"):
        model.fit(data, epochs=1, verbose=0,
                  callbacks=[DST(update_every=2, schedule="constant", end_step=0.5)])
    # empty data is no dataset without a length: the message says what it is
    before = {k: v.copy() for k, v in keras_dst.masks(model).items()}
    with pytest.raises(ValueError, match=r"no training data \(0 batches per epoch\), so "
                                         r"schedule='cosine'"):
        model.fit(x[:0], y[:0], epochs=1, verbose=0, callbacks=[DST(update_every=2)])
    assert all((keras_dst.masks(model)[k] == v).all() for k, v in before.items())
    # a fraction resolved before begin_step: the message gives the fraction and the run
    with pytest.raises(ValueError, match=r"DynamicSparseTraining\(end_step=0.1, a fraction of "
                                         r"the run's 8 steps\): end_step must be >= begin_step"):
        model.fit(x, y, batch_size=16, epochs=2, verbose=0,
                  callbacks=[DST(update_every=1, begin_step=5, end_step=0.1)])


def test_plain_fit_after_dst_runs_the_static_step_without_hook():
    """A plain fit traces the static step once (as any Keras model's first fit does),
    with no hook; later plain and DST fits trace nothing."""
    model, traces = traced_model()
    dst = DST(update_every=3)
    fit(model, [dst])
    assert len(traces) == 1 and not hooked(model)
    masks = keras_dst.masks(model)
    fit(model)
    assert len(traces) == 2 and not hooked(model)
    fit(model)
    fit(model, [dst])
    assert len(traces) == 2 and not hooked(model)
    fit(model)
    masks = keras_dst.masks(model)
    fit(model)
    after = keras_dst.masks(model)
    assert all((masks[k] == after[k]).all() for k in masks)  # no update ran
    for t in keras_dst.sparse_targets(model):  # and the constraint still ran
        assert np.all(t.weight.numpy()[~t.mask.numpy()] == 0)


def _weight_sized_fills(graph, sizes):
    """Nodes of a traced graph (its nested loop bodies included) that materialise a
    tensor of one of `sizes` elements from constants alone: a Fill with constant dims,
    or a Const. TensorFlow folds a fill into a constant before XLA sees the step, at
    every compile (tens of milliseconds per megabyte)."""
    graph_def = graph.as_graph_def()
    functions = [graph_def.node] + [f.node_def for f in graph_def.library.function]
    found = []
    for nodes in functions:
        by_name = {n.name: n for n in nodes}
        for n in nodes:
            if n.op == "Const":
                elements = int(np.prod([d.size for d in n.attr["value"].tensor.tensor_shape.dim]))
            elif n.op == "Fill":
                dims = by_name.get(n.input[0].split(":")[0])
                if dims is None or dims.op != "Const":
                    continue
                elements = int(np.prod(tf.make_ndarray(dims.attr["value"].tensor)))
            else:
                continue
            if elements in sizes and "/Initializer/" not in n.name:  # (a variable's, not the step's)
                found.append((n.op, n.name, elements))
    return found


@pytest.mark.parametrize("prune, ordering", [("magnitude", "auto"), ("snip", "auto"),
                                             ("magnitude", "before_optimizer")])
def test_traced_steps_fill_nothing_of_a_weight_size(prune, ordering):
    """Neither the static step (the mask constraint) nor the DST step (the update's
    gated reads and masked writes) zeroes entries through a fill of the weight's shape."""
    model = keras_dst.prunable(mlp((20, 64, 3)), density=0.3)
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9), LOSS, jit_compile=True)
    graphs, train_step = [], model.train_step

    def recording_train_step(data):
        graphs.append(tf.compat.v1.get_default_graph())
        return train_step(data)

    model.train_step = recording_train_step
    sizes = {int(np.prod(t.weight.shape)) for t in keras_dst.sparse_targets(model)}
    fit(model)
    fit(model, [DST(prune=prune, grow="gradient", update_every=3, ordering=ordering,
                    optimizer_state="reset")])
    assert len(graphs) >= 2  # the static step (Keras may trace it twice) and the DST step
    for graph in graphs:
        assert _weight_sized_fills(graph, sizes) == []


def test_compile_again_gives_new_steps():
    model, traces = traced_model()
    dst = DST(update_every=3)
    fit(model, [dst])
    model.compile(keras.optimizers.Adam(0.01), LOSS, jit_compile=True)
    fit(model, [dst])
    assert len(traces) == 2 and not hooked(model)
    fit(model, [dst])
    assert len(traces) == 2


@pytest.mark.parametrize("make", [
    lambda: keras_dst.GradualPruning(final_density=0.1, begin_step=0, end_step=21, update_every=3),
    lambda: keras_dst.CriteriaOverlap(["magnitude", "snip"], update_every=3),
], ids=["gradual", "overlap"])
def test_sibling_callbacks_compile_once(make):
    model, traces = traced_model()
    fit(model, [make()])
    first = len(traces)
    fit(model, [make()])
    fit(model, [make()])
    assert len(traces) == first


def test_a_discarded_model_its_compiled_steps_and_callback_are_collectable():
    """Nothing keeps a DST model alive once the user drops it (no registry, no global
    cache): the model, its compiled step variants, engines and callback are collected."""
    import gc
    import weakref

    model, _ = traced_model()
    dst = DST(update_every=3)
    fit(model, [dst])
    model.evaluate(*classification_data(n=16), verbose=0)
    switch = model.__dict__[StepSwitch.ATTR]
    refs = [weakref.ref(o) for o in (model, dst, dst.engine, switch,
                                     *switch._functions.values())]
    del model, dst, switch
    gc.collect()
    assert [r() is None for r in refs] == [True] * len(refs)


def test_a_model_reloaded_from_disk_compiles_once_across_its_fits(tmp_path):
    """A DST model saved after training and loaded again (a reopened notebook, a resumed
    job): its first DST fit, with a new callback of an equal configuration, traces one
    step; the next fits trace nothing, and each updates the topology."""
    model, _ = traced_model()
    fit(model, [DST(update_every=3, total_steps=40)])
    model.save(tmp_path / "m.keras")
    loaded = keras_dst.load_model(tmp_path / "m.keras")
    traces, train_step = [], loaded.train_step

    def counting_train_step(data):
        traces.append(1)
        return train_step(data)

    loaded.train_step = counting_train_step
    counts, masks = [], [keras_dst.masks(loaded)]
    for _ in range(3):
        fit(loaded, [DST(update_every=3, total_steps=40)])
        counts.append(len(traces))
        masks.append(keras_dst.masks(loaded))
    assert counts == [1, 1, 1]
    for before, after in zip(masks, masks[1:]):
        assert any((before[k] != after[k]).any() for k in before)
