"""Shared machinery of drafters that run a causal LM (a draft model, or part of the target).

The drafter keeps its own ``ModelRunner`` cache. Each step it first feeds the committed tokens
it has not seen (the last step's accepted leaves and bonus token, at least the root), then
scores tree nodes depth by depth as the builder asks. After verification it keeps the cache
entries of the accepted nodes it scored and drops the rest.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F

from specplug.drafters.base import Candidates, DraftContext, Drafter, FrontierItem, StepOutcome
from specplug.kernels.softmax_topk import softmax_topk
from specplug.multimodal import TextView
from specplug.runner import ModelRunner
from specplug.sampling import SamplingParams, check_finite, probs_from_logits

_ROOT = object()

def check_vocab(draft_vocab: int, target_vocab: int, what: str,
                media: frozenset[int] = frozenset()) -> None:
    """Equal vocabularies, or (a vision-language target) the target's is the draft's with ids
    appended from the first image placeholder on (LLaVA appends ``<image>`` and padding to its
    language model's vocabulary): the draft then proposes text ids only."""
    if draft_vocab == target_vocab:
        return
    if media and draft_vocab < target_vocab and min(media) == draft_vocab:
        return
    extra = (f" (this vision-language target's image placeholders start at id {min(media)}; "
             "a text-only draft may lack exactly the ids from there on)") if media else ""
    raise ValueError(
        f"vocabulary mismatch: {what} has {draft_vocab} output tokens but the target has "
        f"{target_vocab}{extra}; a drafter must share the target's tokenizer and vocabulary"
    )


def output_vocab(model: Any) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


class _AdaptedHead(torch.nn.Module):
    """The LM head behind a test-time adapter: ``head(adapter(h))``."""

    def __init__(self, head: torch.nn.Module, adapter: torch.nn.Module):
        super().__init__()
        self.head, self.adapter = head, adapter

    @property
    def weight(self) -> torch.Tensor:
        return self.head.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.adapter(h))


def with_output_adapter(model: Any, adapter: torch.nn.Module) -> Any:
    """A shallow view of ``model`` whose LM head runs ``adapter`` first; ``model`` itself (and
    a target sharing its modules) is untouched."""
    head = model.get_output_embeddings()
    if isinstance(head, _AdaptedHead):
        head = head.head
    key = next((k for k, m in model._modules.items() if m is head or
                (isinstance(m, _AdaptedHead) and m.head is head)), None)
    if key is None:
        raise ValueError(f"cannot find the LM head of {type(model).__name__} among its direct "
                         "submodules; test-time adapters need one")
    view = copy.copy(model)
    view._modules = dict(model._modules)
    view._modules[key] = _AdaptedHead(head, adapter)
    return view


class ModelDrafter(Drafter):
    """Base of ``draft_model`` and ``layer_skip``; subclasses provide ``self.model``.

    With a vision-language target the drafter never proposes an image placeholder; a drafter
    with ``text_only`` sees each row through a ``TextView`` (image spans removed or replaced by
    a marker), so its cache holds its own consistent positions. ``target_vocab``: the target's
    output vocabulary when larger than the draft's (distributions are padded with zeros)."""

    probabilistic = True
    text_only = False

    def __init__(self, options: Any, model: Any, capacity: int = 1024,
                 target_vocab: int | None = None):
        super().__init__(options)
        self.model = model
        self.runner = ModelRunner(model, capacity=capacity)
        self.sampling = SamplingParams()
        self.cached: list[int] = []  # per row: target tokens consumed (through the view)
        self.started = False
        self.target_vocab = target_vocab
        self.view: TextView | None = None
        self._media_ids: torch.Tensor | None = None

    def image_marker(self) -> tuple[int, ...]:
        """Tokens a text-only drafter sees in place of each image span (none: removed)."""
        return ()

    def bind_media(self, media_tokens: frozenset[int]) -> None:
        super().bind_media(media_tokens)
        vocab = output_vocab(self.model)
        if self.text_only and media_tokens:
            marker = self.image_marker()
            lacking = [t for t in marker if not 0 <= t < vocab]
            if lacking:
                raise ValueError(
                    f"image_marker ids {lacking} are not in the draft model's vocabulary "
                    f"(0..{vocab - 1}); pick marker tokens its tokenizer has, or [] to remove "
                    "image spans")
            self.view = TextView(self.media_tokens, marker, vocab)
        inside = sorted(t for t in media_tokens if t < vocab)
        self._media_ids = torch.tensor(inside, dtype=torch.long) if inside else None

    def start(self, prompts: list[list[int]]) -> None:
        self.started = False
        self.cached = [0] * len(prompts)
        if self.view is not None:
            self.view.start(len(prompts))

    def _seen(self, row: int, tokens: list[int]) -> list[int]:
        """What the draft model is fed for these new target tokens of ``row``."""
        return tokens if self.view is None else self.view.feed(row, tokens)

    def begin(self, ctx: DraftContext) -> list[Any]:
        self.sampling = ctx.sampling
        B = len(ctx.tokens)
        if self.output_adapter is not None:
            self.output_adapter.slot = self.adapter_slots
        if not self.started:
            if self.view is not None:
                self.view.start(B)
            # a prompt of nothing but images leaves a text-only draft one dummy token
            seen = [self._seen(b, t) or [0] for b, t in enumerate(ctx.tokens)]
            L = max(len(t) for t in seen)
            ids = torch.zeros(B, L, dtype=torch.long)
            mask = torch.zeros(B, L, dtype=torch.long)
            for b, t in enumerate(seen):
                ids[b, L - len(t):] = torch.tensor(t)
                mask[b, L - len(t):] = 1
            self.root_logits = self.runner.prefill(ids, mask).logits[:, -1]
            check_finite(self.root_logits, f"the {self.name!r} drafter")
            self.root_logits = self._to_target(self.root_logits)
            self.cached = [len(t) for t in ctx.tokens]
            self.started = True
        else:
            pending = [self._seen(b, t[c:]) for b, (t, c) in
                       enumerate(zip(ctx.tokens, self.cached))]
            out = self.runner.extend(pending) if any(pending) else None
            if out is not None:
                last = torch.tensor([max(len(p) - 1, 0) for p in pending])
                root = out.logits[torch.arange(B), last]
                check_finite(root, f"the {self.name!r} drafter")
                self.root_logits = self._to_target(root)
            if self.view is not None and not all(pending):
                # a row whose new tokens the text view removed (the target chose an image
                # placeholder) keeps the logits after the last token its draft saw
                fed = torch.tensor([bool(p) for p in pending])
                root = self.last_logits.clone()
                if out is not None:
                    root[fed] = self.root_logits[fed]
                self.root_logits = root
            self.cached = [len(t) for t in ctx.tokens]
        self.last_logits = self.root_logits  # text views: after the last token the draft saw
        self.slot_logits: list[dict[int, torch.Tensor]] = [{} for _ in range(B)]
        self.child_slot: list[dict[tuple[int, int], int]] = [{} for _ in range(B)]
        self.spec_size = 0
        return [_ROOT] * B

    def _to_target(self, logits: torch.Tensor) -> torch.Tensor:
        """``[..., Vd]`` draft logits -> what candidates are drawn from, once per forward:
        image placeholders masked, padded to the target's vocabulary when it is larger."""
        if self._media_ids is not None:  # never propose an image placeholder
            logits = logits.index_fill(-1, self._media_ids, float("-inf"))
        if self.target_vocab is not None and self.target_vocab > logits.shape[-1]:
            logits = F.pad(logits, (0, self.target_vocab - logits.shape[-1]),
                           value=float("-inf"))
        return logits

    def _candidates(self, logits: torch.Tensor, k: int, handle: int) -> Candidates:
        k = min(k, logits.shape[-1])
        if self.sampling.greedy:  # fused: the [V] distribution is never written
            probs, tokens = softmax_topk(logits[None], k)
            probs, tokens, dist = probs[0], tokens[0], None
        else:  # sampling draws children from the whole distribution
            dist = probs_from_logits(logits, self.sampling)
            probs, tokens = torch.topk(dist, k)
        return Candidates(tokens=tokens.tolist(), probs=probs.tolist(), handles=[handle] * k,
                          dist=dist, shared_handle=handle)

    def expand(self, frontier: list[list[FrontierItem]], k: int) -> list[list[Candidates]]:
        B = len(frontier)
        if self.output_adapter is not None:
            self.output_adapter.slot = self.adapter_slots
        todo = [[it for it in row if it.handle is not _ROOT] for row in frontier]
        n = max((len(r) for r in todo), default=0)
        logits = slots = None
        if n:
            tokens = torch.zeros(B, n, dtype=torch.long)
            parents = torch.full((B, n), -1, dtype=torch.long)
            real = torch.zeros(B, n, dtype=torch.bool)
            for b, row in enumerate(todo):
                for j, it in enumerate(row):
                    tokens[b, j], parents[b, j], real[b, j] = it.token, it.handle, True
            logits = self.runner.append(tokens, parents, real).logits
            check_finite(logits, f"the {self.name!r} drafter")
            logits = self._to_target(logits)
            slots = self.spec_size
            self.spec_size += n
        out: list[list[Candidates]] = []
        for b, row in enumerate(frontier):
            cands, j = [], 0
            for it in row:
                if it.handle is _ROOT:
                    cands.append(self._candidates(self.root_logits[b], k, -1))
                    continue
                slot = slots + j
                self.child_slot[b][(it.handle, it.token)] = slot
                if self.view is not None:
                    self.slot_logits[b][slot] = logits[b, j]
                cands.append(self._candidates(logits[b, j], k, slot))
                j += 1
            out.append(cands)
        return out

    def observe(self, outcome: StepOutcome) -> None:
        B = len(outcome.accepted)
        keep = []
        for b in range(B):
            path, parent = [], -1
            for t in outcome.accepted[b]:
                slot = self.child_slot[b].get((parent, t))
                if slot is None:
                    break
                path.append(slot)
                parent = slot
            keep.append(path)
        K = max((len(p) for p in keep), default=0)
        idx = torch.zeros(B, K, dtype=torch.long)
        for b, p in enumerate(keep):
            idx[b, : len(p)] = torch.tensor(p, dtype=torch.long)
        self.runner.commit(idx, torch.tensor([len(p) for p in keep], dtype=torch.long))
        self.cached = [c + len(p) for c, p in zip(self.cached, keep)]
        ends = [b for b, p in enumerate(keep) if p] if self.view is not None else []
        if ends:
            self.last_logits = self.last_logits.clone()
            for b in ends:
                self.last_logits[b] = self.slot_logits[b][keep[b][-1]]
        if self.view is not None:  # accepted drafts are text: any image span has ended
            for b, p in enumerate(keep):
                if p:
                    self.view.inside[b] = False

    # --- test-time training (specplug.online.distill) ------------------------------------
    def online_width(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[1])

    def online_parameters(self) -> list[torch.nn.Parameter]:
        adapter = {id(p) for p in self.output_adapter.parameters()} \
            if self.output_adapter is not None else set()
        return [p for p in self.model.parameters() if id(p) not in adapter]

    def set_output_adapter(self, adapter: Any) -> None:
        self.output_adapter = adapter
        self.model = with_output_adapter(self.model, adapter)
        self.runner.model = self.model

    def online_loss(self, window: Any) -> torch.Tensor:
        """Soft cross-entropy on the target's top-k distribution plus cross-entropy on its
        argmax, at every position of the window (no cache: one plain forward)."""
        device = self.runner.device
        logits = self.model(input_ids=window.tokens[None].to(device), use_cache=False).logits
        logp = logits[0].float().log_softmax(-1)  # [T, V]
        ids, p = window.top_ids.to(device), window.top_probs.to(device)
        p = p / p.sum(-1, keepdim=True).clamp(min=1e-6)
        soft = -(p * logp.gather(-1, ids)).sum(-1).mean()
        return soft + F.nll_loss(logp, ids[:, 0])
