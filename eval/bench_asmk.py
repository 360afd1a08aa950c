"""ASMK benchmarks: our batched search against the authors' ``asmk`` package on the same database
and codebook, and a simulated large inverted file.

    python -m gpu_dsm.eval.bench_asmk --out asmk.json                      # both parts
    python -m gpu_dsm.eval.bench_asmk --part simulated --images 1000000    # the 1M-image inverted file

``package``: a database and queries, clustered synthetic 128-D descriptors (``--db-images`` x
``--features``) or real HOW descriptors (``--descriptors``), a codebook (trained by our k-means,
or ``--codebook``), then the index built and all queries searched by both implementations (the
``asmk`` package only where it is installed: ``pip install asmk faiss-cpu``). Stages timed apart
(best of 3, all queries at once): quantisation + aggregation, and the inverted-file search by
each scoring backend (``torch``; ``native``, the C kernel, where it builds); the package's
per-query loop timed the same way; the ratios of the stages and of the whole query. Scores are
compared where the package's normaliser is ASMK's (``d`` a multiple of 32; they agree up to
float32 rounding in the package: it sums residuals and quantises in float32). ``simulated``: an
inverted file of ``--images`` images with ``--words-per-image`` entries each over 65,536 words
of equal expected frequency and random 128-bit codes, searched by ``--queries`` queries of
``--query-words`` words (all at once, and one alone; best of 3) by each backend: memory per
image and ms per query. Figures are
written as JSON; no timing is asserted anywhere.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
import time

import numpy as np
import torch

from gpu_dsm.asmk import ASMKConfig, ASMKIndex, aggregate_residuals, train_codebook
from gpu_dsm.asmk.codes import binary_codes
from gpu_dsm.io import write_json
from gpu_dsm.eval.timing import sync


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


def _descriptors(args, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """``(db (F, d), db_ids, queries, query_ids, source)``: from a HOW features file
    (``--descriptors``: the first ``--db-images`` images are the database, the last ``--queries``
    the queries) or clustered synthetic 128-D descriptors."""
    n, f, q = args.db_images, args.features, args.queries
    if args.descriptors:
        from gpu_dsm.how import HOWFeatures

        how = HOWFeatures.load(args.descriptors)
        if how.num_images < n + q:
            raise ValueError(f"--descriptors {args.descriptors}: {how.num_images} images, fewer than --db-images {n} + "
                             f"--queries {q}")
        ids = how.image_ids
        db, query = ids < n, ids >= how.num_images - q
        return (how.descriptors[db].float(), ids[db], how.descriptors[query].float(), ids[query] - (how.num_images - q),
                str(args.descriptors))
    db = _clustered(n * f, 128, args.words * 2, generator)
    db_ids = torch.arange(n).repeat_interleave(f)
    queries = db[torch.randperm(n * f, generator=generator)[: q * f]] + 0.1 * torch.randn(q * f, 128, generator=generator)
    return db, db_ids, queries, torch.arange(q).repeat_interleave(f), "synthetic"


def _timed(step, repeats: int = 3) -> float:
    """Best of ``repeats`` wall-clock seconds of ``step()`` (after one warm-up call)."""
    step()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    return best


def bench_package(args) -> dict:
    g = torch.Generator().manual_seed(0)
    db, db_ids, queries, q_ids, source = _descriptors(args, g)
    n, q = int(db_ids.max()) + 1, int(q_ids.max()) + 1
    cfg = ASMKConfig(codebook_size=args.words)
    start = time.perf_counter()
    if args.codebook:
        codebook = torch.load(args.codebook, weights_only=True)["codebook"].float()
    else:
        codebook = train_codebook(db[: min(db.shape[0], 50 * args.words)], args.words, iterations=cfg.kmeans_iterations,
                                  seed=cfg.seed)
    cfg = dataclasses.replace(cfg, codebook_size=codebook.shape[0])
    out = {"descriptors": source, "db_images": n, "features_per_image": round(db.shape[0] / n, 1), "queries": q,
           "dim": int(codebook.shape[1]), "words": int(codebook.shape[0]),
           "codebook_s": round(time.perf_counter() - start, 2)}
    start = time.perf_counter()
    index = ASMKIndex.build(codebook, db, db_ids, cfg)
    out["ours_build_s"] = round(time.perf_counter() - start, 3)
    # the two stages apart (best of 3): quantisation + aggregation of the queries, then the
    # inverted-file search, by each scoring backend; all queries at once
    vectors = aggregate_residuals(queries, q_ids, codebook, cfg.query_assignments, cfg.memory_budget)
    codes = binary_codes(vectors.vector)
    aggregate_s = _timed(lambda: binary_codes(aggregate_residuals(queries, q_ids, codebook, cfg.query_assignments,
                                                                  cfg.memory_budget).vector))
    out["ours_quantize_aggregate_ms_per_query"] = round(1000 * aggregate_s / q, 3)
    backends = ["torch"] + (["native"] if _native_builds() else [])
    for backend in backends:
        ours = dataclasses.replace(index, config=dataclasses.replace(cfg, search_backend=backend))
        seconds = _timed(lambda: ours.search_codes(vectors.image, vectors.word, codes, q))
        out[f"ours_search_ms_per_query_{backend}"] = round(1000 * seconds / q, 3)
    best = out[f"ours_search_ms_per_query_{backends[-1]}"]
    out["ours_search_backend"] = backends[-1]
    out["ours_ms_per_query"] = round(out["ours_quantize_aggregate_ms_per_query"] + best, 3)
    lengths = index.offsets[vectors.word + 1] - index.offsets[vectors.word]
    out["comparisons_per_query"] = round(int(lengths.sum()) / q)
    out["query_words"] = round(vectors.word.numel() / q, 1)
    out["bytes_per_image"] = round(index.bytes_per_image(), 1)
    out["words_per_image"] = round(index.num_entries / n, 1)
    if importlib.util.find_spec("asmk") is None:
        out["package"] = "not installed (pip install asmk faiss-cpu)"
        return out
    scores, order = index.search(queries, q_ids)
    build, search, theirs, stages = _package_search(codebook.numpy(), db.numpy(), db_ids.numpy(), queries.numpy(),
                                                    q_ids.numpy(), cfg)
    ours_full = torch.zeros(q, n, dtype=torch.float64).scatter_(1, order, scores).numpy()
    package_search = 1000 * stages["search"] / q
    out.update(package_build_s=round(build, 3), package_ms_per_query=round(1000 * search / q, 2),
               package_quantize_aggregate_ms_per_query=round(1000 * stages["quantize_aggregate"] / q, 2),
               package_search_ms_per_query=round(package_search, 2))
    out["speedup_search_stage"] = {b: round(package_search / out[f"ours_search_ms_per_query_{b}"], 1) for b in backends}
    out["speedup_quantize_aggregate"] = round(out["package_quantize_aggregate_ms_per_query"]
                                              / out["ours_quantize_aggregate_ms_per_query"], 1)
    out["speedup_total"] = round(out["package_ms_per_query"] / out["ours_ms_per_query"], 1)
    if codebook.shape[1] % 32 == 0:
        # the package divides Hamming distances by 32 ceil(d / 32): its scores are ASMK's only then
        out["max_abs_score_difference"] = float(np.abs(ours_full - theirs).max())
    out["top100_agreement"] = float(np.mean([len(set(np.argsort(-theirs[i], kind="stable")[:100])
                                                 & set(order[i, :100].tolist())) / min(100, n) for i in range(q)]))
    return out


def _native_builds() -> bool:
    from gpu_dsm.kernels.inverted_file import unavailable

    return unavailable() is None


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
    out = {"images": n, "words_per_image": per_image, "entries": entries, "device": args.device,
           "index_bytes": int(index.bytes_per_image() * n), "bytes_per_image": round(index.bytes_per_image(), 1),
           "build_s": round(build, 2), "queries": q, "query_words": qw, "comparisons_per_query": round(comparisons)}
    backends = ["torch"] + (["native"] if index.device.type == "cpu" and _native_builds() else [])
    for backend in backends:
        ours = dataclasses.replace(index, config=dataclasses.replace(index.config, search_backend=backend))
        for batch in sorted({1, q}):
            rows = slice(0, batch * qw)

            def step():
                ours.search_codes(query[rows], qword[rows], qcodes[rows], batch, k=100)
                sync(args.device)

            key = "ms_per_query" if batch == q else "ms_one_query"
            out[f"{key}_{backend}"] = round(1000 * _timed(step) / batch, 2)
    out["ms_per_query"] = out[f"ms_per_query_{backends[-1]}"]
    if importlib.util.find_spec("asmk") is not None and index.device.type == "cpu":
        out.update(_package_on_index(index, query, qword, qcodes, q, out[f"ms_per_query_{backends[-1]}"]))
    return out


def _package_on_index(index: ASMKIndex, query: torch.Tensor, word: torch.Tensor, codes: torch.Tensor, queries: int,
                      ours_ms: float) -> dict:
    """The package's inverted-file search (``asmk.inverted_file.IVF.search``, its loop over a
    query's words) over our inverted file's own arrays (per-word views, no copy; its codes are
    32-bit words, its normaliser ``32 ceil(d / 32)`` is ``d`` here), one query at a time with the
    same query codes: ms per query, the ratio, and the largest difference of the top-100 scores."""
    import functools

    from asmk.inverted_file import IVF
    from asmk.kernel import ASMKKernel

    cfg = index.config
    bounds = index.offsets.tolist()
    vectors, ids = index.codes.numpy().view(np.uint32), index.image_ids.numpy()
    ivf = IVF(norm_factor=index.image_words.double().numpy(), n_images=index.num_images,
              ivf_vecs=[vectors[a:b] for a, b in zip(bounds[:-1], bounds[1:])],
              ivf_image_ids=[ids[a:b] for a, b in zip(bounds[:-1], bounds[1:])],
              counts=np.diff(bounds).astype(np.int32), idf=np.ones(index.num_words, dtype=np.float32), imid_offset=0,
              use_idf=False)
    similarity = functools.partial(ASMKKernel(None, binary=True).similarity, alpha=cfg.alpha,
                                   similarity_threshold=cfg.tau)
    query_codes, words, owner = codes.numpy().view(np.uint32), word.numpy(), query.numpy()
    ours_scores, _ = index.search_codes(query, word, codes, queries, k=100)
    seconds, difference = 0.0, 0.0
    for q in range(queries):
        rows = owner == q
        start = time.perf_counter()
        _, scores = ivf.search(query_codes[rows], words[rows], similarity_func=similarity, topk=100)
        seconds += time.perf_counter() - start
        difference = max(difference, float(np.abs(np.asarray(scores) - ours_scores[q, :len(scores)].numpy()).max()))
    package_ms = 1000 * seconds / queries
    return {"package_ms_per_query": round(package_ms, 2), "speedup_search": round(package_ms / ours_ms, 1),
            "package_max_abs_top100_score_difference": difference}


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
    p.add_argument("--descriptors", default=None, metavar="HOW_FILE",
                   help="package part: a HOW features file (gpu-dsm extract --initial asmk writes them): its first "
                        "--db-images images are the database, its last --queries images the queries (default: clustered "
                        "synthetic 128-D descriptors, --features per image)")
    p.add_argument("--codebook", default=None, metavar="FILE",
                   help="package part: an ASMK codebook file (asmk-codebook-*.pt of an evaluation's cache) instead of "
                        "training --words words on the database (default: trained)")
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
