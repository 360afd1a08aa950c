"""Shared fixtures. Data tests look for roxford5k-mini in $GPU_DSM_DATA or ../shared/data and
must run (not skip) when CI=true."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from gpu_dsm.eval.datasets import default_data_root

MINI = "roxford5k-mini"


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


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
