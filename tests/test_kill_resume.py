"""The real-kill harness, short: SIGKILLed DST runs resume bit-identically (slow pass).

`examples/kill_resume.py` (30 kills by default) is the full version; this runs a few
kills so that the script cannot rot and the guarantee is checked in CI.
"""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "examples", "kill_resume.py")


@pytest.mark.slow
def test_sigkilled_runs_end_bit_identical_with_readable_backups(tmp_path):
    result = subprocess.run(
        [sys.executable, SCRIPT, "--kills=4", "--epochs=12", "--seed=3",
         f"--work_dir={tmp_path}"], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(result.stdout[result.stdout.index("{"):result.stdout.rindex("}") + 1])
    assert report["kills"] == 4 and report["unreadable_backups"] == 0
    assert report["final_state_bit_identical"] is True
    assert result.stdout.strip().endswith("PASS")
