"""ASMK inverted-file scoring in C on the CPU (``kernels/asmk_scores.c``), rows split over threads.

`inverted_file_scores` adds, for every query row ``(query, word, code)`` and every database
entry of that word, ``sigma(similarity)`` into a dense ``(Q, N)`` float64 score block: the same
sums as the tensor path of `gpu_dsm.asmk.ASMKIndex` (which runs on any device), in one
pass per comparison instead of a dozen tensor passes. Threads share the work by comparisons:
with at least as many queries as threads each thread owns whole queries and writes its score
rows directly; with fewer, each thread sums its rows into a block of its own and the blocks are
added. The C code indexes raw memory: queries and words are range-checked here, offsets and image
ids by the kernel as it reads them (a bad one is skipped, counted, and reported as an error).
"""
from __future__ import annotations

import ctypes
import functools
from concurrent.futures import ThreadPoolExecutor

import torch

from gpu_dsm.kernels import native

_SOURCE = "asmk_scores"
# a thread is started for at least this many comparisons (~6 ms of work): below it, starting
# threads and competing with torch's spinning OpenMP workers costs more than it saves
COMPARISONS_PER_THREAD = 1 << 21
_I64, _F64, _PTR = ctypes.c_int64, ctypes.c_double, ctypes.c_void_p


@functools.cache
def _library() -> ctypes.CDLL:
    lib = native.load(_SOURCE)
    common = [_I64, _I64, _PTR, _PTR, _PTR, _I64, _PTR, _I64, _PTR, _PTR]
    lib.asmk_scores_binary.argtypes = [*common, _PTR, _I64, _PTR]
    lib.asmk_scores_real.argtypes = [*common, _F64, _F64, _I64, _PTR]
    lib.asmk_scores_binary.restype = lib.asmk_scores_real.restype = _I64
    return lib


def unavailable() -> str | None:
    """``None`` where the C kernel builds and loads, else why not."""
    return native.available(_SOURCE)


def _pointer(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def _ranges(query: torch.Tensor, lengths: torch.Tensor, num_queries: int, parts: int) -> tuple[list[tuple[int, int]], bool]:
    """Row ranges of about equal comparisons, and whether they hold whole queries."""
    rows = query.numel()
    if parts <= 1 or rows < 2:
        return [(0, rows)], True
    whole_queries = num_queries >= parts
    if whole_queries:
        per_query = torch.zeros(num_queries, dtype=torch.float64).index_add_(0, query, lengths.double())
        prefix = torch.cat([per_query.new_zeros(1), torch.cumsum(per_query, 0)])  # work of queries < b
        shares = prefix[-1] * torch.arange(1, parts, dtype=torch.float64) / parts
        # the query boundary nearest each share: before or after the query that reaches it
        reaching = torch.searchsorted(prefix[1:], shares).clamp(max=num_queries - 1)
        closer_before = shares - prefix[reaching] <= prefix[reaching + 1] - shares
        boundary = torch.where(closer_before, reaching, reaching + 1)
        cuts = torch.searchsorted(query, boundary).tolist()
    else:
        ends = torch.cumsum(lengths.double(), 0)
        shares = ends[-1] * torch.arange(1, parts, dtype=torch.float64) / parts
        cuts = (torch.searchsorted(ends, shares) + 1).tolist()
    bounds = sorted({0, rows, *(min(max(int(c), 0), rows) for c in cuts)})
    return list(zip(bounds[:-1], bounds[1:])), whole_queries


def inverted_file_scores(query: torch.Tensor, word: torch.Tensor, codes: torch.Tensor, offsets: torch.Tensor,
                         image_ids: torch.Tensor, db_codes: torch.Tensor, num_queries: int, num_images: int, *,
                         weight_of_distance: torch.Tensor | None = None, alpha: float = 3.0, tau: float = 0.0,
                         threads: int | None = None, comparisons_per_thread: int = COMPARISONS_PER_THREAD) -> torch.Tensor:
    """Unnormalised ASMK scores of ``num_queries`` queries against ``num_images`` database images.

    All tensors are on the CPU (the kernel reads their memory) and are made contiguous here.

    Args:
        query: ``(R,)`` int64 query (``0..num_queries - 1``) of every row, sorted;
            word: ``(R,)`` int64 its visual word (``0..K - 1``).
        codes: ``(R, B)`` the rows' codes: packed bits (uint8, ``B`` bytes) or real vectors
            (float64, ``B`` dimensions).
        offsets: ``(K + 1,)`` int64, entries of word ``w`` are ``offsets[w]:offsets[w + 1]``.
        image_ids: ``(E,)`` int32 database image (``0..num_images - 1``) of every entry;
            db_codes: ``(E, B)`` of the dtype of ``codes``.
        num_queries, num_images: the size of the score block.
        weight_of_distance: packed bits: ``(8 B + 1,)`` float64, ``sigma`` of each Hamming
            distance ``0..8 B`` (bits).
        alpha, tau: real codes: ``sigma(s) = sign(s) |s|^alpha`` where the cosine similarity
            ``s >= tau``.
        threads: at most this many threads (default ``torch.get_num_threads()``), each with at
            least ``comparisons_per_thread`` comparisons.
    Returns:
        ``(num_queries, num_images)`` float64 on the CPU: for each pair, the sum of ``sigma`` over
        the pairs of rows and entries that share a word.
    """
    binary = codes.dtype == torch.uint8
    tensors = {"query": query, "word": word, "codes": codes, "offsets": offsets, "image_ids": image_ids,
               "db_codes": db_codes}
    for name, t in tensors.items():
        if t.device.type != "cpu":
            raise ValueError(f"the C inverted-file kernel runs on the CPU; {name} is on {t.device}")
    want = {"query": torch.int64, "word": torch.int64, "offsets": torch.int64, "image_ids": torch.int32,
            "codes": torch.uint8 if binary else torch.float64, "db_codes": torch.uint8 if binary else torch.float64}
    for name, dtype in want.items():
        if tensors[name].dtype != dtype:
            raise ValueError(f"the C inverted-file kernel needs {name} as {dtype}, got {tensors[name].dtype}")
    rows, entries, words = query.numel(), image_ids.numel(), offsets.numel() - 1
    if codes.ndim != 2 or db_codes.ndim != 2 or codes.shape[1] != db_codes.shape[1] or db_codes.shape[0] != entries \
            or word.shape != (rows,) or codes.shape[0] != rows:
        raise ValueError(f"inverted_file_scores: codes {tuple(codes.shape)}, word {tuple(word.shape)}, db_codes "
                         f"{tuple(db_codes.shape)} and image_ids {tuple(image_ids.shape)} do not fit together")
    if rows and (int(query.min()) < 0 or int(query.max()) >= num_queries or int(word.min()) < 0
                 or int(word.max()) >= words or bool((query[1:] < query[:-1]).any())):
        raise ValueError("inverted_file_scores: rows must be sorted by query, with queries in range and known words")
    if binary and (weight_of_distance is None or weight_of_distance.dtype != torch.float64
                   or weight_of_distance.numel() != 8 * codes.shape[1] + 1):
        raise ValueError(f"packed codes need weight_of_distance, {8 * codes.shape[1] + 1} float64 values")
    scores = torch.zeros(num_queries, num_images, dtype=torch.float64)
    if rows == 0 or entries == 0 or num_images == 0:
        return scores
    lib = _library()
    query, word, codes = query.contiguous(), word.contiguous(), codes.contiguous()
    offsets, image_ids, db_codes = offsets.contiguous(), image_ids.contiguous(), db_codes.contiguous()
    width = codes.shape[1]
    lengths = offsets[word + 1] - offsets[word]
    comparisons = int(lengths.sum())
    parts = max(1, min(int(threads or torch.get_num_threads()), comparisons // max(1, int(comparisons_per_thread))))
    ranges, whole_queries = _ranges(query, lengths, num_queries, parts)
    outputs = [scores] * len(ranges) if whole_queries else [scores] + [torch.zeros_like(scores) for _ in ranges[1:]]
    if binary:
        table = weight_of_distance.contiguous()
        tail = lambda out: (_pointer(table), _I64(num_images), _pointer(out))  # noqa: E731
        kernel = lib.asmk_scores_binary
    else:
        tail = lambda out: (_F64(alpha), _F64(tau), _I64(num_images), _pointer(out))  # noqa: E731
        kernel = lib.asmk_scores_real

    def run(part: int) -> int:
        begin, end = ranges[part]
        return kernel(_I64(begin), _I64(end), _pointer(query), _pointer(word), _pointer(codes), _I64(width),
                      _pointer(offsets), _I64(entries), _pointer(image_ids), _pointer(db_codes), *tail(outputs[part]))

    if len(ranges) == 1:
        skipped = run(0)
    else:
        with ThreadPoolExecutor(len(ranges)) as pool:
            skipped = sum(pool.map(run, range(len(ranges))))
    if skipped:
        raise ValueError(f"inverted_file_scores: {skipped} rows or entries point outside the inverted file (offsets "
                         f"beyond its {entries} entries, or image ids outside 0..{num_images - 1})")
    for extra in outputs[1:] if not whole_queries else ():
        scores += extra
    return scores
