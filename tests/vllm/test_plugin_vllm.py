"""The `rlexport` load format (issue 16): real vLLM (CPU) serving raw training checkpoints through the plugin,
with the training-time model's numbers; and rlexport's one-line error when the checkpoint cannot be read."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import rlexport
from conftest import expected
from factories import FIXTURES, make_lora
from rlexport.engines.vllm import run_jobs
from rlexport.formats import open_checkpoint
from rlexport.verify.numbers import reference

pytestmark = pytest.mark.vllm
LOGPROB_TOL, VALUE_TOL = 1e-4, 2e-3  # float32 engine vs float32 training stack, as for exported folders
BASE = FIXTURES / "lf_ppo_full_qwen2" / "base"
PROMPTS = expected("lf_ppo_lora_qwen2")["prompts"]


def policy_ref(case):
    e = expected(case)
    return e["policy"]["logprobs"], e["policy"]["greedy"]


def peft_ref(ckpt, target="policy"):
    """The training-time model rebuilt with transformers + PEFT (what verify --against compares with)."""
    num = reference(open_checkpoint(ckpt), target, PROMPTS, weights=False).numbers
    return (num.logprobs, num.greedy) if target == "policy" else num.scores


@pytest.fixture(scope="module")
def dora(tmp_path_factory):
    return make_lora(tmp_path_factory.mktemp("dora") / "dora", BASE, use_dora=True)


@pytest.fixture(scope="module")
def resized(tmp_path_factory):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
    model.resize_token_embeddings(384)
    torch.manual_seed(3)
    with torch.no_grad():
        model.get_input_embeddings().weight[320:].normal_(0, 0.02)
        model.get_output_embeddings().weight[320:].normal_(0, 0.02)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                          modules_to_save=["embed_tokens", "lm_head"], init_lora_weights=False))
    ckpt = tmp_path_factory.mktemp("resized") / "ckpt"
    pm.save_pretrained(ckpt)
    cfg = json.loads((ckpt / "adapter_config.json").read_text())
    (ckpt / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(BASE)}))
    return ckpt


@pytest.fixture(scope="module")
def results(dora, resized, tmp_path_factory):
    F = FIXTURES
    broken = tmp_path_factory.mktemp("broken") / "ckpt"
    broken.mkdir()
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    jobs = {
        "ppo-lora/policy": ("generate", rlexport.vllm_args(F / "lf_ppo_lora_qwen2" / "ckpt")),
        "ppo-lora/value": ("pool", rlexport.vllm_args(F / "lf_ppo_lora_qwen2" / "ckpt", target="value")),
        "ppo-full/value": ("pool", rlexport.vllm_args(F / "lf_ppo_full_qwen2" / "ckpt", target="value")),
        "rm-lora/value": ("pool", rlexport.vllm_args(F / "lf_rm_lora_qwen2" / "ckpt", target="value")),
        "dora/policy": ("generate", rlexport.vllm_args(dora)),
        "resized/policy": ("generate", rlexport.vllm_args(resized)),
        "zero3/policy": ("generate", rlexport.vllm_args(F / "ds_z3_nogather_ws2" / "ckpt")),
        "trl-full/value": ("pool", rlexport.vllm_args(F / "trl_vhead_full" / "ckpt", target="value")),
        "openrlhf-rm/value": ("pool", rlexport.vllm_args(F / "openrlhf_rm_qwen2" / "ckpt", target="value")),
        # a checkpoint rlexport cannot read, handed to vLLM directly (as `vllm serve --load-format rlexport` does)
        "broken": ("generate", {"model": str(BASE), "load_format": "rlexport",
                                "model_loader_extra_config": {"checkpoint": str(broken), "base": str(BASE)}}),
    }
    out = run_jobs([{"mode": mode, "llm_args": args, "prompts": PROMPTS, "dtype": "float32",
                     "pooling_task": "token_classify"} for mode, args in jobs.values()])
    return dict(zip(jobs, out)), {"dora": dora, "resized": resized}


def max_diff(got, want):
    return max(abs(a - b) for g, w in zip(got, want) for a, b in zip([x for x in g if x is not None], w))


@pytest.mark.parametrize("job,case", [("ppo-lora/policy", "lf_ppo_lora_qwen2"),
                                      ("zero3/policy", "ds_z3_nogather_ws2")])
def test_policy_from_fixture_numbers(results, job, case):
    r = results[0][job]
    assert r["ok"], r.get("error")
    logprobs, greedy = policy_ref(case)
    assert max_diff(r["logprobs"], logprobs) < LOGPROB_TOL and r["greedy"] == greedy


@pytest.mark.parametrize("job", ["dora/policy", "resized/policy"])
def test_policy_against_peft(results, job):
    r = results[0][job]
    assert r["ok"], r.get("error")
    logprobs, greedy = peft_ref(results[1][job.split("/")[0]])
    assert max_diff(r["logprobs"], logprobs) < LOGPROB_TOL and r["greedy"] == greedy


@pytest.mark.parametrize("job,case", [("ppo-lora/value", "lf_ppo_lora_qwen2"), ("ppo-full/value", "lf_ppo_full_qwen2"),
                                      ("rm-lora/value", "lf_rm_lora_qwen2")])
def test_values_from_fixture_numbers(results, job, case):
    r = results[0][job]
    assert r["ok"], r.get("error")
    assert max_diff(r["scores"], expected(case)["value"]) < VALUE_TOL


def test_trl_value_head_wrapper(results):
    r = results[0]["trl-full/value"]
    assert r["ok"], r.get("error")
    assert max_diff(r["scores"], peft_ref(FIXTURES / "trl_vhead_full" / "ckpt", "value")) < VALUE_TOL


def test_openrlhf_reward_model_with_its_normalisation(results):
    """A `RewardModel` no engine can import, served straight from its folder: the normalised reward."""
    r = results[0]["openrlhf-rm/value"]
    assert r["ok"], r.get("error")
    assert max_diff(r["scores"], expected("openrlhf_rm_qwen2")["value_normalized"]) < VALUE_TOL


def test_unreadable_checkpoint_fails_with_rlexports_line(results):
    r = results[0]["broken"]
    assert not r["ok"] and "error[" in r["error"], r["error"]


def test_the_entry_point_reaches_spawned_engine_processes(tmp_path):
    """With vLLM's multiprocessing on (the engine core is another process, started with spawn), the load format
    is there only through the installed `vllm.general_plugins` entry point."""
    args = rlexport.vllm_args(FIXTURES / "lf_ppo_lora_qwen2" / "ckpt")
    script = tmp_path / "spawned.py"
    script.write_text(
        "import json, sys\n"
        "if __name__ == '__main__':\n"
        "    from vllm import LLM, SamplingParams, TokensPrompt\n"
        f"    llm = LLM(**json.loads({json.dumps(json.dumps(args))}), dtype='float32', enforce_eager=True,\n"
        "              max_model_len=256, gpu_memory_utilization=0.1)\n"
        f"    o = llm.generate([TokensPrompt(prompt_token_ids={PROMPTS[0]})], SamplingParams(temperature=0, "
        "max_tokens=12, ignore_eos=True), use_tqdm=False)\n"
        "    print('GREEDY', json.dumps(list(o[0].outputs[0].token_ids)))\n")
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    line = [x for x in proc.stdout.splitlines() if x.startswith("GREEDY ")]
    assert line, proc.stderr[-3000:]
    assert json.loads(line[0][7:]) == expected("lf_ppo_lora_qwen2")["policy"]["greedy"][0]
