"""DST under mixed precision ("mixed_float16" with loss scaling, "mixed_bfloat16").

Every test runs with jit_compile=True. The policy is reset to float32 after each
test (fixture `policy`).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_dst
from keras_dst.optimizer_state import base_optimizer

from conftest import (
    LOSS,
    active_counts,
    all_layers_data,
    all_layers_model,
    assert_sparse_invariants,
    classification_data,
    mlp,
)

POLICIES = ["mixed_float16", "mixed_bfloat16"]


@pytest.fixture
def policy(request):
    keras.mixed_precision.set_global_policy(request.param)
    try:
        yield request.param
    finally:
        keras.mixed_precision.set_global_policy("float32")


class InvariantCheck(keras.callbacks.Callback):
    """After every batch: bool masks, float32 kernels, inactive == 0, exact counts
    (`assert_sparse_invariants`).

    Also records, per batch, the inner optimizer's step and a copy of the masks,
    weights and running scores.
    """

    def __init__(self, counts):
        super().__init__()
        self.counts = counts
        self.history = []

    def on_train_batch_end(self, batch, logs=None):
        targets = keras_dst.sparse_targets(self.model)
        # bool masks, float32 kernels and scores, inactive == 0, finite, exact counts
        assert_sparse_invariants(targets, self.counts, dtype="float32")
        self.history.append(dict(
            step=int(base_optimizer(self.model.optimizer).iterations.numpy()),
            loss=float(logs["loss"]),
            masks={t.weight.path: t.mask.numpy().copy() for t in targets},
            weights=[v.numpy().copy() for v in self.model.trainable_variables],
            scores=[t.running_score.numpy().copy() for t in targets if t.running_score is not None]))


def _fit(model, x, y, callback_kwargs, epochs=2, batch_size=64):
    check = InvariantCheck(active_counts(model))
    dst = keras_dst.DynamicSparseTraining(update_every=2, prune_rate=0.3, seed=1,
                                          **callback_kwargs)
    model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0,
              callbacks=[dst, check])
    return check


def _churn(check):
    first, last = check.history[0]["masks"], check.history[-1]["masks"]
    return sum(int((first[k] != last[k]).sum()) for k in first)


@pytest.mark.parametrize("policy,prune,grow", [
    # magnitude + gradient under float16: also test_overflow_step_is_skipped_... (default pass)
    pytest.param("mixed_float16", "magnitude", "gradient", marks=pytest.mark.slow),
    ("mixed_float16", "running_magnitude", "gradient"),
    ("mixed_bfloat16", "snip", "random"),
    pytest.param("mixed_bfloat16", "magnitude", "gradient", marks=pytest.mark.slow),
    pytest.param("mixed_float16", "snip", "random", marks=pytest.mark.slow),
], indirect=["policy"])
def test_masks_exact_kernels_float32(policy, prune, grow):
    x, y = classification_data(n=256)
    model = keras_dst.prunable(mlp(), density=0.3, track_running_scores=prune.startswith("running"))
    assert model.dtype_policy.name == policy
    model.compile(keras.optimizers.Adam(0.01), LOSS, jit_compile=True)
    if policy == "mixed_float16":  # fit's compile wraps the optimizer for loss scaling
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    check = _fit(model, x, y, dict(prune=prune, grow=grow))
    assert _churn(check) > 0  # DST really ran
    assert all(np.isfinite(h["loss"]) for h in check.history)
    assert check.history[-1]["step"] == len(check.history)  # no step skipped here
    # the forward pass computes in the policy's compute dtype
    assert model(x[:2]).dtype == ("float16" if policy == "mixed_float16" else "bfloat16")


@pytest.mark.parametrize("policy", POLICIES, indirect=True)
def test_criteria_and_growth_scores_are_computed_in_float32(policy):
    seen = []

    @keras_dst.register_criterion("test_mp_probe_score", ordering="before_optimizer",
                                  overwrite=True)
    def probe_score(inputs):
        seen.append(("prune", inputs.weight.dtype, inputs.gradient.dtype))
        return tf.abs(inputs.weight * inputs.gradient)

    @keras_dst.register_growth("test_mp_probe_growth", needs_gradient=True, overwrite=True)
    def probe_growth(inputs):
        seen.append(("grow", inputs.weight.dtype, inputs.gradient.dtype))
        return tf.abs(inputs.gradient)

    x, y = classification_data(n=128)
    model = keras_dst.prunable(mlp(), density=0.3)
    model.compile(keras.optimizers.SGD(0.05), LOSS, jit_compile=True)
    check = _fit(model, x, y, dict(prune="test_mp_probe_score", grow="test_mp_probe_growth"), epochs=1)
    assert {s[0] for s in seen} == {"prune", "grow"}
    assert all(d == tf.float32 for _, w, g in seen for d in (w, g)), seen
    assert _churn(check) > 0


@pytest.mark.parametrize("policy", ["mixed_float16"], indirect=True)
@pytest.mark.parametrize("prune,grow", [
    ("magnitude", "gradient"),  # update after the optimizer step (ordering "after_optimizer")
    ("running_snip", "random"),  # update before it (ordering "before_optimizer") + per-step EMA
    pytest.param("running_magnitude", "random", marks=pytest.mark.slow),
])
def test_overflow_step_is_skipped_without_touching_the_topology(policy, prune, grow):
    x, y = classification_data(n=256)
    # Batch 3 (the 4th step, an update step with update_every=2) overflows float16:
    # the loss is NaN/inf, every gradient non-finite, and the LossScaleOptimizer skips it.
    x[3 * 64:4 * 64] = 1e6
    model = keras_dst.prunable(mlp(), density=0.3, track_running_scores=prune.startswith("running"))
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9), LOSS, jit_compile=True)
    check = _fit(model, x, y, dict(prune=prune, grow=grow), epochs=2)
    h = check.history
    steps = [r["step"] for r in h]
    # inner optimizer steps: the overflowing batch (index 3 of each epoch) never counts
    assert steps == [1, 2, 3, 3, 4, 5, 6, 6], steps
    for skipped in (3, 7):
        assert not np.isfinite(h[skipped]["loss"])
        before, after = h[skipped - 1], h[skipped]
        assert all(np.array_equal(before["masks"][k], after["masks"][k]) for k in before["masks"])
        assert all(np.array_equal(a, b) for a, b in zip(before["weights"], after["weights"]))
        assert all(np.array_equal(a, b) for a, b in zip(before["scores"], after["scores"]))
    # the postponed update (step 4) happens at the next finite step
    changed = [k for k in h[4]["masks"] if not np.array_equal(h[3]["masks"][k], h[4]["masks"][k])]
    assert changed
    assert all(np.all(np.isfinite(w)) for w in h[-1]["weights"])
    assert float(model.optimizer.dynamic_scale.numpy()) < 2.0**15  # the scale did back off


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["mixed_float16"], indirect=True)
def test_every_layer_type_under_mixed_float16(policy):
    model = keras_dst.prunable(all_layers_model(), density=0.3)
    model.compile(keras.optimizers.Adam(0.01), LOSS, jit_compile=True)
    x, y = all_layers_data(n=32)
    check = _fit(model, x, y, dict(prune="magnitude", grow="gradient"), epochs=2, batch_size=8)
    assert _churn(check) > 0


def test_optimizer_loss_scale_factor_is_divided_out_of_the_gradients_updates_see():
    # Keras multiplies the loss by an optimizer's `loss_scale_factor` and divides the
    # gradients by it inside `apply`: the criteria and growth rules must see the loss's own
    # gradients. MEST (|w| + gamma |g|) ranks otherwise if they do not. A power-of-two
    # factor scales exactly, so the runs agree bit for bit.
    prune, grow = "mest", "gradient"
    x, y = classification_data(n=128)

    def run(factor):
        keras.utils.set_random_seed(0)
        model = keras_dst.prunable(mlp(), density=0.3)
        model.compile(keras.optimizers.SGD(0.05, momentum=0.9, loss_scale_factor=factor), LOSS,
                      jit_compile=True)
        return _fit(model, x, y, dict(prune=prune, grow=grow), epochs=1, batch_size=16)

    plain, scaled = run(None), run(1024.0)
    assert _churn(plain) > 0
    for a, b in zip(plain.history, scaled.history, strict=True):
        assert all(np.array_equal(a["masks"][k], b["masks"][k]) for k in a["masks"]), a["step"]
        assert all(np.array_equal(u, v) for u, v in zip(a["weights"], b["weights"]))
