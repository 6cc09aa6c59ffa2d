"""The target's cost curve, measured once per model and machine and cached on disk.

``calibrate`` times the target's forward by number of scored tokens; ``cached_calibration``
stores the result under ``<cache root>/cost`` (``$SPECPLUG_COST_CACHE`` overrides the folder;
``SPECPLUG_COST_CACHE=0`` turns the cache off), keyed by model, device, dtype and threads.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from specplug.cost import CostModel
from specplug.paths import cache_root

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
    stored. ``use_cache=False`` or ``SPECPLUG_COST_CACHE=0`` measures and stores nothing."""
    use_cache = use_cache and os.environ.get("SPECPLUG_COST_CACHE") != "0"
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cost_cache_dir() / f"{digest}.json"
    if use_cache and path.is_file():
        try:
            return CostModel.from_dict(json.loads(path.read_text())["curve"])
        except (ValueError, KeyError, TypeError, AttributeError, OSError):
            pass  # unreadable: measure again and overwrite
    model = measure()
    if use_cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"key": key, "measured": time.strftime("%Y-%m-%d %H:%M"),
                                       "curve": model.to_dict()}, indent=1))
            tmp.replace(path)
        except OSError:
            pass  # a read-only cache: keep the curve for this process only
    return model
