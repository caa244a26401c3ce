"""Engine stage: load the folder in a real serving engine and compare what it computes.

vLLM runs in a subprocess (rlexport.engines.vllm.run_jobs); its failure comes back as the engine's own error
line. The stage is split in two so callers (tests) can start every engine of a batch in one subprocess:
`vllm_job()` describes the run, `vllm_checks()` judges its result.
"""
from __future__ import annotations

import torch

from .compare import compare_greedy, compare_logprobs, compare_scores
from .numbers import Numbers
from .report import Check, failed, passed, skipped
from .structure import Folder

E = "engine"
ENGINES = ("vllm", "transformers", "none")


def resolve_engine(engine: str) -> str:
    """`auto` is vLLM when it is installed, else transformers."""
    if engine == "auto":
        from ..engines.vllm import available
        return "vllm" if available() else "transformers"
    if engine not in ENGINES:
        raise ValueError(f"engine must be auto, {', '.join(ENGINES)}; not {engine!r}")
    return engine


def vllm_job(folder: Folder, prompts: list[list[int]], *, max_new_tokens: int = 12) -> dict:
    """One rlexport.engines.vllm job for the folder: generate for a policy, pool for a value model (float32)."""
    job = {"model": str(folder.path), "dtype": "float32", "prompts": prompts, "max_tokens": max_new_tokens,
           "max_model_len": max(256, max(len(p) for p in prompts) + max_new_tokens + 8)}
    if folder.target == "value":
        job["mode"] = "pool"
        job["pooling_task"] = "token_classify" if (folder.arch or "").endswith("ForTokenClassification") \
            else "classify"
    else:
        job["mode"] = "generate"
    return job


def vllm_checks(folder: Folder, result: dict, ref: Numbers | None, what_ref: str) -> list[Check]:
    """engine-load from the run's outcome; engine-parity against the reference (or transformers on the export)."""
    if not result.get("ok"):
        return [failed("engine-load", E, f"vLLM fails to load {folder.path.name}: {result.get('error', '?')}",
                       [result.get("error", "")]),
                skipped("engine-parity", E, "vLLM did not load the folder")]
    load = passed("engine-load", E, f"vLLM loads {folder.arch} and runs it")
    if ref is None:
        return [load, skipped("engine-parity", E, "no numbers to compare with")]
    if folder.target == "value":
        got = Numbers(scores=result.get("scores") or [])
        last = (folder.arch or "").endswith("ForSequenceClassification")
        c = compare_scores(ref, got, folder.dtype, name="engine-parity", stage=E, what="vLLM", last_only=last)
    else:
        got = Numbers(logprobs=[lp[1:] for lp in result.get("logprobs") or []], greedy=result.get("greedy") or [])
        lp = compare_logprobs(ref, got, folder.dtype, name="engine-parity", stage=E, what="vLLM")
        gr = compare_greedy(ref, got, folder.dtype, name="engine-parity", stage=E, what="vLLM")
        c = lp if lp.status == "fail" else gr if gr.status == "fail" else passed(
            "engine-parity", E, f"vLLM vs {what_ref}: {lp.summary}; {gr.summary}", **lp.metrics, **gr.metrics)
    if not c.summary.startswith("vLLM vs"):
        c.summary = f"vLLM vs {what_ref}: {c.summary}"
    return [load, c]


def run_vllm(folder: Folder, prompts, ref: Numbers | None, what_ref: str, *, max_new_tokens: int = 12) -> list[Check]:
    from ..engines.vllm import available, run_jobs
    if not available():
        return [failed("engine-load", E, "vLLM is not installed", ["pip install vllm (or --engine transformers)"]),
                skipped("engine-parity", E, "vLLM is not installed")]
    result = run_jobs([vllm_job(folder, prompts, max_new_tokens=max_new_tokens)])[0]
    return vllm_checks(folder, result, ref, what_ref)


@torch.no_grad()
def run_transformers(folder: Folder, prompts, ref: Numbers | None, load_problems: list[str] | None, *,
                     max_new_tokens: int = 12) -> list[Check]:
    """transformers as the engine: a strict from_pretrained (no MISSING / UNEXPECTED weights) and generate()."""
    if folder.target == "value":
        if load_problems is None:
            return [skipped("engine-load", E, "numbers were not computed"), skipped("engine-parity", E, "")]
        load = failed("engine-load", E, load_problems[0], load_problems[1:]) if load_problems else \
            passed("engine-load", E, f"transformers loads {folder.arch} with every weight")
        return [load, skipped("engine-parity", E, "the numbers stage compared transformers' scores")]
    from transformers import AutoModelForCausalLM
    from .numbers import _loading_problems, quiet
    try:
        with quiet():
            model, info = AutoModelForCausalLM.from_pretrained(folder.path, dtype=torch.float32,
                                                               output_loading_info=True)
    except Exception as e:  # the loader's exact error is the result
        first = (str(e).strip().splitlines() or [""])[0]
        return [failed("engine-load", E, f"transformers fails: {type(e).__name__}: {first}"),
                skipped("engine-parity", E, "transformers did not load the folder")]
    problems = _loading_problems(info)
    load = failed("engine-load", E, problems[0], problems[1:]) if problems else \
        passed("engine-load", E, f"transformers loads {folder.arch} with every weight")
    if ref is None:
        return [load, skipped("engine-parity", E, "no reference numbers")]
    got = []
    for p in prompts:
        out = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                             num_beams=1, repetition_penalty=1.0)
        got.append(out[0, len(p):].tolist())
    c = compare_greedy(ref, Numbers(greedy=got), folder.dtype, name="engine-parity", stage=E,
                       what="transformers generate()")
    c.summary = f"generate(): {c.summary}"
    return [load, c]


def engine_stage(engine: str, folder: Folder, prompts, ref: Numbers | None, what_ref: str,
                 load_problems: list[str] | None, *, max_new_tokens: int = 12) -> list[Check]:
    if engine == "none":
        return [skipped("engine-load", E, "--engine none"), skipped("engine-parity", E, "--engine none")]
    if folder.target is None:
        return [skipped("engine-load", E, "the structure checks found no servable architecture"),
                skipped("engine-parity", E, "")]
    if engine == "vllm":
        return run_vllm(folder, prompts, ref, what_ref, max_new_tokens=max_new_tokens)
    return run_transformers(folder, prompts, ref, load_problems, max_new_tokens=max_new_tokens)

