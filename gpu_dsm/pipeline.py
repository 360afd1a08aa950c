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
``.to()`` moves it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from gpu_dsm.activations import Activations, is_activations, per_image_maps
from gpu_dsm.asmk import ASMKConfig, ASMKIndex, train_codebook
from gpu_dsm.backbones.backbone import Backbone
from gpu_dsm.backbones.checkpoint import RetrievalHead
from gpu_dsm.backbones.wrap import as_backbone
from gpu_dsm.global_descriptors import GlobalConfig, describe_images
from gpu_dsm.detect import DetectorConfig, detect_images
from gpu_dsm.diffusion import DiffusionConfig
from gpu_dsm.extract import ExtractConfig
from gpu_dsm.features import LocalFeatures
from gpu_dsm.graph import GraphConfig, KnnGraph, build_knn_graph
from gpu_dsm.how import HOWConfig, HOWFeatures, describe_how, fit_how_whitening
from gpu_dsm.images import ImageLike, ImageSpec
from gpu_dsm.match import MatchConfig, MatchResult, spatial_verify
from gpu_dsm.ranking import DescribedImages, SearchResult, rank_methods
from gpu_dsm.rerank import gather_local
from gpu_dsm.rerank import RerankConfig
from gpu_dsm.knn import GlobalIndex, SearchConfig
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
    initial: str = "global"  # the initial ranking: "global" (paper 3.6) or "asmk" (HOW + ASMK, Tolias et al. 2020)
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
    """

    def __init__(self, backbone: nn.Module | None = None, config: RetrievalConfig | None = None,
                 whitening: Whitening | str | Path | None = None, how_whitening: Whitening | None = None,
                 codebook: torch.Tensor | None = None, *, stride: int | None = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, activation_bound: float | None = None):
        super().__init__()
        self.config = config or RetrievalConfig()
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

    def fit_asmk(self, images: Sequence[ImageLike | ImageSpec]) -> "DSMRetrieval":
        """Learn HOW's whitening and the ASMK codebook on ``images`` (never the queries)."""
        net = self._network("fit_asmk")
        how_whitening = fit_how_whitening(net, images, self.config.how)
        training = describe_how(net, images, how_whitening, self.config.how, desc="HOW codebook images")
        cfg = self.config.asmk
        self.learned.set_whitening(how_whitening, "how_")
        words = cfg.words_for(training.descriptors.shape[0])
        self.learned.set("codebook", train_codebook(training.descriptors, words, cfg.kmeans_iterations, cfg.seed,
                                                    cfg.memory_budget))
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
        one pass of the network; with the ASMK initial ranking also HOW features (images only)."""
        if is_activations(inputs):
            maps_per_image = per_image_maps(inputs)
            if self.config.initial == "asmk":
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
        return DescribedImages(self._whiten(descriptors), local, how=self.describe_how(inputs))

    def describe_activations(self, maps_per_image: Activations, is_query: bool = False) -> DescribedImages:
        """[`describe`][gpu_dsm.pipeline.DSMRetrieval.describe] of activations computed elsewhere."""
        if not is_activations(maps_per_image):
            per_image_maps(maps_per_image)  # raises, naming the accepted forms
        return self.describe(maps_per_image, is_query)

    def describe_how(self, images: Sequence[ImageLike | ImageSpec], desc: str = "HOW") -> HOWFeatures | None:
        """HOW features of ``images`` with the ASMK initial ranking (else ``None``)."""
        if self.config.initial != "asmk":
            return None
        if self.how_whitening is None or self.codebook is None:
            raise ValueError("initial='asmk' needs HOW's whitening and a codebook: call fit_asmk(images) first "
                             "(or pass how_whitening= and codebook=)")
        return describe_how(self._network("HOW features"), images, self.how_whitening, self.config.how, desc=desc)

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
        return DescribedImages(descriptors, store if store.has_local else None, how=how)

    # --- indexing ----------------------------------------------------------------------------------

    def build_graph(self, database: DescribedImages) -> KnnGraph:
        """The kNN graph of the database's global descriptors (``config.graph``)."""
        return build_knn_graph(database.global_descriptors, self.config.graph)

    def build_asmk_index(self, parts: Sequence[HOWFeatures]) -> ASMKIndex:
        """The ASMK inverted file of HOW features (several sets are numbered one after another)."""
        if self.codebook is None:
            raise ValueError("the ASMK index needs a codebook: call fit_asmk(images) first (or pass codebook=)")
        offsets, descriptors, ids = 0, [], []
        for part in parts:
            descriptors.append(part.descriptors)
            ids.append(part.image_ids + offsets)
            offsets += part.num_images
        device = self.device
        return ASMKIndex.build(self.codebook.to(device), torch.cat(descriptors).to(device), torch.cat(ids).to(device),
                               self.config.asmk, num_images=offsets)

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
