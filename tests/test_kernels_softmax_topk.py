"""softmax_topk: the Triton kernel (interpreted on CPU) against the torch reference, and the
reference against torch.softmax + torch.topk and a stable full sort (the tie rule)."""

from __future__ import annotations

import pytest
import torch

import specplug.kernels._triton_softmax_topk as triton_impl
from specplug.kernels.softmax_topk import MAX_K, softmax_topk, softmax_topk_reference

RTOL, ATOL = 1e-5, 1e-7
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _logits(M: int, V: int, dtype: torch.dtype, seed: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(M, V, generator=g) * scale).to(dtype)


def _stable_sort(logits: torch.Tensor, k: int, temperature: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The contract spelled out: a stable descending sort puts lower indices first on ties."""
    idx = torch.sort(logits.float(), dim=-1, descending=True, stable=True).indices[:, :k]
    return torch.softmax(logits.float() / temperature, dim=-1).gather(1, idx), idx


def _check(logits: torch.Tensor, k: int, temperature: float = 1.0) -> None:
    probs, idx = softmax_topk(logits, k, temperature, backend="triton")
    ref_probs, ref_idx = softmax_topk_reference(logits, k, temperature)
    assert probs.dtype == torch.float32 and idx.dtype == torch.int64
    assert probs.shape == idx.shape == (logits.shape[0], k)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(probs, ref_probs, rtol=RTOL, atol=ATOL)


def _case_grid() -> list[tuple[int, int, int, torch.dtype, float]]:
    """(M, V, k, dtype, temperature): every M x k for each small V, dtype and temperature
    rotating through the cases; a few cases at the real vocabulary sizes."""
    cases = []
    for V, ks in ((7, (1, 4, 7)), (1000, (1, 4, 16, 64))):
        for M in (1, 3, 17):
            for k in ks:
                n = len(cases)
                cases.append((M, V, k, DTYPES[n % 3], (1.0, 0.7)[n // 3 % 2]))
    cases += [(1, 49152, 64, torch.bfloat16, 0.7), (3, 49152, 16, torch.float32, 1.0),
              (17, 49152, 4, torch.float16, 0.7), (1, 131075, 16, torch.bfloat16, 1.0),
              (1, 262144, 4, torch.bfloat16, 0.7)]
    return cases


@pytest.mark.parametrize("M,V,k,dtype,temperature", _case_grid())
def test_kernel_matches_reference(M, V, k, dtype, temperature):
    _check(_logits(M, V, dtype, seed=M * 1_000_003 + V + k), k, temperature)


@pytest.mark.slow
@pytest.mark.parametrize("M,V,k,dtype", [(1, 131075, 64, torch.float32),
                                         (3, 262144, 16, torch.bfloat16)])
def test_kernel_matches_reference_large(M, V, k, dtype):
    _check(_logits(M, V, dtype, seed=V + k), k, 1.0)


def _tied(M: int, V: int, seed: int) -> torch.Tensor:
    """Rows full of ties: bf16 rounding of a narrow range, an all-equal row, signed zeros."""
    x = _logits(M, V, torch.bfloat16, seed, scale=0.05)
    x[0, :] = 0.5
    if M > 2:
        x[2, :] = 0.0
        x[2, ::3] = -0.0
    return x


@pytest.mark.parametrize("M,V,k", [(3, 1000, 16), (3, 1000, 64), (17, 1000, 4), (3, 49152, 16)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_ties_lower_index_first(M, V, k, temperature):
    x = _tied(M, V, seed=V + k)
    _check(x, k, temperature)
    _, ref_idx = softmax_topk_reference(x, k, temperature)
    assert torch.equal(ref_idx, _stable_sort(x, k, temperature)[1])
    assert ref_idx[0].tolist() == list(range(k))


@pytest.mark.parametrize("dtype", DTYPES)
def test_minus_inf_entries(dtype):
    g = torch.Generator().manual_seed(7)
    x = _logits(3, 1000, dtype, seed=7)
    x[torch.rand(3, 1000, generator=g) < 0.5] = float("-inf")
    x[2, :] = float("-inf")
    x[2, [900, 5]] = 1.0  # two finite logits, then -inf ones by lowest index
    _check(x, 16, 0.7)
    probs, idx = softmax_topk_reference(x, 16)
    assert idx[2, :4].tolist() == [5, 900, 0, 1] and probs[2, 2:].eq(0).all()


def test_many_chunks_and_tiles(monkeypatch):
    """Small tiles and few programs per row: several tiles per program, fully masked tiles,
    a ragged last tile, and a chunk count that is not a power of two."""
    monkeypatch.setattr(triton_impl, "TILE_MAX", 64)
    monkeypatch.setattr(triton_impl, "TARGET_PROGRAMS", 9)
    for k in (1, 5, 64):
        _check(_tied(3, 1000, seed=k), k)
        _check(_logits(3, 997, torch.float32, seed=k), k, 0.7)
    monkeypatch.setattr(triton_impl, "MAX_CHUNKS", 2)
    _check(_logits(1, 1000, torch.float32, seed=1), 16)


def test_strided_and_empty_batch():
    x = _logits(1000, 5, torch.float32, seed=3).t()  # [5, 1000], column stride 5
    _check(x, 4, 0.7)
    _check(_logits(4, 2000, torch.bfloat16, seed=4)[::2, ::2], 16)
    probs, idx = softmax_topk(torch.zeros(0, 10), 3, backend="triton")
    assert probs.shape == idx.shape == (0, 3)
    assert softmax_topk_reference(torch.zeros(0, 10), 3)[0].shape == (0, 3)


@pytest.mark.parametrize("V", [7, 1000, 131075, 262144])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_reference_matches_softmax_topk_without_ties(V, temperature):
    """On tie-free float32 logits the reference is softmax followed by topk."""
    g = torch.Generator().manual_seed(V)
    x = torch.stack([torch.randperm(V, generator=g).float() * (8.0 / V) for _ in range(3)])
    for k in (1, 4, min(V, MAX_K)):
        probs, idx = softmax_topk_reference(x, k, temperature)
        top = torch.topk(torch.softmax(x / temperature, dim=-1), k)
        assert torch.equal(idx, top.indices)
        torch.testing.assert_close(probs, top.values, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_matches_stable_sort(dtype):
    """The tie rule on tie-heavy rows of every kind, k up to V."""
    g = torch.Generator().manual_seed(11)
    rows = [_tied(3, 700, seed=11).to(dtype),
            torch.randint(-3, 3, (4, 700), generator=g).to(dtype),
            torch.where(torch.rand(2, 700, generator=g) < 0.9, float("-inf"), 1.0).to(dtype)]
    for x in rows:
        for k, t in ((1, 1.0), (7, 0.7), (64, 1.0)):
            probs, idx = softmax_topk_reference(x, k, t)
            want_probs, want_idx = _stable_sort(x, k, t)
            assert torch.equal(idx, want_idx)
            torch.testing.assert_close(probs, want_probs, rtol=RTOL, atol=ATOL)
    x = _tied(3, 40, seed=1)
    assert torch.equal(softmax_topk_reference(x, 40)[1], _stable_sort(x, 40, 1.0)[1])


def test_auto_backend_on_cpu_is_the_reference():
    x = _tied(3, 1000, seed=5)
    for got, want in zip(softmax_topk(x, 8), softmax_topk_reference(x, 8)):
        assert torch.equal(got, want)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN rows
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_errors(backend):
    x = torch.randn(2, 100)
    bad_args = [
        ((torch.randn(100), 4), ValueError, "2-D"),
        ((torch.randn(2, 3, 100), 4), ValueError, "2-D"),
        ((torch.zeros(2, 0), 1), ValueError, "empty vocabulary"),
        ((x.double(), 4), TypeError, "float32, bfloat16 or float16"),
        ((x, 0), ValueError, "1 <= k"),
        ((x, 101), ValueError, "1 <= k"),
        ((x, MAX_K + 1), ValueError, f"at most {MAX_K}"),
        ((x, 2.0), ValueError, "must be an int"),
        ((x, 4, 0.0), ValueError, "temperature"),
        ((x, 4, -1.0), ValueError, "temperature"),
    ]
    for args, exc, match in bad_args:
        with pytest.raises(exc, match=match):
            softmax_topk(*args, backend=backend)
    for value, exc, match in ((float("nan"), FloatingPointError, "NaN in the drafter"),
                              (float("inf"), FloatingPointError, r"\+inf in the drafter")):
        y = x.clone()
        y[1, 17] = value
        with pytest.raises(exc, match=match + r".*rows \[1\].*float32 or bfloat16"):
            softmax_topk(y, 4, backend=backend)
    y = x.clone()
    y[0] = float("-inf")
    with pytest.raises(ValueError, match=r"every logit of rows \[0\] is -inf"):
        softmax_topk(y, 4, backend=backend)
