r"""Epoch times of TFMOT magnitude pruning (Keras 2 / tf_keras), printed as JSON.

Runs in its OWN process: importing tensorflow_model_optimization sets
TF_USE_LEGACY_KERAS=1 and makes the process use tf_keras (Keras 2), which must
not leak into the Keras 3 process of `overhead.py`. `overhead.py --tfmot`
launches this script with ``--interactive`` and interleaves its epochs with its
own variants (it writes ``go`` on stdin before every epoch).

The model is the same architecture as in `overhead.py` (`bench_models`, built
with tf_keras), wrapped with
``tfmot.sparsity.keras.prune_low_magnitude(ConstantSparsity(1 - density,
begin_step=0, frequency=100))`` and trained with ``UpdatePruningStep``, SGD with
momentum, on the same synthetic data. ``--variant=dense`` trains the plain
tf_keras model instead (a Keras 2 baseline).

Output (stdout): one line ``JSON {...}`` per epoch with ``seconds``, ``steps``,
``it0``/``it1`` (optimizer iterations at epoch begin/end), then a final
``JSON {"summary": ...}``. Everything else goes to stderr.

  python examples/benchmarks/tfmot_epoch.py --model=mlp --epochs=4 --steps_per_epoch=100
Requires: pip install tensorflow-model-optimization tf-keras
"""

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["TF_USE_LEGACY_KERAS"] = "1"  # what tfmot sets anyway; set before TF loads

from absl import app, flags  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
ROOT = os.path.dirname(os.path.dirname(HERE))
if ROOT not in sys.path:  # `from examples import cli` when run as a script
    sys.path.insert(1, ROOT)
import bench_models  # noqa: E402
import bench_utils  # noqa: E402

from examples import cli  # noqa: E402

FLAGS = flags.FLAGS


def define_flags():
    """Defines this script's flags on absl's global FLAGS (when it runs: importing
    the module defines none, so that scripts and tests can import it)."""
    flags.DEFINE_string("model", "mlp", f"one of {bench_models.MODEL_NAMES}")
    flags.DEFINE_enum("variant", "pruned", ["pruned", "dense"], "TFMOT-pruned or plain tf_keras model")
    flags.DEFINE_integer("epochs", 4, "epochs in total (the first one includes compilation)")
    flags.DEFINE_integer("steps_per_epoch", 100, "steps per epoch")
    flags.DEFINE_integer("batch_size", 128, "batch size")
    flags.DEFINE_float("density", 0.1, "fraction of weights kept (TFMOT sparsity = 1 - density)")
    flags.DEFINE_integer("frequency", 100, "TFMOT pruning frequency (steps between mask updates)")
    flags.DEFINE_float("learning_rate", 0.01, "SGD learning rate (momentum 0.9)")
    flags.DEFINE_bool("jit_compile", True, "compile the train step with XLA (tf_keras compile(jit_compile=...))")
    flags.DEFINE_bool("quick", False, "tiny model versions (for tests)")
    flags.DEFINE_bool("interactive", False, "wait for a 'go' line on stdin before every epoch")
    flags.DEFINE_integer("seed", 0, "random seed")


def emit(obj):
    print("JSON " + json.dumps(obj), flush=True)


def main(argv):
    del argv
    import tensorflow as tf

    if FLAGS.variant == "pruned":
        import tensorflow_model_optimization as tfmot
        import tf_keras as k
    else:
        import tf_keras as k
    k.utils.set_random_seed(FLAGS.seed)
    model = bench_models.build(k, FLAGS.model, quick=FLAGS.quick)
    callbacks = []
    if FLAGS.variant == "pruned":
        schedule = tfmot.sparsity.keras.ConstantSparsity(
            1.0 - FLAGS.density, begin_step=0, frequency=FLAGS.frequency)
        model = tfmot.sparsity.keras.prune_low_magnitude(model, pruning_schedule=schedule)
        callbacks.append(tfmot.sparsity.keras.UpdatePruningStep())
    optimizer = k.optimizers.SGD(FLAGS.learning_rate, momentum=0.9)
    jit = FLAGS.jit_compile
    model.compile(optimizer=optimizer,
                  loss=k.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=jit)
    ds = bench_models.synthetic_dataset(tf, FLAGS.model, FLAGS.batch_size, seed=FLAGS.seed)
    records = []

    class Timer(k.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if FLAGS.interactive:
                if epoch == 0:
                    emit({"ready": True})
                line = sys.stdin.readline()
                if not line or line.strip() != "go":
                    raise SystemExit(0)
            self.it0 = int(optimizer.iterations.numpy())
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            seconds = time.perf_counter() - self.t0
            it1 = int(optimizer.iterations.numpy())
            rec = {"epoch": epoch, "seconds": seconds, "steps": it1 - self.it0,
                   "it0": self.it0, "it1": it1}
            records.append(rec)
            emit(rec)

    model.fit(ds, epochs=FLAGS.epochs, steps_per_epoch=FLAGS.steps_per_epoch, verbose=0,
              callbacks=callbacks + [Timer()])
    timed = records[1:]
    per_step = [r["seconds"] / r["steps"] for r in timed]
    emit({"summary": {
        "model": FLAGS.model, "variant": FLAGS.variant, "jit_compile": jit,
        "batch_size": FLAGS.batch_size, "steps_per_epoch": FLAGS.steps_per_epoch,
        "density": FLAGS.density, "frequency": FLAGS.frequency,
        "median_epoch_seconds": bench_utils.median([r["seconds"] for r in timed]),
        "median_step_ms": None if not per_step else 1e3 * bench_utils.median(per_step),
        "first_epoch_seconds": records[0]["seconds"] if records else None,
        "tensorflow": tf.__version__, "tf_keras": k.__version__,
        "tfmot": (tfmot.__version__ if FLAGS.variant == "pruned" else None),
        "keras_in_use": type(model).__module__.split(".")[0],
    }})


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
