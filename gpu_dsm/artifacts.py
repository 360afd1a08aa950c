"""How every cached artifact is made: a key, then load or build under a lock, written atomically.

Stores, kNN graphs, HOW whitenings and features, ASMK codebooks and indices are all files (or
folders) named by a digest of everything they depend on ([`cache_digest`][gpu_dsm.artifacts.cache_digest]). [`cached`][gpu_dsm.artifacts.cached]
returns the one at ``path`` when it is there and readable, and otherwise builds it, saves it
atomically and returns it. A lock file per artifact makes a second run on the same cache wait for
the first and reuse what it wrote; under torchrun (``ranks``) the job is one run, so its ranks take
no lock: rank 0 saves and the other ranks load what it saved.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

from gpu_dsm.io import FileLock
from gpu_dsm.shards import Ranks

T = TypeVar("T")


def cache_digest(obj: Any) -> str:
    """12 hex digits of the SHA-1 of ``obj`` as sorted JSON: the key part of an artifact's name."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def artifact_lock(path: str | Path, what: str, log: Callable[[str], Any] = print, ranks: Ranks | None = None):
    """The lock that guards ``path`` (a no-op under torchrun, whose ranks are one run)."""
    path = Path(path)
    if ranks is not None and ranks.distributed:
        return contextlib.nullcontext()
    return FileLock(path.with_name(f".{path.name}.lock"),
                    on_wait=lambda p: log(f"{what}: waiting for another run using this cache (lock {p})"))


def cached(path: str | Path, load: Callable[[Path], T], build: Callable[[], T], save: Callable[[T, Path], Any],
           what: str, log: Callable[[str], Any] = print, ranks: Ranks | None = None) -> tuple[T, float | None]:
    """``load(path)`` if a readable artifact is there, else ``build()`` saved to ``path``; with the
    seconds building took (``None`` when reused).

    ``load`` raises ``ValueError`` for a corrupt artifact: it is reported and rebuilt. ``save``
    must write atomically ([`gpu_dsm.io.atomic_write`][gpu_dsm.io.atomic_write]). Under torchrun every rank takes the
    same branch (the artifact is only written after a collective step of the build, which needs
    every rank past its check); rank 0 saves, and the others, once it has, load what it saved, so
    all ranks hold the same object. A build that writes ``path`` itself (rank 0's merge of shards;
    ``None`` on the other ranks) is not saved again, and the other ranks keep ``None``.
    """
    ranks = ranks or Ranks()
    path = Path(path)
    with artifact_lock(path, what, log, ranks):
        if path.exists():
            try:
                obj = load(path)
                log(f"{what}: reusing {path}")
                return obj, None
            except ValueError as exc:
                log(f"cache: {exc}; rebuilding it")
        start = time.perf_counter()
        obj = build()
        seconds = time.perf_counter() - start
        if ranks.rank == 0 and not (ranks.distributed and path.exists()):
            save(obj, path)
        if ranks.distributed:
            ranks.barrier()
            if ranks.rank != 0 and obj is not None:
                obj = load(path)
        log(f"{what}: {seconds:.1f} s -> {path}")
        return obj, seconds
