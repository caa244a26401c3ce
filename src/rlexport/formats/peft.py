"""PEFT adapter folders: adapter_config.json + adapter_model.safetensors (or .bin), base resolved separately.

LLaMA-Factory PPO/RM and TRL with a PEFT config put the value head beside the adapter
(`value_head.safetensors`, or TRL's `pytorch_model.bin` holding only `v_head.*`).
"""
from __future__ import annotations

from pathlib import Path

from ..errors import RlexportError
from ..lora import read_adapter
from . import Source
from .common import (find_value_head, has_tokenizer, model_weights, pieces_beside, resolve_base,
                     trainer_stage)
from .files import read_json, refs_of

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def detect(path: Path) -> bool:
    return (path / "adapter_config.json").is_file() or any((path / f).is_file() for f in ADAPTER_FILES)


def adapter_file(path: Path) -> Path:
    for name in ADAPTER_FILES:
        if (path / name).is_file():
            return path / name
    raise RlexportError("missing-adapter-weights", "adapter_config.json but no adapter_model.safetensors",
                        file=path, hint="copy the adapter weights next to adapter_config.json")


def read(path: Path, *, base=None) -> Source:
    cfg_file = path / "adapter_config.json"
    if not cfg_file.is_file():
        raise RlexportError("adapter-without-config", "adapter weights without adapter_config.json", file=path,
                            hint="copy adapter_config.json from the training run")
    config = read_json(cfg_file)
    adapter = read_adapter(path, config, refs_of([adapter_file(path)]))
    base_dir = resolve_base(base if base is not None else config.get("base_model_name_or_path"),
                            relative_to=path, explicit=base is not None)
    base_config = read_json(base_dir / "config.json")
    head_files = [f for f in ("pytorch_model.bin",) if (path / f).is_file()]
    head, head_file = find_value_head(path, refs_of([path / f for f in head_files]) if head_files else [])
    producer, stage = trainer_stage(path, bool(head))
    if producer == "transformers":
        producer = "peft"
    return Source(
        kind="peft", path=path, producer=producer, stage=stage, config=base_config, config_dir=base_dir,
        weights=tuple(model_weights(base_dir)), adapter=adapter, value_head=head, value_head_file=head_file,
        tokenizer_dirs=tuple(d for d in (path, base_dir) if has_tokenizer(d)), base_dir=base_dir,
        base_config=base_config, pieces=pieces_beside(path),
    )
