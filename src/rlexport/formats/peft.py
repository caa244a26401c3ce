"""PEFT adapter folders: adapter_config.json + adapter_model.safetensors (or .bin), base resolved separately.

LLaMA-Factory PPO/RM and TRL with a PEFT config put the value head beside the adapter
(`value_head.safetensors`, or TRL's `pytorch_model.bin` holding only `v_head.*`).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ..errors import RlexportError
from ..lora import apply_adapter, read_adapter
from . import Source
from .common import (find_value_head, has_tokenizer, model_weights, pieces_beside, resolve_base,
                     trainer_stage)
from .common import json_or_empty
from .files import read_json, refs_of
from .value_heads import causal_config

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


def select(path: Path, *, tag: str | None = None, adapter: str | None = None) -> Path | None:
    """The registry's hook: the adapter folder `--adapter NAME` names (None: a --tag is being resolved)."""
    return None if tag is not None else select_adapter(path, adapter)


def select_adapter(path: str | Path, name: str | None) -> Path:
    """The folder to read for `--adapter NAME` (None: the root's adapter, or the only one)."""
    path = Path(path)
    found = adapters_in(path) if path.is_dir() and not (path / "config.json").is_file() else {}
    if name is None:
        if "default" not in found and any((path / f).is_file() for f in ADAPTER_FILES):
            return path  # the root's own adapter is meant (a reward/ beside it is not): read() names what is missing
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
        beside = [p.name + "/" for p in sorted(path.iterdir()) if p.is_dir() and (p / "adapter_config.json").is_file()
                  and not p.name.startswith("checkpoint-")]
        also = f" (the adapter in {', '.join(beside)} is another model's, not this one)" if beside else ""
        raise RlexportError("adapter-without-config", f"adapter weights without adapter_config.json{also}",
                            file=path, hint="copy adapter_config.json from the training run (a checkpoint-N/ "
                            "folder of the same run holds one with the same settings)")
    config = read_json(cfg_file)
    adapter = read_adapter(path, config, refs_of([adapter_file(path)]))
    base_dir = resolve_base(base if base is not None else config.get("base_model_name_or_path"),
                            relative_to=path, explicit=base is not None)
    base_config = read_json(base_dir / "config.json")
    adapter = adapter.bind(base_config)  # the merge needs the architecture and the tied-embeddings flag
    head_files = [f for f in ("pytorch_model.bin",) if (path / f).is_file()]
    head, head_file = find_value_head(path, refs_of([path / f for f in head_files]) if head_files else [])
    weights = model_weights(base_dir)
    adapter, sequence_head, weights = _sequence_head(path, adapter, weights)
    producer, stage = trainer_stage(path, bool(head))
    info, config = None, base_config
    if sequence_head is not None:
        info, head = sequence_head
        head_file, producer, stage = Path(head[0].origin or path), "openrlhf", \
            "rm" if info.pooling == "last" else "critic"
        config = causal_config(base_config, file=base_dir / "config.json")  # a critic's base may be the RM
    if is_reward_adapter(path) and not head:
        stage = "ppo-reward-adapter"
    if producer == "transformers":
        producer = "trl" if head_file is not None and head_file.name == "pytorch_model.bin" else "peft"
    return Source(
        kind="peft", path=path, producer=producer, stage=stage, config=config, config_dir=base_dir,
        weights=tuple(weights), adapter=adapter, value_head=head, value_head_file=head_file,
        tokenizer_dirs=tuple(d for d in (path, base_dir) if has_tokenizer(d)), base_dir=base_dir,
        base_config=base_config, pieces=pieces_beside(path), head_info=info,
    )


def _sequence_head(path: Path, adapter, base_weights: list):
    """An OpenRLHF LoRA reward model or critic: the head named by value_head_prefix in the config.json saved beside
    the adapter. Saved whole (modules_to_save), it is the value head. Trained as a LoRA target (all-linear), its
    base weight is the base's when the base has one: OpenRLHF's PPO critic starts from the reward model, so the
    delta is merged into the RM's head (in float32). A LoRA reward model started from a plain LLM initialised its
    head at random in memory and never saved it: nothing can rebuild it.

    Returns the adapter without the head's pieces, (HeadInfo, head tensors) or None, and the base weights without
    the head."""
    cfg = json_or_empty(path / "config.json")
    if "value_head_prefix" not in cfg:
        return adapter, None, base_weights
    prefix = str(cfg.get("value_head_prefix") or "score")
    names = (f"{prefix}.weight", f"{prefix}.bias")
    lora_on_head = [u for u in adapter.updates if u.target in names]
    whole = {n: r for n, r in adapter.full.items() if n in names}
    in_base = [r for r in base_weights if r.name in names]
    if lora_on_head and not whole and not in_base:
        raise RlexportError("head-not-saved", f"the adapter trains the reward head '{prefix}' as a LoRA target, but "
                            f"the head's own weight was initialised at random in memory and never saved, and the "
                            f"base has no '{prefix}' either (OpenRLHF LoRA reward models and critics started from a "
                            f"plain LLM)", file=path / "adapter_config.json",
                            hint="export the full model saved by the training run instead, or retrain with the "
                                 f"head in modules_to_save; no exporter can rebuild '{prefix}'")
    if not whole and not in_base:
        return adapter, None, base_weights
    if lora_on_head and whole:
        raise RlexportError("unsupported-lora-variant", f"'{prefix}' is both saved whole and a LoRA target",
                            file=path / "adapter_config.json", hint="merge it with PEFT and export the merged model")
    from .value_heads import OPENRLHF_CLASSES, HeadInfo, _norm
    # PEFT's auto_mapping names the class that was trained; the config.json beside the adapter keeps the base's
    # architectures (a critic started from the RM says RewardModel)
    arch = str((adapter.config.get("auto_mapping") or {}).get("base_model_class") or "")
    if arch not in OPENRLHF_CLASSES:
        arch = str((cfg.get("architectures") or [""])[0])
    mean, std = _norm(cfg, path / "config.json")
    info = HeadInfo("openrlhf", prefix, "token" if arch == "CriticModel" else "last", mean, std,
                    bool(cfg.get("normalize_reward")))
    body = [r for r in base_weights if r.name not in names]
    if whole:
        rest = {n: r for n, r in adapter.full.items() if n not in names}
        head = tuple(r.renamed(n) for n, r in whole.items())
        return dataclasses.replace(adapter, full=rest, copies=adapter.copies - set(names)), (info, head), body
    head = tuple(in_base)
    if lora_on_head:  # base head + its LoRA delta, float32, merged as every other target is
        only_head = dataclasses.replace(adapter, updates=tuple(lora_on_head), full={}, copies=frozenset())
        head = tuple(apply_adapter(list(in_base), only_head))
    rest = tuple(u for u in adapter.updates if u.target not in names)
    return dataclasses.replace(adapter, updates=rest), (info, head), body
