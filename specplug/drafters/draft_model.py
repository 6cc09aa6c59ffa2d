"""``draft_model``: an independent small causal LM that shares the target's tokenizer.

With a vision-language target the draft model is text-only (Gagrani et al. 2024): it never sees
the image; each run of image placeholders is removed from its input, or replaced by the
``image_marker`` tokens, and its own positions count what it sees."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from specplug.drafters.base import DrafterOptions
from specplug.drafters.model_drafter import ModelDrafter, check_vocab, output_vocab
from specplug.hookspecs import hookimpl
from specplug.multimodal import media_token_ids


class DraftModelOptions(DrafterOptions):
    model: Any = Field(..., description="a loaded HF causal LM, a known short name "
                                        "(see specplug.models) or a local HF folder")
    image_marker: list[int] = Field(
        default_factory=list, description="vision-language targets: the draft's token ids "
        "that stand in for each image span (empty: image spans are removed)")


class DraftModelDrafter(ModelDrafter):
    name = "draft_model"
    Options = DraftModelOptions
    text_only = True

    def image_marker(self) -> tuple[int, ...]:
        return tuple(self.options.image_marker)

    @classmethod
    def from_config(cls, config: Any, target: Any = None) -> DraftModelDrafter:
        opts = config.drafter_options
        model = opts.model
        if isinstance(model, str):
            from specplug.models import load_model

            model, _ = load_model(model)
        target_vocab = None
        if target is not None:
            target_vocab = output_vocab(target)
            check_vocab(output_vocab(model), target_vocab, "the draft model",
                        media_token_ids(target))
        return cls(opts, model, target_vocab=target_vocab)


@hookimpl
def specplug_register_drafters(register):
    register(DraftModelDrafter)
