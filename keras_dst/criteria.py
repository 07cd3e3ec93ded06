"""Pruning criteria: a registry of score (or selection) functions of `ScoreInputs`.

A criterion turns the weight, dense gradient and mask of one tensor into a
float32 score of the same shape; HIGHER = more important = kept. Masking is the
selection routine's job (`topology.prune` never removes an inactive entry),
so the built-in formulas are those of the reference's pruning functions
(github alooow/fantastic_weights_paper, `sparselearning/pruners.py`:
`magnitude_prune`, `mest_pruning_fixed`, `snip_eps_pruning`, ...) without their
final `* mask`. The SET family does not fit "remove the lowest scores" and provides a
`select` function instead (returns the entries to remove).

Built-ins (`w` weight, `g` gradient):

| name                     | score / rule                           | update runs      | gradient |
|--------------------------|----------------------------------------|------------------|----------|
| magnitude                | abs(w)                                 | after_optimizer  | no       |
| set                      | correct two-sign rule (select)         | after_optimizer  | no       |
| set_legacy               | reference "magnitude and negativity"   | after_optimizer  | no       |
| random                   | stateless U[0, 1) from inputs.seed     | after_optimizer  | no       |
| running_magnitude        | EMA of abs(w)                          | after_optimizer  | no       |
| mest                     | abs(w) + gamma * abs(g) (1.0)          | before_optimizer | yes      |
| snip                     | abs(w * g) + offset (1e-5)             | before_optimizer | yes      |
| sensitivity              | abs(g) / (abs(w) + 1e-8) + 1           | before_optimizer | yes      |
| reciprocal_sensitivity   | abs(w)/(abs(g) + 1e-8) + offset (1.0)  | before_optimizer | yes      |
| taylor_fo                | (w * g) ** 2                           | before_optimizer | yes      |
| running_snip             | EMA of abs(w * g)                      | before_optimizer | yes      |

`ordering` says when the mask update runs: "after_optimizer" (it scores the
post-step weights; newly grown weights stay 0) or "before_optimizer" (the
optimizer step then moves newly grown weights one step from 0). It is the
reference's `opt_order` (`main.py` runs magnitude, Random, SET, SETFixed and
RunningMagnitude "before" and every other criterion "after";
`Masking.before_step` / `Masking.after_step` in `sparselearning/core.py`),
whose values name when the *optimizer step* happens: they are accepted as
aliases ("before" = "after_optimizer", "after" = "before_optimizer").

Names are matched case-insensitively, ignoring "_" and "-" (so the reference's
"ReciprocalSensitivity" and "MEST" work). One exception in meaning: the
reference's command-line ``SET`` runs its legacy rule
(``magnitude_and_negativity_prune``); here ``"SET"`` is the correct SET and the
reference's rule is ``"set_legacy"``.

`select_pruned` applies a criterion: scores (or the selection rule) per
tensor, optional score normalisation (`topology.normalize`, the reference's
`norm_score`), then the one selection routine of `topology`. Dependency order:
`scoring` <- `topology` <- `criteria` <- `growth` <- `engine` (`topology` is
pure: scores, masks and counts in, masks out; it knows no criterion).

A criterion made from a registered name round-trips through a config
(`Criterion.get_config` / `Criterion.from_config`); one made from a plain
callable does not, which `check_serializable` reports.

Adding a criterion takes a few lines::

    @register_criterion("weight_times_grad", ordering="before_optimizer", params={"power": 1.0})
    def weight_times_grad(inputs, power):
        return absolute(inputs.weight * inputs.gradient) ** power
"""

import contextlib
import dataclasses
import inspect
import re
import types
from typing import Any, Callable, Iterator, List, Mapping, Optional, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf

from keras_dst import patterns, topology, validation
from keras_dst.registry import Registry, pop_config_name
from keras_dst.scoring import ScoreInputs, absolute
from keras_dst.topology import select_highest, select_lowest
from keras_dst.validation import normalize_name

# When an update runs relative to the optimizer step. The reference's flag
# (``--ordering``, read in ``sparselearning/core.py``) names the same two places
# the other way round, by when the *optimizer step* happens: its "before" is
# "after_optimizer" here, its "after" is "before_optimizer". Both spellings are
# accepted; the canonical one is stored and reported.
ORDERINGS = ("after_optimizer", "before_optimizer")
ORDERING_ALIASES = {"before": "after_optimizer", "after": "before_optimizer"}


def canonical_ordering(value, name: str = "ordering", auto: bool = False) -> str:
    """`value` as one of `ORDERINGS` (the reference's "before"/"after" accepted; with
    `auto`, also "auto": each criterion's own, which a callback resolves)."""
    choices = (["auto"] if auto else []) + list(ORDERINGS)
    try:
        choice = validation.check_choice(value, choices + list(ORDERING_ALIASES), name)
    except ValueError:
        raise ValueError(f"{name} must be one of {choices} (or the reference's "
                         f"{sorted(ORDERING_ALIASES)}), got {name}={value!r}.") from None
    return ORDERING_ALIASES.get(choice, choice)


# ----------------------------------------------------------------------------
# Helpers shared with `growth`.


def _keyword_params(fn: Callable, leading: int = 1):
    """``(parameters, any_name)``: the keyword parameters (`inspect.Parameter`) `fn` takes
    after its `leading` positional arguments (the inputs; the inputs and the count for a
    selection function), and whether it takes ``**kwargs`` too; None where it has no
    signature to read (a builtin)."""
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    keywords = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return ([p for p in parameters[leading:] if p.kind in keywords],
            any(p.kind is p.VAR_KEYWORD for p in parameters))


def merge_params(kind: str, name: str, defaults: Mapping[str, Any], params: Mapping[str, Any],
                 fn: Optional[Callable] = None, leading: int = 1) -> types.MappingProxyType:
    """`defaults` updated with `params`, refusing unknown parameter names.

    A name is known if it is in `defaults` or, when `fn` is given, if `fn`
    accepts it as a keyword after its `leading` positional arguments (the inputs;
    the inputs and the count for a selection function). A number (in `defaults`,
    or given for a number's parameter in `defaults`) must be finite; a value given
    for a bool's parameter in `defaults` a bool (`fn`'s own defaults declare no type:
    ``clip=False`` may take a number).
    Every value must be one a JSON config holds (`_plain`).

    Raises:
      ValueError: naming the unknown parameter and the accepted ones, or a
        number that is not finite.
      TypeError: a number's or a bool's parameter given something else, or a value
        a config cannot hold (an array, a tensor, a function).
    """
    accepted = set(defaults)
    if fn is not None:
        by_fn = _keyword_params(fn, leading)
        accepted = None if by_fn is None or by_fn[1] else accepted | {p.name for p in by_fn[0]}
    checked = {}
    with validation.errors_named(f"{kind} {name!r}"):
        for param, value in defaults.items():
            value = _plain(value, param)
            if validation.is_real(value):  # a finite number
                checked_value = validation.check_real(value, param)
                value = checked_value if isinstance(value, float) else value
            checked[param] = value
        for param, value in params.items():
            value = _plain(value, param)
            if accepted is not None and param not in accepted:
                raise ValueError(f"Unknown parameter {param!r} for {kind} {name!r}; "
                                 f"accepted: {sorted(accepted) or 'none'}.")
            default = defaults.get(param)
            if isinstance(default, (bool, np.bool_)):  # a flag's parameter stays a bool
                value = validation.check_bool(value, param)
            elif validation.is_real(default):  # a number's parameter stays a finite number
                checked_value = validation.check_real(value, param)
                value = checked_value if isinstance(default, float) else value
            checked[param] = value
    return types.MappingProxyType(checked)


def _plain(value, param: str):
    """`value` as a parameter value a JSON config holds and gives back equal: None, a bool,
    number or str (a NumPy scalar as the Python one it holds), or a tuple (a list as a
    tuple: JSON writes both as a list) or str-keyed dict of such values.

    Raises:
      TypeError: naming `param`, for anything else (an array, a tensor, a function...):
        a config could not restore it, and a later fit could not compare it.
    """
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v, param) for v in value)
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return {k: _plain(v, param) for k, v in value.items()}
    raise TypeError(f"parameter {param!r} must be a number, bool, str, None, or a list, tuple "
                    f"or str-keyed dict of them (a config holds it as JSON), got "
                    f"{type(value).__name__} {value!r}.")


def check_entry(entry, kind: str, fn: Optional[Callable], flags: Sequence[str],
                leading: int = 1) -> None:
    """The registration checks of a `Criterion` or `GrowthRule` (run when one is made);
    its bool `flags` are stored as Python bools (configs stay JSON).

    Args:
      entry: the `Criterion` or `GrowthRule` (its `name`, `params` and `flags` are read).
      kind: "Criterion" or "Growth rule", for the messages.
      fn: its score (or selection) function.
      flags: the names of its bool fields (``needs_gradient``, ...).
      leading: the positional arguments `fn` takes before its parameters (1: the
        inputs; 2 for a selection function: the inputs and the count).

    Raises:
      TypeError: `params` is not a mapping, or a flag is not a bool.
      ValueError: a parameter of `fn` has no default and `params` gives none (it would
        fail at the first training step), or `params` names one `fn` does not take.
    """
    name, params = entry.name, entry.params
    if not isinstance(params, Mapping):
        raise TypeError(f"{kind} {name!r}: params must be a dict of default keyword parameters, "
                        f"got params={params!r}.")
    with validation.errors_named(f"{kind} {name!r}"):
        for flag in flags:
            object.__setattr__(entry, flag, validation.check_bool(getattr(entry, flag), flag))
    by_fn = _keyword_params(fn, leading)
    if by_fn is None:
        return
    keywords, any_name = by_fn
    unknown = [] if any_name else sorted(set(params) - {p.name for p in keywords})
    if unknown:
        raise ValueError(f"{kind} {name!r}: params {unknown} are not keyword parameters of its "
                         f"function (it takes {sorted(p.name for p in keywords) or 'none'} "
                         f"after its {'inputs and count' if leading == 2 else 'inputs'}).")
    missing = [p.name for p in keywords if p.default is p.empty and p.name not in params]
    if missing:
        raise ValueError(f"{kind} {name!r}: its function's parameter(s) {missing} have no default "
                         "and params= gives none; give them defaults or add them to params=.")


def config_params(config: dict, kind: str, name: str) -> Mapping[str, Any]:
    """Removes and returns the ``params`` of a criterion's or growth rule's config (a
    mapping; ``{}`` when absent)."""
    params = config.pop("params", {})
    if not isinstance(params, Mapping):
        raise TypeError(f"The config of {kind} {name!r}: params must be a dict, got "
                        f"params={params!r}.")
    return params


@contextlib.contextmanager
def calling(kind: str, name: str, inputs: Optional[ScoreInputs] = None,
            declared: Sequence[str] = ("gradient",)) -> Iterator[None]:
    """Re-raises an error of the criterion's or growth rule's own function (traced into the
    training step: a `.numpy()` call on a symbolic tensor, say) with its name first, same
    type (errors that cannot be made from a message pass as they are); an error of a None
    operand where a field of `inputs` that a registration declares (``needs_<field>``,
    `declared`) is None says why."""
    try:
        yield
    except Exception as e:
        missing = [f"inputs.{field} is None: it is registered without needs_{field}=True"
                   for field in declared if inputs is not None and getattr(inputs, field) is None
                   and "None" in str(e)]  # (an error of a None operand)
        try:
            named = type(e)(f"{kind} {name!r} (its function is traced into the training step: "
                            f"TensorFlow ops only, no .numpy(){''.join('; ' + m for m in missing)}): "
                            f"{e}")
        except Exception:
            raise e from None
        raise named from e


def scores_of(scores, inputs: ScoreInputs, kind: str, name: str) -> tf.Tensor:
    """A score function's result as float32, refused unless it has the weight's (static)
    shape and a numeric dtype."""
    try:
        scores = tf.convert_to_tensor(scores)
    except (TypeError, ValueError) as e:  # (None: a function without its `return`)
        raise TypeError(f"{kind} {name!r} returned {scores!r}, not a tensor of scores: "
                        f"{e}") from None
    if not (scores.dtype.is_floating or scores.dtype.is_integer or scores.dtype.is_bool):
        raise TypeError(f"{kind} {name!r} returned scores of dtype {scores.dtype.name}; a score "
                        "function returns real numbers (cast to float32).")
    scores = of_shape(scores, inputs.weight.shape, f"{kind} {name!r} returned scores",
                      "a score function returns one score per entry")
    return tf.cast(scores, tf.float32)


def of_shape(tensor: tf.Tensor, shape, what: str, rule: str) -> tf.Tensor:
    """`tensor` with the static shape `shape`: a ValueError (`what` ... `rule`) where its
    static shape is another; where it is partly unknown (a tf.numpy_function's result, a
    `TensorArray` stacked in a loop), checked when it runs (`tf.ensure_shape`, whose error
    names the op ``shape_of_<what>``), so that a transposed or wrong-sized result never
    passes, flattened, as the weight's."""
    if not tensor.shape.is_compatible_with(shape):
        raise ValueError(f"{what} of shape {tensor.shape} for a weight of shape {shape}; {rule}.")
    if tensor.shape.is_fully_defined():
        return tensor
    return tf.ensure_shape(tensor, shape, name="shape_of_" + re.sub(r"[^A-Za-z0-9_]+", "_", what))


def require_inputs(inputs: ScoreInputs, kind: str, name: str, gradient: bool = False, momentum: bool = False):
    """Raises ValueError if a needed field of `inputs` is None."""
    if gradient and inputs.gradient is None:
        raise ValueError(f"{kind} {name!r} needs the gradient but inputs.gradient is None.")
    if momentum and inputs.momentum is None:
        raise ValueError(f"{kind} {name!r} needs optimizer momentum but inputs.momentum is None: "
                         f"the optimizer has no momentum (use SGD with momentum > 0, or Adam).")


def check_registered(item, registry: Registry, argument_name: str, *, fields: Sequence[str],
                     register_function: str):
    """Raises ValueError unless `item` can be rebuilt from its registry name (config round trip).

    The one rule behind `criteria.check_serializable` and
    `growth.check_serializable`: `item.name` must be registered, exactly as
    spelled, and the registered item must agree with `item` on `fields` (the
    functions and flags a config does not carry). That fails for an item made
    from a plain callable, which a config cannot hold.

    Args:
      item: a `Criterion` or `GrowthRule`.
      registry: the registry its name is looked up in.
      argument_name: the argument `item` was passed as, named in the message.
      fields: attribute names that must equal the registered item's.
      register_function: the `keras_dst` function that registers such items.

    Raises:
      ValueError: naming the argument and telling to register the function.
    """
    hint = (f"Register the function with keras_dst.{register_function}(...) under a name "
            f"of its own and pass that name as {argument_name}.")
    if item.name not in registry.names():
        if item.name in registry:  # (its registration was replaced under another spelling)
            now = next(name for name in registry.names()
                       if normalize_name(name) == normalize_name(item.name))
            raise ValueError(f"{argument_name}={item.name!r} cannot be saved in a config: its "
                             f"registration was replaced by the {registry.kind} registered as "
                             f"{now!r}, which a config would restore instead; make it again "
                             "from the registry.")
        raise ValueError(f"{argument_name}={item.name!r} cannot be saved in a config: no {registry.kind} "
                         f"is registered under that name (was it made from a plain callable?). {hint}")
    registered = registry.get(item.name)
    differing = [field for field in fields if getattr(item, field) != getattr(registered, field)]
    if differing:
        raise ValueError(f"{argument_name}={item.name!r} cannot be saved in a config: its "
                         f"{', '.join(differing)} differ(s) from the {registry.kind} registered as "
                         f"{item.name!r}, which a config would restore instead. {hint}")


# ----------------------------------------------------------------------------
# Criterion objects.


class FrozenEntry:
    """Copying and pickling of a frozen registry entry (`Criterion`, `GrowthRule`).

    An entry is an immutable value, so `copy.copy` and `copy.deepcopy` return it
    (a callback that holds one, deep-copied per trial by a tuner, shares it); it
    pickles by its fields, with `params` as a plain dict (its read-only view does not
    pickle), and its functions by reference, as pickle does.
    """

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        fields = [getattr(self, f.name) for f in dataclasses.fields(self)]
        return type(self), tuple(dict(v) if isinstance(v, types.MappingProxyType) else v
                                 for v in fields)


@keras.saving.register_keras_serializable(package="keras_dst")
@dataclasses.dataclass(frozen=True)
class Criterion(FrozenEntry):
    """A pruning criterion.

    Attributes:
      name: registry name.
      score: fn(inputs: ScoreInputs, **params) -> float32 tensor of the weight's
        shape, higher = more important (kept). None for selection criteria.
      ordering: "after_optimizer" (prune after the optimizer step) or "before_optimizer" (prune
        before it); see the module docstring.
      needs_gradient: whether `inputs.gradient` is used.
      params: read-only mapping of keyword parameters passed to `score` /
        `select` (defaults merged with user values).
      select: optional fn(inputs, count, **params) -> bool tensor, True at the
        entries to remove; replaces score-based selection (the SET family).
        `inputs` holds 1-D tensors (a layer's weight flattened; in global scope all
        the layers', concatenated), `count` is the scalar int32 `r`; only active
        entries may be returned.
      ema: running criterion: the engine keeps S <- beta*S + (1-beta)*score
        (`ema_update`, `params["beta"]`) and prunes on S instead of the score
        (a score criterion only).
    """

    name: str
    score: Optional[Callable[..., tf.Tensor]]
    ordering: str
    needs_gradient: bool = True
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)
    select: Optional[Callable[..., tf.Tensor]] = None
    ema: bool = False

    def __post_init__(self):
        with validation.errors_named(f"Criterion {self.name!r}"):
            object.__setattr__(self, "ordering", canonical_ordering(self.ordering))
        if (self.score is None) == (self.select is None):
            raise ValueError(f"Criterion {self.name!r} needs exactly one of `score` and `select`.")
        if self.select is not None and isinstance(self.ema, (bool, np.bool_)) and self.ema:
            raise ValueError(f"Criterion {self.name!r}: a running criterion (ema=True) averages "
                             "per-entry scores, which a selection rule (select=) does not have; "
                             "give it a score function instead.")
        check_entry(self, "Criterion", self.score or self.select, ("needs_gradient", "ema"),
                    leading=1 if self.select is None else 2)
        object.__setattr__(self, "params", merge_params("criterion", self.name, self.params, {}))
        if self.ema and "beta" not in self.params:
            raise ValueError(f"Criterion {self.name!r} is a running criterion (ema=True): give it "
                             "the running average's weight as a 'beta' param (e.g. "
                             "params={'beta': 0.9}).")
        if self.ema and not validation.is_real(self.params["beta"]):
            raise TypeError(f"Criterion {self.name!r}: the running average's beta must be a "
                            f"number in [0, 1], got beta={self.params['beta']!r}.")
        if self.ema and not 0.0 <= self.params["beta"] <= 1.0:
            raise ValueError(f"Criterion {self.name!r}: the running average's beta must be in "
                             f"[0, 1], got beta={self.params['beta']!r}.")

    def with_params(self, **params: Any) -> "Criterion":
        """A copy with `params` merged into the current ones.

        Accepted names: the current params, plus the keyword arguments of
        `score` after its inputs (of `select` after its inputs and count).

        Raises:
          ValueError: naming an unknown parameter.
        """
        merged = merge_params("criterion", self.name, self.params, params, fn=self.score or self.select,
                              leading=1 if self.select is None else 2)
        return dataclasses.replace(self, params=merged)

    def evaluate(self, inputs: ScoreInputs) -> tf.Tensor:
        """`score(inputs, **params)`, float32 of the weight's shape.

        Raises:
          ValueError: selection criterion (no score), or gradient needed but None.
        """
        if self.score is None:
            raise ValueError(f"Criterion {self.name!r} selects by rule and has no per-entry score.")
        require_inputs(inputs, "criterion", self.name, gradient=self.needs_gradient)
        with calling("Criterion", self.name, inputs):
            scores = self.score(inputs, **self.params)
        return scores_of(scores, inputs, "Criterion", self.name)

    def removed(self, inputs: ScoreInputs, count: "tf.Tensor | int") -> tf.Tensor:
        """`select(inputs, count, **params)`: bool of the weight's shape, True at the active
        entries the rule removes (a selection criterion).

        Raises:
          TypeError / ValueError: the rule returned another dtype / shape (named).
        """
        with calling("Criterion", self.name):
            removed = tf.convert_to_tensor(self.select(inputs, count, **self.params))
        if removed.dtype != tf.bool:
            raise TypeError(f"Criterion {self.name!r} selected with dtype {removed.dtype.name}; a "
                            "selection function returns a bool tensor (True: remove).")
        removed = of_shape(removed, inputs.mask.shape, f"Criterion {self.name!r} selected a tensor",
                           "a selection function returns one bool per entry")
        return removed

    def get_config(self) -> dict:
        """A plain dict from which `from_config` rebuilds an equal criterion.

        Holds the registry name, the merged params, and `ordering` /
        `needs_gradient` only where they differ from the registered criterion's
        (overrides of `get_criterion`).

        Raises:
          ValueError: the criterion cannot be rebuilt from its name (see
            `check_serializable`).
        """
        check_serializable(self, "criterion")
        registered = _CRITERIA.get(self.name)
        config = {"name": self.name, "params": dict(self.params)}
        for field in ("ordering", "needs_gradient"):
            if getattr(self, field) != getattr(registered, field):
                config[field] = getattr(self, field)
        return config

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "Criterion":
        """The criterion of `get_config`, rebuilt with `get_criterion`.

        Raises:
          ValueError: unknown name, parameter or config key.
        """
        config = dict(config)
        name = pop_config_name(config, "criterion")
        params = config_params(config, "criterion", name)
        overrides = {k: config.pop(k) for k in ("ordering", "needs_gradient") if k in config}
        if config:
            raise ValueError(f"Unknown key(s) {sorted(config)} in the config of criterion {name!r}.")
        return get_criterion(name, **overrides, **params)


_CRITERIA = Registry("criterion", register_with="keras_dst.register_criterion")


def register_criterion(name: str, *, ordering: str, needs_gradient: bool = True,
                       params: Optional[Mapping[str, Any]] = None, select: bool = False,
                       ema: bool = False, overwrite: bool = False
                       ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering a score function (or, with `select=True`, a selection function).

    Args:
      name: registry name (lookup ignores case, "_" and "-").
      ordering: "after_optimizer" or "before_optimizer" (or the reference's
        "before"/"after"; see `Criterion`).
      needs_gradient: whether the function reads `inputs.gradient` (None otherwise).
      params: default keyword parameters (values a JSON config holds: `merge_params`);
        these and the function's keyword arguments are accepted later.
      select: the decorated function is fn(inputs, count, **params) -> bool
        "remove these" instead of a score (on 1-D inputs: see `Criterion.select`).
      ema: running criterion (see `Criterion.ema`); give it a "beta" param.
      overwrite: replace an existing registration of `name`.

    Returns:
      A decorator that registers the function and returns it unchanged.

    Raises:
      TypeError: `name` is not a str, `select` or `overwrite` not a bool, or the
        decorated object is not callable.
      ValueError: `name` is empty or taken (and `overwrite` is False), `ordering`
        is unknown, or `params` names a parameter the function does not take or
        leaves one without a default; nothing is registered.
    """
    register = _CRITERIA.decorator(name, overwrite, lambda fn: Criterion(  # (name checked now)
        name=name, score=None if select else fn, ordering=ordering, needs_gradient=needs_gradient,
        params={} if params is None else params, select=fn if select else None, ema=ema))
    with validation.errors_named(f"register_criterion({name!r})"):
        select = validation.check_bool(select, "select")  # (the lambda reads it when called)
    return register


def get_criterion(criterion: Any, *, ordering: Optional[str] = None, needs_gradient: Optional[bool] = None,
                  **params: Any) -> Criterion:
    """Resolves a criterion and merges parameters.

    Args:
      criterion: a registered name, a `Criterion`, its config (a dict from
        `Criterion.get_config`), or a plain score callable fn(inputs, **params).
        A callable becomes `Criterion(name=fn.__name__, score=fn,
        ordering="before_optimizer", needs_gradient=True)` (before the optimizer
        step because a callable may read the gradient, which is the pre-step
        gradient in either ordering); its accepted params are the keyword
        arguments of its signature.
      ordering: override the ordering ("after_optimizer"/"before_optimizer", or
        the reference's "before"/"after"), e.g. "before_optimizer" for
        everything as in the reference's ImageNet runs.
      needs_gradient: override `needs_gradient` (mostly for callables).
      **params: parameter values, e.g. `gamma=0.1` for "mest".

    Returns:
      A `Criterion`.

    Raises:
      ValueError: unknown name (lists the known ones), unknown parameter
        (names it), bad ordering.
      TypeError: `criterion` is none of the above.
    """
    if isinstance(criterion, str):
        result = _CRITERIA.get(criterion).with_params(**params)
    elif isinstance(criterion, Criterion):
        result = criterion.with_params(**params)
    elif isinstance(criterion, Mapping):
        result = Criterion.from_config(criterion).with_params(**params)
    elif callable(criterion):
        name = getattr(criterion, "__name__", type(criterion).__name__)
        result = Criterion(name=name, score=criterion, ordering="before_optimizer",
                           params=merge_params("criterion", name, {}, params, fn=criterion))
    else:
        raise TypeError(f"Cannot interpret {criterion!r} as a criterion; "
                         f"use a name ({', '.join(criterion_names())}), a Criterion, its config or a callable.")
    overrides = {k: v for k, v in (("ordering", ordering), ("needs_gradient", needs_gradient)) if v is not None}
    return dataclasses.replace(result, **overrides) if overrides else result


def criterion_names() -> Tuple[str, ...]:
    """Names of all registered criteria, sorted."""
    return _CRITERIA.names()


def check_serializable(criterion: Criterion, argument_name: str) -> Criterion:
    """Returns `criterion` if `get_config` / `from_config` rebuild it exactly.

    That holds for a registered criterion (any params, ordering or
    needs_gradient); not for one made from a plain callable, whose function a
    config cannot hold.

    Args:
      criterion: a `Criterion`.
      argument_name: the argument it was passed as (e.g. "prune"), named in
        the message.

    Raises:
      ValueError: naming the argument and saying to register the function
        with `keras_dst.register_criterion`.
    """
    check_registered(criterion, _CRITERIA, argument_name, fields=("name", "score", "select", "ema"),
                     register_function="register_criterion")
    return criterion


def _concat_inputs(inputs_list: Sequence[ScoreInputs]) -> ScoreInputs:
    """One 1-D ScoreInputs from several; seed of the first, momentum None if any is."""
    momenta = [i.momentum for i in inputs_list]
    has_gradient = all(i.gradient is not None for i in inputs_list)
    return ScoreInputs(
        weight=topology.concat_flat([i.weight for i in inputs_list]),
        gradient=topology.concat_flat([i.gradient for i in inputs_list]) if has_gradient else None,
        mask=topology.concat_flat([i.mask for i in inputs_list]),
        seed=inputs_list[0].seed,
        momentum=None if any(m is None for m in momenta) else topology.concat_flat(momenta),
    )


def unit_scores(criterion: Criterion, inputs_list: Sequence[ScoreInputs], scores_list=None,
                normalize: str = "none", norm_type: str = "sum",
                patterns_list: Optional[Sequence[patterns.Pattern]] = None,
                layouts_list: Optional[Sequence["topology.ScoreLayout"]] = None):
    """A score criterion's pruning scores and masks in selection units, and the way back.

    Units are entries, or whole blocks for a tensor with a 1xB pattern (scores
    summed per block, `patterns.block_scores`).

    Args:
      criterion, inputs_list, scores_list, normalize, norm_type, patterns_list,
        layouts_list: as `select_pruned`.

    Returns:
      ``(scores, masks, expand)``: per tensor, the (normalised) scores and the masks
      in units, and a function mapping a list of unit masks back to entry masks.
    """
    if scores_list is None:
        scores_list = [criterion.evaluate(i) for i in inputs_list]
    layouts_list = layouts_list or [None] * len(inputs_list)
    scores_list = [topology.normalize(s, i.mask, normalize, norm_type, layout)
                   for s, i, layout in zip(scores_list, inputs_list, layouts_list)]
    masks = [i.mask for i in inputs_list]
    patterns_list = patterns_list or [patterns.UNSTRUCTURED] * len(masks)
    blocked = [p.kind == "block" for p in patterns_list]

    def expand(kept):
        return [patterns.expand_blocks(p, k, m.shape) if b else k
                for p, b, k, m in zip(patterns_list, blocked, kept, masks)]

    return ([patterns.block_scores(p, x) if b else x
             for p, b, x in zip(patterns_list, blocked, scores_list)],
            [patterns.block_mask(p, m) if b else m for p, b, m in zip(patterns_list, blocked, masks)],
            expand)


def check_normalize(criterion: Criterion, normalize: str):
    """Refuses score normalisation for a criterion that selects by rule (it has no scores)."""
    if criterion.select is not None and normalize != "none":
        raise ValueError(f"Criterion {criterion.name!r} selects by sign rule and refuses "
                         f"normalize={normalize!r}; use normalize='none'.")


def _check_select(criterion, normalize, patterns_list):
    if patterns_list is not None and any(p.kind == "block" for p in patterns_list):
        raise ValueError(f"Criterion {criterion.name!r} selects entries by a sign rule and cannot "
                         "prune whole 1xB blocks; use a score criterion (e.g. 'magnitude').")
    check_normalize(criterion, normalize)


def select_pruned(criterion: Criterion, inputs_list: Sequence[ScoreInputs], count, *, scores_list=None,
                  normalize: str = "none", norm_type: str = "sum",
                  patterns_list: Optional[Sequence[patterns.Pattern]] = None,
                  layouts_list: Optional[Sequence["topology.ScoreLayout"]] = None) -> List[tf.Tensor]:
    """Prunes `count` active entries across the tensors of `inputs_list` with a criterion.

    Layer scope is a one-element list; global scope passes every layer (one
    selection over all of them, same rule and tie-break as `topology.prune`).

    * Score criteria: scores are computed per tensor with the tensor's own
      ScoreInputs (so per-tensor seeds are used), optionally normalised per
      tensor (`topology.normalize`), concatenated and pruned with
      `topology.global_prune`.
    * Selection criteria (`criterion.select`, the SET family): the inputs are
      concatenated into one 1-D ScoreInputs (seed of the first tensor,
      momentum None unless every tensor has one) and `select` decides; only
      active entries are ever removed. Normalisation is refused.

    Args:
      criterion: a `Criterion` (anything with `name`, `score`, `select` and
        `params` attributes).
      inputs_list: one ScoreInputs per tensor.
      count: scalar int tensor or int, total number of entries to remove
        (e.g. `topology.prune_count(total_active, rate)`).
      scores_list: optional precomputed scores per tensor used instead of
        `criterion.score` (e.g. the EMA state of a running criterion).
      normalize: one of `topology.NORMALIZE_MODES`.
      norm_type: one of `topology.NORM_TYPES` ("sum", the reference's default, or "max").
      layouts_list: one `topology.ScoreLayout` per tensor (`layers.score_layout`: how
        `normalize` groups it), or None (each by its rank).
      patterns_list: one `patterns.Pattern` per tensor, or None (all
        unstructured). With 1xB blocks (every tensor of the list then has the
        same B), whole blocks are pruned: the (normalised) scores are summed per
        block (`patterns.block_scores`) and `count` counts blocks. Other
        patterns prune entries (their groups are refilled by the growth step).

    Returns:
      List of new bool masks, one per tensor (subsets of the old masks). The
      number removed is exactly `min(count, total active)` for score criteria
      (in blocks for 1xB); selection criteria define their own count.

    Raises:
      ValueError: a selection criterion with `normalize` other than "none" or
        with 1xB blocks; unknown `normalize` or `norm_type`.
    """
    if criterion.select is not None and scores_list is None:
        _check_select(criterion, normalize, patterns_list)
        joint = _concat_inputs(inputs_list)
        removed = criterion.removed(joint, tf.cast(count, tf.int32))
        return topology.split_like(joint.mask & ~removed, [i.mask for i in inputs_list])
    scores, masks, expand = unit_scores(criterion, inputs_list, scores_list, normalize, norm_type,
                                        patterns_list, layouts_list)
    return expand(topology.global_prune(scores, masks, count))


def select_pruned_each(criterion: Criterion, inputs_list: Sequence[ScoreInputs], counts, *,
                       scores_list=None, normalize: str = "none", norm_type: str = "sum",
                       patterns_list: Optional[Sequence[patterns.Pattern]] = None,
                       layouts_list: Optional[Sequence["topology.ScoreLayout"]] = None) -> List[tf.Tensor]:
    """`select_pruned` of every tensor on its own (layer scope), with one count each.

    The same masks as ``[select_pruned(criterion, [x], c, ...)[0] for x, c in
    ...]``; score criteria share one selection (`topology.prune_each`), so the
    compiled update holds one selection loop for all layers.

    Args:
      criterion, inputs_list, scores_list, normalize, norm_type, patterns_list,
        layouts_list: as `select_pruned` (each pattern applies to its own tensor).
      counts: one scalar int (tensor) per tensor.

    Returns:
      List of new bool masks, one per tensor.
    """
    if criterion.select is not None and scores_list is None:
        _check_select(criterion, normalize, patterns_list)
        return [select_pruned(criterion, [x], c)[0] for x, c in zip(inputs_list, counts)]
    scores, masks, expand = unit_scores(criterion, inputs_list, scores_list, normalize, norm_type,
                                        patterns_list, layouts_list)
    return expand(topology.prune_each(scores, masks, counts))


def ema_update(state: tf.Tensor, score: tf.Tensor, initialized, beta) -> tf.Tensor:
    """One step of a running criterion: S <- beta * S + (1 - beta) * score.

    Args:
      state: float32 EMA state S (any value when not initialised).
      score: float32 base score s_t of the same shape.
      initialized: scalar bool, False right after creation and after every
        mask update (the reference clears S after each update); then S = s_t.
      beta: scalar float, the criterion's "beta" param.

    Returns:
      The new state, same shape.
    """
    beta = tf.cast(beta, tf.float32)
    blended = beta * state + (1.0 - beta) * score
    return tf.where(tf.cast(initialized, tf.bool), blended, score)


# ----------------------------------------------------------------------------
# Built-in score functions.


@register_criterion("magnitude", ordering="after_optimizer", needs_gradient=False)
def magnitude(inputs: ScoreInputs) -> tf.Tensor:
    """abs(w)."""
    return absolute(inputs.weight)


def random_scores(inputs: ScoreInputs) -> tf.Tensor:
    """i.i.d. U[0, 1) from `inputs.seed` (stateless): the lowest k form a uniformly random subset."""
    return tf.random.stateless_uniform(inputs.weight.shape, seed=inputs.seed, dtype=tf.float32)


register_criterion("random", ordering="after_optimizer", needs_gradient=False)(random_scores)


@register_criterion("mest", ordering="before_optimizer", params={"gamma": 1.0})
def mest(inputs: ScoreInputs, gamma) -> tf.Tensor:
    """abs(w) + gamma * abs(g)."""
    return absolute(inputs.weight) + gamma * absolute(inputs.gradient)


@register_criterion("snip", ordering="before_optimizer", params={"offset": 1e-5})
def snip(inputs: ScoreInputs, offset=1e-5) -> tf.Tensor:
    """abs(w * g) + offset.

    The reference's layer-wise score (`snip_eps_pruning`) adds 1e-5, its global one
    (`SNIPGlobalPruner`) 1e-8: with score normalisation the offset enters each layer's
    statistic, so ``prune_params={"offset": 1e-8}`` reproduces its global scope."""
    return absolute(inputs.weight * inputs.gradient) + offset


@register_criterion("sensitivity", ordering="before_optimizer")
def sensitivity(inputs: ScoreInputs) -> tf.Tensor:
    """abs(g) / (abs(w) + 1e-8) + 1."""
    return absolute(inputs.gradient) / (absolute(inputs.weight) + 1e-8) + 1.0


@register_criterion("reciprocal_sensitivity", ordering="before_optimizer", params={"offset": 1.0})
def reciprocal_sensitivity(inputs: ScoreInputs, offset=1.0) -> tf.Tensor:
    """abs(w) / (abs(g) + 1e-8) + offset.

    The reference's layer-wise score (`reciprocal_sensitivity_fixed_pruning`) adds 1,
    its global one (`ReciprocalSensitivityGlobalPruner`) nothing: with score
    normalisation the offset enters each layer's statistic, so
    ``prune_params={"offset": 0.0}`` reproduces its global scope."""
    return absolute(inputs.weight) / (absolute(inputs.gradient) + 1e-8) + offset


@register_criterion("taylor_fo", ordering="before_optimizer")
def taylor_fo(inputs: ScoreInputs) -> tf.Tensor:
    """(w * g) ** 2, first-order Taylor estimate of the loss change."""
    return tf.square(inputs.weight * inputs.gradient)


# Running variants. Deviation: beta defaults to 0.9, not the reference's 1.0
# (`MagnitudeRunningPruner` / `SNIPRunningPruner` in `sparselearning/pruners.py`
# take beta from `--gamma`, default 1.0, and S <- 1.0 * S + 0.0 * s never moves
# from its first value). The score is the base score s_t; the engine averages
# it with `ema_update`.
@register_criterion("running_magnitude", ordering="after_optimizer", needs_gradient=False,
                    params={"beta": 0.9}, ema=True)
def running_magnitude(inputs: ScoreInputs, beta) -> tf.Tensor:
    """Base score abs(w) of the EMA (beta is used by `ema_update`)."""
    del beta
    return magnitude(inputs)


@register_criterion("running_snip", ordering="before_optimizer", params={"beta": 0.9}, ema=True)
def running_snip(inputs: ScoreInputs, beta) -> tf.Tensor:
    """Base score abs(w * g) of the EMA (no 1e-5 offset, as in the reference)."""
    del beta
    return absolute(inputs.weight * inputs.gradient)


# ----------------------------------------------------------------------------
# SET family (selection functions).


def _half(count) -> tf.Tensor:
    """h = ceil(r / 2) for r >= 0 (negative r counts as 0)."""
    count = tf.maximum(tf.cast(count, tf.int32), 0)
    return (count + 1) // 2


@register_criterion("set", ordering="after_optimizer", needs_gradient=False, select=True)
def set_select(inputs: ScoreInputs, count) -> tf.Tensor:
    """Correct SET: the h smallest positive and the h negative weights closest to zero.

    With h = ceil(r / 2), removes exactly `min(h, #non-negative) +
    min(h, #negative)` ACTIVE weights (2h = r + 1 when r is odd, as in the
    reference); a shortfall in one sign is NOT moved to the other.

    Differences from the reference's threshold rule (`SET_fixed` in
    `sparselearning/pruners.py`):
    * count-exact: ties are broken by lower flat index instead of removing
      every weight tied with the threshold;
    * h = 0 (r = 0) removes nothing (the reference's index clamp removes one
      weight of each sign);
    * active weights that are exactly 0 (either sign of zero) and NaN weights
      count with the positives and are removed first among them (zero is the
      smallest magnitude; NaN is least important); the reference removes
      every active zero on top of the 2h.

    Args:
      inputs: ScoreInputs (weight and mask are read).
      count: scalar int32, the removal budget r.

    Returns:
      bool tensor, True at the weights to remove.
    """
    w, m = inputs.weight, inputs.mask
    h = _half(count)
    negative = m & (w < 0.0)
    return select_lowest(w, m & ~negative, h) | select_highest(w, negative, h)


def _legacy_threshold(w: tf.Tensor, group: tf.Tensor, h: tf.Tensor) -> tf.Tensor:
    """The reference's threshold: ascending-sorted group at index min(h, n) - 1, Python-style.

    Index -1 (h = 0) wraps to the largest group member. Empty group: any value
    (no member is compared against it).
    """
    flat_w, flat_group = tf.reshape(w, [-1]), tf.reshape(group, [-1])
    size = topology.count_true(flat_group)
    index = tf.minimum(h, size) - 1
    index = tf.where(index < 0, size - 1, index)
    ascending = tf.sort(tf.where(flat_group, flat_w, float("inf")))
    return tf.gather(ascending, tf.maximum(index, 0))


@register_criterion("set_legacy", ordering="after_optimizer", needs_gradient=False, select=True)
def set_legacy_select(inputs: ScoreInputs, count) -> tf.Tensor:
    """The reference's layer-wise `SET` ("magnitude and negativity"), reproduced faithfully.

    Opt-in, for exact reproduction of the paper's SET runs: the reference's
    command-line ``--death SET`` runs `magnitude_and_negativity_prune`
    (`sparselearning/pruners.py`, chosen by `get_pruner` in `setup_utils.py`).
    With h = ceil(r/2), P = active weights > 0 and Q = active weights < 0:

    * positives: theta_P = ascending(P)[min(h, |P|) - 1]; keep w > theta_P, so
      the h smallest positives (and ties with theta_P) go. With h = 0 the
      index is -1 = the largest positive, so EVERY positive is removed;
    * negatives: theta_Q = ascending(Q)[min(h, |Q|) - 1] (most negative
      first); keep w < theta_Q, so only the h - 1 most negative weights are
      kept and every other negative weight is removed (with h = 0: the
      negative closest to zero and its ties go);
    * everything else active (exact zeros, NaN) is removed.

    On Gaussian weights this removes about #negatives + 1 weights at every
    update regardless of the rate. Where the reference crashes (a layer with
    no positive or no negative weight), the empty sign simply removes nothing
    and the other sign follows the rule above.

    Args:
      inputs: ScoreInputs (weight and mask are read).
      count: scalar int32, the removal budget r.

    Returns:
      bool tensor, True at the (active) weights to remove.
    """
    w, m = inputs.weight, inputs.mask
    h = _half(count)
    positive, negative = m & (w > 0.0), m & (w < 0.0)
    keep = (positive & (w > _legacy_threshold(w, positive, h))) | (negative & (w < _legacy_threshold(w, negative, h)))
    return m & ~keep
