"""A saved retrieval and its index load in another process and rank identically; a user's own
top-k goes through DSM re-ranking and diffusion; mismatches are one-line errors naming them."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torchvision
from torch import nn

from gpu_dsm.asmk import ASMKConfig
from gpu_dsm.backbones.wrap import as_backbone
from gpu_dsm.detect import DetectorConfig
from gpu_dsm.diffusion import DiffusionConfig
from gpu_dsm.extract import ExtractConfig
from gpu_dsm.how import HOWConfig
from gpu_dsm.pipeline import DSMRetrieval, RetrievalConfig
from gpu_dsm.store import FeatureStore
from gpu_dsm.whitening import fit_pca_whitening

#: the network a user script builds: torchvision's resnet18 trunk, random weights from seed 0 (named,
#: so that HOW reads its last layer as it does a built resnet18's)
TRUNK = "as_backbone(nn.Sequential(*list(torchvision.models.resnet18(weights=None).children())[:-2]).eval(), name='resnet18')"


def trunk(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return eval(TRUNK, {"nn": nn, "torchvision": torchvision, "as_backbone": as_backbone})


def small_config(**changes) -> RetrievalConfig:
    """Small enough for the CPU: 160 px, two scales, HOW + ASMK with a 16-word codebook, diffusion;
    levels scaled per channel, as random weights give weak activations."""
    cfg = RetrievalConfig(extract=ExtractConfig(image_size=160, scales=(1.0, 0.75), progress=False),
                          detector=DetectorConfig(levels="channel_max"),
                          how=HOWConfig(image_size=160, num_features=60, progress=False),
                          asmk=ASMKConfig(codebook_size=16, kmeans_iterations=3), initial="asmk",
                          diffusion=DiffusionConfig())
    return dataclasses.replace(cfg, **changes)


@pytest.fixture(scope="module")
def photos(mini) -> dict[str, list[str]]:
    return {"database": [str(mini.image_path(name)) for name in mini.imlist[:10]],
            "queries": [str(mini.image_path(name)) for name in mini.qimlist[:2]]}


@pytest.fixture(scope="module")
def saved(photos, tmp_path_factory) -> dict:
    """A module with a learned whitening and an ASMK codebook, its index of 10 photos, saved."""
    net = trunk()
    learner = DSMRetrieval(net, small_config(initial="global", diffusion=None, rerank=None))
    whitening = fit_pca_whitening(learner.index(photos["database"]).global_descriptors, dim=8)
    retrieval = DSMRetrieval(net, small_config(), whitening=whitening).fit_asmk(photos["database"])
    index = retrieval.index(photos["database"])
    queries = retrieval.describe(photos["queries"], is_query=True)
    result = retrieval.search(queries, index)
    folder = tmp_path_factory.mktemp("saved") / "index"
    retrieval.save(folder, index)
    return {"retrieval": retrieval, "index": index, "queries": queries, "result": result, "folder": folder}


def test_a_saved_index_ranks_identically_in_a_fresh_process(saved, photos, tmp_path):
    """As a user's script: save, then in another process build the same network, load, search."""
    out = tmp_path / "ranks.json"
    script = textwrap.dedent(f"""
        import json, sys, torch, torchvision
        from torch import nn
        from gpu_dsm import DSMRetrieval, as_backbone
        torch.manual_seed(0)
        net = {TRUNK}
        retrieval = DSMRetrieval.load(sys.argv[1], net)
        index = retrieval.load_index(sys.argv[1])
        result = retrieval.search(json.loads(sys.argv[2]), index)
        ranks = {{name: r.tolist() for name, r in result.methods.items()}}
        json.dump({{"method": result.method, "ranks": ranks, "names": index.names,
                   "local": type(index.local).__name__}}, open(sys.argv[3], "w"))
    """)
    subprocess.run([sys.executable, "-c", script, str(saved["folder"]), json.dumps(photos["queries"]), str(out)],
                   check=True, timeout=300)
    loaded = json.loads(out.read_text())
    before = saved["result"]
    assert loaded["method"] == before.method == "asmk+dsm+D"
    assert set(loaded["ranks"]) == set(before.methods) == {"global", "global+dsm", "global+D", "global+dsm+D", "asmk",
                                                           "asmk+dsm", "asmk+dsm+D"}
    for name, ranks in before.methods.items():
        assert loaded["ranks"][name] == ranks.tolist(), name
    assert loaded["names"] == photos["database"] and loaded["local"] == "FeatureStore"
    # the methods differ somewhere, or the comparison could not tell them apart
    assert len({json.dumps(r) for r in loaded["ranks"].values()}) > 2


def test_a_loaded_module_holds_the_learned_state_and_the_index_its_parts(saved):
    retrieval = saved["retrieval"]
    loaded = DSMRetrieval.load(saved["folder"], trunk())
    for name in loaded.learned.NAMES:
        assert torch.equal(getattr(loaded.learned, name), getattr(retrieval.learned, name)), name
    assert loaded.config == retrieval.config
    index = loaded.load_index(saved["folder"])
    assert torch.equal(index.global_descriptors, saved["index"].global_descriptors)
    assert isinstance(index.local, FeatureStore) and index.graph is not None and index.asmk is not None
    assert torch.equal(index.graph.affinity.to_dense(), saved["index"].graph.affinity.to_dense())
    features = index.local.local_features([3, 7])
    expected = saved["index"].local[[3, 7]].trimmed()
    for name in ("xy", "frame", "strength", "channel", "scale", "valid", "map_sizes"):
        assert torch.equal(getattr(features, name), getattr(expected, name)), name


def test_a_given_top_k_goes_through_re_ranking_and_diffusion(saved, photos):
    """A full given ranking with the global similarities is the module's own global ranking: every
    later method agrees; a top-k is re-ranked and diffused within itself."""
    retrieval = DSMRetrieval.load(saved["folder"], trunk(), config=dataclasses.replace(saved["retrieval"].config,
                                                                                       initial="global"))
    index = retrieval.load_index(saved["folder"])
    queries = saved["queries"]
    own = retrieval.search(queries, index)
    given = retrieval.rerank(queries, index, own.similarities, own.initial)
    assert given.method == "given+dsm+D"
    for name in ("dsm", "D", "dsm+D"):
        assert torch.equal(given.methods[f"given+{name}"], own.methods[f"global+{name}"]), name
    # a user's (Q, K) top-k in another order, scores on any scale: only these images are described
    k = 6
    indices = own.initial[:, :k].flip(1)
    scores = torch.linspace(9.0, 4.0, k).expand(2, k).clone()
    from_index = retrieval.rerank(queries, index, scores, indices)
    assert set(from_index.methods) == {"given", "given+dsm", "given+D", "given+dsm+D"}
    for ranks in from_index.methods.values():
        assert ranks.shape == (2, k) and all(sorted(r) == sorted(i) for r, i in zip(ranks.tolist(), indices.tolist()))
    assert from_index.reranked.inliers.max() > 0
    from_images = retrieval.rerank(photos["queries"], photos["database"], scores, indices)
    for name, ranks in from_index.methods.items():
        assert torch.equal(from_images.methods[name], ranks), name
    # without diffusion only the images of the top-k are described: the others need not exist
    no_diffusion = DSMRetrieval(retrieval.backbone, dataclasses.replace(retrieval.config, diffusion=None),
                                whitening=retrieval.whitening)
    needed = set(indices.flatten().tolist())
    sparse = [path if i in needed else "/nonexistent/never-read.jpg" for i, path in enumerate(photos["database"])]
    reranked = no_diffusion.rerank(photos["queries"], sparse, scores.double(), indices.int())
    assert reranked.method == "given+dsm"
    assert torch.equal(reranked.ranks, from_index.methods["given+dsm"])
    assert torch.equal(reranked.reranked.inliers, from_index.reranked.inliers)


def test_a_store_backed_index_stays_memory_mapped_through_save_and_load(photos, tmp_path):
    net = trunk()
    cfg = small_config(initial="global")
    retrieval = DSMRetrieval(net, cfg)
    store = retrieval.write_store(photos["database"], tmp_path / "store", photos["database"], {"network": "trunk"})
    index = retrieval.index(FeatureStore(store.path))
    queries = retrieval.describe(photos["queries"], is_query=True)
    before = retrieval.search(queries, index)
    retrieval.save(tmp_path / "saved", index)
    loaded = retrieval.load_index(tmp_path / "saved")
    assert isinstance(loaded.local, FeatureStore) and loaded.names == photos["database"]
    after = retrieval.search(queries, loaded)
    for name, ranks in before.methods.items():
        assert torch.equal(after.methods[name], ranks), name


def _one_line_error(match: str, call) -> str:
    with pytest.raises(ValueError, match=match) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_format_config_backbone_and_learned_mismatches_are_named(saved, tmp_path):
    folder = saved["folder"]
    retrieval = saved["retrieval"]
    # backbone: another network's weights
    message = _one_line_error("backbone mismatch", lambda: DSMRetrieval.load(folder, trunk(seed=1)))
    assert "resnet18" in message
    _one_line_error("backbone mismatch", lambda: DSMRetrieval(trunk(seed=1), retrieval.config).load_index(folder))
    # config: a field that changes what the index holds; search-time fields may differ
    other = dataclasses.replace(retrieval.config, extract=dataclasses.replace(retrieval.config.extract, image_size=200))
    _one_line_error(r"config mismatch: extract.image_size is 160 in .*, 200 here", lambda: DSMRetrieval.load(folder, trunk(), other))
    _one_line_error("config mismatch: extract.image_size", lambda: DSMRetrieval(trunk(), other).load_index(folder))
    later = dataclasses.replace(retrieval.config, diffusion=None, query_batch=3,
                                extract=dataclasses.replace(retrieval.config.extract, progress=True))
    assert DSMRetrieval.load(folder, trunk(), later).config.diffusion is None
    # learned state: a module without the whitening the index was built with
    _one_line_error("learned state mismatch: .* whitening_projection", lambda: DSMRetrieval(trunk(), retrieval.config).load_index(folder))
    # format: not a saved retrieval, another format, another version
    _one_line_error("not a saved gpu_dsm retrieval", lambda: DSMRetrieval.load(tmp_path, trunk()))
    with pytest.raises(FileNotFoundError, match="saved retrieval not found"):
        DSMRetrieval.load(tmp_path / "missing", trunk())
    meta = json.loads((folder / "retrieval.json").read_text())
    for change, match in (({"format": "gpu_dsm.store"}, r"format mismatch: .*\(format 'gpu_dsm.store'"),
                          ({"version": 99}, "format mismatch: .* version 99")):
        copy = tmp_path / f"copy-{len(list(tmp_path.iterdir()))}"
        copy.mkdir()
        (copy / "retrieval.json").write_text(json.dumps({**meta, **change}))
        _one_line_error(match, lambda: DSMRetrieval.load(copy, trunk()))


def test_the_learned_state_file_holds_tensors_only(saved):
    """learned.pt is read with weights_only=True: a file holding code is refused."""
    state = torch.load(saved["folder"] / "learned.pt", weights_only=True)
    assert state["format"] == "gpu_dsm.retrieval_learned/1" and set(state) - {"format"} <= set(DSMRetrieval(None).learned.NAMES)
    assert all(isinstance(v, torch.Tensor) for k, v in state.items() if k != "format")


def test_a_given_ranking_is_checked(saved):
    retrieval = DSMRetrieval.load(saved["folder"], trunk(), config=dataclasses.replace(saved["retrieval"].config,
                                                                                       initial="global", diffusion=None))
    index = retrieval.load_index(saved["folder"])
    queries = saved["queries"]
    good = torch.tensor([[0, 1, 2], [3, 4, 5]])
    scores = torch.ones(2, 3)
    for bad, match in ((torch.tensor([[0, 1, 10], [3, 4, 5]]), r"in 0\.\.9"), (torch.tensor([[0, 1, 1], [3, 4, 5]]), "repeat"),
                       (good[:1], "1 rows for 2 queries")):
        _one_line_error(match, lambda: retrieval.rerank(queries, index, scores[:bad.shape[0]], bad))
    _one_line_error("finite", lambda: retrieval.rerank(queries, index, torch.full((2, 3), float("nan")), good))
    _one_line_error("one shape", lambda: retrieval.rerank(queries, index, torch.ones(2, 4), good))


@pytest.mark.parametrize("backend", ["faiss-flat", "faiss-hnsw"])
def test_a_faiss_search_index_is_saved_and_loaded(backend, photos, tmp_path, require):
    require("faiss", "the FAISS search backends")
    from gpu_dsm.knn import SearchConfig

    retrieval = DSMRetrieval(trunk(), small_config(initial="global", search=SearchConfig(backend=backend, ef_search=16)))
    index = retrieval.index(photos["database"])
    queries = retrieval.describe(photos["queries"], is_query=True)
    before = retrieval.search(queries, index)
    retrieval.save(tmp_path / "saved", index)
    assert (tmp_path / "saved" / "index" / "search.npy").is_file()
    loaded = retrieval.load_index(tmp_path / "saved")
    assert loaded.search_index.faiss_index is not None and loaded.search_index.database is None
    after = retrieval.search(queries, loaded)
    for name, ranks in before.methods.items():
        assert torch.equal(after.methods[name], ranks), name
    exact = dataclasses.replace(retrieval.config, search=SearchConfig())
    _one_line_error("config mismatch: search.backend", lambda: DSMRetrieval(trunk(), exact).load_index(tmp_path / "saved"))
