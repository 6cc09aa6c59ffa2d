"""The n-gram drafter's matching and ranking (no model)."""

from __future__ import annotations

from specplug.drafters.base import DraftContext
from specplug.drafters.ngram import NgramDrafter, NgramOptions, context_length
from specplug.sampling import SamplingParams


def _chain(drafter: NgramDrafter, tokens: list[int], depth: int) -> list[int]:
    """The top chain of ``depth`` tokens at fixed depth (not sized by acceptance)."""
    ctx = DraftContext(tokens=[tokens], active=[True], sampling=SamplingParams(), adaptive=False)
    node, out = drafter.begin(ctx)[0], []
    for _ in range(depth):
        cands = node.candidates(1)
        if not cands.tokens:
            break
        out.append(cands.tokens[0])
        node = cands.handles[0]
    return out


def test_context_length():
    toks = [1, 2, 3, 9, 1, 2, 3]
    assert context_length(toks, 3) == 3  # "1 2 3" precedes position 3, as it ends toks
    assert context_length(toks, 3, cap=2) == 2
    assert context_length(toks, 1) == 0  # toks[0] = 1 != toks[-1] = 3
    assert context_length(toks, 0) == 0


def test_alternating_text_follows_the_occurrence_one_period_back():
    """``1 Q 2 Q 1 Q 2 Q 1 Q``, Q longer than the longest n-gram: after Q the counts tie (2 vs 2)
    and the most recent occurrence says 1; only the matching context says 2, which is right."""
    q = [7, 8, 9, 10, 11]
    tokens = [1, *q, 2, *q, 1, *q, 2, *q, 1, *q]
    drafter = NgramDrafter(NgramOptions(), max_depth=8)
    drafter.start([tokens])
    assert _chain(drafter, tokens, 8) == [2, *q, 1, 7]


def test_majority_then_recency_without_context_differences():
    tokens = [3, 5, 1, 4, 5, 2, 6, 5, 1, 8, 5]  # "5" -> 1, 2, 1, each with context 1: majority
    drafter = NgramDrafter(NgramOptions(prompt_lookup_max=1), max_depth=1)
    drafter.start([tokens])
    assert _chain(drafter, tokens, 1) == [1]
    tokens = [3, 5, 1, 4, 5, 2, 8, 5]  # "5" -> 1, 2: a tie, the most recent wins
    drafter.start([tokens])
    assert _chain(drafter, tokens, 1) == [2]
