"""``SPECPLUG``'s SGLang worker: specplug drafts the trees, SGLang verifies them.

The worker is SGLang's own ``NGRAMWorker`` with its drafting replaced: SGLang builds the verify
inputs from a tree mask, runs one ``TARGET_VERIFY`` forward, walks the tree and keeps the
accepted tokens' KV exactly as it does for NGRAM; where NGRAM asks its n-gram corpus for each
request's tree, this worker asks ``specplug.serving.ServingProposer`` (the session every route
drafts through), keyed by SGLang's request ids, and lays the trees out with
``specplug.adapters.sglang_format``. Nothing here decides what to draft.

SGLang's NGRAM scores ``--speculative-num-draft-tokens`` slots in every row of every step,
whether drafts fill them or not: at a batch of 8 on a CPU that is 12 times a plain step's
tokens. On the attention backends in ``NARROWING_BACKENDS`` this worker narrows each step's
verify to the widest tree the step drafted (every row padded to it, as SGLang's verify layout
needs one width), and runs a plain decode step instead when no row drafts; the proposer
prices draft tokens knowing that (``pads_rows``). A narrower step is what SGLang's adaptive
EAGLE switches to as well: the worker's ``draft_token_num``, its preallocated verify buffers
and the backend's ``num_draft_tokens`` for the step, and ``speculative_num_draft_tokens`` on
the result, which SGLang reads as the stride of the tokens it commits. The draft input handed
on to the next step keeps the full width, since SGLang merges those of different batches. On
any other backend (the GPU ones, untested here) every step verifies all slots, as NGRAM does,
and the proposer drafts to fill them (``scores_every_slot``).

The class is built on first use, not at import: ``NGRAMWorker``'s module imports SGLang's
compiled tree kernels (``sgl_kernel``), which only SGLang builds for a device carry.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from specplug.adapters.sglang_format import sglang_verify_tree

__all__ = ["worker_class"]

_WORKER: list[type] = []
logger = logging.getLogger("specplug.sglang")

#: ``NGRAMWorker``'s verify buffers, each sized by ``draft_token_num`` (``_init_preallocated_tensors``)
VERIFY_BUFFERS = ("draft_tokens", "retrieve_indexes", "retrieve_next_token",
                  "retrieve_next_sibling", "positions", "tree_mask", "draft_tokens_batch",
                  "tree_mask_batch", "retrieve_indexes_batch", "retrieve_next_token_batch",
                  "retrieve_next_sibling_batch", "positions_batch")


#: attention backends whose verify reads its width from ``num_draft_tokens`` each step, where
#: narrowing is tested (SGLang's CPU backend)
NARROWING_BACKENDS = frozenset({"IntelAMXAttnBackend"})


def verify_width(num_nodes: Any, slots: int) -> int:
    """Slots a row this step: the widest tree's nodes plus the root, at most ``slots``.

    Args:
        num_nodes: ``[B]`` draft nodes per row.
        slots: the engine's full width (``--speculative-num-draft-tokens``).
    """
    widest = int(num_nodes.max()) if num_nodes.numel() else 0
    return min(slots, widest + 1)


def widen_draft_input(draft_input: Any, rows: int, slots: int) -> None:
    """Pads a narrowed step's next draft input (``accept_tokens [rows * w]``) back to
    ``slots`` a row, so batches of different steps still merge (SGLang concatenates them)."""
    width = draft_input.draft_token_num
    if width == slots or draft_input.accept_tokens is None:
        return
    accepted = draft_input.accept_tokens.view(rows, width)
    padded = accepted.new_zeros(rows, slots)
    padded[:, :width] = accepted
    draft_input.accept_tokens = padded.flatten()
    draft_input.draft_token_num = draft_input.num_tokens_per_req = slots
    draft_input.num_tokens_for_logprob_per_req = slots


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
        from sglang.srt.speculative import ngram_worker as ngram
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
                max_nodes=self.draft_token_num - 1, pads_rows=True)
            self.narrows: bool | None = None  # known once the attention backend exists
            self.ngram_corpus = _NoCorpus(self.proposer.reset)
            self.slots = self.draft_token_num
            self._buffers: dict[int, dict[str, Any]] = {}  # verify buffers by width
            self._drafted: tuple[Any, Any] | None = None

        def clear_cache_pool(self) -> None:
            self.proposer.reset()

        def forward_batch_generation(self, batch: Any, *args: Any, **kwargs: Any) -> Any:
            """A decode step drafts first, then runs NGRAM's step at the width the drafts
            need, or a plain decode step when none drafted; prefill goes through unchanged."""
            if not batch.forward_mode.is_decode():
                return super().forward_batch_generation(batch, *args, **kwargs)
            if self.narrows is None:
                self._choose_narrowing()
            histories = [list(_prompt_ids(req)) + list(req.output_ids) for req in batch.reqs]
            tree = self.proposer.draft(histories, rids=[req.rid for req in batch.reqs])
            width = verify_width(tree.num_nodes, self.slots) if self.narrows else self.slots
            roots = [h[-1] for h in histories]
            if width == 1 and self._plain_step_fits(batch):
                on_publish = kwargs.get("on_publish", args[0] if args else None)
                return self._plain_decode(batch, roots, on_publish)
            tokens, mask = sglang_verify_tree(roots, tree, width)
            self._drafted = tokens.numpy(), mask.numpy()
            self._use_width(width)
            try:
                result = super().forward_batch_generation(batch, *args, **kwargs)
            finally:
                self._drafted = None
                self._use_width(self.slots)
            widen_draft_input(result.next_draft_input, len(batch.reqs), self.slots)
            return result

        @staticmethod
        def _plain_step_fits(batch: Any) -> bool:
            """A step may skip the verify path: nothing asks for what only it reports
            (log-probabilities, grammar masks, hidden states)."""
            return not (batch.return_logprob or batch.has_grammar
                        or any(getattr(r, "return_hidden_states", False) for r in batch.reqs))

        def _plain_decode(self, batch: Any, roots: list[int], on_publish: Any) -> Any:
            """One plain decode step for a batch where no row drafted, handed back in the shape
            of a verify step that accepted nothing (one token a row, stride 1).

            Under speculation SGLang keeps ``seq_lens`` at the committed KV (the root, the last
            committed token, is not in it) and has reserved KV slots past it; a plain decode
            step wants ``seq_lens`` to count the token it scores. So for the forward the root
            goes in at position ``seq_lens``, its KV into the reserved slot there, with
            ``seq_lens + 1``; the batch is restored after, and SGLang advances it by the
            result's ``new_seq_lens`` as after any verify step."""
            rows = len(batch.reqs)
            seq_lens = batch.seq_lens
            fields = ("input_ids", "out_cache_loc", "seq_lens", "seq_lens_cpu", "seq_lens_sum",
                      "orig_seq_lens", "spec_info")
            saved = {name: getattr(batch, name) for name in fields}
            batch.input_ids = torch.tensor(roots, dtype=torch.int64, device=seq_lens.device)
            batch.out_cache_loc = batch.req_to_token_pool.req_to_token[
                batch.req_pool_indices, seq_lens]
            batch.seq_lens = seq_lens + 1
            batch.seq_lens_cpu = saved["seq_lens_cpu"] + 1
            if saved["orig_seq_lens"] is not None:
                batch.orig_seq_lens = saved["orig_seq_lens"] + 1
            batch.seq_lens_sum = None
            batch.spec_info = None
            try:
                out = self.target_worker.forward_batch_generation(batch)
            finally:
                for name, value in saved.items():
                    setattr(batch, name, value)
            predict = out.next_token_ids
            new_seq_lens = seq_lens + 1
            accept_lens = torch.ones(rows, dtype=torch.int32, device=seq_lens.device)
            accept_tokens = torch.zeros(rows, self.slots, dtype=torch.int32,
                                        device=seq_lens.device)
            accept_tokens[:, 0] = predict
            if on_publish is not None:
                on_publish(new_seq_lens)
            return ngram.GenerationBatchResult(
                logits_output=out.logits_output, next_token_ids=predict,
                can_run_cuda_graph=out.can_run_cuda_graph, accept_lens=accept_lens,
                new_seq_lens=new_seq_lens,
                next_draft_input=ngram.NgramVerifyInput(
                    draft_token_num=self.slots, new_seq_lens=new_seq_lens,
                    accept_tokens=accept_tokens.flatten(), accept_lens=accept_lens),
                speculative_num_draft_tokens=1)

        def _choose_narrowing(self) -> None:
            """Narrow on the backends known to read their width each step; elsewhere verify
            every slot and have the proposer fill them."""
            backend = getattr(self.model_runner, "attn_backend", None)
            self.narrows = (type(backend).__name__ in NARROWING_BACKENDS
                            and hasattr(backend, "num_draft_tokens"))
            if self.narrows:
                # every width's buffers now, not inside a timed step (a first step at a new
                # width would otherwise price that width by an allocation)
                for width in range(1, self.slots):
                    self._use_width(width)
                self._use_width(self.slots)
            else:
                self.proposer.pads_rows, self.proposer.scores_every_slot = False, True
                logger.info("specplug: SGLang attention backend %s: every step verifies all "
                            "%d slots (narrowing is tested on %s)", type(backend).__name__,
                            self.slots, ", ".join(sorted(NARROWING_BACKENDS)))

        def _use_width(self, width: int) -> None:
            """Points NGRAM's step at ``width`` slots a row and at buffers of that width."""
            if self.draft_token_num == width:
                return
            if self.draft_token_num not in self._buffers:
                self._buffers[self.draft_token_num] = {n: getattr(self, n)
                                                       for n in VERIFY_BUFFERS}
            self.draft_token_num = self.speculative_num_draft_tokens = width
            self.model_runner.attn_backend.num_draft_tokens = width
            if width in self._buffers:
                for name, value in self._buffers[width].items():
                    setattr(self, name, value)
            else:
                self._init_preallocated_tensors()  # sized by draft_token_num
                self._buffers[width] = {n: getattr(self, n) for n in VERIFY_BUFFERS}

        def _prepare_draft_tokens(self, batch: Any) -> tuple[Any, Any]:
            """Per request, its tree in NGRAM's layout, drafted by ``forward_batch_generation``:
            tokens ``[bs * w]`` and the ancestor mask ``[bs * w * w]`` (numpy, as
            ``NGRAMWorker`` copies them in)."""
            if self._drafted is None:
                raise RuntimeError("SPECPLUG drafts in forward_batch_generation; SGLang asked "
                                   "for drafts outside a decode step")
            return self._drafted

        def _update_ngram_corpus(self, batch: Any) -> None:
            """specplug learns what was accepted from the next step's histories."""

    _WORKER.append(SpecplugWorker)
    return SpecplugWorker
