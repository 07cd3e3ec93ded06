"""The one selection routine: scores, masks and counts in, new masks out.

Every dynamic sparse training algorithm (SET, RigL, MEST, SNIP, ...) is this
module plus a choice of scores. All functions are pure TensorFlow, trace inside
`tf.function(jit_compile=True)` and keep static shapes: counts are scalar
tensors whose *values* may change from call to call.

Selection rule (shared by `prune`, `grow`, `global_prune` and every selection
built on `select_lowest` / `select_highest`):

* exactly `min(count, eligible)` eligible entries are chosen, never an
  ineligible one (`prune`: eligible = active; `grow`: eligible = inactive);
* `prune` chooses the lowest scores, `grow` the highest;
* ties are broken deterministically: among equal scores the entry with the
  LOWER flat (row-major) index is chosen first, both when pruning and when
  growing. `-0.0` and `+0.0` are equal;
* NaN policy: a NaN score ranks as the LEAST important value (below `-inf`):
  it is pruned first and grown last. The count stays exact whatever the
  scores contain (NaN, +-inf), so a non-finite score can never corrupt the
  number of active entries.

Implementation: each entry gets a unique key `(order of the score, flat index)`
(ineligible entries get an order above every eligible one) and the chosen
entries are the `count` smallest keys, found without sorting (XLA's comparator
sort costs ~1 us per entry on CPU): a bisection on the 32-bit order gives the
threshold order, and only where more entries tie at it than are needed, a
second bisection on the index splits the tie (~32 vectorised counting passes,
~63 with a split tie, fewer where an interpolated probe lands on the exact count:
see `_select_groups`; O(n) each). Every selection of an update runs at once
(`select_each`): the tensors are laid out as the rows of one matrix
(`RowLayout`), each group's counts are matrix products, and one loop serves
them all, so the compiled update does not grow with the number of layers (XLA
compiles each kernel separately, at ~10-30 ms each on CPU). At most 2**31 - 1
entries per call.
"""

import itertools
from typing import List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

_INDEX_SPAN = 2**31  # flat indices must stay below this
_INELIGIBLE = 2**31 - 1  # int32.max: ranks last (eligible NaNs of `grow` share it)


def _as_count(count) -> tf.Tensor:
    """Returns `count` as a scalar int32 tensor."""
    return tf.cast(tf.convert_to_tensor(count), tf.int32)


def count_true(mask) -> tf.Tensor:
    """Number of True entries of a bool tensor, as an int32 scalar."""
    return tf.reduce_sum(tf.cast(mask, tf.int32))


def _score_order(scores: tf.Tensor) -> tf.Tensor:
    """Maps float scores to int32 values with the same order (any shape).

    The float32 bit pattern is made monotone (negative floats have their
    magnitude bits flipped); -0.0 is folded onto +0.0 and NaN maps to -2**31,
    below `-inf` (which maps to -2139095041).

    Every test reads the bit pattern, never the float: XLA fuses a packed
    tensor (a concatenation) into a consumer only when the consumer reads each
    of its elements once, and the bit cast is that one read, so the keys of a
    `RowLayout.pack` compile to one kernel with the pack, not two.
    """
    bits = tf.bitcast(tf.cast(scores, tf.float32), tf.int32)
    magnitude = tf.bitwise.bitwise_and(bits, 0x7FFFFFFF)  # 0: ±0.0; above 0x7F800000: NaN
    monotone = tf.where(bits < 0, tf.bitwise.bitwise_xor(bits, 0x7FFFFFFF), bits)
    # (scalars, not tensors of the scores' shape: TF would fold those into constants
    # of that size inside the compiled program)
    monotone = tf.where(tf.equal(magnitude, 0), tf.constant(0), monotone)
    return tf.where(magnitude > 0x7F800000, tf.constant(tf.int32.min), monotone)


_SIGN = -2**31
_TOP = 2**31 - 1  # above every eligible key, and the largest index


def _keys(scores: tf.Tensor, lowest: bool) -> tf.Tensor:
    """int32 selection keys, smallest chosen first (any shape).

    Every eligible key is below `_TOP` (kept for ineligible entries): NaN takes
    int32.min when pruning (chosen first) and int32.max - 1 when growing
    (chosen last); finite and infinite scores lie strictly in between.
    """
    order = _score_order(scores)
    if lowest:
        return order
    order = tf.bitwise.invert(order)  # -order - 1: +inf lowest, NaN at int32.max
    return tf.minimum(order, _TOP - 1)


class RowLayout:
    """Several tensors laid out as the rows of one [rows, width] tensor.

    Each tensor starts on a new row and fills ``ceil(size / width)`` rows in
    row-major order; the tail of its last row is padding. Position in the
    layout (row * width + column) follows the order of the tensors and, within
    one, its row-major flat index, so it can break ties. One selection over
    this layout serves every tensor at once: the compiled update holds one
    selection loop for a whole model instead of one per layer, which is what
    its compile time scales with.

    Args:
      shapes: static shapes of the tensors, in order.
      width: entries per row (default: 1024, more for layouts of over 4M entries,
        so that per-row work stays small).
    """

    def __init__(self, shapes: Sequence[tf.TensorShape], width: Optional[int] = None):
        self.shapes = [tf.TensorShape(s) for s in shapes]
        self.sizes = [s.num_elements() for s in self.shapes]
        total = sum(self.sizes)
        if width is None:
            width = 1024
            while total > 4096 * width:
                width *= 2
        self.width = width
        self.rows = [max(1, -(-n // width)) for n in self.sizes]
        self.first_row = [0] + list(itertools.accumulate(self.rows))[:-1]
        self.num_rows = sum(self.rows)
        if self.num_rows * width >= _INDEX_SPAN:
            raise ValueError(f"Selection over {total} entries; at most about {_INDEX_SPAN - 1} "
                             "are supported.")

    def pack(self, tensors: Sequence[tf.Tensor], fill) -> tf.Tensor:
        """[rows, width] tensor of `tensors` (in the layout's order), padding = `fill`."""
        parts = []
        for t, n, r in zip(tensors, self.sizes, self.rows):
            t = tf.reshape(t, [-1])
            if r * self.width > n:
                t = tf.concat([t, tf.constant(fill, t.dtype, shape=[r * self.width - n])], 0)
            parts.append(tf.reshape(t, [r, self.width]))
        return tf.concat(parts, 0)

    def unpack(self, packed: tf.Tensor) -> List[tf.Tensor]:
        """Inverse of `pack`: the tensors, in their shapes."""
        sizes = []
        for n, r in zip(self.sizes, self.rows):
            sizes += [n, r * self.width - n] if r * self.width > n else [n]
        parts = iter(tf.split(tf.reshape(packed, [-1]), sizes))
        tensors = []
        for n, r, shape in zip(self.sizes, self.rows, self.shapes):
            tensors.append(tf.reshape(next(parts), shape))
            if r * self.width > n:
                next(parts)  # padding
        return tensors


class _Groups:
    """Which rows of a `RowLayout` each of `n` groups owns.

    Per-group sums are matrix products with the 0/1 [groups, rows] membership: on CPU
    XLA compiles a dot far faster than a reduction and runs it as fast, and the
    selection loop runs them at every pass. Exact: counts in float32 (per row at
    most `width` <= 2**23; per group as well when the layout has fewer than 2**24
    positions, in float64 otherwise). Per-row spreads are gathers by each row's
    group: one small kernel (a float64 dot with the membership was two, the dot and
    its operand's cast, compiled and run at every pass).

    Args:
      row_group: [rows] int32, the group of each row (n: none).
      n: the number of groups.
      size: [n] int64, the positions of each group (its rows times the width).
      positions: the layout's positions (rows times width).
    """

    def __init__(self, row_group: tf.Tensor, n: int, size: tf.Tensor, positions: int):
        self.n = n
        self.positions = positions
        self._row_group = row_group                           # [rows]
        # (float32 sums are exact below 2**24: no conversion kernel in the loop then)
        self._sum_dtype = tf.float32 if positions < 2**24 else tf.float64
        # (a row of group n, none, is a zero column)
        self._to_groups = tf.one_hot(row_group, n, axis=0, dtype=self._sum_dtype)  # [groups, rows]
        self.size = size

    @classmethod
    def of(cls, layout: RowLayout, groups: Sequence[Sequence[int]],
           n: Optional[int] = None) -> "_Groups":
        """The groups of tensor indices `groups` (n of them, default len(groups)), as
        constants of [rows] and [n] (not of the layout's size)."""
        n = len(groups) if n is None else n
        row_group = np.full([layout.num_rows], n, np.int32)
        for g, members in enumerate(groups):
            for i in members:
                row_group[layout.first_row[i]:layout.first_row[i] + layout.rows[i]] = g
        size = np.bincount(row_group, minlength=n + 1)[:n].astype(np.int64) * layout.width
        return cls(tf.constant(row_group), n, tf.constant(size), layout.num_rows * layout.width)

    @staticmethod
    def where(pred, a: "_Groups", b: "_Groups") -> "_Groups":
        """`a` where the scalar `pred` holds, else `b` (same layout and n)."""
        return _Groups(tf.where(pred, a._row_group, b._row_group), a.n,
                       tf.where(pred, a.size, b.size), a.positions)

    def count(self, flags: tf.Tensor) -> tf.Tensor:
        """[groups] int32: True entries of a [rows, width] bool tensor, per group."""
        per_row = tf.linalg.matvec(tf.cast(flags, tf.float32), tf.ones([flags.shape[1]], tf.float32))
        return tf.cast(tf.linalg.matvec(self._to_groups, tf.cast(per_row, self._sum_dtype)),
                       tf.int32)

    def spread(self, per_group: tf.Tensor) -> tf.Tensor:
        """[groups, k] int -> [rows, k] int32: each row's group values (0: no group)."""
        per_group = tf.cast(per_group, tf.int32)
        padded = tf.concat([per_group, tf.zeros([1, per_group.shape[1]], tf.int32)], 0)
        return tf.gather(padded, self._row_group)


def _select_groups(key: tf.Tensor, rows: _Groups, counts) -> tf.Tensor:
    """The chosen entries of a packed key tensor: the `counts[g]` smallest keys of group g.

    Args:
      key: [rows, width] int32 from `_keys`, `_TOP` where ineligible (padding included).
      rows: the `_Groups` of the layout's rows.
      counts: [groups] int (<= 0: none; above the eligible number: all of them).

    Returns:
      [rows, width] bool.

    One `tf.while_loop` for every group. Phase 0 searches each group's threshold
    v, the smallest key with ``#{key <= v} >= count``; where more entries tie at v
    than are still needed, phase 1 searches the position p up to which the tied
    entries are taken (lowest positions first); each group moves through its
    phases on its own. The chosen entries are those with ``(key, position) <=
    (v, p)``. Each pass counts, per group, the entries at or below one probe,
    and a group stops as soon as a probe counts exactly `count`. Probes bisect
    the bracket, except that every other pass, once entries have been counted
    below the bracket's low end, the probe interpolates (where the counts at the
    two ends put the target, as if the keys between them were spread evenly); so
    a search never takes more than twice a bisection's ~32 passes per phase
    (phase 1: log2 of the positions). On scores spread like weights or gradients
    (1e6 entries) this takes 13-26 passes instead of 33. The loop's state is one
    [8, groups] int64 tensor (lo, hi, v, count at lo, count at hi, phase, the
    pass's probe, pass), computed by one fusion per pass: with the count's dots,
    a pass compiles to a handful of kernels.
    """
    height, width = key.shape
    # A position is compared as (row, column): a [rows, width] tensor of positions
    # would be folded by TensorFlow into a constant of that size in the program.
    row = tf.range(height, dtype=tf.int32)[:, None]
    column = tf.range(width, dtype=tf.int32)[None, :]
    counts = tf.cast(counts, tf.int64)

    def chosen(v, p):  # [groups] int64 (v, p), v < _TOP -> [rows, width] bool (eligible only)
        vp = rows.spread(tf.stack([v, p], axis=1))
        v, p = vp[:, :1], vp[:, 1:2]
        p_row = tf.math.floordiv(p, width)  # p = -1: row -1, nothing at or before
        at_or_before_p = (row < p_row) | (tf.equal(row, p_row) & (column <= p - p_row * width))
        return (key < v) | (tf.equal(key, v) & at_or_before_p)

    def body(state):
        lo, hi, v, at_lo, at_hi, phase, probe, trip = tf.unstack(state)
        on_key = tf.equal(phase, 0)
        c = tf.cast(rows.count(chosen(
            tf.where(on_key, probe, v), tf.where(on_key, tf.constant(_TOP, tf.int64), probe))),
            tf.int64)
        moving = (phase < 2) & (hi - lo > 1)  # converged groups keep their bounds
        up, down = moving & (c >= counts), moving & (c < counts)
        exact = up & tf.equal(c, counts)  # the probe is the answer: stop there
        lo = tf.where(down, probe, tf.where(exact, probe - 1, lo))
        hi, at_lo, at_hi = tf.where(up, probe, hi), tf.where(down, c, at_lo), tf.where(up, c, at_hi)
        done = (phase < 2) & (hi - lo <= 1)
        start = done & on_key  # v found: split its ties where fewer than all are needed
        split = start & (at_hi > counts) & (hi < _TOP)  # (v = _TOP: all eligible, no tie)
        # phase 1 starts from the entries below v (at position -1, the count at lo)
        # and all of those at v (at the last position, the count at hi)
        v = tf.where(start, hi, v)
        lo = tf.where(split, tf.constant(-1, tf.int64), lo)
        hi = tf.where(split, tf.constant(height * width - 1, tf.int64),
                      tf.where(start, tf.constant(_TOP, tf.int64), hi))  # no split: all at v
        one = tf.ones_like(phase)
        phase = phase + tf.where(done, tf.where(start & ~split, 2 * one, one), 0 * one)
        trip = trip + 1
        span = tf.maximum(hi - lo, 2)
        share = tf.cast(counts - at_lo, tf.float64) / tf.cast(tf.maximum(at_hi - at_lo, 1),
                                                              tf.float64)
        step = tf.cast(share * tf.cast(span, tf.float64), tf.int64)  # (clipped to >= 1 below)
        interpolate = tf.equal(trip % 2, 0) & (at_lo > 0)  # both ends counted
        step = tf.where(interpolate, tf.clip_by_value(step, 1, span - 1), span // 2)
        return [tf.stack([lo, hi, v, at_lo, at_hi, phase, lo + step, trip])]

    lo, hi = _SIGN - 1, _TOP  # counts at the bounds: none below lo, at most size at hi
    none = counts <= 0  # done at once
    state = tf.concat([  # (lo, hi, v, at_lo; at_hi = size; phase; the first probe, pass)
        tf.constant(np.repeat([[lo], [hi], [hi], [0]], rows.n, axis=1), tf.int64),
        rows.size[None, :], 2 * tf.cast(none, tf.int64)[None, :],
        tf.constant(np.repeat([[lo + (hi - lo) // 2], [0]], rows.n, axis=1), tf.int64)], 0)
    # (the bound on passes in the condition, not as maximum_iterations: that adds a
    # counter, one more kernel per pass)
    state, = tf.while_loop(lambda state: tf.reduce_any(state[5] < 2) & (state[7, 0] < 140),
                           body, [state])
    # (v, p) of a count <= 0 choose nothing: v = the lowest bound, p = -1; v = _TOP
    # (a count above the eligible number) chooses every key below it: p = -1
    v = tf.where(none, tf.constant(_SIGN, tf.int64), state[2])
    p = tf.where(none | tf.equal(v, _TOP), tf.constant(-1, tf.int64), state[1])
    return chosen(v, p)


def select_each(scores_list: Sequence[tf.Tensor], eligible_list: Sequence[tf.Tensor], counts,
                lowest: bool, groups: Optional[Sequence[Sequence[int]]] = None) -> List[tf.Tensor]:
    """Several selections in one: in each group, the `min(count, eligible)` lowest (highest) scores.

    The rule of the module docstring, per group: exact counts, never an
    ineligible entry, ties to the lower position (within a group of several
    tensors: earlier tensors first, then row-major), NaN least important.

    Args:
      scores_list: float tensors, any shapes.
      eligible_list: bool tensors of the same shapes.
      counts: one scalar int (tensor) per group.
      lowest: choose the lowest scores (True) or the highest (False).
      groups: lists of indices into `scores_list`: the tensors each selection
        ranks together (default: one group per tensor).

    Returns:
      One bool tensor per input tensor, True at the chosen entries.
    """
    if groups is None:
        groups = [[i] for i in range(len(scores_list))]
    shapes = [tf.TensorShape(e.shape) for e in eligible_list]
    live = [i for i, shape in enumerate(shapes) if shape.num_elements() > 0]
    if not live:
        return [tf.zeros(shape, tf.bool) for shape in shapes]
    layout = RowLayout([shapes[i] for i in live])
    position = {i: k for k, i in enumerate(live)}
    # one key computation over the layout (not one per tensor: fewer ops to trace)
    eligible = layout.pack([eligible_list[i] for i in live], False)
    scores = layout.pack([tf.cast(scores_list[i], tf.float32) for i in live], 0.0)
    key = tf.where(eligible, _keys(scores, lowest), _TOP)
    live_groups = [[position[i] for i in g if i in position] for g in groups]
    # (no clipping needed: a count above the eligible number ends the search at _TOP,
    # which chooses every eligible entry; a count <= 0 chooses none)
    counts = tf.stack([_as_count(c) for c in counts])
    chosen = layout.unpack(_select_groups(key, _Groups.of(layout, live_groups), counts))
    return [chosen[position[i]] if i in position else tf.zeros(shapes[i], tf.bool)
            for i in range(len(shapes))]


def _select(scores: tf.Tensor, eligible: tf.Tensor, count, lowest: bool) -> tf.Tensor:
    """One selection (see `select_each`)."""
    return select_each([scores], [eligible], [count], lowest)[0]


def select_lowest(scores: tf.Tensor, eligible: tf.Tensor, count) -> tf.Tensor:
    """The `min(count, eligible)` eligible entries with the lowest scores.

    Ties: lower flat index first. NaN ranks below -inf (chosen first).

    Args:
      scores: float tensor, any shape.
      eligible: bool tensor of the same shape.
      count: scalar int tensor or int.

    Returns:
      bool tensor of the same shape, True at the chosen entries.
    """
    return _select(scores, eligible, count, lowest=True)


def select_highest(scores: tf.Tensor, eligible: tf.Tensor, count) -> tf.Tensor:
    """The `min(count, eligible)` eligible entries with the highest scores.

    Ties: lower flat index first. NaN ranks below -inf (chosen last).

    Args:
      scores: float tensor, any shape.
      eligible: bool tensor of the same shape.
      count: scalar int tensor or int.

    Returns:
      bool tensor of the same shape, True at the chosen entries.
    """
    return _select(scores, eligible, count, lowest=False)


def prune(scores: tf.Tensor, mask: tf.Tensor, count) -> tf.Tensor:
    """Deactivates the `min(count, active)` active entries of lowest score.

    Args:
      scores: float tensor, shape of `mask`; higher = more important. Scores of
        inactive entries are ignored.
      mask: bool tensor, True where active.
      count: scalar int tensor or int, number of entries to remove.

    Returns:
      The new bool mask (a subset of `mask`).
    """
    return mask & ~select_lowest(scores, mask, count)


def grow(scores: tf.Tensor, mask: tf.Tensor, count) -> tf.Tensor:
    """Activates the `min(count, inactive)` inactive entries of highest score.

    Args:
      scores: float tensor, shape of `mask`; higher = grown first. Scores of
        active entries are ignored.
      mask: bool tensor, True where active (typically the pruned mask, so
        just-pruned entries can be regrown).
      count: scalar int tensor or int, number of entries to add.

    Returns:
      The new bool mask (a superset of `mask`).
    """
    return mask | select_highest(scores, ~mask, count)


def grow_bernoulli(mask: tf.Tensor, count, seed: tf.Tensor) -> tf.Tensor:
    """The reference's random growth: each inactive entry on with prob. count / inactive.

    The number grown is Binomial(inactive, count / inactive): exact only in
    expectation (mean `min(count, inactive)`). With no inactive entry nothing
    is grown. The reference's guard ("if the result has no active entry keep
    `mask`") is kept; it never fires because the result contains `mask`.

    Args:
      mask: bool tensor, True where active.
      count: scalar int tensor or int, expected number of entries to add.
      seed: int32 tensor of shape [2] for `tf.random.stateless_uniform`.

    Returns:
      The new bool mask (a superset of `mask`).
    """
    inactive = ~mask
    n_inactive = tf.reduce_sum(tf.cast(inactive, tf.float32))
    probability = tf.math.divide_no_nan(tf.cast(_as_count(count), tf.float32), n_inactive)
    draws = tf.random.stateless_uniform(tf.shape(mask), seed=seed)
    grown = mask | (inactive & (draws < probability))
    return tf.where(tf.reduce_any(grown), grown, mask)


def prune_count(active, rate) -> tf.Tensor:
    """`ceil(rate * active)` clamped to `[0, active]`, as int32.

    The product is formed in float64. A float64 rate (the built-in schedules
    compute in float64, as the reference's ``math.ceil(rate * n)``) gives the
    exact ceiling of that product. A float32 rate (e.g. from a user's callable
    schedule) is only known to a relative 2**-24, so a product within
    `2**-23 * rate * active` of an integer is snapped to that integer instead
    of rounded up: rate=float32(0.1), active=10 gives 1, not 2. That is exact
    for every product below 5000 whose true fractional part is >= 1e-3; for
    larger layers the result can be one lower than the exact ceiling.

    Args:
      active: scalar int tensor or int, active count `a`.
      rate: scalar float tensor or float, prune rate `p`.

    Returns:
      Scalar int32 tensor `r`.
    """
    active = tf.cast(tf.convert_to_tensor(active), tf.float64)
    rate = tf.convert_to_tensor(rate)
    product = tf.cast(rate, tf.float64) * active
    # ceil(product): truncation toward zero, plus one where that fell below the product
    # (native ops: `tf.math.ceil` compiles through MLIR, see `scoring.absolute`)
    whole = tf.cast(tf.cast(product, tf.int64), tf.float64)
    count = whole + tf.cast(whole < product, tf.float64)
    if rate.dtype != tf.float64:
        nearest = tf.round(product)
        snapped = tf.abs(product - nearest) <= tf.abs(product) * 2.0**-23
        count = tf.where(snapped, nearest, count)
    return tf.cast(tf.clip_by_value(count, 0.0, active), tf.int32)


def concat_flat(tensors: Sequence[tf.Tensor]) -> tf.Tensor:
    """Concatenates the row-major flattenings of `tensors` into one 1-D tensor."""
    return tf.concat([tf.reshape(t, [-1]) for t in tensors], axis=0)


def split_like(flat: tf.Tensor, like: Sequence[tf.Tensor]) -> List[tf.Tensor]:
    """Inverse of `concat_flat`: splits `flat` back into the shapes of `like`."""
    sizes = [t.shape.num_elements() for t in like]
    parts = tf.split(flat, sizes, axis=0)
    return [tf.reshape(part, t.shape) for part, t in zip(parts, like)]


def global_prune(scores_list: Sequence[tf.Tensor], masks_list: Sequence[tf.Tensor], count) -> List[tf.Tensor]:
    """`prune` over all layers at once: one exact selection, split back per layer.

    The flat index used for tie-breaking is the position in the concatenation
    of the row-major flattenings, in list order (earlier layers first).

    Args:
      scores_list: float tensors, one per layer.
      masks_list: bool tensors of the same shapes.
      count: scalar int tensor or int, total number of entries to remove.

    Returns:
      List of new bool masks, one per layer.
    """
    return _prune_groups(scores_list, masks_list, [count], [list(range(len(masks_list)))])


def _prune_groups(scores_list, masks_list, counts, groups=None) -> List[tf.Tensor]:
    """The masks after removing, in each group, its count of lowest-scored active entries."""
    chosen = select_each(scores_list, masks_list, counts, lowest=True, groups=groups)
    return [m & ~c for m, c in zip(masks_list, chosen)]


def prune_each(scores_list: Sequence[tf.Tensor], masks_list: Sequence[tf.Tensor], counts) -> List[tf.Tensor]:
    """`prune` of every tensor with its own count, as one selection (`select_each`).

    Args:
      scores_list: float tensors, one per layer.
      masks_list: bool tensors of the same shapes.
      counts: one scalar int (tensor) per layer.

    Returns:
      List of new bool masks (subsets of the old ones).
    """
    return _prune_groups(scores_list, masks_list, counts)


def grow_each(scores_list: Sequence[tf.Tensor], masks_list: Sequence[tf.Tensor], counts) -> List[tf.Tensor]:
    """`grow` of every tensor with its own count, as one selection (`select_each`).

    Args:
      scores_list: float tensors, one per layer.
      masks_list: bool tensors of the same shapes.
      counts: one scalar int (tensor) per layer.

    Returns:
      List of new bool masks (supersets of the old ones).
    """
    chosen = select_each(scores_list, [~m for m in masks_list], counts, lowest=False)
    return [m | c for m, c in zip(masks_list, chosen)]


def prune_then_grow(prune_scores: Sequence[tf.Tensor], masks_list: Sequence[tf.Tensor],
                    prune_counts, grow_scores, prune_groups: Optional[Sequence[Sequence[int]]] = None,
                    counts_within_active: bool = False):
    """A whole exact DST update in one selection loop: prune, then every tensor regrows what it lost.

    The same masks as ``pruned = prune_each(prune_scores, masks_list, prune_counts)``
    (or `global_prune` with ``prune_groups=[all]``) followed by ``grow_each(
    grow_scores(pruned), pruned, removed)``, with ``removed[i]`` the entries tensor
    i lost. Both selections run through one compiled loop (a loop of two trips
    around the selection loop), so the update compiles one selection, not two.

    Args:
      prune_scores: float tensors, one per tensor (higher = kept).
      masks_list: bool tensors of the same shapes, True where active.
      prune_counts: one scalar int (tensor) per prune group.
      grow_scores: callable taking the pruned masks (list) and returning the growth
        scores (list, same shapes; higher = grown first). Traced once, inside the
        loop, and run at both trips (so it must not write state).
      prune_groups: lists of tensor indices ranked together when pruning (default:
        one group per tensor; ``[list(range(n))]`` for a global prune).
      counts_within_active: with one group per tensor, True when the caller knows
        every count to lie in [0, the tensor's active entries]: then ``removed`` is
        the counts, known before the loop, and nothing is counted (by default
        the masks are counted to clip them).

    Returns:
      ``(pruned, grown, removed)``: two lists of bool masks and an int32 [tensors]
      tensor.
    """
    n = len(masks_list)
    tensor_groups = [[i] for i in range(n)]
    prune_groups = tensor_groups if prune_groups is None else [list(g) for g in prune_groups]
    shapes = [tf.TensorShape(m.shape) for m in masks_list]
    if any(shape.num_elements() == 0 for shape in shapes) or len(prune_groups) > n:
        pruned = _prune_groups(prune_scores, masks_list, prune_counts, prune_groups)
        removed = count_true_each(masks_list) - count_true_each(pruned)
        return pruned, grow_each(grow_scores(pruned), pruned, tf.unstack(removed)), removed
    layout = RowLayout(shapes)
    # One int8 tensor holds the masks: 1 active, 0 inactive, 2 padding (never eligible);
    # pruning sets the chosen to 0, growth chooses among the 0s (just-pruned included).
    # (No pack of constant ones: TF would fold it into a constant of the layout's size.)
    start = layout.pack([tf.cast(m, tf.int8) for m in masks_list], 2)
    prune_key = _keys(layout.pack([tf.cast(x, tf.float32) for x in prune_scores], 0.0), True)
    tensors = _Groups.of(layout, tensor_groups)
    counts = tf.stack([_as_count(c) for c in prune_counts]
                      + [tf.constant(0)] * (n - len(prune_groups)))
    per_tensor = prune_groups == tensor_groups
    if per_tensor:  # each tensor loses exactly min(count, active)
        removed = counts if counts_within_active else tf.clip_by_value(
            counts, 0, tensors.count(tf.equal(start, 1)))
    else:
        removed = tf.zeros([n], tf.int32)  # counted at the first trip
        by_prune_group = _Groups.of(layout, prune_groups, n)

    def body(trip, state, pruned, removed):
        pruning = tf.equal(trip, 0)
        scores = layout.pack([tf.cast(x, tf.float32)
                              for x in grow_scores(layout.unpack(tf.equal(state, 1)))], 0.0)
        eligible = tf.equal(state, tf.cast(tf.where(pruning, 1, 0), tf.int8))
        key = tf.where(eligible, tf.where(pruning, prune_key, _keys(scores, False)), _TOP)
        chosen = _select_groups(
            key, tensors if per_tensor else _Groups.where(pruning, by_prune_group, tensors),
            tf.where(pruning, counts, removed))
        state = tf.where(chosen, tf.cast(tf.where(pruning, 0, 1), tf.int8), state)
        if not per_tensor:
            removed = tf.where(pruning, tensors.count(chosen), removed)
        return trip + 1, state, tf.where(pruning, state, pruned), removed

    _, grown, pruned, removed = tf.while_loop(
        lambda trip, *_: trip < 2, body, (tf.constant(0), start, start, removed))
    return (layout.unpack(tf.equal(pruned, 1)), layout.unpack(tf.equal(grown, 1)), removed)


def count_true_each(masks: Sequence[tf.Tensor]) -> tf.Tensor:
    """[len(masks)] int32: the True entries of each bool tensor, in one reduction."""
    shapes = [tf.TensorShape(m.shape) for m in masks]
    live = [i for i, shape in enumerate(shapes) if shape.num_elements() > 0]
    counts = [tf.constant(0)] * len(masks)
    if live:
        layout = RowLayout([shapes[i] for i in live])
        per_tensor = _Groups.of(layout, [[k] for k in range(len(live))]).count(
            layout.pack([masks[i] for i in live], False))
        if len(live) == len(masks):
            return per_tensor
        for k, i in enumerate(live):
            counts[i] = per_tensor[k]
    return tf.stack(counts)


NORMALIZE_MODES = ("none", "input", "output", "channel", "depth", "layer")
NORM_TYPES = ("max", "sum")


class ScoreLayout(NamedTuple):
    """How `normalize` groups a weight's entries (`layers.score_layout` makes it).

    Attributes:
      kind: ``"linear"`` (a Dense or EinsumDense kernel, a recurrent kernel, an
        embedding table: PyTorch's ``Linear`` / ``Embedding``), ``"conv"`` (a
        convolution's ``[taps..., inputs, outputs]``, a transposed one's ``[taps...,
        outputs, inputs]``) or ``"depthwise"`` (``[taps..., input channels, depth
        multiplier]``: each output channel is one (input channel, multiplier) pair).
      output_axes: for ``"linear"``, the axes that index the layer's output units (a
        Dense kernel's last; an embedding table's rows, axis 0, since PyTorch's
        ``Embedding`` and ``Linear`` both put the units on their first axis).
    """

    kind: str
    output_axes: Tuple[int, ...] = ()


def default_layout(rank: int) -> ScoreLayout:
    """The layout of a weight of this rank when nothing else is known: a 2-D kernel
    ``[inputs, outputs]``, a convolution's for rank 3 and more."""
    return ScoreLayout("linear", (1,)) if rank == 2 else ScoreLayout("conv")


def _normalize_axes(rank: int, mode: str, layout: Optional[ScoreLayout] = None):
    """Reduction axes of a normalisation mode for a weight of this rank and layout (None =
    all: "layer", and every mode a layout has no group for)."""
    layout = layout or default_layout(rank)
    if layout.kind == "linear":
        outputs = [a % rank for a in layout.output_axes]
        if mode == "input":  # per output unit, over its inputs
            return [a for a in range(rank) if a not in outputs]
        if mode == "output":  # per input unit, over its outputs
            return outputs
        return None
    if rank < 3:
        return None
    if layout.kind == "depthwise" and mode in ("channel", "depth"):
        return list(range(rank - 2))  # per output channel: its taps
    if layout.kind == "conv" and mode == "channel":  # per output filter (a transposed
        return list(range(rank - 1))                 # convolution's: per input channel)
    if layout.kind == "conv" and mode == "depth":  # per (in, out) slice: the taps
        return list(range(rank - 2))
    return None


def normalize(scores: tf.Tensor, mask: tf.Tensor, mode: str = "none", norm_type: str = "sum",
              layout: Optional[ScoreLayout] = None) -> tf.Tensor:
    """Divides scores by a per-group statistic of the ACTIVE scores.

    The reference's score normalisation (`norm_score` / `get_norm_value` in
    `sparselearning/pruners.py` of github alooow/fantastic_weights_paper).
    The reference's groups on PyTorch's layouts, found in Keras's (`layout`, from
    `layers.score_layout`; by default a 2-D weight is a Dense kernel, a larger one a
    convolution's):

    | mode      | "linear" (Dense, tables)  | "conv" (..., in, out)      | "depthwise" (..., in, m) |
    |-----------|---------------------------|----------------------------|--------------------------|
    | "input"   | per output unit: inputs   | whole tensor               | whole tensor             |
    | "output"  | per input unit: outputs   | whole tensor               | whole tensor             |
    | "channel" | whole tensor              | per output filter: all but | per output channel: taps |
    |           |                           | the last axis              |                          |
    | "depth"   | whole tensor              | per (in, out) slice: taps  | per output channel: taps |
    | "layer"   | whole tensor              | whole tensor               | whole tensor             |
    | "none"    | unchanged                 | unchanged                  | unchanged                |

    ("inputs"/"outputs": the axes that index them; an EinsumDense kernel is "linear"
    with the axes its equation keeps in the output as its outputs.)
    A transposed convolution's kernel ends with its input axis, as PyTorch's starts
    with it, so "channel" groups per input channel there, as in the reference. The
    reference normalises "channel" and "depth" on 4-D weights only (a Conv1D's or
    Conv3D's whole tensor); here every convolution is normalised per filter.

    The statistic (`norm_type` "sum" = sum, the reference's default, "max" =
    largest) is taken over the active entries of each group only. Deviation from
    the reference (which divides without a guard and gets 0/0 = NaN for an
    all-zero group): a group whose statistic is 0, or that has no active entry,
    yields 0 everywhere.

    Args:
      scores: float32 tensor, the shape of the kernel.
      mask: bool tensor of the same shape, True where active.
      mode: one of `NORMALIZE_MODES`.
      norm_type: one of `NORM_TYPES`.
      layout: a `ScoreLayout` (`layers.score_layout`), or None (`default_layout`).

    Returns:
      float32 tensor of the same shape.

    Raises:
      ValueError: unknown `mode` or `norm_type`.
    """
    if mode not in NORMALIZE_MODES:
        raise ValueError(f"Unknown normalize mode {mode!r}; expected one of {NORMALIZE_MODES}.")
    if norm_type not in NORM_TYPES:
        raise ValueError(f"Unknown norm_type {norm_type!r}; expected one of {NORM_TYPES}.")
    if mode == "none":
        return scores
    axes = _normalize_axes(scores.shape.rank, mode, layout)
    if norm_type == "max":
        statistic = tf.reduce_max(tf.where(mask, scores, float("-inf")), axis=axes, keepdims=True)
    else:
        statistic = tf.reduce_sum(tf.where(mask, scores, 0.0), axis=axes, keepdims=True)
    has_active = tf.reduce_any(mask, axis=axes, keepdims=True)
    statistic = tf.where(has_active, statistic, 0.0)
    return tf.math.divide_no_nan(scores, statistic)


def jaccard(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """Jaccard index |a & b| / |a | b| of two bool tensors (1.0 when both are empty).

    Args:
      a: bool tensor.
      b: bool tensor of the same shape.

    Returns:
      Scalar float32 tensor in [0, 1].
    """
    intersection = tf.reduce_sum(tf.cast(a & b, tf.float32))
    union = tf.reduce_sum(tf.cast(a | b, tf.float32))
    return tf.where(union > 0, tf.math.divide_no_nan(intersection, union), 1.0)


_RANK_MAX_GROUP = 16  # groups up to this size are ranked by comparison, larger ones bisected


def select_highest_per_group(scores: tf.Tensor, eligible: tf.Tensor, counts) -> tf.Tensor:
    """In every group (row) g, the `min(counts[g], eligible in g)` eligible entries of highest score.

    The per-row version of `select_highest`, with the same rules: never an
    ineligible entry; exact counts whatever the scores contain; ties to the
    LOWER index within the row; NaN ranks below -inf (chosen last); -0.0 equals
    +0.0. Used to refill N:M groups and constant fan-in columns
    (`keras_dst.patterns`): each group regrows exactly what it lost.

    Implementation, vectorised over the rows, no sort: the entries get the
    int32 order keys of `select_highest` (`_score_order`, inverted), then

    * rows of at most `_RANK_MAX_GROUP` entries (N:M groups): each eligible
      entry's rank (eligible entries before it in (key, index) order) by S
      unrolled comparisons with the row's columns; the entries of rank below
      the count are chosen. S passes over [G, S], no loop.
    * longer rows (fan-in columns): a bisection on the key value, for all rows
      at once in one `tf.while_loop` (at most 33 counting passes over [G, S]),
      gives each row's threshold key; entries below it are chosen, and of
      those equal to it the `need` of lowest index by one prefix sum along
      the rows.

    Both paths give the same entries. Static shapes; `counts` values may
    change from call to call under `tf.function(jit_compile=True)`.

    Args:
      scores: float tensor of shape [G, S] (G groups of S entries; static).
      eligible: bool tensor of shape [G, S].
      counts: int tensor of shape [G] (a negative value means 0, one above the
        row's eligible number means all of them).

    Returns:
      bool tensor of shape [G, S], True at the chosen entries.
    """
    eligible = tf.convert_to_tensor(eligible, tf.bool)
    if eligible.shape.rank != 2 or not eligible.shape.is_fully_defined():
        raise ValueError(f"select_highest_per_group expects static [G, S] tensors, "
                         f"got shape {eligible.shape}.")
    if eligible.shape.num_elements() == 0:
        return tf.zeros(eligible.shape, tf.bool)
    # Highest first: the inverted order puts +inf lowest and NaN at int32.max (last).
    order = tf.bitwise.invert(_score_order(scores))
    available = tf.reduce_sum(tf.cast(eligible, tf.int32), axis=1)
    count = tf.clip_by_value(tf.cast(counts, tf.int32), 0, available)[:, None]  # [G, 1]
    if eligible.shape[1] <= _RANK_MAX_GROUP:
        return eligible & (_rank_in_rows(order, eligible) < count)
    return _bisect_rows(order, eligible, count)


def _rank_in_rows(order: tf.Tensor, eligible: tf.Tensor) -> tf.Tensor:
    """[G, S] int32: the number of eligible entries of the same row before each entry.

    "Before" means a smaller key, or an equal key at a lower index. One pass
    per column (S unrolled comparisons), for short rows.
    """
    index = tf.range(order.shape[1])
    rank = tf.zeros([], tf.int32)  # (a scalar: TF folds a fill of a static shape into a constant)
    for k in range(order.shape[1]):
        key = order[:, k:k + 1]
        before = (key < order) | (tf.equal(key, order) & (index > k))
        rank += tf.cast(eligible[:, k:k + 1] & before, tf.int32)
    return rank


def _bisect_rows(order: tf.Tensor, eligible: tf.Tensor, count: tf.Tensor) -> tf.Tensor:
    """`select_highest_per_group` for long rows: per-row threshold key by bisection.

    Per row, the smallest key v with #{key <= v} >= count, ineligible entries
    counted at int32.max (after every eligible key; eligible NaNs share that
    key and are told apart by `tied`). Bounds in int64 so that
    lo = int32.min - 1 fits: #(<= lo) < count <= #(<= hi) for count >= 1.
    """
    order = tf.where(eligible, order, tf.constant(_INELIGIBLE, tf.int32))

    def bisect(lo, hi):
        mid = lo + (hi - lo) // 2  # in [lo + 1, hi - 1] while hi - lo > 1
        n_at_most = tf.reduce_sum(tf.cast(order <= tf.cast(mid, tf.int32), tf.int32), axis=1, keepdims=True)
        above = n_at_most >= count
        return tf.where(above, lo, mid), tf.where(above, mid, hi)

    start = (tf.fill(tf.shape(count, out_type=tf.int64), tf.constant(-2**31 - 1, tf.int64)),
             tf.fill(tf.shape(count, out_type=tf.int64), tf.constant(2**31 - 1, tf.int64)))
    _, v = tf.while_loop(lambda lo, hi: tf.reduce_any(hi - lo > 1), bisect, start,
                         maximum_iterations=33)
    v = tf.cast(v, tf.int32)  # [G, 1]
    below = order < v  # only eligible entries are below int32.max
    need = count - tf.reduce_sum(tf.cast(below, tf.int32), axis=1, keepdims=True)
    tied = eligible & tf.equal(order, v)
    first_tied = tied & (tf.cumsum(tf.cast(tied, tf.int32), axis=1) <= need)
    return (below | first_tied) & (count > 0)
