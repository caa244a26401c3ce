"""Reward and value heads as the trainers save them, recognised by tensor names, shapes and config.json (never by
the folder's name). Every convention becomes one `HeadInfo`; heads.py turns any of them into the one encoding
rlexport writes (`<Family>ForTokenClassification`, `score.weight` + `score.bias`, normalisation folded in).

| convention              | trainer                              | on disk                                          |
|-------------------------|--------------------------------------|--------------------------------------------------|
| trl-v-head              | TRL / LLaMA-Factory value head       | v_head.summary.weight [1, H] + .bias [1]         |
| openrlhf                | OpenRLHF RewardModel / CriticModel   | <value_head_prefix>.weight [1, H], no bias;      |
|                         | (get_llm_for_sequence_regression)    | mean, std, normalize_reward in config.json       |
| sequence-classification | TRL RewardTrainer (AutoModelFor-     | score.weight [1, H], no bias                     |
|                         | SequenceClassification)              |                                                  |
| token-classification    | verl critic (AutoModelForToken-      | score.weight [1, H] + score.bias [1]; config.json |
|                         | Classification), rlexport's export   | may still say ...ForCausalLM (verl)              |
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import RlexportError
from ..tensors import TensorRef

# Every spelling of a head in one place: readers find heads by these, the transforms drop them from a policy,
# verify names them when one is left in an export.
TRL_HEAD = "v_head.summary"                                # TRL / LLaMA-Factory's value head module
TRL_PREFIXES = ("v_head.", "pretrained_model.v_head.")     # its tensors, bare or inside TRL's wrapper
VALUE_HEAD_FILES = ("value_head.safetensors", "value_head.bin")  # LLaMA-Factory saves the head beside the weights
HEAD_MODULES = (TRL_HEAD, "score", "value_head")            # stored head modules of every convention below
OPENRLHF_CLASSES = {"RewardModel": "last", "CriticModel": "token"}  # the classes OpenRLHF creates at run time
OPENRLHF_PREFIXES = ("score", "value_head")  # value_head_prefix: "score" by default, "value_head" in older runs
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def is_head_tensor(name: str) -> bool:
    """A tensor of a reward/value head in any trainer's spelling (TRL's v_head.*, score.*, value_head.*)."""
    module = name.rpartition(".")[0]
    return name.startswith(TRL_PREFIXES) or any(module == m or module.endswith("." + m) for m in HEAD_MODULES)


def is_scoring_head(name: str) -> bool:
    """A head that takes the LM head's place (score / value_head: reward models, critics), not TRL's v_head,
    which sits beside a policy's LM head."""
    module = name.removesuffix(".weight").removesuffix(".bias")
    return not name.startswith(TRL_PREFIXES) and module.rsplit(".", 1)[-1] in OPENRLHF_PREFIXES


@dataclass(frozen=True)
class HeadInfo:
    convention: str                 # trl-v-head | openrlhf | sequence-classification | token-classification
    prefix: str                     # the stored name of the head module (v_head.summary, score, value_head)
    pooling: str                    # "last": a reward model scores a sequence at its last token; "token": values
    mean: float | None = None       # OpenRLHF's reward normalisation: served = (score - mean) / std
    std: float | None = None
    normalize_in_config: bool = False  # what config.json's normalize_reward said (OpenRLHF saves False for RMs)

    @property
    def normalizable(self) -> bool:
        return self.mean is not None and self.std is not None


def _arch(config: dict) -> str:
    return str((config.get("architectures") or [""])[0])


def _norm(config: dict, file) -> tuple[float | None, float | None]:
    mean, std = config.get("mean"), config.get("std")
    if mean is None and std is None:
        return None, None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (mean, std)) or \
            not (math.isfinite(mean) and math.isfinite(std)):
        raise RlexportError("head-normalization-invalid", f"config.json's reward normalisation is not a pair of "
                            f"finite numbers (mean {mean!r}, std {std!r})", file=file,
                            hint="set mean and std to the values the reward trainer measured, or remove both")
    if std == 0:
        raise RlexportError("head-normalization-invalid", "config.json's reward normalisation has std 0 (every "
                            "normalised reward would be infinite)", file=file,
                            hint="set std to the value the reward trainer measured, or remove mean and std")
    return float(mean), float(std)


def _head_refs(prefix: str, by_name: dict[str, TensorRef], file) -> tuple[TensorRef, ...]:
    w, b = by_name.get(f"{prefix}.weight"), by_name.get(f"{prefix}.bias")
    if w is None:
        return ()
    if len(w.shape) != 2 or w.shape[0] != 1:
        raise RlexportError("head-multi-output", f"{prefix}.weight has shape {list(w.shape)}: a head with "
                            f"{w.shape[0] if w.shape else 0} outputs, not one reward or value", file=w.origin or file,
                            hint="rlexport exports single-output reward and value heads ([1, hidden])")
    return (w, b) if b is not None else (w,)


def detect_head(config: dict, weights: list[TensorRef], *, file) -> tuple[HeadInfo, tuple[TensorRef, ...]] | None:
    """The reward/value head among a full model's weights (not TRL's v_head, which common.find_value_head finds).

    None when the weights are a plain causal LM."""
    by_name = {r.name: r for r in weights}
    arch = _arch(config)
    if arch in OPENRLHF_CLASSES or "value_head_prefix" in config:
        prefix = str(config.get("value_head_prefix") or "score")
        refs = _head_refs(prefix, by_name, file)
        if not refs:
            found = [p for p in OPENRLHF_PREFIXES if f"{p}.weight" in by_name]
            raise RlexportError("head-unknown", f"config.json names the head '{prefix}' (value_head_prefix) but no "
                                f"{prefix}.weight is stored" + (f"; {found[0]}.weight is" if found else ""), file=file,
                                hint="set value_head_prefix in config.json to the stored head's name")
        mean, std = _norm(config, file)
        return HeadInfo("openrlhf", prefix, OPENRLHF_CLASSES.get(arch, "last"), mean, std,
                        bool(config.get("normalize_reward"))), refs
    if arch.endswith("ForSequenceClassification"):
        refs = _head_refs("score", by_name, file)
        return (HeadInfo("sequence-classification", "score", "last"), refs) if refs else None
    lm_head = any(n.startswith(("lm_head.", "embed_out.")) for n in by_name)
    if arch.endswith("ForTokenClassification") or ("score.weight" in by_name and not lm_head):
        refs = _head_refs("score", by_name, file)
        return (HeadInfo("token-classification", "score", "token"), refs) if refs else None
    return None


def causal_config(config: dict, *, file) -> dict:
    """The config with the causal-LM class of its model family in `architectures`: the body rlexport builds on
    (OpenRLHF's RewardModel and a TRL *ForSequenceClassification name no causal LM)."""
    arch = _arch(config)
    if arch.endswith(CAUSAL_SUFFIXES):
        return config
    for suffix in ("ForSequenceClassification", "ForTokenClassification"):
        if arch.endswith(suffix):
            return {**config, "architectures": [arch[: -len(suffix)] + "ForCausalLM"]}
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as names
    except ImportError:  # transformers is optional for export
        names = {}
    causal = names.get(str(config.get("model_type")))
    if causal is None:
        raise RlexportError("no-causal-architecture", f"cannot tell the causal-LM class of model_type "
                            f"{config.get('model_type')!r} (architectures {arch})", file=file,
                            hint="install transformers, or set architectures in config.json to the base's class")
    return {**config, "architectures": [causal]}
