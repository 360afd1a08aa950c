"""The docs' result tables, generated from the result files under ``eval/results/``.

A result file is JSON: ``{"command": the command that produced it, "machine": {cpu_cores, gpu,
platform, torch}, "date": "YYYY-MM-DD", "dataset", "backbone", "options": every setting, "results": {method: {"mAP": {"E", "M",
"H"}, "mP@10": {...}, "AP": {...}}}}``. ``record`` makes one from a ``gpu-dsm evaluate`` results
file (the per-query rankings are left out; the per-query APs are kept).

A docs page holds a generated table between two marker lines::

    <!-- table: NAME -->
    ...generated...
    <!-- /table -->

where ``NAME`` is the stem of a result file. ``python -m gpu_dsm.eval.tables`` rewrites every such
table from its file; ``--check`` rewrites nothing and exits 1 naming each table that differs.

    python -m gpu_dsm.eval.tables record RESULTS.json --command "gpu-dsm evaluate ..." --out eval/results/NAME.json
    python -m gpu_dsm.eval.tables [--check]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
from pathlib import Path

import torch

from gpu_dsm.io import atomic_write, write_json

ROOT = Path(__file__).resolve().parents[1]  # the repository (eval/ installs as gpu_dsm.eval in place)
SETUPS = ("E", "M", "H")
MARKER = re.compile(r"^<!-- table: (?P<name>[A-Za-z0-9_.-]+) -->\n(?P<body>.*?)^<!-- /table -->$", re.M | re.S)


def machine() -> dict:
    """Cores, GPU (or ``"none"``), platform and torch version of this machine."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"cpu_cores": os.cpu_count(), "gpu": gpu, "platform": platform.platform(), "torch": torch.__version__}


def record(results: dict, command: str, date: str | None = None) -> dict:
    """A result file's content from a ``gpu-dsm evaluate`` results dict (``ranks`` dropped)."""
    if "results" not in results or not isinstance(results["results"], dict):
        raise ValueError("record: not a gpu-dsm evaluate results file (no 'results' mapping)")
    methods = {name: {key: value for key, value in entry.items() if key != "ranks"}
               for name, entry in results["results"].items()}
    return {"command": command, "machine": machine(), "date": date or datetime.date.today().isoformat(),
            "dataset": results.get("dataset"), "backbone": results.get("backbone"),
            "options": results.get("options"), "results": methods}


def _cell(value) -> str:
    return "—" if value is None else f"{value:.2f}"


def format_table(result: dict) -> str:
    """The markdown table of one result file: a row per method, mAP and mP@10 per setup, then
    the command, machine and date it came from."""
    for key in ("command", "machine", "date", "results"):
        if key not in result:
            raise ValueError(f"result file without {key!r}")
    lines = ["| method | mAP E | mAP M | mAP H | mP@10 E | mP@10 M | mP@10 H |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, entry in result["results"].items():
        cells = [_cell(entry["mAP"].get(s)) for s in SETUPS] + [_cell(entry["mP@10"].get(s)) for s in SETUPS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    m = result["machine"]
    where = f"{m.get('cpu_cores')} CPU cores, GPU: {m.get('gpu')}, torch {m.get('torch')}"
    lines += ["", f"`{result['command']}` ({where}; {result['date']})"]
    return "\n".join(lines) + "\n"


def load_results(folder: Path) -> dict[str, dict]:
    """``{stem: content}`` of every ``*.json`` under ``folder``."""
    out = {}
    for path in sorted(Path(folder).glob("*.json")):
        with open(path, encoding="utf-8") as f:
            out[path.stem] = json.load(f)
    return out


def render(text: str, results: dict[str, dict], page: str = "page") -> str:
    """``text`` with every marked table regenerated; a marker naming no result file is an error."""
    def replace(match: re.Match) -> str:
        name = match.group("name")
        if name not in results:
            raise ValueError(f"{page}: table {name!r} has no result file {name}.json")
        return f"<!-- table: {name} -->\n{format_table(results[name])}<!-- /table -->"
    return MARKER.sub(replace, text)


def tables_in(text: str) -> list[str]:
    """Names of the marked tables of a page."""
    return [m.group("name") for m in MARKER.finditer(text)]


def regenerate(root: Path = ROOT, check: bool = False) -> list[str]:
    """Rewrite (or with ``check`` only compare) every marked table under ``root/docs`` from
    ``root/eval/results``; returns ``page: table`` for each table that differed."""
    results = load_results(root / "eval" / "results")
    differing = []
    for page in sorted((root / "docs").rglob("*.md")):
        text = page.read_text(encoding="utf-8")
        new = render(text, results, str(page.relative_to(root)))
        if new != text:
            old_tables = dict(zip(tables_in(text), MARKER.findall(text)))
            new_tables = dict(zip(tables_in(new), MARKER.findall(new)))
            differing += [f"{page.relative_to(root)}: {name}" for name in tables_in(text) if old_tables[name] != new_tables[name]]
            if not check:
                atomic_write(page, lambda tmp, new=new: tmp.write_text(new, encoding="utf-8"))
    return differing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpu_dsm.eval.tables", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action")
    rec = sub.add_parser("record", help="make a result file from a gpu-dsm evaluate results file")
    rec.add_argument("results", help="the results JSON written by gpu-dsm evaluate --out")
    rec.add_argument("--command", required=True, help="the exact command that produced it")
    rec.add_argument("--out", required=True, help="eval/results/NAME.json")
    parser.add_argument("--root", default=str(ROOT), help="repository root (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 naming the tables that differ")
    args = parser.parse_args(argv)
    if args.action == "record":
        with open(args.results, encoding="utf-8") as f:
            write_json(args.out, record(json.load(f), args.command))
        print(f"wrote {args.out}")
        return 0
    differing = regenerate(Path(args.root), check=args.check)
    for item in differing:
        print(("differs: " if args.check else "regenerated: ") + item)
    return 1 if args.check and differing else 0


if __name__ == "__main__":
    sys.exit(main())
