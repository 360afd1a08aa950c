"""The feature store: what extraction writes to disk for a set of images.

A store is a directory, written atomically (see :func:`gpu_dsm.io.atomic_directory`)::

    meta.json      format/version, image names, the options that produced it, array shapes
    global.npy     (N, D) float32 global descriptors, row i = image i

Arrays are ``.npy`` files opened memory-mapped, so a subset of images (a query's top-100) is
gathered without reading the rest.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from numpy.lib.format import open_memmap

from gpu_dsm.io import atomic_directory

STORE_FORMAT = "gpu_dsm.store"
STORE_VERSION = 1


class StoreWriter:
    """Fill a store image by image (in any order), then :meth:`close` to publish it atomically.

    Use as a context manager: if the block raises, nothing is published and an existing store
    at ``path`` is left as it was.
    """

    def __init__(self, path: str | Path, names: Sequence[str], global_dim: int, options: dict[str, Any]):
        self.path = Path(path)
        self.names = list(names)
        self.options = options
        self.global_dim = int(global_dim)
        self._ctx = None
        self._dir: Path | None = None
        self._global = None
        self._written = None

    def __enter__(self) -> "StoreWriter":
        self._ctx = atomic_directory(self.path)
        self._dir = self._ctx.__enter__()
        shape = (len(self.names), self.global_dim)
        self._global = open_memmap(self._dir / "global.npy", mode="w+", dtype=np.float32, shape=shape)
        self._written = np.zeros(len(self.names), dtype=bool)
        return self

    def add_global(self, index: int, descriptor: torch.Tensor) -> None:
        """Row ``index``: a ``(D,)`` descriptor."""
        self._global[index] = descriptor.detach().float().cpu().numpy()
        self._written[index] = True

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
        (self._dir / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                self._finish()
        except BaseException as err:
            self._global = None
            self._ctx.__exit__(type(err), err, err.__traceback__)
            raise
        self._global = None
        self._ctx.__exit__(exc_type, exc, tb)
        return False


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
        self._global = self._array("global.npy", (self.num_images, self.meta["global_dim"]))

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

    def global_descriptors(self, indices: Sequence[int] | None = None) -> torch.Tensor:
        """``(N, D)`` float32 (or the rows ``indices``), on the CPU."""
        rows = self._global if indices is None else self._global[np.asarray(indices, dtype=np.int64)]
        return torch.from_numpy(np.array(rows, dtype=np.float32))

    def bytes_per_image(self) -> float:
        total = sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())
        return total / max(self.num_images, 1)
