"""A folder of one's own photos: index it, then search it with a query photo (``gpu-dsm index`` /
``gpu-dsm search``, or these functions from a script).

[`index_folder`][gpu_dsm.photos.index_folder] describes every image of a folder (its sub-folders included; files named
``.jpg``, ``.jpeg``, ``.png``, ``.bmp``, ``.tif``, ``.tiff``, ``.webp``, ``.ppm``, ``.pgm``; other
files are left alone) with a named network and writes the saved retrieval of
[`gpu_dsm.pipeline.DSMRetrieval.save`][gpu_dsm.pipeline.DSMRetrieval.save]. The descriptions go first into a feature store beside
the output (``.<name>.store``), which an interrupted run resumes ([`gpu_dsm.store.StoreWriter`][gpu_dsm.store.StoreWriter]).
[`search_folder_index`][gpu_dsm.photos.search_folder_index] ranks the indexed photos for one query photo (or a box of it) by the
method saved with the index and returns each result's path, similarity and inliers.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from gpu_dsm.backbones import build_backbone
from gpu_dsm.configs import config_to_json
from gpu_dsm.images import ImageSpec
from gpu_dsm.io import check_output_dir
from gpu_dsm.pipeline import DSMRetrieval, RetrievalConfig
from gpu_dsm.saved import backbone_fingerprint, read_meta, saved_config
from gpu_dsm.store import FeatureStore

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def check_image(path: str | Path, what: str = "image") -> Path:
    """``path`` when it is a readable image file (its header is read, not its pixels), else
    ``FileNotFoundError`` / ``ValueError`` naming it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    if not path.is_file():
        raise ValueError(f"{what} {path} is not a file")
    try:
        with Image.open(path) as image:
            image.size
    except Exception as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ValueError(f"{what} {path} is not an image ({reason})") from None
    return path


def find_images(folder: str | Path) -> list[Path]:
    """The image files under ``folder`` (by suffix, case-insensitive, sub-folders included), in
    sorted order, each checked by [`check_image`][gpu_dsm.photos.check_image]. A missing folder, or one without images,
    raises."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"folder not found: {folder}")
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                    and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not images:
        raise ValueError(f"no images in {folder} (looked for {', '.join(IMAGE_SUFFIXES)})")
    for path in images:
        check_image(path)
    return images


def index_folder(folder: str | Path, out: str | Path, backbone: str = "efficientnet_lite0", weights: str = "default",
                 config: RetrievalConfig | None = None, device: str | torch.device = "cpu", upsample: bool = False,
                 log: Callable[[str], Any] = print) -> Path:
    """Index the images of ``folder`` into the saved retrieval ``out`` (module docstring).

    Args:
        folder: the photos ([`find_images`][gpu_dsm.photos.find_images]); the index names them by absolute path.
        out: the saved retrieval's folder (replaced atomically when it exists).
        backbone, weights, upsample: the network, as `gpu_dsm.backbones.build_backbone`
            ([`search_folder_index`][gpu_dsm.photos.search_folder_index] rebuilds it from them).
        config: the method (default [`RetrievalConfig`][gpu_dsm.pipeline.RetrievalConfig]'s defaults: global ranking and DSM
            re-ranking); ``config.extract.progress`` shows progress.
        device: where the network runs.
        log: where messages go.
    Returns:
        ``out``.
    """
    images = find_images(folder)
    out = check_output_dir(out, "--out")
    config = config or RetrievalConfig()
    retrieval = DSMRetrieval(build_backbone(backbone, weights, upsample=upsample).to(device), config)
    names = [str(path.resolve()) for path in images]
    staging = out.with_name(f".{out.name}.store")
    # what the descriptions depend on: a staged write of other settings is not resumed
    options = {"backbone": backbone_fingerprint(retrieval.backbone),
               "config": config_to_json(dataclasses.replace(config, extract=dataclasses.replace(config.extract, progress=False)))}
    log(f"index: {len(images)} images in {folder}")
    store = _finished(staging, names, options)
    if store is None:
        store = retrieval.write_store(names, staging, names, options, desc="index", log=log)
    else:
        log(f"index: reusing the finished descriptions in {staging}")
    network = {"name": backbone, "weights": str(weights), "upsample": bool(upsample)}
    retrieval.save(out, retrieval.index(FeatureStore(store.path)), network=network)
    shutil.rmtree(staging, ignore_errors=True)
    log(f"index: {len(images)} images -> {out}")
    return out


def _finished(path: Path, names: list[str], options: dict[str, Any]) -> FeatureStore | None:
    """The store at ``path`` when a previous run finished it for these images and settings (and
    stopped before the index was saved), else ``None``."""
    try:
        store = FeatureStore(path)
    except (OSError, ValueError):
        return None
    same = store.names == names and store.options == json.loads(json.dumps(options))
    return store if same else None


def load_folder_index(index: str | Path, device: str | torch.device = "cpu", progress: bool = False):
    """``(retrieval, index)`` of a saved retrieval whose network was built by name
    ([`index_folder`][gpu_dsm.photos.index_folder]), rebuilt from the name and weights it records."""
    index = Path(index)
    meta = read_meta(index)
    network = meta.get("network")
    if network is None:
        raise ValueError(f"{index} does not say how to rebuild its network (it was saved without network=); load it "
                         "with DSMRetrieval.load(folder, backbone)")
    net = build_backbone(network["name"], network["weights"], upsample=network["upsample"]).to(device)
    saved = saved_config(meta, RetrievalConfig, index)
    config = dataclasses.replace(saved, extract=dataclasses.replace(saved.extract, progress=progress))
    retrieval = DSMRetrieval.load(index, net, config)
    return retrieval, retrieval.load_index(index)


def search_folder_index(index: str | Path, query: str | Path, box: Sequence[float] | None = None, top: int = 10,
                        device: str | torch.device = "cpu", progress: bool = False) -> dict[str, Any]:
    """Rank the photos of a saved index ([`index_folder`][gpu_dsm.photos.index_folder]) for one query photo.

    Args:
        index: the saved retrieval.
        query: the query photo; ``box``: ``(x0, y0, x1, y1)`` pixels of it, right and bottom
            exclusive (default the whole photo).
        top: results returned (at most the indexed images).
    Returns:
        ``{"query", "box", "method", "results"}``; ``results``: best first, each ``{"rank"
        (1-based), "path", "score" (the initial ranking's similarity: cosine of global
        descriptors, or the ASMK score), "inliers" (DSM inliers; ``None`` for an image not
        verified)}``.
    """
    if int(top) < 1:
        raise ValueError(f"--top must be >= 1, got {top}")
    query = check_image(query, "query")
    if box is not None and len(box) != 4:
        raise ValueError(f"--box takes four numbers X0 Y0 X1 Y1, got {len(box)}")
    retrieval, described = load_folder_index(index, device, progress)
    result = retrieval.search([ImageSpec(str(query), tuple(float(v) for v in box) if box is not None else None)], described)
    similarity = torch.empty(described.num_images)
    similarity[result.initial[0]] = result.similarities[0]
    inliers: dict[int, int] = {}
    if result.reranked is not None:
        inliers = dict(zip(result.reranked.indices[0].tolist(), result.reranked.inliers[0].tolist()))
    names = described.names or [str(i) for i in range(described.num_images)]
    results = [{"rank": rank + 1, "path": names[i], "score": float(similarity[i]), "inliers": inliers.get(i)}
               for rank, i in enumerate(result.ranks[0][:int(top)].tolist())]
    return {"query": str(query), "box": list(box) if box is not None else None, "method": result.method,
            "results": results}


def format_results(found: dict[str, Any]) -> str:
    """The lines ``gpu-dsm search`` prints: a header, then rank, score, inliers, path per result."""
    lines = [f"{found['method']} ranking for {found['query']}" + (f" box {found['box']}" if found["box"] else ""),
             f"{'rank':>4}  {'score':>8}  {'inliers':>7}  path"]
    for r in found["results"]:
        inliers = "-" if r["inliers"] is None else str(r["inliers"])
        lines.append(f"{r['rank']:>4}  {r['score']:>8.4f}  {inliers:>7}  {r['path']}")
    return "\n".join(lines)
