"""Benchmark of spatial verification: one query against 100 candidates, 9 scale pairs.

    python -m gpu_dsm.eval.bench_match --out results/bench_match_cpu.json

Synthetic feature tables shaped like DSM's: 512 features per image (VGG-size; about 390
tentative correspondences per scale pair) and 2048 (ResNet-size; about 1560), channels drawn so
that the correspondence counts match the notes, a third of the candidates sharing a true
upright-affine transform with the query. Reports ms per query for the batched matcher (several
queries batched, ``--queries``) and for the plain reference matcher of the tests (on a few
pairs, extrapolated to 100), their ratio, and the peak GPU memory on CUDA.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

from gpu_dsm.features import LocalFeatures
from gpu_dsm.io import write_json
from gpu_dsm.eval.timing import benchmark_parser, peak_gpu_memory_mb, reset_peak_memory, sync
from gpu_dsm.match import MatchConfig, spatial_verify


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



def main(argv=None) -> dict:
    p = benchmark_parser(__doc__)
    p.add_argument("--queries", type=int, default=2, help="queries verified in one batched call (default: %(default)s)")
    p.add_argument("--reference-pairs", type=int, default=2, help="pairs timed with the plain matcher (default: %(default)s)")
    p.add_argument("--sizes", default="512,2048", help="features per image (default: %(default)s)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from reference_match import verify_pair

    result: dict = {"benchmark": "match", "device": str(device), "threads": torch.get_num_threads(), "tables": {}}
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
        start = time.perf_counter()
        qn = {k: v.numpy() for k, v in q.image(0).items()}
        ref = [verify_pair(qn, {k: v.numpy() for k, v in c.image(i).items()}, threshold=cfg.threshold,
                           symmetric=cfg.error == "symmetric") for i in range(args.reference_pairs)]
        ref_ms = 1000 * (time.perf_counter() - start) / args.reference_pairs * 100
        agree = ref == res.inliers[: args.reference_pairs].cpu().tolist()
        entry = {
            "features_per_image": n,
            "correspondences_per_scale_pair": round(float(corr.mean()) / 9, 1),
            "batched_ms_per_query": round(batched_ms, 1),
            "reference_ms_per_query_extrapolated": round(ref_ms, 1),
            "speedup": round(ref_ms / batched_ms, 1),
            "reference_agrees_on_timed_pairs": agree,
            "inliers_true_matches_mean": float(res.inliers[:100:3].float().mean()),
            "inliers_others_mean": float(res.inliers[:100][torch.arange(100) % 3 != 0].float().mean()),
            "peak_gpu_memory_mb": peak_gpu_memory_mb(device),
        }
        result["tables"][str(n)] = entry
        print(f"{n} features ({entry['correspondences_per_scale_pair']} correspondences per scale pair): batched "
              f"{batched_ms:.0f} ms/query, reference {ref_ms:.0f} ms/query (extrapolated), {ref_ms / batched_ms:.0f}x")
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
