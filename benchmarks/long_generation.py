"""Long generations with and without test-time speculation (docs/adaptive.md).

For each prompt of the ``long_generation`` category, runs the drafter as shipped and with
``adapt={"test_time": ...}`` back to back (A/B interleaved, the order alternating per prompt and
repeat), checks both outputs are identical, and reports the mean accepted length (accepted
draft tokens + the bonus token, per verification step) in windows of ``--window`` output
tokens, overall, and tokens per second (update cost included). Writes ``results.json``,
``results.md`` and ``accepted_by_position.png`` under ``--out``.

    python benchmarks/long_generation.py --model smollm2-135m --method eagle \\
        --max-new-tokens 2048 --out benchmarks/results/adaptive/smollm2-135m-long
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from specplug import SpecConfig
from specplug.bench.prompts import load_questions
from specplug.bench.report import machine_info
from specplug.engine import ModelTargetRunner, Speculator, speculative_generate
from specplug.models import encode_prompt, load_model


def _machine() -> str:
    info = machine_info()
    return (f"{info['cpu']}, {info['cpu_count']} vCPU, {info['torch_threads']} torch threads, "
            f"torch {info['versions']['torch']}")


HERE = Path(__file__).resolve().parent


def windows(accepted: list[int], size: int) -> list[list[int]]:
    """Per window of ``size`` output tokens, the tokens emitted by each step that started in
    it (accepted + 1)."""
    out: list[list[int]] = []
    pos = 0
    for a in accepted:
        w = pos // size
        while len(out) <= w:
            out.append([])
        out[w].append(a + 1)
        pos += a + 1
    return out


def run_one(model: Any, spec: SpecConfig, ids: torch.Tensor, max_new: int, eos: list[int]
            ) -> dict[str, Any]:
    speculator = Speculator.from_config(spec, model)
    runner = ModelTargetRunner(model, hidden_layers=speculator.drafter.hidden_layers,
                               capacity=ids.shape[1] + max_new + 64)
    speculator.cost = runner.calibrate_cost(ids[0].tolist()) if speculator.adaptive \
        else speculator.cost
    t0 = time.perf_counter()
    out = speculative_generate(runner, speculator, ids, max_new_tokens=max_new,
                               eos_token_ids=eos)
    seconds = time.perf_counter() - t0
    tts = speculator.observers[0] if speculator.observers else None
    return {"tokens": out.sequences[0], "seconds": seconds,
            "accepted": out.stats.accepted_per_step[0],
            "updates": tts.updates if tts is not None else 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="eagle")
    ap.add_argument("--prompts", default=str(HERE / "prompts.jsonl"))
    ap.add_argument("--category", default="long_generation")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=2048)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--tts", default="{}", help="test_time options as JSON")
    ap.add_argument("--stop-at-eos", action="store_true",
                    help="end at EOS (default: generate max-new-tokens, as the paper does)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_model(args.model)
    eos = [tok.eos_token_id] if args.stop_at_eos and tok.eos_token_id is not None else []
    questions = load_questions(args.prompts, limit=args.limit, categories=[args.category])
    variants = {"shipped": SpecConfig(method=args.method),
                "test_time": SpecConfig(method=args.method,
                                        adapt={"test_time": json.loads(args.tts)})}
    rows = []
    for qi, q in enumerate(questions):
        ids = torch.tensor([encode_prompt(tok, q.turns[0])])
        for r in range(args.repeats):
            order = list(variants) if (qi + r) % 2 == 0 else list(variants)[::-1]
            runs = {name: run_one(model, variants[name], ids, args.max_new_tokens, eos)
                    for name in order}
            same = runs["shipped"]["tokens"] == runs["test_time"]["tokens"]
            for name, run in runs.items():
                w = windows(run["accepted"], args.window)
                rows.append({"question_id": q.question_id, "repeat": r, "variant": name,
                             "new_tokens": len(run["tokens"]), "seconds": run["seconds"],
                             "tokens_per_s": len(run["tokens"]) / run["seconds"],
                             "mean_accepted": statistics.fmean(a + 1 for a in run["accepted"]),
                             "window_mean_accepted": [statistics.fmean(x) for x in w],
                             "updates": run["updates"], "identical": same})
                print(json.dumps({k: v for k, v in rows[-1].items()
                                  if k != "window_mean_accepted"}), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(rows)
    meta = {"model": args.model, "method": args.method, "tts": json.loads(args.tts),
            "max_new_tokens": args.max_new_tokens, "window": args.window,
            "repeats": args.repeats, "prompts": [q.question_id for q in questions],
            "machine": _machine()}
    (out / "results.json").write_text(json.dumps({"meta": meta, "summary": summary,
                                                  "rows": rows}, indent=1))
    (out / "results.md").write_text(markdown(meta, summary))
    plot(summary, args, out / "accepted_by_position.png")
    print((out / "results.md").read_text())


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("shipped", "test_time"):
        mine = [r for r in rows if r["variant"] == name]
        n_w = max(len(r["window_mean_accepted"]) for r in mine)
        out[name] = {
            "mean_accepted": statistics.fmean(r["mean_accepted"] for r in mine),
            "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in mine),
            "by_window": [statistics.fmean(r["window_mean_accepted"][i] for r in mine
                                           if len(r["window_mean_accepted"]) > i)
                          for i in range(n_w)]}
    pairs = {}
    for r in rows:
        pairs.setdefault((r["question_id"], r["repeat"]), {})[r["variant"]] = r
    ratios = [p["test_time"]["tokens_per_s"] / p["shipped"]["tokens_per_s"]
              for p in pairs.values()]
    out["speed_ratio_median"] = statistics.median(ratios)
    out["accepted_ratio"] = out["test_time"]["mean_accepted"] / out["shipped"]["mean_accepted"]
    out["all_identical"] = all(r["identical"] for r in rows)
    return out


def markdown(meta: dict[str, Any], s: dict[str, Any]) -> str:
    lines = [f"### {meta['model']}, `{meta['method']}`, {meta['max_new_tokens']} new tokens, "
             f"greedy, prompts {meta['prompts']}", "",
             f"Machine: {meta['machine']}. test_time options: `{json.dumps(meta['tts'])}`.", "",
             "| variant | mean accepted length | tokens/s (median) |", "|---|---|---|"]
    for name in ("shipped", "test_time"):
        lines.append(f"| {name} | {s[name]['mean_accepted']:.2f} | "
                     f"{s[name]['tokens_per_s_median']:.2f} |")
    lines += ["", f"test_time / shipped: accepted length x{s['accepted_ratio']:.2f}, "
              f"tokens/s x{s['speed_ratio_median']:.2f} (median of per-prompt A/B ratios); "
              f"outputs identical: {s['all_identical']}.", "",
              f"Mean accepted length per {meta['window']}-token window of output:", "",
              "| window | " + " | ".join(str(i) for i in range(len(s["shipped"]["by_window"])))
              + " |", "|---|" + "---|" * len(s["shipped"]["by_window"])]
    for name in ("shipped", "test_time"):
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in s[name]["by_window"])
                     + " |")
    return "\n".join(lines) + "\n"


def plot(s: dict[str, Any], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name in ("shipped", "test_time"):
        ys = s[name]["by_window"]
        xs = [(i + 0.5) * args.window for i in range(len(ys))]
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel("output position (tokens)")
    ax.set_ylabel("mean accepted length")
    ax.set_title(f"{args.model}, {args.method}: accepted length vs position")
    ax.set_ylim(bottom=1.0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
