"""Smoke tests of the benchmark scripts (examples/benchmarks/): they run in --quick mode
and write the Markdown table and the JSON with the documented fields. Timings are
not checked (the numbers of a --quick run are meaningless). Marked slow: CI runs them in
its second pass (`pytest -m slow`)."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from examples.benchmarks import bench_utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "examples", "benchmarks")


def run_script(name, *args, timeout=300):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, os.path.join(BENCH, name), "--quick", *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def check_machine(machine):
    for key in ("date_utc", "device", "cpu", "cpu_cores", "tensorflow", "keras",
                "load_average_1_5_15min"):
        assert key in machine, key


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.5, 2.0), min_size=0, max_size=40))
def test_median_ci_is_the_order_statistics_of_the_binomial_tail(xs):
    ci = bench_utils.median_ci(xs)
    n = len(xs)
    ks = [k for k in range(1, n // 2 + 1)  # P(Binomial(n, 1/2) < k) <= 2.5 %
          if sum(math.comb(n, j) for j in range(k)) <= 0.025 * 2 ** n]
    if not ks:  # n < 6: no 95 % interval exists
        assert ci is None
        return
    ordered, k = sorted(xs), max(ks)
    assert ci == (ordered[k - 1], ordered[n - k])
    assert ci[0] <= bench_utils.median(xs) <= ci[1]


def test_median_ci_covers_the_true_median_at_least_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    for n in (6, 10, 30):
        hits = [lo <= 0.5 <= hi for lo, hi in
                (bench_utils.median_ci(rng.uniform(size=n).tolist()) for _ in range(2000))]
        assert np.mean(hits) >= 0.95, n
    assert bench_utils.median_ci(list(range(10, 0, -1))) == (2, 9)  # P(B(10,1/2) <= 1) = 1.1 %


def test_verdict_needs_the_whole_interval_on_one_side_of_the_target():
    assert bench_utils.verdict(1.02, 1.03, (1.00, 1.029)) == "met"
    assert bench_utils.verdict(1.05, 1.03, (1.031, 1.06)) == "MISSED"
    assert bench_utils.verdict(1.02, 1.03, (1.00, 1.05)) == "met on the median, within noise"
    assert bench_utils.verdict(1.04, 1.03, (1.00, 1.05)) == "missed on the median, within noise"
    assert bench_utils.verdict(1.04, 1.03) == "MISSED"


def test_interleaved_reverses_the_order_every_other_round():
    assert list(bench_utils.interleaved(("a", "b"), 3)) == [
        (0, "a"), (0, "b"), (1, "b"), (1, "a"), (2, "a"), (2, "b")]
    assert list(bench_utils.interleaved(("a", "b"), 3, start=1)) == [
        (1, "b"), (1, "a"), (2, "a"), (2, "b")]
    assert bench_utils.ratio_stats([2.0, 3.0, 4.0], [1.0, 2.0, 2.0]) == (2.0, None)


def test_later_call_cell_judges_the_ratio_net_of_the_updates():
    res = {"later_call_ratio": 1.10, "later_call_ratio_ci95": (1.08, 1.12),
           "later_call_update_allowance": 0.08, "later_call_net_ratio": 1.02,
           "later_call_net_ratio_ci95": (1.00, 1.04)}
    assert bench_utils.later_call(res, 1.05) == "1.100 [1.080, 1.120] vs 1.130 (met)"
    assert bench_utils.later_call(res) == \
        "1.100 [1.080, 1.120], update +0.080, net 1.020 [1.000, 1.040]"
    no_u = {"later_call_ratio": 1.10, "later_call_ratio_ci95": None}
    assert bench_utils.later_call(no_u, 1.05) == "1.100 (MISSED; U unknown)"
    assert bench_utils.later_call({}, 1.05) == "n/a"


def check_fit_calls(r):
    """The first-fit and fit-loop results of a --quick overhead.py run (1 fresh model per
    variant, 3 fit calls of 4 steps with ΔT = 4: every call holds one update, at its last
    step)."""
    variants = ("dense", "static", "dst_magnitude", "dst_snip")
    ff = r["first_fit"]
    assert ff["repeats"] == 1 and ff["steps"] == 4
    for v in variants:
        assert ff["variants"][v]["seconds"] > 0 and len(ff["variants"][v]["seconds_all"]) == 1
        assert ff["variants"][v]["build_s"] > 0  # build (+ prunable) + compile, not in the fit
    for v in variants[1:]:
        ratio = ff["variants"][v]["ratio"]
        assert math.isfinite(ratio) and ratio > 0
        assert ff["variants"][v]["ratio_ci95"] is None  # one repeat: no interval
    assert ff["variants"]["dst_magnitude"]["updates"] == 1
    fl = r["fit_loop"]
    assert fl["calls"] == 3 and fl["later_calls"] == 1
    assert fl["steps_per_call"] == 4 and fl["window_steps"] == 3
    for v in variants:
        res, raw = fl["variants"][v], fl["raw_calls"][v]
        for key in ("first_call_s", "second_call_s", "later_call_s", "window_step_ms"):
            assert res[key] > 0, (v, key)
        assert [c["steps"] for c in raw] == [4, 4, 4] and raw[-1]["it1"] == 12
        assert all(0 < c["window_s"] < c["seconds"] for c in raw)
        assert raw[0]["seconds"] == ff["variants"][v]["seconds_all"][0]  # call 1 = first fit
    for v in variants[1:]:
        res = fl["variants"][v]
        for key in ("first_call_ratio", "second_call_ratio", "later_call_ratio", "window_ratio"):
            assert math.isfinite(res[key]) and res[key] > 0, (v, key)
    rl = r["reload"]  # one repeat's models saved, loaded and fit twice
    assert rl["repeats"] == 1 and rl["steps"] == 4
    for v in variants:
        res = rl["variants"][v]
        assert res["load_s"] > 0 and res["first_fit_s"] > 0 and res["second_fit_s"] > 0
        assert len(res["first_fit_s_all"]) == len(res["second_fit_s_all"]) == 1
    for v in variants[1:]:
        for key in ("load_ratio", "first_fit_ratio", "second_fit_ratio"):
            assert math.isfinite(rl["variants"][v][key]) and rl["variants"][v][key] > 0
    for v in variants[2:]:
        res = fl["variants"][v]
        assert res["updates_per_later_call"] == [1] and res["updates_in_windows"] == 1
        assert res["update_ms_used"] > 0 and res["later_call_update_allowance"] > 0
        assert math.isfinite(res["later_call_net_ratio"])


@pytest.mark.slow  # ~40 s of subprocess on 2 cores; CI's second pass runs it
def test_overhead_quick(tmp_path):
    run_script("overhead.py", "--models=mlp", "--epochs=1", "--update_cost=isolated",
               f"--out_dir={tmp_path}")
    doc = json.loads((tmp_path / "quick_overhead.json").read_text())
    r = doc["models"]["mlp"]
    check_machine(r["machine"])
    assert r["config"]["quick"] is True and r["jit_compile"] is True
    assert r["rounds_timed"] == 1 and r["dense_step_ms"] > 0
    assert r["variants"]["static"]["ratio"] > 0
    assert r["variants"]["static"]["ratio_ci95"] is None  # one round: no interval
    compiled = r["compiled_step"]  # the static step has the dense step's kernels
    assert compiled["static_same_kernels"] is True and compiled["dense"]["kernels"]
    assert compiled["static_extra_inputs"] == 3  # one mask per Dense kernel
    for v in ("dst_magnitude", "dst_snip"):
        res = r["variants"][v]
        for key in ("step_ratio", "amortised_ratio", "update_in_dense_steps",
                    "update_ms_isolated_A", "direct_ratio", "update_every"):
            assert res[key] is not None, (v, key)
        assert res["update_method"].startswith("A")
    assert r["isolated_update"]["dst_magnitude"]["median_s"] > 0
    mem = r["memory"]
    assert mem["mask_bytes"] > 0 and mem["stored_gradient_bytes"] == 0
    assert mem["extra_bytes"] >= mem["mask_bytes"] + mem["ever_active_bytes"]
    check_fit_calls(r)
    md = (tmp_path / "quick_overhead.md").read_text()
    for heading in ("## Step time, ratios to dense", "## Memory", "| mlp |",
                    "static kernels = dense", "yes (+3 inputs)", "## First fit of a fresh model",
                    "model build s, dense / sparse",
                    "## Fit loop: repeated fit(epochs=1) calls", "## Reload from disk"):
        assert heading in md
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "summarize.py"),
                           f"--out_dir={tmp_path}", "--prefix=quick"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = (tmp_path / "quick_summary.md").read_text()
    assert "| mlp |" in summary and "yes (+3 inputs)" in summary
    for row in ("first fit DST/dense (≤ 1.5)", "fit-loop window DST/dense (≤ 1.03)",
                "later fit call DST/dense (≤ 1.05 + update)",
                "first fit after a reload from disk DST/dense (≤ 1.5)"):
        line = next(x for x in summary.splitlines() if row in x)  # a verdict per DST cell
        assert line.count("(met") + line.count("(MISSED") + line.count("(missed") == 2, line


@pytest.mark.slow
def test_overhead_quick_fit_loop_of_several_models(tmp_path):
    """--fit_loop_models=2: the first two repeats' models each make every fit-loop call;
    a call's time is the median over them (their own times kept)."""
    run_script("overhead.py", "--models=mlp", "--epochs=1", "--update_cost=none",
               "--fit_loop_models=2", f"--out_dir={tmp_path}")
    r = json.loads((tmp_path / "quick_overhead.json").read_text())["models"]["mlp"]
    assert r["config"]["fit_loop_models"] == 2
    assert r["first_fit"]["repeats"] == 2  # both models' first fits are first fits
    fl = r["fit_loop"]
    assert fl["models"] == 2 and fl["calls"] == 3
    for v, calls in fl["raw_calls"].items():
        for i, call in enumerate(calls):
            both = call["seconds_per_model"]
            assert len(both) == 2 and all(t > 0 for t in both), (v, i)
            assert call["seconds"] == pytest.approx(sum(both) / 2), (v, i)  # median of two
        assert [c["seconds_per_model"] for c in calls[:1]] == [
            r["first_fit"]["variants"][v]["seconds_all"]]  # call 1 = the two first fits
    assert "2 models" in (tmp_path / "quick_overhead.md").read_text()


@pytest.mark.slow
def test_late_constraint_quick(tmp_path):
    run_script("late_constraint.py", f"--out_dir={tmp_path}")
    doc = json.loads((tmp_path / "quick_late_constraint.json").read_text())
    check_machine(doc["machine"])
    assert doc["config"]["quick"] is True and doc["config"]["rounds"] == 3
    results = doc["results"]
    assert list(results) == ["dense", "static", "dst_late", "dst_inside"]
    for v, res in results.items():
        assert len(res["first_fit_s"]) == 1 and len(res["window_ms"]) == 3
        assert all(t > 0 for t in res["first_fit_s"] + res["window_ms"]), v
        if v != "dense":
            assert math.isfinite(res["window_ratio"]) and math.isfinite(res["first_fit_ratio"])
    md = (tmp_path / "quick_late_constraint.md").read_text()
    assert "| dst_inside |" in md and "window / dense" in md


@pytest.mark.slow
def test_scaling_quick(tmp_path):
    run_script("scaling.py", "--sizes=1e4,4e4", "--layers=1,2", f"--out_dir={tmp_path}")
    doc = json.loads((tmp_path / "quick_scaling.json").read_text())
    check_machine(doc["machine"])
    assert [r["n"] for r in doc["params_scaling"]] == [10_000, 40_000]
    for r in doc["params_scaling"] + doc["layers_scaling"]:
        assert r["median_s"] > 0 and r["pruned_and_regrown"] > 0
    assert [r["layers"] for r in doc["layers_scaling"]] == [1, 2]
    assert doc["params_fit"]["exponent"] is not None
    assert doc["layers_fit"]["exponent"] is not None
    host = doc["host_roundtrip"]
    assert host["ok"] is True and host["graph_forbidden_ops"] == []
    assert host["hlo_forbidden_ops"] == {} and host["hlo_sort_ops"] == 0
    md = (tmp_path / "quick_scaling.md").read_text()
    for heading in ("## Parameter count", "## Number of layers", "## Host round-trip check",
                    "no host round-trip"):
        assert heading in md


@pytest.mark.slow
def test_compile_breakdown_quick(tmp_path):
    run_script("compile_breakdown.py", "--models=mlp", f"--out_dir={tmp_path}")
    doc = json.loads((tmp_path / "quick_compile_breakdown.json").read_text())
    check_machine(doc["machine"])
    [res] = doc["results"]
    assert set(res["median"]) == {"dense", "static", "dst_magnitude", "dst_snip"}
    for variant, m in res["median"].items():
        parts = [m[k] for k in ("trace_s", "to_hlo_s", "hlo_passes_s", "codegen_s")]
        assert all(p > 0 for p in parts), (variant, m)
        assert sum(parts) < m["first_batch_s"], (variant, m)  # parts of the first batch
    # the static step compiles the dense kernels; DST's holds its update's as well
    assert res["median"]["static"]["llvm_modules"] == res["median"]["dense"]["llvm_modules"]
    assert res["median"]["dst_magnitude"]["llvm_modules"] > res["median"]["dense"]["llvm_modules"]
    md = (tmp_path / "quick_compile_breakdown.md").read_text()
    assert "| mlp | dst_snip |" in md and "LLVM modules" in md


@pytest.mark.slow
def test_memory_quick(tmp_path):
    run_script("memory.py", f"--out_dir={tmp_path}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quick_memory.json", "quick_memory.md"]
    doc = json.loads((tmp_path / "quick_memory.json").read_text())
    assert doc["quick"] is True and doc["cycles"] == 6
    assert set(doc["growth_mb_per_model"]) == {"dense", "static", "dst"}
    assert all(len(v) == doc["cycles"] and min(v) > 0 for v in doc["rss_mb"].values())
    assert math.isfinite(doc["dst_minus_dense_mb"])
    md = (tmp_path / "quick_memory.md").read_text()
    assert "DST - dense" in md and "not a measurement" in md and "not judged" in md


def _memory_result(quick, dst_growth=0.5):
    rss = {v: [100.0 + i for i in range(6)] for v in ("dense", "static", "dst")}
    return dict(cycles=6, warmup=2, quick=quick, rss_mb=rss,
                growth_mb_per_model={"dense": 1.0, "static": 1.0, "dst": 1.0 + dst_growth},
                dst_minus_dense_mb=dst_growth, command="python memory.py")


def test_memory_quick_run_has_its_own_file_names_and_no_verdict(tmp_path):
    """A --quick run writes quick_memory.*, never the measurement's cpu_memory.* (the
    default --out_dir is the committed results), and its .md says it is no measurement."""
    from examples.benchmarks import memory

    assert bench_utils.output_prefix(None, True, "cpu") == "quick"
    assert bench_utils.output_prefix(None, False, "cpu") == "cpu"
    assert bench_utils.output_prefix(None, False, lambda: "gpu") == "gpu"
    assert bench_utils.output_prefix("mine", True, "cpu") == "mine"
    md = memory.write_report(str(tmp_path), "quick", _memory_result(quick=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quick_memory.json", "quick_memory.md"]
    assert md == (tmp_path / "quick_memory.md").read_text()
    assert "--quick smoke run" in md and "not a measurement" in md
    assert "target <= 1 MB: not judged" in md and ": met" not in md
    full = memory.write_report(str(tmp_path), "cpu", _memory_result(quick=False))
    assert "--quick" not in full and "(target <= 1 MB: met)" in full
    assert "MISSED" in memory.write_report(str(tmp_path), "cpu", _memory_result(False, 1.5))


def test_memory_refuses_fewer_cycles_than_the_warmup_needs():
    from absl import flags

    from examples.benchmarks import memory

    for cycles, warmup in ((1, 5), (5, 5), (6, 5), (3, -1)):
        with pytest.raises(flags.ValidationError) as e:
            memory.check_cycles({"quick": False, "cycles": cycles, "warmup": warmup})
        assert "--warmup" in str(e.value), (cycles, warmup)
    assert "--cycles=1" in str(pytest.raises(flags.ValidationError, memory.check_cycles,
                                             {"quick": False, "cycles": 1, "warmup": 5}).value)
    assert memory.check_cycles({"quick": False, "cycles": 7, "warmup": 5})
    assert memory.check_cycles({"quick": True, "cycles": 1, "warmup": 5})  # --quick: its own counts


def test_list_flag_items_are_checked_one_by_one():
    import keras_dst

    assert bench_utils.parse_items(["0.1", "1"], bench_utils.density, "a density") == [0.1, 1.0]
    assert bench_utils.parse_items(["1e4", "3e5"], bench_utils.weight_count, "n") == [10_000, 300_000]
    assert bench_utils.parse_items(["2"], bench_utils.positive_int, "n") == [2]
    assert bench_utils.parse_items(["mlp"], bench_utils.one_of(("mlp", "convnet")), "m") == ["mlp"]
    for values, parse in ((["0.1", "abc"], bench_utils.density), (["0"], bench_utils.density),
                          (["1.5"], bench_utils.density), (["foo"], bench_utils.weight_count),
                          (["1"], bench_utils.weight_count), (["inf"], bench_utils.weight_count),
                          (["0"], bench_utils.positive_int), (["2.5"], bench_utils.positive_int),
                          (["nope"], bench_utils.one_of(("mlp",))), ([], bench_utils.density)):
        with pytest.raises(ValueError, match="is not a thing|no value given"):
            bench_utils.parse_items(values, parse, "a thing")
    with pytest.raises(ValueError, match="'bogus' is not a sparsity pattern .*accepted"):
        bench_utils.parse_items(["1x4", "bogus"], keras_dst.patterns.parse, "a sparsity pattern")


def run_refused(name, *args):
    """Runs examples/benchmarks/<name> with flags it must refuse: one `error:` line, no
    traceback; returns that line."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, os.path.join(BENCH, name), *args], capture_output=True,
                          text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


@pytest.mark.parametrize("name, args, fragments", [
    ("memory.py", ["--cycles=1"], ["--cycles=1", "--warmup=5"]),
    ("export_latency.py", ["--densities=abc"], ["--densities", "'abc'"]),
    pytest.param("export_latency.py", ["--patterns=bogus"], ["--patterns", "'bogus'", "accepted"],
                 marks=pytest.mark.slow),  # its check imports keras_dst (TensorFlow)
    ("scaling.py", ["--sizes=foo"], ["--sizes", "'foo'"]),
    ("compile_breakdown.py", ["--models=nope"], ["--models", "'nope'", "mlp"]),
    ("late_constraint.py", ["--model=nope"], ["--model=nope", "mlp"]),
])
def test_bad_flags_are_one_line_errors_before_any_work(tmp_path, name, args, fragments):
    out = "--out" if name == "export_latency.py" else "--out_dir"
    line = run_refused(name, *args, f"{out}={tmp_path}")
    for fragment in fragments:
        assert fragment in line, line
    assert list(tmp_path.iterdir()) == []  # refused before anything ran


def test_summarize_names_its_missing_inputs(tmp_path):
    line = run_refused("summarize.py", f"--out_dir={tmp_path}", "--prefix=nope")
    for fragment in ("--prefix=nope", f"--out_dir={tmp_path}", "nope_overhead.json",
                     "nope_scaling.json"):
        assert fragment in line, line
    assert list(tmp_path.iterdir()) == []
    # only the scaling input: summarized, the overhead one named as left out
    scaling = os.path.join(BENCH, "results", "cpu_scaling.json")
    (tmp_path / "part_scaling.json").write_text(open(scaling).read())
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "summarize.py"),
                           f"--out_dir={tmp_path}", "--prefix=part"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "left out of the summary: part_overhead.json (missing" in proc.stdout
    summary = (tmp_path / "part_summary.md").read_text()
    assert "Left out: part_overhead.json (missing" in summary and "## Mask-update scaling" in summary


@pytest.mark.slow
def test_export_latency_quick(tmp_path):
    pytest.importorskip("ai_edge_litert")
    run_script("export_latency.py", f"--out={tmp_path}", "--patterns=1x4,unstructured",
               "--batch_sizes=1,2")
    doc = json.loads((tmp_path / "quick_export.json").read_text())
    check_machine(doc["machine"])
    variants = doc["models"]["mlp"]["variants"]
    assert [v["name"] for v in variants] == ["dense", "1x4@0.1", "unstructured@0.1"]
    for v in variants:
        assert [(l["batch"], l["threads"]) for l in v["latency"]] == [(1, 1), (2, 1)]
        assert all(l["median_us"] > 0 and l["speedup"] > 0 for l in v["latency"])
    assert variants[1]["sparse_kernels"] >= 2 and variants[1]["size_ratio"] < 0.2
    assert variants[2]["densify_ops"] >= 2
    md = (tmp_path / "quick_export.md").read_text()
    assert "## mlp" in md and "Targets (issue)" in md and "densified (CSR)" in md
    assert (tmp_path / "quick_export_speedup.png").stat().st_size > 0


@pytest.mark.tfmot
def test_overhead_quick_against_tfmot(tmp_path):
    # find_spec, not import: importing TFMOT would switch this process to tf_keras
    if importlib.util.find_spec("tensorflow_model_optimization") is None:
        pytest.skip("needs the tfmot extra")
    run_script("overhead.py", "--models=mlp", "--epochs=1", "--update_cost=none", "--tfmot",
               f"--out_dir={tmp_path}", timeout=600)
    doc = json.loads((tmp_path / "quick_overhead.json").read_text())
    r = doc["models"]["mlp"]
    tm = r["tfmot"]
    assert tm["step_ms"] > 0 and tm["dst_magnitude_epoch_over_tfmot"] > 0
    assert tm["ratio_to_tf_keras_dense"] > 0
    summary = r["tfmot_summary"]["tfmot_pruned"]
    assert summary["tfmot"] and summary["tf_keras"]
    assert "## Against TFMOT" in (tmp_path / "quick_overhead.md").read_text()


def test_benchmark_scripts_define_their_flags_when_they_run_not_when_imported():
    """(importing two of them in one process failed on their common --out_dir)"""
    from absl import flags

    before = set(flags.FLAGS)
    # (not tfmot_epoch: importing it switches the process to tf_keras)
    for name in ("compile_breakdown", "export_latency", "late_constraint", "memory", "overhead",
                 "scaling", "summarize"):
        module = importlib.import_module(f"examples.benchmarks.{name}")
        assert callable(module.define_flags), name
    assert set(flags.FLAGS) == before
