"""Hugging Face adapter: both routes token-identical to generate; bad input fails clearly."""

from __future__ import annotations

import pytest
import torch
import transformers
from tiny_models import MODELS, VOCAB, repetitive_prompts, tiny_gemma, tiny_llama

import specplug.hf as sh
from specplug.adapters import hf_assisted

# a deprecated transformers argument in specplug's calls fails the test (5.24 silently dropped
# the deprecated past_key_values when generate also passed cache=)
pytestmark = pytest.mark.filterwarnings("error::FutureWarning", "error::DeprecationWarning")


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(0)


def drafter_opts(method, model):
    return {"ngram": {}, "layer_skip": {"layers": 2},
            "draft_model": {"model": tiny_llama(0) if model is None else model}}[method]


@pytest.mark.parametrize("method", ["ngram", "draft_model", "layer_skip"])
def test_assistant_route_is_identical(llama, method):
    ids, _ = repetitive_prompts([10], seed=4)
    want = llama.generate(ids, max_new_tokens=25, do_sample=False)
    a = sh.assistant(llama, method, num_speculative_tokens=3, **drafter_opts(method, None))
    got = llama.generate(ids, max_new_tokens=25, do_sample=False, assistant_model=a)
    assert torch.equal(got, want)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_generate_route_matches_generate_tensor_with_eos_and_padding(name):
    model = MODELS[name](0)
    ids, mask = repetitive_prompts([7, 12, 3], seed=9)
    free = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    eos = int(free[1, ids.shape[1] + 4])  # row 1 stops at its 5th token
    want = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                          eos_token_id=eos, pad_token_id=0)
    got = sh.generate(model, ids, mask, max_new_tokens=16, do_sample=False, eos_token_id=eos,
                      pad_token_id=0, method="layer_skip", layers=2, tree="dynamic",
                      tree_budget=6)
    assert torch.equal(got, want)


def test_custom_generate_route(llama):
    ids, mask = repetitive_prompts([9, 4], seed=5)
    want = llama.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    got = llama.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                         custom_generate=sh.custom_generate("ngram", tree="static",
                                                            tree_paths=[[0], [1], [0, 0]]))
    assert torch.equal(got, want)


def test_sampling_routes_run_and_reproduce(llama):
    ids, _ = repetitive_prompts([8], seed=6)
    perfect = tiny_llama(0)
    a = sh.assistant(llama, "draft_model", model=perfect, num_speculative_tokens=4)
    torch.manual_seed(0)
    out = llama.generate(ids, max_new_tokens=12, do_sample=True, temperature=0.8,
                         assistant_model=a)
    assert out.shape == (1, ids.shape[1] + 12)
    runs = [sh.generate(llama, ids, max_new_tokens=12, do_sample=True, temperature=0.8,
                        top_k=20, seed=11, method="draft_model", model=perfect,
                        adaptive=False, return_stats=True) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0])
    # q == p: every draft token is accepted
    assert runs[0][1].mean_accepted_tokens > 3.0


# ------------------------------------------------------------------------ bad input


def test_vocabulary_mismatch_is_caught_at_set_up(llama):
    with pytest.raises(ValueError, match="vocabulary mismatch.*80.*96"):
        sh.assistant(llama, "draft_model", model=tiny_llama(0, vocab=80))
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        sh.generate(llama, torch.tensor([[1, 2, 3]]), max_new_tokens=4, method="draft_model",
                    model=tiny_llama(0, vocab=VOCAB + 1))


def test_prompt_past_the_context(llama):
    ids = torch.randint(1, VOCAB, (1, 250))
    with pytest.raises(ValueError, match="exceeds the model's context of 256"):
        sh.generate(llama, ids, max_new_tokens=10, method="ngram")


def test_a_request_that_just_fits_the_context_is_served(llama):
    """Prompt + max_new_tokens = the context: drafts get shorter near the end instead of the
    request being refused, and the output is still the model's greedy output."""
    context = llama.config.max_position_embeddings
    ids = torch.tensor([[5, 6, 7, 8, 9] * ((context - 24) // 5)])
    max_new = context - ids.shape[1]
    want = llama.generate(ids, max_new_tokens=max_new, do_sample=False)
    got = sh.generate(llama, ids, max_new_tokens=max_new, method="ngram")
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match=rf"\({max_new + 1}\) exceeds the model's context"):
        sh.generate(llama, ids, max_new_tokens=max_new + 1, method="ngram")


def test_empty_prompt(llama):
    with pytest.raises(ValueError, match="empty prompt|non-empty"):
        sh.generate(llama, torch.zeros(1, 0, dtype=torch.long), max_new_tokens=4,
                    method="ngram")
    with pytest.raises(ValueError, match="empty prompt"):
        sh.generate(llama, torch.tensor([[0, 0]]), torch.tensor([[0, 0]]), max_new_tokens=4,
                    method="ngram")


def test_right_padding_is_refused(llama):
    with pytest.raises(ValueError, match="left-padded"):
        sh.generate(llama, torch.tensor([[3, 4, 0]]), torch.tensor([[1, 1, 0]]),
                    max_new_tokens=4, method="ngram")


def test_nan_logits_from_a_drafter(llama):
    broken = tiny_llama(0)
    with torch.no_grad():
        broken.lm_head.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="NaN in the 'draft_model' drafter"):
        sh.generate(llama, torch.tensor([[1, 2, 3]]), max_new_tokens=4, method="draft_model",
                    model=broken)


def test_unsupported_generation_options_are_refused(llama):
    with pytest.raises(NotImplementedError, match="repetition_penalty"):
        sh.generate(llama, torch.tensor([[1, 2, 3]]), max_new_tokens=4, method="ngram",
                    repetition_penalty=1.3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        sh.generate(llama, torch.tensor([[1, 2, 3]]), method="ngram")


def test_assistant_route_limits(llama):
    with pytest.raises(ValueError, match="verifies chains only"):
        sh.assistant(llama, "ngram", tree="dynamic")
    a = sh.assistant(llama, "ngram")
    other = tiny_gemma(0)
    with pytest.raises(ValueError, match="built for another model"):
        other.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, assistant_model=a)


def test_unsupported_transformers_version_is_refused(monkeypatch):
    monkeypatch.setattr(transformers, "__version__", "4.40.0")
    monkeypatch.setattr(hf_assisted, "_original_get_candidate_generator", None)
    with pytest.raises(RuntimeError, match=r"transformers >= 5.23, < 5.25.*found 4.40.0"):
        sh.assistant(tiny_llama(0), "ngram")


def test_generate_kwargs_are_routed_or_refused(llama):
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(TypeError, match=r"unknown options \['max_new_token'\]"):
        sh.generate(llama, ids, max_new_token=4, method="ngram")
    with pytest.raises(NotImplementedError, match="output_scores"):
        sh.generate(llama, ids, max_new_tokens=4, method="ngram", output_scores=True)
    with pytest.raises(NotImplementedError, match="without beam search"):
        sh.generate(llama, ids, max_new_tokens=4, method="ngram", num_beams=2)
    got = sh.generate(llama, ids, max_length=9, method="ngram", prompt_lookup_max=2)
    assert torch.equal(got, llama.generate(ids, max_length=9, do_sample=False))
