"""``layer_skip``: self-speculation without training.

The drafter is the target itself with only some decoder layers (its first ``layers`` layers,
or an explicit list of layer indices), followed by the target's final norm and LM head. It
shares the target's weights (no copy) and keeps its own KV cache.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from pydantic import field_validator

from specplug.drafters.base import DrafterOptions
from specplug.drafters.model_drafter import ModelDrafter
from specplug.hookspecs import hookimpl


class LayerSkipOptions(DrafterOptions):
    layers: int | list[int] | None = None  # None: the first half of the layers

    @field_validator("layers")
    @classmethod
    def _positive(cls, v: int | list[int] | None) -> int | list[int] | None:
        if isinstance(v, int) and v < 1:
            raise ValueError(f"layers must be >= 1 (number of leading layers), got {v}")
        if isinstance(v, list) and (not v or min(v) < 0 or len(set(v)) != len(v)):
            raise ValueError(f"layers must be distinct non-negative layer indices, got {v}")
        return v


def _decoder_path(model: Any) -> list[str]:
    """Attribute path to the module that holds the decoder ``layers``: ``model.model`` for a
    causal LM, ``model.model.language_model`` for a vision-language model (LLaVA, Qwen2-VL)."""
    for path in (["model"], ["model", "language_model"]):
        module = model
        for name in path:
            module = getattr(module, name, None)
        if module is not None and isinstance(getattr(module, "layers", None), torch.nn.ModuleList):
            return path
    raise ValueError(f"layer_skip needs a decoder-only model with model.model.layers (or "
                     f"model.model.language_model.layers); {type(model).__name__} has none")


def _decoder(model: Any) -> Any:
    module = model
    for name in _decoder_path(model):
        module = getattr(module, name)
    return module


def select_layers(num_layers: int, layers: int | list[int] | None) -> list[int]:
    if layers is None:
        return list(range(max(1, num_layers // 2)))
    if isinstance(layers, int):
        if layers >= num_layers:
            raise ValueError(f"layer_skip layers={layers} must be fewer than the target's "
                             f"{num_layers} layers (else it is the target itself)")
        return list(range(layers))
    if len(layers) >= num_layers:
        raise ValueError(f"layer_skip must skip at least one of the target's {num_layers} "
                         "layers (else it is the target itself)")
    if max(layers) >= num_layers:
        raise ValueError(f"layer index {max(layers)} out of range: the target has "
                         f"{num_layers} layers")
    return sorted(layers)


def truncated_view(model: Any, layer_ids: list[int]) -> Any:
    """A shallow view of ``model`` that runs only ``layer_ids`` (weights shared, not copied)."""
    path = _decoder_path(model)
    cfg = copy.deepcopy(model.config)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    text.num_hidden_layers = len(layer_ids)
    if getattr(text, "layer_types", None):
        text.layer_types = [text.layer_types[i] for i in layer_ids]
    view = copy.copy(model)
    view._modules = dict(model._modules)
    view.config = cfg
    parent, original = view, model
    for depth, name in enumerate(path):  # shallow-copy every module on the path
        original = original._modules[name]
        copied = copy.copy(original)
        copied._modules = dict(original._modules)
        parent._modules[name] = copied
        if depth == len(path) - 1:
            copied._modules["layers"] = torch.nn.ModuleList(
                [original.layers[i] for i in layer_ids])
            copied.config = text
        parent = copied
    return view


class LayerSkipDrafter(ModelDrafter):
    name = "layer_skip"
    reads_target = True
    owns_weights = False  # its layers and LM head are the target's
    Options = LayerSkipOptions

    @classmethod
    def from_config(cls, config: Any, target: Any = None) -> LayerSkipDrafter:
        if target is None:
            raise ValueError("layer_skip needs the target model (it drafts with its layers)")
        n = len(_decoder(target).layers)
        ids = select_layers(n, config.drafter_options.layers)
        return cls(config.drafter_options, truncated_view(target, ids))


@hookimpl
def specplug_register_drafters(register):
    register(LayerSkipDrafter)
