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
