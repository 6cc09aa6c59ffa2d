"""Sampling parameters and the target's warped distribution.

The warping reproduces Hugging Face's own logits warpers in their order (temperature, then
top-k, then top-p, each keeping at least one token), so that exact speculative sampling draws
from precisely the distribution the target's plain ``generate(do_sample=True)`` would.
"""

from __future__ import annotations

import torch

from specplug.types import SamplingParams

__all__ = ["SamplingParams", "argmax_last", "check_finite", "probs_from_logits", "sample_tokens", "warp_logits"]


def argmax_last(x: torch.Tensor) -> torch.Tensor:
    """``x [..., V]`` -> ``[...]`` int64: ``torch.argmax(x, -1)`` (the first of tied maxima, a
    NaN's index where there is one), computed as ``x.max(-1).indices``, which returns the same
    indices and is faster on CPU (measured in docs/kernels.md)."""
    return x.max(-1).indices


def warp_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Apply temperature, top-k and top-p exactly as transformers' warpers do.

    Args:
        logits: ``[..., V]`` raw logits.
    Returns:
        ``[..., V]`` float32 logits with filtered entries set to ``-inf``.
    """
    scores = logits.float()
    if params.temperature not in (0.0, 1.0):
        scores = scores / params.temperature
    vocab = scores.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(scores, params.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(scores, dim=-1, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cum <= (1.0 - params.top_p)
        remove_sorted[..., -1:] = False  # min_tokens_to_keep = 1
        remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
        scores = scores.masked_fill(remove, float("-inf"))
    return scores


def check_finite(logits: torch.Tensor, what: str = "the model") -> None:
    """Raise a clear error if ``logits`` hold NaN: a NaN would otherwise turn silently into
    arbitrary tokens. ``what`` names the producer in the message. (A row's max is NaN exactly
    when the row holds one: a tenth of the time ``isnan(logits).any()`` takes.)"""
    if logits.numel() and bool(torch.isnan(logits.amax(-1)).any()):
        raise FloatingPointError(
            f"NaN in {what}'s logits: it produced NaN scores (broken weights, or a dtype that "
            "overflows: use float32 or bfloat16 on CPU)"
        )


def probs_from_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """``[..., V]`` logits -> ``[..., V]`` float32 probabilities of the warped distribution.

    Raises:
        FloatingPointError: if the logits hold NaN (see ``check_finite``).
    """
    check_finite(logits)
    if params.greedy:
        idx = argmax_last(logits)[..., None]
        return torch.zeros_like(logits, dtype=torch.float32).scatter_(-1, idx, 1.0)
    return warp_logits(logits, params).softmax(dim=-1)


def sample_tokens(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> torch.Tensor:
    """Draw one token per row. ``logits [B, V]`` -> ``[B]`` int64 (argmax when greedy)."""
    if params.greedy:
        check_finite(logits)
        return argmax_last(logits)
    probs = probs_from_logits(logits, params)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
