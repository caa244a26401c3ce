"""Run by test_parallel_vllm.py in a subprocess: vLLM's own answer to a --tensor-parallel-size (CPU build)."""
import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per TP worker (no NUMA auto-binding here)

if __name__ == "__main__":
    model, tp, prompts = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    extra = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}  # e.g. rlexport.vllm_args(): the load format
    from vllm.engine.arg_utils import EngineArgs
    args = dict(model=model, tensor_parallel_size=tp, dtype="float32", max_model_len=256, enforce_eager=True)
    args.update(extra)
    try:
        EngineArgs(**args).create_engine_config()
    except Exception as e:  # vLLM's refusal, at config time
        print(json.dumps({"accepted": False, "error": str(e)}))
        sys.exit(0)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    if extra:
        from rlexport.engines.vllm_plugin import register
        register()  # EngineArgs below runs in this process before vLLM loads its plugins
    llm = LLM(**args, gpu_memory_utilization=0.1, distributed_executor_backend="mp")
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                        SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), use_tqdm=False)
    print(json.dumps({"accepted": True, "greedy": [list(o.outputs[0].token_ids) for o in outs]}))
