"""What a newcomer meets first: a clear one-line error before any extraction, help that says the
truth, a version."""
from __future__ import annotations

import pickle

import numpy as np
from PIL import Image

from conftest import TINY
from gpu_dsm.cli import build_parser, main


def _args(root, cache, *extra):
    return ["evaluate", "--data-root", str(root), "--dataset", TINY, "--cache-dir", str(cache), "--image-size", "128",
            "--scales", "1", "--no-progress", *extra]


def _rewrite_gnd(root, change):
    path = root / TINY / f"gnd_{TINY}.pkl"
    with open(path, "rb") as f:
        cfg = pickle.load(f)
    change(cfg)
    with open(path, "wb") as f:
        pickle.dump(cfg, f)
    return cfg


def test_zero_queries_or_an_empty_database_is_one_line_not_a_nan_table(tiny_root, tmp_path, capsys):
    cache = tmp_path / "cache"
    _rewrite_gnd(tiny_root, lambda cfg: cfg.update(qimlist=[], gnd=[]))
    assert main(_args(tiny_root, cache)) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == f"gpu-dsm evaluate: error: {TINY}: the ground truth lists no queries (qimlist is empty): nothing to rank"
    assert "nan" not in captured.out and not cache.exists()


def test_a_tiny_database_image_is_named_before_extraction(tiny_root, tmp_path, capsys):
    cache = tmp_path / "cache"
    cfg = _rewrite_gnd(tiny_root, lambda cfg: None)
    name = cfg["imlist"][3]
    Image.fromarray(np.full((10, 10, 3), 128, np.uint8)).save(tiny_root / TINY / "jpg" / f"{name}.jpg")
    assert main(_args(tiny_root, cache, "--no-upscale")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"database image 3 ({name}): " in err and f"{name}.jpg is 10x10 px" in err
    assert "smaller than efficientnet_lite0 needs (32 px per side): drop --no-upscale" in err
    assert not cache.exists(), "nothing was extracted"


def test_help_says_the_demo_defaults_and_the_version(capsys):
    parser = build_parser()
    demo = parser._subparsers._group_actions[0].choices["demo"]
    helps = {a.dest: a.help for a in demo._actions}
    assert helps["diffusion"].endswith("(default in the demo: on)") and helps["rerank"].endswith("(default in the demo: dsm)")
    assert helps["graph_k"].endswith("(default in the demo: 5)") and helps["alpha"].endswith("(default in the demo: 0.8)")
    compare = parser._subparsers._group_actions[0].choices["compare"]
    text = " ".join(compare.format_help().split())
    assert "bootstrap 95% interval" in text and "95%%" not in text
    evaluate = parser._subparsers._group_actions[0].choices["evaluate"]
    assert "(default: default)" not in evaluate.format_help()
    try:
        main(["--version"])
    except SystemExit as exc:
        assert exc.code == 0
    assert capsys.readouterr().out.startswith("gpu-dsm 0.")


def test_an_interrupted_extraction_resumes_where_it_stopped(mini, lite0, tmp_path, monkeypatch):
    """Ctrl-C after some chunks: the same call describes only the missing images, and the store
    equals an uninterrupted one's file by file."""
    import gpu_dsm.pipeline as pipeline
    from gpu_dsm.extract import ExtractConfig
    from gpu_dsm.pipeline import DSMRetrieval, RetrievalConfig

    specs, names = mini.database_specs()[:20], mini.imlist[:20]
    retrieval = DSMRetrieval(lite0, RetrievalConfig(extract=ExtractConfig(image_size=96, scales=(1.0,), progress=False)))
    whole = retrieval.write_store(specs, tmp_path / "whole", names, {"k": 1})

    real, described = pipeline.describe_images, []

    def stopping(net, images, sink, *args, **kwargs):
        def counting(rows, descriptors, maps):
            if len(described) == 17:
                raise KeyboardInterrupt
            described.extend(rows)
            sink(rows, descriptors, maps)
        return real(net, images, counting, *args, **kwargs)

    monkeypatch.setattr(pipeline, "describe_images", stopping)
    try:
        retrieval.write_store(specs, tmp_path / "store", names, {"k": 1})
    except KeyboardInterrupt:
        pass
    assert not (tmp_path / "store").exists() and len(described) == 17
    monkeypatch.setattr(pipeline, "describe_images", real)
    seen = []
    monkeypatch.setattr(pipeline, "describe_images",
                        lambda net, images, sink, *a, **k: (seen.extend(images), real(net, images, sink, *a, **k))[1])
    lines = []
    resumed = retrieval.write_store(specs, tmp_path / "store", names, {"k": 1}, log=lines.append)
    assert 0 < len(seen) <= 20 - 16, "only the images after the last committed chunk were described again"
    assert lines and "resuming an interrupted write" in lines[0]
    for name in sorted(p.name for p in whole.path.iterdir()):
        assert (whole.path / name).read_bytes() == (resumed.path / name).read_bytes(), name
