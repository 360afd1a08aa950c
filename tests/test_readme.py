"""Every ``python`` code block of README.md runs, as written, and gives a real result.

The examples use the names a user has in hand: ``query_images`` and ``database_images`` (lists of
image paths), and for the re-ranking example ``my_similarities`` / ``my_indices`` (a model's
``(Q, K)`` top-k). A hidden setup defines them here: 1 query photo and 6 database photos of
roxford5k-mini (real 1024 x 683 images; the examples extract at 512 px: 7 images per block), and
a top-k of 4 candidates in a fixed random order with decreasing similarities (for a block that
re-ranks it, the database images outside the top-k are paths that do not exist: it must not read them). A block preceded by the line ``<!-- readme-test: skip (REASON) -->`` is not run;
only blocks that need a GPU or a user's file may carry it.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import torch

from gpu_dsm.ranking import SearchResult

README = Path(__file__).resolve().parents[1] / "README.md"
SKIP_MARK = re.compile(r"<!--\s*readme-test:\s*skip\s*\((?P<reason>[^)]+)\)\s*-->\s*$")
NUM_DATABASE = 6
TOP_K = 4


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """``(line number, code, skip reason or None)`` of every fenced ``python`` block."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i + 1
            previous = lines[i - 1] if i > 0 else ""
            mark = SKIP_MARK.search(previous.strip())
            j = start
            while j < len(lines) and lines[j].strip() != "```":
                j += 1
            if j == len(lines):
                raise AssertionError(f"README.md:{i + 1}: unterminated python block")
            blocks.append((start, "\n".join(lines[start:j]) + "\n", mark.group("reason") if mark else None))
            i = j
        i += 1
    return blocks


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def test_readme_has_the_examples_and_stays_short():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    assert len(BLOCKS) >= 2
    assert any(".rerank(" in code for _, code, _ in BLOCKS)
    assert any("DSMRetrieval" in code and ".search(" in code for _, code, _ in BLOCKS)
    for line, _, reason in BLOCKS:
        if reason is not None:
            assert re.search(r"GPU|user's file", reason), f"README.md:{line}: skip only for a GPU or a user's file"


def test_skip_marks_are_found():
    text = "<!-- readme-test: skip (needs a GPU) -->\n```python\nx = 1\n```\n\n```python\ny = 2\n```\n"
    assert python_blocks(text) == [(2, "x = 1\n", "needs a GPU"), (6, "y = 2\n", None)]


@pytest.fixture(scope="module")
def hidden_setup(data_root) -> dict:
    folder = data_root / "roxford5k-mini"
    with open(folder / "gnd_roxford5k-mini.pkl", "rb") as f:
        gnd = pickle.load(f)
    database_images = [str(folder / "jpg" / f"{name}.jpg") for name in gnd["imlist"][:NUM_DATABASE]]
    query_images = [str(folder / "jpg" / f"{gnd['qimlist'][1]}.jpg")]
    generator = torch.Generator().manual_seed(0)
    indices = torch.randperm(NUM_DATABASE, generator=generator)[:TOP_K].unsqueeze(0)
    similarities = torch.sort(torch.rand(1, TOP_K, generator=generator), descending=True).values
    return {"query_images": query_images, "database_images": database_images,
            "my_indices": indices, "my_similarities": similarities}


@pytest.mark.parametrize("line,code,reason", BLOCKS, ids=[f"README.md:{line}" for line, _, _ in BLOCKS])
def test_readme_block_runs(line, code, reason, hidden_setup, capsys):
    if reason is not None:
        pytest.skip(reason)
    namespace = {**hidden_setup, "__name__": "readme"}
    if ".rerank(" in code:  # it reads only the images of the top-k: the others need not exist
        wanted = set(hidden_setup["my_indices"].flatten().tolist())
        namespace["database_images"] = [path if i in wanted else f"/nonexistent/{i}.jpg"
                                        for i, path in enumerate(hidden_setup["database_images"])]
    exec(compile(code, f"README.md:{line}", "exec"), namespace)
    printed = capsys.readouterr().out
    result = namespace.get("result")
    if isinstance(result, SearchResult) and result.initial_method == "given":
        indices = hidden_setup["my_indices"]
        assert result.method == "given+dsm" and result.ranks.shape == indices.shape
        assert sorted(result.ranks[0].tolist()) == sorted(indices[0].tolist())  # a re-ordering of the top-k
        inliers = result.reranked.inliers
        assert inliers.shape == indices.shape and (inliers >= 0).all() and inliers.max() > 0
        assert str(result.ranks) in printed
    elif isinstance(result, SearchResult):
        assert result.method == "global+dsm+D"
        assert result.ranks.shape == (1, NUM_DATABASE)
        for ranks in result.methods.values():
            assert sorted(ranks[0].tolist()) == list(range(NUM_DATABASE))  # every image ranked once
        assert {"global", "global+dsm", "global+D", "global+dsm+D"} <= set(result.methods)
        assert "global+dsm+D" in printed
    else:
        raise AssertionError(f"README.md:{line}: the block leaves no `result` to check")


# --- the docs' result tables come from eval/results/ -------------------------------------------

def _result(command: str = "gpu-dsm evaluate --dataset toy") -> dict:
    from gpu_dsm.eval.tables import record

    evaluate_output = {"dataset": "toy", "backbone": "efficientnet_lite0", "results": {
        "global": {"mAP": {"E": 50.0, "M": 41.37, "H": 34.81}, "mP@10": {"E": 54.17, "M": 48.75, "H": 33.75},
                   "AP": {"E": [50.0]}, "ranks": [[0, 1]]},
        "global+dsm": {"mAP": {"E": 59.72, "M": 45.38, "H": None}, "mP@10": {"E": 56.67, "M": 48.75, "H": None},
                       "AP": {"E": [59.72]}, "ranks": [[1, 0]]}}}
    return record(evaluate_output, command, date="2026-12-03")


def test_tables_regenerate_and_check(tmp_path):
    import json

    from gpu_dsm.eval.tables import main, regenerate

    (tmp_path / "eval" / "results").mkdir(parents=True)
    (tmp_path / "docs").mkdir()
    result = _result()
    assert "ranks" not in result["results"]["global"] and result["results"]["global"]["AP"] == {"E": [50.0]}
    (tmp_path / "eval" / "results" / "toy.json").write_text(json.dumps(result))
    page = tmp_path / "docs" / "results.md"
    page.write_text("# Results\n\n<!-- table: toy -->\nstale\n<!-- /table -->\n\ntext after\n")
    assert regenerate(tmp_path, check=True) == ["docs/results.md: toy"]
    assert "stale" in page.read_text()                                   # --check writes nothing
    assert main(["--root", str(tmp_path)]) == 0
    text = page.read_text()
    assert "| global | 50.00 | 41.37 | 34.81 | 54.17 | 48.75 | 33.75 |" in text
    assert "| global+dsm | 59.72 | 45.38 | — |" in text
    assert "`gpu-dsm evaluate --dataset toy`" in text and "2026-12-03" in text and text.endswith("text after\n")
    assert main(["--root", str(tmp_path), "--check"]) == 0
    page.write_text(text.replace("45.38", "45.39"))                     # a figure typed by hand
    assert main(["--root", str(tmp_path), "--check"]) == 1
    page.write_text(text.replace("table: toy", "table: missing").replace("<!-- /table -->", "<!-- /table -->", 1))
    with pytest.raises(ValueError, match="missing"):
        regenerate(tmp_path, check=True)


def test_docs_tables_equal_the_result_files():
    from gpu_dsm.eval.tables import ROOT, files_of, load_results, regenerate, tables_in

    results = load_results(ROOT / "eval" / "results")
    assert results, "eval/results/ holds no result file"
    for name, result in results.items():
        assert {"command", "machine", "date"} <= set(result), name
        assert ("report" if result.get("kind") == "benchmark" else "results") in result, name
    pages = [p.read_text(encoding="utf-8") for p in [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]]
    shown = {name for text in pages for spec in tables_in(text) for name in files_of(spec)}
    assert set(results) <= shown  # every file shown
    assert regenerate(ROOT, check=True) == []


def test_paired_landmark_and_query_path_tables():
    """The generated comparison tables recompute the paired bootstrap from the files' per-query
    APs (gpu_dsm.eval.compare), per setup and per landmark; a benchmark table reads its report."""
    from gpu_dsm.eval.compare import compare_reports
    from gpu_dsm.eval.tables import files_of, format_spec, record, record_benchmark

    queries = ["all_souls_1", "all_souls_2", "radcliffe_camera_1", "magdalen_3"]
    ap_a = {"E": [50.0, 60.0, 70.0, 10.0], "M": [40.0, 50.0, 60.0, 20.0], "H": [None, 10.0, 20.0, None]}
    ap_b = {"E": [55.0, 60.0, 60.0, 30.0], "M": [48.0, 50.0, 50.0, 20.0], "H": [None, 30.0, 20.0, None]}

    def entry(ap):
        return {"mAP": {s: 0.0 for s in "EMH"}, "mP@10": {s: 0.0 for s in "EMH"}, "AP": ap}

    run = record({"dataset": "toy", "queries": queries, "results": {"a": entry(ap_a), "b": entry(ap_b)}},
                 "gpu-dsm evaluate --dataset toy", date="2026-12-03")
    results = {"toy": run}
    paired = format_spec("paired toy:a vs toy:b", results)
    expected = compare_reports(run, run, "a", "b")["setups"]["M"]
    assert f"{expected['delta']:+.2f} [{expected['ci'][0]:+.2f}, {expected['ci'][1]:+.2f}] (1/1)" in paired
    assert "| b vs a (toy) | +3.75 [" in paired and "`gpu-dsm evaluate --dataset toy`" in paired
    landmarks = format_spec("landmarks M toy:a vs toy:b", results)
    assert "| all_souls | 2 | +4.00 |" in landmarks and "| radcliffe_camera | 1 | -10.00 |" in landmarks
    assert "| magdalen | 1 | +0.00 |" in landmarks
    assert files_of("landmarks M toy:a vs toy:b") == ["toy", "toy"]
    with pytest.raises(ValueError, match="no method 'c'"):
        format_spec("paired toy:a vs toy:c", results)
    with pytest.raises(ValueError, match="no result file nope"):
        format_spec("paired nope:a vs toy:b", results)
    report = {"benchmark": "query_path", "images": 1000000, "search": "exact", "truncation_size": 1000, "batch": 10,
              "ms_per_query": {"search": 1.0, "gather": 2.0, "verify": 3.0, "diffuse": 4.0, "rank": 5.0, "total": 15.0},
              "peak_rss_mb": {"search": 1024.0, "verify": 2048.0}}
    results["qp"] = record_benchmark(report, "python -m gpu_dsm.eval.bench_query_path", date="2026-12-03")
    table = format_spec("query-path qp", results)
    assert "| 1,000,000 | exact | top 1000 | 10 | 1.0 | 2.0 | 3.0 | 4.0 | 5.0 | 15.0 | 2.0 |" in table
    results["qpc"] = record_benchmark({**report, "search": "compact", "recall_vs_exact": {"at_100": 1.0, "at_1000": 0.5}},
                                      "python -m gpu_dsm.eval.bench_query_path --search compact", date="2026-12-03")
    assert "| 1,000,000 | compact (recall@100 1, recall@1000 0.5) | top 1000 |" in format_spec("query-path qpc", results)
    with pytest.raises(ValueError, match="not a recorded query_path"):
        format_spec("query-path toy", results)
    search = {"benchmark": "search", "images": 7691, "dim": 1280, "queries": 70, "k": 100,
              "descriptors": {"stores": ["roxford5k-19q-database-efficientnet_lite0-ab", "distractors-2698-distractors-efficientnet_lite0-x"],
                              "query_store": "q"},
              "backends": {"compact": {"build_s": 0.5, "ms_per_query": 0.25, "bytes_per_image": 256.0, "recall_at_100": 0.999}}}
    results["search"] = record_benchmark(search, "python -m gpu_dsm.eval.bench_search --stores A B", date="2026-12-05")
    assert ("| roxford5k-19q-database + distractors-2698-distractors: 7,691 x 1280, 70 queries | compact | 0.5 | 0.25 | "
            "256 | @100: 0.999 |") in format_spec("search search", results)
    headline = format_spec("headline toy", results)
    assert headline.startswith("| method | toy M / H |\n") and "| a | 0.00 / 0.00 |" in headline


def test_match_benchmark_table():
    from gpu_dsm.eval.tables import format_spec, record_benchmark

    report = {"benchmark": "match", "tables": {"dataset": "roxford5k-mini", "queries": 8, "pairs": 800, "image_size": 1024,
                                               "correspondences_per_pair_median": 243},
              "runs": {"1_threads": {"native": {"ms_per_query": 10.0, "cpu_ms_per_query": 9.5},
                                     "torch": {"ms_per_query": 40.0, "cpu_ms_per_query": 39.0},
                                     "estimateAffine2D": {"ms_per_query": 85.0, "cpu_ms_per_query": 80.0,
                                                          "pairs_within_one_inlier": 300, "pairs": 800}}},
              "torch_launches_gpu_plan": {"batch": "one query", "launches_per_batch": 560.0, "host_syncs_per_batch": 4.0}}
    table = format_spec("match bm", {"bm": record_benchmark(report, "python -m gpu_dsm.eval.bench_match", date="2026-12-03")})
    assert "| 1 | `cv2.estimateAffine2D`, a call per scale pair | 85.0 | 80.0 | 8.5x | 300 / 800 |" in table
    assert "| 1 | tensor path (`torch`) | 40.0 | 39.0 | 4.0x | — |" in table
    assert "560 operator launches and 4 host syncs per batch" in table
