"""Training data by self-distillation: the target writes the responses the heads learn from.

1. prompts: the shipped Self-Instruct seed tasks (``seed_prompts/seed_tasks.jsonl``, Apache-2.0), plus
   new instructions the target writes from few-shot lists of them (self-instruct style), plus
   any text the user passes (one prompt per line, or JSONL with ``instruction``/``prompt``/
   ``text``/``turns``);
2. responses: the target's own greedy continuations (batched ``generate``);
3. features: one target forward over each prompt + response for the hidden layers the head
   reads, and the target's top-k next-token distribution (for distillation).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from specplug.errors import InputFileError, read_text

__all__ = ["SEED_TASKS", "Sequence", "load_prompts", "expand_prompts", "generate_responses",
           "extract_features", "load_image_prompts", "image_prompt_text", "multimodal_examples"]

SEED_TASKS = Path(__file__).resolve().parent / "seed_prompts" / "seed_tasks.jsonl"


@dataclass
class Sequence:
    """One training sequence: prompt ids then the target's response ids."""

    prompt: list[int]
    response: list[int]

    @property
    def ids(self) -> list[int]:
        return self.prompt + self.response


def _prompt_of(obj: Any) -> str | None:
    if isinstance(obj, str):
        return obj
    if "turns" in obj:
        return str(obj["turns"][0])
    for key in ("instruction", "prompt", "text"):
        if key in obj:
            text = str(obj[key])
            inst = (obj.get("instances") or [{}])[0]
            extra = inst.get("input") if isinstance(inst, dict) else None
            return f"{text}\n\n{extra}" if extra else text
    return None


def _json_line(path: str | Path, n: int, line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise InputFileError(f"{path}:{n}: not JSON ({err.msg} at column {err.colno})") from None


def load_prompts(path: str | Path) -> list[str]:
    """Prompts from JSONL (objects with ``instruction``/``prompt``/``text``/``turns``) or plain
    text (one prompt per non-empty line)."""
    out: list[str] = []
    for n, line in enumerate(read_text(path, "training data").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            p = _prompt_of(_json_line(path, n, line))
            if p is None:
                raise InputFileError(f"training data {path}:{n}: the line has none of "
                                     "instruction/prompt/text/turns")
            out.append(p)
        else:
            out.append(line)
    return out


@torch.no_grad()
def _generate(model: Any, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
              pad_id: int, eos: list[int], sample: bool, seed: int,
              progress: Callable[[int], None] | None = None, temperature: float = 0.8,
              top_p: float = 0.95) -> list[list[int]]:
    """Batched ``generate`` over left-padded prompts (greedy, or sampled at ``temperature``
    with ``top_p`` from ``torch.manual_seed(seed)``); returns the new tokens (EOS cut)."""
    out: list[list[int]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths
    torch.manual_seed(seed)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        L = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), L), pad_id, dtype=torch.long)
        mask = torch.zeros(len(idx), L, dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, L - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[r, L - len(prompts[i]):] = 1
        kw: dict[str, Any] = ({"do_sample": True, "temperature": temperature, "top_p": top_p}
                              if sample else {"do_sample": False})
        gen = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             pad_token_id=pad_id, eos_token_id=eos or None, **kw)
        for r, i in enumerate(idx):
            toks = gen[r, L:].tolist()
            cut = next((j for j, t in enumerate(toks) if t in eos), None)
            out[i] = toks[: cut + 1] if cut is not None else toks
        if progress:
            progress(len(idx))
    return out


def _eos_and_pad(model: Any, tokenizer: Any) -> tuple[list[int], int]:
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    pad = tokenizer.pad_token_id
    return eos, pad if pad is not None else (eos[0] if eos else 0)


def expand_prompts(model: Any, tokenizer: Any, seeds: list[str], count: int, seed: int = 0,
                   batch_size: int = 16, shots: int = 4,
                   progress: Callable[[int], None] | None = None) -> list[str]:
    """Self-instruct: ask the target for ``count`` new instructions, each from a numbered list
    of ``shots`` random seed instructions; keeps the first line, drops duplicates/fragments."""
    if count <= 0:
        return []
    rng = random.Random(seed)
    short = [s.split("\n")[0] for s in seeds if len(s) < 300]
    requests = []
    for _ in range(count):
        picks = rng.sample(short, min(shots, len(short)))
        listing = "".join(f"{i + 1}. {p}\n" for i, p in enumerate(picks))
        requests.append(f"Here is a list of diverse tasks:\n{listing}{len(picks) + 1}.")
    ids = [list(tokenizer(r)["input_ids"]) for r in requests]
    eos, pad = _eos_and_pad(model, tokenizer)
    outs = _generate(model, ids, 40, batch_size, pad, eos, sample=True, seed=seed,
                     progress=progress)
    seen = {s.strip().lower() for s in seeds}
    new: list[str] = []
    for toks in outs:
        text = tokenizer.decode(toks, skip_special_tokens=True).split("\n")[0].strip()
        if len(text.split()) >= 4 and text.lower() not in seen:
            seen.add(text.lower())
            new.append(text)
    return new


def generate_responses(model: Any, tokenizer: Any, prompts: Iterable[str],
                       max_new_tokens: int = 192, batch_size: int = 16,
                       progress: Callable[[int], None] | None = None) -> list[Sequence]:
    """The target's greedy responses to ``prompts`` (chat-formatted like ``specplug run``)."""
    from specplug.models import encode_conversation

    encoded = [encode_conversation(tokenizer, [{"role": "user", "content": p}])
               for p in prompts]
    eos, pad = _eos_and_pad(model, tokenizer)
    outs = _generate(model, encoded, max_new_tokens, batch_size, pad, eos, sample=False,
                     seed=0, progress=progress)
    return [Sequence(p, r) for p, r in zip(encoded, outs) if r]


def feature_batch_size(model: Any) -> int:
    """Sequences per teacher-forcing forward: each holds full-vocabulary logits for every
    position, so a 262k-vocabulary target (Gemma-3) takes 2 at a time, others 8."""
    return 8 if model.config.get_text_config().vocab_size < 100_000 else 2


@torch.no_grad()
def extract_features(model: Any, sequences: list[Sequence], hidden_layers: list[int],
                     topk: int = 16, batch_size: int = 8,
                     progress: Callable[[int], None] | None = None
                     ) -> list[dict[str, torch.Tensor]]:
    """Per sequence: ``features [T, F]`` (bfloat16), and the target's top-``topk`` next-token
    distribution at each position: ``top_ids [T, k]`` int64, ``top_probs [T, k]`` float16."""
    out: list[dict[str, torch.Tensor]] = []
    for s in range(0, len(sequences), batch_size):
        chunk = [q.ids for q in sequences[s:s + batch_size]]
        T = max(len(c) for c in chunk)
        ids = torch.zeros(len(chunk), T, dtype=torch.long)
        mask = torch.zeros(len(chunk), T, dtype=torch.long)
        for r, c in enumerate(chunk):  # right padding: positions stay 0..len-1
            ids[r, : len(c)] = torch.tensor(c)
            mask[r, : len(c)] = 1
        res = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        feats = torch.cat([res.hidden_states[i] for i in hidden_layers], -1)
        probs = res.logits.float().softmax(-1)
        top = torch.topk(probs, topk, dim=-1)
        for r, c in enumerate(chunk):
            n = len(c)
            out.append({"features": feats[r, :n].to(torch.bfloat16).clone(),
                        "top_ids": top.indices[r, :n].clone(),
                        "top_probs": top.values[r, :n].to(torch.float16).clone()})
        if progress:
            progress(len(chunk))
    return out


# --- multimodal data (vision-language targets: the msd head's second stage) -------------------


def load_image_prompts(path: str | Path) -> list[tuple[Path, str]]:
    """``(image file, prompt)`` pairs from JSONL lines ``{"image": PATH, "prompt": TEXT}``
    (relative paths are relative to the JSONL file)."""
    base = Path(path).resolve().parent
    out = []
    for n, line in enumerate(read_text(path, "image data").splitlines(), 1):
        if not line.strip():
            continue
        obj = _json_line(path, n, line)
        if not isinstance(obj, dict) or "image" not in obj or "prompt" not in obj:
            raise InputFileError(f"{path}:{n}: an image-prompt line needs 'image' and 'prompt'")
        image = Path(obj["image"])
        out.append((image if image.is_absolute() else base / image, str(obj["prompt"])))
    if not out:
        raise InputFileError(f"{path}: no image prompts")
    return out


def image_prompt_text(processor: Any, prompt: str) -> str:
    """A user turn with one image before ``prompt``, through the chat template when the
    tokenizer has one."""
    tokenizer = processor.tokenizer
    content = f"{processor.image_token}\n{prompt}"
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                             tokenize=False, add_generation_prompt=True)
    return content


@torch.no_grad()
def multimodal_examples(model: Any, processor: Any, items: list[tuple[Any, str]],
                        max_new_tokens: int, hidden_layers: list[int], topk: int = 16,
                        batch_size: int = 8, progress: Callable[[int], None] | None = None
                        ) -> list[tuple[Sequence, dict[str, torch.Tensor], dict[str, Any]]]:
    """For ``(image, prompt)`` items (an image: a path, a PIL image or an ``[H, W, 3]`` uint8
    array): the target's greedy response *with the image*, then one forward over prompt +
    response for the features and top-k (as ``extract_features``). Returns per item the
    sequence, its features and the processor inputs of its image (for acceptance runs)."""
    import numpy as np

    tokenizer = processor.tokenizer
    eos, pad = _eos_and_pad(model, tokenizer)
    out = []
    for s in range(0, len(items), batch_size):
        chunk = items[s:s + batch_size]
        images = []
        for image, _ in chunk:
            if isinstance(image, (str, Path)):
                from PIL import Image

                image = np.asarray(Image.open(image).convert("RGB"))
            images.append(image)
        texts = [image_prompt_text(processor, p) for _, p in chunk]
        tokenizer.padding_side = "left"
        enc = processor(images=images, text=texts, return_tensors="pt", padding=True)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=eos or None)
        L = enc["input_ids"].shape[1]
        seqs = []
        for r in range(len(chunk)):
            prompt = enc["input_ids"][r][enc["attention_mask"][r].bool()].tolist()
            toks = gen[r, L:].tolist()
            cut = next((j for j, t in enumerate(toks) if t in eos), None)
            seqs.append(Sequence(prompt, toks[: cut + 1] if cut is not None else toks))
        T = max(len(q.ids) for q in seqs)
        ids = torch.full((len(seqs), T), pad, dtype=torch.long)
        mask = torch.zeros(len(seqs), T, dtype=torch.long)
        for r, q in enumerate(seqs):  # right padding: positions stay 0..len-1
            ids[r, : len(q.ids)] = torch.tensor(q.ids)
            mask[r, : len(q.ids)] = 1
        extra = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
        res = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, **extra)
        feats = torch.cat([res.hidden_states[i] for i in hidden_layers], -1)
        top = torch.topk(res.logits.float().softmax(-1), topk, dim=-1)
        for r, q in enumerate(seqs):
            n = len(q.ids)
            one = processor(images=images[r], text=texts[r], return_tensors="pt")
            out.append((q, {"features": feats[r, :n].to(torch.bfloat16).clone(),
                            "top_ids": top.indices[r, :n].clone(),
                            "top_probs": top.values[r, :n].to(torch.float16).clone()},
                        {k: v for k, v in one.items() if k not in ("input_ids",
                                                                   "attention_mask")}))
        if progress:
            progress(len(chunk))
    return out
