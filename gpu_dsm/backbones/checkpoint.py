"""Reading weights files: plain state dicts and cnnimageretrieval-pytorch retrieval checkpoints.

A retrieval checkpoint (Radenović et al., cnnimageretrieval-pytorch) is a dict with
``state_dict`` (keys ``features.*``, ``pool.p``, optionally ``whiten.weight`` / ``whiten.bias``)
and ``meta`` (``architecture``, ``pooling``, ``whitening``, ``mean``, ``std``, ``outputdim``,
optionally ``Lw``). A plain state dict is whatever ``model.state_dict()`` of the torchvision
architecture (or of our EfficientNet-Lite) returns.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gpu_dsm.io import torch_load_weights
from gpu_dsm.whitening import Whitening


@dataclass
class RetrievalHead:
    """What a retrieval checkpoint carries besides the convolutional weights."""

    gem_p: float | None = None
    whitening: Whitening | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def read_weights_file(path: str | Path, trust: bool = False) -> dict[str, Any]:
    """Load a weights file on the CPU with a clear error when it is missing or unreadable.

    The file is read without executing code (``weights_only``; see
    :func:`gpu_dsm.io.torch_load_weights`) unless ``trust``.
    """
    obj = torch_load_weights(path, "weights file", trust=trust)
    if not isinstance(obj, dict):
        raise ValueError(f"weights file {path} holds a {type(obj).__name__}, expected a state dict or a checkpoint dict")
    return obj


def is_retrieval_checkpoint(obj: dict[str, Any]) -> bool:
    return "state_dict" in obj and isinstance(obj["state_dict"], dict)


def split_retrieval_checkpoint(obj: dict[str, Any]) -> tuple[dict[str, torch.Tensor], RetrievalHead]:
    """Return the ``features.*`` weights (prefix removed) and the pooling/whitening head."""
    state = obj["state_dict"]
    meta = dict(obj.get("meta", {}) or {})
    features = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    if not features:
        raise ValueError("retrieval checkpoint has no 'features.*' weights in its state_dict")
    head = RetrievalHead(meta=meta)
    if "pool.p" in state:
        head.gem_p = float(torch.as_tensor(state["pool.p"]).flatten()[0])
    if "whiten.weight" in state:
        weight = state["whiten.weight"].float()
        bias = state.get("whiten.bias", torch.zeros(weight.shape[0])).float()
        head.whitening = Whitening(projection=weight, bias=bias, method="checkpoint")
    elif isinstance(meta.get("Lw"), dict) and meta["Lw"]:
        learned = next(iter(meta["Lw"].values()))
        learned = learned.get("ms", learned.get("ss", learned))
        head.whitening = Whitening.from_mean_projection(
            torch.as_tensor(learned["m"]).float().flatten(), torch.as_tensor(learned["P"]).float(), method="checkpoint-Lw"
        )
    if "mean" in meta and "std" in meta:
        head.mean = tuple(float(v) for v in meta["mean"])
        head.std = tuple(float(v) for v in meta["std"])
    return features, head


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """``load_state_dict(strict=True)`` with an error that names the first mismatches."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first: {missing[:5]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {unexpected[:5]})")
        if shapes:
            parts.append(f"{len(shapes)} with other shapes (first: {shapes[:3]})")
        raise ValueError(f"weights do not fit {what}: " + "; ".join(parts))
    module.load_state_dict(state, strict=True)
