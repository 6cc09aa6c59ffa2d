"""The per-request acceptance estimate (``specplug.budget.RequestCorrection``): a request whose
drafts keep missing stops drafting within a few steps, and drafts again once its text starts
matching (scripted drafters and outcomes; fake cost curves, no timing claims)."""

from __future__ import annotations

import pytest
import torch
from test_budget import linear
from test_cost import _draft_depth, curve
from tiny_models import reference_greedy, tiny_llama

from specplug import SpecConfig
from specplug.budget import RequestCorrection, expected_accepted
from specplug.drafters.base import Candidates, DraftContext, Drafter, StepOutcome
from specplug.drafters.ngram import NgramDrafter
from specplug.engine import ModelTargetRunner, Speculator, speculative_generate
from specplug.plugins import get_registry
from specplug.sampling import SamplingParams
from specplug.tree import TreeBuilder


def test_factor_is_accepted_over_predicted_and_decays_back_to_one():
    c = RequestCorrection(prior=4.0, decay=0.5)
    c.start(2)
    assert c.factor(0) == c.factor(1) == 1.0
    c.observe(0, accepted=0, predicted=6)
    assert c.factor(0) == pytest.approx(4 / 10) and c.factor(1) == 1.0  # rows are separate
    c.observe(1, accepted=6, predicted=2)
    assert c.factor(1) == pytest.approx(10 / 6)
    for _ in range(20):
        c.idle(0)
    assert c.factor(0) == pytest.approx(1.0, abs=1e-4)
    c.start(1)
    assert c.factor(0) == 1.0 and c.factor(5) == 1.0  # new requests; unknown rows neutral
    assert expected_accepted(0.5, 3) == pytest.approx(0.5 + 0.25 + 0.125)


def test_ngram_stops_within_a_few_misses_where_the_lifetime_says_drafts_pay():
    """Earlier requests accepted every draft of this kind of match; a request that rejects them
    all stops drafting after at most three misses (the lifetime estimate alone kept drafting),
    and a request that accepts them keeps drafting in full."""
    tokens = [[5, 6, 7, 8, 9] * 6]
    ctx = DraftContext(tokens=tokens, active=[True], sampling=SamplingParams(),
                       cost=curve(0.0094))
    drafter = NgramDrafter(max_depth=8)
    drafter.start(tokens)
    for _ in range(20):  # earlier requests: these matches paid
        depth = _draft_depth(drafter, ctx)
        drafter.observe(StepOutcome(accepted=[[0] * depth], bonus=[1], tokens=tokens))
    drafter.start(tokens)
    misses = []
    for _ in range(3):
        misses.append(_draft_depth(drafter, ctx))
        drafter.observe(StepOutcome(accepted=[[]], bonus=[1], tokens=tokens))
    assert misses[0] == 8 and _draft_depth(drafter, ctx) == 0
    drafter.start(tokens)  # a request that accepts keeps its full drafts
    for _ in range(5):
        assert _draft_depth(drafter, ctx) == 8
        drafter.observe(StepOutcome(accepted=[[0] * 8], bonus=[1], tokens=tokens))


def test_ngram_rows_of_one_batch_keep_their_own_estimate():
    """Two rows match the same kind; row 0 accepts every draft, row 1 none: row 1 soon drafts
    at most a probing token now and then while row 0 drafts in full."""
    tokens = [[5, 6, 7, 8, 9] * 6, [5, 6, 7, 8, 9] * 6]
    ctx = DraftContext(tokens=tokens, active=[True, True], sampling=SamplingParams(),
                       cost=curve(0.0094))
    drafter = NgramDrafter(max_depth=8)
    drafter.start(tokens)
    depths = []
    for _ in range(30):
        drafter.begin(ctx)
        depths.append([d for _, d in drafter.drafted])
        drafter.observe(StepOutcome(accepted=[[0] * depths[-1][0], []], bonus=[1, 1],
                                    tokens=tokens))
    late = depths[10:]
    assert all(d0 == 8 for d0, _ in late)
    assert max(d1 for _, d1 in late) <= 1 and sum(d1 for _, d1 in late) <= len(late) // 3
    assert drafter.correction.factor(0) > 1.0 > drafter.correction.factor(1)


class Scripted(Drafter):
    """A confident model-like drafter on a tiny target: wrong tokens until position
    ``switch``, the target's own greedy tokens (``reference``) from there on."""

    name = "scripted"
    probabilistic = True

    def __init__(self, reference: list[int], switch: int, vocab: int):
        super().__init__()
        self.reference, self.switch, self.vocab = reference, switch, vocab

    def begin(self, ctx):
        return [len(t) for t in ctx.tokens]  # the handle: the position to propose

    def expand(self, frontier, k):
        out = []
        for row in frontier:
            cands = []
            for item in row:
                pos = item.handle
                if pos >= len(self.reference):
                    cands.append(Candidates(tokens=[], probs=[], handles=[]))
                    continue
                right = self.reference[pos]
                tok = right if pos >= self.switch else (right + 1) % self.vocab
                cands.append(Candidates(tokens=[tok], probs=[0.9], handles=[pos + 1]))
            out.append(cands)
        return out


def _scripted_run(monkeypatch, cls, new: int, switch: int, head_ms: float | None = None):
    """``cls`` (a ``Scripted``) through the engine on a tiny target, with a fixed CPU-like
    cost curve (a draft must be accepted to pay) and, with ``head_ms``, a drafter that costs
    that much per run before it drafts anything. Returns the drafter and the generation,
    checked identical to greedy."""
    model = tiny_llama(0)
    ids = torch.randint(1, 96, (1, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    want = reference_greedy(model, ids, mask, new)
    drafter = cls(ids[0].tolist() + want[0], 12 + switch, int(model.config.vocab_size))
    monkeypatch.setitem(get_registry().drafters, cls.name, cls)
    config = SpecConfig(method=cls.name, num_speculative_tokens=4)
    reg = get_registry()
    spec = Speculator(config, drafter, reg.tree_builders["chain"](config),
                      reg.verifiers[config.acceptance_method])
    spec.cost = linear(0.2)
    if head_ms is not None:
        spec.cost.observe_draft(0, head_ms / 1000)  # target.at(1) is 10 ms
    # kept fixed: the engine would otherwise refine it with the tiny model's measured times
    monkeypatch.setattr(spec.cost, "observe", lambda *a: None)
    monkeypatch.setattr(spec.cost, "observe_draft", lambda *a: None)
    got = speculative_generate(ModelTargetRunner(model), spec, ids, mask, max_new_tokens=new)
    assert got.sequences == want
    return drafter, got


def test_engine_stops_drafting_on_misses_and_resumes_when_drafts_match(monkeypatch):
    """Through the engine: a drafter that is confidently wrong for the first half of the answer
    is soon not drafted at all; once its proposals are right, drafting resumes and is accepted.
    The output is the target's greedy output throughout."""
    new = 60
    switch = 12 + new // 2
    _, got = _scripted_run(monkeypatch, Scripted, new, new // 2)
    depth = got.stats.draft_depth_per_step[0]
    accepted = got.stats.accepted_per_step[0]
    emitted = [1 + a for a in accepted]
    position = [12 + 1 + sum(emitted[:i]) for i in range(len(emitted))]  # root of each step
    wrong = [d for d, p in zip(depth, position) if p + 4 < switch]  # every draft is wrong
    right = [(d, a) for d, a, p in zip(depth, accepted, position) if p >= switch]
    assert wrong[0] == 4  # it starts by drafting in full
    later = wrong[3:]  # after two misses: a probe now and then
    assert len(later) >= 20 and sum(d > 0 for d in later) <= len(later) // 4
    assert sum(a for _, a in right) >= 10  # drafting resumed, and pays


class Counting(Scripted):
    """``Scripted``, recording per step whether the builder let its row rest."""

    name = "counting"

    def __init__(self, *args):
        super().__init__(*args)
        self.rested: list[bool] = []

    def begin(self, ctx):
        self.rested.append(bool(ctx.resting and ctx.resting[0]))
        return super().begin(ctx)


def _resting_run(monkeypatch, switch_at: float, head_ms: float):
    """``Counting`` with a fixed cost per run (``head_ms``, like a trained head's forward),
    wrong until ``switch_at`` of an 80-token answer."""
    drafter, got = _scripted_run(monkeypatch, Counting, 80, int(80 * switch_at), head_ms)
    return drafter.rested, got.stats


def test_a_drafter_that_cannot_pay_rests_and_probes_less_and_less(monkeypatch):
    """Drafts that always miss, from a drafter whose every run costs a fifth of a step: after
    the evidence is in, the builder stops running the drafter at all (not only drafting
    nothing), but for one probe after ``PROBE_EVERY`` steps; each probe that misses doubles
    the wait, up to ``MAX_PROBE_EVERY``, and the row rests again straight after it. The output
    is the target's greedy output."""
    rested, stats = _resting_run(monkeypatch, switch_at=2.0, head_ms=2.0)
    first_rest = rested.index(True)
    assert first_rest <= 6  # a few drafted steps of evidence, then rest
    late = rested[first_rest:]
    runs = [i for i, r in enumerate(late) if not r]
    gaps = [b - a for a, b in zip([-1] + runs, runs)]
    assert len(runs) >= 3 and len(late) >= 60
    assert gaps[0] == TreeBuilder.PROBE_EVERY  # the first probe after PROBE_EVERY steps
    assert all(g == TreeBuilder.MAX_PROBE_EVERY for g in gaps[1:])  # then doubled, capped
    assert sum(late) >= len(late) * 0.9  # one drafter run in every 16 steps or fewer


def test_a_drafter_that_pays_never_rests(monkeypatch):
    """The same drafter, right from the first token: every draft is accepted, the expected
    gain pays for the drafter's fixed cost, and no row ever rests."""
    rested, stats = _resting_run(monkeypatch, switch_at=0.0, head_ms=2.0)
    assert not any(rested) and stats.mean_accepted_tokens > 3.0
