"""What rlexport refuses to merge, each with a one-line error, and never a half-written export."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import rlexport
from rlexport.cli import main
from test_lora_oracle import Case, base_model, load_folder, make_adapter

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: conftest.one_thread
P = "base_model.model.model.layers.0.self_attn."


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return base_model(tmp_path_factory.mktemp("bases"), "qwen2")


def write_adapter(path, base, tensors: dict, **config):
    """A hand-made adapter folder: adapter_config.json + adapter_model.safetensors."""
    path.mkdir(parents=True)
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
           "base_model_name_or_path": str(base), **config}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, path / "adapter_model.safetensors")
    return path


def q_lora(r=4, out=128, inn=128):
    return {P + "q_proj.lora_A.weight": torch.randn(r, inn), P + "q_proj.lora_B.weight": torch.randn(out, r)}


def refused(tmp_path, adapter, code, *, capsys=None, **kw) -> rlexport.RlexportError:
    with pytest.raises(rlexport.RlexportError) as e:
        rlexport.export(adapter, tmp_path / "out", dtype="float32", **kw)
    assert e.value.code == code, e.value.line()
    assert "\n" not in e.value.line()
    assert not (tmp_path / "out").exists()  # nothing half-written
    return e.value


@pytest.mark.parametrize("ptype", ["OFT", "BOFT", "VERA", "ADALORA", "HRA", "FOURIERFT", "PROMPT_TUNING"])
def test_peft_types_without_an_exact_merge_are_refused_by_name(tmp_path, qwen2, ptype):
    adapter = write_adapter(tmp_path / "a", qwen2, q_lora(), peft_type=ptype)
    e = refused(tmp_path, adapter, "unsupported-peft-type")
    assert f"PEFT type {ptype} cannot be merged" in e.message and "merge_and_unload" in e.hint


@pytest.mark.parametrize("option, value, name", [
    ("use_bdlora", {"lora_a_is_blockdiagonal": True}, "BD-LoRA"),
    ("alora_invocation_tokens", [5, 6], "aLoRA"),
    ("layer_replication", [[0, 2], [1, 2]], "layer_replication"),
    ("use_qalora", True, "QALoRA"),
    ("velora_config", {"r": 2}, "VeLoRA"),
])
def test_lora_variants_that_change_the_math_are_refused_by_name(tmp_path, qwen2, option, value, name):
    adapter = write_adapter(tmp_path / "a", qwen2, q_lora(), **{option: value})
    assert name in refused(tmp_path, adapter, "unsupported-lora-variant").message


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq", "lora_ga"])
def test_adapters_needing_the_rewritten_base_are_refused_with_the_conversion_hint(tmp_path, qwen2, init):
    adapter = write_adapter(tmp_path / "a", qwen2, q_lora(), init_lora_weights=init)
    e = refused(tmp_path, adapter, "unsupported-lora-init")
    assert init in e.message and "path_initial_model_for_weight_conversion" in e.hint


def test_init_only_variants_merge_as_plain_lora(tmp_path, qwen2):
    """init_lora_weights only decides the starting point of training: the saved A, B merge as W + alpha/r * B @ A."""
    tensors = q_lora()
    q = "model.layers.0.self_attn.q_proj.weight"
    a, b = tensors[P + "q_proj.lora_A.weight"], tensors[P + "q_proj.lora_B.weight"]
    want = load_folder(qwen2)[q].float() + 8 / 4 * b @ a
    for init in ("gaussian", "eva", "orthogonal", "mica"):
        adapter = write_adapter(tmp_path / init, qwen2, tensors, init_lora_weights=init)
        got = load_folder(rlexport.export(adapter, tmp_path / f"out-{init}", dtype="float32").out)
        torch.testing.assert_close(got[q], want, rtol=0, atol=1e-5)


def test_lora_bias_on_a_layer_without_bias_is_refused_like_peft(tmp_path, qwen2):
    tensors = {**q_lora(), P + "q_proj.lora_B.bias": torch.randn(128)}
    tensors = {k.replace("q_proj", "o_proj"): v for k, v in tensors.items()}  # Qwen2's o_proj has no bias
    adapter = write_adapter(tmp_path / "a", qwen2, tensors, lora_bias=True, target_modules=["o_proj"])
    e = refused(tmp_path, adapter, "adapter-base-mismatch")
    assert "lora_bias=True but the base layer has no bias" in e.message


def test_wrong_base_is_refused_before_anything_is_written(tmp_path, qwen2):
    other = base_model(tmp_path, "llama")  # same names, but an adapter for a bigger q_proj
    adapter = write_adapter(tmp_path / "a", other, q_lora(out=256))
    e = refused(tmp_path, adapter, "base-shape-mismatch")
    assert "q_proj.weight has shape [128, 128]" in e.message and "--base" in e.hint
    missing = write_adapter(tmp_path / "b", qwen2, {k.replace("self_attn.q_proj", "mlp.q_proj"): v
                                                    for k, v in q_lora().items()})
    assert "model.layers.0.mlp.q_proj.weight" in refused(tmp_path, missing, "adapter-base-mismatch").message


def test_rank_that_disagrees_with_the_config_is_refused(tmp_path, qwen2):
    adapter = write_adapter(tmp_path / "a", qwen2, q_lora(r=4), r=8)
    assert "r=8" in refused(tmp_path, adapter, "adapter-rank-mismatch").message


def test_trainable_tokens_without_their_indices_are_refused(tmp_path, qwen2):
    adapter = write_adapter(tmp_path / "a", qwen2, {
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta": torch.randn(3, 128)},
        trainable_token_indices=[1, 2])
    refused(tmp_path, adapter, "adapter-config-invalid")


def test_a_resized_embedding_without_its_head_is_refused(tmp_path, qwen2):
    adapter = write_adapter(tmp_path / "a", qwen2, {"base_model.model.model.embed_tokens.weight": torch.randn(330, 128),
                                                    **q_lora()}, modules_to_save=["embed_tokens"])
    assert "330 rows" in refused(tmp_path, adapter, "vocab-mismatch").message


def test_ensure_weight_tying_on_tied_embeddings_is_refused(tmp_path):
    base = base_model(tmp_path, "gemma")
    adapter = write_adapter(tmp_path / "a", base, {"base_model.model.lm_head.weight": torch.randn(320, 128)},
                            modules_to_save=["lm_head"], ensure_weight_tying=True)
    assert "ensure_weight_tying" in refused(tmp_path, adapter, "unsupported-lora-variant").message


def test_nan_in_a_merged_tensor_leaves_no_output(tmp_path, qwen2):
    tensors = q_lora()
    tensors[P + "q_proj.lora_B.weight"][3, 1] = float("nan")
    adapter = write_adapter(tmp_path / "a", qwen2, tensors)
    assert "q_proj.weight" in refused(tmp_path, adapter, "nonfinite-weights").message


def test_cli_prints_the_refusal_on_one_line(tmp_path, qwen2, capsys):
    adapter = write_adapter(tmp_path / "a", qwen2, q_lora(), peft_type="OFT")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["export", str(adapter), "--out", str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error[unsupported-peft-type]: PEFT type OFT cannot be merged by rlexport")


def test_lora_bias_adapter_peft_also_cannot_merge(tmp_path, qwen2):
    # the same refusal from PEFT itself: rlexport's error is not stricter than the reference
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    adapter = make_adapter(tmp_path / "a", qwen2, Case("qwen2", "bias", dict(target_modules=["o_proj"],
                                                                                lora_bias=True)))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(qwen2, dtype=torch.float32), adapter)
    with pytest.raises(RuntimeError, match="no bias"):
        model.merge_and_unload()
    refused(tmp_path, adapter, "adapter-base-mismatch")
