"""Run an HF-style causal LM over token trees with a compactable KV cache (torch only).

``ModelRunner`` drives any model with the transformers calling convention
(``model(input_ids, attention_mask, position_ids, cache, use_cache)``; the cache keyword is
``past_key_values`` before transformers 5.24, see :func:`cache_argument`) without importing
transformers: it passes its own 4-D boolean masks (a dict per layer type for models that mix
full and sliding-window layers, as Gemma 3 does) and its own cache object, duck-typed to the
two methods transformers' attention layers call (``update`` and ``get_seq_length``).

Cache layout, per layer: ``[B, H_kv, capacity, D]`` buffers. Slots ``[0, committed)`` hold
committed tokens; a row may have *holes* (slots marked invalid) where another row accepted
more tokens in the same step. Slots ``[committed, length)`` are the speculative region of the
current step: tree nodes that see their ancestors only. ``commit(keep)`` moves each row's kept
speculative slots, in order, to the end of its committed region and drops the rest.

Positions follow transformers' conventions with left padding: a token's *virtual index* counts
the pads before it (what the sliding window compares, as ``generate`` does), and its position id
does not (``cumsum(attention_mask) - 1``). Vision-language targets take their image inputs
(``pixel_values``, ...) at prefill only; Qwen2-VL-style models get 3-D M-RoPE position ids
(``specplug.multimodal.position_scheme``): the prompt's from the model's own rope index, every
later token's (tree nodes included) from its index in the row plus the prompt's offset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from specplug.kernels.kv_compact import compact_kv_layers
from specplug.multimodal import position_scheme

__all__ = ["ModelRunner", "RunnerOutput", "TreeKVCache", "cache_argument"]


def cache_argument(model: Any) -> str:
    """The keyword ``model.forward`` takes its KV cache by: ``cache`` (transformers >= 5.24,
    where ``past_key_values`` is a deprecated alias) or ``past_key_values`` (older releases).

    Passing the wrong one is not harmless: transformers 5.24's ``generate`` hands a custom
    generation loop its own ``cache``, and a call with both names keeps that one and drops
    ours (wrong tokens, silently). So the runner asks the signature, once per model.
    """
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


class TreeKVCache:
    """Preallocated per-layer K/V buffers; see the module docstring for the layout."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.write_at = 0  # first slot of the block the current forward writes

    # --- the interface transformers' attention layers call -------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        n = key_states.shape[-2]
        end = self.write_at + n
        k, v = self.keys.get(layer_idx), self.values.get(layer_idx)
        if k is None or end > k.shape[-2]:
            k, v = self._grow(layer_idx, key_states, value_states, end)
        k[:, :, self.write_at:end] = key_states
        v[:, :, self.write_at:end] = value_states
        return k[:, :, :end], v[:, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.write_at

    # --- our own operations ---------------------------------------------------------------
    def _grow(self, layer_idx: int, ks: torch.Tensor, vs: torch.Tensor, need: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
        old_k, old_v = self.keys.get(layer_idx), self.values.get(layer_idx)
        cap = max(self.capacity, need, 2 * (old_k.shape[-2] if old_k is not None else 0))
        B, H, _, Dk = ks.shape
        new_k = ks.new_zeros(B, H, cap, Dk)
        new_v = vs.new_zeros(B, H, cap, vs.shape[-1])
        if old_k is not None:
            new_k[:, :, : self.write_at] = old_k[:, :, : self.write_at]
            new_v[:, :, : self.write_at] = old_v[:, :, : self.write_at]
        self.keys[layer_idx], self.values[layer_idx] = new_k, new_v
        return new_k, new_v

    def move(self, dst: int, src: torch.Tensor, num: torch.Tensor) -> None:
        """Per row b, copy slot ``src[b, j]`` to slot ``dst + j`` for ``j < num[b]`` in every
        layer's K and V buffers, in place (one ``compact_kv_layers`` call); other slots keep
        their contents. ``src``: ``[B, K]`` int64, over a row's first ``num[b]`` entries
        strictly increasing with ``src[b, j] >= dst + j`` (compaction only moves entries
        left); ``num``: ``[B]`` int64."""
        buffers = [buf for layer in self.keys for buf in (self.keys[layer], self.values[layer])]
        compact_kv_layers(buffers, dst, src, num)


@dataclass
class RunnerOutput:
    """Logits ``[B, n, V]`` (float32) and, when asked for, hidden features ``[B, n, F]``
    (the requested layers concatenated; prefill returns them for every prompt position)."""

    logits: torch.Tensor
    hidden: torch.Tensor | None


def _mask_windows(config: Any) -> tuple[list[str] | None, dict[str, int | None]]:
    """Which masks the model wants: ``(layer-type keys or None, window per key)``."""
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        kinds = sorted(set(layer_types))
        unknown = [k for k in kinds if k not in ("full_attention", "sliding_attention")]
        if unknown:
            raise NotImplementedError(f"attention layer types {unknown} are not supported yet")
        return kinds, {"full_attention": None, "sliding_attention": window}
    if window is not None and getattr(config, "use_sliding_window", True) and not layer_types:
        return None, {"single": window}
    return None, {"single": None}


class ModelRunner:
    """Prefill, tree-append and commit over one model and one ``TreeKVCache``.

    Args:
        model: an HF-style causal LM (``transformers`` calling convention).
        capacity: initial cache slots (grows by doubling when exceeded).
        hidden_layers: also return these entries of transformers' ``hidden_states``,
            concatenated on the last dimension (``(-1,)``: what the LM head reads).
    """

    def __init__(self, model: Any, capacity: int = 1024, hidden_layers: tuple[int, ...] = ()):
        self.model = model
        config = model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.layer_kinds, self.windows = _mask_windows(text)
        self.hidden_layers = tuple(hidden_layers)
        self.capacity = capacity
        self.device = next(model.parameters()).device
        self.positions = position_scheme(model)
        self.cache_kwarg = cache_argument(model)
        self.reset(1)

    # --- state ------------------------------------------------------------------------------
    def reset(self, batch_size: int) -> None:
        self.cache = TreeKVCache(self.capacity)
        self.batch_size = batch_size
        self.valid = torch.zeros(batch_size, 0, dtype=torch.bool)   # [B, slots]
        self.vidx = torch.zeros(batch_size, 0, dtype=torch.long)     # [B, slots] virtual index
        self.committed = 0                                           # committed slots
        self.vlen = torch.zeros(batch_size, dtype=torch.long)        # [B] next virtual index
        self.pads = torch.zeros(batch_size, dtype=torch.long)        # [B] left pads
        self._reset_spec()

    def _reset_spec(self) -> None:
        B = self.batch_size
        self.spec_anc = torch.zeros(B, 0, 0, dtype=torch.bool)  # [B, S, S] incl. self
        self.spec_depth = torch.zeros(B, 0, dtype=torch.long)   # [B, S]

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    # --- forward ---------------------------------------------------------------------------
    def _masks(self, visible: torch.Tensor, q_vidx: torch.Tensor, k_vidx: torch.Tensor
               ) -> torch.Tensor | dict[str, torch.Tensor]:
        """``visible [B, n, L]`` -> 4-D mask(s) ``[B, 1, n, L]`` with each kind's window."""
        out: dict[str, torch.Tensor] = {}
        for kind, window in self.windows.items():
            m = visible
            if window is not None:
                m = m & ((q_vidx[:, :, None] - k_vidx[:, None, :]) < window)
            out[kind] = m[:, None]
        return out["single"] if self.layer_kinds is None else out

    def _forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                 mask: torch.Tensor | dict[str, torch.Tensor], logits_to_keep: int = 0,
                 model_inputs: dict[str, Any] | None = None) -> RunnerOutput:
        self.cache.write_at = self.length - input_ids.shape[1]
        kwargs: dict[str, Any] = {}
        if logits_to_keep:
            kwargs["logits_to_keep"] = logits_to_keep
        for key, value in (model_inputs or {}).items():
            kwargs[key] = value.to(self.device) if torch.is_tensor(value) else value
        kwargs[self.cache_kwarg] = self.cache
        out = self.model(input_ids=input_ids.to(self.device), attention_mask=mask,
                         position_ids=position_ids.to(self.device), use_cache=True,
                         output_hidden_states=bool(self.hidden_layers), **kwargs)
        hidden = None
        if self.hidden_layers:
            hidden = torch.cat([out.hidden_states[i] for i in self.hidden_layers], -1).float()
        return RunnerOutput(logits=out.logits.float(), hidden=hidden)

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                model_inputs: dict[str, Any] | None = None) -> RunnerOutput:
        """Encode left-padded prompts ``[B, L]``; returns the last position's logits
        ``[B, 1, V]`` (and hidden features of all positions ``[B, L, F]``).

        ``model_inputs``: the model's other prefill inputs (a VLM's ``pixel_values``,
        ``image_grid_thw``, ...), passed to this forward only; a ``position_ids`` entry holds
        prompt positions ``generate`` already computed (3-D M-RoPE ones are used)."""
        B, L = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones(B, L, dtype=torch.long)
        am = attention_mask.to(torch.bool).cpu()
        if L == 0 or not bool(am[:, -1].all()):
            raise ValueError("prompts must be non-empty and left-padded (tokenizer "
                             "padding_side='left'): the last position of every row must be real")
        if bool((am[:, 1:].long() < am[:, :-1].long()).any()):
            raise ValueError("prompts must be left-padded: found padding after real tokens")
        self.reset(B)
        self.valid = am.clone()
        self.vidx = torch.arange(L).expand(B, L).clone()
        self.pads = (~am).sum(-1)
        self.vlen = torch.full((B,), L, dtype=torch.long)
        self.committed = L
        index = (self.vidx - self.pads[:, None]).clamp(min=0)
        model_inputs = dict(model_inputs or {})
        pos = self.positions.prefill(self.model, input_ids, attention_mask.cpu(), index,
                                     model_inputs, model_inputs.pop("position_ids", None))
        causal = torch.ones(L, L, dtype=torch.bool).tril()
        visible = (causal[None] & am[:, None, :]) | torch.eye(L, dtype=torch.bool)[None]
        return self._forward(input_ids, pos, self._masks(visible, self.vidx, self.vidx), 1,
                             model_inputs)

    def _extend_ancestry(self, parents: torch.Tensor, real: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Ancestor mask ``[B, S+n, S+n]`` and depths ``[B, S+n]`` with n new nodes added."""
        B, n = parents.shape
        S = self.spec_depth.shape[1]
        anc = torch.zeros(B, S + n, S + n, dtype=torch.bool)
        anc[:, :S, :S] = self.spec_anc
        depth = torch.cat([self.spec_depth, torch.zeros(B, n, dtype=torch.long)], 1)
        new = torch.arange(S, S + n)
        anc[:, new, new] = True
        has_parent = real & (parents >= 0)
        pidx = parents.clamp(min=0)
        # parents precede children, so one pass in node order settles depth and ancestry
        for i in range(n):
            rows = has_parent[:, i].nonzero(as_tuple=True)[0]
            if len(rows):
                p = pidx[rows, i]
                anc[rows, S + i] |= anc[rows, p]
                depth[rows, S + i] = depth[rows, p] + 1
        return anc, depth

    @torch.inference_mode()
    def append(self, tokens: torch.Tensor, parents: torch.Tensor, real: torch.Tensor,
               ancestors: torch.Tensor | None = None, depth: torch.Tensor | None = None
               ) -> RunnerOutput:
        """Score new speculative nodes.

        Args:
            tokens: ``[B, n]`` int64.
            parents: ``[B, n]`` int64 index into the speculative region (earlier nodes,
                including ones in this call), or -1 to follow the committed tokens.
            real: ``[B, n]`` bool; padding nodes see only themselves.
            ancestors, depth: optional ``[B, n, n]`` bool (self included) and ``[B, n]`` int64
                for the new nodes, when the caller already has them and the speculative
                region is empty (the target scoring a whole tree); else derived from parents.
        Returns:
            logits ``[B, n, V]`` (and hidden ``[B, n, H]``).
        """
        B, n = tokens.shape
        S = self.spec_depth.shape[1]
        if ancestors is not None and depth is not None:
            if S:
                raise ValueError("precomputed ancestry is only for an empty speculative region")
            anc = ancestors
        else:
            anc, depth = self._extend_ancestry(parents, real)
        self.spec_anc, self.spec_depth = anc, depth
        q_vidx = self.vlen[:, None] + depth[:, S:]
        self.valid = torch.cat([self.valid, torch.zeros(B, n, dtype=torch.bool)], 1)
        self.vidx = torch.cat([self.vidx, q_vidx], 1)
        committed = self.valid[:, None, : self.committed].expand(B, n, self.committed)
        visible = torch.cat([committed, anc[:, S:, :]], 2)
        visible[:, :, : self.committed] &= real[:, :, None]
        pos = self.positions.step(q_vidx - self.pads[:, None])
        return self._forward(tokens, pos, self._masks(visible, q_vidx, self.vidx))

    @torch.inference_mode()
    def commit(self, keep: torch.Tensor, num_keep: torch.Tensor) -> None:
        """Keep speculative nodes ``keep[b, :num_keep[b]]`` (in path order) and drop the rest.

        Args:
            keep: ``[B, K]`` int64 indices into the speculative region (padding ignored).
            num_keep: ``[B]`` int64.
        """
        K = int(num_keep.max()) if num_keep.numel() else 0
        keep = keep[:, :K]
        used = torch.arange(K)[None, :] < num_keep[:, None]
        # padding entries point at slot `committed` (a valid index for the vidx gather below);
        # num_keep keeps them out of the move
        src = self.committed + torch.where(used, keep, 0)
        base = self.committed
        # a kept path already in place (a chain's accepted prefix) needs no copy; the check
        # is free on CPU only (on a GPU it would wait for the device), so there it always moves
        if src.device.type != "cpu" or not bool((~used | (src == base + torch.arange(K))).all()):
            self.cache.move(base, src, num_keep)
        new_vidx = self.vidx.gather(1, src)
        self.valid = torch.cat([self.valid[:, :base], used], 1)
        self.vidx = torch.cat([self.vidx[:, :base], new_vidx], 1)
        self.committed = base + K
        self.vlen = self.vlen + num_keep
        self._reset_spec()

    def extend(self, tokens: list[list[int]]) -> RunnerOutput:
        """Append committed tokens (ragged per row) and commit them all; returns the logits
        ``[B, n, V]`` of the block (row b's last real token at ``len(tokens[b]) - 1``)."""
        B = self.batch_size
        n = max(len(t) for t in tokens)
        ids = torch.zeros(B, n, dtype=torch.long)
        real = torch.zeros(B, n, dtype=torch.bool)
        for b, t in enumerate(tokens):
            ids[b, : len(t)] = torch.tensor(t, dtype=torch.long)
            real[b, : len(t)] = True
        parents = torch.arange(-1, n - 1).expand(B, n)
        out = self.append(ids, parents, real)
        counts = real.sum(-1)
        self.commit(torch.arange(n).expand(B, n), counts)
        return out
