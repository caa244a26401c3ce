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


def is_reward_adapter(path: Path) -> bool:
    """LLaMA-Factory PPO with reward_model_type: lora saves the reward adapter in `<ckpt>/reward/` (PEFT writes
    non-default adapters to a subfolder named after them); its value head lives only in memory."""
    return path.name == "reward" and detect(path.parent)


def adapters_in(path: Path) -> dict[str, Path]:
    """The adapters of a PEFT folder by name: `default` at the root, the others in `<name>/` (PeftModel.
    save_pretrained with several adapters)."""
    found = {"default": path} if (path / "adapter_config.json").is_file() else {}
    if path.is_dir():
        for sub in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(("checkpoint-", "."))):
            if (sub / "adapter_config.json").is_file():
                found.setdefault(sub.name, sub)
    return found


def select_adapter(path: str | Path, name: str | None) -> Path:
    """The folder to read for `--adapter NAME` (None: the root's adapter, or the only one)."""
    path = Path(path)
    found = adapters_in(path) if path.is_dir() and not (path / "config.json").is_file() else {}
    if name is None:
        if "default" in found or len(found) <= 1:
            return next(iter(found.values()), path)
        raise RlexportError("several-adapters", f"the folder holds adapters {', '.join(found)}", file=path,
                            hint="pick one with --adapter NAME")
    if name not in found:
        what = f"adapters {', '.join(found)}" if found else "no PEFT adapter"
        raise RlexportError("adapter-not-found", f"no adapter '{name}' here (the folder holds {what})", file=path,
                            hint="pass one of the names listed, or the adapter's own folder")
    return found[name]


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
    adapter = adapter.bind(base_config)  # the merge needs the architecture and the tied-embeddings flag
    head_files = [f for f in ("pytorch_model.bin",) if (path / f).is_file()]
    head, head_file = find_value_head(path, refs_of([path / f for f in head_files]) if head_files else [])
    producer, stage = trainer_stage(path, bool(head))
    if is_reward_adapter(path) and not head:
        stage = "ppo-reward-adapter"
    if producer == "transformers":
        producer = "trl" if head_file is not None and head_file.name == "pytorch_model.bin" else "peft"
    return Source(
        kind="peft", path=path, producer=producer, stage=stage, config=base_config, config_dir=base_dir,
        weights=tuple(model_weights(base_dir)), adapter=adapter, value_head=head, value_head_file=head_file,
        tokenizer_dirs=tuple(d for d in (path, base_dir) if has_tokenizer(d)), base_dir=base_dir,
        base_config=base_config, pieces=pieces_beside(path),
    )
