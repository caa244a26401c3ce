"""verl Megatron checkpoints (megatron-core 0.16.1 torch_dist, verl 0.9.1 layout), read without Megatron: the export
against the HF state dict the checkpoint was made from (reference.safetensors), the numbers of expected.json,
inspect, and one-line errors for a malicious .metadata and a missing .distcp file."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import rlexport
from conftest import expected
from factories import FIXTURES, copy_fixture
from rlexport.formats import open_checkpoint
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
