"""Megatron-core GPTModel tensor names -> Hugging Face names (llama-style dense and MoE), as views of DCP tensors.

Megatron's `sharded_state_dict` holds global tensors whatever the TP x PP x EP layout they were saved with:
layers stacked on a leading [num_layers] axis with global layer numbers (verl, Megatron-LM), or one key per
layer (`decoder.layers.N.`); experts stacked on the next axis (`mlp.experts.experts.linear_fc1.weight`
[L, E, 2F, H]: SequentialMLP / TEGroupedMLP both save it so, with the doubled `experts.`). Fused tensors:
- `linear_qkv`: per query group [q heads of the group; k; v] (weight and bias);
- `linear_fc1`: [gate; up] (TP shards each half, the global tensor keeps gate rows first);
- norms fused into the next linear (TE specs and the local spec's TE-compatible names):
  `self_attention.linear_qkv.layer_norm_weight` = input_layernorm, `mlp.linear_fc1.layer_norm_weight` =
  post_attention_layernorm (the pre-MLP norm).
MoE experts are emitted in transformers 5's fused in-memory names: `mlp.experts.gate_up_proj` [E, 2I, H] (gate
rows first) and `mlp.experts.down_proj` [E, H, I]; the router is `mlp.gate.weight`. (The transform that writes
the hub's per-expert layout lives in the MoE code, keyed on these names.)
The embedding and output layer are cut back to the Hugging Face vocabulary: Megatron pads it to a multiple of
make_vocab_size_divisible_by x TP.
"""
from __future__ import annotations

import math
import re

from ..errors import RlexportError
from ..tensors import TensorRef
from .dcp import Index, ref

LLAMA_STYLE = ("llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe")
LAYER_RE = re.compile(r"decoder\.layers\.(?:(\d+)\.)?(mlp\.experts\.experts\.(?:(\d+)\.)?)?(.+)")
VOCAB = {"embedding.word_embeddings.weight": "model.embed_tokens.weight", "output_layer.weight": "lm_head.weight"}
# shared experts: Qwen2-MoE names (one shared expert with a sigmoid gate)
SHARED = {"qwen2_moe": "mlp.shared_expert"}


def _slices(cfg: dict) -> dict:
    """Megatron per-layer suffix -> [(HF suffix, row ranges of the layer's tensor)]; None ranges: all rows."""
    nh, ng = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or cfg["hidden_size"] // nh
    qn, gs = nh // ng * hd, (nh // ng + 2) * hd
    ff = cfg.get("intermediate_size")
    sff = cfg.get("shared_expert_intermediate_size")
    qkv = [(f"self_attn.{p}_proj", [(g * gs + a, g * gs + b) for g in range(ng)])
           for p, (a, b) in (("q", (0, qn)), ("k", (qn, qn + hd)), ("v", (qn + hd, gs)))]
    pre, post = "input_layernorm", "post_attention_layernorm"  # norms: fused into linear_qkv / fc1, or modules
    out = {m: [(h + ".weight", None)] for m, h in (
        ("self_attention.linear_qkv.layer_norm_weight", pre), ("input_layernorm.weight", pre),
        ("mlp.linear_fc1.layer_norm_weight", post), ("pre_mlp_layernorm.weight", post),
        ("mlp.router.weight", "mlp.gate"),
        *((f"self_attention.{x}_layernorm.weight", f"self_attn.{x}_norm") for x in "qk"))}
    shared = SHARED.get(str(cfg.get("model_type")), "mlp.shared_experts")
    for kind in ("weight", "bias"):
        out[f"self_attention.linear_qkv.{kind}"] = [(f"{h}.{kind}", r) for h, r in qkv]
        out[f"self_attention.linear_proj.{kind}"] = [(f"self_attn.o_proj.{kind}", None)]
        if ff:
            out[f"mlp.linear_fc1.{kind}"] = [(f"mlp.gate_proj.{kind}", [(0, ff)]),
                                             (f"mlp.up_proj.{kind}", [(ff, 2 * ff)])]
        out[f"mlp.linear_fc2.{kind}"] = [(f"mlp.down_proj.{kind}", None)]
        if sff:
            out[f"mlp.shared_experts.linear_fc1.{kind}"] = [(f"{shared}.gate_proj.{kind}", [(0, sff)]),
                                                            (f"{shared}.up_proj.{kind}", [(sff, 2 * sff)])]
        out[f"mlp.shared_experts.linear_fc2.{kind}"] = [(f"{shared}.down_proj.{kind}", None)]
    out["mlp.shared_experts.gate_weight"] = [(f"{shared}_gate.weight", None)]
    return out


EXPERTS = {"linear_fc1.weight": "mlp.experts.gate_up_proj", "linear_fc2.weight": "mlp.experts.down_proj"}


def _order(r: TensorRef):
    parts = r.name.split(".")
    return (int(parts[2]) if r.name.startswith("model.layers.") else -1 if "embed" in r.name else 1 << 30, r.name)


def hf_refs(index: Index, config: dict, *, hint: str, keep=None) -> tuple[list[TensorRef], dict]:
    """The Hugging Face tensors of a Megatron GPTModel checkpoint, and facts found on the way (padded vocab rows,
    the output layer's shape). `keep(key)` says which stored keys are model weights (default: Megatron's
    `embedding.` / `decoder.` / `output_layer.` keys: optimizer states, _extra_state and rng_state are skipped)."""
    md_file = index.folder / ".metadata"
    if str(config.get("model_type")) not in LLAMA_STYLE:
        raise RlexportError("unsupported-architecture", f"no Megatron name mapping for model_type "
                            f"'{config.get('model_type')}' (only {', '.join(LLAMA_STYLE)})", file=index.folder,
                            hint="convert the checkpoint with the trainer's own converter")
    slices, vocab, refs, facts = _slices(config), config.get("vocab_size"), [], {}
    keep = keep or (lambda k: k.startswith(("embedding.", "decoder.", "output_layer.")) and "_extra_state" not in k)
    for key, st in index.tensors.items():
        if not keep(key):
            continue
        shape = st.shape
        if key in VOCAB:
            rows = shape[0]
            if vocab and rows > vocab:
                facts["padded_vocab"] = rows
            if vocab and rows < vocab:
                raise RlexportError("vocab-mismatch", f"'{key}' has {rows} rows, the Hugging Face config's vocab_size "
                                    f"is {vocab}", file=md_file, hint="pass --base with the model the run started "
                                    "from (its config.json must match the checkpoint)")
            if key == "output_layer.weight":
                facts["output_layer"] = shape
            refs.append(ref(st, VOCAB[key], rows=[(0, min(rows, vocab or rows))], hint=hint, file=md_file))
            continue
        if key == "decoder.final_layernorm.weight":
            refs.append(ref(st, "model.norm.weight", hint=hint, file=md_file))
            continue
        m = LAYER_RE.fullmatch(key)
        if m and m.group(2) and m.group(3) is None and m.group(4) in EXPERTS:
            # [L, E, ...] (stacked) or [E, ...] (per layer): one fused [E, ...] tensor per layer
            layers = [(int(m.group(1)), ())] if m.group(1) else [(i, (i,)) for i in range(shape[0])]
            refs += [ref(st, f"model.layers.{i}.{EXPERTS[m.group(4)]}", lead=lead, hint=hint, file=md_file)
                     for i, lead in layers]
            continue
        if m and not m.group(2) and m.group(4) in slices:
            layers = [(int(m.group(1)), ())] if m.group(1) else [(i, (i,)) for i in range(shape[0])]
            refs += [ref(st, f"model.layers.{i}.{h}", lead=lead, rows=r, hint=hint, file=md_file)
                     for i, lead in layers for h, r in slices[m.group(4)]]
            continue
        raise RlexportError("unsupported-checkpoint", f"no Hugging Face name for Megatron tensor '{key}' "
                            f"{list(shape)}", file=md_file, hint="convert it with the trainer's own converter")
    return sorted(refs, key=_order), facts


def layout(index: Index) -> dict:
    """The parallel layout the checkpoint was saved with, as far as its chunk grid shows it (an `inspect` fact):
    TP = row chunks of one layer's linear_qkv, PP = distinct sets of writing ranks over the layers, EP = the same
    over one layer's experts. Megatron writes `__<global rank>_<k>.distcp`; data-parallel replicas are not saved."""
    def rank(c) -> int:
        m = re.match(r"__(\d+)_", c.file.name)
        return int(m.group(1)) if m else -1

    out = {}
    for key, st in index.tensors.items():
        m = LAYER_RE.fullmatch(key)
        if not m or m.group(2) or m.group(4) != "self_attention.linear_qkv.weight" or not st.chunks:
            continue
        lead = 0 if m.group(1) else 1  # the stacked layer axis
        by_layer: dict = {}
        for c in st.chunks:
            by_layer.setdefault(c.offsets[0] if lead else int(m.group(1)), set()).add((c.offsets[lead], rank(c)))
        out["tp"] = len({o for o, _ in next(iter(by_layer.values()))})
        out.setdefault("_pp", set()).update(frozenset(r for _, r in v) for v in by_layer.values())
    if "_pp" in out:
        out["pp"] = len(out.pop("_pp"))
    for key, st in index.tensors.items():
        m = LAYER_RE.fullmatch(key)
        if m and m.group(2) and m.group(4) == "linear_fc1.weight" and st.chunks:
            e_axis = 0 if m.group(1) else 1
            first = min(c.offsets[0] for c in st.chunks)
            ranks = {}
            for c in st.chunks:
                if e_axis == 0 or c.offsets[0] == first:
                    ranks.setdefault(frozenset(range(c.offsets[e_axis], c.offsets[e_axis] + c.sizes[e_axis])),
                                     set()).add(rank(c))
            out["ep"] = len({frozenset(v) for v in ranks.values()})
            break
    return out


def vocab_facts(index: Index, config: dict) -> dict:
    st = index.tensors.get("embedding.word_embeddings.weight")
    return {"vocab_size": config.get("vocab_size"), "padded_vocab_size": st.shape[0] if st else None}


def optimizer_state(index: Index, folder=None) -> dict | None:
    """Optimizer state saved with the checkpoint, never read: its size in bytes and where it is. Megatron-LM
    keeps it in the model's own checkpoint (`optimizer.*` keys: the distributed optimizer's flat fp32 buffers);
    verl 0.9.1 in a sibling `optimizer/dist_ckpt/` (`folder`)."""
    inline = sum(math.prod(st.shape) * st.dtype.itemsize for k, st in index.tensors.items()
                 if k.startswith("optimizer."))
    beside = 0
    if folder is not None and (folder / ".metadata").is_file():
        from .dcp import open_index
        beside = sum(open_index(folder).files.values())
    if not inline and not beside:
        return None
    return {"bytes": inline + beside, "read": False,
            "where": str(folder if beside else index.folder)}
