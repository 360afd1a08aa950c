"""Evaluation runs: extract (or reuse) the stores of a dataset, rank, score by the protocol, write JSON.

``results`` holds one entry per method; ``"global"`` is the initial ranking by the global
descriptor. Methods that re-rank (``"global+dsm"``) or diffuse (``"global+D"``,
``"global+dsm+D"``) add entries to the same dict.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from gpu_dsm.backbones import Backbone, build_backbone
from gpu_dsm.describe import GlobalConfig, describe_images
from gpu_dsm.detect import DetectorConfig, detect_image
from gpu_dsm.extract import ExtractConfig
from gpu_dsm.images import ImageSpec
from gpu_dsm.io import write_json
from gpu_dsm.search import similarity_topk
from gpu_dsm.store import FeatureStore, StoreWriter
from gpu_dsm.whitening import Whitening
from gpu_dsm.eval.datasets import RevisitopDataset
from gpu_dsm.eval.protocol import evaluate_revisited, format_table


@dataclass
class RunConfig:
    """Everything an evaluation run depends on (recorded in the results file)."""

    data_root: str
    dataset: str
    backbone: str = "efficientnet_lite0"
    weights: str = "default"
    upsample: bool = False
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    global_: GlobalConfig = field(default_factory=GlobalConfig)
    detector: DetectorConfig | None = None  # local features (DSM detector); None: global descriptors only
    whitening: str | None = None  # path of a saved Whitening applied to all global descriptors
    cache_dir: str | None = None  # where stores are kept between runs; None: no cache
    device: str = "cpu"
    dtype: str = "float32"

    def options(self) -> dict[str, Any]:
        extract = dataclasses.asdict(self.extract)
        extract.pop("progress")
        extract.pop("num_workers")
        return {
            "backbone": self.backbone,
            "weights": self.weights,
            "upsample": self.upsample,
            "extract": extract,
            "global": dataclasses.asdict(self.global_),
            "detector": dataclasses.asdict(self.detector) if self.detector is not None else None,
            "whitening": self.whitening,
            "device": self.device,
            "dtype": self.dtype,
        }


def _store_key(cfg: RunConfig, split: str) -> str:
    keyed = {k: v for k, v in cfg.options().items() if k not in ("whitening", "device")}
    keyed.update(dataset=cfg.dataset, split=split, root=str(Path(cfg.data_root).resolve()))
    digest = hashlib.sha1(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:12]
    return f"{cfg.dataset}-{split}-{cfg.backbone}-{digest}"


def make_backbone(cfg: RunConfig) -> Backbone:
    backbone = build_backbone(cfg.backbone, cfg.weights, upsample=cfg.upsample)
    return backbone.to(device=torch.device(cfg.device), dtype=getattr(torch, cfg.dtype))


def write_store(
    backbone: Backbone, specs: Sequence[ImageSpec], names: Sequence[str], path: Path, cfg: RunConfig, desc: str,
    is_query: bool = False,
) -> FeatureStore:
    """Describe ``specs`` (global descriptors, and local features when ``cfg.detector`` is set)
    and write them to a new store at ``path`` (atomically)."""
    local = None
    if cfg.detector is not None:
        local = {"scales": list(cfg.extract.scales), "num_channels": backbone.out_channels}
    with StoreWriter(path, names, backbone.out_channels, cfg.options(), local=local) as writer:
        def sink(index: int, descriptor: torch.Tensor, maps: list[torch.Tensor]) -> None:
            writer.add_global(index, descriptor)
            if cfg.detector is not None:
                features = detect_image(maps, cfg.detector, is_query, backbone.activation_bound)
                sizes = torch.tensor([list(m.shape[-2:]) for m in maps])
                writer.add_local(index, features, sizes)

        describe_images(backbone, specs, sink, cfg.extract, cfg.global_, desc=desc)
    return FeatureStore(path)


def dataset_stores(cfg: RunConfig, dataset: RevisitopDataset, base: Path, log=print):
    """Stores of the database and of the (cropped) queries under ``base``, reused when present."""
    backbone = None
    stores = {}
    for split, specs, names in (
        ("database", dataset.database_specs(), dataset.imlist),
        ("queries", dataset.query_specs(), dataset.qimlist),
    ):
        path = Path(base) / _store_key(cfg, split)
        if (path / "meta.json").is_file():
            stores[split] = FeatureStore(path)
            log(f"{split}: reusing {path}")
            continue
        if backbone is None:
            backbone = make_backbone(cfg)
        start = time.perf_counter()
        stores[split] = write_store(backbone, specs, names, path, cfg, desc=f"{dataset.name} {split}",
                                    is_query=split == "queries")
        seconds = time.perf_counter() - start
        log(f"{split}: {len(specs)} images in {seconds:.1f} s ({len(specs) / seconds:.2f} img/s) -> {path}")
    return stores["database"], stores["queries"]


def evaluate_dataset(cfg: RunConfig, out: str | Path | None = None, log=print) -> dict[str, Any]:
    """Run the evaluation of ``cfg`` and return (and write to ``out``) the results dict."""
    dataset = RevisitopDataset.load(cfg.data_root, cfg.dataset)
    if cfg.cache_dir is None:
        with tempfile.TemporaryDirectory(prefix="gpu_dsm-") as tmp:
            return _evaluate(cfg, dataset, Path(tmp), out, log)
    return _evaluate(cfg, dataset, Path(cfg.cache_dir), out, log)


def _evaluate(cfg: RunConfig, dataset: RevisitopDataset, base: Path, out, log) -> dict[str, Any]:
    db_store, q_store = dataset_stores(cfg, dataset, base, log=log)
    device = torch.device(cfg.device)
    db = db_store.global_descriptors().to(device)
    queries = q_store.global_descriptors().to(device)
    if cfg.whitening:
        whitening = Whitening.load(cfg.whitening)
        db, queries = whitening.apply(db), whitening.apply(queries)
    _, ranks = similarity_topk(queries, db)
    results: dict[str, Any] = {}
    scores = evaluate_revisited(ranks.cpu().numpy(), dataset.gnd)
    scores["ranks"] = ranks.cpu().tolist()
    results["global"] = scores
    report = {"dataset": cfg.dataset, "backbone": cfg.backbone, "options": cfg.options(), "results": results}
    log(format_table(results))
    if out is not None:
        write_json(out, report)
        log(f"results written to {out}")
    return report
