"""Real vLLM pooling on the value exports: raw per-token values (token_classify) and the last token
(classify) equal the training-time head's; the default sigmoid or a dropped bias would not."""
from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

import rlexport
from conftest import expected
from factories import FIXTURES
from rlexport.engines.vllm import run_jobs

pytestmark = pytest.mark.vllm
TOL = 2e-3  # float32 engine vs float32 training stack
CASES = ("lf_rm_lora_qwen2", "lf_ppo_lora_qwen2", "lf_ppo_full_qwen2")


def broken_copy(src, dest, *, drop_problem_type=False, drop_bias=False):
    shutil.copytree(src, dest)
    if drop_problem_type:
        cfg = json.loads((dest / "config.json").read_text())
        del cfg["problem_type"]
        (dest / "config.json").write_text(json.dumps(cfg))
    if drop_bias:
        index = json.loads((dest / "model.safetensors.index.json").read_text())
        shard = dest / index["weight_map"].pop("score.bias")
        save_file({k: v for k, v in load_file(shard).items() if k != "score.bias"}, shard, {"format": "pt"})
        (dest / "model.safetensors.index.json").write_text(json.dumps(index))
    return dest


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm_heads")
    prompts = expected(CASES[0])["prompts"]
    folders = {c: rlexport.export(FIXTURES / c / "ckpt", tmp / c, target="value", dtype="float32").out for c in CASES}
    rm = folders["lf_rm_lora_qwen2"]
    jobs = {f"{c}/token": {"model": str(f), "pooling_task": "token_classify"} for c, f in folders.items()}
    jobs["rm/last"] = {"model": str(rm), "pooling_task": "classify"}
    jobs["rm/sigmoid"] = {"model": str(broken_copy(rm, tmp / "sig", drop_problem_type=True)),
                          "pooling_task": "token_classify"}
    jobs["rm/nobias"] = {"model": str(broken_copy(rm, tmp / "nob", drop_bias=True)), "pooling_task": "token_classify"}
    out = run_jobs([{**j, "mode": "pool", "prompts": prompts, "dtype": "float32"} for j in jobs.values()])
    return dict(zip(jobs, out))


def max_diff(scores, values):
    assert [len(s) for s in scores] == [len(v) for v in values]
    return max(abs(a - b) for s, v in zip(scores, values) for a, b in zip(s, v))


@pytest.mark.parametrize("case", CASES)
def test_per_token_values_match_the_training_time_head(results, case):
    r = results[f"{case}/token"]
    assert r["ok"], r.get("error")
    assert max_diff(r["scores"], expected(case)["value"]) < TOL


def test_last_token_score_is_the_reward(results):
    r = results["rm/last"]
    assert r["ok"], r.get("error")
    assert max_diff(r["scores"], [[v[-1]] for v in expected("lf_rm_lora_qwen2")["value"]]) < TOL


def test_default_sigmoid_fails_the_same_check(results):
    r = results["rm/sigmoid"]
    assert r["ok"], r.get("error")
    assert max_diff(r["scores"], expected("lf_rm_lora_qwen2")["value"]) > TOL
    assert all(0 < v < 1 for s in r["scores"] for v in s)  # sigmoid'ed, not raw values


def test_dropped_bias_fails_the_same_check_by_exactly_the_bias(results):
    r = results["rm/nobias"]
    assert r["ok"], r.get("error")  # vLLM loads a head without bias silently
    bias = load_file(FIXTURES / "lf_rm_lora_qwen2" / "ckpt" / "value_head.safetensors")["v_head.summary.bias"].item()
    diff = max_diff(r["scores"], expected("lf_rm_lora_qwen2")["value"])
    assert diff > TOL and abs(diff - abs(bias)) < 1e-4
