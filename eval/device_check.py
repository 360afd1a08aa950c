"""One prepared device check: every device path against the CPU path on real data, then every
benchmark at a size that fits, all figures in one JSON.

    python -m gpu_dsm.eval.device_check --device cuda --out device.json        # one H100/H200, < 5 min
    python -m gpu_dsm.eval.device_check --device cpu --tiny --out check.json   # the same code, seconds (CI)

Checks (EfficientNet-Lite0 activations of roxford5k-mini photos; each records ``ok`` and the
largest difference):

- labelling: ``kernels.labelling.label_planes`` with the device's backend (``propagate``) against
  scipy on the CPU, on the threshold planes of real maps: identical labels;
- MSER: ``gpu_dsm.mser`` of all channels on the device against the CPU: identical regions;
- detection: ``detect`` on the device against the CPU: identical feature tables;
- matching: ``spatial_verify`` of every query/database pair on the device against the CPU:
  identical inlier counts;
- diffusion: the kNN graph and CG solve on the device against the CPU: relative difference of the
  solutions and the same top 10;
- ASMK: HOW descriptors, index and search on the device against the CPU: scores (1e-6) and rankings.

Then the benchmarks (``bench_detect``, ``bench_match``, ``bench_diffusion``, ``bench_asmk``, and
``bench_query_path`` on a database of 200k images simulated from the tables detected above) on the
device at sizes chosen to fit the time (``--tiny``: minimal sizes). No timing is asserted.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from gpu_dsm.asmk import ASMKConfig, ASMKIndex, train_codebook
from gpu_dsm.backbones import build_backbone
from gpu_dsm.detect import DetectorConfig, activations_to_levels, detect
from gpu_dsm.diffusion import DiffusionConfig, diffuse, plain_seeds
from gpu_dsm.extract import ExtractConfig, extract_activations
from gpu_dsm.features import LocalFeatures
from gpu_dsm.graph import GraphConfig, build_knn_graph
from gpu_dsm.how import HOWConfig, describe_how, fit_how_whitening
from gpu_dsm.io import write_json
from gpu_dsm.kernels.labelling import label_planes
from gpu_dsm.match import spatial_verify
from gpu_dsm.stable_regions import mser
from gpu_dsm.store import StoreWriter
from gpu_dsm.eval.datasets import RevisitopDataset, default_data_root
from gpu_dsm.eval.timing import benchmark_parser, sync

DSM_MSER = dict(max_variation=0.5, min_diversity=0.7, min_area=0.001, max_area=0.75)


def _region_keys(regions) -> list[tuple]:
    return sorted(zip(regions.map_index.tolist(), regions.level.tolist(), regions.area.tolist(),
                      [tuple(b) for b in regions.bbox.tolist()]))


def check_labelling(levels: torch.Tensor, device: torch.device) -> dict[str, Any]:
    """Threshold planes of real 8-bit maps ``(K, h, w)``, labelled on the device vs scipy on the CPU."""
    thresholds = torch.tensor([1, 8, 32, 96], dtype=levels.dtype)
    masks = (levels[:, None] >= thresholds[None, :, None, None]).reshape(-1, *levels.shape[-2:])
    want, count = label_planes(masks, backend="scipy")
    got, got_count = label_planes(masks.to(device), backend="propagate")
    same = bool(torch.equal(got.cpu().long(), want.long())) and got_count == count
    return {"ok": same, "planes": int(masks.shape[0]), "components": int(count)}


def check_mser(levels: torch.Tensor, device: torch.device, delta: int) -> dict[str, Any]:
    want = mser(levels, delta=delta, **DSM_MSER)
    got = mser(levels.to(device), delta=delta, **DSM_MSER)
    same = _region_keys(got) == _region_keys(want)
    return {"ok": same, "regions": int(want.area.numel()), "maps": int(levels.shape[0])}


def check_detect(maps_per_image, device: torch.device, is_query: bool):
    cfg = DetectorConfig(activation_bound=6.0)
    want = detect(maps_per_image, cfg, is_query)
    got = detect([[m.to(device) for m in maps] for maps in maps_per_image], cfg, is_query)
    same = torch.equal(got.counts.cpu(), want.counts) and all(
        torch.equal(getattr(got, f)[got.valid].cpu(), getattr(want, f)[want.valid]) for f in ("channel", "scale")) and \
        torch.allclose(got.xy[got.valid].cpu(), want.xy[want.valid], atol=1e-4)
    return {"ok": bool(same), "features": want.counts.tolist()}, want


def write_source_store(path: Path, tables: LocalFeatures, descriptors: torch.Tensor, scales) -> Path:
    """A feature store of detected ``tables`` with global ``descriptors (B, K)``: the real tables
    ``bench_query_path`` draws its simulated database from."""
    with StoreWriter(path, [f"image{i}" for i in range(tables.num_images)], descriptors.shape[1], {"device_check": True},
                     local={"scales": list(scales), "num_channels": descriptors.shape[1]}) as writer:
        for i in range(tables.num_images):
            writer.add_global(i, descriptors[i])
            writer.add_local(i, tables.image(i), tables.map_sizes[i])
    return path


def check_match(queries, database, device: torch.device) -> dict[str, Any]:
    q, n = queries.num_images, database.num_images
    candidates = database[[i for _ in range(q) for i in range(n)]]
    query_index = torch.arange(q).repeat_interleave(n)
    want = spatial_verify(queries, candidates, query_index)
    got = spatial_verify(queries.to(device), candidates.to(device), query_index.to(device))
    return {"ok": bool(torch.equal(got.inliers.cpu(), want.inliers)), "pairs": q * n, "inliers": want.inliers.tolist()}


def check_diffusion(descriptors: torch.Tensor, device: torch.device) -> dict[str, Any]:
    graph_cfg, cfg = GraphConfig(k=5), DiffusionConfig(alpha=0.9)
    n = descriptors.shape[0]
    sims, ranks = torch.topk(descriptors @ descriptors.T, min(10, n), dim=1)
    seeds = plain_seeds(sims, ranks, n, 5)
    want, _ = diffuse(build_knn_graph(descriptors, graph_cfg), seeds, cfg)
    got, _ = diffuse(build_knn_graph(descriptors.to(device), graph_cfg), seeds.to(device), cfg)
    relative = float((got.cpu() - want).norm() / want.norm().clamp(min=1e-30))
    k = min(10, n)
    same_top = all(set(torch.topk(got.cpu()[:, j], k).indices.tolist()) == set(torch.topk(want[:, j], k).indices.tolist())
                   for j in range(want.shape[1]))
    return {"ok": relative < 1e-4 and same_top, "relative_difference": relative, "nodes": n}


def check_asmk(backbone, dataset: RevisitopDataset, device: torch.device, how: HOWConfig, images: int) -> dict[str, Any]:
    whitening = fit_how_whitening(backbone, dataset.database_specs()[images:2 * images], how)
    db = describe_how(backbone, dataset.database_specs()[:images], whitening, how)
    queries = describe_how(backbone, dataset.query_specs()[:2], whitening, how)
    codebook = train_codebook(db.descriptors, 64, iterations=5, seed=0)
    cfg = ASMKConfig(codebook_size=64)
    want_scores, want_order = ASMKIndex.build(codebook, db.descriptors, db.image_ids, cfg, db.num_images).search(
        queries.descriptors, queries.image_ids, num_queries=2)
    index = ASMKIndex.build(codebook.to(device), db.descriptors.to(device), db.image_ids.to(device), cfg, db.num_images)
    scores, order = index.search(queries.descriptors.to(device), queries.image_ids.to(device), num_queries=2)
    difference = float((scores.cpu() - want_scores).abs().max())
    # the device may break a near-tie of the float32 assignment differently: allow a tiny score change
    return {"ok": difference < 1e-6 and torch.equal(order.cpu(), want_order), "max_score_difference": difference,
            "entries": index.num_entries}


def _timed(report: dict, name: str, run: Callable[[], Any], device: torch.device) -> None:
    start = time.perf_counter()
    try:
        report[name] = run()
    except Exception as exc:  # noqa: BLE001 - one failing step must not hide the others' figures
        report[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    sync(device)
    if isinstance(report[name], dict):
        report[name]["seconds"] = round(time.perf_counter() - start, 2)
    print(f"{name}: {report[name] if not isinstance(report[name], dict) else {k: v for k, v in report[name].items() if k not in ('inliers', 'features')}}",
          flush=True)


def main(argv: list[str] | None = None) -> dict:
    p = benchmark_parser(__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default=None, help="folder holding roxford5k-mini (default: $GPU_DSM_DATA or ../shared/data)")
    p.add_argument("--tiny", action="store_true", help="minimal sizes (CI on the CPU): the checks' code, not their figures")
    p.add_argument("--skip-benchmarks", action="store_true", help="the checks only")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    root = args.data_root or default_data_root()
    if root is None:
        raise SystemExit("device_check: roxford5k-mini not found (--data-root or GPU_DSM_DATA)")
    dataset = RevisitopDataset.load(root, "roxford5k-mini")
    size, images = (224, 2) if args.tiny else (1024, 4)
    report: dict[str, Any] = {"device": str(device), "tiny": args.tiny, "image_size": size,
                              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    backbone = build_backbone("efficientnet_lite0")
    extract = ExtractConfig(image_size=size, progress=False)
    db_maps = extract_activations(backbone, dataset.database_specs()[:images], extract)
    q_maps = extract_activations(backbone, dataset.query_specs()[:2], extract)
    levels = activations_to_levels(db_maps[0][0], "range", 6.0)[: 64 if args.tiny else 1280]

    _timed(report, "labelling", lambda: check_labelling(levels, device), device)
    _timed(report, "mser", lambda: check_mser(levels, device, delta=6), device)
    tables = {}

    def detect_both():
        found, tables["database"] = check_detect(db_maps, device, False)
        found_q, tables["queries"] = check_detect(q_maps, device, True)
        return {"ok": found["ok"] and found_q["ok"], "database_features": found["features"], "query_features": found_q["features"]}

    _timed(report, "detect", detect_both, device)
    if tables:
        _timed(report, "match", lambda: check_match(tables["queries"], tables["database"], device), device)
    descriptors = torch.nn.functional.normalize(torch.stack([m[0].mean((1, 2)) for m in db_maps + q_maps]), dim=1)
    noisy = torch.nn.functional.normalize(descriptors.repeat(20, 1) + 0.05 * torch.randn(20 * descriptors.shape[0], descriptors.shape[1],
                                                                                     generator=torch.Generator().manual_seed(0)), dim=1)
    _timed(report, "diffusion", lambda: check_diffusion(noisy, device), device)
    how = HOWConfig(image_size=size // 2 if args.tiny else size, num_features=100 if args.tiny else 1000, progress=False)
    _timed(report, "asmk", lambda: check_asmk(backbone, dataset, device, how, images), device)
    report["all_ok"] = all(report[k].get("ok") for k in ("labelling", "mser", "detect", "match", "diffusion", "asmk") if k in report)

    if not args.skip_benchmarks:
        from gpu_dsm.eval import bench_asmk, bench_detect, bench_diffusion, bench_match, bench_query_path

        work = Path(tempfile.mkdtemp(prefix="device-check-"))
        # the mean-pooled descriptors above: the database's rows first, then the queries'
        split_descriptors = {"database": descriptors[:len(db_maps)], "queries": descriptors[len(db_maps):]}
        sources = {split: write_source_store(work / split, tables[split], split_descriptors[split], extract.scales)
                   for split in ("database", "queries")} if tables else {}

        dev = ["--device", str(device)]
        runs = {
            "bench_detect": lambda: bench_detect.main(dev + ["--skip-reference", "--timing-images", "1" if args.tiny else "4"]),
            "bench_match": lambda: bench_match.main(dev + ["--sizes", "64" if args.tiny else "512,2048", "--reference-pairs", "1"]),
            "bench_diffusion": lambda: bench_diffusion.main(dev + ["--nodes", "2000" if args.tiny else "1000000", "--queries", "10" if args.tiny else "100",
                                                               "--scipy-queries", "2", "--repeats", "1" if args.tiny else "3"]),
            "bench_asmk": lambda: bench_asmk.main(dev + ["--part", "simulated", "--images", "2000" if args.tiny else "1000000",
                                                         "--queries", "2" if args.tiny else "10"]),
        }
        if sources:
            runs["bench_query_path"] = lambda: bench_query_path.main(
                dev + ["--source-db", str(sources["database"]), "--source-queries", str(sources["queries"]),
                       "--images", "2000" if args.tiny else "200000", "--queries", "2" if args.tiny else "20",
                       "--work", str(work / "simulated"), "--no-progress"])
        try:
            for name, run in runs.items():
                _timed(report, name, run, device)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    if args.out:
        write_json(args.out, report)
        print(f"written to {args.out}")
    return report


if __name__ == "__main__":
    sys.exit(0 if main().get("all_ok") else 1)
