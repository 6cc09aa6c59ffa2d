"""How good a trained head is on prompts it was not trained on (``specplug evaluate``).

The target answers each prompt greedily (chat-formatted like ``specplug run``); its answers are
teacher-forced through the head for top-1 / top-5 of the target's argmax by depth, counted over
the answer positions only; and a real speculative generation at the depth the head was trained
for (``num_heads``), with the adaptive budget off, gives the mean accepted draft tokens per step.
Coverage is the share of the target's answer tokens inside the head's draft vocabulary: a token
outside it can never be drafted, and top-1 is read over the covered ones.
"""

from __future__ import annotations

from typing import Any

import torch

from specplug.train.data import extract_features, feature_batch_size, generate_responses
from specplug.train.trainer import Example, TrainSettings, draft_index, evaluate

__all__ = ["evaluate_head", "evaluation_markdown"]


@torch.no_grad()
def evaluate_head(model: Any, tokenizer: Any, net: Any, prompts: list[str], *,
                  max_new_tokens: int = 128, batch_size: int = 8,
                  acceptance_prompts: int = 8) -> dict[str, Any]:
    """Teacher-forced accuracy by depth and measured acceptance of ``net`` (bound to ``model``)
    on the target's greedy answers to ``prompts``.

    Returns ``{"prompts", "answer_tokens", "coverage", "top1": {depth: float}, "top5": {...},
    "depth", "acceptance": {"mean_accepted_per_step", "tokens_per_forward", "prompts"}}``;
    ``depth`` is the chain the acceptance run drafts.
    """
    from specplug.train.pipeline import measure_acceptance

    if not prompts:
        raise ValueError("evaluate_head needs at least one prompt")
    seqs = generate_responses(model, tokenizer, prompts, max_new_tokens, batch_size)
    if not seqs:
        raise ValueError(f"the target answered none of the {len(prompts)} prompts (every answer "
                         "was empty): nothing to evaluate the head on")
    feats = extract_features(model, seqs, list(net.config.hidden_layers), topk=16,
                             batch_size=feature_batch_size(model))
    examples = [Example(torch.tensor(q.ids), f["features"], f["top_ids"], f["top_probs"],
                        len(q.prompt)) for q, f in zip(seqs, feats)]
    to_draft = draft_index(net)
    # the target's argmax at each answer-predicting position: the last prompt token on
    argmax = torch.cat([ex.top_ids[ex.prompt_len - 1:-1, 0] for ex in examples])
    acc = evaluate(net, examples, TrainSettings.for_kind(net.config.kind), to_draft,
                   responses_only=True)
    # evenly over the prompts, not the first few: a prompt file is usually ordered by category
    step = max(1, len(examples) // acceptance_prompts)
    spread = examples[::step][:acceptance_prompts]
    depth = min(net.config.num_heads, net.max_depth)  # EAGLE could chain 64 deep: as trained
    return {"prompts": len(seqs), "answer_tokens": int(sum(len(q.response) for q in seqs)),
            "coverage": float((to_draft[argmax] >= 0).float().mean()) if argmax.numel() else 0.0,
            "top1": acc["top1"], "top5": acc["top5"], "depth": depth,
            "acceptance": measure_acceptance(model, net, spread, depth, count=len(spread),
                                             max_new_tokens=max_new_tokens)}


def evaluation_markdown(r: dict[str, Any], title: str) -> str:
    """``evaluate_head``'s result as a short markdown report."""
    a = r["acceptance"]
    lines = [f"# {title}", "",
             f"- prompts: {r['prompts']}, answer tokens: {r['answer_tokens']}",
             f"- the target's answer tokens inside the draft vocabulary: {r['coverage']:.3f}",
             f"- mean accepted draft tokens per step (greedy chain, fixed depth {r['depth']}, "
             f"{a['prompts']} prompts): {a['mean_accepted_per_step']:.2f}; tokens per target "
             f"forward {a['tokens_per_forward']:.2f}", "",
             "| depth | top-1 | top-5 |", "| --- | --- | --- |"]
    for d in r["top1"]:
        lines.append(f"| {d} | {r['top1'][d]:.3f} | {r['top5'][d]:.3f} |")
    return "\n".join(lines) + "\n"
