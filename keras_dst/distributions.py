"""Per-layer density distributions, exact active counts and initial masks.

Floor 2 (pure maths): no Keras state; plain Python floats for the densities and
stateless TensorFlow ops for the masks.

Distributions (registry names, see `layer_densities`):

* ``"uniform"``: every layer gets the global density ``D``.
* ``"erk"``: Erdős–Rényi-Kernel as in the reference code (`ERK_initializer` in
  `sparselearning/sparsity_initializers.py` of github
  alooow/fantastic_weights_paper). Raw score
  ``rho_l = (sum(shape_l) / prod(shape_l)) ** power`` over *all* axes, so it is
  layout-invariant (PyTorch and Keras kernels give the same numbers).
* ``"er"``: the classic Erdős–Rényi of RigL, ``rho_l = ((a + b) / (a * b)) **
  power`` with ``(a, b)`` the *last two* axes, i.e. ``(in, out)`` of Keras
  Dense/Conv kernels; a 1-D tensor of length ``n`` is treated as shape
  ``(1, n)`` (``rho = (n + 1) / n``), a scalar as ``(1, 1)``.
  **The reference code's ``er`` option is an alias of ERK**: to reproduce the
  paper use ``"erk"``, not ``"er"``.
* a ``dict`` ``{name: density}`` naming every layer (custom distribution).
* anything added with `register_distribution`.

Names are matched ignoring case, "_" and "-" (``"ERK"`` is ``"erk"``).

Every built-in shares one solver: the free layers (not in ``fixed``) share the
budget ``D * N - sum_fixed d_l n_l`` in proportion to ``rho_l``; while
``eps * max rho > 1`` every layer whose ``rho`` equals that maximum is made dense
and ``eps`` is recomputed. This guarantees ``sum_l d_l n_l == D * sum_l n_l``
(up to float rounding). ``uniform`` is the same solver with ``rho == 1``.
Densities within 1e-12 of 1 are snapped to exactly 1.0.

Zero-size tensors (``n_l == 0``) never enter a distribution: they get density
1.0 and an active count of 0.

Masks are sampled with stateless RNG (`tf.random.stateless_uniform`), static
shapes and no Python-side randomness, so they run inside
``tf.function(jit_compile=True)``. A seed gives the same mask eagerly and in a
plain `tf.function`, but XLA-compiled code draws a *different* (equally valid)
stream: do not expect eager and ``jit_compile=True`` masks to coincide.
"""

import math
import numbers
import zlib
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import tensorflow as tf

from keras_dst import validation
from keras_dst.registry import Registry

Shape = Tuple[int, ...]
DistributionFn = Callable[..., Dict[str, float]]

_DISTRIBUTIONS = Registry("distribution", register_with="keras_dst.register_distribution")
_SNAP = 1e-12  # densities this close to 1 become exactly 1.0
_RTOL = 1e-9  # relative slack on weight budgets (float rounding)


# --------------------------------------------------------------------------- #
# Validation helpers
# --------------------------------------------------------------------------- #


def _check_shapes(shapes) -> Dict[str, Shape]:
    """Returns `shapes` as an ordered dict name -> tuple of non-negative ints."""
    if not isinstance(shapes, Mapping):
        raise TypeError(
            "shapes must be a mapping name -> shape, got "
            f"{type(shapes).__name__}"
        )
    out = {}
    for name, shape in shapes.items():
        try:
            dims = None if isinstance(shape, (str, bytes)) else tuple(shape)
        except TypeError:
            dims = None
        if dims is None or not all(validation.is_int(d) for d in dims):
            raise ValueError(
                f"shape of layer {name!r} must be fully known integers, "
                f"got {shape!r}"
            )
        dims = tuple(int(d) for d in dims)
        if any(d < 0 for d in dims):
            raise ValueError(f"shape of layer {name!r} is negative: {shape!r}")
        out[name] = dims
    return out


def _check_layer_map(
    values, shapes: Mapping[str, Shape], what: str, *, complete: bool
) -> Dict[str, float]:
    """Validates a mapping name -> density in [0, 1] against `shapes`."""
    if not isinstance(values, Mapping):
        raise TypeError(
            f"{what} must be a mapping name -> density, got "
            f"{type(values).__name__}"
        )
    unknown = [k for k in values if k not in shapes]
    if unknown:
        raise ValueError(
            f"{what} names unknown layer(s) {unknown}; known layers: "
            f"{list(shapes)}"
        )
    missing = [k for k in shapes if k not in values]
    if complete and missing:
        raise ValueError(f"{what} is missing layer(s) {missing}")
    return {
        k: validation.check_density(v, f"{what}[{k!r}]", allow_zero=True)
        for k, v in values.items()
    }


# --------------------------------------------------------------------------- #
# Registry and solver
# --------------------------------------------------------------------------- #


def register_distribution(name: str, *, overwrite: bool = False) -> Callable[[DistributionFn], DistributionFn]:
    """Decorator registering a density distribution under `name`.

    The decorated function is called as ``fn(shapes, density, fixed, **kw)``:

    * ``shapes``: ordered ``dict`` name -> shape tuple of the layers to
      distribute; zero-size layers are already removed.
    * ``density``: the validated global density ``D`` in (0, 1].
    * ``fixed``: ``dict`` name -> imposed density (possibly empty); the function
      should share the remaining budget among the other layers.
    * ``kw``: keyword options of `layer_densities` (currently ``power``); accept
      ``**kw`` to stay forward compatible.

    It must return a ``dict`` with a density in [0, 1] for every layer of
    ``shapes``; values returned for fixed layers are replaced by the fixed ones.

    Args:
      name: registry name, a non-empty string (lookup ignores case, "_" and
        "-").
      overwrite: replace an existing registration of `name`.

    Returns:
      The decorator, which returns the function unchanged.

    Raises:
      TypeError: `name` is not a str.
      ValueError: `name` is empty, or is already registered and `overwrite` is
        False.
    """
    return _DISTRIBUTIONS.decorator(name, overwrite)


def distribution_names() -> Tuple[str, ...]:
    """Names of all registered distributions, sorted."""
    return _DISTRIBUTIONS.names()


def _infeasible(density: float, fixed: Mapping[str, float], why: str) -> ValueError:
    return ValueError(
        f"density={density!r} is infeasible with fixed layers {dict(fixed)}: {why}"
    )


def _solve(
    shapes: Mapping[str, Shape],
    density: float,
    fixed: Mapping[str, float],
    score: Callable[[Shape], float],
) -> Dict[str, float]:
    """Shares the budget among free layers in proportion to `score`.

    As the reference's `ERK_initializer`: every free layer gets ``eps * rho_l``;
    while ``eps * max rho > 1`` the layers at the maximum are made dense and
    ``eps`` is recomputed over the rest.
    """
    sizes = {k: math.prod(s) for k, s in shapes.items()}
    total = sum(sizes.values())
    tol = _RTOL * max(total, 1)
    budget = density * total - sum(fixed[k] * sizes[k] for k in fixed)
    if budget < -tol:
        raise _infeasible(
            density, fixed, f"they alone exceed the global budget by {-budget:g} weights"
        )
    budget = max(budget, 0.0)
    free = [k for k in shapes if k not in fixed]
    n_free = sum(sizes[k] for k in free)
    if n_free and budget <= tol:  # (a layer meant to be empty is fixed at 0 explicitly)
        if not fixed:
            raise ValueError(f"density={density!r} keeps {density * total:.3g} of the {total} "
                             f"weights: every layer {free} would get density 0")
        raise _infeasible(
            density, fixed, f"they use the whole budget, so the other layers {free} would "
            "get density 0 (fix those at 0 too if that is meant)")
    rho = {k: score(shapes[k]) for k in free}
    eps = 0.0
    while free:
        eps = budget / sum(rho[k] * sizes[k] for k in free)
        top = max(rho[k] for k in free)
        if eps * top <= 1.0:
            break
        budget -= sum(sizes[k] for k in free if rho[k] == top)
        free = [k for k in free if rho[k] != top]
    else:
        if budget > tol:
            raise _infeasible(
                density,
                fixed,
                f"the free layers would need density > 1 ({n_free} weights "
                f"cannot hold {budget + n_free:g})",
            )
    out = {}
    for k in shapes:
        d = fixed[k] if k in fixed else eps * rho[k] if k in free else 1.0
        out[k] = 1.0 if d > 1.0 - _SNAP else d
    return out


def _check_budget(name: str, densities: Mapping[str, float], shapes: Mapping[str, Shape],
                  density: float) -> None:
    """Raises a ValueError unless the per-layer `densities` that distribution `name`
    returned (fixed layers applied) realise the global `density` over `shapes`."""
    sizes = {k: math.prod(s) for k, s in shapes.items()}
    total = sum(sizes.values())
    active = sum(densities[k] * sizes[k] for k in shapes)
    if abs(active - density * total) > _RTOL * max(total, 1) + 0.5:
        raise ValueError(
            f"distribution {name!r} returned densities that realise a global density of "
            f"{active / max(total, 1):.6g}, not density={density!r} (its function must "
            "share density * N active weights among the layers).")


def _erk_score(shape: Shape) -> float:
    dims = shape or (1,)
    return sum(dims) / math.prod(dims)


def _er_score(shape: Shape) -> float:
    a, b = ((1, 1) + shape)[-2:]
    return (a + b) / (a * b)


@register_distribution("uniform")
def _uniform(shapes, density, fixed, **kw):
    return _solve(shapes, density, fixed, lambda s: 1.0)


@register_distribution("erk")
def _erk(shapes, density, fixed, *, power=1.0, **kw):
    return _solve(shapes, density, fixed, lambda s: _erk_score(s) ** power)


@register_distribution("er")
def _er(shapes, density, fixed, *, power=1.0, **kw):
    return _solve(shapes, density, fixed, lambda s: _er_score(s) ** power)


def layer_densities(
    shapes: Mapping[str, Sequence[int]],
    density: float,
    distribution: Union[str, Mapping[str, float]] = "erk",
    *,
    fixed: Optional[Mapping[str, float]] = None,
    power: float = 1.0,
) -> Dict[str, float]:
    """Per-layer densities realising a global density.

    Args:
      shapes: ordered mapping layer name -> weight shape (any rank, fully known
        non-negative ints; tuples, lists and `tf.TensorShape` accepted). Shapes
        are Keras layouts; only ``"er"`` depends on the axis order.
      density: global target ``D`` in (0, 1]: the fraction of all
        ``N = sum_l n_l`` weights that are active, ``n_l = prod(shape_l)``.
      distribution: a registered name (``"erk"``, ``"er"``, ``"uniform"`` or
        one added with `register_distribution`; case, "_" and "-" ignored), or a mapping name -> density
        in [0, 1] naming every layer. A mapping is returned as given (after
        `fixed` is applied): `density` is validated but not used.
      fixed: optional mapping name -> density in [0, 1] imposed on those layers
        (e.g. ``{first: 1.0}`` to keep a layer dense). The other layers share
        the budget ``D * N - sum_fixed d_l n_l``.
      power: exponent of the raw score of ``"erk"``/``"er"`` (1.0 in the
        reference), a finite number >= 0; ignored by ``"uniform"``.

    Returns:
      ``dict`` name -> density in [0, 1] (Python float), in the order of
      `shapes`. For registered distributions ``sum_l d_l n_l == D * N`` up to
      float rounding. Zero-size layers get 1.0.

    Raises:
      TypeError: if `density`, `power` or a mapping value is not a real number
        (bools rejected), or `distribution` is neither a str nor a mapping.
      ValueError: if `density` is outside (0, 1]; a `fixed` or custom value is
        outside [0, 1]; `fixed` names unknown layers; a custom mapping misses or
        adds layers; the distribution name is unknown; or the budget left by
        `fixed` cannot be realised (negative, none left for the free layers, or
        more than they hold).
    """
    shapes = _check_shapes(shapes)
    density = validation.check_density(density, "density", allow_zero=False)
    fixed = _check_layer_map(fixed or {}, shapes, "fixed", complete=False)
    power = validation.check_nonnegative_real(power, "power")

    if isinstance(distribution, Mapping):
        result = _check_layer_map(distribution, shapes, "distribution", complete=True)
    elif isinstance(distribution, str):
        solver = _DISTRIBUTIONS.get(distribution)
        live = {k: s for k, s in shapes.items() if math.prod(s) > 0}
        live_fixed = {k: v for k, v in fixed.items() if k in live}
        raw = solver(live, density, live_fixed, power=float(power))
        result = _check_layer_map(
            raw, live, f"distribution {distribution!r} result", complete=True
        )
        _check_budget(distribution, {k: fixed.get(k, d) for k, d in result.items()}, live,
                      density)
    else:
        raise TypeError(
            "distribution must be a name or a mapping name -> density, got "
            f"{type(distribution).__name__}"
        )
    return {
        k: 1.0 if math.prod(s) == 0 else fixed.get(k, result[k])
        for k, s in shapes.items()
    }


# --------------------------------------------------------------------------- #
# Exact integer counts
# --------------------------------------------------------------------------- #


def density_of(active: float, total: float) -> float:
    """``active / total``: the density of `total` entries of which `active` are active (or
    weighted sums of densities by size); 1.0 where there is no entry (nothing pruned)."""
    return float(active / total) if total else 1.0


def round_half_up(x: float) -> int:
    """`x` rounded to the nearest int, halves up (``floor(x + 0.5)``): how a density
    becomes an active count (Python's `round` rounds halves to even)."""
    return int(math.floor(x + 0.5))


def active_counts(
    shapes: Mapping[str, Sequence[int]],
    densities: Mapping[str, float],
    *,
    total: Optional[int] = None,
) -> Dict[str, int]:
    """Integer active counts per layer by largest-remainder (Hamilton) apportionment.

    Each layer's quota is ``q_l = d_l * n_l``. Every layer first gets
    ``floor(q_l)``; the ``total - sum floor(q_l)`` remaining units go, one
    each, to the layers with the largest fractional parts ``q_l - floor(q_l)``
    (ties: earlier layer in `shapes` first). Hence ``sum counts == total``,
    ``0 <= c_l <= n_l``, ``floor(q_l) <= c_l <= ceil(q_l)``; layers with
    ``d_l == 1.0`` get exactly ``n_l`` and with ``d_l == 0`` exactly 0.

    Args:
      shapes: ordered mapping layer name -> weight shape.
      densities: mapping name -> density in [0, 1] for every layer of `shapes`
        (e.g. from `layer_densities`).
      total: total active count; default ``floor(sum_l q_l + 0.5)`` (round half
        up). Must lie in ``[sum floor(q_l), sum ceil(q_l)]``.

    Returns:
      ``dict`` name -> active count (Python int), in the order of `shapes`.

    Raises:
      TypeError: if `total` is not an int, or a density is not a number.
      ValueError: if `densities` misses/adds layers or has a value outside
        [0, 1], or `total` is outside the attainable range.
    """
    shapes = _check_shapes(shapes)
    densities = _check_layer_map(densities, shapes, "densities", complete=True)
    quotas = {k: densities[k] * math.prod(s) for k, s in shapes.items()}
    counts = {k: math.floor(q) for k, q in quotas.items()}
    remainders = {k: quotas[k] - counts[k] for k in shapes}
    low = sum(counts.values())
    high = low + sum(r > 0 for r in remainders.values())
    if total is None:
        total = round_half_up(sum(quotas.values()))
    elif not validation.is_int(total):
        raise TypeError(f"total must be an int, got {total!r}")
    if not low <= total <= high:
        raise ValueError(
            f"total={total} is not attainable with these densities: "
            f"it must lie in [{low}, {high}]"
        )
    # sorted() is stable, so equal remainders keep the layer order.
    for k in sorted(shapes, key=lambda k: -remainders[k])[: total - low]:
        counts[k] += 1
    return counts


# --------------------------------------------------------------------------- #
# Seeds and masks
# --------------------------------------------------------------------------- #


def stable_seed(*parts: Union[str, int]) -> int:
    """A stable 31-bit integer from strings and ints (CRC-32, not `hash()`).

    The same parts give the same value in every process and Python version;
    ``"1"`` and ``1`` differ.

    Args:
      *parts: strings and/or integers (e.g. a layer name and a step).

    Returns:
      An int in ``[0, 2**31 - 1]``, usable as one component of a stateless seed.

    Raises:
      TypeError: if a part is neither a str nor an int (bools rejected).
    """
    tokens = []
    for part in parts:
        if isinstance(part, str):
            tokens.append("s" + part)
        elif validation.is_int(part):
            tokens.append("i" + str(int(part)))
        else:
            raise TypeError(f"seed parts must be str or int, got {part!r}")
    return zlib.crc32("\x1f".join(tokens).encode("utf-8")) & 0x7FFFFFFF


def _static_shape(shape) -> list:
    dims = tf.TensorShape(shape)
    if not dims.is_fully_defined():
        raise ValueError(f"mask shape must be fully known, got {shape!r}")
    return dims.as_list()


def exact_mask(shape: Sequence[int], count, seed) -> tf.Tensor:
    """A boolean mask with exactly `count` True entries at uniform random positions.

    Draws ``u = stateless_uniform([n], seed)`` and sets True the `count`
    entries with the smallest ``u`` (stable argsort: ties go to the lower flat
    index). Deterministic for a given seed; works under
    ``tf.function(jit_compile=True)``. Eagerly the same entries are found by a
    partition on the host (O(n); an eager argsort of a 2.4M-entry kernel takes
    ~0.6 s on a CPU core).

    Args:
      shape: static shape of the mask (list, tuple or fully known
        `tf.TensorShape`).
      count: number of True entries: a Python int in ``[0, n]`` or an integer
        scalar tensor (values outside ``[0, n]`` act as clipped).
      seed: int32/int64 tensor or tuple of shape ``[2]`` (stateless seed).

    Returns:
      ``tf.bool`` tensor of shape `shape`.

    Raises:
      ValueError: if `shape` is not fully known or a Python `count` is out of
        ``[0, n]``.
    """
    shape = _static_shape(shape)
    n = math.prod(shape)
    if isinstance(count, numbers.Integral) and not 0 <= count <= n:
        raise ValueError(f"count must be in [0, {n}] for shape {shape}, got {count}")
    u = tf.random.stateless_uniform([n], seed=seed)
    if tf.executing_eagerly():  # the same mask in O(n): no sort of every entry
        return tf.reshape(_smallest_first(u.numpy(), int(count)), shape)
    order = tf.argsort(u, stable=True)
    ranks = tf.scatter_nd(order[:, None], tf.range(n, dtype=tf.int32), [n])
    return tf.reshape(ranks < tf.cast(count, tf.int32), shape)


def _smallest_first(values: np.ndarray, count: int) -> np.ndarray:
    """bool [n]: the `count` smallest of `values` (1-D, no NaN), ties to the lower index
    (what the first `count` of a stable argsort choose); `count` is clipped to [0, n]."""
    count = min(max(count, 0), values.size)
    chosen = np.zeros(values.size, bool)
    if count == 0:
        return chosen
    threshold = np.partition(values, count - 1)[count - 1]
    chosen[values < threshold] = True
    ties = np.flatnonzero(values == threshold)
    chosen[ties[:count - int(chosen.sum())]] = True
    return chosen


def bernoulli_mask(shape: Sequence[int], density, seed) -> tf.Tensor:
    """A boolean mask with each entry True independently with probability `density`.

    The reference's draw (``torch.rand(shape) < density`` in `ERK_initializer`,
    `sparselearning/sparsity_initializers.py`): entry True iff ``u < density`` with
    ``u = stateless_uniform(shape, seed)`` in [0, 1), float32. The count is
    exact only in expectation. Works under ``tf.function(jit_compile=True)``.

    Args:
      shape: static shape of the mask.
      density: a Python number in [0, 1] or a float scalar tensor.
      seed: int32/int64 tensor or tuple of shape ``[2]`` (stateless seed).

    Returns:
      ``tf.bool`` tensor of shape `shape`.

    Raises:
      ValueError: if `shape` is not fully known or a Python `density` is
        outside [0, 1].
      TypeError: if `density` is a bool or a non-numeric Python object.
    """
    if not tf.is_tensor(density):
        density = validation.check_density(density, "density", allow_zero=True)
    u = tf.random.stateless_uniform(_static_shape(shape), seed=seed)
    return u < tf.cast(density, tf.float32)
