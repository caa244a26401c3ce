"""Run a list of vLLM jobs in this process, one engine at a time; write results as JSON.

Usage: python -m rlexport.engines.vllm_worker JOBS.json RESULTS.json

Run as a subprocess (see run_jobs): vLLM's engine owns process-wide state, and a load failure must come back
as its original exception line, which VLLM_ENABLE_V1_MULTIPROCESSING=0 keeps in this process.
A job: {"model": dir, "mode": "generate"|"pool", "dtype": "float32", "prompts": [[ids...]],
        "max_tokens": 12, "pooling_task": "token_classify"|"classify", "max_model_len": 256,
        "llm_args": {more LLM() keyword arguments, e.g. rlexport.vllm_args(...)}}
A result: {"ok": bool, "error": "Type: first line", "logprobs": [[...]], "greedy": [[...]], "scores": [[...]]}
"""
from __future__ import annotations

import gc
import json
import os
import sys
import traceback


def _env() -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _engine(job: dict):
    from vllm import LLM
    kwargs = dict(model=job.get("model"), dtype=job.get("dtype", "float32"), enforce_eager=True,
                  max_model_len=job.get("max_model_len", 256), gpu_memory_utilization=0.1, seed=0,
                  max_num_seqs=8)
    kwargs.update(job.get("llm_args") or {})  # rlexport.vllm_args(): serve a raw checkpoint (load format rlexport)
    if job.get("mode") == "pool":
        from vllm.config import PoolerConfig
        kwargs["runner"] = "pooling"
        if job.get("pooling_task"):
            kwargs["pooler_config"] = PoolerConfig(task=job["pooling_task"])
    return LLM(**kwargs)


def _generate(llm, job: dict) -> dict:
    from vllm import SamplingParams, TokensPrompt
    sp = SamplingParams(temperature=0.0, max_tokens=job.get("max_tokens", 12), prompt_logprobs=1,
                        ignore_eos=job.get("ignore_eos", True), logprobs=1)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in job["prompts"]], sp, use_tqdm=False)
    logprobs, greedy = [], []
    for prompt, o in zip(job["prompts"], outs):
        # prompt_logprobs[0] is None (no context); entry j holds token j's logprob among others
        logprobs.append([None] + [o.prompt_logprobs[j][prompt[j]].logprob for j in range(1, len(prompt))])
        greedy.append(list(o.outputs[0].token_ids))
    return {"logprobs": logprobs, "greedy": greedy}


def _pool(llm, job: dict) -> dict:
    from vllm import TokensPrompt
    task = job.get("pooling_task") or "classify"
    outs = llm.encode([TokensPrompt(prompt_token_ids=p) for p in job["prompts"]], pooling_task=task,
                      use_tqdm=False)
    return {"scores": [o.outputs.data.float().reshape(-1).tolist() for o in outs]}


def run_one(job: dict) -> dict:
    llm = None
    try:
        llm = _engine(job)
        res = _pool(llm, job) if job.get("mode") == "pool" else _generate(llm, job)
        return {"ok": True, **res}
    except Exception as e:  # the engine's own error is the result we report
        first = (str(e).strip().splitlines() or [""])[0]
        return {"ok": False, "error": f"{type(e).__name__}: {first}", "traceback": traceback.format_exc()[-4000:]}
    finally:
        del llm
        gc.collect()


def main() -> None:
    _env()
    jobs = json.load(open(sys.argv[1]))
    results = []
    for job in jobs:
        results.append(run_one(job))
        with open(sys.argv[2], "w") as f:  # written after each job, so a crash keeps the earlier ones
            json.dump(results, f)


if __name__ == "__main__":
    main()
