"""Tensor-parallel readiness: the rules vLLM 0.32 applies when it shards a model, one test per rule."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import rlexport
from factories import FIXTURES
from rlexport import parallel
from rlexport.cli import cli

QWEN2_7B = dict(model_type="qwen2", hidden_size=3584, num_attention_heads=28, num_key_value_heads=4,
                intermediate_size=18944, vocab_size=152064)


def test_qwen2_7b_geometry_refuses_tp8_and_names_what_works():
    assert parallel.accepted_sizes(QWEN2_7B) == [1, 2, 4]
    line = parallel.explain(QWEN2_7B, 8)
    assert "attention heads = 28" in line and "1, 2, 4" in line and "pipeline" in line
    assert parallel.explain(QWEN2_7B, 4) is None


@pytest.mark.parametrize("config,tp,ok,dimension", [
    # attention heads must split evenly (ModelConfig.verify_with_parallel_config)
    (dict(num_attention_heads=12, num_key_value_heads=12, intermediate_size=768, vocab_size=1024), 8, False,
     "attention heads"),
    # fewer KV heads than ranks: each KV head is replicated, tp must be a multiple of them
    (dict(num_attention_heads=16, num_key_value_heads=2, intermediate_size=1024, vocab_size=1024), 8, True, None),
    (dict(num_attention_heads=48, num_key_value_heads=4, intermediate_size=1536, vocab_size=1536), 6, False,
     "KV heads"),
    # more KV heads than ranks: they must split evenly
    (dict(num_attention_heads=24, num_key_value_heads=6, intermediate_size=1536, vocab_size=1536), 4, False,
     "KV heads"),
    # the MLP's inner dimension is split by Merged/RowParallelLinear
    (dict(num_attention_heads=16, num_key_value_heads=16, intermediate_size=1000, vocab_size=1024), 16, False,
     "MLP intermediate size"),
    # the vocabulary is padded to a multiple of 64 first: 1000 -> 1024 splits over 16 ranks
    (dict(num_attention_heads=16, num_key_value_heads=16, intermediate_size=1024, vocab_size=1000), 16, True, None),
    (dict(num_attention_heads=12, num_key_value_heads=12, intermediate_size=1536, vocab_size=1000), 3, False,
     "vocabulary"),
    # MoE experts' inner dimension (FusedMoEConfig) and the shared expert's
    (dict(num_attention_heads=16, num_key_value_heads=4, intermediate_size=1024, moe_intermediate_size=1400,
          vocab_size=1024), 16, False, "MoE expert intermediate size"),
    (dict(num_attention_heads=16, num_key_value_heads=4, intermediate_size=1024, moe_intermediate_size=1024,
          shared_expert_intermediate_size=1000, vocab_size=1024), 16, False, "shared-expert intermediate size"),
    # a multimodal config nests the language model's dimensions in text_config
    (dict(text_config=dict(num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944,
                           vocab_size=152064)), 8, False, "attention heads"),
])
def test_rules(config, tp, ok, dimension):
    why = parallel.refusals(config, tp)
    assert (not why) == ok, why
    if dimension:
        assert why[0].startswith(dimension)


def test_inspect_lists_the_accepted_sizes():
    report = rlexport.inspect(FIXTURES / "lf_ppo_full_qwen2" / "ckpt")
    # 2 attention heads, 1 KV head (replicated), intermediate 256, vocab 320 (padded 320)
    assert report["tensor_parallel"]["sizes"] == [1, 2]
    assert report["tensor_parallel"]["refused"]["4"].startswith("attention heads = 2")


def test_verify_tensor_parallel_size_fails_in_one_line(tmp_path):
    out = tmp_path / "out"
    rlexport.export(FIXTURES / "lf_ppo_full_qwen2" / "ckpt", out)
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, **{k: v for k, v in QWEN2_7B.items() if k != "model_type"}}))
    report = rlexport.verify(out, engine="none", tensor_parallel_size=8)
    check = report.check("tensor-parallel")
    assert check.status == "fail" and "attention heads = 28" in check.summary and "1, 2, 4" in check.summary
    r = CliRunner().invoke(cli, ["verify", str(out), "--engine", "none", "--tensor-parallel-size", "8", "--json"])
    assert r.exit_code == 1
    tp = next(c for c in json.loads(r.output)["checks"] if c["name"] == "tensor-parallel")
    assert tp["status"] == "fail" and tp["summary"] == check.summary


def test_verify_accepts_a_size_that_splits(tmp_path):
    out = tmp_path / "out"
    rlexport.export(FIXTURES / "lf_ppo_full_qwen2" / "ckpt", out)
    report = rlexport.verify(out, engine="none", tensor_parallel_size=2)
    assert report.check("tensor-parallel").status == "pass" and report.ok, report.failed()
