"""``gpu-dsm show-match``: a query against one candidate of its global ranking, with the inlier
ellipses and correspondences of spatial verification (paper figure 5)."""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

from gpu_dsm.io import atomic_write
from gpu_dsm.eval.datasets import RevisitopDataset
from gpu_dsm.eval.protocol import setup_ground_truth
from gpu_dsm.eval.run import dataset_stores, make_retrieval, preflight
from gpu_dsm.eval.run_config import RunConfig


def show_match(cfg: RunConfig, query: int, rank: int, out: str | Path, log=print) -> dict[str, Any]:
    """Draw query ``query`` against its ``rank``-th (1-based) candidate of the global ranking,
    with the inlier ellipses and correspondences of spatial verification (paper figure 5)."""
    if cfg.cache_dir is None:
        with tempfile.TemporaryDirectory(prefix="gpu_dsm-") as tmp:
            return _show_match(cfg, query, rank, out, log, Path(tmp))
    return _show_match(cfg, query, rank, out, log, Path(cfg.cache_dir))


def _show_match(cfg: RunConfig, query: int, rank: int, out: str | Path, log, base: Path) -> dict[str, Any]:
    from gpu_dsm.images import load_image
    from gpu_dsm.visualize import draw_matches, feature_to_image
    from PIL import Image

    if cfg.retrieval.rerank is None:
        raise ValueError("show_match needs local features (retrieval.rerank)")
    dataset = RevisitopDataset.load(cfg.data_root, cfg.dataset)
    if not 0 <= query < len(dataset.qimlist):
        raise ValueError(f"query must be in 0..{len(dataset.qimlist) - 1}, got {query}")
    preflight(cfg, dataset, files={"--out": out}, dirs={"--cache-dir": cfg.cache_dir})
    db_store, q_store = dataset_stores(cfg, dataset, base, log=log)
    ranking = dataclasses.replace(cfg.retrieval, diffusion=None, initial="global", rerank=None)
    retrieval = make_retrieval(dataclasses.replace(cfg, retrieval=ranking))
    database, queries = retrieval.from_store(db_store), retrieval.from_store(q_store)
    order = retrieval.search(queries, database).stages["global"].ranks[query]
    if not 1 <= rank <= len(order):
        raise ValueError(f"rank must be in 1..{len(order)}, got {rank}")
    candidate = int(order[rank - 1])
    qf = q_store.local_features([query])
    cf = db_store.local_features([candidate])
    result = retrieval.verify(queries, database, query, candidate, cfg.retrieval.rerank.match)
    pairs = result.matches[0]
    pairs = pairs[pairs[:, 0] >= 0]
    images = []
    points = []
    for spec, feats, rows in ((dataset.query_specs()[query], qf, pairs[:, 0]), (dataset.database_specs()[candidate], cf, pairs[:, 1])):
        img = load_image(spec, cfg.retrieval.extract.image_size, cfg.retrieval.extract.upscale)
        pil = Image.fromarray(img.permute(1, 2, 0).numpy())
        scale = feats.scale[0, rows]
        sizes = feats.map_sizes[0]
        xy, frame = feats.xy[0, rows].clone(), feats.frame[0, rows].clone()
        for s in scale.unique().tolist():
            sel = scale == s
            xy[sel], frame[sel] = feature_to_image(xy[sel], frame[sel], sizes[s].tolist(), pil.size)
        images.append(pil)
        points.append((xy, frame))
    positives, junk = setup_ground_truth(dataset.gnd[query:query + 1], "M")
    label = "positive" if candidate in positives[0] else ("junk" if candidate in junk[0] else "negative")
    title = (f"query {dataset.qimlist[query]} vs rank {rank}: {dataset.imlist[candidate]} ({label}), "
             f"{int(result.inliers[0])} inliers, scales {result.scale_pair[0].tolist()}")
    picture = draw_matches(images[0], images[1], points[0], points[1], title)
    out = Path(out)
    atomic_write(out, lambda tmp: picture.save(tmp, format=Image.registered_extensions().get(out.suffix.lower(), "PNG")))
    log(f"{title} -> {out}")
    return {"candidate": candidate, "inliers": int(result.inliers[0]), "label": label, "path": str(out)}
