"""A vision-language export's own files: the processor's configs, the chat template, the tokenizer, the tower.

vLLM refuses to start a Qwen2-VL/2.5-VL folder without its image processor's config (`OSError: Can't load image
processor`), even for text prompts; without a chat template token prompts work but `LLM.chat` fails
(ChatTemplateResolutionError). Files only: nothing here imports transformers or reads tensor data.
"""
from __future__ import annotations

import json
from pathlib import Path

from .. import archs
from .report import Check, failed, passed, skipped

S = "structure"
IMAGE = ("preprocessor_config.json", "processor_config.json")  # transformers < 5 / transformers 5 (both sections)
TEMPLATES = ("chat_template.jinja", "chat_template.json")
TOKENIZERS = ("tokenizer.json", "tokenizer.model", "vocab.json")


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def missing_files(folder: Path) -> list[str]:
    """What a vision-language model's folder lacks for vLLM to serve it with images and chats."""
    missing = []
    if not (folder / "preprocessor_config.json").is_file() and \
            "image_processor" not in _json(folder / "processor_config.json"):
        missing.append("preprocessor_config.json or processor_config.json (the image processor; vLLM: OSError: "
                       "Can't load image processor)")
    if not any((folder / n).is_file() for n in TEMPLATES) and \
            "chat_template" not in _json(folder / "tokenizer_config.json"):
        missing.append("chat_template.jinja (LLM.chat: ChatTemplateResolutionError)")
    if not any((folder / n).is_file() for n in TOKENIZERS):
        missing.append("tokenizer.json (the processor's tokenizer)")
    return missing


def missing_tower(config: dict, names) -> str | None:
    """The vision tower's prefix when no tensor is under it (an export would serve an untrained tower)."""
    vision = archs.vision_of(config)
    if vision is None:
        return None
    names = list(names)
    prefixes = {p for t in vision.tower for p in (t, archs.to_memory(config, t))}
    return None if any(n.startswith(tuple(prefixes)) for n in names) else vision.tower[0]


def check_processor(f, source=None) -> Check:
    """`processor`: a vision-language export carries its processor files, chat template, tokenizer and tower."""
    cfg = f.config or {}
    if archs.vision_of(cfg) is None:
        return skipped("processor", S, "not a vision-language model")
    problems = [f"missing {m}" for m in missing_files(Path(f.path))]
    tower = missing_tower(cfg, f.refs) if f.refs else None
    if tower is not None:
        problems.append(f"no vision tower tensors ({tower}*): the model would see images through random weights")
    if problems:
        return failed("processor", S, problems[0], problems[1:])
    present = [n for n in ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
                           *TEMPLATES) if (Path(f.path) / n).is_file()]
    return passed("processor", S, f"processor files present: {', '.join(present)}")
