"""Which tensor-parallel sizes vLLM accepts for a model, as data read from vLLM 0.32's source.

Each rule is one model dimension that vLLM splits across the tensor-parallel ranks, with the config keys it comes
from, how it must relate to the TP size, and where vLLM enforces it. Add a rule by adding a row.
"""
from __future__ import annotations

from dataclasses import dataclass

MAX_TP = 16
VOCAB_PADDING = 64  # vllm/model_executor/layers/vocab_parallel_embedding.py DEFAULT_VOCAB_PADDING_SIZE


@dataclass(frozen=True)
class Rule:
    dimension: str            # what the user reads
    keys: tuple[str, ...]     # config.json keys, the first present wins
    kind: str                 # "divides": value % tp == 0; "kv": divides or is replicated; "vocab": padded value
    where: str                # the vLLM code that enforces it
    part: str = "text_config"  # the sub-config a multimodal config.json nests it in (vision_config: the tower)


RULES: tuple[Rule, ...] = (
    Rule("attention heads", ("num_attention_heads", "n_head"), "divides",
         "vllm/config/model.py ModelConfig.verify_with_parallel_config (ValueError at engine start)"),
    # QKVParallelLinear: tp >= kv heads replicates each KV head tp/kv times (divide(tp, kv)), else divide(kv, tp)
    Rule("KV heads", ("num_key_value_heads",), "kv",
         "vllm/model_executor/layers/linear.py QKVParallelLinear.__init__ (AssertionError in divide)"),
    # MergedColumnParallelLinear (gate/up) and RowParallelLinear (down) split the MLP's inner dimension
    Rule("MLP intermediate size", ("intermediate_size", "n_inner"), "divides",
         "vllm/model_executor/layers/linear.py MergedColumnParallelLinear / RowParallelLinear"),
    Rule("MoE expert intermediate size", ("moe_intermediate_size",), "divides",
         "vllm/model_executor/layers/fused_moe/config.py FusedMoEConfig.__post_init__"),
    # a w4a16 export's scale groups must not straddle ranks: the expert (and MLP) inner size per rank is a multiple
    # of the group size (the fused-MoE WNA16 method raises ValueError; RowParallelLinear asserts it for down_proj).
    # Expert parallelism (--enable-expert-parallel) splits whole experts instead, unevenly if need be
    # (fused_moe/expert_map_manager.py determine_expert_map), and lifts the expert rules.
    Rule("expert (or MLP) intermediate size per rank, w4a16 groups", ("moe_intermediate_size", "intermediate_size"),
         "groups", "vllm/model_executor/layers/quantization/compressed_tensors/compressed_tensors_moe/"
         "compressed_tensors_moe_wna16.py create_weights"),
    Rule("shared-expert intermediate size", ("shared_expert_intermediate_size",), "divides",
         "vllm/model_executor/layers/linear.py MergedColumnParallelLinear (Qwen2-MoE shared expert)"),
    # VocabParallelEmbedding / ParallelLMHead pad the vocabulary to a multiple of 64, then divide it
    Rule("vocabulary (padded to a multiple of 64)", ("vocab_size",), "vocab",
         "vllm/model_executor/layers/vocab_parallel_embedding.py VocabParallelEmbedding.__init__"),
    # a vision-language model's vision encoder is split by heads too (mm_encoder_tp_mode "weights", the default)
    Rule("vision attention heads", ("num_heads", "num_attention_heads"), "divides",
         "vllm/model_executor/models/qwen2_5_vl.py Qwen2_5_VisionAttention.__init__ (divide(num_heads, tp))",
         part="vision_config"),
)


def _part(config: dict, part: str) -> dict:
    if isinstance(config.get(part), dict):
        return config[part]
    return config if part == "text_config" else {}  # a flat (text-only or hub 4.x) config is the text config


def _value(config: dict, rule: Rule) -> int | None:
    cfg = _part(config, rule.part)
    for key in rule.keys:
        if isinstance(cfg.get(key), int) and cfg[key] > 0:
            return cfg[key]
    return None


def _group(config: dict) -> int | None:
    """The group size of a group-quantized (w4a16) compressed-tensors config.json, else None."""
    q = config.get("quantization_config") if isinstance(config.get("quantization_config"), dict) else {}
    for g in (q.get("config_groups") or {}).values():
        w = g.get("weights") if isinstance(g, dict) else None
        if isinstance(w, dict) and w.get("strategy") == "group" and isinstance(w.get("group_size"), int):
            return w["group_size"]
    return None


def _ok(rule: Rule, value: int, tp: int, config: dict | None = None) -> bool:
    if rule.kind == "groups":
        group = _group(config or {})
        return group is None or value % tp != 0 or (value // tp) % group == 0
    if rule.kind == "kv":
        return value % tp == 0 if tp < value else tp % value == 0
    if rule.kind == "vocab":
        value = -(-value // VOCAB_PADDING) * VOCAB_PADDING
    return value % tp == 0


def refusals(config: dict, tp: int) -> list[str]:
    """Why vLLM refuses `tp` for this model: one line per dimension that does not split (empty: accepted)."""
    out = []
    for rule in RULES:
        value = _value(config, rule)
        if value is not None and not _ok(rule, value, tp, config):
            how = f"{tp} must divide it or be a multiple of it (KV heads are then replicated)" if rule.kind == "kv" \
                else f"{value} / {tp} must be a multiple of the group size {_group(config)}" \
                if rule.kind == "groups" else f"{tp} must divide it"
            out.append(f"{rule.dimension} = {value}: {how} ({rule.where})")
    return out


def accepted_sizes(config: dict, upto: int = MAX_TP) -> list[int]:
    return [tp for tp in range(1, upto + 1) if not refusals(config, tp)]


def explain(config: dict, tp: int) -> str | None:
    """One line for a refused size, naming the dimension and the sizes that work; None when accepted."""
    why = refusals(config, tp)
    if not why:
        return None
    sizes = ", ".join(map(str, accepted_sizes(config)))
    return (f"vLLM refuses --tensor-parallel-size {tp}: {why[0].split(' (')[0]}; sizes that work: {sizes} "
            f"(or pipeline parallelism, --pipeline-parallel-size, which splits layers, not heads)")
