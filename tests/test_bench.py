"""The benchmark harness on a tiny model: parsing, interleaving, multi-turn replay, mismatch
detection and the results schema. Nothing here times anything."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import WORDS, tiny_llama, tiny_tokenizer

from specplug.bench.harness import BASELINE, Row, aggregate, run_benchmark
from specplug.bench.methods import Method, MethodRun, parse_method
from specplug.bench.prompts import load_questions
from specplug.bench.report import markdown_table, replot, write_results
from specplug.cli import main


def sentence(seed: int, n: int = 12) -> str:
    g = torch.Generator().manual_seed(seed)
    motif = [WORDS[int(i)] for i in torch.randint(0, len(WORDS), (4,), generator=g)]
    return " ".join((motif * n)[:n])


@pytest.fixture()
def prompt_file(tmp_path):
    rows = [
        {"question_id": 1, "category": "code_editing", "turns": [sentence(1)]},
        {"question_id": 2, "category": "code_editing", "turns": [sentence(2)]},
        {"question_id": 3, "category": "multi_turn", "turns": [sentence(3), sentence(4, 6)]},
        {"question_id": 4, "category": "qa", "turns": [sentence(5)]},
    ]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_load_questions_and_limit(prompt_file):
    qs = load_questions(prompt_file)
    assert [q.question_id for q in qs] == [1, 2, 3, 4]
    assert qs[2].turns[1] == sentence(4, 6)
    assert [q.question_id for q in load_questions(prompt_file, limit=1)] == [1, 3, 4]
    assert [q.category for q in load_questions(prompt_file, categories=["qa"])] == ["qa"]


@pytest.mark.parametrize("line, needle", [
    ('{"category": "x", "turns": ["a"]}', "missing field 'question_id'"),
    ('{"question_id": 1, "category": "x", "turns": []}', "non-empty list"),
    ('{"question_id": 1, "category": "x", "turns": "a"}', "non-empty list"),
    ("{not json", "not JSON"),
])
def test_load_questions_errors(tmp_path, line, needle):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=needle):
        load_questions(path)


def test_method_options_keep_brackets():
    from specplug.config import parse_key_values

    assert parse_key_values("tree=static,tree_paths=[[0],[1],[0,0]],layers=[0,1],x=a") == {
        "tree": "static", "tree_paths": [[0], [1], [0, 0]], "layers": [0, 1], "x": "a"}
    with pytest.raises(ValueError, match="'layers' must be KEY=VALUE"):
        parse_key_values("a=1,layers")


def test_parse_method_errors():
    model = tiny_llama(0)
    with pytest.raises(ValueError, match="unknown baseline 'hf:beam'"):
        parse_method("hf:beam", model, lambda n: None)
    with pytest.raises(ValueError, match="unknown speculative method 'nope'"):
        parse_method("nope", model, lambda n: None)
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_method("ngram:prompt_lookup_max", model, lambda n: None)


class Logged:
    def __init__(self, method: Method, log: list[str]):
        self.name, self.inner, self.log = method.name, method, log
        self.reference, self.batch, self.close = method.reference, None, None

    def run(self, ids, max_new):
        self.log.append(self.name)
        return self.inner.run(ids, max_new)


def test_interleaving_replay_mismatch_and_schema(prompt_file, tmp_path):
    model, tok = tiny_llama(0), tiny_tokenizer()
    log: list[str] = []
    specs = [BASELINE, "ngram:num_speculative_tokens=3", "hf:prompt_lookup:3"]
    methods = [Logged(parse_method(s, model, lambda n: None), log) for s in specs]
    broken = Method("broken", lambda ids, n: MethodRun(
        [7] + methods[0].inner.run(ids, n).tokens[1:], 1, []))
    methods.append(Logged(broken, log))
    questions = load_questions(prompt_file)
    rows = run_benchmark(model, tok, questions, methods, max_new_tokens=10, repeats=2,
                         progress=False)
    names = [m.name for m in methods]
    # warm-up once each, then A B C D A B C D for every turn (5 turns x 2 repeats)
    assert log == names + names * 2 * 5
    by = {(r.question_id, r.turn, r.method): r for r in rows}
    assert len(rows) == 5 * len(methods)
    # multi-turn: turn 2 is prompted with turn 1 + the baseline's own answer
    assert by[(3, 2, BASELINE)].prompt_tokens > by[(3, 1, BASELINE)].prompt_tokens
    for r in rows:
        assert len(r.times_s) == 2 and r.new_tokens == 10
        if r.method in specs[1:]:
            assert r.identical is True
    assert by[(1, 1, "hf:prompt_lookup:3")].target_forwards == \
        len(by[(1, 1, "hf:prompt_lookup:3")].accepted_per_step)
    bad = [r for r in rows if r.method == "broken"]
    assert all(r.identical is False for r in bad)
    assert {r.first_mismatch for r in bad} <= {0}

    agg = aggregate(rows)
    assert agg["broken"]["overall"]["mismatches"] == 5
    assert agg["ngram:num_speculative_tokens=3"]["overall"]["mismatches"] == 0
    assert set(agg[BASELINE]["categories"]) == {"code_editing", "multi_turn", "qa"}
    assert agg[BASELINE]["overall"]["speedup"] == pytest.approx(1.0)

    doc = write_results(tmp_path / "out", {"model": "tiny", "max_new_tokens": 10,
                                           "temperature": 0.0}, rows, agg)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(saved) == {"machine", "settings", "rows", "aggregates"}
    assert {"cpu", "cpu_count", "versions"} <= set(saved["machine"])
    assert {"question_id", "category", "turn", "method", "new_tokens", "times_s", "wall_s",
            "target_forwards", "accepted_per_step", "identical"} <= set(saved["rows"][0])
    for m in agg:
        assert {"speedup", "mean_accepted_tokens", "tokens_per_forward", "mismatches",
                "tokens_per_s",
                "median_prompt_speedup"} <= set(saved["aggregates"][m]["overall"])
    table = (tmp_path / "out" / "results.md").read_text()
    assert "**5 MISMATCH**" in table and "`ngram:num_speculative_tokens=3`" in table
    for png in ("speedup_by_category.png", "accepted_lengths.png"):
        assert (tmp_path / "out" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "speedup_by_category.png" in doc["files"]
    (tmp_path / "out" / "accepted_lengths.png").unlink()
    assert replot(tmp_path / "out") == ["speedup_by_category.png", "accepted_lengths.png"]
    assert (tmp_path / "out" / "accepted_lengths.png").exists()


def test_cli_bench_on_a_local_model_folder(prompt_file, tmp_path):
    folder = tmp_path / "tiny"
    tiny_llama(0).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    rc = main(["bench", "--model", str(folder), "--methods", "ngram hf:prompt_lookup:3",
               "--prompts", str(prompt_file), "--limit", "1", "--max-new-tokens", "6",
               "--out", str(tmp_path / "res"), "--no-progress", "--no-plots"])
    assert rc == 0
    saved = json.loads((tmp_path / "res" / "results.json").read_text())
    assert saved["settings"]["methods"] == [BASELINE, "ngram", "hf:prompt_lookup:3"]
    assert len(saved["rows"]) == 4 * 3  # 3 questions (4 turns) x 3 methods


# ------------------------------------------------------------------ engine (vLLM) methods


def test_vllm_method_specs():
    from specplug.bench.vllm_methods import VLLM_NGRAM, vllm_speculative_config

    assert vllm_speculative_config("none") is None
    assert vllm_speculative_config("ngram") == VLLM_NGRAM
    assert vllm_speculative_config("ngram:3")["num_speculative_tokens"] == 3
    assert vllm_speculative_config("specplug:draft_model:model=smollm2-135m,"
                                   "num_speculative_tokens=3") == {
        "method": "specplug", "drafter": "draft_model", "model": "smollm2-135m",
        "num_speculative_tokens": 3}
    with pytest.raises(ValueError, match="known: vllm:none"):
        vllm_speculative_config("eagle")
    with pytest.raises(ValueError, match="bogus"):  # validated before any engine starts
        vllm_speculative_config("specplug:ngram:bogus=1")


def test_accepted_lengths_from_vllm_counters():
    from specplug.bench.vllm_methods import accepted_lengths

    # 4 drafts: accepted 3, 1, 0, 2 tokens; then 2 steps without a draft; 1 prefill token
    counters = {"num_drafts": 4, "num_accepted_tokens": 6,
                "num_accepted_tokens_per_pos": [3, 2, 1, 0]}
    new_tokens = 1 + (3 + 1) + (1 + 1) + (0 + 1) + (2 + 1) + 1 + 1
    assert sorted(accepted_lengths(new_tokens, counters)) == [0, 0, 0, 1, 2, 3]
    assert accepted_lengths(5, {}) == [0, 0, 0, 0]  # plain decoding: one token per step
    # vLLM counted 3 accepted in a last step that max_tokens cut to 1 emitted token: two
    # steps (2 tokens, then 1), not the 3 + 1 accepted the counters say
    cut = {"num_drafts": 2, "num_accepted_tokens": 4, "num_accepted_tokens_per_pos": [2, 1, 1]}
    assert sorted(accepted_lengths(1 + 2 + 1, cut)) == [0, 1]


def test_engine_methods_checked_against_their_own_reference(prompt_file, tmp_path):
    """vLLM methods are compared with vllm:none (not with transformers), in the interleaved
    run and at concurrency; a wrong engine output is counted, loudly, in both."""
    from specplug.bench.harness import reference_of, run_concurrent

    model, tok = tiny_llama(0), tiny_tokenizer()
    base = parse_method(BASELINE, model, lambda n: None)

    def engine(name: str, shift: int) -> Method:
        def run(ids, n):  # an "engine" whose plain output is off by `shift` from transformers
            return MethodRun([(t + shift) % 96 for t in base.run(ids, n).tokens], 1, [])

        def batch(prompts, n):
            return [run(torch.tensor([p]), n).tokens for p in prompts]

        return Method(name, run, reference="vllm:none", batch=batch)

    methods = [base, engine("vllm:none", 1), engine("vllm:specplug:ngram", 1),
               engine("vllm:broken", 2)]
    assert [reference_of(m, methods) for m in methods] == [BASELINE, "vllm:none", "vllm:none",
                                                           "vllm:none"]
    questions = load_questions(prompt_file)
    rows = run_benchmark(model, tok, questions, methods, max_new_tokens=6, progress=False)
    agg = aggregate(rows, {m.name: reference_of(m, methods) for m in methods if m.reference})
    assert agg["vllm:none"]["overall"]["mismatches"] == 0  # its own reference
    assert agg["vllm:specplug:ngram"]["overall"]["mismatches"] == 0
    assert agg["vllm:broken"]["overall"]["mismatches"] == 5
    assert agg["vllm:specplug:ngram"]["reference"] == "vllm:none"
    assert agg["vllm:specplug:ngram"]["overall"]["speedup_vs_reference"] > 0
    conc = run_concurrent(tok, questions, methods, max_new_tokens=6, concurrency=2)
    assert set(conc["methods"]) == {"vllm:none", "vllm:specplug:ngram", "vllm:broken"}
    assert conc["methods"]["vllm:specplug:ngram"]["mismatches"] == 0
    assert conc["methods"]["vllm:broken"]["mismatches"] == 4  # 4 first turns, 2 groups
    write_results(tmp_path / "out", {"model": "tiny", "max_new_tokens": 6, "temperature": 0.0},
                  rows, agg, plots=False, concurrent=conc)
    table = (tmp_path / "out" / "results.md").read_text()
    assert "2 concurrent requests" in table and "**4 MISMATCH**" in table


def _row(qid, method, secs, tokens=100, cat="qa"):
    return Row(question_id=qid, category=cat, turn=1, method=method, prompt_tokens=10,
               new_tokens=tokens, times_s=list(secs), target_forwards=tokens,
               accepted_per_step=[0] * tokens, identical=None if method == BASELINE else True)


def test_per_turn_figures_resist_one_disturbed_timing():
    """Nine turns at 1.0x and one whose baseline timing was disturbed (10x slow): the
    token-weighted speedup is inflated, the median, geometric mean and worst turn are not,
    and the disturbed turn is flagged by the spread of its repeats."""
    rows = []
    for q in range(10):
        base = [10.0, 10.0, 100.0] if q == 3 else [1.0, 1.0, 1.0]  # median 10 s for q 3
        rows += [_row(q, BASELINE, base), _row(q, "m", [1.0, 1.0, 1.0] if q != 7 else [2.0] * 3)]
    o = aggregate(rows)["m"]["overall"]
    assert o["speedup"] > 1.6  # token-weighted: the one slow baseline turn dominates
    assert o["median_prompt_speedup"] == pytest.approx(1.0)
    assert 0.9 < o["geomean_prompt_speedup"] < 1.3
    assert o["worst_prompt_speedup"] == pytest.approx(0.5) and o["worst_prompt"] == "7/1"
    assert o["prompts_below_0.95"] == 1
    assert o["noisy_repeats"] == ["3/1"]
    table = markdown_table(aggregate(rows), "t")
    assert "0.50x (7/1)" in table and "1 of 10" in table
