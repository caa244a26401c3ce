"""Tiny deterministic checkpoints for tests. head_dim is 64 so vLLM's CPU attention accepts them."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

FIXTURES = Path(__file__).parent / "fixtures"

# Fixture cases without a base/ folder were trained on this one (their MANIFEST.md says so).
SHARED_BASE = FIXTURES / "lf_ppo_full_qwen2" / "base"


def inputs(case: str) -> tuple[Path, Path | None]:
    """(checkpoint, --base) of a fixture case, as its expected.json says: `base` null when the checkpoint carries
    its own config, else the case's base/ folder (or the shared base where the case does not copy it)."""
    exp = json.loads((FIXTURES / case / "expected.json").read_text())
    ckpt = FIXTURES / case / exp.get("input", "ckpt")
    if exp.get("base") is None:
        return ckpt, None
    return ckpt, FIXTURES / case / exp["base"] if (FIXTURES / case / exp["base"]).is_dir() else SHARED_BASE


TOKENIZER_FROM = FIXTURES / "lf_ppo_full_qwen2" / "base"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def tiny_config(model_type: str = "qwen2", **over):
    from transformers import AutoConfig
    kw = dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=2,
              intermediate_size=256, vocab_size=320, max_position_embeddings=512, tie_word_embeddings=False,
              eos_token_id=0, pad_token_id=0)
    kw.update(over)
    return AutoConfig.for_model(model_type, **kw)


def make_tiny_model(path: Path, *, model_type: str = "qwen2", dtype=torch.bfloat16, seed: int = 0,
                    tokenizer: bool = True, **over) -> Path:
    """A random tiny causal LM saved with save_pretrained (safetensors), plus the fixtures' tokenizer."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **over), dtype=torch.float32)
    with torch.no_grad():  # norms are ones at init: perturb them so a dropped/swapped norm shows up
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.to(dtype).save_pretrained(path)
    if tokenizer:
        for f in TOKENIZER_FILES:
            shutil.copy(TOKENIZER_FROM / f, path / f)
    return Path(path)


def make_lora(path: Path, base: Path, *, seed: int = 1, r: int = 4, alpha: int = 8,
              targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
              **lora_kw) -> Path:
    """A PEFT LoRA adapter on `base` with non-zero B (so a forgotten merge changes the numbers)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False, **lora_kw)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    peft_model.save_pretrained(path)
    cfg_file = Path(path) / "adapter_config.json"
    data = json.loads(cfg_file.read_text())
    data["base_model_name_or_path"] = str(base)
    cfg_file.write_text(json.dumps(data, indent=2))
    return Path(path)


def copy_fixture(name: str, dest: Path) -> Path:
    """A writable copy of a committed fixture case (tests that break inputs must not touch the originals)."""
    shutil.copytree(FIXTURES / name, dest / name)
    return dest / name


def open_error(path, **kw):
    """The one-line RlexportError open_checkpoint raises for a bad input (asserting it raises one)."""
    import pytest
    from rlexport import RlexportError
    from rlexport.formats import open_checkpoint
    with pytest.raises(RlexportError) as e:
        open_checkpoint(path, **kw)
    assert "\n" not in str(e.value)
    return e.value
