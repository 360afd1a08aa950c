"""The feature store: what extraction writes to disk for a set of images.

A store is a directory, written atomically (see :func:`gpu_dsm.io.atomic_directory`)::

    meta.json          format/version, image names, the options that produced it, array shapes
    global.npy         (N, D) float32 global descriptors, row i = image i
    local_start.npy    (N,) int64   first row of image i in the local arrays
    local_count.npy    (N,) int32   number of local features of image i
    local_xy.npy       (F, 2) float32   ellipse centres, feature-map pixels of their scale
    local_frame.npy    (F, 3) float32   lower-triangular frame (a11, a21, a22)
    local_strength.npy (F,) float32
    local_channel.npy  (F,) int16 (int32 beyond 32767 channels)
    local_scale.npy    (F,) uint8
    map_sizes.npy      (N, S, 2) int32  feature-map (height, width) per scale

Local arrays exist when the store was written with a detector. All arrays are ``.npy`` files
opened memory-mapped, so a subset of images (a query's top-100) is gathered without reading
the rest. A local feature costs 27 bytes.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from numpy.lib.format import open_memmap

from gpu_dsm.features import LocalFeatures
from gpu_dsm.io import atomic_directory

STORE_FORMAT = "gpu_dsm.store"
STORE_VERSION = 1

#: name -> (dtype, trailing shape) of the per-feature arrays ``local_<name>.npy``
LOCAL_FIELDS = {
    "xy": (np.float32, (2,)),
    "frame": (np.float32, (3,)),
    "strength": (np.float32, ()),
    "channel": (np.int16, ()),
    "scale": (np.uint8, ()),
}


#: per-feature arrays that must be finite
_FINITE_FIELDS = ("xy", "frame", "strength")
#: rows checked at once when a store is validated (bounds memory for large stores)
_CHECK_ROWS = 1 << 16


def _count_non_finite_rows(array: np.ndarray) -> int:
    """Rows of ``array`` (in memory or memory-mapped, shape ``(N, ...)``) holding a NaN or Inf, read in blocks."""
    bad = 0
    for start in range(0, array.shape[0], _CHECK_ROWS):
        block = np.asarray(array[start:start + _CHECK_ROWS], dtype=np.float32).reshape(min(_CHECK_ROWS, array.shape[0] - start), -1)
        bad += int((~np.isfinite(block)).any(axis=1).sum())
    return bad


def _channel_dtype(num_channels: int):
    return np.int16 if num_channels <= np.iinfo(np.int16).max else np.int32


class StoreWriter:
    """Fill a store image by image (in any order), then leave the ``with`` block to publish it.

    If the block raises, nothing is published and an existing store at ``path`` is left as it
    was. ``local`` (``{"scales": [...], "num_channels": K}``) enables local features.
    """

    def __init__(self, path: str | Path, names: Sequence[str], global_dim: int, options: dict[str, Any],
                 local: dict[str, Any] | None = None):
        self.path = Path(path)
        self.names = list(names)
        self.options = options
        self.global_dim = int(global_dim)
        self.local = dict(local) if local is not None else None
        self._ctx = None
        self._dir: Path | None = None
        self._global = None
        self._written = None
        self._local_files: dict[str, Any] = {}
        self._local_done = None
        self._start = None
        self._count = None
        self._sizes = None
        self._rows = 0

    def __enter__(self) -> "StoreWriter":
        self._ctx = atomic_directory(self.path)
        self._dir = self._ctx.__enter__()
        n = len(self.names)
        self._global = open_memmap(self._dir / "global.npy", mode="w+", dtype=np.float32, shape=(n, self.global_dim))
        self._written = np.zeros(n, dtype=bool)
        if self.local is not None:
            self._channel_dtype = _channel_dtype(int(self.local["num_channels"]))
            self._local_files = {name: open(self._dir / f"local_{name}.bin", "wb") for name in LOCAL_FIELDS}
            self._local_done = np.zeros(n, dtype=bool)
            self._start = np.zeros(n, dtype=np.int64)
            self._count = np.zeros(n, dtype=np.int32)
            self._sizes = np.zeros((n, len(self.local["scales"]), 2), dtype=np.int32)
        return self

    def add_global(self, index: int, descriptor: torch.Tensor) -> None:
        """Row ``index``: a ``(D,)`` finite descriptor."""
        row = descriptor.detach().float().cpu().numpy()
        if not np.isfinite(row).all():
            name = self.names[index] if 0 <= index < len(self.names) else index
            raise ValueError(f"store {self.path}: the global descriptor of image {index} ({name}) has "
                             f"{int((~np.isfinite(row)).sum())} NaN/Inf values")
        self._global[index] = row
        self._written[index] = True

    def add_local(self, index: int, features: dict[str, torch.Tensor], map_sizes: torch.Tensor) -> None:
        """Image ``index``'s features (unpadded: ``xy``, ``frame``, ``strength``, ``channel``,
        ``scale``, as :meth:`LocalFeatures.image` returns) and ``(S, 2)`` map sizes."""
        if self.local is None:
            raise RuntimeError("this store was opened without local features")
        n = int(features["xy"].shape[0]) if features else 0
        if n:
            for name in _FINITE_FIELDS:
                if not torch.isfinite(features[name]).all():
                    raise ValueError(f"store {self.path}: local feature {name!r} of image {index} "
                                     f"({self.names[index]}) has NaN/Inf values")
            frame = features["frame"]
            arrays = dict(features, frame=torch.stack([frame[:, 0, 0], frame[:, 1, 0], frame[:, 1, 1]], 1))
        for name, (dtype, _) in LOCAL_FIELDS.items():
            if n:
                dtype = self._channel_dtype if name == "channel" else dtype
                self._local_files[name].write(arrays[name].detach().cpu().numpy().astype(dtype).tobytes())
        self._start[index] = self._rows
        self._count[index] = n
        self._rows += n
        self._sizes[index] = map_sizes.cpu().numpy()
        self._local_done[index] = True

    def _finish(self) -> None:
        if not self._written.all():
            raise RuntimeError(f"store {self.path}: {int((~self._written).sum())} images were never written")
        self._global.flush()
        meta = {
            "format": STORE_FORMAT,
            "version": STORE_VERSION,
            "num_images": len(self.names),
            "names": self.names,
            "global_dim": self.global_dim,
            "options": self.options,
        }
        if self.local is not None:
            if not self._local_done.all():
                raise RuntimeError(f"store {self.path}: local features of {int((~self._local_done).sum())} images missing")
            for name, (dtype, shape) in LOCAL_FIELDS.items():
                dtype = self._channel_dtype if name == "channel" else dtype
                self._local_files[name].close()
                raw = self._dir / f"local_{name}.bin"
                out = open_memmap(self._dir / f"local_{name}.npy", mode="w+", dtype=dtype, shape=(self._rows, *shape))
                if self._rows:
                    out[:] = np.fromfile(raw, dtype=dtype).reshape(self._rows, *shape)
                out.flush()
                del out
                raw.unlink()
            np.save(self._dir / "local_start.npy", self._start)
            np.save(self._dir / "local_count.npy", self._count)
            np.save(self._dir / "map_sizes.npy", self._sizes)
            meta["local"] = {
                "num_features": self._rows,
                "scales": [float(s) for s in self.local["scales"]],
                "num_channels": int(self.local["num_channels"]),
            }
        (self._dir / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                self._finish()
        except BaseException as err:
            self._close()
            self._ctx.__exit__(type(err), err, err.__traceback__)
            raise
        self._close()
        self._ctx.__exit__(exc_type, exc, tb)
        return False

    def _close(self) -> None:
        self._global = None
        for f in self._local_files.values():
            f.close()


class FeatureStore:
    """A store opened for reading (memory-mapped)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"not a feature store (no meta.json): {self.path}")
        try:
            self.meta = json.loads(meta_path.read_text())
        except Exception as exc:
            raise ValueError(f"corrupt feature store {self.path}: meta.json unreadable ({exc})") from exc
        if self.meta.get("format") != STORE_FORMAT:
            raise ValueError(f"{self.path} is not a gpu_dsm feature store (format {self.meta.get('format')!r})")
        if self.meta.get("version") != STORE_VERSION:
            raise ValueError(f"feature store {self.path} has version {self.meta.get('version')}, this gpu_dsm reads {STORE_VERSION}")
        n = self.num_images
        self._global = self._array("global.npy", (n, self.meta["global_dim"]))
        self._local = None
        if "local" in self.meta:
            local = self.meta["local"]
            f = int(local["num_features"])
            self._start = self._array("local_start.npy", (n,))
            self._count = self._array("local_count.npy", (n,))
            self._sizes = self._array("map_sizes.npy", (n, len(local["scales"]), 2))
            self._local = {name: self._array(f"local_{name}.npy", (f, *shape)) for name, (_, shape) in LOCAL_FIELDS.items()}
            ends = np.asarray(self._start, dtype=np.int64) + np.asarray(self._count, dtype=np.int64)
            if n and (ends.max() > f or np.asarray(self._start).min() < 0 or np.asarray(self._count).min() < 0):
                raise ValueError(f"corrupt feature store {self.path}: local_start/local_count point outside the {f} features")
            channels = np.asarray(self._local["channel"])
            if f and (channels.min() < 0 or channels.max() >= int(local["num_channels"])):
                raise ValueError(f"corrupt feature store {self.path}: local_channel.npy holds channels outside "
                                 f"0..{int(local['num_channels']) - 1}")
            scales = np.asarray(self._local["scale"])
            if f and scales.max() >= len(local["scales"]):
                raise ValueError(f"corrupt feature store {self.path}: local_scale.npy holds scale indices outside "
                                 f"0..{len(local['scales']) - 1}")

    def validate(self) -> None:
        """Scan every array for NaN/Inf (in blocks); raise ``ValueError`` naming the file and the
        number of bad rows. The readers below check what they read, so this is only needed to
        check a whole store up front."""
        arrays = {"global.npy": self._global}
        if self._local is not None:
            arrays.update({f"local_{name}.npy": self._local[name] for name in _FINITE_FIELDS})
        for name, array in arrays.items():
            bad = _count_non_finite_rows(array)
            if bad:
                raise ValueError(f"corrupt feature store {self.path}: {name} has {bad} of {array.shape[0]} rows with "
                                 f"NaN/Inf values; delete the store to rebuild it")

    def _array(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        try:
            arr = np.load(self.path / name, mmap_mode="r")
        except Exception as exc:
            raise ValueError(f"corrupt feature store {self.path}: cannot read {name} ({exc})") from exc
        if tuple(arr.shape) != tuple(shape):
            raise ValueError(f"corrupt feature store {self.path}: {name} has shape {arr.shape}, meta.json says {shape}")
        return arr

    @property
    def num_images(self) -> int:
        return int(self.meta["num_images"])

    @property
    def names(self) -> list[str]:
        return list(self.meta["names"])

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.meta["options"])

    @property
    def has_local(self) -> bool:
        return self._local is not None

    def _non_finite(self, name: str, rows: np.ndarray) -> None:
        bad = _count_non_finite_rows(rows)
        if bad:
            raise ValueError(f"corrupt feature store {self.path}: {name} has {bad} rows with NaN/Inf values (of "
                             f"{rows.shape[0]} read); delete the store to rebuild it")

    def global_descriptors(self, indices: Sequence[int] | None = None) -> torch.Tensor:
        """``(N, D)`` float32 (or the rows ``indices``), on the CPU; raises if any row read is not finite."""
        rows = self._global if indices is None else self._global[np.asarray(indices, dtype=np.int64)]
        rows = np.array(rows, dtype=np.float32)
        self._non_finite("global.npy", rows)
        return torch.from_numpy(rows)

    @property
    def key(self) -> str:
        """A name that identifies what the store holds (its folder name: caches key on it)."""
        return self.path.name

    def feature_counts(self, indices: Sequence[int] | None = None) -> np.ndarray:
        """``(n,)`` number of local features of images ``indices`` (all by default)."""
        if self._local is None:
            raise ValueError(f"feature store {self.path} holds no local features (extract with a detector)")
        idx = np.arange(self.num_images) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
        return np.asarray(self._count[idx], dtype=np.int64)

    def local_features(self, indices: Sequence[int] | None = None, device: torch.device | str = "cpu",
                       capacity: int | None = None) -> LocalFeatures:
        """Padded :class:`LocalFeatures` of images ``indices`` (all by default, repeats allowed),
        read from the memory map: one gather of the images' rows per array, one copy to ``device``."""
        if self._local is None:
            raise ValueError(f"feature store {self.path} holds no local features (extract with a detector)")
        idx = np.arange(self.num_images) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
        counts = np.asarray(self._count[idx], dtype=np.int64)
        width = int(counts.max(initial=0)) if capacity is None else int(capacity)
        if counts.size and int(counts.max()) > width:
            raise ValueError(f"LocalFeatures: an image has {int(counts.max())} features, more than the capacity {width}")
        # row r of the gathered block is feature slot[r] of image image_of[r]
        image_of = np.repeat(np.arange(idx.size), counts)
        slot = np.arange(image_of.size) - np.repeat(np.cumsum(counts) - counts, counts)
        rows = np.repeat(np.asarray(self._start[idx], dtype=np.int64), counts) + slot
        read = {name: np.asarray(self._local[name][rows]) for name in LOCAL_FIELDS}
        for name in _FINITE_FIELDS:
            self._non_finite(f"local_{name}.npy", read[name].reshape(rows.size, -1) if rows.size else read[name])
        local = self.meta["local"]
        out = LocalFeatures.empty(idx.size, len(local["scales"]), local["scales"], local["num_channels"], capacity=width,
                                  device=device)
        out.map_sizes.copy_(torch.from_numpy(np.array(self._sizes[idx], dtype=np.int64)))
        if rows.size:
            at = (torch.from_numpy(image_of).to(device), torch.from_numpy(slot).to(device))
            f3 = torch.from_numpy(read["frame"]).to(device)
            out.frame[at] = torch.stack([torch.stack([f3[:, 0], torch.zeros_like(f3[:, 0])], 1), f3[:, 1:]], 1)
            out.xy[at] = torch.from_numpy(read["xy"]).to(device)
            out.strength[at] = torch.from_numpy(read["strength"]).to(device)
            out.channel[at] = torch.from_numpy(read["channel"].astype(np.int64)).to(device)
            out.scale[at] = torch.from_numpy(read["scale"].astype(np.int64)).to(device)
            out.valid[at] = True
        return out

    def local_arrays(self) -> dict[str, np.ndarray]:
        """The raw memory-mapped arrays, read-only: per feature ``xy (F, 2)``, ``frame (F, 3)``
        (``a11, a21, a22``), ``strength``, ``channel``, ``scale``; per image ``start``, ``count``,
        ``map_sizes (N, S, 2)``. Nothing is checked or copied: for tools that process a store
        wholesale (:meth:`local_features` is the checked reader)."""
        if self._local is None:
            raise ValueError(f"feature store {self.path} holds no local features (extract with a detector)")
        return {**self._local, "start": self._start, "count": self._count, "map_sizes": self._sizes}

    def bytes_per_image(self) -> float:
        total = sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())
        return total / max(self.num_images, 1)


class StoreStack:
    """Several stores read as one database, in order: image ``i`` of the stack is image
    ``i - offset[s]`` of the store ``s`` that holds it (a dataset's database followed by
    distractors). Offers the reading side of :class:`FeatureStore`.
    """

    def __init__(self, stores: Sequence[FeatureStore]):
        if not stores:
            raise ValueError("StoreStack: no stores")
        self.stores = list(stores)
        first = self.stores[0]
        for store in self.stores[1:]:
            if store.meta["global_dim"] != first.meta["global_dim"]:
                raise ValueError(f"StoreStack: {store.path} has {store.meta['global_dim']}-D global descriptors, "
                                 f"{first.path} {first.meta['global_dim']}-D")
            if store.has_local != first.has_local:
                raise ValueError(f"StoreStack: {store.path} and {first.path} differ in holding local features")
            if first.has_local and (store.meta["local"]["scales"] != first.meta["local"]["scales"]
                                    or store.meta["local"]["num_channels"] != first.meta["local"]["num_channels"]):
                raise ValueError(f"StoreStack: {store.path} and {first.path} were extracted at different scales or "
                                 "with different networks")
        self.offsets = np.cumsum([0] + [s.num_images for s in self.stores])

    @property
    def num_images(self) -> int:
        return int(self.offsets[-1])

    @property
    def names(self) -> list[str]:
        return [name for store in self.stores for name in store.names]

    @property
    def has_local(self) -> bool:
        return self.stores[0].has_local

    @property
    def key(self) -> str:
        return "+".join(store.key for store in self.stores)

    @property
    def path(self) -> Path:
        """The first store's folder (the dataset's own database)."""
        return self.stores[0].path

    def _split(self, indices: Sequence[int] | None) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
        """``(indices, [(store, positions in indices)])`` for the stores that hold some of them."""
        idx = np.arange(self.num_images) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_images):
            raise IndexError(f"StoreStack: image indices must lie in 0..{self.num_images - 1}")
        owner = np.searchsorted(self.offsets, idx, side="right") - 1
        return idx, [(s, np.nonzero(owner == s)[0]) for s in range(len(self.stores)) if (owner == s).any()]

    def global_descriptors(self, indices: Sequence[int] | None = None) -> torch.Tensor:
        if indices is None:
            return torch.cat([store.global_descriptors() for store in self.stores])
        idx, parts = self._split(indices)
        out = torch.empty(idx.size, self.stores[0].meta["global_dim"])
        for s, pos in parts:
            out[torch.from_numpy(pos)] = self.stores[s].global_descriptors(idx[pos] - self.offsets[s])
        return out

    def feature_counts(self, indices: Sequence[int] | None = None) -> np.ndarray:
        idx, parts = self._split(indices)
        out = np.zeros(idx.size, dtype=np.int64)
        for s, pos in parts:
            out[pos] = self.stores[s].feature_counts(idx[pos] - self.offsets[s])
        return out

    def local_features(self, indices: Sequence[int] | None = None, device: torch.device | str = "cpu",
                       capacity: int | None = None) -> LocalFeatures:
        idx, parts = self._split(indices)
        if capacity is None:
            capacity = int(self.feature_counts(idx).max(initial=0))
        tables, positions = [], []
        for s, pos in parts:
            tables.append(self.stores[s].local_features(idx[pos] - self.offsets[s], device=device, capacity=capacity))
            positions.append(pos)
        if not tables:
            local = self.stores[0].meta["local"]
            return LocalFeatures.from_images([], torch.zeros(0, len(local["scales"]), 2, dtype=torch.long),
                                             local["scales"], local["num_channels"], capacity=capacity, device=device)
        back = torch.from_numpy(np.argsort(np.concatenate(positions), kind="stable")).to(tables[0].device)
        return tables[0]._replace(**{name: torch.cat([getattr(t, name) for t in tables])[back]
                                     for name in LocalFeatures._TENSORS})

    def bytes_per_image(self) -> float:
        total = sum(store.bytes_per_image() * store.num_images for store in self.stores)
        return total / max(self.num_images, 1)
