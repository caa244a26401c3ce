"""Facts the checks share, gathered once per inspect: the bounded value scan, tokenizer size, embedding rows, the
architectures transformers and vLLM know, trainer state beside the weights."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import archs
from ..archs import architecture_known  # noqa: F401 (re-exported by diagnosis)
from ..formats import Source
from ..formats.common import json_or_empty
from ..tensors import FLOATS, TensorRef
from ..transforms import clean_name

SCHEMA = "rlexport.inspect/1"
SCAN_LIMIT_BYTES = 2_000_000_000
FP16_MAX = 65504.0
OPTIMIZER_FILES = ("optimizer.pt", "optimizer.bin", "scheduler.pt", "scaler.pt", "rng_state.pth")
VHEAD_ERROR = "ValueError: There is no module or parameter named 'v_head' in {arch}"
# open_checkpoint errors inspect turns into a finding instead of stopping (code -> finding code)
PARTIAL = {"adapter-without-config": "adapter-without-config", "base-unresolved": "base-unresolved",
           "unsupported-peft-type": "unsupported-peft-type", "unsupported-lora-variant": "unsupported-peft-type",
           "unsupported-lora-init": "unsupported-peft-type", "adapter-rank-mismatch": "zero3-placeholder",
           "empty-adapter": "zero3-placeholder", "adapter-base-mismatch": "base-shape-mismatch",
           "base-shape-mismatch": "base-shape-mismatch", "head-not-saved": "head-not-saved"}


@dataclass
class Facts:
    """What the checks share: computed once per inspect."""

    scanned: bool = False
    nonfinite: list[str] = field(default_factory=list)
    overflow: list[str] = field(default_factory=list)
    peak: float = 0.0
    tokenizer_size: int | None = None
    embedding_rows: int | None = None


def arch_of(src: Source) -> str:
    return (src.config.get("architectures") or ["?"])[0]


def export_cmd(src: Source, extra: str = "") -> str:
    if not extra and src.targets and "policy" not in src.targets:
        extra = f" --target {src.targets[0]}"  # a reward model or critic exports only as one
    return f"rlexport export {src.path} --out OUT{extra}"


def names_of(refs) -> tuple[str, ...]:
    return tuple(r.name for r in refs)[:5]


def all_refs(src: Source) -> list[TensorRef]:
    refs = list(src.weights) + list(src.value_head)
    if src.adapter is not None:
        for u in getattr(src.adapter, "updates", ()):
            refs += list(u.tensors.values())
        refs += list(src.adapter.full.values())
    return refs


# --- facts -------------------------------------------------------------------------------------------------------
def scan_values(refs: list[TensorRef]) -> tuple[list[str], list[str], float]:
    """Stream every float tensor once: names holding NaN/Inf, names beyond float16's range, the largest |x|."""
    nonfinite, overflow, peak = [], [], 0.0
    for ref in refs:
        if ref.dtype not in FLOATS or ref.numel == 0:
            continue
        lo, hi = (float(x) for x in torch.aminmax(ref.load()))  # NaN propagates, Inf shows
        if not (math.isfinite(lo) and math.isfinite(hi)):
            nonfinite.append(ref.name)
            continue
        top = max(abs(lo), abs(hi))
        peak = max(peak, top)
        if top > FP16_MAX and ref.dtype != torch.float16:
            overflow.append(ref.name)
    return nonfinite, overflow, peak


def tokenizer_size(folder: Path | None) -> int | None:
    """len(tokenizer) from tokenizer.json / vocab.json without loading a tokenizer library (None if unknown)."""
    if folder is None:
        return None
    tj = json_or_empty(folder / "tokenizer.json")
    ids: list[int] = [int(t["id"]) for t in tj.get("added_tokens", []) if "id" in t]
    vocab = tj.get("model", {}).get("vocab")
    if isinstance(vocab, dict):
        ids += [int(v) for v in vocab.values()]
    elif isinstance(vocab, list):
        ids.append(len(vocab) - 1)
    elif (folder / "vocab.json").is_file():
        ids += [int(v) for v in json_or_empty(folder / "vocab.json").values()]
    ids += [int(k) for k in json_or_empty(folder / "tokenizer_config.json").get("added_tokens_decoder", {})]
    return max(ids) + 1 if ids else None


def embedding_rows(src: Source) -> int | None:
    emb, _ = archs.embedding_pair(src.config)
    if src.adapter is not None:
        for name, ref in src.adapter.full.items():
            if name == emb and len(ref.shape) == 2:
                return ref.shape[0]
    for r in src.weights:
        if clean_name(r.name) == emb and len(r.shape) == 2:
            return r.shape[0]
    return None


def optimizer_files(src: Source) -> list[Path]:
    """Trainer state beside the weights; a global_stepN/ the weights are read from (DeepSpeed) is not counted."""
    folder = src.path
    files = {Path(r.origin).resolve() for r in src.weights if r.origin}
    sources = {f.parent for f in files}
    out = [folder / n for n in OPTIMIZER_FILES if (folder / n).is_file()]
    for step in sorted(folder.glob("global_step*")):
        if not step.is_dir():
            continue
        step_r = step.resolve()
        used = any(step_r == s or step_r in s.parents for s in sources)  # the weights are read from in here
        for p in sorted(p for p in step.rglob("*") if p.is_file()):
            # inside the step the weights come from: only optimizer/extra state beside them (verl's optim_*,
            # extra_state_*), never the files the weights are read from (DeepSpeed's partitions)
            if not used or (p.resolve() not in files and p.name.startswith(("optim", "extra_state"))):
                out.append(p)
    return out


def trainer_facts(src: Source) -> dict | None:
    """The input format's own facts (Megatron, NeMo-RL: trainer, parallel layout saved with, padded vs real
    vocabulary, optimizer state and that it is skipped): its reader's `inspect_facts(src)` hook, where it has one;
    for a run folder also its steps, complete or not (the `steps` hook)."""
    import importlib
    from ..formats import FORMATS
    fmt = next((f for f in FORMATS if f.kind == src.kind), None)
    hook = getattr(importlib.import_module(fmt.module), "inspect_facts", None) if fmt else None
    out = hook(src) if hook else None
    from ..formats import steps_of
    found = steps_of(src.path)  # a run folder: its steps, and which the trainer finished saving
    if found:
        out = {**(out or {}), "steps": [{"tag": s.tag, "complete": s.complete, "why": s.why} for s in found]}
    return out


def gather(src: Source, *, scan: bool | str = "auto") -> Facts:
    facts = Facts(tokenizer_size=tokenizer_size(src.tokenizer_dirs[0] if src.tokenizer_dirs else None),
                  embedding_rows=embedding_rows(src))
    refs = all_refs(src)
    if scan == "auto":
        scan = sum(r.nbytes for r in refs) <= SCAN_LIMIT_BYTES
    if scan:
        facts.nonfinite, facts.overflow, facts.peak = scan_values(refs)
        facts.scanned = True
    return facts
