"""Benchmark of diffusion: kNN graph construction and batched conjugate gradient at scale.

    python -m gpu_dsm.eval.bench_diffusion --nodes 100000 --out results/bench_diffusion_cpu.json

A synthetic database of clustered, L2-normalised descriptors (``--dim``, default 128). Reports:
graph build time and memory for ``--nodes`` (exact chunked products; ``--graph-backend faiss``
for sizes where exact search is too slow, e.g. 1M), ms per query of the batched CG (``--queries``
queries as the columns of one solve) and of ``scipy.sparse.linalg.cg`` one query at a time on
the same system (``--scipy-queries`` of them, float32 and float64), their ratio and the
agreement of the two. Timings are the median of ``--repeats`` runs.

The graph's structure decides how much the solve restricted to the seeded connected
components saves: with the default ``--noise 0.7`` the clusters barely touch and the mutual
kNN graph falls apart into about a thousand components; ``--noise 1.5`` gives one giant
component (99.9% of the nodes), where only the kernels' speed counts. Both are reported with
the fraction of nodes the batch reaches; ``--no-restrict`` solves on the whole graph.
"""
from __future__ import annotations

import resource
import time

import numpy as np
import torch
import torch.nn.functional as F

from gpu_dsm.diffusion import DiffusionConfig, conjugate_gradient, plain_seeds
from gpu_dsm.graph import GraphConfig, build_knn_graph
from gpu_dsm.io import write_json
from gpu_dsm.eval.timing import benchmark_parser, peak_gpu_memory_mb, reset_peak_memory, sync


def clustered(n: int, dim: int, clusters: int, seed: int = 0, device="cpu", noise: float = 0.7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=g)
    labels = torch.randint(0, clusters, (n,), generator=g)
    x = centres[labels] + noise * torch.randn(n, dim, generator=g)
    return F.normalize(x, dim=1).to(device)



def main(argv=None) -> dict:
    p = benchmark_parser(__doc__)
    p.add_argument("--nodes", type=int, default=100_000, help="database size (default: %(default)s)")
    p.add_argument("--dim", type=int, default=128, help="descriptor dimension (default: %(default)s)")
    p.add_argument("--k", type=int, default=50, help="graph neighbours (default: %(default)s)")
    p.add_argument("--queries", type=int, default=100, help="queries solved together (default: %(default)s)")
    p.add_argument("--scipy-queries", type=int, default=10, help="queries solved by scipy one at a time (default: %(default)s)")
    p.add_argument("--graph-backend", choices=("exact", "faiss"), default="exact", help="(default: %(default)s)")
    p.add_argument("--noise", type=float, default=0.7, help="spread of the clusters (see above; default: %(default)s)")
    p.add_argument("--no-restrict", action="store_true", help="solve on the whole graph, not the seeded components")
    p.add_argument("--repeats", type=int, default=3, help="timed runs, median reported (default: %(default)s)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    x = clustered(args.nodes, args.dim, max(10, args.nodes // 500), device=device, noise=args.noise)
    q = clustered(args.queries, args.dim, max(10, args.nodes // 500), seed=0, device=device, noise=args.noise)
    result: dict = {"benchmark": "diffusion", "device": str(device), "threads": torch.get_num_threads(),
                    "nodes": args.nodes, "dim": args.dim, "k": args.k, "graph_backend": args.graph_backend,
                    "noise": args.noise, "restrict": not args.no_restrict}
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    reset_peak_memory(device)
    start = time.perf_counter()
    graph = build_knn_graph(x, GraphConfig(k=args.k, backend=args.graph_backend))
    sync(device)
    result["graph_seconds"] = round(time.perf_counter() - start, 2)
    result["graph_edges"] = graph.num_edges
    result["graph_bytes"] = int(graph.num_edges * 12 + (args.nodes + 1) * 8)
    result["peak_rss_growth_mb"] = round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024, 1)
    if device.type == "cuda":
        result["peak_gpu_memory_mb"] = peak_gpu_memory_mb(device)
    print(f"graph: {args.nodes} nodes, {graph.num_edges} edges, {result['graph_seconds']} s")

    sims, ranks = torch.topk(q @ x.T, 100, dim=1)
    seeds = plain_seeds(sims, ranks, args.nodes)
    cfg = DiffusionConfig()
    start = time.perf_counter()
    op = graph.operator(cfg.dtype)  # once per graph: node order, threads
    components = op.components
    sync(device)
    result["operator_seconds"] = round(time.perf_counter() - start, 2)
    reached = op.reached_by(op.to_internal(seeds.to(cfg.dtype)))
    result["components"] = int(components.max()) + 1
    result["largest_component_fraction"] = round(float(torch.bincount(components).max()) / args.nodes, 4)
    result["reached_fraction"] = round(float(reached.float().mean()), 4)

    def solve():
        return conjugate_gradient(op, seeds, cfg.alpha_for(args.nodes), cfg.tol, cfg.max_iter,
                                  restrict=not args.no_restrict)

    solve()  # warm-up
    runs = []
    for _ in range(args.repeats):
        sync(device)
        start = time.perf_counter()
        f, info = solve()
        sync(device)
        runs.append((time.perf_counter() - start) / args.queries)
    batched = float(np.median(runs))
    result["cg_ms_per_query_batched"] = round(1000 * batched, 2)
    result["cg_iterations"] = info.iterations
    print(f"operator {result['operator_seconds']} s; {result['components']} components (largest "
          f"{result['largest_component_fraction']:.1%}); the batch reaches {result['reached_fraction']:.1%} of the nodes")

    import scipy.sparse as sp
    import scipy.sparse.linalg as sla

    coo = graph.affinity.cpu().to_sparse_coo().coalesce()
    a = sp.csr_matrix((coo.values().numpy(), coo.indices().numpy()), shape=coo.shape)
    system = (sp.eye(args.nodes, dtype=np.float32, format="csr") - cfg.alpha_for(args.nodes) * a).tocsr()
    y = seeds.cpu().numpy()

    def one_by_one(matrix, dtype):
        times, solutions = [], None
        for _ in range(args.repeats):
            start = time.perf_counter()
            solutions = [sla.cg(matrix, y[:, i].astype(dtype), rtol=cfg.tol, maxiter=cfg.max_iter)[0]
                         for i in range(args.scipy_queries)]
            times.append((time.perf_counter() - start) / args.scipy_queries)
        return float(np.median(times)), solutions

    one_by_one_32, solutions = one_by_one(system, np.float32)
    one_by_one_64, _ = one_by_one(system.astype(np.float64), np.float64)
    ours = f.cpu().numpy()
    rel = [float(np.linalg.norm(ours[:, i] - s) / np.linalg.norm(s)) for i, s in enumerate(solutions)]
    top = [len(set(np.argsort(-ours[:, i])[:100]) & set(np.argsort(-s)[:100])) / 100 for i, s in enumerate(solutions)]
    result.update(scipy_ms_per_query=round(1000 * one_by_one_32, 2), speedup=round(one_by_one_32 / batched, 1),
                  scipy_float64_ms_per_query=round(1000 * one_by_one_64, 2), speedup_vs_float64=round(one_by_one_64 / batched, 1),
                  max_relative_difference=max(rel), top100_agreement=min(top))
    print(f"CG: batched {1000 * batched:.2f} ms/query ({args.queries} queries, {info.iterations} iterations), "
          f"scipy one at a time {1000 * one_by_one_32:.2f} ms/query in float32 ({one_by_one_32 / batched:.1f}x), "
          f"{1000 * one_by_one_64:.2f} in float64 ({one_by_one_64 / batched:.1f}x); "
          f"max relative difference {max(rel):.1e}, top-100 agreement {min(top):.2f}")
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
