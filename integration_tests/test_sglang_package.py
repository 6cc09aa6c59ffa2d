"""specplug against the real SGLang package from PyPI (0.5.23), in a fresh process as SGLang
spawns them: the ``sglang.srt.plugins`` entry point, ``load_plugins()``, the registry,
SGLang's conformance check of the spec class, the server-args hooks and worker creation.

No engine runs here: SGLang's PyPI wheels carry CUDA kernels. SGLang runs under
``SPECPLUG_SGLANG_PYTHON`` (default: the ``.venv-sglang`` that ``scripts/setup.sh dev`` builds
on top of this environment, SGLang installed without its CUDA torch).
"""

from __future__ import annotations

import json
import os
import subprocess
from functools import cache
from pathlib import Path

import pytest

HERE = Path(__file__).parent
SGLANG_PY = os.environ.get("SPECPLUG_SGLANG_PYTHON") or str(
    HERE.parent / ".venv-sglang" / "bin" / "python")


@cache
def _sglang_import_error() -> str | None:
    try:
        proc = subprocess.run([SGLANG_PY, "-c", "import sglang.srt.plugins"],
                              capture_output=True, text=True, timeout=300)
    except OSError as err:
        return str(err)
    return None if proc.returncode == 0 else proc.stderr[-2000:]


def run_driver(env: dict[str, str] | None = None) -> dict:
    err = _sglang_import_error()
    if err is not None:
        msg = f"SGLang is not importable with {SGLANG_PY} ({err}); install: scripts/setup.sh dev"
        if os.environ.get("SPECPLUG_CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    from specplug.models import resolve_model_dir

    model = str(resolve_model_dir("smollm2-135m"))
    proc = subprocess.run([SGLANG_PY, str(HERE / "sglang_driver.py"), model],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


@pytest.fixture(scope="module")
def default_run() -> dict:
    return run_driver({"SPECPLUG_SGLANG_CONFIG": ""})


def test_sglang_finds_specplug_through_its_entry_point(default_run):
    assert default_run["sglang"] == "0.5.23"
    assert default_run["custom"]
    assert default_run["algo"] == "specplug.adapters.sglang.spec_class.<locals>.SpecplugAlgorithm"


def test_every_predicate_sglang_calls_is_answered(default_run):
    assert default_run["missing"] == []
    predicates = default_run["predicates"]
    assert predicates["is_ngram"] and predicates["is_speculative"] and predicates["is_some"]
    assert not predicates["is_eagle"] and not predicates["is_none"]
    assert not predicates["need_topk"] and not predicates["carries_draft_hidden_states"]
    assert not predicates["has_draft_kv"]


def test_sglangs_hook_resolves_the_server_args(default_run):
    assert default_run["resolved"] == {
        "speculative_algorithm": "SPECPLUG", "speculative_num_draft_tokens": 12,
        "speculative_num_steps": 11, "speculative_eagle_topk": 1,
        "disable_overlap_schedule": True, "enable_mixed_chunk": False}


def test_create_worker_names_what_a_cpu_wheel_lacks(default_run):
    """The PyPI wheel's NGRAM verify path imports SGLang's compiled kernels (``sgl_kernel``),
    which no CPU install from a registry has: the worker is specplug's where they import, and
    the error names them where they do not."""
    if "worker" in default_run:
        assert default_run["worker"] == "worker_class.<locals>.SpecplugWorker"
    else:
        assert "RuntimeError" in default_run["worker_error"]
        assert "sgl_kernel" in default_run["worker_error"]
        assert "docs/sglang.md" in default_run["worker_error"]


def test_a_bad_option_is_refused_at_startup_by_name():
    run = run_driver({"SPECPLUG_SGLANG_CONFIG": '{"drafter": "ngram", "tree_bugdet": 8}'})
    assert "tree_bugdet" in run["error"] and "SPECPLUG_SGLANG_CONFIG" in run["error"]


def test_a_tree_sglang_cannot_hold_is_refused_at_startup():
    run = run_driver({"SPECPLUG_SGLANG_CONFIG":
                      '{"drafter": "ngram", "tree": "dynamic", "tree_budget": 8}'})
    assert run["resolved"]["speculative_num_draft_tokens"] == 9
