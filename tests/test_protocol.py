import numpy as np
import pytest

from gpu_dsm.eval.protocol import compute_ap, compute_map, evaluate_revisited


def revisitop_compute_map(ranks, gnd, kappas=(1, 5, 10)):
    """A literal port of revisitop's compute_map (ranks: (num_db, num_queries)), as the oracle."""
    m, nq, nempty = 0.0, len(gnd), 0
    aps = np.zeros(nq)
    pr = np.zeros(len(kappas))
    prs = np.zeros((nq, len(kappas)))
    for i in range(nq):
        qgnd = np.array(gnd[i]["ok"])
        if qgnd.shape[0] == 0:
            aps[i] = float("nan")
            prs[i, :] = float("nan")
            nempty += 1
            continue
        try:
            qgndj = np.array(gnd[i]["junk"])
        except KeyError:
            qgndj = np.empty(0)
        pos = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgnd)]
        junk = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgndj)]
        k, ij = 0, 0
        if len(junk):
            ip = 0
            while ip < len(pos):
                while ij < len(junk) and pos[ip] > junk[ij]:
                    k += 1
                    ij += 1
                pos[ip] = pos[ip] - k
                ip += 1
        ap = 0
        for j in range(len(pos)):
            rank = pos[j]
            p0 = 1.0 if rank == 0 else float(j) / rank
            p1 = float(j + 1) / (rank + 1)
            ap += (p0 + p1) * (1.0 / len(qgnd)) / 2.0
        m += ap
        aps[i] = ap
        pos += 1
        for j in range(len(kappas)):
            kq = min(max(pos), kappas[j])
            prs[i, j] = (pos <= kq).sum() / kq
        pr += prs[i, :]
    return m / (nq - nempty), aps, pr / (nq - nempty), prs


def test_hand_computed_ap():
    # positives at ranks 0 and 2 of 2: (1 + 1)/2/2 + (1/2 + 2/3)/2/2 = 0.5 + 0.2917
    assert compute_ap(np.array([0, 2]), 2) == pytest.approx(0.5 + (0.5 + 2 / 3) / 4)
    # one of two positives found, at rank 0: half the recall
    assert compute_ap(np.array([0]), 2) == pytest.approx(0.5)
    # perfect ranking
    assert compute_ap(np.arange(5), 5) == pytest.approx(1.0)


def test_junk_is_skipped():
    ranking = np.array([[7, 3, 5, 1, 0]])  # junk 7 and 3 in front of positive 5
    mean_ap, _, mean_pr, _ = compute_map(ranking, [[5]], [[7, 3]], kappas=(1,))
    assert mean_ap == pytest.approx(1.0) and mean_pr[0] == pytest.approx(1.0)
    mean_ap, *_ = compute_map(ranking, [[5]], [[]], kappas=(1,))
    assert mean_ap == pytest.approx((0 / 2 + 1 / 3) / 2)  # j=0 at rank 2: (p0 + p1) / 2


def test_setups_and_empty_queries():
    gnd = [
        {"easy": [0], "hard": [1], "junk": [2]},
        {"easy": [], "hard": [3], "junk": []},  # no easy positive: left out of E
    ]
    ranks = np.array([[1, 0, 2, 3], [3, 0, 1, 2]])
    res = evaluate_revisited(ranks, gnd)
    # E, query 0: hard image 1 is junk, easy 0 first -> AP 1; query 1 has no easy positive
    assert res["mAP"]["E"] == pytest.approx(100.0)
    assert res["AP"]["E"][1] is None
    # H, query 0: positive 1 first -> 1; query 1: positive 3 first -> 1
    assert res["mAP"]["H"] == pytest.approx(100.0)
    # M, query 0: positives {0,1} at 0,1 -> 1; query 1: 3 at 0 -> 1
    assert res["mAP"]["M"] == pytest.approx(100.0)
    worse = evaluate_revisited(np.array([[2, 3, 0, 1], [0, 1, 2, 3]]), gnd)
    assert worse["mAP"]["M"] < 60 and worse["mP@1"]["H"] == 0.0


def test_matches_revisitop_on_random_rankings():
    rng = np.random.default_rng(0)
    nq, ndb = 12, 60
    gnd = []
    for _ in range(nq):
        perm = rng.permutation(ndb)
        gnd.append({"easy": perm[:rng.integers(0, 6)].tolist(), "hard": perm[6:6 + rng.integers(0, 5)].tolist(),
                    "junk": perm[12:12 + rng.integers(0, 8)].tolist()})
    ranks = np.stack([rng.permutation(ndb) for _ in range(nq)])
    for setup, keys, junk_keys in [("E", ["easy"], ["junk", "hard"]), ("M", ["easy", "hard"], ["junk"]),
                                   ("H", ["hard"], ["junk", "easy"])]:
        oracle_gnd = [{"ok": sum((g[k] for k in keys), []), "junk": sum((g[k] for k in junk_keys), [])} for g in gnd]
        m, aps, pr, _ = revisitop_compute_map(ranks.T.copy(), oracle_gnd)
        res = evaluate_revisited(ranks, gnd)
        assert res["mAP"][setup] == pytest.approx(round(100 * m, 2))
        for k, v in zip((1, 5, 10), pr):
            assert res[f"mP@{k}"][setup] == pytest.approx(round(100 * v, 2))


def test_bad_shapes():
    with pytest.raises(ValueError, match="num_queries=2"):
        evaluate_revisited(np.zeros((3, 4), dtype=int), [{"easy": [0]}, {"easy": [1]}])
