"""MSER of many maps in C on the CPU (``kernels/mser.c``), maps split over threads.

`mser_maps` finds the regions `gpu_dsm.mser.mser` finds, VLFeat's (``vl/mser.c``), with
one union-find pass per map over the pixels below the map's top value (activations after a ReLU
are mostly zero: the support is a few percent of the map), and computes the kept regions'
moments with the float64 operations of the tensor path in the same order, so both paths give the
same bits. Threads take contiguous ranges of maps; the ctypes call releases the GIL.
"""
from __future__ import annotations

import ctypes
import functools
from concurrent.futures import ThreadPoolExecutor

import torch

from gpu_dsm.kernels import native

_SOURCE = "mser"
# a thread is started for at least this many pixels (about a millisecond of work)
PIXELS_PER_THREAD = 1 << 18
_I64, _F64, _PTR = ctypes.c_int64, ctypes.c_double, ctypes.c_void_p


@functools.cache
def _library() -> ctypes.CDLL:
    lib = native.load(_SOURCE)
    lib.mser_maps.argtypes = [_I64, _I64, _I64, _I64, _PTR, _PTR, _PTR, _I64, _F64, _F64, _F64, _F64, _I64,
                              _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR]
    lib.mser_maps.restype = _I64
    return lib


def unavailable() -> str | None:
    """``None`` where the C kernel builds and loads, else why not."""
    return native.available(_SOURCE)


def _outputs(capacity: int) -> dict[str, torch.Tensor]:
    long = dict(dtype=torch.long)
    return {"map_index": torch.empty(capacity, **long), "area": torch.empty(capacity, **long),
            "value": torch.empty(capacity, **long), "representative": torch.empty(capacity, **long),
            "seed": torch.empty(capacity, **long), "mean": torch.empty(capacity, 2, dtype=torch.float64),
            "moments": torch.empty(capacity, 3, dtype=torch.float64), "peak": torch.empty(capacity, dtype=torch.float64),
            "total": torch.empty(capacity, dtype=torch.float64), "bbox": torch.empty(capacity, 4, **long)}


def _run(lib, begin: int, end: int, u: torch.Tensor, delta: torch.Tensor, values: torch.Tensor, params: tuple,
         capacity: int) -> tuple[int, dict[str, torch.Tensor]]:
    out = _outputs(capacity)
    names = ("map_index", "area", "value", "representative", "seed", "mean", "moments", "peak", "total", "bbox")
    height, width = u.shape[-2:]
    found = lib.mser_maps(begin, end, height, width, u.data_ptr(), delta.data_ptr(), values.data_ptr(),
                          int(values.dtype == torch.float64), *params, capacity, *(out[n].data_ptr() for n in names))
    if found < 0:
        raise MemoryError(f"mser: the C kernel could not allocate its work space for {height}x{width} maps")
    return int(found), out


def _maps(lib, begin, end, u, delta, values, params) -> dict[str, torch.Tensor]:
    capacity = 64 * (end - begin) + 1024  # real DSM maps keep a few regions each; retried when short
    found, out = _run(lib, begin, end, u, delta, values, params, capacity)
    if found > capacity:
        found, out = _run(lib, begin, end, u, delta, values, params, found)
    return {name: t[:found] for name, t in out.items()}


def mser_maps(u: torch.Tensor, delta: torch.Tensor, values: torch.Tensor, *, max_variation: float,
              min_diversity: float, min_area: float, max_area: float,
              threads: int | None = None, pixels_per_thread: int = PIXELS_PER_THREAD) -> dict[str, torch.Tensor]:
    """VLFeat MSER (dark-on-bright: components of ``{u <= v}``) of every map, kept regions only.

    Args:
        u: ``(M, H, W)`` uint8 CPU tensor, the maps.
        delta: ``(M,)`` int64, VLFeat's ``Delta`` per map (>= 1).
        values: ``(M, H, W)`` float32 or float64 CPU tensor, whose maximum and sum over each region are reported.
        max_variation, min_diversity, min_area, max_area: as `gpu_dsm.mser.mser`.
        threads: at most this many threads (default ``torch.get_num_threads()``), each with at
            least ``pixels_per_thread`` pixels.
    Returns:
        Per kept region, maps in order, within a map in no particular order: ``map_index``,
        ``area``, ``value`` (the grey value of ``u``), ``representative`` (first pixel, ``y * W + x``),
        ``seed`` (first pixel of the region's value, ``x * H + y``), ``bbox (n, 4)`` int64;
        ``mean (n, 2)`` ``(x, y)``, ``moments (n, 3)`` population ``(xx, xy, yy)``, ``peak`` and
        ``total`` of ``values``, float64.
    Raises:
        gpu_dsm.kernels.native.NativeUnavailable: the kernel does not build here.
    """
    if u.dtype != torch.uint8 or u.ndim != 3 or u.device.type != "cpu":
        raise ValueError(f"mser_maps: u must be a (M, H, W) uint8 CPU tensor, got {u.dtype} {tuple(u.shape)} on {u.device}")
    if values.shape != u.shape or values.dtype not in (torch.float32, torch.float64) or values.device.type != "cpu":
        raise ValueError(f"mser_maps: values must be float32/float64 on the CPU shaped like u, got {values.dtype} "
                         f"{tuple(values.shape)}")
    if delta.shape != u.shape[:1]:
        raise ValueError(f"mser_maps: one delta per map, got {tuple(delta.shape)} for {u.shape[0]} maps")
    height, width = u.shape[-2:]
    if height * width >= 2**31 - 1:
        raise ValueError(f"mser_maps: maps of {height}x{width} pixels are too large for the C kernel")
    lib = _library()
    u, values, delta = u.contiguous(), values.contiguous(), delta.to(torch.long).contiguous()
    params = (float(max_variation), float(min_diversity), float(min_area), float(max_area))
    num_maps = u.shape[0]
    threads = max(1, min(threads or torch.get_num_threads(), u.numel() // max(pixels_per_thread, 1), num_maps))
    bounds = [num_maps * i // threads for i in range(threads + 1)]
    ranges = [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    if len(ranges) == 1:
        parts = [_maps(lib, 0, num_maps, u, delta, values, params)]
    else:
        with ThreadPoolExecutor(len(ranges)) as pool:
            parts = list(pool.map(lambda r: _maps(lib, r[0], r[1], u, delta, values, params), ranges))
    if len(parts) == 1:
        return parts[0]
    return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
