"""One call from images (or activations) to re-ranked results: ``DSMRetrieval``.

    retrieval = DSMRetrieval(build_backbone("efficientnet_lite0"))
    index = retrieval.index(database_images)               # global descriptors + local features
    result = retrieval.search(query_images, index)         # global ranking, then DSM re-ranking

With ``RetrievalConfig(initial="asmk")`` the initial ranking is HOW + ASMK instead: learn its
whitening and codebook once on images that are not the queries (``retrieval.fit_asmk(images)``);
``index`` then also builds the ASMK inverted file, and ``search`` verifies ASMK's top-k.

Everything stays in memory; for a large database write a feature store with ``gpu-dsm extract``
(or :class:`gpu_dsm.store.StoreWriter`) and use :class:`gpu_dsm.rerank.DSMReranker` on the
gathered candidates.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from gpu_dsm.asmk import ASMKConfig, ASMKIndex, train_codebook
from gpu_dsm.backbones import Backbone
from gpu_dsm.describe import GlobalConfig, describe_images
from gpu_dsm.detect import DetectorConfig, detect_images
from gpu_dsm.extract import ExtractConfig
from gpu_dsm.features import LocalFeatures
from gpu_dsm.how import HOWConfig, HOWFeatures, describe_how, fit_how_whitening
from gpu_dsm.images import ImageLike, ImageSpec
from gpu_dsm.rerank import DSMReranker, RerankConfig, RerankResult
from gpu_dsm.search import GlobalIndex, SearchConfig
from gpu_dsm.whitening import Whitening


@dataclass
class DescribedImages:
    """Global descriptors ``(N, D)`` (whitened if a whitening is set) and local features of N
    images; with the ASMK initial ranking also their HOW features and (for a database) the ASMK index."""

    global_descriptors: torch.Tensor
    local: LocalFeatures
    how: HOWFeatures | None = None
    asmk: ASMKIndex | None = None
    search_index: GlobalIndex | None = None  # the global search's index (a database's, built by index())


@dataclass
class SearchResult:
    """``initial``: ``(Q, K)`` database indices of the initial ranking (global similarity, or ASMK
    score with ``initial="asmk"``), with those ``similarities``; ``reranked``: the DSM re-ranking of those top-k."""

    initial: torch.Tensor
    similarities: torch.Tensor
    reranked: RerankResult


@dataclass
class RetrievalConfig:
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    global_: GlobalConfig = field(default_factory=GlobalConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    rerank: RerankConfig = field(default_factory=RerankConfig)
    initial: str = "global"  # the initial ranking: "global" (paper 3.6) or "asmk" (HOW + ASMK, Tolias et al. 2020)
    how: HOWConfig = field(default_factory=HOWConfig)  # HOW descriptors, with initial="asmk"
    asmk: ASMKConfig = field(default_factory=ASMKConfig)  # codebook and kernel, with initial="asmk"
    search: SearchConfig = field(default_factory=SearchConfig)  # global search: exact (default) or a FAISS index

    def __post_init__(self):
        if self.initial not in ("global", "asmk"):
            raise ValueError(f"RetrievalConfig.initial must be 'global' or 'asmk', got {self.initial!r}")


class DSMRetrieval(nn.Module):
    """A retrieval model followed by deep spatial matching, as one module."""

    def __init__(self, backbone: Backbone, config: RetrievalConfig | None = None, whitening: Whitening | None = None,
                 how_whitening: Whitening | None = None, codebook: torch.Tensor | None = None):
        super().__init__()
        self.how_whitening = how_whitening  # HOW's reduction and the ASMK codebook (K, d): fit_asmk() learns both
        self.codebook = codebook
        self.backbone = backbone
        self.config = config or RetrievalConfig()
        if whitening is None:
            learned = backbone.head.post_whitening(len(self.config.extract.scales))
            whitening = learned[1] if learned is not None else None
        self.whitening = whitening  # learned (search-time) whitening; a checkpoint's whiten layer acts inside the network
        self.recipe = self.config.global_.resolve(backbone)
        self.reranker = DSMReranker(self.config.rerank)

    def fit_asmk(self, images: Sequence[ImageLike | ImageSpec]) -> "DSMRetrieval":
        """Learn HOW's whitening and the ASMK codebook on ``images`` (never the queries)."""
        self.how_whitening = fit_how_whitening(self.backbone, images, self.config.how)
        training = describe_how(self.backbone, images, self.how_whitening, self.config.how, desc="HOW codebook images")
        cfg = self.config.asmk
        self.codebook = train_codebook(training.descriptors, cfg.codebook_size, cfg.kmeans_iterations, cfg.seed, cfg.memory_budget)
        return self

    def _how(self, images: Sequence[ImageLike | ImageSpec]) -> HOWFeatures | None:
        if self.config.initial != "asmk":
            return None
        if self.how_whitening is None or self.codebook is None:
            raise ValueError("initial='asmk' needs HOW's whitening and a codebook: call fit_asmk(images) first "
                             "(or pass how_whitening= and codebook=)")
        return describe_how(self.backbone, images, self.how_whitening, self.config.how)

    def _finish(self, descriptors: torch.Tensor, per_image: list[dict], sizes: list[list[list[int]]]) -> DescribedImages:
        if self.whitening is not None:
            descriptors = self.whitening.apply(descriptors)
        local = LocalFeatures.from_images(
            per_image, torch.tensor(sizes, dtype=torch.long).view(len(per_image), -1, 2), self.config.extract.scales,
            self.backbone.out_channels, capacity=self.config.detector.max_features, device=descriptors.device,
        )
        return DescribedImages(descriptors, local)

    def describe(self, images: Sequence[ImageLike | ImageSpec], is_query: bool = False) -> DescribedImages:
        """Global descriptors and local features of ``images`` in one pass of the network."""
        n = len(images)
        descriptors = torch.zeros(n, self.recipe.descriptor_dim(self.backbone.out_channels), device=self.backbone.device)
        per_image: list[dict] = [{}] * n
        sizes: list[list[list[int]]] = [[] for _ in range(n)]

        def sink(indices: list[int], batch_descriptors: torch.Tensor, maps_per_image: list[list[torch.Tensor]]) -> None:
            descriptors[indices] = batch_descriptors
            features = detect_images(maps_per_image, self.config.detector, is_query, self.backbone.activation_bound)
            for index, maps, found in zip(indices, maps_per_image, features):
                per_image[index] = found
                sizes[index] = [list(m.shape[-2:]) for m in maps]

        describe_images(self.backbone, images, sink, self.config.extract, self.config.global_, desc="describe")
        described = self._finish(descriptors, per_image, sizes)
        described.how = self._how(images)
        return described

    def describe_activations(self, maps_per_image: Sequence[Sequence[torch.Tensor]], is_query: bool = False) -> DescribedImages:
        """The same from activations computed elsewhere: per image ``[(K, h_s, w_s)] * S``."""
        descriptors = torch.stack([self.recipe(maps) for maps in maps_per_image])
        per_image = detect_images(maps_per_image, self.config.detector, is_query, self.backbone.activation_bound)
        sizes = [[list(m.shape[-2:]) for m in maps] for maps in maps_per_image]
        return self._finish(descriptors, per_image, sizes)

    def index(self, database_images: Sequence[ImageLike | ImageSpec]) -> DescribedImages:
        """Describe the database and build its global search index (``config.search``); with
        ``initial="asmk"`` also its ASMK inverted file."""
        described = self.describe(database_images, is_query=False)
        described.search_index = GlobalIndex.build(described.global_descriptors, self.config.search)
        if described.how is not None:
            how = described.how
            described.asmk = ASMKIndex.build(self.codebook.to(how.descriptors.device), how.descriptors, how.image_ids,
                                             self.config.asmk, num_images=how.num_images)
        return described

    def search(self, queries: Sequence[ImageLike | ImageSpec] | DescribedImages, index: DescribedImages) -> SearchResult:
        """Rank ``index`` for every query by global similarity (or ASMK), then re-rank the top-k by DSM."""
        q = queries if isinstance(queries, DescribedImages) else self.describe(queries, is_query=True)
        k = min(self.config.rerank.top_k, index.global_descriptors.shape[0])
        if self.config.initial == "asmk":
            if index.asmk is None or q.how is None:
                raise ValueError("initial='asmk': index the database and describe the queries with this module")
            scores, ranks = index.asmk.search(q.how.descriptors, q.how.image_ids, k=k, num_queries=q.how.num_images)
            sims = scores.to(q.global_descriptors.dtype)
        else:
            search_index = index.search_index or GlobalIndex.build(index.global_descriptors, self.config.search)
            sims, ranks = search_index.search(q.global_descriptors, k)
        candidates = index.local[ranks.reshape(-1)]
        reranked = self.reranker(q.local, candidates, sims, ranks)
        return SearchResult(initial=ranks, similarities=sims, reranked=reranked)

    def forward(self, queries, database) -> SearchResult:
        return self.search(queries, database if isinstance(database, DescribedImages) else self.index(database))
