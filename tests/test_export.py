"""Exporting eagle heads to vLLM's EAGLE-1 layout (``specplug.heads.export``) and the vLLM
adapter's ``drafter: "eagle"`` route. The real-engine check (vLLM drafts what specplug's head
predicts) is in ``integration_tests/test_vllm_real.py``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_heads import H, features, make_net
from tiny_models import VOCAB, tiny_gemma, tiny_llama

from specplug.adapters.vllm import translate_speculative_config
from specplug.heads.checkpoint import load_head, save_head
from specplug.heads.export import cached_vllm_eagle, embedding_scale, export_vllm_eagle


@pytest.fixture(scope="module", params=["llama", "gemma"])
def target(request):
    return {"llama": tiny_llama, "gemma": tiny_gemma}[request.param](0)


def _predicted_features(net, target, ids, embed=None):
    """The head's predicted next features ``[T-1, H]`` over ``ids`` (teacher-forced)."""
    if embed is not None:
        net.bind(embed, target.get_output_embeddings().weight)
    with torch.no_grad():
        out = net.train_forward(features(target, ids)[None], ids[None],
                                torch.ones(1, len(ids), dtype=torch.bool))
    return out["features"][0]


def test_embedding_scale_is_what_the_target_embedding_multiplies_by(target):
    ids = torch.arange(1, 20)
    embed = target.get_input_embeddings()
    with torch.no_grad():
        ratio = embed(ids) / embed.weight[ids]
    scale = embedding_scale(target.config.to_dict())
    torch.testing.assert_close(ratio, torch.full_like(ratio, scale))
    assert (scale == 1.0) == (target.config.model_type == "llama")


def test_exported_head_computes_what_ours_does_from_the_raw_embedding_table(tmp_path, target):
    """vLLM's drafter embeds with the target's raw table (no Gemma scale) and names weights as
    SafeAILab's EAGLE; specplug's loader reads that layout, so loading the export back with an
    unscaled embedding must give the same predicted features as the original head."""
    net = make_net("eagle", target)
    folder = export_vllm_eagle(net, tmp_path / "vllm-eagle", target.config.to_dict())
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["num_hidden_layers"] == 1
    assert cfg["rope_theta"] == net.config.rope_theta
    back = load_head(folder)
    assert not back.config.fc_bias and back.config.draft_vocab_size == VOCAB
    raw = torch.nn.Embedding.from_pretrained(target.get_input_embeddings().weight.detach())
    ids = torch.randint(1, VOCAB, (12,), generator=torch.Generator().manual_seed(3))
    ours = _predicted_features(net, target, ids)
    theirs = _predicted_features(back, target, ids, embed=raw)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    if embedding_scale(target.config.to_dict()) != 1.0:  # the fold is what makes them agree
        unfolded = make_net("eagle", target)
        unfolded.bind(raw, target.get_output_embeddings().weight)
        assert not torch.allclose(_predicted_features(unfolded, target, ids), ours, atol=1e-3)


@pytest.mark.parametrize("change, message", [
    ({"kind": "clover"}, "only 'eagle' heads"),
    ({"fc_bias": True}, "has a bias"),
    ({"hidden_layers": [-1, 0]}, "final hidden states"),
    ({"hidden_size": 48}, "hidden size 48"),
    ("vlm", "vision-language model"),
])
def test_heads_vllm_cannot_serve_are_refused_by_name(tmp_path, change, message):
    from specplug.heads.config import HeadConfig
    from specplug.heads.nets import build_net

    llama = tiny_llama(0)
    base = {"kind": "eagle", "hidden_size": H, "vocab_size": VOCAB, "draft_vocab_size": VOCAB,
            "num_attention_heads": 4}
    target = llama.config.to_dict()
    if change == "vlm":  # a LLaVA-style config: the language model under text_config
        target, change = {"model_type": "llava", "text_config": target}, {}
    net = build_net(HeadConfig(**{**base, **change}))
    with pytest.raises(ValueError, match=message):
        export_vllm_eagle(net, tmp_path / "out", target)
    assert not (tmp_path / "out").exists()


def test_vllm_eagle_route_exports_once_and_becomes_vllm_eagle(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECPLUG_CACHE_DIR", str(tmp_path / "cache"))
    llama = tiny_llama(0)
    model = tmp_path / "target"
    llama.save_pretrained(model)
    head = save_head(make_net("eagle", llama), tmp_path / "head")
    spec = {"method": "specplug", "drafter": "eagle", "checkpoint": str(head),
            "num_speculative_tokens": 3}
    out, extra = translate_speculative_config(spec, {"a": 1}, target_model=str(model))
    assert out["method"] == "eagle" and out["num_speculative_tokens"] == 3
    assert extra == {"a": 1}
    exported = out["model"]
    assert exported.startswith(str(tmp_path / "cache" / "vllm-eagle"))
    assert load_head(exported).config.kind == "eagle"
    weights = Path(exported) / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    again, _ = translate_speculative_config(spec, None, target_model=str(model))
    assert again["model"] == exported  # cached by the head's content
    assert weights.stat().st_mtime_ns == mtime
    assert cached_vllm_eagle(head, llama.config.to_dict()) == Path(exported)


@pytest.mark.parametrize("extra, target, message", [
    ({"tree": "dynamic"}, "model", "tree: not an option of drafter 'eagle' in vLLM"),
    ({"num_speculative_tokens": 0}, "model", "num_speculative_tokens=0"),
    ({}, "nowhere", "not a local model folder"),
    ({}, "model", "no shipped 'eagle' head"),  # a folder that is no known model, no checkpoint
])
def test_vllm_eagle_route_refuses_clearly(tmp_path, extra, target, message):
    llama = tiny_llama(0)
    llama.save_pretrained(tmp_path / "model")
    spec = {"method": "specplug", "drafter": "eagle", **extra}
    with pytest.raises(ValueError, match="invalid specplug speculative config") as err:
        translate_speculative_config(spec, None, target_model=str(tmp_path / target))
    assert message in str(err.value)


def test_hidden_state_drafters_point_to_the_eagle_route():
    with pytest.raises(ValueError, match='"drafter": "eagle"'):
        translate_speculative_config({"method": "specplug", "drafter": "clover"}, None)
