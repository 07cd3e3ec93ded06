"""The one registry type behind every `register_*` function (floor 1: imports only `validation`).

Used for criteria, growth rules, density distributions, prune-rate schedules
(keyed by name) and prunable layer classes (keyed by class). One behaviour
everywhere:

* registering a key that is already taken raises a ValueError unless
  ``overwrite=True``, which replaces the earlier item;
* string keys are matched forgivingly: case, "_" and "-" are ignored both when
  registering and when looking up (``"ReciprocalSensitivity"`` finds
  ``"reciprocal_sensitivity"``, and the two cannot both be registered);
* an unknown key raises a ValueError naming the kind, the key and the known
  names.
"""

from typing import Any, Callable, Hashable, Optional, Tuple

from keras_dst.validation import check_bool, errors_named, normalize_name


def check_callable(item, register_function: str, name) -> None:
    """Raises a TypeError unless `item` (what a register decorator decorates) is callable."""
    if not callable(item):
        raise TypeError(f"{register_function}({name!r}) decorates a function, got {item!r}.")


def pop_config_name(config: dict, kind: str) -> str:
    """Removes and returns the registry name of `config` (a dict from an item's
    ``get_config``), or raises a ValueError naming the kind and the keys it got."""
    if "name" not in config:
        raise ValueError(f"A {kind} config needs a 'name' key; got the keys {sorted(config)}.")
    return config.pop("name")


def _label(key: Hashable) -> str:
    """How a key is shown in messages and `names()`: a string as registered, a class by its name."""
    if isinstance(key, str):
        return key
    return getattr(key, "__qualname__", None) or repr(key)


class Registry:
    """Key -> item, with forgiving string lookup, explicit overwrites and helpful errors.

    Args:
      kind: what is stored, used in messages ("criterion", "distribution", ...).
      by_name: keys are names (str); else classes or other hashables.
      register_with: the public function that registers items, which the message of
        an unknown key names (a config saved where a user's item was registered is
        loaded where it may not be yet).
    """

    def __init__(self, kind: str, by_name: bool = True, register_with: Optional[str] = None):
        self.kind = kind
        self.by_name = by_name  # keys are names (str); else classes or other hashables
        self.register_with = register_with
        self._items = {}  # normalised key -> (key as registered, item)

    def check_available(self, key: Hashable, overwrite: bool = False) -> None:
        """Raises the error `register` would raise for `key` (lets a decorator factory fail early).

        Raises:
          ValueError: `key` is taken and `overwrite` is False (names the kind
            and the key), or `key` is a string that is empty once normalised.
          TypeError: a registry of names is given a key that is not a str, or
            `overwrite` is not a bool.
        """
        with errors_named(f"{self.kind} {_label(key)!r}"):
            check_bool(overwrite, "overwrite")
        if self.by_name and not isinstance(key, str):
            raise TypeError(f"{self.kind} name must be a non-empty str, got {key!r}.")
        lookup = normalize_name(key)
        if isinstance(key, str) and not lookup:
            raise ValueError(f"{self.kind} name must be a non-empty str (ignoring '_' and '-'), got {key!r}.")
        if lookup in self._items and not overwrite:
            taken = self._items[lookup][0]
            same = "" if taken == key else f" (as {_label(taken)!r})"
            raise ValueError(f"{self.kind} {_label(key)!r} is already registered{same}; "
                             f"pass overwrite=True to replace it.")

    def register(self, key: Hashable, item: Any, overwrite: bool = False) -> Any:
        """Stores `item` under `key` and returns it.

        Args:
          key: a non-empty string (matched ignoring case, "_" and "-") or any
            other hashable key (e.g. a class, matched by equality).
          item: the object to store.
          overwrite: replace an item already registered under `key` (or under
            a string that matches it).

        Raises:
          ValueError: see `check_available`.
        """
        self.check_available(key, overwrite)
        self._items[normalize_name(key)] = (key, item)
        return item

    def decorator(self, key: Hashable, overwrite: bool = False,
                  make: Optional[Callable[[Callable], Any]] = None) -> Callable:
        """What a ``register_*(key, ...)`` decorator factory returns: a decorator that
        registers ``make(fn)`` (default: `fn` itself) under `key` and returns `fn`
        unchanged. `key` is checked now (`check_available`), the decorated object when
        it comes (callable, or TypeError naming the registering function)."""
        self.check_available(key, overwrite)
        register_function = (self.register_with or "register").rpartition(".")[2]

        def register(fn):
            check_callable(fn, register_function, key)
            self.register(key, fn if make is None else make(fn), overwrite=overwrite)
            return fn

        return register

    def unregister(self, key: Hashable) -> Optional[Any]:
        """Removes `key` if registered (same matching as `get`); returns its item or None."""
        entry = self._items.pop(normalize_name(key), None)
        return None if entry is None else entry[1]

    def get(self, key: Hashable) -> Any:
        """The item registered under `key`.

        Raises:
          ValueError: unknown key; the message names the kind, the key and the
            known names.
        """
        entry = self._items.get(normalize_name(key))
        if entry is None:
            known = ", ".join(repr(name) for name in self.names()) or "none"
            raise ValueError(f"Unknown {self.kind} {_label(key)!r}; known: "
                             f"{known}{self.unknown_key_hint()}.")
        return entry[1]

    def unknown_key_hint(self) -> str:
        """What a message refusing an unknown key adds (`register_with`): a user's item is
        known in a process once the code registering it has run there."""
        if self.register_with is None:
            return ""
        return (f" (one registered with {self.register_with} is known in a process once the "
                "code registering it has run there)")

    def registered_key(self, key: Hashable) -> Hashable:
        """`key` as it was registered (``"Cosine"`` gives ``"cosine"``); ValueError as `get`."""
        self.get(key)
        return self._items[normalize_name(key)][0]

    def names(self) -> Tuple[str, ...]:
        """Registered keys as registered (classes by name), sorted."""
        return tuple(sorted(_label(key) for key, _ in self._items.values()))

    def __contains__(self, key: Hashable) -> bool:
        return normalize_name(key) in self._items

    def __iter__(self):
        """Iterates over `names()`."""
        return iter(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, names={list(self.names())})"
