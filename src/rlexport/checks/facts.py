"""What transformers says about a folder, as plain data: the parameters (names and shapes) of its architecture built
on the meta device, whether its config.json and generation_config.json load, and its tokenizer's sizes and ids.

These are the only facts the structure checks need from transformers. They depend on config.json, the tokenizer
files and transformers' version, never on the weights, so cache.py keeps them per folder contents and the export
computes them in a child process (`python -m rlexport.checks.facts FOLDER OUT.json`): the export process never
imports transformers (2-4 s, ~0.25 GiB resident). `rlexport verify` computes them in-process (it loads the model
anyway) and keeps the live objects for its later stages.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
PROBE = "RLEXPORT_PROBE_REPLY"


@dataclass(frozen=True)
class TokenizerFacts:
    error: str | None = None                            # the loader's first line when it does not load
    size: int = 0                                       # len(tokenizer): added tokens included
    specials: dict[str, int] = field(default_factory=dict)  # special token -> id
    eos_token_id: int | None = None
    names: dict[int, str | None] = field(default_factory=dict)  # id -> token, for the ids the checks name
    turn_end: int | None = None                         # the special token the chat template ends a reply with


@dataclass(frozen=True)
class Facts:
    transformers: str                                   # the version that computed them
    has_class: bool = True                              # transformers has the class config.json names
    config_error: str | None = None                     # AutoConfig's first line when config.json does not load
    num_labels: int | None = None
    expected: dict[str, tuple[int, ...]] = field(default_factory=dict)  # parameter/buffer -> shape (meta model)
    aliases: dict[str, str] = field(default_factory=dict)  # tied name -> the canonical name it shares storage with
    modules: tuple[str, ...] = ()                       # module names (the prefix vLLM's error would name)
    tokenizer: TokenizerFacts | None = None
    generation_error: str | None = None                 # GenerationConfig's first line when it is rejected

    def to_json(self) -> dict:
        d = asdict(self)
        d["expected"] = {k: list(v) for k, v in self.expected.items()}
        if self.tokenizer is not None:
            d["tokenizer"]["names"] = {str(k): v for k, v in self.tokenizer.names.items()}
        return d

    @staticmethod
    def from_json(d: dict) -> Facts:
        tok = d.get("tokenizer")
        if tok is not None:
            tok = TokenizerFacts(**{**tok, "names": {int(k): v for k, v in tok["names"].items()}})
        return Facts(**{**d, "expected": {k: tuple(v) for k, v in d["expected"].items()},
                        "modules": tuple(d["modules"]), "tokenizer": tok})


@dataclass
class Live:
    """The transformers objects behind the facts, for verify's later stages (None in a child process's result)."""

    model_cls: type | None = None
    hf_config: object | None = None
    tokenizer: object | None = None


def first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


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


def _architecture(path: Path, config: dict, live: Live) -> dict:
    import torch
    import transformers
    from transformers import AutoConfig
    arch = (config.get("architectures") or [None])[0]
    live.model_cls = getattr(transformers, arch, None) if arch else None
    if live.model_cls is None:
        return {"has_class": False}
    try:
        live.hf_config = AutoConfig.from_pretrained(path)
    except Exception as e:  # the exact loader error is the finding (rope_scaling skew, bad model_type, ...)
        return {"config_error": first_line(e)}
    out = {"num_labels": getattr(live.hf_config, "num_labels", None)}
    try:
        with torch.device("meta"):
            model = live.model_cls(live.hf_config)
    except Exception as e:  # neither a causal LM nor a classifier (the architecture check says so first)
        return {**out, "config_error": first_line(e)}
    expected, aliases, seen = {}, {}, {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            aliases[name] = seen[id(t)]
        else:
            seen[id(t)] = name
        expected[name] = tuple(t.shape)
    return {**out, "expected": expected, "aliases": aliases, "modules": tuple(n for n, _ in model.named_modules())}


def _tokenizer(path: Path, config: dict, live: Live) -> TokenizerFacts:
    from transformers import AutoTokenizer
    try:
        tok = live.tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # the loader's own error is what a user would see
        return TokenizerFacts(error=first_line(e))
    try:
        end = turn_end_id(tok)
    except Exception:  # a broken template is the chat-template check's finding
        end = None
    gen = path / "generation_config.json"
    try:
        gen_ids = _ids(json.loads(gen.read_text()).get("eos_token_id")) if gen.is_file() else []
    except ValueError:
        gen_ids = []
    specials = {t: int(i) for t, i in zip(tok.all_special_tokens, tok.all_special_ids)}
    ids = set(specials.values()) | set(gen_ids) | set(_ids(config.get("eos_token_id"))) | \
        {i for i in (tok.eos_token_id, end) if i is not None}
    return TokenizerFacts(size=len(tok), specials=specials, eos_token_id=tok.eos_token_id, turn_end=end,
                          names={i: tok.convert_ids_to_tokens(i) for i in sorted(ids)})


def _generation(path: Path) -> str | None:
    if not (path / "generation_config.json").is_file():
        return None
    from transformers import GenerationConfig
    try:
        GenerationConfig.from_pretrained(path)
    except Exception as e:  # transformers' own validation message
        return first_line(e)
    return None


def compute(path: Path) -> tuple[Facts, Live]:
    """Every fact about `path` (a folder with config.json), with transformers in this process."""
    import transformers
    path = Path(path)
    live = Live()
    try:
        config = json.loads((path / "config.json").read_text())
        arch = _architecture(path, config, live)
    except (OSError, ValueError) as e:  # no readable config.json: the files check says so; the tokenizer still counts
        config, arch = {}, {"has_class": False, "config_error": first_line(e)}
    facts = Facts(transformers.__version__, **arch, tokenizer=_tokenizer(path, config, live),
                  generation_error=_generation(path))
    return facts, live


def main(argv: list[str]) -> int:
    """The child process: compute the facts of FOLDER, write them as JSON to OUT."""
    folder, out = Path(argv[0]), Path(argv[1])
    facts, _ = compute(folder)
    tmp = out.with_name(out.name + ".part")
    tmp.write_text(json.dumps(facts.to_json()))
    tmp.replace(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
