"""parallel.py's rules against the real engine (vLLM's CPU build runs TP=2 on two cores): the size rlexport
accepts is served with the training-time greedy tokens, the size it refuses is refused by vLLM too."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import rlexport
from conftest import expected
from factories import FIXTURES
from rlexport import parallel

pytestmark = pytest.mark.vllm
CASE = "lf_ppo_full_qwen2"


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return rlexport.export(FIXTURES / CASE / "ckpt", tmp_path_factory.mktemp("tp") / "out", dtype="float32").out


def probe(folder: Path, tp: int, extra: dict | None = None, case: str = CASE) -> dict:
    prompts = expected(case)["prompts"]
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("tp_probe.py")), str(folder), str(tp),
                           json.dumps(prompts), json.dumps(extra or {})], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    answer = [line for line in proc.stdout.splitlines() if line.startswith('{"accepted"')]  # vLLM logs too
    assert answer, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(answer[-1])


def test_a_size_rlexport_accepts_is_served_exactly(export):
    config = json.loads((export / "config.json").read_text())
    assert parallel.refusals(config, 2) == []
    got = probe(export, 2)
    assert got["accepted"] and got["greedy"] == expected(CASE)["policy"]["greedy"]


def test_a_size_rlexport_refuses_is_refused_by_vllm(export):
    config = json.loads((export / "config.json").read_text())
    assert parallel.refusals(config, 4)[0].startswith("attention heads = 2")
    got = probe(export, 4)
    assert not got["accepted"] and "divisible by tensor parallel size" in got["error"]


def test_the_rlexport_load_format_under_tensor_parallelism():
    """Each TP rank gets whole merged tensors from the plugin and slices them in its weight loaders: a LoRA run
    served over 2 ranks straight from its training checkpoint gives the training-time greedy tokens."""
    args = rlexport.vllm_args(FIXTURES / "lf_ppo_lora_qwen2" / "ckpt")
    got = probe(Path(args.pop("model")), 2, args, case="lf_ppo_lora_qwen2")
    assert got["accepted"] and got["greedy"] == expected("lf_ppo_lora_qwen2")["policy"]["greedy"]
