"""Run a list of vLLM jobs in this process, one engine at a time; write results as JSON.

Usage: python -m rlexport.engines.vllm_worker JOBS.json RESULTS.json

Run as a subprocess (see run_jobs): vLLM's engine owns process-wide state, and a load failure must come back
as its original exception line, which VLLM_ENABLE_V1_MULTIPROCESSING=0 keeps in this process.
A job: {"model": dir, "mode": "generate"|"pool", "dtype": "float32", "prompts": [[ids...]],
        "max_tokens": 12, "pooling_task": "token_classify"|"classify", "max_model_len": 256,
        "llm_args": {more LLM() keyword arguments, e.g. rlexport.vllm_args(...)},
        "images": [image file or null, one per prompt (a vision-language model: the prompt holds its placeholder)],
        "chats": [[chat messages; {"type": "image", "image": file} parts sent as data URLs], ...] (LLM.chat with
                  the model's own chat template, no generation prompt added)}
A result: {"ok": bool, "error": "Type: first line", "logprobs": [[...]], "greedy": [[...]], "scores": [[...]],
           "prompt_ids": [[ids as the engine saw them, image placeholders expanded]] (with images),
           "chat_prompt_ids", "chat_logprobs", "chat_greedy" (with chats)}
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
    images = job.get("images") or [None] * len(job["prompts"])
    prompts = [TokensPrompt(prompt_token_ids=p) if img is None else
               TokensPrompt(prompt_token_ids=p, multi_modal_data={"image": _image(img)})
               for p, img in zip(job["prompts"], images)]
    res = _scored(llm.generate(prompts, sp, use_tqdm=False))
    if not job.get("images"):
        del res["prompt_ids"]
    if job.get("chats"):
        chats = [[_chat_message(m) for m in chat] for chat in job["chats"]]
        outs = llm.chat(chats, sp, add_generation_prompt=False, use_tqdm=False)
        res.update({f"chat_{k}": v for k, v in _scored(outs).items()})
    return res


def _scored(outs) -> dict:
    logprobs, greedy, ids = [], [], []
    for o in outs:
        prompt = list(o.prompt_token_ids)  # with images: the placeholders as the engine expanded them
        # prompt_logprobs[0] is None (no context); entry j holds token j's logprob among others
        logprobs.append([None] + [o.prompt_logprobs[j][prompt[j]].logprob for j in range(1, len(prompt))])
        greedy.append(list(o.outputs[0].token_ids))
        ids.append(prompt)
    return {"logprobs": logprobs, "greedy": greedy, "prompt_ids": ids}


def _image(path: str):
    from PIL import Image
    with Image.open(path) as im:
        return im.convert("RGB")


def _chat_message(m: dict) -> dict:
    """A chat message whose image parts ({"type": "image", "image": file}) become data URLs LLM.chat accepts."""
    import base64
    import mimetypes
    if not isinstance(m.get("content"), list):
        return m
    parts = []
    for part in m["content"]:
        if part.get("type") == "image":
            with open(part["image"], "rb") as f:
                mime = mimetypes.guess_type(part["image"])[0] or "image/png"
                url = f"data:{mime};base64," + base64.b64encode(f.read()).decode()
            part = {"type": "image_url", "image_url": {"url": url}}
        parts.append(part)
    return {**m, "content": parts}


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
