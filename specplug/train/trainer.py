"""The training loop for draft heads: batches over cached target features, the per-kind loss,
resumable checkpoints, held-out accuracy.

Labels are the target's own choices (self-distillation): at depth ``d`` a head at position
``t`` learns the target's argmax at position ``t + d`` (its greedy next token there), and,
for heads trained by distillation, the target's top-k distribution there.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from specplug.files import building_dir
from specplug.heads.nets import DraftNet

__all__ = ["TrainSettings", "Example", "build_draft_vocab", "draft_index", "make_batches", "head_loss",
           "evaluate", "train_head", "save_state", "load_state"]


@dataclass
class TrainSettings:
    """How a head is trained (saved beside the checkpoint)."""

    epochs: int = 12
    lr: float = 1e-3
    batch_size: int = 8
    max_len: int = 256
    decay: float = 0.8  # weight of depth d: decay ** (d - 1)
    kd_weight: float = 1.0  # soft cross-entropy on the target's top-k distribution
    hard_weight: float = 1.0  # cross-entropy on the target's argmax
    reg_weight: float = 0.0  # SmoothL1 of predicted features on the target's (EAGLE, Clover-2)
    feature_noise: float = 0.0  # std of Gaussian noise on input features (EAGLE)
    warmup: int = 20
    grad_clip: float = 0.5
    seed: int = 0
    save_every: int = 50

    @classmethod
    def for_kind(cls, kind: str, **overrides: Any) -> TrainSettings:
        """Per-kind defaults from the papers: Medusa and Clover hard labels with decaying depth
        weights; Clover-2 distillation (soft CE) + 10 x feature regression, decay 0.7; EAGLE
        feature regression + 0.1 x soft CE with input noise (MSD the same)."""
        base: dict[str, Any] = {
            "medusa": {},
            "clover": {},
            "clover2": {"decay": 0.7, "hard_weight": 0.0, "kd_weight": 1.0, "reg_weight": 10.0},
            "eagle": {"hard_weight": 0.0, "kd_weight": 0.1, "reg_weight": 1.0,
                      "feature_noise": 0.05},
            "msd": {"hard_weight": 0.0, "kd_weight": 0.1, "reg_weight": 1.0,
                    "feature_noise": 0.05},  # EAGLE's recipe (MSD trains an EAGLE layer)
        }[kind]
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)


@dataclass
class Example:
    """One sequence: token ids ``[T]``, features ``[T, F]``, the target's top-k ids/probs
    ``[T, k]`` at each position (its distribution of the *next* token)."""

    ids: torch.Tensor
    features: torch.Tensor
    top_ids: torch.Tensor
    top_probs: torch.Tensor
    prompt_len: int = 0


def draft_index(net: DraftNet) -> torch.Tensor:
    """``[V]`` int64: each target id's index in ``net``'s draft vocabulary, -1 outside it."""
    to_draft = torch.full((net.config.vocab_size,), -1, dtype=torch.long)
    to_draft[net.draft_vocab] = torch.arange(net.draft_vocab.numel())
    return to_draft


def build_draft_vocab(examples: list[Example], vocab_size: int, size: int) -> torch.Tensor:
    """FR-Spec-style draft vocabulary: the ``size`` ids the target emits most often in the
    training data (its top-1 choices), then the ids it writes in prompts, then the lowest
    unused ids (BPE / SentencePiece ids roughly follow merge frequency). Sorted ``[size]``."""
    if size >= vocab_size:
        return torch.arange(vocab_size)
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for ex in examples:
        counts.index_add_(0, ex.top_ids[:, 0], torch.ones(ex.top_ids.shape[0],
                                                         dtype=torch.float64))
        counts.index_add_(0, ex.ids, torch.full((ex.ids.shape[0],), 1e-3, dtype=torch.float64))
    counts -= torch.arange(vocab_size, dtype=torch.float64) * 1e-12  # ties: lower ids first
    return torch.topk(counts, size).indices.sort().values


def make_batches(examples: list[Example], batch_size: int, max_len: int, rng: random.Random
                 ) -> list[list[tuple[Example, int, int]]]:
    """Windows of at most ``max_len`` positions, shuffled, grouped into batches."""
    windows = [(ex, s, min(s + max_len, ex.ids.shape[0]))
               for ex in examples for s in range(0, ex.ids.shape[0] - 2, max_len)]
    rng.shuffle(windows)
    return [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]


def _collate(batch: list[tuple[Example, int, int]], responses_only: bool = False
             ) -> dict[str, torch.Tensor]:
    """Right-padded tensors of a batch of windows. ``responses_only``: a ``scored [B, T]`` mask
    too, true from each example's last prompt position on (where a drafter drafts from), which
    ``head_loss`` then counts its accuracy over (its loss is over every position)."""
    T = max(e - s for _, s, e in batch)
    B = len(batch)
    ex0 = batch[0][0]
    out = {
        "tokens": torch.zeros(B, T, dtype=torch.long),
        "features": torch.zeros(B, T, ex0.features.shape[1]),
        "top_ids": torch.zeros(B, T, ex0.top_ids.shape[1], dtype=torch.long),
        "top_probs": torch.zeros(B, T, ex0.top_probs.shape[1]),
        "valid": torch.zeros(B, T, dtype=torch.bool),
    }
    for r, (ex, s, e) in enumerate(batch):
        n = e - s
        out["tokens"][r, :n] = ex.ids[s:e]
        out["features"][r, :n] = ex.features[s:e].float()
        out["top_ids"][r, :n] = ex.top_ids[s:e]
        out["top_probs"][r, :n] = ex.top_probs[s:e].float()
        out["valid"][r, :n] = True
    if responses_only:
        pos = torch.arange(T)
        out["scored"] = torch.stack([pos + s >= ex.prompt_len - 1 for ex, s, _ in batch])
    return out


def head_loss(net: DraftNet, batch: dict[str, torch.Tensor], settings: TrainSettings,
              to_draft: torch.Tensor, noise: bool = False) -> tuple[torch.Tensor, dict]:
    """The loss of one batch and per-depth ``(correct top-1, correct top-5, count)``.

    ``to_draft [V]``: target id -> draft-vocabulary index (-1 outside it).
    """
    feats = batch["features"]
    if noise and settings.feature_noise > 0:
        feats = feats + settings.feature_noise * feats.std() * torch.randn_like(feats)
    out = net.train_forward(feats, batch["tokens"], batch["valid"])
    T = batch["tokens"].shape[1]
    total = feats.new_zeros(())
    stats: dict[int, list[float]] = {}
    for d, logits in enumerate(out["logits"], 1):
        n = min(logits.shape[1], T - d)  # positions t whose label (at t + d) exists
        if n <= 0:
            continue
        lg = logits[:, :n]
        valid = batch["valid"][:, d:d + n] & batch["valid"][:, :n]
        label = to_draft[batch["top_ids"][:, d:d + n, 0]]  # the target's argmax at t + d
        ok = valid & (label >= 0)
        if not bool(ok.any()):
            continue
        logp = lg.float().log_softmax(-1)
        w = settings.decay ** (d - 1)
        loss = feats.new_zeros(())
        if settings.hard_weight:
            loss = loss + settings.hard_weight * F.nll_loss(logp[ok], label[ok])
        if settings.kd_weight:
            ids = to_draft[batch["top_ids"][:, d:d + n]]  # [B, n, k]
            p = batch["top_probs"][:, d:d + n] * (ids >= 0)
            p = p / p.sum(-1, keepdim=True).clamp(min=1e-6)
            soft = -(p * logp.gather(-1, ids.clamp(min=0))).sum(-1)
            loss = loss + settings.kd_weight * soft[ok].mean()
        if settings.reg_weight:
            pred = out.get("features") if "features" in out else out.get("outputs", [None])[d - 1]
            if pred is not None:
                # the target's feature at t + d
                tgt = net.regression_target(batch["features"])[:, d:d + n]
                reg = F.smooth_l1_loss(pred[:, :n], tgt, reduction="none").mean(-1)
                loss = loss + settings.reg_weight * reg[ok].mean()
        total = total + w * loss
        with torch.no_grad():
            top5 = lg.topk(min(5, lg.shape[-1]), -1).indices
            lab = label[:, :, None]
            counted = ok & batch["scored"][:, :n] if "scored" in batch else ok
            stats[d] = [float(((top5[..., :1] == lab).any(-1) & counted).sum()),
                        float(((top5 == lab).any(-1) & counted).sum()), float(counted.sum())]
    return total, stats


@torch.no_grad()
def evaluate(net: DraftNet, examples: list[Example], settings: TrainSettings,
             to_draft: torch.Tensor, responses_only: bool = False) -> dict[str, Any]:
    """Teacher-forced held-out accuracy per depth: top-1 and top-5 of the target's argmax
    (over positions whose label is in the draft vocabulary). ``responses_only``: count only
    positions from each example's last prompt token on, those a drafter drafts from."""
    net.eval()
    acc: dict[int, list[float]] = {}
    loss_sum, batches = 0.0, 0
    for batch in make_batches(examples, settings.batch_size, settings.max_len,
                              random.Random(0)):
        loss, stats = head_loss(net, _collate(batch, responses_only), settings, to_draft)
        loss_sum += float(loss)
        batches += 1
        for d, (c1, c5, n) in stats.items():
            a = acc.setdefault(d, [0.0, 0.0, 0.0])
            a[0] += c1
            a[1] += c5
            a[2] += n
    return {"loss": loss_sum / max(batches, 1),
            "top1": {d: a[0] / max(a[2], 1) for d, a in sorted(acc.items())},
            "top5": {d: a[1] / max(a[2], 1) for d, a in sorted(acc.items())}}


def save_state(folder: Path, net: DraftNet, opt: torch.optim.Optimizer, step: int,
               epoch: int, history: list[dict]) -> None:
    """Resumable training state: the head, the optimizer's tensors (safetensors) and the
    counters (JSON). Built in a temporary folder, then swapped in (``files.building_dir``)."""
    from safetensors.torch import save_file

    from specplug.heads.checkpoint import save_head

    with building_dir(folder) as tmp:  # a killed trainer leaves the previous state intact
        save_head(net, tmp, dtype=torch.float32)
        tensors, scalars = {}, {}
        for i, st in opt.state_dict()["state"].items():
            for k, v in st.items():
                if torch.is_tensor(v) and v.dim() > 0:
                    tensors[f"{i}.{k}"] = v.contiguous()
                else:
                    scalars[f"{i}.{k}"] = float(v)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "trainer.json").write_text(json.dumps(
            {"step": step, "epoch": epoch, "scalars": scalars, "history": history}))


def load_state(folder: Path, net: DraftNet, opt: torch.optim.Optimizer
               ) -> tuple[int, int, list[dict]]:
    from safetensors.torch import load_file

    from specplug.heads.checkpoint import load_head

    net.load_state_dict(load_head(folder).state_dict())
    tensors = load_file(str(folder / "optimizer.safetensors"))
    meta = json.loads((folder / "trainer.json").read_text())
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = v
    for key, v in meta["scalars"].items():
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = torch.tensor(v)
    sd = opt.state_dict()
    sd["state"] = state
    opt.load_state_dict(sd)
    return meta["step"], meta["epoch"], meta["history"]


@dataclass
class TrainResult:
    steps: int
    history: list[dict] = field(default_factory=list)
    heldout: dict[str, Any] = field(default_factory=dict)


def train_head(net: DraftNet, train: list[Example], heldout: list[Example],
               settings: TrainSettings, state_dir: Path | None = None,
               progress: Callable[[int, int, float], None] | None = None) -> TrainResult:
    """Train ``net`` (bound to the target) on ``train``; resumes from ``state_dir`` if it holds
    a state, and saves one there every ``settings.save_every`` steps and at the end."""
    with torch.enable_grad():
        return _train(net, train, heldout, settings, state_dir, progress)


def _train(net: DraftNet, train: list[Example], heldout: list[Example],
           settings: TrainSettings, state_dir: Path | None,
           progress: Callable[[int, int, float], None] | None) -> TrainResult:
    torch.manual_seed(settings.seed)
    to_draft = draft_index(net)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, betas=(0.9, 0.95), weight_decay=0.0)
    per_epoch = len(make_batches(train, settings.batch_size, settings.max_len,
                                 random.Random(0)))
    total = max(per_epoch * settings.epochs, 1)
    step, start_epoch, history = 0, 0, []
    if state_dir is not None and (state_dir / "trainer.json").is_file():
        step, start_epoch, history = load_state(state_dir, net, opt)

    def lr_at(s: int) -> float:
        if s < settings.warmup:
            return settings.lr * (s + 1) / settings.warmup
        return settings.lr * 0.5 * (1 + math.cos(math.pi * min(s / total, 1.0)))

    for epoch in range(start_epoch, settings.epochs):
        batches = make_batches(train, settings.batch_size, settings.max_len,
                               random.Random(settings.seed * 1000 + epoch))
        skip = step - epoch * per_epoch  # batches of this epoch done before a resume
        net.train()
        for i, batch in enumerate(batches):
            if i < skip:
                continue
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            loss, _ = head_loss(net, _collate(batch), settings, to_draft, noise=True)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_value_(params, settings.grad_clip)
            opt.step()
            step += 1
            if progress:
                progress(step, total, loss.item())
            if state_dir is not None and step % settings.save_every == 0:
                save_state(state_dir, net, opt, step, epoch, history)
        ev = evaluate(net, heldout, settings, to_draft) if heldout else {}
        history.append({"epoch": epoch + 1, "step": step, **ev})
        if state_dir is not None:
            save_state(state_dir, net, opt, step, epoch + 1, history)
    net.eval()
    return TrainResult(steps=step, history=history, heldout=history[-1] if history else {})


def settings_dict(settings: TrainSettings) -> dict[str, Any]:
    return asdict(settings)
