"""prepare_tree: the Triton kernel (interpreted) against the torch reference, the reference
against a brute-force walk up the parents, the TreeLayout wiring, and the argument errors."""

from __future__ import annotations

import zlib

import pytest
import torch

from specplug.kernels._triton_tree_prep import prepare_tree_triton
from specplug.kernels.tree_prep import TreePrep, prepare_tree, prepare_tree_reference
from specplug.tree import DraftTree, TreeLayout

FIELDS = ("depth", "positions", "ancestors", "retrieve")
SHAPES = ("chain", "star", "random", "binary")


def make_parents(shape: str, num_nodes: list[int], N: int, g: torch.Generator) -> torch.Tensor:
    """``[B, N]`` parents of the given shape; padding entries are garbage (must be ignored)."""
    parents = torch.randint(-5, N + 5, (len(num_nodes), N), generator=g)
    for b, n in enumerate(num_nodes):
        for i in range(n):
            if shape == "chain":
                p = i - 1
            elif shape == "star":
                p = -1
            elif shape == "binary":  # two children per node, two under the root
                p = (i - 2) // 2 if i >= 2 else -1
            else:
                p = int(torch.randint(-1, i, (1,), generator=g))
            parents[b, i] = p
    return parents


def brute_force(parents: torch.Tensor, num_nodes: torch.Tensor,
                root_positions: torch.Tensor | None, D: int) -> TreePrep:
    """Walk up from every node with Python loops; the path keeps its first D nodes."""
    B, N = parents.shape
    depth = torch.zeros(B, N, dtype=torch.long)
    anc = torch.eye(N, dtype=torch.bool).repeat(B, 1, 1)
    retrieve = torch.full((B, N, D), -1, dtype=torch.long)
    for b in range(B):
        for i in range(int(num_nodes[b])):
            path = [i]
            while int(parents[b, path[-1]]) >= 0:
                path.append(int(parents[b, path[-1]]))
            path.reverse()
            depth[b, i] = len(path)
            anc[b, i, path] = True
            retrieve[b, i, : min(len(path), D)] = torch.tensor(path[:D])
    roots = torch.zeros(B, dtype=torch.long) if root_positions is None else root_positions
    return TreePrep(depth, roots[:, None] + depth, anc, retrieve)


def case(B: int, N: int, shape: str, seed_key: str):
    """A batch: B=1 is one full row; B=3 is ragged (a full row, an empty row, a partial one)."""
    g = torch.Generator().manual_seed(zlib.crc32(seed_key.encode()))
    sizes = [N] if B == 1 else [N, 0, int(torch.randint(min(1, N), N + 1, (1,), generator=g))]
    num_nodes = torch.tensor(sizes, dtype=torch.long)
    return make_parents(shape, sizes, N, g), num_nodes, torch.randint(0, 1000, (B,), generator=g)


def assert_same(got: TreePrep, want: TreePrep) -> None:
    for f in FIELDS:
        a, b = getattr(got, f), getattr(want, f)
        assert a.dtype == b.dtype and a.shape == b.shape, f
        assert torch.equal(a, b), f"{f} differs"


def _grid():
    for B in (1, 3):
        for N in (0, 1, 5, 64, 130):
            for shape in SHAPES if N > 1 else ("random",):
                yield pytest.param(B, N, shape, id=f"B{B}-N{N}-{shape}")


@pytest.mark.parametrize("bound", ["none", "tight", "loose"])
@pytest.mark.parametrize("with_roots", [False, True])
@pytest.mark.parametrize(("B", "N", "shape"), list(_grid()))
def test_reference_matches_brute_force(B, N, shape, with_roots, bound):
    parents, num_nodes, roots = case(B, N, shape, f"{B}-{N}-{shape}-{with_roots}-{bound}")
    roots = roots if with_roots else None
    deepest = int(brute_force(parents, num_nodes, None, N).depth.max()) if N else 0
    max_depth = {"none": None, "tight": deepest, "loose": deepest + 3}[bound]
    got = prepare_tree_reference(parents, num_nodes, roots, max_depth)
    assert_same(got, brute_force(parents, num_nodes, roots, N if max_depth is None else max_depth))


@pytest.mark.parametrize(("max_depth", "with_roots"), [(None, False), ("bound", True)])
@pytest.mark.parametrize(("B", "N", "shape"), list(_grid()))
def test_triton_matches_reference(B, N, shape, max_depth, with_roots):
    parents, num_nodes, roots = case(B, N, shape, f"triton-{B}-{N}-{shape}-{max_depth}")
    roots = roots if with_roots else None
    if max_depth == "bound":
        max_depth = int(prepare_tree_reference(parents, num_nodes).depth.max()) if N else 0
    want = prepare_tree(parents, num_nodes, roots, max_depth, backend="torch")
    assert_same(prepare_tree(parents, num_nodes, roots, max_depth, backend="triton"), want)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_unchecked_paths_are_cut_and_bad_parents_count_as_root(backend):
    """What CUDA input that is never checked gives (both backends agree): a path longer than
    max_depth keeps its first max_depth nodes, a parent outside [0, i) counts as -1."""
    parents = torch.tensor([[-1, 0, 1, 2, 3, 9], [-1, 0, 0, 5, 3, -2]])
    num_nodes = torch.tensor([6, 6])
    run = prepare_tree_triton if backend == "triton" else prepare_tree_reference
    got = run(parents, num_nodes, None, None)
    assert got.depth.tolist() == [[1, 2, 3, 4, 5, 1], [1, 2, 2, 1, 2, 1]]
    assert got.retrieve[0, 4].tolist() == [0, 1, 2, 3, 4, -1]
    if backend == "triton":  # the reference raises instead on CPU
        cut = prepare_tree_triton(parents, num_nodes, None, 2)
        assert cut.retrieve[0, :5].tolist() == [[0, -1], [0, 1], [0, 1], [0, 1], [0, 1]]
        assert cut.depth.tolist() == got.depth.tolist()


def test_tree_layout_uses_prepare_tree():
    parents, num_nodes, _ = case(3, 64, "random", "layout")
    tree = DraftTree(torch.zeros_like(parents), parents, num_nodes)
    lay = TreeLayout.from_tree(tree)
    want = brute_force(parents, num_nodes, None, 64)
    assert lay.max_depth == int(want.depth.max())
    assert torch.equal(lay.depth, want.depth) and torch.equal(lay.ancestors, want.ancestors)
    assert torch.equal(lay.real, torch.arange(64) < num_nodes[:, None])
    assert torch.equal(lay.retrieve_indices(), want.retrieve[..., : lay.max_depth])
    empty = TreeLayout.from_tree(DraftTree(torch.zeros(2, 0, dtype=torch.long),
                                           torch.zeros(2, 0, dtype=torch.long),
                                           torch.zeros(2, dtype=torch.long)))
    assert empty.max_depth == 0 and empty.retrieve_indices().shape == (2, 0, 1)


P = torch.tensor([[-1, 0, 1]])
N3 = torch.tensor([3])


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(parents=P[0]), "parents must be a \\[B, N\\] int64"),
    (dict(parents=P.int()), "parents must be a \\[B, N\\] int64.*long"),
    (dict(num_nodes=torch.tensor([3, 3])), "num_nodes must be a \\[B\\] = \\[1\\] int64"),
    (dict(num_nodes=N3.int()), "num_nodes must be a \\[B\\] = \\[1\\] int64"),
    (dict(root_positions=torch.zeros(1, 1, dtype=torch.long)), "root_positions must be"),
    (dict(max_depth=-1), "max_depth must be None or an int >= 0"),
    (dict(max_depth=True), "max_depth must be None or an int >= 0"),
    (dict(max_depth=2.0), "max_depth must be None or an int >= 0"),
    (dict(num_nodes=torch.tensor([4])), "num_nodes must lie in \\[0, N\\] = \\[0, 3\\]"),
    (dict(num_nodes=torch.tensor([-1])), "num_nodes must lie in"),
    (dict(parents=torch.tensor([[-1, 1, 1]])), "topological order.*parents\\[0, 1\\] = 1"),
    (dict(parents=torch.tensor([[-1, -2, 0]])), "topological order.*parents\\[0, 1\\] = -2"),
    (dict(max_depth=2), "depth 3 does not fit max_depth=2"),
    (dict(backend="cuda"), "unknown kernel backend"),
])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_arguments(kwargs, match, backend):
    args = dict(parents=P, num_nodes=N3, backend=backend) | kwargs
    with pytest.raises(ValueError, match=match):
        prepare_tree(**args)
