"""Revisited Oxford/Paris (revisitop) datasets: ``<root>/<name>/gnd_<name>.pkl`` + ``jpg/``.

Works for the official ``roxford5k`` / ``rparis6k`` and for any set in the same format, such
as ``roxford5k-mini``. Queries are cropped to their ``bbx`` as in the protocol.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

from gpu_dsm.images import ImageSpec

#: environment variable naming a data root that holds ``roxford5k-mini/``
DATA_ROOT_ENV = "GPU_DSM_DATA"


@dataclass
class RevisitopDataset:
    """Ground truth and image paths of one revisitop-format dataset.

    ``gnd[q]`` has ``bbx`` (query box ``[x0, y0, x1, y1]``), ``easy``, ``hard``, ``junk``
    (indices into ``imlist``).
    """

    root: Path
    name: str
    imlist: list[str]
    qimlist: list[str]
    gnd: list[dict]

    @classmethod
    def load(cls, data_root: str | Path, name: str) -> "RevisitopDataset":
        data_root = Path(data_root)
        if not data_root.is_dir():
            raise FileNotFoundError(f"data root not found: {data_root}")
        folder = data_root / name
        gnd_path = folder / f"gnd_{name}.pkl"
        if not gnd_path.is_file():
            known = sorted(p.name for p in data_root.iterdir() if (p / f"gnd_{p.name}.pkl").is_file())
            raise FileNotFoundError(f"ground truth file not found: {gnd_path} (datasets under {data_root}: {known or 'none'})")
        try:
            with open(gnd_path, "rb") as f:
                cfg = pickle.load(f)
            imlist, qimlist, gnd = list(cfg["imlist"]), list(cfg["qimlist"]), list(cfg["gnd"])
        except Exception as exc:
            raise ValueError(f"cannot read revisitop ground truth {gnd_path}: {exc}") from exc
        if len(gnd) != len(qimlist):
            raise ValueError(f"{gnd_path}: {len(qimlist)} queries but {len(gnd)} ground-truth entries")
        dataset = cls(root=folder, name=name, imlist=imlist, qimlist=qimlist, gnd=gnd)
        missing = [p for p in dataset.database_paths + dataset.query_paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} images of {name} are missing, first: {missing[0]}")
        return dataset

    def image_path(self, image_name: str) -> Path:
        return self.root / "jpg" / f"{image_name}.jpg"

    @property
    def database_paths(self) -> list[Path]:
        return [self.image_path(n) for n in self.imlist]

    @property
    def query_paths(self) -> list[Path]:
        return [self.image_path(n) for n in self.qimlist]

    def database_specs(self) -> list[ImageSpec]:
        return [ImageSpec(str(p)) for p in self.database_paths]

    def query_specs(self) -> list[ImageSpec]:
        """Queries with their boxes (the protocol crops queries before extraction)."""
        return [ImageSpec(str(p), tuple(float(v) for v in g["bbx"])) for p, g in zip(self.query_paths, self.gnd)]


def default_data_root() -> Path | None:
    """``$GPU_DSM_DATA`` if set, else ``../shared/data`` beside the repository, if present."""
    env = os.environ.get(DATA_ROOT_ENV)
    if env:
        return Path(env)
    candidate = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
    return candidate if candidate.is_dir() else None
