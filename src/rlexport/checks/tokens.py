"""Structure checks of a folder, tokenizer side, from facts only: the tokenizer against the embedding (and the
training tokenizer, when verify loaded it), generation_config.json, the EOS ids each engine stops on.

Same shape as structure.py: each check takes the Folder and the training Source (or None) and returns a Check;
what transformers makes of the tokenizer comes from `f.known().tokenizer` (facts.py).
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING

from .facts import _ids
from .report import Check, failed, passed, skipped
from .structure import S, Folder

if TYPE_CHECKING:
    from ..formats import Source

SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty")


def check_tokenizer(f: Folder, source: Source | None) -> Check:
    facts = f.known()
    tok = facts.tokenizer if facts is not None else None
    if tok is None:
        return skipped("tokenizer", S, "transformers is not installed")
    if tok.error is not None:
        return failed("tokenizer", S, "the tokenizer does not load", [tok.error])
    rows, size = f.rows, tok.size
    problems, notes = [], []
    if rows is not None and size > rows:
        problems.append(f"the tokenizer has {size} tokens, the embedding {rows} rows (vLLM: ValueError: Token id "
                        f"{rows} is out of vocabulary; transformers: IndexError: index out of range in self)")
    bad = {t: i for t, i in tok.specials.items() if rows is not None and i >= rows}
    if bad:
        problems.append(f"special token ids beyond the embedding: {bad}")
    if f.source_tokenizer_error is not None:
        notes.append(f"the training tokenizer does not load ({f.source_tokenizer_error})")
    if f.source_tokenizer is not None and f.tokenizer is not None:
        mine, theirs = f.tokenizer.get_vocab(), f.source_tokenizer.get_vocab()
        diff = set(mine.items()) ^ set(theirs.items())
        if diff:
            tok_, _ = sorted(diff, key=lambda kv: kv[1])[0]
            where = source.tokenizer_dirs[0] if source is not None and source.tokenizer_dirs else "training"
            problems.append(f"{len(diff)} vocabulary entries differ from the training tokenizer ({where}), e.g. "
                            f"{tok_!r}: {mine.get(tok_)} here, {theirs.get(tok_)} in training")
    metrics = dict(tokens=size, embedding_rows=rows)
    if problems:
        return failed("tokenizer", S, problems[0], problems[1:] + notes, **metrics)
    same = ", same vocabulary as training" if f.source_tokenizer is not None else ""
    return passed("tokenizer", S, f"{size} tokens <= {rows} embedding rows{same}", notes, **metrics)


def gen_config(f: Folder) -> dict | None:
    p = f.path / "generation_config.json"
    try:
        return json.loads(p.read_text()) if p.is_file() else None
    except ValueError:
        return None


def check_generation_config(f: Folder, source: Source | None) -> Check:
    if f.target != "policy":
        return skipped("generation-config", S, "not a generating model")
    if not (f.path / "generation_config.json").is_file():
        return failed("generation-config", S, "no generation_config.json",
                      ["vLLM and transformers fall back to config.json: only its eos_token_id stops generation"])
    facts = f.known()
    if facts is not None and facts.generation_error is not None:
        return failed("generation-config", S, "transformers rejects generation_config.json", [facts.generation_error])
    gen = gen_config(f) or {}
    imposed = {k: gen[k] for k in SAMPLING_KEYS if k in gen}
    notes = [f"vLLM applies {imposed} to every request (--generation-config vllm to ignore)"] if imposed else []
    return passed("generation-config", S, "loads" + (f"; sampling defaults {imposed}" if imposed else
                                                     "; token ids only"), notes)


def check_eos(f: Folder, source: Source | None) -> Check:
    if f.target != "policy":
        return skipped("eos", S, "not a generating model")
    facts = f.known()
    tok = facts.tokenizer if facts is not None else None
    if tok is None or tok.error is not None:
        return skipped("eos", S, "no tokenizer")
    name = tok.names.get
    gen = gen_config(f)
    gen_ids = _ids((gen or {}).get("eos_token_id")) if gen is not None else _ids((f.config or {}).get("eos_token_id"))
    vllm_stops = set(gen_ids) | ({tok.eos_token_id} if tok.eos_token_id is not None else set())
    tf_stops = set(gen_ids)
    required: dict[int, str] = {}
    if f.source_tokenizer is not None and f.source_tokenizer.eos_token_id is not None:
        required[f.source_tokenizer.eos_token_id] = "the training tokenizer's eos"
        if f.tokenizer is not None:
            name = f.tokenizer.convert_ids_to_tokens  # the training eos may be an id the facts did not name
    elif tok.eos_token_id is not None:
        required[tok.eos_token_id] = "the tokenizer's eos"
    problems, notes = [], []
    for i, why in required.items():
        tok_s = name(i)
        if i not in vllm_stops:
            problems.append(f"vLLM never stops on {tok_s!r} (id {i}, {why}): stops are {sorted(vllm_stops)}")
        elif i not in tf_stops:
            problems.append(f"transformers generate() never stops on {tok_s!r} (id {i}, {why}): "
                            f"generation_config eos_token_id is {sorted(tf_stops)}")
    end = tok.turn_end
    if end is not None and end not in vllm_stops | tf_stops:
        # a base-tokenizer model may never have seen the template; a chat model trained on it would not stop
        notes.append(f"the chat template ends a turn with {name(end)!r} (id {end}), "
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
        f"{name(i)}" for i in sorted(required)) + " included)", notes, **metrics)
