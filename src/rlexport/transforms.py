"""Per-tensor transforms between the source and the writer: names, adapter merge, ties, dtype.

Each function takes and returns lists of lazy TensorRefs; bytes are read only when the writer asks.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch

from . import archs
from .errors import RlexportError
from .formats.value_heads import TRL_PREFIXES
from .lora import Adapter
from .lora import apply_adapter as _merge_adapter
from .stream import Cast, equal_values
from .tensors import FLOATS, TensorRef, dtype_name

# Wrapper prefixes trainers add around the HF names (TRL wrapper walked by DeepSpeed/accelerate, PeftModel).
PREFIXES = ("pretrained_model.", "base_model.model.")
# Buffers some checkpoints carry that no loader wants.
DROP_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")
# (embedding, output) names per model_type (archs.ARCHS); llama-style names are the default.
EMBEDDING_PAIRS = {k: (a.embed, a.head) for k, a in archs.ARCHS.items() if (a.embed, a.head) != (archs.DEFAULT.embed,
                                                                                                   archs.DEFAULT.head)}
DEFAULT_PAIR = (archs.DEFAULT.embed, archs.DEFAULT.head)


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
        if name.startswith(TRL_PREFIXES) or name.endswith(DROP_SUFFIXES):
            continue
        if ref.numel == 0 and ref.dtype in FLOATS:
            raise RlexportError("zero3-placeholder", f"tensor '{ref.name}' is an empty ZeRO-3 placeholder",
                                file=ref.origin, hint="the weights were never gathered; export the global_stepN/ "
                                "DeepSpeed checkpoint instead of this folder")
        out.append(ref.renamed(name) if name != ref.name else ref)
    return out


def apply_adapter(refs: list[TensorRef], adapter: Adapter) -> list[TensorRef]:
    """Merge a PEFT adapter into the base tensors (rlexport.lora; float32 where changed, cast once later)."""
    return _merge_adapter(refs, adapter)


def tie_embeddings(refs: list[TensorRef], config: dict) -> tuple[list[TensorRef], bool]:
    """Keep a tied pair tied when both sides are equal, else untie; returns (refs, tie_word_embeddings).

    vLLM silently skips lm_head.weight for tied configs, so a trained head that differs must be untied.
    """
    tied = archs.is_tied(config)
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
    if emb.shape == head.shape and equal_values(emb.load, head.load, emb.shape):
        return [r for r in refs if r is not head], True
    return refs, False


def cast(ref: TensorRef, dtype: torch.dtype, *, allow_nonfinite: bool = False) -> TensorRef:
    """Cast a float tensor once to the output dtype; refuse fp16 overflow and NaN/Inf by name."""
    if ref.dtype not in FLOATS:
        return ref
    to_fp16 = dtype == torch.float16 and ref.dtype != torch.float16

    def check(t: torch.Tensor) -> None:
        # One pass, no temporaries (isfinite().all() and abs().max() each allocate and cost 5-10x more); the
        # writer calls it on every row block before the cast, so the guarantee holds for every tensor.
        if not t.numel():
            return
        lo, hi = (float(x) for x in torch.aminmax(t))  # NaN propagates into both, Inf into one
        if not allow_nonfinite and not (math.isfinite(lo) and math.isfinite(hi)):
            raise RlexportError("nonfinite-weights", f"tensor '{ref.name}' holds NaN or Inf", file=ref.origin,
                                hint="the training run diverged; export an earlier checkpoint "
                                     "(or pass --allow-nonfinite to keep them)")
        if to_fp16 and t.dtype != torch.float16:
            peak = max(abs(lo), abs(hi))
            if peak > torch.finfo(torch.float16).max:
                raise RlexportError("fp16-overflow", f"tensor '{ref.name}' has |x| up to {peak:.4g}, beyond "
                                    f"float16's 65504", file=ref.origin, hint="export with --dtype bfloat16")

    # allow_nonfinite and no fp16 overflow possible: nothing to check, and an unchanged tensor is a byte copy
    needs_check = not allow_nonfinite or to_fp16
    return replace(ref, load=Cast(ref.load, dtype, ref.shape, check if needs_check else None), dtype=dtype)


def describe_cast(src: torch.dtype, dst: torch.dtype) -> str:
    return dtype_name(src) if src == dst else f"{dtype_name(src)} -> {dtype_name(dst)}"
