"""Reading weights files: plain state dicts, cnnimageretrieval-pytorch retrieval checkpoints and
HOW checkpoints (gtolias/how: backbone, learned 1x1 reduction; `split_how_checkpoint`).

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
        pooling: ``meta['pooling']`` (one of `CHECKPOINT_POOLINGS`), ``None`` without a checkpoint.
        gem_p: learned GeM exponent: a float (``gem``) or a ``(K,)`` float32 CPU tensor, one per
            channel (``gemmp``).
        network_whitening: the checkpoint's ``whiten`` layer. cnnimageretrieval-pytorch applies it
            inside the network, to each scale's pooled, L2-normalised vector (then L2 again), before
            the scales are averaged with power 1. Its tensors are float32 on the CPU.
        learned_whitening: ``meta['Lw']``: per training set name, ``{"ss": ..., "ms": ...}``, the
            whitenings learned for single- and multi-scale descriptors, applied after extraction
            (float64 CPU tensors, as the checkpoint's numpy arrays).
        how: a HOW checkpoint's learned reduction, layer and smoothing (`HOWCheckpoint`);
            `gpu_dsm.how.describe_how` uses its reduction in place of a fitted whitening.
        mean, std: the checkpoint's input normalisation per RGB channel (``None``: the network's).
        meta: the checkpoint's ``meta`` dict.
    """

    pooling: str | None = None
    gem_p: float | torch.Tensor | None = None
    network_whitening: Whitening | None = None
    learned_whitening: dict[str, dict[str, Whitening]] = field(default_factory=dict)
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    how: "HOWCheckpoint | None" = None  # what a HOW checkpoint carries (split_how_checkpoint), else None

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
    `gpu_dsm.io.torch_load_weights`) unless ``trust``.
    """
    obj = torch_load_weights(path, "weights file", trust=trust)
    if not isinstance(obj, dict):
        raise ValueError(f"weights file {path} holds a {type(obj).__name__}, expected a state dict or a checkpoint dict")
    return obj


def is_retrieval_checkpoint(obj: dict[str, Any]) -> bool:
    """Whether ``obj`` is a cnnimageretrieval-pytorch checkpoint (a dict with a ``state_dict`` dict)."""
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
    """Return the ``features.*`` weights (prefix removed; tensors as loaded, on the CPU) and the
    pooling/whitening head.

    Refuses, with an error naming the format, what is not reproduced exactly: poolings other
    than `CHECKPOINT_POOLINGS` (``rmac``), regional pooling (``regional``, R-GeM with its own
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


# --- HOW checkpoints (Tolias, Jenicek, Chum, ECCV 2020; github.com/gtolias/how) -------------------------

#: the layer HOW reads its map from, per ``skip_layer`` (blocks dropped from the end of the ResNet trunk)
HOW_SKIP_LAYERS = {0: "layer4", 1: "layer3"}
#: architectures whose HOW checkpoints load (the trunk is torchvision's, as in gtolias/how ``init_network``)
HOW_ARCHITECTURES = ("resnet18", "resnet50", "resnet101")
#: gtolias/how ``stages/evaluate.py`` ``_convert_checkpoint``: the runtime it gives a checkpoint of the first format
_HOW_OLD_RUNTIME = {"image_size": 1024, "features_num": 1000, "scales": [2.0, 1.414, 1.0, 0.707, 0.5, 0.353, 0.25],
                    "training_scales": [1]}


@dataclass
class HOWCheckpoint:
    """What a HOW checkpoint carries besides the backbone's convolutional weights.

    Fields:
        architecture: ``resnet18`` / ``resnet50`` / ``resnet101``.
        skip_layer: trunk blocks dropped from the end (0: up to ``layer4``; 1: up to ``layer3``, "-R50").
        layer: the map HOW reads (`HOW_SKIP_LAYERS`); the backbone's ``features`` end there.
        reduction: the learned 1x1 conv with bias (``dim_reduction``, in the first format ``whiten``)
            as a `Whitening`: ``projection (d, K)`` = the conv weight ``(d, K, 1, 1)``,
            ``bias (d,)``, float32 on the CPU; HOW applies it without L2 normalisation.
        smoothing: kernel size of the average smoothing before the reduction (1: none).
        runtime: the checkpoint's test-time settings (``image_size``, ``features_num``, ``scales``,
            ``mean_std``), informative: `gpu_dsm.how.HOWConfig` decides.
        format: ``"how/2020"`` (``_version`` + ``net_params``) or ``"how/first"`` (``meta`` only,
            the layout ``_convert_checkpoint`` converts).
    """

    architecture: str
    skip_layer: int
    layer: str
    reduction: Whitening
    smoothing: int
    runtime: dict[str, Any] = field(default_factory=dict)
    format: str = "how/2020"


def is_how_checkpoint(obj: dict[str, Any]) -> bool:
    """Whether ``obj`` is a gtolias/how checkpoint: ``net_params`` / ``_version: how/...`` (as its
    ``train.py`` saves), or the first format (``meta['skip_layer']``, a 1x1-conv ``whiten`` layer)."""
    if not is_retrieval_checkpoint(obj):
        return False
    if "net_params" in obj or str(obj.get("_version", "")).startswith("how/"):
        return True
    meta = obj.get("meta")
    return isinstance(meta, dict) and "skip_layer" in meta and "feat_pool_k" in meta


def _how_params(obj: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """gtolias/how's ``net_params`` (``init_network`` arguments) of either format."""
    if "net_params" in obj:
        params = obj["net_params"]
        if not isinstance(params, dict):
            raise ValueError(f"HOW checkpoint: 'net_params' must be a dict, got {type(params).__name__}")
        return params, str(obj.get("_version", "how/2020"))
    meta = obj.get("meta") or {}
    missing = [k for k in ("architecture", "skip_layer", "dim", "feat_pool_k", "mean", "std") if k not in meta]
    if missing:
        raise ValueError(f"HOW checkpoint of the first format: meta lacks {missing}")
    return {"architecture": meta["architecture"], "skip_layer": meta["skip_layer"], "dim_reduction": {"dim": meta["dim"]},
            "smoothing": {"kernel_size": meta["feat_pool_k"]},
            "runtime": {"mean_std": [meta["mean"], meta["std"]], **_HOW_OLD_RUNTIME}}, "how/first"


def split_how_checkpoint(obj: dict[str, Any], architecture: str | None = None) -> tuple[dict[str, torch.Tensor], RetrievalHead]:
    """Return the ``features.*`` weights (prefix removed; tensors as loaded, on the CPU) and a
    head whose ``how`` is the `HOWCheckpoint` (learned reduction, layer, smoothing) and
    whose ``mean`` / ``std`` are the checkpoint's input normalisation (``runtime['mean_std']``,
    first format ``meta['mean']`` / ``['std']``).

    What is read: ``net_params`` (``architecture``, ``skip_layer``, ``dim_reduction['dim']``,
    ``smoothing['kernel_size']``, ``runtime``) or, in the first format, ``meta`` (``architecture``,
    ``skip_layer``, ``dim``, ``feat_pool_k``, ``mean``, ``std``); ``state_dict``: ``features.<i>.*``
    (the children of torchvision's ResNet without ``avgpool``/``fc``, the last ``skip_layer``
    dropped), ``dim_reduction.weight (d, K, 1, 1)`` / ``.bias (d,)`` (first format: ``whiten.*``).
    Optimizer, scheduler and scores are ignored. Refused, with an error naming it: another
    architecture than ``architecture`` or one outside `HOW_ARCHITECTURES`, a ``skip_layer``
    outside `HOW_SKIP_LAYERS`, no reduction layer, state-dict keys of any other layer.
    """
    params, version = _how_params(obj)
    state = obj["state_dict"]
    arch = str(params.get("architecture"))
    if arch not in HOW_ARCHITECTURES:
        raise ValueError(f"HOW checkpoint of architecture {arch!r}: supported are {', '.join(HOW_ARCHITECTURES)}")
    if architecture is not None and arch != architecture:
        raise ValueError(f"the HOW checkpoint is a {arch} network (its architecture), not {architecture}")
    skip = int(params.get("skip_layer") or 0)
    if skip not in HOW_SKIP_LAYERS:
        raise ValueError(f"HOW checkpoint with skip_layer={skip}: supported are {sorted(HOW_SKIP_LAYERS)}")
    prefix = "dim_reduction." if version != "how/first" else "whiten."
    if not params.get("dim_reduction") or f"{prefix}weight" not in state:
        raise ValueError(f"HOW checkpoint without a dimensionality reduction layer ('{prefix}weight'): "
                         "gpu_dsm reads HOW's reduced descriptors only")
    other = sorted(k for k in state if not k.startswith("features.") and k not in (f"{prefix}weight", f"{prefix}bias"))
    if other:
        raise ValueError(f"the HOW checkpoint's state_dict has {len(other)} keys of layers gpu_dsm does not apply "
                         f"(first: {other[:5]}); refusing to ignore them")
    weight = torch.as_tensor(state[f"{prefix}weight"])
    if weight.ndim != 4 or tuple(weight.shape[2:]) != (1, 1):
        raise ValueError(f"HOW checkpoint: '{prefix}weight' must be a 1x1 conv weight (d, K, 1, 1), got {tuple(weight.shape)}")
    bias = torch.as_tensor(state.get(f"{prefix}bias", torch.zeros(weight.shape[0])))
    if tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"HOW checkpoint: '{prefix}bias' must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    dim = int((params.get("dim_reduction") or {}).get("dim", weight.shape[0]))
    if dim != weight.shape[0]:
        raise ValueError(f"HOW checkpoint: dim_reduction dim {dim} but '{prefix}weight' has {weight.shape[0]} rows")
    smoothing = params.get("smoothing") or {}
    size = int(smoothing.get("kernel_size", 1)) if isinstance(smoothing, dict) else 1
    features = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    if not features:
        raise ValueError("HOW checkpoint has no 'features.*' weights in its state_dict")
    runtime = dict(params.get("runtime") or {})
    reduction = Whitening(projection=weight[:, :, 0, 0].float().clone(), bias=bias.float().clone(), method="how-checkpoint")
    how = HOWCheckpoint(architecture=arch, skip_layer=skip, layer=HOW_SKIP_LAYERS[skip], reduction=reduction,
                        smoothing=size, runtime=runtime, format=version)
    head = RetrievalHead(meta=dict(obj.get("meta") or {}), how=how)
    mean_std = runtime.get("mean_std")
    if mean_std is not None:
        if len(mean_std) != 2 or any(len(v) != 3 for v in mean_std):
            raise ValueError(f"HOW checkpoint: runtime['mean_std'] must be [mean (3,), std (3,)], got {mean_std!r}")
        head.mean = tuple(float(v) for v in mean_std[0])
        head.std = tuple(float(v) for v in mean_std[1])
    return features, head
