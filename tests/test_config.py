"""SpecConfig validation: bad values fail at construction, naming the field and the fix."""

from __future__ import annotations

import pytest

from specplug import SpecConfig
from specplug.config import parse_tree_spec


def error_of(**kw) -> str:
    with pytest.raises(ValueError) as info:
        SpecConfig(**kw)
    return str(info.value)


def test_defaults_and_drafter_options():
    cfg = SpecConfig(method="ngram", prompt_lookup_max=3)
    assert cfg.num_speculative_tokens == 32 and cfg.tree == "chain"  # ngram's own default
    assert SpecConfig(method="layer_skip").num_speculative_tokens == 4
    assert cfg.acceptance_method == "rejection_sampler"  # lossless by default
    assert cfg.drafter_options.prompt_lookup_max == 3
    assert cfg.describe()["prompt_lookup_max"] == 3


def test_unknown_method_lists_registered():
    msg = error_of(method="eagle9")
    assert "unknown speculative method 'eagle9'" in msg
    for name in ("ngram", "draft_model", "layer_skip"):
        assert name in msg


@pytest.mark.parametrize("k", [0, -3])
def test_token_counts_must_be_positive(k):
    msg = error_of(method="ngram", num_speculative_tokens=k)
    assert "num_speculative_tokens" in msg and "greater than or equal to 1" in msg


def test_unknown_drafter_option_is_named_with_the_allowed_ones():
    msg = error_of(method="ngram", prompt_lookup_maxx=3)
    assert "prompt_lookup_maxx" in msg and "prompt_lookup_max" in msg


def test_drafter_option_values_are_checked():
    assert "prompt_lookup_min (5) must be <=" in error_of(method="ngram", prompt_lookup_min=5,
                                                          prompt_lookup_max=2)
    assert "layers must be >= 1" in error_of(method="layer_skip", layers=0)


@pytest.mark.parametrize("paths, needle", [
    ([], "at least one path"),
    ([[0, 1]], "no parent path [0]"),
    ([[0], [2]], "skips rank 1"),
    ([[0], [0]], "appears twice"),
    ([[0], [-1]], "negative rank"),
])
def test_invalid_static_trees(paths, needle):
    assert needle in error_of(method="ngram", tree="static", tree_paths=paths)


def test_tree_field_combinations():
    assert "tree='bushy' is not registered; registered: chain, dynamic, static" in error_of(
        method="ngram", tree="bushy")
    assert "needs tree_paths" in error_of(method="ngram", tree="static")
    assert "only used with tree='static'" in error_of(method="ngram", tree_paths=[[0]])
    assert "only used with tree='dynamic'" in error_of(method="ngram", tree_budget=8)
    assert "tree_budget" in error_of(method="ngram", tree="dynamic", tree_budget=0)


def test_typical_acceptance_is_explicit():
    cfg = SpecConfig(method="ngram", acceptance_method="typical_acceptance_sampler")
    assert cfg.acceptance_method == "typical_acceptance_sampler"
    assert "rejection_sampler" in error_of(method="ngram", acceptance_method="typical")


@pytest.mark.parametrize("spec, want", [
    ("chain", {"tree": "chain"}),
    ("static:[[0],[1],[0,0]]", {"tree": "static", "tree_paths": [[0], [1], [0, 0]]}),
    ("dynamic", {"tree": "dynamic"}),
    ("dynamic:budget=16,topk=3,depth=5",
     {"tree": "dynamic", "tree_budget": 16, "tree_topk": 3, "num_speculative_tokens": 5}),
])
def test_parse_tree_spec(spec, want):
    assert parse_tree_spec(spec) == want


@pytest.mark.parametrize("spec", ["star", "static:[0,", "static:{}", "dynamic:width=3",
                                  "dynamic:budget=x"])
def test_parse_tree_spec_errors(spec):
    with pytest.raises(ValueError, match="invalid|must be"):
        parse_tree_spec(spec)


def test_from_cli():
    cfg = SpecConfig.from_cli("ngram", 6, "dynamic:budget=10", {"prompt_lookup_max": 2})
    assert (cfg.num_speculative_tokens, cfg.tree_budget, cfg.drafter_options.prompt_lookup_max) \
        == (6, 10, 2)
