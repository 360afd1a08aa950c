"""A [`DSMRetrieval`][gpu_dsm.pipeline.DSMRetrieval] and its index on disk (``retrieval.save`` / ``DSMRetrieval.load``).

A saved retrieval is a folder, published atomically ([`gpu_dsm.io.atomic_directory`][gpu_dsm.io.atomic_directory])::

    retrieval.json    format/version, the config (JSON), the backbone's fingerprint (and, if
                      given, how to rebuild it by name), and of the index: its image names and
                      which parts it holds
    learned.pt        the learned state (whitening, HOW whitening, ASMK codebook): tensors only
    index/global.npy  (N, D) float32 global descriptors as search uses them (whitened)
    index/local/      the local features: a feature store (docs "Feature store format"), memory-mapped
    index/search.npy  a FAISS search index, serialised (exact search keeps none: it is the descriptors)
    index/graph.pt    the kNN graph (with diffusion)
    index/asmk.pt     the ASMK inverted file (initial ranking "asmk")

Nothing read can run code: JSON, ``.npy`` without pickles, ``torch.load(weights_only=True)``.
Loading checks what the index was built with against the module that loads it: the format and
version, the backbone (by a digest of its weights and its facts), the config fields that change
what is stored (extraction, pooling, detector, search index, and the graph / HOW + ASMK when the
index holds them) and the learned state; a mismatch is a one-line ``ValueError`` naming it.
Search-time settings (re-ranking, diffusion, batch sizes, progress) may differ.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpu_dsm.asmk import ASMKIndex
from gpu_dsm.configs import config_differences, config_from_json, config_to_json
from gpu_dsm.features import LocalFeatures
from gpu_dsm.graph import KnnGraph
from gpu_dsm.io import atomic_directory, json_safe, torch_load_checked
from gpu_dsm.knn import GlobalIndex
from gpu_dsm.ranking import DescribedImages
from gpu_dsm.rerank import gather_local
from gpu_dsm.store import FeatureStore, StoreStack, StoreWriter

FORMAT = "gpu_dsm.retrieval"
VERSION = 1
LEARNED_FORMAT = "gpu_dsm.retrieval_learned/1"
META = "retrieval.json"

#: config fields that change what an index holds, checked when it is loaded
INDEX_FIELDS = ("extract", "global_", "detector", "search")
#: of those, the ones that change only speed or memory
RUNTIME_FIELDS = ("extract.batch_size", "extract.num_workers", "extract.progress", "how.batch_size", "how.progress",
                  "detector.max_voxels", "asmk.memory_budget", "asmk.search_backend", "graph.chunk_size")
#: images whose local features are copied at once into a saved store
_COPY_IMAGES = 1024


# --- the backbone's fingerprint ----------------------------------------------------------------

def _feed(digest, obj: Any) -> None:
    """Feed ``obj`` (tensors, numbers, strings, containers, dataclasses) into ``digest``,
    deterministically across processes (never an ``id`` or a ``repr`` with an address)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        digest.update(type(obj).__qualname__.encode())
        for f in dataclasses.fields(obj):
            digest.update(f.name.encode())
            _feed(digest, getattr(obj, f.name))
    elif isinstance(obj, dict):
        for key in sorted(obj, key=str):
            digest.update(str(key).encode())
            _feed(digest, obj[key])
    elif isinstance(obj, (list, tuple)):
        digest.update(f"L{len(obj)}".encode())
        for item in obj:
            _feed(digest, item)
    elif obj is None or isinstance(obj, (bool, int, float, str)):
        digest.update(repr(obj).encode())
    elif isinstance(obj, np.ndarray):
        _feed(digest, torch.from_numpy(np.ascontiguousarray(obj)))
    else:
        digest.update(type(obj).__qualname__.encode())


def backbone_fingerprint(backbone) -> dict[str, Any] | None:
    """What identifies a `Backbone` (``None`` for none): its
    name, weights label, stride, channels, dtype, and ``digest``, a SHA-256 of its weights, input
    normalisation and retrieval head (pooling, GeM ``p``, in-network whitening)."""
    if backbone is None:
        return None
    digest = hashlib.sha256()
    state = backbone.state_dict()
    for name in sorted(state):
        digest.update(name.encode())
        _feed(digest, state[name])
    head = backbone.head
    _feed(digest, [backbone.mean, backbone.std, backbone.stride, backbone.upsampled, head.pooling, head.gem_p,
                   head.network_whitening, head.mean, head.std])
    return {"name": backbone.name, "weights": str(backbone.weights), "upsampled": bool(backbone.upsampled),
            "stride": int(backbone.stride), "out_channels": int(backbone.out_channels),
            "dtype": str(backbone.dtype).removeprefix("torch."), "digest": digest.hexdigest()}


def _describe_backbone(facts: dict[str, Any]) -> str:
    return f"{facts['name']} (weights {facts['weights']}, {facts['dtype']}, digest {facts['digest'][:12]})"


def check_backbone(meta: dict[str, Any], backbone, folder: Path) -> None:
    """Raise ``ValueError`` when ``backbone`` is not the one the saved retrieval was built with
    (nothing is checked when either is absent)."""
    saved = meta.get("backbone")
    if saved is None or backbone is None:
        return
    mine = backbone_fingerprint(backbone)
    if mine["digest"] != saved["digest"]:
        raise ValueError(f"backbone mismatch: {folder} was built with {_describe_backbone(saved)}, this module has "
                         f"{_describe_backbone(mine)}")


# --- the config ----------------------------------------------------------------------------------

def _index_fields(meta: dict[str, Any], config) -> list[str]:
    index = meta.get("index") or {}
    fields = list(INDEX_FIELDS)
    if index.get("graph"):
        fields.append("graph")
    if index.get("asmk") and config.initial == "asmk":
        fields += ["how", "asmk"]
    return fields


def check_config(meta: dict[str, Any], config, folder: Path) -> None:
    """Raise ``ValueError`` naming the first config field that changes what the saved index holds
    and differs between it and ``config`` (`INDEX_FIELDS`), or re-ranking on an index
    without local features."""
    differences = config_differences(meta["config"], config_to_json(config), _index_fields(meta, config), RUNTIME_FIELDS)
    if differences:
        field, saved, mine = differences[0]
        more = f" (and {len(differences) - 1} more)" if len(differences) > 1 else ""
        raise ValueError(f"config mismatch: {field} is {saved!r} in {folder}, {mine!r} here{more}")
    index = meta.get("index")
    if index is not None and config.rerank is not None and not index.get("local"):
        raise ValueError(f"config mismatch: re-ranking is on, but the index in {folder} holds no local features "
                         "(it was saved with rerank=None)")


# --- reading the folder --------------------------------------------------------------------------

def read_meta(folder: str | Path) -> dict[str, Any]:
    """The ``retrieval.json`` of a saved retrieval, its format and version checked."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"saved retrieval not found: {folder}")
    path = folder / META
    if not path.is_file():
        raise ValueError(f"{folder} is not a saved gpu_dsm retrieval (no {META})")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"format mismatch: {folder} is not a saved gpu_dsm retrieval (format {found!r}, expected {FORMAT!r})")
    if meta.get("version") != VERSION:
        raise ValueError(f"format mismatch: {folder} has format version {meta.get('version')}, this gpu_dsm reads {VERSION}")
    return meta


def saved_config(meta: dict[str, Any], config_class, folder: Path):
    """The config a saved retrieval was built with."""
    try:
        return config_from_json(config_class, meta["config"])
    except (KeyError, ValueError) as exc:
        raise ValueError(f"saved retrieval {folder}: {exc}") from None


def read_learned(folder: str | Path) -> dict[str, torch.Tensor]:
    """The learned tensors of a saved retrieval (absent ones left out), on the CPU."""
    state = torch_load_checked(Path(folder) / "learned.pt", LEARNED_FORMAT, "learned state")
    return {name: value for name, value in state.items() if name != "format" and value is not None}


def check_learned(folder: Path, meta: dict[str, Any], learned, config) -> None:
    """Raise ``ValueError`` when the learned state the index depends on (the whitening of global
    descriptors; with an ASMK index HOW's whitening and the codebook) differs from ``learned``
    (a [`LearnedState`][gpu_dsm.pipeline.LearnedState])."""
    saved = read_learned(folder)
    names = ["whitening_projection", "whitening_bias"]
    if (meta.get("index") or {}).get("asmk") and config.initial == "asmk":
        names += ["how_whitening_projection", "how_whitening_bias", "codebook"]
    for name in names:
        mine = getattr(learned, name)
        theirs = saved.get(name)
        same = (mine is None and theirs is None) or (
            mine is not None and theirs is not None and mine.shape == theirs.shape and torch.equal(mine.cpu(), theirs))
        if not same:
            raise ValueError(f"learned state mismatch: the index in {folder} was built with another {name} "
                             f"(load the module with DSMRetrieval.load({str(folder)!r}, backbone))")


# --- writing -------------------------------------------------------------------------------------

def _link_or_copy(source: Path, target: Path) -> None:
    """``target`` as a copy of the published store ``source``: hard links where the file system
    allows (a published store's files are never changed in place), else copies."""
    target.mkdir(parents=True)
    for path in source.iterdir():
        if path.is_file():
            try:
                os.link(path, target / path.name)
            except OSError:
                shutil.copy2(path, target / path.name)


def _local_facts(source) -> tuple[list[float], int]:
    if isinstance(source, LocalFeatures):
        return list(source.scales), source.num_channels
    store = source.stores[0] if isinstance(source, StoreStack) else source
    local = store.meta["local"]
    return list(local["scales"]), int(local["num_channels"])


def _write_local(source, path: Path, names: list[str], descriptors: torch.Tensor) -> None:
    """The local features of every database image, from a table in memory or stores, as a
    feature store at ``path`` (read and written ``_COPY_IMAGES`` images at a time)."""
    if isinstance(source, FeatureStore):
        _link_or_copy(source.path, path)
        return
    scales, channels = _local_facts(source)
    n = len(names)
    with StoreWriter(path, names, descriptors.shape[1], {"saved_index": True},
                     local={"scales": scales, "num_channels": channels}) as writer:
        for start in range(0, n, _COPY_IMAGES):
            rows = list(range(start, min(start + _COPY_IMAGES, n)))
            table = gather_local(source, rows, "cpu")
            if table.map_sizes.shape[1] != len(scales):
                raise ValueError(f"save: the local features have maps at {table.map_sizes.shape[1]} scales but "
                                 f"{len(scales)} scale factors; describe images (or one map per configured scale)")
            for j, i in enumerate(rows):
                writer.add_global(i, descriptors[i])
                writer.add_local(i, table.image(j), table.map_sizes[j])


def _faiss():
    from gpu_dsm.knn import _faiss as load

    return load()


def save_retrieval(retrieval, folder: str | Path, index: DescribedImages | None = None,
                   network: dict[str, Any] | None = None) -> Path:
    """Write ``retrieval`` (config, learned state, backbone fingerprint) and, if given, ``index``
    to ``folder``, atomically (module docstring); returns the folder. ``network``: how the
    backbone is rebuilt by name, `gpu_dsm.backbones.build_backbone`'s arguments
    (``{"name", "weights", "upsample"}``), recorded for tools that load without a script
    (``gpu-dsm search``)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"save: {folder} exists and is not a folder")
    meta: dict[str, Any] = {"format": FORMAT, "version": VERSION, "config": config_to_json(retrieval.config),
                            "backbone": backbone_fingerprint(retrieval.backbone),
                            "network": network, "whitening_label": retrieval.whitening_label, "index": None}
    learned = {name: getattr(retrieval.learned, name) for name in retrieval.learned.NAMES}
    with atomic_directory(folder) as tmp:
        torch.save({"format": LEARNED_FORMAT, **{k: v.detach().cpu() for k, v in learned.items() if v is not None}},
                   tmp / "learned.pt")
        if index is not None:
            meta["index"] = _save_index(index, tmp / "index")
        (tmp / META).write_text(json.dumps(json_safe(meta), indent=1, allow_nan=False) + "\n")
    return folder


def _save_index(index: DescribedImages, folder: Path) -> dict[str, Any]:
    folder.mkdir()
    descriptors = index.global_descriptors.detach().float().cpu()
    n = int(descriptors.shape[0])
    names = list(index.names) if index.names is not None else None
    if names is not None and len(names) != n:
        raise ValueError(f"save: the index has {n} images but {len(names)} names")
    np.save(folder / "global.npy", descriptors.numpy(), allow_pickle=False)
    parts: dict[str, Any] = {"num_images": n, "global_dim": int(descriptors.shape[1]), "names": names,
                             "local": index.local is not None, "search": None, "graph": index.graph is not None,
                             "asmk": index.asmk is not None}
    if index.local is not None:
        _write_local(index.local, folder / "local", names or [str(i) for i in range(n)], descriptors)
    search = index.search_index
    if search is not None:
        parts["search"] = search.config.backend
        if search.faiss_index is not None:
            np.save(folder / "search.npy", _faiss().serialize_index(search.faiss_index), allow_pickle=False)
    if index.graph is not None:
        index.graph.save(folder / "graph.pt")
    if index.asmk is not None:
        index.asmk.save(folder / "asmk.pt")
    return parts


def load_index(retrieval, folder: str | Path) -> DescribedImages:
    """The index saved in ``folder``, for ``retrieval`` (checked against it: module docstring):
    global descriptors in memory on the module's device, local features as a memory-mapped
    feature store, the search index, kNN graph and ASMK index as saved."""
    folder = Path(folder)
    meta = read_meta(folder)
    parts = meta.get("index")
    if parts is None:
        raise ValueError(f"{folder} holds no index (save one with retrieval.save(folder, index))")
    check_backbone(meta, retrieval.backbone, folder)
    check_config(meta, retrieval.config, folder)
    check_learned(folder, meta, retrieval.learned, retrieval.config)
    where = folder / "index"
    device = retrieval.device
    try:
        descriptors = np.load(where / "global.npy", mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"corrupt saved index {folder}: cannot read index/global.npy ({exc})") from None
    if descriptors.shape != (parts["num_images"], parts["global_dim"]) or descriptors.dtype != np.float32:
        raise ValueError(f"corrupt saved index {folder}: index/global.npy is {descriptors.dtype} {descriptors.shape}, "
                         f"{META} says float32 {(parts['num_images'], parts['global_dim'])}")
    descriptors = torch.from_numpy(np.array(descriptors)).to(device)
    local = None
    if parts["local"]:
        local = FeatureStore(where / "local")
        if local.num_images != parts["num_images"]:
            raise ValueError(f"corrupt saved index {folder}: index/local holds {local.num_images} images, "
                             f"{META} says {parts['num_images']}")
    config = retrieval.config.search
    if (where / "search.npy").is_file():
        faiss = _faiss()
        search = GlobalIndex(config, None, faiss.deserialize_index(np.load(where / "search.npy", allow_pickle=False)))
        if config.backend == "faiss-ivfpq":
            search.faiss_index.nprobe = int(config.nprobe)
        elif config.backend == "faiss-hnsw":
            search.faiss_index.hnsw.efSearch = int(config.ef_search)
    else:
        search = GlobalIndex.build(descriptors, config)
    graph = KnnGraph.load(where / "graph.pt", device) if parts["graph"] else None
    asmk = ASMKIndex.load(where / "asmk.pt", device) if parts["asmk"] else None
    return DescribedImages(descriptors, local, search_index=search, asmk=asmk, graph=graph, names=parts["names"])
