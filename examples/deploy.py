"""`train.py --export`: export the trained model, check it on the test set, compare with dense.

* ``litert``: ``<output_dir>/model.tflite`` (`keras_dst.export`, float32, the
  converter's sparsity optimisation) and ``model_dense.tflite`` (the same
  stripped model without it). Prints the export report (per weight: stored
  sparse or dense, and why), the exported model's test accuracy (the LiteRT
  interpreter over the whole test set) next to the Keras model's, the file size
  against the dense export, and the batch-1 latency of both exports (1 thread,
  ``ROUNDS`` interleaved rounds, median of per-round ratios).
* ``tf_saved_model``: ``<output_dir>/saved_model`` (the stripped model); prints its
  test accuracy served through ``tf.saved_model.load``.

Needs the LiteRT runtime for ``litert`` (``pip install "keras-dst[litert]"``).
"""

import os
import statistics

import numpy as np
import tensorflow as tf
from absl import logging

import keras_dst

FORMATS = ("none", "litert", "tf_saved_model")
ROUNDS = 15          # interleaved latency rounds (sparse, dense, dense, sparse, ...)
ROUND_SECONDS = 0.05  # wall time of one measurement


def _test_arrays(test_ds):
    xs, ys = [], []
    for x, y in test_ds.as_numpy_iterator():
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


def _accuracy(logits, y, binary):
    logits = np.asarray(logits)
    if binary:
        predicted = (logits.reshape(len(y), -1)[:, 0] > 0).astype(np.int64)
    else:
        predicted = logits.argmax(axis=-1)
    return float(np.mean(predicted == np.asarray(y).reshape(-1)))


def _speed_words(speedup):
    """A dense / sparse latency ratio in words: "1.52 x faster" or "1.25 x slower"."""
    if speedup >= 1.0:
        return f"{speedup:.2f} x faster"
    return f"{1.0 / speedup:.2f} x slower" if speedup > 0 else "no ratio"


def latency_vs_dense(sparse_path, dense_path, rounds=ROUNDS, batch_size=1, threads=1):
    """Batch-`batch_size` latency of two .tflite files, interleaved: (sparse µs, dense µs,
    speedup = median over rounds of dense / sparse)."""
    models = [keras_dst.LiteRTModel(p, num_threads=threads) for p in (sparse_path, dense_path)]
    runs = []
    for m in models:
        m.prepare(batch_size=batch_size)
        runs.append(max(1, int(ROUND_SECONDS / max(m.time_invoke(runs=5), 1e-7))))
    times = [[], []]
    for r in range(rounds):
        order = (0, 1) if r % 2 == 0 else (1, 0)
        for i in order:
            times[i].append(models[i].time_invoke(runs=runs[i]))
    speedup = statistics.median(d / s for s, d in zip(*times))
    return 1e6 * statistics.median(times[0]), 1e6 * statistics.median(times[1]), speedup


def export_trained(config, model, test_ds, info, output_dir, keras_accuracy=None, print_fn=print):
    """Runs ``--export`` on the trained `model`; returns a JSON-able dict (None for "none")."""
    verbosity = logging.get_verbosity()
    logging.set_verbosity(min(verbosity, logging.WARNING))  # (the SavedModel writer's INFO)
    try:
        return _export_trained(config, model, test_ds, info, output_dir, keras_accuracy,
                               print_fn)
    finally:
        logging.set_verbosity(verbosity)


def _export_trained(config, model, test_ds, info, output_dir, keras_accuracy, print_fn):
    fmt = config.get("export", "none")
    if fmt == "none":
        return None
    x, y = _test_arrays(test_ds)
    if fmt == "tf_saved_model":
        path = os.path.join(output_dir, "saved_model")
        report = keras_dst.export(model, path, format="tf_saved_model")
        loaded = tf.saved_model.load(path)  # keep it: `serve` needs its variables alive
        batch = config["batch_size"]
        logits = np.concatenate([loaded.serve(tf.constant(x[i:i + batch])).numpy()
                                 for i in range(0, len(x), batch)])
        accuracy = _accuracy(logits, y, info["binary"])
        print_fn(f"exported (SavedModel) {path}: test accuracy {accuracy:.4f}"
                 + (f" (Keras model {keras_accuracy:.4f})" if keras_accuracy is not None else "")
                 + f", {report.file_bytes / 1e6:.3f} MB on disk (weights stored dense)")
        return {"format": fmt, "path": os.path.abspath(path), "test_accuracy": accuracy,
                "file_bytes": report.file_bytes}

    path = os.path.join(output_dir, "model.tflite")
    dense_path = os.path.join(output_dir, "model_dense.tflite")
    report = keras_dst.export(model, path)
    keras_dst.export(model, dense_path, sparsity=False, compare_dense=False)
    accuracy = _accuracy(report.load(num_threads=1).predict(x, batch_size=config["batch_size"]),
                         y, info["binary"])
    sparse_us, dense_us, speedup = latency_vs_dense(path, dense_path)
    print_fn(str(report))
    print_fn(
        f"exported (LiteRT)  {path}\n"
        f"  test accuracy    {accuracy:.4f} (exported model, LiteRT interpreter, "
        f"{len(y)} test examples)"
        + (f"; Keras model {keras_accuracy:.4f}" if keras_accuracy is not None else "") + "\n"
        f"  size             {report.file_bytes / 1e6:.3f} MB = {report.size_ratio:.3f} x the "
        f"dense export ({report.dense_file_bytes / 1e6:.3f} MB)\n"
        f"  latency          batch 1, 1 thread: {sparse_us:.1f} µs vs {dense_us:.1f} µs dense "
        f"(medians): {_speed_words(speedup)} (median of {ROUNDS} interleaved rounds' ratios; "
        "on a busy machine it can differ from the medians' ratio)")
    return {"format": fmt, "path": os.path.abspath(path), "test_accuracy": accuracy,
            "file_bytes": report.file_bytes, "dense_file_bytes": report.dense_file_bytes,
            "size_ratio": report.size_ratio, "sparse_kernels": report.sparse_kernels,
            "weights": len(report.weights), "densify_ops": report.densify_ops,
            "latency_us": sparse_us, "dense_latency_us": dense_us, "speedup": speedup,
            "stored": {w.weight: w.stored for w in report.weights}}


if __name__ == "__main__":
    import sys

    sys.exit("deploy.py is run by train.py: python3 examples/train.py --export=litert (or "
             "--export=tf_saved_model) trains, then exports and checks the model here.")
