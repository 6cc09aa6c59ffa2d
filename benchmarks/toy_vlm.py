"""A small vision-language model that specplug assembles and trains on this machine.

No real VLM ships in a PyPI package (checked 2026-11-24, see docs/multimodal.md), and nothing
may come from a hub, so the multimodal measurements run on this one: **LLaVA architecture, the
real SmolLM2-135M-Instruct as its language model (frozen, unchanged), a small CLIP vision tower
and a two-layer projector trained here from scratch** on synthetic image-caption pairs (coloured
shapes on coloured backgrounds; captions name colour, shape and place). It is a real VLM in the
sense that matters for speculation: its answers depend on the image, its decoding is
SmolLM2's. It is not a capable one.

The image placeholder is SmolLM2's unused special token ``<jupyter_script>`` (id 15), so the
vocabulary stays SmolLM2's and text-only drafters (the draft model, the shipped EAGLE head) fit.

    python benchmarks/toy_vlm.py --out ~/.cache/specplug/models/smollm2-135m-toyvlm

writes an HF folder (model, tokenizer, processor, ``toy-vlm.json`` with the training log) that
``transformers.AutoModelForImageTextToText`` / ``AutoProcessor`` and ``specplug.models.load_model``
load offline.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

IMAGE_TOKEN = "<jupyter_script>"
SIZE, PATCH = 64, 16  # 4 x 4 patches: 16 placeholder tokens per image
COLORS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220),
          "yellow": (240, 220, 40), "purple": (140, 50, 170), "orange": (245, 140, 20),
          "white": (245, 245, 245), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle")
PLACES = {"top left": (16, 16), "top right": (48, 16), "bottom left": (16, 48),
          "bottom right": (48, 48), "center": (32, 32)}
QUESTIONS = ("Describe the image.", "What do you see in this picture?",
             "What is in the image? Answer in one sentence.")


def draw(rng: random.Random) -> tuple[np.ndarray, str]:
    """One synthetic image ``[64, 64, 3]`` uint8 and its caption."""
    bg_name = rng.choice(["white", "black", "gray"])
    bg = (128, 128, 128) if bg_name == "gray" else COLORS[bg_name]
    img = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    img[:] = bg
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    parts = []
    for place in rng.sample(list(PLACES), rng.choice([1, 1, 2])):
        color = rng.choice([c for c in COLORS if c != bg_name])
        shape = rng.choice(SHAPES)
        big = rng.random() < 0.5
        r = 12 if big else 7
        cx, cy = PLACES[place]
        if shape == "circle":
            m = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        elif shape == "square":
            m = (abs(xx - cx) <= r) & (abs(yy - cy) <= r)
        else:
            m = (yy - cy <= r) & (yy - cy >= -r) & (abs(xx - cx) <= (yy - cy + r) / 2)
        img[m] = COLORS[color]
        parts.append(f"a {'large' if big else 'small'} {color} {shape} in the {place}")
    caption = f"The image shows {' and '.join(parts)}, on a {bg_name} background."
    return img, caption


def processor_for(tokenizer: Any) -> Any:
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(size={"shortest_edge": SIZE},
                                         crop_size={"height": SIZE, "width": SIZE},
                                         image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                          patch_size=PATCH, vision_feature_select_strategy="default",
                          image_token=IMAGE_TOKEN, num_additional_image_tokens=1,
                          chat_template=tokenizer.chat_template)


def prompt_text(tokenizer: Any, question: str) -> str:
    """The chat-formatted user turn with one image before the question."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": f"{IMAGE_TOKEN}\n{question}"}], tokenize=False,
        add_generation_prompt=True)


def build(lm: Any, tokenizer: Any, seed: int = 0) -> Any:
    """LLaVA around ``lm`` (weights shared, frozen) with a fresh vision tower + projector."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                              num_attention_heads=4, image_size=SIZE, patch_size=PATCH)
    cfg = LlavaConfig(vision_config=vision, text_config=lm.config,
                      image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                      vision_feature_layer=-1, vision_feature_select_strategy="default",
                      image_seq_length=(SIZE // PATCH) ** 2, projector_hidden_act="gelu",
                      tie_word_embeddings=lm.config.tie_word_embeddings)
    vlm = LlavaForConditionalGeneration(cfg)
    vlm.model.language_model.load_state_dict(lm.model.state_dict())
    vlm.lm_head.weight = vlm.model.language_model.embed_tokens.weight \
        if lm.config.tie_word_embeddings else torch.nn.Parameter(lm.lm_head.weight.detach())
    vlm.generation_config = lm.generation_config
    return vlm.eval()


def batch_of(processor: Any, tokenizer: Any, rng: random.Random, n: int) -> dict[str, Any]:
    """``n`` (image, question, caption) training examples; labels on the caption only."""
    images, texts, prompts = [], [], []
    for _ in range(n):
        img, caption = draw(rng)
        p = prompt_text(tokenizer, rng.choice(QUESTIONS))
        images.append(img)
        prompts.append(p)
        texts.append(p + caption + "<|im_end|>")
    tokenizer.padding_side = "right"
    enc = processor(images=images, text=texts, return_tensors="pt", padding=True)
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    for b, p in enumerate(prompts):
        n_prompt = len(processor(images=images[b], text=p, return_tensors="pt")["input_ids"][0])
        labels[b, :n_prompt] = -100
    enc["labels"] = labels
    return dict(enc)


def train(vlm: Any, processor: Any, tokenizer: Any, steps: int, batch: int, lr: float,
          seed: int, log_every: int = 10) -> list[dict[str, float]]:
    """Train the vision tower and projector (the language model stays frozen)."""
    for p in vlm.parameters():
        p.requires_grad_(False)
    trainable = [*vlm.model.vision_tower.parameters(),
                 *vlm.model.multi_modal_projector.parameters()]
    for p in trainable:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    history = []
    vlm.train()
    t0 = time.perf_counter()
    for step in range(steps):
        scale = min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = lr * scale
        loss = vlm(**batch_of(processor, tokenizer, rng, batch)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % log_every == 0 or step == steps - 1:
            history.append({"step": step, "loss": round(float(loss), 4),
                            "s": round(time.perf_counter() - t0, 1)})
            print(history[-1], flush=True)
    vlm.eval()
    for p in vlm.parameters():
        p.requires_grad_(False)
    return history


@torch.no_grad()
def caption_accuracy(vlm: Any, processor: Any, tokenizer: Any, n: int = 24, seed: int = 99
                     ) -> dict[str, float]:
    """Held-out images: how often the greedy answer names the first shape's colour and shape."""
    rng = random.Random(seed)
    hits = {"color": 0, "shape": 0}
    for _ in range(n):
        img, caption = draw(rng)
        enc = processor(images=img, text=prompt_text(tokenizer, QUESTIONS[0]),
                        return_tensors="pt")
        out = vlm.generate(**enc, max_new_tokens=24, do_sample=False)
        answer = tokenizer.decode(out[0, enc["input_ids"].shape[1]:]).lower()
        words = caption.split()
        color, shape = words[5], words[6]
        hits["color"] += color in answer
        hits["shape"] += shape in answer
    return {k: v / n for k, v in hits.items()}


#: questions of the multimodal benchmark and msd training data: a caption, then free text
LONG_QUESTIONS = ("Describe the image.",
                  "Describe the image, then write a short poem about it.",
                  "What is in the picture? Then explain what the colours might mean.",
                  "Describe the image and then tell a short story about the shapes.")


def image_prompts(count: int, seed: int) -> list[tuple[np.ndarray, str]]:
    """``count`` (image, question) pairs from ``seed`` (benchmark and training use disjoint
    seeds)."""
    rng = random.Random(seed)
    return [(draw(rng)[0], LONG_QUESTIONS[i % len(LONG_QUESTIONS)]) for i in range(count)]


def write_image_data(folder: Path, count: int, seed: int) -> Path:
    """PNG files and ``images.jsonl`` (``{"image", "prompt"}``) for ``specplug train
    --drafter msd --image-data``."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (img, question) in enumerate(image_prompts(count, seed)):
        Image.fromarray(img).save(folder / f"{i:04d}.png")
        lines.append(json.dumps({"image": f"{i:04d}.png", "prompt": question}))
    path = folder / "images.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--write-data", default=None, metavar="DIR",
                    help="only write synthetic image prompts (PNG + images.jsonl) to DIR")
    ap.add_argument("--count", type=int, default=120)
    ap.add_argument("--out")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true",
                    help="continue training the vision tower + projector saved in --out")
    args = ap.parse_args()
    if args.write_data:
        print(write_image_data(Path(args.write_data), args.count, seed=1000 + args.seed))
        return
    if not args.out:
        ap.error("--out is required")
    from specplug.models import load_model

    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out).expanduser()
    earlier: dict[str, Any] = {}
    if args.resume:
        vlm, tok = load_model(out)
        earlier = json.loads((out / "toy-vlm.json").read_text())
    else:
        lm, tok = load_model("smollm2-135m")
        vlm = build(lm, tok, args.seed)
    processor = processor_for(tok)
    t0 = time.perf_counter()
    seed = args.seed + len(earlier.get("runs", [])) + (1 if earlier else 0)
    history = train(vlm, processor, tok, args.steps, args.batch, args.lr, seed)
    wall = time.perf_counter() - t0
    acc = caption_accuracy(vlm, processor, tok)
    out.mkdir(parents=True, exist_ok=True)
    vlm.save_pretrained(out)
    processor.save_pretrained(out)
    report = {"what": "LLaVA: SmolLM2-135M-Instruct (frozen) + CLIP vision tower (4 layers, "
                      "256 wide, 64x64 images, 16x16 patches) + 2-layer projector, trained "
                      "here on synthetic coloured-shape captions",
              "image_token": IMAGE_TOKEN,
              "runs": [*earlier.get("runs", []),
                       {"steps": args.steps, "batch": args.batch, "lr": args.lr,
                        "train_wall_s": round(wall, 1), "history": history,
                        "heldout_caption_accuracy": acc}],
              "heldout_caption_accuracy": acc, "torch_threads": torch.get_num_threads()}
    (out / "toy-vlm.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
