"""Fast spatial matching in C on the CPU (``kernels/fsm.c``), pairs split over threads.

`verify_pairs` runs the whole of `gpu_dsm.match.spatial_verify` for each (query,
candidate) pair from the padded feature tables, in one pass of compiled code per pair: the
tentative correspondences of every scale pair (same channel, in (query row, candidate row)
order), every single-correspondence hypothesis scored against its group with the scale gate and
each feature counted once, local optimisation of the best, the first best group kept. It uses the
float64 operations of the plain matcher (`gpu_dsm.reference.match`), so its inlier decisions
are that matcher's. `correspondences` gives the kernel's tentative correspondences
themselves, in the layout of `gpu_dsm.match.tentative_correspondences`.

Where more than one thread is allowed, a first pass counts each pair's ``sum of size^2`` work
(group sizes from per-(channel, scale) counts, no correspondence built) and threads take
contiguous ranges of pairs of about equal work; the ctypes calls release the GIL. The winners'
inlier correspondences come back in buffers the kernel allocates, copied into the padded
``matches`` and freed. The C code reads raw memory: shapes, devices and ``query_index`` are
checked here, scales and channels by the kernel as it reads them (`OutOfRange`).
"""
from __future__ import annotations

import ctypes
import functools
import math
from concurrent.futures import ThreadPoolExecutor

import torch

from gpu_dsm.kernels import native

_SOURCE = "fsm"
# a thread is started for at least this many (hypothesis, correspondence) evaluations (about a
# millisecond of work): below it, starting threads costs more than it saves
EVALUATIONS_PER_THREAD = 1 << 20
_I64, _F64, _PTR = ctypes.c_int64, ctypes.c_double, ctypes.c_void_p


class _Table(ctypes.Structure):
    """``Table`` of kernels/fsm.c: one padded feature table."""

    _fields_ = [("xy", _PTR), ("frame", _PTR), ("channel", _PTR), ("scale", _PTR), ("valid", _PTR),
                ("capacity", _I64), ("is_double", _I64)]


class _Settings(ctypes.Structure):
    """``Settings`` of kernels/fsm.c: the matching parameters."""

    _fields_ = [("th_sq", _F64), ("lo_th_sq", _F64), ("log_limit", _F64), ("symmetric", _I64),
                ("lo_hypotheses", _I64), ("lo_rounds", _I64), ("lo_min_inliers", _I64)]


_PAIRS = [_I64, _I64, ctypes.POINTER(_Table), ctypes.POINTER(_Table), _PTR, _I64, _I64]


@functools.cache
def _library() -> ctypes.CDLL:
    lib = native.load(_SOURCE)
    lib.fsm_count_pairs.argtypes = [*_PAIRS, _PTR, _PTR]
    lib.fsm_correspondences.argtypes = [*_PAIRS, _PTR, _PTR, _PTR, _PTR]
    lib.fsm_verify_pairs.argtypes = [*_PAIRS, ctypes.POINTER(_Settings), _PTR, _PTR, _PTR, _PTR, _PTR,
                                     ctypes.POINTER(_PTR)]
    for fn in (lib.fsm_count_pairs, lib.fsm_correspondences, lib.fsm_verify_pairs):
        fn.restype = _I64
    lib.fsm_take_matches.argtypes = [_I64, _I64, _PTR, _PTR, _I64, _PTR]
    lib.fsm_take_matches.restype = None
    return lib


def unavailable() -> str | None:
    """``None`` where the C kernel builds and loads, else why not."""
    return native.available(_SOURCE)


def _pointer(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def _table(features, name: str) -> tuple[_Table, list[torch.Tensor]]:
    """The C view of a feature table (``xy``, ``frame``, ``channel``, ``scale``, ``valid`` as in
    `gpu_dsm.features.LocalFeatures`) and the tensors it points into (kept alive by the caller)."""
    xy, frame, channel, scale, valid = (getattr(features, k) for k in ("xy", "frame", "channel", "scale", "valid"))
    if any(t.device.type != "cpu" for t in (xy, frame, channel, scale, valid)):
        raise ValueError(f"the C spatial-matching kernel runs on the CPU; the {name} features are on {xy.device}")
    b, n = valid.shape[:2] if valid.ndim == 2 else (-1, -1)
    if xy.shape != (b, n, 2) or frame.shape != (b, n, 2, 2) or channel.shape != (b, n) or scale.shape != (b, n):
        raise ValueError(f"the {name} table's xy {tuple(xy.shape)}, frame {tuple(frame.shape)}, channel "
                         f"{tuple(channel.shape)}, scale {tuple(scale.shape)} and valid {tuple(valid.shape)} do not fit")
    # float32 as stored; any other real dtype read as float64 (exact for float16 and bfloat16 too)
    real = torch.float32 if xy.dtype == frame.dtype == torch.float32 else torch.float64
    kept = [xy.to(real).contiguous(), frame.to(real).contiguous(), channel.long().contiguous(),
            scale.long().contiguous(), valid.bool().contiguous().view(torch.uint8)]
    table = _Table(*(_pointer(t) for t in kept), n, int(real == torch.float64))
    return table, kept


def _ranges(work: torch.Tensor, parts: int) -> list[tuple[int, int]]:
    """Contiguous ranges of pairs of about equal ``work (P,)``."""
    count = work.numel()
    if parts <= 1 or count < 2:
        return [(0, count)]
    ends = torch.cumsum(work, 0)
    shares = ends[-1] * torch.arange(1, parts, dtype=torch.float64) / parts
    cuts = (torch.searchsorted(ends, shares) + 1).tolist()
    bounds = sorted({0, count, *(min(max(int(c), 0), count) for c in cuts)})
    return list(zip(bounds[:-1], bounds[1:]))


class OutOfRange(ValueError):
    """A valid feature row has a scale or a channel outside the ones the kernel was given."""


def _check(status: list[int], num_scales: int, num_channels: int) -> None:
    if any(s < 0 for s in status):
        raise MemoryError("the C spatial-matching kernel could not allocate its scratch memory")
    if sum(status):
        raise OutOfRange(f"{sum(status)} valid feature rows have a scale outside 0..{num_scales - 1} or a channel "
                         f"outside 0..{num_channels - 1}")


class _Pairs:
    """The C views of a batch of pairs, checked."""

    def __init__(self, query, candidates, query_index: torch.Tensor, num_scales: int, num_channels: int):
        self.query, self._q = _table(query, "query")
        self.candidates, self._c = _table(candidates, "candidate")
        num_pairs = self._c[-1].shape[0]
        if query_index.device.type != "cpu" or query_index.shape != (num_pairs,) or query_index.is_floating_point():
            raise ValueError(f"query_index must be ({num_pairs},) integers on the CPU, got {tuple(query_index.shape)} "
                             f"{query_index.dtype} on {query_index.device}")
        self.query_index = query_index.long().contiguous()
        if num_pairs and bool(((self.query_index < 0) | (self.query_index >= self._q[-1].shape[0])).any()):
            raise ValueError("query_index points outside the query table")
        if num_scales < 1 or num_channels < 1:
            raise ValueError(f"num_scales and num_channels must be >= 1, got {num_scales} and {num_channels}")
        self.num_pairs, self.num_scales, self.num_channels = num_pairs, int(num_scales), int(num_channels)
        self.lib = _library()

    def args(self, begin: int, end: int) -> tuple:
        return (_I64(begin), _I64(end), ctypes.byref(self.query), ctypes.byref(self.candidates),
                _pointer(self.query_index), _I64(self.num_scales), _I64(self.num_channels))

    def count(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each pair's correspondences ``(P,)`` int64 and work (``sum of size^2`` over its groups) ``(P,)`` float64."""
        corr = torch.zeros(self.num_pairs, dtype=torch.int64)
        work = torch.zeros(self.num_pairs, dtype=torch.float64)
        _check([self.lib.fsm_count_pairs(*self.args(0, self.num_pairs), _pointer(corr), _pointer(work))],
               self.num_scales, self.num_channels)
        return corr, work

    def ranges(self, threads: int | None, evaluations_per_thread: int) -> list[tuple[int, int]]:
        """Ranges of pairs, one per thread: one range where one thread is allowed (no counting pass),
        else ranges of about equal work, each of at least ``evaluations_per_thread``."""
        allowed = int(threads or torch.get_num_threads())
        if allowed <= 1 or self.num_pairs < 2:
            return [(0, self.num_pairs)]
        work = self.count()[1]
        parts = max(1, min(allowed, int(float(work.sum()) // max(1, evaluations_per_thread))))
        return _ranges(work, parts)


def _run(parts: int, call) -> list:
    """``call(part)`` for each of ``parts`` parts, a thread each."""
    if parts == 1:
        return [call(0)]
    with ThreadPoolExecutor(parts) as pool:
        return list(pool.map(call, range(parts)))


def correspondences(query, candidates, query_index: torch.Tensor, num_scales: int,
                    num_channels: int) -> dict[str, torch.Tensor]:
    """The tentative correspondences the kernel builds: all same-channel (query feature, candidate
    feature) pairs per scale pair, as `gpu_dsm.match.tentative_correspondences` gives them
    (flat ``pair``, ``qrow``, ``crow``, ``group = pair * S^2 + query scale * S + candidate scale``,
    sorted by group then (query row, candidate row)).

    Args:
        query, candidates: ``Q`` and ``P`` images' feature tables (`gpu_dsm.features.LocalFeatures`), on the CPU.
        query_index: ``(P,)`` the query of each candidate.
        num_scales, num_channels: ``S`` and ``C``; every valid row's scale in ``[0, S)``, channel in ``[0, C)``.
    """
    pairs = _Pairs(query, candidates, query_index, num_scales, num_channels)
    corr = pairs.count()[0]
    offsets = torch.cumsum(corr, 0) - corr
    out = {name: torch.empty(int(corr.sum()), dtype=torch.int64) for name in ("group", "qrow", "crow")}
    _check([pairs.lib.fsm_correspondences(*pairs.args(0, pairs.num_pairs), _pointer(offsets),
                                          *(_pointer(out[k]) for k in ("group", "qrow", "crow")))],
           pairs.num_scales, pairs.num_channels)
    out["pair"] = torch.div(out["group"], pairs.num_scales ** 2, rounding_mode="floor")
    return {k: out[k] for k in ("pair", "qrow", "crow", "group")}


def verify_pairs(query, candidates, query_index: torch.Tensor, num_scales: int, num_channels: int, *,
                 threshold: float, max_scale_change: float, symmetric: bool, lo_hypotheses: int, lo_factor: float,
                 lo_rounds: int, lo_min_inliers: int, threads: int | None = None,
                 evaluations_per_thread: int = EVALUATIONS_PER_THREAD) -> dict[str, torch.Tensor]:
    """Spatial verification of every (query, candidate) pair, on the CPU, from the feature tables.

    Args:
        query, candidates, query_index, num_scales, num_channels: as `correspondences`.
        threshold: inlier threshold, pixels; max_scale_change: scale gate (>= 1);
        symmetric: symmetric transfer error (else one-way); lo_*: local optimisation
            (`gpu_dsm.match.MatchConfig`).
        threads: at most this many threads (default ``torch.get_num_threads()``), each with at
            least ``evaluations_per_thread`` evaluations.
    Returns:
        ``inliers (P,)`` int64 (each feature once), ``transform (P, 5)`` float64 ``(a, b, c, tx, ty)``
        (NaN where no inlier), ``scale_pair (P, 2)`` int64 (-1 where no inlier), ``matches (P, M, 2)``
        int64 (the winner's inlier (query row, candidate row) in that order, -1 padding) and
        ``correspondences (P,)`` int64: the fields of `gpu_dsm.match.MatchResult`.
    """
    pairs = _Pairs(query, candidates, query_index, num_scales, num_channels)
    n = pairs.num_pairs
    settings = _Settings(threshold ** 2, (lo_factor * threshold) ** 2, math.log(max_scale_change) + 1e-12,
                         int(symmetric), lo_hypotheses, lo_rounds, lo_min_inliers)
    count = torch.empty(n, dtype=torch.int64)
    params = torch.empty(n, 5, dtype=torch.float64)
    scale_pair = torch.empty(n, 2, dtype=torch.int64)
    corr = torch.empty(n, dtype=torch.int64)
    found = torch.empty(n, dtype=torch.int64)
    ranges = pairs.ranges(threads, evaluations_per_thread)
    buffers = [_PTR() for _ in ranges]

    def verify(part: int) -> int:
        return pairs.lib.fsm_verify_pairs(*pairs.args(*ranges[part]), ctypes.byref(settings), _pointer(count),
                                          _pointer(params), _pointer(scale_pair), _pointer(corr), _pointer(found),
                                          ctypes.byref(buffers[part]))

    try:
        _check(_run(len(ranges), verify), pairs.num_scales, pairs.num_channels)
    except BaseException:
        for (begin, end), buffer in zip(ranges, buffers):  # the kernel's match buffers freed
            pairs.lib.fsm_take_matches(_I64(begin), _I64(end), None, buffer, _I64(0), None)
        raise
    longest = int(found.max()) if n else 0
    matches = torch.full((n, longest, 2), -1, dtype=torch.int64)
    for (begin, end), buffer in zip(ranges, buffers):
        pairs.lib.fsm_take_matches(_I64(begin), _I64(end), _pointer(found), buffer, _I64(longest), _pointer(matches))
    return {"inliers": count, "transform": params, "scale_pair": scale_pair, "matches": matches,
            "correspondences": corr}
