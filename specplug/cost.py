"""How much a speculative step costs as a function of how much is drafted and scored.

Two measured curves, each the median of the latest timings per size:

- the target's forward time by number of tokens scored (``observe``), from a one-off
  calibration per model and device (``specplug.budget.calibrate``, cached on disk) and then from
  every ``TargetRunner.score`` call of the engine;
- the drafter's time by draft depth (``observe_draft``).

The same code finds a steep curve on a small CPU (scoring 5 tokens costs ~1.9x scoring one for
SmolLM2 on 2 cores) and a flat one on a GPU. Budget rules (``specplug.budget``) read it through
``DraftContext.cost`` as ``step_cost(d)``: the cost of a step that drafts ``d`` tokens, in units
of a plain one-token target forward.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BatchedCost", "Curve", "CostModel", "batch_view"]


@dataclass
class Curve:
    """Seconds by size: per size the median of the last ``window`` timings, read by
    interpolation between measured sizes and by a weighted least-squares line outside them.

    A median, not a moving average: one forward slowed by another process would otherwise
    raise its size's cost for many steps, and a budget rule that then stops choosing that
    size never times it again to correct it (on the 2-core CI machine this made adaptive
    ``ngram`` treat 2-token drafts as 20% dearer than they are)."""

    window: int = 15
    times: dict[int, float] = field(default_factory=dict)   # per size: the median
    counts: dict[int, int] = field(default_factory=dict)    # per size: timings seen
    samples: dict[int, deque[float]] = field(default_factory=dict)
    #: bumped by every write: readers (the fit here, ``CostModel.step_cost``) memoise on it,
    #: because budget rules read ~30 sizes per step and refitting each one is a Python-level
    #: cost per step (docs/adaptive.md)
    version: int = field(default=0, compare=False)
    _fit: tuple[int, tuple[float, float] | None] | None = field(default=None, init=False,
                                                                 repr=False, compare=False)

    def observe(self, n: int, seconds: float) -> None:
        window = self.samples.setdefault(n, deque(maxlen=self.window))
        window.append(seconds)
        self.times[n] = statistics.median(window)
        self.counts[n] = self.counts.get(n, 0) + 1
        self.version += 1

    def seed(self, n: int, seconds: float, weight: int) -> None:
        """A prior timing for size ``n`` worth ``weight`` observations (a calibration's
        median of ``weight`` rounds): live timings replace it once they outnumber it."""
        self.samples[n] = deque([seconds] * max(weight, 1), maxlen=self.window)
        self.times[n] = seconds
        self.counts[n] = max(weight, 1)
        self.version += 1

    def line(self) -> tuple[float, float] | None:
        """``(intercept, slope)`` of the fitted line; None before two sizes are measured."""
        if self._fit is None or self._fit[0] != self.version:
            self._fit = (self.version, self._fit_line())
        return self._fit[1]

    def _fit_line(self) -> tuple[float, float] | None:
        ns = sorted(self.times)
        if len(ns) < 2:
            return None
        w = [min(self.counts[n], 20) for n in ns]
        t = [self.times[n] for n in ns]
        sw = sum(w)
        mn = sum(wi * n for wi, n in zip(w, ns)) / sw
        mt = sum(wi * ti for wi, ti in zip(w, t)) / sw
        var = sum(wi * (n - mn) ** 2 for wi, n in zip(w, ns))
        b = sum(wi * (n - mn) * (ti - mt) for wi, n, ti in zip(w, ns, t)) / var
        return mt - b * mn, b

    def at(self, n: float) -> float | None:
        """Estimated seconds at size ``n`` (None before anything is measured)."""
        if not self.times:
            return None
        ns = sorted(self.times)
        if n in self.times:
            return self.times[int(n)]
        fit = self.line()
        slope = max(fit[1], 0.0) if fit else 0.0
        if n < ns[0]:
            return max(self.times[ns[0]] - slope * (ns[0] - n), 0.0)
        if n > ns[-1]:
            return self.times[ns[-1]] + slope * (n - ns[-1])
        hi = next(m for m in ns if m > n)
        lo = max(m for m in ns if m < n)
        f = (n - lo) / (hi - lo)
        return self.times[lo] + f * (self.times[hi] - self.times[lo])


@dataclass
class CostModel:
    """The target's forward time by scored tokens and the drafter's time by depth.

    Args:
        prior_slope: relative cost of one extra scored token (``cost(n) / cost(1) = 1 +
            prior_slope * (n - 1)``) used until two different counts have been timed.
        window: timings kept per size (their median is the size's cost).
    """

    prior_slope: float = 0.15
    window: int = 15
    target: Curve = field(default_factory=Curve)
    draft: Curve = field(default_factory=Curve)
    calibrated: bool = False  # the target curve was measured over a range of sizes
    _steps: dict[int, float] = field(default_factory=dict, init=False, repr=False,
                                     compare=False)  # step_cost memo for _steps_version
    _steps_version: tuple[int, int] = field(default=(-1, -1), init=False, repr=False,
                                            compare=False)

    def __post_init__(self) -> None:
        self.target.window = self.draft.window = self.window

    # --- observations ---------------------------------------------------------------------
    def observe(self, n_tokens: int, seconds: float) -> None:
        """A target forward that scored ``n_tokens`` took ``seconds``."""
        self.target.observe(n_tokens, seconds)

    def observe_draft(self, depth: int, seconds: float) -> None:
        """Drafting a tree of depth ``depth`` (0: nothing drafted) took ``seconds``."""
        self.draft.observe(depth, seconds)

    @property
    def times(self) -> dict[int, float]:
        return self.target.times

    @property
    def counts(self) -> dict[int, int]:
        return self.target.counts

    # --- reading ---------------------------------------------------------------------------
    def slope(self) -> float:
        """Fitted relative cost of one extra scored token (>= 0)."""
        fit = self.target.line()
        if fit is None:
            return self.prior_slope
        a, b = fit
        one = a + b
        return max(b, 0.0) / one if one > 0 else self.prior_slope

    def relative(self, n_tokens: int) -> float:
        """``cost(n) / cost(1)`` of the target forward."""
        one = self.target.at(1)
        if one is None or one <= 0 or self.target.line() is None:
            return 1.0 + self.slope() * (n_tokens - 1)
        return max(self.target.at(n_tokens) or 0.0, one) / one

    def draft_per_token(self) -> float:
        """Drafting cost of one more draft token, relative to a one-token target forward
        (0 until the drafter has been timed at two depths)."""
        one, fit = self.target.at(1), self.draft.line()
        if not one or fit is None:
            return 0.0
        return max(fit[1], 0.0) / one

    def draft_fixed(self) -> float:
        """What running the drafter costs before its first draft token (its time at depth 0:
        a head's forward over the new features, a draft model's catch-up), relative to a
        one-token target forward; 0 until the drafter has been timed there. ``step_cost``
        leaves it out (every step pays it alike); a step that does not run the drafter
        saves it."""
        one, zero = self.target.at(1), self.draft.times.get(0)
        return max(zero, 0.0) / one if one and zero is not None else 0.0

    def step_cost(self, depth: int) -> float:
        """Cost of a step that drafts ``depth`` tokens (a chain, or a tree of ``depth``
        nodes) and scores them with its root, relative to a plain one-token forward.
        Memoised until either curve next changes."""
        version = (self.target.version, self.draft.version)
        if version != self._steps_version:
            self._steps, self._steps_version = {}, version
        cost = self._steps.get(depth)
        if cost is None:
            cost = self._steps[depth] = self.relative(1 + depth) + self.draft_per_token() * depth
        return cost

    # --- persistence -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"target": {str(n): t for n, t in sorted(self.target.times.items())},
                "counts": {str(n): c for n, c in sorted(self.target.counts.items())}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CostModel:
        model = cls(calibrated=True)
        for n, t in data["target"].items():
            model.target.seed(int(n), float(t), int(data.get("counts", {}).get(n, 1)))
        return model


@dataclass
class BatchedCost:
    """``base`` read for one row of a batch of ``rows`` rows of which ``drafting`` draft alike
    (all of them unless told), for engines that score a whole batch in one forward (vLLM):
    ``base``'s target curve is then by the step's total scored tokens, and a drafting row's
    ``d`` draft tokens make the step cost ``C(rows + drafting * d) / C(rows)`` of a plain
    batched step. On a CPU that ratio grows with the batch (a batch of 8 already fills 2
    cores), so rows draft only what pays for itself there; on a GPU the curve is flat and
    nothing changes. ``rows = 1`` reads ``base`` unchanged."""

    base: CostModel
    rows: int
    drafting: int | None = None
    _steps: dict[int, float] = field(default_factory=dict, init=False, repr=False,
                                     compare=False)  # step_cost memo for _steps_version
    _steps_version: tuple[int, int] = field(default=(-1, -1), init=False, repr=False,
                                            compare=False)

    @property
    def calibrated(self) -> bool:
        return self.base.calibrated

    def relative(self, n_tokens: int) -> float:
        """Step cost when every drafting row scores ``n_tokens`` (the others one), relative to
        one token per row. Before ``base`` has timed two sizes its prior slope is a lone
        request's, so it is read per row: scaled to the batch it would stop all drafting, and
        with it the timings of other sizes that would correct it (on a GPU, for good)."""
        fit = self.base.target.line()
        if fit is None:
            return self.base.relative(n_tokens)
        drafting = self.rows if self.drafting is None else self.drafting
        scored = self.rows + drafting * (n_tokens - 1)
        ratio = self.base.relative(scored) / self.base.relative(self.rows)
        # At a batch's scale the sizes read lie among timings of a few samples each, taken
        # while rows come and go: their medians may fall with size (seen on vLLM beside a
        # busy process: 64 scored tokens at 2.4 s, 68 at 0.27 s), and a ratio below the
        # fitted line's, or below 1, would make drafting look free. A draft token costs at
        # least what the line says it does.
        intercept, slope = fit
        plain = intercept + max(slope, 0.0) * self.rows
        if plain > 0:
            ratio = max(ratio, (intercept + max(slope, 0.0) * scored) / plain)
        return max(ratio, 1.0)

    def draft_per_token(self) -> float:
        """One more draft depth for the whole batch (``base``'s draft curve is timed per
        batch), relative to a plain batched step."""
        return self.base.draft_per_token() / self.base.relative(self.rows)

    def draft_fixed(self) -> float:
        """``base.draft_fixed`` relative to a plain batched step."""
        return self.base.draft_fixed() / self.base.relative(self.rows)

    def step_cost(self, depth: int) -> float:
        """``CostModel.step_cost`` at the batch's scale, memoised like it (budget rules read
        every depth of every row each step)."""
        version = (self.base.target.version, self.base.draft.version)
        if version != self._steps_version:
            self._steps, self._steps_version = {}, version
        cost = self._steps.get(depth)
        if cost is None:
            # never cheaper than a shallower draft (the sizes between may be read from noise)
            cost = self._steps[depth] = max(
                self.relative(1 + depth) + self.draft_per_token() * depth,
                self.step_cost(depth - 1) if depth > 0 else 0.0)
        return cost


def batch_view(cost: CostModel, rows: int, drafting: int | None = None
               ) -> CostModel | BatchedCost:
    """What a drafting row of a ``rows``-row batch, ``drafting`` of which draft (all unless
    told), reads: ``cost`` itself for one row (no extra reads per step), else
    ``BatchedCost(cost, rows, drafting)``."""
    return BatchedCost(cost, rows, drafting) if rows > 1 else cost
