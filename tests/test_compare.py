"""Paired comparison of methods: mean AP difference, bootstrap interval over query groups, gains and losses."""
import json

import numpy as np

from gpu_dsm.cli import main
from gpu_dsm.eval.compare import paired_bootstrap, query_groups


def _report(aps_m, names):
    entry = {"AP": {"E": list(aps_m), "M": list(aps_m), "H": [None] * len(aps_m)}}
    return {"queries": names, "results": {"global": entry}}


def test_query_groups_follow_landmarks():
    groups = query_groups(["all_souls_000013", "all_souls_000026", "ashmolean_000058", "100000", "100100"])
    assert groups[0] == groups[1] and len(set(groups.tolist())) == 4


def test_paired_bootstrap_hand_checked():
    a = np.array([50.0, 60.0, 70.0, np.nan])
    b = np.array([55.0, 58.0, 80.0, 10.0])
    r = paired_bootstrap(a, b, np.arange(4), samples=2000)
    assert r["queries"] == 3 and r["delta"] == (5 - 2 + 10) / 3
    assert (r["gain"], r["loss"], r["tie"]) == (2, 1, 0)
    assert r["ci"][0] <= r["delta"] <= r["ci"][1] and r["ci"][0] >= -2 and r["ci"][1] <= 10
    constant = paired_bootstrap(a[:3], a[:3] + 1.5, np.zeros(3), samples=100)
    assert constant["ci"] == [1.5, 1.5]


def test_compare_command(tmp_path, capsys):
    names = ["a_1", "a_2", "b_1"]
    (tmp_path / "x.json").write_text(json.dumps(_report([10.0, 20.0, 30.0], names)))
    (tmp_path / "y.json").write_text(json.dumps(_report([12.0, 20.0, 27.0], names)))
    assert main(["compare", str(tmp_path / "x.json"), str(tmp_path / "y.json"), "--methods", "global", "global",
                 "--out", str(tmp_path / "c.json")]) == 0
    printed = capsys.readouterr().out
    assert "M            3    -0.33" in printed and "H            0" in printed
    saved = json.loads((tmp_path / "c.json").read_text())
    assert saved["setups"]["M"]["per_query"] == [2.0, 0.0, -3.0] and saved["setups"]["M"]["groups"] == 2
    assert main(["compare", str(tmp_path / "x.json"), "--methods", "global", "global+dsm"]) == 2
    assert "method 'global+dsm' is not in the results" in capsys.readouterr().err
