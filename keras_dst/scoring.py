"""The inputs every score function sees (floor 1, shared by criteria and growth)."""

from typing import NamedTuple, Optional

import tensorflow as tf


class ScoreInputs(NamedTuple):
    """Everything a pruning or growth score may depend on, for one tensor.

    All tensors have the shape of the sparsified weight (any rank), but for a selection
    rule (a criterion's `select`), which gets them flattened to 1-D (in global scope, all
    the layers' concatenated).

    Attributes:
      weight: float32 weight values (inactive entries are exactly 0).
      gradient: float32 dense loss gradient of the current mini-batch, at every
        position, inactive ones included (no weight-decay term); None where no
        rule of the run is registered with ``needs_gradient=True``.
      mask: bool, True where the weight is active.
      seed: int64 tensor of shape [2], a stateless RNG seed unique to this
        tensor and this update step (use `tf.random.stateless_*`).
      momentum: float32 optimizer momentum of the weight (SGD momentum buffer,
        or Adam's m / (sqrt(v) + 1e-8)) for a growth rule that needs it; None
        otherwise (pruning criteria get None).
    """

    weight: tf.Tensor
    gradient: tf.Tensor
    mask: tf.Tensor
    seed: tf.Tensor
    momentum: Optional[tf.Tensor] = None


def absolute(x: tf.Tensor) -> tf.Tensor:
    """``|x|`` for score functions, as ``maximum(x, -x)``: `tf.abs` exactly, except that
    -0.0 may stay -0.0 (the selection ranks it as 0.0); NaN stays NaN.

    Written with a native op because TensorFlow's XLA bridge lowers `tf.abs` (as it does
    `is_finite`, `is_nan`, `floor` and `ceil`) through MLIR, at ~3 ms of compile time per
    op against ~0.1 ms for `maximum`, and a DST step holds one per layer and score.
    """
    return tf.maximum(x, -x)


def is_finite(x: tf.Tensor) -> tf.Tensor:
    """`tf.math.is_finite` with native ops (see `absolute`): False at NaN and +-inf.

    ``x - x == 0`` (NaN and inf give NaN, which equals nothing), not ``|x| < inf``: in a
    `tf.function` without XLA, TensorFlow's graph optimizer rewrites ``~(a < b)`` as
    ``a >= b``, which is False at NaN, so ``~is_finite`` missed NaN; ``~(a == b)``, as it
    is or as ``a != b``, is True at NaN.
    """
    return tf.equal(x - x, tf.zeros([], x.dtype))
