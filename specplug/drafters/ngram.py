"""``ngram``: prompt lookup over prompt + generated text (no model, no training).

An incremental index maps every n-gram (``prompt_lookup_min <= n <= prompt_lookup_max``) to the
positions that followed it. Each step the longest n-gram ending at the last token is looked up;
the continuations of its ``max_matches`` most recent occurrences are merged into a trie, so a
chain follows the continuation most occurrences agree on and a tree proposes the competing ones
as branches (ranked by how many occurrences support them, then by recency).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from specplug.drafters.base import (
    EMPTY,
    Candidates,
    DraftContext,
    Drafter,
    DrafterOptions,
    FrontierItem,
)
from specplug.hookspecs import hookimpl


class NgramOptions(DrafterOptions):
    prompt_lookup_min: int = Field(1, ge=1, le=16)
    prompt_lookup_max: int = Field(4, ge=1, le=16)
    max_matches: int = Field(8, ge=1, le=256)

    @model_validator(mode="after")
    def _order(self) -> NgramOptions:
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"prompt_lookup_min ({self.prompt_lookup_min}) must be <= "
                             f"prompt_lookup_max ({self.prompt_lookup_max})")
        return self


class _Trie:
    __slots__ = ("count", "rank", "children")

    def __init__(self, rank: int = 0):
        self.count = 0
        self.rank = rank
        self.children: dict[int, _Trie] = {}

    def insert(self, seq: list[int], rank: int) -> None:
        node = self
        for t in seq:
            child = node.children.get(t)
            if child is None:
                child = node.children[t] = _Trie(rank)
            child.count += 1
            node = child

    def candidates(self, k: int) -> Candidates:
        if not self.children:
            return EMPTY
        ranked = sorted(self.children.items(), key=lambda kv: (-kv[1].count, kv[1].rank))[:k]
        total = sum(c.count for c in self.children.values())
        return Candidates(tokens=[t for t, _ in ranked],
                          probs=[c.count / total for _, c in ranked],
                          handles=[c for _, c in ranked])


class _RowIndex:
    """n-gram -> continuation start positions, for one row, grown incrementally."""

    def __init__(self, nmin: int, nmax: int):
        self.nmin, self.nmax = nmin, nmax
        self.tables: dict[int, dict[tuple[int, ...], list[int]]] = {
            n: {} for n in range(nmin, nmax + 1)}
        self.upto = 0

    def extend(self, tokens: list[int]) -> None:
        for t in range(max(self.upto, 1), len(tokens)):
            for n, table in self.tables.items():
                if t - n >= 0:
                    table.setdefault(tuple(tokens[t - n:t]), []).append(t)
        self.upto = len(tokens)

    def lookup(self, tokens: list[int], max_matches: int) -> list[int]:
        for n in range(self.nmax, self.nmin - 1, -1):
            if len(tokens) < n:
                continue
            starts = self.tables[n].get(tuple(tokens[-n:]))
            if starts:
                return starts[-max_matches:][::-1]  # most recent first
        return []


class NgramDrafter(Drafter):
    """Prompt-lookup drafter; deterministic (verified as one-hot drafts)."""

    name = "ngram"
    Options = NgramOptions

    def __init__(self, options: NgramOptions | None = None, max_depth: int = 16):
        super().__init__(options)
        self.max_depth = max_depth
        self.rows: list[_RowIndex] = []

    @classmethod
    def from_config(cls, config: Any, target: Any = None) -> NgramDrafter:
        return cls(config.drafter_options, max_depth=config.max_depth)

    def start(self, prompts: list[list[int]]) -> None:
        o = self.options
        self.rows = [_RowIndex(o.prompt_lookup_min, o.prompt_lookup_max) for _ in prompts]

    def begin(self, ctx: DraftContext) -> list[Any]:
        if len(self.rows) != len(ctx.tokens):
            self.start(ctx.tokens)
        roots: list[Any] = []
        for row, toks, active in zip(self.rows, ctx.tokens, ctx.active):
            trie = _Trie()
            if active:
                row.extend(toks)
                for rank, s in enumerate(row.lookup(toks, self.options.max_matches)):
                    trie.insert(toks[s:s + self.max_depth], rank)
            roots.append(trie)
        return roots

    def expand(self, frontier: list[list[FrontierItem]], k: int) -> list[list[Candidates]]:
        return [[item.handle.candidates(k) for item in row] for row in frontier]


@hookimpl
def specplug_register_drafters(register):
    register(NgramDrafter)
