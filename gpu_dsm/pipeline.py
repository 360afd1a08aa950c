"""The whole method as one module: ``DSMRetrieval`` (DSM paper 3.6, 4.1).

    retrieval = DSMRetrieval(build_backbone("efficientnet_lite0"),
                             RetrievalConfig(diffusion=DiffusionConfig()))
    index = retrieval.index(database_images)     # global descriptors, local features, search index, kNN graph
    result = retrieval.search(query_images, index)
    result.ranks                                  # (Q, N): global ranking -> DSM re-ranking -> diffusion
    result.methods["global+dsm"]                  # every method on the way, as (Q, N) rankings

Any network works: a plain ``nn.Module`` mapping ``(B, 3, H, W)`` images to ``(B, K, h, w)``
activations ([`gpu_dsm.backbones.wrap.as_backbone`][gpu_dsm.backbones.wrap.as_backbone] measures its stride). Inputs may be images
(paths, arrays, PIL images, [`ImageSpec`][gpu_dsm.images.ImageSpec]), activations (a ``(B, K, H, W)`` tensor, one per
scale, or per-image lists), or feature stores ([`DSMRetrieval.from_store`][gpu_dsm.pipeline.DSMRetrieval.from_store]: a database larger
than memory, its local features read on demand). Learned state (the whitening of global
descriptors, HOW's whitening and the ASMK codebook) lives in buffers: ``state_dict()`` holds it,
``.to()`` moves it. With a cache folder (``DSMRetrieval(..., cache="folder")``, [`gpu_dsm.cache`][gpu_dsm.cache])
what it learns and builds from image files is kept there and found again by the next run.

The index is a separate object ([`DescribedImages`][gpu_dsm.ranking.DescribedImages]), as the module is one method and an
index one database; both are saved to one folder and read back ([`gpu_dsm.saved`][gpu_dsm.saved])::

    retrieval.save("my_index", index)                       # config, learned state, index
    retrieval = DSMRetrieval.load("my_index", backbone)      # checked: format, backbone
    index = retrieval.load_index("my_index")                 # checked: config, learned state
    result = retrieval.search(query_images, index)           # ranks as before saving

A ranking from any other model goes through the same stages ([`DSMRetrieval.rerank`][gpu_dsm.pipeline.DSMRetrieval.rerank])::

    result = retrieval.rerank(query_images, database_images, scores, indices)  # (Q, K) each
    result.ranks                                  # (Q, K): given -> DSM re-ranking -> diffusion
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from gpu_dsm.activations import Activations, is_activations, per_image_maps
from gpu_dsm.asmk import ASMKConfig, ASMKIndex, train_codebook
from gpu_dsm.backbones.backbone import Backbone
from gpu_dsm.backbones.checkpoint import RetrievalHead
from gpu_dsm.backbones.wrap import as_backbone
from gpu_dsm.cache import ArtifactCache, images_key, network_identity
from gpu_dsm.global_descriptors import GlobalConfig, describe_images
from gpu_dsm.detect import DetectorConfig, detect_images
from gpu_dsm.diffusion import DiffusionConfig
from gpu_dsm.extract import ExtractConfig
from gpu_dsm.features import LocalFeatures
from gpu_dsm.graph import GraphConfig, KnnGraph, build_knn_graph
from gpu_dsm.how import HOWConfig, HOWFeatures, describe_how
from gpu_dsm.images import ImageLike, ImageSpec
from gpu_dsm.match import MatchConfig, MatchResult, spatial_verify
from gpu_dsm.ranking import DescribedImages, SearchResult, rank_given, rank_methods
from gpu_dsm.rerank import LocalSubset, RerankConfig, gather_local
from gpu_dsm.knn import GlobalIndex, SearchConfig
from gpu_dsm.shards import Ranks, sharded_how_features, sharded_how_whitening
from gpu_dsm.store import FeatureStore, StoreStack, StoreWriter
from gpu_dsm.whitening import Whitening, resolve_whitening

INITIAL_RANKINGS = ("global", "asmk")


@dataclass
class RetrievalConfig:
    """Every stage of [`DSMRetrieval`][gpu_dsm.pipeline.DSMRetrieval]; ``None`` turns re-ranking or diffusion off."""

    extract: ExtractConfig = field(default_factory=ExtractConfig)
    global_: GlobalConfig = field(default_factory=GlobalConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    # DSM spatial re-ranking of the initial top-k (paper 3.5-3.6); None: no local features, no re-ranking
    rerank: RerankConfig | None = field(default_factory=RerankConfig)
    # diffusion on the database's kNN graph (paper 3.6, Iscen et al. 2017), seeded by the verified
    # images when re-ranking is on; None (default): off, as it needs the whole database's graph
    diffusion: DiffusionConfig | None = None
    graph: GraphConfig = field(default_factory=GraphConfig)  # the kNN graph diffusion runs on
    initial: str = field(default="global", metadata={
        "flag": "--initial", "choices": INITIAL_RANKINGS, "source": "paper 3.6",
        "help": "the initial ranking besides the global descriptor's: 'asmk' (HOW + ASMK, Tolias et al. 2020) adds the "
                "methods asmk, asmk+dsm (with re-ranking) and asmk+dsm+D (with --diffusion), at the cost of a second "
                "description pass (7 scales) and a codebook; with the bundled ImageNet weights it ranks below the "
                "global descriptor on holidays-811 and above it on roxford5k-19q (docs 'HOW + ASMK'): pick it with "
                "HOW-trained weights or on landmark sets"})
    how: HOWConfig = field(default_factory=HOWConfig)  # HOW descriptors, with initial="asmk"
    asmk: ASMKConfig = field(default_factory=ASMKConfig)  # codebook and kernel, with initial="asmk"
    search: SearchConfig = field(default_factory=SearchConfig)  # global search: exact (default) or a FAISS index
    # queries verified at once: memory grows with query_batch x top_k candidate tables (8 x 100 x
    # 2048 features ~ 60 MB); 8 measured as fast as larger batches on 2 CPU cores
    query_batch: int = 8

    def __post_init__(self):
        if self.initial not in INITIAL_RANKINGS:
            raise ValueError(f"RetrievalConfig.initial must be one of {INITIAL_RANKINGS}, got {self.initial!r}")
        if int(self.query_batch) < 1:
            raise ValueError(f"RetrievalConfig.query_batch must be >= 1, got {self.query_batch}")


class LearnedState(nn.Module):
    """Optional learned tensors as buffers: absent ones are ``None`` and a state dict that has
    them fills them in (so a module saved after learning loads into a fresh one).

    ``whitening_projection (d, D)`` / ``whitening_bias (d,)``: the whitening of global descriptors;
    ``how_whitening_projection`` / ``how_whitening_bias``: HOW's reduction; ``codebook (K, d)``: ASMK's."""

    NAMES = ("whitening_projection", "whitening_bias", "how_whitening_projection", "how_whitening_bias", "codebook")

    def __init__(self):
        super().__init__()
        for name in self.NAMES:
            self.register_buffer(name, None)

    def set(self, name: str, tensor: torch.Tensor | None) -> None:
        """Hold a detached float32 copy of ``tensor`` (on its device) as buffer ``name``, one of
        `NAMES`, or clear it (``None``); an unknown name raises ``KeyError``."""
        if name not in self.NAMES:
            raise KeyError(name)
        self._buffers[name] = None if tensor is None else tensor.detach().float().clone()

    def whitening(self, prefix: str = "") -> Whitening | None:
        """The [`Whitening`][gpu_dsm.whitening.Whitening] held under ``prefix`` (``""``: global descriptors', ``"how_"``:
        HOW's): its float32 buffers, on their device (the module's after ``.to()``), not copied;
        ``None`` when absent."""
        projection, bias = self._buffers[f"{prefix}whitening_projection"], self._buffers[f"{prefix}whitening_bias"]
        return None if projection is None else Whitening(projection=projection, bias=bias)

    def set_whitening(self, whitening: Whitening | None, prefix: str = "") -> None:
        """Hold ``whitening``'s projection and bias under ``prefix`` (as [`set`][gpu_dsm.pipeline.LearnedState.set]: float32
        copies, on their device), or clear both (``None``)."""
        self.set(f"{prefix}whitening_projection", None if whitening is None else whitening.projection)
        self.set(f"{prefix}whitening_bias", None if whitening is None else whitening.bias)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        for name in self.NAMES:
            key = prefix + name
            if key in state_dict:
                value = state_dict[key]
                if not isinstance(value, torch.Tensor):
                    error_msgs.append(f"{key}: expected a tensor, got {type(value).__name__}")
                    continue
                current = self._buffers[name]
                self._buffers[name] = value.detach().to(current.device if current is not None else value.device).clone()
            elif strict and self._buffers[name] is not None:
                missing_keys.append(key)


class DSMRetrieval(nn.Module):
    """A retrieval network followed by deep spatial matching and diffusion, as one module.

    Args:
        backbone: any ``nn.Module`` mapping ``(B, 3, H, W)`` RGB images to ``(B, K, h, w)``
            activations (a `Backbone` from `gpu_dsm.build_backbone`, a torchvision
            trunk, a timm model with ``forward_features``), or ``None`` for a module that only ranks
            what was described elsewhere (activations, feature stores).
        config: the stages ([`RetrievalConfig`][gpu_dsm.pipeline.RetrievalConfig]).
        whitening: learned whitening of global descriptors: a [`Whitening`][gpu_dsm.whitening.Whitening], a saved one's
            path, ``"none"``, or ``None`` for the one the backbone's checkpoint carries (if any).
        how_whitening, codebook: HOW's reduction and the ASMK codebook ``(K, d)``
            ([`fit_asmk`][gpu_dsm.pipeline.DSMRetrieval.fit_asmk] learns both).
        stride, mean, std, activation_bound: facts of a plain ``backbone``
            ([`gpu_dsm.backbones.wrap.as_backbone`][gpu_dsm.backbones.wrap.as_backbone]: stride measured, ImageNet normalisation).
        cache: a folder (or an [`gpu_dsm.cache.ArtifactCache`][gpu_dsm.cache.ArtifactCache]) where what the module
            learns and builds from image files is kept between runs and found again: HOW's
            whitening, HOW features and the codebook ([`fit_asmk`][gpu_dsm.pipeline.DSMRetrieval.fit_asmk], [`describe_how`][gpu_dsm.pipeline.DSMRetrieval.describe_how]), the
            ASMK index, the kNN graph; ``None`` (default): nothing is kept.
    """

    def __init__(self, backbone: nn.Module | None = None, config: RetrievalConfig | None = None,
                 whitening: Whitening | str | Path | None = None, how_whitening: Whitening | None = None,
                 codebook: torch.Tensor | None = None, *, stride: int | None = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, activation_bound: float | None = None,
                 cache: ArtifactCache | str | Path | None = None):
        super().__init__()
        self.config = config or RetrievalConfig()
        self.cache = ArtifactCache(cache) if isinstance(cache, (str, Path)) else cache
        self.backbone = (as_backbone(backbone, stride=stride, mean=mean, std=std, activation_bound=activation_bound)
                         if backbone is not None else None)
        self.learned = LearnedState()
        head = self.backbone.head if self.backbone is not None else None
        self.whitening_label, learned = resolve_whitening(whitening, head, len(self.config.extract.scales))
        self.learned.set_whitening(learned)
        self.learned.set_whitening(how_whitening, "how_")
        self.learned.set("codebook", codebook)
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)  # follows .to(): the module's device

    # --- learned state ---------------------------------------------------------------------------

    @property
    def whitening(self) -> Whitening | None:
        """The learned whitening applied to global descriptors (``None``: none)."""
        return self.learned.whitening()

    @property
    def how_whitening(self) -> Whitening | None:
        """HOW's learned reduction ``(d, K)`` (float32, on the module's device), with the ASMK
        initial ranking; ``None`` until [`fit_asmk`][gpu_dsm.pipeline.DSMRetrieval.fit_asmk] learns it or the constructor is given it."""
        return self.learned.whitening("how_")

    @property
    def codebook(self) -> torch.Tensor | None:
        """The ASMK codebook ``(K, d)`` float32 on the module's device; ``None`` until
        [`fit_asmk`][gpu_dsm.pipeline.DSMRetrieval.fit_asmk] learns it or the constructor is given it."""
        return self.learned.codebook

    @property
    def device(self) -> torch.device:
        """Where the module computes: the backbone's device, or without a backbone where
        ``.to()`` put the module (the CPU at first)."""
        return self.backbone.device if self.backbone is not None else self._anchor.device

    def _network(self, what: str) -> Backbone:
        if self.backbone is None:
            raise ValueError(f"{what} needs a network: this DSMRetrieval was built without a backbone")
        return self.backbone

    def _head(self) -> RetrievalHead:
        return self.backbone.head if self.backbone is not None else RetrievalHead()

    def _cache_for(self, images: Sequence[Any]) -> ArtifactCache | None:
        """The cache, when there is one and ``images`` are files it can key on."""
        return self.cache if self.cache is not None and images_key(images) is not None else None

    def fit_how_whitening(self, images: Sequence[ImageLike | ImageSpec] | Mapping[str, Sequence[ImageLike | ImageSpec]]
                          ) -> "DSMRetrieval":
        """Learn HOW's whitening on ``images`` (never the queries): a list, or named image sets
        ``{label: images}`` learned on together. A backbone built from a HOW checkpoint brings its
        learned reduction instead. With a cache, found there or learned and kept; under torchrun
        (the cache's ranks) each rank sums the moments of its slice of the images."""
        net = self._network("fit_asmk")
        sets = _image_sets(images)
        everything = [image for part in sets.values() for image in part]
        cache = self._cache_for(everything)
        ranks = cache.ranks if cache is not None else Ranks()

        def fit():
            return sharded_how_whitening(net, everything, self.config.how, ranks)

        whitening = fit() if cache is None else cache.how_whitening(
            self.config.how, list(sets.values()), fit, cache.network or network_identity(net))
        self.learned.set_whitening(whitening, "how_")
        if cache is not None:
            cache.remember(self.learned.how_whitening_projection, cache.name_of(whitening))
        return self

    def fit_asmk(self, images: Sequence[ImageLike | ImageSpec] | Mapping[str, Sequence[ImageLike | ImageSpec]]
                 ) -> "DSMRetrieval":
        """Learn HOW's whitening ([`fit_how_whitening`][gpu_dsm.pipeline.DSMRetrieval.fit_how_whitening]) and the ASMK codebook on ``images``
        (never the queries): a list, or named image sets ``{label: images}`` (their HOW features
        are cached one file per set, under its label). With a cache, each step is found there or
        learned and kept."""
        sets = _image_sets(images)
        if self.cache is not None and self.cache.ranks.distributed:
            raise ValueError("fit_asmk runs in one process: under torchrun, fit_how_whitening and describe_how "
                             "(each shared by the ranks), then fit_asmk in one process with the same cache")
        self.fit_how_whitening(sets)
        training = [self.describe_how(part, label=label) for label, part in sets.items()]
        cfg = self.config.asmk
        descriptors = torch.cat([t.descriptors for t in training]).to(self.device)
        words = cfg.words_for(descriptors.shape[0])

        def train() -> torch.Tensor:
            return train_codebook(descriptors, words, cfg.kmeans_iterations, cfg.seed, cfg.memory_budget)

        cache = self._cache_for([image for part in sets.values() for image in part])
        codebook = train() if cache is None else cache.codebook(training, words, cfg, train)
        self.learned.set("codebook", codebook.to(self.device))
        if cache is not None:
            cache.remember(self.learned.codebook, cache.name_of(codebook))
        return self

    # --- describing --------------------------------------------------------------------------------

    @property
    def local_features(self) -> bool:
        """Whether local features are detected (re-ranking is on)."""
        return self.config.rerank is not None

    def _detect_batch(self, maps_per_image: list[list[torch.Tensor]], is_query: bool):
        """Local features per image (``None`` without re-ranking) and map sizes ``(B, S, 2)`` of a
        batch of activations: the detector's one call per batch."""
        sizes = torch.tensor([[list(m.shape[-2:]) for m in maps] for maps in maps_per_image], dtype=torch.long)
        features = None
        if self.local_features:
            bound = self.backbone.activation_bound if self.backbone is not None else None
            features = detect_images(maps_per_image, self.config.detector, is_query, bound)
        return features, sizes.view(len(maps_per_image), -1, 2)

    def _whiten(self, descriptors: torch.Tensor) -> torch.Tensor:
        whitening = self.whitening
        return whitening.apply(descriptors) if whitening is not None else descriptors

    def describe(self, inputs: Sequence[ImageLike | ImageSpec] | Activations, is_query: bool = False) -> DescribedImages:
        """Global descriptors (whitened) and local features of images or of their activations, in
        one pass of the network; with the ASMK initial ranking also HOW features (images only).
        Images given by path keep their paths as ``names``."""
        return self._describe(inputs, is_query, with_how=True)

    def _describe(self, inputs, is_query: bool, with_how: bool) -> DescribedImages:
        if is_activations(inputs):
            maps_per_image = per_image_maps(inputs)
            if self.config.initial == "asmk" and with_how:
                raise ValueError("initial='asmk': HOW features are read off another layer at other scales; "
                                 "describe images, not activations")
            recipe = self.config.global_.resolve(self._head())
            descriptors = torch.stack([recipe(maps) for maps in maps_per_image])
            features, sizes = self._detect_batch(maps_per_image, is_query)
            local = None
            if features is not None:
                # the scale factors are known when the maps are one per configured scale
                scales = self.config.extract.scales if sizes.shape[1] == len(self.config.extract.scales) else ()
                local = LocalFeatures.from_images(features, sizes, scales, maps_per_image[0][0].shape[0],
                                                  capacity=self.config.detector.max_features, device=descriptors.device)
            return DescribedImages(self._whiten(descriptors), local)
        net = self._network("describing images")
        n = len(inputs)
        recipe = self.config.global_.resolve(net)
        descriptors = torch.zeros(n, recipe.descriptor_dim(net.out_channels), device=net.device)
        per_image: list[dict] = [{}] * n
        sizes = torch.zeros(n, len(self.config.extract.scales), 2, dtype=torch.long)

        def keep(indices: list[int], batch_descriptors: torch.Tensor, maps_per_image: list[list[torch.Tensor]]) -> None:
            features, batch_sizes = self._detect_batch(maps_per_image, is_query)
            descriptors[indices] = batch_descriptors
            sizes[indices] = batch_sizes
            for index, found in zip(indices, features or []):
                per_image[index] = found

        describe_images(net, inputs, keep, self.config.extract, self.config.global_,
                        desc="describe queries" if is_query else "describe database")
        local = None
        if self.local_features:
            local = LocalFeatures.from_images(per_image, sizes, self.config.extract.scales, net.out_channels,
                                              capacity=self.config.detector.max_features, device=descriptors.device)
        how = self.describe_how(inputs) if with_how else None
        return DescribedImages(self._whiten(descriptors), local, how=how, names=_names(inputs))

    def describe_activations(self, maps_per_image: Activations, is_query: bool = False) -> DescribedImages:
        """[`describe`][gpu_dsm.pipeline.DSMRetrieval.describe] of activations computed elsewhere."""
        if not is_activations(maps_per_image):
            per_image_maps(maps_per_image)  # raises, naming the accepted forms
        return self.describe(maps_per_image, is_query)

    def describe_how(self, images: Sequence[ImageLike | ImageSpec], desc: str | None = None,
                     label: str = "images") -> HOWFeatures | None:
        """HOW features of ``images`` with the ASMK initial ranking (else ``None``).

        With a cache and image files, found there or described and kept (``label`` names the
        file); under torchrun (the cache's ranks) the ranks describe slices of the images and rank
        0 merges them: rank 0 gets the features, the other ranks ``None``."""
        if self.config.initial != "asmk":
            return None
        whitening = self.how_whitening
        if whitening is None:
            raise ValueError("initial='asmk' needs HOW's whitening: call fit_asmk(images) first (or pass how_whitening=)")
        net = self._network("HOW features")
        desc = desc or f"HOW {label}"

        def describe(part: Sequence[ImageLike | ImageSpec]) -> HOWFeatures:
            return describe_how(net, part, whitening, self.config.how, desc=desc)

        cache = self._cache_for(images)
        if cache is None:
            return describe(images)
        if cache.ranks.distributed:
            return cache.how_features(label, whitening, images, lambda path: sharded_how_features(
                list(images), path, describe, self.config.how, cache.ranks, cache.log))
        return cache.how_features(label, whitening, images, lambda path: describe(images))

    def write_store(self, images: Sequence[ImageLike | ImageSpec], path: str | Path, names: Sequence[str],
                    options: dict[str, Any], is_query: bool = False, desc: str = "describe",
                    log: Callable[[str], Any] | None = None) -> FeatureStore:
        """Describe ``images`` into a new feature store at ``path`` (published atomically): the
        network's global descriptors (before the learned whitening, which is a search-time step)
        and, with re-ranking on, local features. ``options`` go into the store's metadata.

        Resumable: an interrupted write (Ctrl-C, a crash) keeps its finished images, and the same
        call describes only the missing ones ([`StoreWriter`][gpu_dsm.store.StoreWriter]); the store is the same."""
        net = self._network("write_store")
        local = {"scales": list(self.config.extract.scales), "num_channels": net.out_channels} if self.local_features else None
        dim = self.config.global_.resolve(net).descriptor_dim(net.out_channels)
        with StoreWriter(path, names, dim, options, local=local) as writer:
            todo = writer.missing()
            if writer.resumed and log is not None:
                log(f"{desc}: resuming an interrupted write, {writer.resumed} of {len(names)} images already done")

            def write(rows: list[int], descriptors: torch.Tensor, maps_per_image: list[list[torch.Tensor]]) -> None:
                features, sizes = self._detect_batch(maps_per_image, is_query)
                indices = [todo[row] for row in rows]
                for index, descriptor in zip(indices, descriptors):
                    writer.add_global(index, descriptor)
                for index, found, size in zip(indices, features or [], sizes):
                    writer.add_local(index, found, size)

            describe_images(net, [images[i] for i in todo], write, self.config.extract, self.config.global_, desc=desc)
        return FeatureStore(path)

    def from_store(self, store: FeatureStore | StoreStack, how: HOWFeatures | None = None) -> DescribedImages:
        """Images described in a feature store: global descriptors read and whitened, local
        features gathered from the store when verification needs them (never all in memory)."""
        descriptors = self._whiten(store.global_descriptors().to(self.device))
        described = DescribedImages(descriptors, store if store.has_local else None, how=how, names=store.names)
        if self.cache is not None:
            self.cache.remember(described, Path(store.path).name)
        return described

    # --- indexing ----------------------------------------------------------------------------------

    def build_graph(self, database: DescribedImages) -> KnnGraph:
        """The kNN graph of the database's global descriptors (``config.graph``); with a cache,
        found there or built and kept."""
        def build() -> KnnGraph:
            return build_knn_graph(database.global_descriptors, self.config.graph)

        if self.cache is None:
            return build()
        return self.cache.graph(database.global_descriptors, self.config.graph, build, self.device,
                                source=self.cache.name_of(database))

    def build_asmk_index(self, parts: Sequence[HOWFeatures]) -> ASMKIndex:
        """The ASMK inverted file of HOW features (several sets are numbered one after another);
        with a cache, found there or built and kept."""
        if self.codebook is None:
            raise ValueError("the ASMK index needs a codebook: call fit_asmk(images) first (or pass codebook=)")
        device = self.device

        def build() -> ASMKIndex:
            offsets, descriptors, ids = 0, [], []
            for part in parts:
                descriptors.append(part.descriptors)
                ids.append(part.image_ids + offsets)
                offsets += part.num_images
            return ASMKIndex.build(self.codebook.to(device), torch.cat(descriptors).to(device), torch.cat(ids).to(device),
                                   self.config.asmk, num_images=offsets)

        if self.cache is None:
            return build()
        return self.cache.asmk_index(self.codebook, parts, self.config.asmk, build, device)

    def build_indices(self, database: DescribedImages) -> DescribedImages:
        """Add what searching ``database`` needs and it lacks: its global search index, its ASMK
        index (initial "asmk") and its kNN graph (diffusion on)."""
        if database.search_index is None:
            database.search_index = GlobalIndex.build(database.global_descriptors, self.config.search)
        if self.config.initial == "asmk" and database.asmk is None:
            if database.how is None:
                raise ValueError("initial='asmk': the database has no HOW features (describe it with this module)")
            database.asmk = self.build_asmk_index([database.how])
        if self.config.diffusion is not None and database.graph is None:
            database.graph = self.build_graph(database)
        return database

    def index(self, database: Sequence[ImageLike | ImageSpec] | Activations | FeatureStore | StoreStack) -> DescribedImages:
        """Describe the database (images, activations, or a feature store) and build its indices."""
        if isinstance(database, (FeatureStore, StoreStack)):
            described = self.from_store(database)
        else:
            if len(database) == 0:
                raise ValueError("index: the database is empty")
            described = self.describe(database, is_query=False)
        return self.build_indices(described)

    # --- searching ---------------------------------------------------------------------------------

    def _queries(self, queries) -> DescribedImages:
        if isinstance(queries, DescribedImages):
            return queries
        if isinstance(queries, (FeatureStore, StoreStack)):
            return self.from_store(queries)
        return self.describe(queries, is_query=True)

    def search(self, queries: Sequence[ImageLike | ImageSpec] | Activations | DescribedImages | FeatureStore,
               index: DescribedImages) -> SearchResult:
        """Rank the whole database for every query: the initial ranking (global, or ASMK), DSM
        re-ranking of its top-k, diffusion; ``result.ranks`` is the configured method's ``(Q, N)``
        ranking, ``result.methods`` every method's."""
        described = self._queries(queries)
        cfg = self.config
        return rank_methods(described, self.build_indices(index), cfg.initial, cfg.rerank, cfg.diffusion,
                            self.device, cfg.query_batch, show_progress=cfg.extract.progress)

    def rerank(self, queries: Sequence[ImageLike | ImageSpec] | Activations | DescribedImages | FeatureStore,
               database: Sequence[ImageLike | ImageSpec] | DescribedImages | FeatureStore | StoreStack,
               scores: torch.Tensor, indices: torch.Tensor) -> SearchResult:
        """DSM re-ranking and diffusion of a ranking from any model ([`gpu_dsm.ranking.rank_given`][gpu_dsm.ranking.rank_given]).

        Args:
            queries: the ``Q`` queries (images, activations, described, or a store).
            database: an index ([`index`][gpu_dsm.pipeline.DSMRetrieval.index], [`load_index`][gpu_dsm.pipeline.DSMRetrieval.load_index]), a feature store, or the
                database images (image ``i`` is ``database[i]``). Of images only those in
                ``indices`` are described, for their local features; with diffusion on
                (``config.diffusion``) every image is, as diffusion needs the whole database's
                kNN graph. An index without a graph gets one (``config.graph``).
            scores: ``(Q, K)`` the model's finite similarities, best first, any device.
            indices: ``(Q, K)`` its database indices, in the same order, any device.
        Returns:
            A [`SearchResult`][gpu_dsm.ranking.SearchResult] of ``(Q, K)`` rankings on the CPU: ``result.ranks`` is the
            configured method's (``"given+dsm"``, ``"given+dsm+D"``, ...), ``result.reranked``
            the re-ranking with its inliers; the configured initial ranking is not computed.
        """
        cfg = self.config
        described = queries if isinstance(queries, DescribedImages) else (
            self.from_store(queries) if isinstance(queries, (FeatureStore, StoreStack))
            else self._describe(queries, is_query=True, with_how=False))
        if isinstance(database, (FeatureStore, StoreStack)):
            database = self.from_store(database)
        if isinstance(database, DescribedImages):
            if cfg.diffusion is not None and database.graph is None:
                database.graph = self.build_graph(database)
            num_images, local, graph = database.num_images, database.local, database.graph
        elif cfg.diffusion is not None:
            whole = self._describe(database, is_query=False, with_how=False)
            num_images, local, graph = whole.num_images, whole.local, self.build_graph(whole)
        else:
            num_images, local, graph = len(database), None, None
            if cfg.rerank is not None:
                wanted = torch.as_tensor(indices).detach().cpu().long()
                if wanted.numel() and (int(wanted.min()) < 0 or int(wanted.max()) >= num_images):
                    raise ValueError(f"the given indices must lie in 0..{num_images - 1} (the database's images)")
                rows = torch.unique(wanted)
                if rows.numel():
                    table = self._describe([database[i] for i in rows.tolist()], is_query=False, with_how=False).local
                    local = LocalSubset(table, rows)
        return rank_given(described, _Database(num_images, local, graph), scores, indices, cfg.rerank, cfg.diffusion,
                          self.device, cfg.query_batch, show_progress=cfg.extract.progress)

    # --- saving ------------------------------------------------------------------------------------

    def save(self, folder: str | Path, index: DescribedImages | None = None,
             network: dict[str, Any] | None = None) -> Path:
        """Write the module (config, learned state, the backbone's fingerprint; not the network's
        weights) and, if given, ``index`` to ``folder``, atomically ([`gpu_dsm.saved`][gpu_dsm.saved]). Local
        features go into a feature store, copied from a store chunk by chunk (never all in memory).
        ``network``: ``{"name", "weights", "upsample"}``, how `gpu_dsm.build_backbone`
        rebuilds the backbone (recorded for ``gpu-dsm search``). Returns the folder."""
        from gpu_dsm.saved import save_retrieval

        return save_retrieval(self, folder, index, network)

    @classmethod
    def load(cls, folder: str | Path, backbone: nn.Module | None = None, config: RetrievalConfig | None = None,
             **backbone_facts) -> "DSMRetrieval":
        """The module saved in ``folder`` with ``backbone``, which must be the network it was
        saved with (same weights: a mismatch raises ``ValueError``; ``None``: a module that only
        ranks what was described). ``config``: the saved one (default), or one that differs only
        in search-time settings (re-ranking, diffusion, batch sizes), else ``ValueError``.
        ``backbone_facts``: ``stride``, ``mean``, ``std``, ``activation_bound`` of a plain module
        (as the constructor's). Learned tensors go to the module's device."""
        from gpu_dsm.saved import check_backbone, check_config, read_learned, read_meta, saved_config

        folder = Path(folder)
        meta = read_meta(folder)
        saved = saved_config(meta, RetrievalConfig, folder)
        if config is not None:
            check_config(meta, config, folder)
        module = cls(backbone, config or saved, whitening="none", **backbone_facts)
        check_backbone(meta, module.backbone, folder)
        learned = read_learned(folder)
        for name in LearnedState.NAMES:
            value = learned.get(name)
            module.learned.set(name, None if value is None else value.to(module.device))
        module.whitening_label = meta.get("whitening_label", module.whitening_label)
        return module

    def load_index(self, folder: str | Path) -> DescribedImages:
        """The index saved in ``folder`` ([`save`][gpu_dsm.pipeline.DSMRetrieval.save]), checked against this module (backbone,
        config, learned state: a mismatch raises a ``ValueError`` naming it): global descriptors on
        the module's device, local features memory-mapped from the saved feature store."""
        from gpu_dsm.saved import load_index

        return load_index(self, folder)

    def verify(self, queries: DescribedImages, index: DescribedImages, query: int, candidate: int,
               match: MatchConfig | None = None) -> MatchResult:
        """Spatial verification of one query against one database image (for pictures: the
        matches and inliers of [`MatchResult`][gpu_dsm.match.MatchResult]), with ``match`` (default: the re-ranker's)."""
        if queries.local is None or index.local is None:
            raise ValueError("verify: the queries and the database need local features")
        match = match or (self.config.rerank or RerankConfig()).match
        return spatial_verify(gather_local(queries.local, [query], self.device),
                              gather_local(index.local, [candidate], self.device), config=match)

    def forward(self, queries, database) -> SearchResult:
        """``module(queries, database)``: [`search`][gpu_dsm.pipeline.DSMRetrieval.search] of ``queries`` in ``database``, which is
        indexed first ([`index`][gpu_dsm.pipeline.DSMRetrieval.index]) unless it is already [`DescribedImages`][gpu_dsm.ranking.DescribedImages]."""
        return self.search(queries, database if isinstance(database, DescribedImages) else self.index(database))


def _image_sets(images: Sequence[ImageLike | ImageSpec] | Mapping[str, Sequence[ImageLike | ImageSpec]]
                ) -> dict[str, list]:
    """Named image sets: ``{label: images}`` as given, or one list as the set ``"codebook-images"``."""
    if isinstance(images, Mapping):
        return {str(label): list(part) for label, part in images.items()}
    return {"codebook-images": list(images)}


@dataclass
class _Database:
    """What `rank_given` reads of a database: its size, local features and kNN graph."""

    num_images: int
    local: Any = None
    graph: KnnGraph | None = None


def _names(inputs) -> list[str] | None:
    """The paths of images given by path (or `ImageSpec` of a path); ``None`` when any is
    in memory."""
    names = []
    for item in inputs:
        source = item.source if isinstance(item, ImageSpec) else item
        if not isinstance(source, (str, Path)):
            return None
        names.append(str(source))
    return names
