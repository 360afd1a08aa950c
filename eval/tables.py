"""The docs' result tables, generated from the result files under ``eval/results/``.

A result file is JSON with ``"command"`` (the command that produced it), ``"machine"`` (cpu_cores,
gpu, platform, torch) and ``"date"`` (YYYY-MM-DD), and either an evaluation (``"dataset"``,
``"backbone"``, ``"options"``, ``"queries"``, ``"results": {method: {"mAP": {"E", "M", "H"},
"mP@10": {...}, "AP": {...}}}``; ``record`` makes one from a ``gpu-dsm evaluate`` results file,
per-query rankings left out, per-query APs kept) or a benchmark (``"kind": "benchmark"``,
``"report"``: the benchmark's own JSON; ``record-benchmark`` makes one).

A docs page (or the README) holds a generated table between two marker lines::

    <!-- table: SPEC -->
    ...generated...
    <!-- /table -->

``SPEC`` is one of

- ``NAME``: the evaluation of result file ``NAME.json``, a row per method;
- ``paired A:METHOD vs B:METHOD; ...``: per comparison, method B of file ``B`` against method A
  of file ``A`` over the same queries, mean AP difference per setup with its 95% paired
  bootstrap interval over query groups (`gpu_dsm.eval.compare`; a landmark's queries are
  resampled together) and the queries that gain / lose;
- ``landmarks SETUP A:METHOD vs B:METHOD; ...``: the same differences per query group
  (landmark) for one setup;
- ``query-path NAME NAME ...``: the stages of ``eval/bench_query_path.py`` result files, a row each;
- ``search NAME NAME ...``: ``eval/bench_search.py`` result files: a row per backend, its build
  time, ms per query, bytes per image and recall@k against exact search;
- ``headline NAME NAME ...``: the README's table, a column of mAP Medium / Hard per evaluation file;
- ``match NAME``: an ``eval/bench_match.py`` result file (real tables): each method's time, OpenCV's
  over the C kernel's, the pairs that agree, the tensor path's launches and host syncs;
- ``seeds NAME NAME ...``: ``eval/seed_diagnosis.py`` result files: the positives among the paper's
  diffusion seeds and the confident matches, the positives' mean rank;
- ``options SUBCOMMAND``: every option of ``gpu-dsm SUBCOMMAND``, from its parser (no result file);
- ``detect NAME``: an ``eval/bench_detect.py`` result file: per workload, the detector's stage
  times with the C kernel and the tensor path, whether their features agree, and the network's
  forward on the same images.

``python -m gpu_dsm.eval.tables`` rewrites every such table from its files; ``--check`` rewrites
nothing and exits 1 naming each table that differs.

    python -m gpu_dsm.eval.tables record RESULTS.json --command "gpu-dsm evaluate ..." --out eval/results/NAME.json
    python -m gpu_dsm.eval.tables record-benchmark REPORT.json --command "python -m ..." --out eval/results/NAME.json
    python -m gpu_dsm.eval.tables [--check]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
from pathlib import Path

import torch

from gpu_dsm.io import atomic_write, write_json

ROOT = Path(__file__).resolve().parents[1]  # the repository (eval/ installs as gpu_dsm.eval in place)
SETUPS = ("E", "M", "H")
MARKER = re.compile(r"^<!-- table: (?P<spec>[^\n]+?) -->\n(?P<body>.*?)^<!-- /table -->$", re.M | re.S)
SIDE = re.compile(r"^(?P<file>[A-Za-z0-9_.-]+):(?P<method>\S+)$")


def machine() -> dict:
    """Cores, GPU (or ``"none"``), platform and torch version of this machine."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"cpu_cores": os.cpu_count(), "gpu": gpu, "platform": platform.platform(), "torch": torch.__version__}


def record(results: dict, command: str, date: str | None = None) -> dict:
    """A result file's content from a ``gpu-dsm evaluate`` results dict (``ranks`` dropped)."""
    if "results" not in results or not isinstance(results["results"], dict):
        raise ValueError("record: not a gpu-dsm evaluate results file (no 'results' mapping)")
    methods = {name: {key: value for key, value in entry.items() if key != "ranks"}
               for name, entry in results["results"].items()}
    return {"command": command, "machine": machine(), "date": date or datetime.date.today().isoformat(),
            "dataset": results.get("dataset"), "backbone": results.get("backbone"),
            "options": results.get("options"), "queries": results.get("queries"), "results": methods}


def record_benchmark(report: dict, command: str, date: str | None = None) -> dict:
    """A result file's content from a benchmark's JSON report (kept whole)."""
    if not isinstance(report, dict) or "benchmark" not in report:
        raise ValueError("record-benchmark: not a benchmark report (no 'benchmark' key)")
    return {"kind": "benchmark", "command": command, "machine": machine(),
            "date": date or datetime.date.today().isoformat(), "report": report}


def _cell(value) -> str:
    return "—" if value is None else f"{value:.2f}"


def format_table(result: dict) -> str:
    """The markdown table of one result file: a row per method, mAP and mP@10 per setup, then
    the command, machine and date it came from."""
    for key in ("command", "machine", "date", "results"):
        if key not in result:
            raise ValueError(f"result file without {key!r}")
    lines = ["| method | mAP E | mAP M | mAP H | mP@10 E | mP@10 M | mP@10 H |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, entry in result["results"].items():
        cells = [_cell(entry["mAP"].get(s)) for s in SETUPS] + [_cell(entry["mP@10"].get(s)) for s in SETUPS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", _source(result)]
    return "\n".join(lines) + "\n"


def _source(result: dict) -> str:
    """The line naming where a result came from: command, machine and date."""
    m = result["machine"]
    where = f"{m.get('cpu_cores')} CPU cores, GPU: {m.get('gpu')}, torch {m.get('torch')}"
    return f"`{result['command']}` ({where}; {result['date']})"


def _comparisons(spec: str, results: dict[str, dict]) -> list[tuple[str, str, str, str]]:
    """``(file A, method A, file B, method B)`` of each ``A:METHOD vs B:METHOD`` item of ``spec``."""
    out = []
    for item in filter(None, (part.strip() for part in spec.split(";"))):
        sides = [SIDE.match(side.strip()) for side in item.split(" vs ")]
        if len(sides) != 2 or not all(sides):
            raise ValueError(f"table spec {item!r}: expected FILE:METHOD vs FILE:METHOD")
        for side in sides:
            if side["file"] not in results:
                raise ValueError(f"table spec {item!r}: no result file {side['file']}.json")
            if side["method"] not in results[side["file"]].get("results", {}):
                raise ValueError(f"table spec {item!r}: {side['file']}.json has no method {side['method']!r}")
        out.append((sides[0]["file"], sides[0]["method"], sides[1]["file"], sides[1]["method"]))
    if not out:
        raise ValueError(f"table spec {spec!r} names no comparison")
    return out


def _label(file_a: str, method_a: str, file_b: str, method_b: str) -> str:
    if file_a == file_b:
        return f"{method_b} vs {method_a} ({file_a})"
    return f"{file_b}: {method_b} vs {file_a}: {method_a}"


def _sources(results: dict[str, dict], files) -> list[str]:
    return [f"- {name}: {_source(results[name])}" for name in dict.fromkeys(files)]


def format_paired(spec: str, results: dict[str, dict]) -> str:
    """The paired-difference table of ``spec`` (see the module docstring)."""
    from gpu_dsm.eval.compare import compare_reports

    lines = ["| comparison | E | M | H |", "| --- | --- | --- | --- |"]
    files = []
    for fa, ma, fb, mb in _comparisons(spec, results):
        compared = compare_reports(results[fa], results[fb], ma, mb)
        cells = []
        for setup in SETUPS:
            r = compared["setups"][setup]
            cells.append("—" if r["delta"] is None else
                         f"{r['delta']:+.2f} [{r['ci'][0]:+.2f}, {r['ci'][1]:+.2f}] ({r['gain']}/{r['loss']})")
        lines.append(f"| {_label(fa, ma, fb, mb)} | " + " | ".join(cells) + " |")
        files += [fa, fb]
    lines += ["", "mAP difference [95% paired bootstrap over query groups] (queries gaining / losing), from:", ""]
    return "\n".join(lines + _sources(results, files)) + "\n"


def format_landmarks(spec: str, results: dict[str, dict]) -> str:
    """Per query group (landmark) mean AP differences of one setup (see the module docstring)."""
    from gpu_dsm.eval.compare import compare_reports, group_names

    setup, _, rest = spec.partition(" ")
    if setup not in SETUPS:
        raise ValueError(f"landmarks table: setup {setup!r} is not one of {SETUPS}")
    comparisons = _comparisons(rest, results)
    columns, files, groups = [], [], None
    for fa, ma, fb, mb in comparisons:
        names = results[fa].get("queries")
        if not names:
            raise ValueError(f"landmarks table: {fa}.json has no query names")
        these = group_names(names)
        if groups is not None and these != groups:
            raise ValueError("landmarks table: the comparisons are of different queries")
        groups = these
        columns.append(compare_reports(results[fa], results[fb], ma, mb)["setups"][setup]["per_query"])
        files += [fa, fb]
    order = sorted(set(groups))
    lines = ["| group | queries | " + " | ".join(_label(*c) for c in comparisons) + " |",
             "| --- | --- | " + " | ".join("---" for _ in comparisons) + " |"]
    for name in order:
        members = [i for i, g in enumerate(groups) if g == name]
        cells = []
        for per_query in columns:
            values = [per_query[i] for i in members if per_query[i] is not None]
            cells.append("—" if not values else f"{sum(values) / len(values):+.2f}")
        lines.append(f"| {name} | {len(members)} | " + " | ".join(cells) + " |")
    lines += ["", f"Mean AP difference ({setup}) over each group's queries, from:", ""]
    return "\n".join(lines + _sources(results, files)) + "\n"


QUERY_PATH_STAGES = ("search", "gather", "verify", "diffuse", "rank", "total")


def format_query_path(spec: str, results: dict[str, dict]) -> str:
    """A row per ``eval/bench_query_path.py`` result file: ms per query per stage and peak RSS (an
    approximate search backend with its recall@k against exact search)."""
    names = spec.split()
    for name in names:
        _benchmark(results, name, "query_path", "query-path")
    lines = ["| images | search backend | diffusion | queries per batch | " + " | ".join(QUERY_PATH_STAGES)
             + " (ms per query) | peak RSS (GiB) |", "| --- " * (5 + len(QUERY_PATH_STAGES)) + "|"]
    for name in names:
        r = results[name]["report"]
        truncation = r.get("truncation_size")
        diffusion = "whole graph" if truncation is None else f"top {truncation}"
        ms = [f"{r['ms_per_query'][stage]:.1f}" for stage in QUERY_PATH_STAGES]
        rss = max(r["peak_rss_mb"].values()) / 1024 if r.get("peak_rss_mb") else float("nan")
        search = r["search"]
        if r.get("recall_vs_exact"):  # an approximate search: its recall against exact search, same queries
            search += " (" + ", ".join(f"recall@{key[3:]} {value:g}" for key, value in r["recall_vs_exact"].items()) + ")"
        lines.append(f"| {r['images']:,} | {search} | {diffusion} | {r['batch']} | " + " | ".join(ms)
                     + f" | {rss:.1f} |")
    lines += ["", "From:", ""]
    return "\n".join(lines + _sources(results, names)) + "\n"


def format_search(spec: str, results: dict[str, dict]) -> str:
    """A row per backend of each ``eval/bench_search.py`` result file."""
    names = spec.split()
    lines = ["| descriptors | backend | build (s) | ms per query | bytes per image | recall@k vs exact: mean |",
             "| --- " * 6 + "|"]
    for name in names:
        r = _benchmark(results, name, "search", "search")
        source = r.get("descriptors", "synthetic")
        what = "synthetic" if source == "synthetic" else " + ".join(store.split("-efficientnet")[0] for store in source["stores"])
        k = r["k"]
        for backend, row in r["backends"].items():
            worst = row.get(f"worst_query_recall_at_{k}")
            worst = "" if worst is None else f" (worst query {worst:g})"
            lines.append(f"| {what}: {r['images']:,} x {r['dim']}, {r['queries']} queries | {backend} | {row['build_s']:g} | "
                         f"{row['ms_per_query']:g} | {row['bytes_per_image']:g} | @{k}: {row['recall_at_' + str(k)]:g}{worst} |")
    lines += ["", "From:", ""]
    return "\n".join(lines + _sources(results, names)) + "\n"


def format_seeds(spec: str, results: dict[str, dict]) -> str:
    """A row per ``eval/seed_diagnosis.py`` result file and query subset: the positives among the
    paper's diffusion seeds and among the confident matches, and the positives' mean rank."""
    names = spec.split()
    lines = ["| set | queries | paper's seeds: positive / all | confident matches: positive / all "
             "| positives' mean rank: global+dsm / paper's rule / default rule |", "| --- " * 5 + "|"]
    for name in names:
        r = _benchmark(results, name, "seed_diagnosis", "seeds")
        for subset, label in (("losing", "losing > 0.1 AP with the paper's rule"), ("all", "all")):
            c = r["summary"][subset]
            ranks = " / ".join("-" if v is None else f"{v:.1f}" for v in c["positives_mean_rank"].values())
            lines.append(f"| {r['dataset']} (+{r['database']['distractors']:,}) | {c['queries']} ({label}) | "
                         f"{c['paper_seeds']['positive']} / {c['paper_seeds']['seeds']} | "
                         f"{c['confident']['positive']} / {c['confident']['seeds']} | {ranks} |")
    lines += ["", "From:", ""]
    return "\n".join(lines + _sources(results, names)) + "\n"


def _benchmark(results: dict[str, dict], name: str, benchmark: str, table: str) -> dict:
    result = results.get(name)
    if result is None or result.get("kind") != "benchmark" or result["report"].get("benchmark") != benchmark:
        raise ValueError(f"{table} table: {name}.json is not a recorded {benchmark} benchmark")
    return result["report"]


def format_match(spec: str, results: dict[str, dict]) -> str:
    """A row per method and thread count of an ``eval/bench_match.py`` result file (real tables):
    ms per query (wall, process CPU), OpenCV's time over the C kernel's, pairs within one inlier
    of the project's count; then the tensor path's launches and host syncs per batch."""
    name = spec.strip()
    r = _benchmark(results, name, "match", "match")
    tables = r["tables"]
    lines = ["| threads | method | ms per query | CPU ms per query | time over the C kernel's | pairs within one inlier |",
             "| --- | --- | --- | --- | --- | --- |"]
    labels = {"native": "C kernel (`native`)", "torch": "tensor path (`torch`)"}
    for method in ("estimateAffine2D", "estimateAffinePartial2D"):
        labels[f"{method}_per_pair"] = f"`cv2.{method}`, a call per image pair"
        labels[method] = f"`cv2.{method}`, a call per scale pair"
    for threads, run in r["runs"].items():
        native = run.get("native", {}).get("ms_per_query")
        for method, label in labels.items():
            if method not in run:
                continue
            e = run[method]
            ratio = f"{e['ms_per_query'] / native:.1f}x" if native else "—"
            agree = f"{e['pairs_within_one_inlier']} / {e['pairs']}" if "pairs_within_one_inlier" in e else "—"
            lines.append(f"| {threads.split('_')[0]} | {label} | {e['ms_per_query']:.1f} | {e['cpu_ms_per_query']:.1f} | "
                         f"{ratio} | {agree} |")
    notes = [f"{tables['dataset']}: {tables['queries']} queries x top {tables['pairs'] // max(tables['queries'], 1)}, "
             f"{tables['image_size']} px, median {tables['correspondences_per_pair_median']} correspondences per pair."]
    for key, plan in (("torch_launches", "this device's chunk plan"), ("torch_launches_gpu_plan", "a GPU's chunk plan")):
        if key in r:
            t = r[key]
            notes.append(f"Tensor path, {plan}: {t['launches_per_batch']:.0f} operator launches and "
                         f"{t['host_syncs_per_batch']:.0f} host syncs per batch ({t['batch']}).")
    if isinstance(r.get("opencv"), str):
        notes.append(f"OpenCV: {r['opencv']}.")
    lines += ["", " ".join(notes), "", "From:", ""]
    return "\n".join(lines + _sources(results, [name])) + "\n"


def format_detect(spec: str, results: dict[str, dict]) -> str:
    """A row per workload and path of an ``eval/bench_detect.py`` result file: ms per image (3
    scales) per stage, the time over the C kernel's, the network's forward and the share of it
    that detection takes, whether the paths' features are identical."""
    name = spec.strip()
    r = _benchmark(results, name, "detect", "detect")
    labels = {"native": "C kernel (`native`)", "tensor": "tensor path (`labelling=\"scipy\"`)"}
    if r.get("device", "cpu") != "cpu":
        labels["tensor"] = "tensor path"
    lines = ["| workload (maps at scale 1) | path | levels + delta | MSER | selection, NMS, frames | total (ms per image) "
             "| time over the C kernel's | network forward (ms per image) | detection / forward | features identical |",
             "| --- " * 10 + "|"]
    for workload, entry in r["timing"].items():
        shape = " x ".join(str(v) for v in entry["shape_scale1"])
        native = entry["paths"].get("native", {}).get("total")
        forward = entry.get("forward_ms")
        for path, ms in entry["paths"].items():
            ratio = f"{ms['total'] / native:.1f}x" if native else "—"
            share = f"{100 * ms['total'] / forward:.0f}%" if forward else "—"
            same = "—" if "identical" not in entry else ("yes" if entry["identical"] else "**no**")
            lines.append(f"| {workload} ({shape}, {entry['images']} images) | {labels.get(path, path)} | "
                         f"{ms['levels_and_delta']:.1f} | {ms['mser']:.1f} | {ms['rest']:.1f} | {ms['total']:.1f} | {ratio} | "
                         f"{'—' if forward is None else f'{forward:.0f}'} | {share} | {same} |")
    notes = [f"{r.get('threads', 1)} thread(s), device {r.get('device', 'cpu')}; 3 scales per image, mean over the images."]
    if "level_step_recall" in r:
        recall = " / ".join(f"{v:.3f}" for v in r["level_step_recall"].values())
        notes.append(f"`level_step` {' / '.join(r['level_step_recall'])}: recall of the exact regions {recall}.")
    if "agreement" in r:
        a = r["agreement"]
        notes.append(f"Agreement with the VLFeat port ({a['images']} images x {a['maps_per_image']} maps): "
                     f"{a['identical_fraction']:.4f} of {a['regions_compared']} regions identical.")
    lines += ["", " ".join(notes), "", "From:", ""]
    return "\n".join(lines + _sources(results, [name])) + "\n"


def format_headline(spec: str, results: dict[str, dict]) -> str:
    """A row per method, a column per evaluation file: mAP Medium / Hard (Medium alone for a set
    without a Hard setup), for the README."""
    names = spec.split()
    for name in names:
        if name not in results or "results" not in results[name]:
            raise ValueError(f"headline table: no evaluation result file {name}.json")
    has_hard = {n: any(e["mAP"].get("H") is not None for e in results[n]["results"].values()) for n in names}
    header = [f"{results[n].get('dataset') or n} M / H" if has_hard[n] else f"{results[n].get('dataset') or n}" for n in names]
    lines = ["| method | " + " | ".join(header) + " |", "| --- " * (1 + len(names)) + "|"]
    for method in results[names[0]]["results"]:
        cells = []
        for n in names:
            m = results[n]["results"].get(method, {}).get("mAP", {})
            cells.append(f"{_cell(m.get('M'))} / {_cell(m.get('H'))}" if has_hard[n] else _cell(m.get("M")))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "From:", ""]
    return "\n".join(lines + _sources(results, names)) + "\n"


def format_spec(spec: str, results: dict[str, dict]) -> str:
    """The generated table of one marker's ``spec``."""
    kind, _, rest = spec.partition(" ")
    if kind == "paired":
        return format_paired(rest, results)
    if kind == "landmarks":
        return format_landmarks(rest, results)
    if kind == "query-path":
        return format_query_path(rest, results)
    if kind == "match":
        return format_match(rest, results)
    if kind == "headline":
        return format_headline(rest, results)
    if kind == "seeds":
        return format_seeds(rest, results)
    if kind == "search":
        return format_search(rest, results)
    if kind == "options":
        from gpu_dsm.cli import build_parser
        from gpu_dsm.config_cli import options_markdown

        return options_markdown(build_parser()._subparsers._group_actions[0].choices[rest]) + "\n"
    if kind == "detect":
        return format_detect(rest, results)
    if spec not in results:
        raise ValueError(f"table {spec!r} has no result file {spec}.json")
    return format_table(results[spec])


def files_of(spec: str) -> list[str]:
    """The result files a marker's ``spec`` reads."""
    kind, _, rest = spec.partition(" ")
    if kind in ("query-path", "match", "headline", "seeds", "search", "detect"):
        return rest.split()
    if kind == "options":
        return []
    if kind in ("paired", "landmarks"):
        rest = rest.partition(" ")[2] if kind == "landmarks" else rest
        return [m["file"] for item in rest.split(";") for side in item.split(" vs ")
                if (m := SIDE.match(side.strip()))]
    return [spec]


def load_results(folder: Path) -> dict[str, dict]:
    """``{stem: content}`` of every ``*.json`` under ``folder``."""
    out = {}
    for path in sorted(Path(folder).glob("*.json")):
        with open(path, encoding="utf-8") as f:
            out[path.stem] = json.load(f)
    return out


def render(text: str, results: dict[str, dict], page: str = "page") -> str:
    """``text`` with every marked table regenerated; a marker naming no result file is an error."""
    def replace(match: re.Match) -> str:
        spec = match.group("spec")
        try:
            table = format_spec(spec, results)
        except ValueError as exc:
            raise ValueError(f"{page}: {exc}") from None
        return f"<!-- table: {spec} -->\n{table}<!-- /table -->"
    return MARKER.sub(replace, text)


def tables_in(text: str) -> list[str]:
    """The specs of the marked tables of a page."""
    return [m.group("spec") for m in MARKER.finditer(text)]


def regenerate(root: Path = ROOT, check: bool = False) -> list[str]:
    """Rewrite (or with ``check`` only compare) every marked table of ``root/README.md`` and
    under ``root/docs`` from ``root/eval/results``; returns ``page: table`` for each table that
    differed."""
    results = load_results(root / "eval" / "results")
    differing = []
    readme = [root / "README.md"] if (root / "README.md").is_file() else []
    for page in readme + sorted((root / "docs").rglob("*.md")):
        text = page.read_text(encoding="utf-8")
        new = render(text, results, str(page.relative_to(root)))
        if new != text:
            old_tables = dict(zip(tables_in(text), MARKER.findall(text)))
            new_tables = dict(zip(tables_in(new), MARKER.findall(new)))
            differing += [f"{page.relative_to(root)}: {name}" for name in tables_in(text) if old_tables[name] != new_tables[name]]
            if not check:
                atomic_write(page, lambda tmp, new=new: tmp.write_text(new, encoding="utf-8"))
    return differing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpu_dsm.eval.tables", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action")
    rec = sub.add_parser("record", help="make a result file from a gpu-dsm evaluate results file")
    rec.add_argument("results", help="the results JSON written by gpu-dsm evaluate --out")
    rec.add_argument("--command", required=True, help="the exact command that produced it")
    rec.add_argument("--out", required=True, help="eval/results/NAME.json")
    bench = sub.add_parser("record-benchmark", help="make a result file from a benchmark's JSON report")
    bench.add_argument("results", help="the JSON the benchmark wrote with --out")
    bench.add_argument("--command", required=True, help="the exact command that produced it")
    bench.add_argument("--out", required=True, help="eval/results/NAME.json")
    parser.add_argument("--root", default=str(ROOT), help="repository root (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 naming the tables that differ")
    args = parser.parse_args(argv)
    if args.action in ("record", "record-benchmark"):
        make = record if args.action == "record" else record_benchmark
        with open(args.results, encoding="utf-8") as f:
            write_json(args.out, make(json.load(f), args.command))
        print(f"wrote {args.out}")
        return 0
    differing = regenerate(Path(args.root), check=args.check)
    for item in differing:
        print(("differs: " if args.check else "regenerated: ") + item)
    return 1 if args.check and differing else 0


if __name__ == "__main__":
    sys.exit(main())
