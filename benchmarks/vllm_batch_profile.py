"""What specplug's proposer decides inside vLLM at large batches: one process, offline.

Runs vLLM in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) on the first turns of
``benchmarks/prompts.jsonl`` (repeated to ``--requests``), greedy, twice, and records per step
the rows, the drafted tokens and the step cost the budget read for one and four draft tokens
a row (``BatchedCost.step_cost``); per n-gram match kind, the drafts, drafted and accepted
tokens and the accepted tokens the estimate predicted. ``--spec none`` runs plain vLLM for the
same tokens/s. Run it under vLLM's Python (``.venv-vllm/bin/python``), nothing else running:

    .venv-vllm/bin/python benchmarks/vllm_batch_profile.py --spec specplug --out /tmp/spec.json
    .venv-vllm/bin/python benchmarks/vllm_batch_profile.py --spec none --out /tmp/none.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", choices=("specplug", "none"), default="specplug")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    import specplug.drafters.ngram as ngram
    import specplug.serving as serving
    from specplug.cost import batch_view
    from specplug.models import resolve_model_dir

    steps: list[dict] = []
    kinds: dict[str, list[float]] = {}
    proposers: list[serving.ServingProposer] = []
    rates: dict[int, float] = {}

    draft = serving.ServingProposer.draft

    def traced_draft(self, rows, committed, *a, **k):  # noqa: ANN001, ANN002, ANN003
        tree = draft(self, rows, committed, *a, **k)
        counts = tree.num_nodes.tolist()
        active = max(1, sum(1 for c in committed if c))
        view = batch_view(self.speculator.cost, active)
        steps.append({"active": active, "drafted": sum(counts),
                      "one_draft_cost": round(view.step_cost(1), 3),
                      "four_draft_cost": round(view.step_cost(4), 3)})
        proposers[:] = [self]
        return tree

    rate = ngram._Acceptance.rate

    def traced_rate(self, row, kind, factor=1.0):  # noqa: ANN001
        rates[row] = value = rate(self, row, kind, factor)
        return value

    begin, observe = ngram.NgramDrafter.begin, ngram.NgramDrafter.observe

    def traced_begin(self, ctx):  # noqa: ANN001
        rates.clear()
        out = begin(self, ctx)
        self._profile_rates = dict(rates)
        return out

    def traced_observe(self, outcome):  # noqa: ANN001
        for b, ((kind, depth), accepted) in enumerate(zip(self.drafted, outcome.accepted)):
            if depth:
                row = kinds.setdefault(str(kind), [0, 0, 0, 0.0])
                row[0] += 1
                row[1] += depth
                row[2] += len(accepted)
                row[3] += ngram.expected_accepted(self._profile_rates.get(b, 0.0), depth)
        return observe(self, outcome)

    serving.ServingProposer.draft = traced_draft
    ngram._Acceptance.rate = traced_rate
    ngram.NgramDrafter.begin, ngram.NgramDrafter.observe = traced_begin, traced_observe

    from vllm import LLM, SamplingParams

    spec = ({"method": "specplug", "drafter": "ngram", "num_speculative_tokens": 4}
            if args.spec == "specplug" else None)
    turns = [json.loads(line)["turns"][0]
             for line in (HERE / "prompts.jsonl").read_text().splitlines() if line.strip()]
    chats = [[{"role": "user", "content": t}] for t in turns]
    chats = (chats * (args.requests // len(chats) + 1))[:args.requests]
    llm = LLM(model=str(resolve_model_dir("smollm2-135m")), enforce_eager=True,
              dtype="float32", max_model_len=2048, seed=0, speculative_config=spec)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    llm.chat(chats[:4], params, use_tqdm=False)  # warm-up
    report: dict = {"spec": args.spec, "tokens_per_s": []}
    for _ in range(2):
        started = time.perf_counter()
        out = llm.chat(chats, params, use_tqdm=False)
        wall = time.perf_counter() - started
        report["tokens_per_s"].append(sum(len(o.outputs[0].token_ids) for o in out) / wall)
    if proposers:
        times = proposers[0].speculator.cost.target.times
        report["step_ms_by_scored_tokens"] = {n: round(t * 1000, 2)
                                              for n, t in sorted(times.items())}
    report["kinds"] = {k: dict(zip(("drafts", "drafted", "accepted", "predicted"), v))
                       for k, v in kinds.items()}
    report["steps"] = steps
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({"tokens_per_s": report["tokens_per_s"],
                      "drafted": sum(s["drafted"] for s in steps)}))


if __name__ == "__main__":
    main()
