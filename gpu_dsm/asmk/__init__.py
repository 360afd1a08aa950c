"""ASMK (aggregated selective match kernel; Tolias, Avrithis, Jégou 2013, as used by HOW, Tolias,
Jenicek, Chum ECCV 2020) on tensors: codebook, residual codes, inverted file, batched search.

- ``config``: [`ASMKConfig`][gpu_dsm.asmk.ASMKConfig], the reference's values as defaults.
- ``codebook``: [`nearest_words`][gpu_dsm.asmk.nearest_words], [`train_codebook`][gpu_dsm.asmk.train_codebook] (k-means in torch, faiss optional).
- ``codes``: aggregated residuals per (image, word), binary / normalised codes, the kernel.
- ``index``: [`ASMKIndex`][gpu_dsm.asmk.ASMKIndex] (``build``, ``search``, ``save`` / ``load``).
"""
from gpu_dsm.asmk.codebook import kmeans_objective, nearest_words, train_codebook
from gpu_dsm.asmk.codes import WordVectors, aggregate_residuals
from gpu_dsm.asmk.config import ASMKConfig
from gpu_dsm.asmk.index import ASMKIndex

__all__ = ["ASMKConfig", "ASMKIndex", "WordVectors", "aggregate_residuals", "kmeans_objective", "nearest_words",
           "train_codebook"]
