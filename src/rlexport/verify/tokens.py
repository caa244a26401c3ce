"""Structure checks of an exported folder, tokenizer side: the tokenizer against the embedding (and the training
tokenizer), generation_config.json, the EOS ids each engine stops on, the chat template.

Same shape as structure.py: each check takes the Folder and the training Source (or None) and returns a Check.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from ..formats import Source
from .report import Check, failed, passed, skipped
from .structure import S, Folder, _first_line

SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty")
PROBE = "RLEXPORT_PROBE_REPLY"


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)


def check_tokenizer(f: Folder, source: Source | None) -> Check:
    try:
        f.tokenizer = _load_tokenizer(f.path)
    except Exception as e:  # the loader's own error is what a user would see
        return failed("tokenizer", S, "the tokenizer does not load", [_first_line(e)])
    tok, rows = f.tokenizer, f.rows
    size = len(tok)
    problems, notes = [], []
    if rows is not None and size > rows:
        problems.append(f"the tokenizer has {size} tokens, the embedding {rows} rows (vLLM: ValueError: Token id "
                        f"{rows} is out of vocabulary; transformers: IndexError: index out of range in self)")
    bad = {t: i for t, i in zip(tok.all_special_tokens, tok.all_special_ids) if rows is not None and i >= rows}
    if bad:
        problems.append(f"special token ids beyond the embedding: {bad}")
    if source is not None and source.tokenizer_dirs:
        try:
            f.source_tokenizer = _load_tokenizer(source.tokenizer_dirs[0])
        except Exception as e:
            notes.append(f"the training tokenizer does not load ({_first_line(e)})")
        if f.source_tokenizer is not None:
            mine, theirs = tok.get_vocab(), f.source_tokenizer.get_vocab()
            diff = set(mine.items()) ^ set(theirs.items())
            if diff:
                tok_, _ = sorted(diff, key=lambda kv: kv[1])[0]
                problems.append(f"{len(diff)} vocabulary entries differ from the training tokenizer "
                                f"({source.tokenizer_dirs[0]}), e.g. {tok_!r}: {mine.get(tok_)} here, "
                                f"{theirs.get(tok_)} in training")
    metrics = dict(tokens=size, embedding_rows=rows)
    if problems:
        return failed("tokenizer", S, problems[0], problems[1:] + notes, **metrics)
    same = ", same vocabulary as training" if f.source_tokenizer is not None else ""
    return passed("tokenizer", S, f"{size} tokens <= {rows} embedding rows{same}", notes, **metrics)


def _gen_config(f: Folder) -> dict | None:
    p = f.path / "generation_config.json"
    try:
        return json.loads(p.read_text()) if p.is_file() else None
    except ValueError:
        return None


def check_generation_config(f: Folder, source: Source | None) -> Check:
    if f.target != "policy":
        return skipped("generation-config", S, "not a generating model")
    p = f.path / "generation_config.json"
    if not p.is_file():
        return failed("generation-config", S, "no generation_config.json",
                      ["vLLM and transformers fall back to config.json: only its eos_token_id stops generation"])
    try:
        from transformers import GenerationConfig
        GenerationConfig.from_pretrained(f.path)
    except Exception as e:  # transformers' own validation message
        return failed("generation-config", S, "transformers rejects generation_config.json", [_first_line(e)])
    gen = _gen_config(f) or {}
    imposed = {k: gen[k] for k in SAMPLING_KEYS if k in gen}
    notes = [f"vLLM applies {imposed} to every request (--generation-config vllm to ignore)"] if imposed else []
    return passed("generation-config", S, "loads" + (f"; sampling defaults {imposed}" if imposed else
                                                     "; token ids only"), notes)


def turn_end_id(tok) -> int | None:
    """The special token the chat template puts right after an assistant reply (None without one)."""
    if not getattr(tok, "chat_template", None):
        return None
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": PROBE}],
                                   tokenize=False)
    after = text.split(PROBE, 1)[-1].lstrip(" ")
    specials = sorted(set(tok.all_special_tokens) | set(getattr(tok, "added_tokens_encoder", {})), key=len,
                      reverse=True)
    for s in specials:
        if s and after.startswith(s):
            return tok.convert_tokens_to_ids(s)
    return None


def check_eos(f: Folder, source: Source | None) -> Check:
    if f.target != "policy":
        return skipped("eos", S, "not a generating model")
    if f.tokenizer is None:
        return skipped("eos", S, "no tokenizer")
    gen = _gen_config(f)
    gen_ids = _ids((gen or {}).get("eos_token_id")) if gen is not None else _ids((f.config or {}).get("eos_token_id"))
    tok_eos = f.tokenizer.eos_token_id
    vllm_stops = set(gen_ids) | ({tok_eos} if tok_eos is not None else set())
    tf_stops = set(gen_ids)
    required: dict[int, str] = {}
    if f.source_tokenizer is not None and f.source_tokenizer.eos_token_id is not None:
        required[f.source_tokenizer.eos_token_id] = "the training tokenizer's eos"
    elif tok_eos is not None:
        required[tok_eos] = "the tokenizer's eos"
    problems, notes = [], []
    for i, why in required.items():
        tok_s = f.tokenizer.convert_ids_to_tokens(i)
        if i not in vllm_stops:
            problems.append(f"vLLM never stops on {tok_s!r} (id {i}, {why}): stops are {sorted(vllm_stops)}")
        elif i not in tf_stops:
            problems.append(f"transformers generate() never stops on {tok_s!r} (id {i}, {why}): "
                            f"generation_config eos_token_id is {sorted(tf_stops)}")
    try:
        end = turn_end_id(f.tokenizer)
    except Exception:  # a broken template is the chat-template check's finding
        end = None
    if end is not None and end not in vllm_stops | tf_stops:
        # a base-tokenizer model may never have seen the template; a chat model trained on it would not stop
        notes.append(f"the chat template ends a turn with {f.tokenizer.convert_ids_to_tokens(end)!r} (id {end}), "
                     "which is no stop id: chat replies will not stop if the model was trained on the template")
    rows = f.rows
    if rows is not None and any(i >= rows for i in vllm_stops):
        problems.append(f"eos ids {sorted(i for i in vllm_stops if i >= rows)} are beyond the {rows} embedding rows")
    if not vllm_stops:
        problems.append("no eos id anywhere: generation runs to max_tokens")
    metrics = dict(stop_ids=sorted(vllm_stops), required=sorted(required))
    if problems:
        return failed("eos", S, problems[0], problems[1:] + notes, **metrics)
    return passed("eos", S, f"stops on {sorted(vllm_stops)} (" + ", ".join(
        f"{f.tokenizer.convert_ids_to_tokens(i)}" for i in sorted(required)) + " included)", notes, **metrics)


def check_chat_template(f: Folder, source: Source | None) -> Check:
    tok = f.tokenizer
    if tok is None:
        return skipped("chat-template", S, "no tokenizer")
    template = getattr(tok, "chat_template", None)
    if not template:
        if f.target != "policy":
            return skipped("chat-template", S, "no chat template (a scoring model needs none)")
        return failed("chat-template", S, "no chat template", [
            "vLLM /v1/chat/completions: ValueError: As of transformers v4.44, default chat template is no longer "
            "allowed, so you must provide a chat template if the tokenizer does not define one."])
    try:
        tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    except Exception as e:  # the template's own error
        return failed("chat-template", S, "the chat template does not render", [_first_line(e)])
    src_tok = f.source_tokenizer
    if src_tok is not None and getattr(src_tok, "chat_template", None) and \
            str(src_tok.chat_template).strip() != str(template).strip():
        return failed("chat-template", S, "the chat template differs from the training checkpoint's",
                      [f"training: {source.tokenizer_dirs[0]}"])
    same = " (same as training)" if src_tok is not None and getattr(src_tok, "chat_template", None) else ""
    return passed("chat-template", S, f"renders{same}")


CHECKS: tuple[Callable[[Folder, Source | None], Check], ...] = (
    check_tokenizer, check_generation_config, check_eos, check_chat_template,
)
