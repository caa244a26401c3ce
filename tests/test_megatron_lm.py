"""Megatron-LM save roots (`latest_checkpointed_iteration.txt` + `iter_NNNNNNN/`), as slime saves them: the fixture
is Megatron-LM's own save_checkpoint at TP2 x PP2, bf16, distributed optimizer, vocabulary padded 320 -> 512. The
export equals the HF state dict the checkpoint was made from, the optimizer is never read, common.pt never
unpickled, and each broken input is a one-line error."""
from __future__ import annotations

import os
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file

import rlexport
from conftest import expected
from factories import FIXTURES, copy_fixture, open_error
from rlexport.formats import open_checkpoint, steps_of
from test_export import load_folder

CASE = "megatron_lm_iter_qwen2"
ROOT = FIXTURES / CASE / "ckpt"
BASE = FIXTURES / CASE / "base"
ITER = ROOT / "iter_0000010"

pytestmark = pytest.mark.usefixtures("one_thread")


def test_export_equals_reference_cut_to_the_real_vocabulary(tmp_path):
    out = rlexport.export(ROOT, tmp_path / "out", dtype="float32", base=BASE).out
    got, ref = load_folder(out), load_file(FIXTURES / CASE / "reference.safetensors")
    assert set(got) == set(ref) == set(expected(CASE)["names"])
    for k, v in ref.items():
        assert torch.equal(got[k], v), k
    assert got["model.embed_tokens.weight"].shape[0] == 320 and got["lm_head.weight"].shape[0] == 320


def test_the_numbers_of_the_training_time_model(tmp_path):
    from transformers import AutoModelForCausalLM
    from rlexport.verify.numbers import policy_numbers
    out = rlexport.export(ROOT, tmp_path / "out", dtype="float32", base=BASE).out
    exp = expected(CASE)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        num = policy_numbers(model, exp["prompts"], 12)
    assert max(abs(p - q) for x, y in zip(num.logprobs, exp["policy"]["logprobs"]) for p, q in zip(x, y)) < 1e-4
    assert num.greedy == exp["policy"]["greedy"]


def test_iteration_tag_and_folder(monkeypatch):
    for path, tag in ((ROOT, None), (ROOT, "iter_0000010"), (ROOT, "10"), (ITER, None)):
        src = open_checkpoint(path, base=BASE, tag=tag)
        assert (src.kind, src.producer, src.targets) == ("megatron-lm", "megatron-lm", ("policy",))
        assert {r.dtype for r in src.weights} == {torch.bfloat16} and len(src.weights) == 27
    e = open_error(ROOT, base=BASE, tag="iter_0000020")
    assert e.code == "tag-not-found" and "iter_0000010" in str(e)


def test_steps_and_an_unfinished_iteration(tmp_path):
    assert [(s.tag, s.complete) for s in steps_of(ROOT)] == [("iter_0000010", True)]
    root = copy_fixture(CASE, tmp_path) / "ckpt"
    later = root / "iter_0000020"
    shutil.copytree(root / "iter_0000010", later)
    (later / ".metadata").unlink()  # torch_dist writes it last
    found = {s.tag: s for s in steps_of(root)}
    assert found["iter_0000010"].complete and not found["iter_0000020"].complete
    assert ".metadata" in found["iter_0000020"].why
    (root / "latest_checkpointed_iteration.txt").write_text("20")
    e = open_error(root, base=BASE)
    assert e.code == "incomplete-checkpoint" and "iter_0000020" in str(e)


def test_reading_touches_neither_the_optimizer_nor_common_pt(tmp_path, monkeypatch):
    root = copy_fixture(CASE, tmp_path) / "ckpt"
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    torch.save({"args": Payload()}, root / "iter_0000010" / "common.pt")  # a malicious common.pt
    calls, real = [], os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, off: calls.append(n) or real(fd, n, off))
    src = open_checkpoint(root, base=BASE)
    assert not calls
    monkeypatch.setattr(os, "pread", real)
    out = rlexport.export(root, tmp_path / "out", dtype="float32", base=BASE).out
    assert not marker.exists() and "model.embed_tokens.weight" in load_folder(out)
    assert not any("optimizer" in r.name for r in src.weights)


def test_inspect_shows_layout_vocabulary_and_skipped_optimizer():
    report = rlexport.inspect(ROOT, base=BASE)
    t = report["trainer"]
    assert report["format"] == "megatron-lm" and t["parallel_layout"] == {"tp": 2, "pp": 2}
    assert (t["vocab_size"], t["padded_vocab_size"]) == (320, 512)
    opt, weights = t["optimizer_state"], sum(r.nbytes for r in open_checkpoint(ROOT, base=BASE).weights)
    assert opt["read"] is False and opt["bytes"] > 5 * weights  # flat fp32 param + exp_avg + exp_avg_sq vs bf16


def test_no_base_to_cut_the_padded_vocabulary_to():
    e = open_error(ROOT)
    assert e.code == "missing-config" and "512 rows" in str(e) and "--base" in str(e)


def test_no_tracker_and_no_tag(tmp_path):
    root = copy_fixture(CASE, tmp_path) / "ckpt"
    (root / "latest_checkpointed_iteration.txt").unlink()
    e = open_error(root, base=BASE)
    assert e.code == "tracker-missing" and "iter_0000010" in str(e) and "--tag" in e.hint
    assert open_checkpoint(root, base=BASE, tag="iter_0000010").kind == "megatron-lm"


def test_the_tracker_names_a_missing_iteration(tmp_path):
    root = copy_fixture(CASE, tmp_path) / "ckpt"
    (root / "latest_checkpointed_iteration.txt").write_text("30")
    e = open_error(root, base=BASE)
    assert e.code == "incomplete-checkpoint" and "iter_0000030" in str(e)


def test_a_missing_distcp_file(tmp_path):
    root = copy_fixture(CASE, tmp_path) / "ckpt"
    (root / "iter_0000010" / "__3_1.distcp").unlink()
    e = open_error(root, base=BASE)
    assert e.code == "missing-file" and "__3_1.distcp" in str(e)
    assert not steps_of(root)[0].complete


def test_a_metadata_with_sizes_beyond_the_file(tmp_path):
    root = copy_fixture(CASE, tmp_path) / "ckpt"
    f = root / "iter_0000010" / "__2_0.distcp"
    os.truncate(f, f.stat().st_size // 2)
    e = open_error(root, base=BASE)
    assert e.code == "corrupt-checkpoint" and "__2_0.distcp" in str(e)


def test_a_metadata_with_a_foreign_class(tmp_path):
    root = copy_fixture(CASE, tmp_path) / "ckpt"
    (root / "iter_0000010" / ".metadata").write_bytes(pickle.dumps(os.getcwd, protocol=4))
    e = open_error(root, base=BASE)
    assert e.code == "unsafe-pickle" and "getcwd" in str(e)
