"""ASMK (aggregated selective match kernel; Tolias, Avrithis, Jégou 2013, as used by HOW, Tolias,
Jenicek, Chum ECCV 2020) on tensors: codebook, residual codes, inverted file, batched search.

- ``config``: :class:`ASMKConfig`, the reference's values as defaults.
- ``codebook``: :func:`nearest_words`, :func:`train_codebook` (k-means in torch, faiss optional).
- ``codes``: aggregated residuals per (image, word), binary / normalised codes, the kernel.
- ``index``: :class:`ASMKIndex` (``build``, ``search``, ``save`` / ``load``).
"""
from gpu_dsm.asmk.codebook import kmeans_objective, nearest_words, train_codebook
from gpu_dsm.asmk.codes import WordVectors, aggregate_residuals
from gpu_dsm.asmk.config import ASMKConfig
from gpu_dsm.asmk.index import ASMKIndex

__all__ = ["ASMKConfig", "ASMKIndex", "WordVectors", "aggregate_residuals", "kmeans_objective", "nearest_words",
           "train_codebook"]
