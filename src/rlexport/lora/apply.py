"""Apply an adapter to the base model's tensors, lazily: each output tensor is its base tensor (or the adapter's
trained replacement) with the adapter's updates applied in float32 when the writer reads it.

Names: PEFT saw modules in memory; the base checkpoint may store them differently (archs.py: renames, MoE experts
stored per expert). Every shape is checked here, before any byte is read: a mismatch never half-merges an export.

Tied embeddings: PEFT's merge_and_unload adds a LoRA trained on one side (lm_head, or embed_tokens) into the one
shared parameter, so the merged model's other side changes too and its logits differ from the trained
PeftModel's. rlexport merges each side's updates into that side only (trained replacements of the shared weight
and trainable tokens, which PEFT ties, go to both), then transforms.tie_embeddings keeps the pair tied when the
two sides are equal and unties it otherwise.
"""
from __future__ import annotations

from ..tensors import TensorRef
from .experts import plan_param
from .merge import Merge
from .others import plan_ia3, plan_loha, plan_lokr
from .read import Adapter

# the adapter kinds whose planning lives beside Merge, not in it
PLANNERS = {"loha": plan_loha, "lokr": plan_lokr, "ia3": plan_ia3, "param": plan_param}


def apply_adapter(refs: list[TensorRef], adapter: Adapter) -> list[TensorRef]:
    """The base tensors with the adapter merged (float32 where changed; the caller casts once)."""
    return Merge(list(refs), adapter, PLANNERS).refs()
