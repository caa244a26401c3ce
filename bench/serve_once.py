"""One vLLM CPU engine start + a short greedy generation, for bench/plugin_memory.py.

    VLLM_CPU_KVCACHE_SPACE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 python bench/serve_once.py plugin CKPT
    VLLM_CPU_KVCACHE_SPACE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 python bench/serve_once.py folder EXPORTED

plugin: `LLM(**rlexport.vllm_args(CKPT), ...)`; folder: `LLM(model=EXPORTED, ...)`; both with dtype="bfloat16",
enforce_eager=True, max_model_len=256, gpu_memory_utilization=0.1. A thread samples /proc/self/status every 50 ms
for the peak of RssAnon and RssFile (VmHWM, their sum's kernel high-water mark, is printed too). Prints one JSON
line: phases, peaks, the greedy tokens.
"""
from __future__ import annotations

import json
import sys
import threading
import time

t0 = time.perf_counter()
PEAK = {"RssAnon": 0, "RssFile": 0, "RssShmem": 0, "VmRSS": 0}


def _status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in PEAK or k == "VmHWM":
                out[k] = int(v.split()[0]) * 1024
    return out


def _poll() -> None:
    while True:
        s = _status()
        for k in PEAK:
            PEAK[k] = max(PEAK[k], s.get(k, 0))
        time.sleep(0.05)


threading.Thread(target=_poll, daemon=True).start()


def main(mode: str, path: str) -> None:
    from vllm import LLM, SamplingParams
    phases = {"import": time.perf_counter() - t0}
    common = dict(dtype="bfloat16", enforce_eager=True, max_model_len=256, gpu_memory_utilization=0.1)
    t = time.perf_counter()
    if mode == "plugin":
        import rlexport
        llm = LLM(**rlexport.vllm_args(path), **common)
    else:
        llm = LLM(model=path, **common)
    phases["engine start"] = time.perf_counter() - t
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": [1, 2, 3, 4, 5, 6, 7, 8]}],
                        SamplingParams(max_tokens=8, temperature=0.0), use_tqdm=False)
    phases["generate 8 tokens"] = time.perf_counter() - t
    s = _status()
    print(json.dumps({"phases": phases, "peak_sampled": PEAK, "VmHWM": s.get("VmHWM"),
                      "greedy": list(outs[0].outputs[0].token_ids)}), flush=True)
    sys.stdout.flush()
    import os
    os._exit(0)  # skip vLLM's teardown: the measurement is the start


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
