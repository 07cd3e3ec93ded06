r"""Runs a grid of training runs (Figure 1 of the paper) into one CSV, resumably.

The grid is criteria × growth rules × densities × seeds of DST runs, plus the
dense baseline (one run per seed) and static sparse training (density × seed)::

    python examples/sweep.py --prune magnitude,set,snip --grow random,gradient \
        --densities 0.05,0.1,0.2 --seeds 1,2,3 --csv runs/digits.csv --epochs 10

Every other training flag of train.py (``--model``, ``--dataset``, ``--epochs``,
``--lr``, ...) is accepted and applies to every run. Runs execute in this process one
after the other (`train.run`); a row is appended to the CSV only when a run has
finished, and runs whose key is already in the CSV are skipped, so an interrupted
sweep is resumed by rerunning the same command (the interrupted run is redone).
The key covers every setting that changes the result (not paths or verbosity), so
changing e.g. ``--epochs`` starts new rows in the same CSV.
"""

import contextlib
import csv
import hashlib
import json
import os
import pathlib
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from absl import app, flags  # noqa: E402

import keras_dst  # noqa: E402
from examples import cli, train  # noqa: E402

SWEPT = ("method", "prune", "grow", "density", "seed", "output_dir")
COLUMNS = ("key", "method", "prune", "grow", "density", "pattern", "seed", "model", "dataset",
           "epochs",
           "final_test_accuracy", "best_val_test_accuracy", "best_val_accuracy",
           "actual_density", "train_time_s", "steps", "output_dir")
# Settings that do not change a run's result (left out of its key).
NOT_IN_KEY = ("output_dir", "data_dir", "verbose", "cache", "tpu", "export")
# Settings that only matter to some methods.
DST_ONLY = ("prune", "grow", "update_every", "prune_rate", "schedule", "ordering", "scope",
            "grow_exact")
SPARSE_ONLY = ("density", "distribution", "init", "pattern")


def define_flags(flag_values=flags.FLAGS):
    """The sweep's list flags plus every train.py flag that is not swept."""
    flags.DEFINE_list("methods", ["dense", "static", "dst"],
                      f"Methods to run, from {', '.join(train.METHODS)}.", flag_values=flag_values)
    flags.DEFINE_list("prune", ["magnitude", "set", "mest", "snip", "reciprocal_sensitivity"],
                      "DST pruning criteria.", flag_values=flag_values)
    flags.DEFINE_list("grow", ["random", "gradient"], "DST growth rules.",
                      flag_values=flag_values)
    flags.DEFINE_list("densities", ["0.05", "0.1", "0.2"],
                      "Densities of static/DST/GMP runs (paper: 0.05,0.06,0.07,0.08,0.09,0.1,"
                      "0.15,0.2,0.3,0.4,0.5).", flag_values=flag_values)
    flags.DEFINE_list("seeds", ["1", "2", "3"], "Seeds (paper: 1,2,3,4,5).",
                      flag_values=flag_values)
    flags.DEFINE_string("csv", "runs/sweep.csv", "Results CSV (appended to; resumable).",
                        flag_values=flag_values)
    flags.DEFINE_string("runs_dir", None, "Where the runs' output directories go "
                        "(default: <csv without .csv>_runs).", flag_values=flag_values)
    flags.DEFINE_bool("subprocess", False, "Run each training in a fresh Python process: a "
                      "run that crashes (even a segfault) is reported and skipped, the sweep "
                      "goes on, and no memory accumulates across runs.",
                      flag_values=flag_values)
    flags.DEFINE_bool("dry_run", False, "Print the runs still to do and exit.",
                      flag_values=flag_values)
    train.define_flags(flag_values, exclude=SWEPT)


def parse_grid(methods, prunes, grows, densities, seeds):
    """Validated grid values (strings from the command line); raises ValueError."""
    def check(values, choices, what):
        bad = [v for v in values if v not in choices]
        if bad:
            raise ValueError(f"unknown {what} {bad}; choose from {', '.join(choices)}")
        return list(values)

    try:
        densities = [float(d) for d in densities]
        seeds = [int(s) for s in seeds]
    except ValueError as e:
        raise ValueError(f"--densities must be floats and --seeds ints ({e})") from None
    for flag, values in (("methods", methods), ("prune", prunes), ("grow", grows),
                         ("densities", densities), ("seeds", seeds)):
        repeated = sorted({str(v) for v in values if values.count(v) > 1})
        if repeated:  # (the same run twice: two CSV rows of one key, a seed counted twice)
            raise ValueError(f"--{flag} repeats {', '.join(repeated)}")
    bad = [d for d in densities if not 0.0 < d <= 1.0]
    if bad:
        raise ValueError(f"densities {bad} are not in (0, 1]")
    return (check(methods, train.METHODS, "methods"),
            check(prunes, keras_dst.criterion_names(), "criteria"),
            check(grows, keras_dst.growth_names(), "growth rules"), densities, seeds)


def grid(methods, prunes, grows, densities, seeds):
    """The runs as a list of config overrides, baselines first."""
    runs = []
    for seed in seeds:
        if "dense" in methods:
            runs.append({"method": "dense", "seed": seed})
    for method in ("static", "gmp"):
        if method in methods:
            runs += [{"method": method, "density": d, "seed": s} for d in densities
                     for s in seeds]
    if "dst" in methods:
        runs += [{"method": "dst", "prune": p, "grow": g, "density": d, "seed": s}
                 for p in prunes for g in grows for d in densities for s in seeds]
    return runs


def run_key(config):
    """A short stable hash of the settings of `config` that change the result."""
    ignored = set(NOT_IN_KEY)
    if not config.get("overlap"):  # off: same key as before the flag existed
        ignored.add("overlap")
    if config.get("pattern", "unstructured") == "unstructured":  # likewise
        ignored.add("pattern")
    if config["method"] != "dst":  # but gmp's period, and the overlap's schedule, count
        used = {"update_every"} if config["method"] == "gmp" else set()
        if config.get("overlap"):
            used |= {"update_every", "prune_rate", "schedule"}
        ignored.update(set(DST_ONLY) - used)
    if config["method"] == "dense":
        ignored.update(SPARSE_ONLY)
    relevant = {k: v for k, v in sorted(config.items()) if k not in ignored}
    return hashlib.sha1(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def runs_dir_of(csv_path, runs_dir=None):
    """Where the runs' output directories go: `runs_dir`, else ``<csv without .csv>_runs``."""
    return runs_dir or os.path.splitext(csv_path)[0] + "_runs"


def done_keys(csv_path):
    """Keys of the runs already in the CSV."""
    if not os.path.exists(csv_path):
        return set()
    with open(csv_path, newline="") as f:
        return {row["key"] for row in csv.DictReader(f)}


def _run_name(config, key):
    name = config["method"]
    if config["method"] == "dst":
        name += f"_{config['prune']}_{config['grow']}"
    if config["method"] != "dense":
        name += f"_d{config['density']:g}"
    return f"{name}_s{config['seed']}_{key[:8]}"


def _append_row(csv_path, row):
    new = not os.path.exists(csv_path) or os.path.getsize(csv_path) == 0
    os.makedirs(os.path.dirname(os.path.abspath(csv_path)), exist_ok=True)
    columns = COLUMNS
    if not new:  # a CSV written before a column existed keeps its header
        with open(csv_path, newline="") as f:
            columns = tuple(next(csv.reader(f)))
        if row.get("pattern", "unstructured") != "unstructured" and "pattern" not in columns:
            raise ValueError(f"{csv_path} has no 'pattern' column (written by an earlier "
                             "version); write runs with --pattern to a new CSV.")
    with open(csv_path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)


class RunFailed(RuntimeError):
    """A run in its own process exited abnormally (see `run_in_subprocess`)."""


# A run's process: a config it refuses (train.run's ValueError) is written to the file
# argv[2] and exits with status _REFUSED, which stops the sweep as in one process.
_REFUSED = 3
_RUN_CODE = f"""import json, sys
from examples import train
try:
    train.run(json.loads(sys.argv[1]))
except ValueError as e:
    open(sys.argv[2], "w").write(str(e))
    sys.exit({_REFUSED})
"""


def run_in_subprocess(config):
    """`train.run(config)` in a fresh Python process; returns its results.json.

    Raises:
      ValueError: the run refused its config (`train.run`'s ValueError, its message).
      RunFailed: the process exited with another non-zero status (or a signal).
    """
    import subprocess

    # (in this working directory, which relative paths of the config are relative to)
    path = os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    with tempfile.TemporaryDirectory(prefix="sweep_run_") as tmp:
        refusal = os.path.join(tmp, "refused.txt")
        proc = subprocess.run([sys.executable, "-c", _RUN_CODE, json.dumps(config), refusal],
                              env={**os.environ, "PYTHONPATH": path})
        if proc.returncode == _REFUSED and os.path.exists(refusal):
            with open(refusal) as f:
                raise ValueError(f.read())
    if proc.returncode != 0:
        raise RunFailed(f"{config['output_dir']}: the run exited with status {proc.returncode}")
    with open(os.path.join(config["output_dir"], "results.json")) as f:
        return json.load(f)


def sweep(base_config, runs, csv_path, runs_dir=None, run_fn=None, print_fn=print):
    """Runs every override of `runs` on top of `base_config` unless already in the CSV.

    Args:
      base_config: train.py config shared by all runs.
      runs: list of config overrides (see `grid`).
      csv_path: CSV to append a row to after each finished run.
      runs_dir: parent of the runs' output directories.
      run_fn: the training function (default `train.run`; `run_in_subprocess` for
        one process per run). A run that raises `RunFailed` is reported and left
        out of the CSV (a rerun of the sweep retries it); the sweep goes on. A run
        that refuses its config (ValueError, in either) stops it.

    Returns:
      (the number of runs executed, failed ones included; the names of the failed ones).

    Raises:
      ValueError: a run refused its config in this process (e.g. a model that cannot be
        built for the dataset), with the run's name; the runs before it are in the CSV.
    """
    run_fn = run_fn or train.run
    runs_dir = runs_dir_of(csv_path, runs_dir)
    done = done_keys(csv_path)
    configs = [{**train.default_config(), **base_config, **r} for r in runs]
    todo = [(c, run_key(c)) for c in configs]
    todo = [(c, k) for c, k in todo if k not in done]
    print_fn(f"sweep: {len(configs)} runs, {len(configs) - len(todo)} already in {csv_path}, "
             f"{len(todo)} to do")
    failed = []
    for i, (config, key) in enumerate(todo):
        name = _run_name(config, key)
        config["output_dir"] = os.path.join(runs_dir, name)
        print_fn(f"sweep: run {i + 1}/{len(todo)}: {name}")
        try:
            results = run_fn(config)
        except RunFailed as e:
            print_fn(f"sweep: run {i + 1}/{len(todo)} FAILED, left out of the CSV: {e}")
            failed.append(name)
            continue
        except ValueError as e:
            raise ValueError(f"run {i + 1}/{len(todo)} ({name}): {e}") from None
        sparse = config["method"] != "dense"
        _append_row(csv_path, {
            "key": key, "method": config["method"],
            "prune": config["prune"] if config["method"] == "dst" else "",
            "grow": config["grow"] if config["method"] == "dst" else "",
            "density": config["density"] if sparse else 1.0,
            "pattern": config.get("pattern", "unstructured") if sparse else "",
            "seed": config["seed"],
            "model": config["model"], "dataset": config["dataset"], "epochs": config["epochs"],
            **{k: results[k] for k in ("final_test_accuracy", "best_val_test_accuracy",
                                       "best_val_accuracy", "train_time_s", "steps")},
            "actual_density": results["density"], "output_dir": results["output_dir"]})
    return len(todo), failed


def plan(flag_values=flags.FLAGS):
    """(base config, runs) from parsed sweep flags; raises ValueError on a bad value."""
    fv = flag_values
    cli.check_file(fv.csv, "--csv")
    cli.check_directory(runs_dir_of(fv.csv, fv.runs_dir),
                        "--runs_dir" if fv.runs_dir else "--runs_dir (default: <--csv>_runs)")
    grid_values = parse_grid(fv.methods, fv.prune, fv.grow, fv.densities, fv.seeds)
    base = train.config_from_flags(fv, exclude=SWEPT)
    if "pattern" in base:  # one spelling, one run key ("1X4" is "1x4")
        try:
            base["pattern"] = str(keras_dst.patterns.parse(base["pattern"]))
        except ValueError as e:
            raise ValueError(f"--pattern={base['pattern']}: {e}") from None
        if base["pattern"] != "unstructured" and "gmp" in grid_values[0]:
            raise ValueError(f"--pattern={base['pattern']}: gmp prunes unstructured; leave gmp "
                             "out of --methods")
    runs = grid(*grid_values)
    for run in runs:
        if run["method"] == "dense":  # the dense baseline has no pattern (nor a key for it)
            run["pattern"] = "unstructured"
    configs = [{**train.default_config(), **base, **run} for run in runs]
    for config in configs:  # fail before the first run, not in the middle of the sweep
        with _naming(config):
            train.validate(config)
            train.check_callbacks(config, train.run_steps(config))
    train.check_given_flags_apply(configs, fv, runs="any run of this sweep")
    return base, runs


@contextlib.contextmanager
def _naming(config):
    """Prefixes a ValueError / TypeError raised inside with the name of `config`'s run."""
    try:
        yield
    except (ValueError, TypeError) as e:
        raise type(e)(f"{_run_name(config, run_key(config))}: {e}") from None


def main(argv):
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}")
    FLAGS = flags.FLAGS
    try:
        base, runs = plan(FLAGS)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if FLAGS.dry_run:
        done = done_keys(FLAGS.csv)
        for run in runs:
            config = {**train.default_config(), **base, **run}
            key = run_key(config)
            print(("done  " if key in done else "todo  ") + _run_name(config, key))
        return
    try:
        _, failed = sweep(base, runs, FLAGS.csv, FLAGS.runs_dir,
                          run_fn=run_in_subprocess if FLAGS.subprocess else None)
    except (ValueError, train.data_lib.DataUnavailableError) as e:
        sys.exit(f"error: {e}")
    if failed:
        sys.exit(f"error: {len(failed)} run(s) failed and are left out of {FLAGS.csv} (a rerun "
                 f"retries them): {', '.join(failed)}")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
