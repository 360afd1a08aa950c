"""Reading weights files: plain state dicts and cnnimageretrieval-pytorch retrieval checkpoints.

A retrieval checkpoint (Radenović et al., cnnimageretrieval-pytorch) is a dict with
``state_dict`` (keys ``features.*``, ``pool.p``, optionally ``whiten.weight`` / ``whiten.bias``)
and ``meta`` (``architecture``, ``pooling``, ``whitening``, ``mean``, ``std``, ``outputdim``,
optionally ``Lw``, ``regional``, ``local_whitening``).

=================== ===================================================================
format              handled
=================== ===================================================================
mac, spoc, gem      exactly (cnnimageretrieval-pytorch's ``extract_ss`` / ``extract_ms``)
gemmp               exactly: one learned p per channel; scales averaged with power 1
``whiten`` layer    exactly: applied per scale inside the network, scales averaged with power 1
``meta['Lw']``      exactly: ``Lw[name]['ss']`` for one scale, ``['ms']`` for several, after extraction
rmac, regional      refused (error naming the format)
local_whitening     refused
other layers' keys  refused, never ignored
=================== =================================================================== A plain state dict is whatever ``model.state_dict()`` of the torchvision
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


#: cnnimageretrieval-pytorch poolings reproduced exactly (``meta['pooling']``)
CHECKPOINT_POOLINGS = ("mac", "spoc", "gem", "gemmp")


@dataclass
class RetrievalHead:
    """What a retrieval checkpoint carries besides the convolutional weights.

    Fields:
        pooling: ``meta['pooling']`` (one of :data:`CHECKPOINT_POOLINGS`), ``None`` without a checkpoint.
        gem_p: learned GeM exponent: a float (``gem``) or a ``(K,)`` tensor, one per channel (``gemmp``).
        network_whitening: the checkpoint's ``whiten`` layer. cnnimageretrieval-pytorch applies it
            inside the network, to each scale's pooled, L2-normalised vector (then L2 again), before
            the scales are averaged with power 1.
        learned_whitening: ``meta['Lw']``: per training set name, ``{"ss": ..., "ms": ...}``, the
            whitenings learned for single- and multi-scale descriptors, applied after extraction.
    """

    pooling: str | None = None
    gem_p: float | torch.Tensor | None = None
    network_whitening: Whitening | None = None
    learned_whitening: dict[str, dict[str, Whitening]] = field(default_factory=dict)
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def post_whitening(self, num_scales: int, name: str | None = None) -> tuple[str, Whitening] | None:
        """The learned whitening cnnimageretrieval-pytorch applies after extraction, with a label:
        ``Lw[name]['ms']`` for multi-scale descriptors, ``Lw[name]['ss']`` for one scale (``name``:
        the training set, default the only or first one). ``None`` when the checkpoint has none."""
        if not self.learned_whitening:
            return None
        if name is None:
            name = next(iter(self.learned_whitening))
        if name not in self.learned_whitening:
            raise ValueError(f"the checkpoint has no learned whitening {name!r}; it has {sorted(self.learned_whitening)}")
        kind = "ms" if num_scales > 1 else "ss"
        options = self.learned_whitening[name]
        if kind not in options:
            raise ValueError(f"the checkpoint's learned whitening {name!r} has no {kind!r} entry (has {sorted(options)})")
        return f"checkpoint Lw[{name}][{kind}]", options[kind]


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


def _learned_whitening(lw: Any) -> dict[str, dict[str, Whitening]]:
    out: dict[str, dict[str, Whitening]] = {}
    if not isinstance(lw, dict):
        raise ValueError(f"meta['Lw'] must be a dict of learned whitenings, got {type(lw).__name__}")
    for name, entry in lw.items():
        if not isinstance(entry, dict):
            raise ValueError(f"meta['Lw'][{name!r}] must be a dict, got {type(entry).__name__}")
        # {"ss": {"m", "P"}, "ms": {...}} as cnnimageretrieval-pytorch saves it; a bare {"m", "P"} serves both
        kinds = {k: v for k, v in entry.items() if k in ("ss", "ms")} or {"ss": entry, "ms": entry}
        out[str(name)] = {}
        for kind, learned in kinds.items():
            if not isinstance(learned, dict) or "m" not in learned or "P" not in learned:
                raise ValueError(f"meta['Lw'][{name!r}][{kind!r}] must hold 'm' and 'P'")
            mean = torch.as_tensor(learned["m"]).double().flatten()
            projection = torch.as_tensor(learned["P"]).double()
            out[str(name)][kind] = Whitening.from_mean_projection(mean, projection, method=f"checkpoint-Lw-{kind}")
    return out


def split_retrieval_checkpoint(obj: dict[str, Any], architecture: str | None = None) -> tuple[dict[str, torch.Tensor], RetrievalHead]:
    """Return the ``features.*`` weights (prefix removed) and the pooling/whitening head.

    Refuses, with an error naming the format, what is not reproduced exactly: poolings other
    than :data:`CHECKPOINT_POOLINGS` (``rmac``), regional pooling (``regional``, R-GeM with its own
    whitening), local whitening (``local_whitening``), state-dict keys of any other layer, and a
    checkpoint of another architecture than ``architecture``.
    """
    state = obj["state_dict"]
    meta = dict(obj.get("meta", {}) or {})
    arch = meta.get("architecture")
    if architecture is not None and arch is not None and str(arch) != architecture:
        raise ValueError(f"the checkpoint is a {arch} network (meta['architecture']), not {architecture}")
    if meta.get("regional") or any(k.startswith("pool.rpool") or k.startswith("pool.whiten") for k in state):
        raise ValueError("regional pooling checkpoints (meta['regional'], R-MAC/R-GeM with a regional whitening) are "
                         "not supported: only mac, spoc, gem and gemmp pooling are reproduced exactly")
    if meta.get("local_whitening") or any(k.startswith("lwhiten.") for k in state):
        raise ValueError("checkpoints with local whitening (meta['local_whitening'], an 'lwhiten' layer before pooling) "
                         "are not supported")
    pooling = str(meta.get("pooling", "gem" if "pool.p" in state else "mac")).lower()
    if pooling not in CHECKPOINT_POOLINGS:
        raise ValueError(f"checkpoint pooling {pooling!r} (meta['pooling']) is not supported; supported: "
                         f"{', '.join(CHECKPOINT_POOLINGS)}")
    known = {"pool.p", "whiten.weight", "whiten.bias"}
    other = sorted(k for k in state if not k.startswith("features.") and k not in known)
    if other:
        raise ValueError(f"the checkpoint's state_dict has {len(other)} keys of layers gpu_dsm does not apply "
                         f"(first: {other[:5]}); refusing to ignore them")
    features = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    if not features:
        raise ValueError("retrieval checkpoint has no 'features.*' weights in its state_dict")
    head = RetrievalHead(meta=meta, pooling=pooling)
    if pooling in ("gem", "gemmp"):
        if "pool.p" not in state:
            raise ValueError(f"a {pooling} checkpoint needs 'pool.p' in its state_dict")
        p = torch.as_tensor(state["pool.p"]).double().flatten()
        if pooling == "gem" and p.numel() != 1:
            raise ValueError(f"a gem checkpoint has one 'pool.p', this one {p.numel()} (a gemmp checkpoint?)")
        head.gem_p = float(p[0]) if pooling == "gem" else p.float()
    elif "pool.p" in state:
        raise ValueError(f"a {pooling} checkpoint should have no 'pool.p'")
    if "whiten.weight" in state:
        weight = state["whiten.weight"].float()
        bias = state.get("whiten.bias", torch.zeros(weight.shape[0])).float()
        head.network_whitening = Whitening(projection=weight, bias=bias, method="checkpoint-whiten")
    elif meta.get("whitening"):
        raise ValueError("meta['whitening'] is set but the state_dict has no 'whiten.weight'")
    if meta.get("Lw"):
        head.learned_whitening = _learned_whitening(meta["Lw"])
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
