"""Registries of named, parameterised parts (merge methods, layer weightings), and value checks.

A part is a frozen dataclass whose fields are its parameters, registered under a name with
``Registry.register``. The registry finds every module of its package on first use (adding a
part is one module, nothing else to edit) and imports a dotted path ``package.module.Class``
on demand (a user's own part, outside LATA). ``build`` turns a name and a mapping of config
values into a checked instance; every error is a ``ConfigError`` naming the config key.

Imports nothing from LATA: the config schema, the engine and the report read the registries.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
import pkgutil
import typing
from typing import Any, Callable, Mapping


class ConfigError(ValueError):
    """A config value is out of range, of the wrong type, or not one of the allowed names."""


def one_of(key: str, value: Any, allowed: typing.Sequence[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of: {', '.join(allowed)}")


def in_range(key: str, value: float, low: float, high: float, *, low_open: bool = False,
             high_open: bool = False) -> None:
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ConfigError(f"{key}={value} is out of range; it must lie in {interval}")


def coerce(key: str, value: Any, hint: Any) -> Any:
    """``value`` as the field type ``hint`` (float, int, str, bool, Optional[...], list[float])."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        return coerce(key, value, next(a for a in args if a is not type(None)))
    if origin in (list, tuple, typing.Sequence):
        if isinstance(value, (str, bytes)) or not isinstance(value, typing.Iterable):
            raise ConfigError(f"{key}={value!r} must be a list")
        return [coerce(f"{key}[{i}]", v, args[0] if args else Any) for i, v in enumerate(value)]
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} must be a number")
        if not math.isfinite(value):
            raise ConfigError(f"{key}={value!r} must be a finite number")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{key}={value!r} must be an integer")
        return int(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be true or false")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r} must be a string")
        return value
    return value


class Registry:
    """Named parts of one kind, e.g. ``Registry("merge", "method", "lata.methods")``.

    ``group`` is the config group (the key prefix of messages: ``merge.density``), ``selector``
    the key that names the part (``merge.method``), ``package`` where the built-in parts live.
    """

    def __init__(self, group: str, selector: str, package: str):
        self.group, self.selector, self.package = group, selector, package
        self._parts: dict[str, type] = {}
        self._found = False

    def register(self, name: str) -> Callable[[type], type]:
        """Class decorator: register a dataclass under ``name`` (also set as its ``name``)."""
        def decorate(cls: type) -> type:
            if not dataclasses.is_dataclass(cls):
                raise TypeError(f"{cls.__name__}: a registered {self.group} part must be a dataclass")
            if name in self._parts and self._parts[name] is not cls:
                raise ValueError(f"{self.group} '{name}' is registered twice: {self._parts[name].__name__}, "
                                 f"{cls.__name__}")
            cls.name = name
            self._parts[name] = cls
            return cls
        return decorate

    def _discover(self) -> None:
        if self._found:
            return
        self._found = True
        package = importlib.import_module(self.package)
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{self.package}.{module.name}")

    def names(self) -> list[str]:
        """Every built-in (and already imported) part, sorted."""
        self._discover()
        return sorted(self._parts)

    def get(self, name: str) -> type:
        """The class registered as ``name``, or the class at dotted path ``name`` (imported)."""
        self._discover()
        if name in self._parts:
            return self._parts[name]
        if isinstance(name, str) and "." in name:
            module, _, attr = name.rpartition(".")
            try:
                cls = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as exc:
                raise ConfigError(f"{self.group}.{self.selector}={name!r} cannot be imported: {exc}") from None
            if not dataclasses.is_dataclass(cls):
                raise ConfigError(f"{self.group}.{self.selector}={name!r} is not a dataclass")
            return cls
        one_of(f"{self.group}.{self.selector}", name, self.names())
        raise AssertionError  # one_of raised

    def parameters(self, name: str) -> dict[str, Any]:
        """The part's parameters and their defaults (``MISSING`` for a required one)."""
        return {f.name: (f.default if f.default is not dataclasses.MISSING
                         else f.default_factory() if f.default_factory is not dataclasses.MISSING
                         else dataclasses.MISSING)
                for f in dataclasses.fields(self.get(name)) if f.init and not f.metadata.get("given")}

    def build(self, name: str, params: Mapping[str, Any]) -> Any:
        """A checked instance of part ``name`` from config values (unknown keys refused)."""
        cls = self.get(name)
        known = self.parameters(name)
        for key in params:
            if key not in known:
                close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.6)
                hint = (f"; did you mean {self.group}.{close[0]}?" if close
                        else f"; its keys: {', '.join(known)}" if known else "; it has no keys of its own")
                raise ConfigError(f"{self.group}.{key} is not a key of {self.group}={name}{hint}")
        missing = [k for k, v in known.items() if v is dataclasses.MISSING and k not in params]
        if missing:
            raise ConfigError(f"{self.group}={name} needs {self.group}.{missing[0]}")
        hints = typing.get_type_hints(cls)
        part = cls(**{k: coerce(f"{self.group}.{k}", v, hints.get(k, Any)) for k, v in params.items()})
        check = getattr(part, "check", None)
        if check is not None:
            check()
        return part


def plain(node: Any) -> Any:
    """A config node (an OmegaConf container or a Mapping) as plain dicts and lists, resolved;
    anything else unchanged."""
    from omegaconf import Container, OmegaConf

    if isinstance(node, Container):
        return OmegaConf.to_container(node, resolve=True)
    if isinstance(node, Mapping):
        return {k: plain(v) for k, v in node.items()}
    return node
