"""The process behind a ``sglang:`` bench method: one ``sglang.Engine``, answering requests.

Started by ``specplug.bench.sglang_methods.SglangEngine`` as ``python -m
specplug.bench.sglang_engine`` under ``SPECPLUG_SGLANG_ENGINE_PYTHON`` (a Python whose SGLang can
start an engine: SGLang's CPU build, or the PyPI wheels on a GPU), with specplug installed there
too (``SPECPLUG`` is found through its entry point, as in any SGLang process). It reads JSON
lines on stdin and answers each with one line on stdout that starts with ``REPLY ``; anything
else SGLang prints is left for the reader to skip.

- first line, the job: ``{"model": DIR, "algorithm": null | "NGRAM" | "SPECPLUG",
  "engine": {extra sglang.Engine keywords}}``; answered ``{"ready": start seconds}`` or
  ``{"error": "..."}``;
- then ``{"prompts": [[ids]], "max_new": N, "temperature": T, "top_logprobs": K,
  "logprob_start": S}``; answered ``{"outputs": [{"output_ids": [...], "completion_tokens": n,
  "spec_verify_ct": v, "spec_num_correct_drafts": a}]}``, and with ``K > 0`` the ``K`` most
  likely tokens ``[[logprob, id], ...]`` at every output position (``output_top``) and at every
  prompt position from ``S`` on (``input_top``; SGLang's own indexing);
- ``null`` shuts the engine down.

SPECPLUG's options travel in ``SPECPLUG_SGLANG_CONFIG``, set by the parent in this process's
environment, which SGLang's own processes inherit.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

#: what every CPU engine here is started with (SGLang's CPU kernels are bf16/fp16 only)
#: and, because a bench keeps one engine per method alive at once, a KV pool of 32k tokens
#: (not SGLang's share of the machine's memory) and schedulers that sleep while idle (SGLang's
#: default polls, and idle engines would take the cores from the one being timed)
CPU_ENGINE = {"device": "cpu", "dtype": "bfloat16", "attention_backend": "intel_amx",
              "disable_overlap_schedule": True, "max_total_tokens": 32768,
              "sleep_on_idle": True}


def _reply(obj: Any) -> None:
    sys.stdout.write("REPLY " + json.dumps(obj) + "\n")
    sys.stdout.flush()


def _output(res: dict[str, Any], top: int) -> dict[str, Any]:
    meta = res.get("meta_info", {})
    out = {"output_ids": list(res["output_ids"]),
           "completion_tokens": meta.get("completion_tokens"),
           "spec_verify_ct": meta.get("spec_verify_ct") or 0,
           "spec_num_correct_drafts": meta.get("spec_num_correct_drafts") or 0}
    if top:
        for key in ("output_top_logprobs", "input_top_logprobs"):
            out[key.removesuffix("_top_logprobs") + "_top"] = [
                [[lp, tok] for lp, tok, *_ in step] if step else []
                for step in meta.get(key) or []]
    return out


def main() -> None:
    job = json.loads(sys.stdin.readline())
    try:
        import sglang

        kwargs = dict(CPU_ENGINE, model_path=job["model"], log_level="error", random_seed=0)
        kwargs.update(job.get("engine") or {})
        if job.get("algorithm"):
            kwargs["speculative_algorithm"] = job["algorithm"]
        t0 = time.perf_counter()
        engine = sglang.Engine(**kwargs)
    except Exception as err:  # noqa: BLE001 - reported to the bench process, which raises
        _reply({"error": f"{type(err).__name__}: {err}"})
        return
    _reply({"ready": round(time.perf_counter() - t0, 1), "sglang": sglang.__version__})
    try:
        for line in sys.stdin:
            req = json.loads(line)
            if req is None:
                break
            top = int(req.get("top_logprobs", 0))
            params = {"temperature": float(req.get("temperature", 0.0)),
                      "max_new_tokens": int(req["max_new"])}
            extra = {"return_logprob": True, "top_logprobs_num": top} if top else {}
            if top and req.get("logprob_start") is not None:
                extra["logprob_start_len"] = int(req["logprob_start"])
            try:
                res = engine.generate(input_ids=req["prompts"], sampling_params=params, **extra)
            except Exception as err:  # noqa: BLE001 - reported, the engine stays up
                _reply({"error": f"{type(err).__name__}: {err}"})
                continue
            _reply({"outputs": [_output(r, top) for r in res]})
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()
