"""TRL 0.9.6 AutoModelForCausalLMWithValueHead checkpoints (full and PEFT LoRA, real library output): the policy
export equals TRL's loaded model, the value export reproduces its value head, with or without the
`pretrained_model.` prefix that DeepSpeed / accelerate saves of the wrapper carry."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import rlexport
from conftest import expected
from factories import FIXTURES, copy_fixture
from rlexport.formats import open_checkpoint
from test_deepspeed import BASE, assert_close
from test_export import load_folder
from test_heads import token_values

CASES = {"trl_vhead_full": {}, "trl_vhead_lora": {"base": BASE}}


def lm_reference(case: str) -> dict:
    return {k: v for k, v in load_file(FIXTURES / case / "reference.safetensors").items() if not k.startswith("v_head")}


@pytest.mark.parametrize("case", CASES)
def test_reads_the_wrapper(case):
    src = open_checkpoint(FIXTURES / case / "ckpt", **CASES[case])
    assert src.producer == "trl" and src.targets == ("policy", "value")
    assert [r.name for r in src.value_head] == ["v_head.summary.weight", "v_head.summary.bias"]


@pytest.mark.parametrize("case", CASES)
def test_policy_equals_trls_model(tmp_path, case):
    r = rlexport.export(FIXTURES / case / "ckpt", tmp_path / "out", dtype="float32", **CASES[case])
    got = load_folder(tmp_path / "out")
    assert_close(got, lm_reference(case))
    assert r.tensors == 27 and not [n for n in got if "v_head" in n]


@pytest.mark.parametrize("case", CASES)
def test_value_equals_trls_value_head(tmp_path, case):
    exp = expected(case)
    rlexport.export(FIXTURES / case / "ckpt", tmp_path / "value", target="value", dtype="float32", **CASES[case])
    ref = load_file(FIXTURES / case / "reference.safetensors")
    got = load_folder(tmp_path / "value")
    assert torch.equal(got["score.weight"], ref["v_head.summary.weight"])
    assert torch.equal(got["score.bias"], ref["v_head.summary.bias"])
    values = token_values(tmp_path / "value", exp["prompts"])
    assert [len(v) for v in values] == [len(p) for p in exp["prompts"]]
    assert max(abs(a - b) for g, e in zip(values, exp["value"]) for a, b in zip(g, e)) < 1e-5


@pytest.mark.parametrize("case", CASES)
def test_default_dtype_is_the_bases(tmp_path, case):
    # the full checkpoint's config.json says float32 (TRL loaded the base in float32): the base is bfloat16
    r = rlexport.export(FIXTURES / case / "ckpt", tmp_path / "out", base=BASE)
    assert r.dtype == "bfloat16"
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16"


def test_full_wrapper_with_pretrained_model_prefix(tmp_path):
    """The wrapper's named_parameters() names, as a DeepSpeed gather or accelerate save writes them."""
    case = copy_fixture("trl_vhead_full", tmp_path)
    f = case / "ckpt" / "model.safetensors"
    sd = load_file(f)
    save_file({(k if k.startswith("v_head.") else "pretrained_model." + k): v for k, v in sd.items()}, f,
              {"format": "pt"})
    rlexport.export(case / "ckpt", tmp_path / "policy", dtype="float32")
    assert_close(load_folder(tmp_path / "policy"), lm_reference("trl_vhead_full"))
    rlexport.export(case / "ckpt", tmp_path / "value", target="value", dtype="float32")
    got = load_folder(tmp_path / "value")
    assert torch.equal(got["score.bias"], sd["v_head.summary.bias"]) and "lm_head.weight" not in got


def test_lora_wrapper_head_with_pretrained_model_prefix(tmp_path):
    case = copy_fixture("trl_vhead_lora", tmp_path)
    f = case / "ckpt" / "pytorch_model.bin"
    head = torch.load(f, weights_only=True)
    torch.save({"pretrained_model." + k: v for k, v in head.items()}, f)
    rlexport.export(case / "ckpt", tmp_path / "value", target="value", dtype="float32", base=BASE)
    got = load_folder(tmp_path / "value")
    assert torch.equal(got["score.weight"], head["v_head.summary.weight"])
