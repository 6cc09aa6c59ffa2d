"""vLLM methods for ``specplug bench``: ``vllm:none``, ``vllm:ngram[:K]``,
``vllm:specplug:DRAFTER[:KEY=VALUE,...]``.

Each method is a real vLLM engine (``LLM``, float32, eager) living in its own process for the
whole run (started with ``SPECPLUG_VLLM_PYTHON`` when set, for a vLLM kept in its own venv as
``scripts/setup.sh dev`` does; else this Python), so vLLM's thread binding and global state never touch the transformers methods that
run beside it; the bench process sends token-id prompts over a pipe and times each call, so
the interleaved order and the timings are the same as for every other method.

Acceptance comes from vLLM's own spec-decode counters (the difference over each call):
``num_drafts`` and the per-position accepted counts give the distribution of accepted lengths
per drafted step, and steps vLLM ran without a draft count as 0 accepted. vLLM counts a step's
accepted drafts before it cuts the output at ``max_tokens`` or EOS, so the last step can count
more than was emitted; the lengths are trimmed to the tokens actually emitted.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from typing import Any

import torch

from specplug.bench.methods import Method, MethodRun
from specplug.config import parse_key_values

__all__ = ["VllmEngine", "vllm_method", "vllm_speculative_config"]

REFERENCE = "vllm:none"
#: vLLM's documented n-gram example: 5 draft tokens, n-grams of up to 4
VLLM_NGRAM = {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4}


def vllm_speculative_config(rest: str, model_dir: str | None = None) -> dict[str, Any] | None:
    """The ``speculative_config`` of ``vllm:REST`` (None for ``none``); ``model_dir`` is the
    target's folder (``vllm:specplug:eagle`` exports its head against it).

    Raises:
        ValueError: an unknown vLLM method, naming the known ones.
    """
    kind, _, arg = rest.partition(":")
    if kind == "none" and not arg:
        return None
    if kind == "ngram":
        cfg = dict(VLLM_NGRAM)
        if arg:
            cfg["num_speculative_tokens"] = int(arg)
        return cfg
    if kind == "specplug" and arg:
        drafter, _, opts = arg.partition(":")
        from specplug.adapters.vllm import translate_speculative_config

        spec = {"method": "specplug", "drafter": drafter, **parse_key_values(opts)}
        # validate now, not in the engine process
        translate_speculative_config(spec, None, target_model=model_dir)
        return spec
    raise ValueError(f"unknown vLLM method 'vllm:{rest}'; known: vllm:none, vllm:ngram[:K], "
                     "vllm:specplug:DRAFTER[:KEY=VALUE,...]")


def _serve(conn: Any, job: dict[str, Any]) -> None:
    """Engine process: build the engine, then answer ``(prompts, max_new)`` until ``None``."""
    import site
    import sys

    # spawn hands the child the parent's sys.path; under SPECPLUG_VLLM_PYTHON this interpreter's
    # own packages (vLLM and its pinned transformers) must come first, as they would in it
    sys.path[:0] = site.getsitepackages()
    # the engine runs inside this (daemonic) process, which may not start children
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    try:
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        llm = LLM(model=job["model"], enforce_eager=True, dtype="float32", seed=job["seed"],
                  max_model_len=job["max_model_len"],
                  speculative_config=job["speculative_config"], disable_log_stats=False)
    except Exception as err:  # noqa: BLE001 - reported to the bench process, which raises
        conn.send(("error", f"{type(err).__name__}: {err}"))
        return
    conn.send(("ready", None))
    while (msg := conn.recv()) is not None:
        prompts, max_new = msg
        before = _counters(llm)
        params = SamplingParams(temperature=job["temperature"], max_tokens=max_new,
                                seed=job["seed"] if job["temperature"] > 0 else None)
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                            use_tqdm=False)
        after = _counters(llm)
        delta = {k: _sub(after.get(k, 0), before.get(k, 0)) for k in after}
        conn.send(("ok", [list(o.outputs[0].token_ids) for o in outs], delta))


def _counters(llm: Any) -> dict[str, Any]:
    out = {}
    for m in llm.get_metrics():
        if m.name.startswith("vllm:spec_decode"):
            values = getattr(m, "values", None)
            out[m.name.removeprefix("vllm:spec_decode_")] = list(values) if values is not None \
                else getattr(m, "value", 0)
    return out


def _sub(a: Any, b: Any) -> Any:
    if isinstance(a, list):
        b = b if isinstance(b, list) else [0] * len(a)
        return [x - y for x, y in zip(a, b)]
    return a - b


def accepted_lengths(new_tokens: int, counters: dict[str, Any]) -> list[int]:
    """Accepted draft tokens of every decode step of one single-request generation, from
    vLLM's counter deltas (order is lost). The first token comes from the prefill; every later
    step emits its accepted drafts plus one token; counts past the emitted tokens (a last
    step cut at max_tokens or EOS) are trimmed from the longest steps."""
    drafts = int(counters.get("num_drafts", 0))
    per_pos = [int(x) for x in counters.get("num_accepted_tokens_per_pos", [])]
    out: list[int] = []
    for j in range(len(per_pos)):  # drafts with exactly j + 1 tokens accepted
        more = per_pos[j + 1] if j + 1 < len(per_pos) else 0
        out += [j + 1] * (per_pos[j] - more)
    out += [0] * (drafts - len(out))
    out.sort(reverse=True)
    emitted = max(new_tokens - 1, 0)  # after the prefill's token
    excess = sum(out) + len(out) - emitted  # > 0 only if the last step was cut
    i = 0
    while excess > 0 and i < len(out):
        cut = min(out[i], excess)
        out[i] -= cut
        excess -= cut
        i += 1
    out = out[:emitted]
    out += [0] * (emitted - sum(out) - len(out))  # steps vLLM ran without any draft
    return out


class VllmEngine:
    """A vLLM ``LLM`` in a child process (see the module docstring)."""

    def __init__(self, model_dir: str, speculative_config: dict[str, Any] | None,
                 temperature: float = 0.0, max_model_len: int = 4096, seed: int = 0):
        ctx = multiprocessing.get_context("spawn")
        python = os.environ.get("SPECPLUG_VLLM_PYTHON")
        if python:
            ctx.set_executable(python)
        self.conn, child = ctx.Pipe()
        job = {"model": model_dir, "speculative_config": speculative_config,
               "temperature": temperature, "max_model_len": max_model_len, "seed": seed}
        self.proc = ctx.Process(target=_serve, args=(child, job), daemon=True)
        self.proc.start()
        child.close()
        status, detail = self._recv()
        if status != "ready":
            self.close()
            raise RuntimeError(f"vLLM engine failed to start: {detail}")

    def _recv(self) -> Any:
        try:
            return self.conn.recv()
        except EOFError:
            raise RuntimeError(f"vLLM engine process exited (code {self.proc.exitcode})") \
                from None

    def generate(self, prompts: list[list[int]], max_new: int
                 ) -> tuple[list[list[int]], dict[str, Any]]:
        """Token ids per prompt (all submitted at once), and the spec-decode counter deltas."""
        self.conn.send((prompts, max_new))
        reply = self._recv()
        if reply[0] != "ok":
            raise RuntimeError(f"vLLM engine failed: {reply[1:]}")
        _, tokens, counters = reply
        return tokens, counters

    def close(self) -> None:
        if self.proc.is_alive():
            with contextlib.suppress(BrokenPipeError, OSError):
                self.conn.send(None)
            self.proc.join(30)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(10)
        self.conn.close()


def vllm_method(spec: str, model_dir: str, temperature: float = 0.0,
                max_model_len: int = 4096) -> Method:
    """A bench ``Method`` for ``vllm:...``; its outputs are checked against ``vllm:none``."""
    config = vllm_speculative_config(spec.removeprefix("vllm:"), model_dir)
    engine = VllmEngine(model_dir, config, temperature, max_model_len)

    def run(ids: torch.Tensor, max_new: int) -> MethodRun:
        (tokens,), counters = engine.generate([ids[0].tolist()], max_new)
        lengths = accepted_lengths(len(tokens), counters)
        return MethodRun(tokens, 1 + len(lengths), lengths)

    def batch(prompts: list[list[int]], max_new: int) -> list[list[int]]:
        return engine.generate(prompts, max_new)[0]

    return Method(spec, run, reference=REFERENCE, batch=batch, close=engine.close)
