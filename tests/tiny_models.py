"""Tiny random models built in the tests (no downloads, seconds on CPU) and reference helpers."""

from __future__ import annotations

import torch

VOCAB = 96


def tiny_llama(seed: int = 0, vocab: int = VOCAB, layers: int = 3):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, bos_token_id=None, eos_token_id=None,
                      pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def tiny_gemma(seed: int = 0, vocab: int = VOCAB, window: int = 5):
    """Gemma-3-shaped: mixed sliding-window / full layers, a window short enough that the
    tests' prompts + generations cross it."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1,
                           head_dim=8, sliding_window=window,
                           layer_types=["sliding_attention", "sliding_attention",
                                        "full_attention", "sliding_attention"],
                           max_position_embeddings=256, bos_token_id=None, eos_token_id=None,
                           pad_token_id=0)
    model = Gemma3ForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


MODELS = {"llama": tiny_llama, "gemma": tiny_gemma}



def repetitive_prompts(lengths: list[int], seed: int = 0, vocab: int = VOCAB):
    """Left-padded prompts that repeat short motifs (so n-gram lookup finds matches)."""
    g = torch.Generator().manual_seed(seed)
    L = max(lengths)
    ids = torch.zeros(len(lengths), L, dtype=torch.long)
    mask = torch.zeros(len(lengths), L, dtype=torch.long)
    for b, n in enumerate(lengths):
        motif = torch.randint(1, vocab, (3 + b,), generator=g)
        ids[b, L - n:] = motif.repeat(n // len(motif) + 1)[:n]
        mask[b, L - n:] = 1
    return ids, mask


def reference_greedy(model, ids, mask, max_new_tokens, eos=None):
    """The model's own greedy ``generate``: new tokens per row, cut after EOS."""
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=eos, pad_token_id=0)
    rows = []
    for b in range(ids.shape[0]):
        row = out[b, ids.shape[1]:].tolist()
        if eos is not None and eos in row:
            row = row[: row.index(eos) + 1]
        rows.append(row)
    return rows


def chisquare_pvalue(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson's chi-square p-value of counts ``observed`` against expected counts
    ``expected`` (same shape, any number of cells); cells expected below 5 are merged into
    one, and at least 10 cells must remain for the test to mean something."""
    from scipy.stats import chisquare

    observed, expected = observed.flatten().double(), expected.flatten().double()
    order = expected.argsort(descending=True)
    exp, obs = expected[order], observed[order]
    big = exp >= 5
    e, o = exp[big], obs[big]
    if not bool(big.all()):
        rest_e, rest_o = exp[~big].sum(), obs[~big].sum()
        if rest_e == 0 and rest_o > 0:
            return 0.0  # a token the target can never emit was emitted
        if rest_e > 0:
            e, o = torch.cat([e, rest_e[None]]), torch.cat([o, rest_o[None]])
    assert big.sum() >= 10, "too few cells for a meaningful test"
    return float(chisquare(o.numpy(), e.numpy() * (o.sum() / e.sum()).item()).pvalue)


WORDS = [f"w{i}" for i in range(VOCAB - 3)]


def tiny_tokenizer():
    """An offline word-level tokenizer over ids [0, VOCAB): <unk>=0, <s>=1, </s>=2, w0.. ."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<unk>", "<s>", "</s>", *WORDS])}
    backend = Tokenizer(tok_models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<unk>")


# --- vision-language targets ------------------------------------------------------------------
# weights 10x the default scale: peaked attention and logits, so a token at a wrong position
# changes the greedy output (at the default scale a random model barely reads positions)
SHARP = 0.2
IMAGE_ID = 90  # the image placeholder id of both tiny VLMs (inside the 96-token vocabulary)
VISION_START, VISION_END = 92, 93  # Qwen2-VL's markers around each image's placeholders


def tiny_llava(seed: int = 0, vocab: int = VOCAB):
    """LLaVA-shaped: a tiny CLIP vision tower (8x8 images, 4x4 patches: 4 placeholder tokens
    per image), a projector and a Llama language model."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    torch.manual_seed(seed)
    text = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=256, bos_token_id=None, eos_token_id=None,
                       pad_token_id=0, initializer_range=SHARP)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2, image_size=8, patch_size=4,
                              projection_dim=16)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_ID,
                      vision_feature_layer=-1, vision_feature_select_strategy="default",
                      image_seq_length=4)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def tiny_qwen2_vl(seed: int = 0, vocab: int = VOCAB):
    """Qwen2-VL-shaped: M-RoPE (3 position streams) and a tiny vision tower (2x2 patches,
    2x2 merge: an image of h x w patches gives h*w/4 placeholder tokens)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=None, eos_token_id=None,
                         pad_token_id=0, initializer_range=SHARP,
                         rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2,
                           patch_size=2, spatial_merge_size=2, temporal_patch_size=2,
                           in_channels=3),
        image_token_id=IMAGE_ID, video_token_id=91, vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END)
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    model.config.bos_token_id = model.config.eos_token_id = None
    model.generation_config.bos_token_id = None
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def vlm_prompts(family: str, layouts: list[list[str]], seed: int = 0):
    """Left-padded multimodal prompts and their image inputs, as a processor would give them.

    ``layouts``: per row, a list of pieces: ``"text:N"`` (N repetitive text tokens) or
    ``"image"`` (one image; LLaVA: 8x8 pixels = 4 placeholders; Qwen2-VL: a grid of 1x4x4
    patches = 4 placeholders between the vision markers). Returns ``(ids, mask, inputs)``.
    """
    g = torch.Generator().manual_seed(seed)
    rows, images = [], []
    for b, layout in enumerate(layouts):
        row: list[int] = []
        for piece in layout:
            if piece == "image":
                if family == "qwen2_vl":
                    row += [VISION_START, *[IMAGE_ID] * 4, VISION_END]
                    images.append(torch.randn(16, 3 * 2 * 2 * 2, generator=g))
                else:
                    row += [IMAGE_ID] * 4
                    images.append(torch.randn(3, 8, 8, generator=g))
            else:
                n = int(piece.split(":")[1])
                motif = torch.randint(3, 88, (3 + b,), generator=g)
                row += motif.repeat(n // len(motif) + 1)[:n].tolist()
        rows.append(row)
    L = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, L - len(r):] = torch.tensor(r)
        mask[b, L - len(r):] = 1
    inputs: dict = {}
    if images:
        if family == "qwen2_vl":
            inputs["pixel_values"] = torch.cat(images)
            inputs["image_grid_thw"] = torch.tensor([[1, 4, 4]] * len(images))
            inputs["mm_token_type_ids"] = (ids == IMAGE_ID).int()
        else:
            inputs["pixel_values"] = torch.stack(images)
    return ids, mask, inputs


VLMS = {"llava": tiny_llava, "qwen2_vl": tiny_qwen2_vl}


def reference_vlm_greedy(model, ids, mask, inputs, max_new_tokens):
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=0, **inputs)
    return [out[b, ids.shape[1]:].tolist() for b in range(ids.shape[0])]


def cpu_cost_curve(per_token: float = 0.0094):
    """A cost model as measured on a CPU: 47 ms a step plus ``per_token`` seconds a scored
    token (0.0094: SmolLM2-135M on 2 cores; 0.0: a GPU-like flat curve)."""
    from specplug.cost import CostModel

    cost = CostModel()
    for n in (1, 2, 5, 11):
        for _ in range(3):
            cost.observe(n, 0.047 + per_token * (n - 1))
    return cost


@torch.no_grad()
def admit(target, waiting: list[int], running: list[int], slots: int,
          tokens: dict[int, list[int]], new: dict[int, list[int]]) -> list[int]:
    """A toy engine's admission: waiting requests take free slots and are prefilled (their
    first token is the target's greedy one, appended to ``tokens`` and ``new``). Returns the
    admitted request ids."""
    admitted = []
    while waiting and len(running) < slots:
        i = waiting.pop(0)
        first = int(target(torch.tensor([tokens[i]])).logits[0, -1].argmax())
        tokens[i].append(first)
        new[i].append(first)
        running.append(i)
        admitted.append(i)
    return admitted
