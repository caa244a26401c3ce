"""Findings: what is wrong or notable about a checkpoint, with a stable code and the fix.

`CODES` is the catalog of every code `rlexport inspect` emits (docs/findings.md documents each; a test keeps the
two in step). Scripts key on `code`, never on the message text.
"""
from __future__ import annotations

from dataclasses import dataclass

SEVERITIES = ("error", "warning", "info")


@dataclass(frozen=True)
class Finding:
    code: str            # stable kebab-case id; tests and scripts key on it, never on the message
    severity: str        # error | warning | info
    message: str         # one sentence: what is the case
    engine: str = ""     # what vLLM / transformers do with the checkpoint as it is (the exact error if any)
    fix: str = ""        # the command or action that fixes it
    file: str = ""
    tensors: tuple[str, ...] = ()  # up to 5 example tensor names

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, not {self.severity!r}")

    def to_json(self) -> dict:
        return {"code": self.code, "severity": self.severity, "message": self.message, "engine": self.engine,
                "fix": self.fix, "file": self.file, "tensors": list(self.tensors[:5])}


# code -> (failure-catalog entries it prevents, one-line meaning). Keep docs/findings.md in step.
CODES: dict[str, tuple[str, str]] = {
    # what the checkpoint is
    "reward-model": ("F38", "a reward-model (stage rm) checkpoint: the LM head is untrained"),
    "value-head-present": ("F05 F38", "a TRL / LLaMA-Factory value head (v_head.summary) is in or beside the weights"),
    "reward-normalization": ("F38", "a reward normalisation (mean, std) in config.json: folded into the exported head"),
    "head-not-saved": ("F38", "a LoRA reward model / critic whose head was trained as a LoRA target and never saved"),
    "reward-adapter-beside": ("F38", "a PPO reward adapter saved beside the policy, without its head"),
    "optimizer-state": ("F01", "optimizer / scheduler / DeepSpeed state files beside the weights"),
    # adapters
    "adapter-needs-merge": ("F07 F32", "a LoRA (PEFT) adapter that is not merged into its base"),
    "adapter-full-modules": ("F29", "the adapter carries full tensors (modules_to_save / embeddings)"),
    "adapter-without-config": ("F07 F32", "adapter weights without adapter_config.json"),
    "unsupported-peft-type": ("F30 F33", "a PEFT type or LoRA variant rlexport cannot merge exactly"),
    "base-unresolved": ("F07", "the adapter's base model is neither a local folder nor in the HF cache"),
    "base-shape-mismatch": ("F15 F32", "the adapter does not fit the base: missing modules or other shapes"),
    # weights
    "fp32-weights": ("F26 F27", "weights stored in float32 (a trainer upcast)"),
    "fp16-overflow-risk": ("F27", "weights beyond float16's range (|x| > 65504)"),
    "nonfinite-weights": ("F27", "NaN or Inf in the weights"),
    "zero3-placeholder": ("F03", "empty [0]-shaped tensors: DeepSpeed ZeRO-3 saved without gathering"),
    "values-not-scanned": ("F27", "tensor values were not read (too large for the default scan)"),
    "vocab-resized": ("F15 F16", "embedding rows differ from config.json's vocab_size"),
    "tokenizer-exceeds-embedding": ("F16", "the tokenizer has more tokens than the embedding has rows"),
    "tied-embeddings-split": ("F11 F13", "config ties lm_head to the embedding but the stored lm_head differs"),
    "lm-head-missing": ("F12", "config unties lm_head but no lm_head weight is stored"),
    # files around the weights
    "missing-tokenizer": ("F08", "no tokenizer in the checkpoint or the base"),
    "missing-chat-template": ("F24 F25", "no chat template in the checkpoint or the base"),
    "missing-generation-config": ("F21", "no generation_config.json"),
    "missing-eos": ("F19", "the tokenizer defines no eos token"),
    "eos-mismatch": ("F18 F19", "the tokenizer's eos is not in generation_config's eos_token_id"),
    # architecture
    "remote-code": ("F09", "config.json's auto_map: the model needs its own Python code (trust_remote_code)"),
    "unknown-architecture": ("F10", "config.json's architecture is not a transformers class"),
}


def catalog_codes() -> tuple[str, ...]:
    return tuple(CODES)
