"""Precision that does not depend on the caller's global settings, for ASMK and MSER: the same
results under every TF32 / float32 matmul precision setting, with the products that need it run
in IEEE float32 and the caller's settings restored; float32 ASMK against the float64 loops; the
effect of a different summation order (what GPU atomics give) on ASMK scores and ranks."""
import dataclasses

import numpy as np
import pytest
import scipy.ndimage
import torch

from gpu_dsm.asmk import ASMKConfig, ASMKIndex, nearest_words, train_codebook
from gpu_dsm.kernels.precision import ieee_float32_matmul
from gpu_dsm.reference import asmk as reference_asmk
from gpu_dsm.mser import mser

_B = torch.backends
_SETTINGS = {"global": _B, "cuda.matmul": _B.cuda.matmul, "mkldnn.matmul": _B.mkldnn.matmul}


def _precisions() -> dict:
    return {name: obj.fp32_precision for name, obj in _SETTINGS.items()}


@pytest.fixture()
def restore_settings():
    saved = _precisions()
    yield
    for name, value in saved.items():
        _SETTINGS[name].fp32_precision = value


def _set(setting: str) -> None:
    kind, value = setting.split("=")
    if kind == "allow_tf32":
        _B.cuda.matmul.allow_tf32 = value == "True"
    elif kind == "matmul_precision":
        torch.set_float32_matmul_precision(value)
    else:
        _B.fp32_precision = value


SETTINGS = ["allow_tf32=True", "allow_tf32=False", "matmul_precision=highest", "matmul_precision=high",
            "matmul_precision=medium", "fp32_precision=tf32"]


def _clustered(num, dim, centres, g, spread):
    base = torch.randn(centres, dim, generator=g, dtype=torch.float64)
    pick = torch.randint(0, centres, (num,), generator=g)
    return torch.nn.functional.normalize(base[pick] + spread * torch.randn(num, dim, generator=g, dtype=torch.float64),
                                         dim=1)


def _float32_problem(seed, dim=64, words=48, images=60, queries=12, db_features=1200, q_features=240):
    """HOW-like float32 descriptors (unit rows, clustered), a codebook among them, image ids."""
    g = torch.Generator().manual_seed(seed)
    data = _clustered(words + db_features + q_features, dim, 30, g, 0.5).float()
    codebook, db, q = data[:words], data[words:words + db_features], data[words + db_features:]
    db_ids = torch.randint(0, images, (db_features,), generator=g)
    q_ids = torch.randint(0, queries, (q_features,), generator=g)
    return codebook, db, db_ids, q, q_ids, images, queries


def _asmk_run(codebook, db, db_ids, q, q_ids, images, queries):
    trained = train_codebook(db, 16, iterations=3, seed=0)
    index = ASMKIndex.build(codebook, db, db_ids, ASMKConfig(), images)
    scores, order = index.search(q, q_ids, num_queries=queries)
    return trained, scores, order


@pytest.mark.parametrize("setting", SETTINGS)
def test_asmk_does_not_depend_on_the_matmul_precision_settings(setting, restore_settings, monkeypatch):
    problem = _float32_problem(seed=1)
    want = _asmk_run(*problem)
    _set(setting)
    chosen = _precisions()
    seen = []
    mm = torch.mm

    def spy(*args, **kwargs):
        seen.append((_B.cuda.matmul.fp32_precision, _B.mkldnn.matmul.fp32_precision, args[0].dtype))
        return mm(*args, **kwargs)

    monkeypatch.setattr(torch, "mm", spy)
    got = _asmk_run(*problem)
    monkeypatch.undo()
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    # every float32 product of the assignment ran in IEEE float32, and the caller's settings are back
    assert seen and all(s[:2] == ("ieee", "ieee") for s in seen if s[2] == torch.float32)
    assert _precisions() == chosen


def test_the_precision_block_restores_the_settings_on_error(restore_settings):
    torch.set_float32_matmul_precision("medium")
    before = _precisions()
    with pytest.raises(RuntimeError, match="inside"):
        with ieee_float32_matmul():
            assert _B.cuda.matmul.fp32_precision == "ieee" and _B.mkldnn.matmul.fp32_precision == "ieee"
            raise RuntimeError("inside")
    assert _precisions() == before == {"global": before["global"], "cuda.matmul": "tf32", "mkldnn.matmul": "bf16"}


@pytest.mark.parametrize("setting", SETTINGS)
def test_mser_does_not_depend_on_the_matmul_precision_settings(setting, restore_settings):
    """MSER has no matrix products (its float arithmetic is elementwise single precision, as
    VLFeat's): every field of its regions is the same under every setting."""
    rng = np.random.default_rng(0)
    x = scipy.ndimage.gaussian_filter(rng.random((12, 24, 24)), (0, 1.5, 1.5))
    levels = torch.from_numpy(np.round((x - x.min()) / np.ptp(x) * 255).astype(np.int64))
    want = mser(levels, delta=4, polarity="both")
    _set(setting)
    got = mser(levels, delta=4, polarity="both")
    assert len(want) > 20
    for field in dataclasses.fields(want):
        a, b = getattr(got, field.name), getattr(want, field.name)
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, field.name


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_float32_asmk_against_the_float64_loops(seed):
    """Production passes float32 descriptors. Against the plain float64 loops on the same values:
    the nearest words are the same (float32 products are IEEE, see above; a float32 bracket can
    only reorder words whose squared distances differ by less than ~1e-6), residual sums and codes
    are float64, so the scores agree to 1e-12 and all 12 rankings are identical (3 seeds)."""
    codebook, db, db_ids, q, q_ids, images, queries = _float32_problem(seed)
    assert db.dtype == torch.float32
    index = ASMKIndex.build(codebook, db, db_ids, ASMKConfig(), images)
    scores, order = index.search(q, q_ids, num_queries=queries)
    ours = torch.zeros(queries, images, dtype=torch.float64).scatter_(1, order, scores).numpy()
    want = reference_asmk.scores(codebook.double().numpy(), db.double().numpy(), db_ids.tolist(), images,
                                 q.double().numpy(), q_ids.tolist(), queries)
    assert torch.equal(nearest_words(q, codebook, 5)[0], nearest_words(q.double(), codebook.double(), 5)[0])
    assert (want > 0).sum() > queries * images // 4
    np.testing.assert_allclose(ours, want, rtol=0, atol=1e-12)
    for row in range(queries):
        assert order[row].tolist() == sorted(range(images), key=lambda i: (-want[row, i], i))


@pytest.mark.parametrize("binary", [True, False])
def test_summation_order_changes_scores_in_the_last_bits_only(binary):
    """On a GPU the tensor path's ``index_add_`` (atomics) sums an image's word scores in any
    order. Here the entries of every word are shuffled, which changes the order of the sums: the
    float64 scores move by at most 1e-13 (each sum has at most a few hundred terms in [-1, 1]),
    and a ranking can change only between images whose scores differ by less than that: none
    here, and ties of exactly equal sums stay in the database order."""
    codebook, db, db_ids, q, q_ids, images, queries = _float32_problem(seed=4)
    cfg = ASMKConfig(binary=binary, search_backend="torch")
    index = ASMKIndex.build(codebook, db, db_ids, cfg, images)
    g = torch.Generator().manual_seed(0)
    shuffle = torch.cat([int(a) + torch.randperm(int(b) - int(a), generator=g)
                         for a, b in zip(index.offsets[:-1], index.offsets[1:])])
    assert not torch.equal(shuffle, torch.arange(index.num_entries))
    shuffled = dataclasses.replace(index, image_ids=index.image_ids[shuffle], codes=index.codes[shuffle])
    scores, order = index.search(q, q_ids, num_queries=queries)
    s_scores, s_order = shuffled.search(q, q_ids, num_queries=queries)
    full = torch.zeros(queries, images, dtype=torch.float64).scatter_(1, order, scores)
    s_full = torch.zeros(queries, images, dtype=torch.float64).scatter_(1, s_order, s_scores)
    assert (full - s_full).abs().max() <= 1e-13
    gaps = (scores[:, :-1] - scores[:, 1:])
    assert bool((gaps[gaps > 0] > 1e-13).all())  # no near-ties that a 1e-13 change could swap
    assert torch.equal(order, s_order)


@pytest.mark.parametrize("setting", SETTINGS)
def test_how_reduction_runs_in_ieee_float32_under_every_setting(setting, restore_settings, monkeypatch):
    """HOW's 1x1 reduction (the descriptors ASMK assigns to words) is an IEEE float32 product
    whatever the caller set, equal to the float64 product within float32 rounding, and the
    caller's settings are back afterwards."""
    from gpu_dsm.how import reduce_map
    from gpu_dsm.whitening import Whitening

    g = torch.Generator().manual_seed(11)
    maps = torch.rand(2, 40, 5, 6, generator=g) * 6
    whitening = Whitening(projection=torch.randn(40, 40, generator=g), bias=torch.randn(40, generator=g))
    baseline = reduce_map(maps, whitening, 16)
    _set(setting)
    before = _precisions()
    seen = []
    einsum = torch.einsum

    def recording_einsum(*args):
        seen.append((_B.cuda.matmul.fp32_precision, _B.mkldnn.matmul.fp32_precision))
        return einsum(*args)

    monkeypatch.setattr(torch, "einsum", recording_einsum)
    reduced = reduce_map(maps, whitening, 16)
    assert seen == [("ieee", "ieee")]
    assert _precisions() == before
    assert torch.equal(reduced, baseline)
    exact = torch.einsum("dk,bkhw->bdhw", whitening.projection[:16].double(), maps.double()) + whitening.bias[:16, None, None].double()
    torch.testing.assert_close(reduced.double(), exact, rtol=1e-5, atol=1e-4)
