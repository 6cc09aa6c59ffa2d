"""The drafter contract.

A drafter answers one question, batched over rows: *given these tree nodes, which children
would you propose, how likely is each, and (if you are a probabilistic drafter) from which
distribution*. Tree builders (``specplug.tree``) decide which nodes to ask about and which
children to keep under a budget, so every drafter works with every tree shape.

Per step the engine calls ``begin`` (one root per row: the last committed token), then the tree
builder calls ``expand`` once per depth, then the engine calls ``observe`` with what the target
accepted. A drafter never decides what is emitted: the verifier does, so no drafter can change
the output.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from specplug.types import DraftContext, StepOutcome

__all__ = [
    "Candidates",
    "DraftContext",
    "Drafter",
    "DrafterOptions",
    "FrontierItem",
    "StepOutcome",
]


class DrafterOptions(BaseModel):
    """Base of every drafter's options model; unknown options are errors."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, frozen=True)


@dataclass
class FrontierItem:
    """A tree node whose children the builder asks for: the drafter's handle and the token."""

    handle: Any
    token: int


@dataclass
class Candidates:
    """Children a drafter proposes for one frontier node, best first.

    Attributes:
        tokens: candidate child tokens, ranked (may be fewer than asked, or none).
        probs: the drafter's probability of each candidate (used for ranking and dynamic
            trees; deterministic drafters may give confidences).
        handles: per candidate, the drafter state to hand back when that child is expanded.
        dist: ``[V]`` float32 full draft distribution at this node, for drafters that can
            sample; None for deterministic drafters (verified as one-hot drafts).
        shared_handle: handle for a child sampled from ``dist`` (any token).
    """

    tokens: list[int]
    probs: list[float]
    handles: list[Any]
    dist: torch.Tensor | None = None
    shared_handle: Any = None


EMPTY = Candidates(tokens=[], probs=[], handles=[])


class Drafter(ABC):
    """Base class of all drafters; see the module docstring for the call order."""

    #: registry name (set by each drafter family)
    name: ClassVar[str] = ""
    #: the pydantic model that validates this drafter's options
    Options: ClassVar[type[DrafterOptions]] = DrafterOptions
    #: True if ``expand`` gives full distributions (exact sampling uses them)
    probabilistic: ClassVar[bool] = False
    #: the target's hidden states the drafter reads, as indices into transformers'
    #: ``hidden_states`` (``-1``: the final-normed last layer, what the LM head reads; ``i``:
    #: the output of decoder layer ``i - 1``); empty for drafters that need none. Drafters may
    #: set it per instance (EAGLE-3 picks layers by the target's depth).
    hidden_layers: tuple[int, ...] = ()
    #: True for drafters that use the target model itself (its layers or hidden states), not
    #: only token ids; engines that cannot hand the target over refuse them at start-up
    reads_target: ClassVar[bool] = False
    #: ``num_speculative_tokens`` when the config does not set it
    default_num_speculative_tokens: ClassVar[int] = 4
    #: False for drafters whose weights are the target's (training them would change it)
    owns_weights: ClassVar[bool] = True
    #: the target's image/video placeholder token ids (``specplug.multimodal``); set by
    #: ``bind_media`` when the drafter is built for a vision-language target
    media_tokens: frozenset[int] = frozenset()

    def __init__(self, options: DrafterOptions | None = None):
        self.options = options if options is not None else self.Options()
        #: set by ``specplug.online.distill`` on trainable drafters: the adapter applied
        #: before the LM head, and the adapter slot of each row of the current generation
        self.output_adapter: Any = None
        self.adapter_slots: list[int] = []

    @classmethod
    def from_config(cls, config: Any, target: Any = None) -> Drafter:
        """Build from a ``SpecConfig`` (``target``: the target model, for drafters that
        share or inspect it)."""
        return cls(config.drafter_options)

    def bind_media(self, media_tokens: frozenset[int]) -> None:
        """The target's image placeholder ids. Drafters never propose them; a drafter that
        cannot handle them raises here (at set-up, with the fix)."""
        self.media_tokens = frozenset(media_tokens)

    def start(self, prompts: list[list[int]]) -> None:  # noqa: B027 - optional hook
        """A new generation begins with these (pad-free) prompts. Resets per-request state."""

    def regroup(self, sources: list[int | None], prompts: list[list[int]]) -> bool:
        """A serving engine's batch changed between steps: new row ``i`` is the request that
        was row ``sources[i]`` going on, or a new request (None) whose context is
        ``prompts[i]`` (every row's pad-free tokens but the root). Drafters with per-row state
        worth keeping (ngram's index and per-request estimates) move it and return True: the
        last step's outcome is then observed in the new row order. The default
        restarts every row (``start``) and returns False: nothing is observed before the
        next ``begin``, as after any start. Always correct, only slower to learn."""
        self.start(prompts)
        return False

    @abstractmethod
    def begin(self, ctx: DraftContext) -> list[Any]:
        """Start a step; return the root handle of each row (ignored for inactive rows)."""

    @abstractmethod
    def expand(self, frontier: list[list[FrontierItem]], k: int) -> list[list[Candidates]]:
        """Propose up to ``k`` children for each frontier node of each row (one call per depth)."""

    def observe(self, outcome: StepOutcome) -> None:  # noqa: B027 - optional hook
        """Learn what was accepted: advance caches, update tables, adapt."""
