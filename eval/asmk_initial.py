"""HOW + ASMK as the initial ranking of an evaluation (``gpu-dsm evaluate --initial asmk``).

Steps, each cached in the run's cache folder (written atomically, keyed on everything it
depends on, one lock per file so two runs never build the same file twice):

1. the codebook images (``--codebook-data``: the evaluated database, other datasets' databases,
   image folders; never the evaluated queries) give HOW's PCA whitening (scale 1) and then their
   HOW descriptors (all scales), on which the k-means codebook is trained;
2. HOW descriptors of the database (and distractors) and of the queries, with that whitening;
3. the ASMK inverted file of the database; every query searched at once.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from gpu_dsm.asmk import ASMKConfig, ASMKIndex, train_codebook
from gpu_dsm.backbones.layers import HOW_LAYERS, backbone_layers
from gpu_dsm.how import HOWConfig, HOWFeatures, describe_how, fit_how_whitening, how_moments, merge_how_features
from gpu_dsm.images import ImageSpec
from gpu_dsm.io import FileLock, stat_digest, torch_load_checked, torch_save
from gpu_dsm.shards import Ranks, balanced_slices, pixel_costs, run_sharded
from gpu_dsm.whitening import Whitening, pca_whitening_from_moments
from gpu_dsm.eval.datasets import DistractorSet, RevisitopDataset

_CODEBOOK_FORMAT = "gpu_dsm.asmk_codebook/1"


@dataclass
class ASMKRun:
    """What ``--initial asmk`` depends on: HOW descriptors, ASMK settings, the codebook images."""

    how: HOWConfig = field(default_factory=HOWConfig)
    asmk: ASMKConfig = field(default_factory=ASMKConfig)
    # where whitening and codebook are learned: "database" (the evaluated dataset's database
    # images), the name of another dataset under the data root (its database images), or a folder
    # of images (jpg/ + a list, as --distractors). HOW learns them on SfM-120k training images
    codebook_data: tuple[str, ...] = ("database",)

    def __post_init__(self):
        self.codebook_data = tuple(str(s) for s in self.codebook_data)
        if not self.codebook_data:
            raise ValueError("--codebook-data: at least one source of images")

    def options(self, backbone: str) -> dict[str, Any]:
        how = self.how.options()
        how["layer"] = how["layer"] or HOW_LAYERS[backbone]
        asmk = dataclasses.asdict(self.asmk)
        for how_it_runs in ("memory_budget", "search_backend"):  # neither changes a result
            asmk.pop(how_it_runs)
        return {"how": how, "asmk": asmk, "codebook_data": list(self.codebook_data)}


@dataclass
class ASMKRanking:
    """Every query's full ranking by ASMK: ``ranks (Q, N)`` database indices, ``scores (Q, N)``
    float64, best first; ``diagnostics`` for the results file."""

    ranks: torch.Tensor
    scores: torch.Tensor
    diagnostics: dict[str, Any]


def codebook_sources(run: ASMKRun, data_root: str | Path, dataset: RevisitopDataset) -> list[tuple[str, list[ImageSpec]]]:
    """``[(label, image specs)]`` of ``run.codebook_data``, each checked (errors name the source).

    The image files of the evaluated queries are left out wherever they appear (in the full
    revisitop sets a query's photo is also a database image): learning on a query would bias its score.
    """
    queries = {Path(spec.source).resolve() for spec in dataset.query_specs()}
    sources = []
    for source in run.codebook_data:
        if source == "database":
            sources.append((f"{dataset.name}-database", dataset.database_specs()))
        elif (Path(data_root) / source / f"gnd_{source}.pkl").is_file():
            sources.append((f"{source}-database", RevisitopDataset.load(data_root, source).database_specs()))
        elif Path(source).is_dir():
            folder = DistractorSet.load(source)
            sources.append((folder.root.resolve().name, folder.specs()))
        else:
            raise ValueError(f"--codebook-data {source!r}: neither 'database', a dataset under {data_root}, "
                             "nor a folder of images (jpg/ and imlist.txt)")
    return [(label, [s for s in specs if Path(s.source).resolve() not in queries]) for label, specs in sources]


def check_run(run: ASMKRun, backbone: str, data_root: str | Path, dataset: RevisitopDataset) -> None:
    """Errors before any extraction: the layer exists for the backbone, the codebook data exist."""
    if run.how.layer is not None and run.how.layer not in backbone_layers(backbone):
        raise ValueError(f"--how-layer {run.how.layer}: {backbone} has {', '.join(backbone_layers(backbone))}")
    codebook_sources(run, data_root, dataset)


def _images_key(specs: list[ImageSpec]) -> dict[str, Any]:
    return {"images": stat_digest([str(Path(s.source).resolve()) for s in specs]), "boxes": [s.box for s in specs]}


def _cached(path: Path, load: Callable[[Path], Any], build: Callable[[], Any], save: Callable[[Any, Path], Any],
            what: str, log, ranks: Ranks | None = None) -> tuple[Any, float | None]:
    """``load(path)`` if a readable file is there, else ``build()`` saved to ``path``; with the
    seconds building took (``None`` when reused). A corrupt file is reported and rebuilt.

    Under torchrun (``ranks``) every rank takes the same branch (the file is only written after
    a collective step of the build, which needs every rank past its check); rank 0 saves, and
    the others, once it has, load what it saved, so all ranks hold the same object. A build that
    writes ``path`` itself (rank 0's merge of shards; ``None`` on the other ranks) is not saved
    again, and the other ranks keep ``None``."""
    ranks = ranks or Ranks()
    lock = contextlib.nullcontext() if ranks.distributed else FileLock(
        path.with_name(f".{path.name}.lock"), on_wait=lambda p: log(f"{what}: waiting for another run (lock {p})"))
    with lock:
        if path.is_file():
            try:
                obj = load(path)
                log(f"{what}: reusing {path}")
                return obj, None
            except ValueError as exc:
                log(f"cache: {exc}; rebuilding it")
        start = time.perf_counter()
        obj = build()
        seconds = time.perf_counter() - start
        if ranks.rank == 0 and not (ranks.distributed and path.is_file()):
            save(obj, path)
        if ranks.distributed:
            ranks.barrier()
            if ranks.rank != 0 and obj is not None:
                obj = load(path)
        log(f"{what}: {seconds:.1f} s -> {path}")
        return obj, seconds


def _save_codebook(codebook: torch.Tensor, path: Path) -> Path:
    return torch_save(path, {"format": _CODEBOOK_FORMAT, "codebook": codebook.cpu()})


def _load_codebook(path: Path) -> torch.Tensor:
    codebook = torch_load_checked(path, _CODEBOOK_FORMAT, "ASMK codebook").get("codebook")
    if not isinstance(codebook, torch.Tensor) or codebook.ndim != 2 or not torch.isfinite(codebook).all():
        raise ValueError(f"corrupt ASMK codebook {path}")
    return codebook


def _concat(parts: list[HOWFeatures]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Descriptors and image ids of several feature sets as one image numbering (in order)."""
    offsets = [0]
    for p in parts:
        offsets.append(offsets[-1] + p.num_images)
    descriptors = torch.cat([p.descriptors for p in parts])
    ids = torch.cat([p.image_ids + o for p, o in zip(parts, offsets)])
    return descriptors, ids, offsets[-1]


@dataclass
class HOWFeatureSets:
    """The HOW features a ranking needs, and the names of their cache files (later keys build on them)."""

    sources: list[tuple[str, list[ImageSpec]]]  # the codebook images: [(label, specs)]
    train: list[HOWFeatures]  # HOW features of each codebook source
    train_names: list[str]
    database: list[HOWFeatures]  # the database, then the distractors
    database_names: list[str]
    queries: HOWFeatures


def how_feature_sets(cfg, dataset: RevisitopDataset, base: Path, backbone: Callable[[], Any], digest: Callable[[Any], str],
                     log=print, timing: dict | None = None, ranks: Ranks | None = None) -> HOWFeatureSets | None:
    """HOW whitening (learned on the codebook images) and HOW features of the codebook images, the
    database (and ``cfg``'s distractors) and the queries, each cached under ``base``.

    Under torchrun (``ranks`` of a distributed job) every step is shared: the whitening's moments
    are summed over the ranks' slices of the images, each feature set is described slice by slice
    into shards that rank 0 merges (:func:`gpu_dsm.shards.run_sharded`, resumable); rank 0 gets the
    sets, the other ranks ``None``.
    """
    run: ASMKRun = cfg.asmk
    ranks = ranks or Ranks()
    timing = timing if timing is not None else {}
    base = Path(base)
    sources = codebook_sources(run, cfg.data_root, dataset)
    options = run.options(cfg.backbone)
    model = {"backbone": cfg.backbone, "weights_sha256": cfg.weights_sha256(), "upsample": cfg.upsample, "dtype": cfg.dtype,
             **options["how"]}
    training = [_images_key(specs) for _, specs in sources]
    whitening_name = f"how-whitening-{cfg.backbone}-{digest({**model, 'training': training})}.pt"
    train_specs = [s for _, ss in sources for s in ss]
    whitening, timing["how_whitening_s"] = _cached(
        base / whitening_name, Whitening.load, lambda: _fit_whitening(backbone, train_specs, run.how, ranks),
        lambda w, p: w.save(p), "HOW whitening", log, ranks)

    def describe(specs: list[ImageSpec], label: str) -> HOWFeatures:
        return describe_how(backbone(), specs, whitening, run.how, desc=f"HOW {label}")

    def features(label: str, specs: list[ImageSpec]) -> tuple[HOWFeatures | None, str]:
        """HOW features of ``specs`` and the name of their cache file."""
        name = f"how-{label}-{digest({'whitening': whitening_name, **_images_key(specs)})}.pt"
        build = (functools.partial(_describe_sharded, specs, label, base / name, describe, run.how, ranks, log)
                 if ranks.distributed else functools.partial(describe, specs, label))
        feats, seconds = _cached(base / name, HOWFeatures.load, build, lambda f, p: f.save(p), f"HOW {label}", log, ranks)
        if seconds is not None or f"how_{label}_s" not in timing:  # the codebook images may be the database: keep its time
            timing[f"how_{label}_s"] = None if seconds is None else round(seconds, 3)
        return feats, name

    train, train_names = zip(*[features(label, specs) for label, specs in sources])
    parts = [features(f"{dataset.name}-database", dataset.database_specs())]
    distractors = cfg.distractor_set()
    if distractors is not None:
        parts.append(features(distractors.root.resolve().name, distractors.specs()))
    queries, _ = features(f"{dataset.name}-queries", dataset.query_specs())
    if ranks.rank != 0:
        return None
    database, database_names = zip(*parts)
    return HOWFeatureSets(sources, list(train), list(train_names), list(database), list(database_names), queries)


def _fit_whitening(backbone: Callable[[], Any], specs: list[ImageSpec], how: HOWConfig, ranks: Ranks) -> Whitening:
    """HOW's whitening of ``specs``; under torchrun each rank sums the moments of its slice."""
    if not ranks.distributed:
        return fit_how_whitening(backbone(), specs, how)
    if not specs:
        raise ValueError("fit_how_whitening: no images")
    mine = balanced_slices(pixel_costs(specs, how.image_size, how.upscale), ranks.world)[ranks.rank]
    count, total, outer = how_moments(backbone(), [specs[i] for i in mine], how)
    net_dim = outer.shape[0]
    summed = ranks.all_reduce_sum(torch.cat([torch.tensor([float(count)], dtype=torch.float64, device=total.device),
                                             total, outer.reshape(-1)]))
    return pca_whitening_from_moments(int(summed[0]), summed[1:1 + net_dim], summed[1 + net_dim:].reshape(net_dim, net_dim),
                                      how.dim)


def _describe_sharded(specs: list[ImageSpec], label: str, path: Path, describe: Callable[[list[ImageSpec], str], HOWFeatures],
                      how: HOWConfig, ranks: Ranks, log) -> HOWFeatures | None:
    """HOW features of ``specs`` described slice by slice over ``ranks`` and merged by rank 0 at
    ``path`` (rank 0 returns them, the others ``None``)."""
    def finished(shard: Path, rows: list[int]) -> bool:
        try:
            return HOWFeatures.load(shard).num_images == len(rows)
        except (OSError, ValueError):
            return False

    def merge(shards: list[Path], slices: list[list[int]], out: Path) -> None:
        merge_how_features([HOWFeatures.load(s) for s in shards], slices, len(specs)).save(out)

    run_sharded(ranks, pixel_costs(specs, how.image_size, how.upscale), path,
                lambda rows, own: describe([specs[i] for i in rows], label).save(own), finished, merge, log)
    return HOWFeatures.load(path) if ranks.rank == 0 else None


def asmk_ranking(cfg, dataset: RevisitopDataset, base: Path, backbone: Callable[[], Any], digest: Callable[[Any], str],
                 log=print, timing: dict | None = None) -> ASMKRanking:
    """Rank the database (with ``cfg``'s distractors) for every query by HOW + ASMK.

    ``cfg`` is the run's :class:`gpu_dsm.eval.run.RunConfig` (``cfg.asmk`` an :class:`ASMKRun`),
    ``backbone()`` builds (once) the network, ``digest`` keys the cache files.
    """
    run: ASMKRun = cfg.asmk
    device = torch.device(cfg.device)
    timing = timing if timing is not None else {}
    base = Path(base)
    sets = how_feature_sets(cfg, dataset, base, backbone, digest, log, timing)
    sources, train, train_names, queries = sets.sources, sets.train, sets.train_names, sets.queries
    database, database_names = sets.database, sets.database_names
    options = run.options(cfg.backbone)
    train_descriptors = torch.cat([t.descriptors for t in train])
    asmk_options = options["asmk"]
    codebook_key = {"training": list(train_names), "size": run.asmk.codebook_size,
                    "iterations": run.asmk.kmeans_iterations, "seed": run.asmk.seed}
    codebook_name = f"asmk-codebook-{digest(codebook_key)}.pt"
    codebook, timing["asmk_codebook_s"] = _cached(
        base / codebook_name, _load_codebook,
        lambda: train_codebook(train_descriptors.to(device), run.asmk.codebook_size, run.asmk.kmeans_iterations, run.asmk.seed,
                               run.asmk.memory_budget),
        _save_codebook, "ASMK codebook", log)
    db_descriptors, db_ids, num_images = _concat(list(database))
    index_key = {"codebook": codebook_name, "database": list(database_names), "asmk": asmk_options}
    index_name = f"asmk-index-{digest(index_key)}.pt"
    index, timing["asmk_index_s"] = _cached(
        base / index_name, lambda p: ASMKIndex.load(p, device),
        lambda: ASMKIndex.build(codebook.to(device), db_descriptors.to(device), db_ids.to(device), run.asmk, num_images),
        lambda i, p: i.save(p), "ASMK index", log)
    index = dataclasses.replace(index, config=run.asmk)
    start = time.perf_counter()
    scores, ranks = index.search(queries.descriptors.to(device), queries.image_ids.to(device), k=None,
                                 num_queries=queries.num_images)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    timing["asmk_search_s"] = round(seconds, 4)
    q = max(queries.num_images, 1)
    diagnostics = {
        "codebook_data": [{"source": s, "label": label, "images": len(specs)} for s, (label, specs) in zip(run.codebook_data, sources)],
        "codebook_training_descriptors": int(train_descriptors.shape[0]),
        "codebook_size": int(codebook.shape[0]),
        "layer": options["how"]["layer"],
        "descriptor_dim": int(codebook.shape[1]),
        "features_per_database_image": round(db_descriptors.shape[0] / max(num_images, 1), 1),
        "features_per_query": round(queries.descriptors.shape[0] / q, 1),
        "words_per_database_image": round(index.num_entries / max(num_images, 1), 1),
        "index_bytes_per_image": round(index.bytes_per_image(), 1),
        "search_ms_per_query": round(1000 * seconds / q, 2),
        "search_backend": index.search_backend(),
    }
    log(f"ASMK: {diagnostics['words_per_database_image']} words and {diagnostics['index_bytes_per_image']:.0f} bytes per "
        f"database image, {diagnostics['search_ms_per_query']:.2f} ms per query ({q} queries at once, "
        f"{diagnostics['search_backend']} scoring) on {device}")
    return ASMKRanking(ranks=ranks.cpu(), scores=scores.cpu(), diagnostics=diagnostics)
