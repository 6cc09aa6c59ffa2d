"""Verification: which drafted nodes the target accepts, and the bonus token after them.

Three verifiers, all batched with ragged acceptance per row:

* ``greedy``: the longest path whose every token equals the target's argmax at its parent.
  Output is token-identical to the target's own greedy decoding.
* ``exact``: multi-candidate recursive rejection sampling (SpecInfer; Chen et al. / Leviathan
  et al. for chains). At a node with target distribution p, siblings are tried in order: child
  x drawn from q is accepted with probability min(1, p(x) / q(x)); on rejection
  p <- norm(max(p - q, 0)). Deterministic drafts are one-hot q (so p <- p without x). If no
  child is accepted, the bonus token is drawn from the final p. The emitted tokens have exactly
  the target's distribution.
* ``typical``: Medusa's typical acceptance, an explicitly lossy opt-in.

Shapes: ``B`` rows, ``N`` nodes, ``V`` vocabulary, ``D`` max accepted depth. Target logits are
``[B, N + 1, V]``: index 0 is the root (the last committed token), index i + 1 is node i.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specplug.sampling import SamplingParams, check_finite, probs_from_logits
from specplug.tree import DraftTree, TreeLayout

__all__ = ["VerifyResult", "verify_exact", "verify_greedy", "verify_typical"]


@dataclass
class VerifyResult:
    """Per row: the accepted path and the bonus token.

    Attributes:
        accepted_nodes: ``[B, D]`` int64 node indices of the accepted path, root's child
            first, -1 padded.
        num_accepted: ``[B]`` int64 number of accepted draft nodes.
        bonus_tokens: ``[B]`` int64 token the target emits after the accepted path.
    """

    accepted_nodes: torch.Tensor
    num_accepted: torch.Tensor
    bonus_tokens: torch.Tensor

    def new_tokens(self, tree: DraftTree) -> list[list[int]]:
        """Per row: accepted draft tokens then the bonus token."""
        out = []
        for b in range(tree.batch_size):
            n = int(self.num_accepted[b])
            idx = self.accepted_nodes[b, :n]
            out.append(tree.tokens[b, idx].tolist() + [int(self.bonus_tokens[b])])
        return out


def _check_logits(tree: DraftTree, logits: torch.Tensor) -> None:
    B, N = tree.tokens.shape
    if logits.dim() != 3 or logits.shape[0] != B or logits.shape[1] != N + 1:
        raise ValueError(f"target logits must be [B, N+1, V] = [{B}, {N + 1}, V], "
                         f"got {tuple(logits.shape)}")
    check_finite(logits, "the target model")


def _path_result(layout: TreeLayout, best: torch.Tensor, best_depth: torch.Tensor,
                 bonus: torch.Tensor) -> VerifyResult:
    """Turn a chosen node per row (-1 = none) into the accepted path."""
    B = best.shape[0]
    D = max(layout.max_depth, 1)
    paths = layout.retrieve_indices()  # [B, N, D]
    if paths.shape[1] == 0:
        acc = torch.full((B, D), -1, dtype=torch.long)
    else:
        acc = paths[torch.arange(B), best.clamp(min=0)]
        acc = torch.where(best[:, None] >= 0, acc, -1)
    return VerifyResult(accepted_nodes=acc, num_accepted=best_depth, bonus_tokens=bonus)


def verify_greedy(tree: DraftTree, target_logits: torch.Tensor,
                  layout: TreeLayout | None = None) -> VerifyResult:
    """Accept the deepest path whose tokens all match the target's argmax."""
    _check_logits(tree, target_logits)
    layout = layout or TreeLayout.from_tree(tree)
    B, N = tree.tokens.shape
    argmax = target_logits.argmax(-1)  # [B, N+1]
    if N == 0:
        z = torch.zeros(B, dtype=torch.long)
        return _path_result(layout, z - 1, z, argmax[:, 0])
    parent_pred = argmax.gather(1, tree.parents + 1)  # [B, N]
    matched = (tree.tokens == parent_pred) & layout.real
    # a node is on an accepted path if it and all its ancestors matched
    ok = ~(layout.ancestors & ~matched[:, None, :]).any(-1) & layout.real
    score = torch.where(ok, layout.depth, 0)
    best_depth, best = score.max(-1)
    # max() returns the first maximum: among equally deep accepted nodes, the earliest
    best = torch.where(best_depth > 0, best, -1)
    bonus = argmax.gather(1, (best + 1)[:, None]).squeeze(1)
    return _path_result(layout, best, best_depth, bonus)


def _residual(p: torch.Tensor, q: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """After rejecting draft ``x [R]`` drawn from ``q [R, V]`` (None: one-hot at x), the
    target distribution ``p [R, V]`` becomes ``norm(max(p - q, 0))``."""
    if q is None:
        resid = p.clone()
        resid[torch.arange(p.shape[0]), x] = 0.0
    else:
        resid = (p - q).clamp(min=0.0)
    total = resid.sum(-1, keepdim=True)
    # p == q up to rounding: the rejection had probability ~0; keep p (bias < 1e-7)
    return torch.where(total > 1e-12, resid / total.clamp(min=1e-30), p)


def verify_exact(tree: DraftTree, target_logits: torch.Tensor, sampling: SamplingParams,
                 generator: torch.Generator | None = None,
                 layout: TreeLayout | None = None) -> VerifyResult:
    """Lossless recursive rejection sampling over trees (chains are the one-child case)."""
    _check_logits(tree, target_logits)
    if sampling.greedy:
        return verify_greedy(tree, target_logits, layout)
    layout = layout or TreeLayout.from_tree(tree)
    B, N = tree.tokens.shape
    p_all = probs_from_logits(target_logits, sampling)  # [B, N+1, V]
    rows = torch.arange(B)
    # children[b, slot, r]: r-th child (node index) of slot (0 = root, i+1 = node i); -1 none
    max_children = N if N > 0 else 1
    children = torch.full((B, N + 1, max_children), -1, dtype=torch.long)
    rank = torch.zeros(B, N + 1, dtype=torch.long)
    for i in range(N):  # N is small; one vector op per node index across rows
        real = layout.real[:, i]
        slot = tree.parents[:, i] + 1
        r = rank[rows, slot]
        sel = real.nonzero(as_tuple=True)[0]
        children[sel, slot[sel], r[sel]] = i
        rank[sel, slot[sel]] += 1

    cur = torch.zeros(B, dtype=torch.long)  # current slot
    sib = torch.zeros(B, dtype=torch.long)
    p = p_all[:, 0].clone()
    done = torch.zeros(B, dtype=torch.bool)
    bonus = torch.zeros(B, dtype=torch.long)
    best = torch.full((B,), -1, dtype=torch.long)
    depth = torch.zeros(B, dtype=torch.long)
    for _ in range(2 * N + 2):
        if bool(done.all()):
            break
        child = torch.where(sib < max_children,
                            children[rows, cur, sib.clamp(max=max_children - 1)], -1)
        finishing = ~done & (child < 0)
        if finishing.any():
            idx = finishing.nonzero(as_tuple=True)[0]
            bonus[idx] = torch.multinomial(p[idx], 1, generator=generator).squeeze(-1)
            done |= finishing
        trying = ~done
        u = torch.rand(B, generator=generator)
        if not trying.any():
            break
        c = child.clamp(min=0)
        x = tree.tokens[rows, c]
        px = p[rows, x]
        if tree.draft_probs is None:
            q = None
            qx = torch.ones(B)
        else:
            q = tree.draft_probs[rows, c]  # [B, V]
            qx = q[rows, x]
        accept = trying & (u * qx < px)
        reject = trying & ~accept
        if accept.any():
            a = accept.nonzero(as_tuple=True)[0]
            best[a] = c[a]
            depth[a] += 1
            cur[a] = c[a] + 1
            sib[a] = 0
            p[a] = p_all[a, c[a] + 1]
        if reject.any():
            r = reject.nonzero(as_tuple=True)[0]
            p[r] = _residual(p[r], None if q is None else q[r], x[r])
            sib[r] += 1
    return _path_result(layout, best, depth, bonus)


def verify_typical(tree: DraftTree, target_logits: torch.Tensor, sampling: SamplingParams,
                   posterior_threshold: float = 0.09, posterior_alpha: float = 0.3,
                   generator: torch.Generator | None = None,
                   layout: TreeLayout | None = None) -> VerifyResult:
    """Medusa's typical acceptance (LOSSY): accept x if p(x) > min(threshold, alpha * exp(-H(p)))
    along the deepest such path; the bonus token is sampled from the target at its end."""
    _check_logits(tree, target_logits)
    layout = layout or TreeLayout.from_tree(tree)
    B, N = tree.tokens.shape
    warm = SamplingParams(temperature=sampling.temperature or 1.0, top_k=sampling.top_k,
                          top_p=sampling.top_p)
    p_all = probs_from_logits(target_logits, warm)
    if N == 0:
        z = torch.zeros(B, dtype=torch.long)
        best, depth = z - 1, z
    else:
        p_parent = p_all.gather(1, (tree.parents + 1)[..., None].expand(-1, -1, p_all.shape[-1]))
        px = p_parent.gather(-1, tree.tokens[..., None]).squeeze(-1)
        ent = -(p_parent * p_parent.clamp(min=1e-30).log()).sum(-1)
        thresh = torch.minimum(torch.full_like(ent, posterior_threshold),
                               posterior_alpha * torch.exp(-ent))
        matched = (px > thresh) & layout.real
        ok = ~(layout.ancestors & ~matched[:, None, :]).any(-1) & layout.real
        depth, best = torch.where(ok, layout.depth, 0).max(-1)
        best = torch.where(depth > 0, best, -1)
    end = p_all[torch.arange(B), best + 1]
    if sampling.greedy:
        bonus = end.argmax(-1)
    else:
        bonus = torch.multinomial(end, 1, generator=generator).squeeze(-1)
    return _path_result(layout, best, depth, bonus)
