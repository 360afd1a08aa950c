"""Options generated from config dataclasses: one default, stated in the help with its source."""
import argparse
import dataclasses
from dataclasses import dataclass, field

import pytest

from gpu_dsm.asmk import ASMKConfig
from gpu_dsm.config_cli import add_options, config_from_args, given_flags, option_fields, option_help, parse_scales
from gpu_dsm.detect import DetectorConfig
from gpu_dsm.diffusion import DiffusionConfig
from gpu_dsm.eval.run_config import RunConfig
from gpu_dsm.extract import ExtractConfig
from gpu_dsm.global_descriptors import GlobalConfig
from gpu_dsm.graph import GraphConfig
from gpu_dsm.how import HOWConfig
from gpu_dsm.knn import SearchConfig
from gpu_dsm.match import MatchConfig
from gpu_dsm.pipeline import RetrievalConfig
from gpu_dsm.rerank import RerankConfig

CONFIGS = [ExtractConfig, GlobalConfig, DetectorConfig, MatchConfig, RerankConfig, GraphConfig, DiffusionConfig,
           SearchConfig, HOWConfig, ASMKConfig, RetrievalConfig, RunConfig]


@dataclass
class Toy:
    size: int = field(default=4, metadata={"flag": "--size", "help": "a size", "source": "paper 1"})
    mode: str = field(default="a", metadata={"flag": "--mode", "choices": ("a", "b"), "help": "a mode", "source": "ours"})
    weight: float = field(default=0.5, metadata={"flag": "--weight", "help": "weight of mode a", "source": "measured",
                                                 "needs": {"mode": ("a",)}})
    limit: int | None = field(default=None, metadata={"flag": "--limit", "type": int, "help": "a limit",
                                                      "default_text": "unbounded", "source": "ours"})
    fast: bool = field(default=True, metadata={"flag": "--no-fast", "help": "slow", "source": "ours"})
    hidden: int = 3

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"size must be >= 1, got {self.size}")


def _parse(*argv):
    parser = argparse.ArgumentParser()
    assert add_options(parser, Toy) == ["--size", "--mode", "--weight", "--limit", "--no-fast"]
    return parser, parser.parse_args(list(argv))


def test_absent_options_keep_the_dataclass_defaults_and_given_ones_replace_them():
    _, args = _parse()
    assert config_from_args(Toy, args) == Toy() and given_flags(Toy, args) == []
    _, args = _parse("--size", "7", "--no-fast", "--limit", "2")
    assert config_from_args(Toy, args) == Toy(size=7, fast=False, limit=2)
    assert given_flags(Toy, args) == ["--size", "--limit", "--no-fast"]
    assert config_from_args(Toy, args, Toy(hidden=9), mode="b").hidden == 9


def test_the_help_states_the_default_and_its_source():
    parser, _ = _parse()
    text = parser.format_help()
    assert "(default: 4; paper 1)" in text and "(default: unbounded; ours)" in text and "(default: on; ours)" in text


def test_an_option_without_effect_and_a_bad_value_name_the_option():
    _, args = _parse("--mode", "b", "--weight", "1")
    with pytest.raises(ValueError, match=r"^--weight has no effect with --mode b \(only with a\)$"):
        config_from_args(Toy, args)
    _, args = _parse("--size", "0")
    with pytest.raises(ValueError, match="^--size 0: size must be >= 1, got 0$"):
        config_from_args(Toy, args)


def test_scales_parse_roots():
    assert parse_scales("1,1/sqrt(2),0.5") == pytest.approx((1.0, 2 ** -0.5, 0.5))
    with pytest.raises(argparse.ArgumentTypeError):
        parse_scales("1,x")


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_option_of_the_library_has_help_a_source_and_a_shown_default(cls):
    names = {f.name for f in dataclasses.fields(cls)}
    for f in option_fields(cls):
        assert f.metadata["help"] and f.metadata["source"], f.name
        assert "(default: " in option_help(f) and "None" not in option_help(f), f.name
        assert set(f.metadata.get("needs", {})) <= names, f.name
