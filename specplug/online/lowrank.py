"""A low-rank residual adapter on the input of a drafter's LM head, with one independent set of
weights per slot (a request, or one shared slot).

``h -> h + B_s (A_s h)``, ``A_s [r, H]`` random, ``B_s [H, r]`` zero at the start, so a new
slot changes nothing until it is trained (as LoRA starts). It sits after every layer whose
keys and values a drafter caches, so training it never invalidates a cache.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["OutputAdapter"]


class OutputAdapter(nn.Module):
    """Per-slot low-rank residuals ``[H] -> [H]``.

    Args:
        dim: ``H``, the width of the LM head's input.
        rank: ``r``.
        seed: seeds ``A``; every slot starts from the same ``A`` (a request adapts the same
            way whichever slot it gets).
    """

    def __init__(self, dim: int, rank: int, seed: int = 0,
                 device: torch.device | str = "cpu"):
        super().__init__()
        self.dim, self.rank = dim, rank
        self.seed = seed
        self.device = torch.device(device)
        self.a = nn.ParameterList()
        self.b = nn.ParameterList()
        self.slot: int | list[int] | None = None  # what ``__call__`` applies (set by drafters)

    def reset(self, slots: int) -> None:
        """Fresh, untrained float32 weights on ``device`` for ``slots`` slots (previous slots
        are dropped). Created outside inference mode, so they can be trained from inside it."""
        with torch.inference_mode(False):
            g = torch.Generator().manual_seed(self.seed)
            a = (torch.randn(self.rank, self.dim, generator=g) / math.sqrt(self.dim)
                 ).to(self.device)
            self.a = nn.ParameterList(nn.Parameter(a.clone()) for _ in range(slots))
            self.b = nn.ParameterList(
                nn.Parameter(torch.zeros(self.dim, self.rank, device=self.device))
                for _ in range(slots))

    @property
    def num_slots(self) -> int:
        return len(self.a)

    def slot_parameters(self, slot: int) -> list[nn.Parameter]:
        return [self.a[slot], self.b[slot]]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``h [..., H]`` with ``self.slot`` an int (every row of ``h``), or ``h [B, n, H]``
        with ``self.slot`` a list of ``B`` slots (row b through slot ``slot[b]``; -1: none)."""
        slot = self.slot
        if slot is None or not self.num_slots:
            return h
        if isinstance(slot, int):
            if slot < 0:
                return h
            a, b = self.a[slot], self.b[slot]
            return h + ((h.to(a.dtype) @ a.T) @ b.T).to(h.dtype)
        out = []
        for r, s in enumerate(slot):
            row = h[r]
            out.append(row if s < 0 else row + ((row.to(self.a[s].dtype) @ self.a[s].T)
                                                @ self.b[s].T).to(row.dtype))
        return torch.stack(out)
