"""Profile of the draft top-k step: unfused ``softmax`` + ``torch.topk`` against ``softmax_topk``.

Every expanded tree node needs its top-k children with their probabilities. Unfused, that is a
softmax over the vocabulary (read V logits, write V float32 probabilities) and a top-k (read
them again); fused, the logits are read once and only k values and indices are written. This
script times both on this machine's CPU (``softmax_topk`` runs its torch reference there) for
``[1, V]`` and ``[8, V]`` bfloat16 logits, V in {49152 (SmolLM2), 262144 (Gemma-3)}, and prints
the bytes each moves per call: the unfused pair and the CPU reference as torch runs them (every
pass over ``V`` counted, temporaries included), and the Triton kernel on a GPU.

    python benchmarks/profile_draft_topk.py [--k 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import timeit

import torch

from specplug.kernels.softmax_topk import softmax_topk_reference

CHUNK = 256  # the reference's chunk length (kernels/softmax_topk.py)


def unfused_bytes(M: int, V: int, s: int, k: int) -> int:
    """``logits.float()`` (read s, write 4 per logit, when s < 4), softmax (read 4 twice: max
    and exp-sum passes; write 4), topk (read 4), outputs (4 + 8 per pick)."""
    return M * (V * ((s + 4 if s < 4 else 0) + 8 + 4 + 4) + 12 * k)


def reference_bytes(M: int, V: int, s: int, k: int) -> int:
    """Upcast/pad copy (read s, write 4; skipped for float32 with V % 256 == 0), chunk maxima
    (read 4), ``(x - max).exp_().sum()`` (read 4, write 4, read 4 and write 4 in place, read 4),
    the candidate chunks (about ``k + 1`` of 256 logits, read 4), outputs."""
    copy = s + 4 if s < 4 or V % CHUNK else 0
    return M * (V * (copy + 4 + 20) + (k + 1) * CHUNK * 4 + 12 * k)


def kernel_bytes(M: int, V: int, s: int, k: int, n_chunks: int = 64) -> int:
    """The Triton kernel: logits once (s per logit), per chunk ``next_pow2(k)`` int64 keys and
    a float32 max and sum (written, then read by the merge), outputs."""
    kp = 1 << (k - 1).bit_length()
    return M * (V * s + 2 * n_chunks * (8 * kp + 8) + 12 * k)


def interleaved_medians(a, b, number: int, repeat: int) -> tuple[float, float]:
    """Seconds per call of ``a`` and ``b``: ``repeat`` runs of ``number`` calls each,
    alternating a, b, a, b (A/B interleaved, so drift hits both), median of each."""
    a(), b()
    ta, tb = [], []
    for _ in range(repeat):
        ta.append(timeit.timeit(a, number=number) / number)
        tb.append(timeit.timeit(b, number=number) / number)
    return statistics.median(ta), statistics.median(tb)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=4, help="children per node (default 4)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--number", type=int, default=20, help="calls per timing run")
    ap.add_argument("--repeat", type=int, default=7, help="interleaved timing runs; medians reported")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    k, dtype = args.k, torch.bfloat16
    s = torch.finfo(dtype).bits // 8
    print(f"draft top-k, k={k}, {dtype} logits, CPU, {args.threads} threads "
          f"(A/B interleaved, median of {args.repeat} x {args.number} calls)")
    print(f"{'M':>2} {'V':>7} | {'unfused us':>10} {'ref us':>8} {'speedup':>7} | "
          f"{'unfused MB':>10} {'ref MB':>7} {'kernel MB':>9}")
    for V in (49152, 262144):
        for M in (1, 8):
            x = (torch.randn(M, V) * 3).to(dtype)
            unfused, fused = interleaved_medians(
                lambda x=x: torch.topk(x.float().softmax(-1), k),
                lambda x=x: softmax_topk_reference(x, k), args.number, args.repeat)
            print(f"{M:>2} {V:>7} | {unfused * 1e6:>10.0f} {fused * 1e6:>8.0f} "
                  f"{unfused / fused:>6.2f}x | {unfused_bytes(M, V, s, k) / 1e6:>10.2f} "
                  f"{reference_bytes(M, V, s, k) / 1e6:>7.2f} "
                  f"{kernel_bytes(M, V, s, k) / 1e6:>9.2f}")


if __name__ == "__main__":
    main()
