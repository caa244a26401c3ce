"""Structure checks of an exported folder: files, architecture, tensor names and shapes against the model that
transformers builds on the meta device, dtype, values, tokenizer, generation config, EOS and chat template.

Each check is a function of the Folder (what earlier checks learned) and the training Source (or None without
--against); it returns one Check. Nothing here loads a model's weights: the meta-device model costs no memory,
and tensor bytes are streamed one tensor at a time by the `values` check only.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import archs
from .diagnosis import architecture_known
from .formats import Source
from .formats.files import pickle_refs, safetensors_refs
from .tensors import DTYPES, FLOATS, TensorRef, dtype_name
from .verify_report import Check, failed, passed, skipped

S = "structure"
POLICY_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
VALUE_SUFFIXES = ("ForSequenceClassification", "ForTokenClassification")
IGNORED_BUFFERS = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty")
TINY = 2.0 ** -17       # below this a bfloat16 value has mantissa bits finer than float16's subnormal step
FP16_STEP = 2.0 ** 24   # float16's subnormal step is 2**-24: x * FP16_STEP is an integer on its grid
MIN_TINY = 16           # tiny values needed before the float16-grid test means anything (2**-16 false alarms)
PROBE = "RLEXPORT_PROBE_REPLY"


@dataclass
class Folder:
    """What the structure checks learned about the folder; the numbers and engine stages read it."""

    path: Path
    config: dict | None = None
    arch: str | None = None
    target: str | None = None                     # policy | value
    refs: dict[str, TensorRef] = field(default_factory=dict)
    model_cls: type | None = None
    hf_config: object | None = None
    expected: dict[str, tuple[int, ...]] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)  # optional tied name -> canonical name
    dtype: torch.dtype | None = None
    tokenizer: object | None = None
    source_tokenizer: object | None = None

    @property
    def rows(self) -> int | None:
        emb, _ = archs.embedding_pair(self.config or {})
        ref = self.refs.get(emb)
        return ref.shape[0] if ref is not None else (self.config or {}).get("vocab_size")


def target_of(arch: str | None) -> str | None:
    if arch and arch.endswith(POLICY_SUFFIXES):
        return "policy"
    if arch and arch.endswith(VALUE_SUFFIXES):
        return "value"
    return None


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


# --- files ---------------------------------------------------------------------------------------------------------
def check_files(f: Folder, source: Source | None) -> Check:
    problems, notes = [], []
    cfg = f.path / "config.json"
    if not cfg.is_file():
        problems.append(f"no config.json (vLLM/transformers: OSError: {f.path} does not appear to have a file "
                        "named config.json)")
    else:
        try:
            f.config = json.loads(cfg.read_text())
        except ValueError as e:
            problems.append(f"config.json is not valid JSON ({e})")
    st = sorted(p.name for p in f.path.glob("*.safetensors"))
    index = f.path / "model.safetensors.index.json"
    files = st
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map") or {}
        named = set(weight_map.values())
        for name in sorted(named - set(st)):
            problems.append(f"the index names {name}, which is missing (vLLM: FileNotFoundError)")
        for name in sorted(set(st) - named):
            notes.append(f"{name} is not in the index: vLLM and transformers ignore it")
        files = sorted(named & set(st))
    elif len(st) > 1:
        extra = [n for n in st if not n.startswith("model")]
        if extra:
            problems.append(f"no index, so vLLM loads every *.safetensors as weights, {extra[0]} included "
                            "(ValueError: There is no module or parameter named …)")
    if any(n.startswith("consolidated") for n in st):
        problems.append("consolidated*.safetensors present: vLLM then loads the folder as a Mistral checkpoint")
    if (f.path / "adapter_config.json").is_file():
        problems.append("adapter_config.json in the folder: transformers (with PEFT installed) loads "
                        "base_model_name_or_path plus this adapter instead of the folder's weights")
    paths = [f.path / n for n in files]
    if not paths:
        paths = sorted(f.path.glob("pytorch_model*.bin"))
        if paths:
            notes.append("pickled pytorch_model*.bin weights, no safetensors")
        else:
            problems.append("no weights (*.safetensors or pytorch_model*.bin)")
    for p in paths:
        try:
            refs = safetensors_refs(p) if p.suffix == ".safetensors" else pickle_refs(p)
        except Exception as e:  # a damaged shard is a finding here, not a crash
            problems.append(f"{p.name}: {_first_line(e)}")
            continue
        for r in refs:
            if r.name in f.refs:
                problems.append(f"tensor {r.name} is stored twice ({Path(f.refs[r.name].origin).name}, {p.name})")
            f.refs[r.name] = r
    if index.is_file():
        lost = [n for n, shard in (json.loads(index.read_text()).get("weight_map") or {}).items()
                if (f.path / shard).is_file() and n not in f.refs]
        if lost:
            problems.append(f"the index maps {len(lost)} tensors to shards that do not hold them (e.g. {lost[0]})")
    summary = f"{len(f.refs)} tensors in {len(paths)} file(s)"
    if problems:
        return failed("files", S, problems[0], problems[1:] + notes, files=len(paths), tensors=len(f.refs))
    return passed("files", S, summary, notes, files=len(paths), tensors=len(f.refs))


# --- architecture ----------------------------------------------------------------------------------------------------
def check_architecture(f: Folder, source: Source | None) -> Check:
    if f.config is None:
        return skipped("architecture", S, "no readable config.json")
    f.arch = (f.config.get("architectures") or [None])[0]
    if not f.arch:
        return failed("architecture", S, "config.json has no architectures",
                      ["vLLM cannot pick a model class; set architectures, e.g. the base model's"])
    f.target = target_of(f.arch)
    auto_map = f.config.get("auto_map")
    if auto_map:
        mods = sorted({str(v).split(".")[0] + ".py" for v in (auto_map.values() if isinstance(auto_map, dict)
                       else []) if isinstance(v, str) and "--" not in v})
        lost = [m for m in mods if not (f.path / m).is_file()]
        if lost:
            return failed("architecture", S, f"{f.arch} needs remote code and {', '.join(lost)} is missing",
                          ["transformers: ValueError: Loading this model requires you to execute custom code …",
                           "copy the .py files auto_map names into the folder"])
        return passed("architecture", S, f"{f.arch} (remote code; tensor names not checked)",
                      ["serve with --trust-remote-code; rlexport does not run the folder's code"])
    import transformers
    from transformers import AutoConfig
    f.model_cls = getattr(transformers, f.arch, None)
    if f.model_cls is None:
        in_vllm = architecture_known(f.arch, "vllm")
        return failed("architecture", S, f"transformers has no class {f.arch}",
                      [f"vLLM: ValueError: Model architectures ['{f.arch}'] are not supported for now."]
                      if in_vllm is False else ["set architectures in config.json to the class of the weights"])
    if f.target is None:
        return failed("architecture", S, f"{f.arch} is neither a causal LM nor a sequence/token classifier",
                      ["rlexport verifies *ForCausalLM (policy) and *ForSequence/TokenClassification (value)"])
    try:
        f.hf_config = AutoConfig.from_pretrained(f.path)
    except Exception as e:  # the exact loader error is the finding (rope_scaling skew, bad model_type, ...)
        return failed("architecture", S, "transformers cannot read config.json", [_first_line(e)])
    details = []
    if f.target == "value":
        labels = getattr(f.hf_config, "num_labels", None)
        if f.arch.endswith("ForSequenceClassification") and f.config.get("problem_type") != "regression":
            details.append("problem_type is not regression: vLLM applies sigmoid (num_labels 1) to the score")
        details.append(f"num_labels {labels}")
    return passed("architecture", S, f"{f.arch} ({f.target})", details)


# --- names and shapes ------------------------------------------------------------------------------------------------
def _meta_model(f: Folder):
    with torch.device("meta"):
        return f.model_cls(f.hf_config)


def _leftover_hint(name: str) -> str:
    if "v_head." in name or name.startswith("value_head"):
        return "a value head left in"
    if "lora_" in name or ".base_layer." in name or "modules_to_save" in name:
        return "unmerged PEFT tensors"
    if name.startswith(("pretrained_model.", "base_model.model.")):
        return "a trainer wrapper prefix"
    return "not a parameter of the architecture"


def _missing_hint(name: str) -> str:
    return "a bias dropped" if name.endswith(".bias") else "the output layer missing" \
        if name.startswith("lm_head") else "a weight missing"


def _unknown_prefix(name: str, modules: set[str]) -> str:
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        if ".".join(parts[:i]) not in modules:
            return ".".join(parts[:i])
    return name


def check_names(f: Folder, source: Source | None) -> Check:
    if f.model_cls is None or f.hf_config is None:
        return skipped("tensor-names", S, "no architecture to compare with")
    model = _meta_model(f)
    seen: dict[int, str] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            f.aliases[name] = seen[id(t)]
        else:
            seen[id(t)] = name
        f.expected[name] = tuple(t.shape)
    modules = {n for n, _ in model.named_modules()} | set(f.expected)
    allowed = {n for n in f.refs if n.endswith(IGNORED_BUFFERS)}
    if f.arch.endswith("ForSequenceClassification"):
        allowed |= {n for n in f.refs if n == "score.bias"}  # vLLM attaches it (as_seq_cls_model)
    extra = sorted(set(f.refs) - set(f.expected) - allowed)
    missing = sorted(set(f.expected) - set(f.refs) - set(f.aliases))
    details = []
    for n in extra[:5]:
        details.append(f"leftover {n} ({_leftover_hint(n)})")
    if extra:
        details.append(f"vLLM: ValueError: There is no module or parameter named "
                       f"'{_unknown_prefix(extra[0], modules)}' in {f.arch}")
    for n in missing[:5]:
        details.append(f"missing {n} ({_missing_hint(n)})")
    if missing:
        details.append(f"vLLM: ValueError: Following weights were not initialized from checkpoint: "
                       f"{{'{missing[0]}', …}}; transformers: MISSING, newly initialized at random")
    for alias, canon in f.aliases.items():
        if alias in f.refs and canon in f.refs:
            a, c = f.refs[alias], f.refs[canon]
            if a.shape != c.shape or not torch.equal(a.load(), c.load()):
                extra.append(alias)
                details.append(f"{alias} differs from {canon} but config.json ties them: vLLM skips {alias}, "
                               "the trained head is lost (write tie_word_embeddings: false)")
    notes = [f"{n} present (vLLM uses it as the score bias; transformers' {f.arch} has no bias and ignores it)"
             for n in allowed if n == "score.bias"]
    metrics = dict(expected=len(f.expected) - len(f.aliases), stored=len(f.refs), leftover=len(extra),
                   missing=len(missing))
    if extra or missing:
        what = ", ".join(filter(None, [f"{len(extra)} leftover" if extra else "",
                                       f"{len(missing)} missing" if missing else ""]))
        return failed("tensor-names", S, f"{what} tensor name(s) against {f.arch}", details + notes, **metrics)
    return passed("tensor-names", S, f"every tensor is a parameter of {f.arch}, none missing", notes, **metrics)


def check_shapes(f: Folder, source: Source | None) -> Check:
    if not f.expected:
        return skipped("tensor-shapes", S, "no expected parameters")
    wrong = [(n, r.shape, f.expected[n]) for n, r in f.refs.items() if n in f.expected and
             tuple(r.shape) != f.expected[n]]
    if wrong:
        n, got, want = wrong[0]
        return failed("tensor-shapes", S, f"{len(wrong)} tensor(s) do not fit config.json",
                      [f"{n}: stored {list(got)}, config implies {list(want)}" for n, got, want in wrong[:5]] +
                      [f"vLLM: AssertionError in the weight loader; transformers: MISMATCH, {n} reinitialised"],
                      mismatched=len(wrong))
    return passed("tensor-shapes", S, f"{sum(n in f.expected for n in f.refs)} shapes match config.json")


# --- dtype and values ------------------------------------------------------------------------------------------------
def _config_dtype(config: dict) -> str | None:
    for cfg in (config, config.get("text_config") or {}):
        name = cfg.get("dtype") or cfg.get("torch_dtype")
        if isinstance(name, str):
            return name
    return None


def check_dtype(f: Folder, source: Source | None) -> Check:
    body = Counter(r.dtype for n, r in f.refs.items() if r.dtype in FLOATS and not n.startswith("score."))
    if not body:
        return skipped("dtype", S, "no float tensors")
    f.dtype = body.most_common(1)[0][0]
    named = _config_dtype(f.config or {})
    if len(body) > 1:
        return failed("dtype", S, "mixed dtypes: " + ", ".join(f"{dtype_name(d)} {c}" for d, c in body.items()),
                      ["vLLM casts every tensor to one dtype; export with one --dtype"])
    if named is None:
        return passed("dtype", S, f"{dtype_name(f.dtype)}", ["config.json names no dtype: vLLM reads the "
                                                            "safetensors headers, transformers loads float32"])
    if DTYPES.get(named) != f.dtype:
        return failed("dtype", S, f"config.json says {named}, the tensors are {dtype_name(f.dtype)}",
                      [f"vLLM and transformers (dtype auto) cast to {named} on load"])
    notes = ["float32: vLLM --dtype auto serves it in a 16-bit dtype of its choosing"] if f.dtype == torch.float32 \
        else []
    return passed("dtype", S, f"{dtype_name(f.dtype)}, as config.json says", notes)


def check_values(f: Folder, source: Source | None) -> Check:
    nonfinite, peak, tiny, off_grid, n = [], 0.0, 0, 0, 0
    for name, ref in f.refs.items():
        if ref.dtype not in FLOATS or ref.numel == 0:
            continue
        t = ref.load()
        n += 1
        lo, hi = (float(x) for x in torch.aminmax(t))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            nonfinite.append(name)
            continue
        peak = max(peak, abs(lo), abs(hi))
        if ref.dtype == torch.bfloat16:
            x = t.float()
            small = x[(x != 0) & (x.abs() < TINY)] * FP16_STEP
            tiny += small.numel()
            off_grid += int((small != small.round()).sum())
    empty = [n_ for n_, r in f.refs.items() if r.numel == 0 and r.dtype in FLOATS]
    metrics = dict(tensors=n, max_abs=peak, tiny_values=tiny, off_fp16_grid=off_grid)
    if empty:
        return failed("values", S, f"{len(empty)} empty [0]-shaped tensors (ZeRO-3 placeholders)", empty[:5],
                      **metrics)
    if nonfinite:
        return failed("values", S, f"{len(nonfinite)} tensors hold NaN or Inf", nonfinite[:5], **metrics)
    if tiny >= MIN_TINY and off_grid == 0:
        return failed("values", S, f"bfloat16 weights passed through float16: all {tiny} values below 2^-17 lie on "
                      "float16's subnormal grid", ["precision was lost in a float16 step (and values beyond 65504 "
                      "would be Inf); export straight from the float32/bfloat16 weights"], **metrics)
    if (f.config and _config_dtype(f.config) in ("float16", "fp16", "half")) and peak > 65504:
        return failed("values", S, f"|x| up to {peak:.4g} does not fit float16, which config.json asks for",
                      **metrics)
    return passed("values", S, f"{n} tensors finite, max |x| {peak:.3g}", **metrics)


# --- tokenizer, generation config, eos, template -------------------------------------------------------------------
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
    try:
        end = turn_end_id(f.tokenizer)
    except Exception:  # a broken template is the chat-template check's finding
        end = None
    if end is not None:
        required[end] = "the chat template's end of turn"
    if f.source_tokenizer is not None and f.source_tokenizer.eos_token_id is not None:
        required.setdefault(f.source_tokenizer.eos_token_id, "the training tokenizer's eos")
    if not required and tok_eos is not None:
        required[tok_eos] = "the tokenizer's eos"
    problems = []
    for i, why in required.items():
        tok_s = f.tokenizer.convert_ids_to_tokens(i)
        if i not in vllm_stops:
            problems.append(f"vLLM never stops on {tok_s!r} (id {i}, {why}): stops are {sorted(vllm_stops)}")
        elif i not in tf_stops:
            problems.append(f"transformers generate() never stops on {tok_s!r} (id {i}, {why}): "
                            f"generation_config eos_token_id is {sorted(tf_stops)}")
    rows = f.rows
    if rows is not None and any(i >= rows for i in vllm_stops):
        problems.append(f"eos ids {sorted(i for i in vllm_stops if i >= rows)} are beyond the {rows} embedding rows")
    if not vllm_stops:
        problems.append("no eos id anywhere: generation runs to max_tokens")
    metrics = dict(stop_ids=sorted(vllm_stops), required=sorted(required))
    if problems:
        return failed("eos", S, problems[0], problems[1:], **metrics)
    return passed("eos", S, f"stops on {sorted(vllm_stops)} (" + ", ".join(
        f"{f.tokenizer.convert_ids_to_tokens(i)}" for i in sorted(required)) + " included)", **metrics)


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
    check_files, check_architecture, check_names, check_shapes, check_dtype, check_values, check_tokenizer,
    check_generation_config, check_eos, check_chat_template,
)


def structure(path: Path, source: Source | None) -> tuple[list[Check], Folder]:
    folder = Folder(Path(path))
    return [check(folder, source) for check in CHECKS], folder
