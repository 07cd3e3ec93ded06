"""examples/soak.py stays runnable: its full logic for 200 steps, and its checks can fail."""

import pathlib
import sys

import numpy as np
import pytest
from absl import flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import keras_dst  # noqa: E402
from examples import soak  # noqa: E402

from conftest import write_underneath  # noqa: E402


def test_soak_runs_200_steps_and_checks_every_update():
    lines = []
    summary = soak.run(steps=200, update_every=10, seed=1, prune="magnitude", grow="gradient",
                       density=0.1, report_every=5, print_fn=lambda s, **_: lines.append(s))
    assert summary["steps"] == 200 and summary["updates_checked"] == 20
    assert summary["checks"] == 20  # one check per update, right after it
    assert summary["density"] == pytest.approx(0.1, abs=1e-4)
    assert 0.1 < summary["itop"] <= 1.0
    assert summary["final_test_accuracy"] > 0.3  # learning, well above chance (0.1)
    assert len(lines) == 4 and "updates checked" in lines[0]


def test_soak_runs_a_running_criterion():
    """(--prune running_magnitude, which its help lists, asked for track_running_scores=True,
    a step the command line cannot take)"""
    summary = soak.run(steps=20, update_every=10, prune="running_magnitude",
                       print_fn=lambda s, **_: None)
    assert summary["updates_checked"] == 2


def _state():
    model = keras_dst.prunable(soak.build_model(), density=0.1)
    targets = keras_dst.sparse_targets(model)
    expected = [int(t.mask.numpy().sum()) for t in targets]
    totals = [int(np.prod(t.weight.shape)) for t in targets]
    return model, targets, expected, totals


def test_check_invariants_passes_on_a_fresh_model_and_fails_on_each_violation():
    model, targets, expected, totals = _state()
    itop = soak.check_invariants(targets, expected, totals, 0, 0)
    assert itop == sum(expected)  # ever_active starts as the mask
    with pytest.raises(soak.SoakInvariantError, match="ITOP count fell"):
        soak.check_invariants(targets, expected, totals, itop + 1, 7)
    with pytest.raises(soak.SoakInvariantError, match="expected exactly"):
        soak.check_invariants(targets, [expected[0] + 1] + expected[1:], totals, 0, 7)

    t = targets[0]
    original = t.weight.numpy().copy()
    mask = t.mask.numpy()
    w = original.copy()
    w[np.argwhere(~mask)[0][0], np.argwhere(~mask)[0][1]] = 1e-30
    write_underneath(t.weight, w)  # underneath Keras: keras_dst's eager assign would re-zero it
    with pytest.raises(soak.SoakInvariantError, match="not exactly 0"):
        soak.check_invariants(targets, expected, totals, 0, 7)
    w = original.copy()
    w[tuple(np.argwhere(mask)[0])] = np.nan
    t.weight.assign(w)
    with pytest.raises(soak.SoakInvariantError, match="non-finite"):
        soak.check_invariants(targets, expected, totals, 0, 7)
    t.weight.assign(original)
    # past the write guard (an eager write keeps the flags True under the mask)
    type(t.ever_active).assign(t.ever_active, np.zeros(mask.shape, bool))
    with pytest.raises(soak.SoakInvariantError, match="ever_active"):
        soak.check_invariants(targets, expected, totals, 0, 7)


def test_soak_flags_have_the_documented_defaults():
    fv = flags.FlagValues()
    soak.define_flags(fv)
    fv(["soak.py", "--prune=snip"])
    assert (fv.steps, fv.update_every, fv.seed, fv.prune, fv.grow, fv.density) == \
        (100_000, 10, 0, "snip", "gradient", 0.1)
