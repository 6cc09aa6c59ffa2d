"""The package as users get it: build the sdist and wheel, install the wheel without ``-e``.

Every other test runs against the editable install of this checkout, which resolves modules
from the source tree and so cannot see a module the wheel drops. This one builds the sdist,
builds the wheel from that sdist (as ``python -m build`` does), installs the wheel into a new
venv that borrows this environment's dependencies (``--system-site-packages``, ``--no-deps``),
and in that venv imports every module, runs the CLI, loads every declared entry point and runs
one short real speculative generation.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# source folder -> the package it becomes in the wheel
SOURCE_ROOTS = {"specplug": "specplug", "adapters": "specplug/adapters", "kernels": "specplug/kernels"}

pytestmark = pytest.mark.slow


def _source_modules() -> set[str]:
    """Every ``.py`` file of the three source roots, as its path inside the wheel."""
    found = set()
    for folder, prefix in SOURCE_ROOTS.items():
        root = REPO / folder
        for dirpath, dirnames, filenames in os.walk(root):  # does not follow the symlinks
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            rel = Path(dirpath).relative_to(root)
            found.update(str(Path(prefix) / rel / f) for f in filenames if f.endswith(".py"))
    return found


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    # A clean copy of the tree: a stale build/ in the checkout could put a dropped module back.
    # Both from the tree, as `pip install .` and `pip wheel .` build (a wheel built from the sdist
    # can pick up undeclared packages as package data, hiding the bug this test is for).
    src = tmp_path_factory.mktemp("src") / "specplug"
    shutil.copytree(REPO, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", ".venv*", "*.egg-info", "__pycache__", "bench-out", "heads-work",
        ".pytest_cache", ".ruff_cache"))
    out = tmp_path_factory.mktemp("dist")
    # --no-isolation: build with this environment's setuptools (no index needed)
    _run([sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel",
          "--outdir", str(out), str(src)])
    (wheel,) = out.glob("specplug-*.whl")
    (sdist,) = out.glob("specplug-*.tar.gz")
    return {"wheel": wheel, "sdist": sdist}


@pytest.fixture(scope="module")
def wheel_python(built, tmp_path_factory) -> Path:
    env_dir = tmp_path_factory.mktemp("wheel-venv")
    venv.create(env_dir, system_site_packages=True, with_pip=False)
    python = env_dir / "bin" / "python"
    # This environment has the checkout installed in editable mode, and its import hook would
    # resolve any module the wheel lacks from the source tree. sitecustomize runs after every
    # .pth file, so the venv drops that hook (and any path entry into the checkout) there.
    (site_packages,) = env_dir.glob("lib/python*/site-packages")
    (site_packages / "sitecustomize.py").write_text(
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path\n"
        "                    if not getattr(f, '__module__', '').startswith('__editable__')]\n"
        "sys.path_hooks[:] = [h for h in sys.path_hooks\n"
        "                     if not getattr(h, '__module__', '').startswith('__editable__')]\n"
        f"sys.path[:] = [p for p in sys.path if not p.startswith({str(REPO)!r})]\n"
    )
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
          "--no-index", str(built["wheel"])])
    return python


def _in_venv(python: Path, code: str, **kwargs) -> subprocess.CompletedProcess:
    # cwd outside the checkout, so nothing resolves from the source tree
    return _run([str(python), "-c", code], cwd=python.parents[1], **kwargs)


def test_wheel_holds_every_source_module(built):
    names = set(zipfile.ZipFile(built["wheel"]).namelist())
    missing = sorted(_source_modules() - names)
    assert not missing, f"the wheel lacks {missing}: a package without discovery or __init__.py"


def test_wheel_ships_data_and_nothing_a_user_does_not_need(built):
    names = zipfile.ZipFile(built["wheel"]).namelist()
    assert any(n.startswith("specplug/heads/weights/") and n.endswith(".safetensors") for n in names)
    assert any(n.startswith("specplug/train/seed_prompts/") and n.endswith(".jsonl") for n in names)
    unwanted = [n for n in names if n.split("/")[0] in {"tests", "integration_tests", "benchmarks",
                                                        "docs", "scripts", "bench-out"}
                or "__pycache__" in n]
    assert not unwanted, unwanted


def test_sdist_holds_the_sources(built):
    import tarfile

    with tarfile.open(built["sdist"]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    missing = sorted(_source_modules() - names)
    assert not missing, f"the sdist lacks {missing}"


def test_every_module_imports_from_the_installed_wheel(wheel_python):
    code = """
import importlib, json, pkgutil, specplug
names = [m.name for m in pkgutil.walk_packages(specplug.__path__, "specplug.")]
failed = {}
for name in names:
    try:
        importlib.import_module(name)
    except ImportError as exc:
        if exc.name in ("vllm", "sglang", "triton"):  # optional frameworks not in this env
            continue
        failed[name] = repr(exc)
import sys
files = [getattr(m, "__file__", None) or "" for n, m in sys.modules.items() if n.startswith("specplug")]
print(json.dumps({"files": files, "names": names, "failed": failed}))
"""
    report = json.loads(_in_venv(wheel_python, code).stdout.splitlines()[-1])
    outside = [f for f in report["files"] if not Path(f).is_relative_to(wheel_python.parents[1])]
    assert not outside, f"modules resolved from outside the wheel's venv: {outside}"
    assert "specplug.adapters.hf_generate" in report["names"] and "specplug.kernels.verify" in report["names"]
    assert not report["failed"], report["failed"]


def test_cli_and_entry_points_from_the_installed_wheel(wheel_python):
    assert "run" in _run([str(wheel_python.parent / "specplug"), "--help"],
                         cwd=wheel_python.parents[1]).stdout
    code = """
import json
from importlib.metadata import distribution
dist = distribution("specplug")
loaded = {}
for ep in dist.entry_points:
    if ep.group == "console_scripts":
        continue
    obj = ep.load()
    loaded[f"{ep.group}:{ep.name}"] = f"{obj.__module__}.{obj.__qualname__}"
print(json.dumps({"path": str(dist._path), "loaded": loaded}))
"""
    report = json.loads(_in_venv(wheel_python, code).stdout.splitlines()[-1])
    assert Path(report["path"]).is_relative_to(wheel_python.parents[1]), report["path"]
    assert report["loaded"].get("vllm.general_plugins:specplug") == "specplug.adapters.vllm.register"


def test_real_speculative_run_from_the_installed_wheel(wheel_python):
    proc = _run([str(wheel_python.parent / "specplug"), "run", "--model", "smollm2-135m",
                 "--method", "ngram", "--compare", "--max-new-tokens", "16", "--repeats", "1",
                 "--prompt", "Repeat: the cat sat on the mat, the cat sat on the mat"],
                cwd=wheel_python.parents[1])
    assert "identical: True" in proc.stdout, proc.stdout
