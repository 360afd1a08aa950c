"""Helpers shared by the benchmark scripts: their common options and honest GPU timings."""
from __future__ import annotations

import argparse

import torch


def benchmark_parser(doc: str) -> argparse.ArgumentParser:
    """Argument parser of a benchmark script: ``doc`` as its description, ``--device``, ``--out``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--out", default=None, help="results JSON (default: none)")
    return parser


def sync(device: torch.device | str) -> None:
    """Wait for queued GPU work, so that a wall-clock interval covers it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def reset_peak_memory(device: torch.device | str) -> None:
    """Start a new peak for :func:`peak_gpu_memory_mb` (no-op off CUDA)."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gpu_memory_mb(device: torch.device | str) -> float | None:
    """Peak CUDA memory allocated since :func:`reset_peak_memory`, in MiB; None off CUDA."""
    if torch.device(device).type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
