"""SGLang methods for ``specplug bench``: ``sglang:none``, ``sglang:ngram``,
``sglang:specplug:DRAFTER[:KEY=VALUE,...]``.

Each method is a real ``sglang.Engine`` in its own process for the whole run
(``specplug.bench.sglang_engine``, started under ``SPECPLUG_SGLANG_ENGINE_PYTHON``: SGLang's
engine needs its compiled kernels, which on a CPU come from SGLang's CPU build, see
docs/sglang.md). The bench process sends token-id prompts and times each call, so the
interleaved order and the timings are those of every other method. On a CPU, SGLang's kernels
are bf16, so SGLang methods are checked against ``sglang:none``, never against the float32
``hf:greedy``.

Acceptance comes from SGLang's own per-request counters: ``spec_verify_ct`` verification steps
and ``spec_num_correct_drafts`` accepted drafts in all. SGLang reports no per-step
distribution, so ``accepted_per_step`` holds ``spec_verify_ct`` entries with that total
(spread evenly, trimmed to what was emitted): its sum and length, which are all the bench's
aggregates read, are exact.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from typing import Any

import torch

from specplug.bench.methods import Method, MethodRun
from specplug.config import parse_key_values

__all__ = ["ENGINE_PYTHON_ENV", "SglangEngine", "sglang_engine_job", "sglang_method"]

REFERENCE = "sglang:none"
#: the Python that runs SGLang engines (a venv with SGLang's engine build and specplug)
ENGINE_PYTHON_ENV = "SPECPLUG_SGLANG_ENGINE_PYTHON"


def sglang_engine_job(rest: str, model_dir: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The engine job of ``sglang:REST`` and SPECPLUG's options (None for other methods).

    Raises:
        ValueError: an unknown SGLang method, naming the known ones, or an invalid SPECPLUG
            option (validated here, as SGLang's launcher would, not in the engine process).
    """
    kind, _, arg = rest.partition(":")
    job: dict[str, Any] = {"model": model_dir, "algorithm": None, "engine": {}}
    if kind == "none" and not arg:
        return job, None
    if kind == "ngram" and not arg:  # SGLang's own n-gram drafter, its defaults
        job["algorithm"] = "NGRAM"
        return job, None
    if kind == "specplug" and arg:
        from specplug.adapters.sglang import sglang_spec_config

        drafter, _, opts = arg.partition(":")
        options = {"drafter": drafter, **parse_key_values(opts)}
        sglang_spec_config(options)
        job["algorithm"] = "SPECPLUG"
        return job, options
    raise ValueError(f"unknown SGLang method 'sglang:{rest}'; known: sglang:none, sglang:ngram, "
                     "sglang:specplug:DRAFTER[:KEY=VALUE,...]")


class SglangEngine:
    """A ``sglang.Engine`` in a child process (see the module docstring)."""

    def __init__(self, job: dict[str, Any], options: dict[str, Any] | None = None,
                 python: str | None = None, timeout_s: float = 600.0):
        python = python or os.environ.get(ENGINE_PYTHON_ENV)
        if not python:
            raise ValueError(f"sglang: methods need an SGLang that can start an engine: set "
                             f"{ENGINE_PYTHON_ENV} to its Python (docs/sglang.md says how to "
                             "build SGLang's CPU engine)")
        env = dict(os.environ)
        env.pop("SPECPLUG_SGLANG_CONFIG", None)
        if options is not None:
            env["SPECPLUG_SGLANG_CONFIG"] = json.dumps(options)
        env.setdefault("SGLANG_USE_CPU_ENGINE", "1")
        self.timeout_s = timeout_s
        self.proc = subprocess.Popen(
            [python, "-m", "specplug.bench.sglang_engine"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, env=env)
        self._send(job)
        reply = self._recv()
        if "error" in reply:
            self.close()
            raise RuntimeError(f"SGLang engine failed to start: {reply['error']}")
        self.start_s = reply["ready"]
        self.version = reply.get("sglang")

    def _send(self, obj: Any) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(obj) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise RuntimeError(f"SGLang engine process exited (code {self.proc.wait()}): its "
                               "log above says why") from None

    def _recv(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("REPLY "):
                return json.loads(line[len("REPLY "):])
        raise RuntimeError(f"SGLang engine process exited (code {self.proc.wait()}): its log "
                           "above says why")

    def generate(self, prompts: list[list[int]], max_new: int, temperature: float = 0.0,
                 top_logprobs: int = 0, logprob_start: int | None = None
                 ) -> list[dict[str, Any]]:
        """One output dict per prompt, all submitted at once (see the engine module)."""
        self._send({"prompts": prompts, "max_new": max_new, "temperature": temperature,
                    "top_logprobs": top_logprobs, "logprob_start": logprob_start})
        reply = self._recv()
        if "error" in reply:
            raise RuntimeError(f"SGLang engine failed: {reply['error']}")
        return reply["outputs"]

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(BrokenPipeError, OSError):
                self._send(None)
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def accepted_per_step(out: dict[str, Any]) -> list[int]:
    """``spec_verify_ct`` steps holding ``spec_num_correct_drafts`` in all (see the module
    docstring); a generation without speculation: one step with none per token after the
    first. SGLang counts a last step's accepted drafts before it cuts the output at
    ``max_new_tokens``; the total is trimmed to the tokens actually emitted."""
    n = len(out["output_ids"])
    steps = int(out["spec_verify_ct"])
    if steps == 0:
        return [0] * max(n - 1, 0)
    accepted = max(0, min(int(out["spec_num_correct_drafts"]), n - 1 - steps))
    return [accepted // steps + (1 if i < accepted % steps else 0) for i in range(steps)]


def sglang_method(spec: str, model_dir: str, temperature: float = 0.0) -> Method:
    """A bench ``Method`` for ``sglang:...``; its outputs are checked against ``sglang:none``."""
    job, options = sglang_engine_job(spec.removeprefix("sglang:"), model_dir)
    engine = SglangEngine(job, options)

    def run(ids: torch.Tensor, max_new: int) -> MethodRun:
        (out,) = engine.generate([ids[0].tolist()], max_new, temperature)
        steps = accepted_per_step(out)
        return MethodRun(out["output_ids"], 1 + len(steps), steps)

    def batch(prompts: list[list[int]], max_new: int) -> list[list[int]]:
        return [o["output_ids"] for o in engine.generate(prompts, max_new, temperature)]

    return Method(spec, run, reference=REFERENCE, batch=batch, close=engine.close)
