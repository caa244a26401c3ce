"""export(): source -> transforms -> streaming writer -> folder files, atomically."""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import folder
from .errors import RlexportError
from .formats import Source, open_checkpoint
from .tensors import DTYPES, FLOATS, TensorRef, dtype_name, parse_dtype, parse_size
from .transforms import apply_adapter, cast, strip_wrappers, tie_embeddings
from .writer import TMP_MARK, AtomicFolder, plan_shards, stale_temporaries, write_index, write_shard

log = logging.getLogger("rlexport")
TARGETS = ("policy", "value")


@dataclass(frozen=True)
class Plan:
    source: Source
    target: str
    dtype: torch.dtype
    dtype_reason: str
    tensors: tuple[TensorRef, ...]
    config: dict
    extra_files: dict[str, dict] = field(default_factory=dict)  # json files to write beside the weights


@dataclass(frozen=True)
class Report:
    out: Path
    target: str
    dtype: str
    tensors: int
    bytes: int
    shards: int
    files: tuple[str, ...]
    serve_hint: str


def resolve_dtype(src: Source, requested: str) -> tuple[torch.dtype, str]:
    if requested != "auto":
        return parse_dtype(requested), "--dtype"
    for cfg, where in ((src.base_config, "the base model's config"), (src.config, "config.json")):
        name = (cfg or {}).get("dtype") or (cfg or {}).get("torch_dtype")
        if isinstance(name, str) and name in DTYPES:
            dt = DTYPES[name]
            if dt == torch.float32 and src.base_config is None:
                # Trainers upcast to fp32 for the optimizer and say so in config.json; published bases are
                # 16-bit, and an fp32 folder is served in fp16 by vLLM (overflow), so default to bf16.
                return torch.bfloat16, "config.json says float32 (trainer upcast); bfloat16 chosen"
            return dt, where
    return torch.bfloat16, "no dtype in config; bfloat16 chosen"


def _vocab_rows(refs: list[TensorRef], config: dict) -> int | None:
    for r in refs:
        if r.name.endswith(("embed_tokens.weight", "wte.weight", "word_embeddings.weight")) and len(r.shape) == 2:
            return r.shape[0]
    return config.get("vocab_size")


def plan_policy(src: Source, dtype: torch.dtype, *, allow_nonfinite: bool) -> tuple[list[TensorRef], dict]:
    refs = strip_wrappers(list(src.weights))
    if src.adapter is not None:
        refs = apply_adapter(refs, src.adapter)
    refs, tied = tie_embeddings(refs, src.config)
    refs = [cast(r, dtype, allow_nonfinite=allow_nonfinite) for r in refs]
    cfg = folder.model_config(src, dtype=dtype, vocab_size=_vocab_rows(refs, src.config), tied=tied)
    return refs, cfg


def plan(src: Source, *, target: str = "policy", dtype: str = "auto", allow_nonfinite: bool = False) -> Plan:
    if target not in TARGETS:
        raise RlexportError("bad-target", f"unknown target '{target}'", hint=f"use one of {', '.join(TARGETS)}")
    if target == "policy" and src.stage == "rm":
        raise RlexportError("rm-has-no-policy", "this is a reward-model (stage rm) checkpoint: its LM head was "
                            "never trained", file=src.path, hint="export it with --target value")
    if target not in src.targets:
        raise RlexportError("target-unavailable", f"this checkpoint offers {', '.join(src.targets)}, not {target}",
                            file=src.path, hint=f"use --target {src.targets[0]}")
    dt, why = resolve_dtype(src, dtype)
    if target == "policy":
        refs, cfg = plan_policy(src, dt, allow_nonfinite=allow_nonfinite)
    else:
        from .heads import plan_value
        refs, cfg = plan_value(src, dt, allow_nonfinite=allow_nonfinite)
    return Plan(src, target, dt, why, tuple(refs), cfg, {"generation_config.json": folder.generation_config(src)}
                if target == "policy" else {})


def check_out(out: Path, src: Source, *, force: bool) -> None:
    out_r = out.resolve()
    for inp in filter(None, (src.path, src.base_dir)):
        inp_r = Path(inp).resolve()
        if out_r == inp_r or inp_r in out_r.parents or out_r in inp_r.parents:
            raise RlexportError("out-overlaps-input", "--out is the input, inside it, or contains it",
                                file=out, hint="choose an output folder outside the checkpoint and the base model")
    if out.exists() and not out.is_dir():
        raise RlexportError("out-not-folder", "--out exists and is not a folder", file=out,
                            hint="choose another --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise RlexportError("out-exists", "output folder exists and is not empty", file=out,
                            hint="pass --force to replace it, or choose another --out")


def clean_stale(out: Path) -> list[Path]:
    """Remove temporaries of killed exports to this --out (their pid is gone)."""
    removed = []
    for p in stale_temporaries(out):
        pid = p.name.split(TMP_MARK, 1)[1].split("-", 1)[0]
        if pid.isdigit() and _alive(int(pid)):
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
        log.warning("removed the unfinished export %s left by an interrupted run", p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write(p: Plan, out: Path, *, max_shard_size="5GB", force: bool = False,
          on_bytes: Callable[[int], None] | None = None) -> Report:
    out = Path(out)
    check_out(out, p.source, force=force)
    clean_stale(out)
    shards = plan_shards(list(p.tensors), parse_size(max_shard_size))
    with AtomicFolder(out, force=force) as tmp:
        for shard in shards:
            write_shard(tmp / shard.filename, shard, on_bytes)
            log.info("wrote %s (%d tensors)", shard.filename, len(shard.refs))
        write_index(tmp, shards)
        folder.write_json(tmp / "config.json", p.config)
        for name, data in p.extra_files.items():
            folder.write_json(tmp / name, data)
        copied = folder.copy_tokenizer(p.source, tmp)
        files = tuple(sorted(x.name for x in tmp.iterdir()))
    hint = f"vllm serve {out}" if p.target == "policy" else f"vllm serve {out} --runner pooling"
    return Report(out, p.target, dtype_name(p.dtype), len(p.tensors), sum(s.nbytes for s in shards),
                  len(shards), files, hint)


def export(ckpt: str | Path, out: str | Path, *, base: str | Path | None = None, target: str = "policy",
           dtype: str = "auto", max_shard_size: str | int = "5GB", force: bool = False,
           allow_nonfinite: bool = False, on_bytes: Callable[[int], None] | None = None) -> Report:
    """Export a training checkpoint to a Hugging Face folder vLLM serves. Mirrors `rlexport export`.

    Example:
        >>> rlexport.export("saves/ppo", "out/policy", dtype="bfloat16")  # doctest: +SKIP
    """
    src = open_checkpoint(ckpt, base=base)
    check_out(Path(out), src, force=force)
    return write(plan(src, target=target, dtype=dtype, allow_nonfinite=allow_nonfinite), Path(out),
                 max_shard_size=max_shard_size, force=force, on_bytes=on_bytes)
