"""The engine gives identical results with the Triton kernels (CPU interpreter) and with their
torch references: tree preparation, verification, KV compaction and the draft top-k all run
through ``specplug.kernels``, switched as a whole by ``SPECPLUG_KERNELS``."""

from __future__ import annotations

import pytest
import torch
from tiny_models import reference_greedy, repetitive_prompts, tiny_llama

from specplug import SpecConfig
from specplug.engine import ModelTargetRunner, Speculator, speculative_generate
from specplug.sampling import SamplingParams

pytest.importorskip("triton")

TREES = {
    "chain": {"tree": "chain", "num_speculative_tokens": 4},
    "dynamic": {"tree": "dynamic", "tree_budget": 8, "tree_topk": 3,
                "num_speculative_tokens": 4},
}
SAMPLINGS = {"greedy": SamplingParams(), "t0.8-topk20": SamplingParams(temperature=0.8,
                                                                      top_k=20)}


def run(backend: str, tree: str, sampling: SamplingParams, monkeypatch) -> tuple:
    monkeypatch.setenv("SPECPLUG_KERNELS", backend)
    model = tiny_llama(0)
    ids, mask = repetitive_prompts([9, 5, 13], seed=2)
    # adaptive=False: a budget sized from measured time would make the two runs draft
    # different trees, and sampled runs use the random stream differently
    cfg = SpecConfig(method="draft_model", model=tiny_llama(1), adaptive=False, **TREES[tree])
    out = speculative_generate(ModelTargetRunner(model), Speculator.from_config(cfg, model),
                               ids, mask, max_new_tokens=14, sampling=sampling,
                               generator=torch.Generator().manual_seed(0))
    return out.sequences, out.stats.accepted_per_step


@pytest.mark.parametrize("sampling", sorted(SAMPLINGS))
@pytest.mark.parametrize("tree", sorted(TREES))
def test_engine_identical_with_kernels_and_references(tree, sampling, monkeypatch):
    ref = run("torch", tree, SAMPLINGS[sampling], monkeypatch)
    tri = run("triton", tree, SAMPLINGS[sampling], monkeypatch)
    assert tri == ref
    if sampling == "greedy":
        model = tiny_llama(0)
        ids, mask = repetitive_prompts([9, 5, 13], seed=2)
        assert tri[0] == reference_greedy(model, ids, mask, 14)
