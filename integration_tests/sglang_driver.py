"""Run by ``test_sglang_package.py`` under the SGLang venv's Python, as a process SGLang starts
would run: SGLang's own plugin loading, registry, server-args hooks and worker creation, with
specplug found only through its ``sglang.srt.plugins`` entry point. Prints one JSON object."""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    out: dict = {}
    import sglang
    from sglang.srt.plugins import load_plugins

    out["sglang"] = sglang.__version__
    load_plugins()
    load_plugins()  # idempotent, as SGLang calls it in every process
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm
    from sglang.srt.speculative.spec_registry import (
        CustomSpecAlgo,
        _assert_custom_spec_algo_conforms,
    )

    algo = SpeculativeAlgorithm.from_string("specplug")
    out["algo"] = type(algo).__module__ + "." + type(algo).__qualname__
    out["custom"] = isinstance(algo, CustomSpecAlgo)
    _assert_custom_spec_algo_conforms(type(algo))  # SGLang's own conformance check
    # every predicate the scheduler and runners call on an algorithm, as the enum has them
    names = sorted(n for n in vars(SpeculativeAlgorithm)
                   if not n.startswith("_") and callable(getattr(SpeculativeAlgorithm, n, None))
                   and n not in ("from_string", "register", "create_worker",
                                 "get_platform_worker_cls", "handle_server_args",
                                 "resolve_max_speculative_num_draft_tokens",
                                 "get_num_tokens_per_req_for_target_verify",
                                 "build_disagg_draft_input", "create_future_map"))
    out["predicates"] = {n: getattr(algo, n)() for n in names}
    out["missing"] = [n for n in names if not hasattr(algo, n)]

    from sglang.srt.arg_groups.overrides import resolving_view
    from sglang.srt.arg_groups.speculative_hook import handle_speculative_decoding
    from sglang.srt.server_args import prepare_server_args

    args = prepare_server_args(["--model-path", sys.argv[1], "--device", "cpu",
                                "--speculative-algorithm", "SPECPLUG"])
    try:
        handle_speculative_decoding(args)  # SGLang's per-algorithm hook, on its record
        view = resolving_view(args)
        out["resolved"] = {k: getattr(view, k) for k in (
            "speculative_algorithm", "speculative_num_draft_tokens", "speculative_num_steps",
            "speculative_eagle_topk", "disable_overlap_schedule", "enable_mixed_chunk")}
        try:
            out["worker"] = algo.create_worker(args).__qualname__
        except Exception as err:  # noqa: BLE001 - reported to the test
            out["worker_error"] = f"{type(err).__name__}: {err}"
    except Exception as err:  # noqa: BLE001 - a bad SPECPLUG_SGLANG_CONFIG
        out["error"] = f"{type(err).__name__}: {err}"
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    os.environ.setdefault("SGLANG_LOGGING_LEVEL", "warning")
    main()
