"""Smoke tests of the benchmark scripts (examples/benchmarks/): they run in --quick mode
and write the Markdown table and the JSON with the documented fields. Timings are
not checked (the numbers of a --quick run are meaningless). Marked slow: CI runs them in
its second pass (`pytest -m slow`)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

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


@pytest.mark.slow  # ~25 s of subprocess; CI's second pass runs it
def test_overhead_quick(tmp_path):
    run_script("overhead.py", "--models=mlp", "--epochs=1", "--update_cost=isolated",
               f"--out_dir={tmp_path}")
    doc = json.loads((tmp_path / "quick_overhead.json").read_text())
    r = doc["models"]["mlp"]
    check_machine(r["machine"])
    assert r["config"]["quick"] is True and r["jit_compile"] is True
    assert r["rounds_timed"] == 1 and r["dense_step_ms"] > 0
    assert r["variants"]["static"]["ratio"] > 0
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
    md = (tmp_path / "quick_overhead.md").read_text()
    for heading in ("## Step time, ratios to dense", "## Memory", "| mlp |"):
        assert heading in md


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
