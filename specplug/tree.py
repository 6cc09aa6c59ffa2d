"""Token trees: the batched ``DraftTree`` contract, its derived layout, and the builders.

Node order inside a row is topological (a parent comes before its children) and siblings keep
the order in which the drafter proposed them: the exact verifier tries siblings in that order.

Shapes: ``B`` rows, ``N`` nodes per row (padded), ``V`` vocabulary, ``D`` max depth.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Any

import torch

from specplug.budget import (
    AcceptanceCalibration,
    RequestCorrection,
    best_tree_size,
    worth_extending,
)
from specplug.cost import CostModel
from specplug.drafters.base import Candidates, DraftContext, Drafter, FrontierItem
from specplug.types import DraftTree, TreeLayout, regroup_rows

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
class TreeNode:
    """A node while a tree is being built (one row)."""

    token: int
    parent: int
    depth: int
    score: float  # pruning score: never depends on this node's own sampled token
    handle: Any
    q: torch.Tensor | None  # [V] distribution this node was drawn from (sampling mode)
    order: int = 0  # creation order (topological, siblings in proposal order)
    value: float = 1.0  # cumulative draft probability of the path (uses this node's token)


Choice = tuple[int, float, float, Any, "torch.Tensor | None"]


def _ranked_children(cands: Candidates, k: int) -> list[Choice]:
    """The top ``k`` ranked candidates as ``(token, prob, rank_weight, handle, q=None)``."""
    n = min(k, len(cands.tokens))
    return [(cands.tokens[i], cands.probs[i], cands.probs[i], cands.handles[i], None)
            for i in range(n)]


def _sampled_children(cands: list[Candidates], k: int, generator: torch.Generator | None
                      ) -> list[list[Choice]]:
    """For each candidate set, ``k`` distinct draws without replacement from its ``dist``
    (batched Gumbel-top-k: the key order is a sequential draw without replacement), each with
    the distribution it was drawn from: q_1 = q, q_{i+1} = q_i without x_i, renormalised, which
    is what the recursive rejection sampler needs. The ``rank_weight`` of the i-th draw is the
    i-th largest probability of q: it must not depend on the drawn token, because keeping or
    pruning a draw according to its own value would bias the output distribution."""
    q = torch.stack([c.dist for c in cands])  # [M, V]
    M, V = q.shape
    k = min(k, V)
    u = torch.rand(q.shape, generator=generator).clamp_(min=1e-20)
    keys = q.log() - (-u.log()).log()
    toks = torch.topk(keys, k, dim=-1).indices  # [M, k]
    probs = q.gather(1, toks)  # [M, k]; 0 = the support ran out
    ranked = torch.topk(q, k, dim=-1).values
    before = torch.ones(k, k).tril(-1)  # [i, j] = 1 if draw j precedes draw i
    drawn = torch.zeros(M, k, V).scatter_(2, toks[:, None, :].expand(M, k, k),
                                          before[None].expand(M, k, k))
    qs = q[:, None, :] * (1.0 - drawn)
    qs = qs / qs.sum(-1, keepdim=True).clamp(min=1e-30)
    toks_l, probs_l, ranked_l = toks.tolist(), probs.tolist(), ranked.tolist()
    return [[(toks_l[m][i], probs_l[m][i], ranked_l[m][i], cands[m].shared_handle, qs[m, i])
             for i in range(k) if probs_l[m][i] > 0.0] for m in range(M)]


class TreeBuilder(ABC):
    """Shapes a drafter's proposals into a ``DraftTree`` under a budget."""

    #: largest number of nodes a tree from this builder can have
    max_nodes: int
    #: deepest path a tree from this builder can have
    max_depth: int
    #: the cost model of the current build when the drafter is adaptive, else None
    cost: CostModel | None = None
    #: per row, what the drafter believed of each node of the last adaptive build
    beliefs: list[list[float]] | None = None

    #: a resting row drafts again (a probe) after this many steps in a row without a draft
    PROBE_EVERY = 8
    #: each probe that gains nothing doubles the row's wait before the next, up to this many
    #: steps; a probe that gains resets it to ``PROBE_EVERY``
    MAX_PROBE_EVERY = 16
    #: drafted row-steps seen before the lifetime gain is trusted to make a row rest
    MIN_EVIDENCE = 8
    #: a row rests after the drafter ran this many times in a row for it and drafted nothing
    EMPTY_RUNS = 2

    def __init__(self) -> None:
        #: belief -> observed acceptance, learned across this builder's steps (adaptive)
        self.calibration = AcceptanceCalibration()
        #: per row of the current requests: their acceptance against the calibrated beliefs
        self.correction = RequestCorrection()
        #: across requests, over row-steps that drafted: [accepted tokens, nodes, row-steps]
        self.gain = [0.0, 0.0, 0]
        self.idle_steps: list[int] = []  # per row: steps in a row it rested
        self.empty_runs: list[int] = []  # per row: drafter runs in a row that drafted nothing
        self.probe_every: list[int] = []  # per row: steps between its probes while it rests
        #: per row: its last build was a probe (0), its last probe gained nothing (-1), or
        #: neither (1)
        self.probe_state: list[int] = []
        #: every active row rested in the last build (the drafter did not run for any)
        self.all_rested = False

    def start(self, rows: int) -> None:
        """New requests in ``rows`` rows: forget what the last ones accepted per row."""
        self.correction.start(rows)
        self.beliefs = None
        self._reset_rows(rows)

    def _reset_rows(self, rows: int) -> None:
        self.idle_steps, self.empty_runs = [0] * rows, [0] * rows
        self.probe_every, self.probe_state = [self.PROBE_EVERY] * rows, [1] * rows

    def regroup(self, sources: list[int | None]) -> None:
        """The engine's batch changed: new row ``i`` is old row ``sources[i]`` going on (its
        request correction and its last tree's beliefs move with it) or a new request (None)."""
        self.correction.regroup(sources)
        if self.beliefs is not None:
            self.beliefs = regroup_rows(self.beliefs, sources, list)
        self.idle_steps = regroup_rows(self.idle_steps, sources, int)
        self.empty_runs = regroup_rows(self.empty_runs, sources, int)
        self.probe_every = regroup_rows(self.probe_every, sources,
                                        lambda: self.PROBE_EVERY)
        self.probe_state = regroup_rows(self.probe_state, sources, lambda: 1)

    def resting(self, ctx: DraftContext) -> list[bool]:
        """Per row: draft nothing this step, without running the drafter, because drafting
        would not pay. Either the budget found nothing worth drafting the last
        ``EMPTY_RUNS`` times the drafter ran for the row, or what the row can expect to gain
        (the lifetime accepted tokens per row-step that drafted, times the row's request
        correction) does not pay for a typical tree plus the drafter's fixed cost
        (``CostModel.draft_fixed``: a head's forward runs before it drafts anything), or the
        row's last probe gained nothing. A resting row probes after ``PROBE_EVERY`` steps, so
        a request whose text starts to suit the drafter is found out; each probe that gains
        nothing doubles the wait, up to ``MAX_PROBE_EVERY``. Rows rest only under an adaptive
        budget (``self.cost``). The rule reads past outcomes only, never this step's draft,
        so under sampling it is a stopping time and the output stays exact."""
        rows = len(ctx.tokens)
        if len(self.idle_steps) != rows:
            self._reset_rows(rows)
        out = [False] * rows
        cost, (accepted, nodes, steps) = self.cost, self.gain
        if cost is None:
            return out
        price = None
        if steps >= self.MIN_EVIDENCE:
            price = cost.step_cost(max(1, round(nodes / steps))) + cost.draft_fixed()
        for b in range(rows):
            if not ctx.active[b]:
                continue
            futile = self.empty_runs[b] >= self.EMPTY_RUNS or self.probe_state[b] < 0
            if price is not None:
                futile = futile or 1.0 + accepted / steps * self.correction.factor(b) <= price
            out[b] = futile and self.idle_steps[b] < self.probe_every[b] - 1
            if futile and not out[b]:
                self.probe_state[b] = 0  # this build is the row's probe
            self.idle_steps[b] = self.idle_steps[b] + 1 if out[b] else 0
        return out

    def _probed(self, row: int, gained: bool) -> None:
        """After verification of a probe of ``row``: wait longer before the next one if it
        gained nothing, start again from ``PROBE_EVERY`` if it did."""
        if gained:
            self.probe_every[row], self.probe_state[row] = self.PROBE_EVERY, 1
        else:
            self.probe_every[row] = min(2 * self.probe_every[row], self.MAX_PROBE_EVERY)
            self.probe_state[row] = -1

    def accept_p(self, row: int, belief: float) -> float:
        """What the budget rules take as the acceptance probability of a node of ``row``
        that the drafter believes in with ``belief``: calibrated across requests, then
        corrected by what this request has accepted."""
        return min(1.0, self.calibration(belief) * self.correction.factor(row))

    def build(
        self,
        drafter: Drafter,
        ctx: DraftContext,
        depth_limit: list[int],
        vocab_size: int,
    ) -> DraftTree:
        """Build one tree per row; row b gets no node deeper than ``depth_limit[b]``.

        With ``ctx.adaptive`` and a drafter whose confidences are probabilities,
        the tree is cut to the size that maximises expected tokens per unit of step time under
        ``ctx.cost`` (``specplug.budget``)."""
        sample = (not ctx.sampling.greedy) and drafter.probabilistic
        self.cost = ctx.cost if drafter.probabilistic and ctx.adaptive else None
        rest = self.resting(ctx)
        self.all_rested = any(rest) and all(r or not a for r, a in zip(rest, ctx.active))
        if any(rest):
            ctx = replace(ctx, resting=rest)
            depth_limit = [0 if r else d for r, d in zip(rest, depth_limit)]
        roots = drafter.begin(ctx)
        nodes: list[list[TreeNode]] = [[] for _ in ctx.tokens]
        self._grow(drafter, ctx, roots, nodes, depth_limit, sample)
        if self.cost is not None:
            for b, row in enumerate(nodes):
                if ctx.active[b] and not rest[b] and depth_limit[b] > 0:
                    self.empty_runs[b] = 0 if row else self.empty_runs[b] + 1
        self.beliefs = [[self._belief(n) for n in row] for row in nodes] \
            if self.cost is not None else None
        return _to_tensors(nodes, sample, vocab_size)

    def _belief(self, node: TreeNode) -> float:
        """The drafter's probability that ``node`` ends up accepted (its pruning score)."""
        return node.score

    def learn(self, accepted_nodes: torch.Tensor, num_accepted: torch.Tensor) -> None:
        """After verification of the last tree built: which nodes were accepted (``[B, D]``
        node indices, ``[B]`` counts) against what the drafter believed."""
        if self.beliefs is None:
            return
        for b, row in enumerate(self.beliefs):
            hit = set(accepted_nodes[b, :int(num_accepted[b])].tolist())
            if b < len(self.probe_state) and self.probe_state[b] == 0:
                self._probed(b, bool(hit))
            if row:  # what the calibrated beliefs predicted: E[accepted] = sum of P(accepted)
                self.correction.observe(b, len(hit), sum(self.calibration(p) for p in row))
                self.gain = [self.gain[0] + len(hit), self.gain[1] + len(row), self.gain[2] + 1]
            else:
                self.correction.idle(b)
            for i, p in enumerate(row):
                self.calibration.observe(p, i in hit)

    def _grow(self, drafter: Drafter, ctx: DraftContext, roots: list[Any],
              nodes: list[list[TreeNode]], depth_limit: list[int], sample: bool) -> None:
        """Expand depth by depth: choose the tips to expand, ask the drafter, add children."""
        level = self._roots(ctx, roots, depth_limit)
        for depth in range(1, self.max_depth + 1):
            level = self._frontier(level, nodes)
            if not any(level):
                break
            level = self._expand_level(drafter, ctx, level, nodes, depth, depth_limit, sample)
        self._finish(nodes)

    def _frontier(self, level: list[list[Tip]], nodes: list[list[TreeNode]]
                  ) -> list[list[Tip]]:
        """Which of the newest nodes get children (default: all)."""
        return level

    @abstractmethod
    def _fanout(self, tip: Tip) -> int:
        """How many children to ask for at ``tip``."""

    def _finish(self, nodes: list[list[TreeNode]]) -> None:  # noqa: B027 - optional hook
        """Last pass over the built rows (default: none)."""

    def _within_budget(self, b: int, row: list[TreeNode], tip: Tip, picks: list[Choice]
                       ) -> list[Choice]:
        """The children of ``tip`` worth adding (default: all the builder asked for)."""
        return picks

    @staticmethod
    def _add(row: list[TreeNode], parent: int, depth: int, choice: Choice,
             prev_sibling: TreeNode | None) -> TreeNode:
        """Append a child of ``row[parent]`` (-1: the root). Its pruning score is monotone
        along depth and sibling order and does not depend on its own token."""
        tok, prob, weight, handle, q = choice
        up = row[parent] if parent >= 0 else None
        p_value = up.value if up else 1.0
        score = p_value * weight
        if up is not None:
            score = min(score, up.score)
        if prev_sibling is not None:
            score = min(score, prev_sibling.score)
        node = TreeNode(token=tok, parent=parent, depth=depth, score=score, handle=handle, q=q,
                        order=len(row), value=p_value * prob)
        row.append(node)
        return node

    @staticmethod
    def _roots(ctx: DraftContext, roots: list[Any], depth_limit: list[int]) -> list[list[Tip]]:
        return [[Tip(-1, roots[b], ctx.tokens[b][-1], ())]
                if ctx.active[b] and depth_limit[b] > 0 else [] for b in range(len(roots))]

    def _expand_level(self, drafter: Drafter, ctx: DraftContext, level: list[list[Tip]],
                      nodes: list[list[TreeNode]], depth: int, depth_limit: list[int],
                      sample: bool) -> list[list[Tip]]:
        """Ask the drafter for the children of every tip; add them; return the new tips."""
        k = max(self._fanout(t) for row in level for t in row)
        cands = drafter.expand([[FrontierItem(t.handle, t.token) for t in row]
                                for row in level], k)
        chosen: dict[tuple[int, int], list[Choice]] = {}
        pending = [(b, j) for b, row in enumerate(cands) for j, c in enumerate(row)
                   if sample and c.dist is not None]
        if pending:
            draws = _sampled_children([cands[b][j] for b, j in pending], k, ctx.generator)
            chosen = dict(zip(pending, draws))
        nxt: list[list[Tip]] = [[] for _ in level]
        for b, row in enumerate(level):
            for j, (tip, cand) in enumerate(zip(row, cands[b])):
                picks = chosen.get((b, j))
                picks = picks[: self._fanout(tip)] if picks is not None else \
                    _ranked_children(cand, self._fanout(tip))
                picks = self._within_budget(b, nodes[b], tip, picks)
                prev = None
                for rank, choice in enumerate(picks):
                    prev = self._add(nodes[b], tip.index, depth, choice, prev)
                    if depth < depth_limit[b]:
                        nxt[b].append(Tip(len(nodes[b]) - 1, prev.handle, prev.token,
                                          (*tip.path, rank)))
        return nxt


@dataclass
class Tip:
    """A node whose children may be asked for: its index (-1 = root), handle, token, path."""

    index: int
    handle: Any
    token: int
    path: tuple[int, ...]


class ChainBuilder(TreeBuilder):
    """A single path of ``k`` tokens per row (the classic speculative chain)."""

    def __init__(self, num_speculative_tokens: int):
        super().__init__()
        if num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {num_speculative_tokens}")
        self.max_nodes = self.max_depth = num_speculative_tokens

    def _fanout(self, tip: Tip) -> int:
        return 1

    def _within_budget(self, b, row, tip, picks):
        # SpecDec++-style stop: the next token must raise expected tokens per step time.
        if self.cost is None or not picks:
            return picks
        # Under sampling the decision may depend on the tokens drawn so far (a stopping time)
        # but never on the token it decides about: it uses that position's top probability
        # (the rank weight), not the drawn token's, which would bias the output.
        expected = 1.0 + sum(self.accept_p(b, n.value) for n in row)  # a chain: all on the path
        path_p = self.accept_p(b, (row[tip.index].value if tip.index >= 0 else 1.0) * picks[0][2])
        return picks if worth_extending(expected, path_p, len(row), self.cost) else []

    def _belief(self, node: TreeNode) -> float:
        return node.value  # the path probability of the tokens the verifier will test


def parse_static_paths(paths: list[list[int]] | list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """Validate Medusa-style paths (each a tuple of child ranks from the root).

    Raises:
        ValueError: empty spec, negative ranks, duplicates, gaps, or a missing parent path.
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
        super().__init__()
        self.paths = parse_static_paths(paths)
        self.max_nodes = len(self.paths)
        self.max_depth = max(len(p) for p in self.paths)
        self.fanout: dict[tuple[int, ...], int] = {}  # children count of each prefix
        for p in self.paths:
            self.fanout[p[:-1]] = max(self.fanout.get(p[:-1], 0), p[-1] + 1)

    def _frontier(self, level, nodes):
        return [[t for t in row if t.path in self.fanout] for row in level]

    def _fanout(self, tip: Tip) -> int:
        return self.fanout[tip.path]


class DynamicTreeBuilder(TreeBuilder):
    """EAGLE-2 style: at each depth expand the ``topk`` most probable frontier nodes (by
    cumulative draft probability), each into ``topk`` children; finally keep the ``budget``
    best nodes by pruning score (monotone along depth and sibling order, so the kept set is a
    tree whose sibling lists are prefixes of the proposal order)."""

    def __init__(self, budget: int, topk: int = 4, depth: int = 6):
        super().__init__()
        if budget < 1:
            raise ValueError(f"dynamic tree budget must be >= 1 node, got {budget}")
        if topk < 1:
            raise ValueError(f"dynamic tree topk must be >= 1, got {topk}")
        if depth < 1:
            raise ValueError(f"dynamic tree depth must be >= 1, got {depth}")
        self.budget, self.topk = budget, topk
        self.max_nodes, self.max_depth = budget, depth

    def _frontier(self, level, nodes):
        # expanding a node may depend on its own value (only pruning may not)
        def value(b: int, tip: Tip) -> float:
            return nodes[b][tip.index].value if tip.index >= 0 else 1.0

        return [sorted(row, key=lambda t, b=b: -value(b, t))[: self.topk]
                for b, row in enumerate(level)]

    def _fanout(self, tip: Tip) -> int:
        return self.topk

    def _finish(self, nodes):
        cost = self.cost
        # the tree is drafted already: only the target's scoring cost is still to pay
        scoring = (lambda n: cost.relative(1 + n)) if cost is not None else None
        for b, row in enumerate(nodes):
            keep = self.budget
            if scoring is not None:  # the size that pays best on this machine
                # in pruning order; whether a node is kept depends only on the nodes ranked
                # before it, never on its descendants (whose scores carry its drawn token)
                scores = sorted((n.score for n in row), reverse=True)
                keep = best_tree_size([self.accept_p(b, p) for p in scores], scoring,
                                      self.budget)
            if len(row) > keep:
                nodes[b] = _prune(row, keep)


def _prune(row: list[TreeNode], budget: int) -> list[TreeNode]:
    """Keep the ``budget`` best nodes (ties: earlier first); remap parents; keep order."""
    keep = sorted(range(len(row)), key=lambda i: (-row[i].score, row[i].order))[:budget]
    keep.sort()
    remap = {old: new for new, old in enumerate(keep)}
    out = []
    for old in keep:
        n = row[old]
        if n.parent != -1 and n.parent not in remap:  # impossible with monotone scores
            raise AssertionError("pruned tree lost a parent")
        out.append(TreeNode(n.token, remap.get(n.parent, -1), n.depth, n.score, n.handle, n.q,
                            len(out), n.value))
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
