"""Hardware-aligned sparsity patterns: parsing, checks, initial masks, scores per block or group.

Floor 3 (pure): no Keras state; Python for the static parts (parsing, shape
checks, counts) and stateless TensorFlow ops for the tensors, which trace
under ``tf.function(jit_compile=True)`` with static shapes.

A kernel of rank >= 2 is viewed as ``[P, I, O]``: ``I = shape[-2]`` the input
axis (Dense rows, Conv input channels), ``O = shape[-1]`` the output units and
``P = prod(shape[:-2])`` the rest (Conv taps; 1 for a Dense kernel).

Patterns (spec strings, `parse` / `str`):

* ``"unstructured"``: every entry on its own.
* ``"1xB"`` (e.g. ``"1x4"``, B >= 2): B consecutive entries along I, for one
  (p, o), are active or inactive together. I must be a multiple of B. The
  block-sparse layout of GPU block-sparse kernels (Gray, Radford & Kingma
  2017, "GPU Kernels for Block-Sparse Weights") and of TF-MOT's
  ``block_size`` pruning.
* ``"N:M"`` (e.g. ``"2:4"``, 1 <= N < M): every group of M consecutive
  entries along I, for one (p, o), has exactly N active entries; density N/M.
  I must be a multiple of M. The fine-grained structured sparsity of sparse
  tensor cores (Mishra et al. 2021, "Accelerating Sparse Deep Neural
  Networks"; Zhou et al. 2021, "Learning N:M Fine-grained Structured Sparse
  Neural Networks From Scratch").
* ``"fan_in"``: every output unit has the same number k of active entries
  among its P * I inputs (constant fan-in, SRigL: Lasby et al. 2023, "Dynamic
  Sparse Training with Structured Sparsity"), k = round(density * P * I), at
  least 1.

How a DST update keeps a pattern (the engine wires these together):

* 1xB: prune and grow whole blocks: `block_scores` reduces the scores to one
  per block, the ordinary selection (`topology.prune` / `topology.grow`)
  runs on the block tensor with `block_mask`, `expand_blocks` maps the result
  back.
* N:M and fan_in: prune entries with the ordinary selection, then `refill`:
  every group (an M-group, or an output unit's column) regrows exactly the
  number it lost, by the growth score among its inactive entries
  (`topology.select_highest_per_group` on the `groups` view).
"""

import dataclasses
import math
import re
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import tensorflow as tf

from keras_dst import distributions, topology, validation

KINDS = ("unstructured", "block", "nm", "fan_in")
ACCEPTED = "'unstructured', '1xB' (B >= 2, e.g. '1x4'), 'N:M' (1 <= N < M, e.g. '2:4'), 'fan_in', or None"
REMEDY = ("give it another pattern (a model's: prunable(..., pattern_overrides={...}) or "
          "keep_dense=[...]; a single layer's: another pattern=)")
# An N:M density given as a rounded decimal or a float32 (0.333333, np.float32(1 / 3)).
_DENSITY_TOL = 1e-6


@dataclasses.dataclass(frozen=True)
class Pattern:
    """A sparsity pattern (immutable, hashable; ``str(p)`` is its spec string).

    Attributes:
      kind: one of `KINDS`: "unstructured", "block" (1xB), "nm" (N:M), "fan_in".
      block: B of a "block" pattern, else 1.
      n: N of an "nm" pattern, else 0.
      m: M of an "nm" pattern, else 0.
    """

    kind: str = "unstructured"
    block: int = 1
    n: int = 0
    m: int = 0

    def __post_init__(self):
        kind, b, n, m = self.kind, self.block, self.n, self.m
        ok = (kind in KINDS
              and all(isinstance(v, int) and not isinstance(v, bool) for v in (b, n, m))
              and (b >= 2 if kind == "block" else b == 1)
              and (1 <= n < m if kind == "nm" else n == m == 0))
        if not ok:
            raise ValueError(f"Invalid pattern {self!r}: kind must be one of {KINDS}, with block >= 2 "
                             f"only for 'block' and 1 <= n < m only for 'nm'.")

    @property
    def fixed_density(self) -> Optional[float]:
        """N/M for an N:M pattern (every group keeps N of its M entries), else None."""
        return self.n / self.m if self.kind == "nm" else None

    def __str__(self) -> str:
        if self.kind == "block":
            return f"1x{self.block}"
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        return self.kind

    @property
    def unit(self) -> int:
        """The number of consecutive entries along I the pattern ties together (I % unit == 0)."""
        return {"block": self.block, "nm": self.m}.get(self.kind, 1)


UNSTRUCTURED = Pattern()
PatternLike = Union[None, str, Pattern]


def parse(spec: PatternLike) -> Pattern:
    """The `Pattern` of a spec: "unstructured", "1xB", "N:M", "fan_in", a Pattern, or None.

    None means "unstructured"; a Pattern is returned as is. Names match as registered
    names do (case, "_" and "-" ignored: ``"Fan-In"``, ``"1X4"``). Round trip:
    ``parse(str(p)) == p``.

    Raises:
      TypeError: a value that is not a string, a Pattern or None.
      ValueError: any other string (the messages name the value and the accepted forms).
    """
    if spec is None:
        return UNSTRUCTURED
    if isinstance(spec, Pattern):
        return spec
    if isinstance(spec, str):
        text = spec.strip().lower()
        kind = validation.find_choice(text, ("unstructured", "fan_in"))
        if kind is not None:
            return Pattern(kind)
        block = re.fullmatch(r"1x([0-9]+)", text)
        if block and int(block.group(1)) >= 2:
            return Pattern("block", block=int(block.group(1)))
        nm = re.fullmatch(r"([0-9]+):([0-9]+)", text)
        if nm and 1 <= int(nm.group(1)) < int(nm.group(2)):
            return Pattern("nm", n=int(nm.group(1)), m=int(nm.group(2)))
        raise ValueError(f"Unknown sparsity pattern {spec!r}; accepted: {ACCEPTED}.")
    raise TypeError(f"A sparsity pattern is a string, a keras_dst.patterns.Pattern or None, got "
                    f"{type(spec).__name__} {spec!r}; accepted: {ACCEPTED}.")


def _pio(shape: Sequence[int]) -> Tuple[int, int, int]:
    """(P, I, O) of a kernel shape of rank >= 2."""
    return math.prod(shape[:-2]), shape[-2], shape[-1]


def _static(shape) -> Tuple[int, ...]:
    dims = tf.TensorShape(shape)
    if not dims.is_fully_defined():
        raise ValueError(f"pattern shapes must be fully known, got {shape!r}")
    return tuple(dims.as_list())


def check(pattern: PatternLike, shape: Sequence[int], name: str) -> None:
    """Raises if `pattern` cannot be laid on a weight of this shape.

    Structured patterns need a kernel of rank >= 2; "1xB" and "N:M" need I
    (``shape[-2]``) to be a multiple of B, resp. M. "unstructured" fits any
    shape.

    Args:
      pattern: a pattern or spec.
      shape: the weight's static shape.
      name: the layer or weight named in the message.

    Raises:
      ValueError: naming `name`, the shape, the pattern and the remedy.
    """
    pattern, shape = parse(pattern), _static(shape)
    if pattern.kind == "unstructured":
        return
    if len(shape) < 2:
        raise ValueError(f"{name}: pattern '{pattern}' needs a kernel of rank >= 2 "
                         f"([..., inputs, outputs]), got shape {shape}; {REMEDY}.")
    if shape[-2] % pattern.unit:
        raise ValueError(f"{name}: pattern '{pattern}' needs the input axis (shape[-2] = {shape[-2]}) "
                         f"of shape {shape} to be a multiple of {pattern.unit}; {REMEDY}.")


def pattern_density(pattern: PatternLike, density: Optional[float], name: str) -> float:
    """The density a layer with this pattern gets; N:M fixes it to N/M.

    Args:
      pattern: a pattern or spec.
      density: the requested density in [0, 1], or None (only for N:M: "N/M").
      name: the layer or weight named in the message.

    Returns:
      The effective density (a float).

    Raises:
      ValueError: an N:M density other than N/M (beyond 1e-6), a None density
        for another pattern, or a density outside [0, 1].
    """
    pattern = parse(pattern)
    if pattern.kind == "nm":
        fixed = pattern.fixed_density
        if density is not None and not abs(float(density) - fixed) <= _DENSITY_TOL:
            raise ValueError(f"{name}: pattern '{pattern}' has density {pattern.n}/{pattern.m} = {fixed:g}, "
                             f"but density {density!r} was asked; drop it or use "
                             f"{pattern.n}/{pattern.m}.")
        return fixed
    if density is None:
        raise ValueError(f"{name}: pattern '{pattern}' needs a density (only N:M patterns fix their own).")
    return validation.check_density(density, f"{name}: density", allow_zero=True)


def fan_in_count(shape: Sequence[int], density: float) -> int:
    """k, the active inputs per output unit of a "fan_in" kernel of this shape.

    round(density * P * I) (half up), at least 1, at most P * I (0 when P * I is 0).
    """
    p, i, _ = _pio(_static(shape))
    return min(max(distributions.round_half_up(density * p * i), 1), p * i)


def active_count(pattern: PatternLike, shape: Sequence[int], density: Optional[float]) -> int:
    """The exact number of active entries `initial_mask` gives (checks the shape first).

    unstructured: round(density * n); 1xB: B * round(density * blocks); N:M:
    n * N / M (density is not used); fan_in: O * `fan_in_count`.
    """
    pattern, shape = parse(pattern), _static(shape)
    check(pattern, shape, "active_count")
    n = math.prod(shape)
    if pattern.kind == "block":
        return pattern.block * distributions.round_half_up(density * (n // pattern.block))
    if pattern.kind == "nm":
        return n // pattern.m * pattern.n
    if pattern.kind == "fan_in":
        return shape[-1] * fan_in_count(shape, density)
    return distributions.round_half_up(density * n)


# --------------------------------------------------------------------------- #
# Blocks (1xB)
# --------------------------------------------------------------------------- #


def _block_view(pattern: Pattern, shape: Tuple[int, ...]) -> list:
    """``shape[:-2] + [I / B, B, O]``: the kernel with its blocks on axis -2."""
    return list(shape[:-2]) + [shape[-2] // pattern.block, pattern.block, shape[-1]]


def _blocked(pattern: PatternLike, tensor: tf.Tensor, what: str) -> tf.Tensor:
    """`tensor` ``[..., I, O]`` reshaped to ``[..., I / B, B, O]`` (checked: a 1xB pattern
    whose B divides I)."""
    pattern = parse(pattern)
    _require(pattern, ("block",), what)
    shape = _static(tensor.shape)
    check(pattern, shape, what)
    return tf.reshape(tensor, _block_view(pattern, shape))


def _require(pattern: Pattern, kinds: Tuple[str, ...], what: str) -> None:
    if pattern.kind not in kinds:
        raise ValueError(f"{what} applies to patterns of kind {kinds}, not '{pattern}'.")


def block_scores(pattern: PatternLike, scores: tf.Tensor) -> tf.Tensor:
    """One score per 1xB block: the SUM of its entries' scores.

    Why the sum: every criterion estimates an entry's contribution to the loss
    and the block's contribution is the total over its entries. Magnitude
    (|w|) gives the block's L1 norm; SNIP / Taylor (|g * w|) the block's
    first-order saliency, additive over its entries; RigL growth (|g|) the L1
    norm of the block's gradient; random scores stay exchangeable, so random
    growth stays uniform over blocks. TF-MOT's block pruning
    (``prune_low_magnitude(block_size=..., block_pooling_type="AVG")``) ranks
    blocks by the average of |w| over the block: for blocks of equal size the
    mean is the sum divided by B, so both rank the blocks identically (up to
    float rounding). A NaN anywhere in a block (or +inf and -inf together)
    makes its score NaN: least important, pruned first and grown last, as
    `keras_dst.topology`'s NaN rule.

    Ties between blocks follow the topology rule on the block tensor: the
    block whose first entry has the lower flat index first.

    Args:
      pattern: a "1xB" pattern or spec.
      scores: float tensor of a kernel shape ``[..., I, O]`` (I % B == 0).

    Returns:
      float tensor of shape ``[..., I / B, O]``.
    """
    return tf.reduce_sum(_blocked(pattern, scores, "block_scores"), axis=-2)


def block_mask(pattern: PatternLike, mask: tf.Tensor) -> tf.Tensor:
    """The block mask of a kernel mask: True where any entry of the block is active.

    Args:
      pattern: a "1xB" pattern or spec.
      mask: bool tensor ``[..., I, O]`` (normally satisfying the pattern).

    Returns:
      bool tensor ``[..., I / B, O]``.
    """
    return tf.reduce_any(_blocked(pattern, mask, "block_mask"), axis=-2)


def selection_units(pattern: PatternLike, mask: tf.Tensor) -> tf.Tensor:
    """The mask in the units a prune counts: blocks for 1xB (`block_mask`), else entries."""
    pattern = parse(pattern)
    return block_mask(pattern, mask) if pattern.kind == "block" else mask


def expand_blocks(pattern: PatternLike, blocks: tf.Tensor, shape: Sequence[int]) -> tf.Tensor:
    """Expands a per-block tensor ``[..., I / B, O]`` to the kernel shape ``[..., I, O]``.

    Each block's value is repeated over its B entries; the inverse of
    `block_mask` for masks that satisfy the pattern. Works for any dtype.
    """
    pattern, shape = parse(pattern), _static(shape)
    _require(pattern, ("block",), "expand_blocks")
    check(pattern, shape, "expand_blocks")
    view = _block_view(pattern, shape)
    expanded = tf.broadcast_to(tf.expand_dims(blocks, -2), view)
    return tf.reshape(expanded, shape)


# --------------------------------------------------------------------------- #
# Groups (N:M, fan_in)
# --------------------------------------------------------------------------- #


def group_shape(pattern: PatternLike, shape: Sequence[int]) -> Tuple[int, int]:
    """[G, S] of the `groups` view: N:M ``[P * I / M * O, M]``, fan_in ``[O, P * I]``."""
    pattern, shape = parse(pattern), _static(shape)
    _require(pattern, ("nm", "fan_in"), "group_shape")
    check(pattern, shape, "group_shape")
    p, i, o = _pio(shape)
    if pattern.kind == "nm":
        return p * (i // pattern.m) * o, pattern.m
    return o, p * i


def groups(pattern: PatternLike, tensor: tf.Tensor) -> tf.Tensor:
    """A kernel-shaped tensor as ``[G, S]``: one row per group of the pattern.

    * N:M: a row per M consecutive entries along I for one (p, o); rows in
      (p, I-group, o) order; within a row, increasing I.
    * fan_in: a row per output unit o (G = O); within the row its P * I
      inputs in row-major (p, i) order.

    Within a row the index order is the kernel's flat (row-major) order, so
    "lower index first" ties mean the same in both views.
    """
    pattern = parse(pattern)
    shape = _static(tensor.shape)
    g, s = group_shape(pattern, shape)
    p, i, o = _pio(shape)
    if pattern.kind == "nm":
        split = tf.reshape(tensor, [p, i // s, s, o])
        return tf.reshape(tf.transpose(split, [0, 1, 3, 2]), [g, s])
    return tf.transpose(tf.reshape(tensor, [s, g]))


def ungroup(pattern: PatternLike, grouped: tf.Tensor, shape: Sequence[int]) -> tf.Tensor:
    """The inverse of `groups`: ``[G, S]`` back to the kernel `shape`."""
    pattern, shape = parse(pattern), _static(shape)
    g, s = group_shape(pattern, shape)
    p, i, o = _pio(shape)
    if pattern.kind == "nm":
        split = tf.reshape(grouped, [p, i // s, o, s])
        return tf.reshape(tf.transpose(split, [0, 1, 3, 2]), shape)
    return tf.reshape(tf.transpose(grouped), shape)


def refill(pattern: PatternLike, before: tf.Tensor, pruned: tf.Tensor, scores: tf.Tensor) -> tf.Tensor:
    """Group refill after a prune: every group regrows exactly the number of entries it lost.

    The entries regrown in a group are its inactive entries (after the prune,
    so just-pruned ones may come back, as with `topology.grow`) of highest
    growth score; ties to the lower index, NaN last
    (`topology.select_highest_per_group`). If `before` satisfies an N:M or
    fan_in pattern, so does the result.

    Args:
      pattern: an "N:M" or "fan_in" pattern or spec.
      before: bool kernel mask before the prune.
      pruned: bool kernel mask after the prune (a subset of `before`).
      scores: float growth scores, the kernel's shape (higher = grown first).

    Returns:
      bool kernel mask, a superset of `pruned`.
    """
    pattern = parse(pattern)
    shape = _static(before.shape)
    kept = groups(pattern, pruned)
    lost = tf.reduce_sum(tf.cast(groups(pattern, before), tf.int32) - tf.cast(kept, tf.int32), axis=1)
    grown = topology.select_highest_per_group(groups(pattern, scores), ~kept, lost)
    return ungroup(pattern, kept | grown, shape)


# --------------------------------------------------------------------------- #
# Initial masks and the invariant
# --------------------------------------------------------------------------- #


def _per_group_mask(pattern: Pattern, shape: Tuple[int, ...], per_group: int, seed) -> tf.Tensor:
    """`per_group` uniformly random entries of every group (the highest of iid uniforms)."""
    g, s = group_shape(pattern, shape)
    u = tf.random.stateless_uniform([g, s], seed=seed)
    chosen = topology.select_highest_per_group(u, tf.ones([g, s], tf.bool), tf.fill([g], per_group))
    return ungroup(pattern, chosen, shape)


def initial_mask(pattern: PatternLike, shape: Sequence[int], density: Optional[float], seed) -> tf.Tensor:
    """A random mask of exact count that satisfies the pattern.

    * unstructured: `distributions.exact_mask` with round(density * n) entries;
    * 1xB: round(density * blocks) uniformly random blocks;
    * N:M: N uniformly random entries of every M-group (`density` must be
      N/M or None, see `pattern_density`);
    * fan_in: `fan_in_count` uniformly random inputs of every output unit.

    Rounding is half up (`active_count` gives the count). Deterministic in
    the stateless seed; traceable (XLA draws another stream than eager, as
    `distributions.exact_mask`).

    Args:
      pattern: a pattern or spec.
      shape: static kernel shape (checked with `check`).
      density: a Python float in [0, 1] (None allowed for N:M).
      seed: int tensor or tuple of shape [2] (stateless seed).

    Returns:
      bool tensor of shape `shape`.

    Raises:
      ValueError: from `check` and `pattern_density`.
    """
    pattern, shape = parse(pattern), _static(shape)
    check(pattern, shape, "initial_mask")
    density = pattern_density(pattern, density, "initial_mask")
    if pattern.kind == "unstructured":
        return distributions.exact_mask(shape, active_count(pattern, shape, density), seed)
    if pattern.kind == "block":
        view = shape[:-2] + (shape[-2] // pattern.block, shape[-1])
        count = active_count(pattern, shape, density) // pattern.block
        return expand_blocks(pattern, distributions.exact_mask(view, count, seed), shape)
    if pattern.kind == "nm":
        return _per_group_mask(pattern, shape, pattern.n, seed)
    return _per_group_mask(pattern, shape, fan_in_count(shape, density), seed)


def violation(pattern: PatternLike, mask) -> Optional[str]:
    """NumPy check: None if `mask` keeps the pattern, else a message naming one offending group.

    For eager mask writes (`masks.set_masks`, the write guards of `layers`) and test
    helpers (`keras_dst.testing`).

    Args:
      pattern: a pattern or spec.
      mask: bool array-like of a kernel shape.
    """
    pattern, mask = parse(pattern), np.asarray(mask, bool)
    check(pattern, mask.shape, "violation")
    if pattern.kind == "unstructured":
        return None
    p, i, o = _pio(mask.shape)
    if pattern.kind == "block":
        view = mask.reshape(p, i // pattern.block, pattern.block, o)
        bad = np.argwhere(view.any(axis=2) != view.all(axis=2))
        if len(bad):
            pp, ib, oo = bad[0]
            return (f"pattern '{pattern}': block (p={pp}, inputs {ib * pattern.block}.."
                    f"{(ib + 1) * pattern.block - 1}, output {oo}) is partly active: "
                    f"{view[pp, ib, :, oo].astype(int).tolist()}")
        return None
    grouped = np.asarray(groups(pattern, tf.constant(mask)))
    counts = grouped.sum(axis=1)
    target = pattern.n if pattern.kind == "nm" else (counts[0] if counts.size else 0)
    bad = np.flatnonzero(counts != target)
    if not len(bad):
        return None
    g = int(bad[0])
    if pattern.kind == "nm":
        per_row = o * (i // pattern.m)
        pp, rest = divmod(g, per_row)
        ig, oo = divmod(rest, o)
        return (f"pattern '{pattern}': group (p={pp}, inputs {ig * pattern.m}..{(ig + 1) * pattern.m - 1}, "
                f"output {oo}) has {counts[g]} active entries, not {pattern.n}")
    return f"pattern '{pattern}': output unit {g} has {counts[g]} active inputs, output unit 0 has {target}"
