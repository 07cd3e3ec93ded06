"""Tests for keras_dst.distributions (layer densities, counts, initial masks)."""

import math

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from keras_dst import distributions as dist
from keras_dst.distributions import (
    active_counts,
    bernoulli_mask,
    distribution_names,
    exact_mask,
    layer_densities,
    register_distribution,
    stable_seed,
)
from keras_dst.registry import Registry

# --------------------------------------------------------------------------- #
# Model shapes (Keras layouts: Dense (in, out), Conv (kh, kw, in, out))
# --------------------------------------------------------------------------- #

MLP_CIFAR10 = {"fc1": (3072, 1024), "fc2": (1024, 512), "fc3": (512, 10)}
SMALL_CONV = {
    "conv1": (3, 3, 3, 32),
    "conv2": (3, 3, 32, 64),
    "conv3": (3, 3, 64, 128),
    "fc": (128, 10),
}
LENET5 = {
    "conv1": (5, 5, 1, 20),
    "conv2": (5, 5, 20, 50),
    "fc3": (800, 500),
    "fc4": (500, 10),
}
MLP_HIGGS = {"fc1": (24, 256), "fc2": (256, 256), "fc4": (256, 1)}


def resnet56_shapes(classes):
    """Sparsified kernels of the CIFAR ResNet-56 of spec §6.2."""
    shapes = {"stem": (3, 3, 3, 16)}
    c_in = 16
    for stage, width in enumerate((16, 32, 64), start=1):
        for block in range(9):
            shapes[f"s{stage}b{block}c0"] = (3, 3, c_in, width)
            shapes[f"s{stage}b{block}c1"] = (3, 3, width, width)
            if c_in != width:
                shapes[f"sc{stage}"] = (1, 1, c_in, width)
            c_in = width
    shapes["fc"] = (64, classes)
    return shapes


def vgg16_shapes(classes):
    widths = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    shapes, c_in = {}, 3
    for i, w in enumerate(widths):
        shapes[f"conv{i}"] = (3, 3, c_in, w)
        c_in = w
    shapes["fc"] = (512, classes)
    return shapes


def n_of(shapes):
    return {k: math.prod(s) for k, s in shapes.items()}


def realised(shapes, densities):
    return sum(densities[k] * n for k, n in n_of(shapes).items())


# Spec §3.5, to 1e-4.
ERK_TABLE = [
    (MLP_CIFAR10, 0.05, {"fc1": 0.0413, "fc2": 0.0929, "fc3": 1.0}),
    (MLP_CIFAR10, 0.10, {"fc1": 0.0838, "fc2": 0.1885, "fc3": 1.0}),
    (MLP_CIFAR10, 0.20, {"fc1": 0.1688, "fc2": 0.3797, "fc3": 1.0}),
    (MLP_CIFAR10, 0.50, {"fc1": 0.4237, "fc2": 0.9532, "fc3": 1.0}),
    (SMALL_CONV, 0.05, {"conv1": 0.4780, "conv2": 0.0557, "conv3": 0.0271, "fc": 1.0}),
    (SMALL_CONV, 0.10, {"conv1": 1.0, "conv2": 0.1344, "conv3": 0.0652, "fc": 1.0}),
    (SMALL_CONV, 0.20, {"conv1": 1.0, "conv2": 0.3084, "conv3": 0.1496, "fc": 1.0}),
    (LENET5, 0.05, {"conv1": 0.7261, "conv2": 0.0375, "fc3": 0.0381, "fc4": 1.0}),
    (LENET5, 0.20, {"conv1": 1.0, "conv2": 0.1869, "fc3": 0.1898, "fc4": 1.0}),
    (MLP_HIGGS, 0.05, {"fc1": 0.1922, "fc2": 0.0330, "fc4": 1.0}),
    (MLP_HIGGS, 0.20, {"fc1": 0.8131, "fc2": 0.1394, "fc4": 1.0}),
    (MLP_HIGGS, 0.50, {"fc1": 1.0, "fc2": 0.4512, "fc4": 1.0}),
]

# Spec §3.5, 3 decimals: representative layer of each group (stage-2/3
# "convs" are the width->width convs).
RESNET_TABLE = [
    (10, 0.05, {"stem": 0.542, "s1b3c1": 0.154, "s2b3c1": 0.071, "s3b3c1": 0.034,
                "sc2": 0.914, "sc3": 0.448, "fc": 1.0}),
    (10, 0.10, {"stem": 1.0, "sc2": 1.0, "fc": 1.0, "s1b3c1": 0.313,
                "s2b3c1": 0.144, "s3b3c1": 0.069, "sc3": 0.908}),
    (10, 0.20, {"stem": 1.0, "sc2": 1.0, "sc3": 1.0, "fc": 1.0, "s1b3c1": 0.638,
                "s2b3c1": 0.294, "s3b3c1": 0.141}),
]


@pytest.mark.parametrize("shapes,density,expected", ERK_TABLE)
def test_erk_reference_table(shapes, density, expected):
    got = layer_densities(shapes, density, "erk")
    assert list(got) == list(shapes)
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-4), name
    # The classifier is exactly dense, not merely close.
    assert got[list(shapes)[-1]] == 1.0
    total = sum(n_of(shapes).values())
    assert realised(shapes, got) == pytest.approx(density * total, rel=1e-6)


def test_erk_reference_totals():
    assert sum(n_of(MLP_CIFAR10).values()) == 3_675_136
    assert sum(n_of(SMALL_CONV).values()) == 94_304
    assert sum(n_of(LENET5).values()) == 430_500
    assert sum(n_of(MLP_HIGGS).values()) == 71_936
    assert sum(n_of(resnet56_shapes(10)).values()) == 851_504
    assert sum(n_of(resnet56_shapes(100)).values()) == 857_264
    assert sum(n_of(vgg16_shapes(100)).values()) == 14_761_664


@pytest.mark.parametrize("classes,density,expected", RESNET_TABLE)
def test_erk_resnet56_table(classes, density, expected):
    shapes = resnet56_shapes(classes)
    got = layer_densities(shapes, density)
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-3), name
    # All width->width convs of one stage share one density.
    assert got["s3b1c0"] == got["s3b8c1"]
    assert realised(shapes, got) == pytest.approx(
        density * sum(n_of(shapes).values()), rel=1e-6
    )


def test_erk_resnet56_cifar100_and_vgg16():
    got = layer_densities(resnet56_shapes(100), 0.05)
    assert all(d < 1.0 for d in got.values())
    assert got["fc"] == pytest.approx(0.236, abs=1e-3)
    vgg = layer_densities(vgg16_shapes(100), 0.05)
    assert vgg["conv0"] == 1.0 and vgg["fc"] == 1.0
    assert vgg["conv12"] == pytest.approx(0.038, abs=1e-3)
    assert sum(d == 1.0 for d in vgg.values()) == 2


def test_erk_hand_worked_and_power():
    # rho_a = 4/4 = 1, rho_b = 8/16 = 0.5; budget 0.5 * 20 = 10; eps = 10 / 12.
    shapes = {"a": (2, 2), "b": (4, 4)}
    got = layer_densities(shapes, 0.5)
    assert got == pytest.approx({"a": 10 / 12, "b": 5 / 12})
    # power 2: rho = 1, 0.25; eps = 10 / (4 + 4) = 1.25 > 1 -> a dense,
    # then b gets (10 - 4) / 16.
    assert layer_densities(shapes, 0.5, power=2) == pytest.approx({"a": 1.0, "b": 6 / 16})
    # power 0: every rho is 1 -> uniform.
    assert layer_densities(MLP_HIGGS, 0.3, power=0) == pytest.approx(
        layer_densities(MLP_HIGGS, 0.3, "uniform")
    )


def test_erk_moves_every_layer_tied_at_the_max_and_is_layout_invariant():
    # a and b have the same rho (permuted shapes); both become dense together.
    shapes = {"a": (2, 3), "b": (3, 2), "c": (40, 40)}
    got = layer_densities(shapes, 0.1)
    assert got["a"] == got["b"] == 1.0
    assert got["c"] == pytest.approx((0.1 * 1612 - 12) / 1600)
    torch_layout = {k: (s[3], s[2], s[0], s[1]) for k, s in SMALL_CONV.items() if len(s) == 4}
    keras_layout = {k: s for k, s in SMALL_CONV.items() if len(s) == 4}
    assert layer_densities(torch_layout, 0.1) == layer_densities(keras_layout, 0.1)


def test_density_one_is_all_dense():
    # The last shapes once gave 0.9999999999999999 before snapping to 1.0.
    for name in ("erk", "er", "uniform"):
        for shapes in (MLP_CIFAR10, SMALL_CONV, resnet56_shapes(10), {"a": (2,), "b": (22, 9, 16)}):
            assert set(layer_densities(shapes, 1.0, name).values()) == {1.0}


# --------------------------------------------------------------------------- #
# er, uniform, fixed, custom
# --------------------------------------------------------------------------- #


def test_er_uses_last_two_axes():
    shapes = {"conv": (3, 3, 4, 8), "dense": (8, 16)}
    # rho_conv = 12 / 32, rho_dense = 24 / 128; eps = 0.25 * 416 / (108 + 24)
    eps = 0.25 * 416 / (288 * 12 / 32 + 128 * 24 / 128)
    got = layer_densities(shapes, 0.25, "er")
    assert got == pytest.approx({"conv": eps * 12 / 32, "dense": eps * 24 / 128})
    assert got != pytest.approx(layer_densities(shapes, 0.25, "erk"))
    # On 2-D kernels er and erk coincide.
    assert layer_densities(MLP_CIFAR10, 0.1, "er") == pytest.approx(
        layer_densities(MLP_CIFAR10, 0.1, "erk")
    )


def test_er_one_dim_is_treated_as_one_row():
    shapes = {"v": (4,), "w": (10, 10)}
    rho_v, rho_w = 5 / 4, 20 / 100  # (1 + 4) / 4 and (10 + 10) / 100
    eps = 0.1 * 104 / (rho_v * 4 + rho_w * 100)
    got = layer_densities(shapes, 0.1, "er")
    assert got == pytest.approx({"v": eps * rho_v, "w": eps * rho_w})


def test_uniform():
    got = layer_densities(SMALL_CONV, 0.07, "uniform")
    assert got == {k: 0.07 for k in SMALL_CONV}


def test_uniform_with_fixed_layer():
    n = n_of(SMALL_CONV)
    got = layer_densities(SMALL_CONV, 0.2, "uniform", fixed={"conv1": 1.0})
    expected = (0.2 * sum(n.values()) - n["conv1"]) / (sum(n.values()) - n["conv1"])
    assert got["conv1"] == 1.0
    assert [got[k] for k in ("conv2", "conv3", "fc")] == pytest.approx([expected] * 3)


@pytest.mark.parametrize("name", ["erk", "er"])
def test_fixed_layers_leave_the_solver(name):
    fixed = {"fc4": 0.5, "conv1": 0.0}
    got = layer_densities(LENET5, 0.1, name, fixed=fixed)
    assert got["fc4"] == 0.5 and got["conv1"] == 0.0
    assert realised(LENET5, got) == pytest.approx(0.1 * 430_500, rel=1e-9)
    # The free, non-dense layers keep the ratio of their raw scores.
    score = dist._erk_score if name == "erk" else dist._er_score
    assert got["conv2"] / score(LENET5["conv2"]) == pytest.approx(
        got["fc3"] / score(LENET5["fc3"])
    )


def test_fixed_budget_too_small_is_infeasible():
    with pytest.raises(ValueError, match=r"density=0\.5.*fc1"):
        layer_densities(MLP_CIFAR10, 0.5, fixed={"fc1": 1.0})
    # Feasible at a higher density.
    assert layer_densities(MLP_CIFAR10, 0.9, fixed={"fc1": 1.0})["fc1"] == 1.0


@pytest.mark.parametrize("name", ["erk", "er", "uniform"])
def test_fixed_budget_too_large_is_infeasible(name):
    with pytest.raises(ValueError, match=r"density=0\.5.*fc1.*> 1"):
        layer_densities(MLP_CIFAR10, 0.5, name, fixed={"fc1": 0.0})


def test_all_layers_fixed():
    fixed = {"a": 0.5, "b": 0.5}
    shapes = {"a": (4,), "b": (6,)}
    assert layer_densities(shapes, 0.5, fixed=fixed) == fixed
    with pytest.raises(ValueError, match="density=0.6"):
        layer_densities(shapes, 0.6, fixed=fixed)


def test_custom_mapping_and_fixed_override():
    custom = {"fc1": 0.1, "fc2": 0.2, "fc4": 0.0}
    assert layer_densities(MLP_HIGGS, 0.5, custom) == custom
    got = layer_densities(MLP_HIGGS, 0.5, custom, fixed={"fc4": 1.0})
    assert got == {"fc1": 0.1, "fc2": 0.2, "fc4": 1.0}


def test_custom_mapping_errors():
    with pytest.raises(ValueError, match=r"missing.*'fc2'.*'fc4'"):
        layer_densities(MLP_HIGGS, 0.5, {"fc1": 0.1})
    with pytest.raises(ValueError, match="'fc9'"):
        layer_densities(MLP_HIGGS, 0.5, {"fc1": 0.1, "fc2": 0.1, "fc4": 1.0, "fc9": 1.0})
    with pytest.raises(ValueError, match=r"distribution\['fc2'\].*1\.5"):
        layer_densities(MLP_HIGGS, 0.5, {"fc1": 0.1, "fc2": 1.5, "fc4": 1.0})
    with pytest.raises(TypeError, match=r"distribution\['fc2'\]"):
        layer_densities(MLP_HIGGS, 0.5, {"fc1": 0.1, "fc2": "a", "fc4": 1.0})


# --------------------------------------------------------------------------- #
# Validation
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, float("nan"), float("inf")])
def test_density_out_of_range(bad):
    with pytest.raises(ValueError, match=r"density.*" + str(bad)[:3]):
        layer_densities(MLP_HIGGS, bad)


@pytest.mark.parametrize("bad", [True, "0.5", None, [0.5]])
def test_density_not_a_number(bad):
    with pytest.raises(TypeError, match="density"):
        layer_densities(MLP_HIGGS, bad)


def test_density_numpy_scalars_accepted():
    assert layer_densities(MLP_HIGGS, np.float32(0.5)) == pytest.approx(
        layer_densities(MLP_HIGGS, 0.5)
    )


def test_unknown_distribution_lists_known_names():
    names = distribution_names()
    assert {"er", "erk", "uniform"} <= set(names) and list(names) == sorted(names)
    with pytest.raises(ValueError, match=r"'ERKK'.*'er'.*'erk'.*'uniform'"):
        layer_densities(MLP_HIGGS, 0.5, "ERKK")
    with pytest.raises(TypeError, match="distribution"):
        layer_densities(MLP_HIGGS, 0.5, 3)


def test_fixed_errors():
    with pytest.raises(ValueError, match=r"fixed.*'nope'"):
        layer_densities(MLP_HIGGS, 0.5, fixed={"nope": 1.0})
    with pytest.raises(ValueError, match=r"fixed\['fc1'\].*1\.2"):
        layer_densities(MLP_HIGGS, 0.5, fixed={"fc1": 1.2})
    with pytest.raises(ValueError, match=r"fixed\['fc1'\].*-0\.1"):
        layer_densities(MLP_HIGGS, 0.5, fixed={"fc1": -0.1})
    with pytest.raises(TypeError, match=r"fixed\['fc1'\]"):
        layer_densities(MLP_HIGGS, 0.5, fixed={"fc1": False})


def test_power_and_shape_errors():
    with pytest.raises(ValueError, match="power"):
        layer_densities(MLP_HIGGS, 0.5, power=-1.0)
    with pytest.raises(TypeError, match="power"):
        layer_densities(MLP_HIGGS, 0.5, power=True)
    with pytest.raises(ValueError, match="'fc1'"):
        layer_densities({"fc1": (None, 3)}, 0.5)
    with pytest.raises(ValueError, match="'fc1'"):
        layer_densities({"fc1": (-2, 3)}, 0.5)
    with pytest.raises(TypeError, match="shapes"):
        layer_densities([(3, 3)], 0.5)


def test_tensor_shape_accepted():
    shapes = {k: tf.TensorShape(s) for k, s in SMALL_CONV.items()}
    assert layer_densities(shapes, 0.1) == layer_densities(SMALL_CONV, 0.1)


@pytest.mark.parametrize("name", ["erk", "er", "uniform"])
def test_zero_size_layers(name):
    shapes = {"empty": (0, 5), "a": (4, 4), "b": (8, 2), "void": (3, 0, 2)}
    got = layer_densities(shapes, 0.25, name)
    assert got["empty"] == got["void"] == 1.0
    assert realised(shapes, got) == pytest.approx(0.25 * 32)
    counts = active_counts(shapes, got)
    assert counts["empty"] == counts["void"] == 0
    assert sum(counts.values()) == 8
    assert layer_densities({"e": (0,)}, 0.3, name) == {"e": 1.0}
    assert layer_densities({}, 0.3, name) == {}


# --------------------------------------------------------------------------- #
# Registry
# --------------------------------------------------------------------------- #


@pytest.fixture
def registered():
    names = []

    def register(name):
        names.append(name)
        return register_distribution(name)

    yield register
    for name in names:
        dist._DISTRIBUTIONS.unregister(name)


def test_register_distribution(registered):
    calls = []

    @registered("test_flat")
    def flat(shapes, density, fixed, **kw):  # the budget left by `fixed`, shared evenly
        calls.append((dict(shapes), density, dict(fixed), kw))
        sizes = {k: math.prod(s) for k, s in shapes.items()}
        left = density * sum(sizes.values()) - sum(fixed[k] * sizes[k] for k in fixed)
        return {k: left / sum(n for k, n in sizes.items() if k not in fixed) for k in shapes}

    shapes = {"a": (4, 4), "e": (0, 2), "b": (2,)}
    got = layer_densities(shapes, 0.5, "test_flat", fixed={"b": 1.0, "e": 0.0}, power=2)
    assert got == {"a": 7 / 16, "e": 1.0, "b": 1.0}
    assert "test_flat" in distribution_names()
    # Zero-size layers are removed before the call; power is forwarded.
    assert calls == [({"a": (4, 4), "b": (2,)}, 0.5, {"b": 1.0}, {"power": 2.0})]
    with pytest.raises(ValueError, match="already registered"):
        register_distribution("erk")
    with pytest.raises(ValueError, match="non-empty"):
        register_distribution("")
    with pytest.raises(TypeError, match=r"distribution name must be a non-empty str, got 123"):
        register_distribution(123)


def test_distribution_registry_is_the_shared_type(registered):
    assert isinstance(dist._DISTRIBUTIONS, Registry)
    shapes = {"a": (4, 4), "b": (2, 8)}
    # Lookup ignores case, "_" and "-".
    assert layer_densities(shapes, 0.5, "ERK") == layer_densities(shapes, 0.5, "erk")

    @registered("test_Quarter")
    def quarter(shapes, density, fixed, **kw):
        return {k: 0.25 for k in shapes}

    assert layer_densities(shapes, 0.25, "test-quarter") == {"a": 0.25, "b": 0.25}
    with pytest.raises(ValueError, match=r"distribution 'test_quarter' is already registered.*overwrite=True"):
        register_distribution("test_quarter")

    @register_distribution("test_quarter", overwrite=True)
    def eighth(shapes, density, fixed, **kw):
        return {k: 0.125 for k in shapes}

    assert layer_densities(shapes, 0.125, "test_quarter") == {"a": 0.125, "b": 0.125}
    assert distribution_names().count("test_quarter") == 1


def test_registered_result_is_validated(registered):
    @registered("test_broken")
    def broken(shapes, density, fixed, **kw):
        return {"a": 2.0}

    with pytest.raises(ValueError, match=r"test_broken.*missing.*'b'"):
        layer_densities({"a": (2,), "b": (3,)}, 0.5, "test_broken")
    with pytest.raises(ValueError, match=r"test_broken.*\['a'\].*2\.0"):
        layer_densities({"a": (2,)}, 0.5, "test_broken")

    @registered("test_half_each")
    def half_each(shapes, density, fixed, **kw):  # ignores `density`
        return {k: 0.5 for k in shapes}

    with pytest.raises(ValueError, match=r"distribution 'test_half_each' returned densities "
                                         r"that realise a global density of 0\.5, not "
                                         r"density=0\.3"):
        layer_densities({"a": (4, 4), "b": (2, 8)}, 0.3, "test_half_each")
    assert layer_densities({"a": (4, 4), "b": (2, 8)}, 0.5, "test_half_each") == \
        {"a": 0.5, "b": 0.5}


# --------------------------------------------------------------------------- #
# Properties (hypothesis)
# --------------------------------------------------------------------------- #

shape_st = st.lists(st.integers(1, 48), min_size=1, max_size=4).map(tuple)
shapes_st = st.lists(shape_st, min_size=1, max_size=6).map(
    lambda ss: {f"l{i}": s for i, s in enumerate(ss)}
)
density_st = st.floats(0.001, 1.0, allow_nan=False)


@settings(max_examples=150, deadline=None)
@given(shapes=shapes_st, density=density_st, name=st.sampled_from(["erk", "er", "uniform"]))
def test_distribution_properties(shapes, density, name):
    got = layer_densities(shapes, density, name)
    n = n_of(shapes)
    total = sum(n.values())
    assert all(0.0 <= d <= 1.0 for d in got.values())
    assert realised(shapes, got) == pytest.approx(density * total, rel=1e-9)
    if name != "uniform":
        score = dist._erk_score if name == "erk" else dist._er_score
        rho = {k: score(s) for k, s in shapes.items()}
        dense = [k for k in got if got[k] == 1.0]
        sparse = [k for k in got if got[k] < 1.0]
        # Dense layers are exactly those with the largest raw scores...
        if dense and sparse:
            assert min(rho[k] for k in dense) >= max(rho[k] for k in sparse)
        # ...and the others are proportional to rho.
        ratios = [got[k] / rho[k] for k in sparse]
        assert ratios == pytest.approx([ratios[0]] * len(ratios)) if ratios else True
    counts = active_counts(shapes, got)
    assert abs(sum(counts.values()) - density * total) <= 0.5 + 1e-9 * total
    for k in shapes:
        assert math.floor(got[k] * n[k]) <= counts[k] <= math.ceil(got[k] * n[k])
        if got[k] == 1.0:
            assert counts[k] == n[k]


@settings(max_examples=150, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 500), min_size=1, max_size=8),
    data=st.data(),
)
def test_active_counts_properties(sizes, data):
    shapes = {f"l{i}": (s,) for i, s in enumerate(sizes)}
    densities = {
        k: data.draw(st.sampled_from([0.0, 1.0]) | st.floats(0.0, 1.0), label=k)
        for k in shapes
    }
    counts = active_counts(shapes, densities)
    quotas = {k: densities[k] * shapes[k][0] for k in shapes}
    assert sum(counts.values()) == math.floor(sum(quotas.values()) + 0.5)
    for k, c in counts.items():
        assert isinstance(c, int) and 0 <= c <= shapes[k][0]
        assert math.floor(quotas[k]) <= c <= math.ceil(quotas[k])
        if densities[k] == 1.0:
            assert c == shapes[k][0]
    # Largest remainder: every layer rounded up has a remainder at least as
    # large as every layer rounded down (among layers with a remainder).
    rem = {k: quotas[k] - math.floor(quotas[k]) for k in shapes}
    up = [rem[k] for k in shapes if counts[k] > math.floor(quotas[k])]
    down = [rem[k] for k in shapes if counts[k] == math.floor(quotas[k]) and rem[k] > 0]
    if up and down:
        assert min(up) >= max(down)


@settings(max_examples=60, deadline=None)
@given(shapes=shapes_st, density=st.sampled_from([0.05, 0.1, 0.2, 0.3, 0.5, 0.9]))
def test_counts_sum_to_rounded_global_target(shapes, density):
    total = sum(n_of(shapes).values())
    for name in ("erk", "uniform"):
        counts = active_counts(shapes, layer_densities(shapes, density, name))
        target = density * total
        nearest = math.floor(target + 0.5)
        if abs(target - nearest) != pytest.approx(0.5, abs=1e-9):
            assert sum(counts.values()) == nearest


# --------------------------------------------------------------------------- #
# active_counts: hand-worked
# --------------------------------------------------------------------------- #


def test_active_counts_hamilton_hand_worked():
    shapes = {"a": (10,), "b": (10,), "c": (10,)}
    # Quotas 1.2, 1.7, 2.1 -> floors 1, 1, 2 (sum 4); total 5; b has the largest remainder.
    assert active_counts(shapes, {"a": 0.12, "b": 0.17, "c": 0.21}) == {"a": 1, "b": 2, "c": 2}
    # Tie on the remainder (2.5, 2.5): the earlier layer wins.
    tied = {"a": 0.25, "b": 0.25, "c": 0.5}
    assert active_counts(shapes, tied) == {"a": 3, "b": 2, "c": 5}
    assert active_counts(shapes, tied, total=9) == {"a": 2, "b": 2, "c": 5}
    assert active_counts(shapes, tied, total=11) == {"a": 3, "b": 3, "c": 5}
    # Default total rounds half up (Python's round() would give 2 here).
    assert active_counts({"a": (5,)}, {"a": 0.5}) == {"a": 3}


def test_active_counts_errors():
    shapes = {"a": (10,), "b": (10,)}
    dens = {"a": 0.25, "b": 0.5}
    with pytest.raises(ValueError, match=r"total=9.*\[7, 8\]"):
        active_counts(shapes, dens, total=9)
    with pytest.raises(ValueError, match=r"total=6"):
        active_counts(shapes, dens, total=6)
    with pytest.raises(TypeError, match="total"):
        active_counts(shapes, dens, total=7.0)
    with pytest.raises(TypeError, match="total"):
        active_counts(shapes, dens, total=True)
    with pytest.raises(ValueError, match=r"missing.*'b'"):
        active_counts(shapes, {"a": 0.5})
    with pytest.raises(ValueError, match=r"densities\['b'\]"):
        active_counts(shapes, {"a": 0.5, "b": 1.01})


# --------------------------------------------------------------------------- #
# Seeds and masks
# --------------------------------------------------------------------------- #


def test_stable_seed():
    # Regression vector: must never change across processes or releases.
    assert stable_seed("a", 1) == 156355069
    values = {stable_seed("a", 1), stable_seed(1, "a"), stable_seed("a", "1"),
              stable_seed("a", 2), stable_seed("a1"), stable_seed("a", np.int64(3))}
    assert len(values) == 6
    assert stable_seed("a", np.int64(1)) == stable_seed("a", 1)
    assert all(0 <= v < 2**31 for v in values)
    for bad in (1.5, True, None, b"a"):
        with pytest.raises(TypeError):
            stable_seed("a", bad)


def count_true(mask):
    return int(tf.reduce_sum(tf.cast(mask, tf.int32)))


@pytest.mark.parametrize("count", [0, 1, 37, 599, 600])
def test_exact_mask_count(count):
    mask = exact_mask((20, 30), count, (1, 2))
    assert mask.dtype == tf.bool and mask.shape == (20, 30)
    assert count_true(mask) == count


def test_exact_mask_deterministic_and_seed_dependent():
    a = exact_mask((5, 5, 8), 60, (7, 3)).numpy()
    b = exact_mask((5, 5, 8), tf.constant(60, tf.int64), tf.constant([7, 3])).numpy()
    c = exact_mask((5, 5, 8), 60, (7, 4)).numpy()
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    # Positions are nested across counts: the same order is used.
    small = exact_mask((5, 5, 8), 20, (7, 3)).numpy()
    assert (a | small).sum() == 60


def test_exact_mask_positions_are_uniform():
    hits = sum(exact_mask((20,), 5, (s, 11)).numpy().astype(int) for s in range(400))
    # Expected 100 per position, sd ~ 8.7.
    assert hits.min() >= 65 and hits.max() <= 135


@pytest.mark.parametrize("shape,count", [((20, 30), 0), ((20, 30), 1), ((20, 30), 599),
                                         ((20, 30), 600), ((5, 5, 8), 60), ((300, 400), 12000)])
def test_exact_mask_eager_equals_the_traced_argsort(shape, count):
    """Eagerly the mask comes from a partition on the host, traced from a stable
    argsort: the same entries for every seed."""
    traced = tf.function(lambda seed: exact_mask(shape, count, seed))
    for seed in [(1, 2), (7, 3), (0, 0)]:
        np.testing.assert_array_equal(exact_mask(shape, count, seed).numpy(),
                                      traced(tf.constant(seed)).numpy())


def test_smallest_first_breaks_ties_as_a_stable_argsort():
    from keras_dst.distributions import _smallest_first
    values = np.array([0.5, 0.1, 0.5, 0.5, 0.2, 0.5, 0.1], np.float32)
    for count in range(-1, values.size + 2):
        expected = np.zeros(values.size, bool)
        expected[np.argsort(values, kind="stable")[:max(count, 0)]] = True
        np.testing.assert_array_equal(_smallest_first(values, count), expected)


def test_exact_mask_edges_and_errors():
    assert exact_mask((0, 3), 0, (1, 2)).shape == (0, 3)
    with pytest.raises(ValueError, match="count"):
        exact_mask((4,), 5, (1, 2))
    with pytest.raises(ValueError, match="count"):
        exact_mask((4,), -1, (1, 2))
    with pytest.raises(ValueError, match="shape"):
        exact_mask(tf.TensorShape([None, 3]), 1, (1, 2))


def test_bernoulli_mask():
    mask = bernoulli_mask((1000, 1000), 0.3, (5, 6))
    assert mask.dtype == tf.bool
    assert count_true(mask) / 1e6 == pytest.approx(0.3, abs=0.003)
    np.testing.assert_array_equal(mask.numpy(), bernoulli_mask((1000, 1000), 0.3, (5, 6)).numpy())
    assert (mask.numpy() != bernoulli_mask((1000, 1000), 0.3, (5, 7)).numpy()).any()
    assert count_true(bernoulli_mask((50, 50), 0.0, (1, 1))) == 0
    assert count_true(bernoulli_mask((50, 50), 1.0, (1, 1))) == 2500
    with pytest.raises(ValueError, match="density"):
        bernoulli_mask((4,), 1.5, (1, 2))
    with pytest.raises(TypeError, match="density"):
        bernoulli_mask((4,), True, (1, 2))


def test_masks_under_xla():
    @tf.function(jit_compile=True)
    def draw(count, density, seed):
        return exact_mask((64, 32), count, seed), bernoulli_mask((64, 32), density, seed)

    seed = tf.constant([stable_seed("layer", 0), 9], tf.int32)
    exact1, bern1 = draw(tf.constant(500), tf.constant(0.25), seed)
    exact2, bern2 = draw(tf.constant(500), tf.constant(0.25), seed)
    exact3, _ = draw(tf.constant(77), tf.constant(0.25), seed + 1)
    assert count_true(exact1) == 500 and count_true(exact3) == 77
    np.testing.assert_array_equal(exact1.numpy(), exact2.numpy())
    np.testing.assert_array_equal(bern1.numpy(), bern2.numpy())
    assert count_true(bern1) / 2048 == pytest.approx(0.25, abs=0.05)


def test_fixed_layers_that_use_the_whole_budget_leave_none_silently_empty():
    shapes = {"a": (8, 8), "b": (8, 8)}
    with pytest.raises(ValueError, match=r"density=0\.25 is infeasible with fixed layers "
                                         r"\{'b': 0\.5\}: they use the whole budget, so the "
                                         r"other layers \['a'\] would get density 0"):
        layer_densities(shapes, 0.25, fixed={"b": 0.5})
    assert layer_densities(shapes, 0.25, fixed={"a": 0.0, "b": 0.5}) == {"a": 0.0, "b": 0.5}
