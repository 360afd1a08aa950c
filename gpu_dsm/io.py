"""Files: atomic writes, safe loading, output-path checks, content digests and cache locks.

- Writes are atomic: an interrupted run leaves the old file (or directory) or none, never half
  of one. What they publish takes the user's umask (like ``open``), not the ``0600`` / ``0700``
  of the temporary files they are staged in.
- Nothing we load can run code: ``torch.load`` with ``weights_only=True`` (plus the few numpy
  types retrieval checkpoints hold and the ``defaultdict(list)`` of HOW training checkpoints) and
  a restricted unpickler for revisitop ground truth.
  A weights file that needs more is refused unless the caller trusts it explicitly.
- JSON is strict: NaN and Infinity are written as ``null``.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import pickle
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publishable(path: Path, directory: bool) -> None:
    """Give a staged temporary file/directory the mode a plain ``open``/``mkdir`` would have."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        _publishable(tmp_path, directory=False)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def json_safe(obj: Any) -> Any:
    """``obj`` with NaN/Infinity floats replaced by ``None`` and numpy scalars/arrays made plain."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    return obj


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented strict JSON (NaN/Infinity become ``null``), atomically."""
    text = json.dumps(json_safe(obj), indent=1, sort_keys=False, allow_nan=False)
    return atomic_write(path, lambda p: p.write_text(text + "\n"))


def torch_save(path: str | Path, obj: Any) -> Path:
    """``torch.save`` atomically."""
    return atomic_write(path, lambda p: torch.save(obj, p))


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it replaces ``path`` by renames.

    If the block raises, the temporary directory is removed and ``path`` is untouched. Between
    the two renames that swap an existing directory, neither exists for an instant: a reader
    then sees no store rather than half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_directory(tmp, path)


def publish_directory(staged: str | Path, path: str | Path) -> Path:
    """Put the finished directory ``staged`` (beside ``path``, on its file system) in place of
    ``path`` by renames, with the mode a plain ``mkdir`` would give it. Between the two renames
    that swap an existing directory, neither exists for an instant."""
    staged, path = Path(staged), Path(path)
    _publishable(staged, directory=True)
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(staged, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


def unfinished_directories(path: str | Path) -> list[Path]:
    """Temporary directories [`atomic_directory`][gpu_dsm.io.atomic_directory] left for ``path`` when its process was killed
    before it could clean up (SIGKILL, power loss). Only safe to remove while holding the lock
    that guards writing ``path``."""
    path = Path(path)
    return sorted(p for p in path.parent.glob(f".{path.name}.*.tmp") if p.is_dir())


# --- checks of output paths, before any work ---------------------------------------------------

def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_file(path: str | Path, what: str) -> Path:
    """Raise ``ValueError`` unless ``path`` can be written as a file: it is not a directory and
    its nearest existing ancestor is a writable directory (missing folders are created later)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a directory; give a file name")
    existing = _nearest_existing(path.parent)
    if not existing.is_dir():
        raise ValueError(f"{what} {path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path}: directory {existing} is not writable")
    return path


def check_output_dir(path: str | Path, what: str) -> Path:
    """Raise ``ValueError`` unless ``path`` is (or can be created as) a writable directory."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} exists and is not a directory")
    existing = _nearest_existing(path)
    if not existing.is_dir():
        raise ValueError(f"{what} {path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path}: directory {existing} is not writable")
    return path


# --- content digests ---------------------------------------------------------------------------

def file_digest(path: str | Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file's content (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def stat_digest(paths) -> str:
    """SHA-1 over the names, sizes and modification times of ``paths``: changes when any file is
    replaced or edited in place (a fast check, not a content hash)."""
    digest = hashlib.sha1()
    for p in paths:
        st = os.stat(p)
        digest.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


# --- a lock file, so two runs on one cache do not build the same thing twice ---------------------

class FileLock:
    """Exclusive advisory lock on ``path`` (``fcntl.flock``), as a context manager.

    ``on_wait(path)`` is called once when another process holds it, before blocking. The lock
    file exists only while the lock is held: the holder removes it before releasing it (also
    when its block raises), and a waiter that then acquires the removed file sees that it is no
    longer the one at ``path`` and locks the current one instead, so two holders never coexist.
    Where ``fcntl`` does not exist (Windows) the lock is a no-op.
    """

    def __init__(self, path: str | Path, on_wait: Callable[[Path], None] | None = None):
        self.path = Path(path)
        self.on_wait = on_wait
        self._file = None

    def _is_at_path(self, file) -> bool:
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(file.fileno())
        return (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino)

    def __enter__(self) -> "FileLock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        waited = False
        while True:
            file = open(self.path, "a+")
            try:
                try:
                    fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    if self.on_wait is not None and not waited:
                        self.on_wait(self.path)
                    waited = True
                    fcntl.flock(file.fileno(), fcntl.LOCK_EX)
                if self._is_at_path(file):
                    self._file = file
                    return self
            except BaseException:
                file.close()
                raise
            file.close()  # the previous holder removed this file while we waited: lock the one at path now

    def __exit__(self, *exc) -> bool:
        if self._file is not None:
            import fcntl

            try:
                if self._is_at_path(self._file):  # (never another holder's file, had someone replaced ours)
                    self.path.unlink()  # while still holding it: see the class docstring
            finally:
                fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
                self._file.close()
                self._file = None
        return False


# --- loading without running code ----------------------------------------------------------------

def _numpy_globals() -> list:
    """The numpy types a cnnimageretrieval-pytorch checkpoint pickles (``meta['Lw']`` holds numpy
    arrays), under the names numpy 1.x (``numpy.core``) and 2.x (``numpy._core``) write."""
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray
    out: list = [multiarray._reconstruct, multiarray.scalar, np.ndarray, np.dtype]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out += [(multiarray._reconstruct, f"{module}._reconstruct"), (multiarray.scalar, f"{module}.scalar")]
    out += [type(np.dtype(t)) for t in (np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64,
                                         np.uint8, np.uint16, np.uint32, np.uint64, np.bool_)]
    return out


def _defaultdict_of_lists(default_factory=None) -> dict:
    """What a weights file's ``collections.defaultdict`` is read as: a plain ``dict`` of the same
    items, for a ``defaultdict(list)`` only, which is how gtolias/how's ``train.py`` keeps its
    validation scores (``Validation.scores = defaultdict(list)``, one nested ``defaultdict(list)``
    per validation), saved in every checkpoint it writes. Any other default factory is refused: it
    would be called whenever a missing key is read. (``torch.load(weights_only=True)`` fills only
    ``dict``, ``OrderedDict`` and ``Counter`` with items, and gpu_dsm reads no scores.)"""
    if default_factory is not list:
        name = getattr(default_factory, "__qualname__", repr(default_factory))
        module = getattr(default_factory, "__module__", None)
        raise pickle.UnpicklingError(f"refusing collections.defaultdict({f'{module}.' if module else ''}{name}): only "
                                     "defaultdict(list) is read")
    return {}


def _checkpoint_globals() -> list:
    """What HOW training checkpoints pickle besides tensors, plain data and numpy scalars: their
    scores' ``defaultdict(list)``, built by `_defaultdict_of_lists` (never by the callable
    the pickle names), and ``list``, its default factory."""
    return [(_defaultdict_of_lists, "collections.defaultdict"), list]


def torch_load_weights(path: str | Path, what: str = "weights file", trust: bool = False) -> Any:
    """``torch.load`` on the CPU without executing code from the file.

    Only tensors, plain containers, the numpy arrays retrieval checkpoints carry and the
    ``defaultdict(list)`` of HOW training checkpoints are accepted (``weights_only=True``). A file
    that needs anything else is refused with an error naming what it asks for, unless ``trust``
    (then it is unpickled in full, with a warning: a crafted file can run arbitrary code).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    if trust:
        warnings.warn(f"loading {path} with full unpickling (trusted): a crafted file can run arbitrary code",
                      stacklevel=2)
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise ValueError(f"cannot read {what} {path}: {exc}") from exc
    try:
        with torch.serialization.safe_globals(_numpy_globals() + _checkpoint_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        unsafe = re.search(r"GLOBAL ([\w.]+)", str(exc)) or re.search(r"refusing (collections\.defaultdict\([\w.<>]+\))", str(exc))
        if unsafe is None:
            raise ValueError(f"cannot read {what} {path}: not a torch file, or corrupt ({_torch_reason(exc)})") from None
        raise ValueError(
            f"{what} {path} was not loaded: it holds a {unsafe.group(1)} object, and unpickling it could run code "
            "(only tensors, plain data, numpy arrays and defaultdict(list) are read). If you trust the file, pass "
            "--trust-weights-file (trust_weights_file=True)"
        ) from None
    except Exception as exc:  # torch raises many types for corrupt files
        raise ValueError(f"cannot read {what} {path}: {exc}") from exc


def _torch_reason(exc: Exception) -> str:
    """The specific line of one of torch's long ``weights_only`` messages."""
    boilerplate = ("Weights only load failed", "Check the documentation", "Please file an issue", "In PyTorch", "(1)", "(2)")
    for line in str(exc).splitlines():
        line = line.strip().removeprefix("WeightsUnpickler error:").strip()
        if line and not line.startswith(boilerplate):
            return line
    return type(exc).__name__


def torch_load_checked(path: str | Path, file_format: str, what: str) -> dict:
    """Load a state dict written by [`torch_save`][gpu_dsm.io.torch_save] whose ``"format"`` is ``file_format``;
    errors name ``what`` (e.g. "whitening") and the path. Never runs code from the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot read {what} file {path}: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != file_format:
        raise ValueError(f"{path} is not a gpu_dsm {what} file (expected format {file_format!r})")
    return state


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles builtin containers, numbers, strings and numpy arrays; refuses every other global."""

    _ALLOWED = {
        ("builtins", "list"), ("builtins", "dict"), ("builtins", "set"), ("builtins", "tuple"), ("builtins", "frozenset"),
        ("builtins", "int"), ("builtins", "float"), ("builtins", "str"), ("builtins", "bytes"), ("builtins", "bool"),
        ("builtins", "complex"), ("collections", "OrderedDict"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED or (module == "numpy.dtypes" and name.endswith("DType")):
            if module in ("numpy.core.multiarray", "numpy._core.multiarray"):
                try:
                    from numpy._core import multiarray
                except ImportError:  # numpy 1.x
                    from numpy.core import multiarray
                return getattr(multiarray, name)
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def load_plain_pickle(path: str | Path) -> Any:
    """Unpickle a data file (e.g. revisitop's ``gnd_*.pkl``) that may only hold plain data:
    containers, numbers, strings and numpy arrays. Anything else raises ``pickle.UnpicklingError``
    (a crafted pickle cannot run code)."""
    with open(path, "rb") as f:
        return _PlainUnpickler(io.BytesIO(f.read())).load()
