"""Per-architecture name facts, as data: one small row per model_type.

What the checkpoint stores under which name, where that differs from the module names a trainer (PEFT) saw in
memory. Add a model family by adding a row; nothing else branches on model_type.
"""
from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Experts:
    """A fused 3-D expert parameter `<block>.experts.<param>` [experts, out, in] (transformers >= 5 in memory)
    that the checkpoint stores per expert as `<block>.experts.<e>.<part>.weight`, the parts stacked along `out`."""

    param: str
    parts: tuple[str, ...]


@dataclass(frozen=True)
class Moe:
    """A family's mixture-of-experts block, as its hub checkpoint and hub config.json spell it. The block is
    `<layer>.mlp` in memory (Arch.renames turn it into the checkpoint's name, e.g. Mixtral's block_sparse_moe)."""

    count_key: str                          # expert count in the hub config.json (transformers 4.x reads only it)
    aliases: tuple[str, ...] = ()           # other spellings transformers 5 writes for it (dropped on export)
    size_key: str = "moe_intermediate_size"  # one expert's intermediate size
    topk_key: str = "num_experts_per_tok"
    router: str = "gate"                    # `<block>.gate.weight` [experts, hidden]: never an expert, never quantized
    router_buffers: tuple[str, ...] = ()    # stored beside the router weight (DeepSeek-V3's e_score_correction_bias)
    shared: str = ""                        # shared-expert MLP under the block: a dense MLP, not one of the experts
    shared_gate: str = ""                   # its sigmoid gate, Linear(hidden, 1): [1, hidden]
    shared_count_key: str = ""              # several shared experts fused into one MLP (DeepSeek n_shared_experts)
    per_expert: bool = True                 # hub checkpoints store experts one by one; False: fused, as in memory


@dataclass(frozen=True)
class Vision:
    """A vision-language family. Transformers >= 5 (and 4.52+ for Qwen2-VL/2.5-VL) builds the language model and
    the vision tower under `model.*` in memory, so PEFT adapters and verl rank files use those names; the hub
    layout (what `save_pretrained` writes, even in transformers 5) keeps the older prefixes. vLLM loads both."""

    cls: str                                 # the conditional-generation class (config.json architectures)
    layout: tuple[tuple[str, str], ...]      # (in-memory prefix, hub prefix); () when the two agree
    tower: tuple[str, ...]                   # hub-layout prefixes of the vision tower and its projector
    heads: str = "num_heads"                 # vision_config key of the vision attention heads


@dataclass(frozen=True)
class Arch:
    embed: str = "model.embed_tokens.weight"   # input embedding weight
    head: str = "lm_head.weight"               # output embedding weight
    tied: bool = False                         # tie_word_embeddings when config.json does not say
    conv1d: tuple[str, ...] = ()               # modules stored [in, out] (transformers Conv1D): LoRA fan_in_fan_out
    renames: tuple[tuple[str, str], ...] = ()  # in-memory name fragment -> checkpoint name fragment
    experts: tuple[Experts, ...] = ()          # fused expert parameters (LoRA target_parameters)
    vision: Vision | None = None               # vision-language models: class, name layouts, tower (Vision)
    moe: Moe | None = None                     # mixture-of-experts families: hub layout and config keys (Moe)


_MIXTRAL_EXPERTS = (Experts("gate_up_proj", ("w1", "w3")), Experts("down_proj", ("w2",)))
_QWEN_MOE_EXPERTS = (Experts("gate_up_proj", ("gate_proj", "up_proj")), Experts("down_proj", ("down_proj",)))


def _qwen_vl(cls: str) -> Vision:
    return Vision(cls, (("model.language_model.", "model."), ("model.visual.", "visual.")), ("visual.",))


def _llava_vl(cls: str) -> Vision:
    # transformers 5.19 drops the SigLIP/CLIP tower's `vision_model.` level in memory (conversion_mapping.py
    # PrefixChange); earlier versions keep it; the hub (and vLLM) has `vision_tower.vision_model.*`
    return Vision(cls, (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                        ("model.vision_tower.", "vision_tower.vision_model."),
                        ("model.vision_tower.vision_model.", "vision_tower.vision_model."),
                        ("model.multi_modal_projector.", "multi_modal_projector.")),
                  ("vision_tower.", "multi_modal_projector."), heads="num_attention_heads")


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
    # Hub checkpoints of these store experts one by one (`experts.<e>.<part>.weight`); transformers 5 fuses them in
    # memory and splits them again in save_pretrained (conversion_mapping.py), trainers save the fused form.
    # mixtral: block_sparse_moe.experts.<e>.w1/w2/w3, block_sparse_moe.gate; intermediate_size is the expert's
    "mixtral": Arch(renames=((".mlp.", ".block_sparse_moe."),), experts=_MIXTRAL_EXPERTS,
                    moe=Moe("num_local_experts", size_key="intermediate_size")),
    # qwen2_moe: shared_expert.{gate,up,down}_proj has the experts' leaf names but is one dense MLP, gated by
    # shared_expert_gate [1, H]
    "qwen2_moe": Arch(experts=_QWEN_MOE_EXPERTS, moe=Moe("num_experts", shared="shared_expert",
                                                        shared_gate="shared_expert_gate")),
    # transformers 5 writes num_local_experts; the hub config (and transformers 4.x) says num_experts
    "qwen3_moe": Arch(experts=_QWEN_MOE_EXPERTS, moe=Moe("num_experts", aliases=("num_local_experts",))),
    # mlp.experts.<e>.*, mlp.shared_experts.* (n_shared_experts fused in one MLP), mlp.gate.weight; V3 also
    # mlp.gate.e_score_correction_bias [E]; the first_k_dense_replace layers have a plain mlp.{gate,up,down}_proj
    "deepseek_v2": Arch(experts=_QWEN_MOE_EXPERTS, moe=Moe("n_routed_experts", shared="shared_experts",
                                                          shared_count_key="n_shared_experts")),
    "deepseek_v3": Arch(experts=_QWEN_MOE_EXPERTS, moe=Moe("n_routed_experts", shared="shared_experts",
                                                          shared_count_key="n_shared_experts",
                                                          router_buffers=("e_score_correction_bias",))),
    # vision-language models: embed/head are hub-layout names (what an export writes)
    "qwen2_vl": Arch(vision=_qwen_vl("Qwen2VLForConditionalGeneration")),
    "qwen2_5_vl": Arch(vision=_qwen_vl("Qwen2_5_VLForConditionalGeneration")),
    # Qwen3-VL shipped with the transformers-5 names on the hub: one layout, nothing renamed
    "qwen3_vl": Arch(embed="model.language_model.embed_tokens.weight",
                     vision=Vision("Qwen3VLForConditionalGeneration", (), ("model.visual.",))),
    # its hub checkpoints store the experts fused (mlp.experts.gate_up_proj [E, 2I, H]), as transformers does
    "qwen3_vl_moe": Arch(embed="model.language_model.embed_tokens.weight", moe=Moe("num_experts", per_expert=False),
                         vision=Vision("Qwen3VLMoeForConditionalGeneration", (), ("model.visual.",))),
    # LLaVA-style: language_model.model.* / language_model.lm_head.* / vision_tower.* / multi_modal_projector.*
    "gemma3": Arch(embed="language_model.model.embed_tokens.weight", head="language_model.lm_head.weight",
                   tied=True, vision=_llava_vl("Gemma3ForConditionalGeneration")),
    "llava": Arch(embed="language_model.model.embed_tokens.weight", head="language_model.lm_head.weight",
                  vision=_llava_vl("LlavaForConditionalGeneration")),
}
DEFAULT = Arch()


def arch_of(config: dict) -> Arch:
    return ARCHS.get(str(config.get("model_type", "")), DEFAULT)


def vision_of(config: dict) -> Vision | None:
    """The Vision row of a vision-language model's config (None for a text-only model)."""
    return arch_of(config).vision


def to_hub(config: dict, name: str) -> str:
    """A tensor name in the hub layout (`model.language_model.x` -> `model.x` for Qwen2.5-VL); others unchanged."""
    v = vision_of(config)
    mem = max((m for m, _ in v.layout if name.startswith(m)), key=len, default=None) if v else None
    return name if mem is None else dict(v.layout)[mem] + name[len(mem):]  # the longest in-memory prefix wins


def to_memory(config: dict, name: str) -> str:
    """A tensor name in the transformers >= 5 in-memory layout (the inverse of to_hub; the first row wins)."""
    v = vision_of(config)
    if v is None or any(name.startswith(mem) for mem, _ in v.layout):
        return name
    for mem, hub in v.layout:
        if name.startswith(hub):
            return mem + name[len(hub):]
    return name


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
        mem = to_memory(config, name)
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


def _package_file(package: str, *parts: str) -> Path | None:
    # find_spec on a top-level name does not import it (importing transformers costs ~10 s)
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    f = Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)
    return f if f.is_file() else None


def architecture_known(arch: str, package: str = "transformers") -> bool | None:
    """Whether transformers (or vLLM) names this class in its registry; None when the package is absent.

    Reads the registry module's text instead of importing it: every class name is a string literal there.
    """
    where = {"transformers": ("models", "auto", "modeling_auto.py"),
             "vllm": ("model_executor", "models", "registry.py")}[package]
    f = _package_file(package, *where)
    return None if f is None else f'"{arch}"' in f.read_text(errors="replace")
