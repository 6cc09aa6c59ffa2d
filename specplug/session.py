"""The drafting half of a step, one object for every route: ``DraftSession``.

Every route runs the same drafting protocol around a target it does or does not own:
``start(prompts)`` once per batch of requests, then per step ``propose(...) -> DraftTree`` and,
after the target verified, ``accept(outcome)``. specplug's own engine
(``specplug.engine.speculative_generate``), transformers' assisted loop (the
``assistant_model=`` route, ``adapters/hf_assisted.py``) and serving engines (``ChainProposer``,
``specplug.serving``) all drive one ``DraftSession``, so what a drafter, its observers and its
tree builder learn about acceptance is learned the same way everywhere.

A route that cannot give the drafter something it needs says so once, in a ``Route``, and
``DraftSession`` refuses the configuration with a message that names the route, the problem
and where the configuration does work.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from specplug.drafters.base import DraftContext, StepOutcome
from specplug.sampling import SamplingParams
from specplug.tree import DraftTree, TreeLayout

if TYPE_CHECKING:
    from specplug.config import SpecConfig
    from specplug.engine import Speculator
    from specplug.online.observer import VerifyRecord

__all__ = ["ENGINE", "DraftSession", "Route", "check_route", "check_speculator", "check_token_only"]


@dataclass(frozen=True)
class Route:
    """What a route gives the drafting side; ``DraftSession`` refuses what it cannot serve.

    Attributes:
        name: how errors name the route ("transformers' assisted decoding", "vLLM", ...).
        alternative: where a refused configuration works (named in the error).
        trees: the route verifies token trees (else chains only).
        hidden_states: the route hands the drafter the target's hidden states.
        distributions: observers get the target's distributions at the verified positions.
        ends_generations: the route says when a generation ends (observers that restore the
            drafter's weights at the end need that).
        token_only: the drafter never sees the target model (engines that hand specplug
            token ids only): drafters that read the target's layers are refused.
    """

    name: str
    alternative: str = "specplug.hf.generate(...)"
    trees: bool = True
    hidden_states: bool = True
    distributions: bool = True
    ends_generations: bool = True
    token_only: bool = False


#: specplug's own engine: it gives a drafter everything
ENGINE = Route("specplug's engine", alternative="")


class DraftSession:
    """Start, propose and accept for one ``Speculator`` on one route.

    Args:
        speculator: the configured drafter, tree builder and observers.
        route: what the route provides; the configuration is checked against it here.
    """

    def __init__(self, speculator: Speculator, route: Route = ENGINE):
        self.speculator = speculator
        self.route = route
        check_speculator(speculator, route)
        self.drafter = speculator.drafter
        self.builder = speculator.builder
        self.observers = speculator.observers
        self.steps = 0

    def start(self, prompts: Sequence[Sequence[int]]) -> None:
        """A new batch of requests: ``prompts`` per row, every token the drafter may read as
        context (the route's root, the last committed token, may be left off)."""
        self.drafter.start([list(p) for p in prompts])
        self.builder.start(len(prompts))
        for observer in self.observers:
            observer.start([list(p) for p in prompts])
        self.steps = 0

    def regroup(self, sources: list[int | None], prompts: Sequence[Sequence[int]]) -> bool:
        """A serving engine's batch changed between steps: new row ``i`` continues last
        step's row ``sources[i]``, or is a new request (None) with context ``prompts[i]``.
        Rows that go on keep what the drafter and tree builder learned of their request.

        Returns:
            True when the drafter kept its rows (``accept`` the last step's outcome next, in
            the new row order); False when it restarted them (``Drafter.regroup``'s
            default): then the outcome is not accepted, as after ``start``.
        """
        kept = self.drafter.regroup(list(sources), [list(p) for p in prompts])
        if kept:
            self.builder.regroup(list(sources))
        else:
            self.builder.start(len(sources))
        for observer in self.observers:  # per-request observer state is per row: restart it
            observer.start([list(p) for p in prompts])
        return kept

    def propose(self, tokens: list[list[int]], active: list[bool], limits: list[int],
                vocab_size: int, *, sampling: SamplingParams,
                generator: torch.Generator | None = None,
                hidden: list[torch.Tensor] | None = None, cost: Any = None
                ) -> tuple[DraftTree, TreeLayout | None]:
        """One tree per row (``DraftTree`` of ``[B, N]`` tensors; a chain on chain routes) and,
        on routes that verify trees, its ``TreeLayout`` (depths ``[B, N]``, ancestors
        ``[B, N, N]``); None on chain routes, whose engines do not need it (a chain's depth is
        its length), so they skip building it every step.

        Args:
            tokens: per row, every committed token; the last is the tree's root.
            active: per row, False for a row that drafts nothing (finished, prefilling).
            limits: per row, the most draft tokens (depth) the row may take.
            vocab_size: the target's output vocabulary (drafts are checked against it).
            sampling: the target's sampling parameters.
            generator: draft noise; None draws from torch's global generator. Never a
                generator re-seeded per call: a draft must be a fresh sample from q.
            hidden: per row, ``[n_b, F]`` target features since the last step
                (``DraftContext.target_hidden``).
            cost: the target's cost curve as the drafter should read it (a ``CostModel`` or
                its batched view); None where the route cannot time the target.
        """
        ctx = DraftContext(tokens=tokens, active=active, sampling=sampling,
                           generator=generator, target_hidden=hidden, cost=cost,
                           adaptive=self.speculator.adaptive)
        t0 = time.perf_counter()
        tree = self.builder.build(self.drafter, ctx, limits, vocab_size)
        layout = TreeLayout.from_tree(tree) if self.route.trees else None
        # the first step's drafting also reads the whole prompt: a one-off; a step where every
        # row rested did not run the drafter, so it says nothing of its cost
        if self.steps and not self.builder.all_rested:
            if not tree.width:
                depth = 0
            elif layout is None:  # a chain: its depth is its length
                depth = int(tree.num_nodes.max())
            else:
                depth = int(layout.depth.max())
            self.speculator.cost.observe_draft(depth, time.perf_counter() - t0)
        return tree, layout

    def accept(self, outcome: StepOutcome, record: VerifyRecord | None = None, *,
               accepted_nodes: torch.Tensor | None = None,
               num_accepted: torch.Tensor | None = None) -> None:
        """What the target accepted this step.

        Args:
            outcome: per row, the accepted draft tokens and the bonus token, already cut at
                EOS and the length limit, and the updated histories.
            record: the verified positions with the target's distributions there, for the
                observers (None where the route has none to give).
            accepted_nodes: ``[B, A]`` int64, the accepted nodes' indices in this step's
                tree (routes that verify trees themselves), for the tree builder's
                confidence calibration; with ``num_accepted`` ``[B]`` int64. On chain
                routes they are derived from ``outcome.accepted``.
        """
        if accepted_nodes is None and not self.route.trees and self.builder.beliefs is not None:
            # a chain's accepted nodes are its first ones: chain routes learn as the engine does
            num_accepted = torch.tensor([len(a) for a in outcome.accepted], dtype=torch.long)
            width = int(num_accepted.max()) if len(num_accepted) else 0
            accepted_nodes = torch.arange(width).expand(len(num_accepted), width)
        if accepted_nodes is not None and num_accepted is not None:
            self.builder.learn(accepted_nodes.cpu(), num_accepted.cpu())
        self.drafter.observe(outcome)
        if record is not None:
            for observer in self.observers:
                observer.observe(record)
        self.steps += 1

    def finish(self) -> None:
        """The generation ended (also when a step raised): observers undo per-request state."""
        for observer in self.observers:
            observer.finish()


def check_route(config: SpecConfig, route: Route) -> None:
    """Refuse, before anything is built, a configuration the route cannot serve.

    Raises:
        ValueError: naming the route, the setting and where it works.
    """
    if not route.trees and config.tree != "chain":
        raise ValueError(f"{route.name} verifies chains only (tree={config.tree!r}); use "
                         "tree='chain', or token trees with specplug.hf.generate(...)")
    if not route.distributions and config.adapt:
        raise ValueError(
            f"adapt={sorted(config.adapt)} is not available in {route.name}: observers such "
            "as test_time learn from the target's distributions at the verified positions, "
            "which it does not hand to specplug. For online adaptation there use ngram's "
            "cross-request cache (suffix_cache_tokens=...); test_time runs in "
            "specplug.hf.generate and the assistant_model route")
    if route.token_only:
        check_token_only(config.method, route.name)


def check_token_only(method: str, route: str = "this engine") -> None:
    """Refuse a drafter that reads the target model (its layers or hidden states), for routes
    that hand specplug token ids only.

    Raises:
        ValueError: naming the drafter and the drafters that do work.
    """
    from specplug.plugins import get_registry

    registry = get_registry()
    if registry.drafter(method).reads_target:
        usable = sorted(n for n, c in registry.drafters.items() if not c.reads_target)
        raise ValueError(
            f"drafter {method!r} reads the target model's layers or hidden states, which "
            f"{route} does not hand to specplug; drafters that need only token ids: "
            f"{', '.join(usable)}")


def check_speculator(speculator: Speculator, route: Route) -> None:
    """``check_route``, then what only the built drafter and observers can tell.

    Raises:
        ValueError, NotImplementedError: naming the route, the setting and the fix.
    """
    check_route(speculator.config, route)
    config, drafter = speculator.config, speculator.drafter
    where = f" (use {route.alternative})" if route.alternative else ""
    if not route.hidden_states and drafter.hidden_layers:
        raise NotImplementedError(f"drafter {config.method!r} needs the target's hidden "
                                  f"states, which {route.name} does not pass to specplug{where}")
    if not route.ends_generations and any(getattr(o, "restores_at_finish", False)
                                          for o in speculator.observers):
        raise ValueError(
            f"adapt.test_time train='all' with scope='request' restores the drafter's weights "
            f"when a generation ends, and {route.name} does not say when that is; use "
            f"train='adapter' (the default) or scope='shared'{where}")
