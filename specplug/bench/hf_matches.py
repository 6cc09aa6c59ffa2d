"""Benchmark instrumentation for transformers' assisted decoding: accepted drafts per step."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

__all__ = ["record_matches"]


@contextlib.contextmanager
def record_matches(into: list[int]) -> Iterator[None]:
    """While active, every assisted-decoding step of any candidate generator (transformers'
    own and specplug's ``assistant_model``) appends its number of accepted draft tokens to
    ``into``. The wrap is removed on exit, so nothing is patched outside a measurement."""
    from transformers.generation.utils import GenerationMixin

    from specplug.adapters.hf_assisted import install

    install()  # specplug's assistant route first, so it is recorded too
    current = GenerationMixin._get_candidate_generator

    def _get_candidate_generator(self: Any, *args: Any, **kwargs: Any) -> Any:
        generator = current(self, *args, **kwargs)
        update = generator.update_candidate_strategy

        def update_candidate_strategy(input_ids: Any, scores: Any, num_matches: int) -> None:
            into.append(int(num_matches))
            update(input_ids, scores, num_matches)

        generator.update_candidate_strategy = update_candidate_strategy
        return generator

    GenerationMixin._get_candidate_generator = _get_candidate_generator
    try:
        yield
    finally:
        GenerationMixin._get_candidate_generator = current
