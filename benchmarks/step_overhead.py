"""What a decode step that drafts nothing costs, against ``model.generate``'s own step.

Issue 22, item 2: when drafts miss, the adaptive budget drafts nothing, and such a step must
cost what a plain step costs. This measures, per model, the per-token time of

- ``hf:greedy``: ``model.generate(do_sample=False)``;
- ``engine``: ``specplug.hf.generate`` (specplug's engine) with a drafter that never drafts;
- ``assisted``: ``model.generate(assistant_model=specplug.hf.assistant(...))`` with that drafter;
- ``engine:ngram`` / ``assisted:ngram``: the default ngram drafter on prompts whose answers
  copy nothing (its lookups run and miss: what a user's no-copy prompt really costs).

A step's time is ``(t(N tokens) - t(1 token)) / (N - 1)`` (the prefill cancels), the median
over ``--repeats`` rounds, each round running every method once on each prompt in turn (A/B
interleaved). Every method's tokens are checked against ``hf:greedy``'s.

    python benchmarks/step_overhead.py --models smollm2-135m gemma3-270m \\
        --out benchmarks/results/step_overhead.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import specplug.hf
from specplug.bench.prompts import load_questions
from specplug.bench.report import machine_info
from specplug.config import SpecConfig
from specplug.drafters.base import EMPTY, Drafter
from specplug.engine import Speculator
from specplug.models import encode_prompt, load_model
from specplug.plugins import get_registry


class NeverDrafter(Drafter):
    """Proposes nothing, ever: every step is a plain one-token step through specplug."""

    name = "never"

    def begin(self, ctx: Any) -> list[Any]:
        return [None] * len(ctx.tokens)

    def expand(self, frontier: Any, k: int) -> Any:
        return [[EMPTY for _ in row] for row in frontier]


def _methods(model: Any) -> dict[str, Any]:
    reg = get_registry()
    if "never" not in reg.drafters:
        reg.drafters["never"] = NeverDrafter
    never = Speculator.from_config(SpecConfig(method="never"), model)
    ngram = Speculator.from_config(SpecConfig(method="ngram"), model)
    a_never = specplug.hf.assistant(model, "never")
    a_ngram = specplug.hf.assistant(model, "ngram")

    def hf(ids: torch.Tensor, n: int, **kw: Any) -> list[int]:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                             do_sample=False, **kw)
        return out[0, ids.shape[1]:].tolist()

    def engine(spec: Speculator):
        def run(ids: torch.Tensor, n: int) -> list[int]:
            out = specplug.hf.generate(model, ids, max_new_tokens=n, do_sample=False,
                                       speculator=spec)
            return out[0, ids.shape[1]:].tolist()
        return run

    return {
        "hf:greedy": hf,
        "engine": engine(never),
        "assisted": lambda ids, n: hf(ids, n, assistant_model=a_never),
        "engine:ngram": engine(ngram),
        "assisted:ngram": lambda ids, n: hf(ids, n, assistant_model=a_ngram),
    }


def _timed(fn: Any, ids: torch.Tensor, n: int) -> tuple[float, list[int]]:
    t0 = time.perf_counter()
    toks = fn(ids, n)
    return time.perf_counter() - t0, toks


def measure(name: str, prompts: list[str], tokens: int, repeats: int) -> dict[str, Any]:
    model, tok = load_model(name)
    methods = _methods(model)
    ids = [torch.tensor([encode_prompt(tok, p)]) for p in prompts]
    for fn in methods.values():  # warm-up (and the cost curve's calibration, untimed)
        fn(ids[0], 4)
    per_step: dict[str, list[float]] = {m: [] for m in methods}
    mismatches: dict[str, int] = {m: 0 for m in methods}
    for _ in range(repeats):
        for x in ids:
            ref = None
            for m, fn in methods.items():
                t1, _ = _timed(fn, x, 1)
                tn, toks = _timed(fn, x, tokens)
                if ref is None:
                    ref = toks
                mismatches[m] += toks != ref[: len(toks)] or len(toks) != len(ref)
                per_step[m].append((tn - t1) / max(len(toks) - 1, 1))
    base = statistics.median(per_step["hf:greedy"])
    rows = {}
    for m, v in per_step.items():
        med = statistics.median(v)
        # per (repeat, prompt) pair: this method's step over hf:greedy's measured beside it
        ratios = [a / b for a, b in zip(v, per_step["hf:greedy"], strict=True)]
        rows[m] = {"step_ms": med * 1000, "vs_greedy": med / base,
                   "median_pair_ratio": statistics.median(ratios), "mismatches": mismatches[m]}
        print(f"{name:14s} {m:15s} {med * 1000:7.2f} ms/step  {med / base:.3f}x of greedy's "
              f"step (median pair ratio {statistics.median(ratios):.3f})  "
              f"mismatches {mismatches[m]}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--category", default="no_copy")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out")
    args = ap.parse_args()
    questions = [q for q in load_questions("benchmarks/prompts.jsonl")
                 if q.category == args.category][: args.prompts]
    prompts = [q.turns[0] for q in questions]
    result = {"machine": machine_info(), "tokens": args.tokens, "repeats": args.repeats,
              "prompts": [q.question_id for q in questions],
              "models": {m: measure(m, prompts, args.tokens, args.repeats)
                         for m in args.models}}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
