"""Real vLLM (CPU) pooling on the OpenRLHF and TRL reward-model / critic exports: the raw engine output is what
the trainer's own model returned, per token and at the last token (OpenRLHF: the normalised reward)."""
from __future__ import annotations

import pytest

import rlexport
from conftest import expected
from factories import FIXTURES
from rlexport.engines.vllm import run_jobs

pytestmark = pytest.mark.vllm
TOL = 2e-3  # float32 engine vs float32 training stack
CASES = {"openrlhf_rm_qwen2": "value_normalized", "openrlhf_critic_qwen2": "value_normalized",
         "openrlhf_critic_lora_qwen2": "value_normalized",  # LoRA critic from the RM: head = RM head + LoRA delta
         "trl_rm_seqcls_qwen2": "value"}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm_value_heads")
    prompts = expected("openrlhf_rm_qwen2")["prompts"]
    folders = {c: rlexport.export(FIXTURES / c / "ckpt", tmp / c, target="value", dtype="float32").out
               for c in CASES}
    jobs = {f"{c}/token": {"model": str(f), "pooling_task": "token_classify"} for c, f in folders.items()}
    jobs["openrlhf_rm_qwen2/last"] = {"model": str(folders["openrlhf_rm_qwen2"]), "pooling_task": "classify"}
    out = run_jobs([{**j, "mode": "pool", "prompts": prompts, "dtype": "float32"} for j in jobs.values()])
    return dict(zip(jobs, out))


def max_diff(scores, values):
    assert [len(s) for s in scores] == [len(v) for v in values]
    return max(abs(a - b) for s, v in zip(scores, values) for a, b in zip(s, v))


@pytest.mark.parametrize("case", CASES)
def test_per_token_scores_are_the_trainers(results, case):
    r = results[f"{case}/token"]
    assert r["ok"], r.get("error")
    assert max_diff(r["scores"], expected(case)[CASES[case]]) < TOL


def test_last_token_is_openrlhfs_normalised_reward(results):
    r = results["openrlhf_rm_qwen2/last"]
    assert r["ok"], r.get("error")
    assert max_diff(r["scores"], [[v] for v in expected("openrlhf_rm_qwen2")["reward_last"]]) < TOL


def test_lora_critic_serves_openrlhfs_critic_forward(results):
    """OpenRLHF's CriticModel forward returns the normalised value of every position but the last."""
    r = results["openrlhf_critic_lora_qwen2/token"]
    assert r["ok"], r.get("error")
    assert max_diff([s[:-1] for s in r["scores"]], expected("openrlhf_critic_lora_qwen2")["critic_forward"]) < TOL
