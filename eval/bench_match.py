"""Benchmark of spatial verification against OpenCV's RANSAC, on real tables.

    python -m gpu_dsm.eval.bench_match --out results/bench_match_cpu.json

Real tables: every query of roxford5k-mini (default) against the top 100 of its global ranking,
extracted at the default 1024 px (EfficientNet-Lite0). On exactly the same tentative
correspondences (every scale pair of every (query, candidate) pair, feature-map pixels) it times

- the project: `gpu_dsm.match.spatial_verify` with the C kernel (``native``) and with tensor
  passes (``torch``), from the feature tables (correspondences included);
- OpenCV: ``cv2.estimateAffine2D`` (6 dof) and ``cv2.estimateAffinePartial2D`` (4 dof), RANSAC,
  reprojection threshold 4 px (the default one-way threshold), 2000 iterations, confidence 0.99,
  from correspondences already gathered (their gathering is not timed), two ways: one call per
  scale pair of at least 3 correspondences, the pair's count the best over its scale pairs (the
  project's groups); and one call per image pair with all its scale pairs' correspondences, their
  points brought to the feature map of the first scale (``map_sizes``);

with one thread and with all threads (OpenCV's calls spread over a thread pool; it releases the
GIL). Reports ms per query (wall, best of --repeat, and the process CPU time of that run), OpenCV's time over the project's (the ratio: > 1 means the project is
faster), and how many pairs' inlier counts agree with OpenCV's within one inlier (OpenCV's inliers
counted like the project's: each feature once). ``--reference-pairs`` also times the plain
float64 matcher (`gpu_dsm.reference.match`) on a few pairs and checks both backends against
it there. For the torch backend it also counts, per batch (one query with its top K, one
``spatial_verify`` call), the operator launches and host syncs a GPU run would make
(`gpu_dsm.eval.timing.count_launches`, from ``torch.profiler``'s record of the aten
operators); on the CPU also with the chunks a GPU would use (the CPU's are cut to its cache).
Without opencv-python-headless (``pip install gpu_dsm[bench]``) OpenCV is reported as
unavailable and the rest runs.

``--sizes 512,2048`` instead runs synthetic tables shaped like DSM's (a third of the candidates
sharing a true transform with the query): the batched matcher against the plain one.
"""
from __future__ import annotations

import datetime
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from gpu_dsm import match
from gpu_dsm.eval.timing import benchmark_parser, count_launches, peak_gpu_memory_mb, reset_peak_memory, sync
from gpu_dsm.features import LocalFeatures
from gpu_dsm.io import write_json
from gpu_dsm.match import MatchConfig, spatial_verify, tentative_correspondences
from gpu_dsm.reference.match import match_pair

RANSAC = {"ransacReprojThreshold": 4.0, "maxIters": 2000, "confidence": 0.99}
OPENCV_METHODS = ("estimateAffine2D", "estimateAffinePartial2D")


def real_tables(data_root: str | Path, dataset: str = "roxford5k-mini", top_k: int = 100, image_size: int = 1024,
                queries: int | None = None, backbone: str = "efficientnet_lite0"):
    """Local features of a revisitop set's queries and of the top ``top_k`` of each query's global
    ranking: ``(query LocalFeatures (Q), candidate LocalFeatures (Q * K, query-major), query_index (Q * K,))``."""
    from gpu_dsm.backbones import build_backbone
    from gpu_dsm.eval.datasets import RevisitopDataset
    from gpu_dsm.extract import ExtractConfig
    from gpu_dsm.pipeline import DSMRetrieval, RetrievalConfig

    data = RevisitopDataset.load(data_root, dataset)
    retrieval = DSMRetrieval(build_backbone(backbone),
                             RetrievalConfig(extract=ExtractConfig(image_size=image_size, progress=False)))
    specs = data.query_specs()[:queries]
    q = retrieval.describe(specs, is_query=True)
    db = retrieval.describe(data.database_specs())
    k = min(top_k, db.global_descriptors.shape[0])
    ranks = (q.global_descriptors @ db.global_descriptors.T).topk(k, dim=1).indices
    return q.local, db.local[ranks.reshape(-1)], torch.arange(len(specs)).repeat_interleave(k)


def correspondence_groups(query: LocalFeatures, candidates: LocalFeatures, query_index: torch.Tensor, num_scales: int):
    """Per (pair, scale pair) group: ``(pair, x1 (C, 2) float32, x2 (C, 2) float32, qrow, crow)``."""
    corr = tentative_correspondences(query, candidates, query_index, num_scales)
    groups, sizes = torch.unique_consecutive(corr["group"], return_counts=True)
    x1 = query.xy[query_index[corr["pair"]], corr["qrow"]].numpy()
    x2 = candidates.xy[corr["pair"], corr["crow"]].numpy()
    out, start = [], 0
    for g, n in zip((groups // (num_scales * num_scales)).tolist(), sizes.tolist()):
        rows = slice(start, start + n)
        out.append((g, np.ascontiguousarray(x1[rows]), np.ascontiguousarray(x2[rows]), corr["qrow"][rows].numpy(),
                    corr["crow"][rows].numpy()))
        start += n
    return out


def pair_correspondences(query: LocalFeatures, candidates: LocalFeatures, query_index: torch.Tensor,
                         num_scales: int):
    """Per (query, candidate) pair with correspondences, all its scale pairs together: ``(pair, x1 (C, 2)
    float32, x2 (C, 2) float32, qrow, crow)``, points in pixels of the first scale's feature map."""
    corr = tentative_correspondences(query, candidates, query_index, num_scales)
    pair, qrow, crow = corr["pair"], corr["qrow"], corr["crow"]
    qi = query_index[pair]

    def first_scale(features, image, row):
        sizes = features.map_sizes[image].float()  # (C, S, 2) (height, width)
        scale = features.scale[image, row]
        ratio = sizes[:, 0].flip(-1) / sizes.gather(1, scale[:, None, None].expand(-1, 1, 2))[:, 0].flip(-1)
        return (features.xy[image, row] * ratio).numpy()

    x1, x2 = first_scale(query, qi, qrow), first_scale(candidates, pair, crow)
    pairs, sizes = torch.unique_consecutive(pair, return_counts=True)
    out, start = [], 0
    for p, n in zip(pairs.tolist(), sizes.tolist()):
        rows = slice(start, start + n)
        out.append((p, np.ascontiguousarray(x1[rows]), np.ascontiguousarray(x2[rows]), qrow[rows].numpy(),
                    crow[rows].numpy()))
        start += n
    return out


def opencv_counts(cv2, method: str, groups, num_pairs: int, threads: int) -> np.ndarray:
    """OpenCV RANSAC per group; each pair's best count (each feature once) over its groups."""
    estimate = getattr(cv2, method)

    def one(group):
        pair, x1, x2, qrow, crow = group
        if len(x1) < 3:
            return pair, 0
        _, mask = estimate(x1, x2, method=cv2.RANSAC, **RANSAC)
        if mask is None:
            return pair, 0
        inl = mask.ravel().astype(bool)
        return pair, min(len(set(qrow[inl].tolist())), len(set(crow[inl].tolist())))

    if threads <= 1:
        results = [one(g) for g in groups]
    else:
        with ThreadPoolExecutor(threads) as pool:
            results = list(pool.map(one, groups, chunksize=16))
    counts = np.zeros(num_pairs, dtype=np.int64)
    for pair, n in results:
        counts[pair] = max(counts[pair], n)
    return counts


def _best_of(repeat: int, fn):
    """Shortest wall time of ``repeat`` runs, the process CPU time of that run, and its result."""
    best, cpu, out = float("inf"), float("inf"), None
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), time.process_time()
        out = fn()
        seconds = time.perf_counter() - start
        if seconds < best:
            best, cpu = seconds, time.process_time() - start_cpu
    return best, cpu, out


def _machine(device: torch.device) -> dict:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu or "none",
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__}


def compare_with_opencv(args, device: torch.device) -> dict:
    try:
        import cv2
    except ImportError:
        cv2 = None
    if args.tables_cache and Path(args.tables_cache).is_file():
        q, c, qi = torch.load(args.tables_cache, weights_only=False)
    else:
        from gpu_dsm.eval.datasets import default_data_root

        root = args.data_root or default_data_root()
        if root is None:
            raise SystemExit("bench_match: no data root (--data-root or GPU_DSM_DATA)")
        q, c, qi = real_tables(root, args.dataset, args.top_k, args.image_size, args.real_queries)
        if args.tables_cache:
            Path(args.tables_cache).parent.mkdir(parents=True, exist_ok=True)
            torch.save((q, c, qi), args.tables_cache)
    num_queries, num_pairs = q.num_images, c.num_images
    num_scales = max(len(q.scales), len(c.scales), 1)
    corr = tentative_correspondences(q, c, qi, num_scales)
    per_pair = torch.bincount(corr["pair"], minlength=num_pairs)
    _, sizes = torch.unique_consecutive(corr["group"], return_counts=True)
    result = {
        "tables": {"dataset": args.dataset, "queries": num_queries, "pairs": num_pairs, "image_size": args.image_size,
                   "correspondences_per_pair_median": int(per_pair.median()), "correspondences_per_pair_max": int(per_pair.max()),
                   "hypothesis_evaluations_per_query": int((sizes.long() ** 2).sum()) // max(num_queries, 1)},
        "opencv": cv2.__version__ if cv2 is not None else "unavailable (pip install opencv-python-headless)",
        "opencv_settings": {**RANSAC, "method": "RANSAC",
                            "calls": "one per scale pair with >= 3 correspondences (estimateAffine2D, "
                                     "estimateAffinePartial2D), or one per image pair, all scale pairs' correspondences "
                                     "in the first scale's pixels (*_per_pair)"},
        "runs": {},
    }
    calls = {"": correspondence_groups(q, c, qi, num_scales), "_per_pair": pair_correspondences(q, c, qi, num_scales)}
    all_threads = args.threads or os.cpu_count() or 1
    saved_threads = torch.get_num_threads()
    qd, cd, qid = q.to(device), c.to(device), qi.to(device)
    for threads in sorted({1, all_threads}):
        torch.set_num_threads(threads)
        if cv2 is not None:
            cv2.setNumThreads(threads)
        run: dict = {}
        counts = {}
        for backend in ("native", "torch"):
            if backend == "native" and device.type != "cpu":
                continue
            cfg = MatchConfig(backend=backend)
            spatial_verify(qd[:1], cd[:2], qid[:2] * 0, cfg)  # warm-up (builds the C kernel)

            def project():
                out = spatial_verify(qd, cd, qid, cfg)
                sync(device)
                return out

            seconds, cpu, res = _best_of(args.repeat, project)
            counts[backend] = res.inliers.cpu().numpy()
            run[backend] = {"ms_per_query": round(1000 * seconds / num_queries, 2),
                            "cpu_ms_per_query": round(1000 * cpu / num_queries, 2)}
        if "native" in counts:
            run["native_equals_torch"] = bool((counts["native"] == counts["torch"]).all())
        project_counts = counts.get("native", counts["torch"])
        for method, suffix in [(m, x) for x in calls for m in OPENCV_METHODS] if cv2 is not None else []:
            seconds, cpu, cv_counts = _best_of(args.repeat, lambda: opencv_counts(cv2, method, calls[suffix], num_pairs,
                                                                                  threads))
            ms = 1000 * seconds / num_queries
            entry = {"ms_per_query": round(ms, 2), "cpu_ms_per_query": round(1000 * cpu / num_queries, 2),
                     "pairs_within_one_inlier": int((np.abs(cv_counts - project_counts) <= 1).sum()),
                     "pairs": num_pairs, "inliers_mean": round(float(cv_counts.mean()), 2)}
            for backend in ("native", "torch"):
                if backend in run:
                    entry[f"ratio_vs_{backend}"] = round(ms / run[backend]["ms_per_query"], 2)
            run[method + suffix] = entry
        run["project_inliers_mean"] = round(float(project_counts.mean()), 2)
        result["runs"][f"{threads}_threads"] = run
        line = ", ".join(f"{k} {v['ms_per_query']:.1f} ms/query" for k, v in run.items() if isinstance(v, dict))
        print(f"{threads} thread(s): {line}")
        for method in [m + x for x in calls for m in OPENCV_METHODS]:
            if method in run and "ratio_vs_native" in run[method]:
                print(f"  {method}: {run[method]['ratio_vs_native']}x the native kernel's time, "
                      f"{run[method]['pairs_within_one_inlier']}/{num_pairs} pairs within one inlier")
    torch.set_num_threads(saved_threads)
    result["torch_launches"] = torch_launches(qd, cd, qid)
    if device.type == "cpu":
        result["torch_launches_gpu_plan"] = torch_launches(qd, cd, qid, gpu_plan=True)
    for key, plan in (("torch_launches", f"chunks planned for {device.type}"),
                      ("torch_launches_gpu_plan", "chunks planned for a GPU")):
        if key in result:
            counted = result[key]
            print(f"torch: launches per batch {counted['launches_per_batch']:.0f}, host syncs per batch "
                  f"{counted['host_syncs_per_batch']:.0f} ({plan}; a batch: {counted['batch']})")
    if args.reference_pairs:
        result["reference"] = _check_reference(q, c, qi, args.reference_pairs)
        print(f"plain float64 matcher: {result['reference']['ms_per_query_extrapolated']:.0f} ms/query "
              f"(extrapolated from {args.reference_pairs} pairs), backends agree: {result['reference']['agree']}")
    return result


def torch_launches(q: LocalFeatures, c: LocalFeatures, qi: torch.Tensor, top_ops: int = 12,
                   gpu_plan: bool = False) -> dict:
    """Operator launches and host syncs of the torch backend per batch, a batch being one query
    with its candidates (one ``spatial_verify`` call, as the re-ranker makes per query batch of
    one); the mean over the queries, the largest, and the operators that launch or sync most.
    ``gpu_plan``: with the chunks a GPU would use (the CPU's are cut to its cache)."""
    cfg = MatchConfig(backend="torch")
    counts, by_op = [], {}
    for query in range(q.num_images):
        rows = (qi == query).nonzero().squeeze(1)
        with mock.patch.dict(match._CHUNKS, clear=gpu_plan):
            count, _ = count_launches(spatial_verify, q[query:query + 1], c[rows], torch.zeros_like(rows), cfg)
        counts.append((count.launches, count.host_syncs))
        for name, entry in count.by_op.items():
            total = by_op.setdefault(name, {"launches": 0, "host_syncs": 0})
            for key in total:
                total[key] += entry[key]
    n = max(len(counts), 1)
    ranked = sorted(by_op.items(), key=lambda item: -(item[1]["launches"] + 100 * item[1]["host_syncs"]))[:top_ops]
    return {"batch": f"one query with its top {c.num_images // max(q.num_images, 1)} (one spatial_verify call)",
            "batches": len(counts), "launches_per_batch": round(sum(a for a, _ in counts) / n, 1),
            "host_syncs_per_batch": round(sum(b for _, b in counts) / n, 1),
            "launches_max": max((a for a, _ in counts), default=0),
            "host_syncs_max": max((b for _, b in counts), default=0),
            "per_batch_by_operator": {name: {k: round(v / n, 1) for k, v in entry.items()} for name, entry in ranked},
            "counted": "torch.profiler on the features' device (eval/timing.py count_launches)"}


def _check_reference(q, c, qi, pairs: int) -> dict:
    """The plain matcher on the first ``pairs`` pairs: its time per query and whether both backends equal it."""
    pairs = min(pairs, c.num_images)
    cfg = MatchConfig()
    got = {b: spatial_verify(q, c[:pairs], qi[:pairs], MatchConfig(backend=b)).inliers.tolist() for b in ("native", "torch")}
    start = time.perf_counter()
    want = [match_pair({k: v.numpy() for k, v in q.image(int(qi[p])).items()}, {k: v.numpy() for k, v in c.image(p).items()},
                       threshold=cfg.threshold, symmetric=cfg.error == "symmetric").inliers for p in range(pairs)]
    seconds = time.perf_counter() - start
    per_query = c.num_images / max(q.num_images, 1)
    return {"pairs": pairs, "ms_per_query_extrapolated": round(1000 * seconds / pairs * per_query, 1),
            "agree": all(got[b] == want for b in got)}


def synthetic_tables(num_features: int, active_channels: int, num_candidates: int, seed: int = 0):
    """A query and ``num_candidates`` candidates; every third candidate is a true match."""
    g = torch.Generator().manual_seed(seed)

    def image(n):
        xy = torch.rand(n, 2, generator=g) * torch.tensor([32.0, 24.0])
        frame = torch.zeros(n, 2, 2)
        frame[:, 0, 0] = torch.rand(n, generator=g) * 2 + 0.5
        frame[:, 1, 0] = torch.randn(n, generator=g) * 0.3
        frame[:, 1, 1] = torch.rand(n, generator=g) * 2 + 0.5
        return {"xy": xy, "frame": frame, "strength": torch.rand(n, generator=g),
                "channel": torch.randint(0, active_channels, (n,), generator=g),
                "scale": torch.randint(0, 3, (n,), generator=g)}

    query = image(num_features)
    cands = []
    for c in range(num_candidates):
        cand = image(num_features)
        if c % 3 == 0:  # a true match: 40% of the query's features under one transform
            n = int(0.4 * num_features)
            T = torch.tensor([[1.1, 0.0], [0.1, 0.9]])
            cand["xy"][:n] = query["xy"][:n] @ T.T + torch.tensor([2.0, -1.0]) + 0.3 * torch.randn(n, 2, generator=g)
            cand["frame"][:n] = T @ query["frame"][:n]
            cand["channel"][:n] = query["channel"][:n]
            cand["scale"][:n] = query["scale"][:n]
        cands.append(cand)
    sizes = torch.tensor([[32, 24], [23, 17], [16, 12]])
    q = LocalFeatures.from_images([query], sizes[None], (1.0, 0.7071, 0.5), 1280)
    c = LocalFeatures.from_images(cands, sizes[None].expand(num_candidates, 3, 2), (1.0, 0.7071, 0.5), 1280)
    return q, c


def synthetic(args, device: torch.device) -> dict:
    """The batched matcher (default backend) against the plain one on synthetic tables."""
    result = {}
    cfg = MatchConfig()
    for n in (int(s) for s in args.sizes.split(",")):
        active = 74 if n <= 512 else 300  # per scale pair: (n/3)^2 / active ~ 390 (512) or ~1560 (2048)
        q, c = synthetic_tables(n, active, 100)
        qs = LocalFeatures.cat([q] * args.queries).to(device)
        cs = LocalFeatures.cat([c] * args.queries).to(device)
        qi = torch.arange(args.queries, device=device).repeat_interleave(100)
        spatial_verify(qs[:1], cs[:3], qi[:3] * 0, cfg)  # warm-up
        sync(device)
        reset_peak_memory(device)
        start = time.perf_counter()
        res = spatial_verify(qs, cs, qi, cfg)
        sync(device)
        batched_ms = 1000 * (time.perf_counter() - start) / args.queries
        corr = res.correspondences[:100].float()
        pairs = max(1, args.reference_pairs)
        start = time.perf_counter()
        qn = {k: v.numpy() for k, v in q.image(0).items()}
        ref = [match_pair(qn, {k: v.numpy() for k, v in c.image(i).items()}, threshold=cfg.threshold,
                          symmetric=cfg.error == "symmetric").inliers for i in range(pairs)]
        ref_ms = 1000 * (time.perf_counter() - start) / pairs * 100
        entry = {
            "features_per_image": n,
            "correspondences_per_scale_pair": round(float(corr.mean()) / 9, 1),
            "batched_ms_per_query": round(batched_ms, 1),
            "reference_ms_per_query_extrapolated": round(ref_ms, 1),
            "speedup": round(ref_ms / batched_ms, 1),
            "reference_agrees_on_timed_pairs": ref == res.inliers[:pairs].cpu().tolist(),
            "inliers_true_matches_mean": float(res.inliers[:100:3].float().mean()),
            "inliers_others_mean": float(res.inliers[:100][torch.arange(100) % 3 != 0].float().mean()),
            "peak_gpu_memory_mb": peak_gpu_memory_mb(device),
        }
        result[str(n)] = entry
        print(f"{n} features ({entry['correspondences_per_scale_pair']} correspondences per scale pair): batched "
              f"{batched_ms:.0f} ms/query, reference {ref_ms:.0f} ms/query (extrapolated), {ref_ms / batched_ms:.0f}x")
    return result


def main(argv=None) -> dict:
    p = benchmark_parser(__doc__)
    p.add_argument("--data-root", default=None, help="revisitop data root (default: GPU_DSM_DATA or ../shared/data)")
    p.add_argument("--dataset", default="roxford5k-mini", help="default: %(default)s")
    p.add_argument("--real-queries", type=int, default=None, help="first queries of the set (default: all)")
    p.add_argument("--top-k", type=int, default=100, help="candidates per query (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=1024, help="extraction size, px (default: %(default)s)")
    p.add_argument("--tables-cache", default=None, help="save the extracted tables here, or load them if present")
    p.add_argument("--threads", type=int, default=None, help="'all threads' run (default: the machine's cores)")
    p.add_argument("--repeat", type=int, default=3, help="best of this many runs (default: %(default)s)")
    p.add_argument("--reference-pairs", type=int, default=2, help="pairs timed with the plain matcher (default: %(default)s)")
    p.add_argument("--sizes", default=None, help="synthetic tables of these features per image instead, e.g. 512,2048")
    p.add_argument("--queries", type=int, default=2, help="synthetic: queries verified in one call (default: %(default)s)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    result: dict = {"benchmark": "match", "command": " ".join([Path(sys.executable).name, "-m", "gpu_dsm.eval.bench_match",
                                                              *(sys.argv[1:] if argv is None else argv)]),
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "device": str(device), "machine": _machine(device), "threads": torch.get_num_threads()}
    if args.sizes:
        result["tables"] = synthetic(args, device)
    else:
        result.update(compare_with_opencv(args, device))
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
