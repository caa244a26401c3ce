"""The non-weight files of an export: config.json, generation_config.json, tokenizer and chat template."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch

from .formats import Source
from .formats.common import TOKENIZER_FILES, json_or_empty
from .tensors import dtype_name

# Keys trainers flip for training that make no sense when serving.
SERVING_DEFAULTS = {"use_cache": True}


def model_config(src: Source, *, dtype: torch.dtype, vocab_size: int | None, tied: bool,
                 updates: dict | None = None) -> dict:
    cfg = copy.deepcopy(src.config)
    name = dtype_name(dtype)
    cfg["torch_dtype"] = name  # transformers < 5 and vLLM's older readers
    cfg["dtype"] = name        # transformers >= 5
    if vocab_size is not None:
        cfg["vocab_size"] = vocab_size
    cfg["tie_word_embeddings"] = tied
    if isinstance(cfg.get("text_config"), dict):
        cfg["text_config"]["tie_word_embeddings"] = tied
    cfg.update(SERVING_DEFAULTS)
    cfg.update(updates or {})
    return cfg


def tokenizer_dir(src: Source) -> Path | None:
    return src.tokenizer_dirs[0] if src.tokenizer_dirs else None


def copy_tokenizer(src: Source, out: Path) -> list[str]:
    """Copy the tokenizer the model was trained with (the checkpoint's, else the base's)."""
    tdir = tokenizer_dir(src)
    if tdir is None:
        return []
    copied = []
    for name in TOKENIZER_FILES:
        if (tdir / name).is_file():
            shutil.copyfile(tdir / name, out / name)
            copied.append(name)
    # A chat template only the base carries still belongs to the model.
    if not any(n in copied for n in ("chat_template.jinja", "chat_template.json")) and \
            "chat_template" not in json_or_empty(tdir / "tokenizer_config.json"):
        for d in src.tokenizer_dirs[1:]:
            if (d / "chat_template.jinja").is_file():
                shutil.copyfile(d / "chat_template.jinja", out / "chat_template.jinja")
                copied.append("chat_template.jinja")
                break
    return copied


def token_id(tdir: Path | None, token) -> int | None:
    """Id of a special token string, read from tokenizer.json / tokenizer_config.json without loading it."""
    if tdir is None or token is None:
        return None
    if isinstance(token, dict):
        token = token.get("content")
    for added in json_or_empty(tdir / "tokenizer.json").get("added_tokens", []):
        if added.get("content") == token:
            return int(added["id"])
    for tid, spec in json_or_empty(tdir / "tokenizer_config.json").get("added_tokens_decoder", {}).items():
        if spec.get("content") == token:
            return int(tid)
    vocab = json_or_empty(tdir / "tokenizer.json").get("model", {}).get("vocab", {})
    return vocab.get(token) if isinstance(vocab, dict) else None


def tokenizer_eos_id(src: Source) -> int | None:
    tdir = tokenizer_dir(src)
    return token_id(tdir, json_or_empty(tdir / "tokenizer_config.json").get("eos_token")) if tdir else None


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def generation_config(src: Source) -> dict:
    """The base's (or checkpoint's) generation config with every turn-ending id in eos_token_id.

    Chat templates often change the tokenizer's eos (LLaMA-Factory's qwen template sets <|im_end|>) while
    generation_config keeps the pretraining eos; vLLM stops on the union, so list both.
    """
    gen = {}
    for d in (src.config_dir, src.path, src.base_dir):
        if d is not None and (d / "generation_config.json").is_file():
            gen = json_or_empty(d / "generation_config.json")
            break
    eos = []
    for v in (tokenizer_eos_id(src), *_ids(gen.get("eos_token_id")), *_ids(src.config.get("eos_token_id"))):
        if v is not None and v not in eos:
            eos.append(v)
    gen.pop("_from_model_config", None)
    if eos:
        gen["eos_token_id"] = eos if len(eos) > 1 else eos[0]
    if "pad_token_id" not in gen and src.config.get("pad_token_id") is not None:
        gen["pad_token_id"] = src.config["pad_token_id"]
    return gen


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
