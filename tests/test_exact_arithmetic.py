"""Results claimed exact do not depend on MKL's code path, the CPU or its vector width.

On the CPU, ``torch.sqrt`` (like exp, log, pow, sin, cos) of a float tensor goes through MKL's
vector math, which is not correctly rounded and whose path depends on the processor, the tensor's
length and MKL's environment variables. The square roots of the reference preset go through
``correctly_rounded_sqrt`` instead; here it is compared with Python's ``math.sqrt`` (the C
library's IEEE square root) and with exact rational arithmetic, and the exactness tests are run
again in subprocesses under MKL's other code paths and every ``ATEN_CPU_CAPABILITY`` this
machine has.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from gpu_dsm.kernels.precision import _sqrt_step, correctly_rounded_sqrt, fused_multiply_add, two_product
from gpu_dsm.reference import detect as ref
from gpu_dsm.authors_selection import cholesky_fails, ellipse_polygons

ROOT = Path(__file__).resolve().parents[1]

#: a value whose float64 root MKL rounds the wrong way on some machines (at index 5 of the
#: reference preset's ellipse vertices of a real region)
KNOWN = 9.920258617401123


def _random_values() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(5000, generator=g, dtype=torch.float64) * 20 + 0.1


def _is_correctly_rounded(x: float, s: float) -> bool:
    """Exact rational test: ``s`` is the double nearest to ``sqrt(x)`` (``x > 0``), i.e. ``x`` lies
    strictly between the squares of the midpoints from ``s`` to its neighbours."""
    up, down = math.nextafter(s, math.inf), math.nextafter(s, 0.0)
    lo, hi = (Fraction(s) + Fraction(down)) / 2, (Fraction(s) + Fraction(up)) / 2
    return lo * lo < Fraction(x) < hi * hi


def _edge_values() -> list[float]:
    """Powers of two and their neighbours, perfect squares and their neighbours, subnormals, the
    largest doubles: where the gap below a double halves or the root is nearly a midpoint."""
    values = [5e-324, 1e-320, 2.0**-1022, math.nextafter(2.0**-1022, 0.0), 2.0**-900, 2.0**1000,
              math.nextafter(2.0**1000, math.inf), 1.7976931348623157e308, KNOWN]
    for e in range(-60, 61, 7):
        p = 2.0**e
        values += [p, math.nextafter(p, 0.0), math.nextafter(p, math.inf), 2 * p * (1 + 2**-52)]
    for k in (3, 12345, 94906265, 2**26 + 1, 2**27 - 1):
        square = float(k * k)
        values += [square, math.nextafter(square, 0.0), math.nextafter(square, math.inf)]
    # the root just below a power of two: s = 2 - ulp, x = s^2 and its neighbours
    s = math.nextafter(2.0, 0.0)
    values += [s * s, math.nextafter(s * s, math.inf), math.nextafter(s * s, 0.0)]
    return values


def test_sqrt_is_correctly_rounded_where_torch_sqrt_may_not_be():
    x = _random_values()
    want = [math.sqrt(v) for v in x.tolist()]
    assert correctly_rounded_sqrt(x).tolist() == want
    for n in (1, 7, 5000):  # MKL's path depends on the tensor's length
        got = correctly_rounded_sqrt(torch.full((n,), KNOWN, dtype=torch.float64))
        assert got.tolist() == [math.sqrt(KNOWN)] * n
    # float32 (and half) roots: the double root rounded once more, which is their correctly rounded root
    x32 = x.float()
    assert correctly_rounded_sqrt(x32).dtype == torch.float32
    assert correctly_rounded_sqrt(x32).tolist() == torch.tensor([math.sqrt(v) for v in x32.tolist()]).tolist()


def test_sqrt_of_the_edges_is_correctly_rounded_by_exact_arithmetic():
    values = _edge_values()
    got = correctly_rounded_sqrt(torch.tensor(values, dtype=torch.float64)).tolist()
    for x, s in zip(values, got):
        assert _is_correctly_rounded(x, s), (x.hex(), s.hex())
        assert s == math.sqrt(x), x.hex()
    special = torch.tensor([0.0, -0.0, -1.0, -5e-324, math.inf, -math.inf, math.nan], dtype=torch.float64)
    out = correctly_rounded_sqrt(special)
    assert out[:2].tolist() == [0.0, 0.0] and torch.signbit(out[:2]).tolist() == [False, True]
    assert torch.isnan(out[[2, 3, 5, 6]]).all() and out[4] == math.inf


def test_each_correction_step_moves_a_wrong_root_one_ulp_towards_the_right_one():
    """Whatever the first approximation's library gets wrong (here: starting one and two ulps off
    on purpose, so the test means something on a machine where torch.sqrt is exact)."""
    x = torch.tensor(_random_values().tolist()[:500] + _edge_values(), dtype=torch.float64)
    x = x[(x >= 2.0**-900) & (x <= 2.0**1000)]  # the range the steps work in (correctly_rounded_sqrt scales into it)
    exact = torch.tensor([math.sqrt(v) for v in x.tolist()], dtype=torch.float64)
    inf = torch.full_like(exact, math.inf)
    zero = torch.zeros_like(exact)
    for toward in (inf, zero):
        one_off = torch.nextafter(exact, toward)
        two_off = torch.nextafter(one_off, toward)
        assert torch.equal(_sqrt_step(x, exact), exact)  # a correct root stays
        assert torch.equal(_sqrt_step(x, one_off), exact)
        assert torch.equal(_sqrt_step(x, two_off), one_off)
        assert torch.equal(_sqrt_step(x, _sqrt_step(x, two_off)), exact)


def test_error_free_product_and_fused_multiply_add():
    g = torch.Generator().manual_seed(1)
    a, b, c = (torch.randn(2000, generator=g, dtype=torch.float64) * 1e3 for _ in range(3))
    p, e = two_product(a, b)
    assert all(Fraction(x) * Fraction(y) == Fraction(pp) + Fraction(ee)
               for x, y, pp, ee in zip(a.tolist(), b.tolist(), p.tolist(), e.tolist()))
    assert fused_multiply_add(a, b, c).tolist() == [float(Fraction(x) * Fraction(y) + Fraction(z))
                                                    for x, y, z in zip(a.tolist(), b.tolist(), c.tolist())]


def test_bad_input_is_named():
    with pytest.raises(TypeError, match="floating point tensor, got torch.int64"):
        correctly_rounded_sqrt(torch.arange(4))
    with pytest.raises(TypeError, match="expected a torch.Tensor, got float"):
        correctly_rounded_sqrt(2.0)
    with pytest.raises(TypeError, match="a must be float64, got torch.float32"):
        two_product(torch.ones(2), torch.ones(2, dtype=torch.float64))


def _moments(n: int = 1500) -> torch.Tensor:
    """Float64 ``(Sxx, Sxy, Syy)`` of positive definite and a few singular covariances, with
    ``Sxx`` values whose roots MKL may round the wrong way (the known one among them)."""
    g = torch.Generator().manual_seed(2)
    sxx = torch.cat([torch.tensor([KNOWN], dtype=torch.float64), _random_values()[: n - 1]])
    syy = torch.rand(n, generator=g, dtype=torch.float64) * 20 + 0.1
    sxy = (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * (sxx * syy).sqrt()
    sxy[::50] = (sxx * syy)[::50].sqrt()  # singular: chol fails or barely passes
    return torch.stack([sxx, sxy, syy], 1)


def test_reference_ellipses_and_cholesky_equal_the_plain_reference():
    """The reference preset's vertices and chol() test against the plain port of the authors' code
    (math.sqrt, exact rational fused multiply-add), on moments whose roots torch.sqrt may get wrong."""
    moments = _moments()
    g = torch.Generator().manual_seed(3)
    mean32 = (torch.rand(len(moments), 2, generator=g) * 40).float()
    x, y = ellipse_polygons(mean32, moments)
    fails = cholesky_fails(moments)
    assert bool(fails.any()) and not bool(fails.all())
    for r in range(len(moments)):
        frame = (float(mean32[r, 0]) + 1.0, float(mean32[r, 1]) + 1.0, *moments[r].tolist())
        assert bool(fails[r]) == (not ref.chol_ok(*frame[2:])), r
        vx, vy = ref.ellipse_vertices(frame)
        assert vx == x[r].tolist() and vy == y[r].tolist(), r


# --- the same tests under MKL's other code paths and every CPU capability of ATen ----------------

#: the exactness tests rerun in each environment: this file's, the reference preset's rounding and
#: fused multiply-add, the float32 ASMK against the float64 loops, and both matcher backends
#: against the plain matcher
RERUN = [
    str(Path(__file__).relative_to(ROOT)),
    "tests/test_detect_reference.py::test_fused_multiply_add_is_rounded_once",
    "tests/test_detect_reference.py::test_matlab_rounding_and_delta",
    "tests/test_precision.py::test_float32_asmk_against_the_float64_loops[0]",
    "tests/test_match_backends.py::test_native_equals_the_plain_matcher_on_many_to_many_tables",
]


def _capabilities() -> list[str]:
    """The ``ATEN_CPU_CAPABILITY`` values this machine runs (each at most its own capability)."""
    top = torch.backends.cpu.get_cpu_capability()
    x86 = ["DEFAULT", "AVX2", "AVX512"]
    return x86[: x86.index(top) + 1] if top in x86 else ["DEFAULT", top]


ENVIRONMENTS = [{"MKL_CBWR": "COMPATIBLE"}, {"MKL_ENABLE_INSTRUCTIONS": "AVX2"}, {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}]
ENVIRONMENTS += [{"ATEN_CPU_CAPABILITY": c.lower()} for c in _capabilities()]


@pytest.mark.parametrize("env", ENVIRONMENTS, ids=lambda e: ",".join(f"{k}={v}" for k, v in e.items()))
def test_under_other_math_library_paths(env):
    environ = {k: v for k, v in os.environ.items() if k not in ("MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")}
    environ.update(env)
    selection = ["-k", "not under_other_math_library_paths and (not many_to_many or cfg0)"]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *RERUN, *selection],
                         cwd=ROOT, env=environ, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]


def test_aten_runs_the_cpu_capability_asked_for():
    """Under ``ATEN_CPU_CAPABILITY`` (as the subprocesses below set it), ATen runs that capability,
    so the tests there exercise its kernels."""
    asked = os.environ.get("ATEN_CPU_CAPABILITY")
    if asked is not None:
        assert torch.backends.cpu.get_cpu_capability() == asked.upper()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_on_cuda_sqrt_is_ieee_and_the_correction_changes_nothing():
    """CUDA's double and single precision sqrt are correctly rounded (CUDA C++ Programming Guide,
    "Mathematical Functions"; PyTorch builds without fast math), as the docs state."""
    x = _random_values()
    want = [math.sqrt(v) for v in x.tolist()]
    assert x.cuda().sqrt().cpu().tolist() == want
    assert correctly_rounded_sqrt(x.cuda()).cpu().tolist() == want
    x32 = x.float()
    assert x32.cuda().sqrt().cpu().tolist() == torch.tensor([math.sqrt(v) for v in x32.tolist()]).tolist()
    moments = _moments(500)
    mean32 = torch.zeros(len(moments), 2)
    for cpu, cuda in zip(ellipse_polygons(mean32, moments), ellipse_polygons(mean32.cuda(), moments.cuda())):
        assert torch.equal(cpu, cuda.cpu())
