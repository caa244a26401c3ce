"""Issue 14: config.json derived from the tensors written, and the header-only self-check before the commit."""
from __future__ import annotations

import dataclasses
import json
import time

import pytest
import torch
from safetensors.torch import save_file

import rlexport
from factories import FIXTURES, make_tiny_model
from rlexport.errors import RlexportError
from rlexport.export import plan, write
from rlexport.formats import open_checkpoint
from rlexport.tensors import TensorRef
from rlexport.checks.selfcheck import self_check

# (case, input folder, base) for every checkpoint fixture in the repo; each is exported in every target it offers
CASES = [
    ("lf_ppo_lora_qwen2", "ckpt", None),
    ("lf_ppo_full_qwen2", "ckpt", None),
    ("lf_rm_lora_qwen2", "ckpt", None),
    ("trl_vhead_full", "ckpt", None),
    ("trl_vhead_lora", "ckpt", FIXTURES / "lf_ppo_full_qwen2" / "base"),
    ("ds_z2_ws2", "ckpt", None),
    ("ds_z3_gather_ws1", "ckpt", None),
    ("ds_z3_nogather_ws1", "ckpt", None),
    ("ds_z3_nogather_ws2", "ckpt", None),
]


def _offered(case, sub, base):
    src = open_checkpoint(FIXTURES / case / sub, base=base)
    return [(case, sub, base, t) for t in src.targets]


ALL = [x for c in CASES for x in _offered(*c)]


@pytest.mark.parametrize("case,sub,base,target", ALL, ids=[f"{c}-{t}" for c, _, _, t in ALL])
def test_every_fixture_and_target_passes_the_self_check(tmp_path, case, sub, base, target):
    out = tmp_path / "out"
    rlexport.export(FIXTURES / case / sub, out, base=base, target=target)
    t0 = time.perf_counter()
    checks = self_check(out)  # again, on the committed folder: every check ran and passed
    assert time.perf_counter() - t0 < 5  # headers only (the meta model and tokenizer load dominate)
    names = {c.name for c in checks}
    assert {"files", "tensor-shapes", "architecture", "tensor-names", "dtype", "tokenizer"} <= names
    assert all(c.status in ("pass", "skip") for c in checks), [(c.name, c.summary) for c in checks]
    cfg = json.loads((out / "config.json").read_text())
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert ("lm_head.weight" in index) != cfg["tie_word_embeddings"] or target == "value"


def _plan(case="lf_ppo_lora_qwen2", target="policy"):
    return plan(open_checkpoint(FIXTURES / case / "ckpt"), target=target)


def test_a_wrong_vocab_size_is_never_committed(tmp_path):
    p = _plan()
    bad = dataclasses.replace(p, config={**p.config, "vocab_size": p.config["vocab_size"] + 64})
    with pytest.raises(RlexportError) as e:
        write(bad, tmp_path / "out")
    assert e.value.code == "export-self-check"
    assert "vocab_size" in e.value.message
    assert not (tmp_path / "out").exists()
    assert [x.name for x in tmp_path.iterdir()] == []  # no temporary left either


def test_a_stray_tensor_is_never_committed(tmp_path):
    p = _plan()
    stray = TensorRef("v_head.summary.weight", torch.bfloat16, (1, 128), lambda: torch.zeros(1, 128, dtype=torch.bfloat16),
                      "test")
    with pytest.raises(RlexportError) as e:
        write(dataclasses.replace(p, tensors=p.tensors + (stray,)), tmp_path / "out")
    assert e.value.code == "export-self-check"
    assert "tensor-names" in e.value.message and "v_head" in e.value.message
    assert not (tmp_path / "out").exists()


def test_the_check_reads_what_was_written(tmp_path):
    """The post-write check reads config.json and the shard headers from disk, not the plan."""
    out = tmp_path / "out"
    rlexport.export(FIXTURES / "lf_ppo_lora_qwen2" / "ckpt", out)
    self_check(out)
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "hidden_size": cfg["hidden_size"] * 2}))
    with pytest.raises(RlexportError, match="hidden_size"):
        self_check(out)


@pytest.fixture(scope="module")
def resized_run(tmp_path_factory):
    """A PPO LoRA run (LLaMA-Factory layout) over a base whose vocabulary grew by 64 new tokens: the embedding and
    the LM head are saved whole in the adapter (modules_to_save), the value head beside it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    d = tmp_path_factory.mktemp("resized")
    base = make_tiny_model(d / "base")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.resize_token_embeddings(384)
    torch.manual_seed(3)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  modules_to_save=["embed_tokens", "lm_head"],
                                                  init_lora_weights=False))
    ckpt = d / "ckpt"
    peft_model.save_pretrained(ckpt)
    cfg = json.loads((ckpt / "adapter_config.json").read_text())
    (ckpt / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(base)}))
    save_file({"v_head.summary.weight": torch.randn(1, 128), "v_head.summary.bias": torch.tensor([0.5])},
              ckpt / "value_head.safetensors")
    return ckpt


@pytest.mark.parametrize("target", ["policy", "value"])
def test_a_resized_vocabulary_is_written_from_the_embedding_rows(tmp_path, resized_run, target):
    out = tmp_path / target
    rlexport.export(resized_run, out, target=target)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == 384
    assert cfg["tie_word_embeddings"] is False
    if target == "value":
        assert cfg["architectures"] == ["Qwen2ForTokenClassification"] and cfg["num_labels"] == 1


def test_a_reward_model_is_refused_as_a_policy_and_pointed_to_value(tmp_path):
    """OpenRLHF's RewardModel folder: body + score head, no lm_head, a class nobody can import."""
    rm = make_tiny_model(tmp_path / "rm")
    from safetensors.torch import load_file
    sd = {k: v for k, v in load_file(rm / "model.safetensors").items() if not k.startswith("lm_head")}
    sd["score.weight"] = torch.randn(1, 128, dtype=torch.bfloat16)
    save_file(sd, rm / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((rm / "config.json").read_text())
    (rm / "config.json").write_text(json.dumps({**cfg, "architectures": ["RewardModel"]}))
    with pytest.raises(RlexportError) as e:
        rlexport.export(rm, tmp_path / "out")
    assert e.value.code == "rm-has-no-policy" and "--target value" in e.value.hint  # recognised as a reward model
    assert not (tmp_path / "out").exists()
    # a head rlexport does not recognise is still never exported as a policy
    (rm / "config.json").write_text(json.dumps({**cfg, "architectures": ["ValueModel"]}))
    with pytest.raises(RlexportError) as e:
        rlexport.export(rm, tmp_path / "out")
    assert e.value.code == "not-a-policy" and "score.weight" in e.value.message and "--target value" in e.value.hint
    assert not (tmp_path / "out").exists()
