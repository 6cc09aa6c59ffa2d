"""Hugging Face route 2: specplug's own engine under transformers' calling convention.

``specplug.hf.generate(model, **inputs, spec=...)`` (or ``model.generate(**inputs,
custom_generate=specplug.hf.custom_generate(method=...))``) runs ``speculative_generate``:
token trees, batches with padding, drafters that need the target's hidden states. Output is
token-identical to the model's own greedy ``generate`` and exact under sampling. Route 1
(``assistant_model=``) is ``adapters/hf_assisted.py``; both are public as ``specplug.hf``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

from specplug.adapters.hf_options import WARPERS, eos_ids, sampling_from
from specplug.config import SpecConfig, build_spec, spec_option_names
from specplug.engine import (
    ModelTargetRunner,
    Speculator,
    check_max_new_tokens,
    speculative_generate,
)
from specplug.errors import SpecplugError, UnknownOptionError
from specplug.multimodal import split_model_inputs
from specplug.sampling import SamplingParams

__all__ = ["custom_generate", "generate"]

# generate() arguments that change what is returned or who drives the loop
_NOT_RETURNED = ("return_dict_in_generate", "output_scores", "output_logits",
                 "output_attentions", "output_hidden_states", "streamer", "logits_processor",
                 "stopping_criteria")


def _stop_fn(prompt_lists: list[list[int]], criteria: Any
             ) -> Callable[[int, list[int]], bool] | None:
    if criteria is None:
        return None

    def stop(row: int, new: list[int]) -> bool:
        ids = torch.tensor([prompt_lists[row] + new], dtype=torch.long)
        return bool(criteria(ids, None).any())

    return stop


def _run(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
         spec: SpecConfig, sampling: SamplingParams, max_new_tokens: int, eos: list[int],
         pad_token_id: int, stop_criteria: Any, generator: torch.Generator | None,
         speculator: Speculator | None = None, model_inputs: dict[str, Any] | None = None
         ) -> tuple[torch.Tensor, Any]:
    speculator = speculator or Speculator.from_config(spec, model)
    runner = ModelTargetRunner(model, hidden_layers=speculator.drafter.hidden_layers)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    am = attention_mask.bool()
    prompts = [input_ids[b][am[b]].tolist() for b in range(input_ids.shape[0])]
    stop = _stop_fn(prompts, stop_criteria)
    out = speculative_generate(runner, speculator, input_ids.cpu(), attention_mask.cpu(),
                               max_new_tokens=max_new_tokens, sampling=sampling,
                               eos_token_ids=eos, stop=stop, generator=generator,
                               model_inputs=model_inputs)
    width = max(len(s) for s in out.sequences)
    new = torch.full((input_ids.shape[0], width), pad_token_id, dtype=torch.long)
    for b, s in enumerate(out.sequences):
        new[b, : len(s)] = torch.tensor(s, dtype=torch.long)
    return torch.cat([input_ids.cpu(), new], 1).to(input_ids.device), out.stats


def generate(model: Any, /, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             *, spec: SpecConfig | dict | str | None = None, tokenizer: Any = None,
             stop_strings: str | list[str] | None = None, seed: int | None = None,
             generator: torch.Generator | None = None, return_stats: bool = False,
             speculator: Speculator | None = None, **kwargs: Any) -> Any:
    """Speculative ``generate`` on specplug's engine; same output as ``model.generate``.

    Args:
        input_ids: ``[B, L]`` left-padded prompt ids; ``attention_mask`` ``[B, L]``. A
            vision-language model takes its processor's other outputs too (``pixel_values``,
            ``image_sizes``, ``image_grid_thw``, ``mm_token_type_ids``, ...), as its own
            ``generate`` does: ``generate(model, **processor(...), max_new_tokens=...)``.
        spec: a ``SpecConfig``, a dict, or a method name. Keyword arguments that are not
            generation options are ``SpecConfig`` keys (``method=``,
            ``num_speculative_tokens=``, drafter options).
        kwargs: generation options as for ``model.generate`` (``max_new_tokens``,
            ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``eos_token_id``,
            ``pad_token_id``), merged over ``model.generation_config``.
        speculator: reuse an already built drafter/builder/verifier (skips set-up).
    Returns:
        ``[B, L + T]`` sequences (rows that stop early are padded with ``pad_token_id``), or
        ``(sequences, GenerationStats)`` with ``return_stats=True``.
    """
    for name in _NOT_RETURNED:
        if kwargs.get(name):
            raise NotImplementedError(f"{name} is not supported by specplug.hf.generate; it "
                                      "returns the sequences (and GenerationStats)")
    model_inputs = split_model_inputs(model, kwargs)
    spec_keys = spec_option_names(spec, kwargs)
    spec_opts = {k: kwargs.pop(k) for k in list(kwargs) if k in spec_keys}
    config = speculator.config if speculator is not None else build_spec(spec, spec_opts)
    if "max_length" in kwargs and "max_new_tokens" not in kwargs:
        kwargs["max_new_tokens"] = int(kwargs.pop("max_length")) - input_ids.shape[1]
    if "max_new_tokens" in kwargs:  # before transformers' own check, whose message differs
        check_max_new_tokens(kwargs["max_new_tokens"])
    gc = copy.deepcopy(model.generation_config)
    unknown = gc.update(**kwargs)
    if unknown:
        raise UnknownOptionError(f"unknown options {sorted(unknown)}: neither generation "
                                 f"options nor options of SpecConfig / drafter "
                                 f"{config.method!r}")
    if gc.max_new_tokens is None:
        raise SpecplugError("pass max_new_tokens (specplug does not guess a length)")
    sampling = sampling_from(gc)
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(seed)
    criteria = None
    if stop_strings:
        if tokenizer is None:
            raise ValueError("stop_strings needs tokenizer= (as in transformers)")
        from transformers.generation.stopping_criteria import StopStringCriteria

        criteria = StopStringCriteria(tokenizer=tokenizer, stop_strings=stop_strings)
    pad = gc.pad_token_id if gc.pad_token_id is not None else (eos_ids(gc) or [0])[0]
    seqs, stats = _run(model, input_ids, attention_mask, config, sampling, gc.max_new_tokens,
                       eos_ids(gc), pad, criteria, generator, speculator, model_inputs)
    return (seqs, stats) if return_stats else seqs


def custom_generate(spec: SpecConfig | dict | str | None = None, **options: Any
                    ) -> Callable[..., torch.Tensor]:
    """A callable for ``model.generate(..., custom_generate=...)`` that runs specplug's engine
    with transformers' prepared generation config and stopping criteria (``streamer`` is not
    forwarded by transformers to custom callables)."""
    config = build_spec(spec, options)

    def _generate(model: Any, input_ids: torch.Tensor, logits_processor: Any = None,
                  stopping_criteria: Any = None, generation_config: Any = None,
                  **model_kwargs: Any) -> torch.Tensor:
        for proc in logits_processor or []:
            if type(proc).__name__ not in WARPERS:
                raise NotImplementedError(
                    f"{type(proc).__name__} is not supported by specplug's engine; remove the "
                    "generation option that adds it")
        sampling = sampling_from(generation_config)
        max_new = generation_config.max_length - input_ids.shape[1]
        eos = eos_ids(generation_config)
        pad = generation_config.pad_token_id
        pad = pad if pad is not None else (eos or [0])[0]
        attention_mask = model_kwargs.pop("attention_mask", None)
        model_inputs = split_model_inputs(model, model_kwargs)
        positions = model_kwargs.get("position_ids")
        if torch.is_tensor(positions) and positions.dim() == 3:  # M-RoPE, from the images
            model_inputs["position_ids"] = positions
        seqs, _ = _run(model, input_ids, attention_mask, config, sampling,
                       max_new, eos, int(pad), stopping_criteria, None, None, model_inputs)
        return seqs

    return _generate
