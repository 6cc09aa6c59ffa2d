"""Triton kernels for ``specplug.kernels.verify`` (imported only when the Triton backend runs).

Two stages, no host synchronisation between or inside them:

1. ``_row_stats_kernel``, one program per logits row (``B * (N + 1)`` for trees, ``T + B``
   for chains): one pass over the vocabulary gives the row's max and sum of
   ``exp(logit / T - max)`` (online, per lane, reduced at the end) and its argmax (first index
   on ties). Every row is independent, so this stage carries the parallelism over positions.
2. One program per batch row walks its tree or chain with scalar work per node: with the
   stats, ``p(x) = exp(logit[x] / T - max) / sum`` is a single load. Only a rejection
   (residual ``max(p - q, 0)``) or the final draw (inverse CDF) passes over the vocabulary
   again: at most ``2 * rejections + 1`` passes per row, and none at all when greedy.

The tree walk relies on the node order: children come after their parent and siblings in the
order they are to be tried, so one forward scan over the nodes visits, at each accepted node,
its children in order. A program only touches its own row's scratch (the residual) and outputs;
residual block elements are read and written by the lane that owns their offset, and a barrier
after the writes orders them before later reads by any lane (the scalar ``p(x)`` load), so
there are no races.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from specplug.kernels._dispatch import new_output
from specplug.kernels.verify import ChainVerifyOutput, TreeVerifyOutput

BLOCK_V = 1024


@triton.jit
def _row_stats_kernel(x_ptr, row_stride, V, inv_t, m_ptr, z_ptr, arg_ptr,
                      BLOCK_V: tl.constexpr):
    """Per row of ``x [R, V]``: max and sum of exp of ``x * inv_t``, and argmax of ``x``."""
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * row_stride
    offs = tl.arange(0, BLOCK_V)
    m_vec = tl.full([BLOCK_V], float("-inf"), tl.float32)
    z_vec = tl.zeros([BLOCK_V], tl.float32)
    best_val = tl.full([BLOCK_V], float("-inf"), tl.float32)
    best_idx = offs  # an all -inf row then reports index 0, as torch.argmax does
    for v0 in range(0, V, BLOCK_V):
        idx = v0 + offs
        x = tl.load(base + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
        take = x > best_val  # strict: the first index keeps a tie (per lane, idx grows)
        best_idx = tl.where(take, idx, best_idx)
        best_val = tl.where(take, x, best_val)
        s = x * inv_t
        new_m = tl.maximum(m_vec, s)
        alpha = tl.where(m_vec == new_m, 1.0, tl.exp(m_vec - new_m))
        z_vec = z_vec * alpha + tl.where(s == float("-inf"), 0.0, tl.exp(s - new_m))
        m_vec = new_m
    m = tl.max(m_vec, axis=0)
    z = tl.sum(tl.where(m_vec == float("-inf"), 0.0, z_vec * tl.exp(m_vec - m)), axis=0)
    top = tl.max(best_val, axis=0)
    arg = tl.min(tl.where(best_val == top, best_idx, 2147483647), axis=0)
    tl.store(m_ptr + row, m)
    tl.store(z_ptr + row, z)
    tl.store(arg_ptr + row, arg.to(tl.int64))


def _row_stats(x2d: torch.Tensor, inv_t: float
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x2d [R, V]`` (unit stride on V) -> max ``[R]`` fp32, sumexp ``[R]`` fp32, argmax
    ``[R]`` int64."""
    R, V = x2d.shape
    m = new_output((R,), torch.float32, x2d.device)
    z = new_output((R,), torch.float32, x2d.device)
    arg = new_output((R,), torch.int64, x2d.device)
    if R:
        _row_stats_kernel[(R,)](x2d, x2d.stride(0), V, inv_t, m, z, arg, BLOCK_V=BLOCK_V)
    return m, z, arg


@triton.jit
def _store_path(retr_ptr, acc_ptr, b, best, N, D, BLOCK_D: tl.constexpr):
    """``accepted[b, :] = retrieve[b, best, :]`` (all -1 when ``best < 0``)."""
    d = tl.arange(0, BLOCK_D)
    found = (tl.zeros([BLOCK_D], tl.int64) + best) >= 0
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + d
        path = tl.load(retr_ptr + (b * N + tl.maximum(best, 0)) * D + dd,
                       mask=(dd < D) & found, other=-1)
        tl.store(acc_ptr + b * D + dd, path, mask=dd < D)


@triton.jit
def _tree_greedy_kernel(tok_ptr, par_ptr, num_ptr, arg_ptr, anc_ptr, depth_ptr, retr_ptr,
                        acc_ptr, nacc_ptr, bonus_ptr, N, D, BLOCK_N: tl.constexpr,
                        BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per row: deepest node whose whole path matches the argmax (earliest of
    equally deep ones), read through the ancestor mask ``[B, N, N]``."""
    b = tl.program_id(0).to(tl.int64)
    n_real = tl.load(num_ptr + b)
    j = tl.arange(0, BLOCK_N)
    real_j = j < n_real
    tok = tl.load(tok_ptr + b * N + j, mask=real_j, other=-1)
    par = tl.load(par_ptr + b * N + j, mask=real_j, other=-1)
    pred = tl.load(arg_ptr + b * (N + 1) + par + 1, mask=real_j, other=-2)
    matched = (tok == pred) & real_j
    best_depth = tl.zeros([], tl.int64)
    best = tl.full([], -1, tl.int64)
    for i0 in range(0, N, BLOCK_I):
        i = i0 + tl.arange(0, BLOCK_I)
        real_i = i < n_real
        anc = tl.load(anc_ptr + (b * N + i[:, None]) * N + j[None, :],
                      mask=real_i[:, None] & (j[None, :] < N), other=0)
        bad = tl.max(((anc != 0) & ~matched[None, :]).to(tl.int32), axis=1)
        dep = tl.load(depth_ptr + b * N + i, mask=real_i, other=0)
        score = tl.where((bad == 0) & real_i, dep, 0)
        top = tl.max(score, axis=0)
        first = tl.min(tl.where(score == top, i, 2147483647), axis=0).to(tl.int64)
        better = top > best_depth  # strict: an earlier block keeps a tie
        best = tl.where(better, first, best)
        best_depth = tl.where(better, top, best_depth)
    tl.store(nacc_ptr + b, best_depth)
    tl.store(bonus_ptr + b, tl.load(arg_ptr + b * (N + 1) + best + 1))
    _store_path(retr_ptr, acc_ptr, b, best, N, D, BLOCK_D)


@triton.jit
def _dist_block(logit_row, m, z, inv_t, resid_row, total, fresh, idx, V):
    """The current distribution p on ``idx``: the slot's own softmax when ``fresh``, else the
    normalised residual."""
    if fresh:
        s = tl.load(logit_row + idx, mask=idx < V, other=float("-inf")).to(tl.float32) * inv_t
        p = tl.where(s == float("-inf"), 0.0, tl.exp(s - m) / z)
    else:
        p = tl.load(resid_row + idx, mask=idx < V, other=0.0) / total
    return p


@triton.jit
def _draft_block(q_row, x, idx, V, HAS_Q: tl.constexpr):
    """The distribution the draft token ``x`` was drawn from, on ``idx`` (one-hot if none)."""
    if HAS_Q:
        q = tl.load(q_row + idx, mask=idx < V, other=0.0).to(tl.float32)
    else:
        q = tl.where(idx == x, 1.0, 0.0)
    return q


@triton.jit
def _inverse_cdf(logit_row, m, z, inv_t, resid_row, total, fresh, u, V, q_row, x,
                 SUBTRACT_Q: tl.constexpr, HAS_Q: tl.constexpr, BLOCK_V: tl.constexpr):
    """Draw from the current distribution by inverse CDF: the first index whose running sum
    of weights exceeds ``u * mass`` (the last positive index if rounding overshoots).

    ``SUBTRACT_Q``: the weights are ``max(p - q, 0)`` (a chain's recovered token), or p itself
    if that residual vanished. Otherwise they are p unnormalised (``exp(s - m)`` or the
    residual), the same weights the torch reference sums."""
    offs = tl.arange(0, BLOCK_V)
    if SUBTRACT_Q:
        mass = tl.zeros([], tl.float32)
        for v0 in range(0, V, BLOCK_V):
            idx = v0 + offs
            p = _dist_block(logit_row, m, z, inv_t, resid_row, total, fresh, idx, V)
            mass += tl.sum(tl.maximum(p - _draft_block(q_row, x, idx, V, HAS_Q), 0.0), axis=0)
        use_q = mass > 1e-12  # RESIDUAL_EPS
        mass = tl.where(use_q, mass, 1.0)
        scale = tl.full([], 1.0, tl.float32)
    else:
        use_q = False
        scale = tl.where(fresh, z, total)
        mass = scale
    target = u * mass.to(tl.float64)  # float64 (u is): see the module docstring
    run = tl.zeros([], tl.float64)
    chosen = tl.full([], 2147483647, tl.int32)
    last_pos = tl.full([], -1, tl.int32)
    for v0 in range(0, V, BLOCK_V):
        idx = v0 + offs
        w = _dist_block(logit_row, m, z, inv_t, resid_row, total, fresh, idx, V) * scale
        if SUBTRACT_Q:
            w = tl.where(use_q, tl.maximum(w - _draft_block(q_row, x, idx, V, HAS_Q), 0.0), w)
        cs = run + tl.cumsum(w.to(tl.float64), axis=0)
        hit = tl.min(tl.where((cs > target) & (idx < V), idx, 2147483647), axis=0)
        chosen = tl.minimum(chosen, hit)
        last_pos = tl.maximum(last_pos, tl.max(tl.where(w > 0, idx, -1), axis=0))
        run += tl.sum(w.to(tl.float64), axis=0)
    return tl.minimum(chosen, last_pos).to(tl.int64)


@triton.jit
def _tree_sample_kernel(tok_ptr, par_ptr, num_ptr, logit_ptr, logit_stride, m_ptr, z_ptr,
                        q_ptr, u_ptr, bu_ptr, resid_ptr, retr_ptr, acc_ptr, nacc_ptr,
                        bonus_ptr, N, V, D, inv_t, HAS_Q: tl.constexpr,
                        BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per row: recursive rejection sampling over the tree in node order."""
    b = tl.program_id(0).to(tl.int64)
    n_real = tl.load(num_ptr + b)
    offs = tl.arange(0, BLOCK_V)
    resid_row = resid_ptr + b * V
    slot = tl.zeros([], tl.int64)  # 0 = root, i + 1 = node i
    fresh = tl.full([], 1, tl.int1)
    total = tl.full([], 1.0, tl.float32)
    best = tl.full([], -1, tl.int64)
    depth = tl.zeros([], tl.int64)
    for i in range(0, N):
        par = tl.load(par_ptr + b * N + i)
        if (i < n_real) & (par + 1 == slot):
            x = tl.load(tok_ptr + b * N + i)
            row = b * (N + 1) + slot
            logit_row = logit_ptr + row * logit_stride
            m = tl.load(m_ptr + row)
            z = tl.load(z_ptr + row)
            q_row = q_ptr + (b * N + i) * V
            if fresh:
                sx = tl.load(logit_row + x).to(tl.float32) * inv_t
                px = tl.exp(sx - m) / z
            else:
                px = tl.load(resid_row + x) / total
            qx = tl.load(q_row + x).to(tl.float32) if HAS_Q else tl.full([], 1.0, tl.float32)
            if tl.load(u_ptr + b * N + i) * qx.to(tl.float64) < px.to(tl.float64):
                best = best * 0 + i
                depth += 1
                slot = best + 1
                fresh = tl.full([], 1, tl.int1)
            else:  # p <- norm(max(p - q, 0)), unless that residual vanished
                mass = tl.zeros([], tl.float32)
                for v0 in range(0, V, BLOCK_V):
                    idx = v0 + offs
                    p = _dist_block(logit_row, m, z, inv_t, resid_row, total, fresh, idx, V)
                    q = _draft_block(q_row, x, idx, V, HAS_Q)
                    mass += tl.sum(tl.maximum(p - q, 0.0), axis=0)
                if mass > 1e-12:  # RESIDUAL_EPS
                    for v0 in range(0, V, BLOCK_V):
                        idx = v0 + offs
                        p = _dist_block(logit_row, m, z, inv_t, resid_row, total, fresh, idx,
                                        V)
                        q = _draft_block(q_row, x, idx, V, HAS_Q)
                        tl.store(resid_row + idx, tl.maximum(p - q, 0.0), mask=idx < V)
                    tl.debug_barrier()
                    total = mass
                    fresh = tl.full([], 0, tl.int1)
    row = b * (N + 1) + slot
    bonus = _inverse_cdf(logit_ptr + row * logit_stride, tl.load(m_ptr + row),
                         tl.load(z_ptr + row), inv_t, resid_row, total, fresh,
                         tl.load(bu_ptr + b), V, q_ptr, 0, False, False, BLOCK_V)
    tl.store(nacc_ptr + b, depth)
    tl.store(bonus_ptr + b, bonus)
    _store_path(retr_ptr, acc_ptr, b, best, N, D, BLOCK_D)


def _contiguous_rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def verify_tree_triton(tokens: torch.Tensor, parents: torch.Tensor, num_nodes: torch.Tensor,
                       target_logits: torch.Tensor, *, ancestors: torch.Tensor,
                       depth: torch.Tensor, retrieve: torch.Tensor, temperature: float = 0.0,
                       draft_probs: torch.Tensor | None = None,
                       uniforms: torch.Tensor | None = None,
                       bonus_uniforms: torch.Tensor | None = None) -> TreeVerifyOutput:
    """Triton ``verify_tree`` (contract in ``specplug.kernels.verify``)."""
    B, N = tokens.shape
    V = target_logits.shape[-1]
    D = retrieve.shape[-1]
    dev = tokens.device
    tokens, parents, num_nodes = (t.contiguous() for t in (tokens, parents, num_nodes))
    retrieve = retrieve.contiguous()
    logits = _contiguous_rows(target_logits.reshape(B * (N + 1), V))
    acc = new_output((B, D), torch.int64, dev)
    nacc = new_output((B,), torch.int64, dev)
    bonus = new_output((B,), torch.int64, dev)
    if B == 0:
        return TreeVerifyOutput(acc, nacc, bonus)
    block_d = max(16, triton.next_power_of_2(max(D, 1)))
    if temperature == 0.0:
        _, _, arg = _row_stats(logits, 1.0)
        _tree_greedy_kernel[(B,)](
            tokens, parents, num_nodes, arg, ancestors.contiguous(), depth.contiguous(),
            retrieve, acc, nacc, bonus, N, D, BLOCK_N=max(16, triton.next_power_of_2(N)),
            BLOCK_I=16, BLOCK_D=block_d)
    else:
        inv_t = 1.0 / temperature
        m, z, _ = _row_stats(logits, inv_t)
        has_q = draft_probs is not None
        # the kernel indexes q as dense [B * N, V]: any other strides (an expand) must be copied
        q = draft_probs.contiguous() if has_q else logits  # placeholder pointer if none
        resid = torch.empty(B, V, dtype=torch.float32, device=dev)  # scratch, written first
        _tree_sample_kernel[(B,)](
            tokens, parents, num_nodes, logits, logits.stride(0), m, z, q,
            uniforms.contiguous(), bonus_uniforms.contiguous(), resid, retrieve, acc, nacc,
            bonus, N, V, D, inv_t, HAS_Q=has_q, BLOCK_V=BLOCK_V, BLOCK_D=block_d)
    return TreeVerifyOutput(accepted_nodes=acc, num_accepted=nacc, bonus_tokens=bonus)


@triton.jit
def _chain_kernel(draft_ptr, cu_ptr, logit_ptr, logit_stride, bonus_ptr_l, bonus_stride,
                  m_ptr, z_ptr, arg_ptr, bm_ptr, bz_ptr, barg_ptr, q_ptr, u_ptr, bu_ptr,
                  out_ptr, nacc_ptr, max_spec_len, V, inv_t, GREEDY: tl.constexpr,
                  HAS_Q: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_OUT: tl.constexpr):
    """One program per row: walk its chain until the first rejection, then write vLLM's
    output row (accepted tokens, then the recovered or bonus token, then -1)."""
    b = tl.program_id(0).to(tl.int64)
    end = tl.load(cu_ptr + b)
    start = tl.where(b > 0, tl.load(cu_ptr + tl.maximum(b - 1, 0)), 0)
    n = end - start
    o = tl.arange(0, BLOCK_OUT)
    for o0 in range(0, max_spec_len + 1, BLOCK_OUT):
        tl.store(out_ptr + b * (max_spec_len + 1) + o0 + o, -1,
                 mask=o0 + o < max_spec_len + 1)
    tl.debug_barrier()
    live = tl.full([], 1, tl.int1)
    nacc = tl.zeros([], tl.int64)
    last = tl.zeros([], tl.int64)
    for j in range(0, max_spec_len):
        if live & (j < n):
            t = start + j
            x = tl.load(draft_ptr + t)
            if GREEDY:
                target = tl.load(arg_ptr + t)
                ok = target == x
                rec = target
            else:
                logit_row = logit_ptr + t * logit_stride
                m = tl.load(m_ptr + t)
                z = tl.load(z_ptr + t)
                px = tl.exp(tl.load(logit_row + x).to(tl.float32) * inv_t - m) / z
                qx = tl.load(q_ptr + t * V + x).to(tl.float32) if HAS_Q else tl.full([], 1.0, tl.float32)
                ok = tl.load(u_ptr + t) * qx.to(tl.float64) < px.to(tl.float64)
                rec = tl.zeros([], tl.int64)
                if ok == 0:
                    rec = _inverse_cdf(logit_row, m, z, inv_t, logit_row, 1.0, True,
                                       tl.load(bu_ptr + b), V, q_ptr + t * V, x, True, HAS_Q,
                                       BLOCK_V)
            if ok:
                tl.store(out_ptr + b * (max_spec_len + 1) + j, x)
                nacc += 1
            else:
                live = tl.full([], 0, tl.int1)
                last = rec
    if live:
        if GREEDY:
            last = tl.load(barg_ptr + b)
        else:
            last = _inverse_cdf(bonus_ptr_l + b * bonus_stride, tl.load(bm_ptr + b),
                                tl.load(bz_ptr + b), inv_t, bonus_ptr_l, 1.0, True,
                                tl.load(bu_ptr + b), V, q_ptr, 0, False, False, BLOCK_V)
    tl.store(out_ptr + b * (max_spec_len + 1) + nacc, last)
    tl.store(nacc_ptr + b, nacc)


def verify_chains_triton(draft_token_ids: torch.Tensor, cu_num_draft_tokens: torch.Tensor,
                         target_logits: torch.Tensor, bonus_logits: torch.Tensor, *,
                         max_spec_len: int, temperature: float = 0.0,
                         draft_probs: torch.Tensor | None = None,
                         uniforms: torch.Tensor | None = None,
                         bonus_uniforms: torch.Tensor | None = None) -> ChainVerifyOutput:
    """Triton ``verify_chains`` (contract in ``specplug.kernels.verify``)."""
    B = cu_num_draft_tokens.shape[0]
    V = bonus_logits.shape[-1]
    dev = draft_token_ids.device
    out = new_output((B, max_spec_len + 1), torch.int64, dev)
    nacc = new_output((B,), torch.int64, dev)
    if B == 0:
        return ChainVerifyOutput(out, nacc)
    greedy = temperature == 0.0
    inv_t = 1.0 if greedy else 1.0 / temperature
    t_logits = _contiguous_rows(target_logits)
    b_logits = _contiguous_rows(bonus_logits)
    m, z, arg = _row_stats(t_logits, inv_t)
    bm, bz, barg = _row_stats(b_logits, inv_t)
    has_q = draft_probs is not None
    q = draft_probs.contiguous() if has_q else t_logits  # indexed as dense [T, V]
    u = uniforms.contiguous() if uniforms is not None else m.double()
    bu = bonus_uniforms.contiguous() if bonus_uniforms is not None else bm.double()
    _chain_kernel[(B,)](
        draft_token_ids.contiguous(), cu_num_draft_tokens.contiguous(), t_logits,
        t_logits.stride(0), b_logits, b_logits.stride(0), m, z, arg, bm, bz, barg, q, u, bu,
        out, nacc, max_spec_len, V, inv_t, GREEDY=greedy, HAS_Q=has_q, BLOCK_V=BLOCK_V,
        BLOCK_OUT=max(16, min(1024, triton.next_power_of_2(max_spec_len + 1))))
    return ChainVerifyOutput(output_token_ids=out, num_accepted=nacc)


__all__ = ["verify_chains_triton", "verify_tree_triton"]
