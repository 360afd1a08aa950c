"""ASMK parameters. The reference library (jenicek/asmk) has no defaults of its own: each value
below is the one of its HOW configuration (``examples/params/_eccv20_how.yml``) or the HOW paper
(Tolias, Jenicek, Chum, ECCV 2020), as noted."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

SEARCH_BACKENDS = ("auto", "native", "torch")


DESCRIPTORS_PER_WORD = 300  # HOW: 65,536 words from ~20M SfM-120k descriptors
MIN_WORDS, MAX_WORDS = 1024, 65536  # best of those measured on small databases (docs, "HOW + ASMK"); HOW's size


@dataclass
class ASMKConfig:
    """Codebook, assignment, kernel and memory settings of the aggregated selective match kernel."""

    # visual words; None: scaled to the training descriptors (words_for): HOW's 64k words (HOW
    # paper 4.1; _eccv20_how.yml: size 65536) come from about 20M SfM-120k descriptors, ~300 each;
    # on databases of hundreds of images 1,024 words beat 4,096 on holidays-811 and roxford5k-19q
    # (docs, "HOW + ASMK")
    codebook_size: int | None = field(default=None, metadata={
        "flag": "--codebook-size", "type": int, "help": "visual words",
        "default_text": "scaled to the training descriptors, the power of two at or below descriptors / 300 within "
                        "[1024, 65536]: HOW's 65,536 for SfM-120k, 1,024 for a database of hundreds of images",
        "source": "1,024 beat 4,096 on holidays-811 and roxford5k-19q, docs 'HOW + ASMK'"})
    kmeans_iterations: int = field(default=10, metadata={
        "flag": "--kmeans-iterations", "help": "k-means iterations",
        "source": "faiss Clustering niter of the reference codebook training"})
    seed: int = 1234  # the reference's faiss k-means seed (our torch k-means: the sampling seed)
    database_assignments: int = 1  # nearest words per database feature (_eccv20_how.yml)
    query_assignments: int = field(default=5, metadata={
        "flag": "--query-assignments", "help": "nearest words per query descriptor, multiple assignment (1: none)",
        "source": "HOW's _eccv20_how.yml"})
    binary: bool = True  # binarised aggregated residuals (HOW paper; ASMK*, Tolias et al. 2013)
    alpha: float = field(default=3.0, metadata={
        "flag": "--asmk-alpha", "help": "selectivity exponent of the match kernel, sigma(s) = s^alpha",
        "source": "HOW's _eccv20_how.yml"})
    tau: float = 0.0  # selectivity threshold: sigma(s) = 0 below it (_eccv20_how.yml)
    memory_budget: int = 1 << 30  # bytes per chunk of assignment, residual, pair and score tensors (ours)
    # kernels/asmk_scores.c is the native kernel
    search_backend: str = field(default="auto", metadata={
        "flag": "--asmk-search", "choices": SEARCH_BACKENDS,
        "help": "inverted-file scoring: 'native', a C kernel on the CPU (built on first use with the system's C "
                "compiler, $CC); 'torch', tensor passes on any device; 'auto', native on the CPU where it builds, "
                "else torch. Same results up to float64 rounding", "source": "ours; the reference loops in Python "
                                                                            "per query and word"})

    def __post_init__(self):
        if self.codebook_size is not None and int(self.codebook_size) < 1:
            raise ValueError(f"ASMKConfig.codebook_size must be >= 1 or None, got {self.codebook_size}")
        for name in ("kmeans_iterations", "database_assignments", "query_assignments"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"ASMKConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"ASMKConfig.alpha must be > 0, got {self.alpha}")
        if not (math.isfinite(self.tau) and -1 <= self.tau < 1):
            raise ValueError(f"ASMKConfig.tau must lie in [-1, 1), got {self.tau}")
        if self.search_backend not in SEARCH_BACKENDS:
            raise ValueError(f"ASMKConfig.search_backend must be one of {SEARCH_BACKENDS}, got {self.search_backend!r}")
        if int(self.memory_budget) < 1 << 16:
            raise ValueError(f"ASMKConfig.memory_budget must be at least 64 KiB, got {self.memory_budget}")

    def words_for(self, num_descriptors: int) -> int:
        """The codebook size for ``num_descriptors`` training descriptors: ``codebook_size`` when
        set, else the power of two at or below ``num_descriptors / 300`` within [1024, 65536]
        (HOW's ratio; 65,536 for SfM-120k's ~20M descriptors, 1,024 for a few hundred images),
        and never more words than descriptors."""
        if self.codebook_size is not None:
            return int(self.codebook_size)
        per_word = num_descriptors / DESCRIPTORS_PER_WORD
        scaled = 2 ** math.floor(math.log2(per_word)) if per_word >= 1 else 1
        return int(max(1, min(max(MIN_WORDS, min(scaled, MAX_WORDS)), num_descriptors)))
