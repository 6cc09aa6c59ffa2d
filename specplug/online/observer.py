"""The observer contract: plugins that watch every verification step and may adapt the drafter.

The engine calls ``start`` when a generation begins (after the drafter's own ``start``),
``finish`` when it ends, and ``observe`` after every verification step with a ``VerifyRecord``: per row, the positions the
step committed and the target scored (the root, then the accepted draft tokens), their tokens,
the target's next-token distribution at each of them (the free teacher: verification computed
it anyway) and, when the runner returns them, the target's hidden features there. Observers
never see or change what is emitted: the verifier decided that before they run.

Observers register through ``specplug_register_observers`` and are configured by name in
``SpecConfig.adapt``; specplug's own ``test_time`` registers through the same hook.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from specplug.kernels.softmax_topk import softmax_topk

__all__ = ["Observer", "ObserverOptions", "VerifyRecord", "teacher_topk"]


class ObserverOptions(BaseModel):
    """Base of every observer's options; unknown options are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class VerifyRecord:
    """What one verification step committed, per row (``m_b``: 1 + accepted tokens of row b;
    0 for rows that were not active).

    Attributes:
        step: the decode step (0 = the first after prefill).
        tokens: per row, ``[m_b]`` int64 the committed tokens the target scored (the root,
            then the accepted draft tokens), in order.
        top_ids, top_probs: per row, ``[m_b, k]`` int64 / float32: the target's ``k`` most
            likely next tokens at each of those positions and their probabilities (softmax of
            the raw logits, before any temperature or top-k/top-p; in the ``assistant_model=``
            route, of transformers' processed scores with the temperature undone).
        features: per row, ``[m_b, F]`` float32 the target's hidden features there, when the
            runner returned them; else None.
        active: per row, True if the row was drafted and verified this step.
    """

    step: int
    tokens: list[torch.Tensor]
    top_ids: list[torch.Tensor]
    top_probs: list[torch.Tensor]
    features: list[torch.Tensor] | None
    active: list[bool]


def teacher_topk(logits: torch.Tensor, index: list[torch.Tensor], k: int
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per row, the top-``k`` next-token distribution at ``index[b]`` (``[m_b]`` positions of
    ``logits [B, N + 1, V]``) -> ``([m_b, k] ids, [m_b, k] probs)``."""
    ids, probs = [], []
    for b, idx in enumerate(index):
        rows = logits[b, idx.to(logits.device)]
        if rows.shape[0] == 0:
            p = rows.new_zeros(0, k, dtype=torch.float32)
            i = torch.zeros(0, k, dtype=torch.long, device=rows.device)
        else:  # fused: the [m, V] distribution is never written
            p, i = softmax_topk(rows, min(k, rows.shape[-1]))
        ids.append(i.cpu())
        probs.append(p.cpu())
    return ids, probs


class Observer(ABC):
    """Base of observers (see the module docstring for the call order)."""

    #: registry name (the key in ``SpecConfig.adapt``)
    name: ClassVar[str] = ""
    #: the pydantic model that validates this observer's options
    Options: ClassVar[type[ObserverOptions]] = ObserverOptions
    #: how many of the target's most likely tokens ``VerifyRecord`` carries (0: none needed)
    teacher_k: int = 0

    def __init__(self, options: ObserverOptions, drafter: Any):
        self.options = options
        self.drafter = drafter

    @classmethod
    def check(cls, options: ObserverOptions, drafter_cls: type) -> None:
        """Refuse, with a clear error, a drafter this observer cannot work with (called when
        a ``SpecConfig`` is validated, before any model is loaded). Default: any drafter."""
        return None

    def start(self, prompts: list[list[int]]) -> None:  # noqa: B027 - optional hook
        """A new generation begins with these (pad-free) prompts."""

    @abstractmethod
    def observe(self, record: VerifyRecord) -> None:
        """One verification step's outcome (after the drafter's own ``observe``)."""

    def finish(self) -> None:  # noqa: B027 - optional hook
        """The generation ended (engines that know when; the ``assistant_model=`` route does
        not, so an observer must not rely on it for correctness)."""
