"""Vision-language models: the export's names (hub layout), processor files, config.json and numbers with an image,
adapters across the two name layouts, quantization and TP rules that leave/count the vision tower, bad input.

The verl FSDP2 Qwen2.5-VL actor (tests/fixtures/verl_fsdp2_vlm_actor_qwen25vl) stores the transformers-5 in-memory
names (`model.language_model.*`, `model.visual.*`) and transformers 5's processor_config.json.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import rlexport
from conftest import expected
from factories import FIXTURES, copy_fixture
from rlexport import archs, parallel
from rlexport.errors import RlexportError

CASE = "verl_fsdp2_vlm_actor_qwen25vl"
LF_CASE = "lf_dpo_lora_qwen25vl"  # LLaMA-Factory 0.9.3 LoRA DPO: adapter in-memory names, base in the hub layout
LF_FULL = "lf_dpo_full_qwen25vl"  # LLaMA-Factory 0.9.3 full DPO: save_pretrained's hub layout, 4.x processor files
CKPT = FIXTURES / CASE / "ckpt"
HF = CKPT / "global_step_4" / "actor" / "huggingface"
LOGPROB_TOL = 1e-4  # float32 export vs the float32 training-time model


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    return rlexport.export(CKPT, tmp_path_factory.mktemp("vlm") / "out", dtype="float32").out


@pytest.fixture(scope="module")
def lf_exported(tmp_path_factory) -> Path:
    return rlexport.export(FIXTURES / LF_CASE / "ckpt", tmp_path_factory.mktemp("vlm_lf") / "out",
                           dtype="float32").out


# --- names: one table, both directions ----------------------------------------------------------------------------
@pytest.mark.parametrize("model_type, memory, hub", [
    # Qwen2-VL / 2.5-VL: the hub drops `language_model.` and keeps the tower at the top level
    ("qwen2_5_vl", "model.language_model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.weight"),
    ("qwen2_vl", "model.visual.blocks.1.attn.qkv.weight", "visual.blocks.1.attn.qkv.weight"),
    ("qwen2_5_vl", "lm_head.weight", "lm_head.weight"),
    # Gemma 3 / LLaVA: language_model.model.* and language_model.lm_head.* on the hub
    ("gemma3", "model.language_model.norm.weight", "language_model.model.norm.weight"),
    ("llava", "lm_head.weight", "language_model.lm_head.weight"),
    ("gemma3", "model.multi_modal_projector.mm_input_projection_weight",
     "multi_modal_projector.mm_input_projection_weight"),
    # transformers 5.19 keeps the SigLIP/CLIP tower without its `vision_model.` level in memory; the hub has it
    ("gemma3", "model.vision_tower.encoder.layers.0.mlp.fc1.weight",
     "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"),
    # Qwen3-VL shipped with the in-memory names: nothing renamed
    ("qwen3_vl", "model.language_model.layers.0.self_attn.q_proj.weight",
     "model.language_model.layers.0.self_attn.q_proj.weight"),
    # text-only models are never touched
    ("qwen2", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.weight"),
])
def test_layout_names_map_both_ways(model_type, memory, hub):
    cfg = {"model_type": model_type}
    assert archs.to_hub(cfg, memory) == hub
    assert archs.to_hub(cfg, hub) == hub          # already hub: unchanged
    assert archs.to_memory(cfg, hub) == memory
    assert archs.to_memory(cfg, memory) == memory  # already in memory: unchanged


def test_an_older_in_memory_tower_name_keeps_one_vision_model_level():
    cfg = {"model_type": "llava"}
    name = "model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight"
    assert archs.to_hub(cfg, name) == "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight"


def test_every_vision_row_names_a_class_a_tower_and_its_layout_inverts():
    rows = {k: a.vision for k, a in archs.ARCHS.items() if a.vision is not None}
    assert {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3"} <= set(rows)
    for model_type, v in rows.items():
        assert v.cls.endswith("ForConditionalGeneration") and v.tower
        cfg = {"model_type": model_type}
        for t in v.tower:
            assert archs.to_hub(cfg, archs.to_memory(cfg, t + "x")) == t + "x"


# --- the verl actor export ------------------------------------------------------------------------------------------
def test_verl_vlm_export_writes_the_hub_layout(exported):
    names = set(tensors(exported))
    assert len(names) == 57
    assert not [n for n in names if n.startswith(("model.language_model.", "model.visual."))]
    assert {"lm_head.weight", "model.embed_tokens.weight", "visual.patch_embed.proj.weight",
            "visual.merger.mlp.2.weight", "model.layers.1.self_attn.q_proj.bias"} <= names


def test_verl_vlm_export_tensors_are_the_rank_files_gathered(exported):
    from rlexport.formats import open_checkpoint
    src = open_checkpoint(CKPT)
    got = tensors(exported)
    for ref in src.weights:
        assert torch.equal(got[archs.to_hub(src.config, ref.name)], ref.load()), ref.name


def test_verl_vlm_export_carries_processor_files_and_nested_config(exported):
    files = {p.name for p in exported.iterdir()}
    assert {"processor_config.json", "chat_template.jinja", "tokenizer.json", "tokenizer_config.json"} <= files
    # as the trainer saved it (transformers 5: image and video sections in one file)
    assert (exported / "processor_config.json").read_bytes() == (HF / "processor_config.json").read_bytes()
    assert (exported / "chat_template.jinja").read_bytes() == (HF / "chat_template.jinja").read_bytes()
    cfg = json.loads((exported / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert cfg["text_config"]["vocab_size"] == 384 and cfg["text_config"]["tie_word_embeddings"] is False
    assert cfg["tie_word_embeddings"] is False
    assert cfg["dtype"] == cfg["text_config"]["dtype"] == cfg["vision_config"]["dtype"] == "float32"


def _image_inputs(folder: Path, case: str, prompt: dict):
    from PIL import Image
    from transformers import AutoProcessor
    processor = AutoProcessor.from_pretrained(folder)
    messages = [{"role": m["role"], "content": [{"type": "image"} if c["type"] == "image" else c
                                                 for c in m["content"]] if isinstance(m["content"], list)
                 else m["content"]} for m in prompt["messages"]]
    text = processor.apply_chat_template(messages, tokenize=False)
    image = Image.open(FIXTURES / case / prompt["image"]).convert("RGB")
    return processor(text=[text], images=[image], return_tensors="pt")


@pytest.mark.parametrize("case", [CASE, LF_CASE, LF_FULL])
def test_export_reproduces_training_numbers_with_an_image(request, tmp_path, case, one_thread):
    """transformers 5 on the export (its chat template, processor and weights) against the training-time numbers
    (verl: transformers 5; LLaMA-Factory: transformers 4.52, + PEFT on the hub-layout base for the LoRA case)."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    exported = request.getfixturevalue("exported") if case == CASE else request.getfixturevalue("lf_exported") \
        if case == LF_CASE else rlexport.export(FIXTURES / case / "ckpt", tmp_path / "out", dtype="float32").out
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(exported, dtype=torch.float32).eval()
    exp = expected(case)
    with torch.no_grad():
        for prompt in exp["image"]["prompts"]:
            inputs = _image_inputs(exported, case, prompt)
            ids = inputs["input_ids"][0].tolist()
            assert ids == prompt["expanded_ids"]  # the exported template + processor render what training saw
            logp = model(**inputs).logits[0].log_softmax(-1)
            first = prompt["first_scored"]
            got = [float(logp[j - 1, ids[j]]) for j in range(first, len(ids))]
            assert max(abs(a - b) for a, b in zip(got, prompt["logprobs"])) < LOGPROB_TOL
            # the untrained base is far away: the test tells a trained vision tower from an untrained one
            assert max(abs(a - b) for a, b in zip(got, prompt["base_logprobs"])) > 0.5
        ids = torch.tensor([exp["prompts"][0]])
        logp = model(input_ids=ids).logits[0].log_softmax(-1)
        got = [float(logp[j - 1, ids[0, j]]) for j in range(1, ids.shape[1])]
        assert max(abs(a - b) for a, b in zip(got, exp["policy"]["logprobs"][0])) < LOGPROB_TOL


def test_llamafactory_vl_lora_export_keeps_the_base_layout_and_the_4x_processor_files(lf_exported):
    """The adapter says model.language_model.* / model.visual.*; the base (and so the export) model.* / visual.*."""
    adapter = set(tensors(FIXTURES / LF_CASE / "ckpt"))
    assert any(".model.language_model.layers." in k for k in adapter) and any(".model.visual.blocks." in k
                                                                              for k in adapter)
    assert set(tensors(lf_exported)) == set(tensors(FIXTURES / LF_CASE / "base"))
    for name in ("preprocessor_config.json", "video_preprocessor_config.json", "chat_template.jinja"):
        assert (lf_exported / name).read_bytes() == (FIXTURES / LF_CASE / "ckpt" / name).read_bytes()
    cfg = json.loads((lf_exported / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2_5_VLForConditionalGeneration"] and cfg["vocab_size"] == 384


# --- adapters across the two layouts -------------------------------------------------------------------------------
def test_adapter_in_memory_names_merges_into_a_hub_layout_base(exported, tmp_path, one_thread):
    """PEFT on transformers 5 saves `model.language_model.*` / `model.visual.*`; the base on disk is hub layout."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(3)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(exported, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                            target_modules=["q_proj", "v_proj", "down_proj", "qkv"]))
    peft.save_pretrained(tmp_path / "adapter")
    keys = set(tensors(tmp_path / "adapter"))
    assert any(".language_model.layers." in k for k in keys) and any(".visual.blocks." in k for k in keys)
    out = rlexport.export(tmp_path / "adapter", tmp_path / "merged", base=exported, dtype="float32").out
    got = tensors(out)
    want = {archs.to_hub({"model_type": "qwen2_5_vl"}, k): v for k, v in peft.merge_and_unload().state_dict().items()}
    assert set(got) == set(want)
    changed = [k for k in got if not torch.equal(got[k], tensors(exported)[k])]
    assert any(k.startswith("visual.") for k in changed) and any(k.startswith("model.layers.") for k in changed)
    for k, t in got.items():
        torch.testing.assert_close(t, want[k], atol=1e-6, rtol=0, msg=k)


# --- verify --against: an image prompt and the vision tower's weights -------------------------------------------
def test_verify_against_the_checkpoint_runs_an_image_prompt(exported, tmp_path, one_thread):
    from rlexport.verify import verify
    report = verify(exported, against=CKPT, engine="none")
    assert report.ok, report.failed()
    assert report.check("weights").summary.startswith("57 tensors")  # the vision tower's 31 among them
    # a vision tower changed after training: the weights check names it; the image row of logprobs moves while
    # every text prompt stays the same (the text prompts never run the tower)
    bad = tmp_path / "bad"
    shutil.copytree(exported, bad)
    shard = next(bad.glob("*.safetensors"))
    state = tensors(bad)
    state["visual.blocks.0.attn.qkv.weight"] = state["visual.blocks.0.attn.qkv.weight"] * 1.5
    save_file(state, shard, metadata={"format": "pt"})
    report = verify(bad, against=CKPT, engine="none")
    assert {"weights", "logprobs"} <= set(report.failed())
    assert "visual.blocks.0.attn.qkv.weight" in " ".join(report.check("weights").details)
    assert "greedy" not in report.failed()
    assert report.check("logprobs").details[0].startswith(f"prompt {len(report.prompts)},")  # the image row


# --- quantization and tensor parallelism --------------------------------------------------------------------------
def test_quantize_leaves_the_vision_tower_and_merger_unquantized(tmp_path):
    out = rlexport.export(CKPT, tmp_path / "q", dtype="bfloat16", quantize="int8").out
    cfg = json.loads((out / "config.json").read_text())
    got = tensors(out)
    ignore = set(cfg["quantization_config"]["ignore"])
    vision_linears = {k[: -len(".weight")] for k, t in got.items() if k.startswith("visual.") and t.dim() == 2}
    assert "visual.merger.mlp.0" in vision_linears and "visual.blocks.0.attn.qkv" in vision_linears
    assert vision_linears <= ignore
    assert all(t.dtype == torch.bfloat16 for k, t in got.items() if k.startswith("visual."))
    assert got["model.layers.0.mlp.up_proj.weight"].dtype == torch.int8  # the language model is quantized


def test_tensor_parallel_counts_the_vision_heads():
    cfg = json.loads((HF / "config.json").read_text())
    assert parallel.accepted_sizes(cfg, 4) == [1, 2]
    cfg["vision_config"]["num_heads"] = 3  # text heads (2) still split by 2; the vision tower's no longer
    assert parallel.accepted_sizes(cfg, 4) == [1]
    assert "vision attention heads = 3" in parallel.explain(cfg, 2)


# --- bad input ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("remove, named", [
    ("processor_config.json", "preprocessor_config.json or processor_config.json"),
    ("chat_template.jinja", "chat_template.jinja"),
])
def test_processor_file_in_neither_checkpoint_nor_base_is_refused(tmp_path, remove, named):
    case = copy_fixture(CASE, tmp_path)
    hf = case / "ckpt" / "global_step_4" / "actor" / "huggingface"
    (hf / remove).unlink()
    with pytest.raises(RlexportError) as e:
        rlexport.export(case / "ckpt", tmp_path / "out", dtype="float32")
    assert e.value.code == "missing-processor-file"
    assert named in str(e.value) and str(hf) in str(e.value)  # which file, and where it was looked for
    assert not (tmp_path / "out").exists()


def test_processor_files_come_from_the_base_when_the_checkpoint_has_none(tmp_path, exported):
    case = copy_fixture(CASE, tmp_path)
    hf = case / "ckpt" / "global_step_4" / "actor" / "huggingface"
    (hf / "processor_config.json").unlink()
    base = tmp_path / "base"
    shutil.copytree(exported, base)
    out = rlexport.export(case / "ckpt", tmp_path / "out", base=base, dtype="float32").out
    assert (out / "processor_config.json").read_bytes() == (base / "processor_config.json").read_bytes()


def test_verify_names_the_processor_files_a_folder_lacks(tmp_path, exported):
    """What a hand-made export loses (LLaMA-Factory#10169, EasyR1#48): vLLM would not start, LLM.chat would fail."""
    from rlexport.verify import verify
    assert verify(exported, engine="none").check("processor").status == "pass"
    bad = tmp_path / "bad"
    shutil.copytree(exported, bad)
    (bad / "processor_config.json").unlink()
    (bad / "chat_template.jinja").unlink()
    check = verify(bad, engine="none").check("processor")
    assert check.status == "fail"
    assert "processor_config.json" in check.summary and "chat_template.jinja" in " ".join(check.details)


def test_value_head_on_a_vision_language_body_is_refused_and_dropped_from_the_policy(tmp_path, exported):
    """TRL's value head around Qwen2.5-VL (what verl's critic is for a VLM): no servable value class exists."""
    folder = tmp_path / "vhead"
    shutil.copytree(exported, folder)
    for f in folder.glob("*.safetensors*"):
        f.unlink()
    state = tensors(exported)
    head = {"v_head.summary.weight": torch.randn(1, 128), "v_head.summary.bias": torch.zeros(1)}
    save_file({**state, **head}, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(RlexportError) as e:
        rlexport.export(folder, tmp_path / "value", target="value", dtype="float32")
    assert e.value.code == "target-unavailable" and "Qwen2_5_VLForConditionalGeneration" in str(e.value)
    assert not (tmp_path / "value").exists()
    out = rlexport.export(folder, tmp_path / "policy", dtype="float32").out
    assert set(tensors(out)) == set(state)


def test_self_check_refuses_a_folder_without_the_image_processor(tmp_path, exported):
    from rlexport.checks.selfcheck import self_check
    bad = tmp_path / "bad"
    shutil.copytree(exported, bad)
    (bad / "processor_config.json").unlink()
    with pytest.raises(RlexportError) as e:
        self_check(bad)
    assert e.value.code == "export-self-check" and "processor" in str(e.value)


def test_checkpoint_without_its_vision_tower_is_refused(tmp_path, exported):
    folder = tmp_path / "lm_only"
    shutil.copytree(exported, folder)
    for f in folder.glob("*.safetensors*"):
        f.unlink()
    save_file({k: v for k, v in tensors(exported).items() if not k.startswith("visual.")},
              folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(RlexportError) as e:
        rlexport.export(folder, tmp_path / "out", dtype="float32")
    assert e.value.code == "missing-vision-tower" and "visual." in str(e.value)
    assert not (tmp_path / "out").exists()
