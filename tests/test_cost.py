"""The cost model and the draft-length rule built on it (no timing: fake observations)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import reference_greedy, repetitive_prompts, tiny_llama

from specplug import SpecConfig
from specplug.cost import CostModel, best_depth
from specplug.drafters.ngram import NgramDrafter
from specplug.engine import ModelTargetRunner, Speculator, speculative_generate


def curve(per_token: float) -> CostModel:
    m = CostModel()
    for n in (1, 2, 5, 11):
        for _ in range(3):
            m.observe(n, 0.047 + per_token * (n - 1))
    return m


def test_fitted_slope():
    assert CostModel().slope() == pytest.approx(0.15)  # prior before two sizes are seen
    assert curve(0.0).slope() == pytest.approx(0.0, abs=1e-9)  # a GPU-like flat curve
    assert curve(0.0094).slope() == pytest.approx(0.2, rel=1e-6)  # SmolLM2 on 2 cores
    assert curve(0.0094).relative(5) == pytest.approx(1.8, rel=1e-6)


def test_depth_follows_cost_and_acceptance():
    flat, steep = curve(0.0), curve(0.0094)
    assert best_depth(0.6, 8, flat) == 8  # scoring is free: draft everything
    assert best_depth(0.6, 8, steep) < 8
    assert best_depth(0.9, 8, steep) > best_depth(0.6, 8, steep)
    assert best_depth(0.1, 8, steep) == 0  # hopeless: do not draft at all
    assert best_depth(0.1, 8, flat) == 8


def test_adaptive_ngram_stops_drafting_hopeless_matches():
    """A drafter whose drafts are never accepted learns to stop drafting; output unchanged."""
    model = tiny_llama(0)
    ids, mask = repetitive_prompts([30], seed=0)  # the random model never continues the motif
    spec = Speculator.from_config(SpecConfig(method="ngram"), model)
    spec.cost = curve(0.0094)
    spec.cost.observe = lambda n, seconds: None  # freeze the curve: no real timings
    got = speculative_generate(ModelTargetRunner(model), spec, ids, mask, max_new_tokens=24)
    assert got.sequences == reference_greedy(model, ids, mask, 24)
    assert isinstance(spec.drafter, NgramDrafter)
    depths = got.stats.draft_depth_per_step[0]
    assert depths[-1] == 0 and sum(depths[-5:]) == 0
    assert torch.is_tensor(ids)
