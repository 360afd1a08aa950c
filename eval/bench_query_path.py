"""Benchmark of the whole query path on a simulated database of a million images, memory-mapped on disk.

    gpu-dsm extract --dataset roxford5k-19q --out STORES          # real tables to draw from
    python -m gpu_dsm.eval.bench_query_path --source-db STORES/<database store> \\
        --source-queries STORES/<queries store> --images 1000000 --work /tmp/query-path --out qp.json

The simulated database (written once under ``--work``, reused while its parameters match):

- global descriptors: ``--images`` x D (D of the source store, 1280 for EfficientNet-Lite0), L2
  normalised, in clusters of ``--cluster-size`` images around random centres (``noise`` spread);
- local feature tables: image ``i`` holds the table of a source database image drawn at random,
  so the counts, channels, positions, shapes and strengths are those of real images (a query's top
  100 at 1M is mostly unrelated images: random real tables are that);
- the kNN graph: ``--graph-degree`` neighbours per node (a mutual kNN graph at k = 50 keeps about
  half: 0.55 k measured on holidays-811 at k = 5), a ``--cross-fraction`` of them outside the
  node's cluster so the graph is one component (diffusion cannot restrict itself to a few
  clusters: the costly case), weights drawn as similarity^3, normalised like
  `gpu_dsm.graph.build_knn_graph`.

Both are ordinary ``gpu_dsm`` files: a `FeatureStore` directory and a saved `KnnGraph`.
Queries: ``--queries`` source query tables (cycled) with simulated global descriptors drawn like
the database's. Stages, ``--batch`` queries at a time, each timed on its own: ``search`` (the top
``max(--top-k, --output-k, R)`` of the global descriptors, read through the memory map),
``gather`` (the candidates' tables from disk), ``verify`` (spatial verification,
`DSMReranker`), ``diffuse`` (the library's ``global+dsm+D``,
`gpu_dsm.ranking.diffuse_verified`: seeds from the verified top, CG on the whole graph or,
with ``--truncation-size R``, on each query's top R, the fused ranking of the searched images),
``rank`` (its top ``--output-k``, on the host). Reported: ms per
query per stage, peak memory (process RSS, memory-mapped pages included; CUDA allocations on a
GPU), disk bytes, and what the stages found (inliers, CG iterations). No timing is asserted.
"""
from __future__ import annotations

import dataclasses
import json
import resource
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.lib.format import open_memmap
from tqdm import tqdm

from gpu_dsm.diffusion import ConvergenceWarning, DiffusionConfig
from gpu_dsm.graph import KnnGraph, normalised_affinity
from gpu_dsm.io import atomic_directory, atomic_write, write_json
from gpu_dsm.ranking import diffuse_verified
from gpu_dsm.rerank import DSMReranker, RerankConfig
from gpu_dsm.knn import GlobalIndex, SearchConfig, SEARCH_BACKENDS
from gpu_dsm.store import LOCAL_FIELDS, STORE_FORMAT, STORE_VERSION, FeatureStore
from gpu_dsm.eval.bench_search import recall_at_k
from gpu_dsm.eval.timing import benchmark_parser, peak_gpu_memory_mb, reset_peak_memory, sync

#: images written at once when the simulated store is filled (bounds the writer's memory)
_WRITE_CHUNK = 1 << 15


def cluster_centres(clusters: int, dim: int, seed: int) -> torch.Tensor:
    """``(clusters, dim)`` centres of the simulated descriptors (the same for database and queries)."""
    return torch.randn(clusters, dim, generator=torch.Generator().manual_seed(seed))


def simulated_descriptors(labels: torch.Tensor, centres: torch.Tensor, noise: float, generator: torch.Generator) -> torch.Tensor:
    """``(n, D)`` L2-normalised ``centre[label] + noise * N(0, I)``."""
    x = centres[labels] + noise * torch.randn(labels.numel(), centres.shape[1], generator=generator)
    return F.normalize(x, dim=1)


def simulate_store(path: str | Path, source: FeatureStore, num_images: int, cluster_size: int = 500, noise: float = 0.7,
                   seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """Write a store of ``num_images`` simulated images to ``path`` (atomically) from ``source``'s tables.

    Returns ``{"labels": (N,) cluster of each image, "source_image": (N,) the source image whose
    table each image holds, "centres": (C, D)}``.
    """
    if not source.has_local:
        raise ValueError(f"simulate_store: the source store {source.path} holds no local features")
    if num_images < 1 or cluster_size < 1:
        raise ValueError(f"simulate_store: need num_images >= 1 and cluster_size >= 1, got {num_images}, {cluster_size}")
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    dim = int(source.meta["global_dim"])
    clusters = max(1, num_images // cluster_size)
    centres = cluster_centres(clusters, dim, seed)
    labels = torch.from_numpy(rng.integers(0, clusters, num_images))
    source_image = rng.integers(0, source.num_images, num_images)
    counts = source.feature_counts()[source_image]
    starts = np.cumsum(counts) - counts
    local_meta = source.meta["local"]
    # the source's arrays, small, in memory; the simulated ones go straight to disk
    arrays = source.local_arrays()
    src = {name: np.asarray(arrays[name]) for name in LOCAL_FIELDS}
    src_start = np.asarray(arrays["start"], dtype=np.int64)
    with atomic_directory(path) as tmp:
        glob = open_memmap(tmp / "global.npy", mode="w+", dtype=np.float32, shape=(num_images, dim))
        local = {name: open_memmap(tmp / f"local_{name}.npy", mode="w+", dtype=src[name].dtype,
                                   shape=(int(counts.sum()), *shape)) for name, (_, shape) in LOCAL_FIELDS.items()}
        for lo in tqdm(range(0, num_images, _WRITE_CHUNK), desc="simulated store", unit="chunk", disable=not progress):
            hi = min(lo + _WRITE_CHUNK, num_images)
            glob[lo:hi] = simulated_descriptors(labels[lo:hi], centres, noise, generator).numpy()
            c = counts[lo:hi]
            rows = np.repeat(src_start[source_image[lo:hi]], c) + np.arange(c.sum()) - np.repeat(np.cumsum(c) - c, c)
            for name in LOCAL_FIELDS:
                local[name][starts[lo]:starts[lo] + c.sum()] = src[name][rows]
        for array in (glob, *local.values()):
            array.flush()
        del glob, local
        np.save(tmp / "local_start.npy", starts.astype(np.int64))
        np.save(tmp / "local_count.npy", counts.astype(np.int32))
        np.save(tmp / "map_sizes.npy", np.asarray(arrays["map_sizes"])[source_image].astype(np.int32))
        meta = {"format": STORE_FORMAT, "version": STORE_VERSION, "num_images": num_images,
                "names": [f"sim{i:07d}" for i in range(num_images)], "global_dim": dim,
                "options": {"simulated_from": str(source.path), "cluster_size": cluster_size, "noise": noise, "seed": seed},
                "local": {"num_features": int(counts.sum()), "scales": local_meta["scales"],
                          "num_channels": local_meta["num_channels"]}}
        (tmp / "meta.json").write_text(json.dumps(meta) + "\n")
    return {"labels": labels, "source_image": torch.from_numpy(source_image), "centres": centres}


def simulate_graph(labels: torch.Tensor, degree: int = 25, cross_fraction: float = 0.1, gamma: float = 3.0,
                   seed: int = 0) -> KnnGraph:
    """A symmetric graph on ``N = labels.numel()`` nodes: ``degree / 2`` random neighbours per node,
    a ``cross_fraction`` of them in any cluster and the rest in the node's own, both directions kept
    (mean degree about ``degree``), weights ``s^gamma`` with ``s ~ U(0.5, 1)``, normalised
    ``D^-1/2 W D^-1/2``."""
    n = labels.numel()
    per_node = max(1, degree // 2)
    generator = torch.Generator().manual_seed(seed)
    members = torch.argsort(labels, stable=True)
    size = torch.bincount(labels, minlength=int(labels.max()) + 1)
    first = torch.cumsum(size, 0) - size
    rows = torch.arange(n).repeat_interleave(per_node)
    same = members[first[labels[rows]] + (torch.rand(rows.numel(), generator=generator) * size[labels[rows]]).long()]
    anywhere = torch.randint(0, n, (rows.numel(),), generator=generator)
    cols = torch.where(torch.rand(rows.numel(), generator=generator) < cross_fraction, anywhere, same)
    keep = rows != cols
    rows, cols = rows[keep], cols[keep]
    weights = (0.5 + 0.5 * torch.rand(rows.numel(), generator=generator)).pow(gamma)
    # both directions, an edge drawn twice keeps one weight (the larger)
    key = torch.cat([rows * n + cols, cols * n + rows])
    unique, inverse = torch.unique(key, return_inverse=True)
    weights = torch.zeros(unique.numel()).scatter_reduce_(0, inverse, torch.cat([weights, weights]), "amax")
    return KnnGraph(normalised_affinity(unique // n, unique % n, weights, n), per_node * 2, gamma, mutual=False)


def _reset_peak_rss() -> None:
    """Start a new resident-set high-water mark (Linux: ``clear_refs`` 5; elsewhere the peak is the process's)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss_mb() -> float:
    """Peak resident set since `_reset_peak_rss` (``VmHWM``), in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


@dataclass
class SimulatedDatabase:
    """What `prepare` made or found: the store and graph, and how they were drawn."""

    store: FeatureStore
    graph: KnnGraph
    centres: torch.Tensor  # (C, D) cluster centres (queries are drawn around them too)
    labels: torch.Tensor  # (N,) cluster of each image
    source_image: torch.Tensor  # (N,) the source database image whose table each image holds
    timings: dict[str, Any]  # seconds to write the store and build the graph (empty when reused)


def prepare(work: Path, source_db: FeatureStore, images: int, cluster_size: int, noise: float, degree: int,
            cross_fraction: float, seed: int, log=print, progress: bool = False) -> SimulatedDatabase:
    """The simulated store and graph under ``work``, made, or reused when their parameters match."""
    params = {"source": str(source_db.path.resolve()), "source_key": source_db.key, "images": images,
              "cluster_size": cluster_size, "noise": noise, "degree": degree, "cross_fraction": cross_fraction, "seed": seed}
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    params_file, store_dir, graph_file, drawn = work / "params.json", work / "store", work / "graph.pt", work / "drawn.npz"
    timings: dict[str, Any] = {}
    if params_file.is_file() and json.loads(params_file.read_text()) == params and all(
            p.exists() for p in (store_dir, graph_file, drawn)):
        log(f"reusing the simulated database in {work}")
        with np.load(drawn) as saved:
            labels, source_image = torch.from_numpy(saved["labels"]), torch.from_numpy(saved["source_image"])
    else:
        params_file.unlink(missing_ok=True)
        start = time.perf_counter()
        made = simulate_store(store_dir, source_db, images, cluster_size, noise, seed, progress)
        labels, source_image = made["labels"], made["source_image"]
        atomic_write(drawn, lambda p: np.savez(open(p, "wb"), labels=labels.numpy(), source_image=source_image.numpy()))
        timings["write_store_s"] = round(time.perf_counter() - start, 1)
        start = time.perf_counter()
        simulate_graph(labels, degree, cross_fraction, seed=seed).save(graph_file)
        timings["build_graph_s"] = round(time.perf_counter() - start, 1)
        write_json(params_file, params)
        log(f"simulated database written to {work}: {timings}")
    centres = cluster_centres(max(1, images // cluster_size), int(source_db.meta["global_dim"]), seed)
    return SimulatedDatabase(FeatureStore(store_dir), KnnGraph.load(graph_file), centres, labels, source_image, timings)


def query_path(store: FeatureStore, index: GlobalIndex, graph: KnnGraph, queries_global: torch.Tensor, query_tables,
               top_k: int = 100, output_k: int = 1000, batch: int = 10, rerank: RerankConfig | None = None,
               diffusion: DiffusionConfig | None = None, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Run the query path for every query, ``batch`` at a time, timing each stage.

    ``queries_global (Q, D)`` and ``query_tables`` (`LocalFeatures` of ``Q`` queries) on
    ``device``; ``graph`` on ``device``. Returns ``{"seconds": {stage: total}, "indices": (Q, top_k)
    re-ranked candidates, "inliers": (Q, top_k), "searched": (Q, S) the global search's top
    ``S = max(top_k, output_k, R)``, "ranking": (Q, output_k) (the library's
    ``global+dsm+D`` of the searched top ``max(top_k, output_k, R)``, `diffuse_verified`),
    "cg_iterations": [...], "peak_rss_mb": {stage: MiB}}``.
    """
    device = torch.device(device)
    reranker = DSMReranker(rerank or RerankConfig(top_k=top_k))
    dcfg = diffusion or DiffusionConfig()
    seconds = dict.fromkeys(("search", "gather", "verify", "diffuse", "rank"), 0.0)
    peak: dict[str, float] = {}
    out: dict[str, list] = {"indices": [], "inliers": [], "ranking": [], "searched": [], "cg_iterations": [],
                            "cg_residual": []}
    op = graph.operator(dcfg.dtype)

    def timed(stage, run):
        sync(device)
        start = time.perf_counter()
        result = run()
        sync(device)
        seconds[stage] += time.perf_counter() - start
        peak[stage] = _peak_rss_mb()
        return result

    # the final ranking covers the searched images: the top output_k, and the top R truncated diffusion solves on
    searched = min(max(top_k, output_k, dcfg.truncation_size or 0), graph.num_nodes)
    for lo in range(0, queries_global.shape[0], batch):
        hi = min(lo + batch, queries_global.shape[0])
        sims, top = timed("search", lambda: index.search(queries_global[lo:hi], searched))
        candidates = timed("gather", lambda: store.local_features(top[:, :top_k].reshape(-1).cpu().numpy(), device=device))
        result = timed("verify", lambda: reranker(query_tables[list(range(lo, hi))], candidates, sims[:, :top_k],
                                                  top[:, :top_k]))

        def diffuse_batch():
            ranks = torch.cat([result.indices.to(top.device), top[:, top_k:]], dim=1)  # the re-ranked top, then the rest
            with warnings.catch_warnings():  # 20 iterations at alpha 0.99: the residual is reported instead
                warnings.simplefilter("ignore", ConvergenceWarning)
                return diffuse_verified(op, sims, result, ranks, dcfg)

        ranking, info = timed("diffuse", diffuse_batch)
        ranking = timed("rank", lambda: ranking[:, :output_k].cpu())
        out["searched"].append(top.cpu())
        out["indices"].append(result.indices.cpu())
        out["inliers"].append(result.inliers.cpu())
        out["ranking"].append(ranking)
        out["cg_iterations"].append(info.iterations)
        out["cg_residual"].append(float(info.relative_residual.max()))
    return {"seconds": seconds, "peak_rss_mb": peak, "cg_iterations": out.pop("cg_iterations"),
            "cg_residual": out.pop("cg_residual"),
            **{name: torch.cat(parts) for name, parts in out.items()}}


def main(argv=None) -> dict:
    p = benchmark_parser(__doc__)
    p.add_argument("--source-db", required=True, help="a database feature store with local features (gpu-dsm extract)")
    p.add_argument("--source-queries", required=True, help="a queries feature store with local features")
    p.add_argument("--work", required=True, help="folder of the simulated store and graph (reused while the parameters match)")
    p.add_argument("--images", type=int, default=1_000_000, help="simulated database size (default: %(default)s, R1M)")
    p.add_argument("--queries", type=int, default=20, help="queries timed (source query tables, cycled; default: %(default)s)")
    p.add_argument("--batch", type=int, default=10, help="queries per batch through every stage (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=100, help="candidates verified per query (default: %(default)s, paper 4.1)")
    p.add_argument("--output-k", type=int, default=1000, help="length of the final ranking (default: %(default)s)")
    p.add_argument("--cluster-size", type=int, default=500, help="images per descriptor cluster (default: %(default)s)")
    p.add_argument("--noise", type=float, default=0.7, help="spread of a cluster around its centre (default: %(default)s)")
    p.add_argument("--graph-degree", type=int, default=25,
                   help="mean graph degree (default: %(default)s: about 0.55 k at the paper's k = 50, measured on holidays-811)")
    p.add_argument("--cross-fraction", type=float, default=0.1,
                   help="fraction of a node's neighbours outside its cluster (default: %(default)s: one connected graph)")
    p.add_argument("--search", choices=SEARCH_BACKENDS, default="exact",
                   help="global search backend; an approximate one is also measured by its recall against the exact "
                        "search on the same queries (default: %(default)s)")
    p.add_argument("--compact-dim", type=int, default=SearchConfig.compact_dim,
                   help="--search compact: dimensions of the compact descriptors (default: %(default)s, SearchConfig)")
    p.add_argument("--shortlist", type=int, default=SearchConfig.shortlist,
                   help="--search compact: candidates re-scored per query (default: %(default)s, SearchConfig)")
    p.add_argument("--truncation-size", type=int, default=None, metavar="R",
                   help="truncated diffusion on each query's top R (DiffusionConfig.truncation_size) (default: none, the "
                        "whole graph)")
    p.add_argument("--paper-rule-too", action="store_true",
                   help="also time the paper's diffusion rule (DSM seeds, the diffusion order alone) on the same queries "
                        "after the default rule, and report its stages and the default's diffuse + rank time over "
                        "the paper's (default: off)")
    p.add_argument("--seed", type=int, default=0, help="seed of the simulated database and queries (default: %(default)s)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar while the database is written")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.queries < 1 or args.batch < 1 or args.top_k < 1 or args.output_k < 1:
        raise SystemExit("bench_query_path: --queries, --batch, --top-k and --output-k must be >= 1")
    source_db, source_q = FeatureStore(args.source_db), FeatureStore(args.source_queries)
    if not (source_db.has_local and source_q.has_local):
        raise SystemExit("bench_query_path: both source stores need local features (extract with a detector)")
    work = Path(args.work)
    simulated = prepare(work, source_db, args.images, args.cluster_size, args.noise, args.graph_degree,
                        args.cross_fraction, args.seed, progress=args.progress)
    store, graph, centres = simulated.store, simulated.graph, simulated.centres
    reset_peak_memory(device)
    _reset_peak_rss()  # the simulation's memory is not the query path's
    start = time.perf_counter()
    with warnings.catch_warnings():  # read-only memory map: pages are read on demand, never written
        warnings.simplefilter("ignore", UserWarning)
        database = torch.from_numpy(np.load(store.path / "global.npy", mmap_mode="r"))
    search_cfg = SearchConfig(backend=args.search, compact_dim=args.compact_dim, shortlist=args.shortlist)
    index = GlobalIndex.build(database.to(device), search_cfg)
    graph = graph.to(device)
    graph.operator(DiffusionConfig().dtype)
    load_s = time.perf_counter() - start
    generator = torch.Generator().manual_seed(args.seed + 7)
    labels = torch.randint(0, centres.shape[0], (args.queries,), generator=generator)
    queries_global = simulated_descriptors(labels, centres, args.noise, generator).to(device)
    query_tables = source_q.local_features(np.arange(args.queries) % source_q.num_images, device=device)
    dcfg = DiffusionConfig(truncation_size=args.truncation_size)
    query_path(store, index, graph, queries_global[:1], query_tables[[0]], args.top_k, args.output_k, 1, diffusion=dcfg,
               device=device)  # warm-up
    run = query_path(store, index, graph, queries_global, query_tables, args.top_k, args.output_k, args.batch,
                     diffusion=dcfg, device=device)
    per_query = {stage: round(1000 * s / args.queries, 2) for stage, s in run["seconds"].items()}
    recall = None
    if args.search != "exact":  # what the approximate search loses, on the same queries (not timed)
        searched = run["searched"].shape[1]
        exact = GlobalIndex.build(database.to(device)).search(queries_global, searched)[1].cpu()
        recall = {f"at_{k}": round(recall_at_k(run["searched"][:, :k], exact[:, :k]), 4)
                  for k in sorted({args.top_k, searched})}
    paper_rule = None
    if args.paper_rule_too:
        paper_cfg = dataclasses.replace(dcfg, seeds="paper", similarity_weight=0.0)
        paper_run = query_path(store, index, graph, queries_global, query_tables, args.top_k, args.output_k, args.batch,
                               diffusion=paper_cfg, device=device)
        paper_ms = {stage: round(1000 * s / args.queries, 2) for stage, s in paper_run["seconds"].items()}
        ours, theirs = (run["seconds"]["diffuse"] + run["seconds"]["rank"],
                        paper_run["seconds"]["diffuse"] + paper_run["seconds"]["rank"])
        paper_rule = {"ms_per_query": {**paper_ms, "total": round(sum(paper_ms.values()), 2)},
                      "diffuse_and_rank_ratio": round(ours / theirs, 3),
                      "total_ratio": round(sum(run["seconds"].values()) / sum(paper_run["seconds"].values()), 3)}
    counts = store.feature_counts()
    report = {
        "benchmark": "query_path", "device": str(device), "threads": torch.get_num_threads(),
        "images": args.images, "queries": args.queries, "batch": args.batch, "top_k": args.top_k, "output_k": args.output_k,
        "search": args.search, "search_config": dataclasses.asdict(search_cfg), "recall_vs_exact": recall,
        "truncation_size": args.truncation_size, "global_dim": int(store.meta["global_dim"]),
        "local_features_per_image": round(float(counts.mean()), 1), "graph_nodes": graph.num_nodes, "graph_edges": graph.num_edges,
        "ms_per_query": {**per_query, "total": round(sum(per_query.values()), 2)},
        "load_s": round(load_s, 2), "prepare": simulated.timings,
        "peak_rss_mb": run["peak_rss_mb"], "peak_gpu_mb": peak_gpu_memory_mb(device),
        "disk_bytes": {"store": _disk_bytes(store.path), "graph": (work / "graph.pt").stat().st_size},
        "mean_inliers_top_k": round(float(run["inliers"].float().mean()), 2), "cg_iterations": run["cg_iterations"],
        "cg_largest_relative_residual": max(run["cg_residual"]),
        "source_db": str(source_db.path), "source_queries": str(source_q.path),
        "diffusion_rule": {"seeds": dcfg.seeds, "similarity_weight": dcfg.similarity_weight,
                           "confident_mads": dcfg.confident_mads, "confident_ratio": dcfg.confident_ratio},
        "paper_rule": paper_rule,
    }
    report["disk_bytes"]["per_image"] = round(sum(report["disk_bytes"].values()) / args.images, 1)
    print(json.dumps({k: report[k] for k in ("images", "ms_per_query", "peak_rss_mb", "disk_bytes")}), flush=True)
    if args.out:
        write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
