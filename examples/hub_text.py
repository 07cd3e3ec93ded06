r"""DST on a keras-hub transformer: a small BERT text classifier, dense vs static vs DST.

keras-hub's models are `Model` subclasses that keras_dst cannot rebuild, so
`keras_dst.prunable(classifier, density=...)` attaches the masks to the classifier's
own layers (token, position and segment embeddings, every attention projection,
feed-forward, pooler and head) and returns the same model, tokenizer included. It then
trains with `model.fit` as any keras_dst model and saves to one `.keras` file, which
`keras_dst.load_model` reads back with its masks.

Offline: the text is synthetic movie-review sentences whose label needs word order
(negations flip the sentiment word that follows them; a sentence holds one to three
clauses), tokenized by keras-hub's `BertTokenizer` over the task's 64-word vocabulary;
the model is built from a config with random weights (nothing is downloaded)::

    python examples/hub_text.py                       # dense, static, DST; seed 1
    python examples/hub_text.py --seeds=1,2,3 --output_dir=runs/hub_text

Writes `results.json` (one record per run, from which examples/README.md's per-seed
column is read) and `results.md` (its table, with the number of runs per method) to
--output_dir, and checks that the last sparse model reloads
from its `.keras` file with the same masks and test accuracy.
"""

import json
import math
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python examples/hub_text.py` from anywhere
    sys.path.insert(0, str(ROOT))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import keras_dst  # noqa: E402
from examples import cli  # noqa: E402

FLAGS = flags.FLAGS


def define_flags(flag_values=FLAGS):
    """The flags of this script (defined when it runs, so that importing it defines none),
    with their validators: a bad value is refused when the flags are parsed, before any
    model is built or trained."""
    fv = dict(flag_values=flag_values)
    flags.DEFINE_list("methods", ["dense", "static", "dst"], "Methods to run: dense, static "
                      "(fixed random ERK masks), dst.", **fv)
    flags.DEFINE_list("seeds", ["1"], "Seeds (weights, masks, shuffling, DST randomness).", **fv)
    flags.DEFINE_float("density", 0.2, "Global density in (0, 1] of the sparsified weights "
                       "(ERK over embeddings, attention, feed-forward, pooler and head).", **fv)
    flags.DEFINE_string("prune", "magnitude", "DST pruning criterion.", **fv)
    flags.DEFINE_string("grow", "gradient", "DST growth rule (gradient: RigL).", **fv)
    flags.DEFINE_integer("update_every", 100, "DST update period in optimizer steps.", **fv)
    flags.DEFINE_float("prune_rate", 0.3, "Initial DST prune rate (cosine decay).", **fv)
    flags.DEFINE_float("end_step", 0.75, "Last DST update, as a fraction of the training steps "
                       "(RigL: 0.75; 1.0: until the end).", **fv)
    flags.DEFINE_integer("epochs", 10, "Training epochs.", **fv)
    flags.DEFINE_integer("batch_size", 32, "Batch size.", **fv)
    flags.DEFINE_float("lr", 2e-3, "Adam learning rate (constant).", **fv)
    flags.DEFINE_integer("num_train", 4000, "Training sentences.", **fv)
    flags.DEFINE_integer("num_test", 2000, "Test sentences.", **fv)
    flags.DEFINE_integer("num_layers", 2, "Transformer layers.", **fv)
    flags.DEFINE_integer("hidden_dim", 64, "Hidden size.", **fv)
    flags.DEFINE_integer("num_heads", 2, "Attention heads.", **fv)
    flags.DEFINE_integer("intermediate_dim", 128, "Feed-forward size.", **fv)
    flags.DEFINE_integer("sequence_length", 32, "Tokens per sentence ([CLS] and [SEP] included).",
                         **fv)
    flags.DEFINE_bool("jit_compile", False, "Compile the train step with XLA (faster steps, "
                      "longer compilation: worth it on a GPU or for long runs).", **fv)
    flags.DEFINE_string("output_dir", "runs/hub_text", "Where results and the model go.", **fv)
    for name, (check, message) in CHECKS.items():
        flags.register_validator(name, check, f"--{name} {message}", **fv)
    for name, lookup in (("prune", keras_dst.get_criterion), ("grow", keras_dst.get_growth)):
        flags.register_validator(name, _library_name(lookup), **fv)
    flags.register_multi_flags_validator(list(_UPDATE_FLAGS), _check_an_update_runs, **fv)


def _is_seed(text):
    """Whether `text` is a seed NumPy takes: an int in [0, 2**32 - 1]."""
    try:
        return 0 <= int(text) < 2**32
    except ValueError:
        return False


# what decides whether a DST run reaches an update
_UPDATE_FLAGS = ("methods", "epochs", "num_train", "batch_size", "update_every", "end_step", "prune",
                 "grow", "prune_rate")


def _check_an_update_runs(values):
    """True, or raises flags.ValidationError: a DST run must reach at least one update
    (before its last update step, `end_step` of its steps), or it is static training."""
    sizes = [values[name] for name in ("epochs", "num_train", "batch_size", "end_step")]
    if "dst" not in (values["methods"] or ()) or min(sizes) <= 0:  # (their own checks)
        return True
    steps = values["epochs"] * math.ceil(values["num_train"] / values["batch_size"])
    try:
        callback = dst_callback(values, seed=0)
    except (TypeError, ValueError):  # (a bad --prune, --grow, ...: its own check names it)
        return True
    try:
        update_steps = callback.update_steps(total_steps=steps)
        last = steps if update_steps.end is None else update_steps.end
    except ValueError:  # (a fraction of the run that rounds to step 0)
        update_steps, last = None, 0
    if update_steps is None or not update_steps.any_between(1, steps):
        raise flags.ValidationError(
            f"no DST update would run: --update_every={values['update_every']} is past the "
            f"last update step {last} (--end_step={values['end_step']} of the run's {steps} "
            "steps: --epochs x ceil(--num_train / --batch_size)); lower --update_every or "
            "train longer")
    return True


def dst_callback(values, seed):
    """The run's DynamicSparseTraining from flag values (a dict {flag name: value}, as
    `FLAGS.flag_values_dict()` gives). --end_step 1.0, "until the end", is the callback's
    None."""
    end_step = values["end_step"]
    return keras_dst.DynamicSparseTraining(
        prune=values["prune"], grow=values["grow"], update_every=values["update_every"],
        prune_rate=values["prune_rate"], end_step=end_step if end_step < 1 else None, seed=seed)


def _library_name(lookup):
    """A validator of a criterion or growth name: `lookup`'s ValueError (which lists the
    names it knows; it matches them ignoring case, "_" and "-") as the flag's error."""
    def check(name):
        try:
            lookup(name)
        except ValueError as e:
            raise flags.ValidationError(str(e)) from None
        return True

    return check


METHODS = ("dense", "static", "dst")
# Flag checks: (check, message); a failed one is a one-line error naming the flag (--prune
# and --grow: the library's own check, `_library_name`).
CHECKS = {
    "methods": (lambda v: bool(v) and len(set(v)) == len(v) and set(v) <= set(METHODS),
                f"must name one or more of {', '.join(METHODS)}, each once"),
    "seeds": (lambda v: bool(v) and len(set(v)) == len(v) and all(map(_is_seed, v)),
              "must be one or more distinct integers in [0, 2**32 - 1], comma-separated"),
    "density": (lambda v: 0.0 < v <= 1.0, "must be in (0, 1]"),
    "update_every": (lambda v: v >= 1, "must be >= 1"),
    "prune_rate": (lambda v: 0.0 < v <= 1.0, "must be in (0, 1]"),
    "end_step": (lambda v: 0.0 < v <= 1.0, "must be in (0, 1]"),
    "epochs": (lambda v: v >= 1, "must be >= 1"),
    "batch_size": (lambda v: v >= 1, "must be >= 1"),
    "lr": (lambda v: v > 0, "must be > 0"),
    "num_train": (lambda v: v >= 1, "must be >= 1"),
    "num_test": (lambda v: v >= 1, "must be >= 1"),
    "num_layers": (lambda v: v >= 1, "must be >= 1"),
    "hidden_dim": (lambda v: v >= 1, "must be >= 1"),
    "num_heads": (lambda v: v >= 1, "must be >= 1"),
    "intermediate_dim": (lambda v: v >= 1, "must be >= 1"),
    "sequence_length": (lambda v: v >= 3, "must be >= 3 ([CLS], a word, [SEP])"),
}


POSITIVE = ("good great fine superb lovely brilliant charming delightful wonderful excellent "
            "pleasant solid clever moving gripping").split()
NEGATIVE = ("bad awful dull boring poor weak terrible clumsy bland tedious messy silly "
            "shallow lifeless painful").split()
NEGATIONS = ("not", "never", "hardly")
SUBJECTS = ("the movie", "the plot", "the acting", "the music", "the ending", "the cast",
            "the script", "the story", "the pacing", "the dialogue", "the camera work",
            "the soundtrack")
ADVERBS = ("really", "quite", "very", "somewhat", "rather", "truly")
JOINS = ("and", "but", "while", "although", "yet")
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def sentence(rng):
    """One review and its label. One to three clauses ("the acting was not very good"),
    each positive or negative, a negation (not, never, hardly) flipping its adjective;
    the label is the sign of their sum (ties are drawn again). A bag of words cannot
    tell "good" from "not good": the model must read the words in order."""
    while True:
        clauses, score = [], 0
        for _ in range(rng.choice([1, 2, 3], p=[0.3, 0.3, 0.4])):
            polarity, negated = rng.choice([1, -1]), rng.random() < 0.4
            words = [rng.choice(SUBJECTS), "was"]
            if negated:
                words.append(rng.choice(NEGATIONS))
            if rng.random() < 0.5:
                words.append(rng.choice(ADVERBS))
            words.append(rng.choice(POSITIVE if polarity > 0 else NEGATIVE))
            clauses.append(" ".join(words))
            score += -polarity if negated else polarity
        if score:
            text = clauses[0] + "".join(f" {rng.choice(JOINS)} {c}" for c in clauses[1:])
            return text, int(score > 0)


def make_data(n, seed):
    rng = np.random.default_rng(seed)
    pairs = [sentence(rng) for _ in range(n)]
    return np.array([t for t, _ in pairs]), np.array([y for _, y in pairs], "int32")


def vocabulary():
    words = set(NEGATIONS) | set(ADVERBS) | set(JOINS) | set(POSITIVE) | set(NEGATIVE) | {"was"}
    words |= {w for s in SUBJECTS for w in s.split()}
    return SPECIAL + sorted(words)


def build_classifier(seed):
    """A small BERT classifier with its tokenizer, from a config (random weights)."""
    import keras_hub

    keras.utils.set_random_seed(seed)
    vocab = vocabulary()
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=vocab, lowercase=True)
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(
        tokenizer, sequence_length=FLAGS.sequence_length)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=len(vocab), num_layers=FLAGS.num_layers, num_heads=FLAGS.num_heads,
        hidden_dim=FLAGS.hidden_dim, intermediate_dim=FLAGS.intermediate_dim,
        max_sequence_length=FLAGS.sequence_length)
    return keras_hub.models.BertTextClassifier(backbone, num_classes=2,
                                               preprocessor=preprocessor)


def run(method, seed, data):
    (x_train, y_train), (x_test, y_test) = data
    model = build_classifier(seed)
    callbacks = []
    if method != "dense":  # (a running_* criterion scores from running scores the masks keep)
        running = method == "dst" and keras_dst.get_criterion(FLAGS.prune).ema
        same = keras_dst.prunable(model, density=FLAGS.density, seed=seed,
                                  track_running_scores=running)
        assert same is model  # a keras-hub model: masks attached in place
    if method == "dst":
        callbacks.append(dst_callback(FLAGS.flag_values_dict(), seed))
    model.compile(optimizer=keras.optimizers.Adam(FLAGS.lr),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"], jit_compile=FLAGS.jit_compile)
    def report(epoch, logs):
        extra = f", itop {logs['itop']:.3f}" if "itop" in logs else ""
        print(f"{method} seed {seed} epoch {epoch + 1}: loss {logs['loss']:.4f}, accuracy "
              f"{logs['accuracy']:.4f}{extra}", flush=True)

    callbacks.append(keras.callbacks.LambdaCallback(on_epoch_end=report))
    start = time.time()
    model.fit(x_train, y_train, batch_size=FLAGS.batch_size, epochs=FLAGS.epochs, verbose=0,
              callbacks=callbacks)
    train_time = time.time() - start
    accuracy = float(model.evaluate(x_test, y_test, batch_size=256, verbose=0)[1])
    record = dict(method=method, seed=seed, test_accuracy=accuracy, train_time_s=train_time,
                  density=1.0 if method == "dense" else keras_dst.density(model),
                  steps=int(model.optimizer.iterations.numpy()))
    print(json.dumps(record))
    return model, record


def check_reload(model, x_test, y_test):
    """The sparse model saved and read back by keras_dst.load_model: same masks, same
    test accuracy (Keras's own loader refuses the file: the masks would be lost)."""
    path = os.path.join(FLAGS.output_dir, "model.keras")
    keras_dst.save_model(model, path)
    loaded = keras_dst.load_model(path)
    a, b = keras_dst.masks(model), keras_dst.masks(loaded)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    loaded.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                   metrics=["accuracy"])
    before = model.evaluate(x_test, y_test, batch_size=256, verbose=0)[1]
    after = loaded.evaluate(x_test, y_test, batch_size=256, verbose=0)[1]
    assert abs(before - after) < 1e-6, (before, after)
    print(f"reloaded {path}: same masks ({len(a)} weights), test accuracy {after:.4f}")


def table(records):
    rows = ["| method | density | test accuracy (mean ± std) | runs | train time / run |",
            "|---|---|---|---|---|"]
    for method in FLAGS.methods:
        rs = [r for r in records if r["method"] == method]
        acc = np.array([r["test_accuracy"] for r in rs])
        name = {"dense": "dense", "static": "static (ERK, random masks)",
                "dst": f"DST ({FLAGS.prune} prune, {FLAGS.grow} growth)"}[method]
        rows.append(f"| {name} | {np.mean([r['density'] for r in rs]):.3f} | "
                    f"{acc.mean():.4f} ± {acc.std():.4f} | {len(rs)} | "
                    f"{np.mean([r['train_time_s'] for r in rs]):.0f} s |")
    return "\n".join(rows)


def canonical_names(flag_values=FLAGS):
    """Sets --prune and --grow to the library's own spelling of the names they match (it
    ignores case, "_" and "-": "Magnitude" is "magnitude"), as the table and results.json
    print them."""
    flag_values.prune = keras_dst.get_criterion(flag_values.prune).name
    flag_values.grow = keras_dst.get_growth(flag_values.grow).name


# The flags only some methods read (the others are read by every run).
READ_BY = {name: ("dst",) for name in ("prune", "grow", "update_every", "prune_rate", "end_step")}
READ_BY["density"] = ("static", "dst")


def check_given_flags_apply(flag_values=FLAGS):
    """Raises ValueError naming a flag given on the command line that no method of
    --methods reads (`--methods dense --prune snip` would otherwise run without a word)."""
    cli.check_given_flags_read(
        flag_values, {name: (bool(set(readers) & set(flag_values.methods)), " and ".join(readers))
                      for name, readers in READ_BY.items()},
        f"--methods={','.join(flag_values.methods)}")


def main(argv):
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}")
    canonical_names(FLAGS)
    try:
        check_given_flags_apply(FLAGS)
        cli.make_directory(FLAGS.output_dir, "--output_dir")
    except ValueError as e:
        sys.exit(f"error: {e}")
    train = make_data(FLAGS.num_train, seed=0)
    test = make_data(FLAGS.num_test, seed=1)
    records, last_sparse = [], None
    for seed in [int(s) for s in FLAGS.seeds]:
        for method in FLAGS.methods:
            model, record = run(method, seed, (train, test))
            records.append(record)
            if method != "dense":
                last_sparse = model
    if last_sparse is not None:
        check_reload(last_sparse, *test)
    with open(os.path.join(FLAGS.output_dir, "results.json"), "w") as f:
        json.dump({"flags": {k: FLAGS[k].value for k in (
            "methods", "seeds", "density", "prune", "grow", "update_every", "prune_rate",
            "end_step",
            "epochs", "batch_size", "lr", "num_train", "num_test", "num_layers",
            "hidden_dim", "num_heads", "intermediate_dim", "sequence_length",
            "jit_compile")}, "runs": records}, f, indent=1)
    markdown = table(records)
    with open(os.path.join(FLAGS.output_dir, "results.md"), "w") as f:
        f.write(markdown + "\n")
    print(markdown)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
