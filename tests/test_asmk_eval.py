"""``gpu-dsm evaluate --initial asmk`` on the tiny revisitop set of roxford5k-mini photos (see
conftest): the methods asmk, asmk+dsm, asmk+dsm+D; the ranking equals an index built by hand from
the cached HOW features; caches reused; codebook data from another folder; errors before any
extraction. Small sizes (160 px HOW images, 16 words) keep it to seconds."""
import json

import pytest
import torch

from gpu_dsm.asmk import ASMKConfig, ASMKIndex
from gpu_dsm.cli import main
from gpu_dsm.how import HOWFeatures

from conftest import TINY
from test_evaluation_sets import _args, _distractors

pytestmark = pytest.mark.data

ASMK = ["--initial", "asmk", "--how-image-size", "160", "--how-features", "100", "--codebook-size", "16",
        "--kmeans-iterations", "4"]


def test_asmk_initial_ranking_reranked_and_diffused(tmp_path, tiny_root, capsys):
    cache = tmp_path / "cache"
    out = tmp_path / "r.json"
    args = _args(tiny_root, cache, "--dataset", TINY, *ASMK, "--rerank", "dsm", "--top-k", "6", "--diffusion",
                 "--graph-k", "3")
    assert main(args + ["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    for method in ("global", "global+dsm", "global+D", "global+dsm+D", "asmk", "asmk+dsm", "asmk+dsm+D"):
        assert all(sorted(r) == list(range(8)) for r in report["results"][method]["ranks"]), method
        assert "asmk" in printed
    asmk = report["results"]["asmk"]
    # DSM verification re-orders ASMK's top 6 only; the tail keeps ASMK's order
    for a, b in zip(asmk["ranks"], report["results"]["asmk+dsm"]["ranks"]):
        assert sorted(a[:6]) == sorted(b[:6]) and a[6:] == b[6:]
    options = report["options"]
    assert options["initial"] == "asmk" and options["asmk"]["codebook_data"] == ["database"]
    assert options["asmk"]["how"]["layer"] == "stage5" and options["asmk"]["asmk"]["codebook_size"] == 16
    diag = report["diagnostics"]["asmk"]
    assert diag["codebook_data"] == [{"source": "database", "label": f"{TINY}-database", "images": 8}]
    # EfficientNet-Lite0's stage 5 has 112 channels: 112-D descriptors, 14-byte codes + 4-byte ids
    assert diag["codebook_size"] == 16 and diag["descriptor_dim"] == 112
    assert 0 < diag["words_per_database_image"] <= 16 and diag["index_bytes_per_image"] == pytest.approx(diag["words_per_database_image"] * 18, abs=1)
    assert {"asmk_s", "asmk_search_s", "how_whitening_s", "asmk_codebook_s", "rerank_asmk_s", "diffusion_asmk_s"} <= set(report["timing"])

    # the ranking is the index's, rebuilt by hand from the cached HOW features and codebook
    database = HOWFeatures.load(next(cache.glob(f"how-{TINY}-database-*.pt")))
    queries = HOWFeatures.load(next(cache.glob(f"how-{TINY}-queries-*.pt")))
    codebook = torch.load(next(cache.glob("asmk-codebook-*.pt")), weights_only=True)["codebook"]
    index = ASMKIndex.build(codebook, database.descriptors, database.image_ids, ASMKConfig(codebook_size=16), num_images=8)
    _, ranks = index.search(queries.descriptors, queries.image_ids, num_queries=2)
    assert ranks.tolist() == asmk["ranks"]
    assert database.counts().tolist() == [100] * 8

    # a second run reuses every cached step
    assert main(args + ["--out", str(tmp_path / "again.json")]) == 0
    printed = capsys.readouterr().out
    for step in ("HOW whitening: reusing", f"HOW {TINY}-database: reusing", "ASMK codebook: reusing", "ASMK index: reusing"):
        assert step in printed, step
    assert json.loads((tmp_path / "again.json").read_text())["results"]["asmk"]["ranks"] == asmk["ranks"]


def test_codebook_learned_on_another_folder_and_errors_before_extraction(tmp_path, mini, tiny_root, capsys):
    folder = _distractors(tmp_path, mini, tiny_root, count=3)
    cache = tmp_path / "cache"
    out = tmp_path / "r.json"
    assert main(_args(tiny_root, cache, "--dataset", TINY, *ASMK, "--codebook-size", "8", "--codebook-data", str(folder),
                      "--out", str(out))) == 0
    diag = json.loads(out.read_text())["diagnostics"]["asmk"]
    assert diag["codebook_data"] == [{"source": str(folder), "label": "distractors", "images": 3}]
    assert diag["codebook_training_descriptors"] == 300 and diag["codebook_size"] == 8
    capsys.readouterr()
    fresh = tmp_path / "fresh"
    assert main(_args(tiny_root, fresh, "--dataset", TINY, *ASMK, "--codebook-data", str(tmp_path / "absent"))) == 2
    assert "--codebook-data" in capsys.readouterr().err and not any(p.is_dir() for p in fresh.glob("*"))
    assert main(_args(tiny_root, fresh, "--dataset", TINY, *ASMK, "--how-layer", "layer3")) == 2
    assert "--how-layer layer3" in capsys.readouterr().err and not any(p.is_dir() for p in fresh.glob("*"))
    # a codebook larger than its training descriptors is refused, naming both numbers
    assert main(_args(tiny_root, fresh, "--dataset", TINY, *ASMK, "--codebook-size", "5000")) == 2
    assert "a codebook of 5000 words needs at least 5000 training descriptors, got 800" in capsys.readouterr().err


def test_the_evaluated_queries_never_enter_the_codebook_images(tmp_path, tiny_root):
    from gpu_dsm.eval.asmk_initial import ASMKRun, codebook_sources
    from gpu_dsm.eval.datasets import RevisitopDataset

    dataset = RevisitopDataset.load(tiny_root, TINY)
    folder = tmp_path / "mixed"
    (folder / "jpg").mkdir(parents=True)
    (folder / "jpg" / "q.jpg").symlink_to(dataset.query_paths[0])  # a query's photo under another name
    (folder / "jpg" / "d.jpg").symlink_to(dataset.database_paths[0])
    (folder / "imlist.txt").write_text("q\nd\n")
    sources = codebook_sources(ASMKRun(codebook_data=("database", str(folder))), tiny_root, dataset)
    assert [label for label, _ in sources] == [f"{TINY}-database", "mixed"]
    assert len(sources[0][1]) == 8 and [s.source for s in sources[1][1]] == [str(folder / "jpg" / "d.jpg")]
