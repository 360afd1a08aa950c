"""Config dataclasses as plain JSON data and back, and the fields in which two configs differ.

``config_to_json`` writes every field of a (nested) config dataclass as JSON data: tuples as
lists, ``torch.dtype`` as its name (``"float64"``), nested configs as objects, ``None`` as
``null``. ``config_from_json`` reads it back into the dataclass, following the field types, so
``config_from_json(type(c), config_to_json(c)) == c``; an unknown field raises ``ValueError``.

Examples:
    >>> from gpu_dsm.rerank import RerankConfig
    >>> data = config_to_json(RerankConfig(top_k=20))
    >>> data["top_k"], data["match"]["threshold"]
    (20, 4.0)
    >>> config_from_json(RerankConfig, data) == RerankConfig(top_k=20)
    True
    >>> config_differences(data, config_to_json(RerankConfig()))
    [('top_k', 20, 100)]
"""
from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, Iterable

import torch


def config_to_json(config: Any) -> dict[str, Any]:
    """Every field of the dataclass ``config`` as JSON data (module docstring)."""
    return {f.name: _to_json(getattr(config, f.name)) for f in dataclasses.fields(config)}


def _to_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return config_to_json(value)
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    return value


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def config_from_json(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """The ``cls`` config that [`config_to_json`][gpu_dsm.configs.config_to_json] wrote as ``data``; fields it lacks take
    their defaults. An unknown field, or a value of the wrong kind, raises ``ValueError`` naming
    its dotted path."""
    if not isinstance(data, dict):
        raise ValueError(f"config {where or cls.__name__}: expected an object, got {type(data).__name__}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"config {where or cls.__name__}: unknown field {where}{unknown[0]}")
    values = {name: _from_json(hints[name], value, f"{where}{name}") for name, value in data.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"config {where or cls.__name__}: {exc}") from None


def _from_json(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [h for h in typing.get_args(hint) if h is not type(None)]
        if value is None:
            return None
        return _from_json(options[0], value, where) if len(options) == 1 else value
    if dataclasses.is_dataclass(hint):
        return config_from_json(hint, value, f"{where}.")
    if hint is torch.dtype:
        dtype = getattr(torch, str(value), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"config {where}: {value!r} is not a torch dtype")
        return dtype
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    return value


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: the leaves of nested JSON config data."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(first: dict[str, Any], second: dict[str, Any], fields: Iterable[str] | None = None,
                       ignore: Iterable[str] = ()) -> list[tuple[str, Any, Any]]:
    """``(dotted field, value in first, value in second)`` of every leaf that differs between two
    configs as JSON data, in ``first``'s order; ``fields``: only those under these prefixes
    (``"extract"``, ``"rerank.match"``; ``None``: all); ``ignore``: leaves or prefixes left out."""
    a, b = flatten(first), flatten(second)
    ignore = tuple(ignore)

    def under(key: str, prefixes) -> bool:
        return any(key == p or key.startswith(p + ".") for p in prefixes)

    keys = [k for k in dict.fromkeys([*a, *b]) if (fields is None or under(k, fields)) and not under(k, ignore)]
    return [(k, a.get(k), b.get(k)) for k in keys if a.get(k) != b.get(k)]
