"""Cached artifacts in one folder: their keys, lookup, locks and file formats.

    cache = ArtifactCache("cache/", network=options)   # options: what the network's outputs depend on
    retrieval = DSMRetrieval(backbone, config, cache=cache)
    retrieval.fit_asmk({"database": database_specs})   # HOW whitening, HOW features, codebook: cached
    stores = cache.stores([StoreRequest(...)], write)   # feature stores, extracted once

Every artifact is a file (or, for a feature store, a folder) in the cache folder named by a digest
of everything it depends on ([`cache_digest`][gpu_dsm.cache.cache_digest]), so a changed option, weights file or image
gives a new name and a stale artifact is never served:

- feature store: ``network`` (less `SEARCH_TIME_OPTIONS`), the images (paths, sizes,
  modification times, boxes), then the detector options; a [`gpu_dsm.store.FeatureStore`][gpu_dsm.store.FeatureStore];
- kNN graph: the database's whitened global descriptors (their bytes), the graph options;
  [`gpu_dsm.graph.KnnGraph.save`][gpu_dsm.graph.KnnGraph.save];
- HOW whitening: the network, the HOW options, the training images; [`gpu_dsm.whitening.Whitening.save`][gpu_dsm.whitening.Whitening.save];
- HOW features: the HOW whitening's name (or its bytes), the images; [`gpu_dsm.how.HOWFeatures.save`][gpu_dsm.how.HOWFeatures.save];
- ASMK codebook: the training features' names, words, k-means iterations, seed; [`save_codebook`][gpu_dsm.cache.save_codebook];
- ASMK index: the codebook's name, the database features' names, the ASMK options;
  [`gpu_dsm.asmk.ASMKIndex.save`][gpu_dsm.asmk.ASMKIndex.save].

[`ArtifactCache.get`][gpu_dsm.cache.ArtifactCache.get] returns the artifact when it is there and readable; otherwise it builds
it, saves it atomically ([`gpu_dsm.io.atomic_write`][gpu_dsm.io.atomic_write]) and returns it. A corrupt artifact (its
loader raises ``ValueError``) is reported and rebuilt. A lock file per artifact makes a second run
on the same cache wait for the first and reuse what it wrote; under torchrun (``ranks``,
`gpu_dsm.shards`) the job is one run, so its ranks take no lock: rank 0 saves and the other
ranks load what it saved. The cache remembers the name of every artifact it returned
([`ArtifactCache.name_of`][gpu_dsm.cache.ArtifactCache.name_of]): an artifact made from others is keyed on their names.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import torch

from gpu_dsm.asmk import ASMKConfig, ASMKIndex
from gpu_dsm.backbones.layers import HOW_LAYERS
from gpu_dsm.graph import GraphConfig, KnnGraph
from gpu_dsm.how import HOWConfig, HOWFeatures
from gpu_dsm.images import ImageSpec
from gpu_dsm.io import FileLock, stat_digest, torch_load_checked, torch_save, unfinished_directories
from gpu_dsm.shards import Ranks, pixel_costs, write_sharded
from gpu_dsm.store import FeatureStore
from gpu_dsm.whitening import Whitening

T = TypeVar("T")

CODEBOOK_FORMAT = "gpu_dsm.asmk_codebook/1"
# entries of ``network`` that are search-time steps or run settings: they never change a store's content
SEARCH_TIME_OPTIONS = ("whitening", "device", "rerank", "diffusion", "detector", "distractors", "initial", "asmk", "search")
# what a HOW whitening depends on besides the HOW options and its images
_HOW_NETWORK = ("backbone", "weights_sha256", "upsample", "dtype")


def cache_digest(obj: Any) -> str:
    """12 hex digits of the SHA-1 of ``obj`` as sorted JSON: the key part of an artifact's name."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def content_digest(*tensors: torch.Tensor | None) -> str:
    """12 hex digits of the SHA-1 of the tensors' dtypes, shapes and bytes (``None``: absent)."""
    sha = hashlib.sha1()
    for tensor in tensors:
        if tensor is None:
            sha.update(b"none;")
            continue
        data = tensor.detach().cpu().contiguous()
        sha.update(f"{data.dtype}{tuple(data.shape)};".encode())
        sha.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return sha.hexdigest()[:12]


def images_key(images: Sequence[Any]) -> dict[str, Any] | None:
    """What a set of image files is keyed on: their resolved paths, sizes and modification times
    ([`gpu_dsm.io.stat_digest`][gpu_dsm.io.stat_digest]) and query boxes; ``None`` for images in memory (arrays, PIL
    images), which have no file to key on."""
    specs = []
    for image in images:
        if isinstance(image, (str, Path)):
            image = ImageSpec(str(image))
        if not isinstance(image, ImageSpec) or not isinstance(image.source, (str, Path)):
            return None
        specs.append(image)
    return {"images": stat_digest([str(Path(s.source).resolve()) for s in specs]), "boxes": [s.box for s in specs]}


def network_identity(backbone: torch.nn.Module) -> dict[str, Any]:
    """What the outputs of ``backbone`` depend on, when no caller says: its name, a digest of its
    parameters and buffers, its dtype."""
    tensors = [t for _, t in sorted(backbone.state_dict().items())]
    first = next(iter(backbone.parameters()), None)
    return {"backbone": getattr(backbone, "name", type(backbone).__name__), "weights_sha256": content_digest(*tensors),
            "upsample": False, "dtype": str(first.dtype).replace("torch.", "") if first is not None else "float32"}


def save_codebook(codebook: torch.Tensor, path: str | Path) -> Path:
    """Write an ASMK codebook ``(K, d)`` atomically (format ``gpu_dsm.asmk_codebook/1``)."""
    return torch_save(path, {"format": CODEBOOK_FORMAT, "codebook": codebook.cpu()})


def load_codebook(path: str | Path) -> torch.Tensor:
    """Read a codebook written by [`save_codebook`][gpu_dsm.cache.save_codebook], on the CPU; a file of another format or
    a codebook that is not a finite ``(K, d)`` tensor raises ``ValueError`` naming the file."""
    codebook = torch_load_checked(path, CODEBOOK_FORMAT, "ASMK codebook").get("codebook")
    if not isinstance(codebook, torch.Tensor) or codebook.ndim != 2 or not torch.isfinite(codebook).all():
        raise ValueError(f"corrupt ASMK codebook {path}")
    return codebook


@dataclass
class StoreRequest:
    """One feature store [`ArtifactCache.stores`][gpu_dsm.cache.ArtifactCache.stores] finds or extracts: the images of ``split``
    (``"database"``, ``"queries"``, ...) of the image set ``owner`` found in ``folder``."""

    split: str
    images: Sequence[ImageSpec]
    names: Sequence[str]
    owner: str  # the image set (a dataset, a folder of distractors): the store's name starts with it
    folder: str | Path  # where the image set lives (keyed)
    is_query: bool = False


class ArtifactCache:
    """The cache folder ``folder``: artifacts found, or built and saved, under a lock.

    Args:
        folder: where the artifacts live (created when the first is saved).
        network: what the network's outputs depend on, recorded in each store: ``backbone`` (its
            name), ``weights_sha256``, ``upsample``, ``dtype``, the extraction and global-descriptor
            options, ``detector`` (``None``: global descriptors only); entries in
            `SEARCH_TIME_OPTIONS` are not keyed (e.g. `gpu_dsm.eval.run.RunConfig.options`).
            ``None``: [`network_identity`][gpu_dsm.cache.network_identity] of the module that uses the cache.
        log: where progress lines go.
        ranks: this process's place in a torchrun job (default: one process).

    ``timing`` receives the seconds each artifact took to build (``None`` when it was reused),
    under the names ``extract_<split>_s``, ``how_whitening_s``, ``how_<label>_s``,
    ``asmk_codebook_s``, ``asmk_index_s``.
    """

    def __init__(self, folder: str | Path, network: dict[str, Any] | None = None, log: Callable[[str], Any] = print,
                 ranks: Ranks | None = None):
        self.folder = Path(folder)
        self.network = network
        self.log = log
        self.ranks = ranks or Ranks()
        self.timing: dict[str, float | None] = {}
        self._by_name: dict[str, Any] = {}
        self._names: dict[int, tuple[Any, str]] = {}

    # --- the generic step --------------------------------------------------------------------------

    def lock(self, name: str, what: str):
        """The lock that guards artifact ``name`` (a no-op under torchrun, whose ranks are one run)."""
        if self.ranks.distributed:
            return contextlib.nullcontext()
        path = self.folder / name
        return FileLock(path.with_name(f".{path.name}.lock"),
                        on_wait=lambda p: self.log(f"{what}: waiting for another run using this cache (lock {p})"))

    def remember(self, obj: T, name: str) -> T:
        """Record that ``obj`` is the artifact ``name`` (artifacts made from it are keyed on the name)."""
        self._names[id(obj)] = (obj, name)
        return obj

    def name_of(self, obj: Any) -> str | None:
        """The name of the artifact ``obj`` (one this cache returned or was told of), else ``None``."""
        entry = self._names.get(id(obj))
        return entry[1] if entry is not None and entry[0] is obj else None

    def get(self, name: str, load: Callable[[Path], T], build: Callable[[], T], save: Callable[[T, Path], Any],
            what: str, timing: str | None = None) -> T:
        """``load(path)`` if a readable artifact ``name`` is there, else ``build()`` saved to it;
        an artifact this cache already returned is returned again without reading it.

        ``load`` raises ``ValueError`` for a corrupt artifact: it is reported and rebuilt. ``save``
        must write atomically. Under torchrun every rank takes the same branch (the artifact is only
        written after a collective step of the build, which needs every rank past its check); rank 0
        saves, and the others, once it has, load what it saved, so all ranks hold the same object.
        A build that writes the file itself (rank 0's merge of shards; ``None`` on the other ranks)
        is not saved again, and the other ranks keep ``None``. ``timing``: the entry of
        `timing` that receives the seconds (``None`` when reused).
        """
        if name in self._by_name:
            return self._by_name[name]
        path = self.folder / name
        ranks = self.ranks
        seconds = None
        with self.lock(name, what):
            obj = None
            if path.exists():
                try:
                    obj = load(path)
                    self.log(f"{what}: reusing {path}")
                except ValueError as exc:
                    self.log(f"cache: {exc}; rebuilding it")
            if obj is None:
                start = time.perf_counter()
                obj = build()
                seconds = time.perf_counter() - start
                if ranks.rank == 0 and not (ranks.distributed and path.exists()):
                    save(obj, path)
                if ranks.distributed:
                    ranks.barrier()
                    if ranks.rank != 0 and obj is not None:
                        obj = load(path)
                self.log(f"{what}: {seconds:.1f} s -> {path}")
        if timing is not None:
            self.timing[timing] = None if seconds is None else round(seconds, 3)
        if obj is not None:
            self._by_name[name] = obj
            self.remember(obj, name)
        return obj

    # --- feature stores ----------------------------------------------------------------------------

    def _network(self) -> dict[str, Any]:
        if self.network is None:
            raise ValueError("ArtifactCache: feature stores need the network's options (ArtifactCache(folder, network=...))")
        return self.network

    def store_name(self, request: StoreRequest) -> tuple[str, str]:
        """``(global part, full name)`` of a request's store.

        The global part keys everything the global descriptors depend on: the network's options
        (less `SEARCH_TIME_OPTIONS`), the image set and split, and the images (names, sizes
        and modification times of the files, query boxes), so a changed file gives a new store.
        The full name adds the detector options (``-global`` for global descriptors only).
        """
        network = self._network()
        keyed = {k: v for k, v in network.items() if k not in SEARCH_TIME_OPTIONS}
        keyed.update(dataset=request.owner, split=request.split, root=str(Path(request.folder).resolve()),
                     **images_key(request.images))
        global_part = f"{request.owner}-{request.split}-{network['backbone']}-{cache_digest(keyed)}"
        detector = network.get("detector")
        return global_part, f"{global_part}-{cache_digest(detector) if detector is not None else 'global'}"

    def _open_store(self, path: Path) -> FeatureStore | None:
        """The store at ``path`` if it is a readable store; a corrupt one is reported and ``None``
        returned (the caller rebuilds it)."""
        if not (path / "meta.json").is_file():
            return None
        try:
            return FeatureStore(path)
        except ValueError as exc:
            self.log(f"cache: {exc}; rebuilding it")
            return None

    def _find_store(self, global_part: str, name: str) -> FeatureStore | None:
        """A usable store: the exact one, or for global descriptors only any store with the same
        global part (a local-feature store holds the same global descriptors)."""
        store = self._open_store(self.folder / name)
        if store is not None or self._network().get("detector") is not None:
            return store
        for candidate in sorted(self.folder.glob(f"{global_part}-*")):
            store = self._open_store(candidate) if candidate.is_dir() else None
            if store is not None:
                return store
        return None

    def stores(self, requests: Sequence[StoreRequest],
               write: Callable[[StoreRequest, Sequence[ImageSpec], Sequence[str], Path], FeatureStore]) -> list[FeatureStore]:
        """The store of each request, found in the cache or written by ``write(request, images,
        names, path)`` (which publishes it atomically, e.g. [`gpu_dsm.pipeline.DSMRetrieval.write_store`][gpu_dsm.pipeline.DSMRetrieval.write_store]).

        A lock per store makes a second run on the same cache wait for the first and reuse what it
        wrote; a store's lock is released only once the next one's is taken (every run takes them
        in the same order, so no deadlock), so a run that waited on one store never overtakes the
        first on the next. An unfinished store a killed run left is removed before the store is
        written. Under torchrun each rank writes a balanced slice of a missing store (by pixels, at
        the network's ``extract`` image size) and rank 0 merges them (`gpu_dsm.shards.write_sharded`).
        """
        ranks = self.ranks
        found = []
        held = None  # the previous store's lock, released once the next one is taken
        try:
            for request in requests:
                global_part, name = self.store_name(request)
                path = self.folder / name
                lock = self.lock(global_part, request.split)
                lock.__enter__()
                if held is not None:
                    held.__exit__(None, None, None)
                held = lock
                seconds = None
                store = self._find_store(global_part, name)
                if store is not None:
                    self.log(f"{request.split}: reusing {store.path}")
                else:
                    if ranks.rank == 0:  # (shards' unfinished directories too: nobody writes them yet)
                        for leftover in unfinished_directories(path):
                            self.log(f"cache: removing {leftover.name}, an unfinished store of a run that was killed")
                            shutil.rmtree(leftover, ignore_errors=True)
                    ranks.barrier()
                    start = time.perf_counter()

                    def part(specs, names, part_path, request=request):
                        return write(request, specs, names, part_path)

                    if ranks.distributed:
                        extract = self._network()["extract"]
                        costs = pixel_costs(request.images, extract["image_size"], extract["upscale"])
                        store = write_sharded(ranks, request.images, request.names, path, costs, part, self.log)
                    else:
                        store = part(request.images, request.names, path)
                    seconds = time.perf_counter() - start
                    count = len(request.images)
                    self.log(f"{request.split}: {count} images in {seconds:.1f} s ({count / seconds:.2f} img/s) -> {path}")
                self.timing[f"extract_{request.split}_s"] = None if seconds is None else round(seconds, 3)
                found.append(self.remember(store, store.path.name))
        finally:
            if held is not None:
                held.__exit__(None, None, None)
        return found

    # --- what DSMRetrieval caches ----------------------------------------------------------------

    def graph(self, descriptors: torch.Tensor, config: GraphConfig, build: Callable[[], KnnGraph],
              device: torch.device | str, source: str | None = None) -> KnnGraph:
        """The kNN graph of ``descriptors`` ``(N, D)`` (the whitened global descriptors of the
        database), keyed on their content and ``config``; ``source``: the name of the store they
        came from (the graph's file is named after it)."""
        keyed = {"descriptors": content_digest(descriptors), "graph": dataclasses.asdict(config)}
        name = f"{source + '-' if source else ''}graph-{cache_digest(keyed)}.pt"
        return self.get(name, lambda p: KnnGraph.load(p, device), build, lambda g, p: g.save(p), "graph")

    def _how_network(self, how: HOWConfig, network: dict[str, Any]) -> dict[str, Any]:
        options = how.options()
        options["layer"] = options["layer"] or HOW_LAYERS.get(network["backbone"])
        return {**{k: network.get(k) for k in _HOW_NETWORK}, **options}

    def how_whitening(self, how: HOWConfig, training: Sequence[Sequence[Any]], build: Callable[[], Whitening],
                      network: dict[str, Any]) -> Whitening:
        """HOW's whitening learned on the image sets ``training`` (each a list of image files)."""
        keyed = {**self._how_network(how, network), "training": [images_key(images) for images in training]}
        name = f"how-whitening-{network['backbone']}-{cache_digest(keyed)}.pt"
        return self.get(name, Whitening.load, build, lambda w, p: w.save(p), "HOW whitening", "how_whitening_s")

    def how_features(self, label: str, whitening: Whitening, images: Sequence[Any],
                     build: Callable[[Path], HOWFeatures | None]) -> HOWFeatures | None:
        """HOW features of the image files ``images`` with ``whitening`` (keyed on the name of the
        whitening's file when this cache gave it, see [`remember`][gpu_dsm.cache.ArtifactCache.remember]); ``build(path)`` makes them
        (under torchrun: writes them at ``path`` itself, and returns them on rank 0 only)."""
        keyed = {"whitening": self.name_of(whitening.projection) or content_digest(whitening.projection, whitening.bias),
                 **images_key(images)}
        name = f"how-{label}-{cache_digest(keyed)}.pt"
        return self.get(name, HOWFeatures.load, lambda: build(self.folder / name), lambda f, p: f.save(p),
                        f"HOW {label}", f"how_{label}_s")

    def codebook(self, training: Sequence[HOWFeatures], words: int, asmk: ASMKConfig,
                 build: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The ASMK codebook of ``words`` words learned on the HOW features ``training``."""
        keyed = {"training": [self.name_of(t) or content_digest(t.descriptors) for t in training], "size": words,
                 "iterations": asmk.kmeans_iterations, "seed": asmk.seed}
        return self.get(f"asmk-codebook-{cache_digest(keyed)}.pt", load_codebook, build, save_codebook, "ASMK codebook",
                        "asmk_codebook_s")

    def asmk_index(self, codebook: torch.Tensor, database: Sequence[HOWFeatures], asmk: ASMKConfig,
                   build: Callable[[], ASMKIndex], device: torch.device | str) -> ASMKIndex:
        """The ASMK inverted file of the HOW features ``database`` (one set after another) on
        ``codebook``, with ``asmk``'s settings (how it runs, which the key leaves out, included)."""
        options = dataclasses.asdict(asmk)
        for how_it_runs in ("memory_budget", "search_backend"):  # neither changes the index
            options.pop(how_it_runs)
        keyed = {"codebook": self.name_of(codebook) or content_digest(codebook),
                 "database": [self.name_of(d) or content_digest(d.descriptors, d.image_ids) for d in database],
                 "asmk": options}
        index = self.get(f"asmk-index-{cache_digest(keyed)}.pt", lambda p: ASMKIndex.load(p, device), build,
                         lambda i, p: i.save(p), "ASMK index", "asmk_index_s")
        return dataclasses.replace(index, config=asmk)

