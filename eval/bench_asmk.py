"""ASMK benchmarks: our batched search against the authors' ``asmk`` package on the same database
and codebook, and a simulated large inverted file.

    python -m gpu_dsm.eval.bench_asmk --out asmk.json                      # both parts
    python -m gpu_dsm.eval.bench_asmk --part simulated --images 1000000    # the 1M-image inverted file

``package``: clustered synthetic 128-D descriptors (``--db-images`` x ``--features``), a codebook
trained by our k-means, then the index built and all queries searched by both implementations
(the ``asmk`` package only where it is installed: ``pip install asmk faiss-cpu``); the scores are
compared (they agree up to float32 rounding in the package: it sums residuals and quantises in
float32). ``simulated``: an inverted file of ``--images`` images with ``--words-per-image``
entries each over 65,536 words of equal expected frequency and random 128-bit codes, searched by
``--queries`` queries of ``--query-words`` words: memory per image and ms per query. Figures are
written as JSON; no timing is asserted anywhere.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time

import numpy as np
import torch

from gpu_dsm.asmk import ASMKConfig, ASMKIndex, aggregate_residuals, train_codebook
from gpu_dsm.asmk.codes import binary_codes
from gpu_dsm.io import write_json


def _clustered(num: int, dim: int, centres: int, generator: torch.Generator) -> torch.Tensor:
    base = torch.randn(centres, dim, generator=generator)
    return base[torch.randint(0, centres, (num,), generator=generator)] + 0.5 * torch.randn(num, dim, generator=generator)


def _package_search(codebook: np.ndarray, db: np.ndarray, db_ids: np.ndarray, queries: np.ndarray, q_ids: np.ndarray,
                    cfg: ASMKConfig):
    """The ``asmk`` package's index build and search with our codebook: ``(build s, search s,
    scores (Q, N), {stage: s})``, the stages of its per-query loop (``ASMKMethod.accumulate_scores``)
    timed apart: quantisation + aggregation, and the inverted-file search."""
    from asmk import asmk_method, codebook as cdb_pkg, index as idx_pkg

    params = {"index": {"gpu_id": None},
              "build_ivf": {"kernel": {"binary": cfg.binary}, "ivf": {"use_idf": False},
                            "quantize": {"multiple_assignment": cfg.database_assignments}, "aggregate": {}},
              "query_ivf": {"quantize": {"multiple_assignment": cfg.query_assignments}, "aggregate": {},
                            "search": {"topk": None},
                            "similarity": {"similarity_threshold": cfg.tau, "alpha": cfg.alpha}}}
    words = cdb_pkg.Codebook(idx_pkg.initialize_index(gpu_id=None), size=codebook.shape[0])
    words.index(np.ascontiguousarray(codebook, dtype=np.float32))
    method = asmk_method.ASMKMethod(params, {}, codebook=words)
    rows = np.argsort(db_ids, kind="stable")  # the package needs each image's rows together
    start = time.perf_counter()
    method = method.build_ivf(db[rows], db_ids[rows])
    build = time.perf_counter() - start
    order = np.argsort(q_ids, kind="stable")
    start = time.perf_counter()
    _, images, ranks, scores = method.query_ivf(queries[order], q_ids[order])
    search = time.perf_counter() - start
    full = np.zeros((int(q_ids.max()) + 1, int(db_ids.max()) + 1))
    for image, r, s in zip(images, ranks, scores):
        full[int(image), r] = s
    # the same loop as accumulate_scores, its two stages timed apart
    stages = {"quantize_aggregate": 0.0, "search": 0.0}
    step = params["query_ivf"]
    similarity = lambda *x: method.kernel.similarity(*x, **step["similarity"])  # noqa: E731
    qv, qi = queries[order], q_ids[order]
    for image in np.unique(qi):
        rows = qi == image
        start = time.perf_counter()
        aggregated = method.kernel.aggregate_image(*method.codebook.quantize(qv[rows], **step["quantize"]),
                                                   **step["aggregate"])
        stages["quantize_aggregate"] += time.perf_counter() - start
        start = time.perf_counter()
        method.inverted_file.search(*aggregated, **step["search"], similarity_func=similarity)
        stages["search"] += time.perf_counter() - start
    return build, search, full, stages


def bench_package(args) -> dict:
    g = torch.Generator().manual_seed(0)
    cfg = ASMKConfig(codebook_size=args.words)
    n, f, q = args.db_images, args.features, args.queries
    db = _clustered(n * f, 128, args.words * 2, g)
    db_ids = torch.arange(n).repeat_interleave(f)
    queries = db[torch.randperm(n * f, generator=g)[: q * f]] + 0.1 * torch.randn(q * f, 128, generator=g)
    q_ids = torch.arange(q).repeat_interleave(f)
    start = time.perf_counter()
    codebook = train_codebook(db[: min(n * f, 50 * args.words)], args.words, iterations=cfg.kmeans_iterations, seed=cfg.seed)
    out = {"db_images": n, "features_per_image": f, "queries": q, "words": args.words,
           "codebook_train_s": round(time.perf_counter() - start, 2)}
    start = time.perf_counter()
    index = ASMKIndex.build(codebook, db, db_ids, cfg)
    out["ours_build_s"] = round(time.perf_counter() - start, 3)
    start = time.perf_counter()
    scores, order = index.search(queries, q_ids)
    out["ours_ms_per_query"] = round(1000 * (time.perf_counter() - start) / q, 2)
    # the two stages apart: quantisation + aggregation of the queries, then the inverted-file search
    start = time.perf_counter()
    vectors = aggregate_residuals(queries, q_ids, codebook, cfg.query_assignments, cfg.memory_budget)
    codes = binary_codes(vectors.vector)
    out["ours_quantize_aggregate_ms_per_query"] = round(1000 * (time.perf_counter() - start) / q, 2)
    start = time.perf_counter()
    index.search_codes(vectors.image, vectors.word, codes, q)
    out["ours_search_ms_per_query"] = round(1000 * (time.perf_counter() - start) / q, 2)
    out["bytes_per_image"] = round(index.bytes_per_image(), 1)
    out["words_per_image"] = round(index.num_entries / n, 1)
    if importlib.util.find_spec("asmk") is None:
        out["package"] = "not installed (pip install asmk faiss-cpu)"
        return out
    build, search, theirs, stages = _package_search(codebook.numpy(), db.numpy(), db_ids.numpy(), queries.numpy(),
                                                    q_ids.numpy(), cfg)
    ours = torch.zeros(q, n, dtype=torch.float64).scatter_(1, order, scores).numpy()
    out.update(package_build_s=round(build, 3), package_ms_per_query=round(1000 * search / q, 2),
               package_quantize_aggregate_ms_per_query=round(1000 * stages["quantize_aggregate"] / q, 2),
               package_search_ms_per_query=round(1000 * stages["search"] / q, 2),
               speedup_search=round(search * 1000 / q / out["ours_ms_per_query"], 1),
               speedup_search_stage=round(1000 * stages["search"] / q / out["ours_search_ms_per_query"], 1),
               max_abs_score_difference=float(np.abs(ours - theirs).max()),
               top100_agreement=float(np.mean([len(set(np.argsort(-theirs[i], kind="stable")[:100]) & set(order[i, :100].tolist())) / 100
                                               for i in range(q)])))
    return out


def bench_simulated(args) -> dict:
    """An inverted file with the sizes of a real one, built from random entries (no k-means)."""
    g = torch.Generator().manual_seed(1)
    n, per_image, words = args.images, args.words_per_image, 65536
    entries = n * per_image
    start = time.perf_counter()
    word = torch.randint(0, words, (entries,), generator=g)
    order = torch.argsort(word)
    offsets = torch.zeros(words + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(torch.bincount(word, minlength=words), 0)
    image_ids = torch.arange(n, dtype=torch.int32).repeat_interleave(per_image)[order]
    del word, order
    codes = torch.randint(0, 256, (entries, 16), dtype=torch.uint8, generator=g)
    index = ASMKIndex(codebook=torch.zeros(words, 128), offsets=offsets, image_ids=image_ids, codes=codes,
                      image_words=torch.full((n,), per_image, dtype=torch.long), config=ASMKConfig())
    index = index.to(args.device)
    build = time.perf_counter() - start
    q, qw = args.queries, args.query_words
    query = torch.arange(q).repeat_interleave(qw)
    qword = torch.stack([torch.randperm(words, generator=g)[:qw] for _ in range(q)]).reshape(-1)
    qcodes = torch.randint(0, 256, (q * qw, 16), dtype=torch.uint8, generator=g)
    query, qword, qcodes = query.to(args.device), qword.to(args.device), qcodes.to(args.device)
    comparisons = int((offsets[qword.cpu() + 1] - offsets[qword.cpu()]).sum()) / q
    index.search_codes(query[:qw], qword[:qw], qcodes[:qw], 1, k=100)  # warm-up
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    index.search_codes(query, qword, qcodes, q, k=100)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"images": n, "words_per_image": per_image, "entries": entries, "device": args.device,
            "index_bytes": int(index.bytes_per_image() * n), "bytes_per_image": round(index.bytes_per_image(), 1),
            "build_s": round(build, 2), "queries": q, "query_words": qw, "comparisons_per_query": round(comparisons),
            "ms_per_query": round(1000 * seconds / q, 2)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("package", "simulated", "both"), default="both")
    p.add_argument("--db-images", type=int, default=200, help="package part: database images (default: %(default)s)")
    p.add_argument("--features", type=int, default=300, help="package part: features per image (default: %(default)s)")
    p.add_argument("--words", type=int, default=1024, help="package part: codebook size (default: %(default)s)")
    p.add_argument("--queries", type=int, default=20, help="queries searched (default: %(default)s)")
    p.add_argument("--images", type=int, default=100000, help="simulated part: images (default: %(default)s)")
    p.add_argument("--words-per-image", type=int, default=280,
                   help="simulated part: entries per image (default: %(default)s, HOW R18 on ROxford)")
    p.add_argument("--query-words", type=int, default=1000, help="simulated part: words per query (default: %(default)s)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="JSON file for the figures (default: print only)")
    args = p.parse_args(argv)
    report = {"threads": torch.get_num_threads()}
    if args.part in ("package", "both"):
        report["package"] = bench_package(args)
        print(json.dumps(report["package"]))
    if args.part in ("simulated", "both"):
        report["simulated"] = bench_simulated(args)
        print(json.dumps(report["simulated"]))
    if args.out:
        write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
