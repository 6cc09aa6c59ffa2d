"""Benchmark prompts in the MT-bench question format."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from specplug.errors import InputFileError, read_text

__all__ = ["Question", "load_questions"]


@dataclass(frozen=True)
class Question:
    """One question: ``turns`` are user turns; later turns follow the model's own answers."""

    question_id: int | str
    category: str
    turns: tuple[str, ...]


def load_questions(path: str | Path, limit: int | None = None,
                   categories: list[str] | None = None) -> list[Question]:
    """Read JSONL (``question_id``, ``category``, ``turns``); ``limit`` keeps the first N
    questions of each category.

    Raises:
        InputFileError: the file is missing or unreadable, or naming the line and the
            missing or malformed field.
    """
    out: list[Question] = []
    seen: dict[str, int] = {}
    for n, line in enumerate(read_text(path, "prompts file").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputFileError(f"{path}:{n}: not JSON ({err})") from None
        for key in ("question_id", "category", "turns"):
            if not isinstance(obj, dict) or key not in obj:
                raise InputFileError(f"{path}:{n}: missing field {key!r} (MT-bench format: "
                                     "question_id, category, turns)")
        turns = obj["turns"]
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t
                                                               for t in turns):
            raise InputFileError(f"{path}:{n}: 'turns' must be a non-empty list of strings")
        cat = str(obj["category"])
        if categories and cat not in categories:
            continue
        if limit is not None and seen.get(cat, 0) >= limit:
            continue
        seen[cat] = seen.get(cat, 0) + 1
        out.append(Question(obj["question_id"], cat, tuple(turns)))
    if not out:
        raise InputFileError(f"{path}: no questions selected")
    return out
