"""Compile every specplug Triton kernel for a real GPU target, without a GPU.

Triton's interpreter (what the unit tests run) is lenient about types and constexpr use; the
compiler is not. The triton wheel ships its NVIDIA backend and ptxas, so each kernel can be
lowered to a cubin for sm_90 (H100) on a CPU-only machine. Run it without TRITON_INTERPRET:

    python tests/compile_kernels.py [sm]        # prints one line per kernel variant

``tests/test_kernels_compile.py`` runs it in a subprocess.
"""

from __future__ import annotations

import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("unset TRITON_INTERPRET: the interpreter does not compile kernels")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from specplug.kernels import _triton_kv_compact as tk  # noqa: E402
from specplug.kernels import _triton_softmax_topk as ts  # noqa: E402
from specplug.kernels import _triton_tree_prep as tt  # noqa: E402
from specplug.kernels import _triton_verify as tv  # noqa: E402

I64, F32 = "*i64", "*fp32"

# (kernel, {argument: type}, [constexpr variants]); logits pointers are bf16 in some entries
# so both float paths are exercised.
KERNELS = [
    (tv._row_stats_kernel,
     dict(x_ptr="*bf16", row_stride="i32", V="i32", inv_t="fp32", m_ptr=F32, z_ptr=F32,
          arg_ptr=I64),
     [dict(BLOCK_V=1024)]),
    (tv._tree_greedy_kernel,
     dict(tok_ptr=I64, par_ptr=I64, num_ptr=I64, arg_ptr=I64, anc_ptr="*i1", depth_ptr=I64,
          retr_ptr=I64, acc_ptr=I64, nacc_ptr=I64, bonus_ptr=I64, N="i32", D="i32"),
     [dict(BLOCK_N=64, BLOCK_I=16, BLOCK_D=16)]),
    (tv._tree_sample_kernel,
     dict(tok_ptr=I64, par_ptr=I64, num_ptr=I64, logit_ptr="*bf16", logit_stride="i32",
          m_ptr=F32, z_ptr=F32, q_ptr=F32, u_ptr=F32, bu_ptr=F32, resid_ptr=F32, retr_ptr=I64,
          acc_ptr=I64, nacc_ptr=I64, bonus_ptr=I64, N="i32", V="i32", D="i32", inv_t="fp32"),
     [dict(HAS_Q=q, BLOCK_V=1024, BLOCK_D=16) for q in (True, False)]),
    (tv._chain_kernel,
     dict(draft_ptr=I64, cu_ptr=I64, logit_ptr=F32, logit_stride="i32", bonus_ptr_l=F32,
          bonus_stride="i32", m_ptr=F32, z_ptr=F32, arg_ptr=I64, bm_ptr=F32, bz_ptr=F32,
          barg_ptr=I64, q_ptr=F32, u_ptr=F32, bu_ptr=F32, out_ptr=I64, nacc_ptr=I64,
          max_spec_len="i32", V="i32", inv_t="fp32"),
     [dict(GREEDY=g, HAS_Q=q, BLOCK_V=1024, BLOCK_OUT=16) for g in (True, False)
      for q in (True, False)]),
    (tk._compact_kv_kernel,
     dict(bases_ptr=I64, src_ptr=I64, num_ptr=I64, dst="i32", H="i32", D="i32", K="i32",
          stride_b="i64", stride_h="i64", stride_s="i64", stride_d="i64"),
     [dict(ELEM=tl.bfloat16, BLOCK_D=128), dict(ELEM=tl.float32, BLOCK_D=256)]),
    (tt._tree_prep_kernel,
     dict(parents_ptr=I64, num_nodes_ptr=I64, root_pos_ptr=I64, depth_ptr=I64, pos_ptr=I64,
          anc_ptr="*i1", ret_ptr=I64, N="i32", D="i32"),
     [dict(HAS_ROOT=h, BLOCK_I=16, BLOCK_J=128, BLOCK_D=64) for h in (True, False)]),
    (ts._chunk_kernel,
     dict(x_ptr="*bf16", stride_m="i32", stride_v="i32", V="i32", temperature="fp32",
          n_chunks="i32", tiles_per_chunk="i32", keys_ptr=I64, max_ptr=F32, sum_ptr=F32),
     [dict(KP=kp, TILE=2048) for kp in (1, 4, 64)]),
    (ts._merge_kernel,
     dict(keys_ptr=I64, max_ptr=F32, sum_ptr=F32, n_chunks="i32", k="i32", temperature="fp32",
          probs_ptr=F32, idx_ptr=I64),
     [dict(KP=kp, NCP=64) for kp in (1, 4, 64)]),
]


def main() -> int:
    sm = int(sys.argv[1]) if len(sys.argv) > 1 else 90
    target = GPUTarget("cuda", sm, 32)
    failed = 0
    for kernel, args, variants in KERNELS:
        for constexprs in variants:
            sig = {**args, **{k: "constexpr" for k in constexprs}}
            src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=constexprs)
            name = f"{kernel.fn.__name__}{constexprs}"
            try:
                compiled = triton.compile(src, target=target)
                print(f"ok   {name}: {len(compiled.asm['cubin'])} bytes of sm_{sm} cubin")
            except Exception as err:  # report every kernel, then fail
                failed += 1
                print(f"FAIL {name}: {type(err).__name__}: {err}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
