"""Adaptive budgets: the stopping and sizing rules, the calibrated cost curve, and the builders
that use them (fake cost curves and fake drafters: no timing claims)."""

from __future__ import annotations

import time

import pytest
from tiny_models import reference_greedy, repetitive_prompts, tiny_llama

from specplug import SpecConfig
from specplug.budget import best_tree_size, worth_extending
from specplug.calibration import cached_calibration, calibrate
from specplug.cost import BatchedCost, CostModel
from specplug.drafters.base import Candidates, DraftContext, Drafter
from specplug.engine import ModelTargetRunner, Speculator, speculative_generate
from specplug.sampling import SamplingParams
from specplug.tree import ChainBuilder, DynamicTreeBuilder


def linear(slope: float) -> CostModel:
    """A calibrated curve: cost(n) / cost(1) = 1 + slope * (n - 1)."""
    return calibrate(lambda n: 0.01 * (1 + slope * (n - 1)), widths=(1, 2, 4, 8, 16, 32),
                     repeats=1, warmup=0)


def test_worth_extending_is_specdec_stopping_with_the_measured_cost():
    steep, flat = linear(0.2), linear(0.0)
    assert worth_extending(1.0, 0.5, 0, steep)  # (1 + .5) / 1.2 > 1
    assert not worth_extending(1.0, 0.15, 0, steep)  # 1.15 / 1.2 < 1
    assert worth_extending(1.0, 0.01, 0, flat)  # free scoring: always draft
    assert not worth_extending(2.6, 0.15, 3, steep)  # +0.15 tokens for 1/1.6 more cost
    assert worth_extending(2.6, 0.297, 3, linear(0.02))


def scoring(slope: float):
    model = linear(slope)
    return lambda n: model.relative(1 + n)


def test_tree_size_grows_when_scoring_is_cheap():
    values = [0.9, 0.7, 0.5, 0.3, 0.2, 0.1, 0.05, 0.02]
    assert best_tree_size(values, scoring(0.0), 8) == 8
    assert best_tree_size(values, scoring(0.0), 5) == 5  # the configured budget caps it
    steep = best_tree_size(values, scoring(0.3), 8)
    assert 1 <= steep < 8
    assert best_tree_size(values, scoring(2.0), 8) == 0  # nothing pays: draft nothing


def test_tree_size_is_decided_node_by_node():
    """Whether node i is kept may not depend on the nodes after it (under sampling their
    values carry node i's drawn token): changing later values never changes an earlier cut."""
    cost = scoring(0.3)
    head = [0.9, 0.25]
    cut = best_tree_size(head + [0.01, 0.01], cost, 8)
    assert best_tree_size(head + [0.24, 0.24, 0.24], cost, 8) >= cut
    for tail in ([0.0], [0.2, 0.2], [0.25] * 6):
        assert min(best_tree_size(head + tail, cost, 8), 2) == min(cut, 2)
    # values are taken as non-increasing: a later, larger value counts as its predecessor
    assert best_tree_size([0.9, 0.01, 0.9], scoring(0.05), 8) == \
        best_tree_size([0.9, 0.01, 0.01], scoring(0.05), 8)


def test_curve_interpolates_the_measured_points():
    # SmolLM2-135M on 2 cores: 47 / 88 / 115 ms for 1 / 5 / 11 tokens (not a line)
    times = {1: 0.047, 5: 0.088, 11: 0.115}
    model = calibrate(lambda n: times[n], widths=(1, 5, 11), repeats=1, warmup=0)
    assert model.relative(5) == pytest.approx(88 / 47)
    assert model.relative(3) == pytest.approx((47 + (88 - 47) / 2) / 47)
    assert model.relative(11) == pytest.approx(115 / 47)
    assert model.relative(21) > model.relative(11)  # extrapolated along the fitted line


def test_draft_cost_counts_in_the_step_cost():
    model = linear(0.0)
    assert model.step_cost(4) == pytest.approx(1.0)
    for depth in (0, 2, 4, 6):
        model.observe_draft(depth, 0.001 + 0.005 * depth)  # 0.5 forward per draft token
    assert model.draft_per_token() == pytest.approx(0.5)
    assert model.step_cost(4) == pytest.approx(3.0)


class Confident(Drafter):
    """Proposes token 5 everywhere with a fixed probability (a fake probabilistic drafter)."""

    name = "confident"
    probabilistic = True

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def begin(self, ctx):
        return [None] * len(ctx.tokens)

    def expand(self, frontier, k):
        return [[Candidates(tokens=list(range(5, 5 + k)),
                            probs=[self.p * 0.8 ** i for i in range(k)],
                            handles=[None] * k) for _ in row] for row in frontier]


def _ctx(cost, adaptive=True):
    return DraftContext(tokens=[[1, 2, 3]], active=[True], sampling=SamplingParams(), cost=cost,
                        adaptive=adaptive)


class FakeRunner:
    """A target whose forward time is a planted function of the tokens it scores."""

    def __init__(self, seconds_per_token: float, base: float = 0.002):
        self.per, self.base = seconds_per_token, base

    def score(self, n: int) -> float:
        t0 = time.perf_counter()
        time.sleep(self.base + self.per * n)
        return time.perf_counter() - t0


@pytest.mark.parametrize("builder", [ChainBuilder(8),
                                     DynamicTreeBuilder(budget=16, topk=2, depth=8)])
def test_budget_is_longer_when_scoring_is_cheap(builder):
    """Calibrated on a fake runner: flat cost -> the full budget; steep -> a short one."""
    flat = calibrate(FakeRunner(0.0).score, widths=(1, 4, 16), repeats=2, warmup=0)
    steep = calibrate(FakeRunner(0.004).score, widths=(1, 4, 16), repeats=2, warmup=0)
    assert steep.relative(16) > 5 * flat.relative(16)
    drafter = Confident(0.9)
    cheap = builder.build(drafter, _ctx(flat), [8], 64)
    dear = builder.build(drafter, _ctx(steep), [8], 64)
    assert int(cheap.num_nodes[0]) == builder.max_nodes
    assert 0 < int(dear.num_nodes[0]) < int(cheap.num_nodes[0])
    # not adaptive: the configured budget whatever the cost
    assert int(builder.build(drafter, _ctx(steep, adaptive=False), [8], 64).num_nodes[0]) \
        == builder.max_nodes


def test_calibration_is_measured_once_per_model_and_device(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECPLUG_COST_CACHE", str(tmp_path))
    llama = tiny_llama(0)
    runner = ModelTargetRunner(llama)
    calls = []
    real = runner.score
    monkeypatch.setattr(runner, "score", lambda *a: calls.append(1) or real(*a))
    first = runner.calibrate_cost([3, 4, 5])
    assert first.calibrated and len(first.times) >= 8 and calls
    n = len(calls)
    again = runner.calibrate_cost([7, 8])
    assert len(calls) == n  # read from the cache
    assert again.times == pytest.approx(first.times)
    assert len(list(tmp_path.glob("*.json"))) == 1
    monkeypatch.setenv("SPECPLUG_COST_CACHE", "0")
    runner.calibrate_cost([3, 4, 5])
    assert len(calls) > n  # caching off: measured again


def test_cached_calibration_survives_a_corrupt_file(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECPLUG_COST_CACHE", str(tmp_path))
    cached_calibration({"m": 1}, lambda: linear(0.1))
    for f in tmp_path.glob("*.json"):
        f.write_text("{not json")
    got = cached_calibration({"m": 1}, lambda: linear(0.5))
    assert got.relative(2) == pytest.approx(1.5)


@pytest.mark.parametrize("method", ["draft_model", "layer_skip"])
def test_adaptive_model_drafters_keep_the_output(method):
    llama = tiny_llama(0)
    opts = {"model": tiny_llama(3, layers=1)} if method == "draft_model" else {"layers": 1}
    ids, mask = repetitive_prompts([9, 14], seed=4)
    for tree in ({"tree": "chain"}, {"tree": "dynamic", "tree_budget": 8}):
        spec = Speculator.from_config(SpecConfig(method=method, num_speculative_tokens=4,
                                                 **tree, **opts), llama)
        assert spec.adaptive
        spec.cost = linear(0.02)
        got = speculative_generate(ModelTargetRunner(llama), spec, ids, mask,
                                   max_new_tokens=20)
        assert got.sequences == reference_greedy(llama, ids, mask, 20)


def test_calibration_learns_an_overconfident_drafter():
    from specplug.budget import AcceptanceCalibration

    cal = AcceptanceCalibration()
    assert cal(0.8) == pytest.approx(0.8)  # no evidence: trust the drafter
    for i in range(200):  # believes 0.8, right a quarter of the time
        cal.observe(0.8, i % 4 == 0)
    assert cal(0.8) == pytest.approx(0.25, abs=0.02)
    assert cal(0.3) == pytest.approx(0.3)  # other bins keep their own evidence


def test_chains_shrink_when_confident_drafts_keep_failing():
    """A drafter that claims 0.9 but is never accepted: the builder learns it from the
    verified outcomes and stops drafting, on a curve where a truthful 0.9 would draft deep."""
    import torch

    builder = ChainBuilder(8)
    drafter = Confident(0.9)
    cost = linear(0.15)
    first = int(builder.build(drafter, _ctx(cost), [8], 64).num_nodes[0])
    assert first >= 4
    for _ in range(30):
        builder.build(drafter, _ctx(cost), [8], 64)
        builder.learn(torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    assert int(builder.build(drafter, _ctx(cost), [8], 64).num_nodes[0]) < first


def test_a_row_of_a_batch_drafts_less_on_a_steep_curve():
    """With every row scored in one forward, a row's draft tokens cost ``rows`` times as much
    of the step: on a steep curve a row of a batch of 4 gets a shorter chain than alone; on a
    flat curve the same one."""
    builder, drafter = ChainBuilder(8), Confident(0.9)
    for slope, shorter in ((0.15, True), (0.0, False)):
        alone = int(builder.build(drafter, _ctx(linear(slope)), [8], 64).num_nodes[0])
        batched = BatchedCost(linear(slope), 4)
        in_batch = int(builder.build(drafter, _ctx(batched), [8], 64).num_nodes[0])
        assert (in_batch < alone) if shorter else (in_batch == alone == 8), (alone, in_batch)


def test_the_engine_reads_the_cost_at_the_batch_scale():
    """``speculative_generate`` hands drafters a ``BatchedCost`` over its rows and times its
    forwards against the batch's total scored tokens; the output stays greedy's."""
    llama = tiny_llama(0)
    ids, mask = repetitive_prompts([12, 9, 15], seed=4)
    spec = Speculator.from_config(SpecConfig(method="layer_skip", layers=1,
                                             num_speculative_tokens=4), llama)
    spec.cost = linear(0.05)
    before = set(spec.cost.times)
    seen = []
    original = spec.builder.build
    spec.builder.build = lambda drafter, ctx, *a: seen.append(ctx.cost) or original(drafter,
                                                                                    ctx, *a)
    got = speculative_generate(ModelTargetRunner(llama), spec, ids, mask, max_new_tokens=16)
    assert got.sequences == reference_greedy(llama, ids, mask, 16)
    assert seen and all(isinstance(c, BatchedCost) and c.rows == 3 and c.base is spec.cost
                        for c in seen)
    timed = set(spec.cost.times) - before  # forwards of 3 rows x (width + 1) tokens
    assert timed and all(n % 3 == 0 for n in timed), timed
