"""The documentation names only command-line flags that exist, and links only to headings that exist.

Every code span and every line of a fenced code block in README.md and docs/*.md is read as one or
more commands (split at ``&&``, ``;`` and ``|``; a trailing ``\\`` joins lines):

- ``gpu-dsm SUB ...`` (or ``... -m gpu_dsm SUB ...``): each ``--flag`` after ``SUB`` must be an
  option of that subcommand's parser (``gpu_dsm.cli.build_parser``);
- ``python -m gpu_dsm.eval.NAME ...`` (or ``eval/NAME.py``, or a span starting with ``NAME`` of
  such a script): each flag must be an option string in ``eval/NAME.py``;
- a span starting with a subcommand's name (``evaluate --whitening FILE``): that subcommand's parser;
- a span starting with a flag or ``...`` (``--rerank dsm`` in prose): the flag must exist in some
  subcommand of ``gpu-dsm`` or in some script of ``eval/``;
- anything else (``pip``, ``torchrun`` without ``-m gpu_dsm``, ``mkdocs``, ...) is another tool's and
  is not checked.

Relative links to ``page.md#anchor`` (and ``#anchor`` within a page) must name a heading of that
page under mkdocs' slugs (lowercase, punctuation dropped, spaces to ``-``).
"""
from __future__ import annotations

import ast
import re
import shlex
from functools import lru_cache
from pathlib import Path

import pytest

from gpu_dsm.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
SPAN = re.compile(r"`([^`]+)`")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
SEPARATORS = re.compile(r"&&|;|\|")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


@lru_cache(maxsize=None)
def subcommand_flags() -> dict[str, frozenset[str]]:
    """Option strings of each ``gpu-dsm`` subcommand."""
    parser = build_parser()
    subparsers = parser._subparsers._group_actions[0].choices
    return {name: frozenset(p._option_string_actions) for name, p in subparsers.items()}


@lru_cache(maxsize=None)
def script_flags() -> dict[str, frozenset[str]]:
    """Option strings of each script in ``eval/``, by its name: every ``"--x"`` string literal in it
    and in the ``gpu_dsm.eval`` modules it imports (a shared parser such as ``benchmark_parser``)."""
    own, imports = {}, {}
    for path in sorted((ROOT / "eval").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        own[path.stem] = {node.value for node in ast.walk(tree)
                          if isinstance(node, ast.Constant) and isinstance(node.value, str)
                          and re.fullmatch(r"--[a-z][a-z0-9-]*", node.value)}
        imports[path.stem] = {alias.name if node.module == "gpu_dsm.eval" else node.module.rsplit(".", 1)[-1]
                              for node in ast.walk(tree)
                              if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gpu_dsm.eval")
                              for alias in node.names}
    return {name: frozenset(found.union(*(own.get(m, set()) for m in imports[name]), {"--help"}))
            for name, found in own.items()}


@lru_cache(maxsize=None)
def any_flag() -> frozenset[str]:
    return frozenset().union(*subcommand_flags().values(), *script_flags().values())


def code_pieces(text: str) -> list[str]:
    """Every line of every fenced block (continuations joined), then every inline code span."""
    pieces = []
    for block in FENCE.findall(text):
        pieces.extend(block.replace("\\\n", " ").splitlines())
    prose = FENCE.sub("", text)
    pieces.extend(span.replace("\n", " ") for span in SPAN.findall(prose))
    return pieces


def _tokens(command: str) -> list[str]:
    command = command.split(" #", 1)[0]  # a shell comment
    try:
        return shlex.split(command)
    except ValueError:
        return command.split()


def checks(command: str) -> list[tuple[str, str, frozenset[str]]]:
    """``(flag, what it belongs to, the flags that exist there)`` for each checked flag of ``command``."""
    tokens = _tokens(command)
    if not tokens:
        return []
    subcommands, scripts = subcommand_flags(), script_flags()
    target, start = None, None
    for i, tok in enumerate(tokens):
        following = tokens[i + 1] if i + 1 < len(tokens) else None
        if tok == "gpu-dsm" or (tok == "gpu_dsm" and i > 0 and tokens[i - 1] == "-m"):
            if following in subcommands:
                target, start = (f"gpu-dsm {following}", subcommands[following]), i + 2
            else:
                target, start = ("gpu-dsm (any subcommand)", frozenset().union(*subcommands.values())), i + 1
            break
        module = re.fullmatch(r"gpu_dsm\.eval\.(\w+)", tok) if i > 0 and tokens[i - 1] == "-m" else None
        module = module or re.fullmatch(r"(?:\./)?eval/(\w+)\.py", tok)
        if module and module.group(1) in scripts:
            target, start = (f"eval/{module.group(1)}.py", scripts[module.group(1)]), i + 1
            break
    if target is None:
        first = tokens[0]
        if first in subcommands:
            target, start = (f"gpu-dsm {first}", subcommands[first]), 1
        elif first in scripts:
            target, start = (f"eval/{first}.py", scripts[first]), 1
        elif first.startswith("--") or first == "...":
            target, start = ("gpu-dsm or eval/ (any)", any_flag()), 0
        else:
            return []  # another tool's command
    name, known = target
    return [(flag, name, known) for tok in tokens[start:] for flag in FLAG.findall(tok) if tok.startswith(("--", "[--"))]


def documented_flags() -> list[tuple[str, str, str, frozenset[str]]]:
    found = []
    for page in PAGES:
        for piece in code_pieces(page.read_text(encoding="utf-8")):
            for command in SEPARATORS.split(piece):
                for flag, name, known in checks(command):
                    found.append((_rel(page), flag, name, known))
    return found


def test_the_docs_name_flags():
    """The scan finds the commands it is meant to check (a broken scan would pass vacuously)."""
    found = documented_flags()
    names = {name for _, _, name, _ in found}
    assert {"gpu-dsm evaluate", "gpu-dsm extract", "gpu-dsm show-match", "gpu-dsm compare"} <= names
    assert any(name.startswith("eval/") for name in names)
    assert len(found) > 100


def test_every_documented_flag_exists():
    wrong = sorted({f"{page}: {flag} is not an option of {name}" for page, flag, name, known in documented_flags()
                    if flag not in known})
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("command, expected", [
    ("gpu-dsm evaluate --dataset roxford5k-mini [--no-upscale] --out F.json", {"--dataset", "--no-upscale", "--out"}),
    ("pip install torch --index-url https://example.org", set()),
    ("torchrun --standalone --nproc-per-node 2 -m gpu_dsm extract --out stores/", {"--out"}),
    ("python -m gpu_dsm.eval.sweep --thresholds 4", {"--thresholds"}),
    ("--score fused --fuse-weight 0.5", {"--score", "--fuse-weight"}),
])
def test_which_flags_are_checked(command, expected):
    assert {flag for flag, _, _ in checks(command)} == expected


def test_a_renamed_flag_is_caught():
    """A span naming a flag no parser has fails, whichever form it takes."""
    for command in ("gpu-dsm evaluate --upscale", "--upscale", "python -m gpu_dsm.eval.sweep --upscale"):
        assert any(flag not in known for flag, _, known in checks(command)), command
    # a flag of one subcommand used with another
    only_compare = subcommand_flags()["compare"] - subcommand_flags()["evaluate"]
    flag = sorted(only_compare)[0]
    assert any(f not in known for f, _, known in checks(f"gpu-dsm evaluate {flag} X")), flag


# --- links to headings ---

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """mkdocs' (Python-Markdown toc) default slug of a heading's text."""
    text = re.sub(r"`([^`]*)`", r"\1", heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


@lru_cache(maxsize=None)
def anchors(page: Path) -> frozenset[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    found, seen = set(), {}
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, flags=re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}_{n}")
    return frozenset(found)


def test_every_anchor_link_names_a_heading():
    wrong = []
    for page in PAGES:
        prose = FENCE.sub("", page.read_text(encoding="utf-8"))
        for target in LINK.findall(prose):
            if re.match(r"[a-z]+:", target) or "#" not in target:
                continue
            file, anchor = target.split("#", 1)
            if file and not file.endswith(".md"):
                continue
            linked = (page.parent / file).resolve() if file else page
            if not linked.is_file():
                wrong.append(f"{_rel(page)}: {target}: no such page")
            elif "." in anchor:  # an object of a generated API page: its module has a "::: module" line
                modules = re.findall(r"^:::\s*(\S+)", linked.read_text(encoding="utf-8"), flags=re.M)
                if not any(anchor == m or anchor.startswith(m + ".") for m in modules):
                    wrong.append(f"{_rel(page)}: {target}: no such object on the page")
            elif anchor not in anchors(linked):
                wrong.append(f"{_rel(page)}: {target}: no heading with that anchor")
    assert not wrong, "\n".join(wrong)
