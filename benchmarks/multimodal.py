"""Speculative decoding on a vision-language target: acceptance and speed per drafter.

The target is the VLM ``benchmarks/toy_vlm.py`` assembles and trains here (LLaVA: the real
SmolLM2-135M-Instruct + a small trained CLIP tower; no real VLM ships on PyPI). Each prompt is
one synthetic image and a question; every method runs on every prompt, A/B interleaved (the
order rotates per prompt and repeat), greedy, and its output is checked token for token against
plain ``model.generate``. Reported per method: mean accepted tokens per target forward (1.0 =
no help), acceptance rate, and the median over prompts of the wall-time speed ratio to
``generate`` run in the same round.

    python benchmarks/multimodal.py --model ~/.cache/specplug/models/smollm2-135m-toyvlm \\
        --msd /tmp/sp/heads/toyvlm-msd --out benchmarks/results/multimodal
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toy_vlm import image_prompts  # noqa: E402

import specplug.hf as sh  # noqa: E402
from specplug.drafters.trained_heads import SHIPPED  # noqa: E402
from specplug.models import load_model, load_processor  # noqa: E402
from specplug.train.data import image_prompt_text  # noqa: E402


def methods(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {
        "ngram": {"method": "ngram"},
        "draft_model (text-only SmolLM2)": {"method": "draft_model", "model": "smollm2-135m",
                                            "num_speculative_tokens": 4},
        "layer_skip (15 of 30 layers)": {"method": "layer_skip", "layers": 15},
        "eagle (shipped SmolLM2 head, text-trained)": {
            "method": "eagle", "checkpoint": str(SHIPPED / "smollm2-135m" / "eagle")},
    }
    if args.msd:
        out["msd (two-stage, this VLM)"] = {"method": "msd", "checkpoint": args.msd}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--msd", default=None, help="a trained msd head folder")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    model, tok = load_model(args.model)
    processor = load_processor(args.model)
    spec = methods(args)
    # one Speculator per method, built once (loads the draft model / heads once)
    from specplug.config import SpecConfig
    from specplug.engine import Speculator

    built = {name: Speculator.from_config(SpecConfig(**opts), model)
             for name, opts in spec.items()}
    rows: list[dict[str, Any]] = []
    names = ["generate", *spec]
    for i, (image, question) in enumerate(image_prompts(args.prompts, seed=5000)):
        enc = dict(processor(images=image, text=image_prompt_text(processor, question),
                             return_tensors="pt"))
        L = enc["input_ids"].shape[1]
        for rep in range(args.repeats):
            shift = (i + rep) % len(names)
            order = names[shift:] + names[:shift]
            results: dict[str, Any] = {}
            for name in order:
                t0 = time.perf_counter()
                if name == "generate":
                    seq = model.generate(**enc, max_new_tokens=args.max_new_tokens,
                                         do_sample=False)
                    stats = None
                else:
                    seq, stats = sh.generate(model, **enc, max_new_tokens=args.max_new_tokens,
                                             do_sample=False, speculator=built[name],
                                             return_stats=True)
                results[name] = (time.perf_counter() - t0, seq[0, L:].tolist(), stats)
            ref_t, ref, _ = results["generate"]
            for name in spec:
                t, toks, stats = results[name]
                rows.append({"prompt": i, "repeat": rep, "method": name,
                             "identical": toks == ref, "new_tokens": len(toks),
                             "speed_vs_generate": ref_t / t,
                             "mean_accepted_tokens": stats.mean_accepted_tokens,
                             "acceptance_rate": stats.acceptance_rate,
                             "generate_s": ref_t, "method_s": t})
            print(f"prompt {i} rep {rep}: {tok.decode(ref)[:70]!r}", flush=True)
    summary = {}
    for name in spec:
        mine = [r for r in rows if r["method"] == name]
        summary[name] = {
            "identical": all(r["identical"] for r in mine),
            "mean_accepted_tokens": round(statistics.mean(r["mean_accepted_tokens"]
                                                          for r in mine), 3),
            "acceptance_rate": round(statistics.mean(r["acceptance_rate"] for r in mine), 3),
            "median_speed_vs_generate": round(statistics.median(r["speed_vs_generate"]
                                                                for r in mine), 3),
        }
    machine = {"cpu": platform.processor() or platform.machine(),
               "threads": torch.get_num_threads(), "torch": torch.__version__}
    report = {"model": str(args.model), "prompts": args.prompts, "repeats": args.repeats,
              "max_new_tokens": args.max_new_tokens, "machine": machine, "summary": summary,
              "rows": rows}
    print(json.dumps({"machine": machine, "summary": summary}, indent=2))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "multimodal.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
