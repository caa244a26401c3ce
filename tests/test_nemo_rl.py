"""NeMo-RL policy checkpoints: the DTensor worker's DCP (fixture made by NeMo-RL 0.6.0's own saving code, FSDP2 world
size 2), the newer `weights/model/` safetensors layout and the Megatron backend's `iter_*` inside `policy/weights/`;
step folders as NeMo-RL's CheckpointManager finishes them (`tmp_step_N` -> `step_N`); config.yaml's
policy.model_name as the base when it resolves locally."""
from __future__ import annotations

import shutil

import pytest
import torch
import yaml
from safetensors.torch import save_file

import rlexport
from conftest import expected
from factories import FIXTURES, copy_fixture, open_error
from rlexport.formats import open_checkpoint, steps_of
from test_export import load_folder

CASE = "nemorl_dcp_policy_qwen2"
RUN = FIXTURES / CASE / "ckpt"
STEP = RUN / "step_4"
BASE = FIXTURES / CASE / "base"

pytestmark = pytest.mark.usefixtures("one_thread")


def test_export_serves_the_training_time_numbers_with_the_base_names(tmp_path):
    from transformers import AutoModelForCausalLM
    from rlexport.verify.numbers import policy_numbers
    out = rlexport.export(STEP, tmp_path / "out", dtype="float32", base=BASE).out
    exp = expected(CASE)
    got = load_folder(out)
    assert set(got) == set(exp["names"]) and all(v.dtype == torch.float32 for v in got.values())
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        num = policy_numbers(model, exp["prompts"], 12)
    assert max(abs(p - q) for x, y in zip(num.logprobs, exp["policy"]["logprobs"]) for p, q in zip(x, y)) < 1e-4
    assert num.greedy == exp["policy"]["greedy"]


@pytest.mark.parametrize("path,tag", [(RUN, None), (RUN, "step_4"), (RUN, "4"), (STEP, None)])
def test_run_or_step_folder(path, tag):
    src = open_checkpoint(path, base=BASE, tag=tag)
    assert (src.kind, src.producer, src.targets) == ("nemo-rl", "nemo-rl", ("policy",))
    assert src.tokenizer_dirs[0] == STEP / "policy" / "tokenizer" and len(src.weights) == 27
    assert "model.embed_tokens.weight" in {r.name for r in src.weights}  # one `model.` stripped


def test_unfinished_steps_are_listed_and_skipped(tmp_path):
    run = copy_fixture(CASE, tmp_path) / "ckpt"
    shutil.copytree(run / "step_4", run / "tmp_step_8")  # NeMo-RL renames it to step_8 when every rank is done
    found = steps_of(run)
    assert [(s.tag, s.complete) for s in found] == [("step_4", True), ("tmp_step_8", False)]
    assert "tmp_step_N" in found[1].why
    src = open_checkpoint(run, base=BASE)  # the newest complete step is read
    assert all(f"{run.name}/step_4/" in r.origin for r in src.weights)
    e = open_error(run / "tmp_step_8", base=BASE)
    assert e.code == "incomplete-checkpoint"
    shutil.rmtree(run / "step_4")
    assert open_error(run, base=BASE).code == "incomplete-checkpoint"


def test_model_name_is_the_base_when_it_resolves_locally(tmp_path):
    case = copy_fixture(CASE, tmp_path)
    cfg = case / "ckpt" / "step_4" / "config.yaml"
    data = yaml.safe_load(cfg.read_text())
    e = open_error(case / "ckpt" / "step_4")  # a hub id not in the local cache
    assert e.code == "missing-config" and "tiny-org/tiny-qwen2" in str(e) and "--base" in e.hint
    data["policy"]["model_name"] = str(case / "base")
    cfg.write_text(yaml.safe_dump(data))
    assert open_checkpoint(case / "ckpt" / "step_4").base_dir == (case / "base").resolve()


def test_the_safetensors_layout(tmp_path):
    """DTensor v2 / automodel: policy/weights/model/ with safetensors shards of the Hugging Face names."""
    src = open_checkpoint(STEP, base=BASE)
    state = {r.name: r.load() for r in src.weights}
    step = tmp_path / "step_4"
    (step / "policy" / "weights" / "model").mkdir(parents=True)
    save_file(state, step / "policy" / "weights" / "model" / "model.safetensors")
    shutil.copytree(STEP / "policy" / "tokenizer", step / "policy" / "tokenizer")
    got = open_checkpoint(step, base=BASE)
    assert got.kind == "nemo-rl" and {r.name: r.load() for r in got.weights}.keys() == state.keys()
    assert all(torch.equal(r.load(), state[r.name]) for r in got.weights)


def test_the_automodel_dcp_layout(tmp_path):
    """automodel's torch_save format: a DCP of the plain Hugging Face names under policy/weights/model/."""
    import torch.distributed.checkpoint as dcp
    state = {r.name: r.load() for r in open_checkpoint(STEP, base=BASE).weights}
    step = tmp_path / "step_4"
    dcp.save(state, checkpoint_id=step / "policy" / "weights" / "model", no_dist=True)
    got = {r.name: r.load() for r in open_checkpoint(step, base=BASE).weights}
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)


def test_the_megatron_backend_layout(tmp_path):
    """NeMo-RL's Megatron worker saves a Megatron-LM save root into policy/weights/."""
    mlm = FIXTURES / "megatron_lm_iter_qwen2"
    step = tmp_path / "step_10"
    shutil.copytree(mlm / "ckpt", step / "policy" / "weights")
    shutil.copytree(STEP / "policy" / "tokenizer", step / "policy" / "tokenizer")
    src = open_checkpoint(step, base=mlm / "base")
    assert (src.kind, src.producer) == ("nemo-rl", "nemo-rl")
    ref = rlexport.export(mlm / "ckpt", tmp_path / "a", dtype="float32", base=mlm / "base").out
    out = rlexport.export(step, tmp_path / "b", dtype="float32", base=mlm / "base").out
    a, b = load_folder(ref), load_folder(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_inspect_names_trainer_and_skipped_optimizer():
    report = rlexport.inspect(RUN, base=BASE)
    t = report["trainer"]
    assert report["format"] == "nemo-rl" and t["trainer"] == "NeMo-RL" and t["weights_format"] == "dcp"
    assert t["optimizer_state"]["read"] is False and t["optimizer_state"]["bytes"] > 3_000_000


def test_a_missing_distcp_file(tmp_path):
    run = copy_fixture(CASE, tmp_path) / "ckpt"
    (run / "step_4" / "policy" / "weights" / "__1_0.distcp").unlink()
    e = open_error(run, base=tmp_path / CASE / "base")
    assert e.code == "missing-file" and "__1_0.distcp" in str(e)
