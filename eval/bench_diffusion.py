"""Benchmark of diffusion: kNN graph construction and batched conjugate gradient at scale.

    python -m gpu_dsm.eval.bench_diffusion --nodes 100000 --out results/bench_diffusion_cpu.json

A synthetic database of clustered, L2-normalised descriptors (``--dim``, default 128). Reports:
graph build time and memory for ``--nodes`` (exact chunked products; ``--graph-backend faiss``
for sizes where exact search is too slow, e.g. 1M), ms per query of the batched CG (``--queries``
queries as the columns of one solve) and of ``scipy.sparse.linalg.cg`` one query at a time on
the same system (``--scipy-queries`` of them, float32 and float64), their ratio and the
agreement of the two.
"""
from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch
import torch.nn.functional as F

from gpu_dsm.diffusion import DiffusionConfig, diffuse, plain_seeds
from gpu_dsm.graph import GraphConfig, build_knn_graph
from gpu_dsm.io import write_json
from gpu_dsm.eval.timing import add_device_argument, sync


def clustered(n: int, dim: int, clusters: int, seed: int = 0, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=g)
    labels = torch.randint(0, clusters, (n,), generator=g)
    x = centres[labels] + 0.7 * torch.randn(n, dim, generator=g)
    return F.normalize(x, dim=1).to(device)



def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=100_000, help="database size (default: %(default)s)")
    p.add_argument("--dim", type=int, default=128, help="descriptor dimension (default: %(default)s)")
    p.add_argument("--k", type=int, default=50, help="graph neighbours (default: %(default)s)")
    p.add_argument("--queries", type=int, default=100, help="queries solved together (default: %(default)s)")
    p.add_argument("--scipy-queries", type=int, default=10, help="queries solved by scipy one at a time (default: %(default)s)")
    p.add_argument("--graph-backend", choices=("exact", "faiss"), default="exact", help="(default: %(default)s)")
    add_device_argument(p)
    p.add_argument("--out", default=None, help="results JSON (default: none)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    x = clustered(args.nodes, args.dim, max(10, args.nodes // 500), device=device)
    q = clustered(args.queries, args.dim, max(10, args.nodes // 500), seed=0, device=device)
    result: dict = {"benchmark": "diffusion", "device": str(device), "threads": torch.get_num_threads(),
                    "nodes": args.nodes, "dim": args.dim, "k": args.k, "graph_backend": args.graph_backend}
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    graph = build_knn_graph(x, GraphConfig(k=args.k, backend=args.graph_backend))
    sync(device)
    result["graph_seconds"] = round(time.perf_counter() - start, 2)
    result["graph_edges"] = graph.num_edges
    result["graph_bytes"] = int(graph.num_edges * 12 + (args.nodes + 1) * 8)
    result["peak_rss_growth_mb"] = round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024, 1)
    if device.type == "cuda":
        result["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    print(f"graph: {args.nodes} nodes, {graph.num_edges} edges, {result['graph_seconds']} s")

    sims, ranks = torch.topk(q @ x.T, 100, dim=1)
    seeds = plain_seeds(sims, ranks, args.nodes)
    cfg = DiffusionConfig()
    diffuse(graph.affinity, seeds[:, :2], cfg)  # warm-up
    sync(device)
    start = time.perf_counter()
    f, info = diffuse(graph.affinity, seeds, cfg)
    sync(device)
    batched = (time.perf_counter() - start) / args.queries
    result["cg_ms_per_query_batched"] = round(1000 * batched, 2)
    result["cg_iterations"] = info.iterations

    import scipy.sparse as sp
    import scipy.sparse.linalg as sla

    coo = graph.affinity.cpu().to_sparse_coo().coalesce()
    a = sp.csr_matrix((coo.values().numpy(), coo.indices().numpy()), shape=coo.shape)
    system = (sp.eye(args.nodes, dtype=np.float32, format="csr") - cfg.alpha * a).tocsr()
    y = seeds.cpu().numpy()
    start = time.perf_counter()
    solutions = [sla.cg(system, y[:, i], rtol=cfg.tol, maxiter=cfg.max_iter)[0] for i in range(args.scipy_queries)]
    one_by_one = (time.perf_counter() - start) / args.scipy_queries
    system64 = system.astype(np.float64)
    start = time.perf_counter()
    for i in range(args.scipy_queries):
        sla.cg(system64, y[:, i].astype(np.float64), rtol=cfg.tol, maxiter=cfg.max_iter)
    one_by_one_64 = (time.perf_counter() - start) / args.scipy_queries
    ours = f.cpu().numpy()
    rel = [float(np.linalg.norm(ours[:, i] - s) / np.linalg.norm(s)) for i, s in enumerate(solutions)]
    top = [len(set(np.argsort(-ours[:, i])[:100]) & set(np.argsort(-s)[:100])) / 100 for i, s in enumerate(solutions)]
    result.update(scipy_ms_per_query=round(1000 * one_by_one, 2), speedup=round(one_by_one / batched, 1),
                  scipy_float64_ms_per_query=round(1000 * one_by_one_64, 2), speedup_vs_float64=round(one_by_one_64 / batched, 1),
                  max_relative_difference=max(rel), top100_agreement=min(top))
    print(f"CG: batched {1000 * batched:.2f} ms/query ({args.queries} queries, {info.iterations} iterations), "
          f"scipy one at a time {1000 * one_by_one:.2f} ms/query in float32 ({one_by_one / batched:.1f}x), "
          f"{1000 * one_by_one_64:.2f} in float64 ({one_by_one_64 / batched:.1f}x); "
          f"max relative difference {max(rel):.1e}, top-100 agreement {min(top):.2f}")
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
