"""Command-line options generated from configuration dataclasses, so a default is written once.

A field becomes an option when its metadata names a flag::

    top_k: int = field(default=100, metadata={"flag": "--top-k", "help": "candidates verified per query",
                                             "source": "paper 4.1"})

Metadata keys:

- ``flag`` (required): the option string; a ``bool`` field is a switch (``--no-x`` turns a ``True``
  default off, any other flag turns a ``False`` default on).
- ``help`` (required) and ``source`` (where the default comes from); the help shown is
  ``"<help> (default: <default>; <source>)"``.
- ``default_text``: how the default is shown when its value alone does not say it (``None`` fields).
- ``type``: the parser of the value (default: the type of the default); ``choices``, ``nargs``,
  ``metavar``, ``dest`` (default: the flag without ``--`` and ``no-``, dashes as underscores) as argparse's.
- ``needs``: ``{other_field: allowed values}`` of the same config: the option has an effect only then,
  and giving it otherwise is an error ([`config_from_args`][gpu_dsm.config_cli.config_from_args]).
- ``stage``: a stage besides its own config's that the option acts in (``"rerank"``: the seeds of
  diffusion after re-ranking); the command line refuses it when that stage is off ([`given_flags`][gpu_dsm.config_cli.given_flags]).

Every generated option defaults to ``None`` on the command line, so ``None`` means "not given" and
the dataclass keeps its own default: [`given`][gpu_dsm.config_cli.given] lists what the user set.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
from typing import Any, Iterable

_SCALE_TERM = re.compile(r"^\s*(?:(?P<num>[0-9.]+)\s*/\s*)?sqrt\(\s*(?P<arg>[0-9.]+)\s*\)\s*$")


def parse_scales(text: str) -> tuple[float, ...]:
    """``"1,1/sqrt(2),0.5"`` -> ``(1.0, 0.7071..., 0.5)``: numbers, ``sqrt(x)`` and ``a/sqrt(x)`` terms."""
    def term(t: str) -> float:
        m = _SCALE_TERM.match(t)
        if not m:
            return float(t)
        root = math.sqrt(float(m["arg"]))
        return float(m["num"]) / root if m["num"] else root

    try:
        return tuple(term(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"scales must be comma-separated numbers, sqrt(x) or a/sqrt(x) terms, got {text!r}") from None


def option_fields(cls) -> list[dataclasses.Field]:
    """The fields of dataclass ``cls`` that carry a ``flag``, in declaration order."""
    return [f for f in dataclasses.fields(cls) if "flag" in f.metadata]


def dest(f: dataclasses.Field) -> str:
    """The argparse destination of field ``f``'s option."""
    return f.metadata.get("dest") or re.sub(r"^no_", "", f.metadata["flag"][2:].replace("-", "_"))


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def shown_default(f: dataclasses.Field) -> str:
    """The default as the help states it."""
    if "default_text" in f.metadata:
        return f.metadata["default_text"]
    value = _default(f)
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (tuple, list)):
        return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def option_help(f: dataclasses.Field) -> str:
    """``"<help> (default: <default>; <source>)"``."""
    source = f.metadata.get("source")
    return f"{f.metadata['help']} (default: {shown_default(f)}{f'; {source}' if source else ''})"


def add_options(parser, cls, names: Iterable[str] | None = None, exclude: Iterable[str] = ()) -> list[str]:
    """Add an option to ``parser`` (a parser or an argument group) for each flagged field of
    ``cls`` (only ``names`` when given, never ``exclude``); returns their flags."""
    chosen, flags = set(names) if names is not None else None, []
    for f in option_fields(cls):
        if (chosen is not None and f.name not in chosen) or f.name in exclude:
            continue
        meta, value = f.metadata, _default(f)
        kwargs: dict[str, Any] = {"dest": dest(f), "default": None, "help": option_help(f).replace("%", "%%")}
        if isinstance(value, bool) and "type" not in meta:
            kwargs.update(action="store_const", const=not meta["flag"].startswith("--no-"))
        else:
            kwargs["type"] = meta.get("type") or type(value)
            kwargs.update({k: meta[k] for k in ("choices", "nargs", "metavar") if k in meta})
        parser.add_argument(meta["flag"], **kwargs)
        flags.append(meta["flag"])
    return flags


def given(cls, args: argparse.Namespace) -> dict[str, Any]:
    """``{field name: value}`` of ``cls``'s options given in ``args`` (parsed from [`add_options`][gpu_dsm.config_cli.add_options])."""
    return {f.name: getattr(args, dest(f)) for f in option_fields(cls) if getattr(args, dest(f), None) is not None}


def flag(cls, name: str) -> str:
    """The flag of field ``name`` of ``cls``."""
    return next(f.metadata["flag"] for f in option_fields(cls) if f.name == name)


def given_flags(cls, args: argparse.Namespace, stage: str | None = None) -> list[str]:
    """The flags of ``cls``'s options given in ``args`` (with ``stage``: only those whose metadata names it)."""
    fields = {f.name: f for f in option_fields(cls)}
    return [fields[name].metadata["flag"] for name in given(cls, args)
            if stage is None or fields[name].metadata.get("stage") == stage]


def config_from_args(cls, args: argparse.Namespace, base=None, **fixed):
    """``base`` (default ``cls()``) with the options given in ``args`` and the ``fixed`` values.

    Raises ``ValueError`` (one line, naming the options): a value the dataclass rejects, or a given
    option whose ``needs`` the resulting config does not meet (an option that would have no effect).
    """
    values = given(cls, args)
    try:
        config = dataclasses.replace(base if base is not None else cls(), **values, **fixed)
    except ValueError as exc:
        named = " ".join(f"{flag(cls, k)} {_text(v)}" for k, v in values.items())
        raise ValueError(f"{named}: {exc}" if named else str(exc)) from None
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in values:
        for other, allowed in fields[name].metadata.get("needs", {}).items():
            actual = getattr(config, other)
            if actual not in allowed:
                where = fields[other].metadata.get("flag", other.replace("_", "-"))
                raise ValueError(f"{flag(cls, name)} has no effect with {where} {_text(actual)} "
                                 f"(only with {' or '.join(_text(a) for a in allowed)})")
    return config


def _text(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(_text(v) for v in value)
    return "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def options_markdown(parser: argparse.ArgumentParser) -> str:
    """Every option of ``parser``, one table per argument group: option, meaning, default and source."""
    lines = []
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.option_strings and a.dest != "help"]
        if not actions:
            continue
        lines += ["", f"**{group.title}**", "", "| option | meaning | default; source |", "|---|---|---|"]
        for action in actions:
            text = (action.help or "") % {"default": action.default, "prog": parser.prog}
            meaning, _, default = text.rpartition(" (default")
            meaning, default = (meaning, default[1:].lstrip(": ").removesuffix(")")) if meaning else (text, "")
            cells = [re.sub(r"([\[\]*|])", r"\\\1", c).replace("<", "&lt;").replace(">", "&gt;") for c in (meaning, default)]
            lines.append(f"| `{'`, `'.join(action.option_strings)}` | {cells[0]} | {cells[1]} |".replace("\n", " "))
    return "\n".join(lines[1:])
