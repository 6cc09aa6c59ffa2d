"""Verification ops: which drafted tokens the target accepts, and the token it emits after them.

Two layouts, one algorithm each for greedy and exact (lossless) sampling:

* ``verify_tree``: a batch of padded token trees (``[B, N]`` nodes with parent indices, as
  ``specplug.tree.DraftTree``), consuming the layout ``prepare_tree`` derives (depth, ancestor
  mask, path-retrieval indices). Returns the accepted path and the bonus token per row.
* ``verify_chains``: a batch of chains with ragged lengths flattened with cumulative offsets,
  as vLLM lays them out (``draft_token_ids [T]``, ``cu_num_draft_tokens [B]``). Returns vLLM's
  ``output_token_ids [B, max_spec_len + 1]`` (-1 = placeholder) and the accepted counts.

Greedy (``temperature == 0``): accept the deepest path whose every token is the target's argmax
at its parent (first index wins ties, as ``torch.argmax``); the bonus token is the argmax after
it. Output is token-identical to the target's greedy decoding.

Exact sampling: recursive rejection sampling (Leviathan et al. / Chen et al. for chains,
SpecInfer for trees). At a node whose target distribution is p, its children are tried in node
order; child i with token x, drawn from q_i (one-hot when ``draft_probs`` is None), is accepted
iff ``u[i] * q_i(x) < p(x)``; on rejection ``p <- max(p - q_i, 0)`` renormalised (kept as is if
that residual vanishes, probability < 1e-12). When no child is accepted, the bonus token is drawn
from the final p by inverse CDF with one uniform per row. All randomness comes in as tensors
(``uniforms``, ``bonus_uniforms``), so the Triton kernel and the torch reference make the same
draws from the same inputs; they can differ only where a uniform falls within float rounding of
a decision boundary (about 1e-7 per draw), and both are exact.

Top-k / top-p: the caller warps the logits first (``specplug.sampling.warp_logits``: sort-based
selection is a library op on every device) and passes ``temperature=1``; temperature alone is
fused into the kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specplug.kernels._dispatch import pick_backend
from specplug.sampling import argmax_last
from specplug.types import VerifyResult

__all__ = [
    "ChainVerifyOutput",
    "TreeVerifyOutput",
    "verify_chains",
    "verify_chains_reference",
    "verify_tree",
    "verify_tree_reference",
]

#: below this residual mass the residual is treated as empty and p is kept (see module doc)
RESIDUAL_EPS = 1e-12


#: the tree verifier's result: accepted path and bonus token per row (``specplug.types``)
TreeVerifyOutput = VerifyResult


@dataclass
class ChainVerifyOutput:
    """Attributes:
        output_token_ids: ``[B, max_spec_len + 1]`` int64, the accepted draft tokens then the
            recovered or bonus token, -1 after them (vLLM's PLACEHOLDER_TOKEN_ID).
        num_accepted: ``[B]`` int64, accepted draft tokens per row.
    """

    output_token_ids: torch.Tensor
    num_accepted: torch.Tensor


# --------------------------------------------------------------------------------------------
# argument checks (shapes and dtypes only: no host synchronisation)


def _check_sampling_inputs(temperature: float, uniforms: torch.Tensor | None,
                           bonus_uniforms: torch.Tensor | None, u_shape: tuple[int, ...],
                           b: int) -> None:
    if not temperature >= 0.0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if temperature == 0.0:
        return
    if uniforms is None or bonus_uniforms is None:
        raise ValueError("sampled verification (temperature > 0) needs uniforms and "
                         "bonus_uniforms: draw them with torch.rand from the request's generator")
    if tuple(uniforms.shape) != u_shape or tuple(bonus_uniforms.shape) != (b,):
        raise ValueError(f"uniforms must be {list(u_shape)} and bonus_uniforms [{b}], got "
                         f"{list(uniforms.shape)} and {list(bonus_uniforms.shape)}")
    if uniforms.dtype != torch.float64 or bonus_uniforms.dtype != torch.float64:
        raise ValueError("uniforms and bonus_uniforms must be float64 (torch.rand(..., "
                         "dtype=torch.float64)): float32 draws cannot reach tokens with "
                         "p < 6e-8 and would bias the output")


def _check_tree(tokens: torch.Tensor, parents: torch.Tensor, num_nodes: torch.Tensor,
                target_logits: torch.Tensor, ancestors: torch.Tensor, depth: torch.Tensor,
                retrieve: torch.Tensor, draft_probs: torch.Tensor | None) -> None:
    if tokens.dim() != 2 or parents.shape != tokens.shape:
        raise ValueError(f"tokens and parents must both be [B, N], got {list(tokens.shape)} "
                         f"and {list(parents.shape)}")
    B, N = tokens.shape
    if num_nodes.shape != (B,):
        raise ValueError(f"num_nodes must be [{B}], got {list(num_nodes.shape)}")
    if target_logits.dim() != 3 or target_logits.shape[:2] != (B, N + 1):
        raise ValueError(f"target_logits must be [B, N + 1, V] = [{B}, {N + 1}, V], got "
                         f"{list(target_logits.shape)}")
    if ancestors.shape != (B, N, N) or depth.shape != (B, N) or retrieve.dim() != 3 \
            or retrieve.shape[:2] != (B, N):
        raise ValueError("ancestors / depth / retrieve must be [B, N, N] / [B, N] / [B, N, D] "
                         "as prepare_tree returns them for these parents")
    if draft_probs is not None and draft_probs.shape != (B, N, target_logits.shape[2]):
        raise ValueError(f"draft_probs must be [B, N, V] = [{B}, {N}, {target_logits.shape[2]}]"
                         f", got {list(draft_probs.shape)}: the drafter and the target must "
                         "share one vocabulary")


def _check_chains(draft_token_ids: torch.Tensor, cu_num_draft_tokens: torch.Tensor,
                  target_logits: torch.Tensor, bonus_logits: torch.Tensor,
                  draft_probs: torch.Tensor | None, max_spec_len: int) -> None:
    if draft_token_ids.dim() != 1 or cu_num_draft_tokens.dim() != 1:
        raise ValueError("draft_token_ids must be [T] and cu_num_draft_tokens [B]")
    T, B = draft_token_ids.shape[0], cu_num_draft_tokens.shape[0]
    if target_logits.dim() != 2 or target_logits.shape[0] != T:
        raise ValueError(f"target_logits must be [T, V] = [{T}, V] (one row per draft token), "
                         f"got {list(target_logits.shape)}")
    V = target_logits.shape[1]
    if bonus_logits.shape != (B, V):
        raise ValueError(f"bonus_logits must be [B, V] = [{B}, {V}], got "
                         f"{list(bonus_logits.shape)}")
    if draft_probs is not None and draft_probs.shape != (T, V):
        raise ValueError(f"draft_probs must be [T, V] = [{T}, {V}], got "
                         f"{list(draft_probs.shape)}: the drafter and the target must share one "
                         "vocabulary")
    if max_spec_len < 0:
        raise ValueError(f"max_spec_len must be >= 0, got {max_spec_len}")


# --------------------------------------------------------------------------------------------
# public ops


def verify_tree(tokens: torch.Tensor, parents: torch.Tensor, num_nodes: torch.Tensor,
                target_logits: torch.Tensor, *, ancestors: torch.Tensor, depth: torch.Tensor,
                retrieve: torch.Tensor, temperature: float = 0.0,
                draft_probs: torch.Tensor | None = None, uniforms: torch.Tensor | None = None,
                bonus_uniforms: torch.Tensor | None = None, backend: str | None = None
                ) -> TreeVerifyOutput:
    """Verify a batch of padded token trees.

    Args:
        tokens: ``[B, N]`` int64, node i's token.
        parents: ``[B, N]`` int64, parent node (-1 = the root, the last committed token);
            topological order, siblings in the order they are to be tried.
        num_nodes: ``[B]`` int64, real nodes per row (the rest is padding).
        target_logits: ``[B, N + 1, V]`` fp32/bf16/fp16: index 0 scores the root, index i + 1
            node i (warped already when top-k / top-p apply).
        ancestors, depth, retrieve: ``[B, N, N]`` bool, ``[B, N]`` int64, ``[B, N, D]`` int64
            from ``prepare_tree(parents, num_nodes)``.
        temperature: 0 = greedy; otherwise logits are divided by it.
        draft_probs: ``[B, N, V]`` float32, the distribution node i was drawn from (None:
            deterministic drafts, one-hot).
        uniforms: ``[B, N]`` float64 in [0, 1), one per node (sampling only).
        bonus_uniforms: ``[B]`` float64 in [0, 1) (sampling only). Float64 matters: a float32
            uniform has 2^-24 resolution, which would give tokens with p < ~6e-8 (most of a
            262k vocabulary) no chance at all; comparisons and the inverse CDF's running sum
            are float64 too.
    Returns:
        ``TreeVerifyOutput`` with ``accepted_nodes [B, D]``.
    """
    _check_tree(tokens, parents, num_nodes, target_logits, ancestors, depth, retrieve,
                draft_probs)
    _check_sampling_inputs(temperature, uniforms, bonus_uniforms, tuple(tokens.shape),
                           tokens.shape[0])
    args = (tokens, parents, num_nodes, target_logits)
    kwargs = dict(ancestors=ancestors, depth=depth, retrieve=retrieve, temperature=temperature,
                  draft_probs=draft_probs, uniforms=uniforms, bonus_uniforms=bonus_uniforms)
    if pick_backend(tokens, target_logits, backend=backend) == "triton":
        from specplug.kernels._triton_verify import verify_tree_triton

        return verify_tree_triton(*args, **kwargs)
    return verify_tree_reference(*args, **kwargs)


def verify_chains(draft_token_ids: torch.Tensor, cu_num_draft_tokens: torch.Tensor,
                  target_logits: torch.Tensor, bonus_logits: torch.Tensor, *, max_spec_len: int,
                  temperature: float = 0.0, draft_probs: torch.Tensor | None = None,
                  uniforms: torch.Tensor | None = None,
                  bonus_uniforms: torch.Tensor | None = None, backend: str | None = None
                  ) -> ChainVerifyOutput:
    """Verify a batch of chains flattened as vLLM does.

    Args:
        draft_token_ids: ``[T]`` int64, every row's draft tokens back to back.
        cu_num_draft_tokens: ``[B]`` int64, inclusive cumulative draft counts (row b owns
            ``[cu[b-1], cu[b])``); every row's count must be <= ``max_spec_len``.
        target_logits: ``[T, V]``, the target's logits at the position before each draft
            token (the distribution that token is checked against).
        bonus_logits: ``[B, V]``, the target's logits after each row's last draft token.
        max_spec_len: the output's width minus one (a Python int: no host sync).
        temperature, draft_probs (``[T, V]``), uniforms (``[T]``), bonus_uniforms (``[B]``):
            as in ``verify_tree``; ``bonus_uniforms[b]`` draws either the recovered token at
            the first rejection or the bonus token.
    """
    _check_chains(draft_token_ids, cu_num_draft_tokens, target_logits, bonus_logits,
                  draft_probs, max_spec_len)
    _check_sampling_inputs(temperature, uniforms, bonus_uniforms, tuple(draft_token_ids.shape),
                           cu_num_draft_tokens.shape[0])
    # int64 offsets: vLLM passes int32 cumulative counts, and T * V overflows int32
    args = (draft_token_ids.long(), cu_num_draft_tokens.long(), target_logits, bonus_logits)
    kwargs = dict(max_spec_len=max_spec_len, temperature=temperature, draft_probs=draft_probs,
                  uniforms=uniforms, bonus_uniforms=bonus_uniforms)
    if pick_backend(draft_token_ids, target_logits, backend=backend) == "triton":
        from specplug.kernels._triton_verify import verify_chains_triton

        return verify_chains_triton(*args, **kwargs)
    return verify_chains_reference(*args, **kwargs)


# --------------------------------------------------------------------------------------------
# torch references


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``weights [R, V]`` (unnormalised, >= 0), ``u [R]`` -> ``[R]`` int64: the first index
    whose running sum exceeds ``u * total`` (the last positive index if rounding overshoots)."""
    cs = weights.double().cumsum(-1)  # float64: tokens with p ~1e-8 keep their probability
    target = (u.double() * cs[:, -1])[:, None]
    idx = torch.searchsorted(cs, target.contiguous(), right=True).squeeze(-1)
    V = weights.shape[-1]
    last_pos = torch.where(weights > 0, torch.arange(V, device=weights.device), -1).amax(-1)
    return torch.minimum(idx, last_pos)


def accepted_path(retrieve: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
    """``retrieve [B, N, D]`` and the chosen node per row ``best [B]`` (-1 = none) -> the
    accepted path ``[B, D]``, root's child first, -1 padded."""
    B, N, D = retrieve.shape
    if N == 0:
        return torch.full((B, D), -1, dtype=torch.long, device=retrieve.device)
    acc = retrieve[torch.arange(B, device=retrieve.device), best.clamp(min=0)]
    return torch.where(best[:, None] >= 0, acc, -1)


def _residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``max(p - q, 0)`` for ``p, q [R, V]``: what is left of p after rejecting a draft drawn
    from q (unnormalised)."""
    return (p - q).clamp(min=0.0)


def _greedy_tree(tokens: torch.Tensor, parents: torch.Tensor, num_nodes: torch.Tensor,
                 target_logits: torch.Tensor, ancestors: torch.Tensor, depth: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, N = tokens.shape
    argmax = argmax_last(target_logits)  # [B, N + 1]
    real = torch.arange(N, device=tokens.device)[None, :] < num_nodes[:, None]
    parent_pred = argmax.gather(1, parents.clamp(min=-1) + 1)
    matched = (tokens == parent_pred) & real
    ok = ~(ancestors & ~matched[:, None, :]).any(-1) & real
    score = torch.where(ok, depth, 0)
    if N == 0:
        best_depth = torch.zeros(B, dtype=torch.long, device=tokens.device)
        best = best_depth - 1
    else:
        best_depth, best = score.max(-1)  # first maximum: the earliest of equally deep paths
        best = torch.where(best_depth > 0, best, -1)
    return best, best_depth, argmax.gather(1, (best + 1)[:, None]).squeeze(1)


def _sampled_tree(tokens: torch.Tensor, parents: torch.Tensor, num_nodes: torch.Tensor,
                  target_logits: torch.Tensor, temperature: float,
                  draft_probs: torch.Tensor | None, uniforms: torch.Tensor,
                  bonus_uniforms: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, N = tokens.shape
    dev = tokens.device
    s = target_logits.float() / temperature
    m = s.amax(-1, keepdim=True)
    e = torch.where(s == float("-inf"), 0.0, (s - m).exp())  # [B, N + 1, V] unnormalised p
    z = e.sum(-1)  # [B, N + 1]
    V = e.shape[-1]
    slot = torch.zeros(B, dtype=torch.long, device=dev)  # 0 = root, i + 1 = node i
    fresh = torch.ones(B, dtype=torch.bool, device=dev)  # p is the slot's own distribution
    resid = torch.zeros(B, V, device=dev)
    total = torch.ones(B, device=dev)
    best = torch.full((B,), -1, dtype=torch.long, device=dev)
    depth = torch.zeros(B, dtype=torch.long, device=dev)
    for i in range(N):
        test = (i < num_nodes) & (parents[:, i] + 1 == slot)
        if not bool(test.any()):
            continue
        r = test.nonzero(as_tuple=True)[0]
        x = tokens[r, i]
        sl = slot[r]
        p = torch.where(fresh[r, None], e[r, sl] / z[r, sl, None], resid[r] / total[r, None])
        px = p.gather(1, x[:, None]).squeeze(1)
        qx = torch.ones_like(px) if draft_probs is None else draft_probs[r, i, x]
        acc = uniforms[r, i].double() * qx.double() < px.double()
        a, j = r[acc], r[~acc]
        best[a], depth[a], slot[a], fresh[a] = i, depth[a] + 1, i + 1, True
        if len(j):
            pj = p[~acc]
            if draft_probs is None:
                q = torch.zeros_like(pj).scatter_(1, x[~acc, None], 1.0)
            else:
                q = draft_probs[j, i]
            new = _residual(pj, q)
            t = new.sum(-1)
            keep = t > RESIDUAL_EPS
            k = j[keep]
            resid[k], total[k], fresh[k] = new[keep], t[keep], False
    dist = torch.where(fresh[:, None], e[torch.arange(B, device=dev), slot], resid)
    return best, depth, _inverse_cdf(dist, bonus_uniforms)


def verify_tree_reference(tokens: torch.Tensor, parents: torch.Tensor, num_nodes: torch.Tensor,
                          target_logits: torch.Tensor, *, ancestors: torch.Tensor,
                          depth: torch.Tensor, retrieve: torch.Tensor, temperature: float = 0.0,
                          draft_probs: torch.Tensor | None = None,
                          uniforms: torch.Tensor | None = None,
                          bonus_uniforms: torch.Tensor | None = None) -> TreeVerifyOutput:
    """Plain-torch ``verify_tree`` (same contract)."""
    if temperature == 0.0:
        best, n_acc, bonus = _greedy_tree(tokens, parents, num_nodes, target_logits, ancestors,
                                          depth)
    else:
        assert uniforms is not None and bonus_uniforms is not None
        best, n_acc, bonus = _sampled_tree(tokens, parents, num_nodes, target_logits,
                                           temperature, draft_probs, uniforms, bonus_uniforms)
    return TreeVerifyOutput(accepted_nodes=accepted_path(retrieve, best), num_accepted=n_acc,
                            bonus_tokens=bonus)


def verify_chains_reference(draft_token_ids: torch.Tensor, cu_num_draft_tokens: torch.Tensor,
                            target_logits: torch.Tensor, bonus_logits: torch.Tensor, *,
                            max_spec_len: int, temperature: float = 0.0,
                            draft_probs: torch.Tensor | None = None,
                            uniforms: torch.Tensor | None = None,
                            bonus_uniforms: torch.Tensor | None = None) -> ChainVerifyOutput:
    """Plain-torch ``verify_chains`` (same contract): the chains are checked position by
    position in one vector op per position across rows."""
    dev = draft_token_ids.device
    B = cu_num_draft_tokens.shape[0]
    starts = torch.cat([cu_num_draft_tokens.new_zeros(1), cu_num_draft_tokens[:-1]])
    counts = cu_num_draft_tokens - starts
    out = torch.full((B, max_spec_len + 1), -1, dtype=torch.long, device=dev)
    n_acc = torch.zeros(B, dtype=torch.long, device=dev)
    live = torch.ones(B, dtype=torch.bool, device=dev)  # no rejection yet
    rows = torch.arange(B, device=dev)
    greedy = temperature == 0.0
    if greedy:
        t_arg = argmax_last(target_logits)
    else:
        t_s = target_logits.float() / temperature
        t_e = torch.where(t_s == float("-inf"), 0.0, (t_s - t_s.amax(-1, keepdim=True)).exp())
        t_p = t_e / t_e.sum(-1, keepdim=True)
    recovered = torch.full((B,), -1, dtype=torch.long, device=dev)
    for j in range(max_spec_len):
        here = live & (j < counts)
        if not bool(here.any()):
            break
        r = rows[here]
        t = starts[r] + j
        x = draft_token_ids[t]
        if greedy:
            acc = t_arg[t] == x
            rec = t_arg[t]
        else:
            p = t_p[t]
            q = (torch.zeros_like(p).scatter_(1, x[:, None], 1.0) if draft_probs is None
                 else draft_probs[t].float())
            acc = (uniforms[t].double() * q.gather(1, x[:, None]).squeeze(1).double()
                   < p.gather(1, x[:, None]).squeeze(1).double())
            resid = _residual(p, q)
            keep = resid.sum(-1, keepdim=True) > RESIDUAL_EPS
            rec = _inverse_cdf(torch.where(keep, resid, p), bonus_uniforms[r])
        out[r[acc], j] = x[acc]
        n_acc[r[acc]] += 1
        recovered[r[~acc]] = rec[~acc]
        live[r[~acc]] = False
    if greedy:
        bonus = argmax_last(bonus_logits)
    else:
        b_s = bonus_logits.float() / temperature
        b_e = torch.where(b_s == float("-inf"), 0.0, (b_s - b_s.amax(-1, keepdim=True)).exp())
        bonus = _inverse_cdf(b_e, bonus_uniforms)
    last = torch.where(live, bonus, recovered)
    out[rows, n_acc] = last
    return ChainVerifyOutput(output_token_ids=out, num_accepted=n_acc)
