"""Published heads in their authors' layouts, converted on load (safetensors only):

- Medusa (FasterDecoding/Medusa): ``config.json`` with ``medusa_num_heads`` /
  ``medusa_num_layers``, and ``medusa_lm_head.safetensors`` whose keys are
  ``{head}.{layer}.linear.weight|bias`` ([H, H], [H]) and ``{head}.{num_layers}.weight``
  ([V, H], each head's own LM head).
- EAGLE-1/2 (SafeAILab/EAGLE): a Llama ``config.json`` (``num_hidden_layers: 1``, optional
  ``bias``) and ``model.safetensors`` with ``fc.weight [H, 2H]`` (input ``[embedding;
  feature]``), optional ``fc.bias``, and ``layers.0.{self_attn,mlp,post_attention_layernorm}``
  (no ``input_layernorm``); ``embed_tokens.weight`` is ignored (the target's is used).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from specplug.errors import InputFileError, read_json
from specplug.heads.config import HeadConfig
from specplug.heads.nets import DraftNet, EagleNet, MedusaNet

__all__ = ["load_foreign", "load_medusa", "load_eagle"]


def _safetensors(path: Path, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    from specplug.errors import load_safetensors

    for name in names:
        if (path / name).is_file():
            return {k: v.float()
                    for k, v in load_safetensors(path / name, "head weights").items()}
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".pt", ".bin", ".pth"))
    hint = (f"; found {', '.join(pickles)}: pickle checkpoints are never loaded, convert them "
            "to safetensors first") if pickles else ""
    raise InputFileError(f"{path}: none of {', '.join(names)}{hint}")


def load_medusa(folder: str | os.PathLike[str]) -> MedusaNet:
    """A FasterDecoding/Medusa head folder -> ``MedusaNet`` with its own LM heads."""
    path = Path(folder)
    cfg = read_json(path / "config.json", "head config")
    heads = int(cfg.get("medusa_num_heads", 0))
    layers = int(cfg.get("medusa_num_layers", 1))
    if heads < 1:
        raise ValueError(f"{path}/config.json has no medusa_num_heads: not a Medusa head")
    state = _safetensors(path, ("medusa_lm_head.safetensors", "model.safetensors"))
    lm = state.get(f"0.{layers}.weight")
    if lm is None:
        raise ValueError(f"{path}: no '0.{layers}.weight' (head 0's LM head) in the weights: "
                         "not the FasterDecoding/Medusa layout")
    V, H = lm.shape
    config = HeadConfig(kind="medusa", hidden_size=H, vocab_size=V, draft_vocab_size=V,
                        num_heads=heads, num_layers=layers, own_lm_heads=True,
                        target=cfg.get("base_model_name_or_path"))
    net = MedusaNet(config)
    ours = {}
    for h in range(heads):
        for layer in range(layers):
            for p in ("weight", "bias"):
                ours[f"heads.{h}.{layer}.linear.{p}"] = state[f"{h}.{layer}.linear.{p}"]
        ours[f"lm_heads.{h}.weight"] = state[f"{h}.{layers}.weight"]
    ours["draft_vocab"] = torch.arange(V)
    net.load_state_dict(ours, strict=True)
    return net.eval()


def load_eagle(folder: str | os.PathLike[str]) -> EagleNet:
    """A SafeAILab/EAGLE (EAGLE-1/2) draft folder -> ``EagleNet``."""
    path = Path(folder)
    cfg = read_json(path / "config.json", "head config")
    state = _safetensors(path, ("model.safetensors",))
    if "fc.weight" not in state or "layers.0.self_attn.q_proj.weight" not in state:
        raise ValueError(f"{path}: no fc.weight / layers.0.* in the weights: not an EAGLE-1/2 "
                         "draft (EAGLE-3 'midlayer' checkpoints are not supported)")
    H = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    config = HeadConfig(
        kind="eagle", hidden_size=H, vocab_size=int(cfg["vocab_size"]),
        draft_vocab_size=int(cfg["vocab_size"]), num_attention_heads=heads,
        num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or H // heads),
        intermediate_size=int(cfg["intermediate_size"]),
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        fc_bias="fc.bias" in state, target=cfg.get("_name_or_path"))
    net = EagleNet(config)
    ours = {"fc.weight": state["fc.weight"], "draft_vocab": torch.arange(config.vocab_size)}
    if "fc.bias" in state:
        ours["fc.bias"] = state["fc.bias"]
    for k, v in state.items():
        if k.startswith("layers.0."):
            ours["layer." + k[len("layers.0."):]] = v
    net.load_state_dict(ours, strict=True)
    return net.eval()


def load_foreign(folder: str | os.PathLike[str]) -> DraftNet:
    """Detect the layout of ``folder`` (Medusa or EAGLE) and load it."""
    path = Path(folder)
    cfg = read_json(path / "config.json", "head config")
    if "medusa_num_heads" in cfg:
        return load_medusa(path)
    if "hidden_size" in cfg and "num_attention_heads" in cfg:  # a Llama config: EAGLE
        return load_eagle(path)
    raise ValueError(f"{path}: not a specplug, Medusa or EAGLE head folder (its config.json "
                     "has neither format=specplug-head, medusa_num_heads nor a Llama config)")
