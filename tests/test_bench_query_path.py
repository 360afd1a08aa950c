"""The 1M query-path benchmark's parts on a small simulated database drawn from real tables
(EfficientNet-Lite0 features of roxford5k-mini photos): the simulated store holds exactly the
source images' tables, the graph is what its docstring says, and the query path verifies the
gathered candidates exactly as verifying the source tables directly does."""
import json

import numpy as np
import pytest
import scipy.sparse
import torch
from scipy.sparse.csgraph import connected_components

from gpu_dsm import cli
from gpu_dsm.diffusion import DiffusionConfig
from gpu_dsm.ranking import diffuse_verified
from gpu_dsm.rerank import DSMReranker, RerankConfig
from gpu_dsm.knn import GlobalIndex
from gpu_dsm.store import FeatureStore, StoreWriter
from gpu_dsm.eval import bench_query_path as bench

from conftest import TINY

pytestmark = pytest.mark.data


@pytest.fixture()
def sources(tmp_path, tiny_root):
    out = tmp_path / "stores"
    assert cli.main(["extract", "--data-root", str(tiny_root), "--dataset", TINY, "--image-size", "256",
                     "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    stores = {p.name.split("-")[1]: FeatureStore(p) for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")}
    return stores["database"], stores["queries"]


def test_simulated_store_holds_the_source_tables(tmp_path, sources):
    db, _ = sources
    made = bench.simulate_store(tmp_path / "sim", db, 2000, cluster_size=100, seed=3)
    sim = FeatureStore(tmp_path / "sim")
    assert sim.num_images == 2000 and sim.meta["global_dim"] == db.meta["global_dim"]
    picked = np.array([0, 1, 777, 1999, 1024, 5])
    a = sim.local_features(picked)
    b = db.local_features(made["source_image"][picked].numpy())
    for name in a._TENSORS:
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert np.array_equal(sim.feature_counts(), db.feature_counts()[made["source_image"].numpy()])
    descriptors = sim.global_descriptors()
    assert torch.allclose(descriptors.norm(dim=1), torch.ones(2000), atol=1e-5)
    # clustered: an image is closer to its own cluster's centre than to any other
    centres = torch.nn.functional.normalize(made["centres"], dim=1)
    assert torch.equal((descriptors @ centres.T).argmax(1), made["labels"])


def test_simulated_graph_is_symmetric_normalised_and_connected():
    labels = torch.randint(0, 10, (1000,), generator=torch.Generator().manual_seed(0))
    graph = bench.simulate_graph(labels, degree=20, cross_fraction=0.1, seed=1)
    s = graph.affinity.to_dense().double()
    # the same edges both ways, weights equal up to float32 rounding of the normalisation
    assert torch.equal(s > 0, s.T > 0) and torch.allclose(s, s.T, rtol=1e-6, atol=0) and not s.diagonal().any()
    degree = (s > 0).sum(1).float()
    assert 15 < degree.mean() < 21 and degree.min() > 0
    # S = D^-1/2 W D^-1/2 of a graph without isolated nodes has largest eigenvalue 1
    assert abs(float(torch.linalg.eigvalsh(s).max()) - 1.0) < 1e-6  # float32 weights
    rows, cols = s.nonzero().T
    assert 0.8 < (labels[rows] == labels[cols]).float().mean() < 0.95
    # the cross-cluster edges join the clusters into one component
    assert connected_components(scipy.sparse.csr_matrix(s.numpy()), directed=False)[0] == 1


def test_query_path_verifies_what_the_source_tables_give(tmp_path, sources):
    db, queries = sources
    sim = bench.prepare(tmp_path / "work", db, 3000, 100, 0.7, 20, 0.1, seed=0, log=lambda *_: None)
    index = GlobalIndex.build(sim.store.global_descriptors())
    generator = torch.Generator().manual_seed(5)
    labels = torch.randint(0, sim.centres.shape[0], (3,), generator=generator)
    q_global = bench.simulated_descriptors(labels, sim.centres, 0.7, generator)
    q_tables = queries.local_features([0, 1, 0])
    run = bench.query_path(sim.store, index, sim.graph, q_global, q_tables, top_k=30, output_k=50, batch=2)
    assert run["indices"].shape == (3, 30) and run["ranking"].shape == (3, 50)
    assert all(s > 0 for s in run["seconds"].values())
    # the same as verifying the top 30 by the global descriptors with the source images' tables
    sims, top = index.search(q_global, 30)
    tables = db.local_features(sim.source_image[top.reshape(-1)].numpy())
    direct = DSMReranker(RerankConfig(top_k=30))(q_tables, tables, sims, top)
    assert torch.equal(direct.indices, run["indices"]) and torch.equal(direct.inliers, run["inliers"])
    assert run["inliers"].max() > 0
    # the final ranking: the library's global+dsm+D of the searched top 50, the best verified candidate near the top
    sims50, top50 = index.search(q_global, 50)
    ranks = torch.cat([direct.indices, top50[:, 30:]], dim=1)
    expected, _ = diffuse_verified(sim.graph, sims50, direct, ranks, DiffusionConfig())
    assert torch.equal(run["ranking"], expected)
    for q in range(3):
        if run["inliers"][q, 0] > 0:
            assert run["indices"][q, 0] in run["ranking"][q, :10]
    # prepared again with the same parameters: reused, same draw
    again = bench.prepare(tmp_path / "work", db, 3000, 100, 0.7, 20, 0.1, seed=0, log=lambda *_: None)
    assert again.timings == {} and torch.equal(again.source_image, sim.source_image)


def test_the_benchmark_reports_every_stage(tmp_path, sources):
    db, queries = sources
    out = tmp_path / "qp.json"
    report = bench.main(["--device", "cpu", "--source-db", str(db.path), "--source-queries", str(queries.path),
                         "--images", "2000", "--queries", "3", "--batch", "2", "--cluster-size", "100",
                         "--work", str(tmp_path / "work"), "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["ms_per_query"] == report["ms_per_query"]
    stages = ("search", "gather", "verify", "diffuse", "rank")
    assert all(saved["ms_per_query"][s] > 0 for s in stages)
    assert saved["disk_bytes"]["store"] == sum(f.stat().st_size for f in (tmp_path / "work" / "store").iterdir())
    assert saved["graph_nodes"] == 2000 and saved["cg_iterations"] and saved["prepare"]["write_store_s"] >= 0
    assert saved["search"] == "exact" and saved["recall_vs_exact"] is None
    # a second run reuses the simulated database; an approximate search reports its recall on the same queries
    again = bench.main(["--device", "cpu", "--source-db", str(db.path), "--source-queries", str(queries.path),
                        "--images", "2000", "--queries", "1", "--cluster-size", "100", "--work", str(tmp_path / "work"),
                        "--search", "compact", "--shortlist", "1000"])
    assert again["prepare"] == {} and again["search_config"]["shortlist"] == 1000
    assert set(again["recall_vs_exact"]) == {"at_100", "at_1000"} and again["recall_vs_exact"]["at_100"] == 1.0


def test_bad_sources_are_named(tmp_path):
    with StoreWriter(tmp_path / "global-only", ["a", "b"], 4, {}) as writer:
        writer.add_global(0, torch.ones(4))
        writer.add_global(1, torch.ones(4))
    with pytest.raises(ValueError, match="holds no local features"):
        bench.simulate_store(tmp_path / "sim", FeatureStore(tmp_path / "global-only"), 10)
    with pytest.raises(SystemExit, match="need local features"):
        bench.main(["--device", "cpu", "--source-db", str(tmp_path / "global-only"), "--source-queries",
                    str(tmp_path / "global-only"), "--work", str(tmp_path / "work"), "--images", "10"])
    assert not (tmp_path / "sim").exists() and not (tmp_path / "work").exists()
