"""A table of several evaluation runs (one per dataset): mAP and mP@10 per method, E/M/H.

``summarize`` gives the JSON form (what a script reads), ``format_markdown`` the table a README
or a paper's ablation takes.
"""
from __future__ import annotations

from typing import Any, Sequence

from gpu_dsm.eval.protocol import SETUPS


def summarize(reports: Sequence[dict[str, Any]], files: Sequence[str | None] | None = None) -> dict[str, Any]:
    """``{"rows": [{dataset, method, database, distractors, queries, mAP{E,M,H}, mP@10{E,M,H}, file}]}``,
    one row per dataset and method, in the order of the reports and of their methods."""
    files = list(files) if files is not None else [None] * len(reports)
    rows = []
    for report, path in zip(reports, files):
        database = report.get("database", {})
        for method, entry in report["results"].items():
            rows.append({
                "dataset": report["dataset"], "method": method, "queries": len(report.get("queries") or entry["AP"]["M"]),
                "database": database.get("images"), "distractors": database.get("distractors", 0),
                "mAP": dict(entry["mAP"]), "mP@10": dict(entry["mP@10"]), "file": None if path is None else str(path),
            })
    return {"rows": rows}


def _cell(value) -> str:
    return "—" if value is None or value != value else f"{value:.2f}"


def format_markdown(summary: dict[str, Any]) -> str:
    """The summary as a markdown table (undefined values, e.g. Hard on a set without hard positives, as —)."""
    header = ["dataset", "queries", "database", "method", *(f"mAP {s}" for s in SETUPS), *(f"mP@10 {s}" for s in SETUPS)]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in summary["rows"]:
        database = f"{row['database']}" + (f" + {row['distractors']}" if row.get("distractors") else "")
        cells = [row["dataset"], str(row["queries"]), database, row["method"],
                 *(_cell(row["mAP"][s]) for s in SETUPS), *(_cell(row["mP@10"][s]) for s in SETUPS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
