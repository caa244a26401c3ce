"""verify(): prove an exported folder is right. Backs `rlexport verify` and `rlexport export --verify`.

Three stages, each a list of named checks (report.CHECK_NAMES) with pass / fail / skip:
  structure  (structure.py, files, architecture, every tensor against the meta-device model, dtype, values;
              tokens.py)   tokenizer, generation config, EOS, chat template
  numbers    (numbers.py)        with --against: the training-time model rebuilt with transformers/PEFT; weights,
                                 prompt logprobs, greedy tokens, head scores, with dtype-dependent tolerances
  engine     (engine.py)         the folder in vLLM (subprocess) or transformers: loads, and agrees
The report is OK only when no check fails; skipped checks (no --against, --engine none) do not fail it.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from ..checks.facts import first_line
from ..errors import RlexportError
from ..tensors import dtype_name
from .engine import engine_stage, resolve_engine
from .compare import compare_greedy, compare_logprobs, compare_scores, compare_weights
from .numbers import Numbers, export_numbers, make_prompts, reference
from .report import CHECK_NAMES, SCHEMA, Check, VerifyReport, failed, passed, skipped
from . import streamed, structure as verify_structure, tokens as verify_tokens
from .structure import Folder

N = "numbers"
__all__ = ["verify", "VerifyReport", "Check", "CHECK_NAMES", "SCHEMA"]


STRUCTURE = verify_structure.CHECKS + verify_tokens.CHECKS


def structure(path: Path, source) -> tuple[list[Check], Folder]:
    """The structure stage: every check in order, each reading what the earlier ones put in the Folder."""
    folder = Folder(Path(path))  # the architecture's facts computed in-process: verify loads the model anyway
    if source is not None and source.tokenizer_dirs:
        from transformers import AutoTokenizer
        try:
            folder.source_tokenizer = AutoTokenizer.from_pretrained(source.tokenizer_dirs[0])
        except Exception as e:  # a note of the tokenizer check: the export's own tokenizer is what is served
            folder.source_tokenizer_error = first_line(e)
    return [check(folder, source) for check in STRUCTURE], folder


def _require(*packages: str) -> None:
    for p in packages:
        if importlib.util.find_spec(p) is None:
            raise RlexportError("missing-dependency", f"rlexport verify needs {p}", hint=f"pip install {p}")


def _numbers_stage(folder: Folder, source, prompts, max_new_tokens: int, layerwise: bool | None = None) \
        -> tuple[list[Check], Numbers | None, list[str] | None]:
    """Reference vs export. Whole models: one float32 model and one tensor in memory (the reference is freed
    first); layerwise (default above streamed.WHOLE_MODEL_LIMIT): one module at a time, any size."""
    policy = folder.target == "policy"
    not_this = ["scores"] if policy else ["logprobs", "greedy"]
    skips = [skipped(n, N, f"not a {'value' if policy else 'policy'} export") for n in not_this]
    if folder.target is None or folder.hf_config is None:
        return [skipped(n, N, "the structure checks found no loadable architecture")
                for n in ("weights", "logprobs", "greedy", "scores")], None, None
    if folder.target == "value" and not source.value_head:
        return [failed("scores", N, "the checkpoint has no value head to compare the exported head with")] + \
            [skipped(n, N, "no reference") for n in ("weights", "logprobs", "greedy")], None, None
    folded = ((folder.config or {}).get("rlexport") or {}).get("normalization_folded", True)
    if layerwise if layerwise is not None else streamed.too_large_for_whole(source):
        checks, ref_numbers, _ = streamed.numbers_stage(folder, source, prompts, max_new_tokens, normalize=folded)
        return checks + skips, ref_numbers, []
    ref = reference(source, folder.target, prompts, max_new_tokens=max_new_tokens, normalize=folded)
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


def check_tensor_parallel(folder: Folder, tp: int | None) -> Check:
    """The TP sizes vLLM accepts for the folder's config.json; with `tp`, whether vLLM would refuse it."""
    from .. import parallel
    if folder.config is None:
        return skipped("tensor-parallel", "structure", "no readable config.json")
    sizes = parallel.accepted_sizes(folder.config)
    if tp is None:
        return passed("tensor-parallel", "structure", f"vLLM accepts --tensor-parallel-size "
                      f"{', '.join(map(str, sizes))} (of 1-{parallel.MAX_TP})", sizes=sizes)
    why = parallel.explain(folder.config, tp)
    if why:
        return failed("tensor-parallel", "structure", why, parallel.refusals(folder.config, tp), sizes=sizes)
    return passed("tensor-parallel", "structure", f"--tensor-parallel-size {tp} splits every dimension",
                  sizes=sizes)


def verify(out_dir: str | Path, *, against: str | Path | None = None, base: str | Path | None = None,
           engine: str = "auto", prompts: list[list[int]] | None = None, max_new_tokens: int = 12,
           tensor_parallel_size: int | None = None, layerwise: bool | None = None) -> VerifyReport:
    """Check an exported folder; with `against`, compare it with the training-time model. Mirrors `rlexport verify`.

    Args:
        out_dir: the exported Hugging Face folder.
        against: the training checkpoint it came from (adapter or full weights, with its value head).
        base: the base model, for adapters whose adapter_config.json does not resolve.
        engine: "auto" (vLLM when installed, else transformers), "vllm", "transformers" or "none".
        prompts: token-id prompts (default: a few fixed texts through the tokenizer).
        tensor_parallel_size: fail if vLLM would refuse to shard the model over this many ranks.
        layerwise: compute the reference and the export one module at a time (memory flat in model size);
            None: when the model is larger than 2 GiB in float32.

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
    from .layerwise import return_freed_memory
    return_freed_memory()  # before the first tensor is read: the values check reads them all, one at a time
    engine = resolve_engine(engine)
    source = None
    if against is not None:
        from ..formats import open_checkpoint
        source = open_checkpoint(against, base=base)
        if source.adapter is not None:
            _require("peft")
    checks, folder = structure(path, source)
    checks.append(check_tensor_parallel(folder, tensor_parallel_size))
    prompts = prompts or make_prompts(folder.source_tokenizer or folder.tokenizer, folder.rows)
    report = VerifyReport(str(path), folder.target, folder.arch, dtype_name(folder.dtype) if folder.dtype else None,
                          str(against) if against is not None else None,
                          str(source.base_dir) if source is not None and source.base_dir else None, engine,
                          prompts=prompts)
    ref_numbers, what_ref, load_problems = None, "the training-time model", None
    if source is None:
        checks += [skipped(n, N, "no --against checkpoint") for n in ("weights", "logprobs", "greedy", "scores")]
    else:
        numbers, ref_numbers, load_problems = _numbers_stage(folder, source, prompts, max_new_tokens, layerwise)
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
