"""Small building blocks of the heads: RMSNorm, residual block, rotary attention, SwiGLU MLP,
a decoder layer. Attention takes explicit keys/values so one code path serves training
(causal over a batch of sequences) and drafting (a frontier of tree nodes, each attending over
the committed context plus its own path)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RMSNorm", "ResBlock", "ResAttention", "Attention", "MLP", "DecoderLayer", "rope"]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)


class ResBlock(nn.Module):
    """Medusa's block: ``x + SiLU(W x + b)``, W initialised to zero (starts as the identity)."""

    def __init__(self, size: int):
        super().__init__()
        self.linear = nn.Linear(size, size)
        nn.init.zeros_(self.linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


class ResAttention(nn.Module):
    """Clover-2's cell (its ``ResAttentionBlock``): the hidden state queries one token.

    ``out = h + concat_j(cos(q_j, k_j) * v_j)`` per head ``j``, with ``q = W_q RMSNorm(h)``,
    ``k = W_k e``, ``v = W_v e`` (``e``: the token's embedding). With a single key there is
    nothing to softmax over, so the cosine gates the value. ``W_q``, ``W_k`` start near the
    identity and ``W_v`` near zero, so the cell starts as ``h``.
    """

    def __init__(self, hidden: int, heads: int, eps: float):
        super().__init__()
        self.heads, self.eps = heads, eps
        self.input_layernorm = RMSNorm(hidden, eps)
        self.q = nn.Linear(hidden, hidden)
        self.k = nn.Linear(hidden, hidden)
        self.v = nn.Linear(hidden, hidden)
        with torch.no_grad():
            for lin, eye in ((self.q, True), (self.k, True), (self.v, False)):
                nn.init.uniform_(lin.weight, 0.0, 0.01)
                if eye:
                    lin.weight += torch.eye(hidden)
                nn.init.zeros_(lin.bias)

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        shape = (*h.shape[:-1], self.heads, -1)
        q = self.q(self.input_layernorm(h)).view(shape)
        k, v = self.k(e).view(shape), self.v(e).view(shape)
        gate = F.cosine_similarity(q, k, dim=-1, eps=self.eps)[..., None]
        return h + (gate * v).flatten(-2)


def rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate ``x [..., T, nh, hd]`` by positions ``pos [..., T]`` (half-split, as Llama)."""
    hd = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=x.device) / hd))
    ang = pos.to(torch.float32)[..., None] * inv  # [..., T, hd/2]
    cos = torch.cat([ang.cos(), ang.cos()], -1)[..., None, :].to(x.dtype)
    sin = torch.cat([ang.sin(), ang.sin()], -1)[..., None, :].to(x.dtype)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Attention(nn.Module):
    """Multi-head attention with rotary positions; keys/values may come from another input.

    ``x [N, Tq, H]`` with positions ``[N, Tq]`` attends over ``k, v [N, Tk, nkv, hd]`` (from
    ``keys_values``) under ``mask [N, Tq, Tk]`` (True = may attend; None = all). Grouped
    key/value heads (``kv_heads < heads``) as in Llama.
    """

    def __init__(self, hidden: int, heads: int, theta: float, kv_heads: int | None = None,
                 head_dim: int | None = None):
        super().__init__()
        if head_dim is None:
            if hidden % heads:
                raise ValueError(f"hidden size {hidden} is not divisible by {heads} attention "
                                 "heads; set head_dim")
            head_dim = hidden // heads
        kv_heads = kv_heads or heads
        if heads % kv_heads:
            raise ValueError(f"{heads} attention heads are not a multiple of {kv_heads} "
                             "key/value heads")
        self.heads, self.kv_heads, self.head_dim, self.theta = heads, kv_heads, head_dim, theta
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)

    def keys_values(self, x: torch.Tensor, pos: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [N, T, H]``, ``pos [N, T]`` -> rotated keys and values ``[N, T, nkv, hd]``."""
        shape = (*x.shape[:-1], self.kv_heads, self.head_dim)
        return rope(self.k_proj(x).view(shape), pos, self.theta), self.v_proj(x).view(shape)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        N, Tq, _ = x.shape
        q = rope(self.q_proj(x).view(N, Tq, self.heads, self.head_dim), pos, self.theta)
        rep = self.heads // self.kv_heads
        if rep > 1:
            k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=None if mask is None else mask[:, None])
        return self.o_proj(out.transpose(1, 2).reshape(N, Tq, -1))


class MLP(nn.Module):
    """SwiGLU MLP (as Llama's)."""

    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer. ``input_norm=False`` is EAGLE's first layer (its input is a
    projection of already-normed features)."""

    def __init__(self, hidden: int, heads: int, inner: int, theta: float, eps: float,
                 input_norm: bool = True, kv_heads: int | None = None,
                 head_dim: int | None = None):
        super().__init__()
        self.input_layernorm = RMSNorm(hidden, eps) if input_norm else nn.Identity()
        self.self_attn = Attention(hidden, heads, theta, kv_heads, head_dim)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.mlp = MLP(hidden, inner)

    def keys_values(self, x: torch.Tensor, pos: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.self_attn.keys_values(self.input_layernorm(x), pos)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x [N, T, H]`` attends over ``k, v [N, Tk, nh, hd]`` (which must already include
        the keys/values of ``x`` itself, from ``keys_values``)."""
        h = x + self.self_attn(self.input_layernorm(x), pos, k, v, mask)
        return h + self.mlp(self.post_attention_layernorm(h))

    def causal(self, x: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor | None = None
               ) -> torch.Tensor:
        """Training form: ``x [B, T, H]`` attends causally to itself (``valid [B, T]`` masks
        padding keys)."""
        k, v = self.keys_values(x, pos)
        T = x.shape[1]
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()[None]
        if valid is not None:
            mask = mask & valid[:, None, :] | torch.eye(T, dtype=torch.bool, device=x.device)
        return self(x, pos, k, v, mask.expand(x.shape[0], T, T))
