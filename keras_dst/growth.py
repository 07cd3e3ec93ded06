"""Growth rules: a registry of score functions for inactive entries.

A growth rule turns `ScoreInputs` into a float32 score of the weight's shape;
HIGHER = grown first. Only inactive entries of the (pruned) mask are eligible,
which `topology.grow` enforces, so just-pruned entries can be regrown.

Built-ins:

| name     | score                         | needs                                   |
|----------|-------------------------------|-----------------------------------------|
| random   | stateless U[0, 1) from seed   | nothing                                 |
| gradient | abs(g)  (RigL)                | gradient                                |
| momentum | abs(momentum)                 | optimizer momentum (ValueError if None) |

Exact-count growth is `topology.grow(rule.evaluate(inputs), mask, count)`.
The reference's random growth is Bernoulli (count exact only in expectation),
which is `topology.grow_bernoulli(mask, count, seed)` and needs no score.
The reference's `+1e-6` offset of gradient growth is not needed: `grow`
chooses exactly `count` inactive entries whatever their scores.

A rule made from a registered name round-trips through a config
(`GrowthRule.get_config` / `GrowthRule.from_config`); one made from a plain
callable does not, which `check_serializable` reports.
"""

import dataclasses
from typing import Any, Callable, Mapping, Optional, Tuple

import keras
import tensorflow as tf

from keras_dst.criteria import (
    FrozenEntry,
    calling,
    check_entry,
    check_registered,
    config_params,
    merge_params,
    random_scores,
    require_inputs,
    scores_of,
)
from keras_dst.registry import Registry, pop_config_name
from keras_dst.scoring import ScoreInputs, absolute


@keras.saving.register_keras_serializable(package="keras_dst")
@dataclasses.dataclass(frozen=True)
class GrowthRule(FrozenEntry):
    """A growth rule.

    Attributes:
      name: registry name.
      score: fn(inputs: ScoreInputs, **params) -> float32 tensor of the
        weight's shape, higher = grown first.
      needs_gradient: whether `inputs.gradient` is used.
      needs_momentum: whether `inputs.momentum` is used.
      params: read-only mapping of keyword parameters passed to `score`.
    """

    name: str
    score: Callable[..., tf.Tensor]
    needs_gradient: bool = False
    needs_momentum: bool = False
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)

    def __post_init__(self):
        check_entry(self, "Growth rule", self.score, ("needs_gradient", "needs_momentum"))
        object.__setattr__(self, "params", merge_params("growth", self.name, self.params, {}))

    def with_params(self, **params: Any) -> "GrowthRule":
        """A copy with `params` merged in (current params and `score` keywords accepted)."""
        return dataclasses.replace(self, params=merge_params("growth", self.name, self.params, params, fn=self.score))

    def evaluate(self, inputs: ScoreInputs) -> tf.Tensor:
        """`score(inputs, **params)` as float32.

        Raises:
          ValueError: a needed gradient or momentum is None.
        """
        require_inputs(inputs, "growth", self.name, gradient=self.needs_gradient, momentum=self.needs_momentum)
        with calling("Growth rule", self.name, inputs, ("gradient", "momentum")):
            scores = self.score(inputs, **self.params)
        return scores_of(scores, inputs, "Growth rule", self.name)

    def get_config(self) -> dict:
        """A plain dict (registry name and merged params) from which `from_config` rebuilds an equal rule.

        Raises:
          ValueError: the rule cannot be rebuilt from its name (see
            `check_serializable`).
        """
        check_serializable(self, "growth")
        return {"name": self.name, "params": dict(self.params)}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "GrowthRule":
        """The rule of `get_config`, rebuilt with `get_growth`.

        Raises:
          ValueError: unknown name, parameter or config key.
        """
        config = dict(config)
        name = pop_config_name(config, "growth rule")
        params = config_params(config, "growth rule", name)
        if config:
            raise ValueError(f"Unknown key(s) {sorted(config)} in the config of growth rule {name!r}.")
        return get_growth(name, **params)


_GROWTH = Registry("growth rule", register_with="keras_dst.register_growth")


def register_growth(name: str, *, needs_gradient: bool = False, needs_momentum: bool = False,
                    params: Optional[Mapping[str, Any]] = None, overwrite: bool = False
                    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering a growth score function fn(inputs, **params).

    Args:
      name: registry name (lookup ignores case, "_" and "-").
      needs_gradient: whether the function reads `inputs.gradient` (None otherwise).
      needs_momentum: whether it reads `inputs.momentum` (None otherwise).
      params: default keyword parameters (values a JSON config holds:
        `criteria.merge_params`); these and the function's keyword arguments are
        accepted later.
      overwrite: replace an existing registration of `name`.

    Returns:
      A decorator that registers the function and returns it unchanged.

    Raises:
      TypeError: `name` is not a str, `overwrite` not a bool, or the decorated
        object is not callable.
      ValueError: `name` is empty or taken (and `overwrite` is False), or `params`
        names a parameter the function does not take or leaves one without a
        default; nothing is registered.
    """
    return _GROWTH.decorator(name, overwrite, lambda fn: GrowthRule(
        name=name, score=fn, needs_gradient=needs_gradient, needs_momentum=needs_momentum,
        params={} if params is None else params))


def get_growth(growth: Any, **params: Any) -> GrowthRule:
    """Resolves a growth rule and merges parameters.

    Args:
      growth: a registered name, a `GrowthRule`, its config (a dict from
        `GrowthRule.get_config`), or a plain callable fn(inputs, **params), which
        becomes `GrowthRule(name=fn.__name__, score=fn, needs_gradient=True)`.
      **params: parameter values.

    Returns:
      A `GrowthRule`.

    Raises:
      ValueError: unknown name (lists the known ones) or unknown parameter.
      TypeError: `growth` is none of the above.
    """
    if isinstance(growth, str):
        return _GROWTH.get(growth).with_params(**params)
    if isinstance(growth, GrowthRule):
        return growth.with_params(**params)
    if isinstance(growth, Mapping):
        return GrowthRule.from_config(growth).with_params(**params)
    if callable(growth):
        name = getattr(growth, "__name__", type(growth).__name__)
        return GrowthRule(name=name, score=growth, needs_gradient=True,
                          params=merge_params("growth", name, {}, params, fn=growth))
    raise TypeError(f"Cannot interpret {growth!r} as a growth rule; "
                     f"use a name ({', '.join(growth_names())}), a GrowthRule, its config or a callable.")


def growth_names() -> Tuple[str, ...]:
    """Names of all registered growth rules, sorted."""
    return _GROWTH.names()


def check_serializable(rule: GrowthRule, argument_name: str) -> GrowthRule:
    """Returns `rule` if `get_config` / `from_config` rebuild it exactly.

    That holds for a registered rule (any params); not for one made from a
    plain callable, whose function a config cannot hold.

    Args:
      rule: a `GrowthRule`.
      argument_name: the argument it was passed as (e.g. "grow"), named in the
        message.

    Raises:
      ValueError: naming the argument and saying to register the function
        with `keras_dst.register_growth`.
    """
    check_registered(rule, _GROWTH, argument_name, fields=("name", "score", "needs_gradient", "needs_momentum"),
                     register_function="register_growth")
    return rule


register_growth("random")(random_scores)


@register_growth("gradient", needs_gradient=True)
def gradient(inputs: ScoreInputs) -> tf.Tensor:
    """abs(g): RigL's gradient growth."""
    return absolute(inputs.gradient)


@register_growth("momentum", needs_momentum=True)
def momentum(inputs: ScoreInputs) -> tf.Tensor:
    """abs(momentum): Dettmers' sparse-momentum growth.

    Raises:
      ValueError: `inputs.momentum` is None (the optimizer has no momentum).
    """
    require_inputs(inputs, "growth", "momentum", momentum=True)
    return absolute(inputs.momentum)
