r"""Trains one model: dense, static sparse, dynamic sparse (DST) or gradual pruning (GMP).

The recipe is the paper's (Nowak et al., "Fantastic Weights and How to Find Them",
NeurIPS 2023, arXiv:2306.12230, as its reference code runs it): SGD momentum 0.9 +
Nesterov with coupled L2 weight decay on all parameters (`keras_dst.optimizers.TorchSGD`),
LR ×0.1 after 50 % and 75 % of the epochs, ERK densities, prune rate 0.5 with cosine
decay, a fixed validation split, and two test accuracies: the last epoch's model and
the best-validation-accuracy model.

With no flags it runs a small DST experiment on the offline `digits` dataset in
about a minute on a laptop CPU::

    python examples/train.py
    python examples/train.py --model conv_cifar10 --dataset cifar10 --epochs 100 \
        --batch_size 128 --update_every 800 --density 0.1 --prune magnitude --grow gradient

Outputs in --output_dir: results.json, model.keras (last epoch, with optimizer),
best.keras (best validation accuracy), history.csv and TensorBoard logs (tb/; with
the DST metrics density, density/<layer>, itop, pruned, grown, mask_churn, prune_rate),
and with ``--overlap magnitude,snip,...`` overlap.json, the Jaccard matrix of
`keras_dst.CriteriaOverlap` (for ``plot.py --overlap``). A run into the directory of an
earlier one removes that run's tb/, exports and overlap.json first.
The .keras files load with ``import keras_dst`` and ``keras.models.load_model`` alone
(the optimizer is `keras_dst.optimizers.TorchSGD`, every initializer a Keras built-in).
`run(config)` runs the same in-process from a dict of flag values.
"""

import datetime
import importlib.util
import json
import math
import os
import pathlib
import re
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python examples/train.py` as well as `import examples.train`
    sys.path.insert(0, str(ROOT))

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags, logging  # noqa: E402

import keras_dst  # noqa: E402
from examples import (
    cli,  # noqa: E402
    deploy,  # noqa: E402
    optim,  # noqa: E402
)
from examples import data as data_lib  # noqa: E402
from examples import models as models_lib  # noqa: E402

METHODS = ("dense", "static", "dst", "gmp")
STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")

# (type, name, default, help, enum values). The defaults are the paper's recipe except
# for the offline dataset / model and the short-run epochs, batch size, LR and update period.
FLAG_SPECS = [
    ("enum", "model", "mlp_digits", "Model to train (examples/models.py).",
     models_lib.model_names()),
    ("enum", "dataset", "digits", "Dataset (examples/data.py); `digits` works offline.",
     data_lib.dataset_names()),
    ("enum", "method", "dst", "dense: plain model; static: fixed random sparse masks; "
     "dst: dynamic sparse training; gmp: gradual magnitude pruning (Zhu & Gupta).", METHODS),
    ("float", "density", 0.1, "Global density in (0, 1] of the sparsified weights "
     "(static/dst: from the start; gmp: final). Left out with an N:M --pattern: N/M.", None),
    ("enum", "distribution", "erk", "How the density is spread over layers (static/dst; "
     "gmp prunes every layer to --density, as TF-MOT).", ("erk", "er", "uniform")),
    ("enum", "init", "exact", "Initial masks: exact counts, or i.i.d. Bernoulli (reference) "
     "(static/dst; gmp starts dense).",
     ("exact", "bernoulli")),
    ("string", "pattern", "unstructured", "Sparsity pattern of the sparsified weights "
     "(static/dst): unstructured, 1xB (e.g. 1x4: blocks along the input axis), N:M (e.g. "
     "2:4, whose density is N/M: leave --density out or give N/M) or fan_in. Layers whose input axis cannot take it "
     "stay unstructured (printed).", None),
    ("enum", "prune", "magnitude", "DST pruning criterion.", keras_dst.criterion_names()),
    ("enum", "grow", "random", "DST growth rule.", keras_dst.growth_names()),
    ("integer", "update_every", 50, "DST update period ΔT in optimizer steps "
     "(paper: 800; gmp: steps between pruning updates).", None),
    ("float", "prune_rate", 0.5, "Initial DST prune rate in (0, 1].", None),
    ("enum", "schedule", "cosine", "Prune-rate schedule (cosine: to 0.005 over all steps).",
     ("cosine", "constant", "linear")),
    ("enum", "ordering", "auto", "When the update runs: after_optimizer or before_optimizer "
     "(auto: the reference's per-criterion choice; its flags before/after are accepted).",
     ("auto", "after_optimizer", "before_optimizer", "before", "after")),
    ("enum", "scope", "layer", "Rank weights per layer or globally.", ("layer", "global")),
    ("bool", "grow_exact", True, "Regrow exactly the pruned count (False: the reference's "
     "Bernoulli random growth).", None),
    ("list", "overlap", [], "Comma-separated criteria (two or more, no running_*) whose "
     "would-be pruned sets keras_dst.CriteriaOverlap compares at every update (same "
     "--update_every, --prune_rate, --schedule; static/dst/gmp only). Writes overlap.json "
     "(Jaccard matrix, mean over updates) for `plot.py --overlap`. Empty: off.", None),
    ("integer", "epochs", 30, "Training epochs (paper: 100, ResNet/VGG 200).", None),
    ("integer", "batch_size", 32, "Global batch size, train and evaluation (paper: 128).", None),
    ("float", "lr", 0.05, "Initial learning rate, ×0.1 after 50% and 75% of the epochs "
     "(paper: 0.01; ResNet-56 on CIFAR: 0.1).", None),
    ("float", "momentum", 0.9, "SGD momentum.", None),
    ("bool", "nesterov", True, "Nesterov momentum.", None),
    ("float", "weight_decay", 5e-4, "Coupled L2 weight decay on all parameters "
     "(added to the gradient inside the optimizer).", None),
    ("integer", "seed", 1, "Seed of weights, masks, shuffling and DST randomness.", None),
    ("string", "data_dir", None, "TFDS data_dir (and where higgs.npz lives).", None),
    ("string", "output_dir", None, "Output directory (default: runs/<timestamp>).", None),
    ("integer", "depth", 0, "Depth of wide_resnet (6n+4; 0: model default 16).", None),
    ("integer", "width", 0, "Widen factor of wide_resnet (0: model default 8).", None),
    ("enum", "jit_compile", "auto", "Compile the train step with XLA (auto: on GPUs/TPUs, "
     "not on CPU-only machines, as Keras does).", ("auto", "true", "false")),
    ("enum", "mixed_precision", "off", "Mixed precision policy: off, float16 "
     "(mixed_float16, GPUs) or bfloat16 (mixed_bfloat16, TPUs/CPUs).",
     ("off", "float16", "bfloat16")),
    ("enum", "strategy", "default", "tf.distribute strategy.", STRATEGIES),
    ("string", "tpu", "", "TPU address for --strategy=tpu ('' = local).", None),
    ("bool", "cache", True, "Cache the decoded dataset in memory.", None),
    ("integer", "verbose", 1, "Keras fit verbosity (1: progress bar, 2: a line per epoch, "
     "0: quiet).", None),
    ("enum", "export", "none", "After training, export the final model (examples/deploy.py): "
     "litert writes model.tflite (and model_dense.tflite) and prints the export's test "
     "accuracy, its size and batch-1 latency against the dense export; tf_saved_model writes "
     "saved_model/ and prints its test accuracy.", deploy.FORMATS),
]

_DEFINE = {"enum": flags.DEFINE_enum, "string": flags.DEFINE_string,
           "integer": flags.DEFINE_integer, "float": flags.DEFINE_float,
           "bool": flags.DEFINE_bool, "list": flags.DEFINE_list}


def define_flags(flag_values=flags.FLAGS, exclude=()):
    """Defines the training flags (all but `exclude`) on `flag_values`, once."""
    for kind, name, default, help_text, choices in FLAG_SPECS:
        if name in exclude or name in flag_values:
            continue
        args = (name, default, choices, help_text) if kind == "enum" else (name, default,
                                                                          help_text)
        _DEFINE[kind](*args, flag_values=flag_values)
    for name, (check, message) in CHECKS.items():
        if name in flag_values and name not in exclude:
            flags.register_validator(name, check, f"--{name} {message}", flag_values=flag_values)


# Range checks shared by the flag validators and `validate`.
CHECKS = {
    "density": (lambda v: 0.0 < v <= 1.0, "must be in (0, 1]"),
    "prune_rate": (lambda v: 0.0 < v <= 1.0, "must be in (0, 1]"),
    "epochs": (lambda v: v >= 1, "must be >= 1"),
    "batch_size": (lambda v: v >= 1, "must be >= 1"),
    "update_every": (lambda v: v >= 1, "must be >= 1"),
    "lr": (lambda v: v > 0, "must be > 0"),
    "weight_decay": (lambda v: v >= 0, "must be >= 0"),
    "momentum": (lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]"),
    "seed": (lambda v: 0 <= v < 2**32, "must be in [0, 2**32 - 1]"),
    "depth": (lambda v: v == 0 or (v >= 10 and (v - 4) % 6 == 0),
              "must be 0 (the model's default) or 6n + 4 >= 10 (10, 16, 22, 28, 40)"),
    "width": (lambda v: v >= 0, "must be >= 0 (0: the model's default)"),
    "method": (lambda v: v != "gmp" or hasattr(keras_dst, "GradualPruning"),
               "=gmp needs keras_dst.GradualPruning, which this keras_dst version lacks"),
    "overlap": (lambda v: not v or (len(set(v)) == len(v) >= 2 and all(
        c in keras_dst.criterion_names() and not c.startswith("running_") for c in v)),
                "must be empty or two or more distinct non-running criteria"),
}


# Flags that only some runs read: (does a run of this config read it, which runs do).
# Given on the command line for a run that would ignore it, such a flag is refused.
_SPARSE = (lambda c: c["method"] != "dense", "--method static, dst or gmp")
_MASKED = (lambda c: c["method"] in ("static", "dst"), "--method static or dst")
_DST = (lambda c: c["method"] == "dst", "--method dst")
_RATES = (lambda c: c["method"] == "dst" or bool(c["overlap"]), "--method dst or --overlap")
APPLIES_TO = {
    "density": _SPARSE, "init": _MASKED,
    # (N:M gives every layer N/M, whatever the distribution)
    "distribution": (lambda c: c["method"] in ("static", "dst")
                     and keras_dst.patterns.parse(c["pattern"]).kind != "nm",
                     "--method static or dst without an N:M --pattern"),
    "prune": _DST, "grow": _DST, "ordering": _DST, "scope": _DST,
    "grow_exact": (lambda c: c["method"] == "dst" and c["grow"] == "random",
                   "--method dst with --grow random"),
    "data_dir": (lambda c: c["dataset"] != "digits", "the TFDS datasets and higgs"),
    "prune_rate": _RATES, "schedule": _RATES,
    "update_every": (lambda c: c["method"] in ("dst", "gmp") or bool(c["overlap"]),
                     "--method dst or gmp, or --overlap"),
    "tpu": (lambda c: c["strategy"] == "tpu", "--strategy tpu"),
    "depth": (lambda c: c["model"] == "wide_resnet", "--model wide_resnet"),
    "width": (lambda c: c["model"] == "wide_resnet", "--model wide_resnet"),
}


def check_given_flags_apply(configs, flag_values=flags.FLAGS, runs="this run"):
    """Raises ValueError naming the first flag given on the command line (parsed into
    `flag_values`) that no run of `configs` (complete configs: one, or a sweep's) would
    read, and the runs that do: `--method dense --density 0.05` would otherwise train a
    dense model without a word. `runs` names the runs in the message."""
    configs = [configs] if isinstance(configs, dict) else list(configs)
    cli.check_given_flags_read(
        flag_values, {name: (any(APPLIES_TO[name][0](c) for c in configs), APPLIES_TO[name][1])
                      for name in sorted(APPLIES_TO)}, runs)


def check_callbacks(config, total_steps=None):
    """Makes the callbacks of `config`'s run (a complete, validated config), which check
    their arguments (ValueError / TypeError), without running anything: what a sweep
    checks of every run before its first. With the run's `total_steps`, also
    `check_an_update_runs`."""
    sparsity = sparsity_callbacks(config, total_steps)
    overlap_callbacks(config, total_steps)
    if total_steps is not None:
        check_an_update_runs(config, sparsity, total_steps)


def check_an_update_runs(config, sparsity, total_steps):
    """Raises ValueError naming the flags where a dst or gmp run of `total_steps` steps
    reaches no update of its callback (`sparsity`: `sparsity_callbacks`): DST would
    train a static sparse model, gmp would leave it dense."""
    for callback in sparsity:
        try:
            updates = callback.update_steps(total_steps)
        except ValueError:  # (gmp: 75 % of the run leaves no update step)
            updates = None
        if updates is None or not updates.any_between(1, total_steps):
            until = " (gmp prunes during the first 75% of them)" if config["method"] == "gmp" else ""
            raise ValueError(
                f"--method={config['method']}: no update would run: --update_every="
                f"{config['update_every']} is past the run's {total_steps} steps{until} "
                f"(--epochs={config['epochs']} x {total_steps // config['epochs']} batches of "
                f"--batch_size={config['batch_size']}); lower --update_every or raise --epochs")


def run_steps(config):
    """The optimizer steps of `config`'s run (--epochs x its dataset's batches per
    epoch), or None where the dataset's size is not known here without a download."""
    size = data_lib.train_size(config["dataset"], config["data_dir"])
    if size is None:
        return None
    return config["epochs"] * data_lib.steps_per_epoch(size, config["batch_size"],
                                                       drop_remainder=config["strategy"] == "tpu")


def default_config():
    """The flag defaults as a dict (a complete config for `run`)."""
    return {name: default for _, name, default, _, _ in FLAG_SPECS}


def config_from_flags(flag_values=flags.FLAGS, exclude=()):
    """The parsed training flags (but `exclude`) as a config dict. A command line
    without --density asks for N/M when its --pattern is N:M (which fixes its density)."""
    config = {name: flag_values[name].value for _, name, *_ in FLAG_SPECS
              if name in flag_values and name not in exclude}
    if "density" in config and not flag_values["density"].present:
        try:
            pattern = keras_dst.patterns.parse(config.get("pattern", "unstructured"))
        except ValueError:  # `validate` names the bad value
            return config
        if pattern.kind == "nm":
            config["density"] = pattern.n / pattern.m
    return config


def validate(config):
    """Checks a config dict (unknown keys, choices, ranges); raises ValueError."""
    specs = {name: (kind, choices) for kind, name, _, _, choices in FLAG_SPECS}
    unknown = sorted(set(config) - set(specs))
    if unknown:
        raise ValueError(f"unknown config keys {unknown}")
    for name, value in config.items():
        choices = specs[name][1]
        if choices is not None and value not in choices:
            raise ValueError(f"--{name}={value}: choose one of {', '.join(choices)}")
        if name in CHECKS and not CHECKS[name][0](value):
            raise ValueError(f"--{name}={value}: {CHECKS[name][1]}")
    if config.get("grow") == "momentum" and config.get("momentum") == 0 \
            and config.get("method") == "dst":
        raise ValueError("--grow=momentum grows where the optimizer's momentum is largest; "
                         "--momentum=0.0 keeps none: pass --momentum > 0 or another --grow")
    if config.get("nesterov") and config.get("momentum") == 0:
        raise ValueError("--momentum=0.0 with --nesterov: Nesterov momentum needs a momentum > 0; "
                         "pass --nonesterov")
    if config.get("overlap") and config.get("method") == "dense":
        raise ValueError("--overlap needs a sparse model: --method static, dst or gmp")
    if config.get("strategy", "default") != "default":
        if config.get("method") == "gmp" or config.get("overlap"):
            raise ValueError(f"--strategy={config['strategy']}: --method gmp and --overlap run "
                             "without a tf.distribute strategy (DST and static runs take one)")
    if config.get("output_dir"):
        cli.check_directory(config["output_dir"], "--output_dir")
    if "pattern" in config:
        try:
            pattern = keras_dst.patterns.parse(config["pattern"])
        except ValueError as e:
            raise ValueError(f"--pattern={config['pattern']}: {e}") from None
        if pattern.kind != "unstructured" and config.get("method") == "gmp":
            raise ValueError(f"--pattern={pattern}: gmp prunes unstructured; use --method dst")
        if pattern.kind != "unstructured" and config.get("method") == "dense":
            raise ValueError(f"--pattern={pattern}: a dense model has no pattern; use "
                             "--method static or dst")
        if pattern.kind == "nm" and "density" in config:
            keras_dst.patterns.pattern_density(pattern, config["density"], "--density")
    if config.get("export") == "litert" and importlib.util.find_spec("ai_edge_litert") is None:
        raise ValueError("--export=litert runs the exported model with the LiteRT runtime, "
                         "which is not installed: python3 -m pip install \".[litert]\"")


# -- building blocks -----------------------------------------------------------------

def make_strategy(name, tpu=""):
    """A tf.distribute strategy by name."""
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    return tf.distribute.get_strategy()


def build_model(config, info):
    """The model of `config` for dataset `info`, made sparse as its method requires."""
    options = {k: config[k] for k in ("depth", "width") if config[k] and
               config["model"] == "wide_resnet"}
    outputs = 1 if info["binary"] else info["num_classes"]
    try:
        model = models_lib.get_model(config["model"], info["input_shape"], outputs, **options)
    except ValueError as e:  # e.g. conv_cifar10's pooling on digits' 8x8 images
        lines = [line for line in re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines()
                 if line.strip()]  # Keras: "... calling MaxPooling2D.call()." + the cause
        raise ValueError(f"--model={config['model']} cannot be built for --dataset="
                         f"{config['dataset']} (examples of shape {tuple(info['input_shape'])})"
                         f": {' '.join(lines[:2])}") from None
    method = config["method"]
    if method == "dense":
        return model
    if method == "gmp":
        return keras_dst.prunable(model, density=1.0, distribution="uniform",
                                  seed=config["seed"])
    return keras_dst.prunable(model, density=config["density"],
                              distribution=config["distribution"], init=config["init"],
                              seed=config["seed"],
                              track_running_scores=config["prune"].startswith("running_"),
                              pattern=config["pattern"],
                              pattern_overrides=unfit_layers(model, config["pattern"]))


def unfit_layers(model, pattern):
    """`keras_dst.unfit_layers`, printed: those layers stay unstructured."""
    unfit = keras_dst.unfit_layers(model, pattern)
    if unfit:
        print(f"pattern {pattern}: layers {sorted(unfit)} stay unstructured (their input "
              "axis is not a multiple of the pattern's block or group)")
    return unfit


def sparsity_callbacks(config, total_steps):
    """The callbacks that change the topology during training (none for dense/static)."""
    if config["method"] == "dst":
        return [keras_dst.DynamicSparseTraining(
            prune=config["prune"], grow=config["grow"], update_every=config["update_every"],
            prune_rate=config["prune_rate"], schedule=config["schedule"],
            ordering=config["ordering"], scope=config["scope"],
            grow_exact=config["grow_exact"], seed=config["seed"], total_steps=total_steps)]
    if config["method"] == "gmp":
        return [keras_dst.GradualPruning(final_density=config["density"],
                                         update_every=config["update_every"])]
    return []


def overlap_callbacks(config, total_steps):
    """[CriteriaOverlap] when --overlap names criteria, else []."""
    if not config["overlap"]:
        return []
    return [keras_dst.CriteriaOverlap(
        list(config["overlap"]), update_every=config["update_every"],
        prune_rate=config["prune_rate"], schedule=config["schedule"], total_steps=total_steps,
        seed=config["seed"])]


class BestWeights(keras.callbacks.Callback):
    """Keeps (in memory) the weights of the epoch with the best validation accuracy.

    The weights include the masks, so restoring them restores the topology too.
    """

    def __init__(self, monitor="val_accuracy"):
        super().__init__()
        self.monitor = monitor
        self.best, self.best_epoch, self.weights = -math.inf, None, None

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is not None and value > self.best:
            self.best, self.best_epoch = float(value), epoch + 1
            self.weights = self.model.get_weights()


class TerseLogs(keras.callbacks.Callback):
    """Keeps the progress bar and History readable: drops the per-layer
    ``density/<path>`` logs and the DST update counters (``pruned``, ``grown``,
    ``mask_churn``, ``prune_rate``). Placed after CSVLogger and TensorBoard, which
    record them all.
    """

    HIDDEN = ("pruned", "grown", "mask_churn", "prune_rate")

    def _hide(self, logs):
        for key in [k for k in (logs or {}) if "/" in k or k in self.HIDDEN]:
            del logs[key]

    def on_train_batch_end(self, batch, logs=None):
        self._hide(logs)

    def on_epoch_end(self, epoch, logs=None):
        self._hide(logs)


def tensorboard(log_dir):
    """[TensorBoard callback], or [] with a warning when `tensorboard` is not installed
    (TensorFlow >= 2.20 no longer depends on it; history.csv has the same numbers)."""
    try:
        import tensorboard as _  # noqa: F401
    except ImportError:
        logging.warning("tensorboard is not installed (pip install tensorboard): no TensorBoard "
                        "logs; history.csv has the same metrics.")
        return []
    return [keras.callbacks.TensorBoard(log_dir, write_graph=False)]


# What a run writes beside the files it always overwrites: an earlier run's would be
# mixed with this one's (TensorBoard curves of both, its exports with this run's results).
EARLIER_OUTPUTS = ("tb", "saved_model", "model.tflite", "model_dense.tflite", "overlap.json")


def _output_dir(config):
    """The run's output directory (made by `PrepareOutputDir`)."""
    if config["output_dir"]:
        return config["output_dir"]
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", f"{stamp}_{config['method']}_{config['model']}")


class PrepareOutputDir(keras.callbacks.Callback):
    """Creates the run's output directory and removes an earlier run's `EARLIER_OUTPUTS`
    in it (with a line saying so) when training starts: after the sparsity callbacks
    listed before it have checked the run against the model (their refusals, at the start
    of `fit`, leave an earlier run's outputs as they were), before the loggers listed
    after it open their files."""

    def __init__(self, path):
        super().__init__()
        self.path = path

    def on_train_begin(self, logs=None):
        cli.make_directory(self.path, "--output_dir")
        earlier = cli.remove_earlier(self.path, EARLIER_OUTPUTS)
        if earlier:
            print(f"{self.path} holds an earlier run's outputs: removed {earlier} (the other "
                  "files are overwritten)")


def _sparsity_report(model):
    try:
        rows = keras_dst.masks(model)
    except (TypeError, ValueError):
        rows = {}
    if not rows:
        return 1.0, {}
    layers = {path: float(m.mean()) for path, m in rows.items()}
    total = sum(m.size for m in rows.values())
    return float(sum(m.sum() for m in rows.values()) / total), layers


# -- the run -------------------------------------------------------------------------

def run(config):
    """Trains one model as described by `config` (flag name -> value; missing keys take
    the flag defaults) and returns the results dict that is written to results.json.

    Raises:
      ValueError: invalid config.
    """
    config = {**default_config(), **config}
    if isinstance(config["overlap"], str):  # "a,b" as on the command line
        config["overlap"] = [c for c in config["overlap"].split(",") if c]
    config["overlap"] = list(config["overlap"] or [])
    validate(config)
    config["pattern"] = str(keras_dst.patterns.parse(config["pattern"]))  # "1X4" -> "1x4"
    start = time.time()
    keras.backend.clear_session()
    keras.utils.set_random_seed(config["seed"])
    previous_policy = keras.mixed_precision.global_policy()
    if config["mixed_precision"] != "off":
        keras.mixed_precision.set_global_policy(f"mixed_{config['mixed_precision']}")
    try:
        strategy = make_strategy(config["strategy"], config["tpu"])
        train_ds, val_ds, test_ds, info = data_lib.load(
            config["dataset"], config["batch_size"], config["data_dir"], seed=config["seed"],
            cache=config["cache"], drop_remainder=config["strategy"] == "tpu")
        steps_per_epoch = info["steps_per_epoch"]
        total_steps = config["epochs"] * steps_per_epoch
        with strategy.scope():
            model = build_model(config, info)
            model.compile(
                optimizer=keras_dst.optimizers.TorchSGD(
                    optim.step_decay(config["lr"], config["epochs"], steps_per_epoch),
                    momentum=config["momentum"], nesterov=config["nesterov"],
                    l2=config["weight_decay"]),
                loss=(keras.losses.BinaryCrossentropy(from_logits=True) if info["binary"] else
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True)),
                metrics=[keras.metrics.BinaryAccuracy(name="accuracy", threshold=0.0)
                         if info["binary"] else
                         keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
                jit_compile={"true": True, "false": False}.get(config["jit_compile"], "auto"))
        # (made, and cleared of an earlier run's outputs, once the run is known to start:
        # a refused model, callback argument or callback check at the start of fit leaves
        # an earlier run's outputs as they were)
        output_dir = _output_dir(config)
        best = BestWeights()
        overlap, sparsity = (overlap_callbacks(config, total_steps),
                             sparsity_callbacks(config, total_steps))
        check_an_update_runs(config, sparsity, total_steps)
        callbacks = sparsity + overlap + [
            PrepareOutputDir(output_dir),
            best,
            keras.callbacks.CSVLogger(os.path.join(output_dir, "history.csv")),
            *tensorboard(os.path.join(output_dir, "tb")),
            TerseLogs(),
            keras.callbacks.ProgbarLogger(),
        ]
        fit_start = time.time()
        history = model.fit(train_ds, epochs=config["epochs"], validation_data=val_ds,
                            callbacks=callbacks, verbose=config["verbose"],
                            shuffle=False)  # train_ds reshuffles itself every epoch
        train_time = time.time() - fit_start
        evaluate = lambda: float(model.evaluate(  # noqa: E731
            test_ds, verbose=0, return_dict=True)["accuracy"])
        final_test = evaluate()
        density, layer_densities = _sparsity_report(model)
        model.save(os.path.join(output_dir, "model.keras"))
        final_weights = model.get_weights()
        if best.weights is not None:
            model.set_weights(best.weights)
        best_test = evaluate()
        model.save(os.path.join(output_dir, "best.keras"))
        model.set_weights(final_weights)
        overlap_file = None
        if overlap and overlap[0].history:
            overlap_file = os.path.abspath(os.path.join(output_dir, "overlap.json"))
            overlap[0].save_json(overlap_file)
        elif overlap:
            logging.warning("--overlap: no DST update step was reached (steps < --update_every); "
                            "no overlap.json")
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
    results = {
        "config": config,
        "final_test_accuracy": final_test,
        "best_val_test_accuracy": best_test,
        "best_val_accuracy": None if best.weights is None else best.best,
        "best_epoch": best.best_epoch,
        "final_val_accuracy": float(history.history["val_accuracy"][-1]),
        "density": density,
        "layer_densities": layer_densities,
        # (the model's own weights: not its masks, ever-active flags or running scores)
        "num_params": int((model if config.get("method") == "dense"
                           else keras_dst.strip(model)).count_params()),
        "steps": int(model.optimizer.iterations.numpy()),
        "steps_per_epoch": steps_per_epoch,
        "train_size": info["train_size"],
        "train_time_s": train_time,
        "total_time_s": time.time() - start,
        "history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
        "output_dir": os.path.abspath(output_dir),
        "overlap_file": overlap_file,
        "keras_dst_version": keras_dst.__version__,
    }
    path = os.path.join(output_dir, "results.json")
    with open(path, "w") as f:  # (the training's results stay if the export fails)
        json.dump(results, f, indent=2)
    results["export"] = deploy.export_trained(config, model, test_ds, info, output_dir, final_test)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    return results


def report(results, print_fn=print):
    """Prints the final summary of a run."""
    c = results["config"]
    method = c["method"]
    if method == "dst":
        method += f" (prune={c['prune']}, grow={c['grow']}, ΔT={c['update_every']})"
    lines = [
        "=" * 64,
        f"method            {method}",
        f"model / dataset   {c['model']} / {c['dataset']}, seed {c['seed']}",
        f"density           target {1.0 if c['method'] == 'dense' else c['density']:.4f}, "
        f"actual {results['density']:.4f}",
        f"test accuracy     final epoch {results['final_test_accuracy']:.4f}, "
        f"best-val model {results['best_val_test_accuracy']:.4f} "
        f"(epoch {results['best_epoch']}, val {results['best_val_accuracy']:.4f})",
        f"time              {results['train_time_s']:.1f} s training, "
        f"{results['total_time_s']:.1f} s total, {results['steps']} steps",
        f"outputs           {results['output_dir']}",
        "=" * 64,
    ]
    print_fn("\n".join(lines))


def main(argv):
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}")
    config = config_from_flags()
    try:
        complete = {**default_config(), **config}
        validate(complete)
        check_given_flags_apply(complete)
        results = run(config)
    except (ValueError, data_lib.DataUnavailableError) as e:
        sys.exit(f"error: {e}")
    report(results)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
