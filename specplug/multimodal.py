"""Vision-language targets: what the engine needs to know about image tokens (torch only).

A VLM's processor expands every image into a run of *placeholder tokens* (LLaVA: ``<image>``
repeated once per visual feature; Qwen2-VL: ``<|image_pad|>`` between ``<|vision_start|>`` and
``<|vision_end|>``). The target replaces their embeddings by the image's projected features at
prefill; after that, decoding is plain text. So specplug needs three things, all here:

* **which ids are placeholders** (:func:`media_token_ids`), so drafters can treat them apart:
  n-gram lookup never matches or proposes across them, a text-only draft model sees the text
  with the image spans removed (:class:`TextView`), heads read the target's features there;
* **the prefill inputs** beside ``input_ids`` (``pixel_values``, ``image_grid_thw``, ...:
  :func:`split_model_inputs`), checked against the prompt (:func:`check_media_inputs`);
* **positions**: most VLMs use 1-D positions, but Qwen2-VL's multimodal rotary embedding
  (M-RoPE) gives every token three position ids (time, height, width). Image tokens get grid
  positions; every later text token ``i`` gets ``i + delta`` in all three streams, where
  ``delta`` (per row) is fixed by the prompt's images. :class:`MropePositions` computes the
  prompt's positions with the model's own ``get_rope_index`` and ``i + delta`` for every tree
  node after (``i``: the node's index in the row's sequence, i.e. committed length + depth).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

import torch

__all__ = [
    "MEDIA_INPUTS",
    "MropePositions",
    "PlainPositions",
    "TextView",
    "check_media_inputs",
    "media_token_ids",
    "position_scheme",
    "split_model_inputs",
]

#: model inputs that carry images or their layout; passed to the target's prefill only
MEDIA_INPUTS = ("pixel_values", "image_sizes", "image_grid_thw", "pixel_values_videos",
                "video_grid_thw", "mm_token_type_ids", "pixel_attention_mask",
                "image_attention_mask", "vision_feature_layer",
                "vision_feature_select_strategy")
# forward arguments specplug sets itself (never taken from the caller)
_RESERVED = {"input_ids", "attention_mask", "position_ids", "past_key_values", "cache",
             "inputs_embeds", "labels", "use_cache", "logits_to_keep", "cache_position",
             "output_attentions", "output_hidden_states", "return_dict", "kwargs", "args"}
_IMAGE_IDS = ("image_token_id", "image_token_index")
_VIDEO_IDS = ("video_token_id", "video_token_index")


def _ids(config: Any, names: Iterable[str]) -> set[int]:
    out = set()
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value >= 0:
            out.add(value)
    return out


def media_token_ids(model: Any) -> frozenset[int]:
    """The placeholder token ids of images and videos in ``model``'s prompts (empty for a
    text-only model)."""
    config = getattr(model, "config", model)
    return frozenset(_ids(config, _IMAGE_IDS) | _ids(config, _VIDEO_IDS))


def _forward_params(model: Any) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def split_model_inputs(model: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Pop from ``kwargs`` the target's own forward inputs (``pixel_values``, ``image_sizes``,
    ``image_grid_thw``, ...) and return them; what is left are generation options.

    Raises:
        ValueError: image inputs for a target that takes none (a text-only model).
    """
    params = _forward_params(model) - _RESERVED
    out = {k: kwargs.pop(k) for k in list(kwargs) if k in params}
    stray = [k for k in kwargs if k in MEDIA_INPUTS]
    if stray:
        raise ValueError(
            f"{type(model).__name__} is a text-only model: it takes no images ({', '.join(stray)}"
            " passed). Load the vision-language model itself (for example "
            "AutoModelForImageTextToText) or drop the images")
    return {k: v for k, v in out.items() if v is not None}


def _per_image_tokens(model: Any, model_inputs: Mapping[str, Any]) -> list[int] | None:
    """Placeholder tokens each passed image should have, when the family is known."""
    config = model.config
    grid = model_inputs.get("image_grid_thw")
    if grid is not None:  # Qwen2-VL family: t * h * w patches, merged merge x merge
        vision = getattr(config, "vision_config", None)
        merge = int(getattr(vision, "spatial_merge_size", 1) or 1)
        return [int(g.prod()) // (merge * merge) for g in torch.as_tensor(grid)]
    pixels = model_inputs.get("pixel_values")
    vision = getattr(config, "vision_config", None)
    if (pixels is not None and torch.is_tensor(pixels) and pixels.dim() == 4 and vision is not None
            and "image_sizes" not in model_inputs and hasattr(vision, "patch_size")):
        # LLaVA(-1.5) family: one feature per patch (+ CLS with the "full" strategy)
        h, w = pixels.shape[-2:]
        patch = int(vision.patch_size)
        full = getattr(config, "vision_feature_select_strategy", "default") == "full"
        return [(h // patch) * (w // patch) + int(full)] * int(pixels.shape[0])
    return None


def check_media_inputs(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       model_inputs: Mapping[str, Any]) -> None:
    """Refuse prompts whose image placeholders and passed images disagree, with the fix.

    Args:
        input_ids: ``[B, L]`` left-padded prompts; ``attention_mask`` ``[B, L]``.
        model_inputs: the target's extra prefill inputs (``pixel_values``, ...).
    """
    image_ids = _ids(model.config, _IMAGE_IDS)
    real = input_ids[attention_mask.bool()]
    placeholders = int(torch.isin(real, torch.tensor(sorted(image_ids), dtype=real.dtype)).sum()) \
        if image_ids else 0
    encoded = model_inputs.get("mm_encoder_outputs") or {}  # generate() encoded the images
    has_images = model_inputs.get("pixel_values") is not None or encoded.get("image") is not None
    if placeholders and not has_images:
        raise ValueError(
            f"the prompt holds {placeholders} image placeholder tokens (id "
            f"{sorted(image_ids)}) but no pixel_values were passed; pass the processor's whole "
            "output (generate(model, **inputs, ...)), images included")
    if has_images and not placeholders:
        raise ValueError(
            "images were passed but the prompt has no image placeholder tokens; build the "
            "prompt with the model's processor (it expands each image into its placeholders)")
    if has_images and not encoded:
        per_image = _per_image_tokens(model, model_inputs)
        if per_image is not None and sum(per_image) != placeholders:
            each = per_image[0] if len(set(per_image)) == 1 else per_image
            raise ValueError(
                f"mismatched image count: {len(per_image)} image(s) were passed ({each} "
                f"placeholder tokens each) but the prompts hold {placeholders} placeholder "
                "tokens; every image needs its placeholders in the prompt, in order (use the "
                "processor's output for both)")


# --------------------------------------------------------------------------------------------
# positions
# --------------------------------------------------------------------------------------------


class PlainPositions:
    """1-D positions: a token's index in its row (pads excluded)."""

    rows = 1

    def prefill(self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                index: torch.Tensor, model_inputs: Mapping[str, Any],
                given: torch.Tensor | None = None) -> torch.Tensor:
        """``index [B, L]`` (a token's index in its row) -> position ids for the prompt
        (``given``: positions the framework already computed, ignored for 1-D positions)."""
        return index

    def step(self, index: torch.Tensor) -> torch.Tensor:
        """``index [B, n]`` of new tokens (committed length + tree depth) -> position ids."""
        return index


class MropePositions:
    """Qwen2-VL's M-RoPE: ``[3, B, n]`` position ids (time, height, width); see the module
    docstring. ``delta [B]`` is set by each prefill."""

    rows = 3

    def __init__(self) -> None:
        self.delta = torch.zeros(1, dtype=torch.long)

    def prefill(self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                index: torch.Tensor, model_inputs: Mapping[str, Any],
                given: torch.Tensor | None = None) -> torch.Tensor:
        B = input_ids.shape[0]
        if given is not None and given.dim() == 3:  # ``generate`` computed them: [3 or 4, B, L]
            pos = given[-3:].cpu().long()
            real = attention_mask.bool()
            top = pos.amax(0).masked_fill(~real, -1).amax(-1)  # [B] highest prompt position
            self.delta = top + 1 - real.sum(-1)
            return pos
        grids = {k: model_inputs.get(k) for k in ("image_grid_thw", "video_grid_thw")}
        if all(v is None for v in grids.values()):  # no images: text positions in all streams
            self.delta = torch.zeros(B, dtype=torch.long)
            return self.step(index)
        types = model_inputs.get("mm_token_type_ids")
        if types is None:  # derive it from the placeholders (processors return it)
            types = torch.zeros_like(input_ids, dtype=torch.int)
            types[torch.isin(input_ids, torch.tensor(sorted(_ids(model.config, _IMAGE_IDS))))] = 1
            types[torch.isin(input_ids, torch.tensor(sorted(_ids(model.config, _VIDEO_IDS))))] = 2
        device = input_ids.device
        pos, delta = model.model.get_rope_index(
            input_ids=input_ids, mm_token_type_ids=types.to(device),
            attention_mask=attention_mask.to(device),
            **{k: v.to(device) for k, v in grids.items() if v is not None})
        self.delta = delta.reshape(B).long().cpu()
        return pos.cpu()

    def step(self, index: torch.Tensor) -> torch.Tensor:
        B, n = index.shape
        return (index + self.delta[:, None]).expand(3, B, n)


def position_scheme(model: Any) -> PlainPositions | MropePositions:
    """M-RoPE for models that compute 3-D rotary positions (``model.model.get_rope_index``),
    else 1-D positions."""
    inner = getattr(model, "model", None)
    if inner is not None and callable(getattr(inner, "get_rope_index", None)):
        return MropePositions()
    return PlainPositions()


# --------------------------------------------------------------------------------------------
# the text a text-only draft model sees
# --------------------------------------------------------------------------------------------


class TextView:
    """Maps a row's tokens (with image placeholders) to what a text-only draft sees: every
    maximal run of placeholders becomes ``marker`` (empty: the run is removed). Ids at or past
    ``vocab`` (the draft's vocabulary, when the target appended ids to it) count as
    placeholders. Incremental: ``feed`` takes each row's new tokens and returns the draft's new
    tokens, so a run split over two calls still becomes one marker."""

    def __init__(self, media: frozenset[int], marker: tuple[int, ...] = (),
                 vocab: int | None = None):
        self.media, self.marker, self.vocab = media, tuple(marker), vocab
        self.inside: list[bool] = []

    def start(self, rows: int) -> None:
        self.inside = [False] * rows

    def feed(self, row: int, tokens: list[int]) -> list[int]:
        if not self.media:
            return list(tokens)
        out: list[int] = []
        inside = self.inside[row]
        vocab = self.vocab if self.vocab is not None else float("inf")
        for t in tokens:
            if t in self.media or t >= vocab:
                if not inside:
                    out.extend(self.marker)
                inside = True
            else:
                out.append(t)
                inside = False
        self.inside[row] = inside
        return out
