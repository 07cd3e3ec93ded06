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
entries are the `count` smallest keys. The `count`-th smallest key is found
without sorting: for a selection over >= 2**17 entries by a radix select on
the 32-bit order (two histogram passes of 16 bits: scatter-add into 2**16
bins, prefix sums over the bins), for smaller ones by bisection on the order
(~33 vectorised counting passes; lower fixed cost, faster to compile); then,
only when the threshold order is tied, the tied entries of lowest flat index
by one prefix sum over the tied flags. Both give the same entries. Cost O(n),
no sort (XLA's comparator sort costs ~1 us per entry on CPU); at most
2**31 - 1 entries per call.
"""

from typing import List, Sequence

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
    """Maps float scores to int32 values with the same order (1-D in, 1-D out).

    The float32 bit pattern is made monotone (negative floats have their
    magnitude bits flipped); -0.0 is folded onto +0.0 and NaN maps to -2**31,
    below `-inf` (which maps to -2139095041).
    """
    x = tf.cast(scores, tf.float32)
    x = tf.where(tf.equal(x, 0.0), tf.zeros_like(x), x)
    bits = tf.bitcast(x, tf.int32)
    monotone = tf.where(bits < 0, tf.bitwise.bitwise_xor(bits, 0x7FFFFFFF), bits)
    return tf.where(tf.math.is_nan(x), tf.fill(tf.shape(bits), tf.int32.min), monotone)


_DIGIT = 16  # bits per radix digit: two counting passes per 32-bit key
_BINS = 1 << _DIGIT
_ROOT = 1 << (_DIGIT // 2)
_RADIX_MIN = 1 << 17  # entries from which the radix select is used
_SIGN = -2**31


def _count_threshold(key: tf.Tensor, counted: tf.Tensor, count, key_max=2**32 - 1):
    """Smallest t with ``#{counted entries with key <= t} >= count``.

    Keys are int32 compared as UNSIGNED 32-bit numbers. From `_RADIX_MIN`
    entries on, a radix select (`_radix_threshold`: two histogram passes);
    below, a bisection (`_bisect_threshold`: one counting pass per bit), whose
    fixed cost is lower and which compiles faster. Both are exact and give the
    same t.

    Args:
      key: 1-D int32 tensor.
      counted: 1-D bool tensor, the entries that count.
      count: scalar int32 tensor in [0, #counted] (with 0, t is 0).
      key_max: python int, an upper bound of the (unsigned) keys.

    Returns:
      ``(t, less, equal)``: int32 scalars, t's key bits and the numbers of
      counted entries with key < t and key == t.
    """
    if key.shape[0] >= _RADIX_MIN:
        return _radix_threshold(key, counted, count)
    return _bisect_threshold(key, counted, count, key_max)


def _bisect_threshold(key, counted, count, key_max):
    """`_count_threshold` by bisection on the key's value (~log2(key_max) passes)."""
    signed = tf.bitwise.bitwise_xor(key, _SIGN)  # unsigned order as a signed one

    def n_at_most(v):
        return tf.reduce_sum(tf.cast(counted & (signed <= v), tf.int32))

    # Bounds kept in int64: count(lo) < count <= count(hi).
    def bisect(lo, hi):
        mid = lo + (hi - lo) // 2
        above = n_at_most(tf.cast(mid, tf.int32)) >= count
        return tf.where(above, lo, mid), tf.where(above, mid, hi)

    _, v = tf.while_loop(lambda lo, hi: hi - lo > 1, bisect,
                         (tf.constant(-2**31 - 1, tf.int64),
                          tf.constant(key_max - 2**31, tf.int64)),
                         maximum_iterations=33)
    v = tf.cast(v, tf.int32)
    less = tf.reduce_sum(tf.cast(counted & (signed < v), tf.int32))
    equal = tf.reduce_sum(tf.cast(counted & tf.equal(signed, v), tf.int32))
    return tf.bitwise.bitwise_xor(v, _SIGN), less, equal


def _radix_threshold(key, counted, count):
    """`_count_threshold` by a radix select: two passes of 16 bits.

    Each pass scatter-adds the counted entries into 2**16 bins and takes prefix
    sums over the bins: the high 16 bits of t are the first bin whose running
    count reaches `count`, the low 16 bits the same among the entries of that
    bin. Exact, no sort, O(n).
    """
    weight = tf.cast(counted, tf.int32)
    high = tf.bitwise.bitwise_and(tf.bitwise.right_shift(key, _DIGIT), _BINS - 1)
    low = tf.bitwise.bitwise_and(key, _BINS - 1)

    def first_reaching(counts, need):
        """(first i with sum(counts[:i + 1]) >= need, sum(counts[:i]))."""
        running = tf.cumsum(counts)
        i = tf.minimum(tf.reduce_sum(tf.cast(running < need, tf.int32)), counts.shape[0] - 1)
        return i, tf.gather(tf.concat([[0], running], 0), i)

    def digit(ids, weights, need):
        # Prefix sums in two levels of 2**8 (XLA's cumsum over 2**16 bins is slow).
        counts = tf.reshape(tf.math.unsorted_segment_sum(weights, ids, _BINS), [_ROOT, _ROOT])
        row, before_row = first_reaching(tf.reduce_sum(counts, axis=1), need)
        row_counts = tf.gather(counts, row)
        col, before_col = first_reaching(row_counts, need - before_row)
        # (gather, not counts[row, col]: XLA needs a strided slice's bounds at
        # compile time, which would make the scores compile-time constants)
        return row * _ROOT + col, before_row + before_col, tf.gather(row_counts, col)

    top, less_top, _ = digit(high, weight, count)
    bottom, less_bottom, equal = digit(
        low, weight * tf.cast(tf.equal(high, top), tf.int32), count - less_top)
    t = tf.bitwise.bitwise_or(tf.bitwise.left_shift(top, _DIGIT), bottom)
    return t, less_top + less_bottom, equal


def _select(scores: tf.Tensor, eligible: tf.Tensor, count, lowest: bool) -> tf.Tensor:
    """Chooses `min(count, eligible)` eligible entries (see module docstring).

    Args:
      scores: float tensor, any shape.
      eligible: bool tensor of the same shape.
      count: scalar int tensor (or int), how many entries to choose.
      lowest: choose the lowest scores (True) or the highest (False).

    Returns:
      bool tensor of the shape of `scores`, True at the chosen entries.
    """
    shape = eligible.shape
    n = shape.num_elements()
    if n == 0:
        return tf.zeros(shape, tf.bool)
    if n >= _INDEX_SPAN:
        raise ValueError(f"Selection over {n} entries; at most {_INDEX_SPAN - 1} are supported.")
    flat_eligible = tf.reshape(eligible, [-1])
    order = _score_order(tf.reshape(scores, [-1]))  # int32; NaN = int32.min
    if not lowest:
        order = tf.bitwise.invert(order)  # -order - 1: NaN becomes int32.max, chosen last
    # Ineligible entries rank last (int32.max; only the eligible can be chosen below).
    order = tf.where(flat_eligible, order, tf.constant(_INELIGIBLE, tf.int32))
    available = tf.reduce_sum(tf.cast(flat_eligible, tf.int32))
    count = tf.clip_by_value(_as_count(count), 0, available)

    # Smallest order value v with #{order <= v} >= count, counting every entry
    # (flipping the sign bit makes the signed order an unsigned one). Below
    # int32.max only eligible entries have that order; at v = int32.max the
    # ineligible ones are told apart by `tied` (and left out of n_tied).
    v, below, at_v = _count_threshold(tf.bitwise.bitwise_xor(order, _SIGN),
                                      tf.ones_like(flat_eligible), count)
    v = tf.bitwise.bitwise_xor(v, _SIGN)
    n_tied = at_v - tf.where(tf.equal(v, _INELIGIBLE), n - available, 0)
    need = count - below  # ties to choose: >= 1 when count > 0
    tied = flat_eligible & tf.equal(order, v)

    def first_tied():
        # The `need` tied entries of lowest flat index: one prefix sum of the tied flags
        # (cheaper to compile than a second threshold search over the indices).
        return tied & (tf.cumsum(tf.cast(tied, tf.int32)) <= need)

    chosen_tied = tf.cond(need < n_tied, first_tied, lambda: tied)
    chosen = (order < v) | chosen_tied
    return tf.reshape(chosen & (count > 0), shape)


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
    count = tf.math.ceil(product)
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
    new_flat = prune(concat_flat(scores_list), concat_flat(masks_list), count)
    return split_like(new_flat, masks_list)


NORMALIZE_MODES = ("none", "input", "output", "channel", "depth", "layer")
NORM_TYPES = ("max", "sum")


def _normalize_axes(rank: int, mode: str):
    """Reduction axes of a normalisation mode for a Keras kernel of this rank (None = all)."""
    if mode == "input" and rank == 2:  # Dense (in, out): per output unit
        return [0]
    if mode == "output" and rank == 2:  # Dense (in, out): per input unit
        return [1]
    if mode == "channel" and rank >= 3:  # Conv (..., in, out): per output filter
        return list(range(rank - 1))
    if mode == "depth" and rank >= 3:  # Conv (..., in, out): per (in, out) slice
        return list(range(rank - 2))
    return None  # "layer", and every mode on a kernel of another rank


def normalize(scores: tf.Tensor, mask: tf.Tensor, mode: str = "none", norm_type: str = "max") -> tf.Tensor:
    """Divides scores by a per-group statistic of the ACTIVE scores.

    The reference's score normalisation (`norm_score` / `get_norm_value` in
    `sparselearning/pruners.py` of github alooow/fantastic_weights_paper).
    Keras layouts (the reference's PyTorch axes translated):

    | mode      | Dense kernel (in, out)      | Conv kernel (..., in, out)        |
    |-----------|-----------------------------|-----------------------------------|
    | "input"   | per output unit: axis 0     | whole tensor                      |
    | "output"  | per input unit: axis 1      | whole tensor                      |
    | "channel" | whole tensor                | per output filter: all but last   |
    | "depth"   | whole tensor                | per (in, out) slice: spatial axes |
    | "layer"   | whole tensor                | whole tensor                      |
    | "none"    | unchanged                   | unchanged                         |

    "Conv" means rank >= 3 (Conv1D/2D/3D, depthwise); any other rank uses the
    whole tensor for every mode except "none".

    The statistic (`norm_type` "max" = largest, "sum" = sum) is taken over the
    active entries of each group only. Deviation from the reference (which
    divides without a guard and gets 0/0 = NaN for an all-zero group): a group
    whose statistic is 0, or that has no active entry, yields 0 everywhere.

    Args:
      scores: float32 tensor, the shape of the kernel.
      mask: bool tensor of the same shape, True where active.
      mode: one of `NORMALIZE_MODES`.
      norm_type: one of `NORM_TYPES`.

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
    axes = _normalize_axes(scores.shape.rank, mode)
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
    rank = tf.zeros_like(order)
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
