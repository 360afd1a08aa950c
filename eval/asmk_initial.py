"""HOW + ASMK as the initial ranking of an evaluation (``gpu-dsm evaluate --initial asmk``).

The run's `gpu_dsm.pipeline.DSMRetrieval` does every step, each kept in the run's cache
folder (`gpu_dsm.cache`):

1. `fit_asmk` on the codebook images (``--codebook-data``:
   the evaluated database, other datasets' databases, image folders; never the evaluated queries)
   learns HOW's PCA whitening (scale 1), then the k-means codebook on their HOW descriptors (all
   scales);
2. `describe_how` gives the HOW descriptors of the database
   (and distractors) and of the queries;
3. `build_asmk_index` the inverted file of the database,
   which the module searches.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from gpu_dsm.asmk import ASMKConfig, ASMKIndex
from gpu_dsm.backbones.layers import HOW_LAYERS, backbone_layers
from gpu_dsm.how import HOWConfig, HOWFeatures
from gpu_dsm.images import ImageSpec
from gpu_dsm.pipeline import DSMRetrieval
from gpu_dsm.shards import Ranks
from gpu_dsm.eval.datasets import DistractorSet, RevisitopDataset


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
    labels = [label for label, _ in sources]
    for label in labels:
        if labels.count(label) > 1:
            raise ValueError(f"--codebook-data: two sources are named {label!r}; give each once")
    return [(label, [s for s in specs if Path(s.source).resolve() not in queries]) for label, specs in sources]


def check_run(run: ASMKRun, backbone: str, data_root: str | Path, dataset: RevisitopDataset) -> None:
    """Errors before any extraction: the layer exists for the backbone, the codebook data exist."""
    if run.how.layer is not None and run.how.layer not in backbone_layers(backbone):
        raise ValueError(f"--how-layer {run.how.layer}: {backbone} has {', '.join(backbone_layers(backbone))}")
    codebook_sources(run, data_root, dataset)


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
    database (and ``cfg``'s distractors) and the queries, each kept in the cache folder ``base``.

    Under torchrun (``ranks`` of a distributed job) every step is shared by the ranks
    (`gpu_dsm.pipeline.DSMRetrieval.fit_how_whitening`, `describe_how`);
    rank 0 gets the sets, the other ranks ``None``.
    """
    from gpu_dsm.eval.run import run_cache

    cache = run_cache(cfg, base, log, ranks)
    retrieval = DSMRetrieval(backbone(), cfg.retrieval, whitening="none", cache=cache)
    sources = codebook_sources(cfg.asmk, cfg.data_root, dataset)
    retrieval.fit_how_whitening(dict(sources))
    sets = _feature_sets(retrieval, cfg, dataset, sources)
    if timing is not None:
        timing.update(cache.timing)
    return sets


def _feature_sets(retrieval: DSMRetrieval, cfg, dataset: RevisitopDataset, sources: list[tuple[str, list[ImageSpec]]]
                  ) -> HOWFeatureSets | None:
    """The HOW features of the codebook images, the database (with ``cfg``'s distractors) and the
    queries, described by ``retrieval`` (found in its cache when kept there); ``None`` on the
    ranks other than 0 of a torchrun job."""
    parts = [(f"{dataset.name}-database", dataset.database_specs())]
    distractors = cfg.distractor_set()
    if distractors is not None:
        parts.append((distractors.root.resolve().name, distractors.specs()))
    train = [retrieval.describe_how(specs, label=label) for label, specs in sources]
    database = [retrieval.describe_how(specs, label=label) for label, specs in parts]
    queries = retrieval.describe_how(dataset.query_specs(), label=f"{dataset.name}-queries")
    if queries is None:
        return None
    cache = retrieval.cache
    return HOWFeatureSets(sources, train, [cache.name_of(t) for t in train], database,
                          [cache.name_of(d) for d in database], queries)


def asmk_index(cfg, retrieval: DSMRetrieval, dataset: RevisitopDataset) -> ASMKArtifacts:
    """The ASMK inverted file of the database (with ``cfg``'s distractors) and the queries' HOW features.

    ``cfg`` is the run's `gpu_dsm.eval.run.RunConfig` (``cfg.asmk`` an `ASMKRun`),
    ``retrieval`` its `gpu_dsm.pipeline.DSMRetrieval` with the network and the run's cache:
    it learns HOW's whitening and the codebook on the codebook images (`fit_asmk`),
    describes the images and builds the index.
    """
    run: ASMKRun = cfg.asmk
    sources = codebook_sources(run, cfg.data_root, dataset)
    retrieval.fit_asmk(dict(sources))
    sets = _feature_sets(retrieval, cfg, dataset, sources)
    index = retrieval.build_asmk_index(sets.database)
    codebook = retrieval.codebook
    options = run.options(cfg.backbone)
    num_images = sum(d.num_images for d in sets.database)
    queries = sets.queries
    diagnostics = {
        "codebook_data": [{"source": s, "label": label, "images": len(specs)}
                          for s, (label, specs) in zip(run.codebook_data, sets.sources)],
        "codebook_training_descriptors": sum(int(t.descriptors.shape[0]) for t in sets.train),
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
