r"""Real kills: a DST run SIGKILLed again and again ends exactly as an uninterrupted one.

The driver first runs a small DST training (MLP on synthetic data, magnitude
pruning with gradient growth, `jit_compile=True`) to the end in a subprocess: the
reference. Then it runs the same training in a subprocess with a backup callback,
kills it with SIGKILL at seeded random moments, restarts it, and so on for
`--kills` kills, and lets the last restart finish. Half the kills aim at a backup
write (the worker prints a line right before and right after the backup callback
runs at each epoch end; the driver kills a few milliseconds after a "saving"
line), the others at a random moment of a random epoch.

After every kill the backup on disk must be readable, and at the end the final
masks, weights and optimizer state must equal the reference's bit for bit (CPU).

  python examples/kill_resume.py                    # keras_dst.BackupAndRestore, 30 kills
  python examples/kill_resume.py --backup=keras     # Keras's own: a kill during its write
                                                    # leaves a backup it cannot read

Exit status 0 when every check passed, 1 otherwise.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python examples/kill_resume.py` as well as `import examples.kill_resume`
    sys.path.insert(0, ROOT)

from examples import cli  # noqa: E402

FLAGS = flags.FLAGS

# Range checks of the flags: (check, message); a failed one is a one-line error naming the flag.
CHECKS = {
    "kills": (lambda v: v >= 0, "must be >= 0"),
    "epochs": (lambda v: v >= 1, "must be >= 1 (a run with no epoch has nothing to kill or compare)"),
    "start_timeout": (lambda v: v > 0, "must be > 0"),
    "seed": (lambda v: v >= 0, "must be >= 0"),
}


def define_flags(flag_values=FLAGS):
    """The flags of this script (defined when it runs, so that importing it defines none)."""
    flags.DEFINE_integer("kills", 30, "SIGKILLs before the run may finish", flag_values=flag_values)
    flags.DEFINE_integer("epochs", 40, "epochs of the training run", flag_values=flag_values)
    flags.DEFINE_integer("seed", 0, "seed of the kill moments (the training has its own)",
                         flag_values=flag_values)
    flags.DEFINE_enum("backup", "keras_dst", ["keras_dst", "keras"],
                      "backup callback: keras_dst.BackupAndRestore or keras.callbacks.BackupAndRestore",
                      flag_values=flag_values)
    flags.DEFINE_string("work_dir", None, "directory for backups and results (default: a temp dir); "
                        "a previous run's backup and results in it are removed first",
                        flag_values=flag_values)
    flags.DEFINE_float("start_timeout", 120.0, "seconds a worker may take from its start to its "
                       "first epoch (then it is killed and the run fails)", flag_values=flag_values)
    flags.DEFINE_string("worker", None, "internal: run the training, writing its final state here",
                        flag_values=flag_values)
    flags.DEFINE_string("backup_dir", None, "internal: the worker's backup directory",
                        flag_values=flag_values)
    for name, (check, message) in CHECKS.items():
        flags.register_validator(name, check, f"--{name} {message}", flag_values=flag_values)


# What a run writes into --work_dir: its backup directory and the two final states it
# compares. A rerun into the same directory must not restore or read the previous run's.
OWN_FILES = ("backup", "reference.npz", "killed.npz")


def prepare_work_dir(work_dir, print_fn=print):
    """Creates `work_dir` if needed and removes what an earlier run of this script left in
    it (`OWN_FILES`, nothing else), printing one line if it removed anything: a leftover
    backup would be restored by the first restart (the run would resume at its end, with
    no epoch left to kill). Returns `work_dir`.

    Raises:
      ValueError: `work_dir` (or a directory above it) is not a directory, or cannot be
        created; the message names --work_dir.
    """
    cli.make_directory(work_dir, "--work_dir")
    stale = cli.remove_earlier(work_dir, OWN_FILES)
    if stale:
        print_fn(f"--work_dir={work_dir}: removed the previous run's {', '.join(stale)}", flush=True)
    return work_dir


BATCH, STEPS_PER_EPOCH = 32, 8


def train(final_path, backup_dir, backup, epochs):
    """The training run (a worker process). Prints epoch markers, saves the final state."""
    import keras
    import numpy as np

    import keras_dst

    keras.utils.set_random_seed(1)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(BATCH * STEPS_PER_EPOCH, 32)).astype("float32")
    y = np.argmax(x @ rng.normal(size=(32, 4)), axis=1)
    inp = keras.Input((32,))
    h = keras.layers.Dense(64, activation="relu", name="fc1")(inp)
    h = keras.layers.Dense(64, activation="relu", name="fc2")(h)
    model = keras_dst.prunable(keras.Model(inp, keras.layers.Dense(4, name="fc3")(h)),
                               density=0.2, seed=1)
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=True)

    def say(text):
        print(text, flush=True)

    callbacks = [keras_dst.DynamicSparseTraining(prune="magnitude", grow="gradient",
                                                 update_every=3, seed=1)]
    if backup_dir:
        marker = keras.callbacks.LambdaCallback
        callbacks += [
            marker(on_epoch_begin=lambda e, logs: say(f"epoch {e}")),
            marker(on_epoch_end=lambda e, logs: say(f"saving {e}")),
            keras_dst.BackupAndRestore(backup_dir, delete_checkpoint=False)
            if backup == "keras_dst" else
            keras.callbacks.BackupAndRestore(backup_dir, delete_checkpoint=False),
            marker(on_epoch_end=lambda e, logs: say(f"saved {e}")),
        ]
    model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0,
              callbacks=callbacks)
    state = [np.asarray(v) for v in model.get_weights()]
    state += [np.asarray(v.numpy()) for v in model.optimizer.variables]
    np.savez(final_path, *state)
    say("done")


def backup_readable(backup_dir, backup):
    """True if the backup a restart would load can be read completely (or there is none)."""
    import h5py

    if backup == "keras_dst":
        import keras_dst

        latest = keras_dst.BackupAndRestore(backup_dir).latest()
        if latest is None:
            return True
        files = [os.path.join(latest, "model.weights.h5")]
        meta = os.path.join(latest, "training_metadata.json")
    else:
        files = [os.path.join(backup_dir, "latest.weights.h5")]
        meta = os.path.join(backup_dir, "training_metadata.json")
        if not os.path.exists(files[0]):
            return True
    try:
        for path in files:
            with h5py.File(path, "r") as f:
                f.visititems(lambda name, obj: obj[()] if isinstance(obj, h5py.Dataset) else None)
        if os.path.exists(meta) or backup == "keras_dst":
            with open(meta) as f:
                json.load(f)
    except Exception:  # noqa: BLE001 - any failure to read is what we look for
        return False
    return True


def worker_command(final_path, backup_dir=None):
    command = [sys.executable, os.path.abspath(__file__), f"--worker={final_path}",
               f"--epochs={FLAGS.epochs}", f"--backup={FLAGS.backup}"]
    return command + ([f"--backup_dir={backup_dir}"] if backup_dir else [])


def run_killed(work_dir, rng):
    """Runs, kills and restarts the worker; returns (report dict, final state path)."""
    backup_dir = os.path.join(work_dir, "backup")
    final_path = os.path.join(work_dir, "killed.npz")
    report = dict(kills=0, kills_during_write=0, unreadable_backups=0, failed_restarts=0,
                  restarts=0, start_timeouts=0)
    while True:
        proc = subprocess.Popen(worker_command(final_path, backup_dir), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        report["restarts"] += 1
        killing = report["kills"] < FLAGS.kills
        aim_write = bool(rng.integers(2))
        lines, target = [], None
        started, timed_out = threading.Event(), threading.Event()

        def watchdog(proc=proc, started=started, timed_out=timed_out):
            if not started.wait(FLAGS.start_timeout):  # no first epoch in time
                timed_out.set()
                proc.kill()

        threading.Thread(target=watchdog, daemon=True).start()
        for line in proc.stdout:
            line = line.strip()
            lines.append(line)
            kind, _, value = line.partition(" ")
            if kind == "epoch":
                started.set()
            if not killing or kind not in ("epoch", "saving"):
                continue
            if target is None:  # the first epoch line of this run: choose the moment
                target = int(value) + int(rng.integers(0, 3))
            if int(value) >= target and kind == ("saving" if aim_write else "epoch"):
                time.sleep(float(rng.uniform(0.0, 0.004 if aim_write else 0.03)))
                proc.send_signal(signal.SIGKILL)
                break
        rest, err = proc.communicate()
        started.set()  # (the watchdog ends)
        lines += [r for r in rest.split("\n") if r]
        if timed_out.is_set():
            report["start_timeouts"] += 1
            print(f"  worker killed: no first epoch within --start_timeout={FLAGS.start_timeout} "
                  "s", flush=True)
            return report, None
        markers = [ln.split(" ")[0] for ln in lines if ln.split(" ")[0] in ("saving", "saved")]
        if proc.returncode == -signal.SIGKILL:
            report["kills"] += 1
            report["kills_during_write"] += int(bool(markers) and markers[-1] == "saving")
            if not backup_readable(backup_dir, FLAGS.backup):
                report["unreadable_backups"] += 1
            print(f"  kill {report['kills']:2d}: after '{lines[-1] if lines else '(start)'}'"
                  f"{' (during a backup write)' if markers and markers[-1] == 'saving' else ''}",
                  flush=True)
            continue
        if proc.returncode != 0:
            report["failed_restarts"] += 1
            print(f"  restart failed (exit {proc.returncode}): "
                  f"{(err.strip().splitlines() or ['?'])[-1][:200]}", flush=True)
            return report, None
        return report, final_path


def failures(report, kills):
    """Why a run (its report) failed, one phrase per check; [] when it passed."""
    reasons = []
    if report["start_timeouts"]:
        reasons.append("a worker did not reach its first epoch within --start_timeout (raise it "
                       "on a slow or busy machine)")
    elif report["failed_restarts"]:
        reasons.append("a restart failed (above)")
    elif not report["final_state_bit_identical"]:
        reasons.append("the final state differs from the uninterrupted run's")
    if report["unreadable_backups"]:
        reasons.append(f"{report['unreadable_backups']} kill(s) left an unreadable backup")
    if not (report["failed_restarts"] or report["start_timeouts"]) and report["kills"] < kills:
        reasons.append(f"the run finished after {report['kills']} of {kills} kills "
                       "(too few epochs to kill in: raise --epochs)")
    return reasons


def main(argv):
    if FLAGS.worker:
        train(FLAGS.worker, FLAGS.backup_dir, FLAGS.backup, FLAGS.epochs)
        return 0
    import numpy as np

    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}")
    try:
        work_dir = prepare_work_dir(FLAGS.work_dir or tempfile.mkdtemp(prefix="kill_resume_"))
    except ValueError as e:
        sys.exit(f"error: {e}")
    reference = os.path.join(work_dir, "reference.npz")
    print(f"reference run ({FLAGS.epochs} epochs, no kill) ...", flush=True)
    subprocess.run(worker_command(reference), check=True, stdout=subprocess.DEVNULL)
    print(f"killed run ({FLAGS.backup} backup, {FLAGS.kills} kills) ...", flush=True)
    report, final = run_killed(work_dir, np.random.default_rng(FLAGS.seed))
    identical = False
    if final is not None:
        want, got = np.load(reference), np.load(final)
        identical = len(want.files) == len(got.files) and all(
            want[k].dtype == got[k].dtype and want[k].shape == got[k].shape
            and want[k].tobytes() == got[k].tobytes() for k in want.files)
    report["final_state_bit_identical"] = identical
    print(json.dumps(report, indent=1))
    reasons = failures(report, FLAGS.kills)
    print("FAIL: " + "; ".join(reasons) if reasons else "PASS")
    return 1 if reasons else 0


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
