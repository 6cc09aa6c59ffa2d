"""The decode loop: draft -> build tree -> score -> verify -> commit, over a ``TargetRunner``.

Kept small on purpose (in the spirit of gpt-fast): everything model- or framework-specific
lives behind ``TargetRunner`` and ``Drafter``; everything about trees lives in
``specplug.tree``; acceptance lives in ``specplug.acceptance``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from numbers import Integral
from typing import Any

import torch

from specplug.config import SpecConfig
from specplug.cost import CostModel, batch_view
from specplug.drafters.base import Drafter, StepOutcome
from specplug.errors import SpecplugError
from specplug.multimodal import media_token_ids
from specplug.online.observer import Observer, VerifyRecord, teacher_topk
from specplug.plugins import get_plugin_manager, get_registry
from specplug.runner import RunnerOutput
from specplug.sampling import SamplingParams, sample_tokens
from specplug.session import DraftSession
from specplug.target_runner import ModelTargetRunner, TargetRunner
from specplug.tree import TreeBuilder
from specplug.types import VerifyResult

__all__ = [
    "GenerationOutput",
    "GenerationStats",
    "ModelTargetRunner",
    "Speculator",
    "StepStats",
    "TargetRunner",
    "check_context",
    "speculative_generate",
]


@dataclass
class StepStats:
    """Passed to the ``specplug_on_step`` hook after every verification step (``accepted``:
    draft tokens emitted per row, after any cut at EOS, a stop string or max_new_tokens)."""

    step: int
    num_nodes: list[int]
    accepted: list[int]
    active: list[bool]


@dataclass
class GenerationStats:
    """Counters of one generation (per row where it says so)."""

    target_forwards: int = 0
    accepted_per_step: list[list[int]] = field(default_factory=list)  # per row
    draft_depth_per_step: list[list[int]] = field(default_factory=list)  # per row: tree depth
    wall_time_s: float = 0.0

    @property
    def steps(self) -> int:
        return max((len(r) for r in self.accepted_per_step), default=0)

    @property
    def mean_accepted_tokens(self) -> float:
        """Tokens emitted per target forward (accepted draft tokens + the bonus token),
        averaged over rows and decode steps; 1.0 means speculation never helped."""
        n = sum(len(r) for r in self.accepted_per_step)
        return (sum(sum(r) for r in self.accepted_per_step) + n) / n if n else 0.0

    @property
    def acceptance_rate(self) -> float:
        """Accepted draft tokens / the depth of the trees drafted (what could have been
        accepted), over all steps."""
        drafted = sum(sum(r) for r in self.draft_depth_per_step)
        acc = sum(sum(r) for r in self.accepted_per_step)
        return acc / drafted if drafted else 0.0


@dataclass
class GenerationOutput:
    """``sequences``: per row, the new tokens (ending at EOS or a stop string if hit)."""

    sequences: list[list[int]]
    stats: GenerationStats


@dataclass
class Speculator:
    """A configured drafter + tree builder + verifier, built from a ``SpecConfig``."""

    config: SpecConfig
    drafter: Drafter
    builder: TreeBuilder
    verifier: Callable[..., VerifyResult]
    cost: CostModel = field(default_factory=CostModel)  # learned across this one's calls
    observers: list[Observer] = field(default_factory=list)  # from ``config.adapt``

    @classmethod
    def from_config(cls, config: SpecConfig, target: Any = None) -> Speculator:
        reg = get_registry()
        drafter = reg.drafter(config.method).from_config(config, target)
        builder = reg.tree_builders[config.tree](config)
        verifier = reg.verifiers[config.acceptance_method]
        if target is not None:
            drafter.bind_media(media_token_ids(target))
        observers = [reg.observer(name)(opts, drafter)
                     for name, opts in config.adapt_options.items()]
        return cls(config, drafter, builder, verifier, observers=observers)

    @property
    def adaptive(self) -> bool:
        """Are drafts sized by the cost curve (``SpecConfig.adaptive``)?"""
        return self.config.adaptive

    @property
    def teacher_k(self) -> int:
        """Top-k of the target's distributions the observers want per committed position."""
        return max((o.teacher_k for o in self.observers), default=0)


def _finish_row(row: int, new: list[int], cand: list[int], max_new: int, eos: set[int],
                stop: Callable[[int, list[int]], bool] | None) -> tuple[list[int], bool]:
    """Append ``cand`` to ``new`` token by token; stop at EOS, a stop string or max_new."""
    added = []
    for t in cand:
        added.append(t)
        if len(new) + len(added) >= max_new or t in eos or (stop and stop(row, new + added)):
            return added, True
    return added, False


def check_context(prompt_tokens: int, max_new_tokens: int, context: int | None) -> None:
    """Refuse a request that cannot fit the model's context. Drafts never pass the last
    position a request can reach (each row's depth is capped by the tokens it has left), so a
    request that fits is served, drafting less near the end.

    Raises:
        ValueError: naming both lengths, the context and the fix.
    """
    if context is not None and prompt_tokens + max_new_tokens > context:
        raise SpecplugError(
            f"prompt ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
            f"model's context of {context} tokens; shorten the prompt or lower max_new_tokens")


def check_max_new_tokens(max_new_tokens: Any) -> None:
    """Raises ``SpecplugError`` unless ``max_new_tokens`` is a whole number >= 1."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, Integral) \
            or max_new_tokens < 1:
        raise SpecplugError(f"max_new_tokens must be a whole number >= 1, got "
                            f"{max_new_tokens!r}")


def check_inputs(runner: TargetRunner, input_ids: Any, attention_mask: torch.Tensor | None,
                 max_new_tokens: Any) -> None:
    """What ``speculative_generate`` refuses before any work: ``input_ids`` that are not a
    non-empty ``[B, L]`` integer tensor of ids the target embeds (padding included), an
    all-padding row, a ``max_new_tokens`` that is not a whole number >= 1.

    Raises:
        SpecplugError: naming the argument, the value and the fix.
    """
    check_max_new_tokens(max_new_tokens)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 \
            or input_ids.shape[1] == 0:
        raise SpecplugError("input_ids must be a non-empty [batch, length] tensor (empty "
                            "prompt?); a single prompt is input_ids[None]")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex \
            or input_ids.dtype == torch.bool:
        raise SpecplugError(f"input_ids must hold integer token ids, got dtype "
                            f"{input_ids.dtype}: pass the tokenizer's ids (torch.long)")
    size = runner.input_vocab_size
    low, high = int(input_ids.min()), int(input_ids.max())
    if size is not None and (low < 0 or high >= size):
        # padding too: the target embeds every position before the mask applies
        raise SpecplugError(f"input_ids holds token id {low if low < 0 else high}, outside the "
                            f"model's {size} embeddings: encode the prompt with the model's "
                            "tokenizer and pad with its pad_token_id")
    if attention_mask is not None and bool((attention_mask.sum(-1) == 0).any()):
        raise SpecplugError("empty prompt: every row needs at least one token")


def speculative_generate(
    runner: TargetRunner,
    speculator: Speculator,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    sampling: SamplingParams | None = None,
    eos_token_ids: Sequence[int] = (),
    stop: Callable[[int, list[int]], bool] | None = None,
    generator: torch.Generator | None = None,
    model_inputs: dict[str, Any] | None = None,
) -> GenerationOutput:
    """Generate up to ``max_new_tokens`` per row with speculation; output equals the target's
    own decoding (token-identical when greedy, identically distributed when sampling).

    Args:
        input_ids: ``[B, L]`` left-padded prompts.
        attention_mask: ``[B, L]`` (1 = real token).
        stop: ``stop(row, new_tokens)`` after each token; True stops the row there.
        model_inputs: the target's other prefill inputs (a vision-language model's
            ``pixel_values``, ``image_grid_thw``, ...; ``specplug.multimodal``).
    """
    sampling = sampling or SamplingParams()
    check_inputs(runner, input_ids, attention_mask, max_new_tokens)
    B, L = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    check_context(L, max_new_tokens, runner.max_context)
    hook = get_plugin_manager().hook.specplug_on_step
    eos = set(int(e) for e in eos_token_ids)
    stats = GenerationStats(accepted_per_step=[[] for _ in range(B)],
                            draft_depth_per_step=[[] for _ in range(B)])
    am = attention_mask.bool()
    tokens = [input_ids[b][am[b]].tolist() for b in range(B)]
    if speculator.adaptive and not speculator.cost.calibrated:  # once per model and device
        speculator.cost = runner.calibrate_cost(tokens[0]) or speculator.cost
    t0 = time.perf_counter()

    out = runner.prefill(input_ids, attention_mask, model_inputs) if model_inputs \
        else runner.prefill(input_ids, attention_mask)
    stats.target_forwards += 1
    session = DraftSession(speculator)
    session.start(tokens)
    teacher_k = speculator.teacher_k
    first = sample_tokens(out.logits[:, -1], sampling, generator).tolist()
    new: list[list[int]] = [[] for _ in range(B)]
    active = [True] * B
    for b in range(B):
        added, done = _finish_row(b, new[b], [first[b]], max_new_tokens, eos, stop)
        new[b] += added
        tokens[b] += added
        active[b] = not done
    # per row, hidden features of the tokens committed since the drafter last saw any
    hidden = None if out.hidden is None else [out.hidden[b, am[b]] for b in range(B)]

    # the runner scores every row's tree in one forward: a row's draft tokens are priced at
    # the batch's scale (speculator.cost is by total scored tokens)
    cost = batch_view(speculator.cost, B)
    try:
        step = 0
        while any(active):
            limits = [max_new_tokens - len(new[b]) - 1 if active[b] else 0 for b in range(B)]
            tree, layout = session.propose(tokens, active, limits, runner.vocab_size,
                                           sampling=sampling, generator=generator,
                                           hidden=hidden, cost=cost)
            assert layout is not None  # the engine route verifies trees
            roots = torch.tensor([t[-1] for t in tokens], dtype=torch.long)
            t_score = time.perf_counter()
            scored = runner.score(roots, tree, layout)
            runner.synchronize()  # time the forward, not its launch
            speculator.cost.observe(B * (tree.width + 1), time.perf_counter() - t_score)
            stats.target_forwards += 1
            result = speculator.verifier(tree, scored.logits, sampling, generator, layout,
                                         speculator.config)
            runner.commit(result)
            proposed = result.new_tokens(tree)
            accepted_out: list[list[int]] = [[] for _ in range(B)]
            bonus_out: list[int | None] = [None] * B
            was_active = list(active)
            for b in range(B):
                if not active[b]:
                    continue
                added, done = _finish_row(b, new[b], proposed[b], max_new_tokens, eos, stop)
                new[b] += added
                tokens[b] += added
                stats.accepted_per_step[b].append(len(added) - 1)
                stats.draft_depth_per_step[b].append(int(layout.depth[b].max()) if
                                                     int(tree.num_nodes[b]) else 0)
                accepted_out[b], bonus_out[b] = added[:-1], added[-1]
                active[b] = not done
            if scored.hidden is not None:  # the root (index 0) and the accepted nodes
                hidden = [scored.hidden[b, [0, *(result.accepted_nodes[b, :n] + 1).tolist()]]
                          for b, n in enumerate(result.num_accepted.tolist())]
            record = _record(step, roots, result, scored, accepted_out, was_active, teacher_k) \
                if speculator.observers else None
            # the builder calibrates the drafter's confidence (adaptive) on the accepted nodes
            session.accept(StepOutcome(accepted=accepted_out, bonus=bonus_out, tokens=tokens),
                           record, accepted_nodes=result.accepted_nodes,
                           num_accepted=result.num_accepted)
            hook(stats=StepStats(step=step, num_nodes=tree.num_nodes.tolist(),
                                 accepted=[len(a) for a in accepted_out], active=list(active)))
            step += 1
    finally:  # per-request adaptation is undone even when a step raises
        session.finish()
    stats.wall_time_s = time.perf_counter() - t0
    return GenerationOutput(sequences=new, stats=stats)


def _record(step: int, roots: torch.Tensor, result: VerifyResult, scored: RunnerOutput,
            accepted: list[list[int]], active: list[bool], k: int) -> VerifyRecord:
    """The positions this step committed and scored (root, then the accepted tokens that were
    kept), with the target's top-``k`` next-token distribution and features there."""
    B = len(active)
    index = [torch.cat([torch.zeros(1, dtype=torch.long),
                        result.accepted_nodes[b, :len(accepted[b])].cpu() + 1])
             if active[b] else torch.zeros(0, dtype=torch.long) for b in range(B)]
    toks = [torch.tensor([int(roots[b]), *accepted[b]]) if active[b]
            else torch.zeros(0, dtype=torch.long) for b in range(B)]
    top_ids, top_probs = teacher_topk(scored.logits, index, max(k, 1))
    feats = None
    if scored.hidden is not None:
        feats = [scored.hidden[b, index[b].to(scored.hidden.device)].float().cpu()
                 for b in range(B)]
    return VerifyRecord(step=step, tokens=toks, top_ids=top_ids, top_probs=top_probs,
                        features=feats, active=active)
