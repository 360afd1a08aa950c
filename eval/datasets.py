"""Revisited Oxford/Paris (revisitop) datasets: ``<root>/<name>/gnd_<name>.pkl`` + ``jpg/``.

Works for the official ``roxford5k`` / ``rparis6k`` and for any set in the same format, such
as ``roxford5k-mini``. Queries are cropped to their ``bbx`` as in the protocol.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpu_dsm.images import ImageSpec
from gpu_dsm.io import load_plain_pickle

#: environment variable naming a data root that holds ``roxford5k-mini/``
DATA_ROOT_ENV = "GPU_DSM_DATA"


@dataclass
class RevisitopDataset:
    """Ground truth and image paths of one revisitop-format dataset.

    ``gnd[q]`` has ``easy``, ``hard``, ``junk`` (indices into ``imlist``) and optionally ``bbx``
    (query box ``[x0, y0, x1, y1]``; without it the whole query image is used). `load`
    validates all of them (see `validate_ground_truth`).
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
            cfg = load_plain_pickle(gnd_path)
            imlist, qimlist, gnd = list(cfg["imlist"]), list(cfg["qimlist"]), list(cfg["gnd"])
        except Exception as exc:
            raise ValueError(f"cannot read revisitop ground truth {gnd_path}: {exc}") from exc
        validate_ground_truth(gnd, imlist, qimlist, gnd_path)
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
        return [ImageSpec(str(p), tuple(float(v) for v in g["bbx"]) if g.get("bbx") is not None else None)
                for p, g in zip(self.query_paths, self.gnd)]


GROUND_TRUTH_KEYS = ("easy", "hard", "junk")


def validate_ground_truth(gnd: list, imlist: list[str], qimlist: list[str], path: str | Path = "ground truth") -> None:
    """Raise ``ValueError`` naming the query unless every entry of ``gnd`` has ``easy``, ``hard``
    and ``junk`` lists of integer indices in ``0..len(imlist) - 1`` and, if present, a box of
    four finite numbers with ``x0 < x1``, ``y0 < y1``."""
    n = len(imlist)
    if len(gnd) != len(qimlist):
        raise ValueError(f"{path}: {len(qimlist)} queries but {len(gnd)} ground-truth entries")
    for q, entry in enumerate(gnd):
        who = f"{path}: query {q} ({qimlist[q]})"
        if not isinstance(entry, dict):
            raise ValueError(f"{who}: ground-truth entry is a {type(entry).__name__}, expected a dict")
        missing = [k for k in GROUND_TRUTH_KEYS if k not in entry]
        if missing:
            raise ValueError(f"{who}: ground truth has no {', '.join(repr(k) for k in missing)} list")
        for key in GROUND_TRUTH_KEYS:
            values = np.asarray(entry[key]).reshape(-1)
            if values.size and values.dtype.kind not in "iu":
                if values.dtype.kind != "f" or not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
                    raise ValueError(f"{who}: {key!r} must hold integer image indices, got {values[:5].tolist()}")
            bad = values[(values < 0) | (values >= n)]
            if bad.size:
                raise ValueError(f"{who}: {key!r} holds indices outside 0..{n - 1} (the database has {n} images): "
                                 f"{bad[:5].tolist()}")
        box = entry.get("bbx")
        if box is not None:
            coords = np.asarray(box, dtype=np.float64).reshape(-1) if _numeric(box) else None
            if coords is None or coords.size != 4 or not all(math.isfinite(v) for v in coords) \
                    or coords[2] <= coords[0] or coords[3] <= coords[1]:
                raise ValueError(f"{who}: 'bbx' must be [x0, y0, x1, y1] with x0 < x1 and y0 < y1, got {box!r}")


def _numeric(value) -> bool:
    try:
        np.asarray(value, dtype=np.float64)
        return True
    except (TypeError, ValueError):
        return False


def default_data_root() -> Path | None:
    """``$GPU_DSM_DATA`` if set, else ``../shared/data`` beside the repository, if present."""
    env = os.environ.get(DATA_ROOT_ENV)
    if env:
        return Path(env)
    candidate = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
    return candidate if candidate.is_dir() else None


#: image-list files a distractor folder may hold, looked for in this order (``revisitop1m.txt`` is
#: the list that comes with the R1M distractors)
DISTRACTOR_LISTS = ("imlist.txt", "revisitop1m.txt")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")


@dataclass
class DistractorSet:
    """Negatives appended to a database: ``<folder>/jpg/`` and a list of their names.

    The list is ``imlist.txt`` (or ``revisitop1m.txt``, or the one ``*.txt`` file of the folder):
    one image per line, relative to ``jpg/``, with or without its extension (``.jpg`` is added
    when it has none) and with or without a leading ``jpg/``. Distractors are negatives for every
    query and never queries.
    """

    root: Path
    names: list[str]
    list_file: Path

    @classmethod
    def load(cls, folder: str | Path) -> "DistractorSet":
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"--distractors: folder not found: {folder}")
        lists = [folder / name for name in DISTRACTOR_LISTS if (folder / name).is_file()]
        if not lists:
            lists = sorted(folder.glob("*.txt"))
            if len(lists) != 1:
                raise FileNotFoundError(f"--distractors {folder}: no image list (expected one of "
                                        f"{', '.join(DISTRACTOR_LISTS)} or a single *.txt file, found {len(lists)})")
        list_file = lists[0]
        try:
            lines = list_file.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"--distractors: cannot read {list_file}: {exc}") from None
        names = [line.strip() for line in lines if line.strip()]
        names = [n[len("jpg/"):] if n.startswith("jpg/") else n for n in names]
        if not names:
            raise ValueError(f"--distractors: {list_file} lists no images")
        seen: set[str] = set()
        for name in names:
            if name in seen:
                raise ValueError(f"--distractors: {list_file} lists {name!r} twice")
            seen.add(name)
        distractors = cls(root=folder, names=names, list_file=list_file)
        missing = [p for p in distractors.paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"--distractors: {len(missing)} of the {len(names)} images listed in {list_file} "
                                    f"are missing, first: {missing[0]}")
        return distractors

    def image_path(self, name: str) -> Path:
        return self.root / "jpg" / (name if name.endswith(_IMAGE_SUFFIXES) else f"{name}.jpg")

    @property
    def paths(self) -> list[Path]:
        return [self.image_path(n) for n in self.names]

    def specs(self) -> list[ImageSpec]:
        return [ImageSpec(str(p)) for p in self.paths]
