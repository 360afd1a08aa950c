"""Paired comparison of two methods over the same queries: mean AP difference with a bootstrap
confidence interval, and how many queries gain and lose.

Queries of one landmark are resampled together (their APs are not independent): the group of a
query is its name without the trailing image number (``all_souls_000013`` -> ``all_souls``); names
that are only a number (INRIA Holidays) are groups of their own.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from gpu_dsm.eval.protocol import SETUPS


def group_names(names: Sequence[str]) -> list[str]:
    """The group (landmark) of every query: its name without the trailing image number."""
    return [re.sub(r"[_-]?\d+$", "", str(name)) or str(name) for name in names]


def query_groups(names: Sequence[str]) -> np.ndarray:
    """Group index of every query (see the module docstring)."""
    _, index = np.unique(np.asarray(group_names(names)), return_inverse=True)
    return index


def paired_bootstrap(a: np.ndarray, b: np.ndarray, groups: np.ndarray, samples: int = 10000, seed: int = 0,
                     level: float = 0.95) -> dict[str, Any]:
    """``mean(b - a)`` over the queries where both are defined, with a percentile bootstrap interval
    (groups resampled with replacement), in the units of the inputs (AP points in results files)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    defined = np.isfinite(a) & np.isfinite(b)
    delta = (b - a)[defined]
    g = np.asarray(groups)[defined]
    if delta.size == 0:
        return {"queries": 0, "delta": None, "ci": [None, None], "gain": 0, "loss": 0, "tie": 0}
    labels, g = np.unique(g, return_inverse=True)
    sums = np.bincount(g, weights=delta, minlength=labels.size)
    counts = np.bincount(g, minlength=labels.size)
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, labels.size, size=(samples, labels.size))
    means = sums[pick].sum(1) / counts[pick].sum(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {"queries": int(delta.size), "groups": int(labels.size), "delta": float(delta.mean()),
            "ci": [float(lo), float(hi)], "gain": int((delta > 1e-9).sum()), "loss": int((delta < -1e-9).sum()),
            "tie": int((np.abs(delta) <= 1e-9).sum())}


def setup_aps(entry: dict, setup: str) -> np.ndarray:
    """Per-query APs of one setup of a results entry, ``None`` (undefined) as NaN."""
    return np.asarray([np.nan if v is None else v for v in entry["AP"][setup]], dtype=np.float64)


def compare_reports(base: dict, other: dict, method_a: str, method_b: str, samples: int = 10000) -> dict[str, Any]:
    """``method_b`` of ``other`` against ``method_a`` of ``base``, per setup (E/M/H)."""
    for report, method in ((base, method_a), (other, method_b)):
        if method not in report["results"]:
            raise ValueError(f"method {method!r} is not in the results (has {sorted(report['results'])})")
    qa, qb = base.get("queries"), other.get("queries")
    if qa is not None and qb is not None and qa != qb:
        raise ValueError("the two results files are of different queries")
    names = qa or [str(i) for i in range(len(base["results"][method_a]["AP"]["M"]))]
    groups = query_groups(names)
    out = {"a": method_a, "b": method_b, "setups": {}}
    for setup in SETUPS:
        a, b = setup_aps(base["results"][method_a], setup), setup_aps(other["results"][method_b], setup)
        if a.shape != b.shape:
            raise ValueError(f"{setup}: {a.size} and {b.size} queries")
        out["setups"][setup] = paired_bootstrap(a, b, groups, samples)
        out["setups"][setup]["per_query"] = [None if not np.isfinite(x) else float(x) for x in b - a]
    return out


def format_comparison(result: dict) -> str:
    lines = [f"{result['b']} vs {result['a']} (AP points, 95% paired bootstrap over query groups)",
             f"{'setup':<6}{'queries':>8}{'delta':>9}{'95% CI':>20}{'gain':>6}{'loss':>6}{'tie':>5}"]
    for setup, r in result["setups"].items():
        if r["delta"] is None:
            lines.append(f"{setup:<6}{0:>8}{'-':>9}")
            continue
        ci = f"[{r['ci'][0]:+.2f}, {r['ci'][1]:+.2f}]"
        lines.append(f"{setup:<6}{r['queries']:>8}{r['delta']:>+9.2f}{ci:>20}{r['gain']:>6}{r['loss']:>6}{r['tie']:>5}")
    return "\n".join(lines)


def load_report(path: str | Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"results file not found: {path}") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read results file {path}: {exc}") from None


def plot_comparison(result: dict, path: str | Path) -> Path:
    """Draw ``result``'s per-query differences (one panel per setup with a defined mean) as a PNG, atomically."""
    from gpu_dsm.io import atomic_write
    from gpu_dsm.visualize import draw_delta_plot

    panels = []
    for setup, r in result["setups"].items():
        if r["delta"] is None:
            continue
        ci = f" [{r['ci'][0]:+.2f}, {r['ci'][1]:+.2f}]"
        panels.append((f"{setup}{ci}", r["per_query"]))
    picture = draw_delta_plot(panels, title=f"{result['b']} minus {result['a']}: AP per query (points)")
    return atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))
