"""Input kinds: a registry of format modules, each with `detect(path)` and `read(path, **options)`.

A format module turns a checkpoint folder into a `Source`: the model config, lazy base weights, and the
trained pieces beside them (adapter, value head). Nothing here reads tensor bytes.
"""
from __future__ import annotations

import errno
import importlib
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import RlexportError
from ..tensors import TensorRef


@dataclass(frozen=True)
class Format:
    kind: str
    module: str
    summary: str


# Order matters: the first format whose detect() matches wins (an adapter folder may also hold a config.json).
FORMATS: tuple[Format, ...] = (
    # a raw DeepSpeed checkpoint wins only where no complete HF/adapter weights are beside it (or --tag asks)
    Format("deepspeed", "rlexport.formats.deepspeed", "raw DeepSpeed ZeRO-1/2/3 checkpoint (latest + "
           "global_stepN/), fp32 weights rebuilt from the optimizer partitions"),
    Format("verl", "rlexport.formats.verl", "verl FSDP/FSDP2 checkpoint (latest_checkpointed_iteration.txt + "
           "global_step_N/actor|critic/ with one model_world_size_W_rank_R.pt per rank)"),
    Format("verl-megatron", "rlexport.formats.megatron", "verl Megatron checkpoint (global_step_N/actor/model/"
           "dist_ckpt/: torch distributed .metadata + .distcp, Megatron names mapped to Hugging Face)"),
    Format("peft", "rlexport.formats.peft", "PEFT adapter folder (LoRA), with or without a value head"),
    Format("hf", "rlexport.formats.hf", "Hugging Face model folder (full fine-tune), value head inside or beside"),
)


@dataclass(frozen=True)
class Piece:
    """Something in the checkpoint that is not the policy: a reward adapter, a head, trainer state."""

    kind: str  # "reward-adapter" | "value-head" | "trainer-state" | "checkpoint" | "raw-checkpoint"
    path: Path
    note: str


@dataclass(frozen=True)
class Source:
    kind: str                      # the Format.kind that read it
    path: Path                     # what the user passed
    producer: str                  # "llama-factory" | "trl" | "peft" | "transformers"
    stage: str | None              # "ppo" | "rm" | "critic" | "sft/dpo" | None when unknown
    config: dict                   # the model's config.json (the base's for an adapter)
    config_dir: Path               # where config.json / generation_config.json come from
    weights: tuple[TensorRef, ...]  # the model weights as stored (the base's for an adapter)
    adapter: object | None = None  # rlexport.lora.Adapter
    value_head: tuple[TensorRef, ...] = ()  # v_head.summary.weight, v_head.summary.bias
    value_head_file: Path | None = None
    tokenizer_dirs: tuple[Path, ...] = ()   # searched in order for tokenizer files
    base_dir: Path | None = None
    base_config: dict | None = None
    pieces: tuple[Piece, ...] = field(default=())
    head_info: object | None = None          # formats.value_heads.HeadInfo; None: TRL's v_head if value_head

    @property
    def head(self):
        """How the value head in `value_head` was saved and what it computes (None without a head)."""
        if not self.value_head:
            return None
        if self.head_info is not None:
            return self.head_info
        from .value_heads import HeadInfo
        return HeadInfo("trl-v-head", "v_head.summary", "last" if self.stage == "rm" else "token")

    @property
    def targets(self) -> tuple[str, ...]:
        if self.stage in ("rm", "critic"):
            return ("value",)
        if self.stage == "ppo-reward-adapter":
            return ()  # a reward adapter without its head is neither a policy nor a servable reward model
        return ("policy", "value") if self.value_head else ("policy",)


def _module(fmt: Format):
    return importlib.import_module(fmt.module)


def detect(path: Path) -> Format:
    path = Path(path)
    from .files import input_error
    # stat() the input and the files detection keys on, so a symlink loop is reported as one, not as "missing"
    for p in (path, path / "config.json", path / "adapter_config.json"):
        try:
            p.stat()
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise input_error(p, e) from None
    if not path.exists():
        raise RlexportError("missing-input", "checkpoint path does not exist", file=path, hint="check the path")
    if not path.is_dir():
        raise RlexportError("not-a-folder", "expected a checkpoint folder, got a file", file=path,
                            hint="pass the folder that holds the weights and config")
    for fmt in FORMATS:
        if _module(fmt).detect(path):
            return fmt
    kinds = ", ".join(f.kind for f in FORMATS)
    raise RlexportError("unknown-format", "no known checkpoint format found (no adapter_config.json, "
                        "config.json with weights, or DeepSpeed latest + global_stepN/)", file=path,
                        hint=f"pass a trainer output folder or one of its checkpoint-N/ folders (formats: {kinds})")


def with_tag(path: str | Path, tag: str) -> Path:
    """The checkpoint `--tag` names inside a run folder: a verl step (Megatron or FSDP) or a DeepSpeed tag."""
    from . import megatron, verl
    for fmt in (megatron, verl):
        if fmt.detect(Path(path)):
            return fmt.with_tag(path, tag)
    from .deepspeed import with_tag as deepspeed_tag
    return deepspeed_tag(path, tag)


def open_checkpoint(path: str | Path, *, base: str | Path | None = None, tag: str | None = None) -> Source:
    """Detect the input kind and describe the checkpoint, without reading tensor bytes.

    `tag` picks a DeepSpeed checkpoint (`global_stepN/`) inside `path` instead of `latest` or HF weights."""
    if tag is not None:
        path = with_tag(path, tag)
    fmt = detect(Path(path))
    return _module(fmt).read(Path(path), base=base)
