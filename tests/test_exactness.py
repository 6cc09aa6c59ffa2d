"""Sampling exactness: one speculative step emits tokens with exactly the target's
distribution, for chains and trees, good and deliberately bad drafters, probabilistic and
deterministic drafts, with temperature, top-k and top-p.

Set-up: a Markov target over a small vocabulary (V = 8) whose next-token logits depend on the
last token only, so every tree node's target distribution is known in closed form. For
N = 20,000 rows in one batch we build the tree with the real builders and verify it with the
real verifier; the first emitted token x1 and the second x2 (from the same step when it
emitted two, otherwise drawn from the true target given x1, which is what the next exact step
would do) must follow p(x1 | root) p(x2 | x1). The test is Pearson's chi-square over the 64
(x1, x2) cells (cells expected below 5 merged), rejecting at alpha = 1e-4: the probability that
a correct verifier fails one test is 1e-4 over random seeds; seeds are fixed, so CI is
reproducible. The planted-bias tests show the same check rejects verifiers that are subtly
wrong (p-value far below alpha).
"""

from __future__ import annotations

import zlib

import pytest
import torch
from scipy.stats import chisquare

import specplug.kernels.verify as verify_kernels
from specplug.acceptance import verify_exact
from specplug.calibration import calibrate
from specplug.drafters.base import Candidates, DraftContext, Drafter, DrafterOptions
from specplug.sampling import SamplingParams, probs_from_logits
from specplug.tree import ChainBuilder, DynamicTreeBuilder, StaticTreeBuilder

V = 8
N = 20_000
ALPHA = 1e-4
ROOT = 3


def tables():
    g = torch.Generator().manual_seed(1234)
    target = torch.randn(V, V, generator=g) * 1.5
    good = target + 0.4 * torch.randn(V, V, generator=g)  # close to the target
    bad = -target + 0.5 * torch.randn(V, V, generator=g)  # anti-correlated: mostly rejected
    return target, good, bad


class MarkovDrafter(Drafter):
    """Drafts from a Markov table; probabilistic (gives q) or deterministic (ranked only)."""

    name = "markov-test"

    def __init__(self, table: torch.Tensor, sampling: SamplingParams, probabilistic: bool):
        super().__init__()
        self.probabilistic = probabilistic
        warm = sampling if not sampling.greedy else SamplingParams(temperature=1.0)
        self.dist = probs_from_logits(table, warm)  # [V, V]
        order = self.dist.argsort(-1, descending=True)
        self.cands = [
            (order[t].tolist(), self.dist[t, order[t]].tolist()) for t in range(V)
        ]

    def begin(self, ctx: DraftContext):
        return [None] * len(ctx.tokens)

    def expand(self, frontier, k):
        out = []
        for row in frontier:
            cs = []
            for it in row:
                toks, probs = self.cands[it.token]
                cs.append(Candidates(tokens=toks[:k], probs=probs[:k], handles=[None] * k,
                                     dist=self.dist[it.token] if self.probabilistic else None))
            out.append(cs)
        return out


BUILDERS = {
    "chain": lambda: ChainBuilder(3),
    "static": lambda: StaticTreeBuilder([[0], [1], [2], [0, 0], [0, 1], [1, 0]]),
    "dynamic": lambda: DynamicTreeBuilder(budget=6, topk=3, depth=3),
}
SAMPLINGS = {
    "t1": SamplingParams(temperature=1.0),
    "t0.7-topk5": SamplingParams(temperature=0.7, top_k=5),
    "t1.3-topp0.8": SamplingParams(temperature=1.3, top_p=0.8),
}


def emitted_pairs(builder, drafter, target_logits, sampling, seed, cost=None):
    g = torch.Generator().manual_seed(seed)
    ctx = DraftContext(tokens=[[ROOT]] * N, active=[True] * N, sampling=sampling, generator=g,
                       cost=cost)
    tree = builder.build(drafter, ctx, [builder.max_depth] * N, V)
    logits = torch.cat([target_logits[ROOT].expand(N, 1, V), target_logits[tree.tokens]], 1)
    res = verify_exact(tree, logits, sampling, g)
    rows = res.new_tokens(tree)
    p = probs_from_logits(target_logits, sampling)
    x1 = torch.tensor([r[0] for r in rows])
    x2 = torch.multinomial(p[x1], 1, generator=g).squeeze(1)
    have2 = torch.tensor([len(r) > 1 for r in rows])
    x2[have2] = torch.tensor([r[1] for r in rows if len(r) > 1])
    return x1, x2, res


def chi2_pvalue(x1, x2, target_logits, sampling):
    p = probs_from_logits(target_logits, sampling)
    expected = (p[ROOT][:, None] * p).flatten() * len(x1)  # [V*V]
    observed = torch.bincount(x1 * V + x2, minlength=V * V).double()
    small = expected < 5
    obs = torch.cat([observed[~small], observed[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]]).double()
    if exp[-1] == 0:
        if obs[-1] > 0:
            return 0.0  # a token the target can never emit was emitted
        obs, exp = obs[:-1], exp[:-1]
    return float(chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue)


@pytest.mark.parametrize("sampling_name", sorted(SAMPLINGS))
@pytest.mark.parametrize("builder_name", sorted(BUILDERS))
@pytest.mark.parametrize("drafter_kind", ["good-q", "bad-q", "good-onehot"])
def test_one_step_matches_target(builder_name, sampling_name, drafter_kind):
    target, good, bad = tables()
    sampling = SAMPLINGS[sampling_name]
    table = bad if drafter_kind.startswith("bad") else good
    drafter = MarkovDrafter(table, sampling, probabilistic=drafter_kind.endswith("-q"))
    seed = zlib.crc32(f"{builder_name}/{sampling_name}/{drafter_kind}".encode()) % 10_000
    x1, x2, res = emitted_pairs(BUILDERS[builder_name](), drafter, target, sampling, seed)
    assert chi2_pvalue(x1, x2, target, sampling) > ALPHA
    if drafter_kind == "good-q":  # and speculation actually does something
        assert res.num_accepted.float().mean() > 0.5


@pytest.mark.parametrize("bias", ["resample-from-target", "under-corrected-residual"])
def test_planted_bias_is_detected(monkeypatch, bias):
    """Two subtle verifier bugs; the exactness check must reject both."""
    original = verify_kernels._residual
    if bias == "resample-from-target":  # forgetting the residual: resample from p
        monkeypatch.setattr(verify_kernels, "_residual", lambda p, q: p)
    else:  # subtracting only 80% of q
        monkeypatch.setattr(verify_kernels, "_residual", lambda p, q: original(p, 0.8 * q))
    target, good, _ = tables()
    sampling = SAMPLINGS["t1"]
    drafter = MarkovDrafter(good, sampling, probabilistic=True)
    x1, x2, _ = emitted_pairs(BUILDERS["static"](), drafter, target, sampling, seed=7)
    assert chi2_pvalue(x1, x2, target, sampling) < ALPHA


def test_planted_bias_wrong_draft_probs_is_detected():
    """Reporting q at the wrong temperature (drafts drawn from one q, verified against
    another) is a classic integration bug; it must be caught too."""
    target, good, _ = tables()
    sampling = SAMPLINGS["t0.7-topk5"]
    drafter = MarkovDrafter(good, sampling, probabilistic=True)
    g = torch.Generator().manual_seed(5)
    ctx = DraftContext(tokens=[[ROOT]] * N, active=[True] * N, sampling=sampling, generator=g)
    tree = BUILDERS["chain"]().build(drafter, ctx, [3] * N, V)
    wrong = probs_from_logits(good, SamplingParams(temperature=1.0))
    tree.draft_probs = wrong[torch.cat([torch.full((N, 1), ROOT), tree.tokens[:, :-1]], 1)]
    logits = torch.cat([target[ROOT].expand(N, 1, V), target[tree.tokens]], 1)
    rows = verify_exact(tree, logits, sampling, g).new_tokens(tree)
    p = probs_from_logits(target, sampling)
    x1 = torch.tensor([r[0] for r in rows])
    x2 = torch.multinomial(p[x1], 1, generator=g).squeeze(1)
    have2 = torch.tensor([len(r) > 1 for r in rows])
    x2[have2] = torch.tensor([r[1] for r in rows if len(r) > 1])
    assert chi2_pvalue(x1, x2, target, sampling) < ALPHA


def test_seeded_runs_reproduce():
    target, good, _ = tables()
    sampling = SAMPLINGS["t1"]
    drafter = MarkovDrafter(good, sampling, probabilistic=True)
    a = emitted_pairs(BUILDERS["chain"](), drafter, target, sampling, seed=3)
    b = emitted_pairs(BUILDERS["chain"](), drafter, target, sampling, seed=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


class AdaptiveMarkov(MarkovDrafter):
    """The Markov drafter with an adaptive budget: builders size its drafts by the cost."""

    class Options(DrafterOptions):
        adaptive: bool = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.options = self.Options()


def steep_cost():
    """A curve where the stop falls among the drafter's likely tokens (cost(n) = 1 + 0.25n)."""
    return calibrate(lambda n: 0.01 * (1 + 0.25 * (n - 1)), widths=(1, 2, 4, 8), repeats=1,
                     warmup=0)


@pytest.mark.parametrize("sampling_name", ["t1", "t0.7-topk5"])
@pytest.mark.parametrize("builder_name", ["chain", "dynamic"])
def test_adaptive_budgets_keep_the_target_distribution(builder_name, sampling_name):
    """Adaptive chains stop and adaptive trees are cut by the drafter's confidence and the
    cost curve; under sampling that must not bias what is emitted."""
    target, good, _ = tables()
    sampling = SAMPLINGS[sampling_name]
    drafter = AdaptiveMarkov(good, sampling, probabilistic=True)
    builder = {"chain": lambda: ChainBuilder(3),
               "dynamic": lambda: DynamicTreeBuilder(budget=6, topk=3, depth=3)}[builder_name]()
    seed = zlib.crc32(f"adaptive/{builder_name}/{sampling_name}".encode()) % 10_000
    x1, x2, res = emitted_pairs(builder, drafter, target, sampling, seed, cost=steep_cost())
    assert chi2_pvalue(x1, x2, target, sampling) > ALPHA
    sizes = res.num_accepted.float()
    assert 0.2 < sizes.mean() < 2.5  # it drafted, and not always the full budget


def test_planted_bias_chain_stop_on_the_drawn_token_is_detected(monkeypatch):
    """Stopping on the drawn token's own probability (instead of the position's top
    probability) biases sampled output; the test above must catch it."""
    from specplug.budget import worth_extending

    def biased(self, b, row, tip, picks):
        if self.cost is None or not picks:
            return picks
        expected = 1.0 + sum(n.value for n in row)
        path_p = (row[tip.index].value if tip.index >= 0 else 1.0) * picks[0][1]
        return picks if worth_extending(expected, path_p, len(row), self.cost) else []

    monkeypatch.setattr(ChainBuilder, "_within_budget", biased)
    target, good, _ = tables()
    sampling = SAMPLINGS["t1"]
    drafter = AdaptiveMarkov(good, sampling, probabilistic=True)
    x1, x2, _ = emitted_pairs(ChainBuilder(3), drafter, target, sampling, 11, cost=steep_cost())
    assert chi2_pvalue(x1, x2, target, sampling) < ALPHA
