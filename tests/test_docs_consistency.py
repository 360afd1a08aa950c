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


# --- docstrings: cross-references the API page links ---

# mkdocstrings reads docstrings as Markdown: a Sphinx role shows as literal text and links nowhere.
# A cross-reference is an autorefs link, [`Whitening`][gpu_dsm.whitening.Whitening], to an object
# the API page (docs/api.md) renders, or plain code, `name`, for anything else.
SOURCES = sorted(p for folder in ("gpu_dsm", "kernels", "eval") for p in (ROOT / folder).rglob("*.py"))
ROLE = re.compile(r"(?<![\w:]):(?:py:)?(?:class|func|meth|attr|mod|data|obj|exc|const|ref|any|doc|term):`[^`]*`")
DOC_LINK = re.compile(r"\]\[(?P<ident>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)\]")
# kernels/ and eval/ install as gpu_dsm.kernels and gpu_dsm.eval; the API page renders kernels/
# from the source tree, so its identifiers there start with "kernels."
INSTALLED_AS = {"kernels": "gpu_dsm.kernels", "eval": "gpu_dsm.eval"}


@lru_cache(maxsize=None)
def docstrings(path: Path) -> tuple[tuple[int, str], ...]:
    """``(line, text)`` of every bare string statement of a module (docstrings of the module, its
    classes and functions, and of attributes)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return tuple((node.lineno, node.value.value) for node in ast.walk(tree)
                 if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
                 and isinstance(node.value.value, str))


@lru_cache(maxsize=None)
def api_modules() -> tuple[str, ...]:
    """The modules docs/api.md renders (``::: module`` lines)."""
    return tuple(re.findall(r"^:::\s*(\S+)", (ROOT / "docs" / "api.md").read_text(encoding="utf-8"), flags=re.M))


def resolves(identifier: str) -> bool:
    """Whether ``identifier`` names an object: a module, or a member of one (a class's member may be
    a dataclass field or an annotated attribute)."""
    import importlib

    head, _, rest = identifier.partition(".")
    parts = (INSTALLED_AS.get(head, head) + ("." + rest if rest else "")).split(".")
    for cut in range(len(parts), 0, -1):
        try:
            value = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            fields = getattr(value, "__dataclass_fields__", {}) if isinstance(value, type) else {}
            annotated = {n for klass in getattr(value, "__mro__", ()) for n in vars(klass).get("__annotations__", {})}
            if hasattr(value, name):
                value = getattr(value, name)
            elif name in fields or name in annotated:
                value = None
            else:
                return False
        return True
    return False


def docstring_links() -> list[tuple[str, str]]:
    return [(f"{_rel(path)}:{line}", match["ident"]) for path in SOURCES
            for line, text in docstrings(path) for match in DOC_LINK.finditer(text)]


def test_no_docstring_holds_a_sphinx_role():
    assert ROLE.search("As :meth:`Whitening.project`, without L2.")  # the check can fail
    assert not ROLE.search("As [`Whitening.project`][gpu_dsm.whitening.Whitening.project], ``a:b``.")
    rendered = {m for m in api_modules()}
    found = [f"{_rel(path)}:{line}: {match[0]}" for path in SOURCES for line, text in docstrings(path)
             for match in ROLE.finditer(text)]
    assert not found, "Sphinx roles (write [`name`][dotted.path] or `name`):\n" + "\n".join(found)
    # the scan reads the modules the API page renders
    assert {".".join((INSTALLED_AS.get(p.parts[len(ROOT.parts)], p.parts[len(ROOT.parts)]),
                      *p.relative_to(ROOT).with_suffix("").parts[1:])).removesuffix(".__init__")
            for p in SOURCES} >= {INSTALLED_AS.get(m.split(".")[0], m.split(".")[0]) + m[len(m.split(".")[0]):]
                                  for m in rendered}


def test_every_docstring_link_names_an_object_of_the_api_page():
    links = docstring_links()
    assert len(links) > 100  # a broken scan would pass vacuously
    assert not resolves("gpu_dsm.whitening.Whitening.no_such_member") and resolves("kernels.precision.two_product")
    wrong = [f"{where}: [{ident}] is not importable" for where, ident in links if not resolves(ident)]
    wrong += [f"{where}: [{ident}] is not on the API page (docs/api.md renders {', '.join(api_modules())})"
              for where, ident in links
              if not any(ident == m or ident.startswith(m + ".") for m in api_modules())
              or any(part.startswith("_") for part in ident.split("."))]
    assert not wrong, "\n".join(wrong)


# --- references to docs pages and sections from the code ---

# A comment or string of the code (a --help text, a config default's comment) cites the docs as
#   docs/PAGE.md                     the page must exist
#   docs/PAGE.md#anchor              ... and have a heading with that anchor
#   docs/PAGE.md, "Section"          ... and a heading with that text (also ("Section"), "Section")
#   docs 'Title' / docs, "Title"     a page with that title (mkdocs.yml nav or its first heading)
#   docs 'Title', 'Section'          ... and a heading of that page with that text
PAGE_REF = re.compile(r"docs/(?P<page>[\w-]+\.md)(?:#(?P<anchor>[\w-]+))?"
                      r"(?:,?\s*\(?(?P<q>[\"'])(?P<section>[^\"'\s][^\"']*)(?P=q))?")
TITLE_REF = re.compile(r"(?<!\w )(?<!\w)docs,?\s+(?P<q>[\"'])(?P<title>[^\"']+)(?P=q)"
                       r"(?:,\s*(?P<q2>[\"'])(?P<section>[^\"']+)(?P=q2))?")
CITING = [*SOURCES, *sorted(p for folder in ("kernels",) for p in (ROOT / folder).glob("*.c")),
          ROOT / "setup.cfg", ROOT / "pyproject.toml"]


def code_texts(path: Path) -> list[tuple[int, str]]:
    """``(line, text)`` of the comments (consecutive comment lines joined) and string literals
    (implicit concatenations and f-strings joined) of a Python file; the whole file otherwise.
    Whitespace runs are one space, so a citation may wrap."""
    source = path.read_text(encoding="utf-8")
    if path.suffix != ".py":
        return [(1, re.sub(r"\s+", " ", source))]
    import io
    import tokenize

    texts, block, start, last = [], [], 0, -2
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            if token.start[0] != last + 1 and block:
                texts.append((start, " ".join(block)))
                block = []
            start = start if block else token.start[0]
            block.append(token.string.lstrip("#").strip())
            last = token.start[0]
    if block:
        texts.append((start, " ".join(block)))
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            texts.append((node.lineno, node.value))
        elif isinstance(node, ast.JoinedStr):
            texts.append((node.lineno, "{}".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)))
    return [(line, re.sub(r"\s+", " ", text)) for line, text in texts]


def heading_texts(page: Path) -> frozenset[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return frozenset(re.sub(r"\s+", " ", re.sub(r"`([^`]*)`", r"\1", h)).strip().lower()
                     for h in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, flags=re.M))


@lru_cache(maxsize=None)
def page_titles() -> dict[str, Path]:
    """Each docs page by its nav title (mkdocs.yml) and by its first heading, lowercase."""
    titles = {}
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    for title, page in re.findall(r"^\s*-\s*([^:\n]+?):\s*([\w-]+\.md)\s*$", nav, flags=re.M):
        titles[title.lower()] = ROOT / "docs" / page
    for page in (ROOT / "docs").glob("*.md"):
        first = re.search(r"^#\s+(.+?)\s*$", page.read_text(encoding="utf-8"), flags=re.M)
        if first:
            titles.setdefault(first[1].lower(), page)
    return titles


def citation_problems(text: str) -> list[str]:
    """What is wrong with each docs citation in ``text``."""
    wrong = []
    for match in PAGE_REF.finditer(text):
        page = ROOT / "docs" / match["page"]
        if not page.is_file():
            wrong.append(f"docs/{match['page']}: no such page")
        elif match["anchor"] and match["anchor"] not in anchors(page):
            wrong.append(f"docs/{match['page']}#{match['anchor']}: no heading with that anchor")
        elif match["section"] and match["section"].strip().lower() not in heading_texts(page):
            wrong.append(f"docs/{match['page']}, \"{match['section']}\": no such heading")
    for match in TITLE_REF.finditer(text):
        page = page_titles().get(match["title"].strip().lower())
        if page is None:
            wrong.append(f"docs '{match['title']}': no page with that title")
        elif match["section"] and match["section"].strip().lower() not in heading_texts(page):
            wrong.append(f"docs '{match['title']}', '{match['section']}': no such heading")
    return wrong


def code_citations() -> list[tuple[str, str]]:
    return [(f"{_rel(path)}:{line}", text) for path in CITING for line, text in code_texts(path)
            if PAGE_REF.search(text) or TITLE_REF.search(text)]


@pytest.mark.parametrize("text, problems", [
    ('measured (docs/design-decisions.md, "Re-ranking")', 0),
    ("see docs/design-decisions.md (\"Re-ranking\") and docs/diffusion.md#truncated-diffusion-large-databases", 0),
    ("measured, docs 'Design decisions') (default: 4)", 0),
    ("(docs, 'Diffusion', 'Truncated diffusion (large databases)')", 0),
    ("PyTorch docs, \"TensorFloat-32 (TF32) on Ampere (and later) devices\"", 0),  # another project's docs
    ('measured (docs/design-decisions.md, "Reranking")', 1),
    ("see docs/design-decision.md", 1),
    ("docs/diffusion.md#truncated-diffusion", 1),
    ("measured, docs 'Design choices')", 1),
    ("docs 'Diffusion', 'Truncated diffusion'", 1),
    ('(docs/design-decisions.md); "verified" is another string', 0),
])
def test_which_citations_are_wrong(text, problems):
    assert len(citation_problems(text)) == problems, citation_problems(text)


def test_every_docs_citation_in_the_code_resolves():
    cited = code_citations()
    assert len(cited) > 20  # a broken scan would pass vacuously
    wrong = [f"{where}: {problem}" for where, text in cited for problem in citation_problems(text)]
    assert not wrong, "\n".join(wrong)


# --- figures in docs tables ---

# Numbers in the docs come from result files: a table eval/tables.py generates sits between its
# "<!-- table: SPEC -->" and "<!-- /table -->" lines. A table of figures typed by hand says so and
# names the command that reproduces it: the paragraph right above it says "no result file" (or
# "typed from") and holds the command (a code span starting with gpu-dsm, python or torchrun),
# or the table has a "command" column filled on every row.
GENERATED = re.compile(r"^<!-- table: [^\n]+? -->\n.*?^<!-- /table -->$", re.M | re.S)
FIGURE = re.compile(r"[+\-−]?\d[\d,]*\.\d+|[+\-−]\d|\d[\d,]*(?:\.\d+)?(?:\s?(?:ms|s|MB|GB|MiB|GiB|images/s)|x)(?!\w)")
TYPED = re.compile(r"no result files?\b|typed from", re.I)
COMMAND = re.compile(r"`(?:gpu-dsm|python|torchrun)\s[^`]*`")


def _cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip().strip("|").split("|")]


def tables(text: str):
    """``(line, the paragraph above, header cells, body rows' cells)`` of every table outside the
    generated blocks."""
    lines = GENERATED.sub(lambda m: "\n" * m[0].count("\n"), FENCE.sub(lambda m: "\n" * m[0].count("\n"), text)).split("\n")
    i = 0
    while i < len(lines):
        if not (lines[i].startswith("|") and i + 1 < len(lines) and re.match(r"\|\s*:?-", lines[i + 1])):
            i += 1
            continue
        end = i + 2
        while end < len(lines) and lines[end].startswith("|"):
            end += 1
        above = i
        while above > 0 and not lines[above - 1].strip():
            above -= 1
        start = above
        while start > 0 and lines[start - 1].strip():
            start -= 1
        yield i + 1, " ".join(lines[start:above]), _cells(lines[i]), [_cells(row) for row in lines[i + 2:end]]
        i = end


def is_figure(cell: str) -> bool:
    """A cell that starts with a measured number: a decimal, a signed number, or a number with a
    unit (ms, s, MB, GB, images/s, a ratio 5.1x); code spans, link targets and emphasis aside."""
    return bool(FIGURE.match(re.sub(r"`[^`]*`|\]\([^)]*\)|[*_]{1,2}", "", cell).strip()))


def table_problems(text: str) -> list[str]:
    wrong = []
    for line, above, header, rows in tables(text):
        if not any(is_figure(cell) for row in rows for cell in row):
            continue
        commands = [n for n, name in enumerate(header) if name.lower() == "command"]
        has_command = bool(COMMAND.search(above)) or (
            bool(commands) and all(len(row) > commands[0] and row[commands[0]] for row in rows))
        if not TYPED.search(above):
            wrong.append(f"line {line}: a typed table of figures, not marked as typed (\"no result file\" above it)")
        if not has_command:
            wrong.append(f"line {line}: a typed table of figures without its command (above it, or a command column)")
    return wrong


def test_which_tables_are_flagged():
    figures = "| set | mAP |\n| --- | --- |\n| mini | 41.37 |\n"
    assert len(table_problems("Measured:\n\n" + figures)) == 2
    assert len(table_problems("Measured (`python -m gpu_dsm.eval.sweep --dataset D`):\n\n" + figures)) == 1
    assert not table_problems("No result file yet; `gpu-dsm evaluate --dataset D`:\n\n" + figures)
    assert not table_problems("Typed, no result file yet:\n\n| set | mAP | command |\n| --- | --- | --- |\n"
                              "| mini | 41.37 | `gpu-dsm evaluate` |\n")
    assert not table_problems("<!-- table: mini -->\n" + figures + "<!-- /table -->\n")
    assert not table_problems("Backbones:\n\n| name | channels | stride |\n| --- | --- | --- |\n| vgg16 | 512 | 16 |\n")


def test_every_table_of_figures_is_generated_or_typed_with_its_command():
    wrong = [f"{_rel(page)}: {problem}" for page in PAGES
             for problem in table_problems(page.read_text(encoding="utf-8"))]
    assert not wrong, "\n".join(wrong)
