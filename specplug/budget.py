"""Adaptive speculation budgets: how many tokens to draft, and how wide a tree, per step.

Expected tokens emitted by a step whose drafts the drafter believes in with path probabilities
``v_1 >= v_2 >= ...`` (the probability that the path to node i is accepted) is
``1 + sum_i v_i`` (the bonus token, plus each node on an accepted path). A step that drafts
``n`` nodes costs ``CostModel.step_cost(n)`` (target forward on ``n + 1`` tokens plus drafting,
in units of a plain step). The rules here maximise the ratio, which is SpecDec++'s stopping rule
(stop when the predicted acceptance of the next token no longer pays) with the cost measured on
this machine instead of assumed: on a 2-core CPU a chain stops early; on a GPU, where scoring 10
tokens costs about what scoring one does, the same rule drafts to the cap.

Every budget rule is here: ``best_depth`` (chains), ``best_tree_size`` and
``worth_extending`` (trees), and the acceptance calibration they read. The target's cost curve
they price drafts with is measured by ``specplug.calibration`` and refined online by the
engine (``specplug.cost``).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence

from specplug.cost import BatchedCost, CostModel
from specplug.types import regroup_rows

__all__ = ["AcceptanceCalibration", "RequestCorrection", "best_depth", "best_tree_size",
           "expected_accepted", "worth_extending"]

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


class RequestCorrection:
    """Per row of the current requests: how this request's drafts fare against what the
    drafter's estimate predicted, as a factor on that estimate.

    The estimates behind a budget (ngram's per-kind rates, the tree builder's calibrated
    beliefs) are learned across requests. One request can differ: an answer that does not copy
    its prompt rejects match after match of kinds that usually pay. Per row, the factor is
    ``(accepted + prior) / (predicted + prior)`` over the request's verified drafts: 1 until
    evidence arrives, then what this request accepts per token the estimate expected. After
    two drafts expected to gain 1.5 tokens each and both rejected it is 0.4, and a CPU's cost
    curve then pays for little or no draft. While a row drafts nothing, its counts decay by ``decay`` per
    step, so the factor drifts back toward 1 and the row retries: text that starts copying its
    input halfway through is drafted again.
    """

    def __init__(self, prior: float = 2.0, decay: float = 0.95):
        self.prior, self.decay = prior, decay
        self.accepted: list[float] = []
        self.predicted: list[float] = []

    def start(self, rows: int) -> None:
        """New requests: every row's factor back to 1."""
        self.accepted, self.predicted = [0.0] * rows, [0.0] * rows

    def regroup(self, sources: list[int | None]) -> None:
        """The engine's batch changed: new row ``i`` is old row ``sources[i]`` going on, or a
        new request (None, factor 1)."""
        self.accepted = regroup_rows(self.accepted, sources, float)
        self.predicted = regroup_rows(self.predicted, sources, float)

    def factor(self, row: int) -> float:
        if row >= len(self.accepted):
            return 1.0
        return (self.accepted[row] + self.prior) / (self.predicted[row] + self.prior)

    def observe(self, row: int, accepted: float, predicted: float) -> None:
        """A verified draft of ``row``: ``accepted`` tokens, against ``predicted`` expected."""
        if row < len(self.accepted):
            self.accepted[row] += accepted
            self.predicted[row] += predicted

    def idle(self, row: int) -> None:
        """``row`` drafted nothing this step."""
        if row < len(self.accepted):
            self.accepted[row] *= self.decay
            self.predicted[row] *= self.decay


def expected_accepted(accept_rate: float, depth: int) -> float:
    """Expected accepted tokens of a chain of ``depth`` tokens, each accepted with probability
    ``accept_rate`` given the previous ones were: ``a + a^2 + ... + a^depth``."""
    total, term = 0.0, 1.0
    for _ in range(depth):
        term *= accept_rate
        total += term
    return total


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


def best_depth(accept_rate: float, max_depth: int, cost: CostModel | BatchedCost | None,
               prior_slope: float = 0.15) -> int:
    """Draft length maximising expected emitted tokens per unit of step time, when each
    draft token is accepted with probability ``accept_rate`` given the previous ones were:
    ``argmax_d (1 + a + ... + a^d) / step_cost(d)``; 0 means "do not draft"."""
    best, best_value, expected, term = 0, 1.0, 1.0, 1.0
    for d in range(1, max_depth + 1):
        term *= accept_rate
        expected += term
        step = cost.step_cost(d) if cost is not None else 1.0 + prior_slope * d
        value = expected / step
        if value > best_value:
            best, best_value = d, value
    return best
