"""The interleaved benchmark loop and its aggregates.

Methods run prompt by prompt in a fixed interleaved order (A B C A B C ...) after a warm-up, so
drift on a noisy machine hits all of them alike. Multi-turn questions replay the baseline's
own earlier answers. At temperature 0 every method's tokens are compared with the baseline's.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from specplug.bench.methods import Method
from specplug.bench.prompts import Question

__all__ = ["BASELINE", "Row", "aggregate", "reference_of", "run_benchmark", "run_concurrent"]

BASELINE = "hf:greedy"


@dataclass
class Row:
    """One method on one turn of one question (times: every repeat, seconds)."""

    question_id: int | str
    category: str
    turn: int
    method: str
    prompt_tokens: int
    new_tokens: int
    times_s: list[float]
    target_forwards: int
    accepted_per_step: list[int]
    identical: bool | None  # None: not checked (sampling) or the baseline itself
    first_mismatch: int | None = None

    @property
    def wall_s(self) -> float:
        return statistics.median(self.times_s)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["wall_s"] = self.wall_s
        return d


def _first_mismatch(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@dataclass
class Progress:
    """What the progress bar shows; ``update`` is called once per generation."""

    total: int
    bar: Any = field(default=None)

    def __post_init__(self) -> None:
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, unit="gen", dynamic_ncols=True)
        except ImportError:  # tqdm is in the hf extra; without it, no bar
            self.bar = None

    def update(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description(text[:60])
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_benchmark(model: Any, tokenizer: Any, questions: Sequence[Question],
                  methods: Sequence[Method], *, max_new_tokens: int, repeats: int = 1,
                  temperature: float = 0.0, progress: bool = True) -> list[Row]:
    """Run every method on every turn, interleaved; the baseline must be ``methods[0]``."""
    from specplug.models import encode_conversation

    if not methods or methods[0].name != BASELINE:
        raise ValueError(f"the first method must be the baseline {BASELINE!r}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    check = temperature == 0.0
    turns = sum(len(q.turns) for q in questions)
    bar = Progress(turns * len(methods) * repeats + len(methods)) if progress else None
    warm = torch.tensor([encode_conversation(
        tokenizer, [{"role": "user", "content": questions[0].turns[0]}])])
    for m in methods:
        m.run(warm, min(8, max_new_tokens))
        if bar:
            bar.update(f"warm-up {m.name}")
    rows: list[Row] = []
    for q in questions:
        history: list[dict[str, str]] = []
        for t, turn in enumerate(q.turns):
            history.append({"role": "user", "content": turn})
            ids = torch.tensor([encode_conversation(tokenizer, history)])
            times: dict[str, list[float]] = {m.name: [] for m in methods}
            runs: dict[str, Any] = {}
            for _ in range(repeats):
                for m in methods:
                    if bar:
                        bar.update(f"{q.category} #{q.question_id}.{t + 1} {m.name}")
                    t0 = time.perf_counter()
                    runs[m.name] = m.run(ids, max_new_tokens)
                    times[m.name].append(time.perf_counter() - t0)
            ref = runs[BASELINE].tokens
            for m in methods:
                r = runs[m.name]
                want = runs[reference_of(m, methods)].tokens
                same = None if (not check or m.name == reference_of(m, methods)) \
                    else r.tokens == want
                rows.append(Row(q.question_id, q.category, t + 1, m.name, ids.shape[1],
                                len(r.tokens), times[m.name], r.target_forwards,
                                r.accepted_per_step, same,
                                None if same in (None, True) else _first_mismatch(r.tokens,
                                                                                   want)))
            history.append({"role": "assistant",
                            "content": tokenizer.decode(ref, skip_special_tokens=True)})
    if bar:
        bar.close()
    return rows


def reference_of(method: Method, methods: Sequence[Method]) -> str:
    """The method whose temperature-0 output ``method`` must reproduce: its own reference when
    that is in the run (``vllm:none`` for vLLM methods), else the baseline."""
    names = {m.name for m in methods}
    return method.reference if method.reference in names else BASELINE


def run_concurrent(tokenizer: Any, questions: Sequence[Question], methods: Sequence[Method],
                   *, max_new_tokens: int, concurrency: int = 8, repeats: int = 1,
                   temperature: float = 0.0) -> dict[str, Any]:
    """Throughput with ``concurrency`` requests in flight, for methods that batch (engines).

    The first-turn prompts are taken in groups of ``concurrency``; each group is submitted at
    once to every method in turn (interleaved), ``repeats`` times. Per method: total new tokens
    over the median wall time of each group, and, at temperature 0, how many requests differ
    from the method's reference (None: not checked, the reference is not an engine in the run
    or the method is its own reference).
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    from specplug.models import encode_conversation

    engines = [m for m in methods if m.batch is not None]
    if not engines:
        return {}
    prompts = [encode_conversation(tokenizer, [{"role": "user", "content": q.turns[0]}])
               for q in questions]
    groups = [prompts[i:i + concurrency] for i in range(0, len(prompts), concurrency)]
    groups = [g for g in groups if len(g) == concurrency] or groups[:1]
    for m in engines:  # warm-up at this batch size
        m.batch(groups[0][:concurrency], min(8, max_new_tokens))
    checked = {m.name: temperature == 0.0 and reference_of(m, engines) in
               {e.name for e in engines} and reference_of(m, engines) != m.name
               for m in engines}
    stats = {m.name: {"tokens": 0, "seconds": 0.0,
                      "mismatches": 0 if checked[m.name] else None} for m in engines}
    for group in groups:
        outs: dict[str, list[list[int]]] = {}
        times: dict[str, list[float]] = {m.name: [] for m in engines}
        for _ in range(repeats):
            for m in engines:
                t0 = time.perf_counter()
                outs[m.name] = m.batch(group, max_new_tokens)
                times[m.name].append(time.perf_counter() - t0)
        for m in engines:
            s = stats[m.name]
            s["tokens"] += sum(len(o) for o in outs[m.name])
            s["seconds"] += statistics.median(times[m.name])
            if checked[m.name]:
                ref = outs[reference_of(m, engines)]
                s["mismatches"] += sum(a != b for a, b in zip(outs[m.name], ref))
    for m in engines:
        s = stats[m.name]
        s["tokens_per_s"] = s["tokens"] / s["seconds"] if s["seconds"] else 0.0
        ref = reference_of(m, engines)
        base = stats.get(ref)
        s["reference"] = ref if ref in stats else None
        s["speedup_vs_reference"] = (s["tokens_per_s"] / base["tokens_per_s"]
                                     if base and base["tokens_per_s"] else None)
    return {"concurrency": max(len(g) for g in groups), "requests": sum(len(g) for g in groups),
            "methods": stats}


#: a turn is "slower" below this speedup; repeats "disagree" when their spread exceeds this
SLOW_TURN, REPEAT_SPREAD = 0.95, 0.20


def _spread(times: list[float]) -> float:
    """(slowest - fastest) / median of one turn's repeats; 0 for a single timing."""
    med = statistics.median(times) if times else 0.0
    return (max(times) - min(times)) / med if len(times) > 1 and med > 0 else 0.0


def _summary(rows: list[Row], base: list[Row]) -> dict[str, Any]:
    """Token-weighted figures (``speedup``: total tokens over total time, what the tables
    print) beside per-turn ones that one disturbed timing cannot move much: the median and
    geometric mean of per-turn speedups, the worst turn, the number of turns below
    ``SLOW_TURN``, and the turns whose repeats (of this method or the baseline) spread by more
    than ``REPEAT_SPREAD``."""
    tok, sec = sum(r.new_tokens for r in rows), sum(r.wall_s for r in rows)
    btok, bsec = sum(r.new_tokens for r in base), sum(r.wall_s for r in base)
    pairs = [(r, (r.new_tokens / r.wall_s) / (b.new_tokens / b.wall_s))
             for r, b in zip(rows, base) if r.wall_s > 0 and b.wall_s > 0 and b.new_tokens
             and r.new_tokens]
    per_prompt = [x for _, x in pairs]
    worst = min(pairs, key=lambda rx: rx[1], default=None)
    noisy = [f"{r.question_id}/{r.turn}" for r, b in zip(rows, base)
             if max(_spread(r.times_s), _spread(b.times_s)) > REPEAT_SPREAD]
    fwd = sum(r.target_forwards for r in rows)
    steps = sum(len(r.accepted_per_step) for r in rows)
    accepted = sum(sum(r.accepted_per_step) for r in rows)
    return {
        "turns": len(rows),
        "new_tokens": tok,
        "tokens_per_s": tok / sec if sec else 0.0,
        "speedup": (tok / sec) / (btok / bsec) if sec and bsec and btok else 0.0,
        "median_prompt_speedup": statistics.median(per_prompt) if per_prompt else 0.0,
        "geomean_prompt_speedup": statistics.geometric_mean(per_prompt) if per_prompt else 0.0,
        "worst_prompt_speedup": worst[1] if worst else 0.0,
        "worst_prompt": f"{worst[0].question_id}/{worst[0].turn}" if worst else None,
        "prompts_below_0.95": sum(1 for x in per_prompt if x < SLOW_TURN),
        "noisy_repeats": noisy,
        # tokens emitted per verification step (accepted drafts + the bonus token), as
        # GenerationStats defines it; 1.0 for plain decoding
        "mean_accepted_tokens": (accepted + steps) / steps if steps else 1.0,
        "tokens_per_forward": tok / fwd if fwd else 0.0,
        "mismatches": sum(1 for r in rows if r.identical is False),
    }


def aggregate(rows: list[Row], references: dict[str, str] | None = None) -> dict[str, Any]:
    """Per method: overall and per-category throughput speedup over the baseline (ratio of
    tokens per second over the same turns), median per-turn speedup, mean accepted tokens per
    verification step, new tokens per target forward (prefill included), and the number of
    turns whose tokens differ from the method's reference. ``references``: method -> the
    method it is checked against, when not the baseline; those methods also get their overall
    ``speedup_vs_reference``."""
    methods = list(dict.fromkeys(r.method for r in rows))
    cats = sorted({r.category for r in rows})
    key = lambda r: (r.question_id, r.turn)  # noqa: E731
    base = {key(r): r for r in rows if r.method == BASELINE}
    out: dict[str, Any] = {}
    for m in methods:
        mine = [r for r in rows if r.method == m]
        out[m] = {"overall": _summary(mine, [base[key(r)] for r in mine]),
                  "categories": {}}
        for c in cats:
            sub = [r for r in mine if r.category == c]
            out[m]["categories"][c] = _summary(sub, [base[key(r)] for r in sub])
    for m, ref in (references or {}).items():
        if m in out and ref in out and ref != m:
            mine = out[m]["overall"]["tokens_per_s"]
            theirs = out[ref]["overall"]["tokens_per_s"]
            out[m]["reference"] = ref
            out[m]["overall"]["speedup_vs_reference"] = mine / theirs if theirs else 0.0
    return out
