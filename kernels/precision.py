"""Float32 matrix products at full precision, whatever the caller's global settings.

PyTorch lets user code lower the precision of every float32 matrix product process-wide:
``torch.backends.cuda.matmul.allow_tf32 = True`` or ``torch.set_float32_matmul_precision("high")``
(TF32 on CUDA: 10-bit mantissas), ``"medium"`` (also bfloat16 in oneDNN on the CPU), or the
``fp32_precision`` attributes behind them (PyTorch docs, "TensorFloat-32 (TF32) on Ampere (and
later) devices"). Kernels whose results must not depend on that (ASMK's nearest visual words,
where a rounded product changes an assignment, and HOW's reduction of the descriptors assigned)
run their products inside :func:`ieee_float32_matmul`.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


def _matmul_backends() -> list:
    return [torch.backends.cuda.matmul, torch.backends.mkldnn.matmul]


@contextlib.contextmanager
def ieee_float32_matmul() -> Iterator[None]:
    """Within the block, float32 matrix products on CUDA (cuBLAS) and on the CPU (oneDNN) are
    IEEE float32 (no TF32, no bfloat16); the caller's settings are restored on exit, also on
    error. Not thread-safe: the settings are global."""
    backends = _matmul_backends()
    saved = [b.fp32_precision for b in backends]
    try:
        for b in backends:
            b.fp32_precision = "ieee"
        yield
    finally:
        for b, value in zip(backends, saved):
            b.fp32_precision = value
