"""Caches and files survive crashes and concurrency (issue 25, item 3).

Real processes, not threads: several start at the same moment on an empty cache and must all
succeed with one build between them; a process killed (SIGINT, then SIGKILL) in the middle of
a model conversion or a cost-curve calibration must leave nothing that the next run reads as
finished, and the next run must work. The slow parts (the GGUF conversion, the timing of the
target) are replaced inside the child by stand-ins that write real files slowly, so the kill
lands mid-write; everything else (locks, temporary folders, markers, records) is the library's.
The helpers in ``specplug.files`` are tested directly at the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import specplug
from specplug import files

CHILD = textwrap.dedent('''
    import os, signal, sys, time
    from pathlib import Path

    # SIGINT as at a terminal: a shell that starts a job in the background (``cmd &``, as CI
    # runners and nohup do) hands it SIGINT ignored, and Python then never raises it
    signal.signal(signal.SIGINT, signal.default_int_handler)

    what, cache, log = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    slow = float(sys.argv[4])
    os.environ["SPECPLUG_CACHE_DIR"] = str(cache)
    import specplug.calibration, specplug.models  # the slow imports, before the barrier
    if len(sys.argv) > 5:  # a start barrier: every process is past its imports, then all go
        print("READY", flush=True)
        while not Path(sys.argv[5]).exists():
            time.sleep(0.005)

    def note(event):
        with open(log, "a") as f:  # O_APPEND: one line per event, from any process
            f.write(f"{event} {os.getpid()}\\n")

    if what == "convert":
        from specplug import models

        gguf = cache.parent / "fake.gguf"
        models._source_fingerprint = lambda spec: {"model": spec.name, "size": 1}
        models._locate_gguf = lambda spec: gguf

        def convert(gguf_path, out_dir):
            note("build")
            print("BUILDING", flush=True)
            (out_dir / "config.json").write_text("{}")
            with open(out_dir / "model.safetensors", "wb") as f:
                for _ in range(int(slow * 20)):  # a big file written slowly
                    f.write(b"w" * 65536)
                    f.flush()
                    time.sleep(0.05)

        models._convert_gguf = convert
        folder = models.resolve_model_dir("smollm2-135m")
        print("DONE", folder, (folder / "model.safetensors").stat().st_size, flush=True)
    else:
        from specplug.calibration import cached_calibration
        from specplug.cost import CostModel

        def measure():
            note("build")
            print("BUILDING", flush=True)
            time.sleep(slow)
            model = CostModel(calibrated=True)
            for n, t in ((1, 0.010), (4, 0.014), (16, 0.030)):
                model.target.seed(n, t, 3)
            return model

        model = cached_calibration({"model": "fake", "threads": 1}, measure)
        print("DONE", model.target.at(4), flush=True)
''')


@pytest.fixture
def child(tmp_path: Path) -> Path:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    (tmp_path / "fake.gguf").write_bytes(b"GGUF fake")
    return script


def _start(child: Path, what: str, cache: Path, slow: float, barrier: Path | None = None
           ) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPECPLUG_")}
    # the child imports the specplug this test process imported (a checkout or a wheel)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(specplug.__file__).parents[1]),
                                         env.get("PYTHONPATH", "")])
    return subprocess.Popen(
        [sys.executable, str(child), what, str(cache), str(cache.parent / "events.log"),
         str(slow), *([str(barrier)] if barrier else [])],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _builds(cache: Path) -> int:
    log = cache.parent / "events.log"
    return sum(1 for line in log.read_text().splitlines() if line.startswith("build")) \
        if log.is_file() else 0


def _leftovers(folder: Path) -> list[str]:
    """Hidden names in ``folder`` other than lock files: what an unfinished writer left."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir()
                  if p.name.startswith(".") and not p.name.endswith(".lock"))


def _cache_folder(cache: Path, what: str) -> Path:
    return cache / ("models" if what == "convert" else "cost")


@pytest.mark.parametrize("what", ["convert", "calibrate"])
def test_processes_started_together_build_once(child: Path, tmp_path: Path, what: str) -> None:
    cache = tmp_path / "cache"
    go = tmp_path / "go"
    procs = [_start(child, what, cache, slow=1.0, barrier=go) for _ in range(4)]
    for p in procs:  # all imported: released together, they contend for the lock
        assert p.stdout is not None and p.stdout.readline().strip() == "READY"
    go.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    for proc, (out, err) in zip(procs, outs):
        assert proc.returncode == 0, err
        assert out.strip().splitlines()[-1].startswith("DONE")
    finals = {out.strip().splitlines()[-1] for out, _ in outs}
    assert len(finals) == 1, finals  # every process got the same cache
    assert _builds(cache) == 1
    assert _leftovers(_cache_folder(cache, what)) == []


@pytest.mark.parametrize("what", ["convert", "calibrate"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_a_process_killed_mid_build_leaves_nothing_read_as_finished(
        child: Path, tmp_path: Path, what: str, sig: signal.Signals) -> None:
    cache = tmp_path / "cache"
    proc = _start(child, what, cache, slow=30.0)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "BUILDING"  # it is mid-build now
    time.sleep(0.5)
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    folder = _cache_folder(cache, what)
    finished = [p for p in folder.iterdir() if not p.name.startswith(".")] if folder.is_dir() \
        else []
    assert finished == []  # no converted folder, no cost curve
    if sig == signal.SIGINT:  # Python unwinds: the temporary build is removed at once
        assert _leftovers(folder) == []

    after = _start(child, what, cache, slow=0.2)
    out, err = after.communicate(timeout=120)
    assert after.returncode == 0, err
    assert out.strip().splitlines()[-1].startswith("DONE")
    assert _builds(cache) == 2
    assert _leftovers(folder) == []  # the SIGKILLed build's temporary folder is cleared too


def test_a_truncated_converted_model_is_rebuilt(child: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = _start(child, "convert", cache, slow=0.2)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    weights = cache / "models" / "smollm2-135m" / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)  # a disk-full or a hand-copied cache
    again = _start(child, "convert", cache, slow=0.2)
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0, err
    assert _builds(cache) == 2
    assert weights.stat().st_size == size


def test_a_damaged_cost_curve_is_measured_again(child: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    proc = _start(child, "calibrate", cache, slow=0.1)
    assert proc.communicate(timeout=120)[0].startswith("BUILDING")
    (record,) = (cache / "cost").glob("*.json")
    doc = json.loads(record.read_text())
    doc["payload"]["measured"] = "edited by hand"  # edited: the checksum no longer matches
    record.write_text(json.dumps(doc))
    proc = _start(child, "calibrate", cache, slow=0.1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert _builds(cache) == 2


# --------------------------------------------------------------------------- specplug.files


def test_atomic_write_replaces_whole_files(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    files.atomic_write_text(path, "first")
    files.atomic_write_text(path, "second")
    assert path.read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_building_dir_swaps_in_only_when_finished(tmp_path: Path) -> None:
    target = tmp_path / "built"
    with files.building_dir(target) as tmp:
        (tmp / "x").write_text("1")
    assert (target / "x").read_text() == "1"
    with pytest.raises(KeyboardInterrupt), files.building_dir(target) as tmp:
        (tmp / "x").write_text("2")
        raise KeyboardInterrupt
    assert (target / "x").read_text() == "1"  # the interrupted build changed nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["built"]


def test_records_reject_damage_and_other_versions(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    files.write_record(path, "kind", 1, {"a": [1, 2]})
    assert files.read_record(path, "kind", 1) == {"a": [1, 2]}
    assert files.read_record(path, "kind", 2) is None
    assert files.read_record(path, "other", 1) is None
    text = path.read_text()
    path.write_text(text.replace("2", "3"))
    assert files.read_record(path, "kind", 1) is None
    path.write_text(text[: len(text) // 2])
    assert files.read_record(path, "kind", 1) is None
    assert files.read_record(tmp_path / "missing.json", "kind", 1) is None


def test_manifest_notices_a_truncated_or_missing_file(tmp_path: Path) -> None:
    (tmp_path / "w").write_bytes(b"0123456789")
    manifest = files.file_manifest(tmp_path)
    assert files.matches_manifest(tmp_path, manifest)
    (tmp_path / "w").write_bytes(b"01234")
    assert not files.matches_manifest(tmp_path, manifest)
    (tmp_path / "w").unlink()
    assert not files.matches_manifest(tmp_path, manifest)
    assert not files.matches_manifest(tmp_path, {})


def test_stale_builds_are_removed_but_not_neighbours(tmp_path: Path) -> None:
    target = tmp_path / "m"
    stale = [files.temporary_sibling(target), files.temporary_sibling(target, ".building-")]
    stale[0].write_text("half")
    stale[1].mkdir()
    neighbour = files.temporary_sibling(tmp_path / "mm")
    neighbour.write_text("another target's")
    assert sorted(files.remove_stale_builds(target)) == sorted(stale)
    assert neighbour.exists() and not any(p.exists() for p in stale)


def test_a_head_save_killed_between_its_files_is_refused(tmp_path: Path) -> None:
    """Weights of one save beside the config.json of another (a save killed between its two
    files) are refused naming the fix, not loaded as a mix."""
    from test_heads import make_net
    from tiny_models import tiny_llama

    from specplug.errors import InputFileError
    from specplug.heads.checkpoint import load_head, save_head

    target = tiny_llama(0)
    first, second = make_net("eagle", target), make_net("medusa", target)
    save_head(first, tmp_path / "a")
    save_head(second, tmp_path / "b")
    load_head(tmp_path / "a")
    (tmp_path / "a" / "model.safetensors").write_bytes(
        (tmp_path / "b" / "model.safetensors").read_bytes())
    with pytest.raises(InputFileError, match="saved with another config.json"):
        load_head(tmp_path / "a")


def test_replace_dir_killed_between_its_renames_is_undone(tmp_path: Path) -> None:
    target = tmp_path / "built"
    with files.building_dir(target) as tmp:
        (tmp / "x").write_text("finished")
    old = files.temporary_sibling(target, ".old-")
    os.replace(target, old)  # what a SIGKILL between replace_dir's two renames leaves
    files.remove_stale_builds(target)
    assert (target / "x").read_text() == "finished"
    assert _leftovers(tmp_path) == []
