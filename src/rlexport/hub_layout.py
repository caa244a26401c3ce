"""Tensor names as the hub (and `save_pretrained`) lays them out, from the names a trainer saved in memory.

One mechanism, driven by the rows of archs.py; every export passes through it once, right after the wrapper
prefixes are stripped and before an adapter is merged (the merge matches adapter names across both layouts), so
the merge, the tie rule, config.json and the self-check all see the names that are written.
"""
from __future__ import annotations

from . import archs, moe
from .checks.processor import missing_tower
from .errors import RlexportError
from .tensors import TensorRef


def to_hub_layout(refs: list[TensorRef], config: dict) -> list[TensorRef]:
    """The same tensors under their hub-layout names; lazy (only names change)."""
    # -- vision-language models (archs.Vision.layout): transformers >= 5 in memory, PEFT and verl rank files use
    # model.language_model.* / model.visual.*; the hub keeps model.* / visual.* (Qwen2-VL, Qwen2.5-VL) or
    # language_model.model.* / vision_tower.* (Gemma 3, LLaVA). vLLM loads both; the hub layout is what other
    # tools (transformers 4.x, llama.cpp's converter, LLaMA-Factory) read.
    vision = archs.vision_of(config)
    if vision is not None:
        refs = [r.renamed(h) if (h := archs.to_hub(config, r.name)) != r.name else r for r in refs]
        tower = missing_tower(config, (r.name for r in refs))
        if tower is not None:  # a language-model-only save: served, it would look at images through random weights
            raise RlexportError("missing-vision-tower", f"{vision.cls} checkpoint without its vision tower: none "
                                f"of its {len(refs)} tensors is under {tower}", file=refs[0].origin if refs else None,
                                hint="export a checkpoint saved with the whole model, vision tower included")
    # -- mixture of experts (archs.Moe): fused `experts.gate_up_proj` [E, 2I, H] / `down_proj` [E, H, I] split into
    # the hub's `experts.<e>.<part>.weight` where the family's hub checkpoints are per expert, each output reading
    # only its expert's rows; then the experts are checked against config.json (moe.py).
    refs = moe.to_per_expert(refs, config)
    return refs
