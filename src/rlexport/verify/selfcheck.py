"""The export's self-check: `verify`'s structure checks run on the temporary folder before it is committed.

Headers only: config.json, the safetensors headers (or the plan's tensor list), the tokenizer and
generation_config; no tensor data is read back, so it costs milliseconds whatever the model's size. An export
that vLLM or transformers would refuse (a config.json that disagrees with its tensors, a stray tensor, a
tokenizer larger than the embedding, no eos) fails here and is never committed.

Without transformers installed the architecture checks cannot run; the checks rlexport can make alone (config
keys against the tensors) still do.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from .. import archs
from ..errors import RlexportError
from ..tensors import TensorRef
from .report import Check, failed, passed
from .structure import S, Folder, check_architecture, check_dtype, check_files, check_names, check_shapes
from .tokens import check_eos, check_generation_config, check_tokenizer

WITH_TRANSFORMERS = (check_architecture, check_names, check_shapes, check_dtype)
TOKENIZER_CHECKS = (check_tokenizer, check_generation_config, check_eos)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def check_config_fits(f: Folder, source=None) -> Check:
    """config.json against the tensors, without transformers: the facts every loader sizes its model from."""
    cfg = f.config or {}
    text = cfg["text_config"] if isinstance(cfg.get("text_config"), dict) and "vocab_size" not in cfg else cfg
    emb_name, head_name = archs.embedding_pair(cfg)
    emb, head, score = f.refs.get(emb_name), f.refs.get(head_name), f.refs.get("score.weight")
    problems = []
    if emb is not None and len(emb.shape) == 2:
        if text.get("vocab_size") != emb.shape[0]:
            problems.append(f"vocab_size {text.get('vocab_size')} but {emb_name} has {emb.shape[0]} rows")
        if "hidden_size" in text and text["hidden_size"] != emb.shape[1]:
            problems.append(f"hidden_size {text['hidden_size']} but {emb_name} is {emb.shape[1]} wide")
    tied = archs.is_tied(cfg)
    causal = any(str(a).endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration"))
                 for a in cfg.get("architectures") or [])
    if causal and head is None and not tied:
        problems.append(f"tie_word_embeddings is false but no {head_name} is written")
    if causal and head is not None and tied:
        problems.append(f"tie_word_embeddings is true but {head_name} is written (vLLM skips it)")
    if score is not None and cfg.get("num_labels", len(cfg.get("id2label") or {}) or None) != score.shape[0]:
        problems.append(f"num_labels {cfg.get('num_labels')} but score.weight has {score.shape[0]} rows")
    if problems:
        return failed("tensor-shapes", S, problems[0], problems[1:])
    return passed("tensor-shapes", S, "config.json fits the tensors")


def self_check(path: Path, refs: list[TensorRef] | None = None, *, checkpoint=None) -> list[Check]:
    """Run the header-only structure checks on `path`; raise export-self-check on the first failure.

    `refs`: the tensors the plan will write (before the shards exist); None reads the written shards' headers.
    `checkpoint`: the input, named in the error (the temporary folder is gone by then).
    """
    f = Folder(Path(path), headers_only=True)
    checks: list[Check] = []
    if refs is None:
        checks.append(check_files(f, None))
    else:
        f.config = json.loads((f.path / "config.json").read_text())
        f.refs = {r.name: r for r in refs}
    if not any(c.status == "fail" for c in checks):
        checks.append(check_config_fits(f))
    if importlib.util.find_spec("transformers") is not None:
        # an export without a tokenizer is allowed (inspect warns: missing-tokenizer); one with a tokenizer must fit
        has_tokenizer = any((f.path / n).is_file() for n in TOKENIZER_FILES)
        for check in WITH_TRANSFORMERS + (TOKENIZER_CHECKS if has_tokenizer else ()):
            if any(c.status == "fail" for c in checks):
                break
            checks.append(check(f, None))
    bad = next((c for c in checks if c.status == "fail"), None)
    if bad is not None:
        more = f" ({bad.details[0]})" if bad.details else ""
        raise RlexportError("export-self-check", f"{bad.name}: {bad.summary}{more}; nothing was written",
                            file=checkpoint, hint="this is a bug in rlexport or an input it does not understand: please report it "
                                 "with the output of `rlexport inspect` on the checkpoint")
    return checks
