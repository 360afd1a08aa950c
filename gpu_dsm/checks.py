"""Input checks shared by the public entry points: one clear error naming the argument and the
problem (shape, dtype, device, NaN/Inf) instead of a wrong result later.

Arrays a user would naturally pass (numpy arrays, nested lists) are accepted and turned into
tensors; anything else is refused with a ``TypeError``.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

_KINDS = {
    "float": lambda dt: dt.is_floating_point,
    "int": lambda dt: not dt.is_floating_point and not dt.is_complex and dt != torch.bool,
    "number": lambda dt: not dt.is_complex and dt != torch.bool,
}


def as_tensor(value: Any, name: str, *, ndim: int | None = None, kind: str | None = None,
              device: torch.device | str | None = None, finite: bool = False) -> torch.Tensor:
    """``value`` as a tensor, checked.

    Args:
        value: a tensor, a numpy array or a (nested) list of numbers.
        name: the argument's name, for the error.
        ndim: required number of dimensions.
        kind: ``"float"``, ``"int"`` or ``"number"``: required dtype family.
        device: required device (a tensor elsewhere is an error, not a silent copy); numpy and
            lists are placed there.
        finite: refuse NaN/Inf.
    Returns:
        ``value`` itself when it is a tensor (same dtype and device, no copy); otherwise a new
        tensor of numpy's dtype for the values (e.g. float64, int64) on ``device`` (default the CPU).

    Examples:
        >>> as_tensor([[1.0, 2.0]], "xy", ndim=2, kind="float")
        tensor([[1., 2.]], dtype=torch.float64)
        >>> as_tensor([1, 2], "xy", kind="float")
        Traceback (most recent call last):
        ...
        TypeError: xy must hold float values, got dtype torch.int64
    """
    if isinstance(value, torch.Tensor):
        tensor = value
        if device is not None and tensor.device != torch.device(device):
            raise ValueError(f"{name} is on {tensor.device}, expected {torch.device(device)} (move it with .to())")
    elif isinstance(value, (np.ndarray, np.generic, list, tuple)):
        try:
            tensor = torch.as_tensor(np.asarray(value), device=device)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"{name} must be a tensor or a numeric array: {exc}") from None
    else:
        raise TypeError(f"{name} must be a torch.Tensor (or a numpy array), got {type(value).__name__}")
    if ndim is not None and tensor.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(tensor.shape)}")
    if kind is not None and not _KINDS[kind](tensor.dtype):
        raise TypeError(f"{name} must hold {kind} values, got dtype {tensor.dtype}")
    if finite and tensor.is_floating_point() and tensor.numel():
        # max and min propagate NaN: two reductions instead of a full boolean mask
        if not torch.isfinite(torch.stack([tensor.amax(), tensor.amin()])).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"{name} contains {bad} NaN/Inf values")
    return tensor


def check_shape(tensor: torch.Tensor, shape: Sequence[int | None], name: str) -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``tensor.shape`` matches ``shape`` (``None``
    matches any size)."""
    if tensor.ndim != len(shape) or any(s is not None and s != t for s, t in zip(shape, tensor.shape)):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name} must have shape {want}, got {tuple(tensor.shape)}")
