"""verl Megatron checkpoints (megatron-core 0.16.1 torch_dist, verl 0.9.1 layout), read without Megatron: the export
against the HF state dict the checkpoint was made from (reference.safetensors), the numbers of expected.json,
inspect, and one-line errors for a malicious .metadata and a missing .distcp file."""
from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import rlexport
from conftest import expected
from factories import FIXTURES, copy_fixture
from rlexport.formats import open_checkpoint, steps_of
from test_export import load_folder

CASE = "verl_megatron_actor_qwen2"
ACTOR = FIXTURES / CASE / "ckpt" / "global_step_4" / "actor"
DIST = ACTOR / "model" / "dist_ckpt"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: conftest.one_thread


def test_export_equals_reference_and_expected_numbers(tmp_path):
    out = rlexport.export(FIXTURES / CASE / "ckpt", tmp_path / "out", dtype="float32").out
    got, ref = load_folder(out), load_file(FIXTURES / CASE / "reference.safetensors")
    assert set(got) == set(ref)
    for k, v in ref.items():
        assert got[k].dtype == torch.float32 and torch.equal(got[k], v), k
    from transformers import AutoModelForCausalLM
    from rlexport.verify.numbers import policy_numbers
    exp = expected(CASE)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        num = policy_numbers(model, exp["prompts"], 12)
    diff = max(abs(p - q) for x, y in zip(num.logprobs, exp["policy"]["logprobs"]) for p, q in zip(x, y))
    assert diff < 1e-4
    assert num.greedy == exp["policy"]["greedy"]


@pytest.mark.parametrize("where", ["run", "step", "role"])
def test_every_folder_reads_the_actor(where):
    path = {"run": FIXTURES / CASE / "ckpt", "step": ACTOR.parent, "role": ACTOR}[where]
    src = open_checkpoint(path)
    assert (src.kind, src.producer, src.targets) == ("verl-megatron", "verl", ("policy",))
    assert src.config_dir == ACTOR / "model" / "huggingface" and len(src.weights) == 27


def test_the_fsdp_reader_does_not_claim_it():
    from rlexport.formats import verl
    assert not verl.detect(FIXTURES / CASE / "ckpt") and not verl.detect(ACTOR)


def test_the_checkpoint_stacks_layers_and_fuses_qkv():
    from rlexport.formats.dcp import load_metadata
    md = load_metadata(DIST / ".metadata")
    assert tuple(md.state_dict_metadata["decoder.layers.self_attention.linear_qkv.weight"].size) == (2, 256, 128)
    assert any(k.endswith("_extra_state/shard_0_2") for k in md.state_dict_metadata)


def test_reading_reads_no_tensor_bytes(monkeypatch):
    calls, real = [], os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, off: calls.append(n) or real(fd, n, off))
    src = open_checkpoint(FIXTURES / CASE / "ckpt")
    assert src.weights and not calls


def test_inspect_names_it():
    report = rlexport.inspect(FIXTURES / CASE / "ckpt")
    assert report["format"] == "verl-megatron" and report["producer"] == "verl" and report["complete"]
    assert report["targets"] == ["policy"]


def _error(path) -> rlexport.RlexportError:
    with pytest.raises(rlexport.RlexportError) as e:
        open_checkpoint(path)
    assert "\n" not in str(e.value)
    return e.value


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/rlexport-megatron-pwned",))


def test_malicious_metadata_is_refused_and_never_run(tmp_path):
    ckpt = copy_fixture(CASE, tmp_path) / "ckpt"
    marker = Path("/tmp/rlexport-megatron-pwned")
    marker.unlink(missing_ok=True)
    (ckpt / "global_step_4" / "actor" / "model" / "dist_ckpt" / ".metadata").write_bytes(
        pickle.dumps(_Payload(), protocol=4))
    e = _error(ckpt)
    assert e.code == "unsafe-pickle" and "nothing in it was run" in str(e) and "system" in str(e)
    assert not marker.exists()


def test_missing_distcp_file(tmp_path):
    ckpt = copy_fixture(CASE, tmp_path) / "ckpt"
    (ckpt / "global_step_4" / "actor" / "model" / "dist_ckpt" / "__0_1.distcp").unlink()
    e = _error(ckpt)
    assert e.code == "missing-file" and "__0_1.distcp" in str(e)


def test_truncated_distcp_file_fails_on_export(tmp_path):
    ckpt = copy_fixture(CASE, tmp_path) / "ckpt"
    f = ckpt / "global_step_4" / "actor" / "model" / "dist_ckpt" / "__0_0.distcp"
    os.truncate(f, f.stat().st_size // 2)
    with pytest.raises(rlexport.RlexportError) as e:
        rlexport.export(ckpt, tmp_path / "out", dtype="float32")
    assert "\n" not in str(e.value) and "__0_0.distcp" in str(e.value)


def test_grouped_query_attention_per_layer_names_and_padded_vocab(tmp_path):
    """A torch DCP checkpoint written here with Megatron names: 2 query groups of 2 heads, per-layer names
    (`decoder.layers.N.`, no stacking) and an embedding padded past the vocabulary, as Megatron pads it."""
    import importlib.util
    import json
    import torch.distributed.checkpoint as dcp
    spec = importlib.util.spec_from_file_location("make_megatron", FIXTURES / "make" / "megatron" / "make_megatron.py")
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    cfg = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
           "num_key_value_heads": 2, "num_hidden_layers": 2, "intermediate_size": 96, "vocab_size": 100,
           "tie_word_embeddings": False}
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (100, 64), "lm_head.weight": (100, 64), "model.norm.weight": (64,)}
    for i in range(2):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (64, 64), p + "self_attn.q_proj.bias": (64,),
                       p + "self_attn.k_proj.weight": (32, 64), p + "self_attn.k_proj.bias": (32,),
                       p + "self_attn.v_proj.weight": (32, 64), p + "self_attn.v_proj.bias": (32,),
                       p + "self_attn.o_proj.weight": (64, 64), p + "input_layernorm.weight": (64,),
                       p + "post_attention_layernorm.weight": (64,), p + "mlp.gate_proj.weight": (96, 64),
                       p + "mlp.up_proj.weight": (96, 64), p + "mlp.down_proj.weight": (64, 96)})
    sd = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    mc = make.hf_to_mcore(sd, cfg)
    for k in ("embedding.word_embeddings.weight", "output_layer.weight"):
        mc[k] = torch.cat([mc[k], torch.randn(28, 64, generator=g)])  # padded to 128 rows
    actor = tmp_path / "global_step_7" / "actor"
    (actor / "model" / "huggingface").mkdir(parents=True)
    (actor / "model" / "huggingface" / "config.json").write_text(json.dumps(cfg))
    dcp.save(mc, checkpoint_id=actor / "model" / "dist_ckpt", no_dist=True)
    (actor / "ckpt_contents.json").write_text(json.dumps({"schema_version": 2, "role": "actor"}))
    src = open_checkpoint(tmp_path / "global_step_7")
    got = {r.name: r.load() for r in src.weights}
    assert set(got) == set(sd)
    for k, v in sd.items():
        assert torch.equal(got[k], v), k


# ---- TP 2 x PP 2 (megatron-core 0.16.1 resharding a TP1 checkpoint, saved in verl 0.9.1's v2 layout) ----

TP = "verl_megatron_tp2pp2_qwen2"
CRITIC = "verl_megatron_critic_qwen2"


def test_tp2_pp2_actor_equals_reference_and_needs_the_base(tmp_path):
    ckpt, base = FIXTURES / TP / "ckpt", FIXTURES / TP / "base"
    e = _error(ckpt)  # verl 0.9.1 saves model/huggingface/ only with hf_model in save_contents
    assert e.code == "missing-config" and "--base" in e.hint
    out = rlexport.export(ckpt, tmp_path / "out", dtype="float32", base=base).out
    got, ref = load_folder(out), load_file(FIXTURES / TP / "reference.safetensors")
    assert set(got) == set(ref) == set(expected(TP)["names"])
    for k, v in ref.items():
        assert torch.equal(got[k], v), k
    from transformers import AutoModelForCausalLM
    from rlexport.verify.numbers import policy_numbers
    exp = expected(TP)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        num = policy_numbers(model, exp["prompts"], 12)
    assert max(abs(p - q) for x, y in zip(num.logprobs, exp["policy"]["logprobs"]) for p, q in zip(x, y)) < 1e-4
    assert num.greedy == exp["policy"]["greedy"]


def test_inspect_shows_the_layout_saved_with():
    report = rlexport.inspect(FIXTURES / TP / "ckpt", base=FIXTURES / TP / "base")
    t = report["trainer"]
    assert t["parallel_layout"] == {"tp": 2, "pp": 2} and t["role"] == "actor" and t["optimizer_state"] is None
    assert rlexport.inspect(FIXTURES / CASE / "ckpt")["trainer"]["parallel_layout"] == {"tp": 1, "pp": 1}


def test_critic_is_a_value_model(tmp_path):
    src = open_checkpoint(FIXTURES / CRITIC / "ckpt")
    assert (src.stage, src.targets) == ("critic", ("value",))
    assert [(r.name, r.shape) for r in src.value_head] == [("output_layer.weight", (1, 128))]
    assert not any(r.name == "lm_head.weight" for r in src.weights)
    out = rlexport.export(FIXTURES / CRITIC / "ckpt", tmp_path / "out", target="value", dtype="float32").out
    got, ref = load_folder(out), load_file(FIXTURES / CRITIC / "reference.safetensors")
    assert torch.equal(got["score.weight"], ref["score.weight"]) and torch.equal(got["score.bias"], torch.zeros(1))
    from transformers import AutoModelForTokenClassification
    model = AutoModelForTokenClassification.from_pretrained(out, dtype=torch.float32).eval()
    exp = expected(CRITIC)
    with torch.no_grad():
        vals = [model(torch.tensor([p])).logits[0, :, 0].tolist() for p in exp["prompts"]]
    assert max(abs(a - b) for s, v in zip(vals, exp["value"]) for a, b in zip(s, v)) < 1e-4


def test_a_step_without_its_manifest_is_unfinished(tmp_path):
    ckpt = copy_fixture(TP, tmp_path) / "ckpt"
    base = tmp_path / TP / "base"
    shutil.copytree(ckpt / "global_step_6", ckpt / "global_step_8")
    (ckpt / "global_step_8" / "actor" / "ckpt_contents.json").unlink()  # verl writes it last
    steps = steps_of(ckpt)
    assert [(s.tag, s.complete) for s in steps] == [("global_step_6", True), ("global_step_8", False)]
    assert "ckpt_contents.json" in steps[1].why
    src = open_checkpoint(ckpt, base=base)  # the newest complete step
    assert all("global_step_6" in r.origin for r in src.weights)
    e = _error(ckpt / "global_step_8")
    assert e.code == "incomplete-checkpoint" and "ckpt_contents.json" in str(e)
    listed = rlexport.inspect(ckpt, base=base)["trainer"]["steps"]  # inspect lists them, unfinished ones marked
    assert [(s["tag"], s["complete"]) for s in listed] == [("global_step_6", True), ("global_step_8", False)]


# ---- MoE: Qwen3-MoE saved with expert parallelism 2 (SequentialMLP: `mlp.experts.experts.` [L, E, ...]) ----

MOE = "verl_megatron_moe_qwen3moe"


def test_moe_experts_come_out_in_transformers_fused_names():
    """The reader's contract with the MoE transform: transformers-5 in-memory names, gate rows first."""
    src = open_checkpoint(FIXTURES / MOE / "ckpt")
    got, ref = {r.name: r for r in src.weights}, load_file(FIXTURES / MOE / "reference.safetensors")
    assert set(got) == set(ref)
    assert got["model.layers.1.mlp.experts.gate_up_proj"].shape == (4, 128, 128)  # [E, 2I, H]
    assert got["model.layers.1.mlp.experts.down_proj"].shape == (4, 128, 64)  # [E, H, I]
    assert got["model.layers.0.mlp.gate.weight"].shape == (4, 128) and "model.layers.0.self_attn.q_norm.weight" in got
    for k, v in ref.items():
        assert torch.equal(got[k].load(), v), k
    report = rlexport.inspect(FIXTURES / MOE / "ckpt")
    assert report["trainer"]["parallel_layout"] == {"tp": 1, "pp": 1, "ep": 2}


def test_moe_export_gives_the_training_time_numbers(tmp_path):
    from transformers import AutoModelForCausalLM
    from rlexport.verify.numbers import policy_numbers
    out = rlexport.export(FIXTURES / MOE / "ckpt", tmp_path / "out", dtype="float32").out
    exp = expected(MOE)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        num = policy_numbers(model, exp["prompts"], 12)
    assert max(abs(p - q) for x, y in zip(num.logprobs, exp["policy"]["logprobs"]) for p, q in zip(x, y)) < 1e-4
    assert num.greedy == exp["policy"]["greedy"]


def test_qwen2_moe_shared_expert_names(tmp_path):
    """Megatron's shared expert (`mlp.shared_experts.linear_fc1` [gate; up], `gate_weight`) and stacked experts
    written here with torch DCP (layers and experts stacked, as Megatron saves them) come out as transformers'
    Qwen2-MoE names, loadable strictly."""
    import json
    import torch.distributed.checkpoint as dcp
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig
    cfg = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
               shared_expert_intermediate_size=24, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
               head_dim=16, num_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(Qwen2MoeConfig(**cfg))
    sd = {k: torch.randn(v.shape) for k, v in hf.state_dict().items()}
    L, p = 2, "model.layers.{}."

    def stack(suffix):
        return torch.stack([sd[p.format(i) + suffix] for i in range(L)])
    qkv = {}
    for kind in ("weight", "bias"):
        q, k, v = (stack(f"self_attn.{x}_proj.{kind}") for x in "qkv")  # one query group: [q; k; v]
        qkv[kind] = torch.cat([q, k, v], 1)
    mc = {"embedding.word_embeddings.weight": sd["model.embed_tokens.weight"],
          "output_layer.weight": sd["lm_head.weight"], "decoder.final_layernorm.weight": sd["model.norm.weight"],
          "decoder.layers.self_attention.linear_qkv.weight": qkv["weight"],
          "decoder.layers.self_attention.linear_qkv.bias": qkv["bias"],
          "decoder.layers.self_attention.linear_proj.weight": stack("self_attn.o_proj.weight"),
          "decoder.layers.input_layernorm.weight": stack("input_layernorm.weight"),
          "decoder.layers.pre_mlp_layernorm.weight": stack("post_attention_layernorm.weight"),
          "decoder.layers.mlp.router.weight": stack("mlp.gate.weight"),
          "decoder.layers.mlp.experts.experts.linear_fc1.weight": stack("mlp.experts.gate_up_proj"),
          "decoder.layers.mlp.experts.experts.linear_fc2.weight": stack("mlp.experts.down_proj"),
          "decoder.layers.mlp.shared_experts.linear_fc1.weight": torch.cat(
              [stack("mlp.shared_expert.gate_proj.weight"), stack("mlp.shared_expert.up_proj.weight")], 1),
          "decoder.layers.mlp.shared_experts.linear_fc2.weight": stack("mlp.shared_expert.down_proj.weight"),
          "decoder.layers.mlp.shared_experts.gate_weight": stack("mlp.shared_expert_gate.weight")}
    actor = tmp_path / "global_step_1" / "actor"
    (actor / "model" / "huggingface").mkdir(parents=True)
    (actor / "model" / "huggingface" / "config.json").write_text(json.dumps({**Qwen2MoeConfig(**cfg).to_dict(),
                                                                             "architectures": ["Qwen2MoeForCausalLM"]}))
    dcp.save(mc, checkpoint_id=actor / "model" / "dist_ckpt", no_dist=True)
    (actor / "ckpt_contents.json").write_text(json.dumps({"schema_version": 2, "role": "actor"}))
    got = {r.name: r.load() for r in open_checkpoint(tmp_path).weights}
    assert set(got) == set(sd)
    for k, v in sd.items():
        assert torch.equal(got[k], v), k
    hf.load_state_dict(got, strict=True)
