"""Trees: layout derived from parents, builders' shapes and budgets."""

from __future__ import annotations

import pytest
import torch

from specplug.drafters.base import Candidates, DraftContext, Drafter
from specplug.sampling import SamplingParams
from specplug.tree import (
    ChainBuilder,
    DraftTree,
    DynamicTreeBuilder,
    StaticTreeBuilder,
    TreeLayout,
)


def make_tree(parents_rows, tokens_rows=None):
    B = len(parents_rows)
    N = max(len(r) for r in parents_rows)
    parents = torch.full((B, N), -1, dtype=torch.long)
    tokens = torch.zeros(B, N, dtype=torch.long)
    for b, r in enumerate(parents_rows):
        parents[b, : len(r)] = torch.tensor(r)
        tokens[b, : len(r)] = torch.tensor(tokens_rows[b] if tokens_rows else range(len(r)))
    return DraftTree(tokens, parents, torch.tensor([len(r) for r in parents_rows]))


def test_layout_of_a_bushy_tree_and_padding():
    #        root
    #       /    \
    #      0      1
    #     / \     |
    #    2   3    4
    #    |
    #    5
    tree = make_tree([[-1, -1, 0, 0, 1, 2], [-1, 0]])
    lay = TreeLayout.from_tree(tree)
    assert lay.depth[0].tolist() == [1, 1, 2, 2, 2, 3]
    assert lay.depth[1].tolist() == [1, 2, 0, 0, 0, 0]
    assert lay.max_depth == 3
    assert lay.ancestors[0, 5].nonzero().flatten().tolist() == [0, 2, 5]
    assert lay.ancestors[0, 4].nonzero().flatten().tolist() == [1, 4]
    assert lay.ancestors[1, 3].nonzero().flatten().tolist() == [3]  # padding sees itself
    paths = lay.retrieve_indices()
    assert paths[0, 5].tolist() == [0, 2, 5]
    assert paths[0, 4].tolist() == [1, 4, -1]
    tree.validate()


def test_validate_rejects_non_topological_order():
    with pytest.raises(ValueError, match="topological"):
        make_tree([[1, -1]]).validate()


class TableDrafter(Drafter):
    """Deterministic: children of token t are t+1, t+2, ... with decreasing probabilities."""

    name = "table-test"

    def begin(self, ctx):
        return [None] * len(ctx.tokens)

    def expand(self, frontier, k):
        return [[Candidates([it.token + 1 + i for i in range(k)],
                            [0.6 / (i + 1) for i in range(k)], [None] * k) for it in row]
                for row in frontier]


def ctx(rows, active=None):
    return DraftContext(tokens=[[r] for r in rows], active=active or [True] * len(rows),
                        sampling=SamplingParams())


def test_chain_respects_depth_limits_and_inactive_rows():
    t = ChainBuilder(4).build(TableDrafter(), ctx([10, 20, 30], [True, True, False]),
                                  [4, 2, 4], vocab_size=100)
    assert t.num_nodes.tolist() == [4, 2, 0]
    assert t.tokens[0].tolist() == [11, 12, 13, 14]
    assert t.parents[0].tolist() == [-1, 0, 1, 2]
    assert t.draft_probs is None


def test_static_tree_follows_the_paths():
    paths = [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]]
    t = StaticTreeBuilder(paths).build(TableDrafter(), ctx([0]), [9], 100)
    assert t.num_nodes.tolist() == [6]
    # children of root: 1, 2; children of 1: 2, 3; child of 2: 3; child of (1 -> 2): 3
    assert t.tokens[0].tolist() == [1, 2, 2, 3, 3, 3]
    assert t.parents[0].tolist() == [-1, -1, 0, 0, 1, 2]


def test_static_tree_with_a_missing_candidate_drops_the_subtree():
    class Sparse(TableDrafter):
        def expand(self, frontier, k):
            return [[Candidates([it.token + 1], [0.5], [None]) for it in row]
                    for row in frontier]

    t = StaticTreeBuilder([[0], [1], [0, 0], [1, 0]]).build(Sparse(), ctx([0]), [9], 100)
    assert t.tokens[0, : int(t.num_nodes[0])].tolist() == [1, 2]


@pytest.mark.parametrize("budget", [1, 3, 7, 20])
def test_dynamic_tree_budget_and_shape(budget):
    b = DynamicTreeBuilder(budget=budget, topk=3, depth=4)
    t = b.build(TableDrafter(), ctx([0, 50]), [4, 4], 100)
    t.validate()
    lay = TreeLayout.from_tree(t)
    assert (t.num_nodes <= budget).all() and (t.num_nodes == min(budget, 3 + 9 + 9 + 9)).all()
    assert lay.max_depth <= 4
    # siblings kept are always a prefix of the proposal order
    for row in range(2):
        n = int(t.num_nodes[row])
        for parent in set(t.parents[row, :n].tolist()):
            kids = [int(t.tokens[row, i]) for i in range(n) if t.parents[row, i] == parent]
            base = 0 if parent == -1 else int(t.tokens[row, parent])
            if row == 1 and parent == -1:
                base = 50
            assert kids == [base + 1 + i for i in range(len(kids))]


def test_builder_rejects_impossible_sizes():
    with pytest.raises(ValueError, match=">= 1"):
        ChainBuilder(0)
    with pytest.raises(ValueError, match="budget"):
        DynamicTreeBuilder(budget=0)
