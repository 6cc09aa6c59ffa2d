"""Fused draft softmax + top-k: each draft node's ``k`` most likely children and their
probabilities, without writing the ``[M, V]`` probability tensor.

``softmax_topk(logits, k)`` returns ``softmax(logits.float() / temperature)`` at the ``k``
largest logits of each row, largest first, and their vocabulary indices. Among equal logits the
lower index comes first (bf16 logits tie often over 128k+ vocabularies), in both
implementations, so the Triton kernel and the torch reference return identical indices; their
probabilities agree to float rounding (different summation order).

The selection is made on the logits themselves (upcast to float32, which is exact), not on the
probabilities: two logits that differ can round to the same probability, never the reverse.

Rows holding NaN or +inf, or only -inf, have no distribution and raise an error. The Triton
path checks the top probability of each row after the kernel (its one host synchronisation;
such rows come out NaN), the reference checks the row maxima; the logits are scanned again
only to word the error. ``k`` is at most ``MAX_K`` (64) on both paths.
"""

from __future__ import annotations

import torch

from specplug.kernels._dispatch import pick_backend

__all__ = ["MAX_K", "softmax_topk", "softmax_topk_reference"]

#: largest ``k`` supported (each kernel program keeps ``next_pow2(k)`` keys in registers)
MAX_K = 64

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def softmax_topk(logits: torch.Tensor, k: int, temperature: float = 1.0,
                 backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` of ``softmax(logits.float() / temperature)`` per row, in one pass over ``V``.

    Args:
        logits: ``[M, V]`` float32, bfloat16 or float16 (any strides), no NaN.
        k: children per row, ``1 <= k <= min(V, MAX_K)``.
        temperature: ``> 0``; the probabilities are ``softmax(logits / temperature)``.
        backend: ``"triton"``, ``"torch"`` or ``"auto"``/None (see ``pick_backend``).

    Returns:
        ``(probs, indices)``: ``probs [M, k]`` float32, the probabilities at the ``k`` largest
        logits in descending order; ``indices [M, k]`` int64, their positions in ``V`` (lower
        index first among equal logits). Same device as ``logits``.

    Raises:
        ValueError: bad shape, ``k``, temperature, or a row whose logits are all -inf.
        TypeError: logits of another dtype.
        FloatingPointError: NaN or +inf logits.
    """
    _check_args(logits, k, temperature)
    if pick_backend(logits, backend=backend) == "torch":
        return _reference(logits, k, temperature)
    from specplug.kernels._triton_softmax_topk import softmax_topk_triton

    probs, indices = softmax_topk_triton(logits, k, float(temperature))
    _check_rows(logits, probs)
    return probs, indices


def softmax_topk_reference(logits: torch.Tensor, k: int, temperature: float = 1.0
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch ``softmax_topk`` (same arguments, results and errors, minus ``backend``).

    Exact tie rule without a full sort (``torch.topk`` leaves the order of equal values
    unspecified), and faster on CPU than ``softmax`` + ``torch.topk``: the ``k``-th largest of
    a row's chunk maxima (chunks of ``_CHUNK`` logits) is a floor at or below the row's
    ``k``-th largest logit, since those ``k`` maxima are ``k`` distinct logits at or above it.
    Every logit at or above the floor is a candidate (all ties included; usually a few ``k``,
    found in the chunks whose maximum reaches the floor). ``nonzero`` lists them in index
    order, so a stable sort by descending value ranks them by (value, lower index). Cost: a
    float32 copy unless the logits are contiguous float32 with ``V % 256 == 0``, one max pass
    and one exp-sum pass over ``V``.
    """
    _check_args(logits, k, temperature)
    return _reference(logits, k, temperature)


#: the reference's chunk length for its candidate floor (see ``softmax_topk_reference``)
_CHUNK = 256


def _reference(logits: torch.Tensor, k: int, temperature: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    M, V = logits.shape
    n_chunks = -(-V // _CHUNK)
    own = logits.dtype != torch.float32 or V % _CHUNK != 0 or not logits.is_contiguous()
    x = logits
    if own:  # one float32 copy, padded with -inf to whole chunks
        x = torch.empty(M, n_chunks * _CHUNK, device=logits.device)
        x[:, :V] = logits
        x[:, V:] = float("-inf")
    chunks = x.view(M, n_chunks, _CHUNK)
    chunk_max = chunks.amax(-1)  # [M, n_chunks]
    bad = ~(chunk_max.amax(-1).abs() < float("inf"))  # NaN or +inf inside, or only -inf
    if bad.any():
        _raise_for_rows(logits, bad.nonzero().flatten())
    if n_chunks >= k:
        floor = chunk_max.topk(k, dim=-1).values[:, -1:]
    else:
        floor = chunk_max.new_full((M, 1), float("-inf"))
    # candidates: row-major, so in index order within a row (-inf padding comes last)
    r, c = (chunk_max >= floor).nonzero(as_tuple=True)
    block = chunks[r, c]  # [chunks holding candidates, _CHUNK]
    b, j = (block >= floor[r]).nonzero(as_tuple=True)
    rows, cols, vals = r[b], c[b] * _CHUNK + j, block[b, j]
    order = vals.argsort(descending=True, stable=True)
    order = order[rows[order].argsort(stable=True)]  # by row, then value down, then index up
    counts = torch.bincount(rows, minlength=M)  # >= k per row
    pick = order[(counts.cumsum(0) - counts)[:, None] + torch.arange(k, device=x.device)]
    indices, top = cols[pick], vals[pick]
    top_z = top if temperature == 1.0 else top / temperature
    m = top_z[:, :1]  # the row max: the largest logit, divided like every other
    if temperature != 1.0:  # the candidates are gathered: a scratch x may now be overwritten
        x, own = (x.div_(temperature) if own else x / temperature), True
    shifted = x.sub_(m) if own else x - m
    probs = (top_z - m).exp_() / shifted.exp_().sum(-1, keepdim=True)
    return probs, indices


def _check_args(logits: torch.Tensor, k: int, temperature: float) -> None:
    if logits.dim() != 2:
        raise ValueError(f"softmax_topk: logits must be 2-D [M, V], got shape "
                         f"{tuple(logits.shape)}; add a row dimension with logits[None]")
    if logits.dtype not in _DTYPES:
        raise TypeError(f"softmax_topk: logits must be float32, bfloat16 or float16, got "
                        f"{logits.dtype}; convert them with .float()")
    V = logits.shape[1]
    if V == 0:
        raise ValueError("softmax_topk: empty vocabulary (logits have V = 0 columns)")
    if V > 2**31 - 256:
        raise ValueError(f"softmax_topk: vocabulary of {V} exceeds the 2**31 - 256 limit of "
                         "the kernel's 31-bit token positions")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= min(V, MAX_K):
        raise ValueError(f"softmax_topk: k must be an int with 1 <= k <= min(V, {MAX_K}) = "
                         f"{min(V, MAX_K)}, got {k!r}; clamp it with min(k, V)"
                         + ("" if V <= MAX_K else f" (at most {MAX_K} children are supported)"))
    if not (temperature > 0 and temperature < float("inf")):
        raise ValueError(f"softmax_topk: temperature must be a positive finite number, got "
                         f"{temperature!r}; greedy drafting uses temperature=1.0")


def _check_rows(logits: torch.Tensor, probs: torch.Tensor) -> None:
    """Raise if a row's top probability is NaN: its logits hold NaN or +inf, or only -inf."""
    bad = torch.isnan(probs[:, 0])
    if bad.any():
        _raise_for_rows(logits, bad.nonzero().flatten())


def _raise_for_rows(logits: torch.Tensor, rows: torch.Tensor) -> None:
    """Word the error for ``rows`` (int64 ``[R]``, R >= 1), whose logits hold NaN or +inf, or
    only -inf."""
    bad = logits[rows].float()
    if torch.isnan(bad).any() or torch.isposinf(bad).any():
        what = "NaN" if torch.isnan(bad).any() else "+inf"
        raise FloatingPointError(
            f"softmax_topk: {what} in the drafter's logits (rows {rows.tolist()}): the drafter "
            "produced non-finite scores (broken weights, or a dtype that overflows: use "
            "float32 or bfloat16)")
    raise ValueError(f"softmax_topk: every logit of rows {rows.tolist()} is -inf: there is no "
                     "token to draft; mask fewer tokens")
