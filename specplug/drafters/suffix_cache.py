"""A bounded cross-request n-gram cache: finished sequences as a source of drafts.

The ``ngram`` drafter looks up the last n-gram of a row in that row's own text. This cache
extends the lookup to text seen in *earlier* requests served by the same drafter (the
non-parametric counterpart of training a drafter at test time, as in SuffixDecoding): a
finished sequence (prompt + generated tokens) is stored whole, and every n-gram in it
(``nmin <= n <= nmax``) is indexed to the positions that followed it.

Design:

- **Index.** ``n-gram -> [(sequence id, continuation start), ...]``, one dict for all n (the
  key's length is n). Entries are appended in the order sequences are added, so each list is
  oldest first and its last entries are the most recent occurrences.
- **Bounded memory, FIFO eviction.** At most ``max_tokens`` tokens are kept (a longer sequence
  keeps its last ``max_tokens``). Adding a sequence evicts the oldest ones until the total fits.
  Evicting walks the evicted sequence's own n-grams and removes its entries, which are a prefix
  of each list (it is the oldest); emptied lists are deleted. No full rebuild, and a sequence of
  ``L`` tokens holds at most ``(L - 1) * (nmax - nmin + 1)`` entries, so the index holds at most
  ``max_tokens * (nmax - nmin + 1)`` entries (and no more keys than entries).
- **Lookup** mirrors the drafter's own: the longest n-gram ending at the end of the context,
  the ``max_matches`` most recent occurrences, each with its matching context length (as
  ``specplug.drafters.ngram.context_length``: the n-gram itself counts, up to 32 tokens).
"""

from __future__ import annotations

MAX_CONTEXT = 32  # how far back an occurrence's matching context is measured


def match_length(seq: list[int], start: int, context: list[int], cap: int = MAX_CONTEXT) -> int:
    """How many tokens before ``seq[start]`` equal the last tokens of ``context`` (at most
    ``cap``). ``match_length(toks, s, toks)`` equals ``ngram.context_length(toks, s)``."""
    n, end = 0, len(context)
    while n < cap and n < start and n < end and seq[start - 1 - n] == context[end - 1 - n]:
        n += 1
    return n


class SuffixCache:
    """Finished sequences, indexed by their n-grams, at most ``max_tokens`` tokens in all.

    Args:
        max_tokens: tokens kept over all stored sequences (oldest sequences are evicted).
        nmin, nmax: the n-gram lengths indexed (as the drafter's ``prompt_lookup_min/max``).
    """

    def __init__(self, max_tokens: int, nmin: int, nmax: int):
        if max_tokens < 1 or not 1 <= nmin <= nmax:
            raise ValueError(f"need max_tokens >= 1 and 1 <= nmin <= nmax, got "
                             f"{max_tokens}, {nmin}, {nmax}")
        self.max_tokens, self.nmin, self.nmax = max_tokens, nmin, nmax
        self._seqs: dict[int, list[int]] = {}  # id -> tokens, oldest first (insertion order)
        self._index: dict[tuple[int, ...], list[tuple[int, int]]] = {}
        self._next_id = 0
        self._tokens = 0
        self._entries = 0

    @property
    def num_tokens(self) -> int:
        """Tokens stored over all sequences (``<= max_tokens``)."""
        return self._tokens

    @property
    def num_sequences(self) -> int:
        return len(self._seqs)

    @property
    def num_index_entries(self) -> int:
        """(n-gram, occurrence) entries in the index (``<= max_tokens * (nmax - nmin + 1)``)."""
        return self._entries

    def _ngrams(self, seq: list[int]):
        """Every indexed ``(n-gram, continuation start)`` of ``seq``, in position order."""
        for t in range(1, len(seq)):
            for n in range(self.nmin, min(self.nmax, t) + 1):
                yield tuple(seq[t - n:t]), t

    def add(self, tokens: list[int]) -> None:
        """Store one finished sequence (prompt + generated tokens; its last ``max_tokens``
        if longer), evicting the oldest sequences while more than ``max_tokens`` are stored.
        A sequence too short to hold an n-gram with a continuation is not stored."""
        seq = list(tokens[-self.max_tokens:])
        if len(seq) <= self.nmin:
            return
        sid, self._next_id = self._next_id, self._next_id + 1
        self._seqs[sid] = seq
        self._tokens += len(seq)
        for key, t in self._ngrams(seq):
            self._index.setdefault(key, []).append((sid, t))
            self._entries += 1
        while self._tokens > self.max_tokens:
            self._evict_oldest()

    def _evict_oldest(self) -> None:
        sid = next(iter(self._seqs))
        seq = self._seqs.pop(sid)
        self._tokens -= len(seq)
        for key, _ in self._ngrams(seq):
            entries = self._index.get(key)
            if not entries or entries[0][0] != sid:
                continue  # this n-gram's entries for ``sid`` were removed at its first visit
            k = 1
            while k < len(entries) and entries[k][0] == sid:
                k += 1
            self._entries -= k
            if k == len(entries):
                del self._index[key]
            else:
                del entries[:k]

    def lookup(self, context: list[int], max_matches: int, limit: int,
               longer_than: int = 0) -> tuple[int, list[tuple[int, list[int]]]]:
        """Continuations of the longest stored n-gram ending at the end of ``context``.

        Args:
            context: the tokens so far (the n-gram is its last n tokens).
            max_matches: how many occurrences to return, the most recent first.
            limit: the longest continuation returned per occurrence.
            longer_than: only n-grams longer than this are tried (the caller already has
                a match of this length elsewhere).

        Returns:
            ``(n, [(context_length, continuation), ...])``: the n-gram length and, per
            occurrence (most recent first), how many tokens before it match the end of
            ``context`` (the n-gram included, up to 32) and the up to ``limit`` tokens that
            followed it (at least one unless ``limit`` is 0). ``(0, [])`` without a match.
        """
        for n in range(min(self.nmax, len(context)), max(self.nmin, longer_than + 1) - 1, -1):
            entries = self._index.get(tuple(context[-n:]))
            if entries:
                out = []
                for sid, start in reversed(entries[-max_matches:]):
                    seq = self._seqs[sid]
                    out.append((match_length(seq, start, context), seq[start:start + limit]))
                return n, out
        return 0, []
