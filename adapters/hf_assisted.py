"""Hugging Face route 1: a specplug drafter inside transformers' own assisted decoding.

``model.generate(**inputs, assistant_model=specplug.hf.assistant(model, method="ngram"))`` runs
a specplug chain drafter in transformers' loop (batch 1, chains); transformers verifies.
transformers 5.x has no public hook for a custom candidate generator, so specplug wraps
``GenerationMixin._get_candidate_generator``: when ``assistant_model`` is a specplug
``Assistant`` it returns specplug's ``CandidateGenerator``, otherwise it calls the original.
This seam is private, so it is guarded by version (``SUPPORTED``) and tested per release (the
oldest and newest the ``hf`` extra admits). The drafting itself is ``specplug.session``'s
``DraftSession``; this module translates transformers' calls into it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import transformers
from packaging.version import Version
from transformers.generation.candidate_generator import CandidateGenerator
from transformers.generation.utils import GenerationMixin

from specplug.adapters.hf_options import sampling_from
from specplug.config import SpecConfig, build_spec
from specplug.drafters.base import StepOutcome
from specplug.engine import Speculator
from specplug.online.observer import VerifyRecord, teacher_topk
from specplug.sampling import SamplingParams
from specplug.session import DraftSession, Route, check_route, check_speculator

__all__ = ["ASSISTED", "SUPPORTED", "Assistant", "assistant", "install"]

#: transformers versions whose private ``_get_candidate_generator`` seam is known to work
SUPPORTED = (Version("5.23"), Version("5.25"))  # the same range as the hf extra

#: transformers' assisted decoding as a route: chains, no hidden states, no end-of-generation
ASSISTED = Route("transformers' assisted decoding", trees=False, hidden_states=False,
                 ends_generations=False)

def _check_version() -> None:
    v = Version(transformers.__version__)
    if not (SUPPORTED[0] <= v < SUPPORTED[1]):
        raise RuntimeError(
            f"specplug's assistant_model route supports transformers >= {SUPPORTED[0]}, "
            f"< {SUPPORTED[1]} (tested on 5.23 and 5.24); found {v}. Use specplug.hf.generate(...), "
            "which does not depend on transformers' private candidate-generator seam."
        )


class Assistant:
    """What ``specplug.hf.assistant`` returns; pass it as ``assistant_model=``.

    Duck-typed to what ``generate`` inspects on an assistant before it asks for a candidate
    generator: ``config`` (the target's, so the vocabulary check passes), ``device`` and
    ``generation_config``.
    """

    def __init__(self, target: Any, config: SpecConfig):
        check_route(config, ASSISTED)
        self.spec = config
        self.target = target
        self.config = target.config
        self.device = target.device
        self.generation_config = copy.deepcopy(target.generation_config)
        self.speculator = Speculator.from_config(config, target)
        check_speculator(self.speculator, ASSISTED)  # what the loop cannot feed, up front

    def candidate_generator(self, generation_config: Any) -> CandidateGenerator:
        vocab = int(self.target.get_output_embeddings().weight.shape[0])
        return _SpecplugCandidateGenerator(self.speculator, sampling_from(generation_config, check=False),
                                           generation_config.max_length, vocab)


class _SpecplugCandidateGenerator(CandidateGenerator):
    """Feeds a specplug chain to transformers' loop; transformers verifies it.

    With sampling, a probabilistic drafter's chain is drawn from q and q is returned as the
    candidate logits (transformers then applies speculative sampling); deterministic drafters
    return no logits, which transformers verifies by sampling the target (one-hot drafts)."""

    def __init__(self, speculator: Speculator, sampling: SamplingParams, max_length: int,
                 vocab_size: int):
        self.session = DraftSession(speculator, ASSISTED)
        self.vocab_size = vocab_size
        self.sampling = sampling
        self.max_length = max_length
        self.started = False

    def get_candidates(self, input_ids: torch.LongTensor, *args: Any, **kwargs: Any
                       ) -> tuple[torch.LongTensor, torch.FloatTensor | None]:
        # some 5.x releases also pass is_first_iteration (positionally); it is not needed
        tokens = input_ids[0].tolist()
        if not self.started:
            self.session.start([tokens])
            self.started = True
        budget = min(self.session.builder.max_depth, self.max_length - len(tokens) - 1)
        if budget < 1:
            return input_ids, None
        # draft noise from torch's global generator (generator=None), which advances across
        # calls like transformers' own sampling; a generator re-seeded per call draws the same
        # draft every time, which is not a sample from q and biases the output
        tree, _ = self.session.propose([tokens], [True], [budget], self.vocab_size,
                                       sampling=self.sampling, generator=None)
        n = int(tree.num_nodes[0])
        if n == 0:
            return input_ids, None
        cand = torch.cat([input_ids, tree.tokens[:, :n].to(input_ids.device)], 1)
        logits = None
        if tree.draft_probs is not None:
            logits = tree.draft_probs[:, :n].log()
        return cand, logits

    def update_candidate_strategy(self, input_ids: torch.LongTensor, scores: torch.FloatTensor,
                                  num_matches: int) -> None:
        tokens = input_ids[0].tolist()
        n = int(num_matches)
        new = tokens[len(tokens) - n - 1:]
        record = None
        if self.session.observers:  # scores[0, i]: the target at the root, then accepted
            scored = torch.tensor(tokens[len(tokens) - n - 2:len(tokens) - 1])
            # transformers' processed scores: undo the temperature (top-k / top-p masks stay)
            t = self.sampling.temperature
            logits = scores.float() * (t if t > 0 else 1.0)
            ids, probs = teacher_topk(logits, [torch.arange(n + 1)],
                                      max(self.session.speculator.teacher_k, 1))
            record = VerifyRecord(step=self.session.steps, tokens=[scored], top_ids=ids,
                                  top_probs=probs, features=None, active=[True])
        self.session.accept(StepOutcome(accepted=[new[:-1]], bonus=[new[-1]], tokens=[tokens]),
                            record)


_original_get_candidate_generator: Callable[..., Any] | None = None


def install() -> None:
    """Wrap ``GenerationMixin._get_candidate_generator`` once (idempotent)."""
    global _original_get_candidate_generator
    if _original_get_candidate_generator is not None:
        return
    _check_version()
    original = GenerationMixin._get_candidate_generator

    def _get_candidate_generator(self: Any, generation_config: Any, *args: Any, **kwargs: Any):
        assistant_model = kwargs.get("assistant_model")
        if isinstance(assistant_model, Assistant):
            if assistant_model.target is not self:
                raise ValueError("this specplug assistant was built for another model; build "
                                 "it with specplug.hf.assistant(<the model you generate with>)")
            return assistant_model.candidate_generator(generation_config)
        return original(self, generation_config, *args, **kwargs)

    _original_get_candidate_generator = original
    GenerationMixin._get_candidate_generator = _get_candidate_generator


def assistant(model: Any, method: str | SpecConfig = "ngram", /, **options: Any) -> Assistant:
    """A specplug drafter to pass as ``model.generate(..., assistant_model=...)``.

    Args:
        model: the target model (the one whose ``generate`` you call).
        method: drafter name or a full ``SpecConfig``.
        **options: ``SpecConfig`` fields and drafter options (``num_speculative_tokens``,
            ``prompt_lookup_max``, ``model`` for ``draft_model``, ...).
    """
    install()
    return Assistant(model, build_spec(method, options))
