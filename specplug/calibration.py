"""The target's cost curve, measured once per model and machine and cached on disk.

``calibrate`` times the target's forward by number of scored tokens; ``cached_calibration``
stores the result under ``<cache root>/cost`` (``$SPECPLUG_COST_CACHE`` overrides the folder;
``SPECPLUG_COST_CACHE=0`` turns the cache off), keyed by model, device, dtype and threads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from specplug.cost import CostModel
from specplug.errors import CacheDirError, writable_dir
from specplug.files import file_lock, read_record, remove_stale_builds, write_record
from specplug.paths import cache_root

logger = logging.getLogger(__name__)

__all__ = ["CALIBRATION_WIDTHS", "cached_calibration", "calibrate", "cost_cache_dir"]

#: scored-token counts timed by ``calibrate`` (chains up to 31 deep: ``ngram``'s
#: default cap of 32 reads one token past them; trees up to 31 nodes)
CALIBRATION_WIDTHS = (1, 2, 3, 4, 5, 6, 8, 11, 16, 24, 32)


def calibrate(score: Callable[[int], float], widths: Sequence[int] = CALIBRATION_WIDTHS,
              repeats: int = 3, warmup: int = 2) -> CostModel:
    """Time ``score(n)`` (one target forward over ``n`` tokens, returning seconds) for each
    width, interleaved over ``repeats`` rounds; the median per width seeds a ``CostModel``."""
    for _ in range(warmup):
        score(widths[0])
    samples: dict[int, list[float]] = {n: [] for n in widths}
    for _ in range(repeats):
        for n in widths:
            samples[n].append(score(n))
    model = CostModel(calibrated=True)
    for n, ts in samples.items():
        model.target.seed(n, statistics.median(ts), len(ts))
    return model


def cost_cache_dir() -> Path:
    """``$SPECPLUG_COST_CACHE`` if set, else ``cost/`` under specplug's cache root."""
    explicit = os.environ.get("SPECPLUG_COST_CACHE")
    return Path(explicit).expanduser() if explicit else cache_root() / "cost"


def cached_calibration(key: dict, measure: Callable[[], CostModel], use_cache: bool = True
                       ) -> CostModel:
    """The calibration stored for ``key`` (model, device, dtype, threads), or ``measure()``'s,
    stored. ``use_cache=False`` or ``SPECPLUG_COST_CACHE=0`` measures and stores nothing.

    The file is a checksummed record (``specplug.files.write_record``) written atomically;
    one that is truncated, edited or of another version is measured again. Processes that
    start together on an empty cache measure once: the others wait on the file lock, then
    read. A cache folder that cannot be written keeps the curve in memory, with one warning.
    """
    use_cache = use_cache and os.environ.get("SPECPLUG_COST_CACHE") != "0"
    if not use_cache:
        return measure()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    try:
        path = writable_dir(cost_cache_dir()) / f"{digest}.json"
    except CacheDirError as err:  # no home folder, or a folder that cannot be written
        _warn_memory_only(err)
        return measure()
    stored = _read(path)
    if stored is not None:
        return stored
    with file_lock(path):
        stored = _read(path)  # another process may have measured while we waited
        if stored is not None:
            return stored
        remove_stale_builds(path)
        model = measure()  # its own errors are its own, never a cache warning
        try:
            write_record(path, _RECORD, _VERSION, {
                "key": key, "measured": time.strftime("%Y-%m-%d %H:%M"),
                "curve": model.to_dict()})
        except OSError as err:
            _warn_memory_only(err)
        return model

_RECORD = "specplug-cost-curve"
_VERSION = 2  # 2: a checksummed record (files.write_record); 1 was bare JSON
_warned: set[str] = set()


def _read(path: Path) -> CostModel | None:
    payload = read_record(path, _RECORD, _VERSION)
    if payload is None:
        return None
    try:
        return CostModel.from_dict(payload["curve"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _warn_memory_only(err: Exception) -> None:
    """One warning per distinct problem per process: the curve stays in memory."""
    if str(err) not in _warned:
        _warned.add(str(err))
        logger.warning("specplug: cannot write the cost-curve cache (%s); the curve is kept "
                       "in memory for this process only (set SPECPLUG_COST_CACHE to a "
                       "writable folder, or 0 to turn the cache off)", err)
