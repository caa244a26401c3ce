"""Issue 15: every reward/value head convention exported to one encoding, normalisation folded in exactly."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import rlexport
from conftest import expected
from factories import FIXTURES
from rlexport.errors import RlexportError

TOL = 2e-3
# case -> (the field of expected.json the default export serves, the field --no-normalize serves)
CASES = {"openrlhf_rm_qwen2": ("value_normalized", "value"),
         "openrlhf_critic_qwen2": ("value_normalized", "value"),
         # LoRA critic started from the RM: score is a LoRA target whose base weight is the RM's head (in base/)
         "openrlhf_critic_lora_qwen2": ("value_normalized", "value"),
         "trl_rm_seqcls_qwen2": ("value", "value")}


def token_values(folder, prompts):
    from transformers import AutoModelForTokenClassification
    model = AutoModelForTokenClassification.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(torch.tensor([p])).logits[0, :, 0].tolist() for p in prompts]


def max_diff(a, b):
    assert [len(x) for x in a] == [len(y) for y in b]
    return max(abs(u - v) for x, y in zip(a, b) for u, v in zip(x, y))


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("heads")
    out = {}
    for case in CASES:
        for norm in (True, False):
            out[case, norm] = rlexport.export(FIXTURES / case / "ckpt", tmp / f"{case}-{norm}", target="value",
                                              dtype="float32", normalize=norm).out
    return out


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("norm", [True, False])
def test_transformers_serves_what_the_trainer_computed(exports, case, norm):
    exp = expected(case)
    got = token_values(exports[case, norm], exp["prompts"])
    assert max_diff(got, exp[CASES[case][0 if norm else 1]]) < TOL
    # the last token is the reward the trainer's own forward returned (OpenRLHF: normalised)
    if norm:
        assert max(abs(g[-1] - r) for g, r in zip(got, exp["reward_last"])) < TOL


def test_normalisation_is_folded_in_float64_and_rounded_once(exports):
    src = load_file(FIXTURES / "openrlhf_rm_qwen2" / "ckpt" / "model.safetensors")["score.weight"]
    out = exports["openrlhf_rm_qwen2", True]
    head = load_file(next(out.glob("model-*.safetensors")))
    mean, std = 2.75, 0.37
    assert torch.equal(head["score.weight"], (src.double() / std).float())
    assert torch.equal(head["score.bias"], torch.tensor([(0.0 - mean) / std]).float())
    assert head["score.weight"].dtype == torch.float32
    raw = load_file(next(exports["openrlhf_rm_qwen2", False].glob("model-*.safetensors")))
    assert torch.equal(raw["score.weight"], src) and torch.equal(raw["score.bias"], torch.zeros(1))


@pytest.mark.parametrize("case", CASES)
def test_config_is_the_one_value_encoding(exports, case):
    cfg = json.loads((exports[case, True] / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForTokenClassification"] and cfg["num_labels"] == 1
    assert cfg["problem_type"] == "regression"  # raw scores in vLLM: no sigmoid
    rec = cfg["rlexport"]
    assert rec["convention"] == ("openrlhf" if case.startswith("openrlhf") else "sequence-classification")
    assert rec["normalization_folded"] == case.startswith("openrlhf")
    assert "mean" not in cfg and "value_head_prefix" not in cfg or rec["mean"] == 2.75


@pytest.mark.parametrize("case", CASES)
def test_inspect_names_the_convention_and_what_is_served(case):
    h = rlexport.inspect(FIXTURES / case / "ckpt")["head"]
    assert h["convention"] == ("openrlhf" if case.startswith("openrlhf") else "sequence-classification")
    if case.startswith("openrlhf"):
        assert h["normalization_folded"] and h["mean"] == 2.75 and h["std"] == 0.37
        codes = [f["code"] for f in rlexport.inspect(FIXTURES / case / "ckpt")["findings"]]
        assert "reward-normalization" in codes and "value-head-present" in codes
        assert "normalised" in h["serves"] and "normalised" not in h["raw_serves"]


@pytest.mark.parametrize("case", CASES)
def test_policy_is_refused_for_reward_models_and_critics(tmp_path, case):
    with pytest.raises(RlexportError) as e:
        rlexport.export(FIXTURES / case / "ckpt", tmp_path / "out")
    assert "--target value" in e.value.hint and not (tmp_path / "out").exists()


def _broken_rm(tmp_path, *, config=None, tensors=None):
    ckpt = tmp_path / "rm"
    shutil.copytree(FIXTURES / "openrlhf_rm_qwen2" / "ckpt", ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, **(config or {})}))
    if tensors:
        sd = load_file(ckpt / "model.safetensors")
        save_file(tensors(sd), ckpt / "model.safetensors", {"format": "pt"})
    return ckpt


@pytest.mark.parametrize("what,code", [
    (dict(config={"std": 0}), "head-normalization-invalid"),
    (dict(config={"mean": float("nan")}), "head-normalization-invalid"),
    (dict(config={"value_head_prefix": "reward_head"}), "head-unknown"),
    (dict(tensors=lambda sd: {**sd, "score.weight": torch.randn(2, 128)}), "head-multi-output"),
])
def test_bad_heads_are_refused_in_one_line(tmp_path, what, code):
    ckpt = _broken_rm(tmp_path, **what)
    with pytest.raises(RlexportError) as e:
        rlexport.export(ckpt, tmp_path / "out", target="value")
    assert e.value.code == code and "\n" not in e.value.line() and not (tmp_path / "out").exists()


def test_older_openrlhf_prefix_value_head(tmp_path):
    """OpenRLHF runs before the `score` default named the head `value_head`: value_head_prefix says which."""
    ckpt = _broken_rm(tmp_path, config={"value_head_prefix": "value_head"},
                      tensors=lambda sd: {("value_head.weight" if k == "score.weight" else k): v for k, v in sd.items()})
    out = rlexport.export(ckpt, tmp_path / "out", target="value", dtype="float32").out
    exp = expected("openrlhf_rm_qwen2")
    assert max_diff(token_values(out, exp["prompts"]), exp["value_normalized"]) < TOL


def test_lora_reward_model_whose_head_was_never_saved_is_refused(tmp_path):
    case = FIXTURES / "openrlhf_rm_lora_qwen2"
    assert expected("openrlhf_rm_lora_qwen2")["reconstructible_from_ckpt"] is False
    for target in ("value", "policy"):
        with pytest.raises(RlexportError) as e:
            rlexport.export(case / "ckpt", tmp_path / target, target=target)
        assert e.value.code == "head-not-saved" and "never saved" in e.value.message
    report = rlexport.inspect(case / "ckpt")
    assert not report["complete"] and [f["code"] for f in report["findings"]][0] == "head-not-saved"


def test_lora_critic_from_a_reward_model_serves_openrlhfs_critic_forward(exports):
    """OpenRLHF's own CriticModel forward (values of every position but the last, normalised) is what the export
    serves; the head is the RM's score.weight plus the LoRA delta on score, merged in float32."""
    case = FIXTURES / "openrlhf_critic_lora_qwen2"
    exp = expected("openrlhf_critic_lora_qwen2")
    got = token_values(exports["openrlhf_critic_lora_qwen2", True], exp["prompts"])
    assert max_diff([g[:-1] for g in got], exp["critic_forward"]) < TOL
    base_head = load_file(case / "base" / "model.safetensors")["score.weight"]
    ad = load_file(case / "ckpt" / "adapter_model.safetensors")
    delta = 2.0 * ad["base_model.model.score.lora_B.weight"] @ ad["base_model.model.score.lora_A.weight"]  # alpha/r
    raw = load_file(next(exports["openrlhf_critic_lora_qwen2", False].glob("model-*.safetensors")))["score.weight"]
    torch.testing.assert_close(raw, base_head + delta, rtol=0, atol=1e-7)
    assert delta.abs().max() > 0.01  # the LoRA on the head matters: a merge that skipped it would fail above


def test_lora_critic_whose_base_lacks_the_head_is_refused(tmp_path):
    """The same adapter on a plain LLM base (no score head anywhere): nothing can rebuild the head."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / "openrlhf_critic_lora_qwen2" / "ckpt", ckpt)
    with pytest.raises(RlexportError) as e:
        rlexport.export(ckpt, tmp_path / "out", base=FIXTURES / "lf_ppo_full_qwen2" / "base", target="value")
    assert e.value.code == "head-not-saved" and "the base has no 'score' either" in e.value.message
    assert not (tmp_path / "out").exists()


def test_lora_critic_with_the_head_saved_whole_merges_body_and_head(tmp_path):
    """An OpenRLHF-style LoRA critic: LoRA on the body, the `score` head in modules_to_save (saved whole), the
    normalisation in the config.json save_model writes beside the adapter. Reference: the PEFT model's own
    forward, normalised as OpenRLHF's critic does."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForTokenClassification
    from factories import make_tiny_model
    base = make_tiny_model(tmp_path / "base", dtype=torch.float32)
    model = AutoModelForTokenClassification.from_pretrained(base, num_labels=1, dtype=torch.float32)
    torch.manual_seed(5)
    with torch.no_grad():
        model.score.weight.normal_(0, 0.5)
        model.score.bias.zero_()  # OpenRLHF's head has no bias
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                                  modules_to_save=["score"], init_lora_weights=False))
    with torch.no_grad():
        peft_model.base_model.model.score.modules_to_save["default"].weight.add_(0.3)  # trained head
    ckpt = tmp_path / "critic"
    peft_model.save_pretrained(ckpt)
    cfg = json.loads((ckpt / "adapter_config.json").read_text())
    (ckpt / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(base),
                                                          "task_type": None}))
    sd = load_file(ckpt / "adapter_model.safetensors")  # OpenRLHF's score is Linear(bias=False)
    save_file({k: v for k, v in sd.items() if not k.endswith("score.bias")}, ckpt / "adapter_model.safetensors")
    base_cfg = json.loads((base / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**base_cfg, "value_head_prefix": "score", "mean": 1.5, "std": 0.25,
                                                  "normalize_reward": True}))
    prompts = expected("openrlhf_rm_qwen2")["prompts"]
    with torch.no_grad():
        want = [((peft_model(torch.tensor([p])).logits[0, :, 0] - 1.5) / 0.25).tolist() for p in prompts]
    out = rlexport.export(ckpt, tmp_path / "out", target="value", dtype="float32").out
    assert max_diff(token_values(out, prompts), want) < 1e-4
    assert json.loads((out / "config.json").read_text())["rlexport"]["convention"] == "openrlhf"
