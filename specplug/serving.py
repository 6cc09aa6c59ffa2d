"""Drafts for serving frameworks that own the decode loop (vLLM, SGLang).

A serving engine runs the target, verifies drafts itself and batches requests as they come and
go. Per step it hands specplug each row's token history and the tokens it just committed, and
wants one draft per row back: a chain (vLLM, ``ChainProposer.propose``) or a token tree
(SGLang, ``ServingProposer.draft``). ``ServingProposer`` turns that into specplug's drafter
calls (``start`` / ``begin`` + ``expand`` / ``observe``) through the same ``DraftSession`` and
tree builders as every other route:

- While the batch keeps its rows (every row's history is its previous history plus the tokens
  committed for it this step), the drafter ``observe``\\ s what was accepted and goes on, so
  drafters with caches (``draft_model``) only feed the new tokens.
- When requests join, leave or are reordered, each row is matched to last step's row of the
  same request: by request id where the engine gives them (SGLang's ``rid``), else by the
  history it extends (vLLM's seam passes none; any reordering is still followed), and the
  drafter is regrouped: rows that go on keep their state (``ngram``'s index and per-request
  acceptance estimates), new rows start fresh (drafters that cannot move theirs restart every
  row: a re-prefill for model drafters). Correctness never depends on this: the engine
  verifies every token; only speed does.

The engine's step time is learned the same way ``speculative_generate`` learns it, from the
engine's own steps: the wall time from one ``propose`` returning to the next call (the engine's
forward, verification and bookkeeping) against the tokens it scored over the whole batch, into
the ``CostModel`` that drafters with adaptive depth (``ngram``) read. With several rows they
read it as a ``BatchedCost``: a row's extra draft token is priced at the batch's scale, where
on a CPU it costs far more than in a single request.

Pricing a row's accepted tokens by the batch's throughput assumes a row that finishes sooner
lets a waiting request in (a server with a queue). A batch that drains (requests leave and none
join) has no queue: it takes as many steps as its slowest request, so an accepted token in a
row that will finish first saves nothing (the token is scored later anyway) while its rejected
drafts cost now. Once requests have left with none joining, only the rows with the fewest
output tokens (the last to finish, when requests ask for alike lengths) draft, each priced as
the few drafting rows of the batch they are; the rest draft nothing. A request that joins ends
the drain. This only changes which rows draft, never what the engine commits.

Drafts are greedy (the drafter's most likely tokens at every node): engines that verify
without the draft distribution treat a draft as one-hot, which is exact for any draft token
and accepts most often when the draft is the drafter's argmax.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from specplug.config import SpecConfig
from specplug.cost import batch_view
from specplug.drafters.base import StepOutcome
from specplug.drafters.model_drafter import check_vocab, output_vocab
from specplug.engine import Speculator
from specplug.sampling import SamplingParams
from specplug.session import DraftSession, Route, check_route, check_token_only
from specplug.types import DraftTree

__all__ = ["ChainProposer", "ServingProposer", "accepted_path", "check_token_only"]


class ServingProposer:
    """Drafts one tree (a chain on chain routes) per row for an engine that verifies itself.

    Args:
        config: the speculation config; ``tree`` must be ``chain`` unless ``trees``.
        vocab_size: the target's output vocabulary (drafts are checked against it).
        max_context: the target's context length; drafts never run past it.
        target: the target model when the drafter may inspect it (None in engines whose
            model is not an HF module).
        media_tokens: a vision-language target's image placeholder ids (drafters never match
            or propose them; a text-only draft model never sees them).
        engine: how errors name the engine ("vLLM", "SGLang", ...).
        trees: the engine verifies token trees (SGLang), not only chains (vLLM).
        max_nodes: the most draft nodes the engine verifies per row (SGLang's
            ``--speculative-num-draft-tokens`` less the root); None: no limit but the tree's.
        scores_every_slot: the engine scores ``max_nodes`` slots a row whether drafts fill
            them or not (SGLang): a draft token then costs nothing more, so trees are not cut
            to a cost curve (and the engine's step time, always the same size, is not timed).
        pads_rows: the engine scores every row as wide as the step's widest draft (SGLang
            under specplug's worker, which narrows its verify to that width): a row's draft
            tokens are priced as if every row of the batch scored as many, and the step's
            timing is booked against ``rows * (widest + 1)`` tokens.

    Raises:
        ValueError: the config's tree does not fit the engine (a tree on a chain engine, or
            more nodes than ``max_nodes``), or its drafter needs what the engine cannot give.
    """

    #: rows this many output tokens ahead of the fewest still count as the last to finish
    DRAIN_SLACK = 1

    def __init__(self, config: SpecConfig, vocab_size: int, max_context: int | None = None,
                 target: Any = None, media_tokens: frozenset[int] = frozenset(),
                 engine: str = "this engine", trees: bool = False,
                 max_nodes: int | None = None, scores_every_slot: bool = False,
                 pads_rows: bool = False):
        route = Route(engine, trees=trees, hidden_states=False, distributions=False,
                      token_only=target is None)
        check_route(config, route)  # before the drafter is built
        self.config = config
        self.vocab_size = int(vocab_size)
        self.max_context = max_context
        speculator = Speculator.from_config(config, target)
        budget = speculator.builder.max_nodes
        if max_nodes is not None and budget > max_nodes:
            raise ValueError(
                f"the {config.tree!r} tree drafts up to {budget} nodes a row, but {engine} "
                f"verifies {max_nodes} draft tokens a row (plus the root): raise the engine's "
                f"draft tokens to {budget + 1} or shrink the tree (num_speculative_tokens, "
                "tree_budget or tree_paths)")
        if media_tokens and target is None:
            speculator.drafter.bind_media(frozenset(media_tokens))
        self.session = DraftSession(speculator, route)
        self.speculator, self.drafter = speculator, speculator.drafter
        model = getattr(self.drafter, "model", None)
        if model is not None and hasattr(model, "get_output_embeddings"):
            check_vocab(output_vocab(model), self.vocab_size, f"the {config.method!r} model",
                        frozenset(media_tokens))
        self.trees = trees
        self.scores_every_slot = scores_every_slot and max_nodes is not None
        self.pads_rows = pads_rows and not self.scores_every_slot
        self.k = int(config.num_speculative_tokens)
        self.sampling = SamplingParams()  # greedy drafts: see the module docstring
        self._rows: list[list[int]] | None = None  # histories the drafter last saw
        self._rids: list[Any] | None = None  # their request ids, where the engine gives them
        self._tree: DraftTree | None = None  # the drafts last returned (trees: to learn from)
        self._scored: int | None = None  # tokens the engine scores for our drafts, all rows
        self._returned_at = 0.0
        self._born: list[int] = []  # per row of ``_rows``: its history's length when it joined
        self.draining = False  # requests left and none joined: see the module docstring
        self.restarts = 0  # steps where no row went on: the drafter started afresh
        self.regroups = 0  # steps where rows joined, left or moved and the rest went on
        self.drain_steps = 0  # steps drafted under the drain rule

    def reset(self) -> None:
        """Forget the rows: the next step starts every request afresh (an engine that
        flushed its cache)."""
        self._rows = self._rids = self._scored = self._tree = None

    def draft(self, histories: Sequence[Sequence[int]],
              committed: Sequence[Sequence[int]] | None = None,
              rids: Sequence[Any] | None = None) -> DraftTree:
        """One draft per row.

        Args:
            histories: per row, every token id (Python ints) of the request so far (prompt
                and output); the last one is committed but not yet scored by the target (the
                draft's root).
            committed: per row, the tokens the engine committed for it in the step that just
                ran (accepted drafts then the target's own token); empty for a row the engine
                asks no draft for (still prefilling, finished, or at its length limit). None
                with ``rids``: every row drafts, and a request's committed tokens are what its
                history gained since this proposer last saw its id.
            rids: per row, the engine's request id (None: rows are matched by history).

        Returns:
            ``DraftTree`` of ``[B, N]`` tensors: per row ``num_nodes[b]`` draft tokens with
            their parents (-1: the root); on chain engines each row is a chain.
        """
        if rids is not None and len(rids) != len(histories):
            raise ValueError(f"{len(histories)} histories but {len(rids)} request ids")
        rows = [list(h) for h in histories]
        if committed is None:
            if rids is None:
                raise ValueError("committed tokens are needed where rows have no request ids")
            committed = self._committed_since(rows, list(rids))
        if len(histories) != len(committed):
            raise ValueError(f"{len(histories)} histories but {len(committed)} committed lists")
        done = [list(c) for c in committed]
        active = [bool(c) and bool(h) for h, c in zip(rows, done)]
        if not any(active):
            self.reset()
            return _empty_tree(len(rows))
        now = time.perf_counter()
        sources = self._sources(rows, done, None if rids is None else list(rids))
        self._follow_drain(sources)
        self._born = [len(r) if s is None else self._born[s] for r, s in zip(rows, sources)]
        if all(s is None for s in sources):
            # a prompt of one token still has a root; the drafter sees the rest as context
            self.session.start([r[:-1] for r in rows])
            self.restarts += 1
        else:
            kept = True
            if sources != list(range(len(self._rows or []))):
                # requests joined, left or moved: rows that go on keep their drafter state
                # (drafters that cannot move it restart, and observe nothing of this step)
                kept = self.session.regroup(sources, [r[:-1] for r in rows])
                self.regroups += 1
            if (self._scored is not None and None not in sources and all(done)
                    and not self.scores_every_slot):
                # the engine's step scored our drafts and nothing else (no new prefill)
                self.speculator.cost.observe(max(1, self._scored), now - self._returned_at)
            if kept:
                self._accept(sources, rows, done)
        limits = [self._limit(r) if a else 0 for r, a in zip(rows, active)]
        drafting = None
        cost = None if self.scores_every_slot else self.speculator.cost
        if self.draining and sum(active) > 1 and cost is not None:
            last = self._last_to_finish(rows, active)
            limits = [n if b in last else 0 for b, n in enumerate(limits)]
            # a padded engine scores every row as wide as the drafting ones
            drafting = None if self.pads_rows else len(last)
            self.drain_steps += 1
        tree, _ = self.session.propose(rows, active, limits, self.vocab_size,
                                       sampling=self.sampling,
                                       cost=None if cost is None else
                                       batch_view(cost, sum(active), drafting))
        self._rows, self._rids, self._tree = rows, None if rids is None else list(rids), tree
        counts = tree.num_nodes.tolist()
        if self.pads_rows:
            self._scored = len(counts) * (max(counts, default=0) + 1)
        else:
            self._scored = sum(n + 1 for n, a in zip(counts, active) if a)
        self._returned_at = time.perf_counter()
        return tree

    def _committed_since(self, rows: list[list[int]], rids: list[Any]) -> list[list[int]]:
        """Per row, the tokens its history gained since last step's row of the same id (just
        the root for an id not seen, or one whose history did not grow)."""
        seen = dict(zip(self._rids or [], (len(r) for r in self._rows or [])))
        return [r[seen[rid]:] if 0 < seen.get(rid, 0) < len(r) else r[-1:]
                for r, rid in zip(rows, rids)]

    def _accept(self, sources: list[int | None], rows: list[list[int]],
                done: list[list[int]]) -> None:
        outcome = StepOutcome(accepted=[c[:-1] for c in done],
                              bonus=[c[-1] if c else None for c in done], tokens=rows)
        if not self.trees or self._tree is None:
            self.session.accept(outcome)  # a chain's accepted nodes are its first ones
            return
        paths = [accepted_path(self._tree, s, c[:-1]) if s is not None else []
                 for s, c in zip(sources, done)]
        width = max((len(p) for p in paths), default=0)
        nodes = torch.full((len(rows), width), -1, dtype=torch.long)
        for b, p in enumerate(paths):
            nodes[b, :len(p)] = torch.tensor(p, dtype=torch.long)
        self.session.accept(outcome, accepted_nodes=nodes,
                            num_accepted=torch.tensor([len(p) for p in paths], dtype=torch.long))

    def _follow_drain(self, sources: list[int | None]) -> None:
        """Update ``draining`` from this step's rows against last step's: requests that left
        with none joining start a drain; a request that joins ends it. A fresh batch after
        the engine emptied keeps what the last one did (the same traffic, most likely)."""
        if all(s is None for s in sources):
            return
        joined = sum(s is None for s in sources)
        left = len(self._rows or []) - (len(sources) - joined)
        if joined:
            self.draining = False
        elif left:
            self.draining = True

    def _last_to_finish(self, rows: list[list[int]], active: list[bool]) -> set[int]:
        """The active rows with the fewest output tokens (or one more): with alike requested
        lengths, the rows a draining batch waits for. A row further ahead finishes sooner
        whatever it drafts, and that saves only its share of the steps after, which is what
        each of its draft tokens costs now."""
        out = {b: len(r) - self._born[b] for b, (r, a) in enumerate(zip(rows, active)) if a}
        fewest = min(out.values())
        return {b for b, n in out.items() if n <= fewest + self.DRAIN_SLACK}

    def _limit(self, row: list[int]) -> int:
        if self.max_context is None:
            return self.k
        return max(0, min(self.k, self.max_context - len(row) - 1))

    def _sources(self, rows: list[list[int]], done: list[list[int]],
                 rids: list[Any] | None = None) -> list[int | None]:
        """Per row, the index of last step's row that is the same request going on (its
        history was that row's history and this step committed ``done`` after it), or None
        for a request the drafter has not seen. With request ids a row is the request of
        that id, if its history goes on from where it was; without them matching by history
        holds for any engine, however it reorders its rows."""
        prev = self._rows or []
        if rids is not None and self._rids is not None:
            where = {rid: i for i, rid in enumerate(self._rids)}
            out: list[int | None] = []
            for r, c, rid in zip(rows, done, rids):
                i = where.pop(rid, None)
                out.append(i if i is not None and len(prev[i]) == len(r) - len(c) else None)
            return out
        by_end: dict[tuple[int, int], list[int]] = {}
        for i, p in enumerate(prev):
            if p:
                by_end.setdefault((len(p), p[-1]), []).append(i)
        sources: list[int | None] = []
        for r, c in zip(rows, done):
            n = len(r) - len(c)
            found = None
            if n > 0 and r[n:] == c:
                olds = by_end.get((n, r[n - 1]), [])
                for j, i in enumerate(olds):
                    if prev[i] == r[:n]:
                        found = olds.pop(j)
                        break
            sources.append(found)
        return sources


class ChainProposer(ServingProposer):
    """``ServingProposer`` for engines that verify chains (vLLM): one list of draft tokens per
    row. Same arguments, without ``trees`` and ``max_nodes``."""

    def __init__(self, config: SpecConfig, vocab_size: int, max_context: int | None = None,
                 target: Any = None, media_tokens: frozenset[int] = frozenset(),
                 engine: str = "this engine"):
        super().__init__(config, vocab_size, max_context, target, media_tokens, engine)

    def propose(self, histories: Sequence[Sequence[int]], committed: Sequence[Sequence[int]],
                ) -> list[list[int]]:
        """Per row, up to ``num_speculative_tokens`` draft tokens (empty: no draft); the
        arguments are ``ServingProposer.draft``'s."""
        tree = self.draft(histories, committed)
        return [tree.tokens[b, :n].tolist() for b, n in enumerate(tree.num_nodes.tolist())]


def accepted_path(tree: DraftTree, row: int, accepted: Sequence[int]) -> list[int]:
    """The node indices of row ``row`` of ``tree`` that spell ``accepted`` from the root (the
    first matching child at each depth); it stops where the tree has no such node (an engine
    that accepted one of its own padding tokens)."""
    n = int(tree.num_nodes[row])
    tokens, parents = tree.tokens[row, :n].tolist(), tree.parents[row, :n].tolist()
    path, at = [], -1
    for token in accepted:
        nxt = next((i for i in range(n) if parents[i] == at and tokens[i] == token), None)
        if nxt is None:
            break
        path.append(nxt)
        at = nxt
    return path


def _empty_tree(rows: int) -> DraftTree:
    empty = torch.zeros(rows, 0, dtype=torch.long)
    return DraftTree(tokens=empty, parents=empty.clone(),
                     num_nodes=torch.zeros(rows, dtype=torch.long))
