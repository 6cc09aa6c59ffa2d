"""``specplug train`` end to end: data (cached), head, training, held-out report."""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from specplug.errors import SpecplugError
from specplug.files import (
    atomic_write_text,
    building_dir,
    file_lock,
    file_manifest,
    matches_manifest,
    read_record,
    remove_stale_builds,
    write_record,
)
from specplug.heads.config import HeadConfig
from specplug.multimodal import media_token_ids
from specplug.train.data import (
    SEED_TASKS,
    Sequence,
    expand_prompts,
    extract_features,
    feature_batch_size,
    generate_responses,
    load_prompts,
)
from specplug.train.trainer import Example, TrainSettings, build_draft_vocab, train_head

__all__ = ["DataSettings", "build_dataset", "heldout_prompts", "train", "measure_acceptance"]


@dataclass
class DataSettings:
    """Where the training text comes from. ``tokens`` caps the generated tokens in total."""

    data: list[str] | None = None  # extra prompt files
    seed_tasks: bool = True
    expand: int = 200  # new self-instruct prompts written by the target
    max_new_tokens: int = 192
    tokens: int | None = None
    hidden_layers: tuple[int, ...] = (-1,)
    topk: int = 16
    batch_size: int = 16


class _Bar:
    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="seq" if "loss" not in desc else "step")

    def __call__(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _digest(model_dir: str, ds: DataSettings, prompts: list[str]) -> str:
    h = hashlib.sha256(json.dumps([model_dir, asdict(ds), prompts]).encode())
    return h.hexdigest()[:16]


def training_prompts(ds: DataSettings) -> list[str]:
    """The prompts ``ds`` names: the shipped seed tasks (unless turned off) and each data file.

    Raises:
        InputFileError: a data file is missing or malformed, naming the file and line.
        SpecplugError: no prompts at all.
    """
    prompts: list[str] = load_prompts(SEED_TASKS) if ds.seed_tasks else []
    for f in ds.data or []:
        prompts += load_prompts(f)
    if not prompts:
        raise SpecplugError("no training prompts: pass --data FILE or keep the seed tasks")
    return prompts


def build_dataset(model: Any, tokenizer: Any, model_name: str, ds: DataSettings,
                  cache: Path, progress: bool = True) -> tuple[list[Example], list[int]]:
    """Examples (cached under ``cache``) and, per example, the index of its prompt."""
    prompts = training_prompts(ds)
    key = _digest(model_name, ds, prompts)
    folder = cache / key
    cached = _read_dataset(folder)
    if cached is not None:
        return cached
    with file_lock(folder):  # two trainers on one cache build the data once
        cached = _read_dataset(folder)
        if cached is not None:
            return cached
        remove_stale_builds(folder)
        return _build_dataset(model, tokenizer, ds, prompts, folder, progress)


_DATA_RECORD = "specplug-train-data"
_DATA_VERSION = 1


def _read_dataset(folder: Path) -> tuple[list[Example], list[int]] | None:
    """The examples cached in ``folder``, or None when absent, unfinished or damaged."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta = read_record(folder / "examples.json", _DATA_RECORD, _DATA_VERSION)
    if meta is None or not matches_manifest(folder, meta.get("files")):
        return None
    try:
        t = load_file(str(folder / "examples.safetensors"))
        examples = [Example(t["ids"][a:b], t["features"][a:b], t["top_ids"][a:b],
                            t["top_probs"][a:b], p)
                    for (a, b), p in zip(meta["spans"], meta["prompt_lens"])]
    except (SafetensorError, OSError, KeyError, TypeError, ValueError):
        return None
    return examples, meta["prompt_index"]


def _build_dataset(model: Any, tokenizer: Any, ds: DataSettings, prompts: list[str],
                   folder: Path, progress: bool) -> tuple[list[Example], list[int]]:
    from safetensors.torch import save_file

    if ds.expand:
        bar = _Bar(ds.expand, "writing prompts", progress)
        prompts = prompts + expand_prompts(model, tokenizer, prompts, ds.expand,
                                           batch_size=ds.batch_size, progress=bar)
        bar.close()
    bar = _Bar(len(prompts), "target responses", progress)
    seqs: list[Sequence] = []
    budget = ds.tokens
    for s in range(0, len(prompts), 4 * ds.batch_size):  # chunks, so --tokens can stop early
        seqs += generate_responses(model, tokenizer, prompts[s:s + 4 * ds.batch_size],
                                   ds.max_new_tokens, ds.batch_size, progress=bar)
        if budget is not None and sum(len(q.response) for q in seqs) >= budget:
            break
    bar.close()
    bar = _Bar(len(seqs), "target features", progress)
    feats = extract_features(model, seqs, list(ds.hidden_layers), ds.topk,
                             batch_size=feature_batch_size(model), progress=bar)
    bar.close()
    examples = [Example(torch.tensor(q.ids), f["features"], f["top_ids"], f["top_probs"],
                        len(q.prompt)) for q, f in zip(seqs, feats)]
    spans, a = [], 0
    for ex in examples:
        spans.append([a, a + ex.ids.shape[0]])
        a += ex.ids.shape[0]
    index = list(range(len(examples)))
    with building_dir(folder) as tmp:  # a killed build leaves nothing that reads as finished
        save_file({"ids": torch.cat([e.ids for e in examples]),
                   "features": torch.cat([e.features for e in examples]),
                   "top_ids": torch.cat([e.top_ids for e in examples]),
                   "top_probs": torch.cat([e.top_probs for e in examples])},
                  str(tmp / "examples.safetensors"))
        write_record(tmp / "examples.json", _DATA_RECORD, _DATA_VERSION, {
            "files": file_manifest(tmp, ["examples.safetensors"]),
            "spans": spans, "prompt_lens": [len(q.prompt) for q in seqs],
            "prompt_index": index, "settings": asdict(ds),
            "prompts": [tokenizer.decode(q.prompt) for q in seqs]})
    return examples, index


@torch.no_grad()
def measure_acceptance(model: Any, net: Any, examples: list[Example], depth: int,
                       count: int = 8, max_new_tokens: int = 64,
                       inputs: list[dict[str, Any]] | None = None) -> dict[str, float]:
    """Real speculative generation (greedy, chain of ``depth``, the adaptive budget off so it
    measures the head, not this machine's cost curve) from the prompts of held-out examples:
    mean accepted draft tokens per step, and tokens per target forward.
    ``inputs``: per example, a vision-language target's image inputs (``pixel_values``...)."""
    from specplug.config import SpecConfig
    from specplug.engine import ModelTargetRunner, Speculator, speculative_generate

    spec = Speculator.from_config(SpecConfig(method=net.config.kind, checkpoint=net,
                                             num_speculative_tokens=depth, adaptive=False),
                                  model)
    accepted, steps, tokens, forwards = 0, 0, 0, 0
    for i, ex in enumerate(examples[:count]):
        prompt = ex.ids[: max(1, ex.prompt_len)][None]
        out = speculative_generate(ModelTargetRunner(model, hidden_layers=spec.drafter
                                                     .hidden_layers),
                                   spec, prompt, max_new_tokens=max_new_tokens,
                                   model_inputs=inputs[i] if inputs else None)
        acc = out.stats.accepted_per_step[0]
        accepted += sum(acc)
        steps += len(acc)
        tokens += len(out.sequences[0])
        forwards += out.stats.target_forwards
    return {"mean_accepted_per_step": accepted / max(steps, 1),
            "tokens_per_forward": tokens / max(forwards, 1), "prompts": min(count, len(examples))}


def heldout_prompts(prompt_of: list[int], fraction: float, rng: random.Random) -> set[int]:
    """The prompts held out: a ``fraction`` of the distinct prompts in ``prompt_of`` (one
    entry per example), so that every answer to a prompt lands on the same side."""
    groups = sorted(set(prompt_of))
    rng.shuffle(groups)
    n_held = max(1, int(len(groups) * fraction)) if len(groups) > 1 else 0
    return set(groups[:n_held])


def train(model_name: str, kind: str, out: str | os.PathLike[str], *,
          data: DataSettings | None = None, settings: TrainSettings | None = None,
          num_heads: int = 4, draft_vocab_size: int = 8192, heldout: float = 0.1,
          cache: str | os.PathLike[str] | None = None, progress: bool = True,
          command: str = "", image_data: str | os.PathLike[str] | None = None,
          stage2_settings: TrainSettings | None = None,
          init: str | os.PathLike[str] | None = None,
          shards: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Train a ``kind`` head for ``model_name``; writes the checkpoint and ``report.json`` /
    ``report.md`` to ``out`` and returns the report.

    ``msd`` (vision-language targets) trains in two stages, as MSD does: first on text-only
    data (the prompts above, no image), then on ``image_data`` (JSONL of ``{"image", "prompt"}``:
    the target answers each with the image; the visual adapter learns here) with
    ``stage2_settings``. ``init``: start from a trained head (an ``eagle`` head of the same
    language model gives ``msd`` its text stage; its visual adapter starts fresh).
    ``shards``: train on a folder ``specplug data`` built (``specplug.train.shards``) instead
    of generating data here; its hidden layers are the head's, and the held-out split is by
    prompt, so no prompt's greedy and sampled answers land on both sides."""
    from specplug.heads.checkpoint import save_head
    from specplug.heads.nets import build_net
    from specplug.models import cache_dir, load_model

    t0 = time.perf_counter()
    data = data or DataSettings()
    settings = settings or TrainSettings.for_kind(kind)
    index = None
    if shards is not None:
        from specplug.train.shards import iter_shard_examples, read_index

        index = read_index(shards)
        if index is None:
            list(iter_shard_examples(shards))  # raises, naming the folder and the fix
        built = index["settings"]
        if str(built["model"]) != str(model_name):
            raise SpecplugError(f"--shards {shards} were built from {built['model']!r}, not "
                                f"{str(model_name)!r}: its features are another model's; "
                                "build shards for this model with `specplug data --model`")
        layers = tuple(built["hidden_layers"])
        if kind == "msd" and layers != (-1, 0):
            raise SpecplugError(f"an msd head reads hidden layers (-1, 0) (last features and "
                                f"input embeddings); --shards {shards} hold {layers}: build "
                                "them with `specplug data --hidden-layers -1,0`")
        data = replace(data, hidden_layers=layers)
    else:
        training_prompts(data)  # a bad data file fails here, before --out is created
    if image_data is not None:
        from specplug.train.data import load_image_prompts

        load_image_prompts(image_data)
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    for name in ("train_state", "train_state_multimodal", "model.safetensors", "config.json",
                 "report.json", "report.md"):
        remove_stale_builds(outdir / name)  # what a killed run on this --out left half-built
    model, tok = load_model(model_name)
    text = model.config.get_text_config()
    media = sorted(media_token_ids(model))
    if kind == "msd" and shards is None:
        data = replace(data, hidden_layers=(-1, 0))  # last features + input embeddings
    elif image_data is not None:
        raise ValueError(f"image_data is for the msd head; a {kind} head trains on text")
    cache_root = Path(cache) if cache else cache_dir() / "train" / Path(str(model_name)).name
    if shards is not None:
        pairs = list(iter_shard_examples(shards, with_prompt_index=True))
        examples, prompt_of = [e for e, _ in pairs], [i for _, i in pairs]
    else:
        examples, prompt_of = build_dataset(model, tok, str(model_name), data, cache_root,
                                            progress)
    mm: list[tuple[Example, dict[str, Any]]] = []
    if image_data is not None:
        from specplug.models import load_processor
        from specplug.train.data import load_image_prompts, multimodal_examples

        items = load_image_prompts(image_data)
        bar = _Bar(len(items), "target answers with images", progress)
        for q, f, inputs in multimodal_examples(model, load_processor(model_name), items,
                                                data.max_new_tokens, list(data.hidden_layers),
                                                data.topk, progress=bar):
            mm.append((Example(torch.tensor(q.ids), f["features"], f["top_ids"],
                               f["top_probs"], len(q.prompt)), inputs))
        bar.close()
    t_data = time.perf_counter() - t0

    rng = random.Random(1234)
    held_prompts = heldout_prompts(prompt_of, heldout, rng)
    held = [e for e, p in zip(examples, prompt_of) if p in held_prompts]
    trainset = [e for e, p in zip(examples, prompt_of) if p not in held_prompts] or held

    mm_order = list(range(len(mm)))
    rng.shuffle(mm_order)
    n_mm_held = max(1, int(len(mm) * heldout)) if len(mm) > 1 else 0
    mm_held = [mm[i] for i in mm_order[:n_mm_held]]
    mm_train = [mm[i] for i in mm_order[n_mm_held:]] or mm_held

    H, V = text.hidden_size, int(model.get_output_embeddings().weight.shape[0])
    vocab = build_draft_vocab(trainset + [e for e, _ in mm_train], V,
                              min(draft_vocab_size, V) + len(media))
    vocab = vocab[~torch.isin(vocab, torch.tensor(media, dtype=torch.long))][:draft_vocab_size]
    heads = max(1, H // 64) if H % 64 == 0 else next(h for h in (8, 4, 2, 1) if H % h == 0)
    config = HeadConfig(kind=kind, hidden_size=H, vocab_size=V, draft_vocab_size=len(vocab),
                        num_heads=num_heads, num_attention_heads=heads,
                        intermediate_size=2 * H, hidden_layers=list(data.hidden_layers),
                        rope_theta=float(getattr(text, "rope_theta", 10000.0) or 10000.0),
                        target=str(model_name), media_tokens=media if kind == "msd" else [])
    torch.manual_seed(settings.seed)
    net = build_net(config, vocab).bind(model.get_input_embeddings(),
                                        model.get_output_embeddings().weight)
    if init is not None:
        _init_from(net, init)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc=f"training {kind}", unit="step")

    def on_step(step: int, total: int, loss: float) -> None:
        if bar is not None:
            bar.total = total
            bar.n = step
            bar.set_postfix(loss=f"{loss:.3f}")
            bar.refresh()

    result = train_head(net, trainset, held, settings, state_dir=outdir / "train_state",
                        progress=on_step)
    stages = {"text": {"steps": result.steps, "heldout": result.heldout,
                       "examples": len(trainset)}}
    depth = min(num_heads, net.max_depth)
    if mm:  # stage 2: multimodal
        stages["text"]["acceptance_on_image_prompts"] = measure_acceptance(
            model, net, [e for e, _ in mm_held], depth, inputs=[i for _, i in mm_held])
        s2 = stage2_settings or settings
        result = train_head(net, [e for e, _ in mm_train], [e for e, _ in mm_held], s2,
                            state_dir=outdir / "train_state_multimodal", progress=on_step)
        stages["multimodal"] = {"steps": result.steps, "heldout": result.heldout,
                                "examples": len(mm_train), "settings": asdict(s2)}
    if bar is not None:
        bar.close()
    t_train = time.perf_counter() - t0 - t_data
    save_head(net, outdir, metadata={"command": command})
    acceptance = measure_acceptance(model, net, held, depth=depth)
    if mm:
        stages["multimodal"]["acceptance_on_image_prompts"] = measure_acceptance(
            model, net, [e for e, _ in mm_held], depth, inputs=[i for _, i in mm_held])
    report = {
        "model": str(model_name), "kind": kind, "command": command,
        "config": config.model_dump(), "settings": asdict(settings), "data": asdict(data),
        "shards": ({"folder": str(shards), "settings": index["settings"],
                    "tokens": sum(e["tokens"] for e in index["shards"])}
                   if index is not None else None),
        "examples": {"train": len(trainset), "heldout": len(held),
                     "train_tokens": int(sum(e.ids.shape[0] for e in trainset))},
        "wall_s": {"data": round(t_data, 1), "train": round(t_train, 1),
                   "total": round(time.perf_counter() - t0, 1)},
        "steps": result.steps, "history": result.history, "heldout": result.heldout,
        "acceptance": acceptance, "stages": stages, "init": str(init) if init else None,
        "checkpoint_mb": round((outdir / "model.safetensors").stat().st_size / 2**20, 2),
    }
    atomic_write_text(outdir / "report.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(outdir / "report.md", _markdown(report))
    return report


def _init_from(net: Any, folder: str | os.PathLike[str]) -> None:
    """Start ``net`` from a trained head's weights where names and shapes agree (an ``eagle``
    head gives an ``msd`` head its text stage); the rest (msd's visual adapter) stays fresh."""
    from specplug.heads.checkpoint import load_head

    src = load_head(folder).state_dict()
    own = net.state_dict()
    same_vocab = torch.equal(src["draft_vocab"], net.draft_vocab)
    take = {k: v for k, v in src.items() if k in own and k not in ("draft_vocab", "media")
            and v.shape == own[k].shape
            and (same_vocab or not k.startswith("lm_heads."))}  # rows are draft-vocab ids
    if not take:
        raise ValueError(f"{folder}: no weights of that head fit this {net.config.kind} head")
    net.load_state_dict(take, strict=False)


def _markdown(r: dict[str, Any]) -> str:
    h = r["heldout"]
    lines = [f"# {r['kind']} head for {r['model']}", "", f"Command: `{r['command']}`", "",
             f"- examples: {r['examples']['train']} train ({r['examples']['train_tokens']} "
             f"tokens), {r['examples']['heldout']} held out",
             f"- wall time: data {r['wall_s']['data']} s, training {r['wall_s']['train']} s",
             f"- checkpoint: {r['checkpoint_mb']} MB",
             f"- held-out mean accepted tokens per step (greedy chain): "
             f"{r['acceptance']['mean_accepted_per_step']:.2f}", "",
             "| depth | top-1 | top-5 |", "| --- | --- | --- |"]
    for d in h.get("top1", {}):
        lines.append(f"| {d} | {h['top1'][d]:.3f} | {h['top5'][d]:.3f} |")
    return "\n".join(lines) + "\n"
