"""Benchmark of the global search backends: exact torch search against compact search and FAISS
flat, IVF-PQ and HNSW.

    python -m gpu_dsm.eval.bench_search --images 1000000 --out results/bench_search.json
    python -m gpu_dsm.eval.bench_search --stores DB_STORE DISTRACTORS_STORE --query-store Q_STORE \
        --backends exact,compact --out results/search.json

Clustered, L2-normalised synthetic descriptors (``--images`` x ``--dim``, the clusters of
``bench_diffusion``), ``--queries`` queries drawn the same way; or, with ``--stores``, the real
global descriptors of feature stores (``gpu-dsm extract``; the database is their images in
order, the queries those of ``--query-store``). For each backend: build seconds, ms per query
(all queries in one call), index bytes (FAISS's serialised size; N x D x 4 for the exact search;
the compact descriptors for ``compact``, which keeps the full ones too), and recall@k against the
exact search (the fraction of the exact top ``k`` that the backend returns). No timing is
asserted anywhere.
"""
from __future__ import annotations

import dataclasses
import time

import torch

from gpu_dsm.io import write_json
from gpu_dsm.knn import GlobalIndex, SearchConfig, similarity_topk
from gpu_dsm.store import FeatureStore
from gpu_dsm.eval.bench_diffusion import clustered
from gpu_dsm.eval.timing import benchmark_parser, sync


def recall_at_k(found: torch.Tensor, exact: torch.Tensor) -> float:
    """Mean over queries of ``|found_i & exact_i| / |exact_i|`` (rows of database indices)."""
    hits = [len(set(f.tolist()) & set(e.tolist())) / max(e.numel(), 1) for f, e in zip(found.cpu(), exact.cpu())]
    return float(sum(hits) / max(len(hits), 1))


def main(argv=None) -> dict:
    p = benchmark_parser(__doc__)
    p.add_argument("--images", type=int, default=100_000, help="database size (default: %(default)s)")
    p.add_argument("--dim", type=int, default=128, help="descriptor dimension (default: %(default)s)")
    p.add_argument("--queries", type=int, default=100, help="queries (default: %(default)s)")
    p.add_argument("--k", type=int, default=100, help="top-k searched and compared (default: %(default)s)")
    p.add_argument("--backends", default="exact,compact,faiss-flat,faiss-ivfpq,faiss-hnsw",
                   help="comma-separated SearchConfig backends, default settings (default: %(default)s)")
    p.add_argument("--compact-dims", default=str(SearchConfig.compact_dim),
                   help="comma-separated dimensions the compact backend runs with (default: %(default)s, SearchConfig)")
    p.add_argument("--shortlists", default=str(SearchConfig.shortlist),
                   help="comma-separated shortlists the compact backend runs with, a row per dimension and shortlist (default: %(default)s, "
                        "SearchConfig)")
    p.add_argument("--stores", nargs="+", default=None, metavar="STORE",
                   help="real descriptors: the database is these feature stores' images, in order (default: synthetic)")
    p.add_argument("--query-store", default=None, help="with --stores: the queries' feature store")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.stores:
        if not args.query_store:
            raise SystemExit("bench_search: --stores needs --query-store")
        database = torch.cat([FeatureStore(path).global_descriptors() for path in args.stores]).to(device)
        queries = FeatureStore(args.query_store).global_descriptors().to(device)
        source = {"stores": [FeatureStore(path).path.name for path in args.stores],
                  "query_store": FeatureStore(args.query_store).path.name}
    else:
        clusters = max(10, args.images // 500)
        database = clustered(args.images, args.dim, clusters, device=device)
        queries = clustered(args.queries, args.dim, clusters, seed=0, device=device)
        source = "synthetic"
    images, dim = database.shape
    _, exact = similarity_topk(queries, database, args.k)
    report: dict = {"benchmark": "search", "device": str(device), "threads": torch.get_num_threads(), "images": images,
                    "dim": dim, "queries": queries.shape[0], "k": args.k, "descriptors": source, "backends": {}}
    runs = [(backend, SearchConfig(backend=backend)) for backend in args.backends.split(",") if backend != "compact"]
    if "compact" in args.backends.split(","):
        runs += [(f"compact {int(d)}-D, shortlist {int(n)}", SearchConfig(backend="compact", compact_dim=int(d), shortlist=int(n)))
                 for d in args.compact_dims.split(",") for n in args.shortlists.split(",")]
    for backend, cfg in runs:
        start = time.perf_counter()
        index = GlobalIndex.build(database, cfg)
        sync(device)
        build = time.perf_counter() - start
        index.search(queries[:1], args.k)  # warm-up
        sync(device)
        start = time.perf_counter()
        _, found = index.search(queries, args.k)
        sync(device)
        seconds = time.perf_counter() - start
        if index.faiss_index is not None:
            import faiss

            size = int(faiss.serialize_index(index.faiss_index).size)
        else:
            stored = index.compact if index.compact is not None else database
            size = stored.element_size() * stored.numel()
        row = {"build_s": round(build, 2), "ms_per_query": round(1000 * seconds / queries.shape[0], 3),
               "index_bytes": size, "bytes_per_image": round(size / images, 1), "config": dataclasses.asdict(cfg),
               f"recall_at_{args.k}": round(recall_at_k(found, exact), 4),
               f"worst_query_recall_at_{args.k}": round(min(recall_at_k(f[None], e[None]) for f, e in zip(found, exact)), 4)}
        report["backends"][backend] = row
        print(f"{backend}: {row}", flush=True)
    if args.out:
        write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
