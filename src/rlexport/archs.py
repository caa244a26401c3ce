"""Per-architecture name facts, as data: one small row per model_type.

What the checkpoint stores under which name, where that differs from the module names a trainer (PEFT) saw in
memory. Add a model family by adding a row; nothing else branches on model_type.
"""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Experts:
    """A fused 3-D expert parameter `<block>.experts.<param>` [experts, out, in] (transformers >= 5 in memory)
    that the checkpoint stores per expert as `<block>.experts.<e>.<part>.weight`, the parts stacked along `out`."""

    param: str
    parts: tuple[str, ...]


@dataclass(frozen=True)
class Arch:
    embed: str = "model.embed_tokens.weight"   # input embedding weight
    head: str = "lm_head.weight"               # output embedding weight
    tied: bool = False                         # tie_word_embeddings when config.json does not say
    conv1d: tuple[str, ...] = ()               # modules stored [in, out] (transformers Conv1D): LoRA fan_in_fan_out
    renames: tuple[tuple[str, str], ...] = ()  # in-memory name fragment -> checkpoint name fragment
    experts: tuple[Experts, ...] = ()          # fused expert parameters (LoRA target_parameters)


_MIXTRAL_EXPERTS = (Experts("gate_up_proj", ("w1", "w3")), Experts("down_proj", ("w2",)))
_QWEN_MOE_EXPERTS = (Experts("gate_up_proj", ("gate_proj", "up_proj")), Experts("down_proj", ("down_proj",)))

ARCHS: dict[str, Arch] = {
    # llama-style names, untied by default
    "llama": Arch(), "mistral": Arch(), "qwen2": Arch(), "qwen3": Arch(),
    # fused qkv_proj / gate_up_proj are plain Linear modules with these names in the checkpoint too
    "phi3": Arch(),
    # tied by default; the sqrt(hidden) embedding scale lives in forward, not in the weights
    "gemma": Arch(tied=True), "gemma2": Arch(tied=True),
    # transformers Conv1D everywhere in the blocks; wte is tied to lm_head by default
    "gpt2": Arch(embed="transformer.wte.weight", tied=True, conv1d=("c_attn", "q_attn", "c_proj", "c_fc")),
    # transformers >= 5 loads block_sparse_moe.* as mlp.* and fuses experts.{e}.w1/w3 -> gate_up_proj, w2 -> down
    "mixtral": Arch(renames=((".mlp.", ".block_sparse_moe."),), experts=_MIXTRAL_EXPERTS),
    "qwen2_moe": Arch(experts=_QWEN_MOE_EXPERTS),
    "qwen3_moe": Arch(experts=_QWEN_MOE_EXPERTS),
}
DEFAULT = Arch()


def arch_of(config: dict) -> Arch:
    return ARCHS.get(str(config.get("model_type", "")), DEFAULT)


def is_tied(config: dict) -> bool:
    """tie_word_embeddings as transformers reads it: the top level, else the text sub-config, else the default."""
    for cfg in (config, config.get("text_config") or {}):
        if "tie_word_embeddings" in cfg:
            return bool(cfg["tie_word_embeddings"])
    return arch_of(config).tied


def embedding_pair(config: dict) -> tuple[str, str]:
    a = arch_of(config)
    return a.embed, a.head


def is_conv1d(config: dict, module: str) -> bool:
    return module.rsplit(".", 1)[-1] in arch_of(config).conv1d


def memory_shapes(config: dict, stored: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The parameters transformers builds in memory from the tensors a checkpoint stores: renamed fragments
    turned back, per-expert tensors fused into `<block>.experts.<param>` [experts, sum of parts' rows, in].
    What vLLM loads is the stored form; what the meta-device model lists is this one."""
    a = arch_of(config)
    out: dict[str, tuple[int, ...]] = {}
    fused: dict[tuple[str, Experts], dict[int, dict[str, tuple[int, ...]]]] = {}
    for name, shape in stored.items():
        mem = name
        for in_memory, on_disk in a.renames:
            mem = mem.replace(on_disk, in_memory)
        for ex in a.experts:
            m = re.fullmatch(rf"(.+)\.experts\.(\d+)\.({'|'.join(map(re.escape, ex.parts))})\.weight", mem)
            if m:
                fused.setdefault((m.group(1), ex), {}).setdefault(int(m.group(2)), {})[m.group(3)] = shape
                break
        else:
            out[mem] = shape
    for (block, ex), experts in fused.items():
        first = experts[min(experts)]
        rows = sum(first[p][0] for p in ex.parts if p in first)
        out[f"{block}.experts.{ex.param}"] = (len(experts), rows, first[ex.parts[0]][1]) \
            if all(len(first.get(p, ())) == 2 for p in ex.parts) else (len(experts),)
    return out
