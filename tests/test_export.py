"""Export correctness: PEFT as the merge oracle, fixtures' training-time numbers as the model oracle."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import rlexport
from conftest import expected
from factories import FIXTURES


def load_folder(folder) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(folder / shard, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    assert set(out) == set(index["weight_map"])
    return out


def peft_merged(base, adapter) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return {k: v.detach().clone() for k, v in PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict().items()}


@pytest.fixture(scope="module")
def oracle(tiny_base, tiny_lora):
    return peft_merged(tiny_base, tiny_lora)


def test_float32_merge_equals_peft(tmp_path, tiny_base, tiny_lora, oracle):
    from safetensors.torch import load_file
    base = load_file(tiny_base / "model.safetensors")
    rlexport.export(tiny_lora, tmp_path / "out", dtype="float32")
    got = load_folder(tmp_path / "out")
    assert set(got) == set(oracle)
    changed = 0
    for name, ref in oracle.items():
        assert got[name].dtype == torch.float32
        scale = ref.abs().max().clamp_min(1e-12)
        assert ((got[name] - ref).abs().max() / scale) <= 1e-6, name
        changed += not torch.equal(got[name], base[name].float())
    assert changed == 14  # the 7 targeted modules x 2 layers were merged (B is non-zero, so it matters)


def test_bfloat16_export_is_the_float32_reference_rounded_once(tmp_path, tiny_lora, oracle):
    rlexport.export(tiny_lora, tmp_path / "out", dtype="bfloat16")
    got = load_folder(tmp_path / "out")
    for name, ref in oracle.items():
        assert got[name].dtype == torch.bfloat16
        assert torch.equal(got[name], ref.to(torch.bfloat16)), name


def test_auto_dtype_is_the_base_dtype_not_the_adapters_float32(tmp_path, tiny_lora):
    report = rlexport.export(tiny_lora, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert report.dtype == "bfloat16" and cfg["torch_dtype"] == "bfloat16" and cfg["dtype"] == "bfloat16"
    assert {t.dtype for t in load_folder(tmp_path / "out").values()} == {torch.bfloat16}


def test_shards_split_at_max_size_and_index_names_them(tmp_path, tiny_lora):
    rlexport.export(tiny_lora, tmp_path / "out", max_shard_size="200KB")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == shards
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in load_folder(tmp_path / "out").values())


def policy_logprobs(folder, prompts):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    out = []
    for p in prompts:
        with torch.no_grad():
            lp = model(torch.tensor([p])).logits.log_softmax(-1)[0]
        out.append([lp[j - 1, p[j]].item() for j in range(1, len(p))])
    return out


@pytest.mark.parametrize("case", ["lf_ppo_lora_qwen2", "lf_ppo_full_qwen2"])
def test_ppo_fixture_export_reproduces_training_time_logprobs(tmp_path, case):
    exp = expected(case)
    out = tmp_path / "out"
    rlexport.export(FIXTURES / case / "ckpt", out, dtype="float32")
    got = policy_logprobs(out, exp["prompts"])
    diff = max(abs(a - b) for g, e in zip(got, exp["policy"]["logprobs"]) for a, b in zip(g, e))
    assert diff < 1e-4
    base_diff = max(abs(a - b) for g, e in zip(got, exp["base_policy"]["logprobs"]) for a, b in zip(g, e))
    assert base_diff > 0.1  # the case tells a merged export from the untrained base


@pytest.mark.parametrize("case", ["lf_ppo_lora_qwen2", "lf_ppo_full_qwen2"])
def test_ppo_fixture_export_is_a_clean_serving_folder(tmp_path, case):
    out = tmp_path / "out"
    rlexport.export(FIXTURES / case / "ckpt", out)
    names = set(load_folder(out))
    assert not [n for n in names if n.startswith(("v_head", "pretrained_model.", "base_model.")) or "lora_" in n]
    assert "lm_head.weight" in names and "model.embed_tokens.weight" in names
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "model.safetensors.index.json"} <= files
    assert not files & {"value_head.safetensors", "adapter_model.safetensors", "training_args.bin"}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["torch_dtype"] == "bfloat16"
    assert cfg["vocab_size"] == 320 and cfg["use_cache"] is True
    gen = json.loads((out / "generation_config.json").read_text())
    # the qwen template made <|im_end|> (2) the tokenizer's eos; the pretraining eos (0) still stops too
    assert gen["eos_token_id"] == [2, 0]


def test_checkpoint_subfolder_exports_its_own_weights(tmp_path):
    case = FIXTURES / "lf_ppo_lora_qwen2"
    final = load_folder_after(case / "ckpt", tmp_path / "a")
    mid = load_folder_after(case / "ckpt" / "checkpoint-6", tmp_path / "b")
    assert set(final) == set(mid)
    assert any(not torch.equal(final[k], mid[k]) for k in final)


def load_folder_after(ckpt, out):
    rlexport.export(ckpt, out, dtype="float32")
    return load_folder(out)


def test_rm_checkpoint_refuses_policy_target(tmp_path):
    with pytest.raises(rlexport.RlexportError) as e:
        rlexport.export(FIXTURES / "lf_rm_lora_qwen2" / "ckpt", tmp_path / "out")
    assert e.value.code == "rm-has-no-policy"
    assert not (tmp_path / "out").exists()


def test_export_does_not_modify_inputs(tmp_path):
    import hashlib
    ckpt = FIXTURES / "lf_ppo_lora_qwen2"

    def snapshot():
        return {p: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
                for p in sorted(ckpt.rglob("*")) if p.is_file()}
    before = snapshot()
    rlexport.export(ckpt / "ckpt", tmp_path / "out")
    assert snapshot() == before
