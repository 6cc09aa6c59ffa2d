"""Bad files and folders, one row per case: each gets a ``SpecplugError`` naming the file and
the fix before any work starts, and the CLI prints one line and exits 2 (no traceback)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_models import VOCAB

from specplug.cli import main
from specplug.errors import (
    CacheDirError,
    ConfigError,
    InputFileError,
    SpecplugError,
    UnknownOptionError,
)
from specplug.heads.checkpoint import load_head, save_head
from specplug.heads.config import HeadConfig
from specplug.heads.nets import build_net


@pytest.fixture(scope="module")
def folder(tiny_folder):
    return tiny_folder


GOOD_QUESTION = json.dumps({"question_id": 1, "category": "qa", "turns": ["hello"]})

# (file contents or None for a missing file, what the message must say)
PROMPT_FILES = [
    (None, "no such file (check the path)"),
    (b"\xff\xfe not text\n", "not UTF-8 text (byte 0)"),
    (f"{GOOD_QUESTION}\n{{oops\n".encode(), ":2: not JSON"),
    (b'{"question_id": 1, "category": "qa"}\n', ":1: missing field 'turns'"),
    (b"[1, 2]\n", ":1: missing field 'question_id'"),
    (b'{"question_id": 1, "category": "qa", "turns": []}\n', "'turns' must be a non-empty"),
    (b"\n\n", "no questions selected"),
]


def _cli(capsys, args: list[str]) -> str:
    """Run the CLI, check it refused with exit 2 and one line, return that line."""
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


def _write(path: Path, content: bytes | None) -> Path:
    if content is not None:
        path.write_bytes(content)
    return path


@pytest.mark.parametrize("content, needle", PROMPT_FILES)
def test_bench_prompts_file(folder, tmp_path, capsys, content, needle):
    path = _write(tmp_path / "prompts.jsonl", content)
    err = _cli(capsys, ["bench", "--model", folder, "--prompts", str(path), "--methods",
                        "ngram", "--out", str(tmp_path / "out")])
    assert str(path) in err and needle in err
    assert not (tmp_path / "out").exists()


TRAIN_FILES = [
    (None, "no such file (check the path)"),
    (b'{"instruction": "a"}\n{bad json\n', ":2: not JSON"),
    (b'{"answer": "no prompt here"}\n', ":1: the line has none of instruction/prompt/text"),
    (b"\xe9t\xe9\n", "not UTF-8 text"),
]


@pytest.mark.parametrize("content, needle", TRAIN_FILES)
def test_train_data_file_leaves_no_out_folder(folder, tmp_path, capsys, content, needle):
    data = _write(tmp_path / "data.jsonl", content)
    out = tmp_path / "head"
    err = _cli(capsys, ["train", "--model", folder, "--drafter", "medusa", "--data", str(data),
                        "--out", str(out), "--no-progress"])
    assert str(data) in err and needle in err
    assert not out.exists()  # nothing half-made left behind


def test_train_with_no_prompts_at_all(folder, tmp_path, capsys):
    rc = main(["train", "--model", folder, "--drafter", "medusa", "--no-seed-tasks",
               "--out", str(tmp_path / "head"), "--no-progress"])
    assert rc == 2 and "no training prompts: pass --data FILE" in capsys.readouterr().err
    assert not (tmp_path / "head").exists()


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    config = HeadConfig(kind="medusa", hidden_size=32, vocab_size=VOCAB, draft_vocab_size=VOCAB,
                        num_heads=2)
    folder = tmp_path_factory.mktemp("head")
    save_head(build_net(config), folder)
    return folder


def _truncate(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])


def _bad_header(folder: Path) -> None:
    weights = folder / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[8:12] = b"\xff\xfe\xff\xfe"  # inside the JSON header
    weights.write_bytes(bytes(raw))


def _bad_config(folder: Path) -> None:
    (folder / "config.json").write_text('{"kind": "medusa",\n "hidden_size": }')


def _config_of_wrong_type(folder: Path) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_heads"] = "four"
    (folder / "config.json").write_text(json.dumps(cfg))


def _no_folder(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder)


def _pickle_only(folder: Path) -> None:
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")


CHECKPOINTS = [
    (_truncate, "model.safetensors: not a complete safetensors file"),
    (_bad_header, "model.safetensors: not a complete safetensors file"),
    (_bad_config, "config.json: not valid JSON at line 2 column"),
    (_config_of_wrong_type, "config.json: 1 validation error"),
    (_no_folder, "no such folder"),
    (_pickle_only, "pickle checkpoints are never loaded"),
]


@pytest.mark.parametrize("damage, needle", CHECKPOINTS, ids=lambda v: getattr(v, "__name__", ""))
def test_damaged_head_checkpoint(head, tmp_path, damage, needle):
    import shutil

    copy = tmp_path / "head"
    shutil.copytree(head, copy)
    damage(copy)
    with pytest.raises(InputFileError, match=needle.replace("(", r"\(")) as info:
        load_head(copy)
    assert str(copy) in str(info.value)


def test_damaged_head_from_the_cli(folder, head, tmp_path, capsys):
    import shutil

    copy = tmp_path / "head"
    shutil.copytree(head, copy)
    _truncate(copy)
    rc = main(["run", "--model", folder, "--method", "medusa", "--option",
               f"checkpoint={copy}", "--prompt", "hello"])
    err = capsys.readouterr().err
    assert rc == 2 and "not a complete safetensors file" in err and "Traceback" not in err


def test_unwritable_cache_dir_names_the_variable(tmp_path, monkeypatch, capsys):
    """The cache path runs into a file (what a read-only mount gives a root user too: the
    folder cannot be made), so converting a known model cannot start."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("SPECPLUG_CACHE_DIR", str(blocker / "cache"))
    from specplug.files import file_lock

    with (pytest.raises(CacheDirError, match="set SPECPLUG_CACHE_DIR to a writable folder"),
          file_lock(blocker / "cache" / "models" / "x")):
        pass
    assert issubclass(CacheDirError, SpecplugError) and issubclass(SpecplugError, ValueError)


def test_unwritable_cost_cache_keeps_the_curve_in_memory_with_one_warning(
        tmp_path, monkeypatch, caplog):
    """A cost curve is only an optimisation: a cache that cannot be written measures each time
    (in this process) and says so once, instead of failing the generation."""
    import logging

    from specplug import calibration
    from specplug.cost import CostModel

    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("SPECPLUG_COST_CACHE", str(blocker / "cost"))
    monkeypatch.setattr(calibration, "_warned", set())
    measured = []

    def measure():
        measured.append(1)
        return CostModel(calibrated=True)

    with caplog.at_level(logging.WARNING, logger="specplug.calibration"):
        for _ in range(2):
            assert calibration.cached_calibration({"model": "m"}, measure).calibrated
    assert len(measured) == 2
    warnings = [r.getMessage() for r in caplog.records if "cost-curve cache" in r.getMessage()]
    assert len(warnings) == 1 and "kept in memory" in warnings[0]


# (command, its arguments, what argparse's one line must say): refused before any work
OUT_OF_RANGE = [
    ("run", ["--max-new-tokens", "0"], "--max-new-tokens: must be at least 1, got 0"),
    ("run", ["--max-new-tokens", "ten"], "--max-new-tokens: expected a whole number, got 'ten'"),
    ("run", ["--temperature", "-0.5"], "--temperature: must be a number in [0, inf], got -0.5"),
    ("run", ["--temperature", "nan"], "--temperature: must be a number in [0, inf], got nan"),
    ("run", ["--top-p", "0"], "--top-p: must be a number in (0, 1], got 0"),
    ("run", ["--top-p", "1.5"], "--top-p: must be a number in (0, 1], got 1.5"),
    ("run", ["--top-k", "-1"], "--top-k: must be at least 0, got -1"),
    ("run", ["--repeats", "0"], "--repeats: must be at least 1, got 0"),
    ("run", ["--num-speculative-tokens", "0"], "--num-speculative-tokens: must be at least 1"),
    ("bench", ["--concurrency", "0"], "--concurrency: must be at least 1, got 0"),
    ("bench", ["--limit", "-2"], "--limit: must be at least 1, got -2"),
    ("train", ["--lr", "0"], "--lr: must be a number in (0, inf], got 0"),
    ("train", ["--epochs", "0"], "--epochs: must be at least 1, got 0"),
]
REQUIRED = {"run": ["--prompt", "hi"], "bench": ["--methods", "ngram", "--out", "x"],
            "train": ["--drafter", "medusa", "--out", "x"]}


@pytest.mark.parametrize("command, args, needle", OUT_OF_RANGE)
def test_numbers_out_of_range(capsys, command, args, needle):
    with pytest.raises(SystemExit) as info:
        main([command, "--model", "no-model-is-loaded", *REQUIRED[command], *args])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_empty_prompt(capsys):
    with pytest.raises(SystemExit) as info:
        main(["run", "--model", "no-model-is-loaded", "--prompt", "  "])
    assert info.value.code == 2 and "the prompt is empty" in capsys.readouterr().err


# --- the Python API and the engine configs ------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    from tiny_models import tiny_llama

    return tiny_llama(0)


PROMPT = [[5, 9, 11, 3, 7, 5, 9, 11]]

# (keyword arguments of specplug.hf.generate, error type, what the message must say)
GENERATE_CASES = [
    (dict(method="nope"), ConfigError, "unknown speculative method 'nope'"),
    (dict(max_new_tokens=0), SpecplugError, "max_new_tokens must be a whole number >= 1, got 0"),
    (dict(max_new_tokens=-3), SpecplugError, "got -3"),
    (dict(max_new_tokens="5"), SpecplugError, "got '5'"),
    (dict(max_new_tokens=2.5), SpecplugError, "got 2.5"),
    (dict(do_sample=True, temperature=-1.0), SpecplugError, "temperature must be a finite"),
    (dict(do_sample=True, temperature=float("nan")), SpecplugError, "got nan"),
    (dict(do_sample=True, top_p=1.5), SpecplugError, "top_p must be in (0, 1], got 1.5"),
    (dict(do_sample=True, top_k=-2), SpecplugError, "top_k must be a whole number >= 0"),
    (dict(num_speculative_tokens=0), ConfigError, "num_speculative_tokens: Input should be"),
    (dict(tree="forest"), ConfigError, "tree='forest' is not registered"),
    (dict(tree="dynamic", tree_budget=0), ConfigError, "tree_budget"),
    (dict(bogus=1), UnknownOptionError, "unknown options ['bogus']"),
    (dict(max_new_tokens=300), SpecplugError, "exceeds the model's context of 256 tokens"),
]


@pytest.mark.parametrize("kwargs, error, needle", GENERATE_CASES,
                         ids=[next(iter(c[0])) + str(i) for i, c in enumerate(GENERATE_CASES)])
def test_python_generate_refuses_bad_arguments(tiny, kwargs, error, needle):
    import torch

    import specplug.hf as hf

    with pytest.raises(error) as info:
        hf.generate(tiny, torch.tensor(PROMPT), **{"max_new_tokens": 4, **kwargs})
    assert needle in str(info.value)


def test_unknown_options_are_also_a_type_error(tiny):
    """Python raises ``TypeError`` for an unexpected keyword: callers catching it still do."""
    import torch

    import specplug.hf as hf

    with pytest.raises(TypeError, match="bogus"):
        hf.generate(tiny, torch.tensor(PROMPT), max_new_tokens=4, bogus=1)


@pytest.mark.parametrize("ids, needle", [
    (lambda t: t.float(), "integer token ids, got dtype torch.float32"),
    (lambda t: t + 1000, "token id 1011, outside the model's 96 embeddings"),
    (lambda t: t - 100, "token id -97"),
    (lambda t: t[0], "non-empty [batch, length] tensor"),
    (lambda t: t[:, :0], "non-empty [batch, length] tensor"),
])
def test_python_generate_refuses_bad_prompts(tiny, ids, needle):
    import torch

    import specplug.hf as hf

    with pytest.raises(SpecplugError) as info:
        hf.generate(tiny, ids(torch.tensor(PROMPT)), max_new_tokens=4)
    assert needle in str(info.value)


def test_python_generate_checks_padding_ids_too(tiny):
    """The target embeds every position, padding included, before the mask applies: a pad
    id outside the vocabulary is refused by name, not an IndexError from the embedding."""
    import torch

    import specplug.hf as hf

    ids = torch.tensor([[-1, -1] + PROMPT[0]])
    mask = torch.tensor([[0, 0] + [1] * len(PROMPT[0])])
    with pytest.raises(SpecplugError, match="token id -1.*pad with its pad_token_id"):
        hf.generate(tiny, ids, mask, max_new_tokens=3)
    out = hf.generate(tiny, ids.clamp(min=0), mask, max_new_tokens=3)
    assert out.shape == (1, ids.shape[1] + 3)


def test_python_generate_defaults_to_ngram(tiny):
    import torch

    import specplug.hf as hf
    from specplug.config import build_spec

    assert build_spec(None, {}).method == "ngram"
    assert build_spec({"num_speculative_tokens": 3}, {}).method == "ngram"
    out = hf.generate(tiny, torch.tensor(PROMPT), max_new_tokens=3)
    assert out.tolist() == tiny.generate(torch.tensor(PROMPT), max_new_tokens=3,
                                         do_sample=False).tolist()


@pytest.mark.parametrize("method, options, needle", [
    ("nope", {}, "unknown speculative method 'nope'"),
    ("ngram", {"bogus": 1}, "invalid option for drafter 'ngram': bogus"),
    ("ngram", {"num_speculative_tokens": 0}, "num_speculative_tokens"),
])
def test_python_assistant_refuses_bad_options(tiny, method, options, needle):
    import specplug.hf as hf

    with pytest.raises(ConfigError) as info:
        hf.assistant(tiny, method, **options)
    assert needle in str(info.value)


@pytest.mark.parametrize("options, needle", [
    ({"drafter": "nope"}, "unknown speculative method 'nope'"),
    ({"drafter": "ngram", "bogus": 1}, "bogus: Extra inputs are not permitted"),
    ({"drafter": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({}, "'drafter' is required"),
])
def test_vllm_config_refuses_bad_options(options, needle):
    from specplug.adapters.vllm_config import spec_config_from

    with pytest.raises(ConfigError) as info:
        spec_config_from(options)
    assert needle in str(info.value)


@pytest.mark.parametrize("raw, needle", [
    ('{"drafter": "ngram", "tree": "forest"}', "tree='forest' is not registered"),
    ('{"drafter": "eagle"}', "drafter 'eagle' reads the target model's"),
    ('{"drafter": "ngram", "bogus": 1}', "bogus"),
    ("{oops", "is not JSON"),
    ("[1]", "must be a JSON object"),
])
def test_sglang_config_refuses_bad_options(raw, needle):
    from specplug.adapters.sglang import CONFIG_ENV, config_from_env

    with pytest.raises(ConfigError) as info:
        config_from_env({CONFIG_ENV: raw})
    assert needle in str(info.value) and CONFIG_ENV in str(info.value)


def test_a_head_trained_for_another_target_is_refused_by_name(head):
    """A head whose vocabulary and hidden size are not the target's: one error naming both
    and the fix, before any generation (not a shape error in a matmul)."""
    import torch
    from tiny_models import tiny_llama

    import specplug.hf as hf

    other = tiny_llama(0, vocab=VOCAB + 32)
    with pytest.raises(SpecplugError, match=r"head/target mismatch: the medusa head was trained "
                       rf"for vocabulary {VOCAB} and hidden size 32.*the target has "
                       rf"{VOCAB + 32} and 32; train a head for this target"):
        hf.generate(other, torch.tensor(PROMPT), max_new_tokens=3, method="medusa", num_speculative_tokens=2,
                    checkpoint=str(head))


def test_a_tree_deeper_than_the_heads_is_refused_by_name(head, tiny):
    import torch

    import specplug.hf as hf

    with pytest.raises(ConfigError, match="has 2 depth heads, so it cannot draft 4 tokens "
                       "deep; set num_speculative_tokens"):
        hf.generate(tiny, torch.tensor(PROMPT), max_new_tokens=3, method="medusa",
                    checkpoint=str(head), num_speculative_tokens=4)


def test_no_home_folder_names_the_variable(monkeypatch):
    from pathlib import Path

    from specplug.paths import cache_root

    def no_home() -> Path:
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.delenv("SPECPLUG_CACHE_DIR", raising=False)
    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    with pytest.raises(CacheDirError, match="set SPECPLUG_CACHE_DIR to a writable folder"):
        cache_root()
