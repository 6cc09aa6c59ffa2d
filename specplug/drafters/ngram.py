"""``ngram``: prompt lookup over prompt + generated text (no model, no training).

An incremental index maps every n-gram (``prompt_lookup_min <= n <= prompt_lookup_max``) to the
positions that followed it. Each step the longest n-gram ending at the last token is looked up;
the continuations of its ``max_matches`` most recent occurrences are merged into a trie. A chain
follows the occurrence whose preceding context matches the current one longest (measured up to
32 tokens back, past the n-gram itself: in text that alternates, "A x B x A x", only the
occurrence one period back predicts what follows ``x``), then the continuation most occurrences
agree on, then the most recent; a tree proposes the competing continuations as branches.

With ``SpecConfig.adaptive`` (the default) the draft length is chosen each step: the drafter
keeps the acceptance rate of its drafts for each kind of match (context length, agreeing
occurrences) over its lifetime, corrects it per row by what this request accepted against what
that estimate predicted (``specplug.budget.RequestCorrection``: a request whose drafts keep
missing stops drafting within a few steps), shrinks the row's own counts for the kind toward
that, and drafts the
length that maximises expected tokens per unit of target time under the engine's measured
cost curve (``specplug.cost``). On a CPU where scoring more tokens is expensive, weak matches
get short drafts or none; where scoring is nearly free (a GPU), the same rule drafts up to
``num_speculative_tokens``.

With ``suffix_cache_tokens > 0`` the drafter also remembers earlier requests
(``specplug.drafters.suffix_cache``): when a row's own text has no match, or only a shorter
n-gram than the cache has, the cache's continuations are drafted instead, and their acceptance is
learnt as separate kinds of match. A row's text enters the cache when the next generation starts.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from specplug.budget import RequestCorrection, best_depth, expected_accepted
from specplug.drafters.base import (
    EMPTY,
    Candidates,
    DraftContext,
    Drafter,
    DrafterOptions,
    FrontierItem,
    StepOutcome,
)
from specplug.drafters.suffix_cache import MAX_CONTEXT, SuffixCache
from specplug.hookspecs import hookimpl
from specplug.types import regroup_rows


class NgramOptions(DrafterOptions):
    prompt_lookup_min: int = Field(1, ge=1, le=16)
    prompt_lookup_max: int = Field(4, ge=1, le=16)
    max_matches: int = Field(8, ge=1, le=256)
    suffix_cache_tokens: int = Field(0, ge=0, le=10_000_000)  # across requests; 0 = off

    @model_validator(mode="after")
    def _order(self) -> NgramOptions:
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"prompt_lookup_min ({self.prompt_lookup_min}) must be <= "
                             f"prompt_lookup_max ({self.prompt_lookup_max})")
        return self


class _Trie:
    """Merged continuations. A child's rank is that of the best occurrence through it
    (occurrences are inserted best first), so the chain follows the occurrence whose
    preceding context matches longest, then the majority, then the most recent."""

    __slots__ = ("count", "context", "rank", "children")

    def __init__(self, context: int = 0, rank: int = 0):
        self.count = 0
        self.context = context
        self.rank = rank
        self.children: dict[int, _Trie] = {}

    def insert(self, seq: list[int], context: int, rank: int) -> None:
        node = self
        for t in seq:
            child = node.children.get(t)
            if child is None:
                child = node.children[t] = _Trie(context, rank)
            child.count += 1
            node = child

    def candidates(self, k: int) -> Candidates:
        if not self.children:
            return EMPTY
        ranked = sorted(self.children.items(),
                        key=lambda kv: (-kv[1].context, -kv[1].count, kv[1].rank))[:k]
        total = sum(c.count for c in self.children.values())
        return Candidates(tokens=[t for t, _ in ranked],
                          probs=[c.count / total for _, c in ranked],
                          handles=[c for _, c in ranked])


class _RowIndex:
    """n-gram -> continuation start positions, for one row, grown incrementally. n-grams that
    hold a ``media`` token (an image placeholder) are never indexed, nor are continuations that
    start with one: lookup never matches across an image."""

    def __init__(self, nmin: int, nmax: int, media: frozenset[int] = frozenset()):
        self.nmin, self.nmax, self.media = nmin, nmax, media
        self.tables: dict[int, dict[tuple[int, ...], list[int]]] = {
            n: {} for n in range(nmin, nmax + 1)}
        self.upto = 0
        self.last_media = -1  # index of the latest media token before ``upto``

    def extend(self, tokens: list[int]) -> None:
        media = self.media
        for t in range(max(self.upto, 1), len(tokens)):
            if tokens[t - 1] in media:
                self.last_media = t - 1
            if tokens[t] in media:
                continue
            for n, table in self.tables.items():
                if t - n > self.last_media and t - n >= 0:
                    table.setdefault(tuple(tokens[t - n:t]), []).append(t)
        self.upto = len(tokens)

    def lookup(self, tokens: list[int], max_matches: int) -> tuple[int, list[int]]:
        """``(n, continuation starts)`` for the longest matching n-gram, most recent first."""
        for n in range(self.nmax, self.nmin - 1, -1):
            if len(tokens) < n:
                continue
            starts = self.tables[n].get(tuple(tokens[-n:]))
            if starts:
                return n, starts[-max_matches:][::-1]
        return 0, []


def context_length(tokens: list[int], start: int, cap: int = MAX_CONTEXT,
                   media: frozenset[int] = frozenset()) -> int:
    """How many tokens before ``start`` equal the last tokens of ``tokens`` (at most ``cap``;
    ``MAX_CONTEXT``: how far back an occurrence's matching context is measured), stopping at a
    ``media`` token (two images' placeholders are equal ids, not equal context)."""
    n, end = 0, len(tokens)
    while n < cap and n < start and tokens[start - 1 - n] == tokens[end - 1 - n] \
            and tokens[start - 1 - n] not in media:
        n += 1
    return n


def text_before_media(seq: list[int], media: frozenset[int]) -> list[int]:
    """``seq`` up to its first ``media`` token (a draft never proposes an image)."""
    if media:
        for i, t in enumerate(seq):
            if t in media:
                return seq[:i]
    return seq


def text_segments(seq: list[int], media: frozenset[int]) -> list[list[int]]:
    """The maximal runs of ``seq`` without ``media`` tokens."""
    if not media:
        return [seq]
    out: list[list[int]] = [[]]
    for t in seq:
        if t in media:
            if out[-1]:
                out.append([])
        else:
            out[-1].append(t)
    return [s for s in out if s]


def _context_bucket(n: int) -> int:
    """Coarse context-length classes for acceptance statistics: 1 2 3 4 5-7 8-15 16+."""
    return n if n <= 4 else 5 if n < 8 else 6 if n < 16 else 7


CACHE_KIND = 4  # added to a cache match's agreement class: its acceptance is learnt apart


class _Acceptance:
    """Acceptance of past drafts, by match kind: ``(context-length class, agreeing
    occurrences)``, the latter plus ``CACHE_KIND`` for matches from the suffix cache.

    Three levels, each shrunk toward the one above: the drafter's lifetime estimate per kind
    (under a Beta(1, 1) prior); that times the row's ``RequestCorrection`` factor (how this
    request's drafts of every kind fared against their lifetime estimates, so a kind the
    request has not drafted yet starts from what the request did with the others); and the
    row's own counts for the kind in this request. When a kind is matched but not drafted, its
    request counts decay, so a request that stopped drafting retries later (text that starts
    repeating itself must not stay undrafted).
    """

    REQUEST_WEIGHT = 4.0  # pseudo-observations the estimate above is worth in a request
    IDLE_DECAY = 0.9  # request counts kept per step a matched kind is not drafted

    def __init__(self) -> None:
        self.lifetime: dict[tuple[int, int], list[float]] = {}
        self.request: dict[tuple[int, tuple[int, int]], list[float]] = {}  # (row, kind)

    def prior(self, kind: tuple[int, int]) -> float:
        """The lifetime estimate for ``kind``."""
        gs, gf = self.lifetime.get(kind, (0.0, 0.0))
        return (gs + 1.0) / (gs + gf + 2.0)

    def rate(self, row: int, kind: tuple[int, int], factor: float = 1.0) -> float:
        """Row ``row``'s estimate for ``kind``, its request correction being ``factor``."""
        above = min(0.99, self.prior(kind) * factor)
        rs, rf = self.request.get((row, kind), (0.0, 0.0))
        return (rs + self.REQUEST_WEIGHT * above) / (rs + rf + self.REQUEST_WEIGHT)

    def update(self, row: int, kind: tuple[int, int], accepted: int, drafted: int) -> None:
        failed = 1.0 if accepted < drafted else 0.0
        for table, key in ((self.lifetime, kind), (self.request, (row, kind))):
            s, f = table.setdefault(key, [0.0, 0.0])
            table[key] = [s + accepted, f + failed]

    def idle(self, row: int, kind: tuple[int, int]) -> None:
        if (row, kind) in self.request:
            self.request[row, kind] = [c * self.IDLE_DECAY for c in self.request[row, kind]]


class NgramDrafter(Drafter):
    """Prompt-lookup drafter; deterministic (verified as one-hot drafts)."""

    name = "ngram"
    Options = NgramOptions
    #: a cap, not a length: the adaptive rule drafts what pays under the measured cost curve,
    #: which ``specplug.calibration.calibrate`` times up to 32 scored tokens. Where that curve is
    #: flat beyond 16 (Gemma-3-270M on 2 cores: 32 tokens cost 1.2x 16) loops and copies go
    #: twice as far per step (``docs/adaptive.md``).
    default_num_speculative_tokens = 32

    def __init__(self, options: NgramOptions | None = None,
                 max_depth: int = default_num_speculative_tokens):
        super().__init__(options)
        self.max_depth = max_depth
        self.rows: list[_RowIndex] = []
        self.acceptance = _Acceptance()
        self.drafted: list[tuple[tuple[int, int], int]] = []  # per row: (match kind, depth)
        #: per row of the current requests: their drafts' acceptance against the estimate
        self.correction = RequestCorrection()
        self.predicted: list[float] = []  # per row: accepted tokens the last draft expected
        o = self.options
        self.cache = (SuffixCache(o.suffix_cache_tokens, o.prompt_lookup_min, o.prompt_lookup_max)
                      if o.suffix_cache_tokens else None)
        self.history: list[list[int]] = []  # per row: its latest tokens (cached at next start)

    @classmethod
    def from_config(cls, config: Any, target: Any = None) -> NgramDrafter:
        return cls(config.drafter_options, max_depth=config.max_depth)

    def start(self, prompts: list[list[int]]) -> None:
        if self.cache is not None:
            for seq in self.history:
                # a row that a new prompt extends is the same request going on (an engine
                # restarting its batch): it is cached once it has ended, never while it runs
                n = len(seq)
                if n and not any(len(p) >= n and p[n - 1] == seq[-1] and p[:n] == seq
                                 for p in prompts):
                    for text in text_segments(seq, self.media_tokens):
                        self.cache.add(text)
            self.history = list(prompts)
        o = self.options
        self.rows = [_RowIndex(o.prompt_lookup_min, o.prompt_lookup_max, self.media_tokens)
                     for _ in prompts]
        self.acceptance.request = {}
        self.correction.start(len(prompts))

    def regroup(self, sources: list[int | None], prompts: list[list[int]]) -> bool:
        """Rows that go on keep their index, request counts, correction and last draft; new
        rows start fresh; rows that left are requests that ended (cached, with a cache)."""
        kept = {s for s in sources if s is not None}
        if self.cache is not None:
            for old, seq in enumerate(self.history):
                if old not in kept and seq:
                    for text in text_segments(seq, self.media_tokens):
                        self.cache.add(text)
            self.history = [self.history[s] if s is not None and s < len(self.history) else p
                            for s, p in zip(sources, prompts)]  # a new row: its prompt
        o = self.options
        self.rows = regroup_rows(self.rows, sources, lambda: _RowIndex(
            o.prompt_lookup_min, o.prompt_lookup_max, self.media_tokens))
        where = {s: i for i, s in enumerate(sources) if s is not None}
        self.acceptance.request = {(where[row], kind): counts for (row, kind), counts
                                   in self.acceptance.request.items() if row in where}
        self.correction.regroup(sources)
        self.drafted = regroup_rows(self.drafted, sources, lambda: ((0, 0), 0))
        self.predicted = regroup_rows(self.predicted, sources, float)
        return True

    def begin(self, ctx: DraftContext) -> list[Any]:
        if len(self.rows) != len(ctx.tokens):
            self.start(ctx.tokens)
        roots: list[Any] = []
        self.drafted, self.predicted = [], []
        for b, (row, toks, active) in enumerate(zip(self.rows, ctx.tokens, ctx.active)):
            trie, kind, depth, base = _Trie(), (0, 0), 0, 0.0
            if active:
                row.extend(toks)
                limit = self.max_depth
                matches, offset = self._matches(row, toks)
                if matches:
                    # best occurrence first: longest matching context, then most recent
                    ranked = sorted(((context, -r, cont)
                                     for r, (context, cont) in enumerate(matches)), reverse=True)
                    first = ranked[0][2][0]
                    agree = sum(1 for _, _, cont in ranked if cont[0] == first)
                    kind = (_context_bucket(ranked[0][0]), min(agree, 3) + offset)
                    if ctx.adaptive:
                        base = self.acceptance.prior(kind)
                        rate = self.acceptance.rate(b, kind, self.correction.factor(b))
                        limit = best_depth(rate, limit, ctx.cost)
                        if limit == 0:
                            self.acceptance.idle(b, kind)
                            self.correction.idle(b)
                    for rank, (context, _, cont) in enumerate(ranked):
                        cont = cont[:limit]
                        depth = max(depth, len(cont))
                        trie.insert(cont, context, rank)
            roots.append(trie)
            self.drafted.append((kind, depth))
            # what the lifetime estimate predicted, for this request's correction
            self.predicted.append(expected_accepted(base, depth))
        return roots

    def _matches(self, row: _RowIndex, toks: list[int]) -> tuple[list[tuple[int, list[int]]], int]:
        """``([(context length, continuation), ...] most recent first, kind offset)`` from the
        row's own text, or from the suffix cache when it has a longer n-gram."""
        depth, mm = self.max_depth, self.options.max_matches
        n, starts = row.lookup(toks, mm)
        media = self.media_tokens
        if self.cache is not None and n < self.options.prompt_lookup_max:
            # the cache holds text only (``text_segments``): no key or continuation with media
            n_cache, cached = self.cache.lookup(toks, mm, depth, longer_than=n)
            if n_cache:
                return cached, CACHE_KIND
        return [(context_length(toks, s, media=media),
                 text_before_media(toks[s:s + depth], media)) for s in starts], 0

    def observe(self, outcome: StepOutcome) -> None:
        if self.cache is not None:
            self.history = list(outcome.tokens)
        for b, ((kind, depth), accepted) in enumerate(zip(self.drafted, outcome.accepted)):
            if depth:
                self.acceptance.update(b, kind, len(accepted), depth)
                if self.predicted[b]:
                    self.correction.observe(b, len(accepted), self.predicted[b])

    def expand(self, frontier: list[list[FrontierItem]], k: int) -> list[list[Candidates]]:
        return [[item.handle.candidates(k) for item in row] for row in frontier]


@hookimpl
def specplug_register_drafters(register):
    register(NgramDrafter)
