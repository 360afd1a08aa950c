"""Sweep re-ranking and diffusion settings on a dataset's stores, each paired against the defaults.

    python -m gpu_dsm.eval.sweep --dataset roxford5k-19q [--distractors DIR] --cache-dir C --out sweep.json

The stores are those of ``gpu-dsm evaluate`` (reused from ``--cache-dir``, else extracted with the
default extraction and detector). Then every setting costs one verification or one diffusion:

- matching (``--thresholds`` x ``--errors``): one verification of each query's top ``max(--top-k)``;
- score, fuse weight, top-k: re-ordered from those inliers (verification is independent per pair,
  so the inliers of the top 100 hold those of the top 20);
- diffusion: graph k x alpha for ``global+D`` and ``global+dsm+D`` (default re-ranking), then one
  at a time the seeds (``--query-k``; ``--dsm-keep`` and ``--seeds`` for ``global+dsm+D``), the
  similarity weight of the final score (``--similarity-weight``) and the confident-match rule
  (``--confident-mads``, ``--confident-ratio``).

Re-ranking settings vary one parameter at a time around the defaults (``RerankConfig()``);
diffusion settings around ``DiffusionConfig()`` / ``GraphConfig()``. Every row has the protocol's
table, per-query APs, and two paired bootstraps over query groups (``gpu_dsm.eval.compare``):
against the same method with the default settings (``vs_default``) and against the method it
builds on (``vs_base``: ``global`` for ``global+dsm`` and ``global+D``, ``global+D`` with the same
graph for ``global+dsm+D``).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from gpu_dsm.diffusion import SEEDS, DiffusionConfig
from gpu_dsm.graph import GraphConfig, build_knn_graph
from gpu_dsm.io import check_output_file, write_json
from gpu_dsm.match import ERRORS
from gpu_dsm.rerank import RerankConfig, rerank_by_inliers
from gpu_dsm.eval.compare import paired_bootstrap, query_groups, setup_aps
from gpu_dsm.eval.datasets import RevisitopDataset, default_data_root
from gpu_dsm.eval.protocol import SETUPS, evaluate_revisited
from gpu_dsm.ranking import diffuse_initial, diffuse_verified
from gpu_dsm.rerank import rerank_top_k
from gpu_dsm.rerank import DSMReranker
from gpu_dsm.eval.run import RunConfig, dataset_stores, make_retrieval, preflight


@dataclass
class SweepGrid:
    """Values tried for each setting (the defaults are always among the rows)."""

    thresholds: Sequence[float] = (2.0, 3.0, 4.0, 6.0, 8.0)
    errors: Sequence[str] = ERRORS
    scores: Sequence[tuple[str, float]] = (("inliers", 0.0), ("fused", 0.25), ("fused", 0.5), ("fused", 1.0), ("fused", 2.0))
    top_k: Sequence[int] = (20, 50, 100)
    graph_k: Sequence[int] = (3, 5, 10, 20, 50)
    alpha: Sequence[float] = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
    query_k: Sequence[int] = (3, 5, 10)
    dsm_keep: Sequence[int] = (3, 4, 5)
    seeds: Sequence[str] = SEEDS
    similarity_weight: Sequence[float] = (0.0, 0.25, 0.5, 0.6, 0.75, 0.9)
    confident_mads: Sequence[float] = (4.0, 6.0, 8.0, 10.0)
    confident_ratio: Sequence[float] = (0.0, 2.0, 2.5, 3.0)


def _entry(ranks: torch.Tensor, gnd) -> dict[str, Any]:
    return evaluate_revisited(ranks.cpu().numpy(), gnd)


def _paired(a: dict, b: dict, groups) -> dict[str, Any]:
    out = {}
    for setup in SETUPS:
        r = paired_bootstrap(setup_aps(a, setup), setup_aps(b, setup), groups, samples=4000)
        out[setup] = {k: r[k] for k in ("delta", "ci", "gain", "loss") if k in r}
    return out


def sweep(cfg: RunConfig, grid: SweepGrid, base: Path, log=print) -> dict[str, Any]:
    """All rows of the sweep on ``cfg``'s dataset (see the module docstring)."""
    dataset = RevisitopDataset.load(cfg.data_root, cfg.dataset)
    device = torch.device(cfg.device)
    default_rerank, default_diffusion, default_graph = RerankConfig(), DiffusionConfig(), GraphConfig()
    d = default_rerank
    if d.match.threshold not in grid.thresholds or d.match.error not in grid.errors:
        raise ValueError(f"the grid must include the default threshold {d.match.threshold} and error {d.match.error}")
    db_store, q_store = dataset_stores(cfg, dataset, base, log=log)
    retrieval = make_retrieval(dataclasses.replace(
        cfg, retrieval=dataclasses.replace(cfg.retrieval, rerank=None, diffusion=None, initial="global")))
    database, queries = retrieval.from_store(db_store), retrieval.from_store(q_store)
    initial = retrieval.search(queries, database).stages["global"]
    db, similarities, ranks = database.global_descriptors, initial.scores, initial.ranks
    gnd, groups = dataset.gnd, query_groups(dataset.qimlist)
    top = min(max(grid.top_k), ranks.shape[1])

    rows: list[dict[str, Any]] = []
    global_entry = _entry(ranks, gnd)
    rows.append({"method": "global", "setting": {}, **global_entry})

    inliers: dict[tuple[float, str], torch.Tensor] = {}
    start = time.perf_counter()
    for threshold in grid.thresholds:
        for error in grid.errors:
            match = dataclasses.replace(default_rerank.match, threshold=threshold, error=error)
            reranker = DSMReranker(RerankConfig(top_k=top, match=match))
            _, result = rerank_top_k(reranker, q_store, db_store, ranks, similarities, device)
            inliers[(threshold, error)] = result.initial_order_inliers()
    log(f"{cfg.dataset}: {len(inliers)} verifications of the top {top} in {time.perf_counter() - start:.1f} s")

    def rerank(threshold: float, error: str, score: str, weight: float, k: int):
        config = RerankConfig(top_k=k, score=score, fuse_weight=weight,
                              match=dataclasses.replace(default_rerank.match, threshold=threshold, error=error))
        result = rerank_by_inliers(inliers[(threshold, error)], similarities[:, :top], ranks[:, :top], config)
        new_ranks = ranks.clone()
        new_ranks[:, :top] = result.indices
        return new_ranks, result

    settings = {(t, e, d.score, d.fuse_weight, d.top_k) for t in grid.thresholds for e in grid.errors}
    settings |= {(d.match.threshold, d.match.error, s, w, d.top_k) for s, w in grid.scores}
    settings |= {(d.match.threshold, d.match.error, d.score, d.fuse_weight, k) for k in grid.top_k}
    default_key = (d.match.threshold, d.match.error, d.score, d.fuse_weight, d.top_k)
    reranked = {key: rerank(*key) for key in sorted(settings, key=str)}
    dsm_default = _entry(reranked[default_key][0], gnd)
    for key, (new_ranks, _) in reranked.items():
        entry = _entry(new_ranks, gnd)
        setting = dict(zip(("threshold", "error", "score", "fuse_weight", "top_k"), key))
        rows.append({"method": "global+dsm", "setting": setting, **entry, "vs_default": _paired(dsm_default, entry, groups),
                     "vs_base": _paired(global_entry, entry, groups)})

    dsm_ranks, dsm_result = reranked[default_key]
    default_k = default_graph.neighbours(db.shape[0])
    default_alpha = default_diffusion.alpha_for(db.shape[0])
    graphs = {k: build_knn_graph(db, dataclasses.replace(default_graph, k=k)) for k in {*grid.graph_k, default_k}}

    def diffused(k: int, config: DiffusionConfig):
        plain = _entry(diffuse_initial(graphs[k], similarities, ranks, config)[0], gnd)
        verified = _entry(diffuse_verified(graphs[k], similarities, dsm_result, dsm_ranks, config)[0], gnd)
        return plain, verified

    base_plain, base_verified = diffused(default_k, default_diffusion)
    dd = default_diffusion
    around = dict(graph_k=default_k, alpha=default_alpha, query_k=dd.query_k, dsm_keep=dd.dsm_keep, seeds=dd.seeds,
                  similarity_weight=dd.similarity_weight, confident_mads=dd.confident_mads,
                  confident_ratio=dd.confident_ratio)
    # (names varied together, their values): graph k x alpha, then each seed and fusion setting alone
    varied = [(("graph_k", "alpha"), [(k, a) for k in graphs for a in {*grid.alpha, default_alpha}])]
    varied += [((name,), [(v,) for v in getattr(grid, name)])
               for name in ("query_k", "dsm_keep", "seeds", "similarity_weight", "confident_mads", "confident_ratio")]
    diffusion_settings = {tuple({**around, **dict(zip(names, value))}.items()) for names, values in varied for value in values}
    for items in sorted(diffusion_settings, key=str):
        setting = dict(items)
        k = setting["graph_k"]
        config = dataclasses.replace(dd, **{name: value for name, value in setting.items() if name != "graph_k"})
        plain, verified = diffused(k, config)
        plain_vs_global = _paired(global_entry, plain, groups)  # global+D builds on global: one comparison for both keys
        rows.append({"method": "global+D", "setting": setting, **plain, "vs_default": _paired(base_plain, plain, groups),
                     "vs_base": plain_vs_global, "vs_global": plain_vs_global})
        rows.append({"method": "global+dsm+D", "setting": setting, **verified,
                     "vs_default": _paired(base_verified, verified, groups), "vs_base": _paired(plain, verified, groups),
                     "vs_global": _paired(global_entry, verified, groups)})
    return {"dataset": cfg.dataset, "database": {"images": len(dataset.imlist), "distractors": db.shape[0] - len(dataset.imlist)},
            "queries": list(dataset.qimlist), "options": cfg.options(),
            "defaults": {"rerank": dataclasses.asdict(default_rerank), "graph": {**dataclasses.asdict(default_graph), "resolved_k": default_k},
                         "diffusion": {**{k: v for k, v in dataclasses.asdict(default_diffusion).items() if k != "dtype"},
                                       "resolved_alpha": default_alpha}},
            "rows": rows}


def format_rows(report: dict[str, Any], method: str, setup: str = "M") -> str:
    """Rows of one method: mAP of ``setup`` and the paired differences, one line each."""
    lines = [f"{report['dataset']} ({report['database']['images']} + {report['database']['distractors']} images), {method}, "
             f"mAP {setup}: value, vs default [95% CI], vs base [95% CI]"]
    for row in report["rows"]:
        if row["method"] != method:
            continue
        cells = [f"{row['mAP'][setup]:7.2f}" if row["mAP"][setup] is not None else "      —"]
        for key in ("vs_default", "vs_base"):
            r = row.get(key, {}).get(setup)
            if r and r.get("delta") is not None:
                cells.append(f"{r['delta']:+6.2f} [{r['ci'][0]:+6.2f}, {r['ci'][1]:+6.2f}]")
        lines.append(f"  {' '.join(f'{k}={v}' for k, v in row['setting'].items()):<60} " + "  ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    root = default_data_root()
    grid = SweepGrid()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default=str(root) if root else None, required=root is None)
    p.add_argument("--dataset", default="roxford5k-19q", help="revisitop dataset (default: %(default)s)")
    p.add_argument("--distractors", default=None, help="distractor folder appended to the database (default: none)")
    p.add_argument("--cache-dir", default=".gpu_dsm_cache", help="feature store cache (default: %(default)s)")
    p.add_argument("--no-upscale", dest="upscale", action="store_false", help="the standard image protocol")
    p.add_argument("--device", default="cpu")
    p.add_argument("--thresholds", type=float, nargs="+", default=list(grid.thresholds))
    p.add_argument("--errors", nargs="+", choices=ERRORS, default=list(grid.errors))
    p.add_argument("--top-k", type=int, nargs="+", default=list(grid.top_k))
    p.add_argument("--query-k", type=int, nargs="+", default=list(grid.query_k))
    p.add_argument("--dsm-keep", type=int, nargs="+", default=list(grid.dsm_keep))
    p.add_argument("--graph-k", type=int, nargs="+", default=list(grid.graph_k))
    p.add_argument("--alpha", type=float, nargs="+", default=list(grid.alpha))
    p.add_argument("--seeds", nargs="+", choices=SEEDS, default=list(grid.seeds))
    p.add_argument("--similarity-weight", type=float, nargs="+", default=list(grid.similarity_weight))
    p.add_argument("--confident-mads", type=float, nargs="+", default=list(grid.confident_mads))
    p.add_argument("--confident-ratio", type=float, nargs="+", default=list(grid.confident_ratio))
    p.add_argument("--out", required=True, help="JSON with every row")
    args = p.parse_args(argv)
    check_output_file(args.out, "--out")
    from gpu_dsm.extract import ExtractConfig
    from gpu_dsm.pipeline import RetrievalConfig

    cfg = RunConfig(data_root=args.data_root, dataset=args.dataset,
                    retrieval=RetrievalConfig(extract=ExtractConfig(upscale=args.upscale, progress=False)),
                    distractors=args.distractors,
                    cache_dir=args.cache_dir, device=args.device)
    preflight(cfg, RevisitopDataset.load(cfg.data_root, cfg.dataset), files={"--out": args.out})
    grid = dataclasses.replace(grid, thresholds=tuple(args.thresholds), errors=tuple(args.errors), top_k=tuple(args.top_k),
                               query_k=tuple(args.query_k), dsm_keep=tuple(args.dsm_keep),
                               graph_k=tuple(args.graph_k), alpha=tuple(args.alpha), seeds=tuple(args.seeds),
                               similarity_weight=tuple(args.similarity_weight), confident_mads=tuple(args.confident_mads),
                               confident_ratio=tuple(args.confident_ratio))
    if args.cache_dir is None:
        with tempfile.TemporaryDirectory() as tmp:
            report = sweep(cfg, grid, Path(tmp))
    else:
        report = sweep(cfg, grid, Path(args.cache_dir))
    for method in ("global+dsm", "global+D", "global+dsm+D"):
        print(format_rows(report, method))
    write_json(args.out, report)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
