"""The feature store: what extraction writes to disk for a set of images.

A store is a directory, published atomically once complete and staged so that an interrupted
write resumes (see [`StoreWriter`][gpu_dsm.store.StoreWriter])::

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

import errno
import functools
import hashlib
import json
import mmap
import os
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from numpy.lib.format import open_memmap

from gpu_dsm.features import LocalFeatures
from gpu_dsm.io import FileLock, atomic_write, publish_directory

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


def _advise_will_need(array: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> None:
    """Ask the kernel to read rows ``starts[i] : starts[i] + counts[i]`` of a memory-mapped array
    ahead (``madvise(MADV_WILLNEED)``, man madvise(2)): the reads of all ranges are then in flight
    at once instead of one page fault after another. Measured on a 13 GB store with a cold page
    cache, 1,000 random images: 5.6-8.2 s without, 0.25-0.31 s with; 7 ms when the pages are
    already resident. A no-op for arrays that are not memory-mapped or where madvise is missing."""
    handle = getattr(array, "_mmap", None)
    if handle is None or not hasattr(handle, "madvise") or not hasattr(mmap, "MADV_WILLNEED"):
        return
    row = array.strides[0]
    lo = int(getattr(array, "offset", 0)) + starts * row
    first = lo - lo % mmap.PAGESIZE
    for start, length in zip(first.tolist(), (lo + counts * row - first).tolist()):
        if length > 0:
            handle.madvise(mmap.MADV_WILLNEED, start, length)
#: rows checked at once when a store is validated (bounds memory for large stores)
_CHECK_ROWS = 1 << 16


def _count_non_finite_rows(array: np.ndarray) -> int:
    """Rows of ``array`` (in memory or memory-mapped, shape ``(N, ...)``) holding a NaN or Inf, read in blocks."""
    bad = 0
    for start in range(0, array.shape[0], _CHECK_ROWS):
        block = np.asarray(array[start:start + _CHECK_ROWS], dtype=np.float32).reshape(min(_CHECK_ROWS, array.shape[0] - start), -1)
        bad += int((~np.isfinite(block)).any(axis=1).sum())
    return bad


def _preallocate(path: Path) -> None:
    """Reserve every block of a file that is then written through a memory map. Storing into a
    page of a sparse file when the disk is full raises SIGBUS (mmap(2)), which kills the process
    without a word; with its blocks reserved, a full disk is an ``OSError`` here instead."""
    if not hasattr(os, "posix_fallocate"):  # (not on macOS or Windows)
        return
    with open(path, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        if size:
            try:
                os.posix_fallocate(f.fileno(), 0, size)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # a file system without it
                    raise


def _naming_the_store(method):
    """Raise an ``OSError`` from ``method`` with the store being written named in its message (a
    full disk's "No space left on device" names no file), keeping its errno and type."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except OSError as exc:
            if str(self.path) in str(exc):  # named already (a nested call)
                raise
            message = (f"{exc.strerror or exc} while writing store {self.path} (staged in {self._dir}: the same "
                       "write resumes from the images committed there)")
            named = OSError(exc.errno, message) if exc.filename is None else OSError(exc.errno, message, exc.filename)
            raise named from exc

    return wrapper


def _channel_dtype(num_channels: int):
    return np.int16 if num_channels <= np.iinfo(np.int16).max else np.int32


class StoreWriter:
    """Fill a store image by image (in any order), then leave the ``with`` block to publish it.

    If the block raises, nothing is published and an existing store at ``path`` is left as it
    was. ``local`` (``{"scales": [...], "num_channels": K}``) enables local features.

    Writes resume. The store is staged in ``.<name>.partial`` beside ``path``; every
    ``chunk_images`` finished images (an image is finished when its global descriptor and, with
    ``local``, its local features are added), or after ``chunk_seconds`` (never more often than
    every ``min_chunk_seconds``), and when the block raises, the finished images are committed:
    their data are flushed to disk, then one record per image is appended to a journal. A later
    writer of the same ``path``, ``names``, ``global_dim``, ``options`` and ``local`` (with
    ``resume``) takes the committed images over: [`missing`][gpu_dsm.store.StoreWriter.missing] lists the images still to add,
    `resumed` counts those kept. A staged write of anything else is discarded. The published
    store does not depend on the order in which images were added or on interruptions (local
    features are laid out in image order), so a resumed write gives the same files as an
    uninterrupted one. A second writer of the same store at the same time is refused. An
    ``OSError`` while writing (a full disk) names the store; the files written through memory maps
    have their blocks reserved when created, so a full disk is that error, never a SIGBUS.

    Tensors given to [`add_global`][gpu_dsm.store.StoreWriter.add_global] and [`add_local`][gpu_dsm.store.StoreWriter.add_local] may be on any device and of any
    real dtype: they are copied to the CPU and stored in the dtypes of the module docstring.

    Examples:
        Two images, 4-D global descriptors, one local feature in the first image:

        >>> import tempfile
        >>> from pathlib import Path
        >>> import torch
        >>> folder = tempfile.TemporaryDirectory()
        >>> path = Path(folder.name) / "store"
        >>> feature = {"xy": torch.tensor([[2.0, 3.0]]), "frame": torch.eye(2)[None], "strength": torch.tensor([5.0]),
        ...            "channel": torch.tensor([7]), "scale": torch.tensor([0])}
        >>> with StoreWriter(path, ["a.jpg", "b.jpg"], global_dim=4, options={"network": "demo"},
        ...                  local={"scales": [1.0], "num_channels": 16}) as writer:
        ...     for i in writer.missing():
        ...         writer.add_global(i, torch.full((4,), 0.5))
        ...         writer.add_local(i, feature if i == 0 else {}, map_sizes=torch.tensor([[10, 12]]))
        >>> store = FeatureStore(path)
        >>> store.names, store.global_descriptors().shape, store.feature_counts()
        (['a.jpg', 'b.jpg'], torch.Size([2, 4]), array([1, 0]))
        >>> features = store.local_features([1, 0])  # LocalFeatures of images 1 and 0, on the CPU
        >>> features.counts, features.xy[1]
        (tensor([0, 1]), tensor([[2., 3.]]))
        >>> folder.cleanup()
    """

    def __init__(self, path: str | Path, names: Sequence[str], global_dim: int, options: dict[str, Any],
                 local: dict[str, Any] | None = None, resume: bool = True, chunk_images: int = 16,
                 chunk_seconds: float = 60.0, min_chunk_seconds: float = 2.0):
        self.path = Path(path)
        self.names = list(names)
        self.options = options
        self.global_dim = int(global_dim)
        self.local = dict(local) if local is not None else None
        self.resume = bool(resume)
        if int(chunk_images) < 1 or not chunk_seconds > 0 or not min_chunk_seconds >= 0:
            raise ValueError(f"StoreWriter: chunk_images must be >= 1, chunk_seconds > 0 and min_chunk_seconds >= 0, got "
                             f"{chunk_images}, {chunk_seconds}, {min_chunk_seconds}")
        self.chunk_images, self.chunk_seconds, self.min_chunk_seconds = int(chunk_images), float(chunk_seconds), float(min_chunk_seconds)
        #: images taken over from an interrupted write of the same store
        self.resumed = 0
        self._dir = self.path.with_name(f".{self.path.name}.partial")
        self._lock = None
        self._global = None
        self._written = None
        self._local_files: dict[str, Any] = {}
        self._local_done = None
        self._start = None
        self._count = None
        self._sizes = None
        self._rows = 0
        self._journal = None
        self._pending: dict[int, None] = {}
        self._last_commit = 0.0

    # --- the staged write ------------------------------------------------------------------------

    def _key(self) -> str:
        """Digest of what the store holds: a staged write is only taken over by the same write."""
        what = {"format": STORE_FORMAT, "version": STORE_VERSION, "names": self.names, "global_dim": self.global_dim,
                "options": self.options, "local": self.local}
        return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()

    def _record_dtype(self) -> np.dtype:
        fields = [("index", "<i8")]
        if self.local is not None:
            fields += [("start", "<i8"), ("count", "<i8"), ("sizes", "<i4", (len(self.local["scales"]), 2))]
        return np.dtype(fields)

    def _row_bytes(self, name: str) -> int:
        dtype, shape = LOCAL_FIELDS[name]
        dtype = self._channel_dtype if name == "channel" else dtype
        return int(np.dtype(dtype).itemsize * int(np.prod(shape, dtype=np.int64)))

    def _state(self) -> None:
        n = len(self.names)
        self._written = np.zeros(n, dtype=bool)
        if self.local is not None:
            self._local_done = np.zeros(n, dtype=bool)
            self._start = np.zeros(n, dtype=np.int64)
            self._count = np.zeros(n, dtype=np.int32)
            self._sizes = np.zeros((n, len(self.local["scales"]), 2), dtype=np.int32)

    def _create(self) -> None:
        self._dir.mkdir(parents=True)
        self._global = open_memmap(self._dir / "global.npy", mode="w+", dtype=np.float32,
                                   shape=(len(self.names), self.global_dim))
        self._global.flush()
        _preallocate(self._dir / "global.npy")
        for name in (LOCAL_FIELDS if self.local is not None else ()):
            (self._dir / f"local_{name}.bin").touch()
        (self._dir / "done.rec").touch()
        self._state()
        self._rows = 0
        atomic_write(self._dir / "journal.json", lambda p: p.write_text(json.dumps({"key": self._key()}) + "\n"))

    def _recover(self) -> bool:
        """Take over the committed images of a staged write of this store; ``False`` when there is
        none that fits (then it is discarded)."""
        try:
            if json.loads((self._dir / "journal.json").read_text()).get("key") != self._key():
                return False
            n = len(self.names)
            self._global = np.load(self._dir / "global.npy", mmap_mode="r+")
            if self._global.shape != (n, self.global_dim) or self._global.dtype != np.float32:
                return False
            dtype = self._record_dtype()
            records_path = self._dir / "done.rec"
            whole = records_path.stat().st_size // dtype.itemsize * dtype.itemsize
            os.truncate(records_path, whole)  # a record cut short by a crash is no record
            records = np.fromfile(records_path, dtype=dtype)
            if records.size and (records["index"].min() < 0 or records["index"].max() >= n):
                return False
            self._state()
            rows = 0
            if self.local is not None:
                ends = records["start"] + records["count"]
                if records.size and (records["start"].min() < 0 or records["count"].min() < 0):
                    return False
                rows = int(ends.max(initial=0))
                for name in LOCAL_FIELDS:
                    raw = self._dir / f"local_{name}.bin"
                    if raw.stat().st_size < rows * self._row_bytes(name):
                        return False
                    os.truncate(raw, rows * self._row_bytes(name))  # rows of uncommitted images go
                for r in records:  # in order: a later record of an image replaces an earlier one
                    i = int(r["index"])
                    self._start[i], self._count[i], self._sizes[i] = r["start"], r["count"], r["sizes"]
                    self._local_done[i] = True
            self._written[records["index"]] = True
            self._rows = rows
            self.resumed = int(self._written.sum())
            return True
        except (OSError, ValueError, KeyError, json.JSONDecodeError):
            return False

    def _open_journal(self) -> None:
        self._journal = open(self._dir / "done.rec", "ab")
        if self.local is not None:
            self._local_files = {name: open(self._dir / f"local_{name}.bin", "ab") for name in LOCAL_FIELDS}

    def _complete(self, index: int) -> bool:
        return bool(self._written[index]) and (self.local is None or bool(self._local_done[index]))

    def _finished(self, index: int) -> None:
        if self._complete(index):
            self._pending[index] = None
            since = time.monotonic() - self._last_commit
            if since >= self.chunk_seconds or (len(self._pending) >= self.chunk_images and since >= self.min_chunk_seconds):
                self.commit()

    @_naming_the_store
    def commit(self) -> None:
        """Make the finished images durable now (the writer also does it by itself)."""
        if not self._pending or self._journal is None:
            return
        self._global.flush()
        for f in self._local_files.values():
            f.flush()
            os.fsync(f.fileno())
        index = np.fromiter(self._pending, dtype=np.int64, count=len(self._pending))
        records = np.zeros(index.size, dtype=self._record_dtype())
        records["index"] = index
        if self.local is not None:
            records["start"], records["count"], records["sizes"] = self._start[index], self._count[index], self._sizes[index]
        self._journal.write(records.tobytes())
        self._journal.flush()
        os.fsync(self._journal.fileno())
        self._pending.clear()
        self._last_commit = time.monotonic()

    def missing(self) -> list[int]:
        """Indices of the images still to add (all of them unless a write was resumed), ascending."""
        if self._written is None:
            raise RuntimeError("StoreWriter.missing() is available inside the with block")
        done = self._written if self.local is None else self._written & self._local_done
        return np.flatnonzero(~done).tolist()

    @_naming_the_store
    def __enter__(self) -> "StoreWriter":
        def busy(lock_path: Path) -> None:
            raise RuntimeError(f"store {self.path} is being written by another process (lock {lock_path})")

        self._lock = FileLock(self._dir.with_name(self._dir.name + ".lock"), on_wait=busy)
        self._lock.__enter__()
        try:
            if self.local is not None:
                self._channel_dtype = _channel_dtype(int(self.local["num_channels"]))
            if self._dir.exists() and not (self.resume and self._recover()):
                self._global = None
                self.resumed = 0
                shutil.rmtree(self._dir)
            if not self._dir.exists():
                self._create()
            self._open_journal()
            self._last_commit = time.monotonic()
        except BaseException:
            self._close()
            raise
        return self

    # --- adding images ---------------------------------------------------------------------------

    @_naming_the_store
    def add_global(self, index: int, descriptor: torch.Tensor) -> None:
        """Row ``index``: a ``(D,)`` finite real descriptor (any device; stored as float32)."""
        row = descriptor.detach().float().cpu().numpy()
        if not np.isfinite(row).all():
            name = self.names[index] if 0 <= index < len(self.names) else index
            raise ValueError(f"store {self.path}: the global descriptor of image {index} ({name}) has "
                             f"{int((~np.isfinite(row)).sum())} NaN/Inf values")
        self._global[index] = row
        self._written[index] = True
        self._finished(index)

    @_naming_the_store
    def add_local(self, index: int, features: dict[str, torch.Tensor], map_sizes: torch.Tensor) -> None:
        """Image ``index``'s features and map sizes.

        Args:
            index: the image's row.
            features: unpadded, as [`LocalFeatures.image`][gpu_dsm.features.LocalFeatures.image] returns: ``xy (n, 2)``,
                ``frame (n, 2, 2)`` (lower-triangular; feature-map pixels), ``strength (n,)``,
                ``channel (n,)``, ``scale (n,)``, any device; an empty dict for no features.
            map_sizes: ``(S, 2)`` integer ``(height, width)`` of the image's map at each scale.
        """
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
        self._finished(index)

    # --- publishing ------------------------------------------------------------------------------

    @_naming_the_store
    def _finish(self) -> None:
        if not self._written.all():
            raise RuntimeError(f"store {self.path}: {int((~self._written).sum())} images were never written")
        if self.local is not None and not self._local_done.all():
            raise RuntimeError(f"store {self.path}: local features of {int((~self._local_done).sum())} images missing")
        self.commit()
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
            for f in self._local_files.values():
                f.close()
            # image order: image i's rows follow image i-1's, whatever order they were added in
            count = self._count.astype(np.int64)
            start = np.cumsum(count) - count
            total = int(count.sum())
            for name, (dtype, shape) in LOCAL_FIELDS.items():
                dtype = self._channel_dtype if name == "channel" else dtype
                raw_path = self._dir / f"local_{name}.bin"
                out = open_memmap(self._dir / f"local_{name}.npy", mode="w+", dtype=dtype, shape=(total, *shape))
                _preallocate(self._dir / f"local_{name}.npy")
                if total:
                    raw = np.memmap(raw_path, dtype=dtype, mode="r", shape=(self._rows, *shape))
                    for a in range(0, len(self.names), _CHECK_ROWS):
                        b = min(a + _CHECK_ROWS, len(self.names))
                        lo, hi, counts = int(start[a]), int(start[b - 1] + count[b - 1]), count[a:b]
                        src = np.repeat(self._start[a:b], counts) + np.arange(hi - lo) - np.repeat(start[a:b] - lo, counts)
                        out[lo:hi] = raw[src]
                    del raw
                out.flush()
                del out
            np.save(self._dir / "local_start.npy", start)
            np.save(self._dir / "local_count.npy", self._count)
            np.save(self._dir / "map_sizes.npy", self._sizes)
            meta["local"] = {
                "num_features": total,
                "scales": [float(s) for s in self.local["scales"]],
                "num_channels": int(self.local["num_channels"]),
            }
        (self._dir / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        self._close_files()
        # the journal goes first: a crash from here on leaves no staged write that claims to resume
        for leftover in ["done.rec", "journal.json", *(f"local_{name}.bin" for name in LOCAL_FIELDS)]:
            (self._dir / leftover).unlink(missing_ok=True)
        publish_directory(self._dir, self.path)

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                self._finish()
            else:
                self._keep()
        except BaseException:
            self._keep()
            raise
        finally:
            self._close()
        return False

    def _keep(self) -> None:
        """After a failure: commit the finished images so that the next write resumes from them."""
        try:
            self.commit()
        except Exception:  # the original error matters more; the journal stays consistent regardless
            pass
        self._close_files(errors=False)

    def _close_files(self, errors: bool = True) -> None:
        """Close the staged files, each one even if another fails (on a full disk, the flush of
        buffered bytes does). The first error is raised when ``errors``; after a failure it is
        not: the bytes of uncommitted images are not needed (a resumed write truncates them)."""
        self._global = None
        files = [*self._local_files.values(), *([self._journal] if self._journal is not None else [])]
        self._journal = None
        first = None
        for f in files:
            try:
                f.close()
            except OSError as exc:
                first = first or exc
        if first is not None and errors:
            raise first

    def _close(self) -> None:
        self._close_files(errors=False)
        if self._lock is not None:
            self._lock.__exit__(None, None, None)
            self._lock = None


class FeatureStore:
    """A store opened for reading (memory-mapped); written by [`StoreWriter`][gpu_dsm.store.StoreWriter] (example there).

    Readers return CPU tensors (float32 descriptors) unless given a ``device``, and numpy arrays
    for counts.
    """

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
        """``N``, the images of the store."""
        return int(self.meta["num_images"])

    @property
    def names(self) -> list[str]:
        """The image names, row order."""
        return list(self.meta["names"])

    @property
    def options(self) -> dict[str, Any]:
        """The options that produced the store (network, image size, scales, ...)."""
        return dict(self.meta["options"])

    @property
    def has_local(self) -> bool:
        """Whether the store holds local features."""
        return self._local is not None

    def _non_finite(self, name: str, rows: np.ndarray) -> None:
        bad = _count_non_finite_rows(rows)
        if bad:
            raise ValueError(f"corrupt feature store {self.path}: {name} has {bad} rows with NaN/Inf values (of "
                             f"{rows.shape[0]} read); delete the store to rebuild it")

    def global_descriptors(self, indices: Sequence[int] | None = None) -> torch.Tensor:
        """``(N, D)`` float32 global descriptors (or ``(n, D)``: the rows ``indices``), on the CPU;
        raises if any row read is not finite."""
        rows = self._global if indices is None else self._global[np.asarray(indices, dtype=np.int64)]
        rows = np.array(rows, dtype=np.float32)
        self._non_finite("global.npy", rows)
        return torch.from_numpy(rows)

    @property
    def key(self) -> str:
        """A name that identifies what the store holds (its folder name: caches key on it)."""
        return self.path.name

    def feature_counts(self, indices: Sequence[int] | None = None) -> np.ndarray:
        """``(n,)`` int64 numpy array: the number of local features of images ``indices`` (all by default)."""
        if self._local is None:
            raise ValueError(f"feature store {self.path} holds no local features (extract with a detector)")
        idx = np.arange(self.num_images) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
        return np.asarray(self._count[idx], dtype=np.int64)

    def local_features(self, indices: Sequence[int] | None = None, device: torch.device | str = "cpu",
                       capacity: int | None = None) -> LocalFeatures:
        """Padded [`LocalFeatures`][gpu_dsm.features.LocalFeatures] of images ``indices`` (all by default, repeats allowed),
        read from the memory map: the images' rows of every array requested from disk at once
        (``madvise``), one gather of them per array, one copy to ``device``. ``capacity``: rows per image (default the largest count read). Coordinates are float32
        feature-map pixels, as the detector wrote them."""
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
        starts = np.asarray(self._start[idx], dtype=np.int64)
        rows = np.repeat(starts, counts) + slot
        for name in LOCAL_FIELDS:
            _advise_will_need(self._local[name], starts, counts)
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
        wholesale ([`local_features`][gpu_dsm.store.FeatureStore.local_features] is the checked reader)."""
        if self._local is None:
            raise ValueError(f"feature store {self.path} holds no local features (extract with a detector)")
        return {**self._local, "start": self._start, "count": self._count, "map_sizes": self._sizes}

    def bytes_per_image(self) -> float:
        """Bytes on disk per image (all files of the store)."""
        total = sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())
        return total / max(self.num_images, 1)


class StoreStack:
    """Several stores read as one database, in order: image ``i`` of the stack is image
    ``i - offset[s]`` of the store ``s`` that holds it (a dataset's database followed by
    distractors). Offers the reading side of [`FeatureStore`][gpu_dsm.store.FeatureStore].
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
        """Images of all stores."""
        return int(self.offsets[-1])

    @property
    def names(self) -> list[str]:
        """The image names of all stores, in stack order."""
        return [name for store in self.stores for name in store.names]

    @property
    def has_local(self) -> bool:
        """Whether the stores hold local features (all or none do)."""
        return self.stores[0].has_local

    @property
    def key(self) -> str:
        """The stores' keys joined by ``+``."""
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
        """As [`FeatureStore.global_descriptors`][gpu_dsm.store.FeatureStore.global_descriptors], over the stack: ``(n, D)`` float32 on the CPU."""
        if indices is None:
            return torch.cat([store.global_descriptors() for store in self.stores])
        idx, parts = self._split(indices)
        out = torch.empty(idx.size, self.stores[0].meta["global_dim"])
        for s, pos in parts:
            out[torch.from_numpy(pos)] = self.stores[s].global_descriptors(idx[pos] - self.offsets[s])
        return out

    def feature_counts(self, indices: Sequence[int] | None = None) -> np.ndarray:
        """As [`FeatureStore.feature_counts`][gpu_dsm.store.FeatureStore.feature_counts], over the stack: ``(n,)`` int64 numpy array."""
        idx, parts = self._split(indices)
        out = np.zeros(idx.size, dtype=np.int64)
        for s, pos in parts:
            out[pos] = self.stores[s].feature_counts(idx[pos] - self.offsets[s])
        return out

    def local_features(self, indices: Sequence[int] | None = None, device: torch.device | str = "cpu",
                       capacity: int | None = None) -> LocalFeatures:
        """As [`FeatureStore.local_features`][gpu_dsm.store.FeatureStore.local_features], over the stack (on ``device``)."""
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
        """Bytes on disk per image, over all stores."""
        total = sum(store.bytes_per_image() * store.num_images for store in self.stores)
        return total / max(self.num_images, 1)
