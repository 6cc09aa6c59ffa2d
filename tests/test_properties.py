"""Property-based tests (hypothesis) of specplug's promise: speculation never changes the output.

Every test draws its cases with hypothesis, derandomized (fixed examples, no example database,
no deadline), so CI runs the same cases every time and a failure prints a shrunk example.
Examples per test are in each ``@props(n)``; the file runs in about a minute on 2 cores.

Properties:

1. Trees (``test_{static,chain,dynamic}_tree_matches_its_oracle``): static trees from random
   prefix-closed rank paths (given in random order), chains of random depth and dynamic trees
   with random budget / topk / depth, built by the real builders from a deterministic table
   drafter over batches with random roots, depth limits, inactive rows and missing
   candidates. Each tree equals an independent oracle of its builder's rule (tokens and
   parents, node for node), and its layout is consistent: parents topological, depth =
   parent's depth + 1, the ancestor mask (the tree attention mask) equal to the parent chain,
   positions = root position + depth, retrieve paths equal to the parent chain, padding inert.
   Rank-path sets that are not trees are refused (``parse_static_paths``).
2. Greedy tree verification (``test_greedy_verification_of_any_tree_is_greedy_decoding``):
   on a Markov target (logits a function of the last token) the registered verifier at
   temperature 0 emits exactly the target's greedy rollout, as far as the deepest tree path
   that spells it, plus the bonus token, and accepts exactly that path.
3. Engine, greedy (``test_engine_greedy_identical_to_generate``): for every drafter that runs
   on the tiny random models (ngram, draft_model, a perfect draft model, layer_skip, and the
   untrained heads medusa, clover, clover2, eagle, msd as in test_heads.py), random chains /
   static / dynamic trees, batches of 1-3 ragged left-padded prompts, tiny Llama and Gemma-3
   (heads: Llama), ``max_new_tokens`` 1-16 and an optional EOS taken from the target's own
   output: token-identical to ``model.generate(do_sample=False)``. With the perfect draft
   model and a chain every draft is accepted (checked through the number of forwards), so EOS
   and ``max_new_tokens`` land inside accepted runs. Control: with an engine that ignores EOS
   inside an accepted run, the same search finds a differing case.
4. Sampling, one step (``test_one_step_sampling_keeps_the_target_distribution``): the Markov
   set-up of test_exactness.py (V = 8, N = 6000 rows) with random tree shapes, random
   temperature / top-k / top-p and three drafter kinds (a good drafter with q, an
   anti-correlated drafter with q, a good deterministic drafter): the first two emitted tokens
   follow p(x1 | root) p(x2 | x1) (Pearson's chi-square over the V x V cells, cells expected
   below 5 merged, a token of probability 0 fails outright; alpha 1e-4).
5. Sampling, engine (``test_engine_sampling_keeps_the_target_distribution``): each drafter
   kind (ngram: one-hot drafts; draft_model, layer_skip, medusa: drafts with q) x {temperature
   1 / chain, temperature 0.7 + top-k 5 / dynamic tree, temperature 1.3 + top-p 0.8 / static
   tree} on a sharpened tiny Llama over 8 tokens, N = 2400 rows of two left-padded prompts in
   one call: the joints of (x1, x2) and (x2, x3) match the target's closed form (same test).

Controls of 4 and 5 (the statistical checks can fail): the target distribution the verifier
sees at the root is perturbed by moving probability DELTA from its most likely token to its
second most likely one, a planted bias of total-variation distance exactly DELTA on the joint
of (x1, x2) (x2 is decided at the root of the first step). The same check, with the same N and
seed that pass unbiased, must reject it (alpha 1e-4): DELTA_MARKOV = 0.05 one-step (p-values
5e-18, 1e-18, 3e-23 for the chain, static and dynamic trees), DELTA_ENGINE = 0.1 in the engine
(p-values 4e-12 and 3e-16 on the two prompts' (x1, x2) joints). Moving mass between the two
likeliest tokens is the hardest direction for a chi-square test.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, Phase, event, find, given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare
from test_exactness import MarkovDrafter  # drafts from a Markov table, with or without q
from test_exactness import V as EXACTNESS_V
from test_heads import make_net
from tiny_models import VOCAB, reference_greedy, tiny_gemma, tiny_llama

import specplug.engine as engine_module
from specplug import SpecConfig
from specplug.drafters.base import Candidates, DraftContext, Drafter, FrontierItem
from specplug.engine import ModelTargetRunner, Speculator, speculative_generate
from specplug.kernels.tree_prep import prepare_tree
from specplug.plugins import get_registry
from specplug.sampling import SamplingParams, probs_from_logits
from specplug.tree import (
    ChainBuilder,
    DraftTree,
    DynamicTreeBuilder,
    StaticTreeBuilder,
    TreeBuilder,
    TreeLayout,
    parse_static_paths,
)
from specplug.types import VerifyResult

ALPHA = 1e-4
DELTA_MARKOV = 0.05  # planted total-variation bias, one-step Markov set-up
DELTA_ENGINE = 0.1  # planted total-variation bias, engine set-up


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for these tiny models: on a busy 2-core machine two threads spin
    against each other (measured: the file ran 5x slower); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def props(max_examples: int) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Deterministic hypothesis settings: the same examples on every run and machine (the
    too_slow health check is off: drawing is cheap, but a loaded CI machine may time it)."""
    return settings(max_examples=max_examples, derandomize=True, database=None, deadline=None,
                    print_blob=True, suppress_health_check=[HealthCheck.too_slow])


# --- strategies -----------------------------------------------------------------------------

Path = tuple[int, ...]


@st.composite
def rank_paths(draw: st.DrawFn, max_depth: int = 4, max_children: int = 3,
               max_nodes: int = 10) -> list[Path]:
    """A valid static tree: prefix-closed rank paths whose sibling ranks have no gaps, in a
    random order (the builder must not depend on it)."""
    paths: list[Path] = []
    frontier: list[Path] = [()]
    while frontier and len(paths) < max_nodes:
        parent = frontier.pop(0)
        room = min(max_children, max_nodes - len(paths))
        for rank in range(draw(st.integers(1 if parent == () else 0, room))):
            child = (*parent, rank)
            paths.append(child)
            if len(child) < max_depth:
                frontier.append(child)
    return list(draw(st.permutations(paths)))


@dataclass(frozen=True)
class Shape:
    """A tree builder's configuration: ``chain`` (depth), ``static`` (paths) or ``dynamic``."""

    kind: str
    depth: int = 1
    paths: tuple[Path, ...] = ()
    budget: int = 1
    topk: int = 1

    def builder(self) -> TreeBuilder:
        if self.kind == "chain":
            return ChainBuilder(self.depth)
        if self.kind == "static":
            return StaticTreeBuilder(list(self.paths))
        return DynamicTreeBuilder(budget=self.budget, topk=self.topk, depth=self.depth)

    def config(self) -> dict[str, Any]:
        """The same shape as ``SpecConfig`` fields."""
        if self.kind == "chain":
            return {"tree": "chain", "num_speculative_tokens": self.depth}
        if self.kind == "static":
            return {"tree": "static", "tree_paths": [list(p) for p in self.paths]}
        return {"tree": "dynamic", "tree_budget": self.budget, "tree_topk": self.topk,
                "num_speculative_tokens": self.depth}


def shapes(max_depth: int = 4, max_nodes: int = 10, max_topk: int = 3) -> st.SearchStrategy[Shape]:
    chains = st.builds(Shape, kind=st.just("chain"), depth=st.integers(1, max_depth))
    static = rank_paths(max_depth=max_depth, max_nodes=max_nodes).map(
        lambda ps: Shape("static", paths=tuple(ps)))
    dynamic = st.builds(Shape, kind=st.just("dynamic"), depth=st.integers(1, max_depth),
                        budget=st.integers(1, max_nodes), topk=st.integers(1, max_topk))
    return st.one_of(chains, static, dynamic)


# --- trees: a deterministic table drafter and oracles of the builders ------------------------

@dataclass
class Table:
    """A Markov world over ``V`` tokens: the target's logits after token t are ``target[t]``;
    the drafter proposes ``ranks[t][:width[t]]`` after t, with probabilities ``probs[t]``."""

    V: int
    target: torch.Tensor  # [V, V]
    ranks: list[list[int]]
    probs: list[list[float]]
    width: list[int]

    def children(self, token: int) -> list[tuple[int, float]]:
        w = self.width[token]
        return list(zip(self.ranks[token][:w], self.probs[token][:w]))


@st.composite
def tables(draw: st.DrawFn) -> Table:
    V = draw(st.integers(2, 6))
    seed = draw(st.integers(0, 2**16 - 1))
    noise = draw(st.sampled_from([0.0, 0.0, 0.3, 1.0, 3.0, 10.0]))  # 0: ranks like the target
    full = draw(st.booleans())
    width = [V] * V if full else draw(st.lists(st.integers(0, V), min_size=V, max_size=V))
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(V, V, generator=g) * 3
    draft = (target + noise * torch.randn(V, V, generator=g)).softmax(-1)
    p, order = draft.sort(-1, descending=True)
    return Table(V, target, order.tolist(), p.tolist(), width)


class TableDrafter(Drafter):
    """Deterministic: proposes a ``Table``'s ranked children (as many as the table has)."""

    name = "table-property"

    def __init__(self, table: Table):
        super().__init__()
        self.table = table

    def begin(self, ctx: DraftContext) -> list[Any]:
        return [None] * len(ctx.tokens)

    def expand(self, frontier: list[list[FrontierItem]], k: int) -> list[list[Candidates]]:
        out = []
        for row in frontier:
            cands = []
            for item in row:
                kids = self.table.children(item.token)[:k]
                cands.append(Candidates(tokens=[t for t, _ in kids], probs=[p for _, p in kids],
                                        handles=[None] * len(kids)))
            out.append(cands)
        return out


@dataclass
class Node:
    """An oracle's node: its token, parent index (-1: root), rank path and path probability."""

    token: int
    parent: int
    path: Path
    value: float
    score: float = 0.0


def oracle_static(paths: Sequence[Path], table: Table, root: int, limit: int) -> list[Node]:
    """What a static tree must hold: every path no deeper than ``limit`` whose ranks the
    drafter has (a missing candidate drops its subtree), breadth first, ranks in order."""
    nodes: list[Node] = []
    where: dict[Path, int] = {}
    for p in sorted(paths, key=lambda t: (len(t), t)):
        if len(p) > limit:
            continue
        parent = where.get(p[:-1], -1) if len(p) > 1 else -1
        if len(p) > 1 and p[:-1] not in where:
            continue
        up = nodes[parent].token if parent >= 0 else root
        kids = table.children(up)
        if p[-1] >= len(kids):
            continue
        where[p] = len(nodes)
        nodes.append(Node(kids[p[-1]][0], parent, p, 0.0))
    return nodes


def oracle_dynamic(shape: Shape, table: Table, root: int, limit: int) -> list[Node]:
    """EAGLE-2's rule, written from its description: at each depth expand the ``topk`` nodes
    of the newest level with the highest path probability (ties: earlier first) into their
    ``topk`` best children; then keep the ``budget`` nodes of highest pruning score (the path
    probability capped by the parent's and the previous sibling's scores; ties: earlier)."""
    nodes: list[Node] = []
    level: list[int] = [-1]  # the root
    for depth in range(1, min(shape.depth, limit) + 1):
        if depth > 1:
            level = sorted(level, key=lambda i: -nodes[i].value)[: shape.topk]
        nxt = []
        for i in level:
            up = nodes[i] if i >= 0 else None
            prev: Node | None = None
            for rank, (tok, prob) in enumerate(table.children(up.token if up else root)
                                               [: shape.topk]):
                value = (up.value if up else 1.0) * prob
                score = value
                if up is not None:
                    score = min(score, up.score)
                if prev is not None:
                    score = min(score, prev.score)
                prev = Node(tok, i, (*(up.path if up else ()), rank), value, score)
                nodes.append(prev)
                nxt.append(len(nodes) - 1)
        level = nxt
        if not level:
            break
    keep = sorted(sorted(range(len(nodes)), key=lambda i: (-nodes[i].score, i))[: shape.budget])
    remap = {old: new for new, old in enumerate(keep)}
    return [Node(nodes[i].token, remap[nodes[i].parent] if nodes[i].parent >= 0 else -1,
                 nodes[i].path, nodes[i].value) for i in keep]


def oracle(shape: Shape, table: Table, root: int, limit: int) -> list[Node]:
    if shape.kind == "chain":
        return oracle_static([(0,) * d for d in range(1, shape.depth + 1)], table, root, limit)
    if shape.kind == "static":
        return oracle_static(shape.paths, table, root, limit)
    return oracle_dynamic(shape, table, root, limit)


def check_layout(tree: DraftTree, root_positions: torch.Tensor) -> TreeLayout:
    """The layout the runner and verifier use agrees with the parents, node by node."""
    tree.validate()
    layout = TreeLayout.from_tree(tree)
    prep = prepare_tree(tree.parents, tree.num_nodes, root_positions)
    B, N = tree.tokens.shape
    assert layout.ancestors.shape == (B, N, N) and layout.depth.shape == (B, N)
    paths = layout.retrieve_indices()
    assert paths.shape[:2] == (B, N)
    for b in range(B):
        n = int(tree.num_nodes[b])
        for i in range(N):
            if i >= n:  # padding: depth 0, sees only itself, no path, the root's position
                assert not layout.real[b, i] and int(layout.depth[b, i]) == 0
                assert layout.ancestors[b, i].nonzero().flatten().tolist() == [i]
                assert (paths[b, i] == -1).all()
                assert int(prep.positions[b, i]) == int(root_positions[b])
                continue
            chain = [i]
            while int(tree.parents[b, chain[-1]]) >= 0:
                chain.append(int(tree.parents[b, chain[-1]]))
            chain.reverse()  # the root's child first
            assert layout.real[b, i]
            assert int(layout.depth[b, i]) == len(chain)
            assert layout.ancestors[b, i].nonzero().flatten().tolist() == sorted(chain)
            assert paths[b, i].tolist() == chain + [-1] * (paths.shape[2] - len(chain))
            assert int(prep.positions[b, i]) == int(root_positions[b]) + len(chain)
    real_depths = layout.depth[layout.real]
    assert layout.max_depth == (int(real_depths.max()) if real_depths.numel() else 0)
    return layout


@st.composite
def tree_batches(draw: st.DrawFn, shape_strategy: st.SearchStrategy[Shape]
                 ) -> tuple[Shape, Table, list[int], list[int], list[bool]]:
    """A shape, a table, and per row a root token, a depth limit and whether it is active."""
    shape, table = draw(shape_strategy), draw(tables())
    rows = draw(st.integers(1, 4))
    roots = draw(st.lists(st.integers(0, table.V - 1), min_size=rows, max_size=rows))
    limits = draw(st.lists(st.integers(0, 5), min_size=rows, max_size=rows))
    active = draw(st.lists(st.sampled_from([True, True, True, False]), min_size=rows,
                           max_size=rows))
    return shape, table, roots, limits, active


def build(shape: Shape, table: Table, roots: list[int], limits: list[int], active: list[bool]
          ) -> DraftTree:
    ctx = DraftContext(tokens=[[r] for r in roots], active=active,
                       sampling=SamplingParams(), adaptive=False)
    return shape.builder().build(TableDrafter(table), ctx, limits, table.V)


def check_against_oracle(shape: Shape, table: Table, roots: list[int], limits: list[int],
                         active: list[bool]) -> DraftTree:
    tree = build(shape, table, roots, limits, active)
    assert tree.draft_probs is None  # deterministic drafts under greedy decoding
    for b, root in enumerate(roots):
        want = oracle(shape, table, root, limits[b]) if active[b] else []
        n = int(tree.num_nodes[b])
        got = list(zip(tree.tokens[b, :n].tolist(), tree.parents[b, :n].tolist()))
        assert got == [(w.token, w.parent) for w in want], (b, [w.path for w in want])
        if shape.kind == "dynamic":
            assert n <= shape.budget
    event(f"nodes in the batch: {'none' if not int(tree.num_nodes.sum()) else 'some'}")
    check_layout(tree, torch.tensor([3 * r + b for b, r in enumerate(roots)], dtype=torch.long))
    return tree


@props(60)
@given(tree_batches(rank_paths().map(lambda ps: Shape("static", paths=tuple(ps)))))
def test_static_tree_matches_its_oracle(case):
    shape, *rest = case
    assert len(StaticTreeBuilder(list(shape.paths)).paths) == len(shape.paths)
    check_against_oracle(shape, *rest)


@props(30)
@given(tree_batches(st.builds(Shape, kind=st.just("chain"), depth=st.integers(1, 6))))
def test_chain_matches_its_oracle(case):
    check_against_oracle(*case)


@props(60)
@given(tree_batches(st.builds(Shape, kind=st.just("dynamic"), depth=st.integers(1, 5),
                              budget=st.integers(1, 16), topk=st.integers(1, 4))))
def test_dynamic_tree_matches_its_oracle(case):
    shape, table, roots, limits, active = case
    tree = check_against_oracle(shape, table, roots, limits, active)
    if all(w >= shape.topk for w in table.width):  # every expansion found topk children
        for b in range(len(roots)):
            sizes, d = [], min(shape.depth, limits[b])
            for depth in range(d):
                sizes.append(shape.topk * (1 if depth == 0 else min(sizes[-1], shape.topk)))
            want = min(shape.budget, sum(sizes)) if active[b] else 0
            assert int(tree.num_nodes[b]) == want


@props(30)
@given(rank_paths(), st.data())
def test_static_paths_that_are_not_a_tree_are_refused(paths, data):
    """Dropping a path that has children (its subtree would hang from nothing) or a rank that
    a later sibling skips over is refused; the full set is accepted."""
    parse_static_paths(paths)
    removable = [p for p in paths if any(q[:len(p)] == p and q != p for q in paths)
                 or (*p[:-1], p[-1] + 1) in paths]
    if removable:
        drop = data.draw(st.sampled_from(removable))
        with pytest.raises(ValueError, match="static tree path"):
            parse_static_paths([p for p in paths if p != drop])


# --- greedy verification of any tree ---------------------------------------------------------

def rollout(table: Table, root: int, n: int) -> list[int]:
    """The Markov target's greedy decoding: ``n`` tokens after ``root``."""
    out, tok = [], root
    for _ in range(n):
        tok = int(table.target[tok].argmax())
        out.append(tok)
    return out


def verify_with_registry(tree: DraftTree, logits: torch.Tensor, sampling: SamplingParams,
                         generator: torch.Generator | None, layout: TreeLayout | None = None
                         ) -> VerifyResult:
    """The verifier the engine looks up for ``acceptance_method="rejection_sampler"``."""
    layout = layout if layout is not None else TreeLayout.from_tree(tree)
    return get_registry().verifiers["rejection_sampler"](tree, logits, sampling, generator,
                                                         layout, None)


@props(60)
@given(tree_batches(shapes(max_depth=5, max_nodes=12, max_topk=4)))
def test_greedy_verification_of_any_tree_is_greedy_decoding(case):
    shape, table, roots, limits, active = case
    tree = build(shape, table, roots, limits, active)
    layout = check_layout(tree, torch.zeros(len(roots), dtype=torch.long))
    B = len(roots)
    logits = torch.cat([table.target[torch.tensor(roots)][:, None], table.target[tree.tokens]], 1)
    res = verify_with_registry(tree, logits, SamplingParams(), None, layout)
    for b, (root, emitted) in enumerate(zip(roots, res.new_tokens(tree))):
        n = int(tree.num_nodes[b])
        spelled = [tuple(tree.tokens[b, [j for j in layout.retrieve_indices()[b, i].tolist()
                                         if j >= 0]].tolist()) for i in range(n)]
        greedy = rollout(table, root, n + 1)
        deepest = max((len(s) for s in spelled if list(s) == greedy[:len(s)]), default=0)
        assert emitted == greedy[: deepest + 1], (b, spelled)
        m = int(res.num_accepted[b])
        assert m == deepest
        event(f"{shape.kind}: accepted {min(m, 2)}{'+' if m >= 2 else ''}")
        if m:  # the accepted nodes are a path of the tree, root's child first
            path = res.accepted_nodes[b, :m].tolist()
            assert path == [j for j in layout.retrieve_indices()[b, path[-1]].tolist() if j >= 0]
    assert res.num_accepted.shape == (B,)


# --- engine, greedy: every drafter on the tiny models ----------------------------------------

HEADS = ("medusa", "clover", "clover2", "eagle", "msd")
DRAFTERS = ("ngram", "draft_model", "perfect_draft", "layer_skip", *HEADS)


@pytest.fixture(scope="module")
def targets() -> dict[str, torch.nn.Module]:
    return {"llama": tiny_llama(0), "gemma": tiny_gemma(0)}


@pytest.fixture(scope="module")
def drafter_setups(targets) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (drafter, target name): the drafter's options (heads: llama only, as in
    test_heads.py; a perfect draft model is a copy of the target)."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for name, model in targets.items():
        perfect = type(model)(model.config).eval()
        perfect.load_state_dict(model.state_dict())
        out["draft_model", name] = {"model": (tiny_llama if name == "llama" else tiny_gemma)(1)}
        out["perfect_draft", name] = {"model": perfect}
        out["layer_skip", name] = {"layers": 2 if name == "llama" else 3}
    for kind in HEADS:
        out[kind, "llama"] = {"checkpoint": make_net(kind, targets["llama"])}
    return out


token_ids = st.integers(1, VOCAB - 1)
prompts = st.one_of(
    st.lists(token_ids, min_size=1, max_size=12),
    st.tuples(st.lists(token_ids, min_size=1, max_size=4), st.integers(2, 12))
    .map(lambda mn: (mn[0] * mn[1])[: mn[1]]),  # a repeated motif: n-gram lookup finds it
)


def left_pad(rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, L - len(r):] = torch.tensor(list(r))
        mask[b, L - len(r):] = 1
    return ids, mask


@dataclass
class GreedyCase:
    model: str
    shape: Shape
    prompts: list[list[int]]
    max_new: int
    eos_at: tuple[int, int] | None  # (row, position) of the target's output used as EOS
    lookup_max: int


@st.composite
def greedy_cases(draw: st.DrawFn, drafter: str) -> GreedyCase:
    model = "llama" if drafter in HEADS else draw(st.sampled_from(["llama", "gemma"]))
    return GreedyCase(model=model, shape=draw(shapes(max_depth=4, max_nodes=10)),
                      prompts=draw(st.lists(prompts, min_size=1, max_size=3)),
                      max_new=draw(st.integers(1, 16)),
                      eos_at=draw(st.none() | st.tuples(st.integers(0, 2), st.integers(0, 15))),
                      lookup_max=draw(st.integers(1, 4)))


def run_greedy_case(drafter: str, case: GreedyCase, targets, drafter_setups
                    ) -> tuple[list[list[int]], list[list[int]], Any]:
    """(what speculation emitted, what ``generate`` emits, the generation's stats)."""
    model = targets[case.model]
    ids, mask = left_pad(case.prompts)
    want = reference_greedy(model, ids, mask, case.max_new)
    eos = None
    if case.eos_at is not None:
        row = want[case.eos_at[0] % len(want)]
        eos = row[case.eos_at[1] % len(row)]
        want = reference_greedy(model, ids, mask, case.max_new, eos=eos)
    method = "draft_model" if drafter == "perfect_draft" else drafter
    opts = drafter_setups.get((drafter, case.model), {"prompt_lookup_max": case.lookup_max})
    spec = Speculator.from_config(SpecConfig(method=method, adaptive=False, **case.shape.config(),
                                             **opts), model)
    runner = ModelTargetRunner(model, hidden_layers=spec.drafter.hidden_layers)
    got = speculative_generate(runner, spec, ids, mask, max_new_tokens=case.max_new,
                               eos_token_ids=() if eos is None else [eos])
    return got.sequences, want, got.stats


@pytest.mark.parametrize("drafter", DRAFTERS)
@props(8)
@given(data=st.data())
def test_engine_greedy_identical_to_generate(targets, drafter_setups, drafter, data):
    case = data.draw(greedy_cases(drafter), label="case")
    got, want, stats = run_greedy_case(drafter, case, targets, drafter_setups)
    event(f"{case.model}, {case.shape.kind}, batch {len(case.prompts)}")
    event(f"EOS {'in the output' if any(len(w) < case.max_new for w in want) else 'unused'}")
    event(f"accepted tokens: {min(sum(map(sum, stats.accepted_per_step)), 1)}+")
    assert got == want
    assert all(len(s) <= case.max_new for s in got)
    assert stats.target_forwards <= case.max_new
    if drafter == "perfect_draft" and case.shape.kind == "chain":
        # every draft accepted: each step emits depth + 1 tokens, so EOS and max_new_tokens
        # fall inside accepted runs
        per_step = case.shape.depth + 1
        event("perfect chain: forwards bounded")
        assert stats.target_forwards <= 1 + math.ceil((case.max_new - 1) / per_step)


def test_planted_eos_bug_fails_the_greedy_property(targets, drafter_setups, monkeypatch):
    """The control of the property above: with an engine that does not cut an accepted run
    at EOS, the same search finds a case whose output differs from ``generate``'s."""
    original = engine_module._finish_row

    def ignores_eos(row, new, cand, max_new, eos, stop):
        return original(row, new, cand, max_new, set(), stop)

    monkeypatch.setattr(engine_module, "_finish_row", ignores_eos)

    def differs(case: GreedyCase) -> bool:
        got, want, _ = run_greedy_case("perfect_draft", case, targets, drafter_setups)
        return got != want

    found = find(greedy_cases("perfect_draft"), differs,
                 settings=settings(max_examples=20, derandomize=True, database=None,
                                   deadline=None, phases=[Phase.generate]))
    assert found.eos_at is not None  # only EOS can tell the broken engine apart


# --- sampling, one step on a Markov target -----------------------------------------------------

MV = EXACTNESS_V  # vocabulary of the Markov target (MarkovDrafter is built for it)
MROOT = 3


def markov_tables() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4321)
    target = torch.randn(MV, MV, generator=g) * 1.5
    good = target + 0.4 * torch.randn(MV, MV, generator=g)  # close to the target
    bad = -target + 0.5 * torch.randn(MV, MV, generator=g)  # anti-correlated: mostly rejected
    return target, good, bad


def pvalue(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson's chi-square p-value of counts against expected counts (any shape); cells
    expected below 5 are merged into one; a count in a cell of probability 0 gives 0."""
    obs, exp = observed.flatten().double(), expected.flatten().double()
    if bool(((exp == 0) & (obs > 0)).any()):
        return 0.0  # the target can never emit that
    small = exp < 5
    o = torch.cat([obs[~small], obs[small].sum()[None]])
    e = torch.cat([exp[~small], exp[small].sum()[None]])
    keep = e > 0
    o, e = o[keep], e[keep]
    if len(e) < 2:
        return 1.0  # one possible outcome, and only it was seen
    return float(chisquare(o.numpy(), (e * o.sum() / e.sum()).numpy()).pvalue)


def move_mass(logits: torch.Tensor, delta: float) -> torch.Tensor:
    """Logits ``[..., V]`` whose softmax moves ``delta`` of probability from the most likely
    token to the second most likely one: a total-variation distance of exactly ``delta``."""
    p = logits.float().softmax(-1)
    top2 = p.topk(2, dim=-1).indices
    assert bool((p.gather(-1, top2[..., :1]) >= delta).all())
    p = p.scatter_add(-1, top2, torch.tensor([-delta, delta]).expand(top2.shape).contiguous())
    return p.clamp(min=0).log()


def markov_pairs(shape: Shape, drafter: Drafter, sampling: SamplingParams, seed: int, n: int,
                 root_logits: torch.Tensor | None = None) -> tuple[torch.Tensor, VerifyResult]:
    """One speculative step for ``n`` rows at ``MROOT``, verified by the registered verifier:
    per row the first two emitted tokens (the second drawn from the true target when the step
    emitted one: what the next exact step would do). ``root_logits``: what the verifier is
    shown at the root instead of the target's (a planted bias)."""
    target, _, _ = markov_tables()
    g = torch.Generator().manual_seed(seed)
    builder = shape.builder()
    ctx = DraftContext(tokens=[[MROOT]] * n, active=[True] * n, sampling=sampling, generator=g,
                       adaptive=False)
    tree = builder.build(drafter, ctx, [builder.max_depth] * n, MV)
    root = target[MROOT] if root_logits is None else root_logits
    logits = torch.cat([root.expand(n, 1, MV), target[tree.tokens]], 1)
    res = verify_with_registry(tree, logits, sampling, g)
    rows = res.new_tokens(tree)
    p = probs_from_logits(target, sampling)
    x1 = torch.tensor([r[0] for r in rows])
    x2 = torch.multinomial(p[x1], 1, generator=g).squeeze(1)
    have2 = torch.tensor([len(r) > 1 for r in rows])
    if bool(have2.any()):
        x2[have2] = torch.tensor([r[1] for r in rows if len(r) > 1])
    return torch.stack([x1, x2], 1), res


def markov_pvalue(pairs: torch.Tensor, sampling: SamplingParams) -> float:
    target, _, _ = markov_tables()
    p = probs_from_logits(target, sampling)
    expected = p[MROOT][:, None] * p * len(pairs)
    observed = torch.bincount(pairs[:, 0] * MV + pairs[:, 1], minlength=MV * MV)
    return pvalue(observed.view(MV, MV), expected)


samplings = st.builds(
    SamplingParams,
    temperature=st.floats(0.5, 2.0).map(lambda t: round(t, 2)),
    top_k=st.sampled_from([0, 0, 3, 5, 7]),
    top_p=st.sampled_from([1.0, 1.0, 0.95, 0.8, 0.6]),
)
MARKOV_N = 6000


@props(10)
@given(shape=shapes(max_depth=3, max_nodes=7), sampling=samplings,
       kind=st.sampled_from(["good-q", "bad-q", "good-onehot"]), seed=st.integers(0, 10_000))
def test_one_step_sampling_keeps_the_target_distribution(shape, sampling, kind, seed):
    target, good, bad = markov_tables()
    drafter = MarkovDrafter(bad if kind == "bad-q" else good, sampling,
                            probabilistic=kind.endswith("-q"))
    pairs, res = markov_pairs(shape, drafter, sampling, seed, MARKOV_N)
    assert markov_pvalue(pairs, sampling) > ALPHA
    if kind == "good-q":  # and speculation did something
        assert int(res.num_accepted.sum()) > 0


@pytest.mark.parametrize("shape", [Shape("chain", depth=3),
                                   Shape("static", paths=((0,), (1,), (2,), (0, 0), (1, 0))),
                                   Shape("dynamic", depth=3, budget=6, topk=3)],
                         ids=["chain", "static", "dynamic"])
def test_one_step_check_rejects_a_planted_bias(shape):
    """The control: the verifier is shown the root distribution with DELTA_MARKOV of
    probability moved between its two likeliest tokens (the joint of (x1, x2) is then at
    total-variation distance DELTA_MARKOV from the target's); the same check rejects it."""
    target, good, _ = markov_tables()
    sampling = SamplingParams(temperature=1.0)
    drafter = MarkovDrafter(good, sampling, probabilistic=True)
    seed = 17
    fair, _ = markov_pairs(shape, drafter, sampling, seed, MARKOV_N)
    assert markov_pvalue(fair, sampling) > ALPHA
    biased, _ = markov_pairs(shape, drafter, sampling, seed, MARKOV_N,
                             root_logits=move_mass(target[MROOT], DELTA_MARKOV))
    p = markov_pvalue(biased, sampling)
    print(f"planted TV {DELTA_MARKOV} on the Markov target ({shape.kind}): p-value {p:.3g}")
    assert p < ALPHA


# --- sampling through the engine, real drafters ------------------------------------------------

SV = 8  # vocabulary of the sharpened tiny Llama
SAMPLING_SETTINGS = {
    "t1-chain": (SamplingParams(temperature=1.0), Shape("chain", depth=2)),
    "t0.7-topk5-dynamic": (SamplingParams(temperature=0.7, top_k=5),
                           Shape("dynamic", depth=2, budget=4, topk=2)),
    "t1.3-topp0.8-static": (SamplingParams(temperature=1.3, top_p=0.8),
                            Shape("static", paths=((0,), (1,), (0, 0), (1, 0)))),
}
ENGINE_ROWS = 2400  # rows per call, alternating two prompts


def sharp_llama(seed: int) -> torch.nn.Module:
    """A tiny Llama over SV tokens whose next-token distributions are far from uniform."""
    model = tiny_llama(seed, vocab=SV)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


@pytest.fixture(scope="module")
def sharp() -> dict[str, Any]:
    """The target, its two prompts (a stretch of its own greedy output, which repeats, so
    n-gram lookup drafts; and a shorter one, left-padded in the batch) and drafter options."""
    model = sharp_llama(0)
    ids = [3]
    with torch.no_grad():
        for _ in range(7):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return {"model": model, "prompts": [ids, ids[2:6]],
            "options": {"ngram": {}, "draft_model": {"model": sharp_llama(1)},
                        "layer_skip": {"layers": 2},
                        "medusa": {"checkpoint": make_net("medusa", model, draft_vocab=SV)}}}


def exact_joints(model: torch.nn.Module, prompt: list[int], sampling: SamplingParams
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's own joints of (x1, x2) and (x2, x3) after ``prompt``: ``[V, V]`` each."""
    ids = torch.tensor([prompt])
    V = SV
    with torch.no_grad():
        p1 = probs_from_logits(model(ids).logits[0, -1].float(), sampling)
        one = torch.cat([ids.expand(V, -1), torch.arange(V)[:, None]], 1)
        p2 = probs_from_logits(model(one).logits[:, -1].float(), sampling)
        pairs = torch.cartesian_prod(torch.arange(V), torch.arange(V))
        two = torch.cat([ids.expand(V * V, -1), pairs], 1)
        p3 = probs_from_logits(model(two).logits[:, -1].float(), sampling).view(V, V, V)
    j12 = p1[:, None] * p2
    return j12, (j12[:, :, None] * p3).sum(0)


def engine_draws(sharp: dict[str, Any], method: str, sampling: SamplingParams, shape: Shape,
                 seed: int, verifier: Callable[..., VerifyResult] | None = None
                 ) -> tuple[list[torch.Tensor], int]:
    """One batched call of the engine: per prompt the ``[rows, 3]`` first three tokens, and
    the number of draft tokens accepted. ``verifier``: replaces the registered one."""
    model, plist = sharp["model"], sharp["prompts"]
    which = [r % len(plist) for r in range(ENGINE_ROWS)]
    ids, mask = left_pad([plist[w] for w in which])
    spec = Speculator.from_config(SpecConfig(method=method, adaptive=False, **shape.config(),
                                             **sharp["options"][method]), model)
    if verifier is not None:
        spec.verifier = verifier
    runner = ModelTargetRunner(model, hidden_layers=spec.drafter.hidden_layers, capacity=32)
    # the first step drafts two deep (max_new_tokens - 2) and may emit x2, x3 and x4
    out = speculative_generate(runner, spec, ids, mask, max_new_tokens=4, sampling=sampling,
                               generator=torch.Generator().manual_seed(seed))
    seqs = torch.tensor(out.sequences)[:, :3]
    accepted = sum(sum(a) for a in out.stats.accepted_per_step)
    return [seqs[torch.tensor(which) == w] for w in range(len(plist))], accepted


def engine_pvalues(sharp: dict[str, Any], draws: list[torch.Tensor], sampling: SamplingParams
                   ) -> list[float]:
    """Per prompt, the chi-square p-values of the joints of (x1, x2) and (x2, x3)."""
    out = []
    for prompt, x in zip(sharp["prompts"], draws):
        for (a, b), joint in zip(((0, 1), (1, 2)), exact_joints(sharp["model"], prompt, sampling)):
            counts = torch.bincount(x[:, a] * SV + x[:, b], minlength=SV * SV)
            out.append(pvalue(counts, joint.flatten() * len(x)))
    return out


@pytest.mark.parametrize("setting", sorted(SAMPLING_SETTINGS))
@pytest.mark.parametrize("method", ["ngram", "draft_model", "layer_skip", "medusa"])
def test_engine_sampling_keeps_the_target_distribution(sharp, method, setting):
    sampling, shape = SAMPLING_SETTINGS[setting]
    draws, accepted = engine_draws(sharp, method, sampling, shape, seed=len(method + setting))
    assert min(engine_pvalues(sharp, draws, sampling)) > ALPHA
    assert accepted > 0  # speculation did something


def test_engine_check_rejects_a_planted_bias(sharp):
    """The control: each step's verifier is shown its root distribution with DELTA_ENGINE of
    probability moved between the two likeliest tokens, so (x1, x2) is at total-variation
    distance DELTA_ENGINE from the target's joint; the same check rejects it."""
    sampling, shape = SAMPLING_SETTINGS["t1-chain"]
    real = get_registry().verifiers["rejection_sampler"]

    def biased(tree, logits, sampling, generator, layout, config):
        logits = logits.clone()
        logits[:, 0] = move_mass(logits[:, 0], DELTA_ENGINE)
        return real(tree, logits, sampling, generator, layout, config)

    draws, _ = engine_draws(sharp, "draft_model", sampling, shape, seed=5, verifier=biased)
    pvals = engine_pvalues(sharp, draws, sampling)
    print(f"planted TV {DELTA_ENGINE} in the engine: p-values {[f'{p:.3g}' for p in pvals]}")
    assert min(pvals) < ALPHA
