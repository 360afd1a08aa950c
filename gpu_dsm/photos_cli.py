"""The ``gpu-dsm index`` and ``gpu-dsm search`` subcommands: a folder of one's own photos
(`gpu_dsm.photos`). ``index`` takes the network options and the generated extraction and
detector options (`gpu_dsm.retrieval_options`); ``search`` runs the method the index was saved with."""
from __future__ import annotations

import argparse
import dataclasses
import json

from gpu_dsm.config_cli import add_options, given
from gpu_dsm.eval.run_config import RunConfig
from gpu_dsm.io import json_safe
from gpu_dsm.photos import IMAGE_SUFFIXES, format_results, index_folder, search_folder_index
from gpu_dsm.retrieval_options import add_extraction_options, default_device, retrieval_from_args

NETWORK = ("backbone", "weights", "upsample", "device")  # the network options of RunConfig an index takes


def add_index_parser(sub) -> argparse.ArgumentParser:
    """``gpu-dsm index FOLDER --out INDEX`` (`gpu_dsm.photos.index_folder`)."""
    p = sub.add_parser("index", help="index a folder of your own photos for gpu-dsm search",
                       description="Describe every image of FOLDER (sub-folders included; suffixes "
                                   f"{', '.join(IMAGE_SUFFIXES)}) with global descriptors and DSM local features and "
                                   "write a saved index (DSMRetrieval.save) to --out. An interrupted run resumes: run "
                                   "the same command again.")
    p.add_argument("folder", help="the folder of photos")
    p.add_argument("--out", required=True, help="the index folder to write (replaced atomically when it exists)")
    g = p.add_argument_group("network and extraction")
    add_options(g, RunConfig, names=NETWORK)
    p.set_defaults(device=default_device())
    add_extraction_options(p, g)
    p.set_defaults(func=cmd_index)
    return p


def cmd_index(args: argparse.Namespace) -> int:
    network = dataclasses.replace(RunConfig("", ""), **given(RunConfig, args))
    config = retrieval_from_args(args)  # the method's defaults: global ranking, DSM re-ranking
    index_folder(args.folder, args.out, network.backbone, network.weights, config, network.device, network.upsample)
    return 0


def add_search_parser(sub) -> argparse.ArgumentParser:
    """``gpu-dsm search INDEX QUERY`` (`gpu_dsm.photos.search_folder_index`)."""
    p = sub.add_parser("search", help="search an index of gpu-dsm index with a query photo",
                       description="Rank the photos of INDEX for the QUERY photo (or a box of it) with the index's "
                                   "method (global ranking, DSM re-ranking of its top 100, paper 3.6) and print each "
                                   "result's rank, score (the global descriptors' cosine similarity), DSM inliers ('-': "
                                   "not verified) and path, best first.")
    p.add_argument("index", help="an index folder written by gpu-dsm index")
    p.add_argument("query", help="the query photo")
    p.add_argument("--box", type=float, nargs=4, metavar=("X0", "Y0", "X1", "Y1"), default=None,
                   help="search with this box of the query, in its pixels, right and bottom exclusive (default: the "
                        "whole photo)")
    p.add_argument("--top", type=int, default=10, help="results printed (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the results as JSON (default: a table)")
    p.add_argument("--device", default=default_device(), help="torch device (default: cuda when available, else cpu)")
    p.set_defaults(func=cmd_search)
    return p


def cmd_search(args: argparse.Namespace) -> int:
    found = search_folder_index(args.index, args.query, args.box, args.top, args.device)
    print(json.dumps(json_safe(found), indent=1, allow_nan=False) if args.json else format_results(found))
    return 0
