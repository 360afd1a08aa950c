"""The ``gpu-dsm`` command: ``demo``, ``extract``, ``evaluate``.

Every option's help states its default and, where the default comes from the DSM paper
(Siméoni et al. 2019) or the reference code, says so.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import re
import sys
import tempfile
import time
import warnings
from importlib.metadata import version
from pathlib import Path

import torch

from gpu_dsm.backbones import BACKBONES
from gpu_dsm.global_descriptors import GlobalConfig
from gpu_dsm.detect import LEVEL_MODES, RULES, STRENGTHS, DetectorConfig
from gpu_dsm.match import ERRORS, MatchConfig
from gpu_dsm.rerank import SCORES, RerankConfig
from gpu_dsm.extract import ExtractConfig
from gpu_dsm.pooling import POOLINGS
from gpu_dsm.pipeline import INITIAL_RANKINGS, RetrievalConfig


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


_SCALE_TERM = re.compile(r"^\s*(?:(?P<num>[0-9.]+)\s*/\s*)?sqrt\(\s*(?P<arg>[0-9.]+)\s*\)\s*$")


def _scale(term: str) -> float:
    match = _SCALE_TERM.match(term)
    if match:
        return float(match["num"] or 1.0) / math.sqrt(float(match["arg"])) if match["num"] else math.sqrt(float(match["arg"]))
    return float(term)


def _scales(text: str) -> tuple[float, ...]:
    try:
        return tuple(_scale(term) for term in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"scales must be comma-separated numbers, sqrt(x) or a/sqrt(x) terms, got {text!r}"
        ) from None


def _add_model_args(p: argparse.ArgumentParser, image_size: int | None = None) -> None:
    """Network and extraction options; defaults from `RunConfig` and `ExtractConfig`."""
    from gpu_dsm.eval.run import RunConfig

    run = RunConfig(data_root="", dataset="")
    e = run.extract
    image_size = e.image_size if image_size is None else image_size
    g = p.add_argument_group("network and extraction")
    g.add_argument("--backbone", default=run.backbone, choices=sorted(BACKBONES),
                   help="network whose last conv activations are used (default: %(default)s, ImageNet weights bundled; "
                        "the paper used VGG16 / ResNet101)")
    g.add_argument("--weights", default=run.weights,
                   help="'default' (the bundled ImageNet weights; EfficientNet-Lite only), 'none' (random, with a "
                        "warning), or the path of a torchvision state dict or a cnnimageretrieval-pytorch checkpoint "
                        "(default: the bundled weights; VGG/ResNet need a file)")
    g.add_argument("--trust-weights-file", action="store_true",
                   help="unpickle --weights in full; needed only for files holding more than tensors and plain data, and "
                        "a crafted file can then run code (default: off: tensors, plain data and numpy arrays only)")
    g.add_argument("--upsample", action="store_true",
                   help="activation upsampling '↑' (paper 4.1): stride 32 -> 16 for ResNet/EfficientNet (default: off)")
    g.add_argument("--image-size", type=int, default=image_size,
                   help="longer image side in pixels (default: %(default)s; paper 4.1: 1024)")
    g.add_argument("--scales", type=_scales, default=e.scales,
                   help="comma-separated scale factors, e.g. '1,1/sqrt(2),0.5' (default: 1, 1/sqrt(2), 1/2, paper 4.1)")
    g.add_argument("--no-upscale", dest="upscale", action="store_false",
                   help="the standard image protocol exactly (revisitop / cnnimageretrieval-pytorch: PIL thumbnail, never "
                        "enlarging, a query crop keeps its image's scale) (default: enlarge small images and bring query "
                        "crops to --image-size: +0.9 mAP M on roxford5k-19q, +3.3 on holidays-811, docs 'Design decisions')")
    g.add_argument("--batch-size", type=int, default=None,
                   help="images of one size per forward pass (default: 1 on the CPU, measured fastest there; 16 on a GPU)")
    g.add_argument("--workers", type=int, default=e.num_workers, help="image-reading processes (default: %(default)s)")
    g.add_argument("--pooling", choices=POOLINGS, default=None,
                   help="global descriptor pooling (default: the checkpoint's meta['pooling'], else gem; paper 4.1 uses GeM "
                        "for off-the-shelf networks)")
    g.add_argument("--gem-p", type=float, default=None,
                   help="GeM exponent (default: the checkpoint's learned p, else 3 as Radenović et al.)")
    g.add_argument("--device", default=_default_device(), help="torch device (default: cuda when available, else cpu)")
    g.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=run.dtype,
                   help="network dtype (default: %(default)s)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")


def _add_detector_args(p: argparse.ArgumentParser) -> None:
    d = DetectorConfig()
    g = p.add_argument_group("local features (DSM detector, paper 3.3-3.4)")
    g.add_argument("--detector", choices=RULES, default=d.rules,
                   help="feature selection around MSER: 'reference' = the DSM authors' feature code, reproduced "
                        "(both polarities, strength in the 1-sigma ellipse, NMS before the per-channel cap, MATLAB "
                        "rounding and tie order; DetectorConfig.reference(); slower), 'gpu_dsm' = ours (docs, 'Detector') "
                        "(default: %(default)s)")
    g.add_argument("--levels", choices=LEVEL_MODES, default=d.levels,
                   help="activations -> 8-bit levels: round (reference code), range (x*255/bound, ReLU6 nets), "
                        "channel_max, auto = range for bounded activations else round (default: %(default)s)")
    g.add_argument("--delta", type=int, default=d.delta,
                   help="fixed MSER delta (default: per image and scale, 60%% of the cumulative histogram of "
                        f"non-zero levels capped at {d.delta_max}, paper 4.1 / reference code)")
    g.add_argument("--level-step", type=int, default=d.level_step,
                   help="MSER threshold spacing; 1 is exact, larger is faster and approximate (default: %(default)s)")
    g.add_argument("--strength", choices=STRENGTHS, default=d.strength,
                   help="pooling of a region's activations into its strength (default: %(default)s, paper 3.4)")
    g.add_argument("--per-channel-query", type=int, default=d.per_channel_query,
                   help="strongest features kept per channel and scale of a query (default: %(default)s, paper 4.1)")
    g.add_argument("--per-channel-database", type=int, default=d.per_channel_database,
                   help="same for a database image (default: %(default)s, paper 4.1)")
    g.add_argument("--nms-iou", type=float, default=d.nms_iou,
                   help="IoU of the NMS over all channels of a database image (default: %(default)s, paper 4.1)")
    g.add_argument("--max-features", type=int, default=d.max_features,
                   help="features kept per image over all scales (default: %(default)s; paper 4.1: 512 VGG, 2048 ResNet)")


def _detector_config(args: argparse.Namespace) -> DetectorConfig:
    make = DetectorConfig.reference if args.detector == "reference" else DetectorConfig
    return make(
        levels=args.levels, delta=args.delta, level_step=args.level_step, strength=args.strength,
        per_channel_query=args.per_channel_query, per_channel_database=args.per_channel_database,
        nms_iou=args.nms_iou, max_features=args.max_features,
    )


def _add_rerank_args(p: argparse.ArgumentParser, ranking: bool = True) -> None:
    """Re-ranking options; without ``ranking`` only the matcher's (for commands that always verify)."""
    r, m = RerankConfig(), MatchConfig()
    if ranking:
        g = p.add_argument_group("spatial re-ranking (paper 3.5-3.6)")
        g.add_argument("--rerank", choices=("none", "dsm"), default="none",
                       help="re-rank each query's top-k by deep spatial matching, adding method 'global+dsm' (default: %(default)s)")
        g.add_argument("--top-k", type=int, default=r.top_k, help="candidates verified per query (default: %(default)s, paper 4.1)")
        g.add_argument("--score", choices=SCORES, default=None,
                       help="re-ranking score: 'inliers' (paper) or 'fused' = weight * inliers / max inliers + scaled "
                            f"similarity (beyond the paper; measured better, docs 'Design decisions') (default: {r.score})")
        g.add_argument("--fuse-weight", type=float, default=None,
                       help=f"weight of inliers in 'fused' (default: {r.fuse_weight:g}, measured on four sets, docs 'Design decisions')")
    else:
        g = p.add_argument_group("spatial matching (paper 3.5)")
        p.set_defaults(rerank="dsm", top_k=r.top_k, score=None, fuse_weight=None)
    g.add_argument("--threshold", type=float, default=None,
                   help=f"inlier threshold on the transfer error, feature-map pixels (default: {m.threshold:g}, measured on "
                        "four sets, docs 'Design decisions'; paper 4.1: 2)")
    g.add_argument("--max-scale-change", type=float, default=None,
                   help=f"largest scale change of an inlier relative to the hypothesis (default: {m.max_scale_change:g}, "
                        "paper 4.1)")
    g.add_argument("--error", choices=ERRORS, default=None,
                   help=f"symmetric (both directions, reference code) or one_way transfer error (default: {m.error}, "
                        "measured on four sets, docs 'Design decisions')")
    g.add_argument("--paper-rerank", action="store_true",
                   help="the paper's matching settings instead of the measured defaults: threshold 2, symmetric error "
                        "(and, when re-ranking, score inliers); not combined with --threshold, --error, --score or "
                        "--fuse-weight (default: off)")


def _add_diffusion_args(p: argparse.ArgumentParser) -> None:
    from gpu_dsm.diffusion import SEEDS, DiffusionConfig
    from gpu_dsm.graph import GraphConfig

    d, gr = DiffusionConfig(), GraphConfig()
    g = p.add_argument_group("diffusion (Iscen et al. 2017; paper 3.6, 4.1)")
    g.add_argument("--diffusion", action="store_true",
                   help="diffuse on the kNN graph of the database: adds 'global+D' and, with --rerank dsm, 'global+dsm+D' "
                        "(default: off)")
    g.add_argument("--graph-k", type=int, default=gr.k,
                   help=f"neighbours per node of the mutual kNN graph (default: scaled to the database, "
                        f"{gr.k_fraction:g} x images within [{gr.k_min}, {gr.k_max}]: the paper's {gr.k_max} from "
                        f"{round(gr.k_max / gr.k_fraction)} images on, {gr.k_min} for a 133-image set; measured, docs 'Design decisions')")
    g.add_argument("--graph-backend", choices=("exact", "faiss"), default=gr.backend,
                   help="exact chunked products, or approximate FAISS (optional package) (default: %(default)s)")
    g.add_argument("--alpha", type=float, default=d.alpha,
                   help=f"diffusion alpha (default: scaled to the database: {d.large_alpha} as Iscen et al. and the paper "
                        f"from {d.large_database} images on, {d.small_alpha} below; measured, docs 'Design decisions')")
    g.add_argument("--gamma", type=float, default=d.gamma, help="similarity exponent of graph weights and seeds (default: %(default)s)")
    g.add_argument("--cg-iterations", type=int, default=d.max_iter, help="conjugate-gradient iterations at most (default: %(default)s)")
    g.add_argument("--cg-tol", type=float, default=d.tol, help="conjugate-gradient relative residual (default: %(default)s)")
    g.add_argument("--truncation-size", type=int, default=d.truncation_size, metavar="R",
                   help="truncated diffusion: solve each query on the sub-graph of its top R images, R >= 10 (the "
                        "seeds' candidates) (fyang93/diffusion's truncated solve; for large databases, docs 'Diffusion') "
                        "(default: none, the whole graph as the paper)")
    g.add_argument("--query-k", type=int, default=d.query_k, help="plain seeds: the query's kq most similar images (default: %(default)s)")
    g.add_argument("--dsm-keep", type=int, default=d.dsm_keep,
                   help="with --seeds paper: DSM seeds kept of the top 10 verified images (default: %(default)s, paper "
                        "4.1; the reference code keeps 4)")
    g.add_argument("--seeds", choices=SEEDS, default=d.seeds,
                   help="seeds of 'global+dsm+D': 'verified' = the plain seeds plus the confidently verified images, "
                        "which also rank first; 'paper' = the top 10 verified weighted inliers / max x similarity, best "
                        "--dsm-keep (paper 4.1) (default: %(default)s; measured, docs 'Diffusion')")
    g.add_argument("--confident-mads", type=float, default=d.confident_mads,
                   help="a verified image is confident when its inliers reach the median of its query's top-k plus this "
                        "many median absolute deviations (default: %(default)s; measured, docs 'Diffusion')")
    g.add_argument("--confident-ratio", type=float, default=d.confident_ratio,
                   help="a verified image is confident only when its inliers also reach this many times the median of "
                        "its query's top-k (default: %(default)s; measured, docs 'Diffusion')")
    g.add_argument("--similarity-weight", type=float, default=d.similarity_weight,
                   help="final diffusion score: (1 - w) diffusion / max + w (similarity / best)^gamma, the similarity "
                        "of the image's place in the ranking diffusion refines, w in [0, 1); 0 = the diffusion score "
                        "alone (Iscen et al., the paper) (default: %(default)s; measured, docs 'Diffusion')")
    g.add_argument("--paper-diffusion", action="store_true",
                   help="the paper's diffusion: --seeds paper, --similarity-weight 0, --alpha 0.99 (with --graph-k 50 "
                        "the paper's graph); not combined with those options (default: off)")


def _diffusion_config(args: argparse.Namespace):
    from gpu_dsm.diffusion import DiffusionConfig
    from gpu_dsm.graph import GraphConfig

    if not getattr(args, "diffusion", False):
        if getattr(args, "paper_diffusion", False):
            raise ValueError("--paper-diffusion needs --diffusion")
        return None, GraphConfig()
    d = DiffusionConfig()
    chosen = {"alpha": args.alpha, "seeds": args.seeds, "similarity_weight": args.similarity_weight}
    if args.paper_diffusion:
        clashing = [f"--{name.replace('_', '-')}" for name, value in chosen.items() if value != getattr(d, name)]
        if clashing:
            raise ValueError(f"--paper-diffusion sets the paper's seeds, fusion and alpha; it cannot be combined with "
                             f"{', '.join(clashing)}")
        paper = DiffusionConfig.paper()
        chosen = {name: getattr(paper, name) for name in chosen}
    try:
        return (DiffusionConfig(gamma=args.gamma, max_iter=args.cg_iterations, tol=args.cg_tol, query_k=args.query_k,
                                dsm_keep=args.dsm_keep, truncation_size=args.truncation_size,
                                confident_mads=args.confident_mads,
                                confident_ratio=args.confident_ratio, **chosen),
                GraphConfig(k=args.graph_k, gamma=args.gamma, backend=args.graph_backend))
    except ValueError as exc:
        raise ValueError(f"diffusion options: {exc}") from None


def _rerank_config(args: argparse.Namespace) -> RerankConfig | None:
    """The re-ranking options as one validated `RerankConfig` (``None``: no re-ranking)."""
    if getattr(args, "rerank", "none") == "none":
        return None
    given = {"--threshold": args.threshold, "--max-scale-change": args.max_scale_change, "--error": args.error,
             "--score": args.score, "--fuse-weight": args.fuse_weight}
    if args.paper_rerank:
        clashing = [flag for flag, value in given.items() if value is not None and flag != "--max-scale-change"]
        if clashing:
            raise ValueError(f"--paper-rerank sets the paper's matching and score; it cannot be combined with {', '.join(clashing)}")
        base = RerankConfig.paper()
    else:
        base = RerankConfig()
    chosen = {name: value for name, value in (("threshold", args.threshold), ("max_scale_change", args.max_scale_change),
                                              ("error", args.error)) if value is not None}
    match = dataclasses.replace(base.match, **chosen)
    scoring = {name: value for name, value in (("score", args.score), ("fuse_weight", args.fuse_weight)) if value is not None}
    try:
        return dataclasses.replace(base, top_k=args.top_k, match=match, **scoring)
    except ValueError as exc:
        raise ValueError(f"re-ranking options: {exc}") from None


def _add_data_args(p: argparse.ArgumentParser, several: bool = False) -> None:
    from gpu_dsm.eval.datasets import default_data_root

    root = default_data_root()
    g = p.add_argument_group("data")
    g.add_argument("--data-root", default=str(root) if root else None, required=root is None,
                   help="folder holding <dataset>/gnd_<dataset>.pkl and <dataset>/jpg/ (default: $GPU_DSM_DATA, else "
                        "../shared/data beside the repository: %(default)s)")
    if several:
        g.add_argument("--dataset", nargs="+", default=["roxford5k-mini"],
                       help="revisitop dataset names: roxford5k, rparis6k, roxford5k-mini, ...; with several, one results "
                            "file each and a summary table across them (default: roxford5k-mini)")
        g.add_argument("--distractors", default=None, metavar="DIR",
                       help="append the images of DIR (jpg/ and imlist.txt, or revisitop1m.txt as the R1M distractors come) "
                            "to every database as negatives, never queries; their features are extracted once per "
                            "extraction setting and cached for every dataset (default: none)")
    else:
        g.add_argument("--dataset", default="roxford5k-mini",
                       help="revisitop dataset name: roxford5k, rparis6k, roxford5k-mini, ... (default: %(default)s)")


def _add_asmk_args(p: argparse.ArgumentParser, extract: bool = False) -> None:
    """The HOW + ASMK options; ``extract``: those that HOW descriptors depend on (the codebook is
    trained by evaluate)."""
    from gpu_dsm.asmk import ASMKConfig
    from gpu_dsm.asmk.config import SEARCH_BACKENDS
    from gpu_dsm.backbones.layers import HOW_LAYERS
    from gpu_dsm.how import HOWConfig

    a, h = ASMKConfig(), HOWConfig()
    g = p.add_argument_group("HOW + ASMK initial ranking (Tolias, Jenicek, Chum, ECCV 2020)")
    initial_help = ("'asmk' also writes the HOW whitening (learned on --codebook-data) and the HOW descriptors of the "
                    "codebook images, database and queries, which evaluate --initial asmk with this folder as --cache-dir "
                    "reuses" if extract else
                    "'asmk' adds the methods asmk, asmk+dsm (with --rerank dsm: DSM verification of ASMK's top-k) and "
                    "asmk+dsm+D (with --diffusion); the global methods stay. With the bundled ImageNet weights ASMK "
                    "ranks below the global descriptor on holidays-811 and above it on roxford5k-19q (docs 'HOW + "
                    "ASMK'): pick it with HOW-trained weights (--weights HOW checkpoint) or on landmark sets, at the "
                    "cost of a second description pass (7 scales) and a codebook")
    g.add_argument("--initial", choices=INITIAL_RANKINGS, default=RetrievalConfig().initial,
                   help=initial_help + " (default: %(default)s)")
    g.add_argument("--codebook-data", nargs="+", default=["database"], metavar="SOURCE",
                   help="images the HOW whitening and the ASMK codebook are learned on, never the queries: 'database' (the "
                        "evaluated dataset's database), another dataset's name under --data-root (its database images), or a "
                        "folder of images (jpg/ and imlist.txt) (default: database; HOW learns them on SfM-120k)")
    if not extract:
        g.add_argument("--codebook-size", type=int, default=a.codebook_size,
                       help="visual words (default: scaled to the training descriptors, the power of two at or below "
                            "descriptors / 300 within [1024, 65536]: HOW's 65,536 for SfM-120k, 1,024 for a database of "
                            "hundreds of images, which beat 4,096 on holidays-811 and roxford5k-19q; docs 'HOW + ASMK')")
        g.add_argument("--kmeans-iterations", type=int, default=a.kmeans_iterations,
                       help="k-means iterations (default: %(default)s, the reference's)")
        g.add_argument("--asmk-alpha", type=float, default=a.alpha,
                       help="selectivity exponent of the match kernel, sigma(s) = s^alpha (default: %(default)s, HOW's "
                            "_eccv20_how.yml)")
        g.add_argument("--query-assignments", type=int, default=a.query_assignments,
                       help="nearest words per query descriptor, multiple assignment (default: %(default)s, HOW's "
                            "_eccv20_how.yml; 1: none)")
        g.add_argument("--asmk-search", choices=SEARCH_BACKENDS, default=a.search_backend,
                       help="inverted-file scoring: 'native', a C kernel on the CPU (built on first use with the system's "
                            "C compiler, $CC); 'torch', tensor passes on any device; 'auto', native on the CPU where it "
                            "builds, else torch. Same results up to float64 rounding (default: %(default)s; the reference "
                            "loops in Python per query and word)")
    g.add_argument("--how-layer", default=None,
                   help="backbone layer HOW reads (default: " + ", ".join(f"{k} {v}" for k, v in HOW_LAYERS.items()) + ")")
    g.add_argument("--how-features", type=int, default=h.num_features,
                   help="local descriptors per image, top by attention over all scales (default: %(default)s, HOW's n)")
    g.add_argument("--how-image-size", type=int, default=h.image_size,
                   help="longer side for HOW, never enlarged; scales 2.0 ... 0.25 of it (default: %(default)s, HOW's)")


def _asmk_run(args: argparse.Namespace):
    from gpu_dsm.asmk import ASMKConfig
    from gpu_dsm.eval.asmk_initial import ASMKRun
    from gpu_dsm.how import HOWConfig

    how = HOWConfig(layer=args.how_layer, num_features=args.how_features, image_size=args.how_image_size,
                    batch_size=args.batch_size, progress=args.progress)
    default = ASMKConfig()
    asmk = ASMKConfig(codebook_size=getattr(args, "codebook_size", default.codebook_size),
                      kmeans_iterations=getattr(args, "kmeans_iterations", default.kmeans_iterations),
                      alpha=getattr(args, "asmk_alpha", default.alpha),
                      query_assignments=getattr(args, "query_assignments", default.query_assignments),
                      search_backend=getattr(args, "asmk_search", default.search_backend))
    return ASMKRun(how=how, asmk=asmk, codebook_data=tuple(args.codebook_data))


def _run_config(args: argparse.Namespace, data_root: str, dataset: str, cache_dir: str | None, local: bool = False):
    from gpu_dsm.eval.run import RunConfig

    extract = ExtractConfig(
        image_size=args.image_size, scales=args.scales, upscale=args.upscale, batch_size=args.batch_size,
        num_workers=args.workers, progress=args.progress,
    )
    return RunConfig(
        data_root=data_root, dataset=dataset, backbone=args.backbone, weights=args.weights, upsample=args.upsample,
        extract=extract, global_=GlobalConfig(pooling=args.pooling, p=args.gem_p),
        detector=_detector_config(args) if local else None,
        rerank=_rerank_config(args),
        diffusion=_diffusion_config(args)[0], graph=_diffusion_config(args)[1],
        whitening=getattr(args, "whitening", None), distractors=getattr(args, "distractors", None), cache_dir=cache_dir,
        device=args.device, dtype=args.dtype,
        trust_weights_file=args.trust_weights_file,
        **({"initial": "asmk", "asmk": _asmk_run(args)} if getattr(args, "initial", "global") == "asmk" else {}),
    )


def cmd_evaluate(args: argparse.Namespace) -> int:
    from gpu_dsm.eval.run import dataset_outputs, evaluate_datasets

    if len(set(args.dataset)) != len(args.dataset):
        raise ValueError(f"--dataset names a dataset twice: {args.dataset}")
    cfgs = [_run_config(args, args.data_root, name, args.cache_dir, local=args.rerank != "none") for name in args.dataset]
    if args.plot_inliers and cfgs[0].rerank is None:
        raise ValueError("--plot-inliers needs --rerank dsm")
    if args.plot_inliers and len(cfgs) > 1:
        raise ValueError("--plot-inliers takes one --dataset")
    outs, summary = dataset_outputs(args.dataset, args.out, args.summary)
    evaluate_datasets(cfgs, outs, summary, plot_inliers=args.plot_inliers)
    return 0


def cmd_show_match(args: argparse.Namespace) -> int:
    from gpu_dsm.eval.run import show_match

    cfg = _run_config(args, args.data_root, args.dataset, args.cache_dir, local=True)
    show_match(cfg, args.query, args.rank, args.out)
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from gpu_dsm.eval.datasets import RevisitopDataset
    from gpu_dsm.eval.asmk_initial import how_feature_sets
    from gpu_dsm.eval.run import dataset_stores, make_backbone, preflight

    from gpu_dsm.shards import Ranks

    ranks = Ranks.from_environment()  # under torchrun: this process's slice of every store (gpu_dsm.shards)
    args.device = ranks.device(args.device)
    cfg = _run_config(args, args.data_root, args.dataset, args.out, local=args.local)
    dataset = RevisitopDataset.load(cfg.data_root, cfg.dataset)
    preflight(cfg, dataset, dirs={"--out": args.out})
    backbone = functools.cache(lambda: make_backbone(cfg))
    db, queries = dataset_stores(cfg, dataset, Path(args.out), ranks=ranks, backbone=backbone)
    how = None
    if cfg.initial == "asmk":
        how = how_feature_sets(cfg, dataset, Path(args.out), backbone, ranks=ranks)
    if ranks.rank != 0:
        return 0
    for store in (db, queries):
        line = f"{store.path}: {store.num_images} images, {store.bytes_per_image() / 1024:.1f} KiB per image"
        if store.has_local:
            counts = store.local_features().counts.float()
            line += f", {counts.mean():.0f} local features per image (min {counts.min():.0f}, max {counts.max():.0f})"
        print(line)
    if how is not None:
        for label, feats in [*zip(how.train_names, how.train), *zip(how.database_names, how.database), ("queries", how.queries)]:
            print(f"HOW {label}: {feats.num_images} images, {feats.descriptors.shape[0] / max(feats.num_images, 1):.0f} "
                  "descriptors per image")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from gpu_dsm.eval.demo import DEMO_NAME, build_demo_dataset
    from gpu_dsm.eval.run import evaluate_dataset

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_dsm-demo-") as tmp:
        root = build_demo_dataset(tmp, image_size=args.image_size)
        print(f"demo set: scikit-image photos with generated viewpoint changes, written to {root / DEMO_NAME}")
        cfg = _run_config(args, str(root), DEMO_NAME, None, local=args.rerank != "none")
        evaluate_dataset(cfg, out=args.out)
    print(f"demo finished in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from gpu_dsm.eval.compare import compare_reports, format_comparison, load_report
    from gpu_dsm.io import check_output_file, write_json

    for what, path in (("--out", args.out), ("--plot", args.plot)):
        if path:
            check_output_file(path, what)
    base = load_report(args.results[0])
    other = load_report(args.results[-1])
    methods = args.methods or ["global", "global+dsm"]
    if len(methods) != 2:
        raise ValueError("--methods takes two method names: A B (B is compared against A)")
    result = compare_reports(base, other, methods[0], methods[1], samples=args.samples)
    print(format_comparison(result))
    if args.out:
        write_json(args.out, result)
    if args.plot:
        from gpu_dsm.eval.compare import plot_comparison

        plot_comparison(result, args.plot)
        print(f"per-query differences drawn in {args.plot}")
    return 0


def _demo_defaults(p: argparse.ArgumentParser, **values) -> None:
    """Set the demo's own defaults and say them in the options' help (no help shows another default)."""
    p.set_defaults(**values)
    for action in p._actions:
        if action.dest in values and action.help:
            shown = {True: "on", False: "off"}.get(values[action.dest], values[action.dest])
            action.help = re.sub(r"\(default: [^()]*(\([^()]*\)[^()]*)*\)$", f"(default in the demo: {shown})", action.help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpu-dsm",
        description="Deep spatial matching (DSM) for image retrieval: extraction, re-ranking and revisited evaluation.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('gpu_dsm')}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="run the whole pipeline on a built-in set (no download)",
                       description="Build a small retrieval set from scikit-image's bundled photos with generated "
                                   "viewpoint changes and evaluate every stage on it: global ranking, DSM re-ranking and "
                                   "diffusion (the demo turns --rerank dsm and --diffusion on, with --graph-k 5 --alpha 0.8 "
                                   "for its 59-image database).")
    _add_model_args(p, image_size=384)
    _add_detector_args(p)
    _add_rerank_args(p)
    _add_diffusion_args(p)
    # the demo database has 59 images: the paper's k=50, alpha=0.99 (for 5k+ images) would link
    # nearly every pair, so the demo uses a sparser graph and shorter diffusion
    _demo_defaults(p, rerank="dsm", diffusion=True, graph_k=5, alpha=0.8)
    p.add_argument("--out", default=None, help="also write the results JSON here (default: none)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("extract", help="extract a dataset into feature stores",
                       description="Write the feature stores (global descriptors and DSM local features) of a revisitop "
                                   "dataset's database and cropped queries into a folder; evaluate --cache-dir reuses them. "
                                   "Under torchrun (torchrun --nproc-per-node N -m gpu_dsm extract ...) every process "
                                   "extracts a slice of the images balanced by pixels and rank 0 merges the shards into "
                                   "the same stores; a rerun after a failure keeps the finished shards.")
    _add_data_args(p)
    _add_model_args(p)
    _add_detector_args(p)
    p.add_argument("--no-local", dest="local", action="store_false",
                   help="global descriptors only (default: local features too)")
    _add_asmk_args(p, extract=True)
    p.add_argument("--out", required=True, help="folder for the stores")
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("evaluate", help="rank a revisitop dataset and report E/M/H mAP and mP@k",
                       description="Rank the database for every query and print mAP and mP@10 for the Easy/Medium/Hard "
                                   "setups of the revisited protocol; write everything as JSON.")
    _add_data_args(p, several=True)
    _add_model_args(p)
    _add_detector_args(p)
    _add_rerank_args(p)
    _add_diffusion_args(p)
    _add_asmk_args(p)
    p.add_argument("--whitening", default=None,
                   help="learned whitening of the global descriptors: a saved gpu_dsm Whitening file, 'checkpoint[:NAME]' "
                        "for the weights file's meta['Lw'][NAME] (['ms'] with several scales, ['ss'] with one, as "
                        "cnnimageretrieval-pytorch), or 'none' (default: the checkpoint's learned whitening if it has "
                        "one, else none; the paper uses supervised whitening learned on SfM-120k)")
    p.add_argument("--cache-dir", default=".gpu_dsm_cache",
                   help="keep feature stores here so a second run does not re-run the network (default: %(default)s)")
    p.add_argument("--out", default=None,
                   help="results JSON file; with several datasets a template: '{dataset}' is replaced by each name, else "
                        "the name is appended to the file's stem (default: none)")
    p.add_argument("--summary", default=None,
                   help="markdown table of every dataset and method (its JSON form beside it, suffix .json) (default: with "
                        "several datasets and --out, the --out name for dataset 'summary' with suffix .md)")
    p.add_argument("--plot-inliers", default=None,
                   help="with --rerank dsm: write a PNG of the inlier counts of positives vs negatives (paper figure 6) "
                        "(default: none)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("show-match", help="draw a query and a candidate with their inlier correspondences",
                       description="Picture of spatial verification (paper figure 5): the query and its RANK-th candidate "
                                   "of the global ranking, inlier ellipses and correspondence lines.")
    _add_data_args(p)
    _add_model_args(p)
    _add_detector_args(p)
    _add_rerank_args(p, ranking=False)
    p.add_argument("--query", type=int, default=0, help="query index (default: %(default)s)")
    p.add_argument("--rank", type=int, default=1, help="1-based rank of the candidate in the global ranking (default: %(default)s)")
    p.add_argument("--cache-dir", default=".gpu_dsm_cache", help="feature store cache (default: %(default)s)")
    p.add_argument("--out", default="match.png", help="PNG to write (default: %(default)s)")
    p.set_defaults(func=cmd_show_match)

    p = sub.add_parser("compare", help="paired comparison of two methods (or two results files) over the same queries",
                       description="Mean AP difference of method B against method A with a paired bootstrap 95% interval "
                                   "over queries (a landmark's queries resampled together), and the queries that gain and "
                                   "lose, for Easy/Medium/Hard. With two files, A is read from the first and B from the second.")
    p.add_argument("results", nargs="+", help="one or two results JSON files of gpu-dsm evaluate")
    p.add_argument("--methods", nargs="+", default=None,
                   help="A B: the methods compared (default: global global+dsm)")
    p.add_argument("--samples", type=int, default=10000, help="bootstrap resamples (default: %(default)s)")
    p.add_argument("--out", default=None, help="also write the comparison as JSON (default: none)")
    p.add_argument("--plot", default=None,
                   help="also draw the per-query AP differences, sorted, one panel per setup, as a PNG (default: none)")
    p.set_defaults(func=cmd_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand. Errors a user can fix (bad paths, options, files, data) print one line
    and exit 2; Ctrl-C prints one line and exits 130 (stores written so far are complete and kept:
    every store is published atomically); warnings print one line each."""
    args = build_parser().parse_args(argv)
    prog = f"gpu-dsm {args.command}"

    def one_line(message, category, filename, lineno, file=None, line=None):
        print(f"{prog}: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = one_line
        try:
            return args.func(args)
        except KeyboardInterrupt:
            print(f"{prog}: interrupted; completed stores kept", file=sys.stderr)
            return 130
        except (FileNotFoundError, ValueError, ImportError) as exc:
            print(f"{prog}: error: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:
            print(f"{prog}: error: {exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
