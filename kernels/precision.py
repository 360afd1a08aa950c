"""Floating point results that depend neither on the caller's settings nor on the CPU, its vector
width or the math library PyTorch links.

Float32 matrix products at full precision. PyTorch lets user code lower the precision of every
float32 matrix product process-wide: ``torch.backends.cuda.matmul.allow_tf32 = True`` or
``torch.set_float32_matmul_precision("high")`` (TF32 on CUDA: 10-bit mantissas), ``"medium"``
(also bfloat16 in oneDNN on the CPU), or the ``fp32_precision`` attributes behind them (PyTorch
docs, "TensorFloat-32 (TF32) on Ampere (and later) devices"). Kernels whose results must not
depend on that (ASMK's nearest visual words, where a rounded product changes an assignment, and
HOW's reduction of the descriptors assigned) run their products inside [`ieee_float32_matmul`][kernels.precision.ieee_float32_matmul].

Correctly rounded arithmetic beyond ``+ - * /``. On the CPU, ``torch.sqrt`` of a float64 or
float32 tensor goes through MKL's vector math (``vdSqrt`` in its high-accuracy mode, at most 1 ulp
from the exact root: Intel oneMKL "Vector Mathematics Performance and Accuracy Data"), not the
IEEE square root instruction, and which code path MKL takes depends on the processor, the tensor's
length and ``MKL_CBWR`` / ``MKL_ENABLE_INSTRUCTIONS``. [`correctly_rounded_sqrt`][kernels.precision.correctly_rounded_sqrt] turns any
result within an ulp or two into the correctly rounded one (IEEE 754 ``squareRoot``, what C's
``sqrt``, Python's ``math.sqrt``, Octave and CUDA's ``sqrt`` return); [`two_product`][kernels.precision.two_product] and
[`fused_multiply_add`][kernels.precision.fused_multiply_add] are error-free transformations from ``+ - *`` alone (Dekker 1971,
"A floating-point technique for extending the available precision"), so they give the same bits
on every device.
"""
from __future__ import annotations

import contextlib
import math
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


# --- correctly rounded arithmetic from + - * / -------------------------------------------------

_SPLITTER = 134217729.0  # 2**27 + 1: Veltkamp's split of a double into two 26-bit halves


def _split(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    t = _SPLITTER * a
    hi = t - (t - a)
    return hi, a - hi


def _float64(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.float64:
        raise TypeError(f"{name} must be float64, got {x.dtype}")
    return x


def two_product(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``p = fl(a * b)`` and its rounding error ``e``, with ``a * b = p + e`` exactly (Dekker's
    product with Veltkamp's splitting: ``+ - *`` only, no fused multiply-add needed).

    Float64 tensors of broadcastable shapes on one device; returns two float64 tensors of the
    broadcast shape. Exact while nothing overflows or underflows: ``|a|, |b| < 2**996`` and the
    exponent of ``a * b`` at least ``-969``.

    Examples:
        >>> import torch
        >>> p, e = two_product(torch.tensor([1.0 + 2.0**-30], dtype=torch.float64), torch.tensor([1.0 + 2.0**-30], dtype=torch.float64))
        >>> float(e) == 2.0**-60  # (1 + 2^-30)^2 = 1 + 2^-29 + 2^-60: p holds 1 + 2^-29
        True
    """
    a, b = _float64(a, "a"), _float64(b, "b")
    p = a * b
    ah, al = _split(a)
    bh, bl = _split(b)
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


def fused_multiply_add(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``a * b + c`` rounded once (float64), from an error-free product and sum (Dekker, Knuth):
    what a hardware fused multiply-add returns, e.g. inside a BLAS matrix product. Float64 tensors
    of one broadcastable shape, on one device; the result has the broadcast shape.

    Examples:
        >>> import torch
        >>> x = torch.tensor([1.0 + 2.0**-30], dtype=torch.float64)
        >>> float(fused_multiply_add(x, x, -(1.0 + 2.0**-29) * torch.ones(1, dtype=torch.float64))) == 2.0**-60
        True
    """
    c = _float64(c, "c")
    p, e = two_product(a, b)
    s = p + c
    v = s - p
    return s + (((p - (s - v)) + (c - v)) + e)


def _sqrt_step(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """One correction of ``s ~ sqrt(x)`` (float64; ``x`` positive in ``[2**-900, 2**1000]`` or
    ``+-0``, ``inf``, NaN, negative, which it leaves alone): ``s``, or the neighbour of ``s`` towards
    the exact root when the root lies beyond the midpoint between them. A result within one ulp of
    the correctly rounded root becomes it.

    With ``u`` the gap from ``s`` to the next double up, ``x`` lies above the midpoint
    ``(s + u/2)^2`` iff ``r = x - s^2 > s u + u^2/4``; ``x`` and ``s^2`` are multiples of ``u^2``,
    so iff ``r > s u``. With ``d`` the gap down (``u/2`` when ``s`` is a power of two), ``x`` lies
    below ``(s - d/2)^2`` iff ``r <= -s d``. ``s u`` and ``s d`` are doubles, and the computed ``r``
    is its exact value rounded once (``s^2 = p + e`` exactly by `two_product`, ``x - p`` is
    exact by Sterbenz's lemma), so by the monotonicity of rounding both comparisons are those of the
    exact ``r``. A square root never falls on a midpoint: no ties."""
    p, e = two_product(s, s)
    r = (x - p) - e
    up = torch.nextafter(s, torch.full_like(s, math.inf))
    down = torch.nextafter(s, torch.zeros_like(s))
    go_up = r > s * (up - s)
    go_down = (r <= -(s * (s - down))) & (s > 0)  # (not at +-0, whose sign stays)
    return torch.where(go_up, up, torch.where(go_down, down, s))


def correctly_rounded_sqrt(x: torch.Tensor) -> torch.Tensor:
    """Square root of each element, correctly rounded (IEEE 754 ``squareRoot``: the result C's
    ``sqrt``, Python's ``math.sqrt`` and CUDA's ``sqrt`` give), whatever MKL, the CPU and its
    vector width do with ``torch.sqrt``.

    ``torch.sqrt`` gives a first approximation (correctly rounded on CUDA; within 1 ulp from MKL on
    the CPU, Intel's documented bound for its high-accuracy mode), then two exact correction steps
    (`_sqrt_step`) each move it one ulp towards the correctly rounded root where it is not
    there yet: any first approximation within two ulps ends correctly rounded. Values below ``2**-900`` or above ``2**1000`` are scaled by an even
    power of two first (exact), so subnormals and the largest doubles are covered. ``sqrt(-0)`` is
    ``-0``, negative values and NaN give NaN, ``inf`` gives ``inf``.

    Args:
        x: floating point tensor of any shape, on any device. Float32 (and half, bfloat16)
            results are the float64 root rounded to that dtype, which is their correctly rounded
            root (a double has more than ``2 p + 2`` bits for ``p``-bit formats, so the second
            rounding cannot err: Figueroa, "When is double rounding innocuous?", 1995).
    Returns:
        The same shape, dtype and device.

    Examples:
        >>> import math, torch
        >>> x = torch.full((5000,), 9.920258617401123, dtype=torch.float64)
        >>> float(correctly_rounded_sqrt(x)[0]) == math.sqrt(9.920258617401123)
        True
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"correctly_rounded_sqrt: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"correctly_rounded_sqrt: expected a floating point tensor, got {x.dtype}")
    xd = x.double()
    magnitude = xd.abs()
    tiny, huge = magnitude < 2.0**-900, magnitude > 2.0**1000
    scaled = torch.where(tiny, xd * 2.0**600, torch.where(huge, xd * 2.0**-200, xd))
    s = torch.sqrt(scaled)
    for _ in range(2):
        s = _sqrt_step(scaled, s)
    s = torch.where(tiny, s * 2.0**-300, torch.where(huge, s * 2.0**100, s))
    return s.to(x.dtype)
