"""``benchmarks/serve_load.py``'s orchestration, with stand-in servers: which servers are up
when, in which order bursts run, and how each burst of one server is compared with the same
burst of the other. The real servers run in ``integration_tests/test_vllm_real.py``."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def load(monkeypatch):
    spec = importlib.util.spec_from_file_location("serve_load",
                                                  ROOT / "benchmarks" / "serve_load.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "serve_load", module)  # its dataclasses look it up
    spec.loader.exec_module(module)
    return module


def _fake(load, monkeypatch, answers: dict[str, list[str]]):
    """Stand-ins for ``Server``, ``send`` and ``run_burst``; ``events`` records what
    happened, in order; ``answers[name][burst - 1]`` is every greedy answer of that burst."""
    events: list[str] = []

    class FakeServer:
        def __init__(self, name, engine, python, model, spec, log, max_model_len=2048):
            self.name, self.engine, self.model, self.port = name, engine, model, 0
            self.proc = argparse.Namespace(pid=0)
            events.append(f"start {name}")

        def wait_healthy(self):
            pass

        def metric(self, name):
            return 5.0

        def stop(self):
            events.append(f"stop {self.name}")
            return 0

    def run_burst(server, burst, requests, disconnects, refuse, timeout):
        events.append(f"burst {burst} {server.name}")
        text = answers[server.name][burst - 1]
        results = [load.Result(r.index, True, 200, text, 4, 0.1) for r in requests]
        return load.BurstReport(server.name, burst, 1.0, results,
                                [400, 400] if refuse else [], disconnects, 100.0, True)

    monkeypatch.setattr(load, "Server", FakeServer)
    monkeypatch.setattr(load, "run_burst", run_burst)
    monkeypatch.setattr(load, "send", lambda *a, **k: None)
    monkeypatch.setattr(load, "build_requests", lambda n, m: [
        load.Request(i, "p", False, 0.0 if i % 2 == 0 else 0.8, m) for i in range(n)])
    monkeypatch.setattr("specplug.models.resolve_model_dir", lambda name: Path("/m"))
    monkeypatch.setenv("SPECPLUG_SGLANG_ENGINE_PYTHON", "python")
    return events


def _args(tmp_path, engine: str, servers: str | None) -> argparse.Namespace:
    return argparse.Namespace(engine=engine, model="m", requests=4, bursts=2, max_tokens=8,
                              disconnects=1, timeout=5.0, spec=None, servers=servers,
                              out=str(tmp_path))


def test_together_interleaves_bursts_with_both_servers_up(load, monkeypatch, tmp_path):
    events = _fake(load, monkeypatch, {"plain": ["a", "b"], "specplug": ["a", "b"]})
    doc = load.run(_args(tmp_path, "vllm", None))  # vLLM's default: together
    assert events == ["start plain", "start specplug", "burst 1 plain", "burst 1 specplug",
                      "burst 2 specplug", "burst 2 plain", "stop plain", "stop specplug"]
    assert doc["passed"], doc["checks"]


def test_one_at_a_time_runs_each_server_alone_and_compares_burst_with_burst(
        load, monkeypatch, tmp_path):
    events = _fake(load, monkeypatch, {"plain": ["a", "b"], "specplug": ["a", "x"]})
    doc = load.run(_args(tmp_path, "sglang", None))  # SGLang's default: one at a time
    assert events == ["start plain", "burst 1 plain", "burst 2 plain", "stop plain",
                      "start specplug", "burst 1 specplug", "burst 2 specplug",
                      "stop specplug"]
    # burst 2's greedy answers differ (requests 0 and 2), burst 1's do not
    assert [(m["burst"], m["index"]) for m in doc["mismatches"]] == [(2, 0), (2, 2)]
    assert not doc["checks"]["greedy_identical"] and not doc["passed"]
    assert [(b["server"], b["burst"]) for b in doc["bursts"]] == [
        ("plain", 1), ("specplug", 1), ("plain", 2), ("specplug", 2)]


def test_servers_option_overrides_the_engine_default(load, monkeypatch, tmp_path):
    events = _fake(load, monkeypatch, {"plain": ["a", "b"], "specplug": ["a", "b"]})
    load.run(_args(tmp_path, "vllm", "one-at-a-time"))
    assert events.index("stop plain") < events.index("start specplug")
