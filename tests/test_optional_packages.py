"""The optional packages CI installs (faiss-cpu, asmk): a test that needs one skips where it is
missing, and fails under CI=true, naming the package (tests/conftest.py)."""
import pytest


def test_a_missing_package_fails_under_ci_and_skips_elsewhere(require, monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no_such_module_x is not installed .* CI installs it"):
        require("no_such_module_x", "a test's oracle")
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match="no_such_module_x is not installed .*: a test's oracle"):
        require("no_such_module_x", "a test's oracle")
    assert require("json", "present").dumps([1]) == "[1]"


def test_the_asmk_oracle_check_fails_under_ci_when_missing(monkeypatch, request):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "asmk" else real(name, *a))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="asmk package or faiss is not installed"):
        request.getfixturevalue("asmk_oracle")
