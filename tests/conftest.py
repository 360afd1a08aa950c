"""Shared fixtures. Data tests look for roxford5k-mini in $GPU_DSM_DATA or ../shared/data and
must run (not skip) when CI=true."""
from __future__ import annotations

import importlib
import importlib.util
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from gpu_dsm.eval.datasets import default_data_root

MINI = "roxford5k-mini"
TINY = "tiny"


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = default_data_root()
    if root is None or not (root / MINI / f"gnd_{MINI}.pkl").is_file():
        message = f"{MINI} not found (set GPU_DSM_DATA or place ../shared/data beside the repository)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return root


@pytest.fixture(scope="session")
def mini(data_root):
    from gpu_dsm.eval.datasets import RevisitopDataset

    return RevisitopDataset.load(data_root, MINI)


@pytest.fixture(scope="session")
def lite0():
    from gpu_dsm.backbones import build_backbone

    return build_backbone("efficientnet_lite0")


@pytest.fixture()
def native_kernel(request):
    """For a test parametrised with ``backend="native"``: the C kernels build here (skipped where
    they do not, failed when CI=true, whose machines have a C compiler)."""
    from gpu_dsm.kernels.inverted_file import unavailable

    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("backend", "native") != "native":
        return
    reason = unavailable()
    if reason:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"the C kernels do not build: {reason}")
        pytest.skip(f"the C kernels do not build: {reason}")


def _ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


@pytest.fixture()
def require():
    """``require(module, why)``: ``module`` imported, for a test that needs an optional package
    (faiss, asmk); skipped where it is missing, failed when CI=true (.ci/run installs them)."""

    def load(module: str, why: str):
        try:
            return importlib.import_module(module)
        except ImportError as exc:
            message = f"{module} is not installed ({exc}): {why}"
            if _ci():
                pytest.fail(f"{message}; CI installs it (.ci/run), so its absence is a failure here")
            pytest.skip(message)

    return load


@pytest.fixture()
def asmk_oracle() -> bool:
    """Whether the authors' ``asmk`` package (with faiss) is importable, for tests whose comparison
    with it is one part; when CI=true its absence fails the test (.ci/run installs both)."""
    found = all(importlib.util.find_spec(m) is not None for m in ("asmk", "faiss"))
    if not found and _ci():
        pytest.fail("the asmk package or faiss is not installed; CI installs both (.ci/run), so their absence is a "
                    "failure here")
    return found


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture()
def tiny_root(tmp_path, mini):
    """A revisitop set under ``tmp_path/data``: 2 queries of roxford5k-mini and 8 database images
    (positives and negatives of them), with the official labels re-indexed."""
    root = tmp_path / "data"
    (root / TINY / "jpg").mkdir(parents=True)
    chosen: list[int] = []
    for g in mini.gnd[:2]:
        for key in ("easy", "hard", "junk"):
            chosen += [i for i in g[key][:2] if i not in chosen]
    chosen += [i for i in range(len(mini.imlist)) if i not in chosen][: max(0, 8 - len(chosen))]
    chosen = chosen[:8]
    position = {old: new for new, old in enumerate(chosen)}
    gnd = []
    for g in mini.gnd[:2]:
        gnd.append({"bbx": list(g["bbx"]), **{k: [position[i] for i in g[k] if i in position] for k in ("easy", "hard", "junk")}})
    names = [mini.imlist[i] for i in chosen] + mini.qimlist[:2]
    for name in names:
        shutil.copy(mini.image_path(name), root / TINY / "jpg" / f"{name}.jpg")
    with open(root / TINY / f"gnd_{TINY}.pkl", "wb") as f:
        pickle.dump({"imlist": [mini.imlist[i] for i in chosen], "qimlist": mini.qimlist[:2], "gnd": gnd}, f)
    return root
