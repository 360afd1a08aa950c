"""HOW + ASMK as the initial ranking of an evaluation (``gpu-dsm evaluate --initial asmk``).

Steps, each cached in the run's cache folder (written atomically, keyed on everything it
depends on, one lock per file so two runs never build the same file twice):

1. the codebook images (``--codebook-data``: the evaluated database, other datasets' databases,
   image folders; never the evaluated queries) give HOW's PCA whitening (scale 1) and then their
   HOW descriptors (all scales), on which the k-means codebook is trained;
2. HOW descriptors of the database (and distractors) and of the queries, with that whitening;
3. the ASMK codebook and the inverted file of the database, which the run's
   `gpu_dsm.pipeline.DSMRetrieval` searches.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from gpu_dsm.artifacts import cache_digest, cached
from gpu_dsm.asmk import ASMKConfig, ASMKIndex, train_codebook
from gpu_dsm.backbones.layers import HOW_LAYERS, backbone_layers
from gpu_dsm.how import HOWConfig, HOWFeatures, describe_how, fit_how_whitening, how_checkpoint, how_moments, merge_how_features
from gpu_dsm.images import ImageSpec
from gpu_dsm.io import stat_digest, torch_load_checked, torch_save
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
class ASMKArtifacts:
    """What the ASMK initial ranking of a run needs: the database's inverted file, the queries'
    HOW features, and ``diagnostics`` for the results file."""

    index: ASMKIndex
    queries: HOWFeatures
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


def _save_codebook(codebook: torch.Tensor, path: Path) -> Path:
    return torch_save(path, {"format": _CODEBOOK_FORMAT, "codebook": codebook.cpu()})


def _load_codebook(path: Path) -> torch.Tensor:
    codebook = torch_load_checked(path, _CODEBOOK_FORMAT, "ASMK codebook").get("codebook")
    if not isinstance(codebook, torch.Tensor) or codebook.ndim != 2 or not torch.isfinite(codebook).all():
        raise ValueError(f"corrupt ASMK codebook {path}")
    return codebook


@dataclass
class HOWFeatureSets:
    """The HOW features a ranking needs, and the names of their cache files (later keys build on them)."""

    sources: list[tuple[str, list[ImageSpec]]]  # the codebook images: [(label, specs)]
    train: list[HOWFeatures]  # HOW features of each codebook source
    train_names: list[str]
    database: list[HOWFeatures]  # the database, then the distractors
    database_names: list[str]
    queries: HOWFeatures


def how_feature_sets(cfg, dataset: RevisitopDataset, base: Path, backbone: Callable[[], Any], log=print,
                     timing: dict | None = None, ranks: Ranks | None = None) -> HOWFeatureSets | None:
    """HOW whitening (learned on the codebook images) and HOW features of the codebook images, the
    database (and ``cfg``'s distractors) and the queries, each cached under ``base``.

    Under torchrun (``ranks`` of a distributed job) every step is shared: the whitening's moments
    are summed over the ranks' slices of the images, each feature set is described slice by slice
    into shards that rank 0 merges (`gpu_dsm.shards.run_sharded`, resumable); rank 0 gets the
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
    whitening_name = f"how-whitening-{cfg.backbone}-{cache_digest({**model, 'training': training})}.pt"
    train_specs = [s for _, ss in sources for s in ss]
    whitening, timing["how_whitening_s"] = cached(
        base / whitening_name, Whitening.load, lambda: _fit_whitening(backbone, train_specs, run.how, ranks),
        lambda w, p: w.save(p), "HOW whitening", log, ranks)

    def describe(specs: list[ImageSpec], label: str) -> HOWFeatures:
        return describe_how(backbone(), specs, whitening, run.how, desc=f"HOW {label}")

    def features(label: str, specs: list[ImageSpec]) -> tuple[HOWFeatures | None, str]:
        """HOW features of ``specs`` and the name of their cache file."""
        name = f"how-{label}-{cache_digest({'whitening': whitening_name, **_images_key(specs)})}.pt"
        build = (functools.partial(_describe_sharded, specs, label, base / name, describe, run.how, ranks, log)
                 if ranks.distributed else functools.partial(describe, specs, label))
        feats, seconds = cached(base / name, HOWFeatures.load, build, lambda f, p: f.save(p), f"HOW {label}", log, ranks)
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
    if not ranks.distributed or how_checkpoint(backbone()) is not None:  # a HOW checkpoint's reduction is not fitted
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


def asmk_index(cfg, retrieval, dataset: RevisitopDataset, base: Path, backbone: Callable[[], Any], log=print,
               timing: dict | None = None) -> ASMKArtifacts:
    """The ASMK inverted file of the database (with ``cfg``'s distractors) and the queries' HOW features.

    ``cfg`` is the run's `gpu_dsm.eval.run.RunConfig` (``cfg.asmk`` an `ASMKRun`),
    ``retrieval`` its `gpu_dsm.pipeline.DSMRetrieval` (it builds the index), ``backbone()``
    builds (once) the network.
    """
    run: ASMKRun = cfg.asmk
    device = retrieval.device
    timing = timing if timing is not None else {}
    base = Path(base)
    sets = how_feature_sets(cfg, dataset, base, backbone, log, timing)
    options = run.options(cfg.backbone)
    train_descriptors = torch.cat([t.descriptors for t in sets.train])
    words = run.asmk.words_for(train_descriptors.shape[0])
    codebook_key = {"training": list(sets.train_names), "size": words,
                    "iterations": run.asmk.kmeans_iterations, "seed": run.asmk.seed}
    codebook_name = f"asmk-codebook-{cache_digest(codebook_key)}.pt"
    codebook, timing["asmk_codebook_s"] = cached(
        base / codebook_name, _load_codebook,
        lambda: train_codebook(train_descriptors.to(device), words, run.asmk.kmeans_iterations, run.asmk.seed,
                               run.asmk.memory_budget),
        _save_codebook, "ASMK codebook", log)
    retrieval.learned.set("codebook", codebook.to(device))
    index_key = {"codebook": codebook_name, "database": list(sets.database_names), "asmk": options["asmk"]}
    index, timing["asmk_index_s"] = cached(
        base / f"asmk-index-{cache_digest(index_key)}.pt", lambda p: ASMKIndex.load(p, device),
        lambda: retrieval.build_asmk_index(sets.database), lambda i, p: i.save(p), "ASMK index", log)
    index = dataclasses.replace(index, config=run.asmk)
    num_images = sum(d.num_images for d in sets.database)
    queries = sets.queries
    diagnostics = {
        "codebook_data": [{"source": s, "label": label, "images": len(specs)}
                          for s, (label, specs) in zip(run.codebook_data, sets.sources)],
        "codebook_training_descriptors": int(train_descriptors.shape[0]),
        "codebook_size": int(codebook.shape[0]),
        "layer": options["how"]["layer"],
        "descriptor_dim": int(codebook.shape[1]),
        "features_per_database_image": round(sum(d.descriptors.shape[0] for d in sets.database) / max(num_images, 1), 1),
        "features_per_query": round(queries.descriptors.shape[0] / max(queries.num_images, 1), 1),
        "words_per_database_image": round(index.num_entries / max(num_images, 1), 1),
        "index_bytes_per_image": round(index.bytes_per_image(), 1),
        "search_backend": index.search_backend(),
    }
    return ASMKArtifacts(index=index, queries=queries, diagnostics=diagnostics)
