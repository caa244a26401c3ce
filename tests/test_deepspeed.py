"""Raw DeepSpeed ZeRO checkpoints, read without DeepSpeed: real fixtures (ZeRO-2 ws2, ZeRO-3 ws1/ws2, gather
on/off) against DeepSpeed's own zero_to_fp32 output, synthetic ones for what the fixtures lack (padding at
world size 3, sub-groups, frozen/shared params, TRL and PEFT wrappers), and the safety of the unpickling."""
from __future__ import annotations

import json
import math
import shutil
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import rlexport
from factories import FIXTURES, TOKENIZER_FILES, copy_fixture
from rlexport.formats import open_checkpoint
from test_export import load_folder

DS_CASES = ("ds_z3_nogather_ws1", "ds_z3_nogather_ws2", "ds_z2_ws2", "ds_z3_gather_ws1")
BASE = FIXTURES / "lf_ppo_full_qwen2" / "base"


def assert_close(got: dict, ref: dict, rel=1e-6):
    assert set(got) == set(ref), set(got) ^ set(ref)
    for k, r in ref.items():
        g = got[k]
        assert g.shape == r.shape and g.dtype == torch.float32, k
        assert (g - r).abs().max() <= rel * r.abs().max(), k


# ---- the real fixtures ----

@pytest.mark.parametrize("route", ["folder", "tag", "tag-dir"])
@pytest.mark.parametrize("case", DS_CASES)
def test_export_equals_zero_to_fp32(tmp_path, case, route):
    ckpt = FIXTURES / case / "ckpt"
    if route == "folder":
        kw, path = {}, ckpt
    elif route == "tag":
        kw, path = {"tag": "global_step4"}, ckpt
    else:
        kw, path = {}, ckpt / "global_step4"
    src = open_checkpoint(path, **kw)
    # ZeRO-2 and ZeRO-3 with gathering also wrote complete HF weights: those are read unless --tag asks
    gathered = case in ("ds_z2_ws2", "ds_z3_gather_ws1") and route == "folder"
    assert src.kind == ("hf" if gathered else "deepspeed")
    rlexport.export(path, tmp_path / "out", dtype="float32", **kw)
    assert_close(load_folder(tmp_path / "out"), load_file(FIXTURES / case / "reference.safetensors"))
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["torch_dtype"] == "float32"
    assert {"tokenizer.json", "chat_template.jinja", "generation_config.json"} <= {
        p.name for p in (tmp_path / "out").iterdir()}
    assert "deepspeed" not in sys.modules


def test_reader_reports_stage_and_world_size():
    from rlexport.formats.deepspeed.zero import read_zero
    for case, stage, world in (("ds_z3_nogather_ws2", 3, 2), ("ds_z2_ws2", 2, 2), ("ds_z3_gather_ws1", 3, 1)):
        z = read_zero(FIXTURES / case / "ckpt" / "global_step4")
        assert (z.stage, z.world_size, z.ds_version) == (stage, world, "0.16.9")
        assert z.refs[0].name == "model.embed_tokens.weight" and z.refs[-1].name == "lm_head.weight"  # module order


def test_default_dtype_is_the_base_dtype_not_fp32(tmp_path):
    ckpt = FIXTURES / "ds_z3_nogather_ws2" / "ckpt"
    # config.json says float32 (the trainer's upcast): without a base, bfloat16
    r = rlexport.export(ckpt, tmp_path / "a")
    assert r.dtype == "bfloat16"
    assert {v.dtype for v in load_folder(tmp_path / "a").values()} == {torch.bfloat16}
    # with --base, the base's own torch_dtype
    base = tmp_path / "base16"
    base.mkdir()
    cfg = json.loads((BASE / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**cfg, "torch_dtype": "float16"}))
    r = rlexport.export(ckpt, tmp_path / "b", base=base)
    assert r.dtype == "float16"
    assert json.loads((tmp_path / "b" / "config.json").read_text())["torch_dtype"] == "float16"
    r = rlexport.export(ckpt, tmp_path / "c", base=BASE)
    assert r.dtype == "bfloat16"


def test_no_config_json_needs_base(tmp_path):
    case = copy_fixture("ds_z3_nogather_ws1", tmp_path)
    (case / "ckpt" / "config.json").unlink()
    with pytest.raises(rlexport.RlexportError) as e:
        rlexport.export(case / "ckpt", tmp_path / "out")
    assert e.value.code == "missing-config" and "--base" in e.value.hint
    assert not (tmp_path / "out").exists()
    rlexport.export(case / "ckpt", tmp_path / "out", base=BASE, dtype="float32")
    assert_close(load_folder(tmp_path / "out"), load_file(case / "reference.safetensors"))


def test_tag_choice_and_errors(tmp_path):
    case = copy_fixture("ds_z3_nogather_ws2", tmp_path)
    ckpt = case / "ckpt"
    shutil.copytree(ckpt / "global_step4", ckpt / "global_step2")
    src = open_checkpoint(ckpt)  # latest says global_step4
    assert Path(src.weights[0].origin).parent.name == "global_step4"
    assert any(p.path.name == "global_step2" and "--tag global_step2" in p.note for p in src.pieces)
    assert Path(open_checkpoint(ckpt, tag="global_step2").weights[0].origin).parent.name == "global_step2"
    for tag, code in (("global_step9", "tag-not-found"), ("../x", "bad-tag"), ("..", "bad-tag")):
        with pytest.raises(rlexport.RlexportError) as e:
            open_checkpoint(ckpt, tag=tag)
        assert e.value.code == code
    (ckpt / "latest").unlink()
    with pytest.raises(rlexport.RlexportError) as e:
        open_checkpoint(ckpt)
    assert e.value.code == "several-tags" and "--tag" in e.value.hint
    (ckpt / "latest").write_text("global_step7")
    with pytest.raises(rlexport.RlexportError) as e:
        open_checkpoint(ckpt)
    assert e.value.code == "tag-not-found"


def test_missing_rank_file_is_refused(tmp_path):
    case = copy_fixture("ds_z3_nogather_ws2", tmp_path)
    (case / "ckpt" / "global_step4" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(rlexport.RlexportError) as e:
        rlexport.export(case / "ckpt", tmp_path / "out")
    assert e.value.code == "corrupt-deepspeed" and "2 ranks" in e.value.message
    assert not (tmp_path / "out").exists()


def test_truncated_partition_is_refused(tmp_path):
    case = copy_fixture("ds_z3_nogather_ws1", tmp_path)
    f = case / "ckpt" / "global_step4" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    f.write_bytes(f.read_bytes()[:200_000])
    with pytest.raises(rlexport.RlexportError) as e:
        rlexport.export(case / "ckpt", tmp_path / "out")
    assert e.value.code == "corrupt-pickle"
    assert not (tmp_path / "out").exists()


def test_placeholder_weights_beside_a_raw_checkpoint_are_read_from_it(tmp_path):
    """A ZeRO-3 save_pretrained without gathering wrote [0] tensors; the raw checkpoint beside holds the real ones."""
    case = copy_fixture("ds_z3_nogather_ws1", tmp_path)
    ckpt = case / "ckpt"
    ref = load_file(case / "reference.safetensors")
    save_file({k: torch.empty(0) for k in ref}, ckpt / "model.safetensors", {"format": "pt"})
    assert open_checkpoint(ckpt).kind == "deepspeed"
    rlexport.export(ckpt, tmp_path / "out", dtype="float32")
    assert_close(load_folder(tmp_path / "out"), ref)
    # the same placeholders in a run folder whose raw checkpoint is in checkpoint-N/: refused, pointing at it
    run = tmp_path / "run"
    run.mkdir()
    for f in ("config.json", "model.safetensors", *TOKENIZER_FILES):
        shutil.copy(ckpt / f, run / f)
    shutil.copytree(ckpt, run / "checkpoint-4")
    (run / "checkpoint-4" / "model.safetensors").unlink()
    src = open_checkpoint(run)
    assert src.kind == "hf"
    assert [p.path for p in src.pieces if p.kind == "raw-checkpoint"] == [run / "checkpoint-4"]
    with pytest.raises(rlexport.RlexportError) as e:
        rlexport.export(run, tmp_path / "out2")
    assert e.value.code == "zero3-placeholder"
    report = rlexport.inspect(run)
    assert "zero3-placeholder" in {f["code"] for f in report["findings"]}
    assert any(p["kind"] == "raw-checkpoint" and "rlexport export" in p["note"] for p in report["pieces"])


def test_inspect_a_raw_checkpoint():
    report = rlexport.inspect(FIXTURES / "ds_z3_nogather_ws2" / "ckpt")
    assert report["format"] == "deepspeed" and report["complete"] and report["targets"] == ["policy"]
    assert report["architecture"] == "Qwen2ForCausalLM" and report["tensors"]["base"]["count"] == 27
    assert report["scanned"]


def cli(capsys, *args) -> tuple[int, str, str]:
    """`rlexport ARGS` in this process (a subprocess costs seconds of imports): (exit code, stdout, stderr)."""
    from rlexport.cli import main
    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_tag(tmp_path, capsys):
    ckpt = FIXTURES / "ds_z2_ws2" / "ckpt"
    code, _, err = cli(capsys, "export", ckpt, "--tag", "global_step4", "--out", tmp_path / "out", "--quiet",
                       "--dtype", "float32")
    assert code == 0, err
    assert_close(load_folder(tmp_path / "out"), load_file(FIXTURES / "ds_z2_ws2" / "reference.safetensors"))
    code, out, err = cli(capsys, "inspect", ckpt, "--tag", "global_step4", "--json")
    assert code == 0, err
    assert json.loads(out)["format"] == "deepspeed"
    code, _, err = cli(capsys, "export", ckpt, "--tag", "global_step5", "--out", tmp_path / "out2")
    assert code == 2 and err.startswith("error[tag-not-found]: ") and len(err.strip().splitlines()) == 1


# ---- no code from a checkpoint ever runs ----

class _CreatesAFile:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("victim", ["zero_pp_rank_1_mp_rank_00_optim_states.pt",
                                    "zero_pp_rank_0_mp_rank_00_model_states.pt"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, capsys, victim):
    case = copy_fixture("ds_z3_nogather_ws2", tmp_path)
    marker = tmp_path / "pwned"
    evil = case / "ckpt" / "global_step4" / victim
    torch.save({"optimizer_state_dict": _CreatesAFile(marker), "module": {}, "param_shapes": []}, evil)
    code, _, err = cli(capsys, "export", case / "ckpt", "--out", tmp_path / "out")
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error[unsafe-pickle]: ") and "open" in lines[0], err
    assert victim in lines[0] and "nothing in it was run" in lines[0]
    with pytest.raises(rlexport.RlexportError) as e:
        rlexport.inspect(case / "ckpt")
    assert e.value.code == "unsafe-pickle"
    assert not marker.exists() and not (tmp_path / "out").exists()
    torch.load(evil, weights_only=False)  # the file really is malicious: an unsafe load creates the file
    assert marker.exists()


def test_unknown_class_under_our_own_name_is_refused(tmp_path):
    """Only DeepSpeed's names are allowlisted, not rlexport's stand-ins under their own module path."""
    from rlexport.formats.pickles import ZeroStageEnum, load_pt
    f = tmp_path / "x.pt"
    torch.save({"zero_stage": ZeroStageEnum.weights}, f)
    with pytest.raises(rlexport.RlexportError) as e:
        load_pt(f)
    assert e.value.code == "unsafe-pickle"


def test_malicious_trl_value_head_bin_is_refused(tmp_path):
    case = copy_fixture("trl_vhead_lora", tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"v_head.summary.weight": _CreatesAFile(marker)}, case / "ckpt" / "pytorch_model.bin")
    with pytest.raises(rlexport.RlexportError) as e:
        rlexport.export(case / "ckpt", tmp_path / "out", base=BASE, target="value")
    assert e.value.code == "unsafe-pickle" and not marker.exists()


# ---- synthetic checkpoints: the same pickled structure DeepSpeed writes, built with torch.save ----

def _pad_split(t: torch.Tensor, world: int) -> list[torch.Tensor]:
    flat = t.detach().float().reshape(-1) if t.dtype == torch.float32 else t.detach().reshape(-1)
    per = math.ceil(flat.numel() / world)
    flat = torch.cat([flat, flat.new_zeros(per * world - flat.numel())])
    return list(flat.split(per))


def write_zero(tag_dir: Path, groups: list[OrderedDict], *, stage: int, world: int, frozen: OrderedDict = None,
               shared: dict = None, buffers: dict = None, sub_group: int | None = None, module_order=None) -> Path:
    """A DeepSpeed ZeRO-`stage` tag folder for params `groups` (one OrderedDict per param group), fp32 masters."""
    tag_dir.mkdir(parents=True)
    frozen, shared, buffers = frozen or OrderedDict(), shared or {}, buffers or {}
    shapes = [OrderedDict((n, torch.Size(p.shape)) for n, p in g.items()) for g in groups]
    names = module_order or [n for g in groups for n in g] + list(frozen)
    common = {"buffer_names": list(buffers), "param_shapes": shapes, "shared_params": shared,
              "frozen_param_shapes": OrderedDict((n, torch.Size(p.shape)) for n, p in frozen.items()),
              "ds_version": "0.16.9", "dp_world_size": world, "mp_world_size": 1, "optimizer": None}
    if stage == 3:
        for r in range(world):
            module = OrderedDict((n, torch.empty(0)) for n in names)
            module.update(buffers)
            frags = OrderedDict((n, _pad_split(p, world)[r].clone()) for n, p in frozen.items())
            torch.save({**common, "module": module, "frozen_param_fragments": frags},
                       tag_dir / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")
            flat = torch.cat([_pad_split(p, world)[r] for g in groups for p in g.values()])
            parts = list(flat.split(sub_group)) if sub_group else [flat]
            torch.save({"optimizer_state_dict": {"zero_stage": 3, "partition_count": world, "loss_scaler": None,
                                                 "optimizer_state_dict": {"state": {}, "param_groups": []},
                                                 "fp32_flat_groups": [p.clone() for p in parts]},
                        "ds_version": "0.16.9"}, tag_dir / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    else:
        full = {n: p for g in groups for n, p in g.items()}
        full.update(frozen)
        module = OrderedDict((n, full[n].detach().clone()) for n in names)
        module.update(buffers)
        torch.save({**common, "module": module, "frozen_param_fragments": OrderedDict(
            (n, p.detach().clone()) for n, p in frozen.items())}, tag_dir / "mp_rank_00_model_states.pt")
        flats = []
        for g in groups:
            flat = torch.cat([p.detach().float().reshape(-1) for p in g.values()])
            n = 2 * world * math.ceil(flat.numel() / (2 * world))
            flats.append(list(torch.cat([flat, flat.new_zeros(n - flat.numel())]).split(n // world)))
        for r in range(world):
            torch.save({"optimizer_state_dict": {"zero_stage": stage, "partition_count": [world] * len(groups),
                                                 "single_partition_of_fp32_groups": [f[r].clone() for f in flats],
                                                 "base_optimizer_state": {}, "group_paddings": [0] * len(groups)}},
                       tag_dir / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    (tag_dir.parent / "latest").write_text(tag_dir.name)
    return tag_dir


def _trained(base: Path, seed=5) -> OrderedDict:
    torch.manual_seed(seed)
    sd = load_file(base / "model.safetensors")
    return OrderedDict((k, v.float() + torch.randn(v.shape) * 0.01) for k, v in sd.items())


def _ckpt_dir(tmp_path: Path, base: Path, name="ckpt") -> Path:
    ckpt = tmp_path / name
    ckpt.mkdir()
    for f in base.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, ckpt / f.name)
    return ckpt


def _split_groups(sd: OrderedDict) -> list[OrderedDict]:
    # like the HF Trainer's weight-decay split: matrices, then vectors (param_shapes order != module order)
    return [OrderedDict((k, v) for k, v in sd.items() if v.dim() > 1),
            OrderedDict((k, v) for k, v in sd.items() if v.dim() == 1)]


@pytest.mark.parametrize("stage,world,sub_group", [(3, 3, None), (3, 3, 7777), (3, 4, 1000), (2, 3, None),
                                                   (1, 4, None)])
def test_synthetic_world_sizes_with_padding(tmp_path, tiny_base, stage, world, sub_group):
    sd = _trained(tiny_base)
    ckpt = _ckpt_dir(tmp_path, tiny_base)
    write_zero(ckpt / "global_step3", _split_groups(sd), stage=stage, world=world, sub_group=sub_group,
               module_order=list(sd))
    src = open_checkpoint(ckpt)
    assert src.kind == "deepspeed" and [r.name for r in src.weights] == list(sd)  # module order
    rlexport.export(ckpt, tmp_path / "out", dtype="float32")
    assert_close(load_folder(tmp_path / "out"), dict(sd), rel=0)
    r = rlexport.export(ckpt, tmp_path / "bf", force=True)
    assert r.dtype == "bfloat16"  # the tiny base's dtype (its config says bfloat16)


@pytest.mark.parametrize("stage", [2, 3])
def test_synthetic_frozen_shared_and_buffers(tmp_path, tiny_base, stage):
    from rlexport.formats.deepspeed.zero import read_zero
    sd = _trained(tiny_base)
    frozen = OrderedDict((k, sd.pop(k)) for k in list(sd) if "layers.0." in k)
    head = sd.pop("lm_head.weight")
    buf = {"model.extra_buffer": torch.arange(6, dtype=torch.float32)}
    tag = write_zero(tmp_path / "ckpt" / "global_step1", _split_groups(sd), stage=stage, world=3, frozen=frozen,
                     shared={"lm_head.weight": "model.embed_tokens.weight"}, buffers=buf)
    got = {r.name: r.load() for r in read_zero(tag).refs}
    want = {**sd, **frozen, "lm_head.weight": sd["model.embed_tokens.weight"], **buf}
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert not torch.equal(head, got["lm_head.weight"])


@pytest.mark.parametrize("prefix", ["pretrained_model.", "module.pretrained_model."])
def test_synthetic_trl_wrapper_under_zero3(tmp_path, tiny_base, prefix):
    """TRL's AutoModelForCausalLMWithValueHead trained under DeepSpeed: engine names carry the wrapper."""
    sd = _trained(tiny_base)
    head = OrderedDict([("v_head.summary.weight", torch.randn(1, 128) * 0.1), ("v_head.summary.bias",
                                                                             torch.tensor([2.5]))])
    wrapped = OrderedDict((prefix + k, v) for k, v in sd.items())
    wrapped.update((prefix.replace("pretrained_model.", "") + k, v) for k, v in head.items())
    ckpt = _ckpt_dir(tmp_path, tiny_base)
    write_zero(ckpt / "global_step2", _split_groups(wrapped), stage=3, world=2)
    src = open_checkpoint(ckpt)
    assert src.targets == ("policy", "value") and src.producer == "trl"
    rlexport.export(ckpt, tmp_path / "policy", dtype="float32")
    assert_close(load_folder(tmp_path / "policy"), dict(sd), rel=0)
    rlexport.export(ckpt, tmp_path / "value", target="value", dtype="float32")
    got = load_folder(tmp_path / "value")
    assert torch.equal(got["score.weight"], head["v_head.summary.weight"])
    assert torch.equal(got["score.bias"], head["v_head.summary.bias"])
    assert "lm_head.weight" not in got


@pytest.mark.parametrize("with_frozen", [True, False])
def test_synthetic_peft_model_under_zero3(tmp_path, tiny_base, with_frozen):
    """A PeftModel trained under ZeRO-3 without gathering (the adapter file is empty): the LoRA factors come
    from the raw checkpoint and are merged into the base, like PEFT's merge_and_unload."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                  init_lora_weights=False))
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.05)
    params = OrderedDict((n, p.detach().clone()) for n, p in peft_model.named_parameters() if p.requires_grad)
    frozen = OrderedDict((n, p.detach().clone()) for n, p in peft_model.named_parameters()
                         if not p.requires_grad) if with_frozen else None
    ckpt = tmp_path / "ckpt"
    peft_model.save_pretrained(ckpt)
    cfg = json.loads((ckpt / "adapter_config.json").read_text())
    (ckpt / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(tiny_base)}))
    save_file({k: torch.empty(0) for k in load_file(ckpt / "adapter_model.safetensors")},
              ckpt / "adapter_model.safetensors")  # huggingface/trl#4416: ZeRO-3 wrote [0] tensors
    write_zero(ckpt / "global_step2", [params], stage=3, world=2, frozen=frozen)
    src = open_checkpoint(ckpt)
    assert src.kind == "deepspeed" and src.adapter is not None and src.base_dir == Path(tiny_base).resolve()
    rlexport.export(ckpt, tmp_path / "out", dtype="float32")
    want = {k: v for k, v in peft_model.merge_and_unload().state_dict().items()}
    assert_close(load_folder(tmp_path / "out"), want)
