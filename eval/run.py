"""Evaluation runs: the revisited protocol around `gpu_dsm.pipeline.DSMRetrieval`.

A run extracts (or reuses) the feature stores of a dataset, hands them to the run's
``DSMRetrieval``, which ranks the database by every method its configuration turns on, scores
each ranking by the protocol and writes JSON. ``results`` holds one entry per method:
``"global"`` (the initial ranking by the global descriptor), ``"global+dsm"`` (re-ranked),
``"global+D"`` and ``"global+dsm+D"`` (with diffusion), and the ``"asmk"`` variants.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from gpu_dsm.artifacts import artifact_lock, cache_digest, cached
from gpu_dsm.backbones import Backbone, backbone_stride, build_backbone, bundled_weights_path
from gpu_dsm.backbones.checkpoint import RetrievalHead, is_retrieval_checkpoint, read_weights_file, split_retrieval_checkpoint
from gpu_dsm.global_descriptors import GlobalConfig
from gpu_dsm.detect import DetectorConfig
from gpu_dsm.extract import ExtractConfig
from gpu_dsm.images import ImageSpec, source_size, target_size
from gpu_dsm.io import atomic_write, check_output_dir, check_output_file, file_digest, stat_digest, \
    unfinished_directories, write_json
from gpu_dsm.diffusion import DiffusionConfig
from gpu_dsm.graph import GraphConfig, KnnGraph
from gpu_dsm.pipeline import DSMRetrieval, RetrievalConfig
from gpu_dsm.ranking import SearchResult
from gpu_dsm.rerank import RerankConfig, rerank_scores
from gpu_dsm.shards import Ranks, pixel_costs, write_sharded
from gpu_dsm.store import FeatureStore, StoreStack
from gpu_dsm.whitening import Whitening, resolve_whitening
from gpu_dsm.eval.asmk_initial import ASMKRun, asmk_index, check_run
from gpu_dsm.eval.datasets import DistractorSet, RevisitopDataset
from gpu_dsm.eval.diagnostics import format_separation, top_k_separation
from gpu_dsm.eval.protocol import evaluate_revisited, format_table, setup_ground_truth


@dataclass
class RunConfig:
    """Everything an evaluation run depends on (recorded in the results file)."""

    data_root: str
    dataset: str
    backbone: str = "efficientnet_lite0"
    weights: str = "default"
    upsample: bool = False
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    global_: GlobalConfig = field(default_factory=GlobalConfig)
    detector: DetectorConfig | None = None  # local features (DSM detector); None: global descriptors only
    rerank: RerankConfig | None = None  # spatial re-ranking of the top-k ("global+dsm"); None: off
    diffusion: DiffusionConfig | None = None  # diffusion ("global+D", "global+dsm+D"); None: off
    graph: GraphConfig = field(default_factory=GraphConfig)  # the kNN graph diffusion runs on
    # learned whitening applied to the global descriptors at search time: None = the checkpoint's
    # meta['Lw'] if it has one (['ms'] for several scales, ['ss'] for one, as cnnimageretrieval-pytorch),
    # else none; "checkpoint[:NAME]" = the checkpoint's (required); "none"; or the path of a saved Whitening
    whitening: str | None = None
    # a folder of negatives appended to the database (gpu_dsm.eval.datasets.DistractorSet); None: none
    distractors: str | None = None
    # the initial ranking besides "global": "asmk" (HOW + ASMK, gpu_dsm.eval.asmk_initial) adds
    # methods "asmk", "asmk+dsm" (with rerank), "asmk+dsm+D" (with rerank and diffusion)
    initial: str = "global"
    asmk: ASMKRun = field(default_factory=ASMKRun)  # used when initial == "asmk"
    cache_dir: str | None = None  # where stores are kept between runs; None: no cache
    device: str = "cpu"
    dtype: str = "float32"
    trust_weights_file: bool = False  # unpickle the weights file in full (it could run code); default: tensors only
    _weights_sha256: str | None = field(default=None, init=False, repr=False, compare=False)
    _head: RetrievalHead | None = field(default=None, init=False, repr=False, compare=False)
    _whitening: tuple | None = field(default=None, init=False, repr=False, compare=False)
    _distractor_set: DistractorSet | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.initial not in ("global", "asmk"):
            raise ValueError(f"initial must be 'global' or 'asmk', got {self.initial!r}")

    def distractor_set(self) -> DistractorSet | None:
        """The ``distractors`` folder's images, listed and checked once (``None`` without distractors)."""
        if self.distractors is not None and self._distractor_set is None:
            self._distractor_set = DistractorSet.load(self.distractors)
        return self._distractor_set

    def checkpoint_head(self) -> RetrievalHead:
        """What the weights file carries besides convolutions (pooling, p, whitenings), read once
        without building the network; empty for bundled/random weights and plain state dicts."""
        if self._head is None:
            head = RetrievalHead()
            if str(self.weights) not in ("default", "none"):
                obj = read_weights_file(self.weights, trust=self.trust_weights_file)
                if is_retrieval_checkpoint(obj):
                    _, head = split_retrieval_checkpoint(obj, architecture=self.backbone)
            self._head = head
        return self._head

    def resolved_whitening(self) -> tuple[str | None, Whitening | None]:
        """``(label, whitening)`` applied at search time (see the ``whitening`` field)."""
        if self._whitening is None:
            self._whitening = resolve_whitening(self.whitening, self.checkpoint_head(), len(self.extract.scales))
        return self._whitening

    def retrieval_config(self) -> RetrievalConfig:
        """The `DSMRetrieval` configuration of this run."""
        return RetrievalConfig(extract=self.extract, global_=self.global_, detector=self.detector or DetectorConfig(),
                               rerank=self.rerank, diffusion=self.diffusion, graph=self.graph, initial=self.initial,
                               how=self.asmk.how, asmk=self.asmk.asmk)

    def weights_sha256(self) -> str:
        """SHA-256 of the weights file's content (``"none"`` for random weights), computed once:
        caches are keyed on it, so a weights file overwritten in place is never mistaken for the old one."""
        if self._weights_sha256 is None:
            if str(self.weights) == "none":
                self._weights_sha256 = "none"
            else:
                path = bundled_weights_path(self.backbone) if str(self.weights) == "default" else Path(self.weights)
                if not Path(path).is_file():
                    raise FileNotFoundError(f"weights file not found: {path}")
                self._weights_sha256 = file_digest(path)
        return self._weights_sha256

    def options(self) -> dict[str, Any]:
        extract = dataclasses.asdict(self.extract)
        for how_it_runs in ("progress", "num_workers", "small_scales"):  # never change a DSM store's content
            extract.pop(how_it_runs)
        return {
            "backbone": self.backbone,
            "weights": self.weights,
            "weights_sha256": self.weights_sha256(),
            "upsample": self.upsample,
            "extract": extract,
            "global": {**dataclasses.asdict(self.global_), "resolved": self.global_.resolve(self.checkpoint_head()).options()},
            "detector": dataclasses.asdict(self.detector) if self.detector is not None else None,
            "rerank": dataclasses.asdict(self.rerank) if self.rerank is not None else None,
            "diffusion": _diffusion_options(self.diffusion, self.graph),
            "whitening": self.resolved_whitening()[0],
            "distractors": str(Path(self.distractors).resolve()) if self.distractors is not None else None,
            "initial": self.initial,
            "asmk": self.asmk.options(self.backbone) if self.initial == "asmk" else None,
            "device": self.device,
            "dtype": self.dtype,
        }


def _diffusion_options(diffusion: DiffusionConfig | None, graph: GraphConfig) -> dict[str, Any] | None:
    if diffusion is None:
        return None
    options = dataclasses.asdict(diffusion)
    options["dtype"] = str(diffusion.dtype).replace("torch.", "")
    return {**options, "graph": dataclasses.asdict(graph)}


def database_graph(retrieval: DSMRetrieval, db_store, database, cfg: RunConfig, base: Path, log=print) -> KnnGraph:
    """The database's kNN graph, cached beside its store (keyed by store, whitening and graph options)."""
    label = cfg.resolved_whitening()[0]
    # a whitening file is keyed on its content; a checkpoint's whitening is covered by the store's key
    from_file = label is not None and label == str(cfg.whitening)
    keyed = {"store": db_store.key, "whitening": label, "whitening_sha256": file_digest(cfg.whitening) if from_file else None,
             "graph": dataclasses.asdict(cfg.graph)}
    path = Path(base) / f"{db_store.path.name}-graph-{cache_digest(keyed)}.pt"
    graph, _ = cached(path, lambda p: KnnGraph.load(p, retrieval.device), lambda: retrieval.build_graph(database),
                      lambda g, p: g.save(p), "graph", log)
    return graph


def _store_name(cfg: RunConfig, split: str, specs: Sequence[ImageSpec], owner: tuple[str, str | Path] | None = None
                ) -> tuple[str, str]:
    """``(global part, full name)`` of a split's store in the cache.

    The global part keys everything the global descriptors depend on: extraction options, the
    weights file's content, and the images (names, sizes and modification times of the files,
    query boxes), so a changed file gives a new store. The full name adds the detector options
    (``-global`` for global descriptors only). ``owner`` = ``(name, folder)`` of the images
    (default: the dataset); distractors are their own owner, so their store serves every dataset.
    """
    options = cfg.options()
    keyed = {k: v for k, v in options.items()
             if k not in ("whitening", "device", "rerank", "diffusion", "detector", "distractors", "initial", "asmk")}
    name, folder = owner if owner is not None else (cfg.dataset, cfg.data_root)
    paths = [str(Path(spec.source).resolve()) for spec in specs]
    keyed.update(dataset=name, split=split, root=str(Path(folder).resolve()),
                 images=stat_digest(paths), boxes=[spec.box for spec in specs])
    global_part = f"{name}-{split}-{cfg.backbone}-{cache_digest(keyed)}"
    detector = options["detector"]
    return global_part, f"{global_part}-{cache_digest(detector) if detector is not None else 'global'}"


def make_backbone(cfg: RunConfig) -> Backbone:
    backbone = build_backbone(cfg.backbone, cfg.weights, upsample=cfg.upsample, trust_weights_file=cfg.trust_weights_file)
    return backbone.to(device=torch.device(cfg.device), dtype=getattr(torch, cfg.dtype))


def write_store(
    backbone: Backbone, specs: Sequence[ImageSpec], names: Sequence[str], path: Path, cfg: RunConfig, desc: str,
    is_query: bool = False, log=print,
) -> FeatureStore:
    """Describe ``specs`` (global descriptors, and local features when ``cfg.detector`` is set)
    and write them to a new store at ``path`` (atomically)."""
    extraction = dataclasses.replace(cfg.retrieval_config(), rerank=RerankConfig() if cfg.detector is not None else None,
                                     diffusion=None, initial="global")
    retrieval = DSMRetrieval(backbone, extraction, whitening="none")
    return retrieval.write_store(specs, path, names, cfg.options(), is_query=is_query, desc=desc, log=log)


def _open_cached(path: Path, log) -> FeatureStore | None:
    """The store at ``path`` if it is a readable store; a corrupt one is reported and ``None``
    returned (the caller rebuilds it)."""
    if not (path / "meta.json").is_file():
        return None
    try:
        return FeatureStore(path)
    except ValueError as exc:
        log(f"cache: {exc}; rebuilding it")
        return None


def _cached_store(base: Path, global_part: str, name: str, local: bool, log) -> FeatureStore | None:
    """A usable cached store: the exact one, or for a global-only run any store with the same
    global part (a local-feature store holds the same global descriptors)."""
    store = _open_cached(base / name, log)
    if store is not None or local:
        return store
    for candidate in sorted(base.glob(f"{global_part}-*")):
        store = _open_cached(candidate, log) if candidate.is_dir() else None
        if store is not None:
            return store
    return None


def dataset_stores(cfg: RunConfig, dataset: RevisitopDataset, base: Path, log=print, timing: dict | None = None,
                   ranks: Ranks | None = None, backbone: Callable[[], Backbone] | None = None):
    """Stores of the database and of the (cropped) queries under ``base``, reused when present.

    With ``cfg.distractors`` the database is a `StoreStack` of the dataset's own images
    followed by the distractors (their store is keyed on their images alone, so one extraction
    serves every dataset). A lock file per store makes a second run on the same cache wait for
    the first and reuse what it wrote instead of extracting the same store again; a split's lock
    is released only once the next split's is taken (every run takes them in the same order, so
    no deadlock), so a run that waited on one store never overtakes the first on the next. ``timing``
    receives the seconds each extraction took (``None`` for a store reused from the cache).

    With ``ranks`` of a torchrun job (`gpu_dsm.shards`) each rank extracts a balanced slice
    of a missing store and rank 0 merges them; the job is one run, so its ranks take no cache lock.
    ``backbone()`` gives the network when a store must be extracted (default: built once here);
    pass the run's own builder so that a later step reuses the same network.
    """
    ranks = ranks or Ranks()
    backbone = backbone or functools.cache(lambda: make_backbone(cfg))
    splits = [("database", dataset.database_specs(), dataset.imlist, None),
              ("queries", dataset.query_specs(), dataset.qimlist, None)]
    distractors = cfg.distractor_set()
    if distractors is not None:
        splits.append(("distractors", distractors.specs(), distractors.names, (distractors.root.name, distractors.root)))
    stores = {}
    base = Path(base)
    held = None  # the previous split's lock, released once the next one is taken
    try:
        for split, specs, names, owner in splits:
            global_part, name = _store_name(cfg, split, specs, owner)
            path = base / name
            lock = artifact_lock(base / global_part, split, log, ranks)
            lock.__enter__()
            if held is not None:
                held.__exit__(None, None, None)
            held = lock
            seconds = None
            store = _cached_store(base, global_part, name, cfg.detector is not None, log)
            if store is not None:
                log(f"{split}: reusing {store.path}")
            else:
                if ranks.rank == 0:  # (shards' unfinished directories too: nobody writes them yet)
                    for leftover in unfinished_directories(path):
                        log(f"cache: removing {leftover.name}, an unfinished store of a run that was killed")
                        shutil.rmtree(leftover, ignore_errors=True)
                ranks.barrier()
                net = backbone()
                start = time.perf_counter()
                label = f"{dataset.name} {split}" if owner is None else f"{owner[0]} {split}"

                def write(part_specs, part_names, part_path):
                    return write_store(net, part_specs, part_names, part_path, cfg, desc=label, is_query=split == "queries",
                                       log=log)

                if ranks.distributed:
                    costs = pixel_costs(specs, cfg.extract.image_size, cfg.extract.upscale)
                    store = write_sharded(ranks, specs, names, path, costs, write, log)
                else:
                    store = write(specs, names, path)
                seconds = time.perf_counter() - start
            stores[split] = store
            if timing is not None:
                timing[f"extract_{split}_s"] = None if seconds is None else round(seconds, 3)
            if seconds is not None:
                log(f"{split}: {len(specs)} images in {seconds:.1f} s ({len(specs) / seconds:.2f} img/s) -> {path}")
    finally:
        if held is not None:
            held.__exit__(None, None, None)
    database = stores["database"]
    if "distractors" in stores:
        database = StoreStack([database, stores["distractors"]])
        log(f"database: {dataset.name}'s {len(dataset.imlist)} images + {stores['distractors'].num_images} distractors")
    return database, stores["queries"]


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
    smallest = min(cfg.extract.scales)
    groups = [("query", dataset.query_specs(), dataset.qimlist), ("database image", dataset.database_specs(), dataset.imlist)]
    distractors = cfg.distractor_set()
    if distractors is not None:
        groups.append(("distractor", distractors.specs(), distractors.names))
    for what, specs, names in groups:
        for i, spec in enumerate(specs):
            who = f"{what} {i} ({names[i]})"
            try:
                width, height = target_size(spec, cfg.extract.image_size, cfg.extract.upscale)
            except ValueError as exc:
                raise ValueError(f"{who}: {exc}") from None
            side = math.floor(min(width, height) * smallest)
            if side >= stride:
                continue
            original = source_size(spec)
            crop = "its crop" if spec.box is not None else "it"
            if not cfg.extract.upscale and max(width, height) < cfg.extract.image_size:
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
    if cfg.diffusion is not None and cfg.graph.backend == "faiss" and importlib.util.find_spec("faiss") is None:
        raise ImportError("--graph-backend faiss needs the faiss-cpu package: pip install -e \".[faiss]\"")
    cfg.weights_sha256()
    cfg.checkpoint_head()
    cfg.resolved_whitening()
    check_images(cfg, dataset)
    cfg.distractor_set()
    if cfg.initial == "asmk":
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    draw_inlier_histogram(pos, neg).save(path)


def make_retrieval(cfg: RunConfig) -> DSMRetrieval:
    """The run's `DSMRetrieval` without a network (the stores hold what it describes), on
    the run's device, with the run's learned whitening."""
    whitening = cfg.resolved_whitening()[1]
    return DSMRetrieval(None, cfg.retrieval_config(), whitening=whitening if whitening is not None else "none").to(cfg.device)


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
         "dsm score": rerank_scores(inliers_initial, top_sims, cfg.rerank.score, cfg.rerank.fuse_weight).numpy()},
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
    db_store, q_store = dataset_stores(cfg, dataset, base, log=log, timing=timing, backbone=backbone)
    retrieval = make_retrieval(cfg)
    label, whitening = cfg.resolved_whitening()
    if whitening is not None:
        log(f"whitening: {label}, {whitening.input_dim} -> {whitening.output_dim} dimensions")
    database, queries = retrieval.from_store(db_store), retrieval.from_store(q_store)
    diagnostics: dict[str, Any] = {}
    if cfg.initial == "asmk":
        start = time.perf_counter()
        artifacts = asmk_index(cfg, retrieval, dataset, base, backbone, log, timing)
        timing["asmk_s"] = round(time.perf_counter() - start, 4)  # HOW features, codebook and index (cached or built)
        database.asmk, queries.how = artifacts.index, artifacts.queries
        diagnostics["asmk"] = artifacts.diagnostics
    if cfg.diffusion is not None:
        start = time.perf_counter()
        database.graph = database_graph(retrieval, db_store, database, cfg, base, log)
        timing["graph_s"] = round(time.perf_counter() - start, 4)
    result = retrieval.search(queries, database)
    timing.update(result.diagnostics["timing"])
    results = {name: _method_entry(ranks, dataset.gnd) for name, ranks in result.methods.items()}
    if cfg.initial == "asmk":
        asmk = diagnostics["asmk"]
        q = max(len(dataset.qimlist), 1)
        asmk["search_ms_per_query"] = round(1000 * timing["asmk_search_s"] / q, 2)
        log(f"ASMK: {asmk['words_per_database_image']} words and {asmk['index_bytes_per_image']:.0f} bytes per "
            f"database image, {asmk['search_ms_per_query']:.2f} ms per query ({q} queries at once, "
            f"{asmk['search_backend']} scoring) on {cfg.device}")
    if cfg.rerank is not None:
        diagnostics.update(_rerank_diagnostics(result, cfg, dataset, log, plot_inliers))
    if cfg.diffusion is not None:
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


def show_match(cfg: RunConfig, query: int, rank: int, out: str | Path, log=print) -> dict[str, Any]:
    """Draw query ``query`` against its ``rank``-th (1-based) candidate of the global ranking,
    with the inlier ellipses and correspondences of spatial verification (paper figure 5)."""
    if cfg.cache_dir is None:
        with tempfile.TemporaryDirectory(prefix="gpu_dsm-") as tmp:
            return _show_match(cfg, query, rank, out, log, Path(tmp))
    return _show_match(cfg, query, rank, out, log, Path(cfg.cache_dir))


def _show_match(cfg: RunConfig, query: int, rank: int, out: str | Path, log, base: Path) -> dict[str, Any]:
    from gpu_dsm.images import load_image
    from gpu_dsm.visualize import draw_matches, feature_to_image
    from PIL import Image

    if cfg.detector is None:
        raise ValueError("show_match needs a detector configuration")
    dataset = RevisitopDataset.load(cfg.data_root, cfg.dataset)
    if not 0 <= query < len(dataset.qimlist):
        raise ValueError(f"query must be in 0..{len(dataset.qimlist) - 1}, got {query}")
    preflight(cfg, dataset, files={"--out": out}, dirs={"--cache-dir": cfg.cache_dir})
    db_store, q_store = dataset_stores(cfg, dataset, base, log=log)
    retrieval = make_retrieval(dataclasses.replace(cfg, diffusion=None, initial="global", rerank=None))
    database, queries = retrieval.from_store(db_store), retrieval.from_store(q_store)
    order = retrieval.search(queries, database).stages["global"].ranks[query]
    if not 1 <= rank <= len(order):
        raise ValueError(f"rank must be in 1..{len(order)}, got {rank}")
    candidate = int(order[rank - 1])
    qf = q_store.local_features([query])
    cf = db_store.local_features([candidate])
    result = retrieval.verify(queries, database, query, candidate, (cfg.rerank or RerankConfig()).match)
    pairs = result.matches[0]
    pairs = pairs[pairs[:, 0] >= 0]
    images = []
    points = []
    for spec, feats, rows in ((dataset.query_specs()[query], qf, pairs[:, 0]), (dataset.database_specs()[candidate], cf, pairs[:, 1])):
        img = load_image(spec, cfg.extract.image_size, cfg.extract.upscale)
        pil = Image.fromarray(img.permute(1, 2, 0).numpy())
        scale = feats.scale[0, rows]
        sizes = feats.map_sizes[0]
        xy, frame = feats.xy[0, rows].clone(), feats.frame[0, rows].clone()
        for s in scale.unique().tolist():
            sel = scale == s
            xy[sel], frame[sel] = feature_to_image(xy[sel], frame[sel], sizes[s].tolist(), pil.size)
        images.append(pil)
        points.append((xy, frame))
    positives, junk = setup_ground_truth(dataset.gnd[query:query + 1], "M")
    label = "positive" if candidate in positives[0] else ("junk" if candidate in junk[0] else "negative")
    title = (f"query {dataset.qimlist[query]} vs rank {rank}: {dataset.imlist[candidate]} ({label}), "
             f"{int(result.inliers[0])} inliers, scales {result.scale_pair[0].tolist()}")
    picture = draw_matches(images[0], images[1], points[0], points[1], title)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    picture.save(out)
    log(f"{title} -> {out}")
    return {"candidate": candidate, "inliers": int(result.inliers[0]), "label": label, "path": str(out)}
