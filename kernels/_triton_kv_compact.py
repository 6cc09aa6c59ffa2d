"""Triton kernel for ``compact_kv`` / ``compact_kv_layers`` (imported only when it runs).

Grid ``(B * H, n_buffers, cdiv(D, BLOCK_D))``: a program owns the columns of one (buffer, row,
head, D-block) and walks ``j = 0 .. num[b] - 1`` in order, copying slot ``src[b, j]`` to slot
``dst + j`` (skipping ``src[b, j] == dst + j``, already in place).

Why this is race-free although it works in place: programs touch disjoint columns, so only
the order inside one program matters. Parallel over ``j`` it would not be safe: with
``src = [dst + 1, dst + 2, ...]`` the program for ``j + 1`` writes slot ``dst + j + 1`` while
the one for ``j`` may not have read it yet. Walking ``j`` in order, the read of ``src[b, j]``
happens after the writes of slots ``dst + i`` for ``i < j``, and none of them is that slot:
``src[b, j] >= dst + j > dst + i``. So every read sees the old value, and a write can only
clobber a slot whose reads (at smaller ``j``) are done. Issuing loads earlier than program
order (prefetching later ``j``) stays correct for the same reason: no load ever depends on an
earlier store.

The buffers of one launch share dtype, shape and strides; their base addresses come from an
int64 table (``data_ptr()`` of each), cast to typed pointers in the kernel, so all layers' K
and V move in one launch instead of ``2 * layers``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["compact_kv_triton"]

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit(do_not_specialize=["dst"])
def _compact_kv_kernel(
    bases_ptr,       # [n_buffers] int64: address of element [0, 0, 0, 0] of each buffer
    src_ptr,         # [B, K] int64, contiguous
    num_ptr,         # [B] int64
    dst, H, D, K,
    stride_b, stride_h, stride_s, stride_d,  # element strides, shared by the buffers
    ELEM: tl.constexpr,     # element type of the buffers
    BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    buf = tl.load(bases_ptr + tl.program_id(1)).to(tl.pointer_type(ELEM))
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_d = cols < D
    slot0 = buf + b * stride_b + h * stride_h + cols.to(tl.int64) * stride_d  # [BLOCK_D]
    n = tl.minimum(tl.load(num_ptr + b), K)
    for j in range(0, n):  # in order: see the module docstring
        s = tl.load(src_ptr + b * K + j)
        if s != dst + j:
            x = tl.load(slot0 + s * stride_s, mask=in_d)
            tl.store(slot0 + (dst + j) * stride_s, x, mask=in_d)


def compact_kv_triton(buffers: list[torch.Tensor], dst: int, src: torch.Tensor,
                      num: torch.Tensor) -> None:
    """Launch ``_compact_kv_kernel`` once per group of buffers with the same dtype, shape and
    strides. ``src``: ``[B, K]`` int64 and ``num``: ``[B]`` int64 on the buffers' device,
    arguments already checked by ``compact_kv_layers``."""
    src, num = src.contiguous(), num.contiguous()
    groups: dict[tuple, list[torch.Tensor]] = {}
    for buf in buffers:
        if buf.dtype not in _TL_DTYPES:
            raise ValueError(f"the Triton compact_kv takes float32/bfloat16/float16 buffers, got "
                             f"{buf.dtype}: pass backend='torch' for other dtypes")
        groups.setdefault((buf.dtype, buf.shape, buf.stride()), []).append(buf)
    for (dtype, (B, H, _, D), strides), group in groups.items():
        if B * H * D == 0:
            continue
        block_d = min(triton.next_power_of_2(D), 256)
        grid = (B * H, len(group), triton.cdiv(D, block_d))
        _compact_kv_kernel[grid](_address_table(group), src, num, dst, H, D, src.shape[1],
                                 *strides, ELEM=_TL_DTYPES[dtype], BLOCK_D=block_d,
                                 num_warps=1 if block_d <= 128 else 2)


def _address_table(buffers: list[torch.Tensor]) -> torch.Tensor:
    """``[n]`` int64 base addresses of ``buffers`` on their device, copied without a host sync
    (pinned staging: the caching host allocator keeps it alive until the copy is done)."""
    table = torch.tensor([buf.data_ptr() for buf in buffers], dtype=torch.int64)
    if buffers[0].is_cuda:
        table = table.pin_memory().to(buffers[0].device, non_blocking=True)
    return table
