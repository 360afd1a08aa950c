"""The ``gpu-dsm`` command: ``demo``, ``extract``, ``evaluate``, ``show-match``, ``compare``, ``index``,
``search``.

The options of every stage are generated from its configuration dataclass's fields
(`gpu_dsm.config_cli`), so each default is written once and each help states it and its
source. Every combination is checked: an option that would have no effect is a one-line error
(exit 2); the presets ``--paper-rerank`` and ``--paper-diffusion`` turn their stage on.
"""
from __future__ import annotations

import argparse
import functools
import re
import sys
import tempfile
import time
import warnings
from importlib.metadata import version
from pathlib import Path

from gpu_dsm.config_cli import add_options, config_from_args, given_flags
from gpu_dsm.eval.run_config import RunConfig
from gpu_dsm.photos_cli import add_index_parser, add_search_parser
from gpu_dsm.retrieval_options import (add_extraction_options, add_initial_options, add_ranking_options, default_device,
                                       refuse, retrieval_from_args)

NETWORK = ("backbone", "weights", "trust_weights_file", "upsample", "device", "dtype")  # RunConfig's network fields



def _add_model_args(p: argparse.ArgumentParser) -> None:
    """Network, extraction, global descriptor and detector options."""
    g = p.add_argument_group("network and extraction")
    add_options(g, RunConfig, names=NETWORK)
    p.set_defaults(device=default_device())
    add_extraction_options(p, g)


def _add_data_args(p: argparse.ArgumentParser, several: bool = False) -> None:
    from gpu_dsm.eval.datasets import default_data_root
    root = default_data_root()
    g = p.add_argument_group("data")
    g.add_argument("--data-root", default=str(root) if root else None, required=root is None,
                   help="folder holding <dataset>/gnd_<dataset>.pkl and <dataset>/jpg/ (default: $GPU_DSM_DATA, else "
                        "../shared/data beside the repository)")
    g.add_argument("--dataset", nargs="+" if several else None, default=["roxford5k-mini"] if several else "roxford5k-mini",
                   help="revisitop dataset name: roxford5k, rparis6k, roxford5k-mini, ...; " +
                        ("with several, one results file each and a summary table across them " if several else "") +
                        "(default: roxford5k-mini)")
    if several:
        add_options(g, RunConfig, names=["distractors"])


def _add_asmk_args(p: argparse.ArgumentParser, extract: bool = False) -> None:
    """The HOW + ASMK options; ``extract``: those HOW descriptors depend on (evaluate trains the codebook)."""
    add_options(add_initial_options(p, codebook=not extract), RunConfig, names=["codebook_data"])


def _run_config(args: argparse.Namespace, data_root: str, dataset: str, cache_dir: str | None, local: bool,
                why_off: str = ""):
    """The validated `RunConfig` of the options for ``dataset``; ``local``: local features
    (re-ranking) on, else ``why_off`` ends the error of an option that needs them."""
    retrieval = retrieval_from_args(args, local, why_off)
    if retrieval.initial != "asmk":
        refuse(given_flags(RunConfig, args, "asmk"), "without --initial asmk")
    if retrieval.rerank is None and getattr(args, "plot_inliers", None):
        refuse(["--plot-inliers"], why_off)
    return config_from_args(RunConfig, args, RunConfig(data_root, dataset, retrieval, cache_dir=cache_dir))


def cmd_evaluate(args: argparse.Namespace) -> int:
    from gpu_dsm.eval.run import dataset_outputs, evaluate_datasets

    if len(set(args.dataset)) != len(args.dataset):
        raise ValueError(f"--dataset names a dataset twice: {args.dataset}")
    cfgs = [_run_config(args, args.data_root, name, args.cache_dir, args.rerank != "none", "with --rerank none")
            for name in args.dataset]
    if args.plot_inliers and len(cfgs) > 1:
        raise ValueError("--plot-inliers takes one --dataset")
    outs, summary = dataset_outputs(args.dataset, args.out, args.summary)
    evaluate_datasets(cfgs, outs, summary, plot_inliers=args.plot_inliers)
    return 0


def cmd_show_match(args: argparse.Namespace) -> int:
    from gpu_dsm.eval.show_match import show_match

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
    cfg = _run_config(args, args.data_root, args.dataset, args.out, args.local, "with --no-local")
    dataset = RevisitopDataset.load(cfg.data_root, cfg.dataset)
    preflight(cfg, dataset, dirs={"--out": args.out})
    backbone = functools.cache(lambda: make_backbone(cfg))
    db, queries = dataset_stores(cfg, dataset, Path(args.out), ranks=ranks, backbone=backbone)
    how = None
    if cfg.retrieval.initial == "asmk":
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
        cfg = _run_config(args, str(root), DEMO_NAME, None, args.rerank != "none", "with --rerank none")
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
                                   "diffusion (the demo turns --diffusion on, with --graph-k 5 --alpha 0.8 for its "
                                   "59-image database).")
    _add_model_args(p)
    add_ranking_options(p)
    # the demo database has 59 images: the paper's k=50, alpha=0.99 (for 5k+ images) would link
    # nearly every pair, so the demo uses a sparser graph and shorter diffusion
    _demo_defaults(p, image_size=384, rerank="dsm", diffusion=True, graph_k=5, alpha=0.8)
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
    p.add_argument("--no-local", dest="local", action="store_false",
                   help="global descriptors only (default: local features too, as RetrievalConfig)")
    _add_asmk_args(p, extract=True)
    p.add_argument("--out", required=True, help="folder for the stores")
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("evaluate", help="rank a revisitop dataset and report E/M/H mAP and mP@k",
                       description="Rank the database for every query and print mAP and mP@10 for the Easy/Medium/Hard "
                                   "setups of the revisited protocol; write everything as JSON.")
    _add_data_args(p, several=True)
    _add_model_args(p)
    add_ranking_options(p)
    _add_asmk_args(p)
    add_options(p, RunConfig, names=["whitening"])
    p.add_argument("--cache-dir", default=".gpu_dsm_cache",
                   help="keep feature stores here so a second run does not re-run the network (default: %(default)s)")
    p.add_argument("--out", default=None,
                   help="results JSON file; with several datasets a template: '{dataset}' is replaced by each name, else "
                        "the name is appended to the file's stem (default: none)")
    p.add_argument("--summary", default=None,
                   help="markdown table of every dataset and method (its JSON form beside it, suffix .json) (default: with "
                        "several datasets and --out, the --out name for dataset 'summary' with suffix .md)")
    p.add_argument("--plot-inliers", default=None,
                   help="when re-ranking: write a PNG of the inlier counts of positives vs negatives (paper figure 6) "
                        "(default: none)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("show-match", help="draw a query and a candidate with their inlier correspondences",
                       description="Picture of spatial verification (paper figure 5): the query and its RANK-th candidate "
                                   "of the global ranking, inlier ellipses and correspondence lines.")
    _add_data_args(p)
    _add_model_args(p)
    add_ranking_options(p, ranking=False, diffusion=False)
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

    add_index_parser(sub)
    add_search_parser(sub)
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
