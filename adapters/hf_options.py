"""Transformers' generation options in specplug's terms, for both Hugging Face routes.

``sampling_from`` turns a ``GenerationConfig`` into ``SamplingParams`` and refuses what
specplug's engine cannot reproduce exactly; ``WARPERS`` names the logits processors it does
reproduce; ``eos_ids`` reads the end-of-sequence ids.
"""

from __future__ import annotations

from typing import Any

from specplug.sampling import SamplingParams

__all__ = ["WARPERS", "eos_ids", "sampling_from"]

# Logits processors whose effect specplug's engine reproduces exactly; anything else in a
# generation config makes ``generate`` refuse rather than silently change the output.
WARPERS = {"TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper"}
_UNSUPPORTED_FIELDS = {
    "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "bad_words_ids": None,
    "min_length": 0, "min_new_tokens": None, "suppress_tokens": None,
    "begin_suppress_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
    "min_p": None, "top_h": None, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
    "sequence_bias": None, "guidance_scale": None, "renormalize_logits": False,
    "exponential_decay_length_penalty": None, "num_beams": 1, "num_return_sequences": 1,
}


def sampling_from(gc: Any, check: bool = True) -> SamplingParams:
    """Sampling parameters from a ``GenerationConfig``; with ``check``, refuse what the engine
    cannot reproduce (so outputs never silently differ from ``generate``)."""
    for name, neutral in _UNSUPPORTED_FIELDS.items():
        value = getattr(gc, name, None) if check else None
        if value is not None and value != neutral:
            if name in ("num_beams", "num_return_sequences"):
                raise NotImplementedError(f"{name}={value!r}: speculative decoding generates "
                                          "one sequence per prompt without beam search")
            raise NotImplementedError(
                f"generation option {name}={value!r} is not supported by specplug's engine "
                "(it would change which token the target picks); remove it, or use the "
                "assistant_model route, where transformers applies its own processors"
            )
    if not gc.do_sample:
        return SamplingParams()
    return SamplingParams(temperature=1.0 if gc.temperature is None else float(gc.temperature),
                          top_k=int(gc.top_k or 0),
                          top_p=1.0 if gc.top_p is None else float(gc.top_p))


def eos_ids(gc: Any) -> list[int]:
    eos = gc.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
