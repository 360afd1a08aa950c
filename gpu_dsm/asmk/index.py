"""The ASMK inverted file as flat tensors, and batched search of many queries at once.

Layout (CSR by visual word): the entries of word ``w`` are rows ``offsets[w]:offsets[w + 1]``
of ``image_ids (E,)`` and ``codes (E, B)`` (packed bits, uint8, or float64 vectors in the
non-binary mode); ``image_words (N,)`` holds ``|C_X|``, the number of words of each database
image. The index is built in one pass of tensor operations (no loop per vector).

Search: the query's word vectors are aggregated with multiple assignment; every (query word,
database entry of that word) pair adds ``sigma(s)`` to a dense ``(queries, N)`` float64 score
block, normalised by ``sqrt(|C_X|) sqrt(|C_Q|)`` (``|C_Q|`` counts the query's distinct words,
also words that no database image has). Score blocks are chunked to ``config.memory_budget``.
The pairs are scored by ``config.search_backend``: on the CPU by a C kernel
(``gpu_dsm.kernels.inverted_file``, one pass per comparison, threads over queries), elsewhere by
tensor passes over a flat pair table (chunked to the budget). A query or an image without words
scores 0.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from gpu_dsm.checks import as_tensor
from gpu_dsm.io import torch_load_checked, torch_save
from gpu_dsm.asmk.codes import (WordVectors, aggregate_residuals, binary_codes, distance_weights, match_weights,
                                normalized_codes)
from gpu_dsm.asmk.config import ASMKConfig
from gpu_dsm.kernels import inverted_file, native
from gpu_dsm.kernels.bits import gather_rows
from gpu_dsm.knn import stable_top

_FORMAT = "gpu_dsm.asmk_index/1"
_TENSORS = ("codebook", "offsets", "image_ids", "codes", "image_words")


def _codes(vectors: WordVectors, binary: bool) -> torch.Tensor:
    return binary_codes(vectors.vector) if binary else normalized_codes(vectors.vector)


@dataclass
class ASMKIndex:
    """An ASMK inverted file over ``num_images`` database images (see the module docstring).

    Fields (all on one device, [`device`][gpu_dsm.asmk.ASMKIndex.device]):
        codebook: ``(K, d)`` floating point visual words.
        offsets: ``(K + 1,)`` int64, the entries of word ``w`` are ``offsets[w]:offsets[w + 1]``.
        image_ids: ``(E,)`` int32 (int64 beyond 2^31 images), database image of every entry.
        codes: ``(E, B)`` uint8 packed bits (``B = ceil(d / 8)``), or ``(E, d)`` float64 vectors
            (``config.binary=False``).
        image_words: ``(N,)`` int64, distinct words of each database image.
        config: the [`ASMKConfig`][gpu_dsm.asmk.ASMKConfig] it was built with.

    Examples:
        Three database images of 20 random 8-D descriptors each, 16 random words; the query holds
        noisy copies of image 1's descriptors:

        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> codebook = torch.randn(16, 8)
        >>> database = torch.randn(60, 8)
        >>> index = ASMKIndex.build(codebook, database, image_ids=torch.arange(60) // 20)
        >>> index.num_images, index.num_words, index.codes.dtype, index.codes.shape[1]
        (3, 16, torch.uint8, 1)
        >>> query = database[20:40] + 0.05 * torch.randn(20, 8)
        >>> scores, indices = index.search(query, torch.zeros(20, dtype=torch.long), k=3)  # one query (id 0)
        >>> indices, scores.dtype
        (tensor([[1, 2, 0]]), torch.float64)
    """

    codebook: torch.Tensor
    offsets: torch.Tensor
    image_ids: torch.Tensor
    codes: torch.Tensor
    image_words: torch.Tensor
    config: ASMKConfig

    def __post_init__(self):
        # the C kernel indexes raw memory with these: they must fit together
        self._check()

    @property
    def num_images(self) -> int:
        """``N``, the database images."""
        return int(self.image_words.numel())

    @property
    def num_words(self) -> int:
        """``K``, the codebook's words."""
        return int(self.codebook.shape[0])

    @property
    def dim(self) -> int:
        """``d``, the descriptors' dimension."""
        return int(self.codebook.shape[1])

    @property
    def device(self) -> torch.device:
        """The device of the index's tensors."""
        return self.codebook.device

    @property
    def num_entries(self) -> int:
        """``E``, the (image, word) entries."""
        return int(self.image_ids.numel())

    def bytes_per_image(self) -> float:
        """Memory of codes + image ids per database image, bytes (the inverted file without the codebook)."""
        total = self.codes.numel() * self.codes.element_size() + self.image_ids.numel() * self.image_ids.element_size()
        return total / max(self.num_images, 1)

    @classmethod
    def build(cls, codebook: torch.Tensor, descriptors: torch.Tensor, image_ids: torch.Tensor,
              config: ASMKConfig | None = None, num_images: int | None = None) -> "ASMKIndex":
        """Index ``descriptors (F, d)`` of database images ``image_ids (F,)`` in ``0..num_images - 1``
        (default: ``max + 1``) against ``codebook (K, d)``, on the descriptors' device.

        ``descriptors`` and ``codebook`` are finite floating point (the codebook is kept in the
        descriptors' dtype), ``image_ids`` integer, all on one device. Field dtypes: the class
        docstring."""
        cfg = config or ASMKConfig()
        x = as_tensor(descriptors, "descriptors", ndim=2, kind="float", finite=True)
        ids = as_tensor(image_ids, "image_ids", ndim=1, kind="int", device=x.device)
        c = as_tensor(codebook, "codebook", ndim=2, kind="float", device=x.device, finite=True)
        n = _num_images(ids, num_images, "num_images")
        vectors = aggregate_residuals(x, ids, c, cfg.database_assignments, cfg.memory_budget)
        # entries sorted by word, then image: one stable sort of the (image, word)-sorted rows
        order = torch.argsort(vectors.word, stable=True)
        words = vectors.word[order]
        offsets = torch.zeros(c.shape[0] + 1, dtype=torch.long, device=x.device)
        offsets[1:] = torch.cumsum(torch.bincount(words, minlength=c.shape[0]), 0)
        codes = _codes(vectors, cfg.binary)[order]
        image_words = torch.bincount(vectors.image, minlength=n)
        # int32 ids (4 bytes per entry) while they fit
        id_dtype = torch.int32 if n < 2 ** 31 else torch.long
        return cls(codebook=c.to(x.dtype), offsets=offsets, image_ids=vectors.image[order].to(id_dtype), codes=codes,
                   image_words=image_words, config=cfg)

    def search(self, query_descriptors: torch.Tensor, query_image_ids: torch.Tensor, k: int | None = None,
               num_queries: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Score every database image for every query.

        Args:
            query_descriptors: ``(Fq, d)`` finite floating point local descriptors of all queries,
                on the index's device.
            query_image_ids: ``(Fq,)`` integer query of each descriptor, in ``0..num_queries - 1``,
                on the index's device.
            k: images returned per query (``None``: all, a full ranking).
            num_queries: ``Q`` (default ``max id + 1``; queries without descriptors score 0).
        Returns:
            ``(scores (Q, k) float64, indices (Q, k) int64)`` on the index's device, best first
            (``k`` capped at ``N``); equal scores keep the database order.
        """
        cfg = self.config
        x = as_tensor(query_descriptors, "query_descriptors", ndim=2, kind="float", device=self.device, finite=True)
        ids = as_tensor(query_image_ids, "query_image_ids", ndim=1, kind="int", device=self.device)
        if x.shape[1] != self.dim:
            raise ValueError(f"query descriptors are {x.shape[1]}-D, the index's codebook {self.dim}-D")
        q = _num_images(ids, num_queries, "num_queries")
        if k is not None and int(k) < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        vectors = aggregate_residuals(x, ids, self.codebook.to(x.dtype), cfg.query_assignments, cfg.memory_budget)
        return self.search_codes(vectors.image, vectors.word, _codes(vectors, cfg.binary), q, k)

    def search_codes(self, query: torch.Tensor, word: torch.Tensor, codes: torch.Tensor, num_queries: int,
                     k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """[`search`][gpu_dsm.asmk.ASMKIndex.search] from the queries' aggregated codes: one row per (query, word) pair,
        sorted by query (``query (E,)`` and ``word (E,)`` int64, ``codes (E, B)`` of the index's
        dtype and width), on the index's device. Returns as [`search`][gpu_dsm.asmk.ASMKIndex.search]."""
        cfg = self.config
        q, n = int(num_queries), self.num_images
        k = n if k is None else min(int(k), n)
        if codes.dtype != self.codes.dtype or codes.shape[1:] != self.codes.shape[1:]:
            raise ValueError(f"query codes {tuple(codes.shape)} {codes.dtype} do not match the index's "
                             f"{tuple(self.codes.shape[1:])} {self.codes.dtype}")
        if query.numel() and bool((query[1:] < query[:-1]).any()):
            raise ValueError("search_codes: rows must be sorted by query")
        # 1 / sqrt(|C_Q|) and 1 / sqrt(|C_X|), 0 for no words (whose scores are 0): applied to the
        # score block in place (no (queries, N) temporaries, whose page faults cost as much as the
        # scoring at 1M images)
        inverse_query = _inverse_sqrt(torch.bincount(query, minlength=q))
        inverse_image = _inverse_sqrt(self.image_words)
        # queries per block: a (block, N) float64 score matrix within the budget
        per_block = max(1, int(cfg.memory_budget) // max(1, 8 * 3 * n))
        out_scores = torch.zeros(q, k, dtype=torch.float64, device=self.device)
        out_index = torch.zeros(q, k, dtype=torch.long, device=self.device)
        # row bounds of every query, read to the host once (not twice per block)
        entry_start = torch.searchsorted(query, torch.arange(q + 1, device=self.device)).tolist()
        for lo in range(0, q, per_block):
            hi = min(q, lo + per_block)
            rows = slice(entry_start[lo], entry_start[hi])
            block = self._score_block(query[rows] - lo, word[rows], codes[rows], hi - lo)
            block.mul_(inverse_image).mul_(inverse_query[lo:hi, None])
            best = stable_top(block, k)
            out_scores[lo:hi], out_index[lo:hi] = block.gather(1, best), best
        return out_scores, out_index

    def search_backend(self) -> str:
        """The inverted-file scoring this index runs (``config.search_backend`` resolved):
        ``"native"`` (the C kernel; CPU, int32 image ids) or ``"torch"``."""
        return choose_search_backend(self.config.search_backend, self.device, self.image_ids.dtype,
                                     inverted_file.unavailable)

    def _score_block(self, query: torch.Tensor, word: torch.Tensor, codes: torch.Tensor, num_queries: int) -> torch.Tensor:
        """Unnormalised ``(num_queries, N)`` sums of ``sigma(s)`` over shared words, from the
        block's query word vectors (``query`` relative to the block)."""
        cfg = self.config
        if self.search_backend() == "native":
            binary = self.codes.dtype == torch.uint8
            weights = distance_weights(self.codes.shape[1], self.dim, cfg.alpha, cfg.tau) if binary else None
            return inverted_file.inverted_file_scores(query, word, codes, self.offsets, self.image_ids, self.codes,
                                                      num_queries, self.num_images, weight_of_distance=weights,
                                                      alpha=cfg.alpha, tau=cfg.tau)
        return self._score_block_torch(query, word, codes, num_queries)

    def _score_block_torch(self, query: torch.Tensor, word: torch.Tensor, codes: torch.Tensor, num_queries: int) -> torch.Tensor:
        """`_score_block` in tensor passes, on any device: one row per (query word,
        database entry) pair, chunked to the memory budget."""
        cfg = self.config
        n = self.num_images
        scores = torch.zeros(num_queries * n, dtype=torch.float64, device=self.device)
        lengths = self.offsets[word + 1] - self.offsets[word]
        # pairs per chunk within the budget: two codes, the similarity and the indices per pair
        pair_bytes = 2 * self.codes.shape[1] * self.codes.element_size() + 8 * 4
        max_pairs = max(1, int(cfg.memory_budget) // pair_bytes)
        # chunk bounds on the host, from one copy of the running pair counts
        ends = torch.cumsum(lengths, 0).cpu()
        begin = 0
        total = int(ends[-1]) if ends.numel() else 0
        done = 0
        while done < total:
            stop = int(torch.searchsorted(ends, torch.tensor(done + max_pairs), right=True))
            stop = max(stop, begin + 1)
            counts = lengths[begin:stop]
            pairs = int(ends[stop - 1]) - done  # known on the host: repeat_interleave need not wait for the device
            entry = torch.repeat_interleave(torch.arange(begin, stop, device=self.device), counts, output_size=pairs)
            first = torch.cumsum(counts, 0) - counts
            within = torch.arange(pairs, device=self.device) - torch.repeat_interleave(first, counts, output_size=pairs)
            position = self.offsets[word[entry]] + within
            weight = match_weights(gather_rows(codes, entry), gather_rows(self.codes, position), self.dim, cfg.alpha, cfg.tau)
            scores.index_add_(0, query[entry] * n + self.image_ids[position].long(), weight)
            done += pairs
            begin = stop
        return scores.view(num_queries, n)

    def state_dict(self) -> dict:
        """The index as plain data: its config and its tensors, copied to the CPU."""
        return {"format": _FORMAT, "config": dataclasses.asdict(self.config),
                **{name: getattr(self, name).cpu() for name in _TENSORS}}

    def save(self, path: str | Path) -> Path:
        """Write the index (atomically: an interrupted save leaves the old file or none)."""
        return torch_save(path, self.state_dict())

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> "ASMKIndex":
        """Read an index written by [`save`][gpu_dsm.asmk.ASMKIndex.save], its tensors on ``device``."""
        state = torch_load_checked(path, _FORMAT, "ASMK index")
        try:
            config = ASMKConfig(**state["config"])
            # on the device before constructing: the structure check runs once, where the index lives
            return cls(**{name: state[name].to(device) for name in _TENSORS}, config=config)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"corrupt ASMK index {path}: {exc}") from None

    def _check(self) -> None:
        e, k, n = self.image_ids.numel(), self.num_words, self.num_images
        bad = (self.offsets.ndim != 1 or self.offsets.numel() != k + 1 or int(self.offsets[0]) != 0
               or int(self.offsets[-1]) != e or self.codes.ndim != 2 or self.codes.shape[0] != e
               or (e and (int(self.image_ids.min()) < 0 or int(self.image_ids.max()) >= n))
               or bool((self.offsets[1:] < self.offsets[:-1]).any()))
        if bad:
            raise ValueError("ASMKIndex: offsets, codes and image ids do not fit together")

    def to(self, device: torch.device | str) -> "ASMKIndex":
        """The same index with every tensor on ``device``."""
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                                            if f.name != "config"})


def choose_search_backend(wanted: str, device: torch.device, id_dtype: torch.dtype, unavailable) -> str:
    """``"native"`` or ``"torch"`` for an index on ``device`` with image ids of ``id_dtype``:
    ``wanted`` (``config.search_backend``) resolved. The C kernel runs on the CPU with int32 ids
    only; ``unavailable()`` says why it does not build (``None`` where it does)."""
    if wanted == "torch":
        return "torch"
    device = torch.device(device)
    fits = device.type == "cpu" and id_dtype == torch.int32
    if wanted == "native":
        if not fits:
            raise ValueError(f"search_backend='native' runs on the CPU with int32 image ids; this index is on "
                             f"{device} with {id_dtype} ids (use 'auto' or 'torch')")
        reason = unavailable()
        if reason:
            raise native.NativeUnavailable(f"search_backend='native': {reason}")
        return "native"
    if not fits:
        return "torch"
    reason = unavailable()
    if reason:
        warnings.warn(f"ASMK search: the C kernel is unavailable ({reason}); scoring with tensor passes, "
                      "10-40x slower on the CPU", RuntimeWarning, stacklevel=3)
        return "torch"
    return "native"


def _inverse_sqrt(counts: torch.Tensor) -> torch.Tensor:
    """``1 / sqrt(counts)`` in float64, 0 where a count is 0."""
    counts = counts.double()
    return torch.where(counts > 0, counts.clamp(min=1).rsqrt(), torch.zeros_like(counts))


def _num_images(ids: torch.Tensor, given: int | None, name: str) -> int:
    if ids.numel() and int(ids.min()) < 0:
        raise ValueError("image ids must be >= 0")
    largest = int(ids.max()) + 1 if ids.numel() else 0
    if given is None:
        return largest
    if int(given) < largest:
        raise ValueError(f"{name}={given} but an image id is {largest - 1}")
    return int(given)
