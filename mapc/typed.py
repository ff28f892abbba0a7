"""Type-checking TOML and metadata values against dataclass field annotations.

Invariant: a value reaches a dataclass only if it has its field's declared
type. bool is never accepted for int or float (TOML ``true`` is not 1), an
int widens to float, floats must be finite, a scalar is accepted where a
tuple of that type is declared (``mean = 0.5`` for every channel), and the
error names the place (file and table), the key, the expected type and the
value found.
"""
from __future__ import annotations

import math
import types
import typing
from dataclasses import fields

from .errors import UserError


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None))
    if origin is list:
        return f"a list of {_describe(args[0])}s"
    if origin is tuple:
        return (f"{_describe(args[0])} or a list of them" if len(args) == 2 and args[1] is Ellipsis
                else f"{_describe(args[0])} or a list of {len(args)}")
    if origin is dict:
        return "a table of strings"
    return {bool: "a boolean (true or false)", int: "an integer", float: "a finite number",
            str: "a string"}.get(hint, getattr(hint, "__name__", str(hint)))


def typed_value(value, hint, where: str, key: str):
    """``value`` if it has the declared type ``hint`` (ints widen to float, a scalar to a tuple), else UserError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)

    def bad():
        return UserError(f"{where}: {key} must be {_describe(hint)}, got {value!r} ({type(value).__name__})")

    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in (a for a in args if a is not type(None)):
            try:
                return typed_value(value, a, where, key)
            except UserError:
                pass
        raise bad()
    if hint is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad()
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise bad()
        return value
    if origin is list:
        if not isinstance(value, list):
            raise bad()
        return [typed_value(v, args[0], where, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        items = value if isinstance(value, list) else [value]
        if not items or (args[-1] is not Ellipsis and len(items) not in (1, len(args))):
            raise bad()
        return tuple(typed_value(v, args[0], where, f"{key}[{i}]") for i, v in enumerate(items))
    if origin is dict:
        if not isinstance(value, dict):
            raise bad()
        return {typed_value(k, args[0], where, key): typed_value(v, args[1], where, f"{key}.{k}")
                for k, v in value.items()}
    raise bad()


def typed_fields(cls, d: dict, where: str) -> dict:
    """``d`` checked against ``cls``'s fields: no unknown key, every value of its declared type."""
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise UserError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    return {k: typed_value(v, hints[k], where, k) for k, v in d.items()}
