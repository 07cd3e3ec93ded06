"""User mistakes in the flags and inputs of examples/ scripts are one-line errors that name
the flag, refused before any training: kill_resume.py, soak.py, hub_text.py and plot.py.

No training runs here: the validators are parsed on fresh `FlagValues`, the helpers are
called directly, and the scripts that import no TensorFlow (kill_resume.py, plot.py) run
as command lines.
"""

import csv
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest
from absl import flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples import cli, hub_text, kill_resume, plot, soak, sweep  # noqa: E402


def _exit_message(module, argv):
    """The exit message of parsing `argv` with `module`'s flags (fresh FlagValues)."""
    fv = flags.FlagValues()
    module.define_flags(fv)
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_flags(["prog", *argv], fv)
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def _parsed(module, argv):
    fv = flags.FlagValues()
    module.define_flags(fv)
    cli.parse_flags(["prog", *argv], fv)
    return fv


def _script(name, *argv, cwd):
    """Runs examples/<name> (one that imports no TensorFlow) in `cwd`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "examples" / name), *argv], cwd=str(cwd),
                          capture_output=True, text=True, env=env, timeout=120)


def _one_error_line(proc, *fragments):
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


# -- kill_resume.py -------------------------------------------------------------------

@pytest.mark.parametrize("argv,fragment", [
    (["--kills=-1"], "flag --kills=-1: --kills must be >= 0"),
    (["--epochs=0"], "flag --epochs=0: --epochs must be >= 1"),
    (["--epochs=0", "--kills=2"], "--epochs must be >= 1"),
    (["--seed=-1"], "flag --seed=-1: --seed must be >= 0"),
])
def test_kill_resume_refuses_negative_kills_and_no_epochs(argv, fragment):
    assert fragment in _exit_message(kill_resume, argv)
    assert _parsed(kill_resume, ["--kills=0", "--epochs=1"]).kills == 0


def test_kill_resume_refuses_a_work_dir_that_is_a_file(tmp_path):
    regular = tmp_path / "afile"
    regular.write_text("not a directory")
    with pytest.raises(ValueError, match=r"^--work_dir=.*afile: it is a file, not a directory$"):
        kill_resume.prepare_work_dir(str(regular))
    with pytest.raises(ValueError, match=r"afile/sub: .*afile is a file, not a directory$"):
        kill_resume.prepare_work_dir(str(regular / "sub"))
    assert regular.read_text() == "not a directory"
    # on the command line: one line, before any training run
    proc = _script("kill_resume.py", "--work_dir=afile/sub", "--kills=0", "--epochs=1",
                   cwd=tmp_path)
    _one_error_line(proc, "error: --work_dir=afile/sub: ", "afile is a file, not a directory")
    assert "reference run" not in proc.stdout


def test_kill_resume_rerun_starts_without_the_previous_run_s_state(tmp_path):
    """A leftover backup would be restored by the next run's first restart (which would
    then resume at the end: no kill, a spurious FAIL): the script's own files go first."""
    (tmp_path / "backup" / "ckpt-3").mkdir(parents=True)
    (tmp_path / "backup" / "latest").write_text("ckpt-3")
    (tmp_path / "reference.npz").write_bytes(b"old")
    (tmp_path / "killed.npz").write_bytes(b"old")
    (tmp_path / "notes.txt").write_text("the user's")
    lines = []
    assert kill_resume.prepare_work_dir(str(tmp_path), print_fn=lambda s, **_: lines.append(s)) \
        == str(tmp_path)
    assert lines == [f"--work_dir={tmp_path}: removed the previous run's backup, reference.npz, "
                     "killed.npz"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    kill_resume.prepare_work_dir(str(tmp_path), print_fn=lines.append)  # nothing left: silent
    assert len(lines) == 1
    fresh = tmp_path / "new" / "dir"
    kill_resume.prepare_work_dir(str(fresh), print_fn=lines.append)
    assert fresh.is_dir() and len(lines) == 1


def test_kill_resume_names_why_it_failed():
    report = dict(kills=30, unreadable_backups=0, failed_restarts=0, start_timeouts=0,
                  final_state_bit_identical=True)
    assert kill_resume.failures(report, 30) == []
    short = kill_resume.failures({**report, "kills": 0}, 2)
    assert short == ["the run finished after 0 of 2 kills (too few epochs to kill in: raise "
                     "--epochs)"]
    assert kill_resume.failures({**report, "final_state_bit_identical": False}, 30) == [
        "the final state differs from the uninterrupted run's"]
    assert kill_resume.failures({**report, "unreadable_backups": 2}, 30) == [
        "2 kill(s) left an unreadable backup"]
    assert kill_resume.failures({**report, "kills": 0, "start_timeouts": 1}, 2) == [
        "a worker did not reach its first epoch within --start_timeout (raise it on a slow or "
        "busy machine)"]


def test_kill_resume_kills_a_worker_that_misses_its_first_epoch(tmp_path, monkeypatch):
    """--start_timeout: a worker that had not reached its first epoch in time was left to
    run (and one that hung before printing blocked the driver), then blamed on --epochs."""
    monkeypatch.setattr(kill_resume, "FLAGS", _parsed(kill_resume, ["--start_timeout=0.5"]))
    monkeypatch.setattr(kill_resume, "worker_command", lambda *args: [
        sys.executable, "-c", "import time; time.sleep(60)"])  # hangs before printing
    start = time.monotonic()
    report, final = kill_resume.run_killed(str(tmp_path), np.random.default_rng(0))
    assert time.monotonic() - start < 30
    assert final is None and report["start_timeouts"] == 1 and report["kills"] == 0
    assert kill_resume.failures({**report, "final_state_bit_identical": False}, 2)[0].startswith(
        "a worker did not reach its first epoch within --start_timeout")


# -- soak.py --------------------------------------------------------------------------

def test_soak_refuses_a_run_that_would_check_no_update():
    message = _exit_message(soak, ["--steps=5", "--update_every=10"])
    assert message == ("error: flags steps=5, update_every=10: --steps=5 is below "
                       "--update_every=10: no DST update would run, so no invariant would be "
                       "checked")
    fv = _parsed(soak, ["--steps=10", "--update_every=10"])  # one update: fine
    assert (fv.steps, fv.update_every) == (10, 10)
    with pytest.raises(ValueError, match="--steps=9 is below --update_every=10"):
        soak.run(steps=9, update_every=10)  # (refused before the model is built)


# -- hub_text.py ----------------------------------------------------------------------

@pytest.mark.parametrize("argv,fragment", [
    (["--density=0", "--methods=static"], "flag --density=0.0: --density must be in (0, 1]"),
    (["--seeds=x"], "flag --seeds=['x']: --seeds must be one or more distinct integers"),
    (["--seeds=1,1"], "--seeds must be one or more distinct integers"),
    (["--num_train=0", "--methods=static"], "flag --num_train=0: --num_train must be >= 1"),
    (["--methods=dense,sparse"], "--methods must name one or more of dense, static, dst"),
    (["--prune=nope"], "flag --prune=nope: Unknown criterion 'nope'; known: '"),
    (["--grow=rigl"], "flag --grow=rigl: Unknown growth rule 'rigl'"),
    (["--end_step=1.5"], "--end_step must be in (0, 1]"),
    (["--seeds=-1"], "--seeds must be one or more distinct integers in [0, 2**32 - 1]"),
    (["--seeds=1,4294967296"], "--seeds must be one or more distinct integers in [0, 2**32 - 1]"),
    # a DST run that would never update (it failed after the other methods had trained)
    (["--num_train=32", "--epochs=1"], "no DST update would run: --update_every=100 is past "
                                       "the last update step 0 (--end_step=0.75 of the run's 1 "
                                       "steps"),
    (["--num_train=320", "--epochs=2", "--end_step=1"], "--update_every=100 is past the last "
                                                        "update step 20"),
])
def test_hub_text_bad_flags_are_one_line_errors_before_training(argv, fragment):
    assert fragment in _exit_message(hub_text, argv)
    fv = _parsed(hub_text, ["--num_train=32", "--epochs=1", "--methods=dense,static"])
    assert fv.num_train == 32  # (no DST run: no update needed)
    assert _parsed(hub_text, ["--num_train=320", "--epochs=2", "--update_every=20",
                              "--end_step=1"]).update_every == 20


def test_hub_text_builds_its_callback_from_the_parsed_flags():
    """(run() passed FLAGS itself, whose items are Flag objects: every DST run failed;
    test_hub.py's slow test runs the script.)"""
    fv = _parsed(hub_text, ["--methods=dst", "--update_every=7", "--end_step=1.0"])
    config = hub_text.dst_callback(fv.flag_values_dict(), seed=3).get_config()
    assert (config["update_every"], config["end_step"], config["seed"]) == (7, None, 3)


def test_hub_text_prints_the_library_s_names(monkeypatch):
    fv = _parsed(hub_text, ["--prune=Magnitude", "--grow=GRADIENT", "--methods=dst",
                            "--end_step=1.0"])
    hub_text.canonical_names(fv)
    assert (fv.prune, fv.grow) == ("magnitude", "gradient")
    monkeypatch.setattr(hub_text, "FLAGS", fv)
    table = hub_text.table([dict(method="dst", seed=1, test_accuracy=0.75, train_time_s=3.0,
                                 density=0.2)])
    assert "| DST (magnitude prune, gradient growth) | 0.200 | 0.7500 ± 0.0000 | 1 |" in table


@pytest.mark.parametrize("argv,match", [
    (["--methods=dense,static", "--prune=snip"], r"--prune=snip is not used by "
                                                 r"--methods=dense,static: it applies to dst"),
    (["--methods=dense", "--density=0.1"], r"--density=0.1 .* applies to static and dst"),
])
def test_hub_text_refuses_a_flag_no_method_reads(argv, match):
    with pytest.raises(ValueError, match=match):
        hub_text.check_given_flags_apply(_parsed(hub_text, argv))
    hub_text.check_given_flags_apply(_parsed(hub_text, [*argv, "--methods=dst"]))


def test_hub_text_names_an_output_dir_that_is_a_file(tmp_path, monkeypatch):
    """(os.makedirs' FileExistsError ended in a traceback)"""
    (tmp_path / "afile").write_text("")
    fv = _parsed(hub_text, [f"--output_dir={tmp_path / 'afile'}"])
    monkeypatch.setattr(hub_text, "FLAGS", fv)
    with pytest.raises(SystemExit, match=r"^error: --output_dir=.*afile: it is a file, not a "
                                         r"directory$"):
        hub_text.main(["hub_text.py"])


# -- plot.py --------------------------------------------------------------------------

def _sweep_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sweep.COLUMNS)
        writer.writeheader()
        for i, row in enumerate(rows):
            acc = row.pop("acc")
            writer.writerow({**{c: "" for c in sweep.COLUMNS}, "key": str(i), "model": "mlp",
                             "dataset": "digits", "epochs": 3, "best_val_test_accuracy": acc,
                             "final_test_accuracy": acc, **row})
    return str(path)


def _mixed_csvs(tmp_path):
    """Two CSVs: dense, static, DST magnitude/random and DST set/gradient at density 0.1."""
    dst = lambda prune, grow, pattern, acc, seed: dict(  # noqa: E731
        method="dst", prune=prune, grow=grow, density=0.1, pattern=pattern, seed=seed, acc=acc)
    rows = []
    for seed in (1, 2):
        rows += [dict(method="dense", density=1.0, seed=seed, acc=0.9),
                 dict(method="static", density=0.1, pattern="unstructured", seed=seed, acc=0.5),
                 dst("magnitude", "random", "unstructured", 0.8, seed),
                 dst("set", "gradient", "1x4", 0.7, seed)]
    (tmp_path / "sw").mkdir()
    return [_sweep_csv(tmp_path / "p.csv", rows),
            _sweep_csv(tmp_path / "sw" / "s.csv",
                       [dst("magnitude", "random", "1x4", 0.6, seed) for seed in (1, 2)])]


def test_pattern_table_averages_the_seeds_of_one_configuration(tmp_path):
    csvs = _mixed_csvs(tmp_path)
    table = plot.pattern_table(csvs).splitlines()
    assert table[2:] == [
        "| mlp / digits | 1x4 (dst magnitude/random) | 0.1 | 0.6000 ± 0.0000 (2) | -20.0 pp |",
        "| mlp / digits | unstructured (dst magnitude/random) | 0.1 | 0.8000 ± 0.0000 (2) |  |",
        "| mlp / digits | 1x4 (dst set/gradient) | 0.1 | 0.7000 ± 0.0000 (2) |  |",
        "| mlp / digits | unstructured (static) | 0.1 | 0.5000 ± 0.0000 (2) |  |",
        "| mlp / digits | dense | 1 | 0.9000 ± 0.0000 (2) |  |",
    ]
    paths = plot.plot_patterns(csvs, str(tmp_path / "fig"))  # (the same cells, one curve each)
    assert all(os.path.getsize(p) > 1000 for p in paths)


def test_pattern_table_of_one_configuration_names_patterns_alone(tmp_path):
    rows = [dict(method="dst", prune="magnitude", grow="random", density=0.1, pattern=p,
                 seed=s, acc=a + 0.01 * s) for p, a in (("unstructured", 0.8), ("2:4", 0.7))
            for s in (1, 2, 3)]
    table = plot.pattern_table(_sweep_csv(tmp_path / "one.csv", rows)).splitlines()
    assert table[2:] == [
        "| mlp / digits | 2:4 | 0.1 | 0.7200 ± 0.0082 (3) | -10.0 pp |",
        "| mlp / digits | unstructured | 0.1 | 0.8200 ± 0.0082 (3) |  |",
    ]


def test_pattern_cells_refuse_a_seed_twice(tmp_path):
    path = _mixed_csvs(tmp_path)[0]
    with pytest.raises(ValueError, match=r"mlp / digits, dense at density 1 has seed\(s\) 1, 2 "
                                         "more than once"):
        plot.pattern_table([path, path])


@pytest.mark.parametrize("case", ["missing", "empty", "header_only", "not_a_number"])
def test_plot_reads_and_checks_its_input_before_printing(tmp_path, case):
    header = ",".join(sweep.COLUMNS) + "\n"
    files = {"empty": "", "header_only": header,
             "not_a_number": header + "k,dense,,,1.0,,1,mlp,digits,3,x,high,,,,,\n"}
    if case in files:
        (tmp_path / "in.csv").write_text(files[case])
    name = "nope.csv" if case == "missing" else "in.csv"
    for flag in ("--csv", "--patterns"):
        proc = _script("plot.py", f"{flag}={name}", "--out=fig", cwd=tmp_path)
        expected = {"missing": "cannot read it: No such file or directory",
                    "empty": "no rows to plot", "header_only": "no rows to plot",
                    "not_a_number": "line 2: best_val_test_accuracy='high' is not a number"}[case]
        _one_error_line(proc, f"error: {flag}={name}", expected)
        assert proc.stdout == "" and not (tmp_path / "fig.png").exists()


@pytest.mark.parametrize("name,text,expected", [
    ("nope.json", None, "cannot read it: No such file or directory"),
    ("bad.json", "{x", "not JSON"),
    ("empty.csv", "", "the file is empty"),
    ("word.csv", "a,b\n1,x\n0.5,1\n", "line 2 holds a value that is not a number"),
    ("keys.json", '{"names": ["a"]}', 'no "names" and "matrix"'),
    ("shape.json", '{"names": ["a", "b"], "matrix": [[1, 0]]}', "the matrix must be 2x2"),
])
def test_plot_overlap_input_errors_name_the_flag_and_file(tmp_path, name, text, expected):
    """(were tracebacks, or errors naming neither: an IndexError, a KeyError, ...)"""
    if text is not None:
        (tmp_path / name).write_text(text)
    with pytest.raises(ValueError) as info:
        plot.load_matrix(str(tmp_path / name), "--overlap")
    assert str(info.value).startswith(f"--overlap={tmp_path / name}: ") and expected in str(info.value)


def test_plot_errors_of_overlap_and_out_are_one_line(tmp_path):
    proc = _script("plot.py", "--overlap=nope.json", cwd=tmp_path)
    _one_error_line(proc, "error: --overlap=nope.json: cannot read it")
    (tmp_path / "m.json").write_text('{"names": ["a", "b"], "matrix": [[1, 0.5], [0.5, 1]]}')
    (tmp_path / "afile").write_text("")
    proc = _script("plot.py", "--overlap=m.json", "--out=afile/sub/fig", cwd=tmp_path)
    _one_error_line(proc, "error: the directory of --out=", "afile is a file, not a directory")
    proc = _script("plot.py", "--overlap=m.json", "--out=fig", cwd=tmp_path)
    assert proc.returncode == 0 and (tmp_path / "fig.png").exists(), proc.stderr


def test_plot_refuses_a_ymin_above_the_data(tmp_path):
    path = _mixed_csvs(tmp_path)[0]
    with pytest.raises(ValueError, match=r"--ymin=2 is at or above the highest "
                                         r"best_val_test_accuracy in the data \(0\.9000\)"):
        plot.check_ymin(plot.load_rows([path], "best_val_test_accuracy", "--csv"),
                        "best_val_test_accuracy", 2.0)
    with pytest.raises(ValueError, match="--ymin=0.9 is at or above"):
        plot.plot_figure1(path, str(tmp_path / "fig"), ymin=0.9)
    proc = _script("plot.py", "--csv=p.csv", "--ymin=2", "--out=fig", cwd=tmp_path)
    _one_error_line(proc, "error: --ymin=2 is at or above the highest")
    assert proc.stdout == "" and not (tmp_path / "fig.png").exists()
    proc = _script("plot.py", "--patterns=p.csv", "--ymin=0.5", cwd=tmp_path)
    _one_error_line(proc, "error: --ymin=0.5: it sets the bottom of Figure 1's y axes (--csv)")
    proc = _script("plot.py", "--csv=p.csv", "--ymin=0.6", "--out=fig", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("best_val_test_accuracy: mean ± std over seeds")
    assert (tmp_path / "fig.png").exists()


def test_plot_refuses_a_flag_its_figure_would_ignore(tmp_path):
    """(--title with --csv and --metric with --overlap were ignored without a word)"""
    _mixed_csvs(tmp_path)
    proc = _script("plot.py", "--csv=p.csv", "--title=Mine", "--out=fig", cwd=tmp_path)
    _one_error_line(proc, "error: --title=Mine: it titles the overlap heatmap (--overlap)")
    proc = _script("plot.py", "--overlap=m.json", "--metric=final_test_accuracy", cwd=tmp_path)
    _one_error_line(proc, "error: --metric=final_test_accuracy: the overlap heatmap (--overlap) "
                          "shows Jaccard indices, not an accuracy")
    assert not list(tmp_path.glob("*.png"))


def test_plot_refuses_a_ymin_that_is_not_a_finite_number(tmp_path):
    path = _mixed_csvs(tmp_path)[0]
    rows = plot.load_rows([path], "best_val_test_accuracy", "--csv")
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"--ymin=(nan|inf): must be a finite number"):
            plot.check_ymin(rows, "best_val_test_accuracy", bad)

