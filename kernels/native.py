"""C kernels for the CPU, compiled on first use with the system's C compiler and loaded through ctypes.

Some inner loops (ASMK's inverted-file scoring: a popcount, a table lookup and a scattered add per
comparison) cost ten or more tensor passes in torch and one pass in C. Their sources sit beside
this module (``kernels/<name>.c``); `load` compiles one with ``$CC`` (default ``cc``)
``-O3 -shared -fPIC`` into a cache folder (``$GPU_DSM_KERNEL_CACHE``, else
``$XDG_CACHE_HOME/gpu_dsm/kernels``, else ``~/.cache/gpu_dsm/kernels``) under a name that hashes
the source, the flags, the compiler's version and the machine, so an edited source or another
compiler builds anew and a stale library is never loaded. The library is written to a temporary
file and renamed into place: concurrent first uses and interrupted builds never leave a partial
library. Where no compiler works, `load` raises `NativeUnavailable` naming the
reason; callers with a torch path fall back to it (``backend="auto"``).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent
_COMPILE_TIMEOUT_S = 300


class NativeUnavailable(RuntimeError):
    """A C kernel could not be built or loaded (no compiler, a failed build, an unloadable library)."""


def cache_dir() -> Path:
    """Where compiled kernels are kept (see the module docstring)."""
    if os.environ.get("GPU_DSM_KERNEL_CACHE"):
        return Path(os.environ["GPU_DSM_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gpu_dsm" / "kernels"


def _flags() -> list[str]:
    # no contraction into fused multiply-adds (clang contracts by default): the kernels reproduce
    # float64 formulas of the plain references operation for operation
    flags = ["-O3", "-std=c99", "-ffp-contract=off", "-shared", "-fPIC"]
    # the hardware popcount where the CPU says it has one (x86 compilers otherwise emit a bit-twiddling loop)
    if platform.machine().lower() in ("x86_64", "amd64"):
        try:
            if " popcnt" in Path("/proc/cpuinfo").read_text():
                flags.append("-mpopcnt")
        except OSError:
            pass
    return flags


def _compiler_version(compiler: str) -> str:
    try:
        done = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeUnavailable(f"no C compiler: {compiler!r} cannot run ({exc}); set CC to one") from None
    if done.returncode != 0:
        raise NativeUnavailable(f"C compiler {compiler!r} --version failed: {done.stderr.strip()[-500:]}")
    return done.stdout.strip().splitlines()[0] if done.stdout.strip() else compiler


def load(name: str) -> ctypes.CDLL:
    """The compiled ``kernels/<name>.c``, built into the cache folder if it is not there yet.

    Raises `NativeUnavailable` (no compiler, the build failed, the library cannot be
    loaded), with the compiler's message. Built or refused once per process.
    """
    built = _build(name)
    if isinstance(built, NativeUnavailable):
        raise built
    return built


@functools.cache
def _build(name: str) -> ctypes.CDLL | NativeUnavailable:
    try:
        return _compile_and_load(name)
    except NativeUnavailable as exc:
        return exc


def _compile_and_load(name: str) -> ctypes.CDLL:
    source = SOURCE_DIR / f"{name}.c"
    if not source.is_file():
        raise NativeUnavailable(f"no C source {source}")
    compiler = os.environ.get("CC", "cc")
    flags = _flags()
    key = hashlib.sha256("\0".join([source.read_text(), *flags, _compiler_version(compiler), platform.machine(),
                                    platform.system()]).encode()).hexdigest()[:16]
    folder = cache_dir()
    library = folder / f"{name}-{key}.so"
    if not library.is_file():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, partial = tempfile.mkstemp(prefix=f".{name}-", suffix=".so", dir=folder)
            os.close(fd)
        except OSError as exc:
            raise NativeUnavailable(f"cannot write compiled kernels to {folder}: {exc}; set GPU_DSM_KERNEL_CACHE") from None
        try:
            done = subprocess.run([compiler, *flags, "-o", partial, str(source), "-lm"], capture_output=True, text=True,
                                  timeout=_COMPILE_TIMEOUT_S)
            if done.returncode != 0:
                raise NativeUnavailable(f"compiling {source.name} failed ({compiler} {' '.join(flags)}): "
                                        f"{done.stderr.strip()[-1000:]}")
            os.replace(partial, library)
        except (OSError, subprocess.SubprocessError) as exc:
            raise NativeUnavailable(f"compiling {source.name} with {compiler!r} failed: {exc}") from None
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
    try:
        return ctypes.CDLL(str(library))
    except OSError as exc:
        raise NativeUnavailable(f"cannot load {library}: {exc}") from None


def available(name: str) -> str | None:
    """``None`` if ``kernels/<name>.c`` builds and loads here, else the reason it does not."""
    try:
        load(name)
    except NativeUnavailable as exc:
        return str(exc)
    return None
