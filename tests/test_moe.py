"""Mixture-of-experts exports from real trainer outputs: verl FSDP2 rank files (fused experts sharded on the expert
axis, uneven and empty shards; a LoRA on the experts, router and attention saved whole), a PEFT target_parameters
LoRA, a Qwen2-MoE with a shared expert, a DeepSpeed ZeRO-3 checkpoint. Each export carries exactly the base model's
own tensor names and the training-time numbers (transformers, float32); the expert merge equals PEFT's
merge_and_unload (the oracle); bad input stops with one line and writes nothing. vLLM serves them in
tests/vllm/test_moe_vllm.py."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import rlexport
from conftest import expected
from factories import FIXTURES
from rlexport import moe, parallel
from rlexport.errors import RlexportError
from rlexport.formats import open_checkpoint
from rlexport.hub_layout import to_hub_layout
from rlexport.lora.experts import saved_whole_params
from rlexport.tensors import TensorRef

pytestmark = pytest.mark.usefixtures("one_thread")
# case -> (checkpoint, --base)
CASES = {
    "verl_fsdp2_moe_qwen3moe": ("ckpt", None),        # world size 3: experts split 2 / 2 / 0
    "verl_fsdp2_lora_moe_qwen3moe": ("ckpt", None),   # verl's default LoRA: all-linear -> experts + router
    "verl_fsdp2_moe_qwen2moe": ("ckpt", None),        # shared expert; shared_expert_gate [1, H] split 1 / 0
    "peft_lora_moe_qwen3moe": ("ckpt", "base"),       # PEFT target_parameters on a per-expert hub base
    "ds_z3_moe_qwen3moe": ("ckpt", None),             # DeepSpeed ZeRO-3 engine, world size 2, no 16-bit gather
}
# cases that do not copy their base: the one they were trained from
HUB_BASE = {"ds_z3_moe_qwen3moe": "peft_lora_moe_qwen3moe"}
LOGPROB_TOL = 1e-4  # float32 export vs float32 training stack (transformers)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("moe")
    out = {}
    for case, (ckpt, base) in CASES.items():
        out[case] = rlexport.export(FIXTURES / case / ckpt, tmp / case, dtype="float32",
                                    base=FIXTURES / case / base if base else None).out
    return out


def names(folder) -> set[str]:
    found = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(f, "pt") as s:
            found |= set(s.keys())
    return found


def tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in folder.glob("*.safetensors"):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_has_exactly_the_base_checkpoints_names(exports, case):
    exp = expected(case)
    assert names(exports[case]) == set(exp["names"])
    with safe_open(FIXTURES / HUB_BASE.get(case, case) / "base" / "model.safetensors", "pt") as s:  # the hub's own
        assert set(s.keys()) == set(exp["names"])


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_gives_the_training_time_numbers(exports, case):
    from transformers import AutoModelForCausalLM
    exp = expected(case)
    model = AutoModelForCausalLM.from_pretrained(exports[case], dtype=torch.float32).eval()
    worst = 0.0
    with torch.no_grad():
        for p, ref in zip(exp["prompts"], exp["policy"]["logprobs"]):
            lp = torch.log_softmax(model(torch.tensor([p])).logits.float(), -1)[0]
            got = [lp[j - 1, p[j]].item() for j in range(1, len(p))]
            worst = max(worst, max(abs(a - b) for a, b in zip(got, ref)))
    assert worst < LOGPROB_TOL, worst
    # and it is the trained model, not the base: the training moved these numbers by far more
    base = expected(case)["base_policy"]["logprobs"]
    assert max(abs(a - b) for x, y in zip(base, exp["policy"]["logprobs"]) for a, b in zip(x, y)) > 100 * LOGPROB_TOL


def test_deepspeed_zero3_export_is_the_gathered_fp32_weights_split_per_expert(exports):
    """The ZeRO-3 partitions (fused experts flattened across 2 ranks) rebuild bit-exactly what DeepSpeed's own
    zero_to_fp32 gathers (reference.safetensors), each fused expert tensor split into the hub's per-expert names."""
    case = "ds_z3_moe_qwen3moe"
    got, ref = tensors(exports[case]), load_file(FIXTURES / case / "reference.safetensors")
    inter = json.loads((exports[case] / "config.json").read_text())["moe_intermediate_size"]
    want = {}
    for name, t in ref.items():
        if name.endswith("mlp.experts.gate_up_proj"):  # [E, 2I, H], gate rows first
            for e in range(t.shape[0]):
                want[name.replace("gate_up_proj", f"{e}.gate_proj.weight")] = t[e, :inter]
                want[name.replace("gate_up_proj", f"{e}.up_proj.weight")] = t[e, inter:]
        elif name.endswith("mlp.experts.down_proj"):  # [E, H, I]
            for e in range(t.shape[0]):
                want[name.replace("down_proj", f"{e}.down_proj.weight")] = t[e]
        else:
            want[name] = t
    assert set(got) == set(want) == set(expected(case)["names"])
    for name, t in want.items():
        assert got[name].dtype == torch.float32 and torch.equal(got[name], t), name
    # trained: the experts moved away from the base
    base = load_file(FIXTURES / HUB_BASE[case] / "base" / "model.safetensors")
    assert (got["model.layers.1.mlp.experts.2.up_proj.weight"] - base["model.layers.1.mlp.experts.2.up_proj.weight"]
            ).abs().max() > 1e-3


@pytest.mark.parametrize("case", sorted(CASES))
def test_config_spells_the_expert_count_as_the_hub_config(exports, case):
    cfg = json.loads((exports[case] / "config.json").read_text())
    assert cfg["num_experts"] == 4 and "num_local_experts" not in cfg  # transformers 4.x reads num_experts only
    from transformers import AutoConfig
    assert AutoConfig.from_pretrained(exports[case]).num_experts == 4


def _merged_by_peft(case: str) -> dict[str, torch.Tensor]:
    """PEFT's own merge_and_unload of the training-time PeftModel (the oracle), as transformers 5 fuses it."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(FIXTURES / case / "base", dtype=torch.float32)
    if case.startswith("peft"):
        model = PeftModel.from_pretrained(base, FIXTURES / case / "ckpt")
    else:  # verl saved the PeftModel's state dict whole: load it into the same PeftModel verl built
        from rlexport.formats.dtensor import sharded_refs
        from rlexport.formats.verl import locate, rank_files
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", bias="none"))
        state = {r.name: r.load() for r in sharded_refs(rank_files(locate(FIXTURES / case / "ckpt")))}
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and not [k for k in missing if "lora" in k]
    return {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}


@pytest.mark.parametrize("case", ["peft_lora_moe_qwen3moe", "verl_fsdp2_lora_moe_qwen3moe"])
def test_expert_merge_equals_peft_merge_and_unload(exports, case):
    oracle = _merged_by_peft(case)
    got = tensors(exports[case])
    cfg = json.loads((exports[case] / "config.json").read_text())
    fused = moe.to_memory_layout({n: TensorRef(n, t.dtype, tuple(t.shape), lambda t=t: t) for n, t in got.items()},
                                 cfg)
    assert set(fused) == set(oracle)
    for name, ref in fused.items():
        torch.testing.assert_close(ref.load(), oracle[name], atol=2e-6, rtol=1e-5, msg=name)
    # the experts and the router were trained: the merge changed them
    base = load_file(FIXTURES / case / "base" / "model.safetensors")
    for n in ("model.layers.1.mlp.experts.3.up_proj.weight", "model.layers.1.mlp.experts.0.down_proj.weight",
              "model.layers.0.mlp.gate.weight"):
        assert (got[n] - base[n]).abs().max() > 1e-3


def test_verl_lora_ranks_come_from_the_shapes():
    src = open_checkpoint(FIXTURES / "verl_fsdp2_lora_moe_qwen3moe" / "ckpt")
    cfg = src.adapter.config  # verl records r=8, alpha=16; PEFT gave the fused gate_up_proj 2r / 2 alpha
    assert sorted(cfg["target_parameters"]) == ["experts.down_proj", "experts.gate_up_proj"]
    assert cfg["rank_pattern"] == {r".*\.gate_up_proj": 16} and cfg["alpha_pattern"] == {r".*\.gate_up_proj": 32}
    assert "experts" not in cfg["target_modules"] and "gate" in cfg["target_modules"]


def _param_refs(rank_gate_up: int, r: int = 8, e: int = 4, h: int = 16, i: int = 6) -> list[TensorRef]:
    def t(name, *shape):
        return TensorRef(name, torch.float32, shape, lambda: torch.zeros(shape), "rank0.pt")
    m = "model.layers.0.mlp.experts"
    return [t(f"{m}.base_layer.base_layer.gate_up_proj", e, 2 * i, h),
            t(f"{m}.base_layer.base_layer.down_proj", e, h, i),
            t(f"{m}.base_layer.lora_A.weight", rank_gate_up * e, h),  # gate_up_proj: the inner wrapper
            t(f"{m}.base_layer.lora_B.weight", 2 * i, rank_gate_up * e),
            t(f"{m}.lora_A.weight", r * e, i), t(f"{m}.lora_B.weight", h, r * e)]  # down_proj: the outer one


@pytest.mark.parametrize("rank,ok", [(8, True), (16, True), (24, False), (4, False)])
def test_lora_ranks_that_disagree_with_the_recorded_r(rank, ok):
    cfg = {"model_type": "qwen3_moe"}
    if ok:
        got = saved_whole_params(_param_refs(rank), cfg, 8, 16, "meta.json")
        assert got["target_parameters"] == ["experts.gate_up_proj", "experts.down_proj"]
        assert got["rank_pattern"] == ({} if rank == 8 else {r".*\.gate_up_proj": 16})
        return
    with pytest.raises(RlexportError) as e:
        saved_whole_params(_param_refs(rank), cfg, 8, 16, "meta.json")
    assert e.value.code == "adapter-rank-mismatch" and "gate_up_proj" in e.value.message


# ---- bad input: one line, exit 2, nothing written ------------------------------------------------------------

def _hf_copy(tmp_path, edit) -> object:
    """The PEFT fixture's per-expert base as a full fine-tune folder, with `edit(tensors)` applied."""
    d = tmp_path / "model"
    shutil.copytree(FIXTURES / "peft_lora_moe_qwen3moe" / "base", d)
    t = load_file(d / "model.safetensors")
    edit(t)
    save_file(t, d / "model.safetensors", metadata={"format": "pt"})
    return d


def _run(args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlexport", "export", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def test_expert_missing_from_the_checkpoint_cli(tmp_path):
    d = _hf_copy(tmp_path, lambda t: t.pop("model.layers.1.mlp.experts.2.up_proj.weight"))
    r = _run([d, "--out", tmp_path / "out"])
    assert r.returncode == 2 and "moe-expert-missing" in r.stderr + r.stdout and "experts.2.up_proj" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize("code,edit", [
    ("moe-router-shape", lambda t: t.update({"model.layers.0.mlp.gate.weight": torch.zeros(3, 128)})),
    ("moe-expert-missing", lambda t: [t.pop(k) for k in list(t) if ".experts.3." in k]),
])
def test_bad_experts_in_a_full_fine_tune(tmp_path, code, edit):
    d = _hf_copy(tmp_path, edit)
    with pytest.raises(RlexportError) as e:
        rlexport.export(d, tmp_path / "out")
    assert e.value.code == code and not (tmp_path / "out").exists()


def test_expert_count_disagrees_with_config(tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / "verl_fsdp2_moe_qwen3moe" / "ckpt", d)
    cfg_file = d / "global_step_4" / "actor" / "huggingface" / "config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "num_local_experts": 8}))
    with pytest.raises(RlexportError) as e:
        rlexport.export(d, tmp_path / "out")
    assert e.value.code == "moe-expert-count" and "8" in e.value.message and not (tmp_path / "out").exists()


def test_lora_rank_disagrees_with_lora_train_meta(tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / "verl_fsdp2_lora_moe_qwen3moe" / "ckpt", d)
    (d / "global_step_4" / "actor" / "lora_train_meta.json").write_text(json.dumps({"r": 4, "lora_alpha": 16}))
    with pytest.raises(RlexportError) as e:
        rlexport.export(d, tmp_path / "out")
    assert e.value.code == "adapter-rank-mismatch" and not (tmp_path / "out").exists()


# ---- quantization, tensor parallelism, inspect, verify ----------------------------------------------------------

def test_quantize_leaves_routers_and_the_shared_expert_gate_and_quantizes_each_expert():
    from rlexport.quant import get_scheme
    from rlexport.quant.plan import quantize_refs
    src = open_checkpoint(FIXTURES / "verl_fsdp2_moe_qwen2moe" / "ckpt")
    refs = to_hub_layout(list(src.weights), src.config)
    out, qcfg, notes = quantize_refs(refs, get_scheme("int8"), src.config)
    by = {r.name: r for r in out}
    for layer in (0, 1):
        p = f"model.layers.{layer}.mlp."
        assert p + "gate" in qcfg["ignore"] and p + "shared_expert_gate" in qcfg["ignore"]
        assert by[p + "gate.weight"].dtype == torch.float32 and p + "gate.weight_scale" not in by
        for e in range(4):
            assert by[f"{p}experts.{e}.down_proj.weight"].dtype == torch.int8
            assert by[f"{p}experts.{e}.down_proj.weight_scale"].shape == (128, 1)
        assert by[p + "shared_expert.up_proj.weight"].dtype == torch.int8
    assert any("routers" in n for n in notes)


@pytest.mark.parametrize("tp,ok", [(2, True), (4, False), (8, False)])
def test_tensor_parallel_expert_size_with_w4a16_groups(tp, ok):
    # Qwen3-30B-A3B geometry: 768-wide experts; a w4a16 group of 128 must not straddle two ranks
    cfg = dict(model_type="qwen3_moe", num_attention_heads=32, num_key_value_heads=4, intermediate_size=6144,
               moe_intermediate_size=768, vocab_size=151936,
               quantization_config={"config_groups": {"group_0": {"weights": {"strategy": "group",
                                                                               "group_size": 128}}}})
    assert (not parallel.refusals(cfg, tp)) == ok
    assert not parallel.refusals({k: v for k, v in cfg.items() if k != "quantization_config"}, tp)


def test_inspect_names_experts_and_layouts():
    report = rlexport.inspect(FIXTURES / "verl_fsdp2_moe_qwen2moe" / "ckpt")
    assert report["moe"] == {"experts": 4, "top_k": 2, "expert_size": 48,
                             "shared_experts": "1 (shared_expert, gated by shared_expert_gate)",
                             "layout_found": "fused", "layout_written": "per-expert"}
    assert rlexport.inspect(FIXTURES / "peft_lora_moe_qwen3moe" / "base")["moe"]["layout_found"] == "per-expert"


def test_verify_layer_by_layer_passes_and_names_a_swapped_expert(exports, tmp_path):
    case = "verl_fsdp2_lora_moe_qwen3moe"
    ckpt = FIXTURES / case / "ckpt"
    prompts = expected(case)["prompts"][:2]
    ok = rlexport.verify(exports[case], against=ckpt, engine="transformers", layerwise=True, prompts=prompts,
                         max_new_tokens=2)
    assert ok.ok, ok.failed()
    bad = tmp_path / "bad"
    shutil.copytree(exports[case], bad)
    shard = next(bad.glob("*.safetensors"))
    t = load_file(shard)
    p = "model.layers.1.mlp.experts."
    for e in range(4):  # gate and up halves swapped: a layout bug converters make
        t[f"{p}{e}.gate_proj.weight"], t[f"{p}{e}.up_proj.weight"] = t[f"{p}{e}.up_proj.weight"], \
            t[f"{p}{e}.gate_proj.weight"]
    save_file(t, shard, metadata={"format": "pt"})
    got = rlexport.verify(bad, against=ckpt, engine="transformers", layerwise=True, prompts=prompts,
                          max_new_tokens=2)
    assert not got.ok and "logprobs" in got.failed()
    assert {c.metrics.get("first_divergent_layer") for c in got.checks if c.status == "fail"} >= {1}
    # the whole-model path compares every tensor by the hub names: the swapped experts are named
    whole = rlexport.verify(bad, against=ckpt, engine="transformers", layerwise=False, prompts=prompts,
                            max_new_tokens=2)
    weights = next(c for c in whole.checks if c.name == "weights")
    assert weights.status == "fail" and weights.metrics["differing"] == 8 and weights.metrics["compared"] == 45


# ---- every family: a trainer's in-memory (fused) save exports to exactly what save_pretrained writes ------------

FAMILIES = {
    "mixtral": dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2, intermediate_size=48),
    "qwen2_moe": dict(model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                      shared_expert_intermediate_size=96, intermediate_size=96),
    "deepseek_v3": dict(model_type="deepseek_v3", n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                        moe_intermediate_size=48, intermediate_size=96, n_shared_experts=1, first_k_dense_replace=1,
                        q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_in_memory_save_exports_to_the_save_pretrained_layout(tmp_path, family):
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.for_model(**FAMILIES[family], vocab_size=96, hidden_size=64, num_attention_heads=2,
                               num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # routers and e_score_correction_bias away from their zero / constant init
        for n, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.02)
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b))
    hub = tmp_path / "hub"
    model.save_pretrained(hub)  # transformers 5 writes the hub layout
    mem = tmp_path / "mem"  # a trainer's state-dict save: the fused in-memory names
    mem.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, mem / "model.safetensors",
              metadata={"format": "pt"})
    shutil.copy(hub / "config.json", mem / "config.json")
    assert any(k.endswith("experts.gate_up_proj") for k in load_file(mem / "model.safetensors"))
    out = rlexport.export(mem, tmp_path / "out", dtype="float32").out
    want, got = tensors(hub), tensors(out)
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    ids = torch.tensor([[1, 5, 9, 30, 2, 77]])
    with torch.no_grad():
        ref = model(ids).logits
        again = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(ids).logits
    torch.testing.assert_close(again, ref)
