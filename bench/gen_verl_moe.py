"""A verl FSDP2 LoRA-on-MoE actor run (world size 2, Shard(0) bf16 DTensors, PEFT names saved whole, as verl 0.9.1
saves its default all-linear LoRA on a transformers-5 Qwen3-MoE: experts fused under two nested ParamWrappers,
gate_up_proj at rank 2r), random values, no training. The device mesh comes from the LoRA MoE fixture's rank file.

    .venv/bin/python bench/gen_verl_moe.py ROOT HIDDEN EXPERTS EXPERT_SIZE LAYERS VOCAB R
    e.g. ROOT 1024 64 512 6 151936 8   (0.95B parameters, 1.8 GB)

Compared (bench/RESULTS.d/70-moe-verl-lora.md): `rlexport export ROOT`, verl's model_merger, and
`python bench/gen_verl_moe.py --standard ACTOR OUT` (transformers + PEFT merge_and_unload + save_pretrained)."""
import json, shutil, sys, math
from pathlib import Path
import torch
import torch.distributed.tensor  # noqa
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
if sys.argv[1] == "--standard":  # the standard path, for comparison
    from transformers import AutoConfig, AutoModelForCausalLM
    from peft import LoraConfig, get_peft_model
    actor, out = Path(sys.argv[2]), sys.argv[3]
    cfg = AutoConfig.from_pretrained(actor / "huggingface")
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    meta = json.load(open(actor / "lora_train_meta.json"))
    model = get_peft_model(model, LoraConfig(r=meta["r"], lora_alpha=meta["lora_alpha"], target_modules="all-linear",
                                             bias="none"))
    parts = [torch.load(actor / f"model_world_size_2_rank_{r}.pt", weights_only=True, mmap=True) for r in range(2)]
    state = {k: torch.cat([p[k]._local_tensor for p in parts]) for k in parts[0]}
    del parts
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected[:3]
    del state
    model.merge_and_unload().save_pretrained(out)
    sys.exit(0)
root = Path(sys.argv[1]); H, E, I, L, V, R = [int(x) for x in sys.argv[2:8]]
FIX = Path(__file__).resolve().parent.parent / "tests/fixtures/verl_fsdp2_lora_moe_qwen3moe/ckpt/global_step_4/actor"
actor = root / "global_step_1" / "actor"
shutil.rmtree(root, ignore_errors=True); (actor / "huggingface").mkdir(parents=True)
cfg = json.load(open(FIX / "huggingface/config.json"))
cfg.update(hidden_size=H, num_local_experts=E, moe_intermediate_size=I, num_hidden_layers=L, vocab_size=V,
           num_attention_heads=H // 128, num_key_value_heads=4, head_dim=128, intermediate_size=4 * I, dtype="bfloat16")
json.dump(cfg, open(actor / "huggingface/config.json", "w"))
for f in FIX.glob("huggingface/*"):
    if f.name != "config.json": shutil.copy(f, actor / "huggingface" / f.name)
json.dump({"FSDP_version": 2, "world_size": 2}, open(actor / "fsdp_config.json", "w"))
json.dump({"r": R, "lora_alpha": 2 * R, "task_type": "CAUSAL_LM"}, open(actor / "lora_train_meta.json", "w"))
(root / "latest_checkpointed_iteration.txt").write_text("1")
mesh = next(iter(torch.load(FIX / "model_world_size_2_rank_0.pt", weights_only=True).values())).device_mesh
P = "base_model.model."
shapes = {P + "model.embed_tokens.weight": (V, H), P + "lm_head.weight": (V, H), P + "model.norm.weight": (H,)}
qd, kvd = H, 4 * 128
for l in range(L):
    p = f"{P}model.layers.{l}."
    for n, (o, i) in {"q_proj": (qd, H), "k_proj": (kvd, H), "v_proj": (kvd, H), "o_proj": (H, qd)}.items():
        shapes[f"{p}self_attn.{n}.base_layer.weight"] = (o, i)
        shapes[f"{p}self_attn.{n}.lora_A.default.weight"] = (R, i); shapes[f"{p}self_attn.{n}.lora_B.default.weight"] = (o, R)
    shapes[f"{p}self_attn.q_norm.weight"] = (128,); shapes[f"{p}self_attn.k_norm.weight"] = (128,)
    shapes[f"{p}mlp.experts.base_layer.base_layer.gate_up_proj"] = (E, 2 * I, H)
    shapes[f"{p}mlp.experts.base_layer.base_layer.down_proj"] = (E, H, I)
    shapes[f"{p}mlp.experts.base_layer.lora_A.default.weight"] = (2 * R * E, H)
    shapes[f"{p}mlp.experts.base_layer.lora_B.default.weight"] = (2 * I, 2 * R * E)
    shapes[f"{p}mlp.experts.lora_A.default.weight"] = (R * E, I); shapes[f"{p}mlp.experts.lora_B.default.weight"] = (H, R * E)
    shapes[f"{p}mlp.gate.base_layer.weight"] = (E, H)
    shapes[f"{p}mlp.gate.lora_A.default.weight"] = (R, H); shapes[f"{p}mlp.gate.lora_B.default.weight"] = (E, R)
    shapes[f"{p}input_layernorm.weight"] = (H,); shapes[f"{p}post_attention_layernorm.weight"] = (H,)
n = sum(math.prod(s) for s in shapes.values()); print(f"{n / 1e9:.2f}B parameters", flush=True)
g = torch.Generator().manual_seed(0)
for rank in range(2):
    sd = {}
    for name, s in shapes.items():
        full_rows = s[0]; cs = -(-full_rows // 2); lo = min(rank * cs, full_rows); hi = min(lo + cs, full_rows)
        local = (torch.randn((hi - lo, *s[1:]), generator=g) * 0.02).to(torch.bfloat16)
        spec = DTensorSpec(mesh, (Shard(0),), TensorMeta(torch.Size(s), torch.empty(s, device="meta").stride(), torch.bfloat16))
        sd[name] = DTensor(local, spec, requires_grad=False)
    torch.save(sd, actor / f"model_world_size_2_rank_{rank}.pt"); del sd
print("done", root)
