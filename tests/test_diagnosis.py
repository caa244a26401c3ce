"""`rlexport inspect`: every finding code on a checkpoint that has the problem, and the JSON against its schema.

Broken checkpoints are made on the fly from writable copies of the committed fixtures (one small edit each).
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import jsonschema
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from test_verify import inputs
from factories import FIXTURES, copy_fixture, inputs, make_tiny_model
from rlexport.cli import cli
from rlexport.diagnosis import inspect
from rlexport.findings import CODES

DOCS = Path(__file__).resolve().parents[1] / "docs"
INSPECT_SCHEMA = json.loads((DOCS / "inspect.schema.json").read_text())


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: conftest.one_thread


def codes(report: dict) -> set[str]:
    return {f["code"] for f in report["findings"]}


def valid(report: dict) -> dict:
    jsonschema.validate(report, INSPECT_SCHEMA)
    return report


# --- the committed fixtures, as they are ---------------------------------------------------------------------------
@pytest.mark.parametrize("case, expected, absent", [
    # LoRA PPO: adapter + value head beside it, reward adapter in reward/, the qwen template's eos
    ("lf_ppo_lora_qwen2", {"adapter-needs-merge", "value-head-present", "reward-adapter-beside", "eos-mismatch"},
     {"fp32-weights", "reward-model"}),
    # full PPO: fp32 weights, value_head.safetensors beside model.safetensors (no index: vLLM would load it)
    ("lf_ppo_full_qwen2", {"fp32-weights", "value-head-present", "eos-mismatch"}, {"adapter-needs-merge"}),
    # reward model: offers only the value target
    ("lf_rm_lora_qwen2", {"reward-model", "value-head-present", "adapter-needs-merge"}, {"reward-adapter-beside"}),
])
def test_fixture_findings(case, expected, absent):
    report = valid(inspect(FIXTURES / case / "ckpt"))
    assert expected <= codes(report) and not absent & codes(report)
    assert report["complete"] and report["scanned"]
    assert report["vocab"] == {"config": 320, "embedding_rows": 320, "tokenizer": 320}
    head = next(f for f in report["findings"] if f["code"] == "value-head-present")
    if case == "lf_ppo_full_qwen2":  # the exact vLLM error for a folder it would load as is
        assert head["engine"] == "vLLM: ValueError: There is no module or parameter named 'v_head' in Qwen2ForCausalLM"
    assert set(report["targets"]) == ({"value"} if case == "lf_rm_lora_qwen2" else {"policy", "value"})
    assert report["head"]["role"] == ("reward" if case == "lf_rm_lora_qwen2" else "value")


def test_every_fixture_case_validates():
    """Every checkpoint in tests/fixtures (other engineers add cases) gives a schema-valid report; a fixture no
    reader detects fails (inspect raises unknown-format)."""
    for exp in sorted(FIXTURES.glob("*/expected.json")):
        case = exp.parent
        ckpt, base = inputs(case.name)
        report = inspect(ckpt, base=base)
        valid(report)
        if json.loads(exp.read_text()).get("reconstructible_from_ckpt") is False:
            assert not report["complete"]  # refused with the reason: a partial diagnosis
            continue
        assert report["complete"] and report["targets"]


def test_tensor_groups_and_bytes():
    report = inspect(FIXTURES / "lf_ppo_lora_qwen2" / "ckpt")
    groups = report["tensors"]
    assert groups["base"]["count"] == 27 and groups["base"]["dtypes"] == {"bfloat16": 27}
    assert groups["adapter"] == {"count": 28, "bytes": 131072, "dtypes": {"float32": 28},
                                 "files": ["adapter_model.safetensors"]}
    assert groups["head"]["count"] == 2 and groups["head"]["bytes"] == 516
    assert report["adapter"]["r"] == 8 and report["adapter"]["modules"] == 14


# --- broken checkpoints: one edit each ------------------------------------------------------------------------------
def _edit_weights(ckpt: Path, fn) -> None:
    f = ckpt / "model.safetensors"
    sd = load_file(f)
    fn(sd)
    save_file(sd, f, metadata={"format": "pt"})


def _edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def full(tmp: Path) -> Path:
    return copy_fixture("lf_ppo_full_qwen2", tmp) / "ckpt"


def lora(tmp: Path) -> Path:
    return copy_fixture("lf_ppo_lora_qwen2", tmp) / "ckpt"


def lora_alone(tmp: Path) -> Path:
    """The adapter folder without its base beside it (../base no longer resolves)."""
    shutil.copytree(FIXTURES / "lf_ppo_lora_qwen2" / "ckpt", tmp / "ckpt", ignore=shutil.ignore_patterns("check*"))
    return tmp / "ckpt"


def b_adapter_without_config(tmp):
    ckpt = lora_alone(tmp)
    (ckpt / "adapter_config.json").unlink()
    return ckpt, {}


def b_base_unresolved(tmp):
    return lora_alone(tmp), {}


def b_base_shape_mismatch(tmp):
    other = make_tiny_model(tmp / "other", hidden_size=192, num_attention_heads=3)
    return FIXTURES / "lf_ppo_lora_qwen2" / "ckpt", {"base": other}


def b_unsupported_peft_type(tmp):
    ckpt = lora_alone(tmp)
    _edit_json(ckpt / "adapter_config.json", lambda c: c.update(peft_type="PREFIX_TUNING"))
    return ckpt, {}


def b_zero3_placeholder(tmp):
    ckpt = full(tmp)
    _edit_weights(ckpt, lambda sd: sd.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(0)}))
    return ckpt, {}


def b_zero3_adapter(tmp):  # a 443-byte adapter: every LoRA tensor a [0] placeholder
    ckpt = lora_alone(tmp)
    f = ckpt / "adapter_model.safetensors"
    save_file({k: torch.zeros(0) for k in load_file(f)}, f)
    return ckpt, {}


def b_nonfinite(tmp):
    ckpt = full(tmp)
    _edit_weights(ckpt, lambda sd: sd["model.layers.1.mlp.down_proj.weight"].view(-1).__setitem__(7, float("nan")))
    return ckpt, {}


def b_fp16_overflow(tmp):
    ckpt = full(tmp)
    _edit_weights(ckpt, lambda sd: sd["model.norm.weight"].__setitem__(0, 1.0e5))
    return ckpt, {}


def b_vocab_resized(tmp):
    ckpt = full(tmp)
    _edit_json(ckpt / "config.json", lambda c: c.update(vocab_size=384))
    return ckpt, {}


def b_tokenizer_exceeds(tmp):
    ckpt = full(tmp)
    _edit_json(ckpt / "tokenizer.json", lambda t: t["added_tokens"].extend(
        {"id": 320 + i, "content": f"<|extra_{i}|>", "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True} for i in range(4)))
    return ckpt, {}


def b_tied_split(tmp):
    ckpt = full(tmp)
    _edit_json(ckpt / "config.json", lambda c: c.update(tie_word_embeddings=True))
    return ckpt, {}


def b_lm_head_missing(tmp):
    ckpt = full(tmp)
    _edit_weights(ckpt, lambda sd: sd.pop("lm_head.weight"))
    return ckpt, {}


def b_missing_tokenizer(tmp):
    ckpt = full(tmp)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (ckpt / f).unlink()
    return ckpt, {}


def b_missing_template(tmp):
    ckpt = full(tmp)
    (ckpt / "chat_template.jinja").unlink()
    return ckpt, {}


def b_missing_generation_config(tmp):
    ckpt = full(tmp)
    (ckpt / "generation_config.json").unlink()
    return ckpt, {}


def b_missing_eos(tmp):
    ckpt = full(tmp)
    _edit_json(ckpt / "tokenizer_config.json", lambda c: c.update(eos_token=None))
    return ckpt, {}


def b_remote_code(tmp):
    ckpt = full(tmp)
    _edit_json(ckpt / "config.json", lambda c: c.update(
        architectures=["TinyChatForCausalLM"],
        auto_map={"AutoModelForCausalLM": "modeling_tinychat.TinyChatForCausalLM"}))
    return ckpt, {}


def b_unknown_architecture(tmp):
    ckpt = full(tmp)
    _edit_json(ckpt / "config.json", lambda c: c.update(architectures=["TinyChatForCausalLM"]))
    return ckpt, {}


def b_optimizer_state(tmp):
    ckpt = full(tmp)
    (ckpt / "optimizer.pt").write_bytes(b"\0" * 4096)
    return ckpt, {}


def b_not_scanned(tmp):
    return FIXTURES / "lf_ppo_full_qwen2" / "ckpt", {"scan": False}


BROKEN = [  # (make the checkpoint, finding code it must produce, severity)
    (b_adapter_without_config, "adapter-without-config", "error"),
    (b_base_unresolved, "base-unresolved", "error"),
    (b_base_shape_mismatch, "base-shape-mismatch", "error"),
    (b_unsupported_peft_type, "unsupported-peft-type", "error"),
    (b_zero3_placeholder, "zero3-placeholder", "error"),
    (b_zero3_adapter, "zero3-placeholder", "error"),
    (b_nonfinite, "nonfinite-weights", "error"),
    (b_fp16_overflow, "fp16-overflow-risk", "warning"),
    (b_vocab_resized, "vocab-resized", "warning"),
    (b_tokenizer_exceeds, "tokenizer-exceeds-embedding", "error"),
    (b_tied_split, "tied-embeddings-split", "warning"),
    (b_lm_head_missing, "lm-head-missing", "error"),
    (b_missing_tokenizer, "missing-tokenizer", "error"),
    (b_missing_template, "missing-chat-template", "warning"),
    (b_missing_generation_config, "missing-generation-config", "info"),
    (b_missing_eos, "missing-eos", "warning"),
    (b_remote_code, "remote-code", "error"),
    (b_unknown_architecture, "unknown-architecture", "error"),
    (b_optimizer_state, "optimizer-state", "info"),
    (b_not_scanned, "values-not-scanned", "info"),
]


@pytest.mark.parametrize("make, code, severity", BROKEN, ids=[c for _, c, _ in BROKEN])
def test_broken_checkpoint_finding(tmp_path, make, code, severity):
    ckpt, kw = make(tmp_path)
    report = valid(inspect(ckpt, **kw))
    found = [f for f in report["findings"] if f["code"] == code]
    assert found, codes(report)
    assert found[0]["severity"] == severity and found[0]["message"] and found[0]["fix"]
    if severity == "error":
        assert found[0]["engine"], "an error finding says what the engine does"


def test_adapter_without_config_is_a_partial_report(tmp_path):
    ckpt, _ = b_adapter_without_config(tmp_path)
    report = inspect(ckpt)
    assert report["complete"] is False and report["tensors"]["adapter"]["count"] == 28
    f = next(f for f in report["findings"] if f["code"] == "adapter-without-config")
    assert f["engine"].startswith("PEFT: ValueError: Can't find 'adapter_config.json' at ")


def test_base_shape_mismatch_quotes_peft(tmp_path):
    ckpt, kw = b_base_shape_mismatch(tmp_path)
    f = next(f for f in inspect(ckpt, **kw)["findings"] if f["code"] == "base-shape-mismatch")
    m = re.fullmatch(r"PEFT: size mismatch for base_model\.model\.(.+)\.lora_([AB])\.default\.weight: copying a "
                     r"param with shape torch\.Size\((\[.+\])\) from checkpoint, the shape in current model is "
                     r"torch\.Size\((\[.+\])\)\.", f["engine"])
    assert m and "192" in m[4] and "192" not in m[3] and m[3] != m[4], f["engine"]


# --- the catalog, the docs and the CLI -------------------------------------------------------------------------------
def test_every_code_is_documented():
    doc = (DOCS / "findings.md").read_text()
    documented = set(re.findall(r"^### `([a-z0-9-]+)`", doc, re.M))
    assert documented == set(CODES)
    emitted = {code for _, code, _ in BROKEN} | {"adapter-needs-merge", "value-head-present", "reward-model",
                                                  "reward-adapter-beside", "eos-mismatch", "fp32-weights"}
    assert emitted <= set(CODES)
    # adapter-full-modules needs a modules_to_save adapter (test below); the reward-head codes need the OpenRLHF
    # fixtures (tests/test_value_heads.py)
    assert set(CODES) - emitted == {"adapter-full-modules", "reward-normalization", "head-not-saved"}


def test_adapter_full_modules(tmp_path):
    from factories import make_lora
    base = make_tiny_model(tmp_path / "base")
    ad = make_lora(tmp_path / "lora", base, targets=("q_proj",), modules_to_save=["lm_head"])
    assert "adapter-full-modules" in codes(valid(inspect(ad)))


def test_cli_inspect_json_and_table():
    runner = CliRunner()
    res = runner.invoke(cli, ["inspect", str(FIXTURES / "lf_ppo_lora_qwen2" / "ckpt"), "--json"])
    assert res.exit_code == 0, res.output
    report = valid(json.loads(res.output))
    assert report["format"] == "peft"
    res = runner.invoke(cli, ["inspect", str(FIXTURES / "lf_ppo_full_qwen2" / "ckpt"), "--no-scan"])
    assert res.exit_code == 0 and "fp32-weights" in res.output and "values-not-scanned" in res.output
