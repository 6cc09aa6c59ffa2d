"""Triton kernels for ``specplug.kernels.softmax_topk`` (imported only when the Triton backend
runs).

Two launches, no host synchronisation:

1. ``_chunk_kernel``, grid ``(M, n_chunks)``: program ``(r, c)`` reads the tiles
   ``c, c + n_chunks, c + 2 n_chunks, ...`` of row ``r`` (``TILE`` logits each) once, keeping
   the online max and sum of ``exp(x / T - max)`` and its ``KP = next_pow2(k)`` largest keys
   so far. Per tile, one reduction counts the keys above the smallest kept one; that many
   (at most ``KP``) max-extractions move them in. After the first tiles few keys qualify, so
   the usual cost is a handful of reductions per tile. It writes ``KP`` keys (unordered), the
   max and the sum to its own slot of the scratch tensors.
2. ``_merge_kernel``, grid ``(M,)``: program ``r`` merges its row's ``n_chunks`` maxima and sums
   into the row's normaliser, extracts the ``k`` largest of its ``n_chunks * KP`` keys in
   order, and writes ``k`` probabilities and indices.

A key packs a logit and its position so that one integer comparison orders by value, then by
lower position: ``(sortable_int32(x) << 32) + (2**31 - 1 - position)``, where
``sortable_int32`` flips the magnitude bits of negative floats (and maps -0.0 to +0.0's key).
Keys are unique, so the selection is deterministic and ties follow the reference's rule. Each
program writes only its own slots, and the second launch starts after the first ends: no races.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from specplug.kernels._dispatch import new_output

#: logits per tile (a power of two); the tile is shrunk to ``next_pow2(V)`` for small vocabularies
TILE_MAX = 2048
#: at most this many programs share one row, so the merge reads at most ``64 * 64`` keys
MAX_CHUNKS = 64
#: the chunk count aims at about this many programs in all (``M * n_chunks``)
TARGET_PROGRAMS = 256

_LOW = tl.constexpr(2**31 - 1)
#: key of -inf at a position beyond every row: below every real key, whose low half is
#: ``2**31 - 1 - position >= 256`` (``V <= 2**31 - 256``). Masked-out and taken keys are
#: ``_GONE``; the chunk kernel's placeholders ``_NONE - i`` (``i < KP``) lie between the two.
_GONE = tl.constexpr(-2139095041 * 2**32)
_NONE = tl.constexpr(-2139095041 * 2**32 + 128)


@triton.jit
def _keys(x, pos):
    """float32 ``x`` and int64 positions -> int64 keys ordered by (x, -pos)."""
    bits = x.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    ordered = tl.where(x == 0.0, 0, ordered)
    return (ordered.to(tl.int64) << 32) + _LOW - pos


@triton.jit
def _key_value(key):
    """The float32 logit a key holds (-0.0 comes back as +0.0)."""
    ordered = (key >> 32).to(tl.int32)
    return (ordered ^ ((ordered >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _key_position(key):
    """The int64 vocabulary position a key holds."""
    return ((key >> 32) << 32) - key + _LOW


@triton.jit
def _chunk_kernel(x_ptr, stride_m, stride_v, V, temperature, n_chunks, tiles_per_chunk,
                  keys_ptr, max_ptr, sum_ptr, KP: tl.constexpr, TILE: tl.constexpr):
    """Program ``(r, c)``: top-``KP`` keys (unordered), max and sum of exp over chunk ``c`` of
    row ``r``."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    lanes = tl.arange(0, TILE)
    best = -tl.arange(0, KP).to(tl.int64) + _NONE  # distinct placeholders below every key
    floor = tl.min(best, 0)  # the smallest kept key: a tile key enters only above it
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.full((), 0.0, tl.float32)
    for t in range(tiles_per_chunk):
        pos = (t * n_chunks + chunk).to(tl.int64) * TILE + lanes
        inside = pos < V
        x = tl.load(x_ptr + row * stride_m + pos * stride_v, mask=inside,
                    other=float("-inf")).to(tl.float32)
        keys = tl.where(inside, _keys(x, pos), _GONE)
        # the tile's largest keys, largest first, each replacing the smallest kept key while
        # it is larger (usually only a few in later tiles: one reduction to count them)
        for _ in range(tl.minimum(tl.sum((keys > floor).to(tl.int32), 0), KP)):
            top = tl.max(keys, 0)
            best = tl.where((best == floor) & (top > floor), top, best)
            keys = tl.where(keys == top, _GONE, keys)
            floor = tl.min(best, 0)
        m_new = tl.maximum(m, tl.max(x, 0))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new / temperature)
        s = s * tl.exp(m / temperature - shift) + tl.sum(tl.exp(x / temperature - shift), 0)
        m = m_new
    slot = row * n_chunks + chunk
    tl.store(keys_ptr + slot * KP + tl.arange(0, KP), best)
    tl.store(max_ptr + slot, m)
    tl.store(sum_ptr + slot, s)


@triton.jit
def _merge_kernel(keys_ptr, max_ptr, sum_ptr, n_chunks, k, temperature, probs_ptr, idx_ptr,
                  KP: tl.constexpr, NCP: tl.constexpr):
    """Program ``r``: merge row ``r``'s chunks into its top-``k`` probabilities and indices."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, NCP)
    m_c = tl.load(max_ptr + row * n_chunks + c, mask=c < n_chunks, other=float("-inf"))
    s_c = tl.load(sum_ptr + row * n_chunks + c, mask=c < n_chunks, other=0.0)
    m = tl.max(m_c, 0)
    shift = tl.where(m == float("-inf"), 0.0, m / temperature)
    total = tl.sum(s_c * tl.exp(m_c / temperature - shift), 0)
    j = tl.arange(0, NCP * KP)
    keys = tl.load(keys_ptr + row * n_chunks * KP + j, mask=j < n_chunks * KP, other=_GONE)
    r = tl.arange(0, KP)
    top_k = tl.full([KP], _GONE, tl.int64)
    for i in range(k):  # k real keys are present: placeholders are never taken
        top = tl.max(keys, 0)
        top_k = tl.where(r == i, top, top_k)
        keys = tl.where(keys == top, _GONE, keys)
    probs = tl.exp(_key_value(top_k) / temperature - shift) / total
    tl.store(probs_ptr + row * k + r, probs, mask=r < k)
    tl.store(idx_ptr + row * k + r, _key_position(top_k), mask=r < k)


def softmax_topk_triton(logits: torch.Tensor, k: int, temperature: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch both kernels on validated ``logits [M, V]``; returns ``probs [M, k]`` float32 and
    ``indices [M, k]`` int64 (see ``softmax_topk``)."""
    M, V = logits.shape
    dev = logits.device
    probs = new_output((M, k), torch.float32, dev)
    indices = new_output((M, k), torch.int64, dev)
    if M == 0:
        return probs, indices
    kp = triton.next_power_of_2(k)
    tile = min(TILE_MAX, triton.next_power_of_2(V))  # >= kp: k <= V and k <= 64 <= TILE_MAX
    n_tiles = triton.cdiv(V, tile)
    n_chunks = max(1, min(n_tiles, MAX_CHUNKS, triton.cdiv(TARGET_PROGRAMS, M)))
    keys = new_output((M, n_chunks, kp), torch.int64, dev)
    maxes = new_output((M, n_chunks), torch.float32, dev)
    sums = new_output((M, n_chunks), torch.float32, dev)
    _chunk_kernel[(M, n_chunks)](logits, logits.stride(0), logits.stride(1), V, temperature,
                                 n_chunks, triton.cdiv(n_tiles, n_chunks), keys, maxes, sums,
                                 KP=kp, TILE=tile)
    _merge_kernel[(M,)](keys, maxes, sums, n_chunks, k, temperature, probs, indices,
                        KP=kp, NCP=triton.next_power_of_2(n_chunks))
    return probs, indices
