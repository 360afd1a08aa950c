"""Bit counting for packed binary codes (ASMK's Hamming similarity), on any device.

``hamming(a, b)``: row-wise Hamming distance of packed uint8 codes ``(E, B)``. When ``B`` is a
multiple of 8 the bytes are read as int64 words and counted: on the CPU by numpy's
``bitwise_count`` (a hardware popcount; numpy >= 2.0), elsewhere by the SWAR population count
(shifts, masks and adds only: every intermediate stays non-negative, so arithmetic shifts are
exact); otherwise through a 256-entry table. ``gather_rows`` reads rows of a code table as int64
words, 3x faster than gathering bytes.
"""
from __future__ import annotations

import numpy as np
import torch

_NATIVE = hasattr(np, "bitwise_count")

_M1 = 0x5555555555555555
_M2 = 0x3333333333333333
_M4 = 0x0F0F0F0F0F0F0F0F


def popcount64(x: torch.Tensor, native: bool = True) -> torch.Tensor:
    """Set bits of every int64 element of ``x`` (as its 64-bit pattern, so ``-1`` has 64).

    Args:
        x: int64 tensor of any shape, any device.
        native: use numpy's hardware popcount on the CPU; ``False`` forces the SWAR count that
            other devices use (for tests).
    Returns:
        int64 counts (0..64) of the shape of ``x``, on its device.

    Examples:
        >>> import torch
        >>> popcount64(torch.tensor([0, 7, -1]))
        tensor([ 0,  3, 64])
        >>> popcount64(torch.tensor([0, 7, -1]), native=False)
        tensor([ 0,  3, 64])
    """
    if native and _NATIVE and x.device.type == "cpu":
        # as uint64: numpy counts the absolute value of signed integers
        return torch.from_numpy(np.bitwise_count(x.contiguous().numpy().view(np.uint64)).astype(np.int64))
    x = x - ((x >> 1) & _M1)
    x = (x & _M2) + ((x >> 2) & _M2)
    x = (x + (x >> 4)) & _M4  # each byte now holds its count (<= 8): x >= 0 from here on
    x = x + (x >> 8)
    x = x + (x >> 16)
    x = x + (x >> 32)
    return x & 0x7F


def hamming(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Hamming distances of packed binary codes.

    Args:
        a, b: ``(E, B)`` uint8 on one device: ``E`` codes of ``B`` bytes (``8 B`` bits) each.
    Returns:
        ``(E,)`` int64 number of differing bits, on the device of ``a``.

    Examples:
        >>> import torch
        >>> a = torch.tensor([[0b1011, 0]], dtype=torch.uint8)
        >>> b = torch.tensor([[0b0001, 255]], dtype=torch.uint8)
        >>> hamming(a, b)
        tensor([10])
    """
    if a.shape[-1] % 8 == 0 and a.is_contiguous() and b.is_contiguous():
        return popcount64(a.view(torch.int64) ^ b.view(torch.int64)).sum(-1)
    table = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64, device=a.device)
    return table[(a ^ b).long()].sum(-1)


def gather_rows(codes: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``codes[rows]`` for a packed code table, read as int64 words when ``B % 8 == 0``.

    Args:
        codes: ``(E, B)`` uint8 packed codes (any other dtype is indexed as is).
        rows: int64 row indices of any shape ``(...)``, on the device of ``codes``.
    Returns:
        ``(..., B)`` of the dtype and device of ``codes``.
    """
    if codes.dtype == torch.uint8 and codes.shape[1] % 8 == 0 and codes.shape[1] and codes.is_contiguous():
        return codes.view(torch.int64)[rows].view(torch.uint8)
    return codes[rows]
