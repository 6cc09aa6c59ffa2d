"""Trained-head drafters: ``medusa``, ``clover``, ``clover2``, ``eagle``, ``msd``.

Each loads a head checkpoint (``specplug.heads``), borrows the target's embedding and LM head,
and reads the target's hidden features, which the engine passes in ``DraftContext`` for the
layers the head names. Heads propose from a draft vocabulary (the checkpoint's
``draft_vocab``); their distributions are exact-sampling ready (zero outside that vocabulary).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import Field

from specplug.drafters.base import (
    EMPTY,
    Candidates,
    DraftContext,
    Drafter,
    DrafterOptions,
    FrontierItem,
)
from specplug.hookspecs import hookimpl
from specplug.kernels.softmax_topk import softmax_topk
from specplug.sampling import SamplingParams, check_finite, probs_from_logits

__all__ = ["HeadDrafter", "HeadOptions", "shipped_head"]

SHIPPED = Path(__file__).resolve().parent.parent / "heads" / "weights"


class HeadOptions(DrafterOptions):
    checkpoint: Any = Field(
        None, description="a head folder (config.json + model.safetensors), a loaded "
                          "specplug.heads.nets.DraftNet, or None for the head shipped for the "
                          "target")


def _target_name(target: Any) -> str | None:
    path = str(getattr(target.config, "_name_or_path", "") or "")
    return known_model_name(path)


def known_model_name(path: str) -> str | None:
    """The known model (``specplug.models.KNOWN_MODELS``) a model folder is, by its name."""
    from specplug.models import KNOWN_MODELS

    name = Path(path).name
    return name if name in KNOWN_MODELS else None


def shipped_head(target: Any, kind: str) -> Path:
    """The head of ``kind`` shipped with specplug for ``target`` (a known model, or its
    folder's path)."""
    name = known_model_name(target) if isinstance(target, str) else _target_name(target)
    folder = SHIPPED / (name or "?") / kind
    if name is None or not (folder / "config.json").is_file():
        have = sorted(f"{p.parent.name}/{p.name}" for p in SHIPPED.glob("*/*") if p.is_dir())
        raise ValueError(
            f"no shipped {kind!r} head for this target ({name or 'not a known model'}); "
            f"shipped: {', '.join(have) or 'none'}. Train one with `specplug train --model "
            f"MODEL --drafter {kind} --out DIR` and pass checkpoint=DIR")
    return folder


class _Node:
    """A tree node's handle: the head's state for expanding it and its depth."""

    __slots__ = ("state", "depth")

    def __init__(self, state: Any, depth: int):
        self.state, self.depth = state, depth


class HeadDrafter(Drafter):
    """Drives a ``DraftNet`` through the drafter protocol (one class per head kind)."""

    Options = HeadOptions
    probabilistic = True
    reads_target = True
    kind: ClassVar[str] = ""

    def __init__(self, options: HeadOptions, net: Any, target: Any):
        super().__init__(options)
        if net.config.kind != self.kind and {net.config.kind, self.kind} != {"clover",
                                                                             "clover2"}:
            raise ValueError(f"the checkpoint holds a {net.config.kind!r} head, not "
                             f"{self.kind!r}; use method={net.config.kind!r}")
        # a shallow copy: its own binding and adapter, so two speculators built from one
        # loaded net never see each other's (the weights themselves are shared)
        self.net = copy.copy(net).bind(target.get_input_embeddings(),
                                       target.get_output_embeddings().weight)
        self.hidden_layers = tuple(net.config.hidden_layers)
        self.vocab_size = net.config.vocab_size
        self.sampling = SamplingParams()
        self.rows: list[Any] = []
        self._online: tuple[Any, torch.Tensor] | None = None  # (TrainSettings, to_draft)

    @classmethod
    def from_config(cls, config: Any, target: Any = None) -> HeadDrafter:
        from specplug.heads.checkpoint import load_head

        if target is None:
            raise ValueError(f"the {cls.name!r} drafter needs the target model (it borrows "
                             "its embedding and LM head)")
        opts = config.drafter_options
        net = opts.checkpoint
        if net is None or isinstance(net, (str, Path)):
            net = load_head(net if net is not None else shipped_head(target, cls.kind))
        if config.max_depth > net.max_depth:
            from specplug.errors import ConfigError

            raise ConfigError(
                f"this {net.config.kind} head has {net.max_depth} depth heads, so it cannot "
                f"draft {config.max_depth} tokens deep; set num_speculative_tokens (or the "
                f"tree's depth) to at most {net.max_depth}")
        return cls(opts, net, target)

    def bind_media(self, media_tokens: frozenset[int]) -> None:
        super().bind_media(media_tokens)
        trained = set(self.net.config.media_tokens)
        if self.kind == "msd" and trained != set(media_tokens):
            raise ValueError(
                f"this msd head was trained for image placeholder ids {sorted(trained)} but the "
                f"target's are {sorted(media_tokens) or 'none (a text-only target)'}; train it "
                "for this target (specplug train --drafter msd)")

    def start(self, prompts: list[list[int]]) -> None:
        self.rows = [{"net": self.net.new_row(), "feats": torch.zeros(0, 0), "done": 0}
                     for _ in prompts]

    @torch.no_grad()
    def begin(self, ctx: DraftContext) -> list[Any]:
        if ctx.target_hidden is None:
            raise RuntimeError(f"the {self.name!r} drafter needs the target's hidden states; "
                               "the runner did not pass them (use specplug.hf.generate)")
        if len(self.rows) != len(ctx.tokens):
            self.start(ctx.tokens)
        self.sampling = ctx.sampling
        roots: list[Any] = []
        for b, (row, toks) in enumerate(zip(self.rows, ctx.tokens)):
            if not ctx.active[b]:  # finished rows may have dropped tokens after EOS
                roots.append(None)
                continue
            new = ctx.target_hidden[b].float()
            row["feats"] = new if row["feats"].numel() == 0 else torch.cat([row["feats"], new])
            feats, n = row["feats"], len(toks)
            if feats.shape[0] != n - 1:
                raise RuntimeError(f"row {b}: {feats.shape[0]} hidden features for {n} tokens "
                                   f"(expected {n - 1}: every committed token but the root)")
            if ctx.resting is not None and ctx.resting[b]:
                # no draft this step: keep the features, run the head when the row drafts
                # again (one commit over every position since, as at the first step)
                roots.append(None)
                continue
            done = row["done"]  # positions whose (feature, next token) pair is committed
            if n - 2 > done:
                extra = {"next_feats": feats[done + 1:n - 1]} \
                    if self.net.reads_next_features else {}
                row["net"] = self.net.commit(row["net"], feats[done:n - 2],
                                             torch.tensor(toks[done + 1:n - 1]), **extra)
                row["done"] = n - 2
            roots.append(_Node(self.net.root_state(row["net"], feats[n - 2]), 1))
        return roots

    def _candidates(self, logits: torch.Tensor, k: int, node: _Node, state: Any) -> Candidates:
        vocab = self.net.draft_vocab
        if self.sampling.greedy:  # fused: the draft-vocabulary distribution is never written
            probs, idx = softmax_topk(logits[None], min(k, logits.shape[-1]))
            probs, tokens, dist = probs[0], vocab[idx[0]], None
        else:  # sampling draws children from the whole distribution
            full = torch.full((self.vocab_size,), float("-inf"))
            full[vocab] = logits
            dist = probs_from_logits(full, self.sampling)
            probs, tokens = torch.topk(dist, min(k, vocab.numel()))
        child = _Node(state, node.depth + 1)
        return Candidates(tokens=tokens.tolist(), probs=probs.tolist(),
                          handles=[child] * len(tokens), dist=dist, shared_handle=child)

    @torch.no_grad()
    def expand(self, frontier: list[list[FrontierItem]], k: int) -> list[list[Candidates]]:
        out: list[list[Candidates]] = []
        for b, items in enumerate(frontier):
            cands: list[Candidates | None] = [None] * len(items)
            by_depth: dict[int, list[int]] = {}
            for j, it in enumerate(items):
                by_depth.setdefault(it.handle.depth, []).append(j)
            if self.output_adapter is not None:
                self.output_adapter.slot = self.adapter_slots[b]
            for depth, idx in by_depth.items():
                if depth > self.net.max_depth:
                    for j in idx:
                        cands[j] = EMPTY
                    continue
                logits, states = self.net.expand(
                    self.rows[b]["net"], [items[j].handle.state for j in idx],
                    torch.tensor([items[j].token for j in idx]), depth)
                check_finite(logits, f"the {self.name!r} head")
                for j, logit, state in zip(idx, logits, states):
                    cands[j] = self._candidates(logit, k, items[j].handle, state)
            out.append(cands)  # type: ignore[arg-type]
        return out


    # --- test-time training (specplug.online.distill) ------------------------------------
    def online_width(self) -> int:
        return self.net.config.hidden_size

    def online_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.net.parameters())

    def set_output_adapter(self, adapter: Any) -> None:
        self.output_adapter = adapter
        self.net.set_output_adapter(adapter)

    def online_loss(self, window: Any) -> torch.Tensor:
        """Distillation on one window of committed positions: the offline trainer's
        ``head_loss`` with soft cross-entropy on the target's top-k and cross-entropy on its
        argmax at every depth (the per-kind depth decay; no feature regression, no noise)."""
        from specplug.train.trainer import (
            Example,
            TrainSettings,
            _collate,
            draft_index,
            head_loss,
        )

        if window.features is None:
            raise RuntimeError(f"test-time training of {self.name!r} needs the target's "
                               "hidden features at the committed positions")
        if self._online is None:
            to_draft = draft_index(self.net)
            settings = TrainSettings.for_kind(self.net.config.kind, kd_weight=1.0,
                                              hard_weight=1.0, reg_weight=0.0,
                                              feature_noise=0.0)
            self._online = (settings, to_draft)
        settings, to_draft = self._online
        ex = Example(ids=window.tokens, features=window.features, top_ids=window.top_ids,
                     top_probs=window.top_probs)
        loss, _ = head_loss(self.net, _collate([(ex, 0, len(window))]), settings, to_draft)
        return loss


def _drafter(kind: str, doc: str) -> type[HeadDrafter]:
    return type(f"{kind.capitalize()}Drafter", (HeadDrafter,),
                {"name": kind, "kind": kind, "__doc__": doc, "default_num_speculative_tokens": 4})


MedusaDrafter = _drafter("medusa", "Medusa heads: head d proposes the d-th token from f_t.")
MsdDrafter = _drafter("msd", "MSD: an EAGLE layer that sees image tokens through its own "
                             "adapter on the target's projected visual features.")
CloverDrafter = _drafter("clover", "Clover: regressive heads with an attention decoder.")
Clover2Drafter = _drafter("clover2", "Clover-2: Clover with the Clover-2 changes.")
EagleDrafter = _drafter("eagle", "EAGLE: a one-layer feature-level autoregressive drafter.")


@hookimpl
def specplug_register_drafters(register):
    for cls in (MedusaDrafter, CloverDrafter, Clover2Drafter, EagleDrafter, MsdDrafter):
        register(cls)
