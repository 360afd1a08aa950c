"""Benchmark of the global search backends: exact torch search against FAISS flat, IVF-PQ and HNSW.

    python -m gpu_dsm.eval.bench_search --images 1000000 --out results/bench_search.json

Clustered, L2-normalised synthetic descriptors (``--images`` x ``--dim``, the clusters of
``bench_diffusion``), ``--queries`` queries drawn the same way. For each backend: build seconds,
ms per query (all queries in one call), index bytes (FAISS's serialised size; N x D x 4 for the
exact search), and recall@k against the exact search (the fraction of the exact top ``k`` that the
backend returns). No timing is asserted anywhere.
"""
from __future__ import annotations

import time

import torch

from gpu_dsm.io import write_json
from gpu_dsm.knn import GlobalIndex, SearchConfig, similarity_topk
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
    p.add_argument("--backends", default="exact,faiss-flat,faiss-ivfpq,faiss-hnsw", help="(default: %(default)s)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    clusters = max(10, args.images // 500)
    database = clustered(args.images, args.dim, clusters, device=device)
    queries = clustered(args.queries, args.dim, clusters, seed=0, device=device)
    _, exact = similarity_topk(queries, database, args.k)
    report: dict = {"benchmark": "search", "device": str(device), "threads": torch.get_num_threads(), "images": args.images,
                    "dim": args.dim, "queries": args.queries, "k": args.k, "backends": {}}
    for backend in args.backends.split(","):
        cfg = SearchConfig(backend=backend)
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
            size = args.images * args.dim * 4
        row = {"build_s": round(build, 2), "ms_per_query": round(1000 * seconds / args.queries, 3),
               "index_bytes": size, "bytes_per_image": round(size / args.images, 1),
               f"recall_at_{args.k}": round(recall_at_k(found, exact), 4)}
        report["backends"][backend] = row
        print(f"{backend}: {row}", flush=True)
    if args.out:
        write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
