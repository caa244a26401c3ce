"""verl FSDP2 checkpoints (actor, uneven world size 3, critic, LoRA saved whole), read without verl: the export
against the rank files put back together by torch, against verl's own merger output, and the training-time
numbers of expected.json; the errors each broken checkpoint gives; bounded memory."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.tensor  # noqa: F401 - DTensor as a weights_only safe global, for the reference loads
from safetensors.torch import load_file

import rlexport
from conftest import expected
from factories import FIXTURES, copy_fixture, open_error
from rlexport.formats import open_checkpoint
from test_export import load_folder

ACTORS = ("verl_fsdp2_actor_qwen2", "verl_fsdp2_actor_ws3_qwen2")
CRITIC = "verl_fsdp2_critic_qwen2"
LORA = ("verl_fsdp2_lora_actor_qwen2",)


def role_dir(case: str) -> Path:
    return FIXTURES / case / "ckpt" / "global_step_4" / ("critic" if "critic" in case else "actor")


def gathered(case: str) -> dict[str, torch.Tensor]:
    """The rank files put back together by torch itself (full load, every DTensor Shard(0) in rank order)."""
    files = sorted(role_dir(case).glob("model_world_size_*_rank_*.pt"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    ranks = [torch.load(f, weights_only=True) for f in files]
    for sd in ranks:
        assert all(str(v.placements) == "(Shard(dim=0),)" for v in sd.values())
    return {k: torch.cat([sd[k].to_local() for sd in ranks]) for k in ranks[0]}


def policy(folder: Path, prompts):
    from transformers import AutoModelForCausalLM
    from rlexport.verify.numbers import policy_numbers
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return policy_numbers(model, prompts, 12)


def max_diff(a, b) -> float:
    assert [len(x) for x in a] == [len(y) for y in b]
    return max(abs(p - q) for x, y in zip(a, b) for p, q in zip(x, y))


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: conftest.one_thread


# ---- the actor: exact float32 reassembly, verl's merger after bf16 rounding, the training-time numbers ----

@pytest.mark.parametrize("case", ACTORS)
def test_actor_export_equals_rank_files_and_verl_merger(tmp_path, case):
    out = rlexport.export(FIXTURES / case / "ckpt", tmp_path / "out", dtype="float32").out
    got, ref = load_folder(out), gathered(case)
    assert set(got) == set(ref)
    for k, v in ref.items():
        assert got[k].dtype == torch.float32 and torch.equal(got[k], v), k
    merged = load_file(FIXTURES / case / "verl_merged" / "model.safetensors")
    assert set(merged) == set(got)
    for k, v in merged.items():
        assert torch.equal(got[k].to(torch.bfloat16), v), k  # verl's merger writes bf16 only
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["torch_dtype"] == "float32"
    assert {"tokenizer.json", "chat_template.jinja", "generation_config.json"} <= {p.name for p in out.iterdir()}
    exp = expected(case)
    num = policy(out, exp["prompts"])
    assert max_diff(num.logprobs, exp["policy"]["logprobs"]) < 1e-4
    assert num.greedy == exp["policy"]["greedy"]


@pytest.mark.parametrize("route", ["run", "step", "role", "tag", "tag-number", "tag-role"])
def test_every_folder_and_tag_reads_the_same_actor(route):
    ckpt = FIXTURES / ACTORS[0] / "ckpt"
    path, kw = {"run": (ckpt, {}), "step": (ckpt / "global_step_4", {}), "role": (role_dir(ACTORS[0]), {}),
                "tag": (ckpt, {"tag": "global_step_4"}), "tag-number": (ckpt, {"tag": "4"}),
                "tag-role": (role_dir(ACTORS[0]), {"tag": "global_step_4"})}[route]
    src = open_checkpoint(path, **kw)
    assert (src.kind, src.producer, src.stage, src.targets) == ("verl", "verl", None, ("policy",))
    assert src.config_dir == role_dir(ACTORS[0]) / "huggingface"
    assert len(src.weights) == 27 and src.adapter is None and not src.value_head


def test_unknown_tag_lists_the_steps():
    with pytest.raises(rlexport.RlexportError) as e:
        open_checkpoint(FIXTURES / ACTORS[0] / "ckpt", tag="global_step_9")
    assert e.value.code == "tag-not-found" and "global_step_4" in str(e.value)


def test_reading_reads_no_tensor_bytes(monkeypatch):
    """open_checkpoint unpickles on meta only: no tensor storage is read, whatever the model size."""
    calls, real = [], os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, off: calls.append(len(bufs[0])) or real(fd, bufs, off))
    src = open_checkpoint(FIXTURES / ACTORS[1] / "ckpt")
    assert src.weights
    assert sum(calls) <= 3 * 3 * 4  # each rank file's device mesh (three int32 ranks), nothing else


# ---- the critic: a token-classification value model, never a policy ----

def test_critic_exports_as_value_model(tmp_path):
    src = open_checkpoint(FIXTURES / CRITIC / "ckpt")
    assert (src.kind, src.producer, src.stage, src.targets) == ("verl", "verl", "critic", ("value",))
    assert src.head.convention == "token-classification" and [r.name for r in src.value_head] == \
        ["score.weight", "score.bias"]
    out = rlexport.export(FIXTURES / CRITIC / "ckpt", tmp_path / "out", target="value", dtype="float32").out
    got, ref = load_folder(out), gathered(CRITIC)
    assert set(got) == set(ref) and not any(k.startswith("lm_head") for k in got)
    for k, v in ref.items():
        assert torch.equal(got[k], v), k
    merged = load_file(FIXTURES / CRITIC / "verl_merged" / "model.safetensors")
    for k, v in merged.items():
        assert torch.equal(got[k].to(torch.bfloat16), v), k
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForTokenClassification"] and cfg["num_labels"] == 1
    assert cfg["problem_type"] == "regression"
    from transformers import AutoModelForTokenClassification
    model = AutoModelForTokenClassification.from_pretrained(out, dtype=torch.float32).eval()
    exp = expected(CRITIC)
    with torch.no_grad():
        values = [model(torch.tensor([p])).logits[0, :, 0].tolist() for p in exp["prompts"]]
    assert max_diff(values, exp["value"]) < 2e-3


def test_critic_refuses_the_policy_target(tmp_path):
    with pytest.raises(rlexport.RlexportError) as e:
        rlexport.export(FIXTURES / CRITIC / "ckpt", tmp_path / "out", target="policy")
    assert e.value.code in ("not-a-policy", "target-unavailable", "rm-has-no-policy")
    assert not (tmp_path / "out").exists()


def test_step_folder_with_both_reads_the_actor_and_the_critic_when_asked(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / ACTORS[0] / "ckpt", run)
    shutil.copytree(role_dir(CRITIC), run / "global_step_4" / "critic")
    assert open_checkpoint(run).stage is None
    assert open_checkpoint(run / "global_step_4").stage is None
    assert open_checkpoint(run / "global_step_4" / "critic").stage == "critic"
    assert open_checkpoint(run / "global_step_4" / "critic", tag="global_step_4").stage == "critic"


# ---- LoRA saved whole: base + adapter merged in float32 ----

def _lora_tensors(case: str) -> dict[str, torch.Tensor]:
    return {k.replace(".default.", "."): v for k, v in gathered(case).items() if ".lora_" in k}


def test_lora_export_equals_peft_merge_and_expected_numbers(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    case = LORA[0]
    src = open_checkpoint(FIXTURES / case / "ckpt")
    assert src.adapter is not None and src.adapter.config["r"] == 8 and src.adapter.config["lora_alpha"] == 16
    assert all(not r.name.startswith("base_model.") and ".base_layer." not in r.name for r in src.weights)
    out = rlexport.export(FIXTURES / case / "ckpt", tmp_path / "out", dtype="float32").out
    got = load_folder(out)
    # verl's merger writes the adapter beside the unmerged base (bf16): it matches the rank files' LoRA factors
    adapter_dir = FIXTURES / case / "verl_merged" / "lora_adapter"
    lora = _lora_tensors(case)
    for k, v in load_file(adapter_dir / "adapter_model.safetensors").items():
        assert torch.equal(lora[k].to(torch.bfloat16), v), k
    # PEFT's own merge of base/ + that adapter config with the float32 factors
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(FIXTURES / case / "base", dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=cfg["r"], lora_alpha=cfg["lora_alpha"],
                                             target_modules=cfg["target_modules"], lora_dropout=0.0))
    state = {k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight"):
             v for k, v in lora.items()}
    missing = model.load_state_dict(state, strict=False)
    assert not missing.unexpected_keys
    ref = model.merge_and_unload().state_dict()
    assert set(ref) == set(got)
    for k, v in ref.items():
        assert torch.allclose(got[k], v, atol=1e-6, rtol=0), k
    exp = expected(case)
    num = policy(out, exp["prompts"])
    assert max_diff(num.logprobs, exp["policy"]["logprobs"]) < 1e-4
    assert num.greedy == exp["policy"]["greedy"]


# ---- inspect ----

@pytest.mark.parametrize("case", [*ACTORS, CRITIC, *LORA])
def test_inspect_names_verl(case):
    report = rlexport.inspect(FIXTURES / case / "ckpt")
    assert report["format"] == "verl" and report["producer"] == "verl" and report["complete"]
    assert report["targets"] == (["value"] if case == CRITIC else ["policy"])


# ---- broken checkpoints: one line each ----

def _actor_copy(tmp_path, case=ACTORS[0]) -> Path:
    return copy_fixture(case, tmp_path) / "ckpt"


def test_missing_rank_file(tmp_path):
    ckpt = _actor_copy(tmp_path)
    (ckpt / "global_step_4" / "actor" / "model_world_size_2_rank_1.pt").unlink()
    e = open_error(ckpt)
    assert e.code == "verl-missing-rank" and "model_world_size_2_rank_1.pt" in str(e)


def test_world_size_disagreeing_with_fsdp_config(tmp_path):
    ckpt = _actor_copy(tmp_path)
    cfg = ckpt / "global_step_4" / "actor" / "fsdp_config.json"
    cfg.write_text(json.dumps({"FSDP_version": 2, "world_size": 4}))
    e = open_error(ckpt)
    assert e.code == "verl-world-size-mismatch" and "world_size 4" in str(e)


def test_rank_files_of_another_world_size_do_not_add_up(tmp_path):
    """Two of three world-size-3 rank files renamed as a complete world size 2 save."""
    ckpt = _actor_copy(tmp_path, ACTORS[1])
    actor = ckpt / "global_step_4" / "actor"
    (actor / "model_world_size_3_rank_2.pt").unlink()
    for r in (0, 1):
        (actor / f"model_world_size_3_rank_{r}.pt").rename(actor / f"model_world_size_2_rank_{r}.pt")
    (actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": 2}))
    e = open_error(ckpt)
    assert e.code == "verl-shard-mismatch" and "do not add up" in str(e)


def test_shard_of_the_wrong_shape(tmp_path):
    ckpt = _actor_copy(tmp_path)
    f = ckpt / "global_step_4" / "actor" / "model_world_size_2_rank_1.pt"
    sd = torch.load(f, weights_only=True)
    sd["model.norm.weight"]._local_tensor = torch.zeros(10)
    torch.save(sd, f)
    e = open_error(ckpt)
    assert e.code == "verl-shard-mismatch" and "model.norm.weight" in str(e) and "[10]" in str(e)


def test_missing_huggingface_folder_needs_base(tmp_path):
    ckpt = _actor_copy(tmp_path)
    shutil.rmtree(ckpt / "global_step_4" / "actor" / "huggingface")
    e = open_error(ckpt)
    assert e.code == "missing-config" and "--base" in e.hint
    base = FIXTURES / ACTORS[0] / "base"
    src = open_checkpoint(ckpt, base=base)
    assert src.config_dir == base.resolve() and src.tokenizer_dirs == (base.resolve(),)
    out = rlexport.export(ckpt, tmp_path / "out", base=base, dtype="float32").out
    assert torch.equal(load_folder(out)["lm_head.weight"], gathered(ACTORS[0])["lm_head.weight"])


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/rlexport-verl-pwned",))


def test_malicious_rank_file_is_refused_and_never_run(tmp_path):
    ckpt = _actor_copy(tmp_path)
    marker = Path("/tmp/rlexport-verl-pwned")
    marker.unlink(missing_ok=True)
    torch.save({"model.norm.weight": _Payload()}, ckpt / "global_step_4" / "actor" / "model_world_size_2_rank_1.pt")
    e = open_error(ckpt)
    assert e.code == "unsafe-pickle" and "nothing in it was run" in str(e)
    assert not marker.exists()


# ---- bounded memory: peak RSS does not grow with the number of layers ----

def _verl_geometry(gen, layers: int, tmp: Path) -> Path:
    """A synthetic verl actor (bf16 DTensors, world size 2, Shard(0)) of the bench geometry, via the fixture's mesh."""
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
    geo = gen.Geometry(f"w512-l{layers}", 512, 2048, layers, 8, 2, 4096, False, 10**12)
    base = gen.make_base(geo, tmp / f"base{layers}")
    mesh = next(iter(torch.load(role_dir(ACTORS[0]) / "model_world_size_2_rank_0.pt",
                                weights_only=True).values())).device_mesh
    actor = tmp / f"verl{layers}" / "global_step_1" / "actor"
    (actor / "huggingface").mkdir(parents=True)
    for f in base.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy(f, actor / "huggingface" / f.name)
    (actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": 2}))
    (actor.parents[1] / "latest_checkpointed_iteration.txt").write_text("1")
    full = {}
    for f in sorted(base.glob("*.safetensors")):
        full.update(load_file(f))
    for rank in (0, 1):
        sd = {}
        for name, t in full.items():
            spec = DTensorSpec(mesh, (Shard(0),), TensorMeta(t.shape, t.stride(), t.dtype))
            sd[name] = DTensor(torch.chunk(t, 2)[rank].clone(), spec, requires_grad=False)
        torch.save(sd, actor / f"model_world_size_2_rank_{rank}.pt")
        del sd
    shutil.rmtree(base)
    return actor.parents[1], geo


def test_peak_memory_does_not_grow_with_the_number_of_layers(tmp_path):
    from test_pipeline import _bench_gen, _peak_mib
    gen = _bench_gen()
    peaks, sizes = {}, {}
    for layers in (4, 32):
        run, geo = _verl_geometry(gen, layers, tmp_path)
        assert open_checkpoint(run).kind == "verl"
        peaks[layers] = _peak_mib("export", run, tmp_path / f"out{layers}")
        sizes[layers] = geo.nbytes / 2**20
        shutil.rmtree(tmp_path / f"out{layers}")
    assert sizes[32] - sizes[4] > 200
    assert peaks[32] - peaks[4] < 24, (peaks, sizes)
