"""Test-time drafter distillation (``adapt={"test_time": ...}``): it learns, it never changes
the output, requests stay isolated, memory stays bounded, bad set-ups fail clearly."""

from __future__ import annotations

import pytest
import torch
from test_heads import make_net
from tiny_models import reference_greedy, repetitive_prompts, tiny_llama

from specplug import SpecConfig
from specplug.engine import ModelTargetRunner, Speculator, speculative_generate


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(0)


@pytest.fixture(scope="module")
def draft():
    return tiny_llama(3, layers=1)


def _spec(llama, method: str, draft=None, **tts) -> Speculator:
    opts = {"checkpoint": make_net(method, llama)} if method != "draft_model" else \
        {"model": draft}
    cfg = SpecConfig(method=method, num_speculative_tokens=3, adaptive=False,
                     adapt={"test_time": {"interval": 1, "lr": 1e-2, "window": 32, **tts}},
                     **opts)
    return Speculator.from_config(cfg, llama)


def _run(llama, spec, ids, mask, n, **kw):
    runner = ModelTargetRunner(llama, hidden_layers=spec.drafter.hidden_layers)
    return speculative_generate(runner, spec, ids, mask, max_new_tokens=n, **kw)


def test_online_updates_reduce_the_loss_on_a_repeated_pattern(llama):
    ids, mask = repetitive_prompts([12], seed=2)
    spec = _spec(llama, "eagle")
    _run(llama, spec, ids, mask, 60)
    trainer = spec.observers[0]
    assert trainer.updates > 10
    window = trainer.windows[0]
    adapter = spec.drafter.output_adapter
    with torch.no_grad():
        adapter.slot = -1  # the head as shipped
        before = float(spec.drafter.online_loss(window))
        adapter.slot = 0
        after = float(spec.drafter.online_loss(window))
    assert after < 0.7 * before, (before, after)


@pytest.mark.parametrize("method, train, scope, tree", [
    ("eagle", "adapter", "request", "chain"),
    ("eagle", "adapter", "shared", "dynamic"),
    ("clover", "all", "shared", "chain"),
    ("medusa", "adapter", "request", "dynamic"),
    ("draft_model", "adapter", "request", "chain"),
    ("draft_model", "all", "shared", "dynamic"),
])
def test_greedy_output_unchanged_with_adaptation(llama, draft, method, train, scope, tree):
    ids, mask = repetitive_prompts([9, 14, 5], seed=4)
    want = reference_greedy(llama, ids, mask, 24)
    spec = _spec(llama, method, draft, train=train, scope=scope)
    if tree == "dynamic":
        spec.builder = Speculator.from_config(SpecConfig(
            method="ngram", tree="dynamic", tree_budget=6, num_speculative_tokens=3)).builder
    for _ in range(2):  # a second generation starts from the first's state (or a fresh one)
        got = _run(llama, spec, ids, mask, 24)
        assert got.sequences == want
    assert spec.observers[0].updates > 0


def test_sampled_output_is_reproducible_and_differs_from_greedy(llama):
    """Sampling with adaptation runs the exact verifier (its distribution tests cover every
    drafter); here: same seed, same output; adaptation consumes no randomness."""
    from specplug.sampling import SamplingParams

    ids, mask = repetitive_prompts([9, 14], seed=4)
    outs = []
    for _ in range(2):
        spec = _spec(llama, "eagle")
        g = torch.Generator().manual_seed(7)
        outs.append(_run(llama, spec, ids, mask, 20, sampling=SamplingParams(temperature=0.8),
                         generator=g).sequences)
    assert outs[0] == outs[1]


def test_requests_batched_together_do_not_share_adaptation(llama):
    """Row 1 of a batch adapts exactly as it does alone; row 0's adaptation never reaches it."""
    ids, mask = repetitive_prompts([9, 14], seed=4)
    both = _spec(llama, "eagle")
    _run(llama, both, ids, mask, 30)
    alone = _spec(llama, "eagle")
    _run(llama, alone, ids[1:, -14:], mask[1:, -14:], 30)
    a, b = both.drafter.output_adapter, alone.drafter.output_adapter
    assert a.num_slots == 2 and b.num_slots == 1
    assert a.b[1].detach().abs().max() > 0  # it did adapt
    torch.testing.assert_close(a.b[1], b.b[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(a.a[1], b.a[0])
    assert not torch.allclose(a.b[0], a.b[1])


@pytest.mark.parametrize("scope", ["request", "shared"])
def test_a_new_request_starts_fresh_unless_shared(llama, scope):
    ids, mask = repetitive_prompts([12], seed=2)
    spec = _spec(llama, "eagle", train="all", scope=scope)
    base = [p.detach().clone() for p in spec.drafter.net.parameters()]
    trainer = spec.observers[0]
    trainer.finish = lambda: None  # look at the weights before the end-of-request restore
    _run(llama, spec, ids, mask, 30)
    trained = [p.detach().clone() for p in spec.drafter.net.parameters()]
    assert any(not torch.equal(x, y) for x, y in zip(base, trained))
    trainer.start([[1, 2, 3]])  # the next request
    now = list(spec.drafter.net.parameters())
    if scope == "request":
        assert all(torch.equal(x, y) for x, y in zip(base, now))
    else:
        assert all(torch.equal(x, y) for x, y in zip(trained, now))
    del trainer.finish
    _run(llama, spec, ids, mask, 30)  # a request ends: per-request weights are restored
    now = list(spec.drafter.net.parameters())
    assert all(torch.equal(x, y) for x, y in zip(base, now)) == (scope == "request")


def test_memory_stays_bounded_over_a_long_run(llama):
    ids, mask = repetitive_prompts([12], seed=2)
    spec = _spec(llama, "eagle", window=16)
    trainer = spec.observers[0]
    sizes = []
    hook = trainer.observe

    def observe(record):
        hook(record)
        sizes.append(trainer.state_numel())

    trainer.observe = observe
    _run(llama, spec, ids, mask, 200)
    assert len(trainer.windows[0]) == 16
    late = sizes[len(sizes) // 3:]
    assert max(late) == min(late), "adaptation state grew during the generation"


def test_user_draft_model_and_target_are_not_modified_by_adapters(llama, draft):
    head = draft.get_output_embeddings()
    spec = _spec(llama, "draft_model", draft)
    assert draft.get_output_embeddings() is head  # the drafter adapts a view
    assert spec.drafter.model.get_output_embeddings() is not head
    spec2 = Speculator.from_config(SpecConfig(method="layer_skip", layers=1, adaptive=False,
                                              adapt={"test_time": {}}), llama)
    assert type(llama.get_output_embeddings()).__name__ == "Linear"
    assert spec2.drafter.model.get_output_embeddings() is not llama.get_output_embeddings()


@pytest.mark.parametrize("cfg, match", [
    ({"method": "ngram", "adapt": {"test_time": {}}}, "suffix_cache_tokens"),
    ({"method": "layer_skip", "adapt": {"test_time": {"train": "all"}}}, "target's own"),
    ({"method": "ngram", "adapt": {"warp_drive": {}}}, "unknown adaptation 'warp_drive'"),
    ({"method": "ngram", "adapt": {"test_time": {"lr": -1}}}, r"adapt.test_time: lr"),
    ({"method": "ngram", "adapt": {"test_time": {"learning_rate": 1}}}, "Options of"),
])
def test_bad_adaptation_settings_fail_clearly(cfg, match):
    with pytest.raises(ValueError, match=match):
        SpecConfig(**cfg)


def test_all_weights_per_request_refuses_a_batch(llama):
    ids, mask = repetitive_prompts([9, 14], seed=4)
    spec = _spec(llama, "eagle", train="all", scope="request")
    with pytest.raises(ValueError, match="one request at a time"):
        _run(llama, spec, ids, mask, 8)


def test_hf_routes_adapt_and_keep_the_output(llama, draft):
    import specplug.hf as sh

    ids, mask = repetitive_prompts([10], seed=4)
    want = llama.generate(ids, max_new_tokens=25, do_sample=False)
    tts = {"test_time": {"interval": 1, "window": 16}}
    a = sh.assistant(llama, "draft_model", model=draft, num_speculative_tokens=3,
                     adaptive=False, adapt=tts)
    got = llama.generate(ids, max_new_tokens=25, do_sample=False, assistant_model=a)
    assert torch.equal(got, want)
    assert a.speculator.observers[0].updates > 0
    spec = Speculator.from_config(SpecConfig(method="eagle", checkpoint=make_net("eagle", llama),
                                             adapt=tts), llama)
    got = sh.generate(llama, ids, max_new_tokens=25, do_sample=False, speculator=spec)
    assert torch.equal(got, want)
    assert spec.observers[0].updates > 0


def test_serving_engines_refuse_adaptation_they_cannot_feed():
    from specplug.serving import ChainProposer

    with pytest.raises(ValueError, match="suffix_cache_tokens"):
        ChainProposer(SpecConfig(method="draft_model", model=tiny_llama(3, layers=1),
                                 adapt={"test_time": {}}), vocab_size=96)
