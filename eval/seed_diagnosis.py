"""Which images seed diffusion, per query, and what that does to its AP.

    python -m gpu_dsm.eval.seed_diagnosis --dataset holidays-811 --distractors DIR --no-upscale \\
        --cache-dir C --out eval/results/seeds-holidays-811-dis.json
    python -m gpu_dsm.eval.seed_diagnosis plot eval/results/seeds-holidays-811-dis.json --out docs/assets/seeds.png

The stores are those of ``gpu-dsm evaluate`` (reused from ``--cache-dir``). With the default
re-ranking and graph, for every query it records, for the paper's seeds (`dsm_seeds`: the
top 10 verified, ``inliers / max * similarity``, best 5; `verified_diffusion_seeds`), each seed's database index, inlier
count, weight, whether it is a positive (Medium) and its neighbours in the kNN graph; the
confident matches (`confident_matches`) and how many of the verified seeds (the plain seeds
and the confident matches) are positives; the positives' mean rank before (``global+dsm``) and after each diffusion; and the AP (Medium) of
every method. ``summary`` counts, over the queries where the paper's ``global+dsm+D`` loses more
than 0.1 AP against ``global``, how many of their seeds are positives.

The file is a recorded result file (``gpu_dsm.eval.tables``: command, machine, date, the report).
``plot`` draws it: the inlier counts of the paper's seeds, positives against
negatives (top), and the AP of each diffusion minus ``global``, per query (bottom).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpu_dsm.diffusion import DiffusionConfig
from gpu_dsm.extract import ExtractConfig
from gpu_dsm.io import atomic_write, check_output_file, write_json
from gpu_dsm.pipeline import RetrievalConfig
from gpu_dsm.ranking import diffuse_verified, verified_diffusion_seeds
from gpu_dsm.eval.datasets import RevisitopDataset, default_data_root
from gpu_dsm.eval.protocol import evaluate_revisited, setup_ground_truth
from gpu_dsm.eval.run import RunConfig, dataset_stores, make_retrieval, preflight

LOSS = 0.1  # AP points: a query "loses" below global by more than this


def _seed_rows(seeds: torch.Tensor, inliers: dict[int, int], positives: set[int], degree: torch.Tensor) -> list[dict]:
    rows = []
    for index in seeds.nonzero().flatten().tolist():
        rows.append({"index": index, "weight": float(seeds[index]), "inliers": inliers.get(index),
                     "positive": index in positives, "neighbours": int(degree[index])})
    return sorted(rows, key=lambda r: -r["weight"])


def _mean_rank(ranking: torch.Tensor, positives: set[int]) -> float | None:
    where = [i for i, index in enumerate(ranking.tolist()) if index in positives]
    return float(np.mean(where)) if where else None


def diagnose(cfg: RunConfig, base: Path, log=print) -> dict[str, Any]:
    """Every query's seeds and APs (module docstring) on ``cfg``'s dataset."""
    dataset = RevisitopDataset.load(cfg.data_root, cfg.dataset)
    db_store, q_store = dataset_stores(cfg, dataset, base, log=log)
    retrieval = make_retrieval(cfg)
    database, queries = retrieval.from_store(db_store), retrieval.from_store(q_store)
    result = retrieval.search(queries, database)
    stage = result.stages["global"]
    graph = database.graph
    n = graph.num_nodes
    paper_cfg = dataclasses.replace(cfg.retrieval.diffusion, seeds="paper", similarity_weight=0.0)
    methods = dict(result.methods)
    methods["global+dsm+D (paper)"] = diffuse_verified(graph, stage.scores, stage.reranked, stage.reranked_ranks,
                                                       paper_cfg)[0].cpu()
    aps = {name: evaluate_revisited(ranks.numpy(), dataset.gnd)["AP"]["M"] for name, ranks in methods.items()}
    reranked = stage.reranked
    paper, _ = verified_diffusion_seeds(stage.scores, reranked, stage.reranked_ranks, n, paper_cfg)
    ours, confident = verified_diffusion_seeds(stage.scores, reranked, stage.reranked_ranks, n, cfg.retrieval.diffusion)
    degree = torch.bincount(graph.affinity.to_sparse_coo().coalesce().indices()[0], minlength=n)
    positives_m, _ = setup_ground_truth(dataset.gnd, "M")
    rows = []
    for q, name in enumerate(dataset.qimlist):
        positives = set(np.asarray(positives_m[q]).tolist())
        inliers = dict(zip(reranked.indices[q].tolist(), reranked.inliers[q].tolist()))
        rows.append({
            "query": name, "positives": len(positives),
            "AP": {method: aps[method][q] for method in methods},
            "paper_seeds": _seed_rows(paper[:, q], inliers, positives, degree),
            "verified_seeds": {"seeds": int((ours[:, q] > 0).sum()),
                               "positive": sum(i in positives for i in ours[:, q].nonzero().flatten().tolist())},
            "confident": [{"index": int(i), "inliers": int(c), "positive": int(i) in positives}
                          for i, c, ok in zip(reranked.indices[q], reranked.inliers[q], confident[q]) if ok],
            "positives_mean_rank": {method: _mean_rank(methods[method][q], positives)
                                    for method in ("global+dsm", "global+dsm+D (paper)", "global+dsm+D")},
        })
    return {"benchmark": "seed_diagnosis", "dataset": cfg.dataset, "database": {"images": n, "distractors": n - len(dataset.imlist)},
            "graph_k": graph.k, "alpha": cfg.retrieval.diffusion.alpha_for(n),
            "diffusion": {"confident_mads": cfg.retrieval.diffusion.confident_mads, "confident_ratio": cfg.retrieval.diffusion.confident_ratio,
                          "query_k": cfg.retrieval.diffusion.query_k},
            "queries": rows, "summary": summarize(rows)}


def summarize(rows: list[dict]) -> dict[str, Any]:
    """Over the queries whose paper ``global+dsm+D`` loses more than ``LOSS`` AP against ``global``
    (and over all queries): their number, and the positives among the seeds of each rule."""
    def counts(subset: list[dict]) -> dict[str, Any]:
        out: dict[str, Any] = {"queries": len(subset)}
        for rule in ("paper_seeds", "confident"):
            seeds = [s for r in subset for s in r[rule]]
            out[rule] = {"seeds": len(seeds), "positive": sum(s["positive"] for s in seeds),
                         "mean_inliers_positive": _mean([s["inliers"] for s in seeds if s["positive"]]),
                         "mean_inliers_negative": _mean([s["inliers"] for s in seeds if not s["positive"]])}
        out["verified_seeds"] = {key: sum(r["verified_seeds"][key] for r in subset) for key in ("seeds", "positive")}
        out["positives_mean_rank"] = {method: _mean([r["positives_mean_rank"][method] for r in subset])
                                      for method in ("global+dsm", "global+dsm+D (paper)", "global+dsm+D")}
        return out

    def loses(r: dict) -> bool:
        a, b = r["AP"]["global"], r["AP"]["global+dsm+D (paper)"]
        return a is not None and b is not None and b < a - LOSS

    return {"losing": counts([r for r in rows if loses(r)]), "all": counts(rows)}


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def plot(report: dict[str, Any], path: str | Path) -> Path:
    """The figure of a result file (module docstring), as a PNG, atomically."""
    from PIL import Image

    from gpu_dsm.visualize import draw_delta_plot, draw_inlier_histogram

    seeds = [s for r in report["queries"] for s in r["paper_seeds"] if s["inliers"] is not None]
    hist = draw_inlier_histogram([s["inliers"] for s in seeds if s["positive"]],
                                 [s["inliers"] for s in seeds if not s["positive"]],
                                 title=f"{report['dataset']}: the paper's seeds, inliers", width=720)

    def delta(method: str) -> list:
        return [None if r["AP"]["global"] is None or r["AP"][method] is None else r["AP"][method] - r["AP"]["global"]
                for r in report["queries"]]

    deltas = draw_delta_plot([("paper seeds, diffusion order", delta("global+dsm+D (paper)")),
                              ("verified seeds, fused, confident first", delta("global+dsm+D"))],
                             title=f"{report['dataset']}: AP (Medium) minus global, per query")
    canvas = Image.new("RGB", (720, hist.height + deltas.height), (255, 255, 255))
    canvas.paste(hist, (0, 0))
    canvas.paste(deltas, (0, hist.height))
    return atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["plot"]:
        p = argparse.ArgumentParser(prog="python -m gpu_dsm.eval.seed_diagnosis plot")
        p.add_argument("report", help="a result file of this script")
        p.add_argument("--out", required=True, help="the PNG to write")
        args = p.parse_args(argv[1:])
        check_output_file(args.out, "--out")
        from gpu_dsm.eval.compare import load_report

        recorded = load_report(args.report)
        print(f"written to {plot(recorded.get('report', recorded), args.out)}")
        return 0
    root = default_data_root()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default=str(root) if root else None, required=root is None,
                   help="folder holding <dataset>/ (default: $GPU_DSM_DATA, else ../shared/data)")
    p.add_argument("--dataset", default="roxford5k-19q", help="revisitop dataset (default: %(default)s)")
    p.add_argument("--distractors", default=None, help="distractor folder appended to the database (default: none)")
    p.add_argument("--cache-dir", default=".gpu_dsm_cache", help="feature store cache (default: %(default)s)")
    p.add_argument("--no-upscale", dest="upscale", action="store_false",
                   help="the standard image protocol (default: enlarge, as gpu-dsm evaluate)")
    p.add_argument("--out", required=True, help="results JSON")
    args = p.parse_args(argv)
    retrieval = RetrievalConfig(extract=ExtractConfig(upscale=args.upscale, progress=False), diffusion=DiffusionConfig())
    cfg = RunConfig(data_root=args.data_root, dataset=args.dataset, retrieval=retrieval, distractors=args.distractors,
                    cache_dir=args.cache_dir)
    preflight(cfg, RevisitopDataset.load(cfg.data_root, cfg.dataset), files={"--out": args.out})
    report = diagnose(cfg, Path(args.cache_dir))
    for subset, c in report["summary"].items():
        p_, v = c["paper_seeds"], c["verified_seeds"]
        print(f"{subset}: {c['queries']} queries; paper seeds {p_['positive']}/{p_['seeds']} positive; "
              f"verified seeds {v['positive']}/{v['seeds']} positive; confident {c['confident']['positive']}/"
              f"{c['confident']['seeds']}")
    from gpu_dsm.eval.tables import record_benchmark

    command = "python -m gpu_dsm.eval.seed_diagnosis " + " ".join(argv)
    write_json(args.out, record_benchmark(report, command))  # a result file the docs' tables read
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
