"""``test_time``: distil the drafter online from the target's own verification outputs.

Every verification step computes the target's next-token distribution at each position it
commits; that is a free teacher. This observer keeps, per row, a window of the last
``window`` committed positions (token, the target's top-``teacher_k`` distribution, and the
target's hidden features for drafters that read them) and every ``interval`` steps takes
``steps`` optimiser steps of the drafter's distillation loss on it (the same loss its offline
training uses: ``specplug.train.trainer.head_loss`` for heads, soft + hard cross-entropy for
draft models). Test-Time Speculation (Kumar, Sanghavi, Das, 2026) and online speculative
decoding (Liu et al. 2024) do this; drafters trained offline on short sequences otherwise
lose acceptance as a generation grows long.

What is trained (``train``):

- ``adapter`` (default): a low-rank residual on the input of the drafter's LM head
  (``specplug.online.lowrank``), one per request in ``scope="request"``, so requests batched
  together never see each other's adaptation; every cache stays valid.
- ``all``: every weight of the drafter (a head's, or a draft model's own); ``scope="request"``
  restores them when the next generation starts and refuses batches of more than one request
  (the weights are shared by the batch). Refused for ``layer_skip``, whose weights are the
  target's.

``scope="shared"`` keeps one adaptation for every row and every later generation of the same
``Speculator`` (online speculative decoding for a serving process).

Memory is bounded: the windows hold at most ``window`` positions per row, the optimiser state
is two tensors per trained weight (Adam), and slots live only as long as their generation.
Outputs never change: drafts are verified as always; only acceptance does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from pydantic import Field
from torch import nn

from specplug.hookspecs import hookimpl
from specplug.online.lowrank import OutputAdapter
from specplug.online.observer import Observer, ObserverOptions, VerifyRecord

__all__ = ["OnlineTrainable", "DistillOptions", "OnlineDistiller", "Window"]


class DistillOptions(ObserverOptions):
    lr: float = Field(3e-3, gt=0.0, le=1.0, description="Adam learning rate")
    interval: int = Field(4, ge=1, le=1024, description="verification steps between updates")
    steps: int = Field(1, ge=1, le=64, description="optimiser steps per update")
    window: int = Field(128, ge=4, le=8192,
                        description="most recent committed positions trained on, per row")
    train: Literal["adapter", "all"] = Field(
        "adapter", description="adapter: a low-rank residual before the LM head; all: every "
                               "weight of the drafter")
    rank: int = Field(16, ge=1, le=512, description="the adapter's rank")
    scope: Literal["request", "shared"] = Field(
        "request", description="request: adaptation starts fresh with each request and never "
                               "reaches another; shared: one adaptation for all requests")
    teacher_k: int = Field(8, ge=1, le=64,
                           description="the target's top-k probabilities distilled")
    seed: int = 0


@dataclass
class Window:
    """One row's most recent committed positions (``T`` of them, oldest first).

    Attributes:
        tokens: ``[T]`` int64.
        top_ids, top_probs: ``[T, k]``: the target's distribution of the token after each.
        features: ``[T, F]`` the target's hidden features, or None.
    """

    tokens: torch.Tensor
    top_ids: torch.Tensor
    top_probs: torch.Tensor
    features: torch.Tensor | None

    def append(self, tokens: torch.Tensor, top_ids: torch.Tensor, top_probs: torch.Tensor,
               features: torch.Tensor | None, cap: int) -> Window:
        def cat(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
            return None if a is None or b is None else torch.cat([a, b])[-cap:]

        return Window(cat(self.tokens, tokens), cat(self.top_ids, top_ids),
                      cat(self.top_probs, top_probs), cat(self.features, features))

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


class OnlineTrainable(Protocol):
    """What a drafter provides to be trained at test time."""

    #: the drafter's adapter (set by the trainer) and each engine row's slot in it
    output_adapter: OutputAdapter | None

    def online_width(self) -> int:
        """Width ``H`` of the drafter's LM-head input (the adapter's size)."""

    def online_parameters(self) -> list[nn.Parameter]:
        """Every weight ``train="all"`` may update (never the target's)."""

    def set_output_adapter(self, adapter: OutputAdapter | None) -> None:
        """Apply ``adapter`` (with its current ``slot``) before the LM head from now on."""

    def online_loss(self, window: Window) -> torch.Tensor:
        """The distillation loss on one window (scalar, differentiable in the trained
        weights; the adapter's ``slot`` is set by the caller)."""


class OnlineDistiller(Observer):
    """The ``test_time`` observer (see the module docstring)."""

    name = "test_time"
    Options = DistillOptions

    def __init__(self, options: DistillOptions, drafter: Any):
        super().__init__(options, drafter)
        self.check(options, type(drafter))
        self.teacher_k = options.teacher_k
        self.adapter: OutputAdapter | None = None
        self.weights: list[nn.Parameter] = []
        self.snapshot: list[torch.Tensor] = []
        self.shared_opt: torch.optim.Optimizer | None = None
        if options.train == "adapter":
            device = next(iter(drafter.online_parameters()), torch.zeros(0)).device
            self.adapter = OutputAdapter(drafter.online_width(), options.rank, options.seed,
                                         device)
            drafter.set_output_adapter(self.adapter)
            if options.scope == "shared":
                self.adapter.reset(1)
                self.shared_opt = self._adam(self.adapter.slot_parameters(0))
        else:
            self.weights = [p for p in drafter.online_parameters() if p.requires_grad]
            if options.scope == "request":  # restored at every start
                self.snapshot = [p.detach().clone() for p in self.weights]
            self.shared_opt = self._adam(self.weights)
        self.windows: list[Window | None] = []
        self.opts: list[torch.optim.Optimizer] = []
        self.steps_seen = 0
        self.updates = 0
        self.last_loss: float | None = None

    @classmethod
    def check(cls, options: DistillOptions, drafter_cls: type) -> None:
        needed = ("online_width", "online_parameters", "set_output_adapter", "online_loss")
        name = getattr(drafter_cls, "name", drafter_cls.__name__)
        if not all(hasattr(drafter_cls, m) for m in needed):
            raise ValueError(
                f"adapt.test_time trains the drafter, and the {name!r} drafter has no weights "
                "to train; trainable drafters: the heads (medusa, clover, clover2, eagle), "
                "draft_model, and layer_skip (its adapter only). For ngram use its "
                "cross-request cache (suffix_cache_tokens).")
        if options.train == "all" and not getattr(drafter_cls, "owns_weights", True):
            raise ValueError(
                f"adapt.test_time train='all' would update the target's own weights through "
                f"the {name!r} drafter (it drafts with the target's layers); use "
                "train='adapter'")

    def _adam(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=self.options.lr, betas=(0.9, 0.99))

    # --- observer hooks ------------------------------------------------------------------
    def start(self, prompts: list[list[int]]) -> None:
        B = len(prompts)
        o = self.options
        if o.scope == "request":
            if o.train == "all":
                if B > 1:
                    raise ValueError(
                        "adapt.test_time train='all' with scope='request' trains weights the "
                        f"whole batch shares, so it runs one request at a time (got {B}); use "
                        "train='adapter' (per-request adapters) or scope='shared'")
                self._restore()
                self.shared_opt = self._adam(self.weights)
            else:
                assert self.adapter is not None
                self.adapter.reset(B)
                self.opts = [self._adam(self.adapter.slot_parameters(b)) for b in range(B)]
        self.drafter.adapter_slots = list(range(B)) if self._per_row else [0] * B
        self.windows = [None] * B
        self.steps_seen = 0

    @property
    def restores_at_finish(self) -> bool:
        """True when the drafter's own weights are trained per request, so they must be
        restored when the request ends."""
        return self.options.scope == "request" and self.options.train == "all"

    def finish(self) -> None:
        if self.restores_at_finish:
            self._restore()  # the drafter (a user's draft model too) is as it was loaded

    def _restore(self) -> None:
        with torch.no_grad():
            for p, saved in zip(self.weights, self.snapshot):
                p.copy_(saved)

    @property
    def _per_row(self) -> bool:
        return self.options.scope == "request" and self.options.train == "adapter"

    def observe(self, record: VerifyRecord) -> None:
        feats = record.features
        for b, active in enumerate(record.active):
            if not active or record.tokens[b].numel() == 0:
                continue
            f = None if feats is None else feats[b].float()
            w = self.windows[b] or Window(record.tokens[b][:0], record.top_ids[b][:0],
                                          record.top_probs[b][:0], None if f is None else f[:0])
            self.windows[b] = w.append(record.tokens[b], record.top_ids[b], record.top_probs[b],
                                       f, self.options.window)
        self.steps_seen += 1
        if self.steps_seen % self.options.interval == 0:
            self.update([b for b, a in enumerate(record.active) if a])

    # --- training ------------------------------------------------------------------------
    def update(self, rows: list[int]) -> None:
        """``steps`` optimiser steps on the windows of ``rows`` (each row's own slot and
        optimiser in per-request adapter mode; one summed loss otherwise)."""
        rows = [b for b in rows if self.windows[b] is not None and len(self.windows[b]) >= 4]
        if not rows:
            return
        with torch.inference_mode(False), torch.enable_grad(), self._only_trained_weights():
            for _ in range(self.options.steps):
                total = 0.0
                if self._per_row:
                    assert self.adapter is not None
                    for b in rows:
                        self.adapter.slot = b
                        loss = self.drafter.online_loss(self.windows[b])
                        loss.backward()
                        self.opts[b].step()
                        self.opts[b].zero_grad(set_to_none=True)
                        total += loss.item()
                else:  # one step on the mean loss, one row's graph in memory at a time
                    assert self.shared_opt is not None
                    if self.adapter is not None:
                        self.adapter.slot = 0
                    for b in rows:
                        loss = self.drafter.online_loss(self.windows[b]) / len(rows)
                        loss.backward()
                        total += loss.item() * len(rows)
                    self.shared_opt.step()
                    self.shared_opt.zero_grad(set_to_none=True)
                self.last_loss = total / len(rows)
        self.updates += 1

    @contextlib.contextmanager
    def _only_trained_weights(self) -> Iterator[None]:
        """In adapter mode, no gradient flows into (or is stored for) the drafter's weights."""
        frozen = [p for p in self.drafter.online_parameters() if p.requires_grad] \
            if self.adapter is not None else []
        for p in frozen:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in frozen:
                p.requires_grad_(True)

    def state_numel(self) -> int:
        """Elements held by the adaptation (windows, trained weights, optimiser state)."""
        n = sum(sum(t.numel() for t in (w.tokens, w.top_ids, w.top_probs,
                                        w.features if w.features is not None else w.tokens[:0]))
                for w in self.windows if w is not None)
        if self.adapter is not None:
            n += sum(p.numel() for p in self.adapter.parameters())
        opts = self.opts + ([self.shared_opt] if self.shared_opt is not None else [])
        for opt in opts:
            for st in opt.state.values():
                n += sum(v.numel() for v in st.values() if torch.is_tensor(v))
        return n


@hookimpl
def specplug_register_observers(register):
    register(OnlineDistiller)
