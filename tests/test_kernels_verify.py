"""Verification kernels: the Triton kernels (CPU interpreter, outputs poisoned) against their
torch references over a grid of shapes, and the references against plain definitions.

``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` and ``SPECPLUG_KERNELS_POISON=1``.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from specplug.kernels.verify import (
    verify_chains,
    verify_chains_reference,
    verify_tree,
    verify_tree_reference,
)
from specplug.tree import DraftTree, TreeLayout

pytest.importorskip("triton")


def seed_of(*case: object) -> int:
    """A stable seed per test case (``hash`` of strings changes between runs)."""
    return zlib.crc32(repr(case).encode())


def random_parents(g: torch.Generator, n: int, shape: str) -> list[int]:
    if shape == "chain":
        return list(range(-1, n - 1))
    if shape == "star":
        return [-1] * n
    if shape == "binary":
        return [(i - 1) // 2 if i else -1 for i in range(n)]
    return [int(torch.randint(-1, i, (1,), generator=g)) if i else -1 for i in range(n)]


def make_case(seed: int, B: int, N: int, V: int, shape: str, dtype: torch.dtype,
              temperature: float, with_q: bool) -> dict:
    """A padded batch of trees whose tokens often match the target (greedy: its argmax at the
    parent; sampling: a draw from the draft distribution), with the layout and uniforms."""
    g = torch.Generator().manual_seed(seed)
    num = torch.tensor([N] + [int(torch.randint(0, N + 1, (1,), generator=g))
                              for _ in range(B - 1)])
    parents = torch.full((B, N), -1, dtype=torch.long)
    for b in range(B):
        parents[b, : int(num[b])] = torch.tensor(random_parents(g, int(num[b]), shape),
                                                 dtype=torch.long)
    logits = (torch.randn(B, N + 1, V, generator=g) * 2.5).to(dtype)
    slot = parents + 1
    if temperature == 0.0:
        tokens = logits.float().argmax(-1).gather(1, slot)
        flip = torch.rand(B, N, generator=g) < 0.25
        tokens = torch.where(flip, torch.randint(0, V, (B, N), generator=g), tokens)
        q = None
    else:
        p = (logits.float() / temperature).softmax(-1)
        q = (p.gather(1, slot[..., None].expand(B, N, V)) * 0.5 + 0.5 / V) if with_q else None
        src = q if q is not None else p.gather(1, slot[..., None].expand(B, N, V))
        tokens = torch.multinomial(src.reshape(B * N, V), 1, generator=g).reshape(B, N) \
            if N else torch.zeros(B, 0, dtype=torch.long)
    tokens = torch.where(torch.arange(N)[None] < num[:, None], tokens, 0)
    tree = DraftTree(tokens, parents, num)
    layout = TreeLayout.from_tree(tree)
    return dict(tokens=tokens, parents=parents, num_nodes=num, target_logits=logits,
                ancestors=layout.ancestors, depth=layout.depth,
                retrieve=layout.retrieve_indices(), temperature=temperature, draft_probs=q,
                uniforms=torch.rand(B, N, generator=g, dtype=torch.float64),
                bonus_uniforms=torch.rand(B, generator=g, dtype=torch.float64))


def as_tuple(out) -> tuple:
    return tuple(getattr(out, f).tolist() for f in out.__dataclass_fields__)


TREE_GRID = [
    # (B, N, V, shape)
    (1, 0, 7, "chain"),
    (1, 1, 7, "chain"),
    (1, 8, 1000, "chain"),
    (3, 6, 1000, "binary"),
    (3, 12, 1000, "random"),
    (2, 9, 1000, "star"),
    (4, 24, 333, "random"),
]


@pytest.mark.parametrize("temperature,with_q", [(0.0, False), (1.0, False), (0.6, False),
                                                (1.0, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,N,V,shape", TREE_GRID)
def test_tree_kernel_matches_reference(B, N, V, shape, dtype, temperature, with_q):
    case = make_case(seed_of(B, N, V, shape, dtype, temperature, with_q), B, N, V,
                     shape, dtype, temperature, with_q)
    ref = verify_tree(**case, backend="torch")
    tri = verify_tree(**case, backend="triton")
    assert as_tuple(tri) == as_tuple(ref)


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_tree_kernel_large_vocab(temperature):
    """A 128k+ vocabulary (not a multiple of the block) and a bushy tree."""
    case = make_case(7, 2, 10, 131_075, "binary", torch.bfloat16, temperature, False)
    assert as_tuple(verify_tree(**case, backend="triton")) == \
        as_tuple(verify_tree(**case, backend="torch"))


def chains_from_tree_case(case: dict) -> dict:
    """The same chains in vLLM's flattened layout (only for chain-shaped trees)."""
    B, N = case["tokens"].shape
    num = case["num_nodes"]
    real = torch.arange(N)[None] < num[:, None]
    logits = case["target_logits"]
    out = dict(draft_token_ids=case["tokens"][real], cu_num_draft_tokens=num.cumsum(0),
               target_logits=logits[:, :N][real], bonus_logits=logits[torch.arange(B), num],
               max_spec_len=N, temperature=case["temperature"],
               uniforms=case["uniforms"][real], bonus_uniforms=case["bonus_uniforms"])
    out["draft_probs"] = None if case["draft_probs"] is None else case["draft_probs"][real]
    return out


CHAIN_GRID = [(1, 1, 7), (1, 5, 1000), (4, 5, 1000), (3, 16, 257), (5, 3, 4000)]


@pytest.mark.parametrize("temperature,with_q", [(0.0, False), (1.0, False), (0.8, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,K,V", CHAIN_GRID)
def test_chain_kernel_matches_reference_and_tree_op(B, K, V, dtype, temperature, with_q):
    case = make_case(seed_of(B, K, V, dtype, temperature, with_q), B, K, V, "chain",
                     dtype, temperature, with_q)
    chains = chains_from_tree_case(case)
    ref = verify_chains(**chains, backend="torch")
    tri = verify_chains(**chains, backend="triton")
    assert as_tuple(tri) == as_tuple(ref)
    # the chain layout and the tree layout make the same decisions from the same uniforms
    tree = verify_tree_reference(**{k: v for k, v in case.items()})
    assert ref.num_accepted.tolist() == tree.num_accepted.tolist()
    for b in range(B):
        n = int(ref.num_accepted[b])
        path = case["tokens"][b, tree.accepted_nodes[b, :n]].tolist()
        assert ref.output_token_ids[b, : n + 1].tolist() == path + [int(tree.bonus_tokens[b])]
        assert (ref.output_token_ids[b, n + 1:] == -1).all()


def brute_force_greedy(case: dict) -> list[tuple[list[int], int]]:
    """Per row, by definition: the deepest node (earliest among equals) whose every path
    token is the argmax at its parent; then the argmax after it."""
    arg = case["target_logits"].float().argmax(-1)
    out = []
    for b in range(case["tokens"].shape[0]):
        par, tok = case["parents"][b].tolist(), case["tokens"][b].tolist()
        best, best_path = -1, []
        for i in range(int(case["num_nodes"][b])):
            path, j = [], i
            while j >= 0:
                path.append(j)
                j = par[j]
            path.reverse()
            if all(tok[k] == int(arg[b, par[k] + 1]) for k in path) and len(path) > len(best_path):
                best, best_path = i, path
        out.append((best_path, int(arg[b, best + 1])))
    return out


@pytest.mark.parametrize("B,N,V,shape", TREE_GRID)
def test_greedy_reference_is_the_definition(B, N, V, shape):
    case = make_case(B * 100 + N, B, N, V, shape, torch.float32, 0.0, False)
    res = verify_tree_reference(**case)
    for b, (path, bonus) in enumerate(brute_force_greedy(case)):
        n = int(res.num_accepted[b])
        assert res.accepted_nodes[b, :n].tolist() == path
        assert int(res.bonus_tokens[b]) == bonus


def test_sampled_chain_has_the_target_distribution():
    """Two-token chains drafted from q: the first emitted token is distributed as p (the
    target at the root) whatever q is (chi-square, 20k draws, fixed seed)."""
    V, R = 6, 20_000
    g = torch.Generator().manual_seed(0)
    target = torch.randn(V, generator=g)
    q = torch.softmax(torch.randn(V, generator=g), -1)
    p = target.softmax(-1)
    draft = torch.multinomial(q, R, replacement=True, generator=g)
    out = verify_chains_reference(
        draft, torch.arange(1, R + 1), target.expand(R, V), torch.randn(R, V, generator=g),
        max_spec_len=1, temperature=1.0, draft_probs=q.expand(R, V),
        uniforms=torch.rand(R, generator=g, dtype=torch.float64),
        bonus_uniforms=torch.rand(R, generator=g, dtype=torch.float64))
    counts = torch.bincount(out.output_token_ids[:, 0], minlength=V).double()
    expected = p.double() * R
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 20.5  # 99.9% quantile of chi-square with 5 degrees of freedom


def test_errors_name_the_problem():
    case = make_case(0, 2, 4, 50, "chain", torch.float32, 1.0, False)
    with pytest.raises(ValueError, match="uniforms"):
        verify_tree(**{**case, "uniforms": None})
    with pytest.raises(ValueError, match="N \\+ 1"):
        verify_tree(**{**case, "target_logits": case["target_logits"][:, :-1]})
    with pytest.raises(ValueError, match="share one vocabulary"):
        verify_tree(**{**case, "draft_probs": torch.rand(2, 4, 49)})
    with pytest.raises(ValueError, match="unknown kernel backend"):
        verify_tree(**case, backend="cuda")
    chains = chains_from_tree_case(case)
    with pytest.raises(ValueError, match="bonus_logits"):
        verify_chains(**{**chains, "bonus_logits": chains["bonus_logits"][:1]})
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        import os

        old = os.environ.pop("TRITON_INTERPRET")
        try:
            verify_chains(**chains, backend="triton")
        finally:
            os.environ["TRITON_INTERPRET"] = old


def test_strided_draft_probs_and_int32_offsets():
    """Review regressions: an expanded (stride-0) ``draft_probs`` must be read as the values
    it shows, and vLLM's int32 ``cu_num_draft_tokens`` must work (offsets are int64)."""
    case = make_case(11, 1, 4, 300, "chain", torch.float32, 1.0, True)
    chains = chains_from_tree_case(case)
    q_row = chains["draft_probs"][:1]
    chains["draft_probs"] = q_row.expand(4, 300)
    chains["draft_token_ids"] = torch.multinomial(q_row[0], 4, replacement=True,
                                                  generator=torch.Generator().manual_seed(1))
    chains["cu_num_draft_tokens"] = chains["cu_num_draft_tokens"].int()
    ref = verify_chains(**chains, backend="torch")
    tri = verify_chains(**chains, backend="triton")
    assert as_tuple(tri) == as_tuple(ref)
    case["draft_probs"] = q_row[None].expand(1, 4, 300)
    assert as_tuple(verify_tree(**case, backend="triton")) == \
        as_tuple(verify_tree(**case, backend="torch"))


def test_float32_uniforms_are_refused():
    case = make_case(0, 1, 2, 50, "chain", torch.float32, 1.0, False)
    with pytest.raises(ValueError, match="float64"):
        verify_tree(**{**case, "uniforms": case["uniforms"].float()})
