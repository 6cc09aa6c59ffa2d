"""Token trees: the batched ``DraftTree`` contract, its derived layout, and the builders.

Node order inside a row is topological (a parent comes before its children) and siblings keep
the order in which the drafter proposed them: the exact verifier tries siblings in that order.

Shapes: ``B`` rows, ``N`` nodes per row (padded), ``V`` vocabulary, ``D`` max depth.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from specplug.drafters.base import Candidates, DraftContext, Drafter, FrontierItem

__all__ = [
    "ChainBuilder",
    "DraftTree",
    "DynamicTreeBuilder",
    "StaticTreeBuilder",
    "TreeBuilder",
    "TreeLayout",
    "TreeNode",
    "parse_static_paths",
]


@dataclass
class DraftTree:
    """A batch of padded draft trees.

    Attributes:
        tokens: ``[B, N]`` int64, node i's token (padding: 0).
        parents: ``[B, N]`` int64, parent node index; -1 = the root (last committed token).
        num_nodes: ``[B]`` int64, real nodes per row (the rest is padding).
        draft_probs: ``[B, N, V]`` float32, the distribution node i was drawn from; None for
            deterministic drafts (treated as one-hot by the verifier).
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    num_nodes: torch.Tensor
    draft_probs: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def width(self) -> int:
        return self.tokens.shape[1]

    def validate(self) -> None:
        """Check the structural invariants (used by tests and at plugin boundaries)."""
        if self.tokens.shape != self.parents.shape or self.tokens.dim() != 2:
            raise ValueError(f"tokens {tuple(self.tokens.shape)} and parents "
                             f"{tuple(self.parents.shape)} must both be [B, N]")
        idx = torch.arange(self.width)
        real = idx[None, :] < self.num_nodes[:, None]
        bad = real & ((self.parents >= idx[None, :]) | (self.parents < -1))
        if bad.any():
            raise ValueError("tree nodes must be in topological order: parents[i] in [-1, i)")


@dataclass
class TreeLayout:
    """What the runner and the verifier derive from a tree's parents.

    Attributes:
        depth: ``[B, N]`` int64, 1 for children of the root; 0 for padding.
        ancestors: ``[B, N, N]`` bool, ``ancestors[b, i, j]``: j is i or an ancestor of i
            (padding nodes see only themselves).
        real: ``[B, N]`` bool, real (non-padding) nodes.
        max_depth: deepest real node over the batch.
    """

    depth: torch.Tensor
    ancestors: torch.Tensor
    real: torch.Tensor
    max_depth: int

    @staticmethod
    def from_tree(tree: DraftTree) -> TreeLayout:
        B, N = tree.tokens.shape
        real = torch.arange(N)[None, :] < tree.num_nodes[:, None]
        eye = torch.eye(N, dtype=torch.bool).expand(B, N, N)
        if N == 0:
            return TreeLayout(torch.zeros(B, 0, dtype=torch.long), eye.clone(), real, 0)
        has_parent = real & (tree.parents >= 0)
        parent_onehot = torch.zeros(B, N, N, dtype=torch.bool)
        rows = has_parent.nonzero(as_tuple=True)
        parent_onehot[rows[0], rows[1], tree.parents[rows]] = True
        anc = eye | parent_onehot
        # Closure by squaring: ceil(log2(N)) boolean matrix products.
        for _ in range(max(1, math.ceil(math.log2(max(N, 2))))):
            anc = anc | (torch.bmm(anc.float(), anc.float()) > 0)
        depth = torch.where(real, anc.sum(-1), torch.zeros((), dtype=torch.long))
        return TreeLayout(depth=depth, ancestors=anc, real=real,
                          max_depth=int(depth.max()) if depth.numel() else 0)

    def retrieve_indices(self) -> torch.Tensor:
        """``[B, N, D]`` int64: for each node, its path from the root's child down to itself
        (node indices in depth order, -1 padded), to read out an accepted path."""
        B, N, _ = self.ancestors.shape
        D = max(self.max_depth, 1)
        out = torch.full((B, N, D), -1, dtype=torch.long)
        if N == 0:
            return out
        anc_depth = torch.where(self.ancestors, self.depth[:, None, :], 0)  # [B, N, N]
        for d in range(1, D + 1):
            hit = anc_depth == d
            found = hit.any(-1)
            out[..., d - 1] = torch.where(found, hit.float().argmax(-1), -1)
        return out


@dataclass
class TreeNode:
    """A node while a tree is being built (one row)."""

    token: int
    parent: int
    depth: int
    score: float  # cumulative drafter probability, made monotone for pruning
    handle: Any
    q: torch.Tensor | None  # [V] distribution this node was drawn from (sampling mode)
    order: int = 0  # creation order (topological, siblings in proposal order)


@dataclass
class BuiltTree:
    """A builder's result: the batched tree and the per-row node lists behind it."""

    tree: DraftTree
    nodes: list[list[TreeNode]]


def _choose_children(
    cands: Candidates, k: int, sample: bool, generator: torch.Generator | None
) -> list[tuple[int, float, Any, torch.Tensor | None]]:
    """Pick up to ``k`` children: the ranked candidates, or (sampling with a probabilistic
    drafter) ``k`` distinct draws without replacement, each with the distribution it was drawn
    from: q_1 = q, q_{i+1} = q_i without x_i, renormalised (recursive rejection sampling)."""
    if sample and cands.dist is not None:
        q = cands.dist
        out = []
        for _ in range(k):
            total = float(q.sum())
            if total <= 0.0:
                break
            qn = q / total
            tok = int(torch.multinomial(qn, 1, generator=generator))
            out.append((tok, float(qn[tok]), cands.shared_handle, qn))
            q = qn.clone()
            q[tok] = 0.0
        return out
    n = min(k, len(cands.tokens))
    return [(cands.tokens[i], cands.probs[i], cands.handles[i], None) for i in range(n)]


class TreeBuilder(ABC):
    """Shapes a drafter's proposals into a ``DraftTree`` under a budget."""

    #: largest number of nodes a tree from this builder can have
    max_nodes: int
    #: deepest path a tree from this builder can have
    max_depth: int

    def build(
        self,
        drafter: Drafter,
        ctx: DraftContext,
        depth_limit: list[int],
        vocab_size: int,
    ) -> BuiltTree:
        """Build one tree per row; row b gets no node deeper than ``depth_limit[b]``."""
        sample = (not ctx.sampling.greedy) and drafter.probabilistic
        roots = drafter.begin(ctx)
        nodes: list[list[TreeNode]] = [[] for _ in ctx.tokens]
        self._grow(drafter, ctx, roots, nodes, depth_limit, sample)
        return BuiltTree(_to_tensors(nodes, sample, vocab_size), nodes)

    @abstractmethod
    def _grow(self, drafter: Drafter, ctx: DraftContext, roots: list[Any],
              nodes: list[list[TreeNode]], depth_limit: list[int], sample: bool) -> None:
        ...

    @staticmethod
    def _add(row: list[TreeNode], parent: int, depth: int, score: float,
             choice: tuple[int, float, Any, torch.Tensor | None], prev_sibling_score: float
             ) -> TreeNode:
        tok, prob, handle, q = choice
        node = TreeNode(token=tok, parent=parent, depth=depth,
                        score=min(score * prob, prev_sibling_score), handle=handle, q=q,
                        order=len(row))
        row.append(node)
        return node


class ChainBuilder(TreeBuilder):
    """A single path of ``k`` tokens per row (the classic speculative chain)."""

    def __init__(self, num_speculative_tokens: int):
        if num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {num_speculative_tokens}")
        self.max_nodes = self.max_depth = num_speculative_tokens

    def _grow(self, drafter, ctx, roots, nodes, depth_limit, sample):
        tips: list[tuple[int, Any, int, float] | None] = [
            (-1, roots[b], ctx.tokens[b][-1], 1.0) if ctx.active[b] and depth_limit[b] > 0
            else None for b in range(len(nodes))
        ]
        for depth in range(1, self.max_depth + 1):
            if not any(tips):
                break
            frontier = [[FrontierItem(t[1], t[2])] if t else [] for t in tips]
            cands = drafter.expand(frontier, 1)
            for b, tip in enumerate(tips):
                if tip is None:
                    continue
                chosen = _choose_children(cands[b][0], 1, sample, ctx.generator)
                if not chosen:
                    tips[b] = None
                    continue
                node = self._add(nodes[b], tip[0], depth, tip[3], chosen[0], math.inf)
                keep_going = depth < depth_limit[b]
                tips[b] = (len(nodes[b]) - 1, node.handle, node.token, node.score) \
                    if keep_going else None


def parse_static_paths(paths: list[list[int]] | list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """Validate Medusa-style paths (each a tuple of child ranks from the root).

    Raises:
        ValueError: empty spec, negative ranks, duplicates, or a path whose parent is missing.
    """
    if not paths:
        raise ValueError("static tree needs at least one path, e.g. [[0], [1], [0, 0]]")
    seen: set[tuple[int, ...]] = set()
    out = []
    for p in paths:
        t = tuple(int(x) for x in p)
        if not t:
            raise ValueError("static tree paths must be non-empty lists of child ranks")
        if any(x < 0 for x in t):
            raise ValueError(f"static tree path {list(t)} has a negative rank")
        if t in seen:
            raise ValueError(f"static tree path {list(t)} appears twice")
        seen.add(t)
        out.append(t)
    for t in out:
        if len(t) > 1 and t[:-1] not in seen:
            raise ValueError(
                f"static tree path {list(t)} has no parent path {list(t[:-1])}: every prefix "
                "of a path must itself be a path"
            )
        if t[-1] > 0 and (*t[:-1], t[-1] - 1) not in seen:
            raise ValueError(
                f"static tree path {list(t)} skips rank {t[-1] - 1}: siblings must be ranks "
                "0..k-1 without gaps"
            )
    return sorted(out, key=lambda t: (len(t), t))


class StaticTreeBuilder(TreeBuilder):
    """A fixed shape given by paths of child ranks (Medusa style): ``(0, 1)`` is the
    second-ranked child of the top-ranked child of the root."""

    def __init__(self, paths: list[list[int]] | list[tuple[int, ...]]):
        self.paths = parse_static_paths(paths)
        self.max_nodes = len(self.paths)
        self.max_depth = max(len(p) for p in self.paths)
        # children count of each prefix
        self.fanout: dict[tuple[int, ...], int] = {}
        for p in self.paths:
            self.fanout[p[:-1]] = max(self.fanout.get(p[:-1], 0), p[-1] + 1)

    def _grow(self, drafter, ctx, roots, nodes, depth_limit, sample):
        # per row: list of (path, node index, handle, token, score) to expand at this depth
        level: list[list[tuple[tuple[int, ...], int, Any, int, float]]] = [
            [((), -1, roots[b], ctx.tokens[b][-1], 1.0)] if ctx.active[b] and depth_limit[b] > 0
            else [] for b in range(len(nodes))
        ]
        for depth in range(1, self.max_depth + 1):
            level = [[it for it in row if it[0] in self.fanout] for row in level]
            if not any(level):
                break
            k = max(self.fanout[it[0]] for row in level for it in row)
            cands = drafter.expand([[FrontierItem(it[2], it[3]) for it in row] for row in level], k)
            nxt: list[list] = [[] for _ in level]
            for b, row in enumerate(level):
                for it, cand in zip(row, cands[b]):
                    path, parent, _, _, score = it
                    chosen = _choose_children(cand, self.fanout[path], sample, ctx.generator)
                    prev = math.inf
                    for rank, choice in enumerate(chosen):
                        node = self._add(nodes[b], parent, depth, score, choice, prev)
                        prev = node.score
                        if depth < depth_limit[b]:
                            nxt[b].append(((*path, rank), len(nodes[b]) - 1, node.handle,
                                           node.token, node.score))
            level = nxt


class DynamicTreeBuilder(TreeBuilder):
    """EAGLE-2 style: at each depth expand the ``topk`` most probable frontier nodes (by
    cumulative draft probability), each into ``topk`` children; finally keep the ``budget``
    most probable nodes. Scores are made monotone along depth and sibling order so the kept
    set is always a tree whose sibling lists are prefixes of the proposal order."""

    def __init__(self, budget: int, topk: int = 4, depth: int = 6):
        if budget < 1:
            raise ValueError(f"dynamic tree budget must be >= 1 node, got {budget}")
        if topk < 1:
            raise ValueError(f"dynamic tree topk must be >= 1, got {topk}")
        if depth < 1:
            raise ValueError(f"dynamic tree depth must be >= 1, got {depth}")
        self.budget, self.topk = budget, topk
        self.max_nodes, self.max_depth = budget, depth

    def _grow(self, drafter, ctx, roots, nodes, depth_limit, sample):
        level: list[list[tuple[int, Any, int, float]]] = [
            [(-1, roots[b], ctx.tokens[b][-1], 1.0)] if ctx.active[b] and depth_limit[b] > 0
            else [] for b in range(len(nodes))
        ]
        for depth in range(1, self.max_depth + 1):
            if not any(level):
                break
            cands = drafter.expand([[FrontierItem(h, t) for _, h, t, _ in row] for row in level],
                                   self.topk)
            nxt: list[list] = [[] for _ in level]
            for b, row in enumerate(level):
                for (parent, _, _, score), cand in zip(row, cands[b]):
                    prev = math.inf
                    for choice in _choose_children(cand, self.topk, sample, ctx.generator):
                        node = self._add(nodes[b], parent, depth, score, choice, prev)
                        prev = node.score
                        if depth < depth_limit[b]:
                            nxt[b].append((len(nodes[b]) - 1, node.handle, node.token, node.score))
                nxt[b].sort(key=lambda it: -it[3])
                nxt[b] = nxt[b][: self.topk]
            level = nxt
        for b, row in enumerate(nodes):
            if len(row) > self.budget:
                nodes[b] = _prune(row, self.budget)


def _prune(row: list[TreeNode], budget: int) -> list[TreeNode]:
    """Keep the ``budget`` best nodes (ties: earlier first); remap parents; keep order."""
    keep = sorted(range(len(row)), key=lambda i: (-row[i].score, row[i].order))[:budget]
    keep.sort()
    remap = {old: new for new, old in enumerate(keep)}
    out = []
    for old in keep:
        n = row[old]
        if n.parent != -1 and n.parent not in remap:  # cannot happen with monotone scores
            raise AssertionError("pruned tree lost a parent")
        out.append(TreeNode(n.token, remap.get(n.parent, -1), n.depth, n.score, n.handle, n.q,
                            len(out)))
    return out


def _to_tensors(nodes: list[list[TreeNode]], sample: bool, vocab_size: int) -> DraftTree:
    B = len(nodes)
    N = max((len(r) for r in nodes), default=0)
    tokens = torch.zeros(B, N, dtype=torch.long)
    parents = torch.full((B, N), -1, dtype=torch.long)
    num = torch.tensor([len(r) for r in nodes], dtype=torch.long)
    for b, row in enumerate(nodes):
        if row:
            tokens[b, : len(row)] = torch.tensor([n.token for n in row])
            parents[b, : len(row)] = torch.tensor([n.parent for n in row])
    probs = None
    if sample and N > 0 and any(n.q is not None for r in nodes for n in r):
        probs = torch.zeros(B, N, vocab_size, dtype=torch.float32)
        for b, row in enumerate(nodes):
            for i, n in enumerate(row):
                if n.q is None:  # a deterministic proposal is a one-hot draft
                    probs[b, i, n.token] = 1.0
                else:
                    probs[b, i] = n.q
    return DraftTree(tokens=tokens, parents=parents, num_nodes=num, draft_probs=probs)
