"""Runs TF-MOT gradual magnitude pruning on a small MLP and records what it did.

A script, run in its own process by `test_gradual.py::test_tfmot_parity`:
importing TF-MOT switches `tf.keras` to Keras 2 (tf_keras) for the whole
process. Needs the ``tfmot`` extra (tensorflow-model-optimization, tf-keras)::

    python tests/tfmot_parity.py OUT.npz

The MLP (Dense 10-24-12-4, ReLU) gets fixed numpy initial weights, is wrapped
with ``prune_low_magnitude(PolynomialDecay(...))`` and trained with plain SGD (no
momentum), MSE and ``UpdatePruningStep`` on fixed data (no shuffling). OUT.npz
holds:

* ``config``: JSON string of the schedule and training settings (`CONFIG`);
* ``x``, ``y``: the data;
* ``kernel{i}``, ``bias{i}`` (i = 0, 1, 2): the initial weights;
* ``masks{i}``: bool [T + 1, *kernel shape]; index t >= 1 is the mask TF-MOT
  used in training step t (its ``pruning_step`` t), index 0 is all ones;
* ``kernels{i}``: float32 [T + 1, *kernel shape]; index t is the raw kernel
  after optimizer step t (pruned entries hold that step's update until TF-MOT
  re-masks them), index 0 the initial kernel.
"""

import json
import os
import sys

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow_model_optimization as tfmot  # noqa: E402
import tf_keras  # noqa: E402

CONFIG = dict(initial_sparsity=0.25, final_sparsity=0.85, begin_step=1, end_step=13,
              frequency=3, power=3, learning_rate=0.05, batch_size=8, epochs=2, samples=64,
              sizes=[10, 24, 12, 4])


def make_data_and_weights(config):
    """Fixed data and initial weights (plain numpy, so both frameworks get the same)."""
    rng = np.random.default_rng(0)
    sizes = config["sizes"]
    x = rng.normal(size=(config["samples"], sizes[0])).astype("float32")
    y = rng.normal(size=(config["samples"], sizes[-1])).astype("float32")
    weights = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        weights.append((rng.normal(scale=fan_in ** -0.5, size=(fan_in, fan_out)).astype("float32"),
                        rng.normal(scale=0.1, size=(fan_out,)).astype("float32")))
    return x, y, weights


class _Recorder(tf_keras.callbacks.Callback):
    def __init__(self, wrappers):
        super().__init__()
        self.pruning_vars = [w.pruning_vars[0] for w in wrappers]  # (kernel, mask, threshold)
        self.kernels = [[k.numpy()] for k, _, _ in self.pruning_vars]
        self.masks = [[np.ones(k.shape, bool)] for k, _, _ in self.pruning_vars]

    def on_train_batch_end(self, batch, logs=None):
        for i, (kernel, mask, _) in enumerate(self.pruning_vars):
            self.kernels[i].append(kernel.numpy())
            self.masks[i].append(mask.numpy() != 0)


def main(out_path):
    config = CONFIG
    x, y, weights = make_data_and_weights(config)
    tf_keras.utils.set_random_seed(0)
    layers = [tf_keras.layers.Dense(n, activation="relu") for n in config["sizes"][1:-1]]
    layers.append(tf_keras.layers.Dense(config["sizes"][-1]))
    model = tf_keras.Sequential([tf_keras.Input((config["sizes"][0],))] + layers)
    for layer, (kernel, bias) in zip(layers, weights):
        layer.set_weights([kernel, bias])
    schedule = tfmot.sparsity.keras.PolynomialDecay(
        initial_sparsity=config["initial_sparsity"], final_sparsity=config["final_sparsity"],
        begin_step=config["begin_step"], end_step=config["end_step"], power=config["power"],
        frequency=config["frequency"])
    pruned = tfmot.sparsity.keras.prune_low_magnitude(model, pruning_schedule=schedule)
    pruned.compile(optimizer=tf_keras.optimizers.SGD(config["learning_rate"]), loss="mse")
    wrappers = [l for l in pruned.layers if hasattr(l, "pruning_vars")]  # PruneLowMagnitude
    recorder = _Recorder(wrappers)
    pruned.fit(x, y, batch_size=config["batch_size"], epochs=config["epochs"], shuffle=False,
               verbose=0, callbacks=[tfmot.sparsity.keras.UpdatePruningStep(), recorder])
    arrays = dict(config=json.dumps(config), x=x, y=y)
    for i, (kernel, bias) in enumerate(weights):
        arrays[f"kernel{i}"], arrays[f"bias{i}"] = kernel, bias
        arrays[f"kernels{i}"] = np.stack(recorder.kernels[i])
        arrays[f"masks{i}"] = np.stack(recorder.masks[i])
    np.savez(out_path, **arrays)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUT.npz")
    main(sys.argv[1])
