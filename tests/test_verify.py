"""Verifiers on hand-made trees and logits."""

from __future__ import annotations

import pytest
import torch

from specplug.acceptance import verify_exact, verify_greedy, verify_typical
from specplug.sampling import (
    SamplingParams,
    argmax_last,
    check_finite,
    probs_from_logits,
    warp_logits,
)
from specplug.tree import DraftTree

V = 10


def onehot_logits(argmaxes):
    """[B, N+1] argmax tokens -> logits [B, N+1, V] with those argmaxes."""
    t = torch.tensor(argmaxes)
    return torch.nn.functional.one_hot(t, V).float() * 5.0


def tree(tokens, parents):
    return DraftTree(torch.tensor(tokens), torch.tensor(parents),
                     torch.tensor([len(r) for r in tokens]))


def test_greedy_accepts_the_deepest_matching_path():
    #  root -> 0:a(3) -> 2:c(5)
    #       -> 1:b(4) -> 3:d(6) -> 4:e(7)
    t = tree([[3, 4, 5, 6, 7]], [[-1, -1, 0, 1, 3]])
    # target argmax at root=4, at node1 (b)=6, at node3 (d)=7, at node4 (e)=2
    res = verify_greedy(t, onehot_logits([[4, 0, 6, 0, 7, 2]]))
    assert res.num_accepted.tolist() == [3]
    assert res.accepted_nodes[0].tolist() == [1, 3, 4]
    assert res.bonus_tokens.tolist() == [2]
    assert res.new_tokens(t) == [[4, 6, 7, 2]]


def test_greedy_ragged_batch_and_no_match():
    t = tree([[1, 2], [7, 8]], [[-1, 0], [-1, 0]])
    res = verify_greedy(t, onehot_logits([[1, 9, 3], [5, 0, 0]]))
    assert res.new_tokens(t) == [[1, 9], [5]]
    assert res.num_accepted.tolist() == [1, 0]


def test_empty_trees():
    t = DraftTree(torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0, dtype=torch.long),
                  torch.zeros(2, dtype=torch.long))
    res = verify_exact(t, onehot_logits([[3], [4]]), SamplingParams())
    assert res.new_tokens(t) == [[3], [4]]


def test_shape_and_nan_errors():
    t = tree([[1, 2]], [[-1, 0]])
    with pytest.raises(ValueError, match=r"\[B, N\+1, V\]"):
        verify_greedy(t, torch.zeros(1, 2, V))
    bad = torch.zeros(1, 3, V)
    bad[0, 1, 2] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN"):
        verify_exact(t, bad, SamplingParams(temperature=1.0))


SHAPES = [(1, 1), (1, 7), (3, 2, 17), (9, 4099), (2, 5, 262), (4, 49152)]


@pytest.mark.parametrize("shape", SHAPES)
def test_argmax_last_is_torch_argmax(shape):
    """Ties (few distinct values), NaN, all -inf rows and a non-contiguous view: the same index
    as ``torch.argmax`` everywhere (greedy output depends on the first-of-ties rule)."""
    g = torch.Generator().manual_seed(sum(shape))
    for trial in range(20):
        x = torch.randint(0, 3, shape, generator=g).float()
        rows = x.view(-1, shape[-1])
        if trial % 3 == 1:
            rows[int(torch.randint(0, rows.shape[0], (1,), generator=g))] = float("-inf")
        if trial % 4 == 2:
            flat = x.view(-1)
            flat[int(torch.randint(0, flat.numel(), (1,), generator=g))] = float("nan")
        assert torch.equal(argmax_last(x), x.argmax(-1))
        if x.dim() == 3:
            view = x.transpose(0, 1)
            assert torch.equal(argmax_last(view), view.argmax(-1))


@pytest.mark.parametrize("shape", SHAPES)
def test_check_finite_finds_one_nan_anywhere(shape):
    x = torch.randn(shape)
    x.view(-1)[0] = float("-inf")
    x.view(-1)[-1] = float("inf")
    check_finite(x)  # infinities are not NaN
    for at in (0, x.numel() // 2, x.numel() - 1):
        bad = x.clone()
        bad.view(-1)[at] = float("nan")
        with pytest.raises(FloatingPointError, match="NaN in the drafter's logits"):
            check_finite(bad, "the drafter")


def test_exact_with_identical_q_accepts_everything():
    logits = torch.randn(1, 4, V)
    p = probs_from_logits(logits, SamplingParams(temperature=1.0))
    tokens = p[0, :3].argmax(-1)[None]
    t = DraftTree(tokens, torch.tensor([[-1, 0, 1]]), torch.tensor([3]), draft_probs=p[:, :3])
    # q == p at each node: min(1, p/q) = 1, always accepted
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        res = verify_exact(t, logits, SamplingParams(temperature=1.0), g)
        assert res.num_accepted.tolist() == [3]


def test_exact_never_emits_filtered_tokens():
    logits = torch.randn(64, 3, V)
    s = SamplingParams(temperature=0.8, top_k=3)
    allowed = torch.isfinite(warp_logits(logits, s))
    t = DraftTree(torch.randint(0, V, (64, 2)), torch.tensor([[-1, 0]] * 64),
                  torch.full((64,), 2))
    res = verify_exact(t, logits, s, torch.Generator().manual_seed(0))
    for b, toks in enumerate(res.new_tokens(t)):
        for slot, tok in enumerate(toks):  # a chain: the i-th token is scored at slot i
            assert allowed[b, slot, tok]


def test_warp_matches_transformers():
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 50, generator=g) * 3
    for T, k, p in [(0.7, 5, 1.0), (1.3, 0, 0.8), (1.0, 20, 0.5), (0.5, 1, 0.9)]:
        ref = logits.clone()
        ids = torch.zeros(16, 1, dtype=torch.long)
        if T != 1.0:
            ref = TemperatureLogitsWarper(T)(ids, ref)
        if k:
            ref = TopKLogitsWarper(k)(ids, ref)
        if p < 1.0:
            ref = TopPLogitsWarper(p)(ids, ref)
        ours = warp_logits(logits, SamplingParams(temperature=T, top_k=k, top_p=p))
        assert torch.equal(torch.isfinite(ours), torch.isfinite(ref))
        assert torch.allclose(ours.softmax(-1), ref.softmax(-1), atol=1e-6)


def test_typical_acceptance_accepts_confident_tokens_only():
    t = tree([[1, 2]], [[-1, 0]])
    logits = torch.full((1, 3, V), -10.0)
    logits[0, 0, 1] = 10.0  # confident in 1: accepted
    logits[0, 1, :] = 0.0  # uniform after 1: token 2 has p = 0.1 > alpha * exp(-H) = 0.03
    res = verify_typical(t, logits, SamplingParams(), posterior_threshold=0.09,
                         posterior_alpha=0.3)
    assert res.num_accepted.tolist() == [2]
    res = verify_typical(t, logits, SamplingParams(), posterior_threshold=0.2,
                         posterior_alpha=3.0)
    assert res.num_accepted.tolist() == [1]


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_k=-1), dict(top_p=0.0),
                                 dict(top_p=1.5)])
def test_sampling_params_validation(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)
