"""--target value: the value/reward head becomes a token-classification model with the trained numbers."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import rlexport
from conftest import expected
from factories import FIXTURES, make_tiny_model
from test_export import load_folder

VALUE_CASES = ("lf_rm_lora_qwen2", "lf_ppo_lora_qwen2", "lf_ppo_full_qwen2")


def token_values(folder, prompts):
    from transformers import AutoModelForTokenClassification
    model = AutoModelForTokenClassification.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return [model(torch.tensor([p])).logits[0, :, 0].tolist() for p in prompts]


@pytest.mark.parametrize("case", VALUE_CASES)
def test_value_export_reproduces_the_trained_head_in_transformers(tmp_path, case):
    exp = expected(case)
    rlexport.export(FIXTURES / case / "ckpt", tmp_path / "out", target="value", dtype="float32")
    got = token_values(tmp_path / "out", exp["prompts"])
    assert max(abs(a - b) for g, e in zip(got, exp["value"]) for a, b in zip(g, e)) < 1e-4
    assert len(got[0]) == len(exp["prompts"][0])  # one value per token, as the value model computes


def test_value_export_layout(tmp_path):
    rlexport.export(FIXTURES / "lf_ppo_lora_qwen2" / "ckpt", tmp_path / "out", target="value")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForTokenClassification"]
    assert cfg["num_labels"] == 1 and cfg["problem_type"] == "regression" and cfg["rlexport"]["head_bias"] is True
    tensors = load_folder(tmp_path / "out")
    assert "lm_head.weight" not in tensors and not [n for n in tensors if "v_head" in n]
    head = load_file(FIXTURES / "lf_ppo_lora_qwen2" / "ckpt" / "value_head.safetensors")
    assert torch.equal(tensors["score.weight"], head["v_head.summary.weight"])  # float32, untouched
    assert torch.equal(tensors["score.bias"], head["v_head.summary.bias"])
    assert tensors["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16  # the body in the base dtype


def trl_reference(model_dir, head, prompts):
    """TRL's AutoModelForCausalLMWithValueHead forward: v_head(last hidden state), at every position."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    summary = torch.nn.Linear(head["v_head.summary.weight"].shape[1], 1)
    summary.load_state_dict({"weight": head["v_head.summary.weight"], "bias": head["v_head.summary.bias"]})
    with torch.no_grad():
        return [summary(model(torch.tensor([p]), output_hidden_states=True).hidden_states[-1])[0, :, 0].tolist()
                for p in prompts]


@pytest.mark.parametrize("prefix", ["", "pretrained_model."])
def test_trl_style_full_checkpoint_with_head_inside(tmp_path, prefix):
    """TRL's save_pretrained puts v_head.* in model.safetensors; DeepSpeed/accelerate saves add prefixes."""
    base = make_tiny_model(tmp_path / "base", dtype=torch.float32, seed=3)
    torch.manual_seed(4)
    head = {"v_head.summary.weight": torch.randn(1, 128) * 0.1, "v_head.summary.bias": torch.tensor([7.5])}
    sd = load_file(base / "model.safetensors")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_file({**{prefix + k: v for k, v in sd.items()}, **head}, ckpt / "model.safetensors", {"format": "pt"})
    for f in base.iterdir():
        if f.suffix != ".safetensors":
            (ckpt / f.name).write_bytes(f.read_bytes())
    prompts = [[5, 17, 99, 3, 250, 42], [7, 8, 9]]
    ref = trl_reference(base, head, prompts)
    rlexport.export(ckpt, tmp_path / "value", target="value", dtype="float32")
    got = token_values(tmp_path / "value", prompts)
    assert max(abs(a - b) for g, r in zip(got, ref) for a, b in zip(g, r)) < 1e-5
    assert min(abs(v) for g in got for v in g) > 1.0  # the bias (7.5) is there: dropping it would show
    rlexport.export(ckpt, tmp_path / "policy", dtype="float32")
    assert not [n for n in load_folder(tmp_path / "policy") if "v_head" in n or n.startswith("pretrained_model")]


def test_reward_adapter_beside_the_policy_is_never_exported(tmp_path):
    for target in ("policy", "value"):
        with pytest.raises(rlexport.RlexportError) as e:
            rlexport.export(FIXTURES / "lf_ppo_lora_qwen2" / "ckpt" / "reward", tmp_path / "out", target=target)
        assert e.value.code == "reward-adapter-without-head"
    assert not (tmp_path / "out").exists()


def test_targets_offered():
    from rlexport.formats import open_checkpoint
    assert open_checkpoint(FIXTURES / "lf_rm_lora_qwen2" / "ckpt").targets == ("value",)
    assert open_checkpoint(FIXTURES / "lf_ppo_lora_qwen2" / "ckpt").targets == ("policy", "value")


def test_value_target_without_a_head_is_refused(tmp_path, tiny_lora):
    with pytest.raises(rlexport.RlexportError) as e:
        rlexport.export(tiny_lora, tmp_path / "out", target="value")
    # a plain LoRA offers only the policy (Stage.value_needs_head): refused before any head is looked for
    assert e.value.code == "target-unavailable" and "offers policy, not value" in e.value.message
    assert not (tmp_path / "out").exists()
