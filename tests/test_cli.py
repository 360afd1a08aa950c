"""The command line on real data: evaluate roxford5k-mini end to end, the demo, --help, bad input."""
import json
import re
import subprocess
import sys

import pytest

from gpu_dsm.cli import build_parser, main


def _help(command):
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    return sub, sub.format_help()


@pytest.mark.parametrize("command", ["demo", "extract", "evaluate", "index", "search"])
def test_help_states_every_option_and_default(command):
    parser, text = _help(command)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{command} {action.option_strings} has no help"
            if action.default not in (None, False, True) and not action.required:
                assert "default" in action.help, f"{command} {action.option_strings} does not state its default"
    assert "paper" in text


def test_console_script_help_runs():
    out = subprocess.run([sys.executable, "-m", "gpu_dsm.cli", "evaluate", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--rerank" not in out.stderr and "--backbone" in out.stdout


@pytest.mark.slow
def test_evaluate_roxford_mini_writes_results_and_reuses_the_cache(tmp_path, data_root, capsys):
    out = tmp_path / "r.json"
    args = ["evaluate", "--data-root", str(data_root), "--dataset", "roxford5k-mini", "--image-size", "320",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--no-progress", "--device", "cpu", "--rerank", "none"]
    assert main(args) == 0
    first = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["dataset"] == "roxford5k-mini" and report["backbone"] == "efficientnet_lite0"
    assert report["options"]["extract"]["image_size"] == 320
    res = report["results"]["global"]
    ranks = res["ranks"]
    assert len(ranks) == 8 and all(sorted(r) == list(range(133)) for r in ranks)
    for metric in ("mAP", "mP@10"):
        assert set(res[metric]) == {"E", "M", "H"}
    # far above chance (a random ranking gives about 12-20 mAP M on this set)
    assert res["mAP"]["M"] > 25
    assert re.search(r"global\s+\d+\.\d+", first)
    assert main(args) == 0
    second = capsys.readouterr().out
    assert second.count("reusing") == 2
    assert json.loads(out.read_text())["results"]["global"]["ranks"] == ranks


def test_bad_input_gets_a_clear_error(tmp_path, capsys):
    assert main(["evaluate", "--data-root", str(tmp_path / "nowhere"), "--dataset", "x", "--no-progress"]) == 2
    assert "data root not found" in capsys.readouterr().err
    assert main(["evaluate", "--data-root", str(tmp_path), "--dataset", "roxford5k", "--no-progress"]) == 2
    assert "gnd_roxford5k.pkl" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["evaluate", "--data-root", str(tmp_path), "--backbone", "alexnet"])
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_runs(capsys):
    assert main(["demo", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "global" in out and "demo finished" in out


@pytest.mark.slow
def test_evaluate_with_rerank_and_diffusion(tmp_path, data_root, capsys):
    out, png = tmp_path / "r.json", tmp_path / "inliers.png"
    args = ["evaluate", "--data-root", str(data_root), "--image-size", "320", "--cache-dir", str(tmp_path / "cache"),
            "--rerank", "dsm", "--diffusion", "--graph-k", "5", "--out", str(out), "--plot-inliers", str(png),
            "--no-progress", "--device", "cpu"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "per-query AUC" in printed
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"global", "global+dsm", "global+D", "global+dsm+D"}
    for method in report["results"].values():
        assert all(sorted(r) == list(range(133)) for r in method["ranks"])
    assert report["options"]["rerank"]["top_k"] == 100 and report["options"]["diffusion"]["graph"]["k"] == 5
    auc = report["diagnostics"]["separation_auc"]
    assert set(auc) == {"global", "inliers", "dsm score"} and len(auc["inliers"]) == 8
    # re-ranking only permutes each query's top 100
    g, d = report["results"]["global"]["ranks"], report["results"]["global+dsm"]["ranks"]
    assert all(sorted(a[:100]) == sorted(b[:100]) and a[100:] == b[100:] for a, b in zip(g, d))
    from PIL import Image

    assert Image.open(png).size[0] > 100
    picture = tmp_path / "match.png"
    assert main(["show-match", "--data-root", str(data_root), "--image-size", "320", "--cache-dir", str(tmp_path / "cache"),
                 "--query", "2", "--rank", "1", "--out", str(picture), "--no-progress", "--device", "cpu"]) == 0
    assert "reusing" in capsys.readouterr().out and Image.open(picture).size[0] > 320


def test_the_drop_in_modules_are_one_import_away():
    import gpu_dsm
    from gpu_dsm.pipeline import DSMRetrieval
    from gpu_dsm.rerank import DSMReranker

    assert gpu_dsm.DSMRetrieval is DSMRetrieval and gpu_dsm.DSMReranker is DSMReranker
    for name in ("RerankConfig", "MatchConfig", "DetectorConfig", "DiffusionConfig", "GraphConfig", "ExtractConfig",
                 "GlobalConfig", "build_backbone", "spatial_verify", "diffuse", "build_knn_graph", "features_to_laf"):
        assert hasattr(gpu_dsm, name), name


def test_progress_reaches_a_log_as_lines(tiny_root, tmp_path):
    """Progress is on by default; with stderr redirected to a file (not a terminal) it arrives as
    plain lines with the count, the rate and the time (no bar, no carriage returns); --no-progress
    silences it."""
    log = tmp_path / "log.txt"
    command = [sys.executable, "-m", "gpu_dsm.cli", "evaluate", "--data-root", str(tiny_root), "--dataset", "tiny",
               "--image-size", "128", "--scales", "1", "--cache-dir", str(tmp_path / "c"), "--device", "cpu",
               "--rerank", "dsm"]
    with open(log, "w") as f:
        out = subprocess.run(command, stdout=subprocess.PIPE, stderr=f, text=True)
    assert out.returncode == 0 and "global" in out.stdout
    text = log.read_text()
    assert "\r" not in text
    assert re.search(r"tiny database: 8/8 img \(100%\), [0-9.]+ img/s, done in", text), text
    assert re.search(r"re-ranking global: 2/2 query \(100%\), [0-9.]+ query/s, done in", text), text
    with open(log, "w") as f:
        quiet = subprocess.run(command + ["--no-progress", "--cache-dir", str(tmp_path / "d")], stdout=subprocess.PIPE,
                               stderr=f, text=True)
    assert quiet.returncode == 0 and log.read_text() == ""


def _evaluate_config(*options: str):
    from gpu_dsm.cli import _run_config

    args = build_parser().parse_args(["evaluate", *options])
    return _run_config(args, args.data_root, "roxford5k-mini", None, args.rerank != "none", "with --rerank none")


def test_options_reach_the_configs_and_the_defaults_are_the_librarys():
    """No option: the library's RetrievalConfig exactly (re-ranking on); each option lands in its field."""
    from gpu_dsm.pipeline import RetrievalConfig

    assert _evaluate_config().retrieval == RetrievalConfig()
    assert _evaluate_config("--rerank", "none").retrieval.rerank is None
    cfg = _evaluate_config("--initial", "asmk", "--asmk-alpha", "1.5", "--query-assignments", "1", "--diffusion",
                           "--truncation-size", "300", "--gamma", "2", "--search-backend", "faiss-ivfpq", "--nprobe", "4",
                           "--codebook-data", "database", "x", "--paper-rerank", "--top-k", "7", "--no-upscale")
    r = cfg.retrieval
    assert (r.asmk.alpha, r.asmk.query_assignments, r.diffusion.truncation_size) == (1.5, 1, 300)
    assert (r.diffusion.gamma, r.graph.gamma, r.search.backend, r.search.nprobe) == (2.0, 2.0, "faiss-ivfpq", 4)
    assert (r.rerank.top_k, r.rerank.score, r.rerank.match.threshold, r.extract.upscale) == (7, "inliers", 2.0, False)
    assert cfg.codebook_data == ("database", "x")
    compact = _evaluate_config("--search-backend", "compact", "--shortlist", "300").retrieval.search
    assert (compact.backend, compact.shortlist) == ("compact", 300)
    paper = _evaluate_config("--paper-diffusion").retrieval.diffusion
    assert (paper.seeds, paper.similarity_weight, paper.alpha) == ("paper", 0.0, 0.99)


@pytest.mark.parametrize("options, message", [
    (["--paper-rerank", "--top-k", "0"], "--top-k 0: top_k must be >= 1"),
    (["--rerank", "none", "--top-k", "5"], "--top-k has no effect with --rerank none"),
    (["--rerank", "none", "--paper-rerank"], "--paper-rerank has no effect with --rerank none"),
    (["--rerank", "none", "--levels", "round"], "--levels has no effect with --rerank none"),
    (["--rerank", "none", "--plot-inliers", "x.png"], "--plot-inliers has no effect with --rerank none"),
    (["--rerank", "none", "--diffusion", "--seeds", "paper"], "--seeds has no effect with --rerank none"),
    (["--score", "inliers", "--fuse-weight", "1"], "--fuse-weight has no effect with --score inliers (only with fused)"),
    (["--paper-rerank", "--threshold", "3"], "cannot be combined with --threshold"),
    (["--alpha", "0.5"], "--alpha has no effect without --diffusion"),
    (["--paper-diffusion", "--seeds", "verified"], "cannot be combined with --seeds"),
    (["--diffusion", "--seeds", "paper", "--confident-mads", "3"], "--confident-mads has no effect with --seeds paper"),
    (["--nprobe", "3"], "--nprobe has no effect with --search-backend exact (only with faiss-ivfpq)"),
    (["--shortlist", "300"], "--shortlist has no effect with --search-backend exact (only with compact)"),
    (["--codebook-size", "64"], "--codebook-size has no effect without --initial asmk"),
    (["--codebook-data", "database"], "--codebook-data has no effect without --initial asmk"),
    (["--detector", "reference", "--strength", "mean"], "rules='reference' takes"),
])
def test_an_option_without_effect_or_a_bad_value_is_one_line_and_exit_2(options, message, tmp_path, capsys):
    assert main(["evaluate", "--data-root", str(tmp_path), *options]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_extract_refuses_detector_options_without_local_features(tmp_path, capsys):
    assert main(["extract", "--data-root", str(tmp_path), "--no-local", "--max-features", "64", "--out", str(tmp_path)]) == 2
    assert "--max-features has no effect with --no-local" in capsys.readouterr().err
