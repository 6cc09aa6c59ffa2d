"""Measure and plot the target's forward cost by number of tokens scored (docs/adaptive.md).

The same calibration the engine runs once per model and device (``specplug.calibration``), here
measured now (the cache is neither read nor written) and with more repeats, for each model; writes ``cost_curve.json`` and
``cost_curve.png`` under ``--out``.

    python benchmarks/cost_curve.py --models smollm2-135m gemma3-270m \\
        --out benchmarks/results/adaptive
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from specplug.bench.report import machine_info
from specplug.calibration import CALIBRATION_WIDTHS
from specplug.engine import ModelTargetRunner
from specplug.models import encode_prompt, load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    curves = {}
    for name in args.models:
        model, tok = load_model(name)
        runner = ModelTargetRunner(model)
        prompt = encode_prompt(tok, "Describe the water cycle in a few paragraphs.")
        cost = runner.calibrate_cost(prompt, repeats=args.repeats, use_cache=False)
        curves[name] = {n: cost.times[n] * 1000 for n in CALIBRATION_WIDTHS}
        print(name, {n: f"{ms:.1f} ms" for n, ms in curves[name].items()}, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    machine = (f"{info['cpu']}, {info['cpu_count']} vCPU, {info['torch_threads']} torch "
               f"threads, torch {info['versions']['torch']}")
    (out / "cost_curve.json").write_text(json.dumps(
        {"machine": machine, "repeats": args.repeats, "ms_by_tokens": curves}, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, c in curves.items():
        ns = sorted(c)
        ax.plot(ns, [c[n] / c[1] for n in ns], marker="o", label=f"{name} ({c[1]:.0f} ms at 1)")
    ax.set_xlabel("tokens scored in one target forward")
    ax.set_ylabel("cost relative to 1 token")
    ax.set_title(f"Target forward cost (median of {args.repeats}), {machine.split(',')[0]}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "cost_curve.png", dpi=110)


if __name__ == "__main__":
    main()
