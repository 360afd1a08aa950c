"""The examples in the docstrings run and print what they show (``doctest``).

Each module listed here has at least one ``>>>`` example: a wrong or stale example fails its
test, and so does a module whose examples were all removed. The examples are small (CPU,
hand-written or seeded tensors) so this file runs in a few seconds.
"""
from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "gpu_dsm.activations",
    "gpu_dsm.asmk.codebook",
    "gpu_dsm.asmk.codes",
    "gpu_dsm.asmk.index",
    "gpu_dsm.backbones.efficientnet_lite",
    "gpu_dsm.backbones.wrap",
    "gpu_dsm.checks",
    "gpu_dsm.configs",
    "gpu_dsm.global_descriptors",
    "gpu_dsm.detect",
    "gpu_dsm.diffusion",
    "gpu_dsm.eval.protocol",
    "gpu_dsm.extract",
    "gpu_dsm.features",
    "gpu_dsm.graph",
    "gpu_dsm.how",
    "gpu_dsm.images",
    "gpu_dsm.kernels.bits",
    "gpu_dsm.kernels.dots",
    "gpu_dsm.kernels.labelling",
    "gpu_dsm.kernels.precision",
    "gpu_dsm.kernels.scoring",
    "gpu_dsm.kernels.sparse",
    "gpu_dsm.laf",
    "gpu_dsm.pooling",
    "gpu_dsm.ranking",
    "gpu_dsm.reference.graph",
    "gpu_dsm.reference.match",
    "gpu_dsm.reference.mser",
    "gpu_dsm.authors_selection",
    "gpu_dsm.rerank",
    "gpu_dsm.knn",
    "gpu_dsm.mser",
    "gpu_dsm.store",
    "gpu_dsm.visualize",
    "gpu_dsm.whitening",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted > 0, f"{name} has no docstring examples"
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples of {name} failed (output above)"
