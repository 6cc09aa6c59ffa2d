"""What ``--methods`` can name: specplug drafters with options, and framework baselines.

Spec strings: ``NAME[:KEY=VALUE,...]`` for specplug methods (``ngram``,
``layer_skip:layers=8``, ``ngram:tree=dynamic,tree_budget=12``); ``hf:greedy``,
``hf:prompt_lookup[:K]``, ``hf:early_exit[:LAYER]``, ``hf:assisted:model=NAME`` for plain
transformers; ``vllm:none``, ``vllm:ngram[:K]``, ``vllm:specplug:DRAFTER[:KEY=VALUE,...]`` for
real vLLM engines (``specplug.bench.vllm_methods``); ``sglang:none``, ``sglang:ngram``,
``sglang:specplug:DRAFTER[:KEY=VALUE,...]`` for real SGLang engines
(``specplug.bench.sglang_methods``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from specplug.config import parse_key_values

__all__ = ["MethodRun", "Method", "parse_method"]


@dataclass
class MethodRun:
    """One generation: new tokens, target forward passes, accepted draft tokens per step."""

    tokens: list[int]
    target_forwards: int
    accepted_per_step: list[int] = field(default_factory=list)


@dataclass
class Method:
    """A benchmarked method.

    Attributes:
        run: ``(prompt ids [1, L], max_new) -> MethodRun``, one request alone.
        reference: the method whose temperature-0 tokens this one must reproduce (None: the
            baseline ``hf:greedy``); vLLM methods are checked against ``vllm:none``, SGLang
            methods against ``sglang:none``.
        batch: ``(prompts, max_new) -> tokens per prompt``, all submitted at once (engines
            that batch concurrent requests); None where not measured.
        close: releases what the method holds (an engine process).
    """

    name: str
    run: Callable[[torch.Tensor, int], MethodRun]
    reference: str | None = None
    batch: Callable[[list[list[int]], int], list[list[int]]] | None = None
    close: Callable[[], None] | None = None


class _ForwardCounter:
    """Counts top-level forward calls of a model (the target passes)."""

    def __init__(self, model: Any):
        self.count = 0
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module: Any, args: Any) -> None:
        self.count += 1


def _sampling_kwargs(temperature: float) -> dict[str, Any]:
    if temperature > 0:
        return {"do_sample": True, "temperature": temperature}
    return {"do_sample": False}


def _hf_method(name: str, model: Any, rest: str, load: Callable[[str], Any],
               temperature: float) -> Method:
    from specplug.bench.hf_matches import record_matches

    kind, _, arg = rest.partition(":")
    gen: dict[str, Any] = {}
    if kind == "greedy" and not arg:
        pass
    elif kind == "prompt_lookup":
        gen["prompt_lookup_num_tokens"] = int(arg) if arg else 10
    elif kind == "early_exit":
        layers = model.config.get_text_config().num_hidden_layers
        gen["assistant_early_exit"] = int(arg) if arg else layers // 2
    elif kind == "assisted":
        opts = parse_key_values(arg)
        if set(opts) != {"model"}:
            raise ValueError("hf:assisted takes model=NAME (a short name or a local folder)")
        gen["assistant_model"] = load(str(opts["model"]))
    else:
        raise ValueError(f"unknown baseline {name!r}; known: hf:greedy, hf:prompt_lookup[:K], "
                         "hf:early_exit[:LAYER], hf:assisted:model=NAME")
    counter = _ForwardCounter(model)
    matches: list[int] = []

    def run(ids: torch.Tensor, max_new: int) -> MethodRun:
        counter.count = 0
        matches.clear()
        with record_matches(matches):
            out = model.generate(ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=max_new, **_sampling_kwargs(temperature), **gen)
        tokens = out[0, ids.shape[1]:].tolist()
        # assisted decoding verifies once per recorded step (the first includes the prompt);
        # early exit drafts with the same module, so its forward count would include drafts
        forwards = len(matches) if matches else counter.count
        return MethodRun(tokens, forwards, list(matches))

    return Method(name, run)


def _specplug_method(name: str, model: Any, method: str, opts: dict[str, Any],
                     load: Callable[[str], Any], temperature: float) -> Method:
    from specplug.adapters.hf_generate import generate
    from specplug.config import SpecConfig
    from specplug.engine import Speculator

    if method == "draft_model" and isinstance(opts.get("model"), str):
        opts["model"] = load(opts["model"])
    speculator = Speculator.from_config(SpecConfig(method=method, **opts), model)

    def run(ids: torch.Tensor, max_new: int) -> MethodRun:
        seqs, stats = generate(model, ids, max_new_tokens=max_new, speculator=speculator,
                               return_stats=True, **_sampling_kwargs(temperature))
        return MethodRun(seqs[0, ids.shape[1]:].tolist(), stats.target_forwards,
                         stats.accepted_per_step[0])

    return Method(name, run)


def parse_method(spec: str, model: Any, load: Callable[[str], Any],
                 temperature: float = 0.0, model_dir: str | None = None) -> Method:
    """Build a runnable method from its spec string (see the module docstring);
    ``model_dir``: the target's HF folder, for ``vllm:`` and ``sglang:`` methods."""
    head, _, rest = spec.partition(":")
    if head == "vllm":
        from specplug.bench.vllm_methods import vllm_method

        if model_dir is None:
            raise ValueError(f"{spec}: vLLM methods need the target's model folder")
        return vllm_method(spec, model_dir, temperature)
    if head == "sglang":
        from specplug.bench.sglang_methods import sglang_method

        if model_dir is None:
            raise ValueError(f"{spec}: SGLang methods need the target's model folder")
        return sglang_method(spec, model_dir, temperature)
    if head == "hf":
        return _hf_method(spec, model, rest, load, temperature)
    return _specplug_method(spec, model, head, parse_key_values(rest), load, temperature)
