"""vLLM adapter: specplug as a speculative method of a vLLM engine.

Installed as a ``vllm.general_plugins`` entry point, so every vLLM process (front end, engine
core, workers) calls ``register`` before it builds its config. Two ways in, one proposer:

- ``--speculative-config '{"method": "specplug", "drafter": "ngram", ...}'``: ``register``
  wraps ``EngineArgs.create_speculative_config`` (front end) to validate the specplug keys with
  ``SpecConfig`` there, at start-up, and rewrite the config to vLLM's own experimental seam,
  ``method: "custom_class"`` with ``model`` naming ``SpecplugProposer``; the specplug keys
  travel to the workers in ``additional_config["specplug"]``.
- ``{"method": "custom_class", "model": "specplug.adapters.vllm.SpecplugProposer", ...}`` with
  ``--additional-config '{"specplug": {"drafter": "ngram", ...}}'``: vLLM's documented route,
  validated at start-up the same way.
- ``{"method": "specplug", "drafter": "eagle"}``: the trained EAGLE head (shipped for the target,
  or ``checkpoint``) is exported once to vLLM's EAGLE-1 layout (``specplug.heads.export``) and
  the config becomes vLLM's own ``method: "eagle"``: vLLM's proposer reads the target's hidden
  states, which the ``custom_class`` seam does not hand over.

``SpecplugProposer`` is thin: it reads each row's history out of vLLM's arrays and asks
``specplug.serving.ChainProposer`` for chains; vLLM schedules, scores and verifies them.

On vLLM's CPU platform, ``register`` also replaces ``_expand_kernel_impl`` (the CPU stand-in for
a Triton kernel of the rejection sampler), which in vLLM 0.32 never writes its output, so every
sampled (temperature > 0) speculative step reads uninitialised temperatures. See
``docs/vllm.md``; ``SPECPLUG_VLLM_FIX_CPU_EXPAND=0`` turns the fix off.
"""

from __future__ import annotations

import logging
import os
from typing import Any

__all__ = [
    "PROPOSER",
    "SUPPORTED_VLLM",
    "SpecplugProposer",
    "fixed_cpu_expand",
    "native_eagle_config",
    "register",
    "spec_config_from",
    "translate_speculative_config",
]

from specplug.adapters.vllm_config import (
    PROPOSER,
    SUPPORTED_VLLM,
    native_eagle_config,
    spec_config_from,
    supported,
    translate_speculative_config,
    unsupported_message,
)

logger = logging.getLogger("specplug.vllm")

_state: dict[str, Any] = {"registered": False, "supported": None}


# --------------------------------------------------------------------------------------------
# The proposer vLLM's custom_class method builds in each worker
# --------------------------------------------------------------------------------------------


class SpecplugProposer:
    """vLLM ``custom_class`` proposer: specplug drafts, vLLM verifies.

    vLLM calls ``propose`` once per step with, for the ``n`` rows of its input batch, the tokens
    sampled this step, and its CPU arrays of every row's history.
    """

    def __init__(self, vllm_config: Any):
        import vllm

        from specplug.serving import ChainProposer

        if not supported(vllm.__version__):
            raise RuntimeError(unsupported_message(vllm.__version__))
        options = (vllm_config.additional_config or {}).get("specplug")
        if not isinstance(options, dict):
            raise ValueError("SpecplugProposer needs --additional-config "
                             "'{\"specplug\": {\"drafter\": ...}}'")
        k = vllm_config.speculative_config.num_speculative_tokens
        self.config = spec_config_from(options, k)
        model_config = vllm_config.model_config
        from specplug.multimodal import media_token_ids

        self.chains = ChainProposer(self.config, vocab_size=model_config.get_vocab_size(),
                                    max_context=model_config.max_model_len,
                                    media_tokens=media_token_ids(model_config.hf_config),
                                    engine="vLLM")

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        """vLLM hands over its target module; specplug's token drafters do not need it (their
        own weights, if any, were loaded when they were built)."""

    def propose(self, sampled_token_ids: list[list[int]], num_tokens_no_spec: Any,
                token_ids_cpu: Any, slot_mappings: Any = None, **kwargs: Any) -> list[list[int]]:
        """Draft chains.

        Args:
            sampled_token_ids: per row ``n``, the tokens vLLM committed this step (empty: no
                draft wanted for the row).
            num_tokens_no_spec: ``[max_num_reqs]`` int32, each row's committed length.
            token_ids_cpu: ``[max_num_reqs, max_model_len]`` int32, each row's tokens.

        Returns:
            per row, up to ``num_speculative_tokens`` draft token ids.
        """
        n = len(sampled_token_ids)
        histories = [token_ids_cpu[i, : int(num_tokens_no_spec[i])].tolist() for i in range(n)]
        return self.chains.propose(histories, sampled_token_ids)


# --------------------------------------------------------------------------------------------
# The vLLM-CPU sampling fix
# --------------------------------------------------------------------------------------------


def fixed_cpu_expand(output: Any, input_val: Any, cu_num_tokens: Any, replace_from: Any,
                     replace_to: Any, MAX_NUM_TOKENS: Any = None) -> None:
    """What vLLM's Triton ``expand_kernel`` does, in torch, writing ``output`` in its own dtype.

    ``output [num_tokens]``: request ``i``'s value ``input_val[i]`` (``replace_from`` replaced
    by ``replace_to``) repeated over its tokens ``cu_num_tokens[i-1]:cu_num_tokens[i]``.
    """
    import torch

    cu = cu_num_tokens.to(torch.long)
    counts = torch.diff(cu, prepend=cu.new_zeros(1))
    values = torch.where(input_val == replace_from,
                         torch.as_tensor(replace_to, dtype=input_val.dtype), input_val)
    total = int(cu[-1]) if cu.numel() else 0
    output[:total].copy_(values.repeat_interleave(counts).to(output.dtype))


def _fix_cpu_expand() -> bool:
    if os.environ.get("SPECPLUG_VLLM_FIX_CPU_EXPAND", "1") == "0":
        return False
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    import vllm.utils.cpu_triton_utils as cpu_kernels

    if getattr(cpu_kernels, "_expand_kernel_impl", None) is None:
        return False
    # read by the CPU platform when it registers its Triton stand-ins (after plugins load)
    cpu_kernels._expand_kernel_impl = fixed_cpu_expand
    return True


# --------------------------------------------------------------------------------------------
# The plugin entry point
# --------------------------------------------------------------------------------------------


def _wrap_create_speculative_config(refuse: str | None) -> None:
    from vllm.engine.arg_utils import EngineArgs

    original = getattr(EngineArgs, "create_speculative_config", None)
    if original is None:  # a vLLM whose config path we do not know: leave it alone
        logger.error("specplug: %s", refuse or "vLLM has no EngineArgs.create_speculative_config")
        return
    if getattr(original, "_specplug", False):
        return

    def create_speculative_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        spec = self.speculative_config
        if isinstance(spec, dict):
            spec = {str(k).replace("-", "_"): v for k, v in spec.items()}
            ours = spec.get("method") == "specplug" or spec.get("model") == PROPOSER
            if ours and refuse:
                raise RuntimeError(refuse)
            if ours:
                spec, additional = translate_speculative_config(
                    spec, self.additional_config, target_model=getattr(self, "model", None))
                self.speculative_config = spec
                self.additional_config = additional
        return original(self, *args, **kwargs)

    create_speculative_config._specplug = True  # type: ignore[attr-defined]
    EngineArgs.create_speculative_config = create_speculative_config  # type: ignore[method-assign]


def register() -> None:
    """``vllm.general_plugins`` entry point; runs in every vLLM process, idempotent.

    On a supported vLLM: routes ``method: "specplug"`` configs (validated at start-up) to
    ``SpecplugProposer`` and, on the CPU platform, fixes the sampling kernel stand-in. On any
    other vLLM it changes nothing but make a specplug config fail at start-up with the versions
    that work.
    """
    if _state["registered"]:
        return
    import vllm

    ok = supported(vllm.__version__)
    _state["supported"] = ok
    _wrap_create_speculative_config(None if ok else unsupported_message(vllm.__version__))
    if ok and _fix_cpu_expand():
        logger.info("specplug: using a fixed CPU expand kernel for sampled spec decoding")
    _state["registered"] = True
