"""gpu_dsm: deep spatial matching (DSM, Siméoni et al. CVPR 2019) for image retrieval, batched in PyTorch.

Where things are:

- ``gpu_dsm.backbones``: networks by name with real weights (``build_backbone``).
- ``gpu_dsm.extract``: batched multi-scale activations.
- ``gpu_dsm.pooling`` / ``gpu_dsm.whitening`` / ``gpu_dsm.describe``: global descriptors.
- ``gpu_dsm.search``: nearest neighbours by cosine similarity.
- ``gpu_dsm.mser`` (function; module ``gpu_dsm.stable_regions``) / ``gpu_dsm.detect`` / ``gpu_dsm.features``: the DSM detector and its tables.
- ``gpu_dsm.store``: the on-disk feature store.
- ``gpu_dsm.kernels``: low-level tensor kernels (repository folder ``kernels/``).
- ``gpu_dsm.eval``: datasets, the revisited protocol, the demo, benchmarks (folder ``eval/``).
"""
from gpu_dsm.backbones import BACKBONES, Backbone, build_backbone, save_retrieval_checkpoint
from gpu_dsm.detect import DSMDetector, DetectorConfig
from gpu_dsm.features import LocalFeatures
from gpu_dsm.stable_regions import MSERRegions, mser
from gpu_dsm.describe import GlobalConfig, describe_global, describe_images, global_descriptor
from gpu_dsm.extract import ExtractConfig, extract_activations, iterate_activations
from gpu_dsm.images import ImageSpec
from gpu_dsm.pooling import MAC, SPoC, GeM, gem, mac, spoc
from gpu_dsm.search import similarity_topk
from gpu_dsm.store import FeatureStore, StoreWriter
from gpu_dsm.whitening import Whitening, fit_pca_whitening, fit_supervised_whitening

__version__ = "0.1.0"
