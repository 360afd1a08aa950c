"""Fast spatial matching in C on the CPU (``kernels/fsm.c``), groups split over threads.

`verify_groups` runs the whole per-group search of `gpu_dsm.match` (every
single-correspondence hypothesis scored against the group's correspondences with the scale gate
and each feature counted once, local optimisation of the best, the first best kept) in one pass
of compiled code per group, with the float64 operations of the plain matcher
(`gpu_dsm.reference.match`), so its inlier decisions are that matcher's. Threads take
contiguous ranges of groups of about equal work (``sum of size^2``); the ctypes call releases
the GIL. The C code reads raw memory: group offsets and the query-row order are checked here,
candidate rows by the kernel as it reads them.
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


@functools.cache
def _library() -> ctypes.CDLL:
    lib = native.load(_SOURCE)
    lib.fsm_verify_groups.argtypes = [_I64, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _I64,
                                      _F64, _F64, _F64, _I64, _I64, _I64, _I64, _PTR, _PTR, _PTR]
    lib.fsm_verify_groups.restype = _I64
    return lib


def unavailable() -> str | None:
    """``None`` where the C kernel builds and loads, else why not."""
    return native.available(_SOURCE)


def _pointer(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def _ranges(sizes: torch.Tensor, parts: int) -> list[tuple[int, int]]:
    """Contiguous group ranges of about equal ``sum(size^2)``."""
    groups = sizes.numel()
    if parts <= 1 or groups < 2:
        return [(0, groups)]
    ends = torch.cumsum(sizes.double() ** 2, 0)
    shares = ends[-1] * torch.arange(1, parts, dtype=torch.float64) / parts
    cuts = (torch.searchsorted(ends, shares) + 1).tolist()
    bounds = sorted({0, groups, *(min(max(int(c), 0), groups) for c in cuts)})
    return list(zip(bounds[:-1], bounds[1:]))


def verify_groups(starts: torch.Tensor, xy1: torch.Tensor, xy2: torch.Tensor, frame1: torch.Tensor,
                  frame2: torch.Tensor, qrow: torch.Tensor, crow: torch.Tensor, num_rows: int, *, threshold: float,
                  max_scale_change: float, symmetric: bool, lo_hypotheses: int, lo_factor: float, lo_rounds: int,
                  lo_min_inliers: int, threads: int | None = None,
                  evaluations_per_thread: int = EVALUATIONS_PER_THREAD) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best hypothesis of every group, on the CPU.

    Args:
        starts: ``(G + 1,)`` int64, group ``g`` is rows ``starts[g]:starts[g + 1]``; rows of a
            group sorted by query row.
        xy1, xy2: ``(N, 2)`` query / candidate feature centres of the rows, feature-map pixels.
        frame1, frame2: ``(N, 2, 2)`` their lower-triangular frames.
        qrow, crow: ``(N,)`` int64 query / candidate feature rows (features counted once by
            these); candidate rows in ``[0, num_rows)``.
        threshold: inlier threshold, pixels; max_scale_change: scale gate (>= 1);
        symmetric: symmetric transfer error (else one-way); lo_*: local optimisation
            (`gpu_dsm.match.MatchConfig`).
        threads: at most this many threads (default ``torch.get_num_threads()``), each with at
            least ``evaluations_per_thread`` evaluations.
    Returns:
        ``count (G,)`` int64 (each feature once), ``params (G, 5)`` float64 ``(a, b, c, tx, ty)``
        (NaN where the count is 0) and ``mask (N,)`` bool, the inliers of each group's best.
    """
    n = qrow.numel()
    tensors = {"starts": starts, "xy1": xy1, "xy2": xy2, "frame1": frame1, "frame2": frame2, "qrow": qrow, "crow": crow}
    for name, t in tensors.items():
        if t.device.type != "cpu":
            raise ValueError(f"the C spatial-matching kernel runs on the CPU; {name} is on {t.device}")
    if starts.dtype != torch.int64 or qrow.dtype != torch.int64 or crow.dtype != torch.int64:
        raise ValueError("verify_groups: starts, qrow and crow must be int64")
    if xy1.shape != (n, 2) or xy2.shape != (n, 2) or frame1.shape != (n, 2, 2) or frame2.shape != (n, 2, 2) \
            or crow.shape != (n,) or starts.ndim != 1 or starts.numel() < 1:
        raise ValueError(f"verify_groups: xy1 {tuple(xy1.shape)}, xy2 {tuple(xy2.shape)}, frames {tuple(frame1.shape)} "
                         f"and {tuple(frame2.shape)}, rows {tuple(qrow.shape)} and {tuple(crow.shape)} do not fit together")
    sizes = starts[1:] - starts[:-1]
    if int(starts[0]) != 0 or int(starts[-1]) != n or bool((sizes < 0).any()):
        raise ValueError(f"verify_groups: starts must rise from 0 to the {n} rows")
    num_groups = sizes.numel()
    in_group = torch.ones(n, dtype=torch.bool)
    in_group[starts[:-1][sizes > 0]] = False  # first row of a group: no predecessor to compare with
    if n and bool(((qrow[1:] < qrow[:-1]) & in_group[1:]).any()):
        raise ValueError("verify_groups: the rows of a group must be sorted by query row")
    count = torch.zeros(num_groups, dtype=torch.int64)
    params = torch.full((num_groups, 5), float("nan"), dtype=torch.float64)
    mask = torch.zeros(n, dtype=torch.uint8)
    if num_groups == 0 or n == 0:
        return count, params, mask.bool()
    lib = _library()
    starts = starts.contiguous()
    x1, y1 = (v.contiguous() for v in xy1.double().unbind(1))
    x2, y2 = (v.contiguous() for v in xy2.double().unbind(1))
    corners = torch.tensor([0, 2, 3])  # (p, q, r) of [[p, 0], [q, r]], flattened
    f1 = frame1.reshape(n, 4).index_select(1, corners).double().contiguous()
    f2 = frame2.reshape(n, 4).index_select(1, corners).double().contiguous()
    qrow, crow = qrow.contiguous(), crow.contiguous()
    evaluations = float((sizes.double() ** 2).sum())
    parts = max(1, min(int(threads or torch.get_num_threads()), int(evaluations // max(1, evaluations_per_thread))))
    ranges = _ranges(sizes, parts)
    constants = (_F64(threshold ** 2), _F64((lo_factor * threshold) ** 2), _F64(math.log(max_scale_change) + 1e-12),
                 _I64(int(symmetric)), _I64(lo_hypotheses), _I64(lo_rounds), _I64(lo_min_inliers))

    def run(part: int) -> int:
        begin, end = ranges[part]
        return lib.fsm_verify_groups(_I64(begin), _I64(end), _pointer(starts), _pointer(x1), _pointer(y1), _pointer(x2),
                                     _pointer(y2), _pointer(f1), _pointer(f2), _pointer(qrow), _pointer(crow),
                                     _I64(num_rows), *constants, _pointer(count), _pointer(params), _pointer(mask))

    if len(ranges) == 1:
        status = [run(0)]
    else:
        with ThreadPoolExecutor(len(ranges)) as pool:
            status = list(pool.map(run, range(len(ranges))))
    if any(s < 0 for s in status):
        raise MemoryError("the C spatial-matching kernel could not allocate its scratch memory")
    if sum(status):
        raise ValueError(f"verify_groups: {sum(status)} candidate rows outside 0..{num_rows - 1}")
    return count, params, mask.bool()
