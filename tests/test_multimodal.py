"""Vision-language targets (tiny random LLaVA- and Qwen2-VL-shaped models): greedy output is
token-identical to the model's own ``generate`` for every drafter, tree, batch 1 and 3, one and
two images, images at the start and in the middle; tree positions are right in all three M-RoPE
streams; image placeholders are never matched or proposed; bad inputs fail clearly."""

from __future__ import annotations

import pytest
import torch
from tiny_models import (
    IMAGE_ID,
    VLMS,
    VOCAB,
    reference_vlm_greedy,
    tiny_llama,
    vlm_prompts,
)

import specplug.hf as sh
from specplug import SpecConfig
from specplug.drafters.base import Candidates, DraftContext, Drafter, FrontierItem
from specplug.drafters.ngram import NgramDrafter
from specplug.engine import ModelTargetRunner, Speculator, speculative_generate
from specplug.heads.config import HeadConfig
from specplug.heads.nets import build_net
from specplug.multimodal import TextView, media_token_ids
from specplug.plugins import get_registry
from specplug.sampling import SamplingParams

LAYOUTS = {
    "1img-middle": [["text:5", "image", "text:6"]],
    "1img-start": [["image", "text:8"]],
    "batch3-2img": [["image", "text:7"], ["text:3", "image", "text:2", "image", "text:4"],
                    ["text:9"]],
}
TREES = {"chain": {"tree": "chain", "num_speculative_tokens": 4},
         "dynamic": {"tree": "dynamic", "tree_budget": 8, "tree_topk": 3,
                     "num_speculative_tokens": 4}}


@pytest.fixture(scope="module", params=sorted(VLMS))
def vlm(request):
    return request.param, VLMS[request.param](0)


def head(kind: str, target, seed: int = 0):
    """A random head for ``target`` (msd: with the target's image placeholders)."""
    torch.manual_seed(seed)
    H = 32
    cfg = HeadConfig(kind=kind, hidden_size=H, vocab_size=VOCAB, draft_vocab_size=VOCAB,
                     num_heads=4, num_attention_heads=4,
                     hidden_layers=[-1, 0] if kind == "msd" else [-1],
                     media_tokens=sorted(media_token_ids(target)) if kind == "msd" else [])
    net = build_net(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return net


def options(method: str, target) -> dict:
    return {"ngram": {"prompt_lookup_max": 3},
            "draft_model": {"model": tiny_llama(1)},
            "draft_model_marker": {"model": tiny_llama(1), "image_marker": [7, 8]},
            "layer_skip": {"layers": 2},
            "eagle": {"checkpoint": head("eagle", target)},
            "msd": {"checkpoint": head("msd", target)}}[method]


def run(model, cfg: SpecConfig, ids, mask, inputs, max_new=18, **kw):
    spec = Speculator.from_config(cfg, model)
    runner = ModelTargetRunner(model, hidden_layers=spec.drafter.hidden_layers)
    return speculative_generate(runner, spec, ids, mask, max_new_tokens=max_new,
                                model_inputs=inputs, **kw)


@pytest.mark.parametrize("tree", sorted(TREES))
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("method", ["ngram", "draft_model", "draft_model_marker", "layer_skip",
                                    "eagle", "msd"])
def test_identical_to_generate(vlm, method, layout, tree):
    family, model = vlm
    ids, mask, inputs = vlm_prompts(family, LAYOUTS[layout], seed=len(layout))
    want = reference_vlm_greedy(model, ids, mask, inputs, 18)
    name = "draft_model" if method.startswith("draft_model") else method
    cfg = SpecConfig(method=name, **TREES[tree], **options(method, model))
    got = run(model, cfg, ids, mask, inputs)
    assert got.sequences == want


class Oracle(Drafter):
    """Proposes the reference continuation as the first child of every on-path node and a
    wrong token as the second: every step's true path is in the tree, deep and beside decoys,
    so full acceptance needs the target's tree positions right in every stream."""

    name = "oracle"

    def __init__(self, prompts: list[list[int]], want: list[list[int]]):
        super().__init__()
        self.full = [p + w for p, w in zip(prompts, want)]

    def begin(self, ctx: DraftContext):
        return [(b, len(t), True) for b, t in enumerate(ctx.tokens)]

    def expand(self, frontier: list[list[FrontierItem]], k: int):
        out = []
        for row in frontier:
            cands = []
            for it in row:
                b, n, on_path = it.handle
                full = self.full[b]
                true = full[n] if on_path and n < len(full) else 3
                wrong = 4 if true != 4 else 5
                cands.append(Candidates(tokens=[true, wrong][:k], probs=[0.9, 0.1][:k],
                                        handles=[(b, n + 1, on_path), (b, n + 1, False)][:k]))
            out.append(cands)
        return out


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_tree_positions_are_right_in_every_stream(vlm, layout):
    family, model = vlm
    ids, mask, inputs = vlm_prompts(family, LAYOUTS[layout], seed=3)
    max_new = 21
    want = reference_vlm_greedy(model, ids, mask, inputs, max_new)
    prompts = [ids[b][mask[b].bool()].tolist() for b in range(ids.shape[0])]
    cfg = SpecConfig(method="ngram", tree="static",
                     tree_paths=[[0], [1], [0, 0], [0, 1], [0, 0, 0], [0, 0, 1], [0, 0, 0, 0]])
    reg = get_registry()
    spec = Speculator(cfg, Oracle(prompts, want), reg.tree_builders["static"](cfg),
                      reg.verifiers[cfg.acceptance_method])
    got = speculative_generate(ModelTargetRunner(model), spec, ids, mask,
                               max_new_tokens=max_new, model_inputs=inputs)
    assert got.sequences == want
    # 1 prefill token + 4 steps of 5 tokens (4 accepted + bonus): every draft accepted
    assert got.stats.target_forwards == 5
    assert got.stats.mean_accepted_tokens == pytest.approx(5.0)


def test_mrope_prompt_offset_is_not_zero():
    """The Qwen2-VL prompts above really exercise M-RoPE: images compress positions, so later
    tokens sit at index + delta with delta < 0 (a runner that ignored it would fail above)."""
    model = VLMS["qwen2_vl"](0)
    ids, mask, inputs = vlm_prompts("qwen2_vl", LAYOUTS["batch3-2img"])
    runner = ModelTargetRunner(model)
    runner.prefill(ids, mask, inputs)
    assert runner.runner.positions.delta.tolist() == [-2, -4, 0]


@pytest.mark.parametrize("method", ["ngram", "draft_model", "layer_skip"])
def test_assistant_route(vlm, method):
    family, model = vlm
    ids, mask, inputs = vlm_prompts(family, LAYOUTS["1img-middle"], seed=2)
    want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16,
                          do_sample=False, **inputs)
    opts = options(method, model)
    a = sh.assistant(model, method, num_speculative_tokens=3, **opts)
    got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16,
                         do_sample=False, assistant_model=a, **inputs)
    assert torch.equal(got, want)


def test_generate_and_custom_generate_routes(vlm):
    family, model = vlm
    ids, mask, inputs = vlm_prompts(family, LAYOUTS["batch3-2img"], seed=5)
    want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12,
                          do_sample=False, pad_token_id=0, **inputs)
    got = sh.generate(model, ids, mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                      method="ngram", tree="dynamic", **inputs)
    assert torch.equal(got, want)
    got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12,
                         do_sample=False, pad_token_id=0,
                         custom_generate=sh.custom_generate("layer_skip", layers=2), **inputs)
    assert torch.equal(got, want)


def test_sampling_runs_and_reproduces(vlm):
    family, model = vlm
    ids, mask, inputs = vlm_prompts(family, LAYOUTS["1img-middle"])
    cfg = SpecConfig(method="draft_model", model=tiny_llama(1), num_speculative_tokens=3,
                     adaptive=False)  # draft sizes by measured time would vary the draws
    outs = [run(model, cfg, ids, mask, inputs, sampling=SamplingParams(temperature=0.9),
                generator=torch.Generator().manual_seed(11)).sequences for _ in range(2)]
    assert outs[0] == outs[1] and len(outs[0][0]) == 18


# --- drafters and image placeholders ------------------------------------------------------------


def test_ngram_never_matches_or_proposes_across_images():
    d = NgramDrafter(SpecConfig(method="ngram").drafter_options, max_depth=8)
    d.bind_media(frozenset({IMAGE_ID}))
    a, b, c = 10, 11, 12
    img = [IMAGE_ID] * 3
    # "a b" was followed by an image, then "c": the continuation stops before the image
    toks = [a, b, *img, c, 20, 21, a, b]
    d.start([toks])
    ctx = DraftContext(tokens=[toks], active=[True], sampling=SamplingParams(), adaptive=False)
    (root,) = d.begin(ctx)
    assert root.children == {}  # the only continuation of "a b" starts with an image
    # the image's own placeholders never form n-grams, nor does text across them
    toks2 = [*img, c, 30, *img, c]
    d.start([toks2])
    (root,) = d.begin(DraftContext(tokens=[toks2], active=[True], sampling=SamplingParams(),
                                   adaptive=False))
    assert list(root.children) == [30]  # "c" -> 30, found without reading through the image
    assert all(IMAGE_ID not in key for table in d.rows[0].tables.values() for key in table)


def test_text_view_removes_or_marks_image_spans():
    v = TextView(frozenset({IMAGE_ID}), marker=(7,))
    v.start(1)
    assert v.feed(0, [1, 2, IMAGE_ID, IMAGE_ID]) == [1, 2, 7]
    assert v.feed(0, [IMAGE_ID, 3]) == [3]  # the same span, split over two calls
    assert v.feed(0, [IMAGE_ID, 4]) == [7, 4]
    v = TextView(frozenset({IMAGE_ID}))
    v.start(1)
    assert v.feed(0, [1, IMAGE_ID, IMAGE_ID, 2]) == [1, 2]


def test_text_only_draft_never_sees_images(vlm):
    family, model = vlm
    ids, mask, inputs = vlm_prompts(family, LAYOUTS["1img-middle"])
    draft = tiny_llama(1)
    seen = []
    hook = draft.model.embed_tokens.register_forward_hook(
        lambda mod, args, out: seen.append(args[0].clone()))
    try:
        cfg = SpecConfig(method="draft_model", model=draft, num_speculative_tokens=3)
        got = run(model, cfg, ids, mask, inputs)
    finally:
        hook.remove()
    assert got.sequences == reference_vlm_greedy(model, ids, mask, inputs, 18)
    assert seen and all(not bool((s == IMAGE_ID).any()) for s in seen)


def test_msd_reads_the_visual_features_through_its_adapter(vlm):
    """The drafting form (commit + expand) gives the training form's logits, and an image
    token's input is the adapted visual feature, not the placeholder's embedding."""
    family, model = vlm
    net = head("msd", model).bind(model.get_input_embeddings(),
                                  model.get_output_embeddings().weight)
    ids, mask, inputs = vlm_prompts(family, [["text:3", "image", "text:6"]])
    with torch.no_grad():
        hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                   **inputs).hidden_states
        f = torch.cat([hs[-1][0], hs[0][0]], -1)
        T = ids.shape[1]
        train = net.train_forward(f[None], ids, torch.ones(1, T, dtype=torch.bool))
        t = T - 3
        row = net.commit(net.new_row(), f[:t], ids[0, 1:t + 1], next_feats=f[1:t + 1])
        logits, _ = net.expand(row, [net.root_state(row, f[t])], ids[0, t + 1:t + 2], 1)
        assert torch.allclose(logits[0], train["logits"][0][0, t], atol=1e-4)
        blind = net.commit(net.new_row(), f[:t], ids[0, 1:t + 1])  # no visual features
        logits2, _ = net.expand(blind, [net.root_state(blind, f[t])], ids[0, t + 1:t + 2], 1)
        assert not torch.allclose(logits2[0], logits[0], atol=1e-4)


# --- clear errors -------------------------------------------------------------------------------


def test_images_for_a_text_only_target():
    llama = tiny_llama(0)
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="text-only model.*pixel_values"):
        sh.generate(llama, ids, max_new_tokens=3, method="ngram",
                    pixel_values=torch.zeros(1, 3, 8, 8))


def test_placeholders_without_images_and_images_without_placeholders(vlm):
    family, model = vlm
    ids, mask, inputs = vlm_prompts(family, LAYOUTS["1img-middle"])
    with pytest.raises(ValueError, match="placeholder tokens.*no pixel_values"):
        sh.generate(model, ids, mask, max_new_tokens=3, method="ngram")
    text_ids, text_mask, _ = vlm_prompts(family, [["text:6"]])
    with pytest.raises(ValueError, match="no image placeholder tokens"):
        sh.generate(model, text_ids, text_mask, max_new_tokens=3, method="ngram", **inputs)


def test_mismatched_image_count(vlm):
    family, model = vlm
    ids, mask, _ = vlm_prompts(family, LAYOUTS["1img-middle"])
    _, _, two = vlm_prompts(family, [["image", "image"]])
    with pytest.raises(ValueError, match="mismatched image count: 2 image"):
        sh.generate(model, ids, mask, max_new_tokens=3, method="ngram", **two)


def test_image_marker_the_draft_lacks(vlm):
    _, model = vlm
    with pytest.raises(ValueError, match=r"image_marker ids \[500\] are not in the draft"):
        Speculator.from_config(SpecConfig(method="draft_model", model=tiny_llama(1),
                                          image_marker=[500]), model)


def test_draft_vocabulary_without_the_image_tokens(vlm):
    """A text-only draft whose vocabulary ends before the target's appended image tokens is
    accepted (LLaVA appends <image>); one that is otherwise different is refused."""
    family, model = vlm
    small = tiny_llama(1, vocab=IMAGE_ID)  # ids 0..89: the target adds 90.. (images, markers)
    ids, mask, inputs = vlm_prompts(family, LAYOUTS["1img-middle"])
    for sampling in (SamplingParams(), SamplingParams(temperature=1.0)):
        got = run(model, SpecConfig(method="draft_model", model=small,
                                    num_speculative_tokens=3), ids, mask, inputs,
                  sampling=sampling, generator=torch.Generator().manual_seed(0))
        if sampling.greedy:
            assert got.sequences == reference_vlm_greedy(model, ids, mask, inputs, 18)
    with pytest.raises(ValueError, match="vocabulary mismatch.*image placeholders start"):
        Speculator.from_config(SpecConfig(method="draft_model", model=tiny_llama(1, vocab=50)),
                               model)


def test_msd_head_for_other_image_tokens(vlm):
    _, model = vlm
    net = head("msd", model)
    net.config = net.config.model_copy(update={"media_tokens": [IMAGE_ID + 1]})
    with pytest.raises(ValueError, match="msd head was trained for image placeholder ids"):
        Speculator.from_config(SpecConfig(method="msd", checkpoint=net), model)


def test_serving_chains_never_cross_images():
    """The engine seam (vLLM's custom_class) hands specplug token ids only; with the target's
    image placeholder ids bound, n-gram chains stop before an image and a text-only draft
    model never sees one."""
    from specplug.serving import ChainProposer

    ngram = ChainProposer(SpecConfig(method="ngram", num_speculative_tokens=4, adaptive=False),
                          vocab_size=VOCAB, media_tokens=frozenset({IMAGE_ID}))
    hist = [10, 11, 12, IMAGE_ID, IMAGE_ID, 13, 10, 11, 12]
    assert ngram.propose([hist], [[12]]) == [[]]  # "10 11 12" was followed by an image
    hist2 = [10, 11, 12, 14, 15, IMAGE_ID, 10, 11, 12]
    assert ngram.propose([hist2], [[12]]) == [[14, 15]]  # the chain ends at the image
    draft = tiny_llama(1)
    seen = []
    hook = draft.model.embed_tokens.register_forward_hook(
        lambda mod, args, out: seen.append(args[0].clone()))
    try:
        chains = ChainProposer(SpecConfig(method="draft_model", model=draft,
                                          num_speculative_tokens=3, adaptive=False),
                               vocab_size=VOCAB, media_tokens=frozenset({IMAGE_ID}))
        out = chains.propose([hist], [[12]])
    finally:
        hook.remove()
    assert len(out[0]) == 3 and IMAGE_ID not in out[0]
    assert seen and all(not bool((s == IMAGE_ID).any()) for s in seen)
