"""Training heads on a tiny model: data helpers, the loss goes down, held-out accuracy goes up,
training resumes from its saved state, and ``specplug train`` runs end to end."""

from __future__ import annotations

import json
import random

import pytest
import torch
from tiny_models import (
    VOCAB,
    WORDS,
    reference_greedy,
    repetitive_prompts,
    tiny_llama,
    tiny_tokenizer,
)

import specplug.hf as sh
from specplug.cli import main
from specplug.heads.config import HeadConfig
from specplug.heads.nets import build_net
from specplug.train.data import Sequence, extract_features, load_prompts
from specplug.train.evaluation import evaluate_head
from specplug.train.trainer import (
    Example,
    TrainSettings,
    _collate,
    build_draft_vocab,
    evaluate,
    head_loss,
    train_head,
)


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(0)


@pytest.fixture(scope="module")
def examples(llama):
    """The tiny target's own greedy continuations of 24 repetitive prompts."""
    ids, mask = repetitive_prompts([6 + i % 7 for i in range(24)], seed=11)
    responses = reference_greedy(llama, ids, mask, 40)
    seqs = [Sequence(ids[b][mask[b].bool()].tolist(), r) for b, r in enumerate(responses)]
    feats = extract_features(llama, seqs, [-1], topk=8)
    return [Example(torch.tensor(q.ids), f["features"], f["top_ids"], f["top_probs"],
                    len(q.prompt)) for q, f in zip(seqs, feats)]


def test_load_prompts_formats(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"instruction": "Sort these", "instances": [{"input": "3 1 2"}]}\n'
                 '{"prompt": "Hello"}\n{"turns": ["First turn", "second"]}\n\n')
    assert load_prompts(f) == ["Sort these\n\n3 1 2", "Hello", "First turn"]
    g = tmp_path / "p.txt"
    g.write_text("one prompt\n\nanother\n")
    assert load_prompts(g) == ["one prompt", "another"]
    (tmp_path / "bad.jsonl").write_text('{"nothing": 1}\n')
    with pytest.raises(ValueError, match="instruction/prompt/text/turns"):
        load_prompts(tmp_path / "bad.jsonl")


def test_draft_vocab_prefers_what_the_target_emits():
    ex = Example(ids=torch.tensor([1, 2, 3, 3]), features=torch.zeros(4, 2),
                 top_ids=torch.tensor([[7], [7], [9], [7]]), top_probs=torch.ones(4, 1))
    assert build_draft_vocab([ex], 20, 2).tolist() == [7, 9]
    assert build_draft_vocab([ex], 20, 5).tolist() == [1, 2, 3, 7, 9]
    assert build_draft_vocab([ex], 20, 20).tolist() == list(range(20))


def _net(kind, llama, heads=3):
    torch.manual_seed(0)
    cfg = HeadConfig(kind=kind, hidden_size=32, vocab_size=VOCAB, draft_vocab_size=VOCAB,
                     num_heads=heads, num_attention_heads=4)
    return build_net(cfg).bind(llama.get_input_embeddings(),
                               llama.get_output_embeddings().weight)


@pytest.mark.parametrize("kind", ["medusa", "clover", "clover2", "eagle"])
def test_training_improves_the_head(llama, examples, kind):
    train, held = examples[:20], examples[20:]
    settings = TrainSettings.for_kind(kind, epochs=6, batch_size=4, lr=3e-3, warmup=2)
    net = _net(kind, llama)
    to_draft = torch.arange(VOCAB)
    before = evaluate(net, held, settings, to_draft)
    train_head(net, train, held, settings)
    after = evaluate(net, held, settings, to_draft)
    assert after["loss"] < before["loss"]
    assert after["top1"][1] > before["top1"][1]


def test_responses_only_counts_accuracy_from_the_last_prompt_token(llama, examples):
    """``responses_only`` counts depth ``d``'s accuracy over positions ``t`` from the last prompt
    token (``prompt_len - 1``) to ``T - d``, the positions a drafter drafts from; the loss is the
    same either way."""
    settings = TrainSettings.for_kind("clover")
    net = _net("clover", llama)
    batch = [(ex, 0, ex.ids.shape[0]) for ex in examples[:3]]
    to_draft = torch.arange(VOCAB)
    loss_all, all_positions = head_loss(net, _collate(batch), settings, to_draft)
    loss_resp, answers = head_loss(net, _collate(batch, responses_only=True), settings,
                                   to_draft)
    assert loss_all.item() == pytest.approx(loss_resp.item())
    for d in (1, 2, 3):
        assert all_positions[d][2] == sum(ex.ids.shape[0] - d for ex, _, _ in batch)
        assert answers[d][2] == sum(ex.ids.shape[0] - d - (ex.prompt_len - 1)
                                    for ex, _, _ in batch)


def test_evaluate_head_on_unseen_prompts_sees_training(llama, examples):
    """``evaluate_head``: the target answers prompts it was not trained on, teacher-forced
    through the head by depth, plus a real speculative run at fixed depth; a trained head
    scores above the same head untrained, on all three."""
    rng = random.Random(99)
    tok = tiny_tokenizer()
    prompts = [" ".join(rng.choice(WORDS[:12]) for _ in range(8)) for _ in range(4)]
    before_net = _net("clover", llama)
    before = evaluate_head(llama, tok, before_net, prompts, max_new_tokens=24,
                           acceptance_prompts=4)
    net = _net("clover", llama)
    train_head(net, examples, [], TrainSettings.for_kind("clover", epochs=6, batch_size=4,
                                                         lr=3e-3, warmup=2))
    after = evaluate_head(llama, tok, net, prompts, max_new_tokens=24, acceptance_prompts=4)
    assert after["prompts"] == 4 and 0 < after["answer_tokens"] <= 4 * 24
    assert after["coverage"] == 1.0  # the draft vocabulary is the whole vocabulary here
    assert set(after["top1"]) == {1, 2, 3}
    assert after["top1"][1] > before["top1"][1]
    assert (after["acceptance"]["mean_accepted_per_step"]
            > before["acceptance"]["mean_accepted_per_step"])
    assert after["depth"] == 3
    with pytest.raises(ValueError, match="at least one prompt"):
        evaluate_head(llama, tok, net, [])
    eagle = evaluate_head(llama, tok, _net("eagle", llama), prompts[:1], max_new_tokens=8,
                          acceptance_prompts=1)
    assert eagle["depth"] == 3  # as trained (num_heads), not the 64 EAGLE could chain


def test_training_resumes_from_its_state(tmp_path, llama, examples):
    settings = TrainSettings.for_kind("medusa", epochs=2, batch_size=4, save_every=1000)
    one = TrainSettings.for_kind("medusa", epochs=1, batch_size=4, save_every=1000)
    first = train_head(_net("medusa", llama), examples, [], one, state_dir=tmp_path / "s")
    resumed_net = _net("medusa", llama)
    resumed = train_head(resumed_net, examples, [], settings, state_dir=tmp_path / "s")
    straight_net = _net("medusa", llama)
    straight = train_head(straight_net, examples, [], settings)
    assert resumed.steps == straight.steps == 2 * first.steps
    for (k, a), b in zip(resumed_net.state_dict().items(), straight_net.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


def test_specplug_train_end_to_end(tmp_path, capsys):
    folder = tmp_path / "tiny"
    tiny_llama(0).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    rng = random.Random(0)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(" ".join(rng.choice(WORDS[:12]) for _ in range(8))
                                 for _ in range(12)) + "\n")
    out = tmp_path / "head"
    rc = main(["train", "--model", str(folder), "--drafter", "clover", "--data", str(prompts),
               "--no-seed-tasks", "--expand", "0", "--max-new-tokens", "16", "--epochs", "1",
               "--num-heads", "3", "--draft-vocab", "64", "--cache", str(tmp_path / "cache"),
               "--out", str(out), "--no-progress"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["kind"] == "clover" and report["config"]["draft_vocab_size"] == 64
    assert set(report["heldout"]["top1"]) == {"1", "2", "3"}
    assert (out / "model.safetensors").is_file() and (out / "report.md").is_file()
    capsys.readouterr()
    rc = main(["run", "--model", str(folder), "--method", "clover", "--option",
               f"checkpoint={out}", "--num-speculative-tokens", "3", "--prompt",
               " ".join(WORDS[:6]), "--max-new-tokens", "8", "--compare", "--json"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["identical"] is True
    rc = main(["train", "--model", str(folder), "--drafter", "ngram", "--out", str(out)])
    assert rc == 2  # not a trainable head: a clear error, not a traceback
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps({"question_id": i, "category": "c", "turns": [
        " ".join(rng.choice(WORDS[:12]) for _ in range(8))]}) + "\n" for i in range(3)))
    capsys.readouterr()
    rc = main(["evaluate", "--model", str(folder), "--drafter", "clover", "--checkpoint",
               str(out), "--prompts", str(questions), "--max-new-tokens", "8",
               "--out", str(tmp_path / "eval")])
    assert rc == 0
    result = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert result["prompts"] == 3 and set(result["top1"]) == {"1", "2", "3"}
    assert "| 1 |" in capsys.readouterr().out
    rc = main(["evaluate", "--model", str(folder), "--drafter", "eagle", "--checkpoint",
               str(out), "--prompts", str(questions)])
    assert rc == 2  # the checkpoint holds a clover head: named, with the fix


def test_specplug_train_msd_two_stages_on_a_vlm(tmp_path):
    """``specplug train --drafter msd`` on a tiny LLaVA folder (model + processor): a text-only
    stage from prompts, then a multimodal stage from image prompts (the target answers with the
    image), starting from an eagle head; the head records the target's image placeholder and
    keeps the output identical on image prompts."""
    from PIL import Image
    from tiny_models import IMAGE_ID, reference_vlm_greedy, tiny_llava, vlm_prompts
    from transformers import CLIPImageProcessor, LlavaProcessor

    folder = tmp_path / "tiny-llava"
    model = tiny_llava(0)
    model.save_pretrained(folder)
    tok = tiny_tokenizer()
    image_token = tok.convert_ids_to_tokens(IMAGE_ID)
    tok.add_special_tokens({"additional_special_tokens": [image_token]})  # split out, id kept
    LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 8},
                                                      crop_size={"height": 8, "width": 8}),
                   tokenizer=tok, patch_size=4, vision_feature_select_strategy="default",
                   image_token=image_token, num_additional_image_tokens=1
                   ).save_pretrained(folder)
    rng = random.Random(0)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(" ".join(rng.choice(WORDS[:12]) for _ in range(8))
                                 for _ in range(10)) + "\n")
    lines = []
    for i in range(6):
        pixels = (torch.rand(8, 8, 3, generator=torch.Generator().manual_seed(i)) * 255)
        Image.fromarray(pixels.to(torch.uint8).numpy()).save(tmp_path / f"img{i}.png")
        lines.append(json.dumps({"image": f"img{i}.png",
                                 "prompt": " ".join(rng.choice(WORDS[:12]) for _ in range(5))}))
    images = tmp_path / "images.jsonl"
    images.write_text("\n".join(lines) + "\n")
    eagle = tmp_path / "eagle"
    common = ["--model", str(folder), "--data", str(prompts), "--no-seed-tasks", "--expand", "0",
              "--max-new-tokens", "10", "--epochs", "1", "--num-heads", "3", "--draft-vocab",
              "64", "--cache", str(tmp_path / "cache"), "--no-progress"]
    assert main(["train", "--drafter", "eagle", *common, "--out", str(eagle)]) == 0
    out = tmp_path / "msd"
    assert main(["train", "--drafter", "msd", *common, "--image-data", str(images),
                 "--stage2-epochs", "2", "--init", str(eagle), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["media_tokens"] == [IMAGE_ID]
    assert report["config"]["hidden_layers"] == [-1, 0]
    assert set(report["stages"]) == {"text", "multimodal"}
    assert report["stages"]["multimodal"]["examples"] >= 5
    assert "acceptance_on_image_prompts" in report["stages"]["multimodal"]
    from specplug.heads.checkpoint import load_head

    head = load_head(out)
    assert IMAGE_ID not in head.draft_vocab.tolist()  # never proposes a placeholder
    ids, mask, inputs = vlm_prompts("llava", [["text:4", "image", "text:5"]])
    got = sh.generate(model, ids, mask, max_new_tokens=12, method="msd", checkpoint=str(out),
                      num_speculative_tokens=3, **inputs)
    assert got[0, ids.shape[1]:].tolist() == reference_vlm_greedy(model, ids, mask, inputs,
                                                                   12)[0]
    # an image-prompt file for a head that reads no images is refused
    assert main(["train", "--drafter", "eagle", *common, "--image-data", str(images),
                 "--out", str(tmp_path / "bad")]) == 2
