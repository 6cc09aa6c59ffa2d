"""``specplug`` command line: ``specplug run ...`` (more subcommands as they land)."""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from typing import Any

__all__ = ["main"]

#: the benchmark's prompt set, relative to a checkout: ``specplug data`` leaves it out
BENCHMARK_PROMPTS = "benchmarks/prompts.jsonl"


def _parse_option(text: str) -> tuple[str, Any]:
    from specplug.config import parse_key_value

    try:
        return parse_key_value(text, "--option")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _int_at_least(low: int) -> Any:
    """An argparse ``type``: a whole number ``>= low``, refused with the value and the bound."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return parse


def _float_in(low: float, high: float = math.inf, *, low_open: bool = False) -> Any:
    """An argparse ``type``: a finite number in ``[low, high]`` (``(low, high]`` if
    ``low_open``), refused with the value and the range."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        below = value <= low if low_open else value < low
        if not math.isfinite(value) or below or value > high:
            bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"must be a number in {bounds}, got {text}")
        return value
    return parse


def _prompt(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("the prompt is empty: pass some text")
    return text


def _machine() -> str:
    import os

    return f"{platform.machine()} {os.cpu_count()} CPU, {platform.system()}"


def _target_runner(model: Any, speculator: Any) -> Any:
    from specplug.engine import ModelTargetRunner

    return ModelTargetRunner(model, hidden_layers=speculator.drafter.hidden_layers)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from specplug.calibration import cost_cache_dir
    from specplug.engine import ModelTargetRunner
    from specplug.models import encode_prompt, load_model

    model, tokenizer = load_model(args.model)
    prompt = encode_prompt(tokenizer, "Calibration: how long a forward takes.", chat=False)
    t0 = time.perf_counter()
    cost = ModelTargetRunner(model).calibrate_cost(prompt)
    report = {"model": args.model, "seconds": round(time.perf_counter() - t0, 2),
              "relative_cost": {n: round(cost.relative(n), 3) for n in sorted(cost.times)},
              "cache": str(cost_cache_dir()), "machine": _machine()}
    print(json.dumps(report))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    import torch

    from specplug.adapters.hf_generate import generate
    from specplug.config import SpecConfig
    from specplug.engine import Speculator, check_context
    from specplug.models import encode_prompt, load_model

    spec = SpecConfig.from_cli(args.method, args.num_speculative_tokens, args.tree,
                               dict(args.option or []))
    model, tokenizer = load_model(args.model)
    chat = None if args.chat == "auto" else args.chat == "yes"
    ids = torch.tensor([encode_prompt(tokenizer, args.prompt, chat=chat)])
    speculator = Speculator.from_config(spec, model)
    # before the warm-up, whose shorter run would otherwise be the one refused
    check_context(ids.shape[1], args.max_new_tokens, _target_runner(model, speculator).max_context)
    # the cost curve an adaptive budget reads: measured (or read from the cache) here, never
    # inside a timed generation
    t0 = time.perf_counter()
    if speculator.adaptive and not speculator.cost.calibrated:
        speculator.cost = _target_runner(model, speculator).calibrate_cost(ids[0].tolist())
    calibration_s = time.perf_counter() - t0
    gen: dict[str, Any] = {"max_new_tokens": args.max_new_tokens}
    if args.temperature > 0:
        gen.update(do_sample=True, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p)
    else:
        gen.update(do_sample=False)

    def spec_run() -> tuple[list[int], Any, float]:
        g = torch.Generator().manual_seed(args.seed)
        t0 = time.perf_counter()
        seqs, stats = generate(model, ids, speculator=speculator, generator=g,
                               return_stats=True, **gen)
        return seqs[0, ids.shape[1]:].tolist(), stats, time.perf_counter() - t0

    def base_run() -> tuple[list[int], float]:
        torch.manual_seed(args.seed)
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **gen)
        return out[0, ids.shape[1]:].tolist(), time.perf_counter() - t0

    if args.compare:  # warm both paths once so neither pays first-call costs
        warm = dict(gen, max_new_tokens=min(8, args.max_new_tokens))
        generate(model, ids, speculator=speculator, **warm)
        model.generate(ids, attention_mask=torch.ones_like(ids), **warm)
    spec_times, base_times = [], []
    tokens, stats = [], None
    base_tokens: list[int] = []
    for _ in range(args.repeats):  # interleaved A/B
        tokens, stats, dt = spec_run()
        spec_times.append(dt)
        if args.compare:
            base_tokens, bt = base_run()
            base_times.append(bt)
    spec_s = sorted(spec_times)[len(spec_times) // 2]
    report: dict[str, Any] = {
        "model": args.model, "method": args.method, "config": spec.describe(),
        "text": tokenizer.decode(tokens, skip_special_tokens=True),
        "new_tokens": len(tokens),
        "mean_accepted_tokens": round(stats.mean_accepted_tokens, 3),
        "target_forwards": stats.target_forwards,
        "tokens_per_s": round(len(tokens) / spec_s, 2), "wall_time_s": round(spec_s, 3),
        "temperature": args.temperature, "repeats": args.repeats, "machine": _machine(),
        "calibration_s": round(calibration_s, 3),  # not in any timing above
    }
    if args.compare:
        base_s = sorted(base_times)[len(base_times) // 2]
        report.update(
            baseline_tokens_per_s=round(len(base_tokens) / base_s, 2),
            baseline_wall_time_s=round(base_s, 3),
            speedup=round((len(tokens) / spec_s) / (len(base_tokens) / base_s), 3),
            identical=(tokens == base_tokens) if args.temperature == 0 else None,
        )
    if args.json:
        print(json.dumps(report))
    else:
        print(report["text"])
        print("-" * 60)
        line = (f"{report['new_tokens']} tokens, {report['tokens_per_s']} tok/s, "
                f"mean accepted tokens/step {report['mean_accepted_tokens']}")
        if args.compare:
            line += (f" | baseline {report['baseline_tokens_per_s']} tok/s, speedup "
                     f"{report['speedup']}x, identical: {report['identical']}")
        print(line)
    if args.compare and report.get("identical") is False:
        print("ERROR: speculative output differs from the target's greedy output",
              file=sys.stderr)
        return 3
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from specplug.bench.harness import (
        BASELINE,
        aggregate,
        reference_of,
        run_benchmark,
        run_concurrent,
    )
    from specplug.bench.methods import parse_method
    from specplug.bench.prompts import load_questions
    from specplug.bench.report import concurrent_table, markdown_table, write_results
    from specplug.models import load_model, resolve_model_dir

    questions = load_questions(args.prompts, args.limit, args.categories)
    model, tokenizer = load_model(args.model)
    loaded: dict[str, Any] = {}

    def load(name: str) -> Any:
        if name not in loaded:
            loaded[name] = load_model(name)[0]
        return loaded[name]

    specs = [BASELINE] + [m for m in args.methods.split(";" if ";" in args.methods else " ")
                          if m and m != BASELINE]
    if any(s.startswith("sglang:") for s in specs) and "sglang:none" not in specs:
        # SGLang's CPU engines are bf16: their outputs are checked against SGLang without
        # speculation, never against the float32 baseline
        specs.insert(1, "sglang:none")
    model_dir = str(resolve_model_dir(args.model))
    methods = []
    try:
        for s in specs:
            methods.append(parse_method(s, model, load, args.temperature, model_dir))
        rows = run_benchmark(model, tokenizer, questions, methods,
                             max_new_tokens=args.max_new_tokens, repeats=args.repeats,
                             temperature=args.temperature, progress=not args.no_progress)
        concurrent = run_concurrent(tokenizer, questions, methods,
                                    max_new_tokens=args.max_new_tokens,
                                    concurrency=args.concurrency, repeats=args.repeats,
                                    temperature=args.temperature)
    finally:
        for m in methods:
            if m.close is not None:
                m.close()
    references = {m.name: reference_of(m, methods) for m in methods if m.reference}
    aggregates = aggregate(rows, {m: r for m, r in references.items() if r != BASELINE})
    settings = {"model": args.model, "methods": specs, "prompts": str(args.prompts),
                "limit": args.limit, "max_new_tokens": args.max_new_tokens,
                "repeats": args.repeats, "temperature": args.temperature,
                "concurrency": args.concurrency,
                "command": "specplug " + " ".join(sys.argv[1:])}
    write_results(Path(args.out), settings, rows, aggregates, plots=not args.no_plots,
                  concurrent=concurrent)
    print(markdown_table(aggregates, args.model) + concurrent_table(concurrent))
    bad = {m: a["overall"]["mismatches"] for m, a in aggregates.items()
           if a["overall"]["mismatches"]}
    bad.update({f"{m} (x{concurrent['concurrency']})": s["mismatches"]
                for m, s in (concurrent or {}).get("methods", {}).items() if s["mismatches"]})
    if bad:
        print(f"ERROR: outputs differ from their reference ({BASELINE}, or vllm:none and "
              f"sglang:none for engine methods): {bad}", file=sys.stderr)
        return 3
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    import json

    from specplug.drafters.trained_heads import shipped_head
    from specplug.heads.export import export_vllm_eagle
    from specplug.models import resolve_model_dir

    folder = resolve_model_dir(args.model)
    head = args.checkpoint or shipped_head(str(folder), args.drafter)
    out = export_vllm_eagle(head, args.out,
                            json.loads((folder / "config.json").read_text()))
    print(f"{args.drafter} head ({head}) in vLLM's EAGLE-1 layout: {out}")
    spec = json.dumps({"method": "eagle", "model": str(out), "num_speculative_tokens": 4})
    print(f"serve it: python -m vllm.entrypoints.openai.api_server --model {folder} "
          f"--speculative-config '{spec}'")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import shlex

    from specplug.heads.config import HEAD_KINDS
    from specplug.train.pipeline import DataSettings, train
    from specplug.train.trainer import TrainSettings

    if args.drafter not in HEAD_KINDS:
        raise ValueError(f"--drafter {args.drafter!r} is not a trainable head; choose one of "
                         f"{', '.join(HEAD_KINDS)}")
    data = DataSettings(data=args.data, seed_tasks=not args.no_seed_tasks, expand=args.expand,
                        max_new_tokens=args.max_new_tokens, tokens=args.tokens)
    settings = TrainSettings.for_kind(args.drafter, epochs=args.epochs, lr=args.lr,
                                      batch_size=args.batch_size)
    command = "specplug " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    stage2 = None
    if args.image_data:
        stage2 = TrainSettings.for_kind(args.drafter, epochs=args.stage2_epochs, lr=args.lr,
                                        batch_size=args.batch_size)
    report = train(args.model, args.drafter, args.out, data=data, settings=settings,
                   num_heads=args.num_heads, draft_vocab_size=args.draft_vocab,
                   cache=args.cache, progress=not args.no_progress, command=command,
                   image_data=args.image_data, stage2_settings=stage2, init=args.init,
                   shards=args.shards)
    h = report["heldout"]
    print(f"{args.drafter} head for {args.model}: {args.out}")
    for d in h.get("top1", {}):
        print(f"  depth {d}: held-out top-1 {h['top1'][d]:.3f}  top-5 {h['top5'][d]:.3f}")
    print(f"  held-out mean accepted tokens per step: "
          f"{report['acceptance']['mean_accepted_per_step']:.2f}  "
          f"(wall {report['wall_s']['total']:.0f} s, {report['checkpoint_mb']} MB)")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from specplug.bench.prompts import load_questions
    from specplug.drafters.trained_heads import shipped_head
    from specplug.files import atomic_write_text
    from specplug.heads.checkpoint import load_head
    from specplug.models import load_model, resolve_model_dir
    from specplug.train.evaluation import evaluate_head, evaluation_markdown

    questions = load_questions(args.prompts, limit=args.limit, categories=args.categories)
    prompts = [q.turns[0] for q in questions]
    head = args.checkpoint or shipped_head(str(resolve_model_dir(args.model)), args.drafter)
    net = load_head(head)
    if net.config.kind != args.drafter:
        raise ValueError(f"--checkpoint {head} holds a {net.config.kind!r} head, not "
                         f"{args.drafter!r}; pass --drafter {net.config.kind}")
    model, tokenizer = load_model(args.model)
    net.bind(model.get_input_embeddings(), model.get_output_embeddings().weight)
    result = evaluate_head(model, tokenizer, net, prompts, max_new_tokens=args.max_new_tokens,
                           batch_size=args.batch_size, acceptance_prompts=args.acceptance_prompts)
    result.update({"model": str(args.model), "drafter": args.drafter, "checkpoint": str(head),
                   "prompts_file": str(args.prompts), "max_new_tokens": args.max_new_tokens})
    title = f"{args.drafter} head for {args.model} on {Path(args.prompts).name} (first turns)"
    text = evaluation_markdown(result, title)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "evaluation.json", json.dumps(result, indent=2) + "\n")
        atomic_write_text(out / "evaluation.md", text)
    print(text, end="")
    return 0


def _float_list(text: str) -> tuple[float, ...]:
    parse = _float_in(0.0, 2.0)
    try:
        return tuple(parse(t) for t in text.split(",") if t.strip())
    except argparse.ArgumentTypeError as err:
        raise argparse.ArgumentTypeError(f"a comma-separated list of temperatures: {err}"
                                         ) from None


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers, got "
                                         f"{text!r}") from None


def _cmd_data(args: argparse.Namespace) -> int:
    from pathlib import Path

    from specplug.bench.prompts import load_questions
    from specplug.models import load_model
    from specplug.train.data import SEED_TASKS, load_prompts
    from specplug.train.shards import ShardSettings, build_shards, check_folder, prompt_set

    check_folder(args.out)  # before loading anything
    base = [] if args.no_seed_tasks else load_prompts(SEED_TASKS)
    for f in args.data or []:
        base += load_prompts(f)
    exclude = args.exclude
    if exclude is None and Path(BENCHMARK_PROMPTS).is_file():
        exclude = [BENCHMARK_PROMPTS]  # never train on the benchmark
    excluded = [t for path in exclude or [] for q in load_questions(path) for t in q.turns]
    model, tokenizer = load_model(args.model)
    settings = ShardSettings(model=str(args.model), hidden_layers=args.hidden_layers,
                             topk=args.topk, temperatures=args.temperatures,
                             max_new_tokens=args.max_new_tokens, chunk=args.chunk,
                             batch_size=args.batch_size, seed=args.seed)
    prompts = prompt_set(model, tokenizer, args.out, base, args.expand, excluded,
                         seed=args.seed, batch_size=args.batch_size)
    started = time.perf_counter()

    def show(e: dict[str, Any]) -> None:
        if not args.no_progress:
            print(f"  shard {e['unit'] + 1}/{e['units']}: {e['tokens']} tokens "
                  f"(T={e['temperature']}), {e['total_tokens']} in all, "
                  f"{time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)

    report = build_shards(model, tokenizer, prompts, Path(args.out), settings,
                          max_tokens=args.tokens,
                          max_bytes=int(args.max_gb * 2**30) if args.max_gb else None,
                          progress=show)
    rates = report.rates()
    print(json.dumps({"out": args.out, "prompts": len(prompts), "shards": report.shards,
                      "tokens": report.tokens, "response_tokens": report.response_tokens,
                      "gigabytes": round(report.bytes / 2**30, 3), "complete": report.complete,
                      "this_run": {"shards": report.new_shards, "tokens": report.new_tokens,
                                   "response_tokens": report.new_response_tokens,
                                   "generate_s": round(report.seconds_generate, 1),
                                   "prefill_s": round(report.seconds_prefill, 1),
                                   **{k: round(v, 1) for k, v in rates.items()}}}))
    return 0


def _add_prompt_sources(parser: argparse.ArgumentParser, expand: int) -> None:
    """The training prompts' options, alike for ``train`` and ``data``."""
    parser.add_argument("--data", action="append", default=None, metavar="FILE",
                        help="extra prompts: JSONL (instruction/prompt/text/turns) or one per "
                             "line")
    parser.add_argument("--no-seed-tasks", action="store_true",
                        help="do not use the shipped Self-Instruct seed tasks")
    parser.add_argument("--expand", type=_int_at_least(0), default=expand,
                        help="new prompts the target writes from the others (self-instruct)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="specplug", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="one speculative generation with a speed/acceptance report")
    r.add_argument("--model", default="smollm2-135m",
                   help="smollm2-135m | gemma3-270m | a local HF folder")
    r.add_argument("--method", default="ngram", help="drafter name (ngram, draft_model, ...)")
    r.add_argument("--num-speculative-tokens", type=_int_at_least(1), default=None)
    r.add_argument("--tree", default=None,
                   help="chain | static:[[0],[1],[0,0]] | dynamic:budget=16,topk=4")
    r.add_argument("--option", action="append", type=_parse_option, metavar="KEY=VALUE",
                   help="drafter option, repeatable (e.g. --option layers=8)")
    r.add_argument("--temperature", type=_float_in(0.0), default=0.0,
                   help="0 = greedy")
    r.add_argument("--top-k", type=_int_at_least(0), default=0, help="0 = off")
    r.add_argument("--top-p", type=_float_in(0.0, 1.0, low_open=True), default=1.0)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--prompt", required=True, type=_prompt)
    r.add_argument("--chat", choices=("auto", "yes", "no"), default="auto",
                   help="apply the chat template (auto: when the tokenizer has one)")
    r.add_argument("--max-new-tokens", type=_int_at_least(1), default=128)
    r.add_argument("--repeats", type=_int_at_least(1), default=1, help="timed runs (median reported)")
    r.add_argument("--compare", action="store_true",
                   help="also run plain model.generate, interleaved, and compare")
    r.add_argument("--json", action="store_true", help="print one JSON object")
    r.set_defaults(func=_cmd_run)

    b = sub.add_parser("bench", help="interleaved side-by-side benchmark on a prompt set")
    b.add_argument("--model", default="smollm2-135m")
    b.add_argument("--methods", required=True,
                   help="space- or ';'-separated: specplug methods (ngram, "
                        "layer_skip:layers=8, ...) and baselines hf:greedy, "
                        "hf:prompt_lookup[:K], hf:early_exit[:LAYER], hf:assisted:model=NAME, "
                        "real vLLM engines vllm:none, vllm:ngram[:K], "
                        "vllm:specplug:DRAFTER[:KEY=VALUE,...] (docs/vllm.md), real SGLang "
                        "engines sglang:none, sglang:ngram, sglang:specplug:DRAFTER[:...] "
                        "(docs/sglang.md); hf:greedy always runs first, and sglang:none "
                        "with any sglang: method (their bf16 reference)")
    b.add_argument("--prompts", default=BENCHMARK_PROMPTS,
                   help="JSONL in the MT-bench question format")
    b.add_argument("--limit", type=_int_at_least(1), default=None, help="first N questions per category")
    b.add_argument("--categories", nargs="*", default=None)
    b.add_argument("--max-new-tokens", type=_int_at_least(1), default=128)
    b.add_argument("--repeats", type=_int_at_least(1), default=1, help="interleaved repeats (median time)")
    b.add_argument("--temperature", type=_float_in(0.0), default=0.0)
    b.add_argument("--concurrency", type=_int_at_least(1), default=8,
                   help="requests in flight for the engines' (vllm:, sglang:) throughput run")
    b.add_argument("--out", required=True, help="folder for results.json, results.md, plots")
    b.add_argument("--no-plots", action="store_true")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(func=_cmd_bench)

    c = sub.add_parser("calibrate", help="measure the target's cost curve once and cache it "
                                         "(else the first adaptive generation measures it)")
    c.add_argument("--model", default="smollm2-135m",
                   help="smollm2-135m | gemma3-270m | a local HF folder")
    c.set_defaults(func=_cmd_calibrate)

    x = sub.add_parser("export", help="write a trained eagle head in vLLM's EAGLE-1 layout")
    x.add_argument("--model", default="smollm2-135m",
                   help="the target: smollm2-135m | gemma3-270m | a local HF folder")
    x.add_argument("--drafter", default="eagle", choices=("eagle",),
                   help="the head kind (vLLM serves EAGLE-1 heads natively)")
    x.add_argument("--checkpoint", default=None,
                   help="the head folder (default: the head shipped for --model)")
    x.add_argument("--to", default="vllm", choices=("vllm",), help="the target format")
    x.add_argument("--out", required=True, help="folder to write (config.json, "
                                                "model.safetensors)")
    x.set_defaults(func=_cmd_export)

    t = sub.add_parser("train", help="train a draft head by self-distillation from the target")
    t.add_argument("--model", default="smollm2-135m")
    t.add_argument("--drafter", required=True,
                   help="medusa | clover | clover2 | eagle | msd (vision-language targets)")
    _add_prompt_sources(t, expand=200)
    t.add_argument("--tokens", type=_int_at_least(1), default=None,
                   help="stop generating training responses after about N tokens")
    t.add_argument("--max-new-tokens", type=_int_at_least(1), default=192, help="per training response")
    t.add_argument("--epochs", type=_int_at_least(1), default=None)
    t.add_argument("--lr", type=_float_in(0.0, low_open=True), default=None)
    t.add_argument("--batch-size", type=_int_at_least(1), default=None)
    t.add_argument("--num-heads", type=_int_at_least(1), default=4, help="draft depth the head is trained for")
    t.add_argument("--draft-vocab", type=_int_at_least(1), default=8192,
                   help="ids the head may propose (most frequent in the training data)")
    t.add_argument("--image-data", default=None, metavar="FILE",
                   help="msd: JSONL of {\"image\": PATH, \"prompt\": TEXT}; trains a second, "
                        "multimodal stage after the text-only one")
    t.add_argument("--stage2-epochs", type=_int_at_least(1), default=None,
                   help="epochs of the multimodal stage (default: as --epochs)")
    t.add_argument("--init", default=None, metavar="HEAD",
                   help="start from a trained head (an eagle head gives msd its text stage)")
    t.add_argument("--cache", default=None, help="folder for the generated data (reused)")
    t.add_argument("--shards", default=None, metavar="DIR",
                   help="train on a folder `specplug data` built instead of generating data")
    t.add_argument("--out", required=True, help="checkpoint folder (resumes if it holds a "
                                                "training state)")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("evaluate", help="a trained head on prompts it was not trained on: "
                                        "top-1/top-5 by depth and measured acceptance")
    e.add_argument("--model", default="smollm2-135m")
    e.add_argument("--drafter", required=True, choices=("medusa", "clover", "clover2", "eagle"),
                   help="the head kind")
    e.add_argument("--checkpoint", default=None,
                   help="the head folder (default: the head shipped for --model)")
    e.add_argument("--prompts", default=BENCHMARK_PROMPTS,
                   help="JSONL in the MT-bench question format (each question's first turn)")
    e.add_argument("--limit", type=_int_at_least(1), default=None,
                   help="first N questions per category")
    e.add_argument("--categories", nargs="*", default=None)
    e.add_argument("--max-new-tokens", type=_int_at_least(1), default=128, help="per answer")
    e.add_argument("--batch-size", type=_int_at_least(1), default=8,
                   help="rows the target answers at once")
    e.add_argument("--acceptance-prompts", type=_int_at_least(1), default=8,
                   help="prompts the real speculative generation runs on")
    e.add_argument("--out", default=None, help="folder for evaluation.json and evaluation.md")
    e.set_defaults(func=_cmd_evaluate)

    d = sub.add_parser("data", help="build training data at scale: the target's batched "
                                    "responses and teacher-forced features, in resumable "
                                    "safetensors shards")
    d.add_argument("--model", default="smollm2-135m")
    d.add_argument("--out", required=True, help="shard folder (a second run resumes it)")
    _add_prompt_sources(d, expand=2000)
    d.add_argument("--exclude", action="append", default=None, metavar="JSONL",
                   help="prompts never to train on (MT-bench format); default: "
                        f"{BENCHMARK_PROMPTS} when it exists here")
    d.add_argument("--temperatures", type=_float_list, default=(0.0, 0.8),
                   help="one pass over the prompts per temperature (0 = greedy)")
    d.add_argument("--hidden-layers", type=_int_list, default=(-1,),
                   help="the target layers whose features are stored (comma-separated)")
    d.add_argument("--topk", type=_int_at_least(1), default=16,
                   help="the target's top-k next-token distribution stored per token")
    d.add_argument("--max-new-tokens", type=_int_at_least(1), default=192,
                   help="per response")
    d.add_argument("--chunk", type=_int_at_least(1), default=64, help="prompts per shard")
    d.add_argument("--batch-size", type=_int_at_least(1), default=32,
                   help="rows per batched generate")
    d.add_argument("--tokens", type=_int_at_least(1), default=None,
                   help="stop after the shards hold about N tokens")
    d.add_argument("--max-gb", type=_float_in(0.0, low_open=True), default=None,
                   help="stop after the shards take about N GiB")
    d.add_argument("--seed", type=_int_at_least(0), default=0)
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=_cmd_data)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.func in (_cmd_train, _cmd_data):
            return args.func(args)
        import torch

        with torch.no_grad():  # inference commands; scoped, so callers' grad mode is kept
            return args.func(args)
    except (ValueError, NotImplementedError, FloatingPointError, ImportError, OSError) as err:
        # every input problem (SpecplugError is a ValueError) and every file the user named
        # that cannot be read or written: one line, exit 2, no traceback
        print(f"specplug: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
