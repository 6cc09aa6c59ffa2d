"""Sampling exactness through every Hugging Face route, sampled the way users sample: one seed,
then many ``generate`` calls (and batches), for every built-in drafter.

``tests/test_exactness.py`` proves the verifier exact on one step with a fixed generator. That
cannot see a route that feeds the drafter the same noise on every call (the ``assistant_model``
route did: its candidate generator was re-seeded from ``torch.initial_seed()`` per call, so a
sampling drafter proposed the same token every time, which is not a draw from q, and the
output was biased). Here each test seeds torch once and calls the route many times.

Set-up: a tiny Llama over V = 16 tokens with sharpened logits, so that the target's
distribution of the first three generated tokens is known in closed form from one batched
forward. ``max_new_tokens=3``: in the engine routes the first token comes from the prefill and
the next two from a speculative step that drafts up to two tokens; in the ``assistant_model``
route all three come from a step that drafts three. The joints of (x1, x2) and (x2, x3) must
match the target's (Pearson's chi-square over 256 cells, small ones merged, alpha 1e-4; seeds
are fixed, so CI is reproducible). The controls plant the bug (the same draft noise on every
call) and show that the same statistic rejects it on every route.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from test_heads import make_net
from tiny_models import chisquare_pvalue, tiny_llama

import specplug.hf as sh
import specplug.tree as tree_module
from specplug.bench.hf_matches import record_matches
from specplug.heads.config import HEAD_KINDS
from specplug.sampling import SamplingParams, probs_from_logits

# a deprecated transformers argument in specplug's calls fails the test
pytestmark = pytest.mark.filterwarnings("error::FutureWarning", "error::DeprecationWarning")

V = 16
ALPHA = 1e-4
SAMPLES = 1200  # per prompt and test
NEW = 3
# two prompts of different lengths: in a batch the shorter one is left-padded
PROMPTS = ([3, 9, 4, 3, 9, 4, 3, 9, 4, 3], [7, 1, 12, 7, 1, 12])
ROWS = 6  # engine routes: each call samples a batch of rows, prompts alternating


def sharp_llama(seed: int) -> torch.nn.Module:
    """A tiny Llama whose next-token distributions are far from uniform (so drafts matter)."""
    model = tiny_llama(seed, vocab=V)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


@pytest.fixture(scope="module")
def target():
    return sharp_llama(0)


def drafter_options(method: str, model) -> dict:
    """The drafter's options, drafting at a fixed depth (an adaptive budget could decide that
    a tiny target is cheaper than drafting and draft nothing, which tests nothing)."""
    opts: dict = {"num_speculative_tokens": 3, "adaptive": False}
    if method == "layer_skip":
        opts["layers"] = 2
    elif method == "draft_model":
        opts["model"] = sharp_llama(1)
    elif method in HEAD_KINDS:
        opts["checkpoint"] = make_net(method, model, draft_vocab=V)
    return opts


def exact_joints(model, prompt: list[int], sampling: SamplingParams
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's own joints of (x1, x2) and (x2, x3) after ``prompt``: two ``[V, V]``
    tensors of probabilities."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        p1 = probs_from_logits(model(ids).logits[0, -1].float(), sampling)  # [V]
        one = torch.cat([ids.expand(V, -1), torch.arange(V)[:, None]], 1)
        p2 = probs_from_logits(model(one).logits[:, -1].float(), sampling)  # [V, V]
        pairs = torch.cartesian_prod(torch.arange(V), torch.arange(V))  # [V*V, 2]
        two = torch.cat([ids.expand(V * V, -1), pairs], 1)
        p3 = probs_from_logits(model(two).logits[:, -1].float(), sampling).view(V, V, V)
    j12 = p1[:, None] * p2
    j23 = (j12[:, :, None] * p3).sum(0)
    return j12, j23


def batch(rows: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """``rows`` left-padded rows alternating the two prompts; returns ids, mask, prompt index
    per row."""
    which = [r % len(PROMPTS) for r in range(rows)]
    L = max(len(p) for p in PROMPTS)
    ids = torch.zeros(rows, L, dtype=torch.long)
    mask = torch.zeros(rows, L, dtype=torch.long)
    for r, w in enumerate(which):
        p = PROMPTS[w]
        ids[r, L - len(p):] = torch.tensor(p)
        mask[r, L - len(p):] = 1
    return ids, mask, which


def sample_route(route: str, model, method: str, gen: dict, generator=None
                 ) -> tuple[dict[int, torch.Tensor], int]:
    """Call ``route`` until every prompt it samples has ``SAMPLES`` draws of (x1, x2, x3);
    returns the draws per prompt index (``[SAMPLES, 3]``) and the draft tokens accepted."""
    opts = drafter_options(method, model)
    draws: dict[int, list[list[int]]] = {}
    accepted = 0
    if route == "assistant_model":  # batch 1: transformers' assisted loop
        ids = torch.tensor([PROMPTS[0]])
        helper = sh.assistant(model, method, **opts)
        matches: list[int] = []
        with record_matches(matches):
            for _ in range(SAMPLES):
                out = model.generate(ids, max_new_tokens=NEW, assistant_model=helper, **gen)
                draws.setdefault(0, []).append(out[0, ids.shape[1]:].tolist())
        return {k: torch.tensor(v) for k, v in draws.items()}, sum(matches)
    ids, mask, which = batch(ROWS)
    custom = sh.custom_generate(method, **opts) if route == "custom_generate" else None
    for _ in range(SAMPLES * len(PROMPTS) // ROWS):
        if custom is not None:
            out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW,
                                 custom_generate=custom, **gen)
        else:
            out, stats = sh.generate(model, ids, mask, max_new_tokens=NEW, method=method,
                                     generator=generator, return_stats=True, **opts, **gen)
            accepted += sum(sum(r) for r in stats.accepted_per_step)
        for r, w in enumerate(which):
            draws.setdefault(w, []).append(out[r, ids.shape[1]:].tolist())
    return {k: torch.tensor(v) for k, v in draws.items()}, accepted


def pvalues(model, draws: dict[int, torch.Tensor], sampling: SamplingParams) -> list[float]:
    """The chi-square p-values of (x1, x2) and (x2, x3), for each sampled prompt."""
    out = []
    for w, x in draws.items():
        assert x.shape == (SAMPLES, NEW)
        for (a, b), joint in zip(((0, 1), (1, 2)), exact_joints(model, PROMPTS[w], sampling)):
            counts = torch.bincount(x[:, a] * V + x[:, b], minlength=V * V)
            out.append(chisquare_pvalue(counts, joint.flatten() * SAMPLES))
    return out


SETTINGS = {
    "t1": ({"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0},
           SamplingParams(temperature=1.0)),
    "t0.8-topk8-topp0.9": ({"do_sample": True, "temperature": 0.8, "top_k": 8, "top_p": 0.9},
                           SamplingParams(temperature=0.8, top_k=8, top_p=0.9)),
}
TOKEN_DRAFTERS = ["ngram", "draft_model", "layer_skip"]  # what assistant_model can run
CASES = (
    [(route, m, "t1") for route in ("generate", "custom_generate")
     for m in [*TOKEN_DRAFTERS, *HEAD_KINDS]]
    + [("assistant_model", m, "t1") for m in TOKEN_DRAFTERS]
    + [(route, "draft_model", "t0.8-topk8-topp0.9")
       for route in ("generate", "custom_generate", "assistant_model")]
)


@pytest.mark.parametrize("route, method, setting", CASES)
def test_one_seed_many_calls_keeps_the_target_distribution(target, route, method, setting):
    gen, sampling = SETTINGS[setting]
    torch.manual_seed(1234)  # once, as a user would; every call after draws fresh noise
    draws, accepted = sample_route(route, target, method, gen)
    assert min(pvalues(target, draws, sampling)) > ALPHA
    if route != "custom_generate":  # and speculation did something (custom: no stats)
        assert accepted > 0


def test_a_callers_generator_advances_across_calls(target):
    """``specplug.hf.generate(..., generator=g)``: the caller's generator drives drafts and
    verification alike, call after call."""
    gen, sampling = SETTINGS["t1"]
    draws, _ = sample_route("generate", target, "layer_skip", gen,
                            generator=torch.Generator().manual_seed(99))
    assert min(pvalues(target, draws, sampling)) > ALPHA


@contextlib.contextmanager
def same_draft_noise_every_call(monkeypatch):
    """Plant the bug: every draw of draft tokens uses the same noise (a generator re-seeded
    per call, as the ``assistant_model`` route had)."""
    original = tree_module._sampled_children

    def reseeded(cands, k, generator):
        return original(cands, k, torch.Generator().manual_seed(0))

    monkeypatch.setattr(tree_module, "_sampled_children", reseeded)
    yield


@pytest.mark.parametrize("route", ["generate", "custom_generate", "assistant_model"])
def test_the_check_rejects_draft_noise_repeated_across_calls(target, monkeypatch, route):
    """The control: the statistic above rejects the planted bias on every route."""
    gen, sampling = SETTINGS["t1"]
    torch.manual_seed(1234)
    with same_draft_noise_every_call(monkeypatch):
        draws, _ = sample_route(route, target, "layer_skip", gen)
    assert min(pvalues(target, draws, sampling)) < ALPHA
