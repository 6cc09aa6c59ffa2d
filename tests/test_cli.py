"""``specplug run`` on a local tiny model folder: the JSON contract and error exit codes."""

from __future__ import annotations

import json

import pytest
from tiny_models import WORDS, tiny_llama

from specplug.cli import main


@pytest.fixture(scope="module")
def folder(tiny_folder):
    return tiny_folder


PROMPT = " ".join(WORDS[i % 5] for i in range(30))


def test_run_compare_json(folder, capsys):
    rc = main(["run", "--model", folder, "--method", "ngram", "--prompt", PROMPT, "--compare",
               "--json", "--max-new-tokens", "12", "--tree", "dynamic:budget=6"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("text", "new_tokens", "mean_accepted_tokens", "tokens_per_s",
                "baseline_tokens_per_s", "speedup", "identical"):
        assert key in report
    assert report["identical"] is True and report["new_tokens"] == 12
    assert report["config"]["tree"] == "dynamic" and report["config"]["tree_budget"] == 6


def test_run_text_report_and_sampling(folder, capsys):
    rc = main(["run", "--model", folder, "--method", "layer_skip", "--option", "layers=1",
               "--prompt", PROMPT, "--max-new-tokens", "6", "--temperature", "0.8",
               "--seed", "3"])
    assert rc == 0
    assert "mean accepted tokens/step" in capsys.readouterr().out


@pytest.mark.parametrize("args, needle", [
    (["--method", "eagle9"], "unknown speculative method 'eagle9'"),
    (["--method", "ngram", "--tree", "star"], "invalid tree spec"),
    (["--method", "ngram", "--option", "prompt_lookup_maxx=2"], "prompt_lookup_maxx"),
    # the user's length is the one named, with --compare too (not the warm-up's 8)
    (["--max-new-tokens", "1000", "--compare"], "max_new_tokens (1000) exceeds the model's "
                                                "context of 256"),
])
def test_run_errors_exit_2(folder, capsys, args, needle):
    rc = main(["run", "--model", folder, "--prompt", PROMPT, *args])
    assert rc == 2
    assert needle in capsys.readouterr().err


def test_prompt_that_is_not_utf8(folder, capsys):
    """Bytes that are not UTF-8 on a command line reach Python as lone surrogates."""
    bad = b"caf\xe9 \xff\xfe abc".decode("utf-8", "surrogateescape")
    assert main(["run", "--model", folder, "--prompt", bad]) == 2
    assert "not valid UTF-8 text" in capsys.readouterr().err


def test_unknown_model_name(capsys):
    assert main(["run", "--model", "no-such-model", "--prompt", "x"]) == 2
    assert "smollm2-135m" in capsys.readouterr().err


def test_export_writes_a_vllm_eagle_folder(folder, tmp_path, capsys):
    from test_heads import make_net

    from specplug.heads.checkpoint import load_head, save_head

    head = save_head(make_net("eagle", tiny_llama(0)), tmp_path / "head")
    rc = main(["export", "--model", folder, "--checkpoint", str(head), "--out",
               str(tmp_path / "vllm")])
    assert rc == 0
    assert '"method": "eagle"' in capsys.readouterr().out
    assert json.loads((tmp_path / "vllm" / "config.json").read_text())["num_hidden_layers"] == 1
    assert load_head(tmp_path / "vllm").config.kind == "eagle"
    # no head shipped for a tiny folder: a clear error, exit 2
    assert main(["export", "--model", folder, "--out", str(tmp_path / "x")]) == 2
    assert "no shipped 'eagle' head" in capsys.readouterr().err


def test_calibrate_caches_the_curve_that_run_then_reads(folder, capsys, tmp_path, monkeypatch):
    """``specplug calibrate`` measures once and stores the curve; ``specplug run`` then reads
    it before its timed generation instead of measuring inside it."""
    monkeypatch.setenv("SPECPLUG_COST_CACHE", str(tmp_path / "cost"))
    assert main(["calibrate", "--model", folder]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["cache"] == str(tmp_path / "cost") and report["relative_cost"]["1"] == 1.0
    assert len(list((tmp_path / "cost").glob("*.json"))) == 1
    from specplug.engine import ModelTargetRunner

    measured = []
    monkeypatch.setattr(ModelTargetRunner, "score",
                        lambda self, *a, real=ModelTargetRunner.score: measured.append(1)
                        or real(self, *a))
    rc = main(["run", "--model", folder, "--prompt", PROMPT, "--json", "--max-new-tokens", "4"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "calibration_s" in out
    # the curve came from the cache: the only scoring forwards are the generation's own
    assert len(measured) == out["target_forwards"] - 1  # its prefill is not a score call
