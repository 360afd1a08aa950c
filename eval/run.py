"""Evaluation runs: the revisited protocol around `gpu_dsm.pipeline.DSMRetrieval`.

A run extracts (or reuses) the feature stores of a dataset, hands them to the run's
``DSMRetrieval``, which ranks the database by every method its configuration turns on, scores
each ranking by the protocol and writes JSON. ``results`` holds one entry per method:
``"global"`` (the initial ranking by the global descriptor), ``"global+dsm"`` (re-ranked),
``"global+D"`` and ``"global+dsm+D"`` (with diffusion), and the ``"asmk"`` variants. What a run
depends on is its `gpu_dsm.eval.run_config.RunConfig`.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from gpu_dsm.cache import ArtifactCache, StoreRequest
from gpu_dsm.backbones import Backbone, backbone_stride, build_backbone
from gpu_dsm.images import ImageSpec, source_size, target_size
from gpu_dsm.io import atomic_write, check_output_dir, check_output_file, write_json
from gpu_dsm.pipeline import DSMRetrieval
from gpu_dsm.ranking import SearchResult
from gpu_dsm.rerank import rerank_scores
from gpu_dsm.shards import Ranks
from gpu_dsm.store import FeatureStore, StoreStack
from gpu_dsm.eval.asmk_initial import asmk_index, check_run
from gpu_dsm.eval.datasets import RevisitopDataset
from gpu_dsm.eval.diagnostics import format_separation, top_k_separation
from gpu_dsm.eval.protocol import evaluate_revisited, format_table, setup_ground_truth
from gpu_dsm.eval.run_config import RunConfig


def make_backbone(cfg: RunConfig) -> Backbone:
    backbone = build_backbone(cfg.backbone, cfg.weights, upsample=cfg.upsample, trust_weights_file=cfg.trust_weights_file)
    return backbone.to(device=torch.device(cfg.device), dtype=getattr(torch, cfg.dtype))


def write_store(
    backbone: Backbone, specs: Sequence[ImageSpec], names: Sequence[str], path: Path, cfg: RunConfig, desc: str,
    is_query: bool = False, log=print,
) -> FeatureStore:
    """Describe ``specs`` (global descriptors, and local features when ``cfg.retrieval.rerank`` is set)
    and write them to a new store at ``path`` (atomically)."""
    extraction = dataclasses.replace(cfg.retrieval, diffusion=None, initial="global")
    retrieval = DSMRetrieval(backbone, extraction, whitening="none")
    return retrieval.write_store(specs, path, names, cfg.options(), is_query=is_query, desc=desc, log=log)


def run_cache(cfg: RunConfig, folder: str | Path, log=print, ranks: Ranks | None = None) -> ArtifactCache:
    """The run's cache folder (`gpu_dsm.cache.ArtifactCache`), keyed on the run's options."""
    return ArtifactCache(folder, cfg.options(), log, ranks)


def dataset_stores(cfg: RunConfig, dataset: RevisitopDataset, cache: ArtifactCache | str | Path, log=print,
                   timing: dict | None = None, ranks: Ranks | None = None, backbone: Callable[[], Backbone] | None = None):
    """Stores of the database and of the (cropped) queries in ``cache`` (a folder, or the run's
    `gpu_dsm.cache.ArtifactCache`), extracted once (`ArtifactCache.stores`).

    With ``cfg.distractors`` the database is a `StoreStack` of the dataset's own images
    followed by the distractors (their store is keyed on their images alone, so one extraction
    serves every dataset). ``timing`` receives the seconds each extraction took (``None`` for a
    store reused from the cache). With ``ranks`` of a torchrun job each rank extracts a slice of a
    missing store. ``backbone()`` gives the network when a store must be extracted (default:
    built once here); pass the run's own builder so that a later step reuses the same network.
    """
    if not isinstance(cache, ArtifactCache):
        cache = run_cache(cfg, cache, log, ranks)
    backbone = backbone or functools.cache(lambda: make_backbone(cfg))
    requests = [StoreRequest("database", dataset.database_specs(), dataset.imlist, cfg.dataset, cfg.data_root),
                StoreRequest("queries", dataset.query_specs(), dataset.qimlist, cfg.dataset, cfg.data_root, is_query=True)]
    distractors = cfg.distractor_set()
    if distractors is not None:
        requests.append(StoreRequest("distractors", distractors.specs(), distractors.names, distractors.root.name,
                                     distractors.root))

    def write(request: StoreRequest, specs, names, path: Path) -> FeatureStore:
        return write_store(backbone(), specs, names, path, cfg, desc=f"{request.owner} {request.split}",
                           is_query=request.is_query, log=log)

    stores = cache.stores(requests, write)
    if timing is not None:
        timing.update({f"extract_{r.split}_s": cache.timing[f"extract_{r.split}_s"] for r in requests})
    database, queries = stores[0], stores[1]
    if distractors is not None:
        database = StoreStack([database, stores[2]])
        log(f"database: {dataset.name}'s {len(dataset.imlist)} images + {stores[2].num_images} distractors")
    return database, queries


def check_device(device: str) -> torch.device:
    """``torch.device(device)``, refusing a device this machine does not have."""
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"--device {device!r} is not a torch device: {exc}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: no CUDA GPU is available here (torch.cuda.is_available() is False); "
                             "use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA devices are visible")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"--device {device}: MPS is not available here; use --device cpu")
    return dev


def check_images(cfg: RunConfig, dataset: RevisitopDataset) -> None:
    """Every query box overlaps its image, and every image (queries cropped, database,
    distractors), resized as extraction will, is large enough for the network at the smallest
    scale: one error naming the file, its size and the option that fixes it (file headers only,
    no decoding)."""
    for listed, what in ((dataset.qimlist, "queries (qimlist"), (dataset.imlist, "database images (imlist")):
        if not listed:
            raise ValueError(f"{dataset.name}: the ground truth lists no {what} is empty): nothing to rank")
    stride = backbone_stride(cfg.backbone, cfg.upsample)
    smallest = min(cfg.retrieval.extract.scales)
    groups = [("query", dataset.query_specs(), dataset.qimlist), ("database image", dataset.database_specs(), dataset.imlist)]
    distractors = cfg.distractor_set()
    if distractors is not None:
        groups.append(("distractor", distractors.specs(), distractors.names))
    for what, specs, names in groups:
        for i, spec in enumerate(specs):
            who = f"{what} {i} ({names[i]})"
            try:
                width, height = target_size(spec, cfg.retrieval.extract.image_size, cfg.retrieval.extract.upscale)
            except ValueError as exc:
                raise ValueError(f"{who}: {exc}") from None
            side = math.floor(min(width, height) * smallest)
            if side >= stride:
                continue
            original = source_size(spec)
            crop = "its crop" if spec.box is not None else "it"
            if not cfg.retrieval.extract.upscale and max(width, height) < cfg.retrieval.extract.image_size:
                fix = "drop --no-upscale (the standard protocol never enlarges an image) or drop small --scales"
            else:
                fix = "use a larger --image-size or drop small --scales"
            raise ValueError(
                f"{who}: {spec.source} is {original[0]}x{original[1]} px; {crop} is {width}x{height} px after resizing, "
                f"{side} px at scale {smallest:.3f}, smaller than {cfg.backbone} needs ({stride} px per side): {fix}"
            )


def preflight(cfg: RunConfig, dataset: RevisitopDataset, files: dict[str, str | Path | None] = (),
              dirs: dict[str, str | Path | None] = ()) -> None:
    """Everything that can be checked before extracting anything, each failure one ``ValueError``
    (or ``FileNotFoundError``) naming the problem: output paths (``{what: path}``), the device,
    optional backends, the weights and whitening files, the queries' boxes and sizes."""
    for what, path in dict(files).items():
        if path is not None:
            check_output_file(path, what)
    for what, path in dict(dirs).items():
        if path is not None:
            check_output_dir(path, what)
    check_device(cfg.device)
    if cfg.retrieval.diffusion is not None and cfg.retrieval.graph.backend == "faiss" and importlib.util.find_spec("faiss") is None:
        raise ImportError("--graph-backend faiss needs the faiss-cpu package: pip install -e \".[faiss]\"")
    cfg.weights_sha256()
    cfg.checkpoint_head()
    cfg.resolved_whitening()
    check_images(cfg, dataset)
    cfg.distractor_set()
    if cfg.retrieval.initial == "asmk":
        check_run(cfg.asmk, cfg.backbone, cfg.data_root, dataset)


def evaluate_dataset(cfg: RunConfig, out: str | Path | None = None, log=print, plot_inliers: str | Path | None = None) -> dict[str, Any]:
    """Run the evaluation of ``cfg`` and return (and write to ``out``) the results dict.

    Everything that can fail without extracting (paths, device, backends, queries) is checked
    first (`preflight`).
    """
    dataset = RevisitopDataset.load(cfg.data_root, cfg.dataset)
    preflight(cfg, dataset, files={"--out": out, "--plot-inliers": plot_inliers}, dirs={"--cache-dir": cfg.cache_dir})
    if cfg.cache_dir is None:
        with tempfile.TemporaryDirectory(prefix="gpu_dsm-") as tmp:
            return _evaluate(cfg, dataset, Path(tmp), out, log, plot_inliers)
    return _evaluate(cfg, dataset, Path(cfg.cache_dir), out, log, plot_inliers)


def dataset_outputs(datasets: Sequence[str], out: str | Path | None, summary: str | Path | None = None
                    ) -> tuple[list[Path | None], Path | None]:
    """Results file of each dataset and the summary file of a multi-dataset run.

    One dataset: ``out`` as given, no summary unless asked. Several: ``out`` is a template
    (``{dataset}`` replaced by the name; without it ``<stem>-<dataset><suffix>``) and the summary
    defaults to ``{dataset}`` = ``summary`` (``<stem>-summary.md``); the summary's JSON form goes
    beside its markdown with the suffix ``.json``.
    """
    if out is None:
        return [None] * len(datasets), None if summary is None else Path(summary)
    out = Path(out)
    if len(datasets) == 1 and "{dataset}" not in str(out):
        return [out], None if summary is None else Path(summary)

    def named(name: str, suffix: str | None = None) -> Path:
        if "{dataset}" in str(out):
            path = Path(str(out).replace("{dataset}", name))
        else:
            path = out.with_name(f"{out.stem}-{name}{out.suffix}")
        return path.with_suffix(suffix) if suffix else path

    return [named(d) for d in datasets], Path(summary) if summary is not None else named("summary", ".md")


def evaluate_datasets(cfgs: Sequence[RunConfig], outs: Sequence[str | Path | None], summary: str | Path | None = None,
                      log=print, plot_inliers: str | Path | None = None) -> dict[str, Any]:
    """`evaluate_dataset` for each config (one per dataset, checked up front, all before any
    extraction), then the summary table across them, printed and written to ``summary`` (markdown)
    and ``summary`` with suffix ``.json``."""
    from gpu_dsm.eval.summary import format_markdown, summarize

    if summary is not None:
        check_output_file(summary, "--summary")
        check_output_file(Path(summary).with_suffix(".json"), "--summary (JSON)")
    for cfg, out in zip(cfgs, outs):
        preflight(cfg, RevisitopDataset.load(cfg.data_root, cfg.dataset), files={"--out": out},
                  dirs={"--cache-dir": cfg.cache_dir})
    reports = []
    for cfg, out in zip(cfgs, outs):
        if len(cfgs) > 1:
            log(f"== {cfg.dataset} ==")
        reports.append(evaluate_dataset(cfg, out=out, log=log, plot_inliers=plot_inliers if len(cfgs) == 1 else None))
    table = summarize(reports, [str(o) if o is not None else None for o in outs])
    if len(cfgs) > 1:
        log(format_markdown(table))
    if summary is not None:
        text = format_markdown(table) + "\n"
        atomic_write(summary, lambda path: path.write_text(text))
        write_json(Path(summary).with_suffix(".json"), table)
        log(f"summary written to {summary} and {Path(summary).with_suffix('.json')}")
    return table


def _method_entry(ranks: torch.Tensor, gnd) -> dict[str, Any]:
    entry = evaluate_revisited(ranks.cpu().numpy(), gnd)
    entry["ranks"] = ranks.cpu().tolist()
    return entry


def _plot_inliers(path, candidates: torch.Tensor, inliers: torch.Tensor, gnd) -> None:
    """Figure 6 of the paper: inlier counts of positive vs negative images in the top-k (Medium)."""
    from gpu_dsm.visualize import draw_inlier_histogram

    positives, junk = setup_ground_truth(gnd, "M")
    pos, neg = [], []
    for q, row in enumerate(candidates.tolist()):
        for i, n in zip(row, inliers[q].tolist()):
            if i in junk[q]:
                continue
            (pos if i in positives[q] else neg).append(n)
    picture = draw_inlier_histogram(pos, neg)
    atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))


def make_retrieval(cfg: RunConfig, cache: ArtifactCache | None = None, backbone: Backbone | None = None) -> DSMRetrieval:
    """The run's `DSMRetrieval` on the run's device, with the run's learned whitening and
    ``cache``; without ``backbone`` it has no network (the stores hold what it describes)."""
    whitening = cfg.resolved_whitening()[1]
    return DSMRetrieval(backbone, cfg.retrieval, whitening=whitening if whitening is not None else "none",
                        cache=cache).to(cfg.device)


def _rerank_diagnostics(result: SearchResult, cfg: RunConfig, dataset: RevisitopDataset, log, plot_inliers) -> dict[str, Any]:
    """Inlier statistics of the global top-k: separation of positives and negatives (AUC), the
    inlier counts, the histogram of paper figure 6."""
    stage = result.stages["global"]
    k = stage.reranked.order.shape[1]
    seconds = result.diagnostics["timing"]["rerank_s"]
    inliers_initial = stage.reranked.initial_order_inliers()
    top_sims = stage.scores[:, :k]
    auc = top_k_separation(
        stage.ranks[:, :k].numpy(),
        {"global": top_sims.numpy(), "inliers": inliers_initial.numpy(),
         "dsm score": rerank_scores(inliers_initial, top_sims, cfg.retrieval.rerank.score, cfg.retrieval.rerank.fuse_weight).numpy()},
        dataset.gnd,
    )
    log(format_separation(auc))
    if plot_inliers is not None:
        _plot_inliers(plot_inliers, stage.ranks[:, :k], inliers_initial, dataset.gnd)
        log(f"inlier histogram written to {plot_inliers}")
    log(f"re-ranking: {1000 * seconds / max(len(dataset.gnd), 1):.0f} ms per query ({k} candidates) on {cfg.device}")
    return {"rerank_seconds": round(seconds, 3), "rerank_ms_per_query": round(1000 * seconds / max(len(dataset.gnd), 1), 1),
            "separation_auc": auc, "inliers_top_k": inliers_initial.tolist()}


def _evaluate(cfg: RunConfig, dataset: RevisitopDataset, base: Path, out, log, plot_inliers=None) -> dict[str, Any]:
    timing: dict[str, Any] = {}
    backbone = functools.cache(lambda: make_backbone(cfg))  # built once, only if something must be extracted
    cache = run_cache(cfg, base, log)
    db_store, q_store = dataset_stores(cfg, dataset, cache, log=log, timing=timing, backbone=backbone)
    # with the ASMK initial ranking the module describes images (HOW features not cached yet): it needs the network
    retrieval = make_retrieval(cfg, cache, backbone() if cfg.retrieval.initial == "asmk" else None)
    label, whitening = cfg.resolved_whitening()
    if whitening is not None:
        log(f"whitening: {label}, {whitening.input_dim} -> {whitening.output_dim} dimensions")
    database, queries = retrieval.from_store(db_store), retrieval.from_store(q_store)
    diagnostics: dict[str, Any] = {}
    if cfg.retrieval.initial == "asmk":
        start = time.perf_counter()
        artifacts = asmk_index(cfg, retrieval, dataset)
        timing.update({k: v for k, v in cache.timing.items() if not k.startswith("extract_")})
        timing["asmk_s"] = round(time.perf_counter() - start, 4)  # HOW features, codebook and index (cached or built)
        database.asmk, queries.how = artifacts.index, artifacts.queries
        diagnostics["asmk"] = artifacts.diagnostics
    if cfg.retrieval.diffusion is not None:
        start = time.perf_counter()
        database.graph = retrieval.build_graph(database)
        timing["graph_s"] = round(time.perf_counter() - start, 4)
    result = retrieval.search(queries, database)
    timing.update(result.diagnostics["timing"])
    results = {name: _method_entry(ranks, dataset.gnd) for name, ranks in result.methods.items()}
    if cfg.retrieval.initial == "asmk":
        asmk = diagnostics["asmk"]
        q = max(len(dataset.qimlist), 1)
        asmk["search_ms_per_query"] = round(1000 * timing["asmk_search_s"] / q, 2)
        log(f"ASMK: {asmk['words_per_database_image']} words and {asmk['index_bytes_per_image']:.0f} bytes per "
            f"database image, {asmk['search_ms_per_query']:.2f} ms per query ({q} queries at once, "
            f"{asmk['search_backend']} scoring) on {cfg.device}")
    if cfg.retrieval.rerank is not None:
        diagnostics.update(_rerank_diagnostics(result, cfg, dataset, log, plot_inliers))
    if cfg.retrieval.diffusion is not None:
        diagnostics["diffusion"] = result.diagnostics["diffusion"]
    report: dict[str, Any] = {"dataset": cfg.dataset, "backbone": cfg.backbone, "options": cfg.options(),
                              "database": {"images": len(dataset.imlist), "distractors": database.num_images - len(dataset.imlist)},
                              "queries": list(dataset.qimlist), "results": results, "timing": timing}
    if diagnostics:
        report["diagnostics"] = diagnostics
    log(format_table(results))
    if out is not None:
        write_json(out, report)
        log(f"results written to {out}")
    return report
