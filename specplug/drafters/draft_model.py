"""``draft_model``: an independent small causal LM that shares the target's tokenizer."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from specplug.drafters.base import DrafterOptions
from specplug.drafters.model_drafter import ADAPTIVE, ModelDrafter, check_vocab, output_vocab
from specplug.hookspecs import hookimpl


class DraftModelOptions(DrafterOptions):
    model: Any = Field(..., description="a loaded HF causal LM, a known short name "
                                        "(see specplug.models) or a local HF folder")
    adaptive: bool = Field(True, description=ADAPTIVE)


class DraftModelDrafter(ModelDrafter):
    name = "draft_model"
    Options = DraftModelOptions

    @classmethod
    def from_config(cls, config: Any, target: Any = None) -> DraftModelDrafter:
        opts = config.drafter_options
        model = opts.model
        if isinstance(model, str):
            from specplug.models import load_model

            model, _ = load_model(model)
        if target is not None:
            check_vocab(output_vocab(model), output_vocab(target), "the draft model")
        return cls(opts, model)


@hookimpl
def specplug_register_drafters(register):
    register(DraftModelDrafter)
