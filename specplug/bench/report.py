"""Writing a benchmark's results: ``results.json``, ``results.md`` and PNG plots."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from specplug.bench.harness import BASELINE, Row
from specplug.files import atomic_write_bytes, atomic_write_text

__all__ = ["machine_info", "markdown_table", "replot", "write_plots", "write_results"]


def machine_info() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions: dict[str, str] = {"python": sys.version.split()[0], "torch": torch.__version__}
    for mod in ("transformers", "specplug"):
        with contextlib.suppress(ImportError):
            versions[mod] = __import__(mod).__version__
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "gpu": None, "versions": versions}


def markdown_table(aggregates: dict[str, Any], title: str) -> str:
    """Spec-Bench style: speedup (mean accepted tokens) per category and overall."""
    methods = list(aggregates)
    cats = list(next(iter(aggregates.values()))["categories"])
    head = ["method", *cats, "overall", "mismatches"]
    lines = [f"### {title}", "",
             "Each cell: speedup over `hf:greedy` (tokens/s ratio) / mean accepted tokens per "
             "verification step (accepted drafts + bonus token).", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for m in methods:
        a = aggregates[m]
        cells = [f"{a['categories'][c]['speedup']:.2f}x / {a['categories'][c]['mean_accepted_tokens']:.2f}"
                 for c in cats]
        o = a["overall"]
        mism = o["mismatches"]
        flag = f"**{mism} MISMATCH**" if mism else "0"
        ref = f" (vs `{a['reference']}`)" if a.get("reference") else ""
        lines.append(f"| `{m}` | " + " | ".join(cells) +
                     f" | **{o['speedup']:.2f}x** / {o['mean_accepted_tokens']:.2f} | {flag}{ref} |")
    lines += ["", "Per turn (each turn's speedup, so that one disturbed timing cannot move the "
              "figure much; the cells above and the plots are token-weighted):", "",
              "| method | median | geometric mean | worst turn | turns below 0.95x | "
              "turns whose repeats spread > 20% |", "|---|---|---|---|---|---|"]
    for m in methods:
        o = aggregates[m]["overall"]
        noisy = o.get("noisy_repeats", [])
        lines.append(f"| `{m}` | {o['median_prompt_speedup']:.2f}x | "
                     f"{o.get('geomean_prompt_speedup', 0.0):.2f}x | "
                     f"{o.get('worst_prompt_speedup', 0.0):.2f}x ({o.get('worst_prompt')}) | "
                     f"{o.get('prompts_below_0.95', 0)} of {o['turns']} | "
                     f"{len(noisy)}{': ' + ', '.join(noisy[:8]) if noisy else ''} |")
    engines = {m: a for m, a in aggregates.items() if a.get("reference")}
    if engines:
        lines += ["", "Engines against their own plain run (batch 1, the same turns): "
                  + ", ".join(f"`{m}` {a['overall']['speedup_vs_reference']:.2f}x over "
                              f"`{a['reference']}`" for m, a in engines.items()) + "."]
    return "\n".join(lines) + "\n"


def concurrent_table(concurrent: dict[str, Any]) -> str:
    """Throughput with several requests in flight (engines only)."""
    if not concurrent:
        return ""
    lines = ["", f"#### {concurrent['concurrency']} concurrent requests "
             f"({concurrent['requests']} requests in groups)", "",
             "| method | tokens/s | speedup vs reference | mismatches |", "|---|---|---|---|"]
    for m, s in concurrent["methods"].items():
        vs = f"{s['speedup_vs_reference']:.2f}x vs `{s['reference']}`" \
            if s.get("speedup_vs_reference") and s["reference"] != m else "-"
        mism = "-" if s["mismatches"] is None else \
            f"**{s['mismatches']} MISMATCH**" if s["mismatches"] else "0"
        lines.append(f"| `{m}` | {s['tokens_per_s']:.1f} | {vs} | {mism} |")
    return "\n".join(lines) + "\n"


def write_plots(rows: list[Row], aggregates: dict[str, Any], out: Path, title: str) -> list[str]:
    """``speedup_by_category.png`` and ``accepted_lengths.png``; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in aggregates if m != BASELINE]
    cats = list(next(iter(aggregates.values()))["categories"])
    fig, ax = plt.subplots(figsize=(max(8, len(cats) * 1.3), 4.5))
    width = 0.8 / max(1, len(methods))
    for i, m in enumerate(methods):
        vals = [aggregates[m]["categories"][c]["speedup"] for c in cats] + \
            [aggregates[m]["overall"]["speedup"]]
        ax.bar([j + i * width for j in range(len(cats) + 1)], vals, width, label=m)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(cats) + 1)])
    ax.set_xticklabels([*cats, "overall"], rotation=30, ha="right")
    ax.set_ylabel("speedup over hf:greedy")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    _save_figure(fig, out / "speedup_by_category.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for m in methods:
        counts = Counter(a for r in rows if r.method == m for a in r.accepted_per_step)
        if not counts:
            continue
        total = sum(counts.values())
        xs = sorted(counts)
        ax.plot(xs, [counts[x] / total for x in xs], marker="o", label=m)
    ax.set_xlabel("draft tokens accepted in a step")
    ax.set_ylabel("fraction of steps")
    ax.set_title(f"{title}: accepted length per step")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_figure(fig, out / "accepted_lengths.png")
    plt.close(fig)
    return ["speedup_by_category.png", "accepted_lengths.png"]


def replot(folder: Path) -> list[str]:
    """Redraw the plots of a finished run from its ``results.json``."""
    doc = json.loads((folder / "results.json").read_text())
    fields = set(Row.__dataclass_fields__)
    rows = [Row(**{k: v for k, v in r.items() if k in fields}) for r in doc["rows"]]
    s = doc["settings"]
    title = f"{s['model']}, {s['max_new_tokens']} new tokens, T={s['temperature']}"
    return write_plots(rows, doc["aggregates"], folder, title)


def _save_figure(fig: Any, path: Path) -> None:
    """Render ``fig`` as PNG and write it atomically (a killed run leaves no half image)."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(path, buffer.getvalue())


def write_results(out: Path, settings: dict[str, Any], rows: list[Row],
                  aggregates: dict[str, Any], plots: bool = True,
                  concurrent: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write everything to ``out``; returns the JSON document."""
    out.mkdir(parents=True, exist_ok=True)
    title = f"{settings['model']}, {settings['max_new_tokens']} new tokens, " \
            f"T={settings['temperature']}"
    doc = {"machine": machine_info(), "settings": settings,
           "rows": [r.to_json() for r in rows], "aggregates": aggregates}
    if concurrent:
        doc["concurrent"] = concurrent
    atomic_write_text(out / "results.json", json.dumps(doc, indent=1))
    table = markdown_table(aggregates, title) + concurrent_table(concurrent or {})
    atomic_write_text(out / "results.md", table)
    doc["files"] = ["results.json", "results.md"]
    if plots:
        doc["files"] += write_plots(rows, aggregates, out, title)
    return doc
