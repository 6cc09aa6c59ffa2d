"""Adaptive speculation budgets: how many tokens to draft, and how wide a tree, per step.

Expected tokens emitted by a step whose drafts the drafter believes in with path probabilities
``v_1 >= v_2 >= ...`` (the probability that the path to node i is accepted) is
``1 + sum_i v_i`` (the bonus token, plus each node on an accepted path). A step that drafts
``n`` nodes costs ``CostModel.step_cost(n)`` (target forward on ``n + 1`` tokens plus drafting,
in units of a plain step). The rules here maximise the ratio, which is SpecDec++'s stopping rule
(stop when the predicted acceptance of the next token no longer pays) with the cost measured on
this machine instead of assumed: on a 2-core CPU a chain stops early; on a GPU, where scoring 10
tokens costs about what scoring one does, the same rule drafts to the cap.

The target's cost curve is measured once per model and device (``calibrate``, cached under
``~/.cache/specplug/cost``) and refined online by the engine.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from specplug.cost import CostModel

__all__ = ["CALIBRATION_WIDTHS", "AcceptanceCalibration", "best_tree_size", "calibrate",
           "cached_calibration", "worth_extending"]

#: scored-token counts timed by ``calibrate`` (chains up to 31 deep: ``ngram``'s
#: default cap of 32 reads one token past them; trees up to 31 nodes)
CALIBRATION_WIDTHS = (1, 2, 3, 4, 5, 6, 8, 11, 16, 24, 32)


class AcceptanceCalibration:
    """How often a draft node believed accepted with probability ``p`` (its path probability
    under the drafter) really is, learned online from every verified tree: SpecDec++'s
    acceptance predictor, without training one. Drafters are rarely calibrated (a head that
    says 0.6 may be right a third of the time), and a budget rule fed raw confidences drafts
    too much or too little.

    Per bin of ``p``, the correction is ``(accepted + prior) / (sum of p + prior)``: 1 (trust
    the drafter) until evidence arrives, then the bin's observed/predicted ratio.
    """

    EDGES = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

    def __init__(self, prior: float = 4.0):
        self.prior = prior
        self.accepted = [0.0] * (len(self.EDGES) - 1)
        self.predicted = [0.0] * (len(self.EDGES) - 1)

    def _bin(self, p: float) -> int:
        return min(bisect.bisect_right(self.EDGES, p) - 1, len(self.accepted) - 1)

    def observe(self, p: float, accepted: bool) -> None:
        b = self._bin(p)
        self.accepted[b] += float(accepted)
        self.predicted[b] += p

    def __call__(self, p: float) -> float:
        """The calibrated acceptance probability of a node the drafter believes in with ``p``."""
        b = self._bin(p)
        ratio = (self.accepted[b] + self.prior) / (self.predicted[b] + self.prior)
        return min(1.0, p * ratio)


def worth_extending(expected: float, path_p: float, depth: int, cost: CostModel) -> bool:
    """Does a chain of ``depth`` draft tokens, expecting ``expected`` emitted tokens (bonus
    included), gain from one more token accepted with path probability ``path_p``:
    ``(expected + path_p) / step_cost(depth + 1) > expected / step_cost(depth)``?"""
    return (expected + path_p) * cost.step_cost(depth) > expected * cost.step_cost(depth + 1)


def best_tree_size(values: Sequence[float], step_cost: Callable[[int], float],
                   max_nodes: int) -> int:
    """How many of a tree's nodes to keep, ``values`` being their acceptance probabilities in
    the order they would be kept: grow ``n`` while node ``n + 1`` raises
    ``(1 + v_1 + ... + v_n) / step_cost(n)`` (``step_cost(0)``: a step with no draft), up to
    ``max_nodes``. Values are made non-increasing first (a running minimum), and the rule only
    looks forward one node, so whether node ``i`` is kept depends on nodes ``1..i`` alone."""
    n, expected, ratio, floor = 0, 1.0, 1.0 / step_cost(0), 1.0
    for v in values[:max_nodes]:
        floor = min(floor, v)
        nxt = (expected + floor) / step_cost(n + 1)
        if nxt <= ratio:
            break
        n, expected, ratio = n + 1, expected + floor, nxt
    return n


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


def _cache_dir() -> Path:
    """``$SPECPLUG_COST_CACHE`` if set, else ``cost/`` under specplug's cache root
    (``$SPECPLUG_CACHE_DIR`` or ``~/.cache/specplug``)."""
    explicit = os.environ.get("SPECPLUG_COST_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    root = os.environ.get("SPECPLUG_CACHE_DIR")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "specplug") / "cost"


def cached_calibration(key: dict, measure: Callable[[], CostModel], use_cache: bool = True
                       ) -> CostModel:
    """The calibration stored for ``key`` (model, device, dtype, threads), or ``measure()``'s,
    stored. ``use_cache=False`` or ``SPECPLUG_COST_CACHE=0`` measures and stores nothing."""
    use_cache = use_cache and os.environ.get("SPECPLUG_COST_CACHE") != "0"
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = _cache_dir() / f"{digest}.json"
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
