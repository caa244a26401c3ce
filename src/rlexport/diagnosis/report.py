"""The inspect report: a summary of the checkpoint, its findings, and answers from the files alone when it cannot be opened."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from ..errors import RlexportError
from ..findings import Finding
from ..formats import Source
from ..formats.value_heads import VALUE_HEAD_FILES
from ..tensors import dtype_name
from ..version import __version__
from .checks import CHECKS
from .facts import PARTIAL, SCHEMA, arch_of, export_cmd, Facts, gather, names_of, optimizer_files, trainer_facts


def _group(refs, files=()) -> dict:
    return {"count": len(refs), "bytes": sum(r.nbytes for r in refs),
            "dtypes": dict(Counter(dtype_name(r.dtype) for r in refs)),
            "files": sorted({Path(r.origin).name for r in refs if r.origin} | set(files))}


def summary(src: Source, facts: Facts | None = None) -> dict:
    groups: dict[str, dict] = {"base": _group(src.weights)}
    if src.adapter is not None:
        a = src.adapter
        groups["adapter"] = _group([t for u in a.updates for t in u.tensors.values()] + list(a.full.values()))
    if src.value_head:
        groups["head"] = _group(src.value_head)
    opt = optimizer_files(src)
    if opt:
        groups["optimizer"] = {"count": None, "bytes": sum(f.stat().st_size for f in opt), "dtypes": {},
                               "files": [str(f.relative_to(src.path)) for f in opt]}
    head = None
    if src.value_head:
        from ..heads import head_record
        rec = head_record(src)
        head = {"role": "reward" if src.facts.pooling == "last" else "value", "file": str(src.value_head_file or ""),
                "tensors": [{"name": r.name, "shape": list(r.shape), "dtype": dtype_name(r.dtype)}
                            for r in src.value_head],
                "convention": rec["convention"], "mean": rec["mean"], "std": rec["std"],
                "normalization_folded": rec["normalization_folded"], "serves": rec["serves"],
                "raw_serves": head_record(src, normalize=False)["serves"]}
    adapter = None
    if src.adapter is not None:
        a = src.adapter
        adapter = {"peft_type": str(a.config.get("peft_type") or "LORA").upper(), "r": a.rank,
                   "alpha": a.config.get("lora_alpha"), "modules": len(a.modules), "full_tensors": sorted(a.full),
                   "base_model_name_or_path": a.config.get("base_model_name_or_path")}
    return {
        "schema": SCHEMA, "rlexport_version": __version__, "complete": True,
        "path": str(src.path), "format": src.kind, "producer": src.producer, "stage": src.stage,
        "architecture": arch_of(src), "model_type": src.config.get("model_type"),
        "base": str(src.base_dir) if src.base_dir else None, "targets": list(src.targets),
        "target_commands": {t: export_cmd(src, "" if t == "policy" else f" --target {t}") for t in src.targets},
        "serve_commands": {t: f"rlexport serve {src.path}" + ("" if t == "policy" else f" --target {t}")
                           for t in src.targets},
        "head": head, "adapter": adapter,
        "vocab": {"config": src.config.get("vocab_size"), "embedding_rows": facts.embedding_rows if facts else None,
                  "tokenizer": facts.tokenizer_size if facts else None},
        "dtypes": dict(Counter(dtype_name(r.dtype) for r in src.weights)),
        "tensors": groups,
        "pieces": [{"kind": p.kind, "path": str(p.path), "note": p.note} for p in src.pieces],
        "scanned": bool(facts and facts.scanned),
        "tensor_parallel": tensor_parallel(src.config, facts.embedding_rows if facts else None),
        "quantize": quantize_preview(src),
        "moe": moe_facts(src),
        "trainer": trainer_facts(src),
    }


def _hub_refs(src) -> list:
    """The weights as an export writes them (MoE experts one by one), without the layers --quantize keeps (MoE
    routers); the stored weights when they cannot be laid out (the export then says why)."""
    from .. import moe
    from ..errors import RlexportError
    from ..hub_layout import to_hub_layout
    from ..transforms import clean_name
    try:
        refs = to_hub_layout([r.renamed(clean_name(r.name)) for r in src.weights], src.config)
    except RlexportError:
        return list(src.weights)
    keep = moe.never_quantized(src.config)
    return [r for r in refs if not (keep and r.name.endswith(keep))]


def moe_facts(src) -> dict | None:
    """A mixture-of-experts model: experts, top-k, shared experts, the layout found and the one an export writes."""
    from .. import moe
    from ..transforms import clean_name
    return moe.facts([clean_name(r.name) for r in src.weights], src.config)


def quantize_preview(src) -> dict:
    """Per --quantize scheme: how many decoder Linears it quantizes and which it must leave in full precision."""
    from ..quant.plan import fits, quantizable
    import torch
    from ..quant.schemes import SCHEMES, dtype_note
    linears = [r for r in _hub_refs(src) if quantizable(r)]
    out = {name: {"quantized": sum(fits(r, s) for r in linears),
                  "left_unquantized": [r.name for r in linears if not fits(r, s)][:5],
                  "left_count": sum(not fits(r, s) for r in linears)} for name, s in SCHEMES.items()}
    for name, s in SCHEMES.items():  # whatever dtype the export picks, say which one a scheme cannot be served in
        note = dtype_note(s, torch.float32)
        if note:
            out[name]["note"] = note
    return out


def tensor_parallel(config: dict, rows: int | None) -> dict:
    """The TP sizes vLLM accepts for the export (its vocabulary is the embedding's rows), and why others fail."""
    from .. import parallel
    cfg = dict(config, vocab_size=rows) if rows else config
    sizes = parallel.accepted_sizes(cfg)
    return {"sizes": sizes, "refused": {str(tp): parallel.refusals(cfg, tp)[0].split(" (")[0]
                                        for tp in (2, 4, 8, 16) if tp not in sizes}}


def _partial(ckpt: Path, e: RlexportError) -> dict:
    """A diagnosis from the files alone, for checkpoints open_checkpoint refuses for a fixable reason."""
    from ..formats.files import refs_of
    code = PARTIAL[e.code]
    refs = []
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (ckpt / name).is_file():
            try:
                refs = refs_of([ckpt / name])
            except RlexportError:
                refs = []
            break
    empty = [r for r in refs if r.numel == 0]
    engine = {
        "adapter-without-config": f"PEFT: ValueError: Can't find 'adapter_config.json' at '{ckpt}'; vLLM "
                                  "--lora-modules: LoRAAdapterNotFoundError",
        "base-unresolved": "vLLM cannot load an adapter without its base model",
        "unsupported-peft-type": "vLLM's runtime LoRA serves plain LoRA only (e.g. 'vLLM does not yet support "
                                 "DoRA.'); rlexport cannot merge it exactly",
        "zero3-placeholder": "PEFT: size mismatch for …lora_A.default.weight: copying a param with shape "
                             "torch.Size([0]) from checkpoint",
        "base-shape-mismatch": "PEFT: size mismatch for …lora_A.default.weight (the base has other shapes)",
        "head-not-saved": "PEFT + OpenRLHF (and its lora_combiner) load a randomly initialised head: every reward "
                          "is wrong",
    }[code]
    message = e.message
    if code == "zero3-placeholder" and empty:
        message = f"{len(empty)} adapter tensors are empty [0]-shaped placeholders (ZeRO-3 saved without gathering)"
    findings = [Finding(code, "error", message, engine, e.hint, e.file or str(ckpt), names_of(empty))]
    head = ckpt / VALUE_HEAD_FILES[0]
    groups = {"adapter": _group(refs)} if refs else {}
    if head.is_file():
        groups["head"] = _group(refs_of([head]))
        findings.append(Finding("value-head-present", "warning", "a TRL/LLaMA-Factory value head (v_head.summary) "
                                f"is in {head.name}", "vLLM and transformers ignore it", "export with --target value "
                                "once the error above is fixed", str(head)))
    return {"schema": SCHEMA, "rlexport_version": __version__, "complete": False, "path": str(ckpt),
            "format": "peft", "producer": None, "stage": None, "architecture": None, "model_type": None,
            "base": None, "targets": [], "target_commands": {}, "serve_commands": {}, "head": None, "adapter": None,
            "vocab": {"config": None, "embedding_rows": None, "tokenizer": None}, "dtypes": {},
            "tensors": groups, "pieces": [], "scanned": False,
            "tensor_parallel": {"sizes": [], "refused": {}}, "quantize": {}, "findings": [f.to_json() for f in findings]}


def inspect(ckpt: str | Path, *, base: str | Path | None = None, scan: bool | str = "auto",
            adapter: str | None = None, tag: str | None = None) -> dict:
    """What the checkpoint is and what will break. Mirrors `rlexport inspect --json` (docs/inspect.schema.json).

    Args:
        ckpt: the trainer's output folder (or one checkpoint-N/ in it).
        base: the base model folder or hub id, for adapters whose adapter_config.json does not resolve.
        scan: read every tensor once for NaN/Inf and float16 range: True, False, or "auto" (up to 2 GB).
        adapter, tag: as for open_checkpoint (one adapter of several; one step of a run folder).

    Example:
        >>> report = rlexport.inspect("saves/ppo")  # doctest: +SKIP
        >>> [f["code"] for f in report["findings"]]  # doctest: +SKIP
        ['value-head-present', 'adapter-needs-merge', 'eos-mismatch']
    """
    from ..formats import open_checkpoint
    try:
        src = open_checkpoint(ckpt, base=base, adapter=adapter, tag=tag)
    except RlexportError as e:
        if e.code not in PARTIAL:
            raise
        return _partial(Path(ckpt), e)
    facts = gather(src, scan=scan)
    findings = [f for check in CHECKS for f in check(src, facts)]
    return {**summary(src, facts), "findings": [f.to_json() for f in findings]}
