"""Hugging Face model folders: config.json + model*.safetensors (or pytorch_model*.bin).

Covers full fine-tunes from LLaMA-Factory (fp32, value head split into value_head.safetensors) and TRL's
value-head wrapper (v_head.* inside the weights, sometimes under a `pretrained_model.` prefix).
"""
from __future__ import annotations

from pathlib import Path

from . import Source
from .common import (find_value_head, has_tokenizer, model_weights, pieces_beside, resolve_base,
                     trainer_stage)
from .files import read_json, weight_files


def detect(path: Path) -> bool:
    return (path / "config.json").is_file() and bool(weight_files(path))


def read(path: Path, *, base=None) -> Source:
    config = read_json(path / "config.json")
    weights = model_weights(path)
    head, head_file = find_value_head(path, weights)
    producer, stage = trainer_stage(path, bool(head))
    if any(r.name.startswith("pretrained_model.") for r in weights):
        producer = "trl"
    base_dir = resolve_base(base, relative_to=path, explicit=True) if base is not None else None
    base_config = read_json(base_dir / "config.json") if base_dir else None
    dirs = [d for d in (path, base_dir) if d is not None and has_tokenizer(d)]
    return Source(
        kind="hf", path=path, producer=producer, stage=stage, config=config, config_dir=path,
        weights=tuple(weights), value_head=head, value_head_file=head_file, tokenizer_dirs=tuple(dirs),
        base_dir=base_dir, base_config=base_config, pieces=pieces_beside(path),
    )
