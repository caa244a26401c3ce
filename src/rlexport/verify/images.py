"""verify on a vision-language export: the model class to load, and an image prompt both sides score.

The text prompts alone never run the vision tower; a trained tower exported wrong (or left untrained) shows
only on a prompt with an image. The picture is drawn here (deterministic, no file); the prompt is a chat rendered
by each side's own processor and chat template, so a lost or different processor file shows up too.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .. import archs

QUESTION = "Describe the picture."


def model_class(config: dict):
    """The transformers auto class a folder of this config loads as: image-text-to-text for vision-language."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    return AutoModelForImageTextToText if archs.vision_of(config) is not None else AutoModelForCausalLM


def picture():
    """A 84x56 RGB picture with structure in both directions (gradients and a block), the same every run."""
    from PIL import Image
    y, x = torch.meshgrid(torch.arange(56), torch.arange(84), indexing="ij")
    rgb = torch.stack([x * 3, y * 4, ((x // 14 + y // 14) % 2) * 200], -1).clamp(0, 255).to(torch.uint8)
    return Image.fromarray(rgb.numpy(), "RGB")


def image_inputs(processor_dir: Path | None, config: dict):
    """The processor's inputs for one chat turn holding the picture (None: not a vision-language model)."""
    if processor_dir is None or archs.vision_of(config) is None:
        return None
    from transformers import AutoProcessor
    processor = AutoProcessor.from_pretrained(processor_dir)
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    return processor(text=[text], images=[picture()], return_tensors="pt")


@torch.no_grad()
def image_logprobs(model, inputs) -> list[list[float]]:
    """One row: log p(token j | tokens before it, picture) for every token of the rendered chat after the first."""
    if inputs is None:
        return []
    ids = inputs["input_ids"][0]
    lp = torch.log_softmax(model(**inputs).logits[0].float(), -1)
    return [[float(lp[j - 1, ids[j]]) for j in range(1, len(ids))]]
