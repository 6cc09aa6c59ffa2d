"""Export a trained ``eagle`` head to the EAGLE-1 layout that vLLM serves natively.

vLLM's ``method: "eagle"`` builds ``EagleLlamaForCausalLM`` from a Llama ``config.json``
(``num_hidden_layers: 1``) and ``model.safetensors`` with ``fc.weight [H, 2H]`` (no bias; input
``[embedding; feature]``) and ``layers.0.{self_attn, post_attention_layernorm, mlp}`` (the first
layer has no input norm). It shares the target's token embedding and LM head and feeds the
target's final (normed) hidden states: the same network as specplug's ``EagleNet`` with
``hidden_layers: [-1]``, so the export is a renaming, plus two adjustments:

- **Embedding scale.** vLLM's drafter reads the target's raw embedding table; a target whose
  embedding module multiplies by a constant (Gemma: ``sqrt(hidden_size)``) had that scale in
  specplug's training inputs, so it is folded into ``fc``'s embedding columns.
- **Vocabulary.** vLLM's EAGLE-1 drafter takes the argmax over the target's whole LM head;
  specplug's drafts over the head's draft vocabulary (``draft_vocab``, the ids seen in training).
  The predicted feature is the same; a draft token may differ where a token outside the draft
  vocabulary wins, which costs acceptance, never correctness (vLLM verifies every draft).

Weights are written in float32 (a bf16 head converts exactly; the folded scale is not rounded).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from specplug.files import (
    atomic_write_text,
    building_dir,
    file_lock,
    file_manifest,
    matches_manifest,
    read_record,
    remove_stale_builds,
    temporary_sibling,
    write_record,
)
from specplug.heads.nets import DraftNet

__all__ = ["cached_vllm_eagle", "embedding_scale", "export_vllm_eagle", "vllm_eagle_state"]

#: ``model_type`` prefixes of targets whose token embedding is scaled by ``sqrt(hidden_size)``
SCALED_EMBEDDING_TYPES = ("gemma",)


def embedding_scale(target_config: Mapping[str, Any]) -> float:
    """The constant the target's embedding module multiplies the table rows by (1 for
    Llama-style targets, ``sqrt(hidden_size)`` for Gemma's), from its ``config.json``."""
    if str(target_config.get("model_type", "")).startswith(SCALED_EMBEDDING_TYPES):
        return math.sqrt(int(target_config["hidden_size"]))
    return 1.0


def _check_exportable(net: DraftNet, target_config: Mapping[str, Any]) -> None:
    cfg = net.config
    if cfg.kind != "eagle":
        raise ValueError(
            f"only 'eagle' heads have a vLLM-native form (vLLM's EAGLE-1 drafter); this is a "
            f"{cfg.kind!r} head. Serve it with specplug.hf.generate / specplug run, or train an "
            "eagle head (specplug train --drafter eagle)")
    if cfg.fc_bias:
        raise ValueError("this eagle head's fc has a bias, which vLLM's EAGLE-1 drafter does not "
                         "load (its fc has none); train a head without one (specplug's default)")
    if list(cfg.hidden_layers) != [-1]:
        raise ValueError(f"this eagle head reads hidden_layers={cfg.hidden_layers}; vLLM's EAGLE-1 "
                         "drafter feeds only the target's final hidden states ([-1])")
    if "text_config" in target_config:
        raise ValueError("the target is a vision-language model; vLLM 0.32's EAGLE-1 drafter "
                         "takes no multimodal inputs, so serve it with a token-id drafter "
                         "(docs/multimodal.md#vllm)")
    H, V = int(target_config["hidden_size"]), int(target_config["vocab_size"])
    if (cfg.hidden_size, cfg.vocab_size) != (H, V):
        raise ValueError(
            f"head/target mismatch: the eagle head was trained for hidden size "
            f"{cfg.hidden_size} and vocabulary {cfg.vocab_size}"
            f"{f' ({cfg.target})' if cfg.target else ''}, the target has {H} and {V}; "
            "export a head trained for this target (specplug train --model ...)")


def vllm_eagle_state(net: DraftNet, embed_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """``net``'s weights under vLLM's EAGLE-1 names (float32), with ``embed_scale`` folded into
    ``fc.weight[:, :H]`` (the embedding half of its ``[H, 2H]`` input)."""
    H = net.config.hidden_size
    state: dict[str, torch.Tensor] = {}
    for name, value in net.state_dict().items():
        if name == "draft_vocab":
            continue
        value = value.detach().float().clone()
        if name == "fc.weight":
            value[:, :H] *= embed_scale
        if name.startswith("layer."):
            name = "layers.0." + name[len("layer."):]
        state[name] = value.contiguous()
    return state


def _llama_config(net: DraftNet, target_config: Mapping[str, Any]) -> dict[str, Any]:
    cfg = net.config
    heads = cfg.num_attention_heads
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size or 2 * cfg.hidden_size,
        "num_hidden_layers": 1,
        "num_attention_heads": heads,
        "num_key_value_heads": cfg.num_key_value_heads or heads,
        "head_dim": cfg.head_dim or cfg.hidden_size // heads,
        "hidden_act": "silu",
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": int(target_config.get("max_position_embeddings") or 8192),
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }


def export_vllm_eagle(head: DraftNet | str | os.PathLike[str], out: str | os.PathLike[str],
                      target_config: Mapping[str, Any]) -> Path:
    """Write ``head`` (an ``eagle`` head or its folder) to ``out`` in vLLM's EAGLE-1 layout, for
    the target described by ``target_config`` (its ``config.json`` as a dict).

    Raises:
        ValueError: a head that is not an exportable eagle head, or one trained for another
            target (hidden size or vocabulary), naming what differs.
    """
    from safetensors.torch import save_file

    from specplug.heads.checkpoint import load_head

    net = head if isinstance(head, DraftNet) else load_head(head)
    _check_exportable(net, target_config)
    scale = embedding_scale(target_config)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    weights = temporary_sibling(folder / "model.safetensors")
    try:
        save_file(vllm_eagle_state(net, scale), str(weights), metadata={
            "format": "pt", "exported_by": "specplug", "embed_scale": repr(scale)})
        os.replace(weights, folder / "model.safetensors")
    finally:
        weights.unlink(missing_ok=True)
    config = _llama_config(net, target_config)
    config["specplug"] = {"kind": net.config.kind, "target": net.config.target,
                          "embed_scale": scale,
                          "draft_vocab_size": net.config.draft_vocab_size}
    atomic_write_text(folder / "config.json", json.dumps(config, indent=2) + "\n")
    return folder


def cached_vllm_eagle(head_folder: str | os.PathLike[str], target_config: Mapping[str, Any],
                      root: str | os.PathLike[str] | None = None) -> Path:
    """Export ``head_folder`` once into specplug's cache (``<cache>/vllm-eagle/<digest>``, keyed
    by the head's files and the embedding scale) and return the folder; later calls reuse it."""
    from specplug.models import cache_dir

    src = Path(head_folder)
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        path = src / name
        digest.update(path.read_bytes() if path.is_file() else name.encode())
    digest.update(repr(embedding_scale(target_config)).encode())
    base = Path(root) if root is not None else cache_dir() / "vllm-eagle"
    folder = base / f"{src.name}-{digest.hexdigest()[:16]}"
    if _finished_export(folder):
        return folder
    with file_lock(folder):
        if not _finished_export(folder):  # another process may have exported it meanwhile
            remove_stale_builds(folder)
            with building_dir(folder) as tmp:
                export_vllm_eagle(src, tmp, target_config)
                write_record(tmp / _EXPORT_MARKER, "specplug-vllm-export", 1,
                             {"files": file_manifest(tmp)})
    return folder


_EXPORT_MARKER = "specplug-export.json"


def _finished_export(folder: Path) -> bool:
    """True when ``folder`` is a complete export: its marker lists every file, each intact."""
    marker = read_record(folder / _EXPORT_MARKER, "specplug-vllm-export", 1)
    return marker is not None and matches_manifest(folder, marker.get("files"))
