"""``SPECPLUG``'s SGLang worker: specplug drafts the trees, SGLang verifies them.

The worker is SGLang's own ``NGRAMWorker`` with its drafting replaced: SGLang builds the verify
inputs from a tree mask, runs one ``TARGET_VERIFY`` forward, walks the tree and keeps the
accepted tokens' KV exactly as it does for NGRAM; where NGRAM asks its n-gram corpus for each
request's tree, this worker asks ``specplug.serving.ServingProposer`` (the session every route
drafts through), keyed by SGLang's request ids, and lays the trees out with
``specplug.adapters.sglang_format``. Nothing here decides what to draft.

The class is built on first use, not at import: ``NGRAMWorker``'s module imports SGLang's
compiled tree kernels (``sgl_kernel``), which only SGLang builds for a device carry.
"""

from __future__ import annotations

from typing import Any

__all__ = ["worker_class"]

_WORKER: list[type] = []


class _NoCorpus:
    """What ``NGRAMWorker`` calls on its n-gram corpus, for a worker that has none: requests
    that leave need nothing erased (rows are matched by request id each step)."""

    def __init__(self, reset: Any):
        self.reset = reset

    def synchronize(self) -> None:
        """Nothing runs in the background."""

    def erase_match_state(self, rids: list[Any]) -> None:
        """Departed requests' drafter state goes at the next regroup."""

    def __getattr__(self, name: str) -> Any:
        raise ValueError(f"SPECPLUG has no n-gram corpus (SGLang asked for {name!r}): external "
                         "corpora are a feature of --speculative-algorithm NGRAM")


def _prompt_ids(req: Any) -> Any:
    """A request's prompt tokens: ``origin_input_ids_unpadded`` from SGLang 0.5.2x (the ids
    before multimodal padding), ``origin_input_ids`` before it."""
    ids = getattr(req, "origin_input_ids_unpadded", None)
    return req.origin_input_ids if ids is None else ids


def worker_class() -> type:
    """``SpecplugWorker``, a subclass of SGLang's ``NGRAMWorker``.

    Raises:
        RuntimeError: this SGLang cannot import its NGRAM worker (no compiled kernels for this
            device), naming what is missing.
    """
    if _WORKER:
        return _WORKER[0]
    try:
        from sglang.srt.speculative.ngram_worker import NGRAMWorker
    except ImportError as err:
        raise RuntimeError(
            "--speculative-algorithm SPECPLUG verifies through SGLang's NGRAM verify path, "
            "whose tree kernels come with SGLang's compiled kernels (sgl_kernel): install the "
            "SGLang build for this device (the PyPI wheels on CUDA, SGLang's CPU build on a "
            f"CPU: docs/sglang.md). This SGLang cannot import them: {err}") from err

    class SpecplugWorker(NGRAMWorker):
        """SGLang's NGRAM worker drafting with specplug (see the module docstring)."""

        def __init__(self, *args: Any, **kwargs: Any):
            # NGRAMWorker's own arguments, whose list changed between SGLang releases
            # (0.5.23: server_args, gpu_id, nccl_port, target_worker; 0.5.15 adds a
            # ParallelState before nccl_port): passed through as SGLang gives them
            super().__init__(*args, **kwargs)
            from specplug.adapters.sglang import config_from_env
            from specplug.serving import ServingProposer

            model_config = self.model_runner.model_config
            self.proposer = ServingProposer(
                config_from_env(), vocab_size=model_config.vocab_size,
                max_context=model_config.context_len, engine="SGLang", trees=True,
                max_nodes=self.draft_token_num - 1, scores_every_slot=True)
            self.ngram_corpus = _NoCorpus(self.proposer.reset)

        def clear_cache_pool(self) -> None:
            self.proposer.reset()

        def _prepare_draft_tokens(self, batch: Any) -> tuple[Any, Any]:
            """Per request, its tree in NGRAM's layout: tokens ``[bs * W]`` and the ancestor
            mask ``[bs * W * W]`` (numpy, as ``NGRAMWorker`` copies them in)."""
            from specplug.adapters.sglang_format import sglang_verify_tree

            histories = [list(_prompt_ids(req)) + list(req.output_ids) for req in batch.reqs]
            tree = self.proposer.draft(histories, rids=[req.rid for req in batch.reqs])
            tokens, mask = sglang_verify_tree([h[-1] for h in histories], tree,
                                              self.draft_token_num)
            return tokens.numpy(), mask.numpy()

        def _update_ngram_corpus(self, batch: Any) -> None:
            """specplug learns what was accepted from the next step's histories."""

    _WORKER.append(SpecplugWorker)
    return SpecplugWorker
