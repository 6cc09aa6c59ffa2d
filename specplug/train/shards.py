"""Training data at scale: self-distilled, sharded, streamed, resumable, size-budgeted.

The target writes responses to the training prompts in batches (``model.generate`` with left
padding), once per temperature in ``temperatures`` (0 is greedy; 0.7-1.0 adds diversity), and
one teacher-forced prefill over each prompt + response gives what heads learn from: hidden
features at ``hidden_layers`` and the target's top-``topk`` next-token distribution.

The work is cut into units of ``chunk`` prompts (temperature-major); unit ``u`` becomes
``shard-<u>.safetensors``:

* ``ids [N]`` int32, ``features [N, F]`` bf16, ``top_ids [N, k]`` int32, ``top_probs [N, k]``
  f16: every token of the unit's sequences, concatenated;
* ``starts [S + 1]`` int64: where each of its S sequences begins in those (the last entry is N);
* ``prompt_lens [S]`` int32 and ``prompt_index [S]`` int64: each sequence's prompt length and
  which prompt it answers.

``index.json`` (a checksummed record, ``specplug.files``) holds the settings and the finished
shards with their sizes; it is rewritten atomically after each shard, and each shard is written
atomically first, so a run killed at any moment resumes at the first unit the index does not
list. Every unit seeds its own sampling (``seed``, temperature, unit), so a resumed run writes
the same shards, byte for byte, as one that was never interrupted. The run stops when the
finished shards hold ``max_tokens`` tokens or ``max_bytes`` bytes, or the units run out.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from specplug.errors import InputFileError, SpecplugError
from specplug.files import atomic_write_bytes, file_lock, read_record, write_record

__all__ = ["ShardSettings", "ShardReport", "build_shards", "check_folder", "exclude_overlapping",
           "iter_shard_examples", "prompt_set", "read_index"]

_INDEX = "index.json"
_RECORD = "specplug-train-shards"
_VERSION = 1


@dataclass(frozen=True)
class ShardSettings:
    """What a shard folder is built from; a folder built with other settings is refused."""

    model: str
    hidden_layers: tuple[int, ...] = (-1,)
    topk: int = 16
    temperatures: tuple[float, ...] = (0.0, 0.8)
    max_new_tokens: int = 192
    chunk: int = 64
    batch_size: int = 32
    seed: int = 0
    top_p: float = 0.95


@dataclass
class ShardReport:
    """What :func:`build_shards` did: totals over all finished shards, and this run's part."""

    shards: int
    tokens: int
    response_tokens: int
    bytes: int
    new_shards: int
    new_tokens: int
    new_response_tokens: int
    seconds_generate: float
    seconds_prefill: float
    complete: bool

    def rates(self) -> dict[str, float]:
        """Response tokens/s of generation and tokens/s of teacher forcing, this run."""
        return {"generate_tokens_per_s": self.new_response_tokens /
                max(self.seconds_generate, 1e-9),
                "prefill_tokens_per_s": self.new_tokens / max(self.seconds_prefill, 1e-9)}


def _prompts_digest(prompts: list[str]) -> str:
    return hashlib.sha256(json.dumps(prompts).encode()).hexdigest()


def read_index(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The folder's index (settings, prompt digest, finished shards), or None if absent or
    damaged."""
    return read_record(Path(folder) / _INDEX, _RECORD, _VERSION)


def _normal(text: str) -> str:
    return " ".join(text.lower().split())


def exclude_overlapping(prompts: list[str], excluded: list[str]) -> list[str]:
    """``prompts`` without any that equals, contains or is contained in an ``excluded`` text
    (case and spacing ignored; containment only for texts of 30 characters or more), so that
    benchmark prompts never become training data."""
    banned = [_normal(t) for t in excluded]
    exact = set(banned)
    long = [b for b in banned if len(b) >= 30]
    out = []
    for p in prompts:
        n = _normal(p)
        if n in exact or any(b in n or (len(n) >= 30 and n in b) for b in long):
            continue
        out.append(p)
    return out


def prompt_set(model: Any, tokenizer: Any, folder: str | os.PathLike[str], base: list[str],
               expand: int, excluded: list[str], seed: int = 0, batch_size: int = 32,
               progress: Callable[[int], None] | None = None) -> list[str]:
    """The prompts of a shard folder: ``base`` plus ``expand`` instructions the target writes
    self-instruct style from it, without any that overlap ``excluded``. Made once and kept in
    the folder (``prompts.json``, a checksummed record), so a resumed run reuses them."""
    from specplug.train.data import expand_prompts

    path = Path(folder) / "prompts.json"
    made_from = {"base_sha256": _prompts_digest(base), "excluded_sha256": _prompts_digest(
        sorted(excluded)), "expand": expand, "seed": seed}
    stored = read_record(path, "specplug-train-prompts", 2)
    if stored is not None:
        if stored["made_from"] != made_from:
            raise SpecplugError(
                f"{folder} holds training prompts made from other --data, --exclude, "
                "--expand, --seed or seed-task settings; pass another --out folder, or "
                f"delete {folder} to rebuild it")
        return list(stored["prompts"])
    prompts = list(base)
    if expand:
        prompts += expand_prompts(model, tokenizer, base, expand, seed=seed,
                                  batch_size=batch_size, progress=progress)
    kept = exclude_overlapping(prompts, excluded)
    Path(folder).mkdir(parents=True, exist_ok=True)
    write_record(path, "specplug-train-prompts", 2, {
        "prompts": kept, "made_from": made_from, "base": len(base),
        "expanded": len(prompts) - len(base), "excluded": len(prompts) - len(kept)})
    return kept


def check_folder(folder: str | os.PathLike[str]) -> None:
    """Refuse ``folder`` for ``specplug data`` unless it is absent, empty, or one this command
    started (its ``prompts.json`` or ``index.json``): checked before any work.

    Raises:
        InputFileError: a folder holding something else, naming it and the fix.
    """
    out = Path(folder)
    if out.exists() and not out.is_dir():
        raise InputFileError(f"--out {out}: not a folder")
    if out.is_dir() and any(out.iterdir()) and not (
            (out / _INDEX).is_file() or (out / "prompts.json").is_file()):
        raise InputFileError(f"--out {out} holds other files, not training shards; pass an "
                             "empty or new folder")


def _shard_name(unit: int) -> str:
    return f"shard-{unit:05d}.safetensors"


def _units(n_prompts: int, settings: ShardSettings) -> list[tuple[float, list[int]]]:
    """(temperature, prompt indices) of every unit, temperature-major."""
    return [(t, list(range(s, min(s + settings.chunk, n_prompts))))
            for t in settings.temperatures for s in range(0, n_prompts, settings.chunk)]


def _finished(folder: Path, index: dict[str, Any]) -> list[dict[str, Any]]:
    """The leading run of index entries whose shard file is present with its size."""
    out = []
    for entry in index.get("shards", []):
        path = folder / entry["file"]
        if not path.is_file() or path.stat().st_size != entry["bytes"]:
            break
        out.append(entry)
    return out


def _check_same_run(index: dict[str, Any], settings: ShardSettings, digest: str,
                    folder: Path) -> None:
    if index["settings"] != json.loads(json.dumps(asdict(settings))) or \
            index["prompts_sha256"] != digest:
        raise SpecplugError(
            f"{folder} holds training shards built with other settings or prompts "
            f"({index['settings']}); pass another --out folder, or delete {folder} to "
            "rebuild it")


def _serialize(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()}, metadata={"format": "pt"})


def _unit_tensors(model: Any, tokenizer: Any, prompts: list[str], indices: list[int],
                  temperature: float, settings: ShardSettings, unit: int,
                  timer: dict[str, float]) -> tuple[dict[str, torch.Tensor], int]:
    """Generate the unit's responses and teacher-force them; the shard's tensors and the
    number of response tokens."""
    from specplug.models import encode_conversation
    from specplug.train.data import (
        Sequence,
        _eos_and_pad,
        _generate,
        extract_features,
        feature_batch_size,
    )

    encoded = [encode_conversation(tokenizer, [{"role": "user", "content": prompts[i]}])
               for i in indices]
    eos, pad = _eos_and_pad(model, tokenizer)
    started = time.perf_counter()
    outs = _generate(model, encoded, settings.max_new_tokens, settings.batch_size, pad, eos,
                     sample=temperature > 0, seed=settings.seed * 1_000_003 + unit,
                     temperature=temperature, top_p=settings.top_p)
    timer["generate"] += time.perf_counter() - started
    seqs = [(i, Sequence(p, r)) for i, p, r in zip(indices, encoded, outs) if r]
    started = time.perf_counter()
    feats = extract_features(model, [q for _, q in seqs], list(settings.hidden_layers),
                             settings.topk, batch_size=feature_batch_size(model))
    timer["prefill"] += time.perf_counter() - started
    starts = torch.tensor([0, *itertools.accumulate(len(q.ids) for _, q in seqs)],
                          dtype=torch.int64)
    hidden = len(settings.hidden_layers) * model.config.get_text_config().hidden_size

    def cat(key: str, empty: torch.Tensor) -> torch.Tensor:
        return torch.cat([f[key] for f in feats]) if feats else empty

    tensors = {
        "ids": torch.tensor([t for _, q in seqs for t in q.ids], dtype=torch.int32),
        "features": cat("features", torch.zeros(0, hidden, dtype=torch.bfloat16)),
        "top_ids": cat("top_ids", torch.zeros(0, settings.topk, dtype=torch.int64)
                       ).to(torch.int32),
        "top_probs": cat("top_probs", torch.zeros(0, settings.topk, dtype=torch.float16)),
        "starts": starts,
        "prompt_lens": torch.tensor([len(q.prompt) for _, q in seqs], dtype=torch.int32),
        "prompt_index": torch.tensor([i for i, _ in seqs], dtype=torch.int64),
    }
    return tensors, sum(len(q.response) for _, q in seqs)


def build_shards(model: Any, tokenizer: Any, prompts: list[str], folder: str | os.PathLike[str],
                 settings: ShardSettings, max_tokens: int | None = None,
                 max_bytes: int | None = None,
                 progress: Callable[[dict[str, Any]], None] | None = None) -> ShardReport:
    """Build (or resume) the shard folder ``folder`` for ``prompts``; see the module docstring.

    Raises:
        SpecplugError: ``folder`` holds shards of other settings or prompts; no prompts.
    """
    if not prompts:
        raise SpecplugError("no training prompts: pass --data FILE or keep the seed tasks")
    if not settings.temperatures or len(set(settings.temperatures)) != len(
            settings.temperatures):
        raise SpecplugError(f"temperatures {settings.temperatures}: give one or more, each "
                            "once (for example 0,0.8)")
    from filelock import Timeout  # a dependency of huggingface_hub, hence of transformers

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    try:
        with file_lock(out, timeout=0):
            return _build_locked(model, tokenizer, prompts, out, settings, max_tokens,
                                 max_bytes, progress)
    except Timeout:
        raise SpecplugError(f"{out} is being built by another `specplug data` run; wait for "
                            "it, or pass another --out") from None


def _build_locked(model: Any, tokenizer: Any, prompts: list[str], out: Path,
                  settings: ShardSettings, max_tokens: int | None, max_bytes: int | None,
                  progress: Callable[[dict[str, Any]], None] | None) -> ShardReport:
    for partial in out.glob(".shard-*"):  # what a killed run left half-written
        partial.unlink(missing_ok=True)
    digest = _prompts_digest(prompts)
    index = read_index(out)
    if index is not None:
        _check_same_run(index, settings, digest, out)
        done = _finished(out, index)
    else:
        if any(out.glob("shard-*.safetensors")):
            raise InputFileError(f"{out} has shard files but no readable {_INDEX}; delete "
                                 "the folder to rebuild it")
        done = []
    units = _units(len(prompts), settings)
    timer = {"generate": 0.0, "prefill": 0.0}
    new_shards = new_tokens = new_response = 0

    def totals() -> tuple[int, int]:
        return sum(e["tokens"] for e in done), sum(e["bytes"] for e in done)

    def save_index() -> None:
        write_record(out / _INDEX, _RECORD, _VERSION, {
            "settings": asdict(settings), "prompts_sha256": digest, "prompts": len(prompts),
            "units": len(units), "shards": done})

    if index is None:
        save_index()
    for unit in range(len(done), len(units)):
        tokens, size = totals()
        if (max_tokens is not None and tokens >= max_tokens) or \
                (max_bytes is not None and size >= max_bytes):
            break
        temperature, indices = units[unit]
        tensors, response = _unit_tensors(model, tokenizer, prompts, indices, temperature,
                                          settings, unit, timer)
        data = _serialize(tensors)
        atomic_write_bytes(out / _shard_name(unit), data)
        entry = {"file": _shard_name(unit), "bytes": len(data),
                 "tokens": int(tensors["ids"].numel()), "response_tokens": response,
                 "sequences": int(tensors["prompt_index"].numel()),
                 "temperature": temperature,
                 "sha256": hashlib.sha256(data).hexdigest()}
        done.append(entry)
        save_index()
        new_shards += 1
        new_tokens += entry["tokens"]
        new_response += response
        if progress:
            progress({**entry, "total_tokens": totals()[0], "unit": unit, "units": len(units),
                      **timer})
    tokens, size = totals()
    report = ShardReport(shards=len(done), tokens=tokens,
                         response_tokens=sum(e["response_tokens"] for e in done), bytes=size,
                         new_shards=new_shards, new_tokens=new_tokens,
                         new_response_tokens=new_response, seconds_generate=timer["generate"], seconds_prefill=timer["prefill"],
                         complete=len(done) == len(units))
    return report


def iter_shard_examples(folder: str | os.PathLike[str], verify: bool = False,
                        with_prompt_index: bool = False) -> Iterator[Any]:
    """The ``Example``s of a shard folder, one shard in memory at a time, in unit order
    (``(example, prompt index)`` pairs with ``with_prompt_index``).

    ``verify`` also checks each shard's sha256 against the index.

    Raises:
        InputFileError: no readable index, or a shard missing, truncated or (``verify``) not
            the bytes the index lists, naming the file and the fix.
    """
    from safetensors.torch import load, load_file

    from specplug.train.trainer import Example

    base = Path(folder)
    index = read_index(base)
    if index is None:
        raise InputFileError(f"{base}: no readable {_INDEX} (not a shard folder, or damaged): "
                             "build it with `specplug data --out` (it resumes)")
    for entry in index["shards"]:
        path = base / entry["file"]
        if not path.is_file() or path.stat().st_size != entry["bytes"]:
            raise InputFileError(f"{path}: missing or truncated ({entry['bytes']} bytes "
                                 "expected); run the same `specplug data` command again to "
                                 "rebuild it")
        if verify:
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise InputFileError(f"{path}: its bytes do not match the index's sha256; "
                                     "delete it and run the same `specplug data` command again")
            t = load(data)
        else:
            t = load_file(str(path))
        starts = t["starts"].tolist()
        for s in range(len(starts) - 1):
            a, b = starts[s], starts[s + 1]
            ex = Example(t["ids"][a:b].long(), t["features"][a:b], t["top_ids"][a:b].long(),
                         t["top_probs"][a:b], int(t["prompt_lens"][s]))
            yield (ex, int(t["prompt_index"][s])) if with_prompt_index else ex
