"""Hugging Face model folders: config.json + model*.safetensors (or pytorch_model*.bin).

Covers full fine-tunes from LLaMA-Factory (fp32, value head split into value_head.safetensors) and TRL's
value-head wrapper (v_head.* inside the weights, sometimes under a `pretrained_model.` prefix).
"""
from __future__ import annotations

import re
from pathlib import Path

from . import Source
from ..tensors import FLOATS
from .common import (find_value_head, has_tokenizer, model_weights, pieces_beside, resolve_base,
                     trainer_stage)
from .files import read_json, weight_files
from .value_heads import VALUE_HEAD_FILES, causal_config, detect_head


def detect(path: Path) -> bool:
    return (path / "config.json").is_file() and bool(weight_files(path))


def read(path: Path, *, base=None) -> Source:
    config = read_json(path / "config.json")
    weights = model_weights(path)
    head, head_file = find_value_head(path, weights)
    producer, stage = trainer_stage(path, bool(head))
    info = None
    if not head:
        found = detect_head(config, weights, file=path / "config.json")
        if found is not None:  # a reward model or critic saved whole: the head is one of the model's tensors
            info, head = found
            head_file = Path(head[0].origin)
            weights = [r for r in weights if r.name not in {h.name for h in head}]
            config = causal_config(config, file=path / "config.json")
            stage = "rm" if info.pooling == "last" else "critic"
            producer = "openrlhf" if info.convention == "openrlhf" else producer
    if any(r.name.startswith("pretrained_model.") for r in weights) or \
            (head and producer == "transformers" and head_file not in {path / f for f in VALUE_HEAD_FILES}):
        producer = "trl"  # TRL's value-head wrapper keeps v_head.* inside the model weights
    base_dir = resolve_base(base, relative_to=path, explicit=True) if base is not None else None
    base_config = read_json(base_dir / "config.json") if base_dir else None
    dirs = [d for d in (path, base_dir) if d is not None and has_tokenizer(d)]
    return Source(
        kind="hf", path=path, producer=producer, stage=stage, config=config, config_dir=path,
        weights=tuple(weights), value_head=head, value_head_file=head_file, tokenizer_dirs=tuple(dirs),
        base_dir=base_dir, base_config=base_config, pieces=pieces_beside(path) + _raw_checkpoints(path, weights),
        head_info=info,
    )


def _raw_checkpoints(path: Path, weights) -> tuple:
    """ZeRO-3 [0] placeholders: point at the raw DeepSpeed checkpoints of the run that hold the real weights
    (a folder holding `latest` itself is read by the deepspeed reader instead)."""
    from . import Piece
    from .deepspeed import has_raw_checkpoint
    if not any(r.numel == 0 and r.dtype in FLOATS for r in weights):
        return ()
    found = [d for d in sorted(path.glob("checkpoint-*")) if d.is_dir() and has_raw_checkpoint(d)]
    return tuple(Piece("raw-checkpoint", d, f"the weights here are empty ZeRO-3 placeholders; the real ones are in "
                       f"this DeepSpeed checkpoint: rlexport export {d}") for d in found)


CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def steps(path: Path) -> list | None:
    """The registry's hook (for hf and peft runs alike): the `checkpoint-N/` folders of a trainer's output folder,
    oldest first. The HF Trainer writes trainer_state.json after the model, optimizer and DeepSpeed state
    (`Trainer._save_checkpoint`): a checkpoint is complete once it is there. LLaMA-Factory's PPO trainer saves
    only the model and its value head, with no marker: such a checkpoint counts as complete and `serve --follow`
    waits until its files stop changing."""
    from . import Step
    try:
        found = sorted((d for d in Path(path).iterdir() if CHECKPOINT_RE.match(d.name) and d.is_dir()),
                       key=lambda d: int(CHECKPOINT_RE.match(d.name).group(1)))
    except OSError:
        return None
    if not found:
        return None
    lf_run = (Path(path) / "trainer_log.jsonl").is_file()  # LLaMA-Factory's LogCallback, from the first step
    out = []
    for d in found:
        if (d / "trainer_state.json").is_file():
            out.append(Step(d.name, d, True))
        elif lf_run and any((d / f).is_file() for f in VALUE_HEAD_FILES) and not (d / "optimizer.pt").exists():
            out.append(Step(d.name, d, True, "LLaMA-Factory PPO writes no completion marker: complete once its "
                                             "files stop changing"))
        else:
            out.append(Step(d.name, d, False, "no trainer_state.json yet (the Trainer writes it last)"))
    return out
