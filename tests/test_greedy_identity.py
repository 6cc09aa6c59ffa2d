"""Greedy speculative output is token-identical to the model's own greedy ``generate``:
every drafter x {chain, static tree, dynamic tree} x batch {1, 3} x prompt lengths, on
Llama- and Gemma-shaped tiny models (Gemma's sliding window is crossed)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import reference_greedy, repetitive_prompts, tiny_llama

from specplug import SpecConfig
from specplug.engine import ModelTargetRunner, Speculator, speculative_generate

TREES = {
    "chain": {"tree": "chain", "num_speculative_tokens": 4},
    "static": {"tree": "static", "tree_paths": [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0],
                                                [0, 0, 0, 0]]},
    "dynamic": {"tree": "dynamic", "tree_budget": 10, "tree_topk": 3,
                "num_speculative_tokens": 5},
}


def drafter_options(method, model_name):
    if method == "draft_model":
        # a different random model of the same shape: low acceptance, still identical output
        from tiny_models import MODELS
        return {"model": MODELS[model_name](seed=1)}
    if method == "layer_skip":
        return {"layers": 2}
    return {"prompt_lookup_max": 3}


@pytest.mark.parametrize("tree", sorted(TREES))
@pytest.mark.parametrize("method", ["ngram", "draft_model", "layer_skip"])
@pytest.mark.parametrize("lengths", [[9], [5, 13, 2]], ids=["batch1", "batch3"])
def test_identical_to_generate(tiny_model, method, tree, lengths):
    name, model = tiny_model
    ids, mask = repetitive_prompts(lengths, seed=len(lengths))
    want = reference_greedy(model, ids, mask, 24)
    cfg = SpecConfig(method=method, **TREES[tree], **drafter_options(method, name))
    spec = Speculator.from_config(cfg, model)
    got = speculative_generate(ModelTargetRunner(model), spec, ids, mask, max_new_tokens=24)
    assert got.sequences == want
    assert got.stats.target_forwards <= 24


def test_draft_equal_to_target_accepts_everything():
    """A draft model identical to the target must have every draft token accepted: this
    checks the drafter's cache bookkeeping, not just the (always-correct) output."""
    model = tiny_llama(0)
    ids, mask = repetitive_prompts([7, 11], seed=3)
    cfg = SpecConfig(method="draft_model", model=tiny_llama(0), num_speculative_tokens=4,
                     adaptive=False)  # always the full chain (adaptive: as the cost says)
    got = speculative_generate(ModelTargetRunner(model), Speculator.from_config(cfg, model),
                               ids, mask, max_new_tokens=21)
    assert got.sequences == reference_greedy(model, ids, mask, 21)
    assert got.stats.mean_accepted_tokens == pytest.approx(5.0)  # 4 drafts + bonus, all steps


def test_ngram_accepts_on_repetitive_text():
    model = tiny_llama(0)
    ids, mask = repetitive_prompts([40], seed=0)
    want = reference_greedy(model, ids, mask, 32)
    cfg = SpecConfig(method="ngram", num_speculative_tokens=6)
    # target's own greedy continuation, appended to the prompt, makes lookup succeed
    ids2 = torch.cat([ids, torch.tensor([want[0]])], 1)
    got = speculative_generate(ModelTargetRunner(model), Speculator.from_config(cfg, model),
                               ids2, torch.ones_like(ids2), max_new_tokens=16)
    assert got.sequences == reference_greedy(model, ids2, torch.ones_like(ids2), 16)


@pytest.mark.parametrize("max_new", [1, 2, 5, 7])
def test_max_new_tokens_exact(tiny_model, max_new):
    name, model = tiny_model
    ids, mask = repetitive_prompts([6, 12], seed=7)
    cfg = SpecConfig(method="layer_skip", layers=3 if name == "gemma" else 2,
                     num_speculative_tokens=6)
    got = speculative_generate(ModelTargetRunner(model), Speculator.from_config(cfg, model),
                               ids, mask, max_new_tokens=max_new)
    assert [len(s) for s in got.sequences] == [max_new, max_new]
    assert got.sequences == reference_greedy(model, ids, mask, max_new)


def test_eos_inside_accepted_run(tiny_model):
    """Pick as EOS a token the target emits mid-generation, with a drafter that accepts long
    runs: generation must stop right after it, exactly as ``generate`` does."""
    name, model = tiny_model
    ids, mask = repetitive_prompts([6, 10, 3], seed=11)
    free = reference_greedy(model, ids, mask, 20)
    eos = free[0][7]  # row 0 emits it at position 7 (other rows may hit it anywhere or never)
    want = reference_greedy(model, ids, mask, 20, eos=eos)
    cfg = SpecConfig(method="draft_model", model=type(model)(model.config).eval(),
                     num_speculative_tokens=5)
    cfg.drafter_options.model.load_state_dict(model.state_dict())  # perfect drafter
    got = speculative_generate(ModelTargetRunner(model), Speculator.from_config(cfg, model),
                               ids, mask, max_new_tokens=20, eos_token_ids=[eos])
    assert got.sequences == want
    assert got.sequences[0][-1] == eos and len(got.sequences[0]) <= 8
