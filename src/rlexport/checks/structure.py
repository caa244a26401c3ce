"""Structure checks of a folder, weights side, from headers only: files, architecture, tensor names and shapes
against the architecture's parameters, dtype, and config.json against the tensors (tokens.py: the tokenizer side).

Shared by the export's self-check (selfcheck.py, run on the temporary folder before it is committed) and
`rlexport verify` (which adds the checks that read tensor data). Each check is a function of the Folder (what
earlier checks learned) and the training Source (or None); it returns one Check. What transformers knows about the
architecture comes as data (facts.py): from the cache or a child process in an export, in-process in verify.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from .. import archs
from ..formats.files import pickle_refs, safetensors_refs
from ..formats.value_heads import is_head_tensor
from ..tensors import DTYPES, FLOATS, TensorRef, dtype_name
from .facts import Facts, first_line as _first_line
from .report import Check, failed, passed, skipped

if TYPE_CHECKING:
    from ..formats import Source

S = "structure"
POLICY_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
VALUE_SUFFIXES = ("ForSequenceClassification", "ForTokenClassification")
IGNORED_BUFFERS = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


def in_process(f: Folder) -> Facts:
    """The facts computed with transformers in this process; the live objects stay on the Folder (verify's
    numbers and engine stages use the config and the tokenizer)."""
    from .facts import compute
    facts, live = compute(f.path)
    f.model_cls, f.hf_config, f.tokenizer = live.model_cls, live.hf_config, live.tokenizer
    return facts


@dataclass
class Folder:
    """What the structure checks learned about the folder; the numbers and engine stages read it."""

    path: Path
    config: dict | None = None
    arch: str | None = None
    target: str | None = None                     # policy | value
    refs: dict[str, TensorRef] = field(default_factory=dict)
    facts_from: Callable[[Folder], Facts | None] = in_process  # the self-check: the cache / a child process
    facts: Facts | None = None
    model_cls: type | None = None                 # the live objects, when the facts were computed in-process
    hf_config: object | None = None
    expected: dict[str, tuple[int, ...]] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)  # optional tied name -> canonical name
    dtype: torch.dtype | None = None
    tokenizer: object | None = None
    source_tokenizer: object | None = None        # verify --against: the training tokenizer (loaded by verify)
    source_tokenizer_error: str | None = None
    headers_only: bool = False                    # the export's self-check: never read tensor data
    memory: dict[str, tuple[int, ...]] = field(default_factory=dict)  # stored tensors as the in-memory parameters

    @property
    def rows(self) -> int | None:
        emb, _ = archs.embedding_pair(self.config or {})
        ref = self.refs.get(emb)
        return ref.shape[0] if ref is not None else (self.config or {}).get("vocab_size")

    def known(self) -> Facts | None:
        """transformers' facts about this folder (computed, or waited for, once)."""
        if self.facts is None:
            self.facts = self.facts_from(self)
        return self.facts


def target_of(arch: str | None) -> str | None:
    if arch and arch.endswith(POLICY_SUFFIXES):
        return "policy"
    if arch and arch.endswith(VALUE_SUFFIXES):
        return "value"
    return None


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
    facts = f.known()
    if facts is None:
        return skipped("architecture", S, "transformers is not installed")
    if not facts.has_class:
        in_vllm = archs.architecture_known(f.arch, "vllm")
        return failed("architecture", S, f"transformers has no class {f.arch}",
                      [f"vLLM: ValueError: Model architectures ['{f.arch}'] are not supported for now."]
                      if in_vllm is False else ["set architectures in config.json to the class of the weights"])
    if f.target is None:
        return failed("architecture", S, f"{f.arch} is neither a causal LM nor a sequence/token classifier",
                      ["rlexport verifies *ForCausalLM (policy) and *ForSequence/TokenClassification (value)"])
    if facts.config_error is not None:
        return failed("architecture", S, "transformers cannot read config.json", [facts.config_error])
    details = []
    if f.target == "value":
        if f.arch.endswith("ForSequenceClassification") and f.config.get("problem_type") != "regression":
            details.append("problem_type is not regression: vLLM applies sigmoid (num_labels 1) to the score")
        details.append(f"num_labels {facts.num_labels}")
    return passed("architecture", S, f"{f.arch} ({f.target})", details)


# --- names and shapes ------------------------------------------------------------------------------------------------
def _leftover_hint(name: str) -> str:
    if is_head_tensor(name):
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
    facts = f.facts
    if facts is None or not facts.has_class or facts.config_error is not None or f.target is None:
        return skipped("tensor-names", S, "no architecture to compare with")
    f.expected, f.aliases = dict(facts.expected), dict(facts.aliases)
    modules = set(facts.modules) | set(f.expected)
    # MoE checkpoints store experts one by one (and Mixtral as block_sparse_moe); transformers fuses them on load
    # a --quantize export (compressed-tensors): each quantized Linear counts as its dense weight [out, in]
    from ..quant.names import dense_shapes
    dense, quant_problems = dense_shapes(f.config or {}, {n: tuple(r.shape) for n, r in f.refs.items()})
    f.memory = archs.memory_shapes(f.config or {}, dense)
    allowed = {n for n in f.memory if n.endswith(IGNORED_BUFFERS)}
    if f.arch.endswith("ForSequenceClassification"):
        allowed |= {n for n in f.memory if n == "score.bias"}  # vLLM attaches it (as_seq_cls_model)
    extra = sorted(set(f.memory) - set(f.expected) - allowed)
    missing = sorted(set(f.expected) - set(f.memory) - set(f.aliases))
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
            if f.headers_only or a.shape != c.shape or not torch.equal(a.load(), c.load()):
                extra.append(alias)
                details.append(f"{alias} differs from {canon} but config.json ties them: vLLM skips {alias}, "
                               "the trained head is lost (write tie_word_embeddings: false)")
    notes = [f"{n} present (vLLM uses it as the score bias; transformers' {f.arch} has no bias and ignores it)"
             for n in allowed if n == "score.bias"]
    if quant_problems:
        return failed("tensor-names", S, f"{len(quant_problems)} quantized tensor(s) do not fit the "
                      "quantization_config", quant_problems[:5])
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
    wrong = [(n, shape, f.expected[n]) for n, shape in f.memory.items() if n in f.expected and
             tuple(shape) != f.expected[n]]
    if wrong:
        n, got, want = wrong[0]
        return failed("tensor-shapes", S, f"{len(wrong)} tensor(s) do not fit config.json",
                      [f"{n}: stored {list(got)}, config implies {list(want)}" for n, got, want in wrong[:5]] +
                      [f"vLLM: AssertionError in the weight loader; transformers: MISMATCH, {n} reinitialised"],
                      mismatched=len(wrong))
    return passed("tensor-shapes", S, f"{sum(n in f.expected for n in f.memory)} shapes match config.json")


# --- dtype, and config.json against the tensors ----------------------------------------------------------------------
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
