"""The numbers stage at any model size: reference and export computed layer by layer (layerwise.py), weights
compared one tensor at a time, and the first decoder layer where the export leaves the reference named.

Same checks and tolerances as the whole-model path (numbers.py): only how the models are held differs.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ..formats import Source
from . import layerwise as lw
from ..tensors import FLOATS
from .compare import _beyond, compare_greedy, compare_logprobs, compare_scores, weights_verdict
from .numbers import Numbers, _backbone, left_padded, policy_numbers, score_numbers, tolerance
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

    def blocks(self, name: str, exported):
        """(exported rows, reference rows) pairs covering the tensor."""
        stored = self.run.loaders.get(name if not self.peft else f"base_model.model.{name}")
        if stored is not None and len(stored.shape) == 2 and stored.numel * 4 > lw.ROW_BLOCK_BYTES:
            mine, theirs, step = lw._rows(exported), lw._rows(stored), lw._block(stored)
            for start in range(0, stored.shape[0], step):
                stop = min(stored.shape[0], start + step)
                yield mine(start, stop).to(exported.dtype), theirs(start, stop)
            return
        yield exported.load(), self[name]

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


def _prompt_positions(run: lw.Run, spans: list[tuple[int, int]]) -> None:
    """Keep each prompt's own positions of a padded batch's layer outputs: (offset, length) per row."""
    run.layer_outputs = {k: [v[0][i, o:o + n] for i, (o, n) in enumerate(spans)] for k, v in run.layer_outputs.items()}


def compare_weights_streamed(merged: MergedReference, refs: dict, dtype) -> Check:
    """Every exported tensor against the reference's, rounded once to the export dtype, one row block at a time
    where the reference is a stored tensor (the vocabulary tables) and one module at a time where PEFT merges."""
    bad, compared = [], 0
    for name, ref in refs.items():
        if name not in merged.names or ref.dtype not in FLOATS:
            continue
        compared += 1
        over, dmax = 0, 0.0
        for got, want in merged.blocks(name, ref):
            if tuple(got.shape) != tuple(want.shape):
                over, dmax = got.numel(), math.inf
                break
            o, d = _beyond(got, want)
            over, dmax = over + o, max(dmax, d)
        if over:
            bad.append((name, over, dmax, None))
    return weights_verdict(bad, compared, dtype)


def _numbers(run: lw.Run, target: str, prompts, max_new_tokens: int, head=None) -> Numbers:
    with torch.no_grad(), lw.recording(run, first_call_only=target == "policy"):
        if target == "policy":
            num = policy_numbers(run.model, prompts, max_new_tokens)
            width = max(len(p) for p in prompts)
            _prompt_positions(run, [(width - len(p), len(p)) for p in prompts])
            return num
        weight, bias, norm = head
        model = run.model.get_base_model() if hasattr(run.model, "get_base_model") else run.model
        return score_numbers(_backbone(model), weight, bias, prompts, norm)


@torch.no_grad()
def teacher_forced(run: lw.Run, prompts, continuations: list[list[int]]) -> Numbers:
    """Prompt logprobs and the greedy choice at every step of the reference's continuation, in one pass.

    Where the export's argmax equals the reference's token at every step, its own greedy decoding produces the
    same tokens (the same prefix gives the same next token), so one forward pass replaces a pass per token."""
    seqs = [p + c for p, c in zip(prompts, continuations)]
    width = max(len(q) for q in seqs)
    ids, mask, pos = left_padded(seqs)
    with lw.recording(run):
        logits = run.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()
    _prompt_positions(run, [(width - len(q), len(p)) for q, p in zip(seqs, prompts)])
    lp = torch.log_softmax(logits, -1)
    num = Numbers()
    for i, (p, c) in enumerate(zip(prompts, continuations)):
        off = width - len(seqs[i])
        num.logprobs.append([lp[i, off + j - 1, p[j]].item() for j in range(1, len(p))])
        steps = [logits[i, off + len(p) - 1 + k] for k in range(len(c))]
        num.greedy.append([int(s.argmax()) for s in steps])
        num.margins.append([float(s.topk(2).values[0] - s.topk(2).values[1]) for s in steps])
    return num


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
    checks = [compare_weights_streamed(merged, folder.refs, dtype)]
    ref = _numbers(ref_run, target, prompts, max_new_tokens, _head(source, normalize) if target == "value" else None)
    exp_run = lw.export_run(folder.path, {n: r for n, r in folder.refs.items() if not n.startswith("score.")})
    exp_head = None
    if target == "value":
        exp_head = (folder.refs["score.weight"].load(), folder.refs["score.bias"].load()
                    if "score.bias" in folder.refs else None, None)
    got = teacher_forced(exp_run, prompts, ref.greedy) if target == "policy" else \
        _numbers(exp_run, target, prompts, max_new_tokens, exp_head)
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
