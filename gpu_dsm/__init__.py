"""gpu_dsm: deep spatial matching (DSM, Siméoni et al. CVPR 2019) for image retrieval, batched in PyTorch.

Where things are:

- ``gpu_dsm.backbones``: networks by name with real weights (``build_backbone``).
- ``gpu_dsm.extract``: batched multi-scale activations.
- ``gpu_dsm.pooling`` / ``gpu_dsm.whitening`` / ``gpu_dsm.global_descriptors``: global descriptors.
- ``gpu_dsm.knn``: nearest neighbours by cosine similarity (exact, or FAISS behind ``GlobalIndex``).
- ``gpu_dsm.mser`` (``mser``, ``MSERRegions``) / ``gpu_dsm.detect`` / ``gpu_dsm.features``: the DSM detector and its tables.
- ``gpu_dsm.match`` / ``gpu_dsm.rerank``: spatial verification and the re-ranker (``DSMReranker``).
- ``gpu_dsm.graph`` / ``gpu_dsm.diffusion``: the kNN graph and diffusion.
- ``gpu_dsm.ranking``: the ranking stages (initial ranking, DSM re-ranking, diffusion) and the methods built of them.
- ``gpu_dsm.pipeline``: ``DSMRetrieval``, the whole method as one module (images, activations or stores in, rankings out).
- ``gpu_dsm.cache``: the cache folder: keys, lookup, locks and file formats of cached artifacts (stores, graphs, HOW files, codebooks, indices).
- ``gpu_dsm.saved`` / ``gpu_dsm.configs``: a module and its index saved to a folder and loaded, checked; configs as JSON.
- ``gpu_dsm.photos``: a folder of one's own photos indexed and searched (``gpu-dsm index`` / ``search``).
- ``gpu_dsm.laf``: features as kornia local affine frames.
- ``gpu_dsm.store``: the on-disk feature store.
- ``gpu_dsm.kernels``: low-level tensor kernels (repository folder ``kernels/``).
- ``gpu_dsm.eval``: datasets, the revisited protocol, the demo, benchmarks (folder ``eval/``).
"""
from gpu_dsm.backbones import BACKBONES, Backbone, build_backbone, save_retrieval_checkpoint
from gpu_dsm.detect import DSMDetector, DetectorConfig, detect
from gpu_dsm.features import LocalFeatures
from gpu_dsm.mser import MSERRegions
from gpu_dsm.global_descriptors import GlobalConfig, describe_global, describe_images, global_descriptor
from gpu_dsm.extract import ExtractConfig, extract_activations, iterate_activations
from gpu_dsm.images import ImageSpec
from gpu_dsm.pooling import MAC, SPoC, GeM, gem, mac, spoc
from gpu_dsm.knn import GlobalIndex, SearchConfig, similarity_topk
from gpu_dsm.store import FeatureStore, StoreWriter
from gpu_dsm.whitening import Whitening, fit_pca_whitening, fit_supervised_whitening
from gpu_dsm.match import MatchConfig, MatchResult, spatial_verify
from gpu_dsm.rerank import DSMReranker, RerankConfig, RerankResult
from gpu_dsm.graph import GraphConfig, KnnGraph, build_knn_graph
from gpu_dsm.diffusion import DiffusionConfig, diffuse, dsm_seeds, plain_seeds
from gpu_dsm.ranking import DescribedImages, SearchResult
from gpu_dsm.pipeline import DSMRetrieval, RetrievalConfig
from gpu_dsm.backbones.wrap import as_backbone
from gpu_dsm.laf import features_to_laf, laf_to_features

__version__ = "0.1.0"
