"""SGLang adapter: ``--speculative-algorithm SPECPLUG``.

Installed as an ``sglang.srt.plugins`` entry point, so SGLang's ``load_plugins()`` calls
``register`` in every process it starts (the launcher, ``sglang.Engine``, each scheduler).
``register`` adds ``SPECPLUG`` to SGLang's speculative-algorithm registry
(``SpeculativeAlgorithm.register``); ``--speculative-algorithm SPECPLUG`` then resolves to
specplug's worker (``specplug.adapters.sglang_worker``), which drafts token trees through
specplug's core (``specplug.serving.ServingProposer``, the session the HF and vLLM routes
use) and hands them to SGLang's own tree verification.

Which drafter runs, and how, is one JSON object in ``SPECPLUG_SGLANG_CONFIG`` (every SGLang
process inherits the launcher's environment), validated by ``SpecConfig`` at start-up in the
launcher; unset, it is ``DEFAULT_OPTIONS`` (an n-gram chain as long as SGLang's own NGRAM
verifies by default: the slots a row are fixed when the engine starts, and each step verifies
only as many as its drafts fill, see ``specplug.adapters.sglang_worker``)::

    SPECPLUG_SGLANG_CONFIG='{"drafter": "ngram", "tree": "dynamic", "tree_budget": 8}' \\
      python -m sglang.launch_server --model-path MODEL --speculative-algorithm SPECPLUG

``SPECPLUG`` answers SGLang's ``is_ngram()``: its verify inputs have the shape of SGLang's
NGRAM (a fixed ``--speculative-num-draft-tokens`` slots a row with an ancestor mask), so every
branch SGLang takes for NGRAM (verify input, relays, graph runners) is the one it needs. It runs
without overlap scheduling (set for you) because drafting reads each request's committed
tokens.

On an SGLang outside ``SUPPORTED_SGLANG``, or one whose registry lacks what this adapter calls,
``register`` logs one line and registers nothing: SGLang starts as if specplug were absent.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

from specplug.errors import ConfigError

__all__ = ["ALGORITHM", "CONFIG_ENV", "DEFAULT_OPTIONS", "SUPPORTED_SGLANG", "config_from_env", "register",
           "sglang_spec_config", "supported"]

logger = logging.getLogger("specplug.sglang")

#: the ``--speculative-algorithm`` name
ALGORITHM = "SPECPLUG"
#: the environment variable holding specplug's options (JSON)
CONFIG_ENV = "SPECPLUG_SGLANG_CONFIG"
#: the options when ``SPECPLUG_SGLANG_CONFIG`` is unset: 11 drafts + the root = NGRAM's 12 slots
DEFAULT_OPTIONS = {"drafter": "ngram", "num_speculative_tokens": 11}
#: SGLang releases with the plugin registry this adapter uses: ``[low, high)``
SUPPORTED_SGLANG = ((0, 5, 12), (0, 6, 0))
#: what SGLang's registry must offer (``SpeculativeAlgorithm.register`` keywords)
REGISTER_KEYWORDS = ("supports_overlap", "validate_server_args", "spec_class")

_state: dict[str, Any] = {"registered": False}


def supported(version: str) -> bool:
    """True for the SGLang versions this adapter is built against."""
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit()) or "0"
        parts.append(int(digits))
    low, high = SUPPORTED_SGLANG
    return low <= tuple(parts + [0] * (3 - len(parts))) < high


def sglang_spec_config(options: Mapping[str, Any]) -> Any:
    """A ``SpecConfig`` from ``SPECPLUG_SGLANG_CONFIG``'s keys (``drafter`` names the drafter;
    every other key is a ``SpecConfig`` field or a drafter option).

    Raises:
        ValueError: naming the bad key or value and what is accepted.
    """
    from pydantic import ValidationError

    from specplug.config import SpecConfig, format_validation_error
    from specplug.serving import check_token_only

    if not isinstance(options, Mapping):
        raise ConfigError(f"{CONFIG_ENV} must be a JSON object such as {{\"drafter\": "
                         f"\"ngram\"}}, got {type(options).__name__}")
    opts = dict(options)
    drafter = opts.pop("drafter", None)
    if not drafter:
        raise ConfigError(f"{CONFIG_ENV}: 'drafter' is required, for example "
                         "{\"drafter\": \"ngram\"}")
    if opts.get("tree", "chain") == "chain":
        # SGLang's slots a row are fixed at start-up: a chain not sized here takes NGRAM's
        # width, not the drafter's own default (32 for ngram, 33 slots on every row's KV)
        opts.setdefault("num_speculative_tokens", DEFAULT_OPTIONS["num_speculative_tokens"])
    try:
        config = SpecConfig(method=drafter, **opts)
    except ValidationError as err:
        raise ConfigError(f"invalid {CONFIG_ENV}: {format_validation_error(err)}") from None
    except (ValueError, TypeError) as err:
        raise ConfigError(f"invalid {CONFIG_ENV}: {err}") from None
    try:
        check_token_only(drafter, "SGLang's SPECPLUG worker (docs/sglang.md)")
    except ValueError as err:
        raise ConfigError(f"invalid {CONFIG_ENV}: {err}") from None
    return config


def config_from_env(environ: Mapping[str, str] | None = None) -> Any:
    """The ``SpecConfig`` that ``SPECPLUG_SGLANG_CONFIG`` names (``DEFAULT_OPTIONS`` when
    unset).

    Raises:
        ValueError: not JSON, or an invalid config (see ``sglang_spec_config``).
    """
    raw = (os.environ if environ is None else environ).get(CONFIG_ENV, "").strip()
    if not raw:
        return sglang_spec_config(DEFAULT_OPTIONS)
    try:
        options = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{CONFIG_ENV} is not JSON ({err.msg} at character {err.pos}): "
                         "write it like '{\"drafter\": \"ngram\"}'") from None
    return sglang_spec_config(options)


def draft_slots(config: Any) -> int:
    """SGLang slots a row a ``config``'s tree needs: its most nodes plus the root."""
    from specplug.plugins import get_registry

    return get_registry().tree_builders[config.tree](config).max_nodes + 1


def validate_server_args(server_args: Any) -> None:
    """SGLang's start-up check (``validate_server_args`` of the registration): the options
    parse, and the tree fits the slots SGLang verifies."""
    config = config_from_env()
    slots = getattr(server_args, "speculative_num_draft_tokens", None)
    if slots is not None and draft_slots(config) > slots:
        raise ConfigError(
            f"{CONFIG_ENV}: the {config.tree!r} tree drafts up to {draft_slots(config) - 1} "
            f"nodes a row, but --speculative-num-draft-tokens {slots} leaves {slots - 1} (one "
            f"slot is the root): pass --speculative-num-draft-tokens "
            f"{draft_slots(config)} or leave it unset")


def handle_server_args(server_args: Any) -> None:
    """SGLang's per-algorithm defaults for ``SPECPLUG``: as many slots as the tree needs,
    synchronous scheduling (drafts read the committed tokens), no mixed chunks (as NGRAM)."""
    config = config_from_env()
    if getattr(server_args, "speculative_num_draft_tokens", None) is None:
        server_args.speculative_num_draft_tokens = draft_slots(config)
    if getattr(server_args, "speculative_num_steps", None) is None:
        server_args.speculative_num_steps = server_args.speculative_num_draft_tokens - 1
    if getattr(server_args, "speculative_eagle_topk", None) is None:
        server_args.speculative_eagle_topk = 1
    server_args.disable_overlap_schedule = True
    server_args.enable_mixed_chunk = False


def spec_class() -> type:
    """The ``CustomSpecAlgo`` subclass SGLang's scheduler asks about ``SPECPLUG``."""
    from sglang.srt.speculative.spec_registry import CustomSpecAlgo

    class SpecplugAlgorithm(CustomSpecAlgo):
        """``SPECPLUG``: NGRAM's verify shape (so SGLang's NGRAM branches apply), drafts by
        specplug; no draft model, no draft KV, no draft hidden states."""

        def is_ngram(self) -> bool:
            return True

        def has_draft_kv(self) -> bool:
            return False

        def need_topk(self) -> bool:
            return False

        def carries_draft_hidden_states(self) -> bool:
            return False

        def create_future_map(self, device: Any, req_to_token_pool: Any,
                              needs_cpu_seq_lens: bool = True,
                              needs_confidence_relay: bool = False) -> Any:
            from sglang.srt.managers.overlap_utils import FutureMap

            return FutureMap(device, self, req_to_token_pool, needs_cpu_seq_lens,
                             needs_confidence_relay)

        def handle_server_args(self, server_args: Any) -> None:
            handle_server_args(server_args)

    return SpecplugAlgorithm


def worker_factory(server_args: Any) -> type:
    """``SPECPLUG``'s worker class (built on first use: it needs SGLang's compiled kernels)."""
    from specplug.adapters.sglang_worker import worker_class

    return worker_class()


def _registry_problem() -> str | None:
    """What this SGLang lacks of what ``register`` uses, or None."""
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    register_fn = getattr(SpeculativeAlgorithm, "register", None)
    if register_fn is None:
        return "SpeculativeAlgorithm has no register()"
    params = inspect.signature(register_fn).parameters
    missing = [k for k in REGISTER_KEYWORDS if k not in params]
    if missing:
        return f"SpeculativeAlgorithm.register() takes no {', '.join(missing)}"
    try:
        from sglang.srt.speculative.spec_registry import CustomSpecAlgo, get_spec  # noqa: F401
    except ImportError as err:
        return f"no sglang.srt.speculative.spec_registry ({err})"
    return None


def register() -> None:
    """``sglang.srt.plugins`` entry point; runs in every SGLang process, idempotent.

    Registers ``SPECPLUG`` on a supported SGLang; on any other it logs one line saying why and
    changes nothing (SGLang's start-up never fails because of specplug)."""
    if _state["registered"]:
        return
    _state["registered"] = True
    try:
        import sglang

        version = getattr(sglang, "__version__", "unknown")
        if not supported(version):
            low, high = (".".join(map(str, v)) for v in SUPPORTED_SGLANG)
            logger.error("specplug: SGLang %s is outside the supported >=%s,<%s; %s is not "
                         "registered", version, low, high, ALGORITHM)
            return
        problem = _registry_problem()
        if problem:
            logger.error("specplug: SGLang %s: %s; %s is not registered", version, problem,
                         ALGORITHM)
            return
        from sglang.srt.speculative.spec_info import SpeculativeAlgorithm
        from sglang.srt.speculative.spec_registry import get_spec

        if get_spec(ALGORITHM) is None:
            SpeculativeAlgorithm.register(
                ALGORITHM, supports_overlap=False, validate_server_args=validate_server_args,
                spec_class=spec_class())(worker_factory)
    except Exception as err:  # never break SGLang's start-up
        logger.error("specplug: could not register %s with SGLang: %s: %s", ALGORITHM,
                     type(err).__name__, err)
