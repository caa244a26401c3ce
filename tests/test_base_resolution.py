"""Where the base of an adapter comes from: --base, a path relative to the run, or the local HF cache."""
from __future__ import annotations

import json
import shutil

import pytest

from factories import FIXTURES
from rlexport.errors import RlexportError
from rlexport.formats import open_checkpoint


def adapter_naming(tmp_path, base_hint: str):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / "lf_ppo_lora_qwen2" / "ckpt", ckpt, ignore=shutil.ignore_patterns("checkpoint-*"))
    cfg = json.loads((ckpt / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = base_hint
    (ckpt / "adapter_config.json").write_text(json.dumps(cfg))
    return ckpt


def test_hub_id_resolves_from_the_local_hf_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as c
    cache = tmp_path / "hub"
    snap = cache / "models--tiny-org--tiny-qwen2" / "snapshots" / "0123456789abcdef"
    shutil.copytree(FIXTURES / "lf_ppo_lora_qwen2" / "base", snap)
    (cache / "models--tiny-org--tiny-qwen2" / "refs").mkdir()
    (cache / "models--tiny-org--tiny-qwen2" / "refs" / "main").write_text("0123456789abcdef")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    src = open_checkpoint(adapter_naming(tmp_path, "tiny-org/tiny-qwen2"))
    assert src.base_dir == snap.resolve()


def test_uncached_hub_id_asks_for_base(tmp_path, monkeypatch):
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    with pytest.raises(RlexportError) as e:
        open_checkpoint(adapter_naming(tmp_path, "Qwen/Qwen2.5-7B-Instruct"))
    assert e.value.code == "base-unresolved" and "--base" in e.value.hint


def test_explicit_base_wins_over_the_adapter_config(tmp_path):
    ckpt = adapter_naming(tmp_path, "/nonexistent/base")
    src = open_checkpoint(ckpt, base=FIXTURES / "lf_ppo_lora_qwen2" / "base")
    assert src.base_dir == (FIXTURES / "lf_ppo_lora_qwen2" / "base").resolve()


def test_relative_base_is_found_from_a_checkpoint_subfolder():
    # checkpoint-6/ records "../base" relative to the trainer's working dir, not to itself
    src = open_checkpoint(FIXTURES / "lf_ppo_lora_qwen2" / "ckpt" / "checkpoint-6")
    assert src.base_dir == (FIXTURES / "lf_ppo_lora_qwen2" / "base").resolve()
