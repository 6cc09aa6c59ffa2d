"""compact_kv / compact_kv_layers: the Triton kernel (interpreted on CPU) against the torch
reference, the reference against a plain python loop, and the argument checks.

The op works in place, so output poisoning does not apply: caches start random (with NaN,
inf and -0.0 sprinkled in, to see bits copied rather than values), and every comparison is
bit-exact over the whole buffer, so untouched slots must keep their bits.
"""

from __future__ import annotations

import itertools
import zlib

import pytest
import torch

from specplug.kernels import _triton_kv_compact
from specplug.kernels.kv_compact import compact_kv, compact_kv_layers
from specplug.runner import TreeKVCache

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(BITS[t.dtype])


def random_cache(shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator
                 ) -> torch.Tensor:
    cache = torch.randn(shape, generator=g).to(dtype)
    flat = cache.view(-1)
    picks = torch.randint(0, flat.numel(), (3,), generator=g)
    flat[picks] = torch.tensor([float("nan"), float("inf"), -0.0], dtype=dtype)
    return cache


def make_move(B: int, K: int, S: int, pattern: str, g: torch.Generator
              ) -> tuple[int, torch.Tensor, torch.Tensor]:
    """``dst, src [B, K], num [B]``: ragged num (a 0 row when B > 1), garbage past num."""
    num = torch.tensor([K, 0, K // 2, max(K - 1, 0)][:B]) if B > 1 else torch.tensor([K])
    shift = 1 if pattern == "shifted" else 0
    dst = int(torch.randint(0, S - K - shift + 1, (1,), generator=g))
    j = torch.arange(K)
    if pattern == "sparse":
        src = torch.stack([torch.randperm(S - dst, generator=g)[:K].sort().values + dst
                           for _ in range(B)])
    else:  # shifted: every slot moves one left (the race-prone case); identity: none moves
        src = (dst + shift + j).expand(B, K).clone()
    src = torch.where(j < num[:, None], src, torch.randint(-S, 2 * S, (B, K), generator=g))
    return dst, src, num


def brute_force(cache: torch.Tensor, dst: int, src: torch.Tensor, num: torch.Tensor
                ) -> torch.Tensor:
    out = cache.clone()
    for b in range(cache.shape[0]):
        for j in range(int(num[b])):
            out[b, :, dst + j] = cache[b, :, int(src[b, j])]
    return out


def case_seed(*params: object) -> int:
    return zlib.crc32(repr(params).encode())


# every shape and move pattern in bfloat16, then every dtype over the larger shapes (the dtype
# only changes the element type the kernel casts its addresses to)
GRID = [(B, H, D, S, "bf16", K, pattern) for B, H, D, S, K, pattern in itertools.product(
    [1, 4], [1, 3], [8, 64, 80], [16, 300], [0, 1, 5, 17], ["shifted", "identity", "sparse"])
    if K < S]
GRID += [(4, 3, D, 300, dtype, K, pattern) for dtype, D, K, pattern in itertools.product(
    ["fp32", "fp16"], [64, 80], [1, 17], ["shifted", "identity", "sparse"])]


@pytest.mark.parametrize("B,H,D,S,dtype,K,pattern", GRID)
def test_triton_matches_reference(B, H, D, S, dtype, K, pattern):
    g = torch.Generator().manual_seed(case_seed(B, H, D, S, dtype, K, pattern))
    cache = random_cache((B, H, S, D), DTYPES[dtype], g)
    dst, src, num = make_move(B, K, S, pattern, g)
    want = brute_force(cache, dst, src, num)
    ref, tri = cache.clone(), cache.clone()
    compact_kv(ref, dst, src, num, backend="torch")
    compact_kv(tri, dst, src, num, backend="triton")
    assert torch.equal(bits(ref), bits(want))
    assert torch.equal(bits(tri), bits(want))
    written = torch.zeros(B, S, dtype=torch.bool)
    for b in range(B):
        written[b, dst:dst + int(num[b])] = True
    untouched = ~written[:, None, :, None].expand_as(cache)
    assert torch.equal(bits(tri)[untouched], bits(cache)[untouched])


def test_layers_one_launch_per_layout(monkeypatch):
    """Mixed buffers (head dims, dtypes, a permuted and a sliced view) against the brute force;
    buffers of one dtype, shape and strides share a launch."""
    g = torch.Generator().manual_seed(7)
    B, H, S = 3, 2, 40
    buffers = [random_cache((B, H, S, 64), torch.bfloat16, g) for _ in range(4)]   # 4 K
    buffers += [random_cache((B, H, S, 80), torch.bfloat16, g) for _ in range(4)]  # 4 V
    buffers.append(random_cache((B, S, H, 16), torch.float16, g).permute(0, 2, 1, 3))
    buffers.append(random_cache((B, H, S + 9, 16), torch.float32, g)[:, :, 5:S + 5])
    dst, src, num = make_move(B, 6, S, "sparse", g)
    wants = [brute_force(buf, dst, src, num) for buf in buffers]
    launches = []
    table = _triton_kv_compact._address_table
    monkeypatch.setattr(_triton_kv_compact, "_address_table",
                        lambda group: launches.append(len(group)) or table(group))
    compact_kv_layers(buffers, dst, src, num, backend="triton")
    assert sorted(launches) == [1, 1, 4, 4]
    for buf, want in zip(buffers, wants):
        assert torch.equal(bits(buf), bits(want))


def test_tree_kv_cache_move_ignores_padding():
    """The runner's wiring: padded src entries (here below dst + j) are not moved."""
    g = torch.Generator().manual_seed(3)
    cache = TreeKVCache(capacity=12)
    for layer in range(2):
        cache.keys[layer] = random_cache((2, 2, 12, 8), torch.float32, g)
        cache.values[layer] = random_cache((2, 2, 12, 8), torch.float32, g)
    src, num = torch.tensor([[6, 8, 9], [6, 6, 6]]), torch.tensor([3, 1])
    bufs = [*cache.keys.values(), *cache.values.values()]
    wants = [brute_force(buf, 5, src, num) for buf in bufs]
    cache.move(5, src, num)
    for buf, want in zip(bufs, wants):
        assert torch.equal(bits(buf), bits(want))


def _args(**over):
    args = dict(cache=torch.zeros(2, 1, 10, 4), dst=2, src=torch.tensor([[2, 4], [3, 9]]),
                num=torch.tensor([2, 2]))
    args.update(over)
    return args


@pytest.mark.parametrize("over,match", [
    (dict(src=torch.tensor([[4, 3], [3, 9]])), r"row 0 of src is not strictly increasing"),
    (dict(src=torch.tensor([[2, 4], [5, 5]])), r"row 1 of src is not strictly increasing"),
    (dict(src=torch.tensor([[2, 4], [1, 9]])), r"src\[1, 0\] = 1 < dst \+ j = 2"),
    (dict(src=torch.tensor([[2, 2], [3, 9]])), r"src\[0, 1\] = 2 < dst \+ j = 3"),
    (dict(src=torch.tensor([[2, 4], [3, 10]])), r"src\[1, 1\] = 10 is past the last slot"),
    (dict(dst=9), r"dst \+ K = 9 \+ 2 is past the 10 slots of cache"),
    (dict(dst=-1), r"dst must be an int >= 0"),
    (dict(num=torch.tensor([2, 3])), r"num must lie in \[0, K\] = \[0, 2\]"),
    (dict(num=torch.tensor([2])), r"num must be a \[B\] = \[2\] int64 tensor"),
    (dict(num=torch.tensor([2, 2], dtype=torch.int32)), r"num must be a \[B\] = \[2\] int64"),
    (dict(src=torch.tensor([2, 4])), r"src must be a \[B, K\] int64 tensor"),
    (dict(src=torch.tensor([[2, 4], [3, 9]], dtype=torch.int32)), r"use \.long\(\)"),
    (dict(cache=torch.zeros(3, 1, 10, 4)), r"cache must be a \[B, H, S, D\] tensor with B = 2"),
    (dict(cache=torch.zeros(2, 10, 4)), r"cache must be a \[B, H, S, D\] tensor"),
])
def test_bad_arguments(over, match):
    with pytest.raises(ValueError, match=match):
        compact_kv(**_args(**over))


def test_padding_entries_are_not_checked():
    args = _args(src=torch.tensor([[2, 4], [3, -7]]), num=torch.tensor([2, 1]))
    compact_kv(**args)


def test_layers_bad_arguments():
    a, b = torch.zeros(2, 1, 10, 4), torch.zeros(2, 1, 8, 4)
    src, num = torch.tensor([[2, 9], [3, 4]]), torch.tensor([2, 2])
    with pytest.raises(ValueError, match=r"src\[0, 1\] = 9 is past the last slot S - 1 = 7"):
        compact_kv_layers([a, b], 2, src, num)
    with pytest.raises(ValueError, match=r"buffers\[1\] and buffers\[0\] share memory"):
        compact_kv_layers([a, a], 2, src, num)
    with pytest.raises(ValueError, match=r"the Triton compact_kv takes float32"):
        compact_kv_layers([a.to(torch.int8)], 2, src, num, backend="triton")
