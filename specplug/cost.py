"""How much a target forward costs as a function of the number of tokens it scores.

Learned online from the engine's own steps (wall time of each ``TargetRunner.score`` call), so
the same code finds a steep curve on a small CPU (scoring 5 tokens costs ~1.9x scoring one for
SmolLM2 on 2 cores) and a flat one on a GPU. Drafters read it through ``DraftContext.cost`` to
choose how much to draft.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["CostModel", "best_depth"]


@dataclass
class CostModel:
    """Per scored-token-count moving averages of forward time, and a line fitted through them.

    Args:
        prior_slope: relative cost of one extra scored token (``cost(n) / cost(1) =
            1 + prior_slope * (n - 1)``) used until two different counts have been timed.
        decay: weight of the newest observation in each moving average.
    """

    prior_slope: float = 0.15
    decay: float = 0.2
    times: dict[int, float] = field(default_factory=dict)
    counts: dict[int, int] = field(default_factory=dict)

    def observe(self, n_tokens: int, seconds: float) -> None:
        old = self.times.get(n_tokens)
        self.times[n_tokens] = seconds if old is None else old + self.decay * (seconds - old)
        self.counts[n_tokens] = self.counts.get(n_tokens, 0) + 1

    def slope(self) -> float:
        """Fitted relative cost of one extra scored token (>= 0)."""
        ns = sorted(self.times)
        if len(ns) < 2:
            return self.prior_slope
        w = [min(self.counts[n], 20) for n in ns]
        t = [self.times[n] for n in ns]
        sw = sum(w)
        mn = sum(wi * n for wi, n in zip(w, ns)) / sw
        mt = sum(wi * ti for wi, ti in zip(w, t)) / sw
        var = sum(wi * (n - mn) ** 2 for wi, n in zip(w, ns))
        b = sum(wi * (n - mn) * (ti - mt) for wi, n, ti in zip(w, ns, t)) / var
        a = mt - b * mn
        one = a + b
        return max(b, 0.0) / one if one > 0 else self.prior_slope

    def relative(self, n_tokens: int) -> float:
        """``cost(n) / cost(1)``."""
        return 1.0 + self.slope() * (n_tokens - 1)


def best_depth(accept_rate: float, max_depth: int, cost: CostModel | None,
               prior_slope: float = 0.15) -> int:
    """Draft length maximising expected emitted tokens per unit of target time, when each
    draft token is accepted with probability ``accept_rate`` given the previous ones were:
    ``argmax_d (1 + a + ... + a^d) / (cost(1 + d) / cost(1))``; 0 means "do not draft"."""
    slope = cost.slope() if cost is not None else prior_slope
    best, best_value, expected, term = 0, 1.0, 1.0, 1.0
    for d in range(1, max_depth + 1):
        term *= accept_rate
        expected += term
        value = expected / (1.0 + slope * d)
        if value > best_value:
            best, best_value = d, value
    return best
