"""``TargetRunner``, what the engine needs from a target, and ``ModelTargetRunner``, that
runner over an HF-convention causal LM.

It turns the engine's root-plus-tree into ``ModelRunner.append`` inputs (tokens, parents,
ancestor mask, depths with the root at index 0), commits the accepted path, and measures the
target's cost curve once per model and machine (``specplug.budget.cached_calibration``).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import Any

import torch

from specplug.calibration import cached_calibration, calibrate
from specplug.cost import CostModel
from specplug.multimodal import check_media_inputs, media_token_ids
from specplug.runner import ModelRunner, RunnerOutput
from specplug.tree import DraftTree, TreeLayout
from specplug.types import VerifyResult

CALIBRATION_CONTEXT = 128  # tokens of context the cost curve is measured at

__all__ = ["CALIBRATION_CONTEXT", "ModelTargetRunner", "TargetRunner"]


class TargetRunner(ABC):
    """What the engine needs from the target model (an adapter implements it).

    ``prefill``, ``score`` and ``commit`` are required; ``synchronize`` and ``calibrate_cost``
    have defaults for runners that cannot do better (a host-synchronous forward; no
    measured cost curve, so adaptive drafters draft their full budget)."""

    vocab_size: int
    max_context: int | None
    #: token ids the target embeds (``[0, input_vocab_size)``); None where unknown
    input_vocab_size: int | None = None

    @abstractmethod
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                model_inputs: dict[str, Any] | None = None) -> RunnerOutput:
        """Left-padded prompts ``[B, L]`` -> logits ``[B, 1, V]`` at the last position (and,
        when the runner was asked for them, hidden features ``[B, L, F]``). ``model_inputs``:
        a vision-language target's image inputs (``pixel_values``, ...)."""

    @abstractmethod
    def score(self, roots: torch.Tensor, tree: DraftTree, layout: TreeLayout) -> RunnerOutput:
        """``roots [B]`` (last committed tokens, not yet in the cache) and the tree ->
        logits ``[B, N + 1, V]``: index 0 scores the root, index i + 1 node i."""

    @abstractmethod
    def commit(self, result: VerifyResult) -> None:
        """Keep the root and accepted nodes in the cache; drop the rest."""

    def synchronize(self) -> None:  # noqa: B027 (an optional hook: the default does nothing)
        """Wait until the last ``score`` has finished (so the engine times the forward, not its
        launch); the default, for host-synchronous runners, returns at once."""

    def calibrate_cost(self, prompt: list[int]) -> CostModel | None:
        """The target's forward time by scored tokens (``CostModel``), or None when the runner
        cannot measure it."""
        return None


class ModelTargetRunner(TargetRunner):
    """``TargetRunner`` over an HF-style causal LM, through ``ModelRunner``."""

    def __init__(self, model: Any, hidden_layers: tuple[int, ...] = (), capacity: int = 1024):
        self.runner = ModelRunner(model, capacity=capacity, hidden_layers=hidden_layers)
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") \
            else model.config
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.input_vocab_size = getattr(model.get_input_embeddings(), "num_embeddings", None)
        self.max_context = getattr(cfg, "max_position_embeddings", None)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                model_inputs: dict[str, Any] | None = None) -> RunnerOutput:
        if model_inputs or media_token_ids(self.runner.model):
            check_media_inputs(self.runner.model, input_ids, attention_mask, model_inputs or {})
        return self.runner.prefill(input_ids, attention_mask, model_inputs)

    def score(self, roots: torch.Tensor, tree: DraftTree, layout: TreeLayout) -> RunnerOutput:
        B = roots.shape[0]
        tokens = torch.cat([roots[:, None], tree.tokens], 1)
        parents = torch.cat([torch.full((B, 1), -1, dtype=torch.long), tree.parents + 1], 1)
        real = torch.cat([torch.ones(B, 1, dtype=torch.bool), layout.real], 1)
        N = tree.width
        anc = torch.zeros(B, N + 1, N + 1, dtype=torch.bool)
        anc[:, 0, 0] = True
        anc[:, 1:, 0] = layout.real  # every real node sees the root
        anc[:, 1:, 1:] = layout.ancestors
        depth = torch.cat([torch.zeros(B, 1, dtype=torch.long), layout.depth], 1)
        return self.runner.append(tokens, parents, real, anc, depth)

    def commit(self, result: VerifyResult) -> None:
        B = result.num_accepted.shape[0]
        keep = torch.cat([torch.zeros(B, 1, dtype=torch.long), result.accepted_nodes + 1], 1)
        self.runner.commit(keep, result.num_accepted + 1)

    def synchronize(self) -> None:
        """Wait for the device (CUDA forwards return before they finish)."""
        _sync(self.runner.device)

    def calibrate_cost(self, prompt: list[int], repeats: int = 7, use_cache: bool = True
                       ) -> CostModel:
        """The target's forward time by scored tokens on this machine, measured once per model,
        device, dtype and thread count (``specplug.budget.cached_calibration``) on a chain
        after ``CALIBRATION_CONTEXT`` tokens of ``prompt`` (repeated as needed); the median
        of ``repeats`` interleaved rounds per width."""
        model = self.runner.model
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") \
            else model.config
        param = next(model.parameters())
        key = {"model": str(getattr(cfg, "_name_or_path", "") or type(model).__name__),
               "class": type(model).__name__,
               "config": cfg.to_json_string() if hasattr(cfg, "to_json_string") else repr(cfg),
               "device": str(param.device), "dtype": str(param.dtype),
               "threads": torch.get_num_threads(), "torch": torch.__version__,
               "repeats": repeats}

        def measure() -> CostModel:
            media = media_token_ids(model)  # text only: the cost of decoding steps
            text = [t for t in prompt if t not in media] or [0]
            reps = -(-CALIBRATION_CONTEXT // len(text))
            ids = torch.tensor((text * reps)[:CALIBRATION_CONTEXT])[None]
            self.runner.prefill(ids, torch.ones_like(ids))
            root = torch.tensor([int(ids[0, -1])])

            def score(n: int) -> float:
                tree = DraftTree(tokens=root.repeat(n - 1)[None],
                                 parents=(torch.arange(n - 1) - 1)[None],
                                 num_nodes=torch.tensor([n - 1]))
                layout = TreeLayout.from_tree(tree)
                _sync(param.device)
                t0 = time.perf_counter()
                self.score(root, tree, layout)
                _sync(param.device)
                seconds = time.perf_counter() - t0
                self.commit(VerifyResult(accepted_nodes=torch.zeros(1, 0, dtype=torch.long),
                                         num_accepted=torch.zeros(1, dtype=torch.long),
                                         bonus_tokens=root))
                return seconds

            return calibrate(score, repeats=repeats)

        return cached_calibration(key, measure, use_cache=use_cache)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
