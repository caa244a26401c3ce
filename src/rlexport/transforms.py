"""Per-tensor transforms between the source and the writer: names, adapter merge, ties, dtype.

Each function takes and returns lists of lazy TensorRefs; bytes are read only when the writer asks.
"""
from __future__ import annotations

import torch

from .errors import RlexportError
from .lora import Adapter, merge_ref
from .tensors import FLOATS, TensorRef, dtype_name

# Wrapper prefixes trainers add around the HF names (TRL wrapper walked by DeepSpeed/accelerate, PeftModel).
PREFIXES = ("pretrained_model.", "base_model.model.")
HEAD_PREFIXES = ("v_head.",)
# Buffers some checkpoints carry that no loader wants.
DROP_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")
# (embedding, output) names per model_type; llama-style names are the default.
EMBEDDING_PAIRS = {"gpt2": ("transformer.wte.weight", "lm_head.weight")}
DEFAULT_PAIR = ("model.embed_tokens.weight", "lm_head.weight")


def clean_name(name: str) -> str:
    for p in PREFIXES:
        if name.startswith(p):
            name = name[len(p):]
    return name


def strip_wrappers(refs: list[TensorRef]) -> list[TensorRef]:
    """Plain HF names; value heads and stale buffers dropped; [0] ZeRO-3 placeholders refused."""
    out = []
    for ref in refs:
        name = clean_name(ref.name)
        if name.startswith(HEAD_PREFIXES) or name.endswith(DROP_SUFFIXES):
            continue
        if ref.numel == 0 and ref.dtype in FLOATS:
            raise RlexportError("zero3-placeholder", f"tensor '{ref.name}' is an empty ZeRO-3 placeholder",
                                file=ref.origin, hint="the weights were never gathered; export the global_stepN/ "
                                "DeepSpeed checkpoint instead of this folder")
        out.append(ref.renamed(name) if name != ref.name else ref)
    return out


def apply_adapter(refs: list[TensorRef], adapter: Adapter) -> list[TensorRef]:
    fan_in_fan_out = bool(adapter.config.get("fan_in_fan_out"))
    names = {r.name for r in refs}
    unknown = [n for n in [*adapter.modules, *adapter.full] if n not in names]
    if unknown:
        raise RlexportError("adapter-base-mismatch", f"the adapter targets '{unknown[0]}', which the base "
                            "model does not have", file=adapter.path,
                            hint="pass the --base the adapter was trained on")
    out = []
    for ref in refs:
        if ref.name in adapter.full:
            out.append(adapter.full[ref.name])
        elif ref.name in adapter.modules:
            out.append(merge_ref(ref, adapter.modules[ref.name], fan_in_fan_out=fan_in_fan_out))
        else:
            out.append(ref)
    return out


def tie_embeddings(refs: list[TensorRef], config: dict) -> tuple[list[TensorRef], bool]:
    """Keep a tied pair tied when both sides are equal, else untie; returns (refs, tie_word_embeddings).

    vLLM silently skips lm_head.weight for tied configs, so a trained head that differs must be untied.
    """
    tied = bool(config.get("tie_word_embeddings", False))
    emb_name, head_name = EMBEDDING_PAIRS.get(config.get("model_type", ""), DEFAULT_PAIR)
    by_name = {r.name: r for r in refs}
    emb, head = by_name.get(emb_name), by_name.get(head_name)
    if not tied:
        if head is None and emb is not None:
            # an untied config without an output layer cannot load anywhere; the weights are tied in fact.
            return refs, True
        return refs, False
    if emb is None and head is not None:
        # some trainers dedupe aliased tensors and keep only the head (LLaMA-Factory RM, safetensors saves)
        return [head.renamed(emb_name) if r is head else r for r in refs], True
    if head is None:
        return refs, True
    if emb.shape == head.shape and torch.equal(emb.load().float(), head.load().float()):
        return [r for r in refs if r is not head], True
    return refs, False


def cast(ref: TensorRef, dtype: torch.dtype, *, allow_nonfinite: bool = False) -> TensorRef:
    """Cast a float tensor once to the output dtype; refuse fp16 overflow and NaN/Inf by name."""
    if ref.dtype not in FLOATS:
        return ref

    def run(t: torch.Tensor) -> torch.Tensor:
        if not allow_nonfinite and not bool(torch.isfinite(t).all()):
            raise RlexportError("nonfinite-weights", f"tensor '{ref.name}' holds NaN or Inf", file=ref.origin,
                                hint="the training run diverged; export an earlier checkpoint "
                                     "(or pass --allow-nonfinite to keep them)")
        if dtype == torch.float16 and t.dtype != torch.float16:
            peak = float(t.abs().max()) if t.numel() else 0.0
            if peak > torch.finfo(torch.float16).max:
                raise RlexportError("fp16-overflow", f"tensor '{ref.name}' has |x| up to {peak:.4g}, beyond "
                                    f"float16's 65504", file=ref.origin, hint="export with --dtype bfloat16")
        return t if t.dtype == dtype else t.to(dtype)

    return ref.mapped(run, dtype=dtype)


def describe_cast(src: torch.dtype, dst: torch.dtype) -> str:
    return dtype_name(src) if src == dst else f"{dtype_name(src)} -> {dtype_name(dst)}"
