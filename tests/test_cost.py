"""The cost model and the draft-length rule built on it (no timing: fake observations)."""

from __future__ import annotations

import pytest
from tiny_models import cpu_cost_curve, reference_greedy, repetitive_prompts, tiny_llama

from specplug import SpecConfig
from specplug.budget import best_depth
from specplug.cost import CostModel
from specplug.drafters.base import DraftContext, StepOutcome
from specplug.drafters.ngram import NgramDrafter
from specplug.engine import ModelTargetRunner, Speculator, speculative_generate
from specplug.sampling import SamplingParams


def curve(per_token: float) -> CostModel:
    return cpu_cost_curve(per_token)


def test_one_slow_forward_does_not_make_a_size_look_dear():
    cost = CostModel()
    for _ in range(5):
        cost.observe(1, 0.040)
        cost.observe(3, 0.044)
    cost.observe(3, 0.200)  # another process took the cores for one forward
    assert cost.relative(3) == pytest.approx(1.1)
    for _ in range(8):  # a lasting change is followed
        cost.observe(3, 0.080)
    assert cost.relative(3) == pytest.approx(2.0)


def test_a_calibration_gives_way_to_live_timings():
    cost = CostModel.from_dict({"target": {"1": 0.040, "3": 0.044}, "counts": {"1": 3, "3": 3}})
    cost.observe(3, 0.060)
    cost.observe(3, 0.060)
    assert cost.relative(3) == pytest.approx(1.1)  # outvoted by the calibration, so far
    cost.observe(3, 0.060)
    cost.observe(3, 0.060)
    assert cost.relative(3) == pytest.approx(1.5)


def _write(model: CostModel, kind: str, n: int, seconds: float) -> None:
    if kind == "observe":
        model.observe(n, seconds)
    elif kind == "draft":
        model.observe_draft(n, seconds)
    else:
        model.target.seed(n, seconds, 20)


def test_memoised_step_costs_follow_every_new_timing():
    """``step_cost`` is memoised; after every kind of write it equals a fresh model's."""
    writes = [("observe", 1, 0.040), ("observe", 5, 0.080), ("observe", 1, 0.040),
              ("observe", 5, 0.080), ("draft", 0, 0.0), ("draft", 4, 0.0),
              ("observe", 5, 0.040), ("observe", 5, 0.040), ("observe", 5, 0.040),
              ("draft", 4, 0.030), ("draft", 4, 0.030), ("seed", 5, 0.060)]
    memo = CostModel()
    costs = set()
    for i, write in enumerate(writes):
        _write(memo, *write)
        fresh = CostModel()
        for earlier in writes[: i + 1]:
            _write(fresh, *earlier)
        for depth in (0, 2, 4, 9):
            assert memo.step_cost(depth) == pytest.approx(fresh.step_cost(depth))
        costs.add(round(memo.step_cost(4), 6))
    assert len(costs) >= 5  # the writes did move the cost the memo had to follow


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


def _draft_depth(drafter, ctx):
    root = drafter.begin(ctx)[0]
    depth, node = 0, root
    while node.children:
        node = max(node.children.values(), key=lambda c: c.count)
        depth += 1
    return depth


@pytest.mark.parametrize("accepts, expect", [(False, "none"), (True, "deep")])
def test_adaptive_ngram_learns_from_outcomes(accepts, expect):
    """Always-rejected drafts make ngram stop drafting (but for rare one-token probes);
    always-accepted ones make it draft the full depth (on a steep CPU-like cost curve)."""
    drafter = NgramDrafter(max_depth=8)
    tokens = [[5, 6, 7, 8, 9] * 6]
    drafter.start(tokens)
    ctx = DraftContext(tokens=tokens, active=[True], sampling=SamplingParams(),
                       cost=curve(0.0094))
    first = _draft_depth(drafter, ctx)
    assert 0 < first < 8  # the Beta(1, 1) prior: a moderate first guess
    depths = []
    for _ in range(40):
        depth = _draft_depth(drafter, ctx)
        depths.append(depth)
        accepted = [0] * depth if accepts else []  # ngram only counts them
        drafter.observe(StepOutcome(accepted=[accepted], bonus=[1], tokens=tokens))
    late = depths[10:]
    if expect == "deep":
        assert late == [8] * 30
    else:  # nothing but a one-token probe every 20 steps or so (a request may start copying)
        assert max(late) <= 1 and sum(late) <= 2


def test_adaptive_ngram_retries_after_a_bad_start():
    """A kind of match that usually pays (lifetime) but failed early in this request is
    retried after a few idle steps, instead of being abandoned for the whole request."""
    drafter = NgramDrafter(max_depth=8)
    tokens = [[5, 6, 7, 8, 9] * 6]
    ctx = DraftContext(tokens=tokens, active=[True], sampling=SamplingParams(),
                       cost=curve(0.0094))
    drafter.start(tokens)
    for _ in range(20):  # earlier requests: these matches were accepted
        depth = _draft_depth(drafter, ctx)
        drafter.observe(StepOutcome(accepted=[[0] * depth], bonus=[1], tokens=tokens))
    drafter.start(tokens)  # a new request starts badly
    for _ in range(6):
        depth = _draft_depth(drafter, ctx)
        drafter.observe(StepOutcome(accepted=[[]], bonus=[1], tokens=tokens))
    later = [_draft_depth(drafter, ctx) for _ in range(15)]
    assert later[0] < 8 and max(later) > 0


def test_adaptive_ngram_output_unchanged():
    model = tiny_llama(0)
    ids, mask = repetitive_prompts([30], seed=0)
    spec = Speculator.from_config(SpecConfig(method="ngram"), model)
    got = speculative_generate(ModelTargetRunner(model), spec, ids, mask, max_new_tokens=24)
    assert got.sequences == reference_greedy(model, ids, mask, 24)
