"""Triton kernel for ``prepare_tree`` (imported only when the Triton backend is picked).

Grid ``(B, cdiv(N, BLOCK_I))``: a program owns ``BLOCK_I`` nodes of one row and every output
element of those nodes (their depth and position, their ``N``-wide ancestor row and their
``D``-wide path row), so programs never write the same element. Each node walks up its
parent chain in registers (the steps are gathers from the row's ``N`` parents, cache
resident): once to count its depth, once per ``BLOCK_J`` columns of its ancestor row (a tile
that starts as the diagonal and gets a bit per ancestor met), once per ``BLOCK_D`` slots of
its path row (the ancestor met after k steps fills slot ``depth - 1 - k``). Every tile is
stored whole, zeros and -1s included. A walk stops as soon as no node of the block can still
hit the tile: indices only decrease up the chain, and so do slots.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import new_output
from .tree_prep import TreePrep

BLOCK_I = 16  # nodes per program
MAX_BLOCK_J = 128  # ancestor-row columns per tile
MAX_BLOCK_D = 64  # path slots per tile


@triton.jit
def _up(row_ptr, cur):
    """The parent of every ``cur >= 0``: -1 past the root, and -1 for a parent outside
    ``[0, cur)`` (unvalidated CUDA input; the reference does the same)."""
    nxt = tl.load(row_ptr + cur, mask=cur >= 0, other=-1)
    return tl.where((nxt >= 0) & (nxt < cur), nxt, -1)


@triton.jit
def _tree_prep_kernel(parents_ptr, num_nodes_ptr, root_pos_ptr, depth_ptr, pos_ptr, anc_ptr,
                      ret_ptr, N, D, HAS_ROOT: tl.constexpr, BLOCK_I: tl.constexpr,
                      BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    in_n = rows < N
    real = in_n & (rows < tl.load(num_nodes_ptr + b))
    par_row = parents_ptr + b * N
    first = tl.load(par_row + rows, mask=real, other=-1)
    first = tl.where((first >= 0) & (first < rows), first, -1)
    out = b * N + rows  # flat (b, i) of the block's nodes

    depth = real.to(tl.int64)
    cur = first
    while tl.max(cur, 0) >= 0:
        depth += (cur >= 0).to(tl.int64)
        cur = _up(par_row, cur)
    root = tl.load(root_pos_ptr + b) if HAS_ROOT else 0
    tl.store(depth_ptr + out, depth, mask=in_n)
    tl.store(pos_ptr + out, root + depth, mask=in_n)

    for j0 in range(0, N, BLOCK_J):
        cols = j0 + tl.arange(0, BLOCK_J)
        tile = cols[None, :] == rows[:, None]
        cur = first
        while tl.max(cur, 0) >= j0:
            tile |= cols[None, :] == cur[:, None]
            cur = _up(par_row, cur)
        tl.store(anc_ptr + out[:, None] * N + cols[None, :], tile,
                 mask=in_n[:, None] & (cols < N)[None, :])

    for d0 in range(0, D, BLOCK_D):
        slots = d0 + tl.arange(0, BLOCK_D)
        tile = tl.where(slots[None, :] == (depth - 1)[:, None], rows[:, None].to(tl.int64), -1)
        cur = first
        slot = depth - 2  # the slot of cur; deeper than D: no slot, the path is cut at D
        while tl.max(slot, 0) >= d0:
            tile = tl.where(slots[None, :] == slot[:, None], cur[:, None], tile)
            cur = _up(par_row, cur)
            slot -= 1
        tl.store(ret_ptr + out[:, None] * D + slots[None, :], tile,
                 mask=in_n[:, None] & (slots < D)[None, :])


def prepare_tree_triton(parents: torch.Tensor, num_nodes: torch.Tensor,
                        root_positions: torch.Tensor | None, max_depth: int | None
                        ) -> TreePrep:
    """Launch ``_tree_prep_kernel`` (arguments already checked by ``prepare_tree``)."""
    B, N = parents.shape
    D = N if max_depth is None else max_depth
    dev = parents.device
    prep = TreePrep(depth=new_output((B, N), torch.long, dev),
                    positions=new_output((B, N), torch.long, dev),
                    ancestors=new_output((B, N, N), torch.bool, dev),
                    retrieve=new_output((B, N, D), torch.long, dev))
    if B == 0 or N == 0:
        return prep
    parents, num_nodes = parents.contiguous(), num_nodes.contiguous()
    has_root = root_positions is not None
    grid = (B, triton.cdiv(N, BLOCK_I))
    _tree_prep_kernel[grid](
        parents, num_nodes, root_positions.contiguous() if has_root else num_nodes,
        prep.depth, prep.positions, prep.ancestors, prep.retrieve, N, D,
        HAS_ROOT=has_root, BLOCK_I=BLOCK_I,
        BLOCK_J=min(MAX_BLOCK_J, triton.next_power_of_2(N)),
        BLOCK_D=min(MAX_BLOCK_D, triton.next_power_of_2(max(D, 1))))
    return prep
