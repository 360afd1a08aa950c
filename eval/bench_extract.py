"""Benchmark: extraction throughput (images/s) of backbone + multi-scale global descriptors.

    python -m gpu_dsm.eval.bench_extract --device cpu --out results/bench_extract_cpu.json

Runs on the roxford5k-mini database images (or on synthetic 1024x768 images with
``--synthetic N``), reports images per second after one warm-up batch and peak GPU memory.
"""
from __future__ import annotations

import platform
import time

import numpy as np
import torch

from gpu_dsm.backbones import BACKBONES, build_backbone
from gpu_dsm.global_descriptors import describe_global
from gpu_dsm.extract import ExtractConfig
from gpu_dsm.io import write_json
from gpu_dsm.eval.timing import benchmark_parser, peak_gpu_memory_mb, reset_peak_memory, sync
from gpu_dsm.eval.datasets import RevisitopDataset, default_data_root


def main(argv=None) -> dict:
    p = benchmark_parser(__doc__)
    p.add_argument("--backbone", default="efficientnet_lite0", choices=sorted(BACKBONES), help="(default: %(default)s)")
    p.add_argument("--weights", default="default", help="(default: %(default)s; 'none' for VGG/ResNet timing)")
    p.add_argument("--upsample", action="store_true", help="activation upsampling (default: off)")
    p.add_argument("--image-size", type=int, default=1024, help="(default: %(default)s, paper 4.1)")
    p.add_argument("--batch-size", type=int, default=None, help="(default: 1 on the CPU, 16 on a GPU)")
    p.add_argument("--images", type=int, default=32, help="how many images to time (default: %(default)s)")
    p.add_argument("--synthetic", action="store_true", help="random 1024x768 images instead of roxford5k-mini")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"), help="(default: %(default)s)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    backbone = build_backbone(args.backbone, args.weights, upsample=args.upsample).to(device, getattr(torch, args.dtype))
    if args.synthetic:
        rng = np.random.default_rng(0)
        images = [rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8) for _ in range(args.images)]
    else:
        root = default_data_root()
        images = RevisitopDataset.load(root, "roxford5k-mini").database_specs()[: args.images]
    cfg = ExtractConfig(image_size=args.image_size, batch_size=args.batch_size, progress=False)
    describe_global(backbone, images[:2], cfg)  # warm-up
    sync(device)
    reset_peak_memory(device)
    start = time.perf_counter()
    describe_global(backbone, images, cfg)
    sync(device)
    seconds = time.perf_counter() - start
    result = {
        "benchmark": "extract",
        "backbone": args.backbone,
        "upsample": args.upsample,
        "image_size": args.image_size,
        "scales": list(cfg.scales),
        "batch_size": args.batch_size or (1 if device.type == "cpu" else 16),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "images": len(images),
        "seconds": round(seconds, 3),
        "images_per_second": round(len(images) / seconds, 3),
        "peak_gpu_memory_mb": peak_gpu_memory_mb(device),
    }
    print(f"{args.backbone}{'↑' if args.upsample else ''} {args.image_size}px 3 scales on {device}: "
          f"{result['images_per_second']:.2f} images/s ({len(images)} images, {seconds:.1f} s)")
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
