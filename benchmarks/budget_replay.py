"""Replay ``ngram`` draft-length rules on recorded greedy outputs (docs/adaptive.md).

Greedy output does not depend on what is drafted. Once the target's greedy answer to every turn
of the prompt set is recorded, any drafting rule can be replayed offline: the real
``NgramDrafter`` proposes what it would propose in the engine, the tokens the verifier would
accept are read off the recorded answer, and a step costs the engine's measured cost curve at
the number of tokens scored, plus a fixed per-step overhead (``--overhead``, in one-token
forwards; the same for plain decoding). Seconds instead of the 40 minutes of a full benchmark,
and one thing a benchmark cannot give: an **oracle** that knows how many tokens of each draft
will be accepted and drafts the number that pays best. No rule that decides from what it
knows before verifying can reach it; it bounds what a better budget rule could gain over this
drafter's proposals.

    python benchmarks/budget_replay.py --model smollm2-135m \\
        --out benchmarks/results/adaptive/smollm2-135m-replay

Writes ``greedy.jsonl`` (the recorded answers, reused when present) and ``replay-depth<N>.json``
under ``--out``, and prints speedups in the cost model's units (not wall-clock seconds).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from specplug.cost import CostModel
from specplug.drafters.base import DraftContext, StepOutcome
from specplug.drafters.ngram import NgramDrafter, NgramOptions
from specplug.sampling import SamplingParams
from specplug.tree import ChainBuilder

MAX_DEPTH = NgramDrafter.default_num_speculative_tokens  # the adaptive rule's and oracle's cap


def record_greedy(model_name: str, prompts: str, max_new: int, path: Path) -> list[dict]:
    """Every turn's prompt ids and the target's greedy answer, as ``specplug bench`` builds
    them (later turns carry the earlier greedy answers); read from ``path`` when present."""
    if path.is_file():
        return [json.loads(line) for line in path.read_text().splitlines()]
    import torch

    from specplug.bench.prompts import load_questions
    from specplug.models import encode_conversation, load_model

    model, tok = load_model(model_name)
    turns = []
    for q in load_questions(prompts):
        history: list[dict[str, str]] = []
        for t, text in enumerate(q.turns):
            history.append({"role": "user", "content": text})
            ids = encode_conversation(tok, history)
            x = torch.tensor([ids])
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new,
                                 do_sample=False)[0, len(ids):].tolist()
            turns.append({"question_id": q.question_id, "category": q.category,
                          "turn": t + 1, "prompt": ids, "answer": out})
            history.append({"role": "assistant",
                            "content": tok.decode(out, skip_special_tokens=True)})
    path.write_text("".join(json.dumps(r) + "\n" for r in turns))
    return turns


def _accepted(draft: list[int], truth: list[int]) -> int:
    n = 0
    while n < len(draft) and n < len(truth) and draft[n] == truth[n]:
        n += 1
    return n


def replay(turns: list[dict], rule: str, cost: CostModel, max_new: int, overhead: float,
           max_depth: int = MAX_DEPTH) -> dict[str, Any]:
    """Replay one rule (``adaptive``, ``fixed:K`` or ``oracle``, the last two drafting at
    most ``max_depth`` tokens) over every turn with one drafter (its learnt acceptance
    carries across turns, as in ``specplug bench``)."""
    kind, _, k = rule.partition(":")
    if kind == "fixed":
        drafter = NgramDrafter(NgramOptions(), max_depth=int(k))
    elif kind == "adaptive" or kind == "oracle":
        drafter = NgramDrafter(NgramOptions(), max_depth=max_depth)
    else:
        raise ValueError(f"unknown rule {rule!r}: adaptive, fixed:K or oracle")
    builder = ChainBuilder(drafter.max_depth)  # the engine's: top candidate at every depth
    step = {d: cost.relative(1 + d) + overhead for d in range(drafter.max_depth + 1)}
    time: dict[str, float] = defaultdict(float)
    plain: dict[str, float] = defaultdict(float)
    tokens = steps = 0
    accepted: list[list[int]] = []  # per turn: draft tokens accepted per step
    for turn in turns:
        prompt, answer, cat = turn["prompt"], turn["answer"], turn["category"]
        drafter.start([prompt])
        accepted.append([])
        p = 1  # the first token comes from the prefill, as in the engine
        while p < len(answer):
            ctx = DraftContext(tokens=[prompt + answer[:p]], active=[True],
                               sampling=SamplingParams(), cost=cost, adaptive=kind == "adaptive")
            # vocab_size sizes draft distributions, which a deterministic drafter has none of
            tree = builder.build(drafter, ctx, [max_new - p - 1], vocab_size=1)
            draft = tree.tokens[0, :int(tree.num_nodes[0])].tolist()
            n = _accepted(draft, answer[p:])
            if kind == "oracle":  # knows n: drafts the count that pays best, at most n
                draft = draft[:max(range(n + 1), key=lambda d: (d + 1) / step[d])]
                n = len(draft)
            drafter.observe(StepOutcome(accepted=[draft[:n]], bonus=[None],
                                        tokens=[prompt + answer[:p + n + 1]]))
            time[cat] += step[len(draft)]
            accepted[-1].append(n)
            p += n + 1
            steps += 1
        plain[cat] += (len(answer) - 1) * (1.0 + overhead)
        tokens += len(answer) - 1
    return {"rule": rule, "speedup": sum(plain.values()) / sum(time.values()),
            "accepted_per_step": tokens / max(steps, 1),
            "by_category": {c: plain[c] / time[c] for c in sorted(time)}, "accepted": accepted}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", default=str(Path(__file__).with_name("prompts.jsonl")))
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--fixed", type=int, nargs="+", default=[1, 2, 3, 4, 8, 16])
    ap.add_argument("--max-depth", type=int, default=MAX_DEPTH,
                    help="the adaptive rule's and the oracle's cap (num_speculative_tokens)")
    ap.add_argument("--overhead", type=float, default=0.08,
                    help="per-step cost besides the target forward, in one-token forwards")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    turns = record_greedy(args.model, args.prompts, args.max_new_tokens, out / "greedy.jsonl")

    from specplug.engine import ModelTargetRunner
    from specplug.models import load_model

    model, _ = load_model(args.model)  # the engine's cached calibration of this machine
    cost = ModelTargetRunner(model).calibrate_cost(turns[0]["prompt"])
    rules = ["adaptive", *(f"fixed:{k}" for k in args.fixed), "oracle"]
    results = [replay(turns, r, cost, args.max_new_tokens, args.overhead, args.max_depth)
               for r in rules]
    best = max((r for r in results if r["rule"].startswith("fixed")), key=lambda r: r["speedup"])
    cats = sorted(results[0]["by_category"])
    print(f"{len(turns)} turns; speedups in cost-model units; best fixed: {best['rule']}")
    print("rule        speedup  vs best fixed  accepted/step  " + " ".join(c[:8] for c in cats))
    for r in results:
        print(f"{r['rule']:11s} {r['speedup']:6.3f}x  {r['speedup'] / best['speedup'] - 1:+7.1%}"
              f"  {r['accepted_per_step']:13.2f}  "
              + " ".join(f"{r['by_category'][c]:8.2f}" for c in cats))
    (out / f"replay-depth{args.max_depth}.json").write_text(json.dumps(
        {"model": args.model, "turns": len(turns), "overhead": args.overhead,
         "max_depth": args.max_depth,
         "curve_ms": {n: t * 1000 for n, t in sorted(cost.times.items())},
         "results": [{k: v for k, v in r.items() if k != "accepted"} for r in results]},
        indent=1))


if __name__ == "__main__":
    main()
