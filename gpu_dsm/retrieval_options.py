"""The command-line options of `RetrievalConfig`'s stages and the validated configuration they give.

The options are generated from the stage configs' field metadata (`gpu_dsm.config_cli`);
`retrieval_from_args` builds the `RetrievalConfig` and refuses, in one line, an option
that would have no effect (its stage off, or a sibling setting it does not act with). The presets
``--paper-rerank`` and ``--paper-diffusion`` turn their stage on.
"""
from __future__ import annotations

import argparse

import torch

from gpu_dsm.asmk import ASMKConfig
from gpu_dsm.config_cli import add_options, config_from_args, given_flags
from gpu_dsm.detect import DetectorConfig
from gpu_dsm.diffusion import DiffusionConfig
from gpu_dsm.extract import ExtractConfig
from gpu_dsm.global_descriptors import GlobalConfig
from gpu_dsm.graph import GraphConfig
from gpu_dsm.how import HOWConfig
from gpu_dsm.knn import SearchConfig
from gpu_dsm.match import MatchConfig
from gpu_dsm.pipeline import RetrievalConfig
from gpu_dsm.rerank import RerankConfig


def default_device() -> str:
    """The ``--device`` default of every subcommand: ``cuda`` when available, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_extraction_options(p: argparse.ArgumentParser, group=None) -> None:
    """Extraction and global descriptor options (into ``group`` when given), then the detector's."""
    group = group or p.add_argument_group("extraction")
    add_options(group, ExtractConfig)
    add_options(group, GlobalConfig)
    add_options(p.add_argument_group("local features (DSM detector, paper 3.3-3.4)"), DetectorConfig)


def add_ranking_options(p: argparse.ArgumentParser, ranking: bool = True, diffusion: bool = True) -> None:
    """Re-ranking (``ranking``: the top-k and score too, else the matcher's alone), diffusion and
    global search options (``diffusion``)."""
    g = p.add_argument_group("spatial re-ranking (paper 3.5-3.6)" if ranking else "spatial matching (paper 3.5)")
    if ranking:
        g.add_argument("--rerank", choices=("none", "dsm"), default="dsm",
                       help="re-rank each query's top-k by deep spatial matching, adding method 'global+dsm'; 'none': "
                            "the global ranking only, no local features (default: %(default)s, as "
                            "RetrievalConfig; paper 3.6)")
        add_options(g, RerankConfig)
    add_options(g, MatchConfig)
    g.add_argument("--paper-rerank", action="store_true",
                   help="the paper's matching settings instead of the measured defaults: threshold 2, symmetric error "
                        "(and, when re-ranking, score inliers); implies re-ranking (an error with --rerank none); not "
                        "combined with --threshold, --error, --score or --fuse-weight (default: off; paper 4.1)")
    if not diffusion:
        return
    g = p.add_argument_group("diffusion (Iscen et al. 2017; paper 3.6, 4.1)")
    g.add_argument("--diffusion", action="store_true",
                   help="diffuse on the kNN graph of the database: adds 'global+D' and, when re-ranking, 'global+dsm+D' "
                        "(default: off, as RetrievalConfig: it needs the whole database's graph)")
    add_options(g, GraphConfig)
    add_options(g, DiffusionConfig)
    g.add_argument("--paper-diffusion", action="store_true",
                   help="the paper's diffusion: --seeds paper, --similarity-weight 0, --alpha 0.99 (with --graph-k 50 "
                        "the paper's graph); implies --diffusion; not combined with those options (default: off; "
                        "paper 4.1)")
    add_options(p.add_argument_group("global search (gpu_dsm.knn)"), SearchConfig)


def add_initial_options(p: argparse.ArgumentParser, codebook: bool = True):
    """The initial ranking and HOW options, with ``codebook`` the ASMK ones too; returns the group."""
    g = p.add_argument_group("HOW + ASMK initial ranking (Tolias, Jenicek, Chum, ECCV 2020)")
    add_options(g, RetrievalConfig)
    add_options(g, HOWConfig)
    if codebook:
        add_options(g, ASMKConfig)
    return g


def refuse(flags: list[str], why: str) -> None:
    """Raise the one-line ``ValueError`` "``<first of flags>`` has no effect ``why``" when any option is in ``flags``."""
    if flags:
        raise ValueError(f"{flags[0]} has no effect {why}")


def _rerank(args: argparse.Namespace, local: bool, why_off: str) -> RerankConfig | None:
    """The validated re-ranking (with the matcher) of the options (``None`` without local features)."""
    paper = getattr(args, "paper_rerank", False)
    if not local:
        refuse(given_flags(DetectorConfig, args) + given_flags(RerankConfig, args) + given_flags(MatchConfig, args)
                + given_flags(DiffusionConfig, args, stage="rerank") + ["--paper-rerank"] * paper, why_off)
        return None
    if paper:
        clashing = [f for f in given_flags(MatchConfig, args) + given_flags(RerankConfig, args)
                    if f in ("--threshold", "--error", "--score", "--fuse-weight")]
        if clashing:
            raise ValueError(f"--paper-rerank sets the paper's matching and score; it cannot be combined with "
                             f"{', '.join(clashing)}")
    base = RerankConfig.paper() if paper else RerankConfig()
    return config_from_args(RerankConfig, args, base, match=config_from_args(MatchConfig, args, base.match))


def _diffusion(args: argparse.Namespace) -> tuple[DiffusionConfig | None, GraphConfig]:
    paper = getattr(args, "paper_diffusion", False)
    if not (getattr(args, "diffusion", False) or paper):
        refuse(given_flags(DiffusionConfig, args) + given_flags(GraphConfig, args), "without --diffusion")
        return None, GraphConfig()
    base = DiffusionConfig()
    if paper:
        clashing = [f for f in given_flags(DiffusionConfig, args) if f in ("--alpha", "--seeds", "--similarity-weight")]
        if clashing:
            raise ValueError(f"--paper-diffusion sets the paper's seeds, fusion and alpha; it cannot be combined with "
                             f"{', '.join(clashing)}")
        base = DiffusionConfig.paper()
    diffusion = config_from_args(DiffusionConfig, args, base)
    return diffusion, config_from_args(GraphConfig, args, gamma=diffusion.gamma)


def retrieval_from_args(args: argparse.Namespace, local: bool = True, why_off: str = "with --rerank none") -> RetrievalConfig:
    """The validated `RetrievalConfig` of parsed options (absent ones keep the configs'
    defaults); ``local``: local features and re-ranking on, else ``why_off`` ends the one-line
    error of an option that needs them. Raises ``ValueError`` naming the option."""
    extract = config_from_args(ExtractConfig, args)
    initial = config_from_args(RetrievalConfig, args).initial
    if initial != "asmk":
        refuse(given_flags(HOWConfig, args) + given_flags(ASMKConfig, args), "without --initial asmk")
    diffusion, graph = _diffusion(args)
    detector = DetectorConfig.reference() if getattr(args, "detector", None) == "reference" else DetectorConfig()
    return RetrievalConfig(
        extract=extract, global_=config_from_args(GlobalConfig, args), detector=config_from_args(DetectorConfig, args, detector),
        rerank=_rerank(args, local, why_off), diffusion=diffusion, graph=graph, initial=initial,
        search=config_from_args(SearchConfig, args), asmk=config_from_args(ASMKConfig, args),
        how=config_from_args(HOWConfig, args, batch_size=extract.batch_size, progress=extract.progress))
