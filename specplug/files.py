"""Files that survive crashes and concurrent writers.

Everything specplug writes (converted models, cost curves, exported heads, head checkpoints,
training data, benchmark results) goes through these helpers:

* :func:`atomic_write_bytes` / :func:`atomic_write_text` write a temporary file beside the
  target, flush it to disk and ``os.replace`` it into place, so a reader sees the old file or
  the new one, never half of one, whatever happens to the writer.
* :func:`building_dir` builds a folder in a temporary directory beside the target and swaps it
  in only when the ``with`` body finished; a failed or interrupted build leaves the previous
  folder (or none) behind.
* :func:`file_lock` serializes builders across processes (an OS lock: a killed holder releases
  it), and :func:`remove_stale_builds` clears what a killed builder left, under that lock.
* :func:`write_record` / :func:`read_record` store JSON with a format name, a version and a
  sha256 of the payload, so a truncated, edited or outdated file reads as missing (and is
  rebuilt) instead of as garbage.
* :func:`file_manifest` / :func:`matches_manifest` record and check the sizes of a folder's
  files, a cheap check that no file of a finished build was truncated or removed later.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "building_dir",
    "file_lock",
    "file_manifest",
    "matches_manifest",
    "read_record",
    "remove_stale_builds",
    "replace_dir",
    "temporary_sibling",
    "write_record",
]

_PARTIAL = ".partial-"
_BUILDING = ".building-"
_OLD = ".old-"


def temporary_sibling(path: Path, kind: str = _PARTIAL) -> Path:
    """A fresh name beside ``path`` for a file or folder that is not finished yet:
    ``.<name><kind><random>``; :func:`remove_stale_builds` recognises it."""
    return path.with_name(f".{path.name}{kind}{uuid.uuid4().hex[:12]}")


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, ``os.replace``)."""
    target = Path(path)
    tmp = temporary_sibling(target)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished folder ``src`` to ``dst``, replacing whatever was there.

    ``dst`` is renamed aside first and removed after ``src`` took its place, so at every
    moment ``dst`` is either the old folder or the new one (or, for an instant, absent)."""
    if dst.exists() or dst.is_symlink():
        old = temporary_sibling(dst, _OLD)
        os.replace(dst, old)
        try:
            os.replace(src, dst)
        except BaseException:  # interrupted between the two renames: put the old one back
            os.replace(old, dst)
            raise
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    else:
        os.replace(src, dst)


@contextlib.contextmanager
def building_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; when the body returns, it replaces
    ``target``. On any exception (``KeyboardInterrupt`` too) it is removed and ``target`` is
    untouched. Hold :func:`file_lock` around it when other processes may build the same
    target."""
    dst = Path(target)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(dst, _BUILDING)
    tmp.mkdir()  # unlike tempfile.mkdtemp (0o700), honours the umask: caches may be shared
    try:
        yield tmp
        replace_dir(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_builds(target: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files and folders that writers of ``target`` left behind when they
    were killed. Call it only while holding ``target``'s :func:`file_lock`, so no live writer
    owns them. A target that a killed ``replace_dir`` left missing gets its old copy back.
    Returns what was removed."""
    dst = Path(target)
    removed: list[Path] = []
    if not dst.parent.is_dir():
        return removed
    name = glob.escape(dst.name)
    olds = sorted(dst.parent.glob(f".{name}{_OLD}*"), key=lambda p: p.stat().st_mtime)
    if olds and not (dst.exists() or dst.is_symlink()):
        # killed between replace_dir's two renames: the newest old copy is the finished one
        os.replace(olds.pop(), dst)
    for kind in (_PARTIAL, _BUILDING, _OLD):
        for stale in dst.parent.glob(f".{name}{kind}*"):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
            removed.append(stale)
    return removed


def lock_path(target: str | os.PathLike[str]) -> Path:
    """The lock file that guards builds of ``target``: ``.<name>.lock`` beside it."""
    dst = Path(target)
    return dst.with_name(f".{dst.name}.lock")


@contextlib.contextmanager
def file_lock(target: str | os.PathLike[str], timeout: float = -1) -> Iterator[None]:
    """Hold the inter-process lock of ``target`` (see :func:`lock_path`) for the ``with`` body.

    The lock is an OS file lock (``fcntl``/``msvcrt`` through ``filelock``), released by the
    kernel when its holder dies, so a killed builder never blocks the next one.

    Raises:
        CacheDirError: the folder cannot be created or written, naming SPECPLUG_CACHE_DIR.
    """
    from filelock import FileLock  # a dependency of huggingface_hub, hence of transformers

    from specplug.errors import writable_dir

    path = lock_path(target)
    writable_dir(path.parent)
    with FileLock(str(path), timeout=timeout):
        yield


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def write_record(path: str | os.PathLike[str], kind: str, version: int,
                 payload: Mapping[str, Any]) -> Path:
    """Store ``payload`` (JSON-serializable) atomically at ``path``, with its format ``kind``,
    ``version`` and sha256, for :func:`read_record`."""
    doc = {"format": kind, "version": version, "sha256": _digest(dict(payload)),
           "payload": dict(payload)}
    return atomic_write_text(path, json.dumps(doc, indent=1) + "\n")


def read_record(path: str | os.PathLike[str], kind: str, version: int) -> dict[str, Any] | None:
    """The payload :func:`write_record` stored at ``path``, or None when the file is missing,
    unreadable, of another format or version, or does not match its checksum."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (not isinstance(doc, dict) or doc.get("format") != kind or doc.get("version") != version
            or not isinstance(doc.get("payload"), dict)):
        return None
    return doc["payload"] if doc.get("sha256") == _digest(doc["payload"]) else None


def file_manifest(folder: str | os.PathLike[str], names: Iterable[str] | None = None
                  ) -> dict[str, int]:
    """``{file name: size in bytes}`` for ``names`` in ``folder`` (default: every plain file)."""
    base = Path(folder)
    if names is None:
        names = sorted(p.name for p in base.iterdir() if p.is_file() and not p.is_symlink())
    return {name: (base / name).stat().st_size for name in names}


def matches_manifest(folder: str | os.PathLike[str], manifest: Any) -> bool:
    """True when every file ``manifest`` lists is in ``folder`` with that size."""
    if not isinstance(manifest, dict) or not manifest:
        return False
    base = Path(folder)
    for name, size in manifest.items():
        try:
            if (base / name).stat().st_size != size:
                return False
        except OSError:
            return False
    return True
