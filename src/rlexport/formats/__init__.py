"""Input kinds: a registry of format modules, and `open_checkpoint`, the one way into a checkpoint.

A format module turns a checkpoint folder into a `Source`: the model config, lazy base weights, and the
trained pieces beside them (adapter, value head). Nothing here reads tensor bytes. Each module defines
`detect(path) -> bool` and `read(path, *, base) -> Source`, and where it applies:
- `select(path, *, tag, adapter) -> Path | None`: the folder inside `path` that --tag / --adapter names (None:
  `path` is not this format's);
- `steps(path) -> list[Step] | None`: a run folder's checkpoints, oldest first, complete or not.
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
    Format("verl-megatron", "rlexport.formats.verl_megatron", "verl Megatron checkpoint (global_step_N/actor/model/"
           "dist_ckpt/: torch distributed .metadata + .distcp, Megatron names mapped to Hugging Face)"),
    Format("megatron-lm", "rlexport.formats.megatron_lm", "Megatron-LM save root (latest_checkpointed_iteration.txt"
           " + iter_NNNNNNN/ torch_dist; slime, ms-swift Megatron); config and tokenizer from --base"),
    Format("nemo-rl", "rlexport.formats.nemo_rl", "NeMo-RL checkpoint (step_N/policy/weights/: DCP, safetensors "
           "or Megatron iter_NNNNNNN/; config.yaml names the base)"),
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
class Stage:
    """What a training stage's checkpoint can be exported as: trainer facts as data, one row per stage."""

    offers: tuple[str, ...] = ("policy", "value")  # targets, in order of preference
    value_needs_head: bool = True   # "value" is offered only when a head was found (else value-head-missing)
    pooling: str = "token"          # where the head's number is read: "token" (every token) | "last" (reward)
    refuse: tuple[tuple[str, str, str, str], ...] = ()  # (target or "*", code, why, fix): refused before planning


STAGES: dict[str | None, Stage] = {
    None: Stage(),          # unknown: a policy, and a value model when a head is there
    "sft/dpo": Stage(),
    "ppo": Stage(),         # the policy; the PPO value head beside it is the value model
    # a reward model: its LM head was never trained
    "rm": Stage(offers=("value",), value_needs_head=False, pooling="last", refuse=(
        ("policy", "rm-has-no-policy", "this is a reward-model (stage rm) checkpoint: its LM head was never "
         "trained", "export it with --target value"),)),
    # a critic (verl, OpenRLHF, Megatron): the head replaces the LM head
    "critic": Stage(offers=("value",), value_needs_head=False),
    # LLaMA-Factory PPO's reward adapter in <ckpt>/reward/: its value head lives only in memory
    "ppo-reward-adapter": Stage(offers=(), refuse=(
        ("*", "reward-adapter-without-head", "this is the PPO run's reward adapter; LLaMA-Factory never saves its "
         "value head, so it is neither the policy nor a complete reward model", "export the policy from the parent "
         "folder, and the reward model from its own RM run folder with --target value"),)),
}


def stage_facts(stage: str | None) -> Stage:
    return STAGES.get(stage, STAGES[None])


@dataclass(frozen=True)
class Step:
    """One checkpoint of a training run folder, as its trainer marks it done (or not)."""

    tag: str          # what --tag takes: global_step_4, iter_0000100, checkpoint-200, step_8
    path: Path        # the folder open_checkpoint reads for it
    complete: bool    # the trainer's own completion marker is there (else `why` says what is missing)
    why: str = ""


@dataclass(frozen=True)
class Source:
    kind: str                      # the Format.kind that read it
    path: Path                     # the checkpoint folder read (after --tag / --adapter)
    producer: str                  # "llama-factory" | "trl" | "peft" | "transformers" | "verl" | ...
    stage: str | None              # a key of STAGES: "ppo" | "rm" | "critic" | "sft/dpo" | None when unknown
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
    def facts(self) -> Stage:
        return stage_facts(self.stage)

    @property
    def head(self):
        """How the value head in `value_head` was saved and what it computes (None without a head)."""
        if not self.value_head:
            return None
        if self.head_info is not None:
            return self.head_info
        from .value_heads import HeadInfo, TRL_HEAD
        return HeadInfo("trl-v-head", TRL_HEAD, self.facts.pooling)

    @property
    def targets(self) -> tuple[str, ...]:
        st = self.facts
        return tuple(t for t in st.offers if t != "value" or self.value_head or not st.value_needs_head)

    def refusal(self, target: str) -> RlexportError | None:
        """The stage's reason not to export `target` at all, as the error to raise (None: not refused)."""
        for t, code, why, fix in self.facts.refuse:
            if t in (target, "*"):
                return RlexportError(code, why, file=self.path, hint=fix)
        return None


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


def _select(path: Path, *, tag: str | None = None, adapter: str | None = None) -> Path | None:
    """The first format's answer to "which folder inside `path` is TAG / ADAPTER" (the `select` hook)."""
    for fmt in FORMATS:
        hook = getattr(_module(fmt), "select", None)
        found = hook(path, tag=tag, adapter=adapter) if hook is not None else None
        if found is not None:
            return Path(found)
    return None


def steps_of(path: str | Path) -> list[Step]:
    """The checkpoints of a training run folder, oldest first, each marked complete or not (the `steps` hook);
    [] when no format knows `path` as a run folder."""
    for fmt in FORMATS:
        hook = getattr(_module(fmt), "steps", None)
        found = hook(Path(path)) if hook is not None else None
        if found is not None:
            return list(found)
    return []


def open_checkpoint(path: str | Path, *, base: str | Path | None = None, adapter: str | None = None,
                    tag: str | None = None) -> Source:
    """The one way into a checkpoint: pick the folder (`tag`: a step or DeepSpeed tag of a run folder;
    `adapter`: one adapter of a PEFT folder holding several), detect its kind and describe it, without reading
    tensor bytes.

    Example:
        >>> src = rlexport.open_checkpoint("saves/qwen2/ppo")              # doctest: +SKIP
        >>> src.kind, src.stage, src.targets                                # doctest: +SKIP
        ('peft', 'ppo', ('policy', 'value'))
    """
    path = Path(path)
    if tag is not None:
        found = _select(path, tag=tag)
        if found is None:
            detect(path)  # a missing or unreadable path says so first
            raise RlexportError("tag-not-found", f"no checkpoint tagged '{tag}' here", file=path,
                                hint="--tag names a step folder of a run folder (global_step_N, global_stepN, "
                                     "iter_NNNNNNN, step_N); pass the run folder")
        path = found
    path = _select(path, adapter=adapter) or path
    fmt = detect(path)
    return _module(fmt).read(path, base=base)
