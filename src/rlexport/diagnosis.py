"""diagnose(): the findings behind `rlexport inspect`. Each check is a small function in CHECKS."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable

import torch

from .findings import Finding
from .folder import tokenizer_eos_id
from .formats import Source
from .formats.common import json_or_empty
from .tensors import FLOATS, dtype_name

VHEAD_ERROR = "ValueError: There is no module or parameter named 'v_head' in {arch}"


def _arch(src: Source) -> str:
    return (src.config.get("architectures") or ["?"])[0]


def _export_cmd(src: Source, extra: str = "") -> str:
    return f"rlexport export {src.path} --out OUT{extra}"


def check_value_head(src: Source) -> list[Finding]:
    if not src.value_head:
        return []
    inside = src.value_head_file is not None and src.value_head_file.name.startswith(("model", "pytorch_model"))
    where = "inside the model weights" if inside else f"in {src.value_head_file.name}"
    engine = (VHEAD_ERROR.format(arch=_arch(src)) if src.kind == "hf" else
              "vLLM ignores it; the value model is lost unless exported with --target value")
    return [Finding("value-head-present", "warning", f"a TRL/LLaMA-Factory value head (v_head.summary) is {where}",
                    engine, f"{_export_cmd(src)} (policy) and {_export_cmd(src, ' --target value')}",
                    str(src.value_head_file))]


def check_adapter(src: Source) -> list[Finding]:
    if src.adapter is None:
        return []
    a = src.adapter
    out = [Finding("adapter-needs-merge", "warning", f"LoRA adapter (r={a.rank}, {len(a.modules)} modules) is not "
                   f"merged; base: {src.base_dir}",
                   "vLLM: the folder has no config.json and cannot load; runtime LoRA needs --enable-lora",
                   _export_cmd(src), str(a.path))]
    if a.full:
        out.append(Finding("adapter-full-modules", "info", f"the adapter carries {len(a.full)} full tensors "
                           f"(modules_to_save / embeddings): {', '.join(list(a.full)[:3])}",
                           "vLLM's runtime LoRA rejects modules_to_save outside classifiers", _export_cmd(src),
                           str(a.path)))
    return out


def check_dtype(src: Source) -> list[Finding]:
    counts = Counter(r.dtype for r in src.weights if r.dtype in FLOATS)
    if src.adapter is not None or not counts or counts.most_common(1)[0][0] != torch.float32:
        return []
    return [Finding("fp32-weights", "warning", "weights are float32 (the trainer's upcast), twice the size",
                    "vLLM's dtype auto may serve them in float16 and overflow",
                    _export_cmd(src, " --dtype bfloat16 (the default picks the base dtype)"))]


def check_files(src: Source) -> list[Finding]:
    out = []
    if not src.tokenizer_dirs:
        out.append(Finding("missing-tokenizer", "error", "no tokenizer in the checkpoint or the base",
                           "vLLM fails to load a tokenizer", "pass --base with the base model that has one"))
        return out
    tdir = src.tokenizer_dirs[0]
    has_template = any((d / "chat_template.jinja").is_file() or "chat_template" in
                       json_or_empty(d / "tokenizer_config.json") for d in src.tokenizer_dirs)
    if not has_template:
        out.append(Finding("missing-chat-template", "warning", "no chat template in the checkpoint or the base",
                           "vLLM's chat endpoint refuses requests (default chat template is no longer allowed)",
                           "add the template the model was trained with (chat_template.jinja)"))
    gen_dirs = [d for d in (src.config_dir, src.path, src.base_dir) if d and (d / "generation_config.json").is_file()]
    if not gen_dirs:
        out.append(Finding("missing-generation-config", "info", "no generation_config.json",
                           "vLLM falls back to config.json's eos only", _export_cmd(src) + " (writes one)"))
    eos = tokenizer_eos_id(src)
    gen_eos = json_or_empty(gen_dirs[0] / "generation_config.json").get("eos_token_id") if gen_dirs else None
    gen_ids = gen_eos if isinstance(gen_eos, list) else [gen_eos]
    if eos is not None and eos not in gen_ids:
        out.append(Finding("eos-mismatch", "warning", f"the tokenizer's eos (id {eos}, from {tdir.name}/) is not in "
                           f"generation_config's eos_token_id {gen_eos}",
                           "generation may not stop at the end of a turn",
                           _export_cmd(src) + " (lists both ids)"))
    return out


def check_vocab(src: Source) -> list[Finding]:
    rows = next((r.shape[0] for r in src.weights if r.name.endswith("embed_tokens.weight")), None)
    if src.adapter is not None:
        rows = next((r.shape[0] for n, r in src.adapter.full.items() if n.endswith("embed_tokens.weight")), rows)
    if rows is not None and rows != src.config.get("vocab_size"):
        return [Finding("vocab-resized", "warning", f"embedding has {rows} rows, config vocab_size is "
                        f"{src.config.get('vocab_size')}", "vLLM asserts on the embedding shape",
                        _export_cmd(src) + " (fixes vocab_size)")]
    return []


def check_pieces(src: Source) -> list[Finding]:
    out = []
    for p in src.pieces:
        if p.kind == "reward-adapter":
            out.append(Finding("reward-adapter-beside", "info", f"{p.path.name}/ holds the PPO reward model's "
                               "adapter; its value head was not saved with it (LLaMA-Factory keeps it in memory)",
                               "not part of the policy; exporting it alone would make up a head",
                               "export the reward model from its own RM run folder with --target value",
                               str(p.path)))
    return out


def check_stage(src: Source) -> list[Finding]:
    if src.stage == "rm":
        return [Finding("reward-model", "info", "reward-model (stage rm) checkpoint: the LM head is untrained",
                        "served as a causal LM it would generate from the base's head",
                        _export_cmd(src, " --target value"))]
    return []


CHECKS: tuple[Callable[[Source], list[Finding]], ...] = (
    check_stage, check_value_head, check_adapter, check_dtype, check_vocab, check_files, check_pieces,
)


def diagnose(src: Source) -> list[Finding]:
    return [f for check in CHECKS for f in check(src)]


def summary(src: Source) -> dict:
    groups: dict[str, list] = {"base": list(src.weights), "head": list(src.value_head)}
    if src.adapter is not None:
        a = src.adapter
        groups["adapter"] = [m.a for m in a.modules.values()] + [m.b for m in a.modules.values()] + list(a.full.values())
    dtypes = Counter(dtype_name(r.dtype) for r in src.weights)
    return {
        "path": str(src.path), "format": src.kind, "producer": src.producer, "stage": src.stage,
        "architecture": _arch(src), "model_type": src.config.get("model_type"),
        "base": str(src.base_dir) if src.base_dir else None, "targets": list(src.targets),
        "dtypes": dict(dtypes),
        "tensors": {k: {"count": len(v), "bytes": sum(r.nbytes for r in v)} for k, v in groups.items() if v},
        "pieces": [{"kind": p.kind, "path": str(p.path), "note": p.note} for p in src.pieces],
    }


def inspect(ckpt: str | Path, *, base: str | Path | None = None) -> dict:
    """What the checkpoint is and what will break. Mirrors `rlexport inspect --json`."""
    from .errors import RlexportError
    from .formats import open_checkpoint
    try:
        src = open_checkpoint(ckpt, base=base)
    except RlexportError as e:
        if e.code != "base-unresolved":
            raise
        # Still a useful diagnosis: say what it is and what to pass.
        f = Finding("base-unresolved", "error", e.message, "vLLM cannot load an adapter without its base",
                    e.hint, e.file or "")
        return {"path": str(ckpt), "format": "peft", "producer": None, "stage": None, "architecture": None,
                "model_type": None, "base": None, "targets": [], "dtypes": {}, "tensors": {}, "pieces": [],
                "findings": [f.to_json()]}
    return {**summary(src), "findings": [f.to_json() for f in diagnose(src)]}
