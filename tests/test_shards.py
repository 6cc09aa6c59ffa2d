"""Training data at scale (issue 24, item 1) on a tiny model: shards round-trip, a run
interrupted after any shard resumes to the same bytes, budgets stop it, damaged or foreign
folders are refused, benchmark prompts are kept out, and ``specplug data`` ties it together."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_llama, tiny_tokenizer

from specplug.errors import InputFileError, SpecplugError
from specplug.train import shards
from specplug.train.data import extract_features, generate_responses
from specplug.train.shards import ShardSettings, build_shards, iter_shard_examples

PROMPTS = [f"task {i}: repeat a b c d {i} a b c d" for i in range(10)]
SETTINGS = ShardSettings(model="tiny", hidden_layers=(-1, 1), topk=4, temperatures=(0.0, 1.0),
                         max_new_tokens=6, chunk=3, batch_size=2, seed=7)


@pytest.fixture(scope="module")
def target():
    return tiny_llama(0), tiny_tokenizer()


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.safetensors"))}


def test_shards_round_trip_what_the_target_wrote(target, tmp_path):
    model, tok = target
    report = build_shards(model, tok, PROMPTS, tmp_path, SETTINGS)
    assert report.complete and report.shards == 8  # 2 temperatures x ceil(10 / 3) units
    examples = list(iter_shard_examples(tmp_path, verify=True))
    assert sum(e.ids.numel() for e in examples) == report.tokens
    # the greedy pass is the target's own batched greedy responses, teacher-forced
    greedy = generate_responses(model, tok, PROMPTS[:3], max_new_tokens=6, batch_size=2)
    feats = extract_features(model, greedy, [-1, 1], topk=4)
    for ex, seq, f in zip(examples[:3], greedy, feats):
        assert ex.ids.tolist() == seq.ids and ex.prompt_len == len(seq.prompt)
        assert ex.features.shape == (len(seq.ids), 2 * model.config.hidden_size)
        assert torch.equal(ex.features, f["features"])
        assert torch.equal(ex.top_ids, f["top_ids"]) and torch.equal(ex.top_probs, f["top_probs"])
    index = shards.read_index(tmp_path)
    assert [e["temperature"] for e in index["shards"]] == [0.0] * 4 + [1.0] * 4
    sampled = examples[len(examples) // 2:]
    assert any(a.ids.tolist() != b.ids.tolist() for a, b in zip(examples, sampled))


class Stop(Exception):
    pass


@pytest.mark.parametrize("after", [1, 5])
def test_a_resumed_run_writes_the_same_shards(target, tmp_path, after):
    model, tok = target
    whole = tmp_path / "whole"
    build_shards(model, tok, PROMPTS, whole, SETTINGS)

    part = tmp_path / "part"
    seen = []

    def kill(entry):
        seen.append(entry)
        if len(seen) == after:
            raise Stop  # killed right after shard `after` was written
    with pytest.raises(Stop):
        build_shards(model, tok, PROMPTS, part, SETTINGS, progress=kill)
    assert len(_files(part)) == after
    report = build_shards(model, tok, PROMPTS, part, SETTINGS)
    assert report.new_shards == 8 - after and report.complete
    assert _files(part) == _files(whole)
    assert shards.read_index(part) == shards.read_index(whole)


def test_a_truncated_last_shard_is_rebuilt(target, tmp_path):
    model, tok = target
    build_shards(model, tok, PROMPTS, tmp_path, SETTINGS, max_tokens=1)
    (shard,) = tmp_path.glob("shard-*.safetensors")
    good = shard.read_bytes()
    shard.write_bytes(good[: len(good) // 2])
    with pytest.raises(InputFileError, match="missing or truncated"):
        list(iter_shard_examples(tmp_path))
    report = build_shards(model, tok, PROMPTS, tmp_path, SETTINGS, max_tokens=1)
    assert report.new_shards == 1 and shard.read_bytes() == good


def test_a_changed_shard_fails_verification(target, tmp_path):
    model, tok = target
    build_shards(model, tok, PROMPTS, tmp_path, SETTINGS, max_tokens=1)
    (shard,) = tmp_path.glob("shard-*.safetensors")
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(InputFileError, match="sha256"):
        list(iter_shard_examples(tmp_path, verify=True))


def test_budgets_stop_at_whole_shards(target, tmp_path):
    model, tok = target
    report = build_shards(model, tok, PROMPTS, tmp_path / "t", SETTINGS, max_tokens=1)
    assert report.shards == 1 and not report.complete
    first = report.bytes
    report = build_shards(model, tok, PROMPTS, tmp_path / "b", SETTINGS, max_bytes=first + 1)
    assert report.shards == 2
    more = build_shards(model, tok, PROMPTS, tmp_path / "t", SETTINGS, max_tokens=10**9)
    assert more.complete and more.new_shards == 7


def test_other_settings_or_prompts_are_refused(target, tmp_path):
    model, tok = target
    build_shards(model, tok, PROMPTS, tmp_path, SETTINGS, max_tokens=1)
    other = ShardSettings(**{**SETTINGS.__dict__, "topk": 8})
    with pytest.raises(SpecplugError, match="other settings or prompts"):
        build_shards(model, tok, PROMPTS, tmp_path, other)
    with pytest.raises(SpecplugError, match="other settings or prompts"):
        build_shards(model, tok, PROMPTS[:-1], tmp_path, SETTINGS)


def test_shards_without_an_index_are_refused(target, tmp_path):
    model, tok = target
    build_shards(model, tok, PROMPTS, tmp_path, SETTINGS, max_tokens=1)
    (tmp_path / "index.json").write_text("{")
    with pytest.raises(InputFileError, match="no readable index.json"):
        build_shards(model, tok, PROMPTS, tmp_path, SETTINGS)
    with pytest.raises(InputFileError, match="no readable index.json"):
        list(iter_shard_examples(tmp_path))


def test_benchmark_prompts_are_never_training_prompts():
    bench = ["Explain what a hash table is to someone who has just started learning."]
    prompts = ["explain what a  HASH table is to someone who has just started learning.",
               "Context: ... Explain what a hash table is to someone who has just started "
               "learning. Answer briefly.",
               "Explain what",  # too short to count as containment
               "Write a poem about the sea."]
    assert shards.exclude_overlapping(prompts, bench) == ["Explain what",
                                                          "Write a poem about the sea."]


def test_specplug_data_end_to_end(tmp_path, capsys):
    from specplug.cli import main

    folder = tmp_path / "tiny"
    tiny_llama(0).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    data = tmp_path / "prompts.txt"
    data.write_text("\n".join(PROMPTS) + "\n")
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"question_id": 1, "category": "x", "turns": [PROMPTS[0]]})
                     + "\n")
    out = tmp_path / "shards"
    argv = ["data", "--model", str(folder), "--out", str(out), "--no-seed-tasks",
            "--data", str(data), "--expand", "0", "--exclude", str(bench),
            "--temperatures", "0,0.9", "--max-new-tokens", "5", "--chunk", "4",
            "--batch-size", "4", "--no-progress"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["prompts"] == 9 and report["shards"] == 6 and report["complete"]
    assert report["this_run"]["generate_tokens_per_s"] > 0
    assert main(argv) == 0  # a second run finds everything done
    again = json.loads(capsys.readouterr().out)
    assert again["this_run"]["shards"] == 0 and again["tokens"] == report["tokens"]
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--temperatures", "0,abc"])
    assert exc.value.code == 2 and "--temperatures" in capsys.readouterr().err


def test_specplug_data_leaves_the_benchmark_out_by_default(tmp_path, monkeypatch, capsys):
    """Run from a checkout (benchmarks/prompts.jsonl here), no --exclude: a training prompt
    that is a benchmark turn is dropped all the same."""
    from specplug.cli import main

    folder = tmp_path / "tiny"
    tiny_llama(0).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "prompts.jsonl").write_text(json.dumps(
        {"question_id": 1, "category": "x", "turns": [PROMPTS[3]]}) + "\n")
    data = tmp_path / "prompts.txt"
    data.write_text("\n".join(PROMPTS[:4]) + "\n")
    monkeypatch.chdir(tmp_path)
    assert main(["data", "--model", str(folder), "--out", "shards", "--no-seed-tasks",
                 "--data", str(data), "--expand", "0", "--temperatures", "0",
                 "--max-new-tokens", "3", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["prompts"] == 3


def test_specplug_train_on_shards_splits_held_out_by_prompt(tmp_path, capsys):
    from specplug.cli import main

    folder = tmp_path / "tiny"
    tiny_llama(0).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    model, tok = tiny_llama(0), tiny_tokenizer()
    data = tmp_path / "shards"
    settings = ShardSettings(**{**SETTINGS.__dict__, "model": str(folder),
                                "hidden_layers": (-1,)})
    build_shards(model, tok, PROMPTS, data, settings)
    out = tmp_path / "head"
    assert main(["train", "--model", str(folder), "--drafter", "eagle", "--shards", str(data),
                 "--out", str(out), "--epochs", "1", "--num-heads", "2", "--draft-vocab",
                 "64", "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["shards"]["tokens"] == sum(e["tokens"] for e in shards.read_index(data)["shards"])
    assert report["config"]["hidden_layers"] == [-1]
    # 10 prompts, each answered twice (T=0 and T=1): the held-out prompt's two answers
    assert report["examples"]["heldout"] == 2


def test_the_held_out_split_keeps_every_answer_of_a_prompt_together():
    import random

    from specplug.train.pipeline import heldout_prompts

    prompt_of = [i // 3 for i in range(60)]  # 20 prompts, 3 answers each
    held = heldout_prompts(prompt_of, 0.1, random.Random(1234))
    assert len(held) == 2
    held_examples = [i for i, p in enumerate(prompt_of) if p in held]
    assert len(held_examples) == 6  # every answer of each held prompt, no other
    assert heldout_prompts([0, 0, 0], 0.5, random.Random(0)) == set()  # one prompt: none held


def test_a_shard_written_but_not_indexed_and_partial_files_are_redone(target, tmp_path):
    model, tok = target
    whole = tmp_path / "whole"
    build_shards(model, tok, PROMPTS, whole, SETTINGS, max_tokens=1)
    part = tmp_path / "part"
    build_shards(model, tok, PROMPTS, part, SETTINGS, max_tokens=1)
    index = shards.read_index(part)
    (part / "shard-00001.safetensors").write_bytes(b"killed before the index listed it")
    (part / ".shard-00002.safetensors.partial-0123").write_bytes(b"half")
    assert index["shards"][-1]["file"] == "shard-00000.safetensors"
    build_shards(model, tok, PROMPTS, part, SETTINGS)
    build_shards(model, tok, PROMPTS, whole, SETTINGS)
    assert _files(part) == _files(whole)
    assert not list(part.glob(".shard-*"))


def test_a_second_run_on_the_same_folder_is_refused_while_one_builds(target, tmp_path):
    from specplug.files import file_lock

    model, tok = target
    tmp_path.mkdir(exist_ok=True)
    with file_lock(tmp_path), pytest.raises(SpecplugError, match="another `specplug data`"):
        build_shards(model, tok, PROMPTS, tmp_path, SETTINGS)


@pytest.mark.parametrize("temps", [(), (0.0, 0.0)])
def test_temperatures_must_be_given_once_each(target, tmp_path, temps):
    model, tok = target
    bad = ShardSettings(**{**SETTINGS.__dict__, "temperatures": temps})
    with pytest.raises(SpecplugError, match="each once"):
        build_shards(model, tok, PROMPTS, tmp_path, bad)


def test_prompts_made_from_other_inputs_are_refused(target, tmp_path):
    model, tok = target
    shards.prompt_set(model, tok, tmp_path, PROMPTS, 0, [])
    assert shards.prompt_set(model, tok, tmp_path, PROMPTS, 0, []) == PROMPTS
    with pytest.raises(SpecplugError, match="other --data, --exclude"):
        shards.prompt_set(model, tok, tmp_path, PROMPTS, 0, [PROMPTS[0]])  # a new --exclude
    with pytest.raises(SpecplugError, match="other --data, --exclude"):
        shards.prompt_set(model, tok, tmp_path, PROMPTS[:5], 0, [])


def test_a_folder_holding_other_files_is_refused_before_any_work(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(InputFileError, match="holds other files"):
        shards.check_folder(tmp_path)
    shards.check_folder(tmp_path / "new")  # absent: fine


def test_train_refuses_shards_of_another_model(tmp_path):
    from specplug.train.pipeline import train

    folder = tmp_path / "tiny"
    tiny_llama(0).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    data = tmp_path / "shards"
    build_shards(tiny_llama(0), tiny_tokenizer(), PROMPTS, data, SETTINGS, max_tokens=1)
    with pytest.raises(SpecplugError, match="were built from 'tiny'"):
        train(str(folder), "eagle", tmp_path / "head", shards=data, progress=False)
