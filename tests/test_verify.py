"""`rlexport verify`: it passes on the export of every fixture and fails, naming the right check, on exports broken
on purpose. Engine: none or transformers here (tests/test_verify_vllm.py starts vLLM).

Each broken export is a copy of a good one with one edit, the way a hand-made export goes wrong.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import jsonschema
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from factories import FIXTURES, SHARED_BASE, inputs
import rlexport
from rlexport.cli import cli
from rlexport.verify import verify

SCHEMA = json.loads((Path(__file__).resolve().parents[1] / "docs" / "verify.schema.json").read_text())
def base_weights(case: str) -> Path:
    # a case's base/ may hold only the config and tokenizer (Megatron: --base for those): its weights are the
    # shared base's, which the case was trained from (its MANIFEST.md)
    for base in (inputs(case)[1], FIXTURES / case / "base", SHARED_BASE):
        if base is not None and (base / "model.safetensors").is_file():
            return base / "model.safetensors"
    raise AssertionError(f"{case}: no base weights")


def _cases() -> list[tuple[str, str]]:
    """(case, target) for every target of every fixture case in the repo (expected.json's targets)."""
    out = []
    for exp in sorted(FIXTURES.glob("*/expected.json")):
        data = json.loads(exp.read_text())
        if data.get("reconstructible_from_ckpt") is False:
            continue  # the trainer never saved what the numbers need: refused (test_value_heads.py)
        out += [(exp.parent.name, t) for t in data["targets"]]
    return out


TARGETS = _cases()


# Every case runs: a fixture no reader detects fails here (a format that stops being detected is a regression)
EXPORTS = [pytest.param(c, t, id=f"{c}-{t}") for c, t in TARGETS]


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """case, target -> the folder rlexport export wrote (made once per session, read-only for tests)."""
    root, made = tmp_path_factory.mktemp("exports"), {}

    def get(case: str, target: str) -> Path:
        if (case, target) not in made:
            out = root / f"{case}-{target}"
            ckpt, base = inputs(case)
            rlexport.export(ckpt, out, base=base, target=target)
            made[case, target] = out
        return made[case, target]
    return get


def against(case: str) -> dict:
    ckpt, base = inputs(case)
    return {"against": ckpt, "base": base}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: conftest.one_thread


def folder_dtype(folder: Path) -> str:
    dtype = json.loads((folder / "config.json").read_text())["dtype"]
    assert dtype in ("bfloat16", "float32")
    return dtype


def broken_copy(exported, tmp_path, case, target, brk) -> Path:
    out = tmp_path / f"{case}-{target}-{brk}"
    shutil.copytree(exported(case, target), out)
    BREAKS[brk][0](out, case)
    return out


def ok_report(report) -> None:
    assert report.ok, [(c.name, c.summary, c.details) for c in report.checks if c.status == "fail"]


# --- breaking an export ----------------------------------------------------------------------------------------------
def _load(folder: Path) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    sd = {}
    for f in sorted(set(index["weight_map"].values())):
        sd.update(load_file(folder / f))
    return sd


def _save(folder: Path, sd: dict[str, torch.Tensor]) -> None:
    for f in folder.glob("model-*.safetensors"):
        f.unlink()
    name = "model-00001-of-00001.safetensors"
    save_file(sd, folder / name, metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(t.nbytes for t in sd.values())}, "weight_map": {k: name for k in sd}}))


def unmerged_adapter(folder: Path, case: str) -> None:
    """The base's weights where the trained ones belong: the merge (or the full weights) never made it in."""
    base = load_file(base_weights(case))
    _save(folder, {k: base[k].to(v.dtype) if k in base else v for k, v in _load(folder).items()})


def v_head_left_in(folder: Path, case: str) -> None:
    sd = _load(folder)
    emb = sd["model.embed_tokens.weight"]
    g = torch.Generator().manual_seed(0)
    head = {"v_head.summary.weight": torch.randn(1, emb.shape[1], generator=g), "v_head.summary.bias": torch.ones(1)}
    _save(folder, {**sd, **{k: v.to(emb.dtype) for k, v in head.items()}})


def bias_dropped(folder: Path, case: str) -> None:
    sd = _load(folder)
    del sd["model.layers.0.self_attn.q_proj.bias"]
    _save(folder, sd)


def wrong_eos(folder: Path, case: str) -> None:
    """generation_config with another eos than the model's (for the qwen-template cases: back to the pretraining
    <|endoftext|> (0) while turns end with <|im_end|> (2))."""
    from transformers import AutoTokenizer
    eos = AutoTokenizer.from_pretrained(folder).eos_token_id
    gen = json.loads((folder / "generation_config.json").read_text())
    gen["eos_token_id"] = 0 if eos != 0 else 1
    (folder / "generation_config.json").write_text(json.dumps(gen))


def other_vocab(folder: Path, case: str) -> None:
    """A tokenizer of another vocabulary of the same size: every non-special id means another piece."""
    tj = json.loads((folder / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    ids = sorted(v for v in vocab.values() if v >= 3)
    perm = dict(zip(ids, reversed(ids)))
    tj["model"]["vocab"] = {k: perm.get(v, v) for k, v in vocab.items()}
    (folder / "tokenizer.json").write_text(json.dumps(tj))


def layer_swapped(folder: Path, case: str) -> None:
    def swap(k: str) -> str:
        return k.replace("layers.0.", "layers.@.").replace("layers.1.", "layers.0.").replace("layers.@.", "layers.1.")
    _save(folder, {swap(k): v for k, v in _load(folder).items()})


def fp16_passage(folder: Path, case: str) -> None:
    """bfloat16 weights cast to float16 and back: the classic `.half()` somewhere in the pipeline."""
    _save(folder, {k: v.to(torch.float16).to(v.dtype) if v.is_floating_point() else v
                   for k, v in _load(folder).items()})


# break -> (edit, the check that must fail for a policy export, for a value export (None: not applicable))
BREAKS = {
    "unmerged-adapter": (unmerged_adapter, "logprobs", "scores"),
    "v-head-left-in": (v_head_left_in, "tensor-names", "tensor-names"),
    "bias-dropped": (bias_dropped, "tensor-names", "tensor-names"),
    "wrong-eos": (wrong_eos, "eos", None),  # a scoring model does not generate
    "other-vocab": (other_vocab, "tokenizer", "tokenizer"),
    "layer-swapped": (layer_swapped, "weights", "weights"),
    "fp16-passage": (fp16_passage, "values", "values"),
}


def _applies(case: str, brk: str) -> bool:
    """bias-dropped needs a biased q_proj (Qwen2); Qwen3 / Qwen3-MoE attention has none to drop."""
    if brk != "bias-dropped":
        return True
    from safetensors import safe_open
    if not (FIXTURES / case / "base" / "model.safetensors").is_file():  # the case's config says (Qwen3: no bias)
        found = sorted((FIXTURES / case).rglob("config.json"))
        cfg = json.loads(found[0].read_text()) if found else {}
        return not str(cfg.get("model_type", "")).startswith("qwen3") or bool(cfg.get("attention_bias"))
    with safe_open(base_weights(case), "pt") as f:
        return "model.layers.0.self_attn.q_proj.bias" in f.keys()


BROKEN = [pytest.param(case, target, brk, id=f"{case}-{target}-{brk}")
          for case, target in TARGETS for brk in BREAKS if BREAKS[brk][1 if target == "policy" else 2]
          and _applies(case, brk)]


# --- the export of every fixture passes; each break fails the right check --------------------------------------------
@pytest.mark.parametrize("case, target", EXPORTS)
def test_export_passes(exported, case, target):
    report = verify(exported(case, target), **against(case), engine="none")
    ok_report(report)
    ran = {c.name for c in report.checks if c.status == "pass"}
    numbers = {"weights", "logprobs", "greedy"} if target == "policy" else {"weights", "scores"}
    assert numbers <= ran and {"files", "tensor-names", "tensor-shapes", "values", "tokenizer"} <= ran
    # verify reads the dtype from the weights; the export's config.json declares it (--dtype auto: bfloat16, or a
    # float32 base's float32, kept: the OpenRLHF LoRA critic's base is the reward model its trainer saved on CPU)
    assert report.target == target and report.dtype == folder_dtype(exported(case, target))


@pytest.mark.parametrize("case, target, brk", BROKEN)
def test_broken_export_fails(exported, tmp_path, case, target, brk):
    folder = broken_copy(exported, tmp_path, case, target, brk)
    report = verify(folder, **against(case), engine="none")
    want = BREAKS[brk][1 if target == "policy" else 2]
    if brk == "fp16-passage" and folder_dtype(exported(case, target)) == "float32":
        want = "weights"  # "values" spots bfloat16 weights that went through float16; float32 ones differ instead
    assert not report.ok and want in report.failed(), report.failed()
    assert report.check(want).details or report.check(want).summary


def test_what_each_break_says(exported, tmp_path):
    """The evidence names the cause (on the LoRA policy export)."""
    def failing(brk, check):
        folder = broken_copy(exported, tmp_path, "lf_ppo_lora_qwen2", "policy", brk)
        c = verify(folder, against=FIXTURES / "lf_ppo_lora_qwen2" / "ckpt", engine="none").check(check)
        return c.summary + "\n" + "\n".join(c.details)
    text = failing("v-head-left-in", "tensor-names")
    assert "leftover v_head.summary.weight (a value head left in)" in text
    assert "There is no module or parameter named 'v_head' in Qwen2ForCausalLM" in text
    assert "missing model.layers.0.self_attn.q_proj.bias (a bias dropped)" in failing("bias-dropped", "tensor-names")
    assert "never stops on '<|im_end|>' (id 2" in failing("wrong-eos", "eos")
    assert "differ from the training tokenizer" in failing("other-vocab", "tokenizer")
    assert "model.layers.0." in failing("layer-swapped", "weights")
    assert "passed through float16" in failing("fp16-passage", "values")


def test_structure_alone_catches_what_it_can(exported, tmp_path):
    """Without --against: leftovers, a too-large tokenizer and adapter files left in the folder."""
    folder = broken_copy(exported, tmp_path, "lf_ppo_lora_qwen2", "policy", "v-head-left-in")
    assert verify(folder, engine="none").failed() == ["tensor-names"]
    big = tmp_path / "big-vocab"
    shutil.copytree(exported("lf_ppo_lora_qwen2", "policy"), big)
    extra = {320 + i: {"content": f"<|x{i}|>", "single_word": False, "lstrip": False, "rstrip": False,
                       "normalized": False, "special": True} for i in range(3)}
    tj, tc = (json.loads((big / f).read_text()) for f in ("tokenizer.json", "tokenizer_config.json"))
    tj["added_tokens"] += [{"id": i, **spec} for i, spec in extra.items()]
    tc["added_tokens_decoder"].update({str(i): spec for i, spec in extra.items()})
    (big / "tokenizer.json").write_text(json.dumps(tj))
    (big / "tokenizer_config.json").write_text(json.dumps(tc))
    report = verify(big, engine="none")
    assert "tokenizer" in report.failed() and "323 tokens" in report.check("tokenizer").summary
    left = tmp_path / "adapter-left"
    shutil.copytree(exported("lf_ppo_lora_qwen2", "policy"), left)
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(FIXTURES / "lf_ppo_lora_qwen2" / "ckpt" / f, left / f)
    report = verify(left, engine="none")
    assert report.failed() == ["files"] and "adapter_config.json" in report.check("files").summary
    skipped = {c.name for c in report.checks if c.status == "skip"}
    assert {"weights", "logprobs", "greedy", "scores", "engine-load", "engine-parity"} <= skipped


# --- value (classifier) folders, independent of the exporter ----------------------------------------------------------
def classifier_folder(policy: Path, head_file: Path, out: Path, arch: str) -> Path:
    """A value export made by hand from a policy export and the trainer's value head (score = v_head.summary)."""
    shutil.copytree(policy, out)
    sd = _load(out)
    dtype = sd.pop("lm_head.weight").dtype
    head = load_file(head_file)
    sd["score.weight"], sd["score.bias"] = (head[f"v_head.summary.{p}"].to(dtype) for p in ("weight", "bias"))
    _save(out, sd)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(architectures=[arch], num_labels=1, problem_type="regression", id2label={"0": "LABEL_0"},
               label2id={"LABEL_0": 0})
    (out / "config.json").write_text(json.dumps(cfg))
    (out / "generation_config.json").unlink()
    return out


@pytest.mark.parametrize("arch", ["Qwen2ForTokenClassification", "Qwen2ForSequenceClassification"])
def test_value_folder_scores(exported, tmp_path, arch):
    ckpt = FIXTURES / "lf_ppo_full_qwen2" / "ckpt"
    good = classifier_folder(exported("lf_ppo_full_qwen2", "policy"), ckpt / "value_head.safetensors",
                             tmp_path / "good", arch)
    report = verify(good, against=ckpt, engine="transformers")
    ok_report(report)
    assert report.target == "value" and report.check("scores").status == "pass"
    assert report.check("engine-load").status == "pass"
    if arch.endswith("SequenceClassification"):  # vLLM adds score.bias; transformers' class has none
        assert any("score.bias" in d for d in report.check("tensor-names").details)
    wrong_head = classifier_folder(exported("lf_ppo_full_qwen2", "policy"),
                                   FIXTURES / "lf_ppo_lora_qwen2" / "ckpt" / "value_head.safetensors",
                                   tmp_path / "wrong-head", arch)
    assert "scores" in verify(wrong_head, against=ckpt, engine="none").failed()


# --- engines, JSON, CLI ----------------------------------------------------------------------------------------------
def test_transformers_engine(exported):
    report = verify(exported("lf_ppo_lora_qwen2", "policy"), against=FIXTURES / "lf_ppo_lora_qwen2" / "ckpt",
                    engine="transformers")
    ok_report(report)
    assert report.check("engine-load").status == report.check("engine-parity").status == "pass"


def test_vllm_engine_result_is_judged(exported, tmp_path, monkeypatch):
    """verify's glue around the vLLM subprocess, with the subprocess faked (the real one: test_verify_vllm.py)."""
    import rlexport.engines.vllm as engine
    folder = broken_copy(exported, tmp_path, "lf_ppo_full_qwen2", "policy", "v-head-left-in")
    error = "ValueError: There is no module or parameter named 'v_head' in Qwen2ForCausalLM"
    jobs = []
    monkeypatch.setattr(engine, "available", lambda: True)
    monkeypatch.setattr(engine, "run_jobs", lambda js: jobs.extend(js) or [{"ok": False, "error": error}])
    report = verify(folder, engine="vllm")
    assert jobs[0]["mode"] == "generate" and jobs[0]["model"] == str(folder) and jobs[0]["dtype"] == "float32"
    assert report.check("engine-load").status == "fail" and error in report.check("engine-load").summary
    # a run that returns the training-time numbers passes parity
    ref = json.loads((FIXTURES / "lf_ppo_full_qwen2" / "expected.json").read_text())
    good = exported("lf_ppo_full_qwen2", "policy")
    result = {"ok": True, "greedy": ref["policy"]["greedy"],
              "logprobs": [[None] + lp for lp in ref["policy"]["logprobs"]]}  # the worker's format
    monkeypatch.setattr(engine, "run_jobs", lambda js: [result])
    report = verify(good, against=FIXTURES / "lf_ppo_full_qwen2" / "ckpt", engine="vllm", prompts=ref["prompts"])
    ok_report(report)
    assert report.check("engine-parity").status == "pass"


def test_reference_reproduces_expected_json():
    """The independent rebuild agrees with the numbers the fixtures were made with (fp32, PEFT)."""
    from rlexport.formats import open_checkpoint
    from rlexport.verify.numbers import reference
    for case in ("lf_ppo_lora_qwen2", "lf_rm_lora_qwen2"):
        exp = json.loads((FIXTURES / case / "expected.json").read_text())
        src = open_checkpoint(FIXTURES / case / "ckpt")
        pol = reference(src, "policy", exp["prompts"], weights=False).numbers
        assert pol.greedy == exp["policy"]["greedy"]
        assert max(abs(a - b) for x, y in zip(pol.logprobs, exp["policy"]["logprobs"]) for a, b in zip(x, y)) < 1e-4
        val = reference(src, "value", exp["prompts"], weights=False).numbers
        assert max(abs(a - b) for x, y in zip(val.scores, exp["value"]) for a, b in zip(x, y)) < 1e-4


def test_json_validates_against_schema(exported, tmp_path):
    good = verify(exported("lf_ppo_full_qwen2", "policy"), against=FIXTURES / "lf_ppo_full_qwen2" / "ckpt",
                  engine="none").to_json()
    jsonschema.validate(good, SCHEMA)
    assert good["ok"] and good["failed"] == []
    bad = verify(broken_copy(exported, tmp_path, "lf_ppo_full_qwen2", "policy", "bias-dropped"),
                 engine="none").to_json()
    jsonschema.validate(bad, SCHEMA)
    assert bad["failed"] == ["tensor-names"]


def test_cli_exit_codes_and_table(exported, tmp_path):
    runner = CliRunner()
    ckpt = str(FIXTURES / "lf_ppo_full_qwen2" / "ckpt")
    res = runner.invoke(cli, ["verify", str(exported("lf_ppo_full_qwen2", "policy")), "--against", ckpt,
                              "--engine", "none", "--json"])
    assert res.exit_code == 0, res.output
    jsonschema.validate(json.loads(res.output), SCHEMA)
    bad = broken_copy(exported, tmp_path, "lf_ppo_full_qwen2", "policy", "wrong-eos")
    res = runner.invoke(cli, ["verify", str(bad), "--engine", "none"])
    assert res.exit_code == 1 and "FAIL" in res.output and "FAILED: eos" in res.output
    res = runner.invoke(cli, ["verify", str(bad), "--base", ckpt])
    assert res.exit_code == 2  # usage: --base needs --against


def test_export_verify_flag(tmp_path):
    res = CliRunner().invoke(cli, ["export", str(FIXTURES / "lf_ppo_full_qwen2" / "ckpt"), "--out",
                                   str(tmp_path / "out"), "-q", "--verify", "none"])
    assert res.exit_code == 0, res.output
    assert "OK:" in res.output and "logprobs" in res.output


def test_tied_model_folder(tmp_path):
    """A tied model stores no lm_head (vLLM's rule); one that differs from the embedding is a lost head."""
    from factories import make_tiny_model
    folder = make_tiny_model(tmp_path / "tied", tie_word_embeddings=True)
    report = verify(folder, engine="none")
    ok_report(report)
    f = folder / "model.safetensors"
    sd = load_file(f)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"] * 2
    save_file(sd, f, metadata={"format": "pt"})
    report = verify(folder, engine="none")
    assert report.failed() == ["tensor-names"]
    details = report.check("tensor-names").details
    assert any("lm_head.weight differs from model.embed_tokens.weight" in d for d in details)
