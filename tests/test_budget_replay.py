"""``benchmarks/budget_replay.py`` replays exactly the steps the engine takes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from tiny_models import repetitive_prompts, tiny_llama

from specplug import SpecConfig
from specplug.cost import CostModel
from specplug.engine import ModelTargetRunner, Speculator, speculative_generate

_SPEC = importlib.util.spec_from_file_location(
    "budget_replay", Path(__file__).parents[1] / "benchmarks" / "budget_replay.py")
replay_module = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(replay_module)

MAX_NEW = 40


@pytest.fixture(scope="module")
def turns_and_engine_steps():
    model = tiny_llama()
    ids, mask = repetitive_prompts([23, 30])
    turns, steps = [], {}
    for k in (1, 3, 8):
        cfg = SpecConfig(method="ngram", num_speculative_tokens=k, adaptive=False)
        for b in range(ids.shape[0]):
            row = ids[b:b + 1, mask[b].bool()]
            out = speculative_generate(ModelTargetRunner(model), Speculator.from_config(cfg, model),
                                       row, max_new_tokens=MAX_NEW)
            if k == 1:
                turns.append({"prompt": row[0].tolist(), "answer": out.sequences[0],
                              "category": "repeat"})
            steps.setdefault(k, []).append(out.stats.accepted_per_step[0])
    return turns, steps


@pytest.mark.parametrize("k", [1, 3, 8])
def test_fixed_lengths_replay_the_engine_step_for_step(turns_and_engine_steps, k):
    turns, steps = turns_and_engine_steps
    got = replay_module.replay(turns, f"fixed:{k}", CostModel(), MAX_NEW, overhead=0.0)
    assert got["accepted"] == steps[k]
    assert any(n > 0 for row in steps[k] for n in row)  # the drafts were accepted at all


@pytest.mark.parametrize("rule", ["adaptive", "oracle", "fixed:2"])
def test_every_rule_emits_each_answer_once(turns_and_engine_steps, rule):
    turns, _ = turns_and_engine_steps
    got = replay_module.replay(turns, rule, CostModel(), MAX_NEW, overhead=0.08)
    # the prefill's token, then each step's accepted drafts and its bonus token
    assert [1 + sum(n + 1 for n in row) for row in got["accepted"]] == \
        [len(t["answer"]) for t in turns]
    assert got["speedup"] > 0


def test_the_oracle_is_never_worse_than_its_own_longest_draft(turns_and_engine_steps):
    """Under a flat cost curve the oracle drafts every token that would be accepted, so it
    takes no more steps than drafting the full length every time."""
    turns, _ = turns_and_engine_steps
    flat = CostModel(prior_slope=0.0)
    oracle = replay_module.replay(turns, "oracle", flat, MAX_NEW, overhead=0.0)
    full = replay_module.replay(turns, f"fixed:{replay_module.MAX_DEPTH}", flat, MAX_NEW,
                                overhead=0.0)
    assert oracle["accepted"] == full["accepted"]
    assert oracle["speedup"] == pytest.approx(full["speedup"])


def test_unknown_rule_is_refused():
    with pytest.raises(ValueError, match="unknown rule 'greedy'"):
        replay_module.replay([], "greedy", CostModel(), MAX_NEW, overhead=0.0)
