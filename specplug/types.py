"""The contracts every part of a step shares, in one leaf module (it imports no other part of
specplug at module level).

A step moves these between the parts, one way:

    DraftContext --drafter + tree builder--> DraftTree --TreeLayout.from_tree--> TreeLayout
      --runner.score + verifier--> VerifyResult --engine--> StepOutcome --> drafter.observe

Shapes: ``B`` rows, ``N`` draft nodes per row (padded), ``V`` vocabulary, ``D`` the deepest
accepted path, ``F`` hidden-feature width. Token ids are int64, masks bool, probabilities
float32; tensors are on the target's device unless a docstring says CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Integral
from typing import Any, TypeVar

import torch

__all__ = ["DraftContext", "DraftTree", "SamplingParams", "StepOutcome", "TreeLayout", "regroup_rows",
           "VerifyResult"]


@dataclass(frozen=True)
class SamplingParams:
    """How the target samples. ``temperature == 0`` means greedy decoding.

    Attributes:
        temperature: 0 for greedy; otherwise logits are divided by it.
        top_k: keep the k most probable tokens (0 disables).
        top_p: keep the smallest set whose probability reaches ``top_p`` (1.0 disables).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        from specplug.errors import SpecplugError

        if not (math.isfinite(self.temperature) and self.temperature >= 0.0):
            raise SpecplugError(f"temperature must be a finite number >= 0 (0 = greedy), got "
                                f"{self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, Integral) or self.top_k < 0:
            raise SpecplugError(f"top_k must be a whole number >= 0 (0 = off), got "
                                f"{self.top_k!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise SpecplugError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class DraftTree:
    """A batch of padded draft trees.

    Attributes:
        tokens: ``[B, N]`` int64, node i's token (padding: 0).
        parents: ``[B, N]`` int64, parent node index; -1 = the root (last committed token).
        num_nodes: ``[B]`` int64, real nodes per row (the rest is padding).
        draft_probs: ``[B, N, V]`` float32, the distribution node i was drawn from; None for
            deterministic drafts (treated as one-hot by the verifier).
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    num_nodes: torch.Tensor
    draft_probs: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def width(self) -> int:
        return self.tokens.shape[1]

    def validate(self) -> None:
        """Check the structural invariants (used by tests and at plugin boundaries)."""
        if self.tokens.shape != self.parents.shape or self.tokens.dim() != 2:
            raise ValueError(f"tokens {tuple(self.tokens.shape)} and parents "
                             f"{tuple(self.parents.shape)} must both be [B, N]")
        from specplug.kernels.tree_prep import check_topological

        check_topological(self.parents, self.num_nodes)


@dataclass
class TreeLayout:
    """What the runner and the verifier derive from a tree's parents (``prepare_tree``: the
    Triton kernel for CUDA trees, its torch reference otherwise).

    Attributes:
        depth: ``[B, N]`` int64, 1 for children of the root; 0 for padding.
        ancestors: ``[B, N, N]`` bool, ``ancestors[b, i, j]``: j is i or an ancestor of i
            (padding nodes see only themselves).
        real: ``[B, N]`` bool, real (non-padding) nodes.
        max_depth: deepest real node over the batch.
        retrieve: ``[B, N, N]`` int64, each node's path (see ``retrieve_indices``).
    """

    depth: torch.Tensor
    ancestors: torch.Tensor
    real: torch.Tensor
    max_depth: int
    retrieve: torch.Tensor

    @staticmethod
    def from_tree(tree: DraftTree) -> TreeLayout:
        from specplug.kernels.tree_prep import prepare_tree

        prep = prepare_tree(tree.parents, tree.num_nodes)
        return TreeLayout(depth=prep.depth, ancestors=prep.ancestors, real=prep.depth > 0,
                          max_depth=int(prep.depth.max()) if prep.depth.numel() else 0,
                          retrieve=prep.retrieve)

    def retrieve_indices(self) -> torch.Tensor:
        """``[B, N, D]`` int64 with ``D = max(max_depth, 1)``: for each node, its path from the
        root's child down to itself (node indices in depth order, -1 padded), to read out an
        accepted path."""
        B, N, _ = self.retrieve.shape
        if N == 0:
            return torch.full((B, 0, 1), -1, dtype=torch.long, device=self.retrieve.device)
        return self.retrieve[..., : max(self.max_depth, 1)]


@dataclass
class VerifyResult:
    """Per row: the accepted path and the bonus token.

    Attributes:
        accepted_nodes: ``[B, D]`` int64 node indices of the accepted path, root's child
            first, -1 padded.
        num_accepted: ``[B]`` int64 number of accepted draft nodes.
        bonus_tokens: ``[B]`` int64 token the target emits after the accepted path.
    """

    accepted_nodes: torch.Tensor
    num_accepted: torch.Tensor
    bonus_tokens: torch.Tensor

    def new_tokens(self, tree: DraftTree) -> list[list[int]]:
        """Per row: accepted draft tokens then the bonus token."""
        out = []
        for b in range(tree.batch_size):
            n = int(self.num_accepted[b])
            idx = self.accepted_nodes[b, :n]
            out.append(tree.tokens[b, idx].tolist() + [int(self.bonus_tokens[b])])
        return out


@dataclass
class DraftContext:
    """What a drafter sees at the start of a step.

    Attributes:
        tokens: per row, every committed token (prompt without padding, then generated);
            the last one is the tree's root: committed, but not yet scored by the target.
        active: per row, False once the row has finished (its tree must stay empty).
        sampling: the target's sampling parameters.
        generator: the step's random generator (drafters that sample use it).
        target_hidden: per row, ``[n_b, F]`` the target's hidden features (the layers the
            drafter names in ``hidden_layers``, concatenated) of the tokens committed and
            scored since the previous step, in order: at the first step the whole prompt,
            then the root and accepted tokens of the last step. The last row is at the position
            that produced the root. Over a generation they cover every committed token but the
            root. None when the drafter names no layers.
        cost: the target's measured forward cost by number of scored tokens (None when the
            framework's loop runs the target and specplug cannot time it).
        adaptive: size the draft by its expected payoff under ``cost``
            (``SpecConfig.adaptive``); False: draft up to the depth limit.
        resting: per row, True where the tree builder drafts nothing this step because the
            row's expected gain cannot pay for running the drafter (None: no row rests). A
            drafter may skip its work for a resting row but must keep the row's state
            current (take its new tokens and features), and return any root for it.
    """

    tokens: list[list[int]]
    active: list[bool]
    sampling: SamplingParams
    generator: torch.Generator | None = None
    target_hidden: list[torch.Tensor] | None = None
    cost: Any = None  # specplug.cost.CostModel | None
    adaptive: bool = True
    resting: list[bool] | None = None


@dataclass
class StepOutcome:
    """What the verifier decided for one step, per row.

    Attributes:
        accepted: the draft tokens accepted, in path order (may be empty).
        bonus: the token the target chose after the accepted path (the next root; EOS or the
            last token when the row finished in this step); None for rows already finished.
        tokens: every committed token of the row after this step (prompt included).
    """

    accepted: list[list[int]]
    bonus: list[int | None]
    tokens: list[list[int]]


T = TypeVar("T")


def regroup_rows(values: Sequence[T], sources: Sequence[int | None],
                 fresh: Callable[[], T]) -> list[T]:
    """Per-row state after a serving engine's batch changed: new row ``i`` takes
    ``values[sources[i]]`` (the request going on), or ``fresh()`` for a new request (None) or
    a row the state does not cover yet."""
    return [values[s] if s is not None and s < len(values) else fresh() for s in sources]
