"""Helpers shared by the benchmark scripts: their common options and honest GPU timings."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

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
    """Start a new peak for `peak_gpu_memory_mb` (no-op off CUDA)."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gpu_memory_mb(device: torch.device | str) -> float | None:
    """Peak CUDA memory allocated since `reset_peak_memory`, in MiB; None off CUDA."""
    if torch.device(device).type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


# operators that launch no kernel on a GPU: views, allocations, metadata, and the scalar read itself
_NO_KERNEL = frozenset(f"aten::{name}" for name in (
    "empty", "empty_strided", "empty_like", "view", "view_as", "reshape", "_reshape_alias", "_unsafe_view",
    "as_strided", "as_strided_", "expand", "expand_as", "select", "slice", "narrow", "unsqueeze", "squeeze", "t",
    "transpose", "mT", "mH", "permute", "movedim", "diagonal", "detach", "detach_", "alias", "resize_", "flatten",
    "unflatten", "unbind", "split", "split_with_sizes", "chunk", "lift_fresh", "resolve_conj", "resolve_neg", "to",
    "_to_copy", "contiguous", "item", "_local_scalar_dense", "is_nonzero", "result_type", "broadcast_tensors",
    "numpy_T", "set_", "clone"))
# operators whose output size or result needs the device's data on the host: one device->host copy each
_SYNC_OPS = frozenset(f"aten::{name}" for name in (
    "_local_scalar_dense", "nonzero", "_unique", "_unique2", "unique_consecutive", "unique_dim",
    "unique_dim_consecutive", "masked_select", "bincount", "_linalg_check_errors"))
# composite operators whose internal reads are one copy (repeat_interleave without output_size)
_ONE_SYNC = frozenset(("aten::repeat_interleave", "aten::linalg_solve", "aten::linalg_lu_solve"))
_HOST_COPIES = ("tolist", "numpy", "cpu")


@dataclass
class LaunchCount:
    """What one call would cost a GPU: ``launches``, operators that would be kernels, and
    ``host_syncs``, device->host copies the host waits for; ``by_op`` counts both per operator."""

    launches: int
    host_syncs: int
    by_op: dict


def count_launches(fn, *args, **kwargs) -> tuple[LaunchCount, object]:
    """Run ``fn(*args, **kwargs)`` under ``torch.profiler`` (CPU activity) and count its operator
    launches and host syncs from the recorded aten operators; returns ``(LaunchCount, fn's result)``.

    Counted on whatever device the inputs are on, from the operator tree the profiler records
    (pytorch.org/docs/stable/profiler.html): an operator is one launch unless its recorded
    children launch (then they count), and views, allocations and metadata launch nothing
    (``_NO_KERNEL``). A host sync is a scalar read (``aten::_local_scalar_dense``: ``.item()``,
    ``int(t)``, ``if t.any()``), an operator whose output size depends on the data (``nonzero``,
    ``unique``, ``masked_select``, ``bincount``, boolean-mask indexing, ``repeat_interleave``
    without ``output_size``), or a ``.tolist()`` / ``.numpy()`` / ``.cpu()`` call (annotated while
    counting). CPU implementations record a few internal operators that differ from the CUDA ones,
    so the counts are close to, not exactly, what a GPU run launches.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    saved = {name: torch.Tensor.__dict__.get(name) for name in _HOST_COPIES}

    def annotated(name):
        method = getattr(torch.Tensor, name)

        def call(self, *a, **k):
            with record_function(f"host_copy::{name}"):
                return method(self, *a, **k)
        return call

    try:
        for name in _HOST_COPIES:
            setattr(torch.Tensor, name, annotated(name))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = fn(*args, **kwargs)
    finally:
        for name, method in saved.items():
            if method is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, method)
    by_op: dict = {}

    def note(name, key, n, record):
        if record and n:
            by_op.setdefault(name, {"launches": 0, "host_syncs": 0})[key] += n

    def walk(event, record_syncs=True) -> tuple[int, int]:
        """``(launches, host syncs)`` of an event with its children, noted in ``by_op`` (the syncs
        inside a sync unit are the unit's: noted once, under its name)."""
        name = event.name
        unit = name in _SYNC_OPS or name in _ONE_SYNC or name.startswith("host_copy::")
        counts = [walk(child, record_syncs and not unit) for child in event.cpu_children]
        launches, syncs = sum(c[0] for c in counts), sum(c[1] for c in counts)
        if launches == 0 and name.startswith("aten::") and name not in _NO_KERNEL:
            launches = 1
            note(name, "launches", 1, True)
        if unit:
            syncs = min(syncs, 1) if name in _ONE_SYNC else 1
            note(name, "host_syncs", syncs, record_syncs)
        return launches, syncs

    roots = [e for e in prof.events() if e.cpu_parent is None]
    totals = [walk(e) for e in roots]
    by_op = {k: v for k, v in sorted(by_op.items()) if v["launches"] or v["host_syncs"]}
    return LaunchCount(sum(t[0] for t in totals), sum(t[1] for t in totals), by_op), out
