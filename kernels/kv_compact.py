"""KV-cache compaction: move each row's kept speculative slots left, in order, in place.

After verification a row keeps ``num[b]`` of the speculative slots (the accepted path); they
move to ``dst, dst + 1, ...`` (the end of the committed region), so that the next step writes
after them. One call applies the same move to every layer's K and V buffers.

Shapes: a buffer is ``[B, H, S, D]`` (rows, KV heads, slots, head dim; any strides, e.g. a
slice or a permuted view, but no two elements may share memory); ``src`` is ``[B, K]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._dispatch import pick_backend

__all__ = ["compact_kv", "compact_kv_layers", "compact_kv_layers_reference",
           "compact_kv_reference"]


def compact_kv(cache: torch.Tensor, dst: int, src: torch.Tensor, num: torch.Tensor,
               backend: str | None = None) -> None:
    """Move kept slots left in place (Triton on CUDA, torch otherwise): per row b and
    ``j < num[b]``, ``cache[b, :, dst + j] = (old) cache[b, :, src[b, j]]``. Every other slot
    keeps its bits, including ``dst + j`` for ``j >= num[b]``.

    Args:
        cache: ``[B, H, S, D]`` float32 / bfloat16 / float16 (the torch backend takes any dtype),
            any strides.
        dst: first slot to write, an int with ``dst + K <= S``.
        src: ``[B, K]`` int64, on the CPU or on ``cache``'s device. Over a row's first ``num[b]``
            entries: strictly increasing, ``src[b, j] >= dst + j`` (entries only move left) and
            ``< S``. Entries ``j >= num[b]`` are ignored (any value).
        num: ``[B]`` int64 in ``[0, K]``, on ``src``'s device.
        backend: ``"auto"`` / ``"torch"`` / ``"triton"`` (see ``pick_backend``).

    Raises:
        ValueError: bad shapes, dtypes or devices, ``dst + K > S``, and, when ``src`` and ``num``
            are CPU tensors (checking them costs no device synchronisation), entries that break
            the order above or ``num`` out of range. On the GPU they are the caller's promise
            (checking would synchronise): a broken order leaves unspecified contents in slots
            ``[dst, dst + K)``, and a used ``src`` outside ``[0, S)`` accesses out of bounds.
    """
    _compact([cache], ["cache"], dst, src, num, backend)


def compact_kv_layers(buffers: Sequence[torch.Tensor], dst: int, src: torch.Tensor,
                      num: torch.Tensor, backend: str | None = None) -> None:
    """``compact_kv`` applied to every buffer (all layers' K and V), in place.

    The buffers share ``B`` and device; each is ``[B, H, S, D]`` with its own ``H``, ``S``,
    ``D``, dtype and strides (a model's K and V may differ in head dim). The Triton backend
    moves all buffers of one dtype, shape and strides in a single launch (one launch per
    model in the usual case), reading their base addresses from a small table. Raises as
    ``compact_kv`` does, and when a buffer appears twice (a second pass would move the
    already-moved slots again).
    """
    buffers = list(buffers)
    _compact(buffers, [f"buffers[{i}]" for i in range(len(buffers))], dst, src, num, backend)


def compact_kv_reference(cache: torch.Tensor, dst: int, src: torch.Tensor, num: torch.Tensor
                         ) -> None:
    """Plain-torch ``compact_kv`` (no checks): one indexed read of the K source slots of every
    row, then one write of slots ``[dst, dst + K)``; a row's unused entries read their own
    slot, which writes the same bits back. (Indexing rather than ``torch.gather``, which on
    CPU rewrites bfloat16 NaN payloads: a copy must keep every bit.)"""
    K = src.shape[1]
    src, num = src.to(cache.device), num.to(cache.device)
    j = torch.arange(K, device=cache.device)
    idx = torch.where(j < num[:, None], src, dst + j)                       # [B, K]
    rows = torch.arange(cache.shape[0], device=cache.device)[:, None]       # [B, 1]
    cache[:, :, dst:dst + K] = cache.transpose(1, 2)[rows, idx].transpose(1, 2)


def compact_kv_layers_reference(buffers: Sequence[torch.Tensor], dst: int, src: torch.Tensor,
                                num: torch.Tensor) -> None:
    """Plain-torch ``compact_kv_layers``: ``compact_kv_reference`` on each buffer."""
    for buf in buffers:
        compact_kv_reference(buf, dst, src, num)


def _compact(buffers: list[torch.Tensor], names: list[str], dst: int, src: torch.Tensor,
             num: torch.Tensor, backend: str | None) -> None:
    _check_args(buffers, names, dst, src, num)
    if not buffers or src.numel() == 0:
        return
    device = buffers[0].device
    src, num = src.to(device, non_blocking=True), num.to(device, non_blocking=True)
    if pick_backend(*buffers, backend=backend) == "torch":
        compact_kv_layers_reference(buffers, dst, src, num)
        return
    from ._triton_kv_compact import compact_kv_triton

    compact_kv_triton(buffers, dst, src, num)


def _check_args(buffers: list[torch.Tensor], names: list[str], dst: int, src: torch.Tensor,
                num: torch.Tensor) -> None:
    if isinstance(dst, bool) or not isinstance(dst, int) or dst < 0:
        raise ValueError(f"dst must be an int >= 0 (the first slot to write), got {dst!r}")
    if src.dim() != 2 or src.dtype != torch.long:
        raise ValueError(f"src must be a [B, K] int64 tensor, got {tuple(src.shape)} "
                         f"{src.dtype} (use .long())")
    B, K = src.shape
    if num.shape != (B,) or num.dtype != torch.long:
        raise ValueError(f"num must be a [B] = [{B}] int64 tensor, got {tuple(num.shape)} "
                         f"{num.dtype}")
    if num.device != src.device:
        raise ValueError(f"num is on {num.device} but src on {src.device}: move them to one "
                         "device")
    seen: dict[int, str] = {}
    for name, buf in zip(names, buffers):
        if buf.dim() != 4 or buf.shape[0] != B:
            raise ValueError(f"{name} must be a [B, H, S, D] tensor with B = {B} rows (src's), "
                             f"got {tuple(buf.shape)}")
        if dst + K > buf.shape[2]:
            raise ValueError(f"dst + K = {dst} + {K} is past the {buf.shape[2]} slots of {name}:"
                             " pass src with at most S - dst columns")
        if buf.device != buffers[0].device:
            raise ValueError(f"{name} is on {buf.device} but {names[0]} on "
                             f"{buffers[0].device}: keep all buffers on one device")
        if buf.numel() and buf.data_ptr() in seen:
            raise ValueError(f"{name} and {seen[buf.data_ptr()]} share memory: pass each "
                             "buffer once (a second pass would move moved slots again)")
        seen[buf.data_ptr()] = name
    if not buffers:
        return
    if src.device.type != "cpu":
        if src.device != buffers[0].device:
            raise ValueError(f"src and num are on {src.device} but {names[0]} on "
                             f"{buffers[0].device}: pass them on the CPU or on that device")
        return
    _check_order(dst, src, num, min(buf.shape[2] for buf in buffers))


def _check_order(dst: int, src: torch.Tensor, num: torch.Tensor, S: int) -> None:
    """CPU ``src`` and ``num``: raise naming the first entry that breaks the preconditions."""
    B, K = src.shape
    if ((num < 0) | (num > K)).any():
        raise ValueError(f"num must lie in [0, K] = [0, {K}], got {num.tolist()}")
    j = torch.arange(K)
    used = j < num[:, None]
    ignored = "(entries j >= num[b] are ignored)"
    below = used & (src < dst + j)
    if below.any():
        b, i = (int(x) for x in below.nonzero()[0])
        raise ValueError(f"src[{b}, {i}] = {int(src[b, i])} < dst + j = {dst + i}: entries only "
                         f"move left, so src[b, j] >= dst + j is required {ignored}")
    past = used & (src >= S)
    if past.any():
        b, i = (int(x) for x in past.nonzero()[0])
        raise ValueError(f"src[{b}, {i}] = {int(src[b, i])} is past the last slot S - 1 = "
                         f"{S - 1} {ignored}")
    unsorted = used[:, 1:] & (src[:, 1:] <= src[:, :-1])
    if unsorted.any():
        b, i = (int(x) for x in unsorted.nonzero()[0])
        raise ValueError(f"row {b} of src is not strictly increasing: src[{b}, {i}] = "
                         f"{int(src[b, i])}, src[{b}, {i + 1}] = {int(src[b, i + 1])}; list "
                         f"each row's kept slots once each, in ascending order {ignored}")
