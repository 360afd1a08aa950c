"""Benchmark of the DSM detector: agreement with the plain VLFeat port, speed, level-step recall.

    python -m gpu_dsm.eval.bench_detect --out results/bench_detect_cpu.json

1. Agreement: batched MSER vs ``gpu_dsm.reference.mser`` on all channels of real
   EfficientNet-Lite0 activations of roxford5k-mini images (regions compared, identical fraction).
2. Speed: detection time per image (3 scales, full detector) for activation tensors shaped like
   VGG16 (512x64x64) and ResNet101 (2048x32x32) at 1024 px, synthetic but with real sparsity,
   and for EfficientNet-Lite0 on real images at 1024 px, without and with activation
   upsampling (stride 16).
3. ``level_step`` > 1: recall of the exact regions on the real activations.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from scipy import ndimage

from gpu_dsm.backbones import build_backbone
from gpu_dsm.detect import DetectorConfig, activations_to_levels, auto_delta, detect
from gpu_dsm.extract import ExtractConfig, extract_activations
from gpu_dsm.io import write_json
from gpu_dsm.eval.timing import benchmark_parser, sync
from gpu_dsm.mser import mser
from gpu_dsm.eval.datasets import RevisitopDataset, default_data_root

DSM = dict(max_variation=0.5, min_diversity=0.7, min_area=0.001, max_area=0.75)


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



def _time_detect(maps, cfg, bound, device, repeats=3):
    detect([maps], cfg, activation_bound=bound)  # warm-up
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        feats = detect([maps], cfg, activation_bound=bound)
    sync(device)
    return (time.perf_counter() - start) / repeats, int(feats.counts[0])


def _region_keys(res):
    return {(int(m), int(l), int(a), tuple(int(v) for v in b)) for m, l, a, b in zip(res.map_index, res.level, res.area, res.bbox)}


def main(argv=None) -> dict:
    p = benchmark_parser(__doc__)
    p.add_argument("--agreement-images", type=int, default=3, help="images checked against the reference (default: %(default)s)")
    p.add_argument("--timing-images", type=int, default=4, help="real images timed (default: %(default)s)")
    p.add_argument("--skip-reference", action="store_true", help="skip the (slow, pure Python) reference check")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    result: dict = {"benchmark": "detect", "device": str(device), "threads": torch.get_num_threads()}
    dataset = RevisitopDataset.load(default_data_root(), "roxford5k-mini")
    backbone = build_backbone("efficientnet_lite0").to(device)
    specs = dataset.database_specs()[:: max(1, len(dataset.imlist) // max(args.agreement_images, args.timing_images))]
    acts = extract_activations(backbone, specs[: max(args.agreement_images, args.timing_images)], ExtractConfig(progress=False))

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

    cfg = DetectorConfig()
    timings = {}
    for name, channels, size in (("vgg16-like 512x64x64", 512, 64), ("resnet101-like 2048x32x32", 2048, 32)):
        maps = _synthetic_activations(channels, size, device=device)
        seconds, n = _time_detect(maps, DetectorConfig(levels="round"), None, device)
        timings[name] = {"ms_per_image": round(1000 * seconds, 1), "features": n}
        print(f"{name}: {1000 * seconds:.0f} ms per image (3 scales), {n} features")
    real = []
    for maps in acts[: args.timing_images]:
        seconds, n = _time_detect(maps, cfg, 6.0, device, repeats=1)
        real.append((seconds, n))
    timings["efficientnet_lite0 1024px (real)"] = {
        "ms_per_image": round(1000 * float(np.mean([s for s, _ in real])), 1),
        "features": float(np.mean([n for _, n in real])),
        "shape_scale1": list(acts[0][0].shape),
    }
    print(f"efficientnet_lite0 1024 px: {timings['efficientnet_lite0 1024px (real)']['ms_per_image']:.0f} ms per image")
    batch = acts[: args.timing_images]
    detect(batch, cfg, activation_bound=6.0)  # warm-up
    sync(device)
    start = time.perf_counter()
    detect(batch, cfg, activation_bound=6.0)
    sync(device)
    sizes = sorted({tuple(m[0].shape) for m in batch})
    timings["efficientnet_lite0 1024px (real), one call for the batch"] = {
        "ms_per_image": round(1000 * (time.perf_counter() - start) / len(batch), 1), "images": len(batch),
        "distinct_scale1_shapes": [list(s) for s in sizes],
    }
    print(f"same, {len(batch)} images in one call: "
          f"{timings['efficientnet_lite0 1024px (real), one call for the batch']['ms_per_image']:.0f} ms per image")
    upsampled = build_backbone("efficientnet_lite0", upsample=True).to(device)
    up_acts = extract_activations(upsampled, specs[: args.timing_images], ExtractConfig(progress=False))
    real_up = [_time_detect(maps, cfg, 6.0, device, repeats=1) for maps in up_acts]
    timings["efficientnet_lite0 1024px up (real, stride 16)"] = {
        "ms_per_image": round(1000 * float(np.mean([s for s, _ in real_up])), 1),
        "features": float(np.mean([n for _, n in real_up])),
        "shape_scale1": list(up_acts[0][0].shape),
    }
    print(f"efficientnet_lite0 1024 px with upsampling: {timings['efficientnet_lite0 1024px up (real, stride 16)']['ms_per_image']:.0f} ms per image")
    result["timing"] = timings

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
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
