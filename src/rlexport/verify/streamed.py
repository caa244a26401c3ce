"""The numbers stage at any model size: reference and export computed layer by layer (layerwise.py), weights
compared one tensor at a time, and the first decoder layer where the export leaves the reference named.

Same checks and tolerances as the whole-model path (numbers.py): only how the models are held differs.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from ..formats import Source
from . import layerwise as lw
from .numbers import Numbers, compare_greedy, compare_logprobs, compare_scores, compare_weights, policy_numbers, \
    score_numbers, _backbone, tolerance
from .report import Check

# relative max |Δ| of a decoder layer's output before it counts as leaving the reference, by the export's dtype
LAYER_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.05, torch.float16: 0.01}
WHOLE_MODEL_LIMIT = 2 * 2**30  # float32 bytes above which verify goes layer by layer by default


def too_large_for_whole(source: Source) -> bool:
    return sum(r.numel for r in source.weights) * 4 > WHOLE_MODEL_LIMIT


class MergedReference(Mapping):
    """name -> the training-time model's tensor, merged as PEFT merges it (PEFT's own `merge`), one at a time."""

    def __init__(self, run: lw.Run, peft: bool, value: bool):
        self.run, self.peft = run, peft
        names = [k.removeprefix("base_model.model.").replace(".base_layer.", ".") for k in run.loaders]
        self.names = [n for n in dict.fromkeys(names) if not (value and n.startswith("lm_head"))]

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self):
        return iter(self.names)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise KeyError(name)
        if not self.peft:
            return self.run.loaders[name].load().to(torch.float32)
        path, param = name.rsplit(".", 1)
        module = self.run.model.get_submodule(f"base_model.model.{path}")
        if not (hasattr(module, "base_layer") and hasattr(module, "merge")):
            return self.run.loaders[f"base_model.model.{name}"].load().to(torch.float32)
        params = [p for p in lw._own(module.base_layer, f"base_model.model.{path}.base_layer.", recurse=True)
                  if p[2] in self.run.loaders]
        lw._fill(self.run, params)
        try:
            module.merge()
            return getattr(module.base_layer, param).detach().clone()
        finally:
            module.merged_adapters = []
            lw._empty(params)


def _numbers(run: lw.Run, target: str, prompts, max_new_tokens: int, head=None) -> Numbers:
    with torch.no_grad(), lw.recording(run, first_call_only=target == "policy"):
        if target == "policy":
            return policy_numbers(run.model, prompts, max_new_tokens)
        weight, bias, norm = head
        model = run.model.get_base_model() if hasattr(run.model, "get_base_model") else run.model
        return score_numbers(_backbone(model), weight, bias, prompts, norm)


def _head(source: Source, normalize: bool):
    info = source.head
    tensors = {r.name.rsplit(".", 1)[-1]: r.load() for r in source.value_head}
    norm = (info.mean, info.std) if normalize and info.normalizable else None
    return tensors["weight"], tensors.get("bias"), norm


def numbers_stage(folder, source: Source, prompts, max_new_tokens: int, *, normalize: bool = True) \
        -> tuple[list[Check], Numbers, Numbers]:
    """weights, then logprobs + greedy (policy) or scores (value), with the first diverging layer in the details."""
    target, dtype = folder.target, folder.dtype
    ref_run = lw.reference_run(source)
    merged = MergedReference(ref_run, source.adapter is not None, target == "value")
    checks = [compare_weights(merged, folder.refs, dtype)]
    ref = _numbers(ref_run, target, prompts, max_new_tokens, _head(source, normalize) if target == "value" else None)
    exp_run = lw.export_run(folder.path, {n: r for n, r in folder.refs.items() if not n.startswith("score.")})
    exp_head = None
    if target == "value":
        exp_head = (folder.refs["score.weight"].load(), folder.refs["score.bias"].load()
                    if "score.bias" in folder.refs else None, None)
    got = _numbers(exp_run, target, prompts, max_new_tokens, exp_head)
    if target == "policy":
        out = [compare_logprobs(ref, got, dtype), compare_greedy(ref, got, dtype)]
    else:
        out = [compare_scores(ref, got, dtype)]
    where = lw.first_divergence(ref_run, exp_run, tolerance(dtype, LAYER_TOLERANCE))
    layers = len(ref_run.layer_outputs)
    for c in out:
        c.details.append(f"reference: the training-time model computed layer by layer ({layers} decoder layers, "
                         f"largest module {ref_run.peak_module_bytes / 2**20:.0f} MiB in float32)")
        if where is not None:
            c.details.insert(0, f"decoder layer {where[0]} is the first to leave the reference (relative max "
                                f"|Δ| {where[1]:.3g}); the weights check names its tensors")
        c.metrics["first_divergent_layer"] = where[0] if where else None
    return checks + out, ref, got
