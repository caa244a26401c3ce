"""verify(): prove an exported folder is right. Backs `rlexport verify` and `rlexport export --verify`.

Three stages, each a list of named checks (verify_report.CHECK_NAMES) with pass / fail / skip:
  structure  (verify_structure,  files, architecture, every tensor against the meta-device model, dtype, values;
              verify_tokens)     tokenizer, generation config, EOS, chat template
  numbers    (verify_numbers)    with --against: the training-time model rebuilt with transformers/PEFT; weights,
                                 prompt logprobs, greedy tokens, head scores, with dtype-dependent tolerances
  engine     (verify_engine)     the folder in vLLM (subprocess) or transformers: loads, and agrees
The report is OK only when no check fails; skipped checks (no --against, --engine none) do not fail it.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import RlexportError
from .tensors import dtype_name
from .verify_engine import engine_stage, resolve_engine
from .verify_numbers import Numbers, compare_greedy, compare_logprobs, compare_scores, compare_weights, \
    export_numbers, make_prompts, reference
from .verify_report import CHECK_NAMES, SCHEMA, Check, VerifyReport, failed, skipped
from . import verify_structure, verify_tokens
from .verify_structure import Folder

N = "numbers"
__all__ = ["verify", "VerifyReport", "Check", "CHECK_NAMES", "SCHEMA"]


STRUCTURE = verify_structure.CHECKS + verify_tokens.CHECKS


def structure(path: Path, source) -> tuple[list[Check], Folder]:
    """The structure stage: every check in order, each reading what the earlier ones put in the Folder."""
    folder = Folder(Path(path))
    return [check(folder, source) for check in STRUCTURE], folder


def _require(*packages: str) -> None:
    for p in packages:
        if importlib.util.find_spec(p) is None:
            raise RlexportError("missing-dependency", f"rlexport verify needs {p}", hint=f"pip install {p}")


def _numbers_stage(folder: Folder, source, prompts, max_new_tokens: int) \
        -> tuple[list[Check], Numbers | None, list[str] | None]:
    """Reference vs export. Peak memory: one float32 model and one tensor (the reference is freed first)."""
    policy = folder.target == "policy"
    not_this = ["scores"] if policy else ["logprobs", "greedy"]
    skips = [skipped(n, N, f"not a {'value' if policy else 'policy'} export") for n in not_this]
    if folder.target is None or folder.hf_config is None:
        return [skipped(n, N, "the structure checks found no loadable architecture")
                for n in ("weights", "logprobs", "greedy", "scores")], None, None
    if folder.target == "value" and not source.value_head:
        return [failed("scores", N, "the checkpoint has no value head to compare the exported head with")] + \
            [skipped(n, N, "no reference") for n in ("weights", "logprobs", "greedy")], None, None
    ref = reference(source, folder.target, prompts, max_new_tokens=max_new_tokens)
    checks = [compare_weights(ref.weights, folder.refs, folder.dtype)]
    ref_numbers, how = ref.numbers, ref.how
    del ref  # free the reference weights (unless cached) before the export is loaded
    try:
        got, problems = export_numbers(folder.path, folder.target, prompts, folder.refs,
                                       max_new_tokens=max_new_tokens)
    except Exception as e:  # the loader's own error is the finding (shape mismatch, missing file ...)
        first = (str(e).strip().splitlines() or [""])[0]
        names = ["logprobs", "greedy"] if policy else ["scores"]
        return checks + [failed(n, N, f"transformers cannot load the folder: {type(e).__name__}: {first}")
                         for n in names] + skips, ref_numbers, None
    if policy:
        out = [compare_logprobs(ref_numbers, got, folder.dtype), compare_greedy(ref_numbers, got, folder.dtype)]
    else:
        out = [compare_scores(ref_numbers, got, folder.dtype)]
    for c in out:
        c.details += problems
        c.details.append(f"reference: {how}")
    return checks + out + skips, ref_numbers, problems


def verify(out_dir: str | Path, *, against: str | Path | None = None, base: str | Path | None = None,
           engine: str = "auto", prompts: list[list[int]] | None = None, max_new_tokens: int = 12) -> VerifyReport:
    """Check an exported folder; with `against`, compare it with the training-time model. Mirrors `rlexport verify`.

    Args:
        out_dir: the exported Hugging Face folder.
        against: the training checkpoint it came from (adapter or full weights, with its value head).
        base: the base model, for adapters whose adapter_config.json does not resolve.
        engine: "auto" (vLLM when installed, else transformers), "vllm", "transformers" or "none".
        prompts: token-id prompts (default: a few fixed texts through the tokenizer).

    Returns:
        A VerifyReport; `report.ok` is False when any check failed, `report.to_json()` follows
        docs/verify.schema.json.

    Example:
        >>> report = rlexport.verify("out/policy", against="saves/ppo", engine="none")  # doctest: +SKIP
        >>> report.ok, report.failed()  # doctest: +SKIP
        (True, [])
    """
    path = Path(out_dir)
    if not path.is_dir():
        raise RlexportError("missing-input", "the folder to verify does not exist", file=path,
                            hint="pass the folder rlexport export wrote")
    _require("transformers")
    engine = resolve_engine(engine)
    source = None
    if against is not None:
        from .formats import open_checkpoint
        source = open_checkpoint(against, base=base)
        if source.adapter is not None:
            _require("peft")
    checks, folder = structure(path, source)
    prompts = prompts or make_prompts(folder.source_tokenizer or folder.tokenizer, folder.rows)
    report = VerifyReport(str(path), folder.target, folder.arch, dtype_name(folder.dtype) if folder.dtype else None,
                          str(against) if against is not None else None,
                          str(source.base_dir) if source is not None and source.base_dir else None, engine,
                          prompts=prompts)
    ref_numbers, what_ref, load_problems = None, "the training-time model", None
    if source is None:
        checks += [skipped(n, N, "no --against checkpoint") for n in ("weights", "logprobs", "greedy", "scores")]
    else:
        numbers, ref_numbers, load_problems = _numbers_stage(folder, source, prompts, max_new_tokens)
        checks += numbers
    wants = (engine == "vllm" and ref_numbers is None) or (engine == "transformers" and load_problems is None)
    if wants and folder.target is not None and folder.hf_config is not None:
        try:
            got, load_problems = export_numbers(path, folder.target, prompts, folder.refs,
                                                max_new_tokens=max_new_tokens)
            if ref_numbers is None and engine == "vllm":
                ref_numbers, what_ref = got, "transformers on the export"
        except Exception:  # transformers cannot load it either: the engine's own outcome is still worth reporting
            pass
    checks += engine_stage(engine, folder, prompts, ref_numbers, what_ref, load_problems,
                           max_new_tokens=max_new_tokens)
    report.checks = sorted(checks, key=lambda c: CHECK_NAMES.index(c.name))
    return report
