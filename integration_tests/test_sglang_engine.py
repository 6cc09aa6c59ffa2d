"""``SPECPLUG`` in a real SGLang engine: greedy output against the same engine without
speculation and against SGLang's own ``NGRAM``, SGLang's acceptance counters, a batch of 8
requests at once, and the README's server command.

These need an SGLang that can start an engine: SGLang's CPU build (made by hand from SGLang's
sources, docs/sglang.md, since no registry serves it) or the PyPI wheels on a GPU, with specplug
installed beside it. Point ``SPECPLUG_SGLANG_ENGINE_PYTHON`` at that Python; without it every
test here skips and says so.

On a CPU, SGLang's kernels are bf16, and SGLang's decode and verify (extend) kernels round
differently. Greedy output may then differ where two tokens tie in bf16: every difference is
checked to be such a tie (both tokens within ``TIE_NATS`` of the engine's most likely one, when
the same engine scores the prefix), and every token SPECPLUG emits is checked to be the engine's own
argmax, up to such a tie, when the engine rescores the whole output without speculation.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from specplug.bench.sglang_methods import (
    ENGINE_PYTHON_ENV,
    SglangEngine,
    accepted_per_step,
    sglang_engine_job,
)

pytestmark = pytest.mark.slow

ENGINE_PY = os.environ.get(ENGINE_PYTHON_ENV)
if not ENGINE_PY:
    pytest.skip(f"no SGLang engine here: set {ENGINE_PYTHON_ENV} to a Python whose SGLang can "
                "start one (SGLang's CPU build, docs/sglang.md, or the GPU wheels)",
                allow_module_level=True)

#: bf16 has 8 significant bits: at SmolLM2's logit magnitudes (10-25) one step is 0.06-0.125,
#: and two kernels may round apart by two steps
TIE_NATS = 0.25
MAX_NEW = 64
PROMPTS = Path(__file__).parent.parent / "benchmarks" / "prompts.jsonl"


def _prompts(tokenizer: Any) -> list[list[int]]:
    """The first turn of the first question of each category (8 prompts, copying and not)."""
    seen: dict[str, str] = {}
    for line in PROMPTS.read_text().splitlines():
        q = json.loads(line)
        seen.setdefault(q["category"], q["turns"][0])
    out = []
    for text in list(seen.values())[:8]:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                            add_generation_prompt=True)
        out.append(list(ids if isinstance(ids, list) else ids["input_ids"]))
    return out


@pytest.fixture(scope="module")
def setup() -> Any:
    from transformers import AutoTokenizer

    from specplug.models import resolve_model_dir

    model = str(resolve_model_dir("smollm2-135m"))
    prompts = _prompts(AutoTokenizer.from_pretrained(model))
    engines = {}
    try:
        for spec in ("none", "ngram", "specplug:ngram", "specplug:ngram:tree=dynamic",
                     "specplug:draft_model"):
            # the only draft model with SmolLM2's vocabulary here is SmolLM2 itself (in fp32,
            # in the scheduler process): a check of the route, not of a speedup
            full = f"{spec}:model={model}" if spec.endswith("draft_model") else spec
            job, options = sglang_engine_job(full, model)
            engines[spec] = SglangEngine(job, options, python=ENGINE_PY)
        outs = {name: [e.generate([p], MAX_NEW)[0] for p in prompts]
                for name, e in engines.items()}
        yield model, prompts, engines, outs
    finally:
        for e in engines.values():
            e.close()


def _gap(top: list[list[float]], token: int) -> float:
    """How far ``token``'s log-probability is below the most likely one, in a
    ``[[logprob, id], ...]`` list (infinite if it is not in the list)."""
    return next((top[0][0] - lp for lp, tok in top if tok == token), float("inf"))


def _is_tie(top: list[list[float]], *tokens: int) -> bool:
    """Every token within ``TIE_NATS`` of the engine's most likely one (ties among equals may
    come in any order: SGLang's bf16 scores tie three ways at times)."""
    return all(_gap(top, t) <= TIE_NATS for t in tokens)


def _first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


@pytest.mark.parametrize("method", ["specplug:ngram", "specplug:ngram:tree=dynamic",
                                    "specplug:draft_model", "ngram"])
def test_greedy_output_is_the_engines_own_up_to_bf16_ties(setup: Any, method: str) -> None:
    _, prompts, engines, outs = setup
    base = engines["none"]
    identical = 0
    for p, (ref, got) in enumerate(zip(outs["none"], outs[method])):
        a, b = ref["output_ids"], got["output_ids"]
        k = _first_difference(a, b)
        if k is None:
            assert len(a) == len(b) or min(len(a), len(b)) == MAX_NEW
            identical += 1
            continue
        (score,) = base.generate([prompts[p] + a[:k]], 1, top_logprobs=5)
        top = score["output_top"][0]
        assert _is_tie(top, a[k], b[k]), (method, p, k, a[k], b[k], top)
    print(f"{method}: {identical} of {len(prompts)} outputs identical to sglang:none")


@pytest.mark.parametrize("method", ["specplug:ngram", "specplug:ngram:tree=dynamic",
                                    "specplug:draft_model", "ngram"])
def test_every_token_emitted_is_the_targets_argmax(setup: Any, method: str) -> None:
    """The whole output rescored by the engine without speculation (one prefill)."""
    _, prompts, engines, outs = setup
    for p, got in enumerate(outs[method]):
        out = got["output_ids"]
        (score,) = engines["none"].generate([prompts[p] + out], 1, top_logprobs=5,
                                            logprob_start=len(prompts[p]) - 1)
        tops = score["input_top"][1:]  # SGLang's first entry is the start position's own
        assert len(tops) == len(out)
        for j, (tok, top) in enumerate(zip(out, tops)):
            assert _is_tie(top, tok), (p, j, tok, top)


def test_sglangs_counters_add_up_and_specplug_accepts_drafts(setup: Any) -> None:
    _, _, _, outs = setup
    accepted = 0
    for got in outs["specplug:ngram"]:
        n, steps = len(got["output_ids"]), got["spec_verify_ct"]
        # the prefill emits one token; every verify step its accepted drafts plus one, but
        # SGLang counts a last step's drafts before it cuts the output at max_new_tokens
        assert got["completion_tokens"] == n
        excess = 1 + steps + got["spec_num_correct_drafts"] - n
        assert excess == 0 or (n == MAX_NEW and 0 < excess < 12), (n, steps, excess)
        assert 1 + steps + sum(accepted_per_step(got)) == n
        accepted += got["spec_num_correct_drafts"]
    assert accepted > 0


def test_a_batch_of_8_at_once(setup: Any) -> None:
    _, prompts, engines, _ = setup
    batch = [prompts[i % len(prompts)] for i in range(8)]
    ref = engines["none"].generate(batch, MAX_NEW)
    got = engines["specplug:ngram"].generate(batch, MAX_NEW)
    assert len(got) == 8
    for p, (r, g) in enumerate(zip(ref, got)):
        k = _first_difference(r["output_ids"], g["output_ids"])
        if k is not None:
            (score,) = engines["none"].generate([batch[p] + r["output_ids"][:k]], 1,
                                                top_logprobs=5)
            assert _is_tie(score["output_top"][0], r["output_ids"][k], g["output_ids"][k])
    assert sum(g["spec_num_correct_drafts"] for g in got) > 0


@pytest.mark.parametrize("spec", ["specplug:ngram", "specplug:ngram:tree=dynamic"])
def test_log_probabilities_come_back_for_every_token(setup: Any, spec: str) -> None:
    """A request that asks for log-probabilities takes the verify path on every step, narrowed
    to the step's drafts (steps without drafts otherwise run as plain decode steps): each
    emitted token has its top-5, and is its position's most likely token up to a tie."""
    _, prompts, engines, _ = setup
    for prompt in (prompts[0], prompts[6]):  # multi_turn and code_editing: drafts accepted
        (got,) = engines[spec].generate([prompt], MAX_NEW, top_logprobs=5)
        out, top = got["output_ids"], got["output_top"]
        assert len(top) == len(out) > 0
        for k, (tok, at) in enumerate(zip(out, top)):
            assert _is_tie(at, tok), (k, tok, at[:2])
        assert got["spec_num_correct_drafts"] > 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_readme_server_command(setup: Any) -> None:
    """``python -m sglang.launch_server --model-path MODEL --speculative-algorithm SPECPLUG``,
    with the flags a CPU build needs (docs/sglang.md), answers over HTTP like the engine: the
    same tokens up to a bf16 tie. Which steps verify and which run as plain decode steps follows
    each process's own step timings, and SGLang's decode and verify kernels round apart, so two
    processes may part at a tie."""
    model, prompts, engines, outs = setup
    port = _free_port()
    cmd = [ENGINE_PY, "-m", "sglang.launch_server", "--model-path", model,
           "--speculative-algorithm", "SPECPLUG", "--device", "cpu", "--dtype", "bfloat16",
           "--max-total-tokens", "32768", "--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, "SGLANG_USE_CPU_ENGINE": "1"}
    env.pop("SPECPLUG_SGLANG_CONFIG", None)
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while True:
            assert server.poll() is None, "the server exited"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                assert time.time() < deadline, "the server did not come up in 300 s"
                time.sleep(2)
        body = json.dumps({"input_ids": prompts[0], "sampling_params": {
            "temperature": 0, "max_new_tokens": MAX_NEW}}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/generate", data=body,
                                     headers={"content-type": "application/json"})
        reply = json.loads(urllib.request.urlopen(req, timeout=120).read())
        got, want = reply["output_ids"], outs["specplug:ngram"][0]["output_ids"]
        k = _first_difference(want, got)
        if k is None:
            assert len(got) == len(want)
        else:
            (score,) = engines["none"].generate([prompts[0] + want[:k]], 1, top_logprobs=5)
            assert _is_tie(score["output_top"][0], want[k], got[k]), (k, want[k], got[k])
        assert reply["meta_info"]["spec_verify_ct"] > 0
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
