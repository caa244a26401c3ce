"""verify's structure stage, tokenizer side: the checks of rlexport.checks.tokens (the tokenizer against the
embedding and the training tokenizer, generation_config.json, the EOS ids each engine stops on), then the chat
template, rendered with the live tokenizer.

Same shape as structure.py: each check takes the Folder and the training Source (or None) and returns a Check.
"""
from __future__ import annotations

from typing import Callable

from ..checks.facts import PROBE, turn_end_id  # noqa: F401  (re-exported: verify's callers name them here)
from ..checks.tokens import SAMPLING_KEYS, check_eos, check_generation_config, check_tokenizer  # noqa: F401
from ..checks.processor import check_processor
from ..formats import Source
from .report import Check, failed, passed, skipped
from .structure import S, Folder, _first_line


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
    check_tokenizer, check_generation_config, check_eos, check_chat_template, check_processor,
)
