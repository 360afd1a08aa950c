"""Benchmark of the DSM detector: stage times against the network's forward, agreement with the
plain VLFeat port, level-step recall.

    python -m gpu_dsm.eval.bench_detect --skip-reference --out eval/results/bench-detect.json

1. Speed, on ``--threads`` threads (default one): per image (3 scales), the time of each stage of
   `gpu_dsm.detect.detect` with the default rules: levels and delta, MSER (regions,
   stability, moments), and the rest (clutter, strength, caps, NMS, frames: the whole call minus
   the two), for the C kernel (``backend="native"``, the CPU default) and for the tensor path
   with scipy labelling (what the CPU ran before the kernel, and what ``labelling="scipy"``
   runs), in the same run; whether their features are identical; the network's forward
   (extraction, images loaded and resized, 3 scales) of the same images, for the ratio.
   Workloads: EfficientNet-Lite0 on real roxford5k-mini images at 1024 px, without and with
   activation upsampling (stride 16), the authors' rules (``DetectorConfig.reference()``, C
   kernel only), and synthetic activations with real sparsity shaped like VGG16 (512x64x64) and
   ResNet101 (2048x32x32) at 1024 px. On a GPU, the tensor path with propagate labelling alone.
2. Agreement: batched MSER vs ``gpu_dsm.reference.mser`` on all channels of real
   EfficientNet-Lite0 activations (regions compared, identical fraction; slow, pure Python).
3. ``level_step`` > 1: recall of the exact regions on the real activations.

``--out`` writes a result file (``command``, ``machine``, ``date``, the report), shown by the
docs' generated ``detect`` table (``python -m gpu_dsm.eval.tables``).
"""
from __future__ import annotations

import sys
import time

import numpy as np
import torch
from scipy import ndimage

from gpu_dsm.backbones import build_backbone
from gpu_dsm.detect import DetectorConfig, activations_to_levels, auto_delta, detect
from gpu_dsm.extract import ExtractConfig, extract_activations
from gpu_dsm.io import write_json
from gpu_dsm.eval.tables import record_benchmark
from gpu_dsm.eval.timing import benchmark_parser, sync
from gpu_dsm.mser import mser
from gpu_dsm.eval.datasets import RevisitopDataset, default_data_root

DSM = dict(max_variation=0.5, min_diversity=0.7, min_area=0.001, max_area=0.75)
FEATURE_FIELDS = ("xy", "frame", "strength", "channel", "scale", "valid")


def _synthetic_activations(channels: int, size: int, seed: int = 0, device="cpu") -> list[torch.Tensor]:
    """Sparse, blobby activations at 3 scales (about 10% non-zero, values 0..~60 like VGG conv5)."""
    rng = np.random.default_rng(seed)
    out = []
    for scale in (1.0, 2 ** -0.5, 0.5):
        s = max(3, int(size * scale))
        x = ndimage.gaussian_filter(rng.random((channels, s, s)).astype(np.float32), (0, 1.2, 1.2))
        x = (x - x.mean((1, 2), keepdims=True)) / (x.std((1, 2), keepdims=True) + 1e-6)
        out.append(torch.from_numpy(np.maximum(x - 1.3, 0) * 40).to(device))
    return out


def _timed(fn, device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def _stages(maps, cfg: DetectorConfig, bound, device) -> dict:
    """Seconds of each stage for one image (all its scales): levels and delta, MSER, whole call."""
    mode = "range" if bound is not None else "round"

    def levels_and_deltas():
        return [(activations_to_levels(a, mode, bound), a) for a in maps], None

    levels_s, (prepared, _) = _timed(levels_and_deltas, device)
    delta_s, deltas = _timed(lambda: [auto_delta(levels) for levels, _ in prepared], device)
    mser_s, _ = _timed(lambda: [mser(levels, delta=d, values=a.float(), backend=cfg.labelling, **DSM)
                                for (levels, a), d in zip(prepared, deltas)], device)
    total_s, features = _timed(lambda: detect([maps], cfg, activation_bound=bound), device)
    return {"levels_and_delta": levels_s + delta_s, "mser": mser_s, "total": total_s, "features": features}


def _workload(images, cfg: DetectorConfig, bound, device, paths: dict[str, str], forward_s: float | None) -> dict:
    """Mean stage times (ms per image) of ``images`` for each labelling path, after a warm-up."""
    out = {"images": len(images), "shape_scale1": list(images[0][0].shape), "paths": {}}
    features = {}
    for label, backend in paths.items():
        path_cfg = DetectorConfig(**{**cfg.__dict__, "labelling": backend})
        _stages(images[0], path_cfg, bound, device)  # warm-up (and the C kernel's first build)
        runs = [_stages(maps, path_cfg, bound, device) for maps in images]
        ms = {key: round(1000 * float(np.mean([r[key] for r in runs])), 1) for key in ("levels_and_delta", "mser", "total")}
        ms["rest"] = round(ms["total"] - ms["levels_and_delta"] - ms["mser"], 1)
        ms["features"] = float(np.mean([int(r["features"].counts[0]) for r in runs]))
        out["paths"][label] = ms
        features[label] = [r["features"] for r in runs]
    if len(features) > 1:
        first, *others = features.values()
        out["identical"] = all(torch.equal(getattr(a, name), getattr(b, name))
                               for other in others for a, b in zip(first, other) for name in FEATURE_FIELDS)
    if forward_s is not None:
        out["forward_ms"] = round(1000 * forward_s, 1)
    return out


def _extract(backbone, specs, device):
    """Activations of ``specs`` (1024 px, 3 scales) and the forward's seconds per image."""
    _timed(lambda: extract_activations(backbone, specs[:1], ExtractConfig(progress=False)), device)  # warm-up
    seconds, acts = _timed(lambda: extract_activations(backbone, specs, ExtractConfig(progress=False)), device)
    return acts, seconds / len(specs)


def _region_keys(res):
    return {(int(m), int(l), int(a), tuple(int(v) for v in b)) for m, l, a, b in zip(res.map_index, res.level, res.area, res.bbox)}


def main(argv=None) -> dict:
    p = benchmark_parser(__doc__)
    p.add_argument("--agreement-images", type=int, default=3, help="images checked against the reference (default: %(default)s)")
    p.add_argument("--timing-images", type=int, default=6, help="real images timed (default: %(default)s)")
    p.add_argument("--upsampled-images", type=int, default=2,
                   help="real images timed with activation upsampling, whose tensor path takes seconds each (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch and C kernel threads (default: %(default)s, figures per core)")
    p.add_argument("--skip-reference", action="store_true", help="skip the (slow, pure Python) reference check")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    command = " ".join(["python", "-m", "gpu_dsm.eval.bench_detect", *(sys.argv[1:] if argv is None else argv)])
    result: dict = {"benchmark": "detect", "device": str(device), "threads": torch.get_num_threads()}
    dataset = RevisitopDataset.load(default_data_root(), "roxford5k-mini")
    backbone = build_backbone("efficientnet_lite0").to(device)
    wanted = max(args.agreement_images, args.timing_images, args.upsampled_images, 1)
    specs = dataset.database_specs()[:: max(1, len(dataset.imlist) // wanted)][:wanted]
    acts, forward_s = _extract(backbone, specs, device)
    if device.type == "cpu":
        paths = {"native": "auto", "tensor": "scipy"}
    else:
        paths = {"tensor": "auto"}

    timings = {}
    cfg = DetectorConfig()
    timings["efficientnet_lite0 1024 px (real)"] = _workload(acts[: args.timing_images], cfg, 6.0, device, paths, forward_s)
    upsampled = build_backbone("efficientnet_lite0", upsample=True).to(device)
    up_acts, up_forward_s = _extract(upsampled, specs[: args.upsampled_images], device)
    timings["efficientnet_lite0 1024 px with upsampling (real, stride 16)"] = _workload(
        up_acts, cfg, 6.0, device, paths, up_forward_s)
    timings["efficientnet_lite0 1024 px (real), the authors' rules"] = _workload(
        acts[: args.timing_images], DetectorConfig.reference(), 6.0, device, {next(iter(paths)): next(iter(paths.values()))},
        forward_s)
    for name, channels, size in (("vgg16-like 512x64x64 (synthetic)", 512, 64), ("resnet101-like 2048x32x32 (synthetic)", 2048, 32)):
        maps = _synthetic_activations(channels, size, device=device)
        timings[name] = _workload([maps], DetectorConfig(levels="round"), None, device, paths, None)
    for name, entry in timings.items():
        line = "; ".join(f"{label}: {ms['total']:.0f} ms per image (levels {ms['levels_and_delta']:.0f}, MSER {ms['mser']:.0f}, "
                         f"rest {ms['rest']:.0f})" for label, ms in entry["paths"].items())
        forward = f"; forward {entry['forward_ms']:.0f} ms" if "forward_ms" in entry else ""
        same = f"; identical features: {entry['identical']}" if "identical" in entry else ""
        print(f"{name}: {line}{forward}{same}")
    result["timing"] = timings

    if not args.skip_reference:
        from gpu_dsm.reference.mser import mser_reference

        compared = identical = 0
        for maps in acts[: args.agreement_images]:
            a = maps[0]
            levels = activations_to_levels(a, "range", 6.0)
            delta = auto_delta(levels)
            got = _region_keys(mser(levels, delta=delta, **DSM).to("cpu"))
            expected = set()
            for k, m in enumerate((255 - levels.long()).cpu().numpy()):
                for r in mser_reference(m, delta, **DSM):
                    ys, xs = np.divmod(np.asarray(r["pixels"]), m.shape[1])
                    expected.add((k, 255 - r["value"], len(r["pixels"]), (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))))
            compared += len(expected | got)
            identical += len(expected & got)
        result["agreement"] = {"images": args.agreement_images, "maps_per_image": int(acts[0][0].shape[0]),
                               "regions_compared": compared, "identical_fraction": identical / max(compared, 1)}
        print(f"agreement with the reference: {identical}/{compared} regions identical")

    recall = {}
    for step in (2, 4, 8):
        hit = total = 0
        for maps in acts[: args.timing_images]:
            levels = activations_to_levels(maps[0], "range", 6.0)
            delta = auto_delta(levels)
            exact = {(k[0], k[2], k[3]) for k in _region_keys(mser(levels, delta=delta, **DSM))}
            coarse = {(k[0], k[2], k[3]) for k in _region_keys(mser(levels, delta=delta, level_step=step, **DSM))}
            hit += len(exact & coarse)
            total += len(exact)
        recall[step] = round(hit / max(total, 1), 3)
    result["level_step_recall"] = recall
    print(f"level_step recall of exact regions (same map, area and box): {recall}")
    torch.set_num_threads(saved_threads)
    if args.out:
        write_json(args.out, record_benchmark(result, command))
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
