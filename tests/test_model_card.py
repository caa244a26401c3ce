"""model_card.py: every export's README.md is a model card the Hugging Face Hub reads (huggingface_hub's own parser),
with the provenance, the serve command and the trainer's card kept below it; --verify records its verdict."""
from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner
from huggingface_hub import ModelCard
from huggingface_hub.repocard import metadata_load

import rlexport
from factories import FIXTURES
from rlexport.cli import cli
from rlexport.model_card import VERIFY_ROW, hub_id, record_verdict

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: conftest.one_thread


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """LLaMA-Factory PPO LoRA: adapter r=8/alpha=16 merged, the trainer's PEFT card in the checkpoint."""
    return rlexport.export(FIXTURES / "lf_ppo_lora_qwen2" / "ckpt", tmp_path_factory.mktemp("card") / "policy").out


def card(folder) -> ModelCard:
    return ModelCard.load(folder / "README.md")  # the Hub's parser: front matter -> CardData, the rest -> text


def test_policy_card_is_what_the_hub_reads(policy):
    c = card(policy)
    assert c.data.library_name == "transformers" and c.data.pipeline_tag == "text-generation"
    assert c.data.tags == ["rlexport", "llama-factory", "ppo"]
    assert c.data.base_model is None  # the adapter names a local base (../base): no Hub id to claim
    assert metadata_load(policy / "README.md") == c.data.to_dict()
    text = c.text
    for fact in ("`peft` checkpoint written by LLaMA-Factory, stage ppo", "LoRA, r=8, alpha=16",
                 "| dtype | bfloat16 |", "| quantization | none |", f"| rlexport | {rlexport.__version__} |",
                 f"{VERIFY_ROW} not run at export time |", "vllm serve MODEL\n"):
        assert fact in text, fact


def test_the_trainers_card_is_kept_below_without_its_front_matter(policy):
    mine = (policy / "README.md").read_text()
    theirs = (FIXTURES / "lf_ppo_lora_qwen2" / "ckpt" / "README.md").read_text()
    assert theirs.startswith("---") and "library_name: peft" in theirs
    assert mine.count("\n---\n") == 1 and "library_name: peft" not in mine  # one front matter: ours
    body = theirs.split("---", 2)[2].strip()
    assert mine.rstrip().endswith(body) and "## The trainer's model card" in mine


def test_value_card(tmp_path):
    out = rlexport.export(FIXTURES / "openrlhf_critic_lora_qwen2" / "ckpt", tmp_path / "v", target="value",
                          dtype="float32").out
    c = card(out)
    assert c.data.pipeline_tag == "token-classification" and c.data.tags == ["rlexport", "openrlhf", "critic"]
    assert "`Qwen2ForTokenClassification`" in c.text and "--runner pooling" in c.text
    assert "| dtype | float32 |" in c.text


def test_hub_base_model_step_and_quantization(tmp_path):
    """An adapter trained on a Hub model (its id in adapter_config.json, the weights passed with --base), saved in
    a checkpoint-N folder, exported with --quantize."""
    ckpt = tmp_path / "run" / "checkpoint-40"
    shutil.copytree(FIXTURES / "lf_ppo_lora_qwen2" / "ckpt", ckpt, ignore=shutil.ignore_patterns("checkpoint-*"))
    cfg = json.loads((ckpt / "adapter_config.json").read_text())
    (ckpt / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "Qwen/Qwen2.5-0.5B"}))
    out = rlexport.export(ckpt, tmp_path / "out", base=FIXTURES / "lf_ppo_lora_qwen2" / "base", quantize="int8").out
    c = card(out)
    assert c.data.base_model == "Qwen/Qwen2.5-0.5B"
    assert "| step | 40 |" in c.text and "| quantization | int8 (W8A8, compressed-tensors `int-quantized`) |" in c.text


@pytest.mark.parametrize("name, want", [
    ("Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B"),
    ("../base", None),                      # a relative local path
    ("/models/qwen", None),                 # an absolute one
    ("org/a/b", None),
    ("qwen", None),                         # no org: a local folder name as often as a legacy Hub id
    ("org/bad--name", None),                # the Hub refuses '--' and '..'
    ("/cache/hub/models--Qwen--Qwen2.5-0.5B/snapshots/0123abc", "Qwen/Qwen2.5-0.5B"),  # a Hub cache snapshot
])
def test_hub_id(name, want):
    assert hub_id(name) == want


def test_export_verify_records_the_verdict_atomically(tmp_path):
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["export", str(FIXTURES / "lf_ppo_full_qwen2" / "ckpt"), "--out", str(out), "-q",
                                 "--verify", "none"])
    assert r.exit_code == 0, r.output
    c = card(out)  # still a valid card after the rewrite
    row = next(line for line in c.text.splitlines() if line.startswith(VERIFY_ROW))
    assert row.startswith(f"{VERIFY_ROW} passed (engine none;") and "pass" in row
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no temporary left
    # a failed verify is recorded too, naming the checks that failed
    assert record_verdict(out, {"ok": False, "failed": ["values"], "engine": "vllm", "checks": []})
    assert f"{VERIFY_ROW} FAILED: values (engine vllm;" in card(out).text
    (out / "README.md").write_text("# my own card\n")  # a card rlexport did not write is left alone
    assert not record_verdict(out, {"ok": True, "checks": []})
    assert (out / "README.md").read_text() == "# my own card\n"
